"""`check-parity`: does a deployed model compute what the PyTorch model computes?"""
from __future__ import annotations

import argparse
import sys

from models.errors import ToolkitError

from .cli_support import add_model_arguments, int_list, log_to, resolve_model_arguments, run_main, write_json

PRECISIONS = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def build_parser() -> argparse.ArgumentParser:
    from runtime.backends import FILE_BACKENDS
    from runtime.parity import TOLERANCES

    tolerances = "; ".join(f"{name}: atol {t.atol:g}, rtol {t.rtol:g}, cosine >= {t.min_cosine:g}, "
                           f"top-1 >= {t.min_top1:.0%}" for name, t in TOLERANCES.items())
    parser = argparse.ArgumentParser(
        prog="check-parity",
        description="Run the PyTorch reference and a deployed model over a sweep of batch sizes and "
                    "sequence lengths, and report per shape the max absolute and relative error, cosine "
                    "similarity and top-1 agreement of the logits. Exit 0 only if every case passes. "
                    f"Tolerances by precision: {tolerances}.",
    )
    parser.add_argument("model", metavar="MODEL.onnx", help="the exported graph to check")
    parser.add_argument("--backend", default="onnxruntime", choices=list(FILE_BACKENDS),
                        help="how to run MODEL (default onnxruntime, on the CPU)")
    add_model_arguments(parser, "the reference; default: rebuilt from the preset recorded in MODEL")
    parser.add_argument("--batch", type=int_list, metavar="N,N", help="batch sizes (default 1,3)")
    parser.add_argument("--seq", type=int_list, metavar="N,N",
                        help="sequence lengths (default from the model's sequence axis: 1,17,128,513)")
    parser.add_argument("--precision", choices=["auto", *PRECISIONS], default="auto",
                        help="which tolerance row to apply (default auto: the precision recorded in MODEL)")
    parser.add_argument("--atol", type=float, help="override the absolute tolerance")
    parser.add_argument("--generate", type=int, default=0, metavar="N",
                        help="also compare N greedy tokens (2 prompts) token by token and report the first "
                             "divergence with the reference's top-2 logit margin there; fp32 must match "
                             "exactly, fp16/bf16 must reach the top-1 bar with teacher forcing")
    parser.add_argument("--input-seed", type=int, default=0, help="seed of the random token ids (default 0)")
    parser.add_argument("--json", metavar="PATH", help="write the report as JSON to PATH ('-' for stdout)")
    return parser


def reference_for(args: argparse.Namespace, metadata: dict[str, str]):
    """The reference weights: as given, or rebuilt from the preset recorded at export."""
    from models.source import resolve_model

    if args.checkpoint or args.preset or args.config:
        source = resolve_model_arguments(args)
    elif "source_preset" in metadata:
        seed = metadata.get("source_seed", "0")
        if not seed.isdigit():
            raise ToolkitError(f"{args.model} records an invalid source_seed {seed!r}; pass --preset and --init-seed")
        source = resolve_model(None, None, metadata["source_preset"], int(seed))
    else:
        raise ToolkitError(f"{args.model} does not record a preset to rebuild its weights from; pass the "
                           "weights it was exported from with --checkpoint (or --preset/--config as at export)")
    recorded = metadata.get("checkpoint_sha256")
    if recorded and recorded != source.sha256:
        raise ToolkitError(
            f"the reference weights ({source.description}) are not those {args.model} was exported from "
            f"(sha256 {recorded[:12]}...); pass the checkpoint used for the export"
        )
    return source


def _check(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from models.signature import graph_signature
    from runtime.backends import open_file_backend
    from runtime.backends.torch_backend import TorchBackend
    from runtime.parity import TOLERANCES, check_parity, default_cases

    log = log_to(args.json == "-")
    from runtime.static_cache import static_cache_metadata

    static = static_cache_metadata(args.model)
    if static is not None:
        return _check_static_cache(args, static, log)
    with open_file_backend(args.backend, args.model) as candidate:
        metadata = getattr(candidate, "metadata", {})
        source = reference_for(args, metadata)
        precision = metadata.get("precision", "float32") if args.precision == "auto" else PRECISIONS[args.precision]
        tolerance = TOLERANCES[precision]
        if args.atol is not None:
            tolerance = replace(tolerance, atol=args.atol)
        with_past = any(name.startswith("past_key_values.") for name in candidate.input_names)
        cases = default_cases(graph_signature(source.model.config, with_past), args.batch, args.seq)
        log(f"check-parity: {args.model} on {candidate.name} vs PyTorch ({source.description}), "
            f"{len(cases)} cases, {precision} tolerance")
        with TorchBackend(source.model, device=_reference_device(candidate), with_past=with_past) as reference:
            report = check_parity(reference, candidate, cases, precision, tolerance, seed=args.input_seed,
                                  progress=lambda case: log(f"  running {case.label} ..."))
            log(report.table())
            log(report.summary())
            generation = None
            if args.generate:
                from runtime.generation_parity import compare_generation, random_prompts

                prompts = random_prompts(source.model.config.num_tokens, seed=args.input_seed)
                half = precision != "float32"  # rounding may flip a near-tie: judge by teacher forcing
                generation = compare_generation(reference, candidate, prompts, args.generate,
                                                tolerance.min_top1 if half else None)
                log(generation.summary())
    return _verdict(args, report, generation)


def _check_static_cache(args: argparse.Namespace, metadata: dict[str, str], log) -> int:
    """The static-cache decoder: prompt logits, teacher-forced decode steps and greedy tokens."""
    from dataclasses import replace

    from runtime.generation_parity import random_prompts
    from runtime.parity import TOLERANCES
    from runtime.static_cache import StaticCacheDecoder
    from runtime.static_cache_parity import check_static_cache, compare_static_generation

    providers = {"onnxruntime": "cpu", "onnxruntime-cuda": "cuda"}
    if args.backend not in providers:
        raise ToolkitError(f"{args.model} is an ONNX Runtime static-cache graph; check it with --backend "
                           "onnxruntime or onnxruntime-cuda")
    provider = providers[args.backend]
    source = reference_for(args, metadata)
    precision = metadata.get("precision", "float32") if args.precision == "auto" else PRECISIONS[args.precision]
    tolerance = TOLERANCES[precision]
    if args.atol is not None:
        tolerance = replace(tolerance, atol=args.atol)
    device = "cuda" if provider == "cuda" else "cpu"
    model = source.model.to(device)
    lengths = args.seq or [1, 17, 128, 513]
    log(f"check-parity: {args.model} (static-cache decoder) on ONNX Runtime {provider} vs PyTorch "
        f"({source.description}), {precision} tolerance")
    report = check_static_cache(model, lambda batch: StaticCacheDecoder(args.model, batch, provider),
                                args.batch or [1, 3], lengths, precision=precision, tolerance=tolerance,
                                seed=args.input_seed, device=device,
                                progress=lambda case: log(f"  running {case.label} ..."))
    log(report.table())
    log(report.summary())
    generation = None
    if args.generate:
        prompts = random_prompts(model.config.num_tokens, seed=args.input_seed)
        with StaticCacheDecoder(args.model, len(prompts), provider) as decoder:
            generation = compare_static_generation(model, decoder, prompts, args.generate, device,
                                                   None if precision == "float32" else tolerance.min_top1)
        log(generation.summary())
    return _verdict(args, report, generation)


def _verdict(args: argparse.Namespace, report, generation) -> int:
    """Write the JSON report; exit 0 only if the tensors and (when compared) the tokens pass."""
    passed = bool(report) and (generation is None or bool(generation))
    if args.json:
        write_json(args.json, {**report.to_dict(), "passed": passed,
                               "generation": generation.to_dict() if generation else None})
    if not passed:
        print(f"check-parity: error: {report.summary() if not report else generation.summary()}", file=sys.stderr)
    return 0 if passed else 1


def _reference_device(candidate) -> str:
    """PyTorch runs where the candidate runs, so generation feeds stay on one device."""
    on_gpu = getattr(candidate, "provider", "cpu") == "cuda" or candidate.name.startswith("tensorrt")
    return "cuda" if on_gpu else "cpu"


def main(argv: list[str] | None = None) -> int:
    return run_main(_check, build_parser(), argv)


if __name__ == "__main__":
    raise SystemExit(main())
