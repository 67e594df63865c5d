"""`generate`: sample tokens from a deployed model (or PyTorch), streaming them as they come."""
from __future__ import annotations

import argparse
import codecs
import sys

from models.errors import ToolkitError

from .cli_support import add_model_arguments, int_list, log_to, resolve_model_arguments, run_main, write_json
from .open_model import BACKEND_CHOICES


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="generate",
        description="Generate tokens autoregressively through any backend. Graphs exported --with-past "
                    "(and engines built from them) decode through the key/value cache, kept on the GPU for "
                    "CUDA backends; plain graphs recompute the sequence each step. Text prompts are encoded "
                    "byte-level (one token per UTF-8 byte), as upstream's enwik8 models expect, and need a "
                    "vocabulary of at least 256 tokens.",
    )
    parser.add_argument("--model", metavar="PATH", help="an .onnx graph or an .engine (not needed for --backend torch)")
    parser.add_argument("--backend", choices=BACKEND_CHOICES, default="auto",
                        help="auto (default): tensorrt for engines, onnxruntime-cuda for ONNX when a GPU and "
                             "onnxruntime-gpu are present, else onnxruntime on the CPU; torch runs the PyTorch model. "
                             "A static-cache graph (export-model --static-cache) runs on its fast path")
    add_model_arguments(parser, "for --backend torch")
    prompt = parser.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", metavar="TEXT", help="text prompt (byte-level tokens)")
    prompt.add_argument("--prompt-ids", type=int_list, metavar="1,2,3", help="prompt token ids")
    parser.add_argument("--max-new-tokens", type=int, default=64, metavar="N", help="tokens to generate (default 64)")
    parser.add_argument("--temperature", type=float, default=0.0, metavar="T",
                        help="sampling temperature; <= 0 means greedy (default 0)")
    parser.add_argument("--filter-thres", type=float, default=0.9, metavar="F",
                        help="top-k filter as upstream: keep the top (1 - F) fraction of logits (default 0.9)")
    parser.add_argument("--seed", dest="sample_seed", type=int, default=0, metavar="S",
                        help="sampling seed (default 0); the same seed gives the same tokens on every backend")
    parser.add_argument("--eos-id", type=int, metavar="ID", help="stop a row at this token")
    parser.add_argument("--json", nargs="?", const="-", metavar="PATH",
                        help="write tokens, text and timings as JSON to PATH, or stdout if no PATH is given")
    return parser


def _generate(args: argparse.Namespace) -> int:
    from .generation import GenerationSettings, Generator, decode_bytes, encode_text
    from .static_cache import StaticCacheDecoder

    log = log_to(args.json == "-")
    stream = sys.stderr if args.json == "-" else sys.stdout
    with _open_runner(args) as backend:
        generator = backend if isinstance(backend, StaticCacheDecoder) else Generator(backend)
        vocab = backend.vocab_size or (generator.config.num_tokens if generator.config else 0)
        prompt = args.prompt_ids if args.prompt_ids else encode_text(args.prompt, vocab)
        text_mode = args.prompt is not None
        settings = GenerationSettings(args.max_new_tokens, args.temperature, args.filter_thres, args.sample_seed,
                                      args.eos_id)
        mode = ("static cache" if generator is backend else
                "cache" if generator.cache_inputs else "full recompute")
        log(f"generate: {backend.name} ({mode}), prompt of {len(prompt)} tokens, up to {args.max_new_tokens} new")

        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

        def show(step: int, tokens: list[int]) -> None:
            token = tokens[0]
            if text_mode:
                piece = decoder.decode(bytes([token])) if token < 256 else f"<{token}>"
            else:
                piece = f"{token} "
            stream.write(piece)
            stream.flush()

        result = generator.generate([prompt], settings, on_tokens=show)
    stream.write("\n")
    tokens = result.tokens[0]
    log(f"{len(tokens)} tokens; prefill {result.prefill_seconds * 1e3:.1f} ms, "
        f"decode {result.decode_tokens_per_second:.1f} tokens/s on {backend.name}")
    if args.json:
        write_json(args.json, {"backend": backend.name, "prompt_ids": prompt, "tokens": tokens,
                               "text": decode_bytes(tokens) if text_mode else None,
                               "prefill_seconds": result.prefill_seconds, "decode_seconds": result.decode_seconds,
                               "decode_tokens_per_second": result.decode_tokens_per_second,
                               "settings": vars(settings)})
    return 0


def _open_runner(args: argparse.Namespace):
    """A StaticCacheDecoder for a static-cache graph, else the backend open_model picks."""
    from .open_model import open_model
    from .static_cache import StaticCacheDecoder, static_cache_metadata

    model = args.model
    if model and static_cache_metadata(model) is not None:
        providers = {"auto": "cuda" if _cuda_available() else "cpu", "onnxruntime": "cpu", "onnxruntime-cuda": "cuda"}
        if args.backend not in providers:
            raise ToolkitError(f"{model} is an ONNX Runtime static-cache graph; use --backend onnxruntime or "
                               "onnxruntime-cuda")
        return StaticCacheDecoder(model, 1, providers[args.backend])
    return open_model(args.model, args.backend, lambda: resolve_model_arguments(args))


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def main(argv: list[str] | None = None) -> int:
    return run_main(_generate, build_parser(), argv)


if __name__ == "__main__":
    raise SystemExit(main())
