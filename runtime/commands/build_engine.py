"""`build-engine`: ONNX graph -> TensorRT (or TensorRT-RTX) engine, with profiles, cache and sidecar."""
from __future__ import annotations

import argparse
from pathlib import Path

from models.errors import ToolkitError

from .common import ArgumentParser, Files, log_to, positive_int, run_main, write_json


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="build-engine",
        description="Build a TensorRT engine from an exported ONNX graph (trtexec-style flags). "
                    "Optimisation profiles default to the axes recorded by export-model (batch 1:1:8, "
                    "sequence 1:128:1024). Networks are strongly typed: precision comes from the graph "
                    "(export-model --dtype). Writes ENGINE and ENGINE.json (the sidecar) and reuses a cached "
                    "engine when the ONNX bytes, flags, library and GPU are the same.",
    )
    parser.add_argument("model", metavar="MODEL.onnx", help="graph written by export-model")
    parser.add_argument("--output", "-o", metavar="PATH.engine",
                        help="engine path (default: MODEL with the suffix .engine)")
    shapes = parser.add_argument_group("optimisation profiles (repeat a flag to add a profile)")
    shapes.add_argument("--batch", action="append", metavar="MIN:OPT:MAX", help="batch range, e.g. 1:4:8")
    shapes.add_argument("--seq", action="append", metavar="MIN:OPT:MAX", help="sequence range, e.g. 1:128:1024")
    shapes.add_argument("--past", action="append", metavar="MIN:OPT:MAX",
                        help="cached-length range for graphs exported --with-past, e.g. 0:128:1024")
    shapes.add_argument("--min-shapes", action="append", metavar="SPEC",
                        help="trtexec style: input_ids:1x1,attention_mask:1x1")
    shapes.add_argument("--opt-shapes", action="append", metavar="SPEC", help="trtexec style optimum shapes")
    shapes.add_argument("--max-shapes", action="append", metavar="SPEC", help="trtexec style maximum shapes")
    build = parser.add_argument_group("build")
    build.add_argument("--precision", choices=["strongly-typed", "fp16", "bf16"], default="strongly-typed",
                       help="strongly-typed (default) keeps the graph's own precision; fp16/bf16 let TensorRT "
                            "pick lower precision (weak typing), only on TensorRT 10 and older (e.g. Jetson)")
    build.add_argument("--flavor", "--flavour", dest="flavour", choices=["auto", "tensorrt", "tensorrt-rtx"],
                       default="auto", help="which library builds: auto prefers tensorrt, then tensorrt-rtx")
    build.add_argument("--timing-cache", metavar="PATH",
                       help="load TensorRT's timing cache from PATH if present, and save it back after the build")
    build.add_argument("--workspace", type=positive_int, metavar="MiB",
                       help="workspace memory pool limit in MiB (default: TensorRT's, the GPU's memory)")
    build.add_argument("--opt-level", type=int, choices=range(6), default=3, metavar="0-5",
                       help="builder optimisation level, 0-5 (default 3); higher builds slower, may run faster")
    build.add_argument("--version-compatible", action="store_true",
                       help="build a plan later TensorRT versions can run (it embeds host code)")
    build.add_argument("--compute-capability", action="append", type=compute_capability, metavar="X.Y", default=[],
                       help="TensorRT-RTX only: build for this GPU generation (repeatable), e.g. 8.6 or 12.0; "
                            "default: RTX's own set")
    build.add_argument("--hardware-compatibility", choices=["none", "ampere+", "same-cc"], default="none",
                       help="run on other GPUs: ampere+ (any Ampere or newer), same-cc; default none (this GPU)")
    cache = parser.add_argument_group("engine cache")
    cache.add_argument("--no-cache", action="store_true", help="always build, ignoring the engine cache")
    cache.add_argument("--cache-dir", metavar="DIR",
                       help="engine cache directory (default $ROTARY_DEPLOY_CACHE/engines, else $XDG_CACHE_HOME or ~/.cache, then rotary-deploy/engines)")
    parser.add_argument("--json", nargs="?", const="-", metavar="PATH",
                        help="machine-readable report to PATH, or stdout if no PATH is given")
    return parser


def compute_capability(text: str) -> str:
    """X.Y, as nvidia-smi prints it (8.6, 12.0)."""
    import re

    if not re.fullmatch(r"[1-9][0-9]?\.[0-9]", text):
        raise argparse.ArgumentTypeError(f"expected a compute capability such as 8.6 or 12.0, got {text!r}")
    return text


def _inputs(args: argparse.Namespace):
    """(model path, engine path, profiles, graph metadata props, graph inputs), all checked before any build."""
    from models.graph_metadata import GraphMetadata
    from runtime.tensorrt.profiles import build_profiles, graph_axes

    model = Path(args.model)
    if model.is_dir():
        raise ToolkitError(f"MODEL {model} is a directory; give the .onnx file written by export-model")
    if not model.is_file():
        raise ToolkitError(f"ONNX model not found: {model}")
    output = _output(args)
    if args.compute_capability and args.flavour == "tensorrt":
        raise ToolkitError("--compute-capability is TensorRT-RTX's; the full TensorRT builds for the GPU it runs on: "
                           "drop it, or pass --flavor tensorrt-rtx")
    inputs, axes, metadata = graph_axes(model)
    capacity = GraphMetadata.from_props(metadata, str(model)).capacity
    profiles = build_profiles(inputs, axes, args.batch, args.seq, args.past, args.min_shapes, args.opt_shapes,
                              args.max_shapes, capacity)
    return model, output, profiles, metadata, inputs


