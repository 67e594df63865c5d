"""Where a result came from: the one block every result file carries.

`provenance(command, settings)` records the toolkit's commit (and whether the tree had
uncommitted changes), the exact command line, the date, the machine (GPUs with their driver
and compute capability, the CPU), the library versions and the settings that define the
result's columns. Nothing heavy is imported for it: versions come from the installed
packages' metadata, and the GPUs from `nvidia-smi` (or from torch when a command already
imported it), so a CPU-only client such as `loadtest` stays light.

Where the source is a copy (the accelerator gets the working tree, with a .git of an older
commit), the commit is set in the environment and takes precedence: ROTARY_DEPLOY_COMMIT (and
ROTARY_DEPLOY_DIRTY=1 when the copy had uncommitted changes).
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Sequence

SOURCE_ROOT = Path(__file__).resolve().parents[1]
COMMIT_VARIABLE, DIRTY_VARIABLE = "ROTARY_DEPLOY_COMMIT", "ROTARY_DEPLOY_DIRTY"
# Distributions whose versions define a result; absent ones are left out.
# (Distribution names, one string: some equal backend names, which only the registry lists.)
LIBRARIES = ("torch numpy onnx onnxscript onnxruntime onnxruntime-gpu ml_dtypes safetensors tensorrt "
             "tensorrt-rtx-cu13 tensorrt_rtx polygraphy nvidia-pytriton tritonclient").split()
SCHEMA = 1


def _run(command: list[str], cwd: Path | None = None) -> str | None:
    try:
        done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def source_revision() -> dict:
    """{"commit", "dirty", "from"}: the environment's (set where the source is a copy, whose own
    .git, if any, may be older than the code), else the checkout's HEAD, else nothing known."""
    if os.environ.get(COMMIT_VARIABLE):
        return {"commit": os.environ[COMMIT_VARIABLE], "dirty": os.environ.get(DIRTY_VARIABLE, "0") == "1",
                "from": COMMIT_VARIABLE}
    if (SOURCE_ROOT / ".git").exists() and shutil.which("git"):
        commit = _run(["git", "rev-parse", "HEAD"], SOURCE_ROOT)
        status = _run(["git", "status", "--porcelain", "--untracked-files=no"], SOURCE_ROOT)
        if commit:
            return {"commit": commit, "dirty": bool(status), "from": "git"}
    return {"commit": None, "dirty": None, "from": "unknown (no .git and no ROTARY_DEPLOY_COMMIT)"}


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def gpus() -> list[dict]:
    """Every NVIDIA GPU of the machine, as nvidia-smi reports it; [] without one."""
    if not shutil.which("nvidia-smi"):
        return []
    text = _run(["nvidia-smi", "--query-gpu=name,driver_version,compute_cap,memory.total",
                 "--format=csv,noheader,nounits"])
    found = []
    for line in (text or "").splitlines():
        parts = [part.strip() for part in line.split(",")]
        if len(parts) == 4:
            found.append({"name": parts[0], "driver": parts[1], "compute_capability": parts[2],
                          "memory_mib": int(parts[3]) if parts[3].isdigit() else parts[3]})
    return found


def device() -> dict:
    """The machine a result was measured on: its GPUs (with driver), CPU and cores."""
    found = gpus()
    torch = sys.modules.get("torch")
    if not found and torch is not None and torch.cuda.is_available():  # no nvidia-smi, but CUDA works
        found = [{"name": torch.cuda.get_device_name(i), "driver": None,
                  "compute_capability": ".".join(map(str, torch.cuda.get_device_capability(i))), "memory_mib": None}
                 for i in range(torch.cuda.device_count())]
    return {"gpus": found, "gpu": found[0]["name"] if found else None,
            "driver": found[0]["driver"] if found else None,
            "cpu": _cpu_name(), "cores": os.cpu_count(), "host": platform.node()}


