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


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_a_signal_during_export_leaves_no_staging_folder_and_exits_128_plus_signal(tmp_path, signum):
    """The export is interrupted once its staging folder exists (while the graph is written into it,
    seconds; waiting for the written graph left only the verification's 0.3 s, which a loaded CI
    machine's poll once missed). Ctrl-C (SIGINT) exits 130, SIGTERM 143, SIGHUP 129, each with the
    one line naming the signal."""
    output = tmp_path / "model.onnx"
    # a SIGINT ignored here would be inherited as ignored: the child starts with the default handler
    process = subprocess.Popen([sys.executable, "-m", "runtime.commands.export_model", "--output", str(output)],
                               cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not list(tmp_path.glob(".model.onnx.staging-*")):
        if process.poll() is not None:
            pytest.fail(f"the export ended before it could be interrupted: {process.stderr.read()}")
        time.sleep(0.01)
    process.send_signal(signum)
    err = process.communicate(timeout=60)[1]
    assert process.returncode == 128 + signum, (process.returncode, err, sorted(p.name for p in tmp_path.iterdir()))
    assert err.strip().splitlines() == [f"export-model: interrupted by {signal.Signals(signum).name}; "
                                        "nothing was left half-written"], err
    assert "Traceback" not in err and "internal error" not in err
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


def test_a_keyboard_interrupt_in_the_command_body_exits_130_in_one_line(capsys):
    """Ctrl-C as the body sees it (KeyboardInterrupt, no handler of ours involved) is SIGINT: 130."""
    from runtime.commands.common import ArgumentParser, run_main

    def body(_args):
        raise KeyboardInterrupt

    assert run_main(body, ArgumentParser(prog="export-model"), []) == 130
    assert capsys.readouterr().err == "export-model: interrupted by SIGINT; nothing was left half-written\n"


def test_a_signal_whose_exception_was_swallowed_still_ends_the_command_with_its_code(capsys):
    """SIGTERM raised inside a weakref callback or __del__ is printed as 'Exception ignored' and the
    body runs on to its end (seen once in the SIGTERM export test): the signal was recorded, so the
    command still exits 143, not 0."""
    from runtime.commands import common

    def body(_args):
        try:
            common._RECEIVED.append(signal.SIGTERM)  # what the handler records before it raises
            raise common.Terminated(signal.SIGTERM)
        except common.Terminated:
            pass  # swallowed, as Python does for an exception in a callback
        return 0

    assert common.run_main(body, common.ArgumentParser(prog="export-model"), []) == 143
    assert capsys.readouterr().err == "export-model: interrupted by SIGTERM; nothing was left half-written\n"


def test_a_ctrl_c_that_an_extension_turned_into_another_error_still_exits_130(capsys):
    """pybind11 turns a KeyboardInterrupt raised while a C extension imports into ImportError, which
    the toolkit reports as 'onnxruntime is not installed' (seen in the SIGINT export test above): the
    signal is recorded, so the exit is still 130 with the interrupt line."""
    from models.errors import ToolkitError
    from runtime.commands.common import ArgumentParser, run_main

    def body(_args):
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)  # the handler raises here
        except KeyboardInterrupt:
            raise ToolkitError("onnxruntime is not installed") from None
        return 0

    # Ctrl-C as a terminal delivers it (a shell starting the suite in the background ignores SIGINT)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        assert run_main(body, ArgumentParser(prog="export-model"), []) == 130
    finally:
        signal.signal(signal.SIGINT, previous)
    assert capsys.readouterr().err == "export-model: interrupted by SIGINT; nothing was left half-written\n"
