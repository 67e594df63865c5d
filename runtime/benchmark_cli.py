"""`benchmark`: prefill throughput and decode latency per backend, against the physical floor."""
from __future__ import annotations

import argparse
import platform
from datetime import datetime, timezone

from models.errors import ToolkitError

from .cli_support import add_model_arguments, int_list, log_to, run_main, write_json

ALL_BACKENDS = ("torch", "torch-compile", "onnxruntime", "onnxruntime-cuda", "onnxruntime-static",
                "onnxruntime-cuda-static", "tensorrt")
STATIC_PROVIDERS = {"onnxruntime-static": "cpu", "onnxruntime-cuda-static": "cuda"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="benchmark",
        description="Measure prefill throughput (tokens/s, achieved TFLOP/s) and per-token decode latency "
                    "(p50/p90/p99, through the key/value cache) for each backend, with GPU memory, and print "
                    "each result as a multiple of the physical floor of this GPU (decode: bytes read / memory "
                    "bandwidth; prefill: FLOPs / peak tensor throughput). No timing is asserted anywhere.",
    )
    parser.add_argument("model", metavar="MODEL.onnx", nargs="?",
                        help="graph exported with --with-past (for the ONNX Runtime backends); its metadata "
                             "names the weights and precision the PyTorch backends use")
    parser.add_argument("--engine", metavar="PATH", help="TensorRT engine built from MODEL (for --backend tensorrt)")
    parser.add_argument("--backend", default=None, metavar="LIST",
                        help=f"comma-separated, from {','.join(ALL_BACKENDS)} (default: torch,torch-compile,"
                             "onnxruntime-cuda,onnxruntime-cuda-static[,tensorrt] on a GPU; torch,onnxruntime on the "
                             "CPU). The *-static backends write the static-cache graph (export-model --static-cache) "
                             "from the same weights in memory, sized for the largest context, and replay each decode "
                             "step as a CUDA graph")
    add_model_arguments(parser, "default: the weights recorded in MODEL")
    parser.add_argument("--batch", type=int_list, default=[1], metavar="N,N", help="batch sizes (default 1)")
    parser.add_argument("--context", type=int_list, default=[128], metavar="N,N",
                        help="prompt / cache lengths (default 128)")
    parser.add_argument("--new-tokens", type=int, default=32, metavar="N", help="decode steps timed (default 32)")
    parser.add_argument("--warmup", type=int, default=3, metavar="N", help="untimed runs first (default 3)")
    parser.add_argument("--iters", type=int, default=10, metavar="N", help="timed prefill runs (default 10)")
    parser.add_argument("--json", metavar="PATH", help="write all results as JSON ('-' for stdout)")
    parser.add_argument("--plot", metavar="PATH.png", help="draw decode latency vs context per backend (matplotlib)")
    return parser


def environment() -> dict:
    import onnxruntime
    import torch

    cuda = torch.cuda.is_available()
    return {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "host": platform.node(),
            "device": torch.cuda.get_device_name(0) if cuda else f"CPU ({platform.processor() or platform.machine()})",
            "torch": torch.__version__, "cuda": torch.version.cuda if cuda else None,
            "onnxruntime": onnxruntime.__version__, "python": platform.python_version()}


def format_table(results: list) -> str:
    head = (f"{'backend':<28}{'batch':>6}{'ctx':>6}{'prefill ms':>11}{'tok/s':>11}{'TFLOP/s':>9}{'x floor':>8}"
            f"{'dec p50':>9}{'p90':>8}{'p99':>8}{'x floor':>8}{'MiB':>8}")
    lines = [head]

    def cell(value, width, spec):
        return f"{'-' if value is None else format(value, spec):>{width}}"

    for r in results:
        if r.error:
            lines.append(f"{r.backend:<28}{r.batch:>6}{r.context:>6}  skipped: {r.error}")
            continue
        lines.append(f"{r.backend:<28}{r.batch:>6}{r.context:>6}{cell(r.prefill_ms, 11, '.2f')}"
                     f"{cell(r.prefill_tokens_per_s, 11, '.0f')}{cell(r.prefill_tflops, 9, '.2f')}"
                     f"{cell(r.prefill_x_floor, 8, '.1f')}{cell(r.decode_p50_ms, 9, '.3f')}{cell(r.decode_p90_ms, 8, '.3f')}"
                     f"{cell(r.decode_p99_ms, 8, '.3f')}{cell(r.decode_x_floor, 8, '.1f')}{cell(r.memory_mib, 8, '.0f')}")
    return "\n".join(lines)


