"""scripts/check_targets.py judges the committed raw results as docs/benchmarks.md reads them."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RAW = ROOT / "docs" / "benchmarks"
SCRIPT = ROOT / "scripts" / "check_targets.py"


def _check(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=60)


def test_the_overlapped_lease_meets_every_serving_target_and_the_plain_loop_missed_the_step_ratio():
    met = _check("serve", str(RAW / "h200-1204f/loadtest.json"), str(RAW / "h200-1204f/decoder-served-contexts.json"),
                 "--json")
    assert met.returncode == 0, met.stdout + met.stderr
    rows = {row["target"]: row for row in json.loads(met.stdout)}
    assert rows["32 clients: tokens/s"]["value"] == pytest.approx(33218.9, abs=0.1)
    ratio = next(row for target, row in rows.items() if "upper bound" in target)
    assert ratio["value"] == pytest.approx(4029.93 / 4612 / 0.71343, rel=1e-4) and ratio["met"]
    plain = _check("serve", str(RAW / "h200-1204d/loadtest.json"), str(RAW / "h200-1204d/decoder-served-contexts.json"))
    assert plain.returncode == 1
    assert [line.split(":")[1] for line in plain.stdout.splitlines() if line.startswith("MISSED")] == [
        " step over the decoder's alone, upper bound"]


def test_the_fused_7b_decode_is_judged_against_three_quarters_of_the_floor():
    met = _check("fused", str(RAW / "h200-1204f/bench-fused-7b-86c8ec4.json"))
    assert met.returncode == 0 and "0.7719 >= 0.75" in met.stdout, met.stdout
    missed = _check("fused", str(RAW / "h200-1204e/bench-fused-7b.json"))  # 74.6 %: a lease before the overlap
    assert missed.returncode == 1 and "MISSED triton-fused batch 1: fraction of the HBM floor: 0.7464" in missed.stdout


@pytest.mark.parametrize("args, message", [
    (["serve", "missing.json"], "serve takes two files; see --help"),
    (["serve", "missing.json", "missing.json"], "cannot read missing.json"),
    (["fused", str(RAW / "h200-1204f/loadtest.json")], "a file lacks the field 'results'"),
])
def test_bad_input_is_one_error_line_and_exit_2(args, message):
    out = _check(*args)
    assert out.returncode == 2 and message in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr
