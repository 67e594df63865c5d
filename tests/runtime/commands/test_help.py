"""`--help` of every command, run as users run it (the `python -m` entry point, argv and all):
it prints the usage, exits 0 and imports no runtime library it does not need to parse flags."""
from __future__ import annotations

import json
import subprocess
import sys

from triton_process import ROOT

# Commands whose --help imports no torch today (models/ imports torch at module level, so those that
# read model flags do); none may import onnxruntime, TensorRT or the serving libraries.
TORCH_FREE = ("build-engine", "export-triton", "serve", "loadtest", "package-edge")
WITH_TORCH = ("export-model", "check-parity", "generate", "benchmark")
NEVER = ("onnxruntime", "tensorrt", "tensorrt_rtx", "tensorrt_bindings", "tensorrt_rtx_bindings", "tritonclient",
         "pytriton", "tritonserver")

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
    """One interpreter runs every command's --help, the torch-free ones first: the modules loaded
    after each command are cumulative, so the first command that loads a library is the culprit."""
    commands = (*TORCH_FREE, *WITH_TORCH)
    out = subprocess.run([sys.executable, "-c", PROBE % (commands,)], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and "Traceback" not in out.stderr and "error" not in out.stderr, out.stderr
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert list(seen) == list(commands)
    for command in commands:
        assert seen[command]["code"] == 0, command
        assert f"usage: {command}" in out.stdout, command
        assert [name for name in NEVER if name in seen[command]["modules"]] == [], command
        if command in TORCH_FREE:
            assert "torch" not in seen[command]["modules"], command
