"""`--help` of every command, run as users run it (the `python -m` entry point, argv and all):
it prints the usage, exits 0 and imports no runtime library it does not need to parse flags."""
from __future__ import annotations

import json
import subprocess
import sys
import time

from triton_process import ROOT

# No command's --help imports torch (it took about 2 s to load), onnxruntime, TensorRT or the
# serving libraries: --help answers in well under a second.
COMMANDS = ("build-engine", "export-triton", "serve", "loadtest", "package-edge", "export-model", "check-parity",
            "generate", "benchmark")
NEVER = ("torch", "onnxruntime", "tensorrt", "tensorrt_rtx", "tensorrt_bindings", "tensorrt_rtx_bindings",
         "tritonclient", "pytriton", "tritonserver")
HELP_SECONDS = 1.0

PROBE = """
import json, runpy, sys
seen = {}
for command in %r:
    sys.argv = [command, "--help"]
    try:
        runpy.run_module("runtime.commands." + command.replace("-", "_"), run_name="__main__")
        code = None
    except SystemExit as exit_:
        code = exit_.code
    sys.stdout.flush()
    seen[command] = {"code": code, "modules": sorted({name.split(".")[0] for name in sys.modules})}
print("\\n" + json.dumps(seen))
"""


def test_help_of_every_command_imports_no_runtime_library():
    """One interpreter runs every command's --help: the modules loaded after each command are
    cumulative, so the first command that loads a library is the culprit."""
    out = subprocess.run([sys.executable, "-c", PROBE % (COMMANDS,)], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and "Traceback" not in out.stderr and "error" not in out.stderr, out.stderr
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert list(seen) == list(COMMANDS)
    for command in COMMANDS:
        assert seen[command]["code"] == 0, command
        assert f"usage: {command}" in out.stdout, command
        assert [name for name in NEVER if name in seen[command]["modules"]] == [], command


def test_help_of_every_command_answers_in_under_a_second():
    """Each --help in a fresh interpreter, as a user runs it (best of three, so a busy machine's
    one slow start does not fail it)."""
    slow = {}
    for command in COMMANDS:
        best = float("inf")
        for _ in range(3):
            started = time.perf_counter()
            out = subprocess.run([sys.executable, "-m", "runtime.commands." + command.replace("-", "_"), "--help"],
                                 cwd=ROOT, capture_output=True, text=True, timeout=60)
            best = min(best, time.perf_counter() - started)
            assert out.returncode == 0 and f"usage: {command}" in out.stdout, out.stderr
            if best < HELP_SECONDS:
                break
        if best >= HELP_SECONDS:
            slow[command] = round(best, 2)
    assert slow == {}