def versions() -> dict:
    """Python and the installed versions of the libraries in LIBRARIES (and CUDA, when torch is loaded)."""
    found = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    torch = sys.modules.get("torch")
    if torch is not None:
        found["torch_cuda"] = torch.version.cuda
    onnxruntime = sys.modules.get("onnxruntime")
    if onnxruntime is not None and hasattr(onnxruntime, "get_available_providers"):
        found["onnxruntime_providers"] = onnxruntime.get_available_providers()
    return found


LONG_TEXT, LONG_LIST = 256, 64  # an argument or a list past these is recorded by its size and digest


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:16]


def _short(text: str) -> str:
    """A long argument (a 1024-id prompt, say) by its start, length and digest: the result file
    holds the data itself where it matters, and three full copies would outweigh the result."""
    if len(text) <= LONG_TEXT:
        return text
    return f"{text[:64]}... ({len(text)} characters, sha256 {_digest(text)})"


def _plain(value: Any) -> Any:
    """JSON-safe settings: paths and other objects as text; long lists by their size and digest."""
    if isinstance(value, (int, float, bool)) or value is None:
        return value
    if isinstance(value, str):
        return _short(value)
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        if len(value) > LONG_LIST:
            return f"{len(value)} items, sha256 {_digest(json.dumps(value, default=str))}"
        return [_plain(v) for v in value]
    return _short(str(value))


SECRET_FLAGS = ("--api-key",)  # their values never reach a result file
SECRET_SETTINGS = ("api_key",)
REDACTED = "<redacted>"


def redact_argv(argv: list[str]) -> list[str]:
    """`argv` with the values of SECRET_FLAGS (`--flag VALUE` or `--flag=VALUE`) replaced."""
    out = []
    for i, arg in enumerate(argv):
        if i and argv[i - 1] in SECRET_FLAGS:
            arg = REDACTED
        elif arg.split("=", 1)[0] in SECRET_FLAGS and "=" in arg:
            arg = arg.split("=", 1)[0] + "=" + REDACTED
        out.append(arg)
    return out


def provenance(command: Sequence[str] | None, settings: dict | None = None) -> dict:
    """The block a result file carries (see the module docstring). `command`: the program and its
    arguments as run; `settings`: what defines the result's columns (a command's parsed flags).
    Secrets (an API key) are replaced by REDACTED in both; long arguments and lists are recorded by
    their size and digest."""
    argv = [_short(arg) for arg in redact_argv(list(command))] if command is not None else None
    settings = {key: REDACTED if key in SECRET_SETTINGS and value else value for key, value in (settings or {}).items()}
    return {"schema": SCHEMA,
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            **source_revision(),
            "command": shlex.join(argv) if argv is not None else None,
            "argv": argv,
            "cwd": os.getcwd(),
            "device": device(),
            "versions": versions(),
            "settings": _plain(settings or {})}


def with_provenance(data: Any, command: Sequence[str] | None, settings: dict | None = None) -> Any:
    """`data` with its "provenance" block added (a dict result); other values are returned as they are."""
    if not isinstance(data, dict):
        return data
    return {**data, "provenance": provenance(command, settings)}


def dumps(data: Any, command: Sequence[str] | None, settings: dict | None = None) -> str:
    """The JSON text of a result with its provenance, as every result file is written."""
    return json.dumps(with_provenance(data, command, settings), indent=2, default=str) + "\n"


def script_command(argv: Sequence[str] | None) -> list[str]:
    """A script's command line: how it was started (`python3 scripts/x.py`) and its arguments."""
    return [Path(sys.executable).name, sys.argv[0], *(sys.argv[1:] if argv is None else argv)]


def write_result(path: str | Path, data: dict, command: Sequence[str] | None, settings: dict | None = None) -> None:
    """Write a result file with its provenance, atomically (a reader never sees half a file)."""
    from models.files import atomic_path

    with atomic_path(Path(path)) as temporary:
        temporary.write_text(dumps(data, command, settings))
