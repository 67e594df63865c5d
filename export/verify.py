"""Post-export verification: ONNX Runtime (CPU) against PyTorch on shapes unlike the trace's."""
from __future__ import annotations

from pathlib import Path

from models.transformer import Transformer
from runtime.backends.onnxruntime_backend import OnnxRuntimeBackend
from runtime.backends.torch_backend import TorchBackend
from runtime.parity import Case, ParityReport, check_parity

from .onnx_export import ExportError, example_sizes

# ONNX Runtime's CPU provider has no bfloat16 MatMul: such graphs are verified on the GPU.
CPU_UNVERIFIABLE = {"bfloat16": "ONNX Runtime's CPU provider cannot run bfloat16 MatMul; "
                                "verify on a GPU with check-parity --backend onnxruntime-cuda"}


def verification_cases(example_sequence: int, with_past: bool = False) -> list[Case]:
    """Batch 1 and 3, sequence 1, an odd length and 4x the export example, plus left padding;
    with past, also past lengths 1 and long, for a decode step and a chunk."""
    long = 4 * example_sequence
    cases = [Case(b, s) for b in (1, 3) for s in (1, 19, long)] + [Case(3, long, padded=True)]
    if with_past:
        cases += [Case(b, s, past=p) for p in (1, long) for b, s in ((1, 1), (3, 1), (3, 7))]
        cases.append(Case(3, 1, padded=True, past=long))
    return cases


def verify_export(path: Path, model: Transformer, precision: str, log=print, with_past: bool = False) -> ParityReport | None:
    """Run the verification sweep; raise ExportError naming the worst case if it fails."""
    if precision in CPU_UNVERIFIABLE:
        log(f"verify skipped: {CPU_UNVERIFIABLE[precision]}")
        return None
    with TorchBackend(model, with_past=with_past) as reference, OnnxRuntimeBackend(path, provider="cpu") as candidate:
        cases = verification_cases(example_sizes(model.config)["sequence"], with_past)
        report = check_parity(reference, candidate, cases, precision)
    log(report.summary())
    if not report:
        raise ExportError(f"verification failed: {report.summary()}")
    return report
