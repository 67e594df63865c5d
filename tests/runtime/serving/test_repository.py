"""The Triton model repository: layout, and every config.pbtxt parsed by Triton's own ModelConfig schema."""
from __future__ import annotations

import json
import shutil

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from runtime.serving.limits import Limits, LimitsError
from runtime.serving.repository import RepositoryError, RepositoryOptions, export_repository
from runtime.tensorrt.engine_files import Sidecar, write_sidecar
from runtime.tensorrt.profiles import Profile

Config = model_config_pb2.ModelConfig


def parse(path) -> model_config_pb2.ModelConfig:
    """Triton's schema: an unknown field, enum or type is a ParseError."""
    return text_format.Parse(path.read_text(), Config())


def dims(config, name):
    tensor = next(t for t in (*config.input, *config.output) if t.name == name)
    return list(tensor.dims), Config.DESCRIPTOR.fields_by_name["input"].message_type.fields_by_name[
        "data_type"].enum_type.values_by_number[tensor.data_type].name


def test_a_graph_with_past_becomes_an_onnxruntime_model_and_a_streaming_generate(tiny_past_onnx, tmp_path):
    report = export_repository(tiny_past_onnx, tmp_path / "repo", RepositoryOptions(limits=Limits(max_rows=4)))
    model, generate = parse(tmp_path / "repo/rotary/config.pbtxt"), parse(tmp_path / "repo/generate/config.pbtxt")
    assert (tmp_path / "repo/rotary/1/model.onnx").is_file() and (tmp_path / "repo/generate/1/model.py").is_file()
    assert model.platform == "onnxruntime_onnx" and model.max_batch_size == 8 == report["max_batch_size"]
    assert dims(model, "input_ids") == ([-1], "TYPE_INT64")
    assert dims(model, "past_key_values.0.key") == ([2, -1, 16], "TYPE_FP32")
    assert dims(model, "logits") == ([-1, 256], "TYPE_FP32")
    assert model.dynamic_batching.max_queue_delay_microseconds == 100
    assert model.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_GPU
    assert generate.backend == "python" and generate.model_transaction_policy.decoupled
    assert {t.name for t in generate.input} == {"prompt", "prompt_ids", "text_input", "max_new_tokens", "max_tokens",
                                                "stream", "temperature", "filter_thres", "top_k", "top_p", "seed",
                                                "eos_id", "cancel_key"}
    assert {t.name for t in generate.output} == {"token_id", "text", "text_output"}
    assert all(t.optional for t in generate.input) and dims(generate, "token_id") == ([-1], "TYPE_INT64")
    params = {key: value.string_value for key, value in generate.parameters.items()}
    assert params["decoder_model"] == "../rotary/1/model.onnx" and params["max_rows"] == "4"
    assert params["device"] == "auto" and params["vocab_size"] == "256"


def test_a_static_cache_graph_has_no_batch_dimension_to_batch_on(tiny_static_onnx, tmp_path):
    export_repository(tiny_static_onnx, tmp_path / "repo", RepositoryOptions(kind="cpu", limits=Limits(
        max_prompt_tokens=32, max_new_tokens=48)))
    model = parse(tmp_path / "repo/rotary/config.pbtxt")
    assert model.max_batch_size == 0 and not model.HasField("dynamic_batching")
    scalar = next(t for t in model.input if t.name == "total_sequence_length")
    assert list(scalar.dims) == [1] and list(scalar.reshape.shape) == []
    assert dims(model, "past_key_values.1.value") == ([-1, 2, 96, 16], "TYPE_FP32")
    params = {k: v.string_value for k, v in parse(tmp_path / "repo/generate/config.pbtxt").parameters.items()}
    assert params["capacity"] == "96"