def plot(results: list, path: str, title: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ToolkitError("--plot needs matplotlib; pip install matplotlib (or the [plot] extra)") from None
    from models.files import atomic_path

    figure, axis = plt.subplots(figsize=(7, 4.5))
    series: dict[tuple[str, int], list] = {}
    for r in results:
        if r.decode_p50_ms is not None:
            series.setdefault((r.backend, r.batch), []).append((r.context, r.decode_p50_ms))
    for (backend, batch), points in sorted(series.items()):
        points.sort()
        axis.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=f"{backend} (batch {batch})")
    floors = sorted({(r.context, r.decode_floor_ms) for r in results if r.decode_floor_ms and r.batch == min(x.batch for x in results)})
    if floors:
        axis.plot([f[0] for f in floors], [f[1] for f in floors], "k--", label="bandwidth floor")
    axis.set_xlabel("context (tokens in cache)")
    axis.set_ylabel("decode latency p50 (ms/token)")
    axis.set_yscale("log")
    axis.set_title(title, fontsize=9)
    axis.grid(True, alpha=0.3)
    axis.legend(fontsize=7)
    figure.tight_layout()
    with atomic_path(path) as temporary:
        figure.savefig(temporary, format="png", dpi=120)
    plt.close(figure)


def _open(kind: str, args, source, precision: str):
    import torch

    from .backends.onnxruntime_backend import OnnxRuntimeBackend
    from .backends.torch_backend import CompiledTorchBackend, TorchBackend

    dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16}.get(precision, torch.float32)
    cuda = torch.cuda.is_available()
    if kind == "torch":
        return TorchBackend(source().model, "cuda" if cuda else "cpu", dtype, with_past=True)
    if kind == "torch-compile":
        if not cuda:
            raise ToolkitError("torch-compile with CUDA graphs needs a GPU")
        return CompiledTorchBackend(source().model, "cuda", dtype, with_past=True)
    if kind in ("onnxruntime", "onnxruntime-cuda"):
        if not args.model:
            raise ToolkitError(f"{kind} needs MODEL.onnx (exported with --with-past)")
        return OnnxRuntimeBackend(args.model, "cuda" if kind == "onnxruntime-cuda" else "cpu")
    if kind == "tensorrt":
        if not args.engine:
            raise ToolkitError("tensorrt needs --engine PATH")
        from .backends.tensorrt_backend import TensorRTBackend

        return TensorRTBackend(args.engine)
    raise ToolkitError(f"unknown backend {kind!r}; choose from {', '.join(ALL_BACKENDS)}")


