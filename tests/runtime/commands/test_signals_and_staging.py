"""SIGTERM and SIGHUP clean up like Ctrl-C, and a later run removes what a killed one left."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from models.files import atomic_path, remove_abandoned, staging_folder

ROOT = Path(__file__).resolve().parents[3]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_a_signal_during_export_leaves_no_staging_folder_and_exits_128_plus_signal(tmp_path, signum):
    """The export is interrupted once the graph is written into its staging folder (during the checks
    and verification that follow, which take seconds)."""
    output = tmp_path / "model.onnx"
    process = subprocess.Popen([sys.executable, "-m", "runtime.commands.export_model", "--output", str(output)],
                               cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not list(tmp_path.glob(".model.onnx.staging-*/model.onnx")):
        if process.poll() is not None:
            pytest.fail(f"the export ended before it could be interrupted: {process.stderr.read()}")
        time.sleep(0.01)
    process.send_signal(signum)
    err = process.communicate(timeout=60)[1]
    assert process.returncode == 128 + signum, (process.returncode, err, sorted(p.name for p in tmp_path.iterdir()))
    assert f"interrupted by {signal.Signals(signum).name}" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_abandoned_staging_files_of_dead_writers_are_removed_by_the_next_write(tmp_path):
    target = tmp_path / "report.json"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    (tmp_path / f".report.json.staging-{dead_pid}-abc").mkdir()
    (tmp_path / f".report.json.staging-{dead_pid}-abc" / "model.onnx").write_bytes(b"x" * 100)
    (tmp_path / f".report.json.staging-{dead_pid}-def.partial").write_bytes(b"half")
    alive = tmp_path / f".report.json.staging-{os.getppid()}-ghi.partial"  # a running writer's file stays
    alive.write_bytes(b"in progress")
    unrelated = tmp_path / ".other.json.staging-1-x.partial"
    unrelated.write_bytes(b"not ours")
    with atomic_path(target) as temporary:
        temporary.write_text("{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([alive.name, unrelated.name, "report.json"])
    with staging_folder(target) as folder:
        assert folder.name.startswith(f".report.json.staging-{os.getpid()}-")
    assert remove_abandoned(target) == []
