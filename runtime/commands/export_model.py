"""`export-model`: PyTorch checkpoint -> ONNX graph with symbolic batch and sequence axes."""
from __future__ import annotations

import argparse
import contextlib
import time

from export.opset import MAX_OPSET, MIN_OPSET
from models.precision import DEFAULT_PRECISION, PRECISIONS, WEIGHT_SCHEMES

from .common import (ArgumentParser, Files, add_model_arguments, log_to, model_files, model_request, positive_int,
                     run_main, write_json)


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="export-model",
        description="Export the rotary transformer to ONNX with symbolic batch and sequence axes. "
                    "Inputs: input_ids and attention_mask, int64 (batch, sequence); output: logits, "
                    "float32 (batch, sequence, num_tokens). With no arguments, exports the embedded "
                    "default model (preset tiny, seed 0) to model.onnx.",
    )
    add_model_arguments(parser, "default: the embedded tiny preset")
    parser.add_argument("--opset", type=int, default=None,
                        help=f"ONNX opset, {MIN_OPSET} to {MAX_OPSET} (default: the lowest the graph needs: {MIN_OPSET}, "
                             "what TensorRT 8.6+ and ONNX Runtime 1.14+ read; 19 for --quantize int8 with fp16, "
                             "21 for --quantize int4)")
    parser.add_argument("--dtype", choices=list(PRECISIONS), default=DEFAULT_PRECISION,
                        help=f"precision written into the graph (default {DEFAULT_PRECISION}); fp16/bf16 keep norms, "
                             "rotary angles and softmax in float32 and always output float32 logits")
    parser.add_argument("--quantize", choices=list(WEIGHT_SCHEMES),
                        help="weight-only quantization of the blocks' linear layers (symmetric, round to nearest; the "
                             "embedding, norms and logits head stay in --dtype): int8 per output channel or int4 in "
                             "blocks, as DequantizeLinear -> MatMul (TensorRT, ONNX Runtime); with --static-cache, "
                             "ONNX Runtime's MatMulNBits in blocks")
    parser.add_argument("--block-size", type=int, metavar="N",
                        help="input rows per scale for int4, and for int8 in --static-cache graphs: 32 (default), "
                             "64 or 128; it must divide every quantized layer's input size")
    parser.add_argument("--output", "-o", default="model.onnx", metavar="PATH",
                        help="where to write the graph (default model.onnx); written to a temporary name and "
                             "renamed only once checked and verified")
    parser.add_argument("--with-past", action="store_true",
                        help="export the decoder with a key/value cache: extra inputs past_key_values.{i}.key/value "
                             "(batch, kv_heads, past_sequence, dim_head), outputs present.{i}.key/value; "
                             "attention_mask then covers past + new tokens. One graph serves prompt and decode steps")
    parser.add_argument("--static-cache", type=positive_int, metavar="N",
                        help="instead, write the ONNX Runtime-only fast decoder: com.microsoft GroupQueryAttention "
                             "and fused norms over a static N-token key/value cache that past and present share, so "
                             "CUDA graphs can replay each decode step (use with --dtype fp16 on CUDA; not for "
                             "TensorRT). Inputs input_ids, seqlens_k, total_sequence_length, past_key_values.*")
    parser.add_argument("--portable", action="store_true",
                        help="with --static-cache: write the static-cache decoder in standard ONNX ops instead (opset "
                             "17, no com.microsoft ops; ScatterND cache writes, attention over the fixed window with a "
                             "mask), for ONNX Runtime and TensorRT. Inputs input_ids, positions (each row's first new "
                             "position), logits_index, past_key_values.*")
    parser.add_argument("--verify", action=argparse.BooleanOptionalAction, default=True,
                        help="after export, compare ONNX Runtime (CPU) with PyTorch on shapes unlike the "
                             "export example; a failure exits non-zero and writes nothing (default on). If the "
                             "whole model does not fit in memory for that, a depth-truncated copy of the same "
                             "weights is exported and verified instead, and the report says so")
    parser.add_argument("--allow-lint", action="store_true",
                        help="write the graph even if the export lint has findings (control flow, sequence ops, "
                             "frozen dimensions)")
    parser.add_argument("--json", nargs="?", const="-", metavar="PATH",
                        help="write a machine-readable report to PATH, or to stdout if no PATH is given "
                             "(progress then goes to stderr)")
    return parser


