"""`generate`: sample tokens from a deployed model (or PyTorch), streaming them as they come."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from models.errors import ToolkitError

from .common import (ArgumentParser, Files, add_backend_argument, add_model_arguments, finite_float, fraction, log_to,
                     model_files, model_request, non_negative_int, positive_int, run_main, token_ids, write_json)


def build_parser() -> argparse.ArgumentParser:
    from runtime.registry import AUTO, BACKENDS

    parser = ArgumentParser(
        prog="generate",
        description="Generate tokens autoregressively through any backend. Graphs exported --with-past "
                    "(and engines built from them) decode through the key/value cache, kept on the GPU for "
                    "CUDA backends; plain graphs recompute the sequence each step; a static-cache graph "
                    "(export-model --static-cache) runs its own fast decoder. Text prompts are encoded "
                    "byte-level (one token per UTF-8 byte), as upstream's enwik8 models expect, and need a "
                    "vocabulary of at least 256 tokens.",
    )
    parser.add_argument("--model", metavar="PATH", help="an .onnx graph or an .engine (the backends that run the "
                                                       "PyTorch weights take the model flags instead)")
    add_backend_argument(parser, [AUTO, *BACKENDS], AUTO,
                         "auto: tensorrt for engines, onnxruntime-cuda for ONNX when a GPU and onnxruntime-gpu "
                         "are present, else onnxruntime on the CPU")
    add_model_arguments(parser, "for the backends that run the PyTorch weights")
    prompt = parser.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", metavar="TEXT", help="text prompt (byte-level tokens)")
    prompt.add_argument("--prompt-ids", type=token_ids, metavar="0,1,2", help="prompt token ids (0 to vocabulary - 1)")
    parser.add_argument("--max-new-tokens", type=positive_int, default=64, metavar="N",
                        help="tokens to generate (default 64)")
    parser.add_argument("--temperature", type=finite_float, default=0.0, metavar="T",
                        help="sampling temperature; <= 0 means greedy (default 0)")
    parser.add_argument("--filter-thres", type=fraction, default=0.9, metavar="F",
                        help="top-k filter as upstream: keep the top (1 - F) fraction of logits, F in [0, 1) "
                             "(default 0.9)")
    parser.add_argument("--top-k", type=non_negative_int, default=0, metavar="K",
                        help="keep at most the K likeliest tokens (default 0: no limit beyond --filter-thres)")
    parser.add_argument("--top-p", type=probability_mass, default=1.0, metavar="P",
                        help="nucleus sampling: keep the likeliest tokens whose probabilities (after the temperature) "
                             "add up to P, in (0, 1] (default 1: all)")
    parser.add_argument("--seed", dest="sample_seed", type=non_negative_int, default=0, metavar="S",
                        help="sampling seed (default 0); a request gives the same tokens for the same seed whether it runs "
                             "alone, batched or served")
    parser.add_argument("--eos-id", type=non_negative_int, metavar="ID",
                        help="stop a row at this token, which is emitted (default: none; rows run to --max-new-tokens)")
    parser.add_argument("--json", nargs="?", const="-", metavar="PATH",
                        help="write tokens, text and timings as JSON to PATH, or stdout if no PATH is given")
    return parser


def _open(args: argparse.Namespace, max_length: int, log):
    """The decoder for --model/--backend; backends that run weights take the model flags."""
    from models.progress import phase
    from runtime.decoding.open import open_decoder
    from runtime.registry import WEIGHTS, resolve_backend

    from .targets import decoder_target

    spec = resolve_backend(args.backend, args.model)
    if spec.opens != WEIGHTS and args.model is None:
        raise ToolkitError(f"--model is required for the {spec.name} backend (an .onnx graph or an .engine)")
    what = "the PyTorch model" if spec.opens == WEIGHTS else args.model
    with phase(log, "opening the decoder", f"generate: opening {what} on {spec.name} (warm-up included) ..."):
        if spec.opens == WEIGHTS:
            target = decoder_target(model_request(args).resolve(), spec.name, max_length)
            return open_decoder(target, spec.name, rows=1, max_cache=max_length)
        return open_decoder(args.model, spec.name, rows=1)


def _check_against_model(args: argparse.Namespace, settings, prompt_length: int) -> None:
    """Before MODEL is opened (and warmed up): the prompt's ids, --eos-id and the row's room, against
    what MODEL records about itself. The weights' backends check the same once the model is built."""
    from runtime.decoding.base import check_token_ids
    from runtime.decoding.open import read_model_metadata
    from runtime.registry import WEIGHTS, resolve_backend

    spec = resolve_backend(args.backend, args.model) if args.model is not None else None
    if spec is not None and spec.opens == WEIGHTS:
        raise ToolkitError(f"--backend {spec.name} runs the PyTorch weights of the model flags, not --model; drop "
                           "--model, or pick a backend that runs it (auto)")
    given = [flag for flag in ("checkpoint", "config", "preset") if getattr(args, flag) is not None]
    if spec is not None and given:
        raise ToolkitError(f"--{given[0]} does not apply to --model {args.model}, which carries its own weights; drop "
                           f"--{given[0]}, or drop --model and pick a backend that runs weights")
    if spec is None:
        return
    if Path(args.model).is_dir():
        raise ToolkitError(f"--model {args.model} is a directory; give the .onnx graph or the .engine file in it")
    _check_model_kind(args.model, spec)
    metadata = read_model_metadata(args.model)
    vocab = metadata.config.num_tokens
    if args.prompt_ids:
        check_token_ids(args.prompt_ids, vocab)
    if args.prompt is not None:
        from runtime.decoding.text import encode_text

        encode_text(args.prompt, vocab)  # refuses a vocabulary too small for bytes
    settings.check(vocab)
    total, capacity = prompt_length + settings.max_new_tokens, metadata.capacity
    if capacity is not None and total > capacity:
        raise ToolkitError(f"the {prompt_length}-token prompt plus --max-new-tokens {settings.max_new_tokens} is "
                           f"{total} tokens, past the {capacity} a row of {args.model} holds; shorten the prompt or "
                           "lower --max-new-tokens")


