"""`benchmark`: prefill throughput and decode latency per backend, against the physical floor."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from models.errors import ToolkitError

from .common import (ArgumentParser, Files, add_model_arguments, int_list, log_to, model_files, model_request,
                     non_negative_int, positive_int, run_main, write_json)


def build_parser() -> argparse.ArgumentParser:
    from runtime.registry import BACKENDS

    described = "; ".join(f"{name}: {spec.summary}" for name, spec in BACKENDS.items())
    parser = ArgumentParser(
        prog="benchmark",
        description="Measure prefill throughput (tokens/s, achieved TFLOP/s) and per-token decode latency "
                    "(p50/p90/p99, through the key/value cache) for each backend, with GPU memory, and print "
                    "each result as a multiple of the physical floor of this GPU (decode: bytes read / memory "
                    "bandwidth; prefill: FLOPs / peak tensor throughput). No timing is asserted anywhere.",
    )
    parser.add_argument("model", metavar="MODEL.onnx", nargs="?",
                        help="graph exported with --with-past (for the ONNX Runtime backends), or a static-cache "
                             "graph (export-model --static-cache N [--portable]) that the *-static backend of its "
                             "kind runs instead of writing one (how a model too large for one protobuf message is "
                             "measured); its metadata names the weights and precision the PyTorch backends use")
    parser.add_argument("--engine", metavar="PATH", help="TensorRT engine built from MODEL (for --backend tensorrt)")
    parser.add_argument("--backend", default=None, metavar="LIST",
                        help="comma-separated backends (default: those the registry marks for this machine: "
                             f"{default_help()}). The *-static backends write the static-cache graph from the same "
                             "weights in memory, sized for the largest context. " + described)
    add_model_arguments(parser, "default: the weights recorded in MODEL")
    parser.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default=None,
                        help="precision of the PyTorch weights and of the graphs written from them (default: MODEL's, "
                             "else fp32); with MODEL it must match MODEL's")
    parser.add_argument("--batch", type=int_list, default=[1], metavar="N,N", help="batch sizes (default 1)")
    parser.add_argument("--context", type=int_list, default=[128], metavar="N,N",
                        help="prompt / cache lengths (default 128)")
    parser.add_argument("--new-tokens", type=non_negative_int, default=32, metavar="N",
                        help="decode steps timed (default 32; 0 times the prompt only)")
    parser.add_argument("--warmup", type=non_negative_int, default=3, metavar="N", help="untimed runs first (default 3)")
    parser.add_argument("--iters", type=positive_int, default=10, metavar="N", help="timed prefill runs (default 10)")
    parser.add_argument("--no-overlap", dest="overlap", action="store_false",
                        help="decode through the engine's plain loop, each step's ids read before the next step is "
                             "queued (default: as generate and serve do, the overlapped loop where a decoder's steps "
                             "are queued on the GPU (recorded CUDA graphs, PyTorch on CUDA), each step queued before "
                             "the ids of the step before are read, so the GPU decodes while the host turns ids into "
                             "tokens; each result's decode_loop says which ran)")
    parser.add_argument("--json", metavar="PATH", help="write all results as JSON ('-' for stdout)")
    parser.add_argument("--plot", metavar="PATH.png", help="draw decode latency vs context per backend (matplotlib)")
    return parser


def default_help() -> str:
    """The default backends per machine, as the registry marks them (those that open a file only with it)."""
    from runtime.registry import BACKENDS, ENGINE, ONNX

    needs = {ONNX: " with MODEL", ENGINE: " with --engine"}

    def listed(machine: str) -> str:
        return ", ".join(f"{spec.name}{needs.get(spec.opens, '')}" for spec in BACKENDS.values()
                         if machine in spec.benchmarked_on)

    return f"on a GPU {listed('cuda')}; on the CPU {listed('cpu')}"


class Targets:
    """What each backend opens: the PyTorch weights (loaded once, on demand), MODEL or --engine."""

    def __init__(self, args: argparse.Namespace):
        from models.graph_metadata import read_graph_metadata

        self.args = args
        self.metadata = read_graph_metadata(args.model) if args.model else None
        self._source = None

    def source(self):
        from models.source import reference_source

        if self._source is None:
            request = model_request(self.args)
            self._source = (reference_source(self.metadata, self.args.model, request) if self.metadata
                            else request.resolve())
        return self._source

    def config(self):
        return self.metadata.config if self.metadata else self.source().model.config

    def precision(self) -> str:
        chosen = self.args.dtype
        if self.metadata:
            if chosen and chosen != self.metadata.precision:
                raise ToolkitError(f"MODEL is {self.metadata.precision} and --dtype asks for {chosen}; drop --dtype "
                                   "or export MODEL in that precision")
            return self.metadata.precision
        return chosen or "fp32"

    def static_graph(self) -> str | None:
        """MODEL's static-cache kind, when MODEL is a static-cache graph."""
        from models.graph_metadata import STATIC_KINDS

        return self.metadata.kind if self.metadata and self.metadata.kind in STATIC_KINDS else None

    def for_backend(self, spec, max_cache: int):
        from runtime.registry import ENGINE, ONNX

        if self.static_graph() and (spec.opens == ONNX or spec.static_cache == self.static_graph()):
            # an ONNX Runtime backend opens it through its static-cache twin (runtime.decoding.open)
            if self.metadata.max_cache < max_cache:
                raise ToolkitError(f"MODEL's static cache holds {self.metadata.max_cache} tokens and this run needs "
                                   f"{max_cache} (context + warm-up + new tokens + 2); export a larger --static-cache "
                                   "or lower --context")
            return self.args.model
        if spec.opens == ONNX:
            if not self.args.model:
                raise ToolkitError(f"{spec.name} needs MODEL.onnx (exported with --with-past)")
            return self.args.model
        if spec.opens == ENGINE:
            if not self.args.engine:
                raise ToolkitError(f"{spec.name} needs --engine PATH")
            return self.args.engine
        return self.source()