def _export(args: argparse.Namespace) -> int:
    started = time.perf_counter()  # the reported time covers the whole command, imports included
    from export.graphs import export_graph
    from export.onnx_export import ExportError

    log = log_to(args.json == "-")
    if args.static_cache is not None and args.with_past:
        raise ExportError("--static-cache writes its own cache graph; drop --with-past")
    if args.portable and args.static_cache is None:
        raise ExportError("--portable writes the standard-ops static-cache graph; give its window with --static-cache N")
    row = _precision_row(args)
    source = model_request(args).resolve()
    parity = {}
    if args.static_cache is not None:
        from runtime.resources import cache_bytes, require

        config = source.config
        require(8.0 * args.static_cache * config.dim_head + cache_bytes(config, 3, args.static_cache, 4),
                f"a {args.static_cache}-token static cache (rotary tables, and the verification's 3-row cache)",
                "cpu", "choose a smaller --static-cache")
    kind = _graph_kind(args)
    verify = _verifier(args, row, source, parity, log)  # decided now: refusals come before the export
    result = export_graph(source.weights, args.output, kind.name, row.name, max_cache=args.static_cache,
                          opset=args.opset, record=source.pending_record, allow_lint=args.allow_lint,
                          verify=verify if args.verify else None, log=log)
    seconds = result.seconds
    what = (f"ONNX Runtime static-cache decoder, {row.name}" if kind.writer == "static-cache"
            else f"opset {result.opset}, {row.name}")
    extra = {"kind": kind.report, "opset": result.opset, "lint": result.lint.to_dict(), "with_past": args.with_past,
             **({"max_cache": args.static_cache} if args.static_cache is not None else {})}
    total = time.perf_counter() - started
    verified = f", verification {_seconds(parity['seconds'])}" if "seconds" in parity else ""
    log(f"wrote {args.output} ({what}) in {_seconds(total)} (graph {_seconds(seconds)}{verified})")
    if args.json:
        times = {"seconds": round(total, 3), "verify_seconds": round(parity["seconds"], 3) if "seconds" in parity else None}
        scope = {"verify_scope": parity["scope"]} if "scope" in parity else {}
        write_json(args.json, _report(args, row, source, seconds, {**extra, **times, **scope}, parity.get("report")))
    return 0


def _graph_kind(args):
    from export.graphs import graph_kind
    from models.graph_metadata import LOGITS, STATIC_CACHE, STATIC_PORTABLE, WITH_PAST

    if args.static_cache is not None:
        return graph_kind(STATIC_PORTABLE if args.portable else STATIC_CACHE)
    return graph_kind(WITH_PAST if args.with_past else LOGITS)


def _verifier(args, row, source, parity: dict, log):
    """The verify(path) callback: against the whole model when verification
    fits in memory, else against a depth-truncated copy of the same weights (plan_verification
    refuses here, before the export, when neither fits)."""
    from models.progress import phase
    from runtime.verify.exported import verify_export, verify_static_export
    from runtime.verify.plan import plan_verification

    plan = plan_verification(source.weights, row) if args.verify else None

    def check(path, model):
        return (verify_static_export(path, model, args.static_cache, log) if args.static_cache is not None
                else verify_export(path, model, log, with_past=args.with_past))

    def verify(path) -> None:
        what = VERIFYING if plan.full else f"verifying: ONNX Runtime (CPU) against PyTorch on {plan.describe()} ..."
        with phase(log, "verifying", what), timed(parity):
            parity["report"] = check(path, source.model) if plan.full else verify_truncated_copy(
                source.weights, plan.layers, path.parent, check, kind=_graph_kind(args).name, opset=args.opset,
                precision=row.name, max_cache=args.static_cache)
        parity["scope"] = plan.to_dict()

    return verify


def verify_truncated_copy(weights, layers: int, folder, check, **export_options):
    """Export the first `layers` blocks of `weights` (embedding, final norm and head included)
    through the same exporter into a scratch folder inside `folder`, and return `check(graph,
    model)` on that graph against the same truncated weights in PyTorch."""
    import tempfile
    from pathlib import Path

    from export.graphs import export_graph

    small, reports = weights.truncated(layers), []
    with tempfile.TemporaryDirectory(prefix=".verify-", dir=folder) as scratch:
        export_graph(small, Path(scratch) / "truncated.onnx", log=lambda _: None,
                     verify=lambda graph: reports.append(check(graph, small.build())), **export_options)
    return reports[0]


VERIFYING = "verifying: ONNX Runtime (CPU) against PyTorch on shapes unlike the trace's ..."


def _seconds(value: float) -> str:
    return f"{value:.1f} s" if value >= 0.1 else f"{value * 1e3:.0f} ms"


@contextlib.contextmanager
def timed(into: dict):
    """Store the seconds the block took in into["seconds"]."""
    started = time.perf_counter()
    try:
        yield
    finally:
        into["seconds"] = time.perf_counter() - started


def _files(args: argparse.Namespace) -> Files:
    return Files(inputs=model_files(args), outputs={"--output": args.output, "--json": args.json})


def _precision_row(args: argparse.Namespace):
    """The graph's precision row: --dtype, with --quantize/--block-size's weights if given."""
    from export.quantize import QuantizeError
    from models.precision import quantized

    if args.quantize is None:
        if args.block_size is not None:
            raise QuantizeError("--block-size applies to --quantize; add --quantize int4 (or int8)")
        return PRECISIONS[args.dtype]
    per_channel = WEIGHT_SCHEMES[args.quantize].per_channel and args.static_cache is None
    if per_channel and args.block_size is not None:
        raise QuantizeError(f"--quantize {args.quantize} has one scale per output channel in the TensorRT graph "
                            "(TensorRT's block-wise dequantization is int4 only); drop --block-size")
    default_block = WEIGHT_SCHEMES[args.quantize].block_sizes[0]
    return quantized(args.dtype, args.quantize, None if per_channel else args.block_size or default_block)


def _report(args, row, source, seconds: float, extra: dict, parity) -> dict:
    from export.onnx_export import graph_weight_bytes

    return {"output": str(args.output), "dtype": args.dtype, "precision": row.name, "source": source.description,
            "checkpoint_sha256": source.sha256, "export_seconds": round(seconds, 3),
            "weight_bytes": graph_weight_bytes(args.output), "config": source.config.to_dict(), **extra,
            "verify": parity.to_dict() if parity else None}


def main(argv: list[str] | None = None) -> int:
    return run_main(_export, build_parser(), argv, _files)


if __name__ == "__main__":
    raise SystemExit(main())
