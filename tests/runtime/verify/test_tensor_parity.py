"""runtime.parity: the comparison numbers, the report, and the default sweep."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from models.config import ModelConfig
from models.signature import graph_signature
from runtime.backends import Backend, TensorMeta
from models.precision import PRECISIONS, WEIGHT_SCHEMES, Tolerance
from runtime.backends.torch_backend import TorchBackend
from runtime.verify.tensors import Case, ParityReport, check_parity, compare_outputs, default_cases

STRICT = Tolerance(atol=0.1, rtol=0.0, min_cosine=0.99, min_top1=0.9)
CASE = Case(2, 2)

REF = np.array([[[1.0, 2.0, 3.0], [3.0, 1.0, 0.0]],
                [[0.5, 0.0, -1.0], [2.0, 2.5, 1.0]]], dtype=np.float32)


def expected_cosine(a, b):
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_identical_arrays():
    result = compare_outputs(REF, REF.copy(), STRICT, CASE, "logits")
    assert result.passed and result.problem == ""
    assert result.max_abs == 0.0 and result.max_rel == 0.0
    assert result.cosine == pytest.approx(1.0, abs=1e-12)
    assert result.top1 == 1.0


def test_numbers_on_a_small_difference():
    cand = REF.copy()
    cand[0, 0, 1] += 0.05  # argmax unchanged
    cand[1, 1, 0] -= 0.02
    result = compare_outputs(REF, cand, STRICT, CASE, "logits")
    assert result.max_abs == pytest.approx(0.05, abs=1e-6)
    assert result.max_rel == pytest.approx(0.05 / 3.0, abs=1e-6)
    assert result.cosine == pytest.approx(expected_cosine(REF, cand), abs=1e-12)
    assert result.top1 == 1.0
    assert result.passed


def test_max_abs_over_tolerance_fails():
    cand = REF.copy()
    cand[1, 0, 2] += 0.3
    result = compare_outputs(REF, cand, STRICT, CASE, "logits")
    assert result.max_abs == pytest.approx(0.3, abs=1e-6)
    assert not result.passed and "max abs" in result.problem
    # rtol scales with max|reference| (3.0): atol 0.1 + rtol 0.1 * 3 = 0.4 >= 0.3
    relaxed = Tolerance(atol=0.1, rtol=0.1, min_cosine=0.9, min_top1=0.9)
    assert compare_outputs(REF, cand, relaxed, CASE, "logits").passed


def test_top1_counts_positions_whose_argmax_changes():
    cand = REF.copy()
    cand[0, 1, 1] = 3.5  # position (0, 1): argmax 0 -> 1; 1 of 4 positions changes
    result = compare_outputs(REF, cand, Tolerance(atol=10, rtol=0, min_cosine=0.0, min_top1=0.9), CASE, "logits")
    assert result.top1 == pytest.approx(0.75) and result.positions == 4
    assert result.passed and result.problem == ""  # top-1 is judged over the whole sweep, not per case
    report = ParityReport("ref", "cand", "float32", Tolerance(atol=10, rtol=0, min_cosine=0.0, min_top1=0.9), [result])
    assert report.top1() == pytest.approx(0.75) and not report
    assert "top-1 agreement 75.00% over the sweep (< 90%)" in report.summary()
    same = compare_outputs(REF, REF.copy(), STRICT, CASE, "logits")
    report.results = [result, same, same, same]  # 15 of 16 positions agree
    assert report.top1() == pytest.approx(15 / 16) and report
    report.tolerance = Tolerance(atol=10, rtol=0, min_cosine=0.0, min_top1=0.95)
    assert not report


def test_low_cosine_fails():
    cand = -REF  # anti-correlated
    result = compare_outputs(REF, cand, Tolerance(atol=100, rtol=0, min_cosine=0.5, min_top1=0.0), CASE, "logits")
    assert result.cosine == pytest.approx(-1.0, abs=1e-12)
    assert not result.passed and "cosine" in result.problem


def test_shape_mismatch_and_non_finite():
    result = compare_outputs(REF, REF[:, :1], STRICT, CASE, "logits")
    assert not result.passed and "shape" in result.problem and math.isinf(result.max_abs)
    cand = REF.copy()
    cand[0, 0, 0] = np.nan
    result = compare_outputs(REF, cand, STRICT, CASE, "logits")
    assert not result.passed and "non-finite" in result.problem
    cand[0, 0, 0] = np.inf
    assert not compare_outputs(REF, cand, STRICT, CASE, "logits").passed


def test_tolerance_table():
    """Each row's bars, pinned: loosening one (fp16 to bf16's, say) must be a visible change here."""
    bars = {name: row.tolerance for name, row in PRECISIONS.items()}
    assert bars == {"fp32": Tolerance(1e-4, 2e-5, 0.99999, 0.99), "fp16": Tolerance(5e-2, 5e-2, 0.999, 0.99),
                    "bf16": Tolerance(2e-1, 5e-2, 0.995, 0.97)}
    assert {name: scheme.tolerance for name, scheme in WEIGHT_SCHEMES.items()} == {
        "int8": Tolerance(0.0, 1.5e-1, 0.999, 0.95, min_forced_top1=0.99),
        "int4": Tolerance(0.0, 1.0, 0.95, 0.75, min_forced_top1=0.97)}
    assert [(t.forced_top1) for t in bars.values()] == [0.99, 0.99, 0.97]


def test_an_error_fp16_must_reject_bf16_accepts():
    """fp16's 10-bit mantissa earns it tighter bars than bf16's 7 bits: an error in max abs, or in
    cosine alone, that bf16 passes fails fp16 (and fp32)."""
    fp32, fp16, bf16 = (PRECISIONS[name].tolerance for name in ("fp32", "fp16", "bf16"))
    logits = np.linspace(-1.0, 1.0, 64).reshape(1, 2, 32)  # max |reference| 1: fp16 bar 0.1, bf16 0.25
    one_off = logits.copy()
    one_off[0, 0, 5] += 0.15
    assert compare_outputs(logits, one_off, bf16, CASE, "logits").passed
    for tolerance in (fp16, fp32):
        assert "max abs 1.500e-01 > " in compare_outputs(logits, one_off, tolerance, CASE, "logits").problem
    noisy = logits + 0.045 * np.where(np.arange(64).reshape(1, 2, 32) % 2, 1.0, -1.0)  # under every max abs bar of fp16
    cosine = expected_cosine(logits, noisy)
    assert 0.995 < cosine < 0.999
    assert compare_outputs(logits, noisy, bf16, CASE, "logits").passed
    assert compare_outputs(logits, noisy, fp16, CASE, "logits").problem == f"cosine {cosine:.7f} < 0.999"


def test_the_max_abs_bar_scales_with_the_logits():
    """A trained model's logits reach about 20: float32 rounding there is above the bare 1e-4
    (1.25e-4 measured, ONNX Runtime CUDA on the trained `small`), a real error is not."""
    fp32 = PRECISIONS["fp32"].tolerance
    logits = np.linspace(-19.9, 19.9, 64).reshape(1, 2, 32)
    rounded, wrong = logits.copy(), logits.copy()
    rounded[0, 0, 0] += 1.25e-4
    wrong[0, 0, 0] += 1e-2
    assert compare_outputs(logits, rounded, fp32, CASE, "logits").passed
    assert "max abs" in compare_outputs(logits, wrong, fp32, CASE, "logits").problem


def _report():
    report = ParityReport("torch-cpu", "onnxruntime-cpu", "float32", STRICT)
    good = compare_outputs(REF, REF + 0.01, STRICT, Case(1, 5), "logits")
    cand = REF.copy()
    cand[0, 0, 0] += 0.5
    bad = compare_outputs(REF, cand, STRICT, Case(3, 17, padded=True), "logits")
    report.results += [good, bad]
    return report, good, bad


def test_report_verdict_worst_and_dict():
    report, good, bad = _report()
    assert good.passed and not bad.passed
    assert bool(report) is False
    assert report.worst() is bad
    data = report.to_dict()
    json.dumps(data)  # serialisable
    assert data["passed"] is False
    assert data["reference"] == "torch-cpu" and data["candidate"] == "onnxruntime-cpu"
    assert data["tolerance"] == {"atol": 0.1, "rtol": 0.0, "min_cosine": 0.99, "min_top1": 0.9, "min_forced_top1": None}
    assert data["worst"]["case"] == "3x17 padded" and data["worst"]["max_abs"] == pytest.approx(0.5, abs=1e-6)
    assert len(data["cases"]) == 2
    assert data["cases"][0]["case"]["batch"] == 1 and data["cases"][0]["case"]["sequence"] == 5
    assert data["cases"][1]["case"]["padded"] is True and data["cases"][1]["passed"] is False
    report.results.remove(bad)
    assert bool(report) is True and report.to_dict()["passed"] is True


def test_report_table_and_summary():
    report, _, bad = _report()
    lines = report.table().splitlines()
    assert len(lines) == 3 and "max abs" in lines[0] and "cosine" in lines[0]
    assert lines[1].startswith("1x5") and lines[1].rstrip().endswith("ok")
    assert lines[2].startswith("3x17 padded") and "FAIL" in lines[2] and "5.000e-01" in lines[2]
    summary = report.summary()
    assert "FAILED" in summary and "3x17 padded" in summary


def test_empty_report_is_not_a_pass():
    report = ParityReport("a", "b", "float32", STRICT)
    assert bool(report) is False
    assert report.to_dict()["worst"] is None
    assert "no cases" in report.summary()


def test_default_cases_cover_the_edges():
    signature = graph_signature(ModelConfig(num_tokens=256, dim=64, depth=2, dim_head=16, heads=4, kv_heads=2))
    cases = default_cases(signature)
    sequences = {c.sequence for c in cases}
    assert 1 in sequences
    assert any(s % 2 == 1 and s > 1 for s in sequences)
    assert {c.batch for c in cases} >= {1, 3}
    padded = [c for c in cases if c.padded]
    assert len(padded) == 1 and padded[0].batch > 1 and padded[0].sequence >= 3
    assert len(set(cases)) == len(cases)
    # every sequence of the axis sweep at every batch
    assert {(c.batch, c.sequence) for c in cases if not c.padded} == {(b, s) for b in (1, 3) for s in sequences}


def test_default_cases_with_explicit_lists():
    signature = graph_signature(ModelConfig(num_tokens=10, dim=8, depth=1, dim_head=4, heads=2))
    cases = default_cases(signature, [2], [1, 9])
    assert [c for c in cases if not c.padded] == [Case(2, 1), Case(2, 9)]
    assert [c for c in cases if c.padded] == [Case(2, 9, padded=True)]
    assert not any(c.padded for c in default_cases(signature, [1], [1, 9]))  # padding needs two rows


class Stub(Backend):
    """Returns the reference model's logits, shifted or without outputs, to exercise check_parity."""

    def __init__(self, inner: Backend, shift: float = 0.0, drop: bool = False):
        self.inner, self.shift, self.drop = inner, shift, drop
        self.name, self.vocab_size = "stub", inner.vocab_size
        self.seen = []

    @property
    def inputs(self) -> list[TensorMeta]:
        return self.inner.inputs

    @property
    def outputs(self) -> list[TensorMeta]:
        return self.inner.outputs

    def _run_numpy(self, feeds):
        self.seen.append({k: v.copy() for k, v in feeds.items()})
        if self.drop:
            return {}
        return {k: v + self.shift for k, v in self.inner.run(feeds).items()}


