"""The TensorRT path without a GPU: profiles, cache keys, sidecars, flavour selection,
compatibility checks and the build-engine error messages."""
from __future__ import annotations

import json
import sys
import types

import pytest

from runtime.tensorrt import library as trt_library
from runtime.tensorrt.compat import EngineIncompatible, can_execute, check_engine_runs_here
from runtime.tensorrt.engine_files import (BuildOptions, EngineCache, EngineFileError, Sidecar, cache_key,
                                           read_sidecar, write_sidecar)
from runtime.tensorrt.profiles import (AxisRange, InputAxes, Profile, ProfileError, build_profiles, graph_axes,
                                       parse_range, parse_shapes)

PLAIN = [InputAxes("input_ids", ("batch", "sequence")), InputAxes("attention_mask", ("batch", "sequence"))]
AXES = {"batch": AxisRange(1, 1, 8), "sequence": AxisRange(1, 128, 1024)}


def test_default_profile_comes_from_the_exported_axes(tiny_onnx, tiny_past_onnx):
    inputs, axes, metadata = graph_axes(tiny_onnx)
    assert [i.name for i in inputs] == ["input_ids", "attention_mask"]
    (profile,) = build_profiles(inputs, axes)
    assert profile.shapes["input_ids"] == ((1, 1), (1, 128), (8, 1024))
    assert json.loads(metadata["model_config"])["num_tokens"] == 256
    inputs, axes, _ = graph_axes(tiny_past_onnx)
    (profile,) = build_profiles(inputs, axes, past=["0:16:64"], seq=["1:1:32"])
    assert profile.shapes["attention_mask"] == ((1, 1), (1, 17), (8, 96))  # total = past + sequence
    assert profile.shapes["past_key_values.0.key"] == ((1, 2, 0, 16), (1, 2, 16, 16), (8, 2, 64, 16))


def test_ranges_and_trtexec_shapes_parse_and_validate():
    assert parse_range("1:4:8", "--batch") == AxisRange(1, 4, 8)
    assert parse_range("5", "--batch") == AxisRange(5, 5, 5)
    assert parse_shapes("input_ids:1x128,attention_mask:1x128", "--opt-shapes") == {
        "input_ids": (1, 128), "attention_mask": (1, 128)}
    with pytest.raises(ProfileError, match="need min <= opt <= max, got 4:2:8"):
        parse_range("4:2:8", "--batch")
    with pytest.raises(ProfileError, match="expected MIN:OPT:MAX"):
        parse_range("1:2", "--seq")
    with pytest.raises(ProfileError, match="sizes must be at least 1"):
        parse_range("0:1:2", "--seq")
    with pytest.raises(ProfileError, match="expected name:AxB"):
        parse_shapes("input_ids=1x2", "--min-shapes")


def test_several_profiles_and_their_errors():
    profiles = build_profiles(PLAIN, AXES, batch=["1:1:1", "1:8:16"], seq=["1:512:1024", "1:1:1"])
    assert [p.shapes["input_ids"] for p in profiles] == [((1, 1), (1, 512), (1, 1024)), ((1, 1), (8, 1), (16, 1))]
    explicit = build_profiles(PLAIN, AXES, min_shapes=["input_ids:1x1,attention_mask:1x1"],
                              opt_shapes=["input_ids:2x64,attention_mask:2x64"],
                              max_shapes=["input_ids:4x256,attention_mask:4x256"])
    assert explicit[0].shapes["attention_mask"] == ((1, 1), (2, 64), (4, 256))
    with pytest.raises(ProfileError, match="share axis 'batch' but their ranges differ"):
        build_profiles(PLAIN, AXES, min_shapes=["input_ids:1x1"], opt_shapes=["input_ids:2x2"],
                       max_shapes=["input_ids:4x4"])
    with pytest.raises(ProfileError, match="no input 'ids'"):
        build_profiles(PLAIN, AXES, min_shapes=["ids:1x1"], opt_shapes=["ids:1x1"], max_shapes=["ids:1x1"])
    with pytest.raises(ProfileError, match="same number of times"):
        build_profiles(PLAIN, AXES, min_shapes=["input_ids:1x1"])
    with pytest.raises(ProfileError, match=r"need min <= opt <= max, got 4:2:8"):
        build_profiles(PLAIN, AXES, min_shapes=["input_ids:4x1,attention_mask:4x1"],
                       opt_shapes=["input_ids:2x1,attention_mask:2x1"], max_shapes=["input_ids:8x1,attention_mask:8x1"])