def _measure_backend(name: str, targets: Targets, args, row, peaks, log) -> list:
    """Every batch x context cell of one backend; a failure becomes an error cell, not an exit."""
    import torch

    from models.progress import phase
    from runtime.bench.measure import BenchmarkResult, cache_positions, measure
    from runtime.decoding.open import open_decoders
    from runtime.registry import backend_spec, check_runnable

    from .targets import decoder_target

    results = []
    max_cache = cache_positions(max(args.context), args.warmup, args.new_tokens)
    try:
        spec = backend_spec(name)
        check_runnable(spec)  # before a graph is written from the weights for it
        started = time.perf_counter()
        target = decoder_target(targets.for_backend(spec, max_cache), name, max_cache, row.name)
        with open_decoders(target, name, precision=row.name, max_cache=max_cache) as opened:
            for batch in args.batch:
                with phase(log, f"opening {name}", f"  {name}: opening for batch {batch} (warm-up included) ..."):
                    handle = opened.decoder(batch)
                with handle as decoder:
                    opened_in, started = time.perf_counter() - started, None
                    _note_recomputation(decoder, log)
                    for context in args.context:
                        try:
                            with phase(log, f"measuring {decoder.name}",
                                       f"  {decoder.name}: batch {batch}, context {context} ..."):
                                result = measure(decoder, context, args.new_tokens, args.warmup, args.iters, row,
                                                 peaks, opened_in, args.overlap)
                            result.decode_mode = decoder.mode
                            results.append(result)
                            opened_in = None  # only the first cell pays for opening
                        except (ToolkitError, RuntimeError) as error:
                            results.append(BenchmarkResult(decoder.name, batch, context, error=_first_line(error)))
                started = time.perf_counter()
    except (ToolkitError, RuntimeError) as error:
        log(f"{name}: skipped: {_first_line(error)}")
        done = {(r.batch, r.context) for r in results}
        results += [BenchmarkResult(name, b, c, error=_first_line(error)) for b in args.batch for c in args.context
                    if (b, c) not in done]
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return results


def _note_recomputation(decoder, log) -> None:
    """A graph without a key/value cache decodes by recomputing the whole sequence each step: say so."""
    if decoder.mode == "full recompute":
        log(f"  note: {decoder.name} decodes by full recomputation (MODEL has no key/value cache), so its decode "
            "figures time the whole sequence per token; export MODEL with --with-past to time cached decoding")


