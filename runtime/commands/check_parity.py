"""`check-parity`: does a deployed model compute what the PyTorch model computes?"""
from __future__ import annotations

import argparse
import sys

from models.errors import ToolkitError
from models.precision import PRECISIONS, WEIGHT_SCHEMES, quantized
from models.progress import phase

from .common import (ArgumentParser, Files, add_backend_argument, add_model_arguments, int_list, log_to, model_files,
                     model_request, non_negative_float, non_negative_int, run_main, write_json)


def build_parser() -> argparse.ArgumentParser:
    from runtime.registry import ENGINE, ONNX, backend_names

    rows = [*PRECISIONS.values(), *(quantized("fp16", name, None if s.per_channel else s.block_sizes[0])
                                    for name, s in WEIGHT_SCHEMES.items())]
    tolerances = "; ".join(f"{row.name}: atol {t.atol:g}, rtol {t.rtol:g}, cosine >= {t.min_cosine:g}, "
                           f"top-1 >= {t.min_top1:.0%}, teacher-forced top-1 >= {t.forced_top1:.0%}"
                           for row in rows for t in [row.tolerance])
    parser = ArgumentParser(
        prog="check-parity",
        description="Run the PyTorch reference and a deployed model over a sweep of batch sizes and "
                    "sequence lengths, and report per shape the max absolute and relative error, cosine "
                    "similarity and top-1 agreement of the logits. Exit 0 only if every case passes. "
                    f"Tolerances by precision: {tolerances}.",
    )
    parser.add_argument("model", metavar="MODEL", help="the exported .onnx graph, or an engine built from one")
    add_backend_argument(parser, backend_names((ONNX, ENGINE), decoder=False), "onnxruntime",
                         "how to run MODEL; a static-cache graph runs its own decoder on that device")
    add_model_arguments(parser, "the reference; default: rebuilt from the preset recorded in MODEL")
    parser.add_argument("--batch", type=int_list, metavar="N,N", help="batch sizes (default 1,3)")
    parser.add_argument("--seq", type=int_list, metavar="N,N",
                        help="sequence lengths (default from the model's sequence axis: 1,17,128,513)")
    parser.add_argument("--past", type=int_list, metavar="N,N",
                        help="cached lengths of the decode cases, for graphs with past (default 1 and half the "
                             "declared maximum + 1: 1,513); keep them inside an engine's profile")
    parser.add_argument("--against", choices=["quantized", "float"], default="quantized",
                        help="the reference: quantized (default) is the PyTorch model with the weights MODEL holds, "
                             "so a quantized graph meets the same fake-quantized weights under its activation "
                             "precision's tight row; float is the unquantized model under the scheme's row against "
                             "float (cosine, top-1, teacher-forced top-1). The same for graphs that are not quantized")
    parser.add_argument("--precision", choices=["auto", *PRECISIONS], default="auto",
                        help="which tolerance row to apply (default auto: the row of the reference --against picks)")
    parser.add_argument("--atol", type=non_negative_float, help="override the absolute tolerance (a finite number >= 0)")
    parser.add_argument("--generate", type=non_negative_int, default=0, metavar="N",
                        help="also compare N greedy tokens (of each --prompt, or 2 random prompts) token by token and report the first "
                             "divergence with the reference's top-2 logit margin there, then feed PyTorch's tokens "
                             "through MODEL's own decode steps (cache updates included) and compare every step's "
                             "logits (the precision's bars) and top-1 (the teacher-forced bar); fp32 must also "
                             "match the greedy tokens exactly, fp16/bf16 may flip near-ties")
    parser.add_argument("--prompt", action="append", metavar="TEXT",
                        help="a text prompt (byte-level) for --generate; repeat for more rows (default: 2 prompts "
                             "of random token ids, which suit random weights; a trained model wants its own text)")
    parser.add_argument("--input-seed", type=non_negative_int, default=0, metavar="N",
                        help="seed of the random token ids (default 0)")
    parser.add_argument("--json", metavar="PATH", help="write the report as JSON to PATH ('-' for stdout)")
    return parser


