"""The checks `export-model` runs before it renames a graph into place: ONNX Runtime (CPU)
against PyTorch on shapes unlike the trace's."""
from __future__ import annotations

from pathlib import Path

from export.onnx_export import ExportError, example_sizes
from models.graph_metadata import GraphMetadata, read_graph_metadata
from models.transformer import Transformer

from ..backends.onnxruntime_backend import OnnxRuntimeBackend
from ..backends.torch_backend import TorchBackend
from ..decoding.static_cache import StaticCacheDecoder
from .decoding import check_decoder
from .reference import parity_reference
from .tensors import Case, ParityReport, check_parity


def verification_cases(example_sequence: int, with_past: bool = False) -> list[Case]:
    """Batch 1 and 3, sequence 1, an odd length and 4x the export example, plus left padding;
    with past, also past lengths 1 and long, for a decode step and a chunk."""
    long = 4 * example_sequence
    cases = [Case(b, s) for b in (1, 3) for s in (1, 19, long)] + [Case(3, long, padded=True)]
    if with_past:
        cases += [Case(b, s, past=p) for p in (1, long) for b, s in ((1, 1), (3, 1), (3, 7))]
        cases.append(Case(3, 1, padded=True, past=long))
    return cases


def _judged(report: ParityReport, log) -> ParityReport:
    log(report.summary())
    if not report:
        raise ExportError(f"verification failed: {report.summary()}")
    return report


def verify_export(path: Path, model: Transformer, log=print, with_past: bool = False) -> ParityReport | None:
    """Run the verification sweep on a portable graph against the reference its metadata names
    (for a quantized graph, the same weights fake-quantized); raise ExportError naming the worst
    case if it fails."""
    reference = parity_reference(model, read_graph_metadata(path))
    if reference.row.cpu_note:
        log(f"verify skipped: {reference.row.cpu_note}")
        return None
    with TorchBackend(reference.model, with_past=with_past) as torch_model, \
            OnnxRuntimeBackend(path, provider="cpu") as candidate:
        cases = verification_cases(example_sizes(model.config)["sequence"], with_past)
        return _judged(check_parity(torch_model, candidate, cases, reference.row.name), log)


def verify_static_export(data: bytes | Path, model: Transformer, max_cache: int, log=print) -> ParityReport | None:
    """A static-cache graph's decoder sweep on ONNX Runtime (CPU): ragged prompts and decode steps,
    against the reference its metadata names. `data`: the serialized graph, or its file. None when
    the CPU cannot run the graph's precision (bf16), as for verify_export."""
    import onnx

    proto = onnx.load_from_string(data) if isinstance(data, bytes) else onnx.load(str(data), load_external_data=False)
    reference = parity_reference(model, GraphMetadata.from_props({p.key: p.value for p in proto.metadata_props}))
    if reference.row.cpu_note:
        log(f"verify skipped: {reference.row.cpu_note}")
        return None
    lengths = [n for n in (1, 19, 4 * 19) if n + 8 <= max_cache]
    report = check_decoder(reference.model, lambda rows: StaticCacheDecoder(data, rows, "cpu"), [1, 3], lengths,
                           precision=reference.row.name)
    return _judged(report, log)