def _fresh_build(args, library, model: Path, output: Path, profiles, options, metadata, inputs, identity, log):
    """Build, write the engine and its sidecar, save the timing cache; return the sidecar."""
    from dataclasses import asdict

    from models.files import atomic_path

    from runtime.tensorrt.builder import build_engine
    from runtime.tensorrt.engine_files import Sidecar, onnx_sha256, write_sidecar

    timing_path = Path(args.timing_cache) if args.timing_cache else None
    timing = timing_path.read_bytes() if timing_path and timing_path.is_file() else None
    built = build_engine(library, model, profiles, options, timing, log)
    gpu_name, cc = identity
    sidecar = Sidecar(profiles=[p.to_dict() for p in profiles], options=asdict(options), flavour=library.flavour,
                      library_version=library.version, gpu_name=gpu_name, compute_capability=cc,
                      onnx_sha256=onnx_sha256(model), build_seconds=round(built.seconds, 3),
                      io=[{"name": i.name, "dims": list(i.dims)} for i in inputs], graph_metadata=metadata)
    with atomic_path(output) as temporary:
        temporary.write_bytes(built.plan)
    write_sidecar(output, sidecar)
    if timing_path and built.timing_cache is not None:
        with atomic_path(timing_path) as temporary:
            temporary.write_bytes(built.timing_cache)
    log(f"built {output} ({len(built.plan) / 2**20:.1f} MiB) in {built.seconds:.1f} s"
        + (f"; timing cache saved to {timing_path}" if timing_path and built.timing_cache else ""))
    return sidecar


def _build(args: argparse.Namespace) -> int:
    import time

    from runtime.tensorrt.builder import gpu_identity
    from runtime.tensorrt.compat import can_execute
    from runtime.tensorrt.engine_files import BuildOptions, EngineCache, cache_key, onnx_sha256
    from runtime.tensorrt.library import load_tensorrt

    log = log_to(args.json == "-")
    model, output, profiles, metadata, inputs = _inputs(args)
    options = BuildOptions(precision=args.precision, workspace_mib=args.workspace, opt_level=args.opt_level,
                           version_compatible=args.version_compatible,
                           hardware_compatibility=args.hardware_compatibility,
                           compute_capabilities=list(args.compute_capability))
    library, (gpu_name, cc) = _library_and_gpu(args.flavour, load_tensorrt, gpu_identity)
    if args.compute_capability and not library.is_rtx:
        raise ToolkitError(f"--compute-capability is TensorRT-RTX's, and {library.flavour} was found: drop it, or "
                           "install TensorRT-RTX")
    runnable, reason = can_execute(library.flavour, cc)
    if not runnable and not library.is_rtx:
        raise ToolkitError(reason)  # the full TensorRT builds for the GPU it runs on
    if not runnable:
        log(f"note: {reason}; the engine is built for other GPUs")
    profile_dicts = [p.to_dict() for p in profiles]
    key = cache_key(onnx_sha256(model), profile_dicts, options, library.flavour, library.version, gpu_name, cc)
    cache = EngineCache(args.cache_dir)
    log(f"build-engine: {model} with {library.flavour} {library.version} on {gpu_name} (cc {cc}), "
        f"{len(profiles)} profile(s): " + " | ".join(p.describe() for p in profiles))
    started = time.perf_counter()
    sidecar = None if args.no_cache else cache.fetch(key, output)
    cached = sidecar is not None
    if cached:
        log(f"engine cache hit ({key[:12]}): copied to {output} in {time.perf_counter() - started:.2f} s "
            f"(originally built in {sidecar.build_seconds:.1f} s)")
    else:
        sidecar = _fresh_build(args, library, model, output, profiles, options, metadata, inputs, (gpu_name, cc), log)
        if not args.no_cache:
            cache.store(key, output, sidecar)
    if args.json:
        write_json(args.json, {"engine": str(output), "sidecar": str(output) + ".json", "cache_hit": cached,
                               "cache_key": key, "seconds": round(time.perf_counter() - started, 3),
                               "build_seconds": sidecar.build_seconds, "flavour": library.flavour,
                               "library_version": library.version, "gpu": gpu_name, "compute_capability": cc,
                               "runs_on_this_gpu": runnable, "profiles": profile_dicts})
    return 0


def _library_and_gpu(flavour: str, load_tensorrt, gpu_identity):
    """TensorRT and the GPU it builds for; a machine with neither hears of both at once."""
    from runtime.tensorrt.builder import EngineBuildError
    from runtime.tensorrt.library import TensorRTUnavailable

    try:
        identity = gpu_identity()
    except EngineBuildError as no_gpu:
        try:
            load_tensorrt(flavour)
        except TensorRTUnavailable as missing:
            raise ToolkitError(f"no CUDA GPU is visible here (TensorRT builds for the GPU it runs on: run build-engine "
                               f"on a machine with an NVIDIA GPU, or package-edge for a Jetson board), and {missing}") \
                from None
        raise ToolkitError(f"{no_gpu}; run build-engine on a machine with an NVIDIA GPU (package-edge prepares "
                           "a Jetson build)") from None
    return load_tensorrt(flavour), identity


def _output(args: argparse.Namespace) -> Path:
    return Path(args.output) if args.output else Path(args.model).with_suffix(".engine")


def _files(args: argparse.Namespace) -> Files:
    engine = _output(args)
    return Files(inputs={"MODEL": args.model},
                 outputs={"--output": str(engine), "the sidecar of --output": str(engine) + ".json", "--json": args.json,
                          "--timing-cache": args.timing_cache})


def main(argv: list[str] | None = None) -> int:
    return run_main(_build, build_parser(), argv, _files)


if __name__ == "__main__":
    raise SystemExit(main())