def _check(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from models.graph_metadata import STATIC_KINDS
    from models.precision import precision
    from models.source import ModelSource, reference_source
    from runtime.decoding.open import decoder_spec, read_model_metadata
    from runtime.registry import check_runnable, resolve_backend
    from runtime.verify.reference import parity_reference

    log = log_to(args.json == "-")
    metadata = read_model_metadata(args.model)
    spec = decoder_spec(args.model, args.backend)  # a static-cache graph is refused by TensorRT here
    _check_model_file(args.model, args.backend)
    check_runnable(resolve_backend(args.backend, args.model))  # as named: its CPU twin is what to name instead
    if metadata.kind in STATIC_KINDS and args.seq:
        _check_static_lengths(args.seq, metadata.max_cache)
    if args.past and not metadata.with_past:
        raise ToolkitError(f"--past sets cached lengths, and {args.model} has no key/value cache (a plain graph); drop "
                           "--past, or check a graph exported --with-past")
    with phase(log, "checking", ""):  # the sweeps log each case; this adds a line while a long step runs
        source = reference_source(metadata, args.model, model_request(args))
        prompts = _prompts(args, metadata.config.num_tokens)  # bad prompts fail before any parity work
        reference = parity_reference(source.model, metadata, args.against)
        source = ModelSource.of_model(reference.model, f"{source.description}, {reference.label}", source.sha256,
                                      source.preset, source.seed)
        row = reference.row if args.precision == "auto" else precision(args.precision)
        tolerance = row.tolerance if args.atol is None else replace(row.tolerance, atol=args.atol)
        device = spec.resolved_device()
        _check_sizes(args, metadata, row, device)
        sweep = _decoder_sweep if metadata.kind in STATIC_KINDS else _tensor_sweep
        report = sweep(args, spec, source, metadata, row, tolerance, device, log)
    log(report.table())
    log(report.summary())
    generation = None
    if args.generate:
        with phase(log, "comparing tokens", f"generating {args.generate} tokens per prompt with PyTorch and "
                                            f"{spec.name}, then teacher-forcing MODEL's decode steps ..."):
            generation = _generation(args, spec, source, prompts, row, tolerance, device, log)
    return _verdict(args, report, generation)


def _check_model_file(model: str, backend: str) -> None:
    """An .onnx graph given to the engine backend (or an engine to an ONNX backend) is refused by name."""
    from pathlib import Path

    from runtime.registry import ENGINE, ENGINE_SUFFIXES, backend_spec

    is_engine = Path(model).suffix in ENGINE_SUFFIXES
    if backend_spec(backend).opens == ENGINE and not is_engine:
        raise ToolkitError(f"--backend {backend} runs a TensorRT engine, and {model} is not one (.engine or .plan); "
                           f"build it with build-engine {model} and check the engine, or run the graph with "
                           "--backend onnxruntime")
    if backend_spec(backend).opens != ENGINE and is_engine:
        raise ToolkitError(f"{model} is a TensorRT engine, which --backend {backend} cannot run; use --backend "
                           "tensorrt (or check the .onnx graph it was built from)")


def tolerance_label(row) -> str:
    """Which tolerance row applies, as reports name it: a quantized row is the scheme's row against
    the float model, not its activations' float row."""
    if row.scheme is None:
        return f"{row.dtype} tolerance"
    return f"{row.name} tolerance ({row.scheme.name} weights against the float model)"


def _prompts(args, vocab: int) -> list[list[int]]:
    """The --generate prompts as token ids: the --prompt texts, or random ids."""
    from runtime.decoding.base import DecodingError
    from runtime.decoding.text import encode_text
    from runtime.verify.decoding import random_prompts

    if not args.prompt:
        return random_prompts(vocab, seed=args.input_seed)
    if not args.generate:
        raise DecodingError("--prompt sets the prompts of --generate; add --generate N")
    if not all(args.prompt):
        raise DecodingError("--prompt is empty; give at least one byte of text")
    return [encode_text(text, vocab) for text in args.prompt]


def _check_static_lengths(lengths: list[int], max_cache: int) -> None:
    """Each --seq prompt and its decode steps must fit a static-cache graph's rows."""
    from models.errors import ToolkitError
    from runtime.verify import DECODE_STEPS

    longest = max_cache - DECODE_STEPS
    if max(lengths) > longest:
        raise ToolkitError(f"--seq {max(lengths)} does not fit this graph's {max_cache}-token static cache with the "
                           f"sweep's {DECODE_STEPS} decode steps; use --seq up to {longest}")


def _check_sizes(args, metadata, row, device: str) -> None:
    """The largest case of the sweep must fit, on the host (numpy copies) and the device."""
    from runtime.resources import forward_bytes, require

    rows, tokens = max(args.batch or [3]), max(args.seq or [513])
    needed = 2 * forward_bytes(metadata.config, rows, tokens + 8, 0, row.bytes_per_value)  # reference and candidate
    for where in {"cpu", device}:
        require(needed, f"the largest case ({rows} x {tokens} tokens)", where, "check smaller --batch/--seq")


def _tensor_sweep(args, spec, source, metadata, row, tolerance, device, log):
    """Every output of the graph (logits and, with past, the cache) over a sweep of shapes."""
    from runtime.backends.torch_backend import TorchBackend
    from runtime.registry import open_backend
    from runtime.verify.tensors import check_parity, default_cases

    signature = metadata.signature()
    cases = default_cases(signature, args.batch, args.seq, args.past)
    with open_backend(spec.name, args.model) as candidate:
        log(f"check-parity: {args.model} on {candidate.name} vs PyTorch ({source.description}), "
            f"{len(cases)} cases, {tolerance_label(row)}")
        with TorchBackend(source.model, device=device, with_past=signature.with_past) as reference:
            return check_parity(reference, candidate, cases, row.name, tolerance, seed=args.input_seed,
                                progress=lambda case: log(f"  running {case.label} ..."))


def _decoder_sweep(args, spec, source, metadata, row, tolerance, device, log):
    """Graphs that only run as a decoder: ragged prompts and teacher-forced decode steps."""
    from runtime.decoding.open import open_decoder
    from runtime.verify.decoding import check_decoder

    log(f"check-parity: {args.model} ({metadata.kind} decoder) on {spec.name} vs PyTorch "
        f"({source.description}), {tolerance_label(row)}")
    return check_decoder(source.model.to(device), lambda rows: open_decoder(args.model, spec.name, rows),
                         args.batch or [1, 3], args.seq or [1, 17, 128, 513], precision=row.name,
                         tolerance=tolerance, seed=args.input_seed, device=device,
                         progress=lambda case: log(f"  running {case.label} ..."))


def _generation(args, spec, source, prompts, row, tolerance, device, log):
    """Greedy tokens of PyTorch and MODEL, token by token, then PyTorch's tokens teacher-forced
    through MODEL's decode steps (each step's logits and top-1 against PyTorch)."""
    from runtime.decoding.open import open_decoder
    from runtime.verify.decoding import compare_generation

    with open_decoder(source, "torch", rows=len(prompts), device=device) as reference, \
            open_decoder(args.model, spec.name, rows=len(prompts)) as candidate:
        generation = compare_generation(reference, candidate, prompts, args.generate, row.name, tolerance)
    log(generation.summary())
    return generation


def _verdict(args: argparse.Namespace, report, generation) -> int:
    """Write the JSON report; exit 0 only if the tensors and (when compared) the tokens pass."""
    passed = bool(report) and (generation is None or bool(generation))
    if args.json:
        write_json(args.json, {**report.to_dict(), "passed": passed,  # a failed comparison is written too
                               "generation": generation.to_dict() if generation is not None else None})
    if not passed:
        print(f"check-parity: error: {report.summary() if not report else generation.summary()}", file=sys.stderr)
    return 0 if passed else 1


def _files(args: argparse.Namespace) -> Files:
    return Files(inputs={"MODEL": args.model, **model_files(args)}, outputs={"--json": args.json})


def main(argv: list[str] | None = None) -> int:
    return run_main(_check, build_parser(), argv, _files)


if __name__ == "__main__":
    raise SystemExit(main())
