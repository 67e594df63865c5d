"""Progress: every phase of `export-model --preset tiny` announces itself, a line arrives while a
long phase runs (ROTARY_PROGRESS_SECONDS=1 here: every second), and the time the command reports
covers the whole command. Also the helper itself (models.progress.phase)."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time

from triton_process import ROOT

INTERVAL = 1.0
MAX_GAP = 6.0  # the interval, plus room for a loaded machine; the bar is ~10 s on `small`
PHASES = ("exporting preset tiny (seed 0) as a decoder", "lint:", "verifying:", "parity passed", "wrote ")


def timed_lines(command: list[str], env: dict) -> tuple[int, list[tuple[float, str]], float]:
    """Run `command`; each line of stdout and stderr with the seconds since start when it arrived."""
    started = time.monotonic()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                               env=env, bufsize=1)
    lines = [(time.monotonic() - started, line.rstrip("\n")) for line in process.stdout]
    code = process.wait(timeout=300)
    return code, lines, time.monotonic() - started


def test_export_model_tiny_reports_progress_during_every_phase(tmp_path):
    env = {**os.environ, "ROTARY_PROGRESS_SECONDS": str(INTERVAL), "PYTHONUNBUFFERED": "1"}
    report = tmp_path / "export.json"
    command = [sys.executable, "-m", "runtime.commands.export_model", "--preset", "tiny",
               "--output", str(tmp_path / "tiny.onnx"), "--json", str(report)]
    code, lines, _ = timed_lines(command, env)
    text = "\n".join(f"{t:6.2f} {line}" for t, line in lines)
    assert code == 0, text
    # each phase announces itself, in order
    found = [next((i for i, (_, line) in enumerate(lines) if line.startswith(p)), None) for p in PHASES]
    assert None not in found and found == sorted(found), text
    # tracing takes seconds even for tiny: lines arrive while it runs, and no phase is silent for long
    tracing = lines[found[0] + 1:found[1]]
    assert tracing and all(line.startswith("  still tracing the model (") for _, line in tracing), text
    gaps = [later - earlier for (earlier, _), (later, _) in zip(lines, lines[1:])]
    assert max(gaps) <= MAX_GAP, text
    # the reported time covers the whole command: tracing, lint, saving and verification
    data = json.loads(report.read_text())
    seconds = float(re.search(r" in ([0-9.]+) s \(graph ", lines[found[4]][1]).group(1))
    assert seconds >= lines[found[4]][0] - lines[0][0], text
    assert data["seconds"] >= data["export_seconds"] + data["verify_seconds"] and data["verify_seconds"] > 0


def test_a_static_cache_export_reports_the_time_of_the_whole_command(tmp_path, capsys):
    """It used to report the graph's writing only: "in 0.0 s" for a tiny graph verified for a second."""
    from runtime.commands import export_model

    report = tmp_path / "e.json"
    assert export_model.main(["--static-cache", "64", "--output", str(tmp_path / "s.onnx"), "--json", str(report)]) == 0
    data, out = json.loads(report.read_text()), capsys.readouterr().out
    assert data["seconds"] >= data["export_seconds"] + data["verify_seconds"] and data["verify_seconds"] > 0
    # A warm process can export and verify this tiny graph in under 0.1 s, which prints in ms.
    pattern = re.compile(r"^wrote .* in ([0-9.]+) (s|ms) \(graph .*, verification ")
    found = [match for line in out.splitlines() if (match := pattern.search(line))]
    assert len(found) == 1, out
    printed = float(found[0].group(1)) / (1e3 if found[0].group(2) == "ms" else 1)
    assert abs(printed - data["seconds"]) <= 0.06, out


def test_phase_logs_its_start_then_a_line_per_interval_until_the_block_ends(monkeypatch):
    from models.progress import phase

    monkeypatch.setenv("ROTARY_PROGRESS_SECONDS", "0.05")
    lines, lock = [], threading.Lock()

    def log(message: str) -> None:
        with lock:
            lines.append(message)

    with phase(log, "waiting"):
        time.sleep(0.3)
    count = len(lines)
    time.sleep(0.15)
    assert lines[0] == "waiting ..." and len(lines) == count  # nothing after the block
    assert count >= 3 and all(re.fullmatch(r"  still waiting \(\d+ s\) \.\.\.", line) for line in lines[1:])
    with phase(log, "quiet", ""):
        pass
    assert len(lines) == count  # "" announces nothing, and a short block adds no line