def _benchmark(args: argparse.Namespace) -> int:
    import torch

    from models.config import ModelConfig
    from models.source import resolve_model

    from .backends.onnxruntime_backend import OnnxRuntimeBackend
    from .benchmark import BenchmarkResult, measure
    from .cli_support import resolve_model_arguments
    from .floors import peaks_for

    log = log_to(args.json == "-")
    metadata = {}
    if args.model:
        with OnnxRuntimeBackend(args.model, "cpu") as probe:
            metadata = probe.metadata
            if not any(n.startswith("past_key_values.") for n in probe.input_names):
                log("note: MODEL has no key/value cache inputs; decode is not measured (export with --with-past)")
    precision = metadata.get("precision", "float32")

    def source():
        if args.checkpoint or args.preset or args.config or "source_preset" not in metadata:
            return resolve_model_arguments(args)
        return resolve_model(None, None, metadata["source_preset"], int(metadata.get("source_seed", 0)))

    config = ModelConfig.from_json(metadata["model_config"]) if "model_config" in metadata else source().model.config
    cuda = torch.cuda.is_available()
    kinds = args.backend.split(",") if args.backend else (
        ["torch", "torch-compile", "onnxruntime-cuda", "onnxruntime-cuda-static"]
        + (["tensorrt"] if args.engine else []) if cuda
        else ["torch", "onnxruntime"])
    env = environment()
    peaks = peaks_for(env["device"]) if cuda else None
    bytes_per_value = 4 if precision == "float32" else 2
    log(f"benchmark: {env['device']}; torch {env['torch']} (CUDA {env['cuda']}), onnxruntime {env['onnxruntime']}; "
        f"{precision}; batch {args.batch}, context {args.context}, {args.new_tokens} decode steps, "
        f"warmup {args.warmup}, iters {args.iters}; {env['date']}")
    if cuda and peaks is None:
        log("note: no peak figures for this GPU; floors are not computed")
    results = []
    for kind in kinds:
        if kind.strip() in STATIC_PROVIDERS:
            results += _benchmark_static(kind.strip(), args, source, precision, config, bytes_per_value, peaks, log)
            continue
        try:
            backend = _open(kind.strip(), args, source, precision)
        except ToolkitError as error:
            log(f"{kind}: skipped: {error}")
            results += [BenchmarkResult(kind, b, c, error=str(error)) for b in args.batch for c in args.context]
            continue
        device = torch.device("cuda" if (cuda and kind != "onnxruntime") else "cpu")
        with backend:
            for batch in args.batch:
                for context in args.context:
                    log(f"  {backend.name}: batch {batch}, context {context} ...")
                    try:
                        results.append(measure(backend, config, batch, context, args.new_tokens, args.warmup,
                                               args.iters, device, bytes_per_value, peaks))
                    except (ToolkitError, RuntimeError) as error:
                        message = str(error).splitlines()[0][:200]
                        results.append(BenchmarkResult(backend.name, batch, context, error=message))
        if cuda:
            torch.cuda.empty_cache()
    log(format_table(results))
    if args.json:
        write_json(args.json, {"environment": env, "precision": precision, "config": config.to_dict(),
                               "peaks": vars(peaks) if peaks else None,
                               "settings": {"batch": args.batch, "context": args.context, "new_tokens": args.new_tokens,
                                            "warmup": args.warmup, "iters": args.iters, "backends": kinds},
                               "results": [r.to_dict() for r in results]})
    if args.plot:
        plot(results, args.plot, f"{env['device']}, {precision}, {args.new_tokens} decode steps")
        log(f"chart written to {args.plot}")
    return 0 if any(r.error is None for r in results) else 1


def _benchmark_static(kind: str, args, source, precision: str, config, bytes_per_value: int, peaks, log) -> list:
    """The static-cache decoder, one per batch size (its cache buffers have a fixed batch)."""
    import torch

    from export.static_cache_graph import build_static_cache_graph

    from .benchmark import BenchmarkResult, measure_static
    from .static_cache import StaticCacheDecoder

    results = []
    try:
        dtype = "fp16" if precision != "float32" else "fp32"
        max_cache = max(args.context) + args.warmup + args.new_tokens + 1
        data = build_static_cache_graph(source().model, max_cache, dtype).SerializeToString()
        for batch in args.batch:
            with StaticCacheDecoder(data, batch, STATIC_PROVIDERS[kind]) as decoder:
                for context in args.context:
                    log(f"  {decoder.name}: batch {batch}, context {context} ...")
                    results.append(measure_static(decoder, config, context, args.new_tokens, args.warmup,
                                                  args.iters, bytes_per_value, peaks))
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    except (ToolkitError, RuntimeError) as error:
        message = str(error).splitlines()[0][:200]
        log(f"{kind}: skipped: {message}")
        done = {(r.batch, r.context) for r in results}
        results += [BenchmarkResult(kind, b, c, error=message) for b in args.batch for c in args.context
                    if (b, c) not in done]
    return results


def main(argv: list[str] | None = None) -> int:
    return run_main(_benchmark, build_parser(), argv)


if __name__ == "__main__":
    raise SystemExit(main())
