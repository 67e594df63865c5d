"""Parity verdicts the mutation pass (scripts/mutation_pass.py) found no CPU test pinning: the sweep's
top-1 weighs every logits position alike, and check-parity fails when --generate fails even if
every tensor passed."""
from __future__ import annotations

import argparse
import json

import pytest

from models.precision import Tolerance
from runtime.commands import check_parity as parity_cli
from runtime.verify.decoding import GenerationParity
from runtime.verify.tensors import Case, CaseResult, ParityReport

BARS = Tolerance(atol=1.0, rtol=0.0, min_cosine=0.0, min_top1=0.95)


def case(top1: float, positions: int) -> CaseResult:
    return CaseResult(Case(1, positions), "logits", 0.0, 0.0, 1.0, top1, True, "", positions)


def test_sweep_top1_weighs_positions_not_cases():
    """One 1-position case that disagrees and a 99-position case that agrees: 99 % of the positions
    agree (passes a 95 % bar), though half the cases do not."""
    report = ParityReport("torch", "candidate", "float32", BARS, [case(0.0, 1), case(1.0, 99)])
    assert report.top1() == pytest.approx(0.99)
    assert report
    report.results = [case(0.0, 10), case(1.0, 10)]
    assert report.top1() == pytest.approx(0.5) and not report


def test_a_failed_generation_fails_check_parity_even_when_every_tensor_passes(tmp_path, capsys):
    tensors = ParityReport("torch", "candidate", "float32", BARS, [case(1.0, 4)])
    steps = case(1.0, 10)  # the teacher-forced decode steps: all within the bars
    diverged = GenerationParity("torch", "candidate", 10, 3, {"row": 0, "step": 3, "reference": 5, "candidate": 6,
                                                              "reference_margin": 2.0}, 1.0, 0.99, steps)
    agreed = GenerationParity("torch", "candidate", 10, 10, None, 1.0, 0.99, steps)
    report = tmp_path / "parity.json"
    args = argparse.Namespace(json=str(report))
    assert tensors and not diverged and agreed
    assert parity_cli._verdict(args, tensors, agreed) == 0
    assert json.loads(report.read_text())["passed"] is True
    assert parity_cli._verdict(args, tensors, diverged) == 1
    assert json.loads(report.read_text())["passed"] is False
    assert "diverge at row 0 step 3" in capsys.readouterr().err