def _check_model_kind(model: str, spec) -> None:
    """An engine for an engine backend, a graph for the others."""
    from runtime.registry import ENGINE, ENGINE_SUFFIXES

    engine = Path(model).suffix in ENGINE_SUFFIXES
    if spec.opens == ENGINE and not engine:
        raise ToolkitError(f"--backend {spec.name} runs an engine (.engine or .plan) and {model} is not one; build one "
                           "with build-engine, or pick an ONNX Runtime backend for the graph")
    if spec.opens != ENGINE and engine:
        raise ToolkitError(f"{model} is an engine, which --backend {spec.name} cannot run; use --backend tensorrt "
                           "(or auto)")


def probability_mass(text: str) -> float:
    """(0, 1]: the nucleus (top-p) mass."""
    value = finite_float(text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text}")
    return value


class TerminalText:
    """One row's tokens as text that is safe to show: bytes decoded incrementally, a byte that is not
    UTF-8 shown as \\xNN, control characters (escape sequences, carriage returns, bell, C1 codes,
    bidirectional overrides) escaped as \\x1b or \\u202e; newline and tab kept. --json keeps the text
    as generated."""

    KEPT = "\n\t"
    BIDI = {*range(0x202A, 0x202F), *range(0x2066, 0x206A)}

    def __init__(self):
        import codecs

        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="backslashreplace")

    def piece(self, token: int) -> str:
        if token < 256:
            return self._escaped(self._decoder.decode(bytes([token])))
        return self.flush() + f"<{token}>"

    def flush(self) -> str:
        """The bytes of an unfinished character, escaped; the next byte starts afresh."""
        return self._escaped(self._decoder.decode(b"", final=True))

    def _escaped(self, text: str) -> str:
        import unicodedata

        return "".join(c if c in self.KEPT or not (unicodedata.category(c) == "Cc" or ord(c) in self.BIDI)
                       else (f"\\x{ord(c):02x}" if ord(c) < 256 else f"\\u{ord(c):04x}") for c in text)


def _printer(stream, text_mode: bool, pieces: TerminalText):
    """Writes each new token as it comes: bytes decoded incrementally and escaped, or ids."""
    def show(row: int, token: int) -> None:
        stream.write(pieces.piece(token) if text_mode else f"{token} ")
        stream.flush()

    return show


def _generate(args: argparse.Namespace) -> int:
    from runtime.decoding.generation import GenerationSettings, generate
    from runtime.decoding.text import decode_bytes, encode_text
    from runtime.registry import check_runnable, resolve_backend

    log = log_to(args.json == "-")
    stream = sys.stderr if args.json == "-" else sys.stdout
    settings = GenerationSettings(args.max_new_tokens, args.temperature, args.filter_thres, args.sample_seed,
                                  args.eos_id, args.top_k, args.top_p)
    settings.check()
    text_mode = args.prompt is not None
    if text_mode and not args.prompt:
        raise ToolkitError("--prompt is empty; give at least one character of text")
    prompt_length = len(args.prompt_ids) if args.prompt_ids else len(args.prompt.encode("utf-8"))
    _check_against_model(args, settings, prompt_length)
    check_runnable(resolve_backend(args.backend, args.model))  # before a graph is written from the weights
    with _open(args, prompt_length + args.max_new_tokens, log) as decoder:
        prompt = args.prompt_ids if args.prompt_ids else encode_text(args.prompt, decoder.vocab_size)
        log(f"generate: {decoder.name} ({decoder.mode}), prompt of {len(prompt)} tokens, up to "
            f"{args.max_new_tokens} new")
        pieces = TerminalText()
        result = generate(decoder, [prompt], settings, on_token=_printer(stream, text_mode, pieces))
        name = decoder.name
    stream.write((pieces.flush() if text_mode else "") + "\n")  # a character the last token left unfinished
    tokens = result.tokens[0]
    log(f"{len(tokens)} tokens; prefill {result.prefill_seconds * 1e3:.1f} ms, "
        f"decode {result.decode_tokens_per_second:.1f} tokens/s on {name}")
    if args.json:
        write_json(args.json, {"backend": name, "prompt_ids": prompt, "tokens": tokens,
                               "text": decode_bytes(tokens) if text_mode else None,
                               "prefill_seconds": result.prefill_seconds, "decode_seconds": result.decode_seconds,
                               "decode_tokens_per_second": result.decode_tokens_per_second,
                               "settings": vars(settings)})
    return 0


def _files(args: argparse.Namespace) -> Files:
    return Files(inputs={"--model": args.model, **model_files(args)}, outputs={"--json": args.json})


def main(argv: list[str] | None = None) -> int:
    return run_main(_generate, build_parser(), argv, _files)


if __name__ == "__main__":
    raise SystemExit(main())