def test_profile_membership_and_description():
    profile = Profile({"input_ids": ((1, 1), (1, 64), (4, 256))})
    assert profile.contains({"input_ids": (4, 256)}) and not profile.contains({"input_ids": (1, 257)})
    assert profile.describe() == "input_ids 1x1 .. 4x256"
    assert Profile.from_dict(profile.to_dict()) == profile


def test_cache_key_changes_with_every_input():
    base = dict(onnx_digest="a" * 64, profiles=[{"x": 1}], options=BuildOptions(), flavour="tensorrt-rtx",
                library_version="1.7.1", gpu_name="NVIDIA H100", compute_capability="9.0")
    key = cache_key(**base)
    assert key == cache_key(**base) and len(key) == 32
    for change in (dict(onnx_digest="b" * 64), dict(profiles=[{"x": 2}]), dict(options=BuildOptions(opt_level=5)),
                   dict(flavour="tensorrt"), dict(library_version="1.7.2"), dict(gpu_name="RTX 4090"),
                   dict(compute_capability="8.9")):
        assert cache_key(**{**base, **change}) != key, change


def _sidecar(**changes) -> Sidecar:
    fields = dict(profiles=[Profile({"input_ids": ((1, 1), (1, 8), (2, 16))}).to_dict()],
                  options=vars(BuildOptions()), flavour="tensorrt-rtx", library_version="1.7.1",
                  gpu_name="NVIDIA GeForce RTX 4090", compute_capability="8.9", onnx_sha256="c" * 64,
                  build_seconds=1.5, graph_metadata={"precision": "float32"})
    return Sidecar(**{**fields, **changes})


def test_sidecar_round_trip_and_engine_cache(tmp_path):
    engine = tmp_path / "model.engine"
    engine.write_bytes(b"plan")
    sidecar = _sidecar()
    write_sidecar(engine, sidecar)
    assert read_sidecar(engine) == sidecar
    cache = EngineCache(tmp_path / "cache")
    assert cache.fetch("k" * 32, tmp_path / "out.engine") is None
    cache.store("k" * 32, engine, sidecar)
    assert cache.fetch("k" * 32, tmp_path / "out.engine") == sidecar
    assert (tmp_path / "out.engine").read_bytes() == b"plan"
    assert read_sidecar(tmp_path / "out.engine") == sidecar
    (tmp_path / "bad.engine").write_bytes(b"x")
    with pytest.raises(EngineFileError, match="sidecar .*bad.engine.json is missing; rebuild the engine"):
        read_sidecar(tmp_path / "bad.engine")
    (tmp_path / "bad.engine.json").write_text("{not json")
    with pytest.raises(EngineFileError, match="is unreadable"):
        read_sidecar(tmp_path / "bad.engine")


