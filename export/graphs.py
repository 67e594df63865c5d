"""One entry point for every graph this toolkit writes: `export_graph(weights, output, kind, ...)`.

The kinds are those of `models.graph_metadata.GRAPH_KINDS`. Each row of GRAPHS says which
writer makes it (the traced exporter, or the op-by-op ONNX Runtime static-cache writer) and what
it needs; every kind goes through the same staging, progress, checks, `verify(path)` callback and
ExportResult, and every writer streams the weights one tensor at a time.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from models.graph_metadata import LOGITS, STATIC_CACHE, STATIC_PORTABLE, WITH_PAST
from models.transformer import Transformer
from models.weights import ModelWeights

from .onnx_export import ExportError, ExportResult, export_onnx


@dataclass(frozen=True)
class GraphKind:
    name: str  # GraphMetadata.kind
    report: str  # what export-model's --json calls it
    writer: str  # "traced" (torch.onnx) or "static-cache" (export/static_cache_graph.py)
    with_past: bool = False
    window: bool = False  # needs max_cache: a static cache of that many tokens per row
    fixed_opset: int | None = None  # the only opset the writer emits


GRAPHS = {kind.name: kind for kind in (
    GraphKind(LOGITS, "decoder", "traced"),
    GraphKind(WITH_PAST, "decoder-with-past", "traced", with_past=True),
    GraphKind(STATIC_CACHE, "onnxruntime-static-cache", "static-cache", window=True, fixed_opset=17),
    GraphKind(STATIC_PORTABLE, "static-cache-portable", "traced", window=True),
)}


def graph_kind(name: str) -> GraphKind:
    if name not in GRAPHS:
        raise ExportError(f"unknown graph kind {name!r}; one of {', '.join(GRAPHS)}")
    return GRAPHS[name]


def export_graph(weights: ModelWeights | Transformer, output: str | os.PathLike, kind: str, precision: str = "fp32",
                 max_cache: int | None = None, opset: int | None = None, record=None, allow_lint: bool = False,
                 verify=None, log=print) -> ExportResult:
    """Write a graph of `kind` from `weights` to `output` (atomically, with OUTPUT.data for large
    weights); `record` names the weights in its metadata, `max_cache` sizes a static cache,
    `verify(path)` runs on the staged file before it is moved into place."""
    spec = graph_kind(kind)
    if spec.window != (max_cache is not None):
        raise ExportError(f"a {spec.name} graph {'needs' if spec.window else 'takes no'} max_cache")
    if spec.fixed_opset is not None and opset not in (None, spec.fixed_opset):
        raise ExportError(f"the {spec.name} graph is written at opset {spec.fixed_opset}; drop --opset")
    if spec.writer == "static-cache":
        from .static_cache_graph import export_static_cache

        return export_static_cache(weights, output, max_cache, precision, record, verify=verify, log=log)
    return export_onnx(weights, output, opset=opset, precision=precision, weights=record, allow_lint=allow_lint,
                       verify=verify, log=log, with_past=spec.with_past, static_cache=max_cache)
