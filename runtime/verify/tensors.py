"""Tensor parity: run a reference and a candidate backend over a sweep of shapes and compare every
output. The report is shared with the decoder sweep (runtime/verify/decoding.py)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from models.precision import PRECISIONS, Tolerance, numpy_dtype, precision as lookup_precision
from models.signature import GraphSignature, resolve_sizes

from ..backends import Backend, TensorMeta


@dataclass(frozen=True)
class Case:
    batch: int
    sequence: int
    padded: bool = False  # left-pad every other row to exercise the attention mask
    past: int = 0  # cached tokens before the new ones (graphs with past only)

    @property
    def label(self) -> str:
        past = f"+past{self.past}" if self.past else ""
        return f"{self.batch}x{self.sequence}{past}{' padded' if self.padded else ''}"


@dataclass
class CaseResult:
    case: Case
    output: str
    max_abs: float
    max_rel: float  # max_abs / max|reference|
    cosine: float
    top1: float | None  # fraction of positions whose argmax agrees (logits only)
    passed: bool  # max abs and cosine within tolerance; top-1 is judged over the whole sweep
    problem: str = ""
    positions: int = 0  # logits positions behind top1


@dataclass
class ParityReport:
    reference: str
    candidate: str
    precision: str
    tolerance: Tolerance
    results: list[CaseResult] = field(default_factory=list)

    def top1(self) -> float | None:
        """Top-1 agreement over every logits position of the sweep (the thresholded figure: a
        single case has too few positions for a percentage to mean much)."""
        rows = [(r.top1, r.positions) for r in self.results if r.top1 is not None]
        total = sum(n for _, n in rows)
        return sum(t * n for t, n in rows) / total if total else None

    def top1_ok(self) -> bool:
        top1 = self.top1()
        return top1 is None or top1 >= self.tolerance.min_top1

    def __bool__(self) -> bool:
        return bool(self.results) and all(result.passed for result in self.results) and self.top1_ok()

    def worst(self) -> CaseResult:
        failed = [r for r in self.results if not r.passed]
        return max(failed or self.results, key=lambda r: (r.max_abs, -r.cosine))

    def to_dict(self) -> dict:
        return {
            "reference": self.reference, "candidate": self.candidate, "precision": self.precision,
            "tolerance": asdict(self.tolerance), "passed": bool(self), "top1": self.top1(),
            "worst": {"case": self.worst().case.label, "max_abs": self.worst().max_abs} if self.results else None,
            "cases": [{**asdict(r), "case": asdict(r.case)} for r in self.results],
        }

    def table(self) -> str:
        lines = [f"{'case':<22}{'output':<17}{'max abs':>11}{'max rel':>11}{'cosine':>11}{'top-1':>8}  result"]
        for r in self.results:
            lines.append(
                f"{r.case.label:<22}{r.output:<17}{r.max_abs:>11.3e}{r.max_rel:>11.3e}{r.cosine:>11.7f}"
                f"{'-' if r.top1 is None else format(r.top1, '.2%'):>8}  {'ok' if r.passed else 'FAIL ' + r.problem}"
            )
        return "\n".join(lines)

    def summary(self) -> str:
        if not self.results:
            return "parity: no cases were run"
        worst = self.worst()
        verdict = "passed" if self else "FAILED"
        top1 = self.top1()
        overall = "" if top1 is None else f"top-1 agreement {top1:.2%} over the sweep" + (
            "" if self.top1_ok() else f" (< {self.tolerance.min_top1:.0%})") + "; "
        return (
            f"parity {verdict}: {self.candidate} vs {self.reference} ({self.precision}), {len(self.results)} checks; "
            f"{overall}"
            f"worst {worst.case.label} {worst.output}: max abs {worst.max_abs:.3e}, cosine {worst.cosine:.7f}"
            + (f", top-1 {worst.top1:.2%}" if worst.top1 is not None else "")
            + (f" ({worst.problem})" if not worst.passed else "")
        )


def make_feeds(case: Case, inputs: list[TensorMeta], vocab_size: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random token ids, an attention mask (all ones, or left padding on odd rows) and, for
    graphs with past, random float32 caches, shaped after the backend's `inputs`."""
    rng = np.random.default_rng([seed, case.batch, case.sequence, case.padded, case.past])
    sizes = resolve_sizes({"batch": case.batch, "sequence": case.sequence, "past_sequence": case.past})
    feeds = {}
    for meta in inputs:
        shape = tuple(sizes[d] if isinstance(d, str) else d for d in meta.shape)
        if meta.name == "input_ids":
            feeds[meta.name] = rng.integers(0, vocab_size, size=shape, dtype=np.int64)
        elif meta.name == "attention_mask":
            mask = np.ones(shape, dtype=np.int64)
            if case.padded:
                mask[1::2, : shape[1] // 3] = 0
            feeds[meta.name] = mask
        else:
            feeds[meta.name] = rng.standard_normal(shape).astype(np.float32)
    if case.padded and case.past == 0:
        feeds["input_ids"][1::2, : case.sequence // 3] = 0
    return feeds


FLOAT_DTYPES = {row.dtype for row in PRECISIONS.values()}


def cast_feeds(feeds: dict[str, np.ndarray], inputs: list[TensorMeta]) -> dict[str, np.ndarray]:
    """Cast float feeds to each input's declared dtype (a float16 graph takes a float16 cache)."""
    dtypes = {meta.name: meta.dtype for meta in inputs}
    return {name: value.astype(numpy_dtype(dtypes[name])) if value.dtype.kind == "f" and dtypes.get(name) in FLOAT_DTYPES
            else value for name, value in feeds.items()}


def default_cases(signature: GraphSignature, batches: list[int] | None = None,
                  sequences: list[int] | None = None, pasts: list[int] | None = None) -> list[Case]:
    """The sweep: every batch x sequence (from the signature's axes unless given), plus a padded
    case; for graphs with past, also decode steps (sequence 1) and a 5-token chunk at past lengths
    1 and long (unless given), and a padded decode step at the longest."""
    batches = batches or sorted({1, 3} | {signature.axes["batch"].min})
    sequences = sequences or signature.axes["sequence"].sweep()
    cases = [Case(b, s) for b in batches for s in sequences]
    if max(batches) > 1 and max(sequences) >= 3:
        cases.append(Case(max(batches), max(s for s in sequences if s >= 3), padded=True))
    if signature.with_past:
        long_past = max(pasts) if pasts else signature.axes["past_sequence"].max // 2 + 1
        for past in pasts or [1, long_past]:
            cases += [Case(b, 1, past=past) for b in batches] + [Case(max(batches), 5, past=past)]
        cases.append(Case(max(batches), 1, padded=True, past=long_past))
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
    if norms:
        cosine = float((ref * cand).sum() / norms)
    else:  # both zero: identical; one zero: nothing in common
        cosine = 1.0 if not (ref.any() or cand.any()) else 0.0
    top1 = float((ref.argmax(-1) == cand.argmax(-1)).mean()) if output.startswith("logits") and ref.size else None
    problems = []
    if max_abs > tolerance.atol + tolerance.rtol * scale:
        problems.append(f"max abs {max_abs:.3e} > {tolerance.atol + tolerance.rtol * scale:.3e}")
    if cosine < tolerance.min_cosine:
        problems.append(f"cosine {cosine:.7f} < {tolerance.min_cosine}")
    positions = int(np.prod(ref.shape[:-1])) if top1 is not None else 0
    return CaseResult(case, output, max_abs, max_rel, cosine, top1, not problems, "; ".join(problems), positions)


def check_parity(reference: Backend, candidate: Backend, cases: list[Case], precision: str = "fp32",
                 tolerance: Tolerance | None = None, seed: int = 0, progress=None) -> ParityReport:
    """Run both backends on every case; compare every output the reference produces."""
    row = lookup_precision(precision)
    report = ParityReport(reference.name, candidate.name, row.dtype, tolerance or row.tolerance)
    vocab = reference.vocab_size or candidate.vocab_size or 2
    for case in cases:
        if progress:
            progress(case)
        feeds = make_feeds(case, reference.inputs, vocab, seed)
        expected = reference.run(cast_feeds(feeds, reference.inputs))
        actual = candidate.run(cast_feeds(feeds, candidate.inputs))
        for name, value in expected.items():
            if name not in actual:
                report.results.append(CaseResult(case, name, float("inf"), float("inf"), 0.0, 0.0, False,
                                                 "output missing from candidate"))
                continue
            report.results.append(compare_outputs(value, actual[name], report.tolerance, case, name))
    return report
