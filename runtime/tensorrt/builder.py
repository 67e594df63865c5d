"""ONNX -> serialized TensorRT engine, through the Python API that `tensorrt` (10.x, 11.x)
and `tensorrt_rtx` share. Precision lives in the graph: networks are strongly typed unless
weak typing (`--precision fp16|bf16`) is asked for on a TensorRT that still supports it."""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from models.errors import ToolkitError
from models.progress import phase

from .engine_files import BuildOptions
from .library import TensorRTLibrary
from .profiles import Profile

HARDWARE_LEVELS = {"none": "NONE", "ampere+": "AMPERE_PLUS", "same-cc": "SAME_COMPUTE_CAPABILITY"}


class EngineBuildError(ToolkitError):
    """TensorRT could not parse the graph or build the engine."""


@dataclass
class BuiltEngine:
    plan: bytes
    seconds: float
    timing_cache: bytes | None


def _progress_monitor(trt, log):
    """A TensorRT IProgressMonitor that prints top-level build phases (TensorRT >= 10)."""
    base = getattr(trt, "IProgressMonitor", None)
    if base is None:
        return None

    class Monitor(base):
        def __init__(self):
            base.__init__(self)
            self.started: dict[str, float] = {}

        def phase_start(self, phase_name, parent_phase, num_steps):
            self.started[phase_name] = time.perf_counter()
            if parent_phase is None:
                log(f"  build phase: {phase_name} ({num_steps} steps)")

        def step_complete(self, phase_name, step):
            return True  # False would cancel the build

        def phase_finish(self, phase_name):
            pass

    return Monitor()


def _target_compute_capabilities(library: TensorRTLibrary, config, targets: list[str]) -> None:
    """TensorRT-RTX builds ahead of time for the listed GPUs (default: its own set)."""
    trt = library.module
    if not hasattr(config, "set_compute_capability"):
        raise EngineBuildError(f"{library.flavour} cannot target other compute capabilities; build on the target GPU")
    config.num_compute_capabilities = len(targets)
    for index, target in enumerate(targets):
        member = getattr(trt.ComputeCapability, "SM" + target.replace(".", ""), None)
        if member is None or not config.set_compute_capability(member, index):
            known = [m for m in dir(trt.ComputeCapability) if m.startswith("SM")]
            raise EngineBuildError(f"{library.flavour} {library.version} cannot target compute capability {target}; "
                                   f"it knows {known}")


def parse_onnx(library: TensorRTLibrary, builder, logger, onnx_path: Path, strongly_typed: bool):
    trt = library.module
    flags = 0
    creation = trt.NetworkDefinitionCreationFlag
    if strongly_typed and hasattr(creation, "STRONGLY_TYPED"):
        flags |= 1 << int(creation.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [parser.get_error(i) for i in range(parser.num_errors)]
        first = errors[0] if errors else None
        where = ""
        if first is not None:
            node_name = first.node_name() if hasattr(first, "node_name") else ""
            operator = first.node_operator() if hasattr(first, "node_operator") else ""
            where = f" at node {first.node()} {node_name!r} ({operator})" if first.node() >= 0 else ""
        detail = first.desc() if first is not None else "unknown error"
        raise EngineBuildError(f"{library.flavour} cannot parse {onnx_path}{where}: {detail}")
    return network, parser


def build_engine(library: TensorRTLibrary, onnx_path: str | Path, profiles: list[Profile], options: BuildOptions,
                 timing_cache: bytes | None = None, log=print) -> BuiltEngine:
    """Parse `onnx_path` and build a serialized engine with the given profiles and options."""
    trt = library.module
    onnx_path = Path(onnx_path)
    weak = options.precision in ("fp16", "bf16")
    if weak and not library.supports_weak_typing:
        raise EngineBuildError(
            f"--precision {options.precision} needs weak typing, which {library.flavour} {library.version} no longer "
            f"has; export the graph with export-model --dtype {options.precision} and build it strongly typed"
        )
    started = time.perf_counter()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network, _parser = parse_onnx(library, builder, logger, onnx_path, strongly_typed=not weak)
    config = builder.create_builder_config()
    if options.workspace_mib:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, options.workspace_mib << 20)
    if hasattr(config, "builder_optimization_level"):
        config.builder_optimization_level = options.opt_level
    if weak:
        config.set_flag(trt.BuilderFlag.FP16 if options.precision == "fp16" else trt.BuilderFlag.BF16)
    if options.version_compatible:
        if not hasattr(trt.BuilderFlag, "VERSION_COMPATIBLE"):
            raise EngineBuildError(f"{library.flavour} {library.version} cannot build version-compatible engines")
        config.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)
    if options.hardware_compatibility != "none":
        level = getattr(getattr(trt, "HardwareCompatibilityLevel", None), HARDWARE_LEVELS[options.hardware_compatibility], None)
        if level is None:
            raise EngineBuildError(
                f"{library.flavour} {library.version} has no hardware compatibility level {options.hardware_compatibility}"
            )
        config.hardware_compatibility_level = level
    if options.compute_capabilities:
        _target_compute_capabilities(library, config, options.compute_capabilities)
    cache = None
    if hasattr(config, "create_timing_cache"):  # a no-op kept for compatibility in TensorRT-RTX
        cache = config.create_timing_cache(timing_cache or b"")
        config.set_timing_cache(cache, ignore_mismatch=True)
    for profile in profiles:
        trt_profile = builder.create_optimization_profile()
        for name, (low, opt, high) in profile.shapes.items():
            trt_profile.set_shape(name, low, opt, high)
        config.add_optimization_profile(trt_profile)
    monitor = _progress_monitor(trt, log)
    if monitor is not None and hasattr(config, "progress_monitor"):
        config.progress_monitor = monitor
    with phase(log, "building the engine", "building the engine (TensorRT times kernels for every layer) ..."):
        plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise EngineBuildError(f"{library.flavour} failed to build an engine from {onnx_path}; its log above says why")
    updated = None
    if cache is not None:
        updated = bytes(config.get_timing_cache().serialize())
    return BuiltEngine(bytes(plan), time.perf_counter() - started, updated)


def gpu_identity() -> tuple[str, str]:
    """(GPU name, compute capability 'major.minor') of CUDA device 0, via torch."""
    import torch

    if not torch.cuda.is_available():
        raise EngineBuildError("no CUDA GPU is visible; TensorRT engines are built and run on the GPU they target")
    major, minor = torch.cuda.get_device_capability(0)
    return torch.cuda.get_device_name(0), f"{major}.{minor}"
