"""Post-export verification: ONNX Runtime (CPU) against PyTorch on shapes unlike the trace's."""
from __future__ import annotations

from pathlib import Path

from models.transformer import Transformer
from runtime.backends.onnxruntime_backend import OnnxRuntimeBackend
from runtime.backends.torch_backend import TorchBackend
from runtime.parity import Case, ParityReport, check_parity

from .onnx_export import ExportError


def verification_cases(example_sequence: int = 37) -> list[Case]:
    """Batch 1 and 3, sequence 1, an odd length and 4x the export example, plus left padding."""
    long = 4 * example_sequence
    return [Case(b, s) for b in (1, 3) for s in (1, 19, long)] + [Case(3, long, padded=True)]


def verify_export(path: Path, model: Transformer, precision: str, log=print) -> ParityReport:
    """Run the verification sweep; raise ExportError naming the worst case if it fails."""
    with TorchBackend(model) as reference, OnnxRuntimeBackend(path, provider="cpu") as candidate:
        report = check_parity(reference, candidate, verification_cases(), precision)
    log(report.summary())
    if not report:
        raise ExportError(f"verification failed: {report.summary()}")
    return report
