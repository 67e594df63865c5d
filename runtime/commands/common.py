"""What every command line shares: error handling, JSON output, list parsing, model arguments."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable

from models.errors import ToolkitError
from models.files import atomic_path


def run_main(body: Callable[[argparse.Namespace], int], parser: argparse.ArgumentParser,
             argv: list[str] | None) -> int:
    """Parse argv and run `body`; toolkit errors become one line on stderr and exit 2."""
    args = parser.parse_args(argv)
    try:
        check_output_target(getattr(args, "json", None), "JSON report")
        check_output_target(getattr(args, "plot", None), "chart")
        return body(args)
    except ToolkitError as error:
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{parser.prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # an unexpected failure is a bug: one line, traceback on request
        if os.environ.get("TOOLKIT_DEBUG"):
            raise
        print(f"{parser.prog}: internal error: {type(error).__name__}: {error} "
              "(set TOOLKIT_DEBUG=1 for the traceback)", file=sys.stderr)
        return 1


def int_list(text: str) -> list[int]:
    """argparse type for "1,3,17"."""
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 1,3,17, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def check_output_target(target: str | None, what: str) -> None:
    """Fail before any work if a report or chart could not be written where asked."""
    if target and target != "-" and not Path(target).parent.is_dir():
        raise ToolkitError(f"cannot write {what} {target}: {Path(target).parent} is not a directory")


def write_json(target: str, data: Any) -> None:
    """Write `data` as JSON to a file (atomically) or to stdout for "-"."""
    text = json.dumps(data, indent=2, sort_keys=False, default=str) + "\n"
    if target == "-":
        sys.stdout.write(text)
        return
    check_output_target(target, "JSON report")
    with atomic_path(Path(target)) as temporary:
        temporary.write_text(text)


def add_backend_argument(parser: argparse.ArgumentParser, names: list[str], default: str, what: str) -> None:
    """--backend, its choices and their one-line descriptions from the backend registry."""
    from runtime.registry import BACKENDS

    described = "; ".join(f"{name}: {BACKENDS[name].summary}" for name in names if name in BACKENDS)
    parser.add_argument("--backend", choices=names, default=default, metavar="NAME",
                        help=f"{what} (default {default}). {described}")


def add_model_arguments(parser: argparse.ArgumentParser, what: str) -> None:
    group = parser.add_argument_group(f"model ({what})")
    group.add_argument("--checkpoint", metavar="PATH",
                       help="weights: this project's .safetensors, or a torch.save'd state_dict of this project "
                            "or of native-sparse-attention-pytorch (layout detected from the keys)")
    group.add_argument("--config", metavar="JSON",
                       help="model config fields as inline JSON or a JSON file; overrides the checkpoint's "
                            "or the preset's values")
    group.add_argument("--preset", metavar="NAME",
                       help="build a preset model from --init-seed instead of loading weights: tiny (default) or small")
    group.add_argument("--init-seed", dest="seed", type=int, default=0, metavar="N",
                       help="weight initialisation seed for --preset (default 0)")


def model_request(args: argparse.Namespace):
    """The model flags as a models.source.ModelRequest (--config parsed, nothing loaded yet)."""
    from models.source import ModelRequest, parse_config_argument

    if args.checkpoint and args.preset:
        raise ToolkitError("give either --checkpoint or --preset, not both")
    return ModelRequest(args.checkpoint, parse_config_argument(args.config), args.preset, args.seed)


def log_to(stream_is_json: bool) -> Callable[[str], None]:
    """Human progress goes to stderr when stdout carries JSON."""
    stream = sys.stderr if stream_is_json else sys.stdout
    return lambda message: print(message, file=stream, flush=True)


def add_limit_arguments(parser: argparse.ArgumentParser) -> None:
    """The serving limits (runtime.serving.limits.Limits) as flags; unset flags keep the defaults."""
    group = parser.add_argument_group("serving limits (a request over one gets an error response)")
    group.add_argument("--max-rows", type=int, metavar="N", help="requests decoded together (default 8)")
    group.add_argument("--max-prompt-tokens", type=int, metavar="N", help="longest prompt accepted (default 256)")
    group.add_argument("--max-new-tokens-limit", type=int, metavar="N",
                       help="most new tokens a request may ask for (default 256)")
    group.add_argument("--queue", type=int, metavar="N",
                       help="requests that may wait for a free row; more are refused at once (default 64)")


def limit_changes(args: argparse.Namespace) -> dict:
    """The limit flags that were given, as Limits fields."""
    changes = {"max_rows": args.max_rows, "max_prompt_tokens": args.max_prompt_tokens,
               "max_new_tokens": args.max_new_tokens_limit, "max_queue": args.queue}
    return {name: value for name, value in changes.items() if value is not None}