def test_engines_from_another_library_version_or_gpu_are_refused():
    sidecar = _sidecar()
    check_engine_runs_here(sidecar, "tensorrt-rtx", "1.7.1", "NVIDIA GeForce RTX 4090", "8.9")
    with pytest.raises(EngineIncompatible, match="built with tensorrt-rtx 1.7.1 but 1.8.0 is installed; rebuild"):
        check_engine_runs_here(sidecar, "tensorrt-rtx", "1.8.0", "NVIDIA GeForce RTX 4090", "8.9")
    with pytest.raises(EngineIncompatible, match=r"built for NVIDIA GeForce RTX 4090 \(compute capability 8.9\)"):
        check_engine_runs_here(sidecar, "tensorrt-rtx", "1.7.1", "NVIDIA RTX A6000", "8.6")
    compatible = _sidecar(options={**vars(BuildOptions()), "hardware_compatibility": "ampere+",
                                   "version_compatible": True})
    check_engine_runs_here(compatible, "tensorrt-rtx", "1.8.0", "NVIDIA RTX A6000", "8.6")
    with pytest.raises(EngineIncompatible, match="TensorRT-RTX does not run engines on compute capability 9.0"):
        check_engine_runs_here(_sidecar(compute_capability="9.0"), "tensorrt-rtx", "1.7.1", "NVIDIA H100", "9.0")
    with pytest.raises(EngineIncompatible, match="built with tensorrt-rtx, but tensorrt is loaded"):
        check_engine_runs_here(sidecar, "tensorrt", "10.13", "NVIDIA GeForce RTX 4090", "8.9")
    assert can_execute("tensorrt", "9.0") == (True, "")
    assert not can_execute("tensorrt", "7.0")[0]
    assert can_execute("tensorrt-rtx", "12.0")[0] and can_execute("tensorrt-rtx", "8.6")[0]
    assert not can_execute("tensorrt-rtx", "8.7")[0]  # Jetson Orin: TensorRT 10 from JetPack instead


def _fake_trt(name: str, version: str, weak: bool) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__version__ = version
    module.Builder = object
    module.BuilderFlag = types.SimpleNamespace(**({"FP16": 1, "BF16": 2} if weak else {}))
    return module


def test_flavour_selection(monkeypatch):
    for name in ("tensorrt", "tensorrt_rtx", "tensorrt_rtx_bindings"):
        monkeypatch.setitem(sys.modules, name, None)  # None in sys.modules makes the import fail
    with pytest.raises(trt_library.TensorRTUnavailable, match="no TensorRT library is installed; install TensorRT-RTX"):
        trt_library.load_tensorrt("auto")
    with pytest.raises(trt_library.TensorRTUnavailable, match="tensorrt is not installed"):
        trt_library.load_tensorrt("tensorrt")
    with pytest.raises(trt_library.TensorRTUnavailable, match="unknown TensorRT flavour 'trt'"):
        trt_library.load_tensorrt("trt")
    monkeypatch.setitem(sys.modules, "tensorrt_rtx_bindings", _fake_trt("tensorrt_rtx_bindings", "1.7.1", False))
    rtx = trt_library.load_tensorrt("auto")
    assert (rtx.flavour, rtx.version, rtx.supports_weak_typing) == ("tensorrt-rtx", "1.7.1", False)
    monkeypatch.setitem(sys.modules, "tensorrt", _fake_trt("tensorrt", "10.13.0", True))
    full = trt_library.load_tensorrt("auto")  # the full TensorRT wins when both are there
    assert (full.flavour, full.major, full.supports_weak_typing) == ("tensorrt", 10, True)
    monkeypatch.setitem(sys.modules, "tensorrt", _fake_trt("tensorrt", "11.0.0", False))
    assert not trt_library.load_tensorrt("tensorrt").supports_weak_typing
    assert trt_library.load_tensorrt("tensorrt-rtx").flavour == "tensorrt-rtx"


def test_weak_typing_is_refused_where_gone(monkeypatch, tiny_onnx):
    from runtime.tensorrt.builder import EngineBuildError, build_engine

    library = trt_library.TensorRTLibrary(_fake_trt("tensorrt_rtx", "1.7.1", False), "tensorrt-rtx", "1.7.1")
    with pytest.raises(EngineBuildError, match="--precision fp16 needs weak typing, which tensorrt-rtx 1.7.1 no "
                                               "longer has; export the graph with export-model --dtype fp16"):
        build_engine(library, tiny_onnx, [], BuildOptions(precision="fp16"))