def test_an_engine_gets_tensorrt_plan_one_instance_group_per_profile_and_cuda_graphs(tiny_past_onnx, tmp_path):
    engine = tmp_path / "model.engine"
    engine.write_bytes(b"plan bytes")
    from models.graph_metadata import read_props

    profiles = [Profile({"input_ids": ((1, 1), (1, 64), (4, 512))}).to_dict(),
                Profile({"input_ids": ((1, 1), (8, 1), (16, 1))}).to_dict()]
    write_sidecar(engine, Sidecar(profiles=profiles, options={}, flavour="tensorrt", library_version="10.13",
                                  gpu_name="NVIDIA H100", compute_capability="9.0", onnx_sha256="0" * 64,
                                  build_seconds=1.0, graph_metadata=read_props(tiny_past_onnx)))
    export_repository(engine, tmp_path / "repo", RepositoryOptions(decoder=tiny_past_onnx))
    model = parse(tmp_path / "repo/rotary/config.pbtxt")
    assert model.platform == "tensorrt_plan" and model.max_batch_size == 4
    assert [list(group.profile) for group in model.instance_group] == [["0"], ["1"]]
    assert model.optimization.cuda.graphs
    assert (tmp_path / "repo/rotary/1/model.plan").read_bytes() == b"plan bytes"
    assert json.loads((tmp_path / "repo/rotary/1/model.plan.json").read_text())["profiles"] == profiles
    params = {k: v.string_value for k, v in parse(tmp_path / "repo/generate/config.pbtxt").parameters.items()}
    assert params["decoder_model"] == "1/decoder.onnx" and (tmp_path / "repo/generate/1/decoder.onnx").is_file()


def test_refusals_leave_nothing_behind(tiny_past_onnx, tiny_static_onnx, upstream_past_onnx, tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("x")
    cases = [
        (tmp_path / "taken", RepositoryOptions(), RepositoryError, "already exists; choose a new --output"),
        (tmp_path / "r1", RepositoryOptions(name="generate"), RepositoryError, "must be a simple name"),
        (tmp_path / "r2", RepositoryOptions(decoder=upstream_past_onnx[0]), RepositoryError,
         "was exported from other weights"),
        (tmp_path / "r3", RepositoryOptions(decoder=tiny_static_onnx), LimitsError,
         r"--max-prompt-tokens \(max_prompt_tokens\) 256 leaves no room for new tokens in the decoder's 96-token capacity"),
    ]
    for output, options, error, message in cases:
        with pytest.raises(error, match=message):
            export_repository(tiny_past_onnx, output, options)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]


def test_the_generate_entry_is_the_toolkit_module(tiny_past_onnx, tmp_path):
    export_repository(tiny_past_onnx, tmp_path / "repo", RepositoryOptions())
    text = (tmp_path / "repo/generate/1/model.py").read_text()
    assert "from runtime.serving.triton_model import GenerateModel" in text and len(text.splitlines()) < 30
    shutil.rmtree(tmp_path / "repo")


def test_serve_fits_the_limits_not_given_to_a_small_static_cache(tiny_static_onnx, tmp_path):
    """`serve STATIC.onnx` on a 96-token cache: the default 256-token limits become 48 + 48 (a given
    limit is kept), so the graph serves without flags."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    from runtime.serving.service import repository_for

    lines = []
    repository, _ = repository_for(str(tiny_static_onnx), tmp_path, {}, "cpu", lines.append)
    config = text_format.Parse((repository / "generate" / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    values = {key: value.string_value for key, value in config.parameters.items()}
    assert (values["max_prompt_tokens"], values["max_new_tokens"], values["capacity"]) == ("48", "48", "96")
    assert lines == ["serve: the decoder holds 96 tokens per row: --max-prompt-tokens 48, --max-new-tokens-limit 48"]


def test_serving_an_exported_repository_on_gpus_overrides_its_generate_instances(tiny_static_onnx, tmp_path):
    """`serve REPO --gpus 0,1`: generate's instance group becomes KIND_GPU on those GPUs, in the
    config override Triton's load API takes; without --gpus nothing changes."""
    from runtime.serving.service import repository_for

    export_repository(tiny_static_onnx, tmp_path / "repo", RepositoryOptions(kind="cpu", limits=Limits(
        max_prompt_tokens=48, max_new_tokens=48)))
    _, override = repository_for(str(tmp_path / "repo"), tmp_path, {}, None, print, None, (0, 1))
    assert override["instance_group"] == [{"count": 1, "kind": "KIND_GPU", "gpus": [0, 1]}]
    assert repository_for(str(tmp_path / "repo"), tmp_path, {}, None, print)[1] is None
