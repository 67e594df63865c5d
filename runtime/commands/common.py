"""What every command line shares: one-line errors, argument types that refuse nonsense,
output paths claimed before any work, signals that clean up, JSON output and the model flags."""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import signal
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from models.errors import ToolkitError
from models.files import atomic_path, probe_writable
from runtime.provenance import dumps


class ArgumentParser(argparse.ArgumentParser):
    """argparse, with its errors as one `prog: error:` line like every other error."""

    def error(self, message: str):
        print(f"{self.prog}: error: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(2)


class Terminated(KeyboardInterrupt):
    """SIGTERM, SIGHUP or SIGINT, raised where the program is so that staging files are removed on the way out."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


_RECEIVED: list[int] = []  # signals seen: C extensions may turn the exception into another (pybind11: ImportError)
# The command running now (its command line and parsed flags), recorded in every JSON it writes.
_RUNNING: dict[str, Any] = {"argv": None, "settings": None}


@contextlib.contextmanager
def _signals_interrupt():
    """SIGTERM and SIGHUP unwind like Ctrl-C (finally blocks and context managers run); all three are
    recorded in _RECEIVED, so an interrupt that a C extension turned into another exception still
    exits 128 + the signal."""
    _RECEIVED.clear()
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def raise_terminated(signum, _frame):
        _RECEIVED.append(signum)
        raise Terminated(signum)

    handled = [signal.SIGTERM, signal.SIGHUP]
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not when started with Ctrl-C ignored
        handled.append(signal.SIGINT)  # recorded too: a Ctrl-C inside an import must not read as a missing module
    previous = {sig: signal.signal(sig, raise_terminated) for sig in handled}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@dataclass
class Files:
    """A command's input files, output files and output folders (written whole, e.g. a model
    repository) by flag (None or "-" when not used)."""

    inputs: dict[str, str | None] = field(default_factory=dict)
    outputs: dict[str, str | None] = field(default_factory=dict)
    folders: dict[str, str | None] = field(default_factory=dict)


def run_main(body: Callable[[argparse.Namespace], int], parser: argparse.ArgumentParser,
             argv: list[str] | None, files: Callable[[argparse.Namespace], Files] | None = None) -> int:
    """Parse argv, claim the output files, run `body`; toolkit errors become one line on stderr
    and exit 2, Ctrl-C/SIGTERM/SIGHUP exit 128 + the signal after the staging files are gone."""
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help, or a bad argument already reported in one line
        return exit_.code if isinstance(exit_.code, int) else 2
    _RUNNING.update(argv=[parser.prog, *(sys.argv[1:] if argv is None else argv)], settings=vars(args))
    try:
        with _signals_interrupt():
            check_files(files(args) if files else Files(outputs={"--json": getattr(args, "json", None),
                                                                 "--plot": getattr(args, "plot", None)}))
            code = body(args)
        if _RECEIVED:  # the signal's exception was swallowed where it was raised (a weakref callback, say)
            return _interrupted(parser.prog, _RECEIVED[0])
        return code
    except KeyboardInterrupt as error:
        return _interrupted(parser.prog, getattr(error, "signum", signal.SIGINT))
    except ToolkitError as error:
        if _RECEIVED:
            return _interrupted(parser.prog, _RECEIVED[0])
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        return 2
    except Exception as error:  # an unexpected failure is a bug: one line, traceback on request
        if _RECEIVED:
            return _interrupted(parser.prog, _RECEIVED[0])
        if os.environ.get("TOOLKIT_DEBUG"):
            raise
        print(f"{parser.prog}: internal error: {type(error).__name__}: {error} "
              "(set TOOLKIT_DEBUG=1 for the traceback)", file=sys.stderr)
        return 1


def _interrupted(prog: str, signum: int) -> int:
    print(f"{prog}: interrupted by {signal.Signals(signum).name}; nothing was left half-written", file=sys.stderr)
    return 128 + signum


def check_files(files: Files) -> None:
    """Before any work: every output can be written where asked, no two outputs are the same file,
    no output file lies in an output folder, and no output would overwrite an input."""
    claimed: dict[Path, str] = {}
    inputs = {Path(path).resolve(): flag for flag, path in files.inputs.items() if path and path != "-"}
    folders = {}
    for flag, path in files.folders.items():
        if path:
            _check_output_folder(Path(path), flag, inputs)
            folders[Path(path).resolve()] = (flag, path)
    for flag, path in files.outputs.items():
        if not path or path == "-":
            continue
        target = Path(path)
        resolved = target.resolve()
        for folder, (folder_flag, folder_path) in folders.items():
            if resolved == folder or folder in resolved.parents:
                where = "is" if resolved == folder else "is inside"
                raise ToolkitError(f"{flag} {path} {where} the {folder_flag} folder {folder_path}, which this command "
                                   "writes whole; choose a path outside it")
        check_output_path(target, flag)
        if resolved in claimed:
            raise ToolkitError(f"{flag} and {claimed[resolved]} both name {path}; give each output its own file")
        if resolved in inputs:
            raise ToolkitError(f"{flag} {path} is also the {inputs[resolved]} input; writing it would destroy "
                               "the input, so choose another path")
        folder = next((folder for folder in inputs if folder.is_dir() and resolved.parent == folder), None)
        if folder is not None and resolved.exists():  # e.g. a shard of a sharded --checkpoint
            raise ToolkitError(f"{flag} {path} is a file of the {inputs[folder]} folder {folder}; writing it would "
                               "change that input, so choose a path outside it")
        claimed[resolved] = flag


def _check_output_folder(folder: Path, flag: str, inputs: dict[Path, str]) -> None:
    """An output folder's place exists and it would overwrite no input (whether the folder itself
    may be written, absent or empty, its writer decides)."""
    parent = folder.parent
    if not parent.is_dir():
        state = "is a file, not a directory" if parent.exists() else "does not exist"
        raise ToolkitError(f"cannot write {flag} {folder}: {parent} {state}; create it or choose another {flag}")
    resolved = folder.resolve()
    for path, input_flag in inputs.items():
        if path == resolved or resolved in path.parents:
            raise ToolkitError(f"{flag} {folder} holds the {input_flag} input; writing it would destroy the input, "
                               "so choose another folder")


def check_output_path(target: Path, flag: str) -> None:
    parent = target.parent
    if parent.exists() and not parent.is_dir():
        raise ToolkitError(f"cannot write {flag} {target}: {parent} is a file, not a directory; choose another {flag}")
    if not parent.exists():
        raise ToolkitError(f"cannot write {flag} {target}: directory {parent} does not exist; create it or "
                           f"choose another {flag}")
    if target.is_dir():
        raise ToolkitError(f"cannot write {flag} {target}: it is a directory; give a file name inside it")
    try:
        probe_writable(target)
    except OSError as error:
        raise ToolkitError(f"cannot write {flag} {target}: {error.strerror or error} in {parent}; "
                           f"choose a writable place for {flag}") from None


def _number(kind, text: str, low=None, high=None, low_open: bool = False, high_open: bool = False):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}") from None
    if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    below = low is not None and (value <= low if low_open else value < low)
    above = high is not None and (value >= high if high_open else value > high)
    if below or above:
        left = "(" if low_open else "["
        right = ")" if high_open else "]"
        raise argparse.ArgumentTypeError(f"must be in {left}{'-inf' if low is None else low}, "
                                         f"{'inf' if high is None else high}{right}, got {text}")
    return value


def positive_int(text: str) -> int:
    return _number(int, text, 1)


def non_negative_int(text: str) -> int:
    return _number(int, text, 0)


def finite_float(text: str) -> float:
    return _number(float, text)


def non_negative_float(text: str) -> float:
    return _number(float, text, 0.0)


def positive_float(text: str) -> float:
    return _number(float, text, 0.0, low_open=True)


def fraction(text: str) -> float:
    """[0, 1): the top-k filter threshold."""
    return _number(float, text, 0.0, 1.0, high_open=True)


def _integers(text: str, low: int, example: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as {example}, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as {example}, got {text!r}")
    bad = next((v for v in values if v < low), None)
    if bad is not None:
        raise argparse.ArgumentTypeError(f"expected integers >= {low}, got {bad}")
    return values


def int_list(text: str) -> list[int]:
    """argparse type for positive sizes: "1,3,17"."""
    return _integers(text, 1, "1,3,17")


def token_ids(text: str) -> list[int]:
    """argparse type for token ids: "0,17,255" (0 is a token like any other)."""
    return _integers(text, 0, "0,17,255")


def write_json(target: str, data: Any) -> None:
    """Write `data` as JSON to a file (atomically) or to stdout for "-", with the provenance block
    of the command running (runtime.provenance): commit, command line, device, versions, date, flags."""
    text = dumps(data, _RUNNING["argv"], _RUNNING["settings"])
    if target == "-":
        sys.stdout.write(text)
        return
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
                       help="weights: this project's .safetensors (one file, or a folder of shards with "
                            "model.safetensors.index.json), or a torch.save'd state_dict of this project "
                            "or of native-sparse-attention-pytorch (layout detected from the keys)")
    group.add_argument("--config", metavar="JSON",
                       help="model config fields as inline JSON or a JSON file; overrides the checkpoint's "
                            "or the preset's values")
    group.add_argument("--preset", metavar="NAME",
                       help="build a preset model from --init-seed instead of loading weights: tiny (default), small, "
                            "1b or 7b (a preset too large for this machine's memory is refused: write it as shards "
                            "with scripts/write_preset.py and pass --checkpoint)")
    group.add_argument("--init-seed", dest="seed", type=non_negative_int, default=0, metavar="N",
                       help="weight initialisation seed for --preset (default 0)")


def model_files(args: argparse.Namespace) -> dict[str, str | None]:
    """The model flags' input files, for Files.inputs."""
    config = args.config if args.config and Path(args.config).is_file() else None
    return {"--checkpoint": args.checkpoint, "--config": config}


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
    group.add_argument("--max-prompt-tokens", type=int, metavar="N",
                       help="longest prompt accepted (default 256, or half the decoder's capacity when that is less)")
    group.add_argument("--max-new-tokens-limit", type=int, metavar="N",
                       help="most new tokens a request may ask for (default 256, or what the decoder's capacity "
                            "leaves after the longest prompt when that is less)")
    group.add_argument("--queue", type=int, metavar="N",
                       help="requests that may wait while every row is busy; more are refused at once (default 64; "
                            "0: only free rows are taken)")


def limit_changes(args: argparse.Namespace) -> dict:
    """The limit flags that were given, as Limits fields."""
    changes = {"max_rows": args.max_rows, "max_prompt_tokens": args.max_prompt_tokens,
               "max_new_tokens": args.max_new_tokens_limit, "max_queue": args.queue}
    return {name: value for name, value in changes.items() if value is not None}


def gpu_selection(text: str):
    """--gpus all|N|LIST (runtime.serving.gpus), checked for form at parse time."""
    from runtime.serving.gpus import GpuSelectionError, parse_gpus

    try:
        return parse_gpus(text)
    except GpuSelectionError as error:
        raise argparse.ArgumentTypeError(str(error).removeprefix("--gpus ")) from None