def _check_before_work(names: list[str], targets: Targets, args, row) -> None:
    """Unknown backends, backends without the file they open, and sizes no machine here can hold,
    are refused before any work."""
    from runtime.registry import ENGINE, ONNX, WEIGHTS, backend_spec
    from runtime.resources import forward_bytes, require

    for name in names:
        spec = backend_spec(name)
        if spec.opens == ONNX and not args.model and not targets.static_graph():
            raise ToolkitError(f"--backend {name} runs MODEL.onnx (exported with --with-past); give MODEL or drop "
                               f"{name}")
        if spec.opens == ENGINE and not args.engine:
            raise ToolkitError(f"--backend {name} runs an engine; give --engine PATH (built by build-engine from "
                               f"MODEL) or drop {name}")
    given = [flag for flag in ("checkpoint", "config", "preset") if getattr(args, flag) is not None]
    if given and all(backend_spec(name).opens != WEIGHTS for name in names):
        raise ToolkitError(f"--{given[0]} sets the weights of the backends that run PyTorch weights, and none of "
                           f"{','.join(names)} does; drop --{given[0]} (MODEL and engines carry their own weights)")
    if args.engine and not Path(args.engine).is_file():
        raise ToolkitError(f"--engine {args.engine} is not a file; build one with build-engine or fix the path")

    needed = forward_bytes(targets.config(), max(args.batch), max(args.context),
                           args.warmup + args.new_tokens + 1, row.bytes_per_value)
    for name in names:
        require(needed, f"batch {max(args.batch)} x context {max(args.context)} on {name}",
                backend_spec(name).resolved_device(), "benchmark smaller --batch/--context")


def _first_line(error: Exception) -> str:
    return str(error).splitlines()[0] if str(error) else type(error).__name__


def _benchmark(args: argparse.Namespace) -> int:
    import torch

    from models.precision import precision
    from runtime.bench.floors import peaks_for
    from runtime.bench.report import environment, format_table, plot
    from runtime.registry import ENGINE, ONNX, WEIGHTS, default_backends

    log = log_to(args.json == "-")
    targets = Targets(args)
    row = precision(targets.precision())
    cuda = torch.cuda.is_available()
    have = (WEIGHTS,) + ((ONNX,) if args.model else ()) + ((ENGINE,) if args.engine else ())
    names = [n.strip() for n in args.backend.split(",")] if args.backend else default_backends(cuda, have)
    _check_before_work(names, targets, args, row)
    env = environment()
    peaks = peaks_for(env["device"]) if cuda else None
    log(f"benchmark: {env['device']}; torch {env['torch']} (CUDA {env['cuda']}), onnxruntime {env['onnxruntime']}; "
        f"{row.dtype}; batch {args.batch}, context {args.context}, {args.new_tokens} decode steps, "
        f"warmup {args.warmup}, iters {args.iters}; {env['date']}")
    if cuda and peaks is None:
        log("note: no peak figures for this GPU; floors are not computed")
    results = [result for name in names for result in _measure_backend(name, targets, args, row, peaks, log)]
    log(format_table(results))
    if args.json:
        write_json(args.json, {"environment": env, "precision": row.dtype, "config": targets.config().to_dict(),
                               "peaks": vars(peaks) if peaks else None,
                               "settings": {"batch": args.batch, "context": args.context, "new_tokens": args.new_tokens,
                                            "warmup": args.warmup, "iters": args.iters, "backends": names,
                                            "overlap": args.overlap},
                               "results": [r.to_dict() for r in results]})
    if args.plot:
        plot(results, args.plot, f"{env['device']}, {row.dtype}, {args.new_tokens} decode steps")
        log(f"chart written to {args.plot}")
    if all(r.error is not None for r in results):
        print(f"benchmark: error: no backend ran; the first said: {results[0].error}", file=sys.stderr)
        return 1
    return 0


def _files(args: argparse.Namespace) -> Files:
    return Files(inputs={"MODEL": args.model, "--engine": args.engine, **model_files(args)},
                 outputs={"--json": args.json, "--plot": args.plot})


def main(argv: list[str] | None = None) -> int:
    return run_main(_benchmark, build_parser(), argv, _files)


if __name__ == "__main__":
    raise SystemExit(main())