def test_help_of_every_command_never_imports_tensorrt_or_onnxruntime():
    import subprocess

    commands = ("export_model", "check_parity", "build_engine", "generate", "benchmark", "package_edge")
    code = ("import sys, importlib; "
            f"[importlib.import_module('runtime.commands.' + c).build_parser().format_help() for c in {commands}]; "
            "import runtime.registry, runtime.decoding.open; "
            "assert not any(m.startswith(('tensorrt', 'onnxruntime')) for m in sys.modules), sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=str(__import__("pathlib").Path(__file__).parents[3]))


def _fake_parsing_trt(error_node: int | None, recorded: dict | None = None):
    """Just enough of the TensorRT Python API to reach the parser and the builder; what the builder
    is asked for lands in `recorded`."""
    recorded = {} if recorded is None else recorded

    class ParserError:
        def node(self):
            return error_node

        def node_name(self):
            return "node_If_12"

        def node_operator(self):
            return "If"

        def desc(self):
            return "If with data-dependent output shapes is not supported"

    class OnnxParser:
        def __init__(self, network, logger):
            self.num_errors = 1 if error_node is not None else 0

        def parse_from_file(self, path):
            return error_node is None

        def get_error(self, index):
            return ParserError()

    class Config:
        def __init__(self):
            recorded["flags"] = []

        def set_memory_pool_limit(self, pool, size):
            recorded["workspace"] = (pool, size)

        def set_flag(self, flag):
            recorded["flags"].append(flag)

        def add_optimization_profile(self, profile):
            recorded.setdefault("profiles", []).append(profile.shapes)

    class Profile:
        def __init__(self):
            self.shapes = {}

        def set_shape(self, name, low, opt, high):
            self.shapes[name] = (low, opt, high)

    class Builder:
        def __init__(self, logger):
            pass

        def create_network(self, flags):
            recorded["network_flags"] = flags
            return object()

        def create_builder_config(self):
            return Config()

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            return b"serialized-plan"

    module = types.ModuleType("tensorrt_rtx")
    module.__version__ = "1.7.1"
    module.Logger = type("Logger", (), {"WARNING": 2, "__init__": lambda self, level: None})
    module.Builder, module.OnnxParser = Builder, OnnxParser
    module.NetworkDefinitionCreationFlag = types.SimpleNamespace(STRONGLY_TYPED=5)
    module.MemoryPoolType = types.SimpleNamespace(WORKSPACE=0)
    module.BuilderFlag = types.SimpleNamespace(VERSION_COMPATIBLE=7)
    return trt_library.TensorRTLibrary(module, "tensorrt-rtx", "1.7.1")


def test_parse_errors_name_the_failing_node(tiny_onnx):
    from runtime.tensorrt.builder import EngineBuildError, build_engine

    with pytest.raises(EngineBuildError, match=r"tensorrt-rtx cannot parse .*model.onnx at node 12 'node_If_12' "
                                               r"\(If\): If with data-dependent output shapes is not supported"):
        build_engine(_fake_parsing_trt(12), tiny_onnx, [], BuildOptions())


def test_builder_sets_profiles_and_flags(tiny_onnx):
    from runtime.tensorrt.builder import build_engine

    shapes = {"input_ids": ((1, 1), (2, 8), (4, 16)), "attention_mask": ((1, 1), (2, 8), (4, 16))}
    other = {name: ((4, 1), (8, 1), (8, 1)) for name in shapes}
    recorded = {}
    built = build_engine(_fake_parsing_trt(None, recorded), tiny_onnx, [Profile(shapes), Profile(other)],
                         BuildOptions(workspace_mib=64, version_compatible=True), log=lambda _: None)
    assert built.plan == b"serialized-plan" and built.timing_cache is None and 0 < built.seconds < 60
    assert recorded["network_flags"] == 1 << 5  # STRONGLY_TYPED: precision comes from the graph
    assert recorded["workspace"] == (0, 64 << 20)  # WORKSPACE pool, in bytes
    assert recorded["flags"] == [7]  # VERSION_COMPATIBLE, and no FP16/BF16 weak-typing flag
    assert recorded["profiles"] == [shapes, other]  # one optimisation profile each, min/opt/max as given
