"""Parity: run a reference and a candidate backend over a sweep of shapes and compare outputs."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from models.signature import GraphSignature

from .backends import Backend


@dataclass(frozen=True)
class Tolerance:
    """A case passes when max_abs <= atol + rtol * max|reference|, cosine >= min_cosine
    and top-1 agreement >= min_top1."""

    atol: float
    rtol: float
    min_cosine: float
    min_top1: float


# Keyed by the candidate's precision. fp32 is strict; the half-precision rows allow for
# 10-bit (fp16) or 7-bit (bf16) mantissas through every layer.
TOLERANCES: dict[str, Tolerance] = {
    "float32": Tolerance(atol=1e-4, rtol=0.0, min_cosine=0.99999, min_top1=0.99),
    "float16": Tolerance(atol=5e-2, rtol=1e-2, min_cosine=0.999, min_top1=0.99),
    "bfloat16": Tolerance(atol=2e-1, rtol=5e-2, min_cosine=0.995, min_top1=0.97),
}


@dataclass(frozen=True)
class Case:
    batch: int
    sequence: int
    padded: bool = False  # left-pad every other row to exercise the attention mask

    @property
    def label(self) -> str:
        return f"{self.batch}x{self.sequence}{' padded' if self.padded else ''}"


@dataclass
class CaseResult:
    case: Case
    output: str
    max_abs: float
    max_rel: float  # max_abs / max|reference|
    cosine: float
    top1: float  # fraction of positions whose argmax agrees
    passed: bool
    problem: str = ""


@dataclass
class ParityReport:
    reference: str
    candidate: str
    precision: str
    tolerance: Tolerance
    results: list[CaseResult] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.results) and all(result.passed for result in self.results)

    def worst(self) -> CaseResult:
        failed = [r for r in self.results if not r.passed]
        return max(failed or self.results, key=lambda r: (r.max_abs, -r.cosine))

    def to_dict(self) -> dict:
        return {
            "reference": self.reference, "candidate": self.candidate, "precision": self.precision,
            "tolerance": asdict(self.tolerance), "passed": bool(self),
            "worst": {"case": self.worst().case.label, "max_abs": self.worst().max_abs} if self.results else None,
            "cases": [{**asdict(r), "case": asdict(r.case)} for r in self.results],
        }

    def table(self) -> str:
        lines = [f"{'case':<16}{'output':<10}{'max abs':>11}{'max rel':>11}{'cosine':>11}{'top-1':>8}  result"]
        for r in self.results:
            lines.append(
                f"{r.case.label:<16}{r.output:<10}{r.max_abs:>11.3e}{r.max_rel:>11.3e}{r.cosine:>11.7f}"
                f"{r.top1:>8.2%}  {'ok' if r.passed else 'FAIL ' + r.problem}"
            )
        return "\n".join(lines)

    def summary(self) -> str:
        if not self.results:
            return "parity: no cases were run"
        worst = self.worst()
        verdict = "passed" if self else "FAILED"
        return (
            f"parity {verdict}: {self.candidate} vs {self.reference} ({self.precision}), {len(self.results)} checks; "
            f"worst {worst.case.label} {worst.output}: max abs {worst.max_abs:.3e}, cosine {worst.cosine:.7f}, "
            f"top-1 {worst.top1:.2%}" + (f" ({worst.problem})" if not worst.passed else "")
        )


def make_feeds(case: Case, vocab_size: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random token ids and an attention mask (all ones, or left padding on odd rows)."""
    rng = np.random.default_rng([seed, case.batch, case.sequence, case.padded])
    ids = rng.integers(0, vocab_size, size=(case.batch, case.sequence), dtype=np.int64)
    mask = np.ones_like(ids)
    if case.padded:
        pad = case.sequence // 3
        mask[1::2, :pad] = 0
        ids[1::2, :pad] = 0
    return {"input_ids": ids, "attention_mask": mask}


def default_cases(signature: GraphSignature, batches: list[int] | None = None,
                  sequences: list[int] | None = None) -> list[Case]:
    """The sweep: every batch x sequence (from the signature's axes unless given), plus a padded case."""
    batches = batches or sorted({1, 3} | {signature.axes["batch"].min})
    sequences = sequences or signature.axes["sequence"].sweep()
    cases = [Case(b, s) for b in batches for s in sequences]
    if max(batches) > 1 and max(sequences) >= 3:
        cases.append(Case(max(batches), max(s for s in sequences if s >= 3), padded=True))
    return cases


def compare_outputs(reference: np.ndarray, candidate: np.ndarray, tolerance: Tolerance,
                    case: Case, output: str) -> CaseResult:
    ref, cand = reference.astype(np.float64), candidate.astype(np.float64)
    if ref.shape != cand.shape:
        return CaseResult(case, output, float("inf"), float("inf"), 0.0, 0.0, False,
                          f"shape {cand.shape} != reference {ref.shape}")
    if not np.isfinite(cand).all():
        return CaseResult(case, output, float("inf"), float("inf"), 0.0, 0.0, False, "non-finite values")
    diff = np.abs(ref - cand)
    max_abs = float(diff.max()) if diff.size else 0.0
    scale = float(np.abs(ref).max()) if ref.size else 0.0
    max_rel = max_abs / scale if scale else 0.0
    norms = np.linalg.norm(ref) * np.linalg.norm(cand)
    cosine = float((ref * cand).sum() / norms) if norms else 1.0
    top1 = float((ref.argmax(-1) == cand.argmax(-1)).mean()) if ref.ndim >= 2 and ref.size else 1.0
    problems = []
    if max_abs > tolerance.atol + tolerance.rtol * scale:
        problems.append(f"max abs {max_abs:.3e} > {tolerance.atol + tolerance.rtol * scale:.3e}")
    if cosine < tolerance.min_cosine:
        problems.append(f"cosine {cosine:.7f} < {tolerance.min_cosine}")
    if top1 < tolerance.min_top1:
        problems.append(f"top-1 {top1:.2%} < {tolerance.min_top1:.0%}")
    return CaseResult(case, output, max_abs, max_rel, cosine, top1, not problems, "; ".join(problems))


def check_parity(reference: Backend, candidate: Backend, cases: list[Case], precision: str = "float32",
                 tolerance: Tolerance | None = None, seed: int = 0, progress=None) -> ParityReport:
    """Run both backends on every case; compare every output the reference produces."""
    tolerance = tolerance or TOLERANCES[precision]
    report = ParityReport(reference.name, candidate.name, precision, tolerance)
    vocab = reference.vocab_size or candidate.vocab_size or 2
    for case in cases:
        if progress:
            progress(case)
        feeds = make_feeds(case, vocab, seed)
        expected, actual = reference.run(feeds), candidate.run(feeds)
        for name, value in expected.items():
            if name not in actual:
                report.results.append(CaseResult(case, name, float("inf"), float("inf"), 0.0, 0.0, False,
                                                 "output missing from candidate"))
                continue
            report.results.append(compare_outputs(value, actual[name], tolerance, case, name))
    return report