def test_check_parity_with_stub_backends(tiny_model):
    from runtime.backends.torch_backend import TorchBackend

    cases = [Case(1, 1), Case(3, 10, padded=True)]
    reference = TorchBackend(tiny_model)
    same = Stub(reference)
    report = check_parity(reference, same, cases)
    assert bool(report) and len(report.results) == 2
    assert all(r.max_abs == 0.0 for r in report.results)
    padded_feeds = same.seen[1]
    assert padded_feeds["input_ids"].shape == (3, 10)
    assert padded_feeds["attention_mask"][0].all() and not padded_feeds["attention_mask"][1].all()

    shifted = check_parity(reference, Stub(reference, shift=1e-3), cases)
    assert not shifted and shifted.worst().max_abs == pytest.approx(1e-3, rel=1e-3)
    assert shifted.worst().case in cases and "max abs" in shifted.worst().problem
    # a looser tolerance accepts the same shift
    assert check_parity(reference, Stub(reference, shift=1e-3), cases,
                        tolerance=Tolerance(atol=2e-3, rtol=0, min_cosine=0.99, min_top1=0.99))

    missing = check_parity(reference, Stub(reference, drop=True), cases)
    assert not missing and all("missing" in r.problem for r in missing.results)


def test_parity_of_different_seeds_fails(tiny_config):
    from models.transformer import build_model

    with TorchBackend(build_model(tiny_config, 0)) as reference, TorchBackend(build_model(tiny_config, 1)) as other:
        report = check_parity(reference, other, [Case(1, 1), Case(2, 9), Case(2, 9, padded=True)])
    assert bool(report) is False
    worst = report.worst()
    assert not worst.passed and worst.case in {Case(1, 1), Case(2, 9), Case(2, 9, padded=True)}
    assert worst.max_abs > 1e-2 and "max abs" in worst.problem
    assert worst.case.label in report.summary() and "FAILED" in report.summary()


@pytest.mark.parametrize("past", [0, 1, 150])
def test_with_past_graph_matches_pytorch_at_past_lengths(tiny_past_onnx, tiny_model, past):
    from runtime.backends.onnxruntime_backend import OnnxRuntimeBackend

    with TorchBackend(tiny_model, with_past=True) as reference, OnnxRuntimeBackend(tiny_past_onnx) as candidate:
        report = check_parity(reference, candidate, [Case(1, 1, past=past), Case(3, 5, past=past),
                                                     Case(3, 4, padded=True, past=past)])
    assert report, report.summary()
    assert max(r.max_abs for r in report.results) < 1e-4
    assert {r.output for r in report.results} >= {"logits", "present.0.key", "present.1.value"}


def test_given_past_lengths_bound_every_decode_case(tiny_config):
    """check-parity --past keeps an engine's sweep inside its profile: no case past the longest given."""
    cases = default_cases(graph_signature(tiny_config, with_past=True), [1, 3], [1, 9], pasts=[1, 40])
    assert {case.past for case in cases} == {0, 1, 40}
    assert Case(3, 1, padded=True, past=40) in cases
