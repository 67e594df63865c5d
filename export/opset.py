"""Opset handling. The torch.onnx (dynamo) exporter writes opset 18 or newer; opset 17 is
reached by relabelling a graph whose every op is defined identically at 17 and 18.

onnx.version_converter has no 18 -> 17 adapter for Split and fails on ReduceMean's axes
input, so instead the model is written with ops that did not change at opset 18, and this
module proves that op by op before relabelling.
"""
from __future__ import annotations

import onnx
from onnx import defs

from models.errors import ToolkitError

MIN_OPSET = 17
EXPORTER_MIN_OPSET = 18  # the lowest opset the dynamo exporter translates to directly
MAX_OPSET = 23


class OpsetError(ToolkitError):
    """The requested opset cannot express the graph."""


def check_requested_opset(opset: int) -> None:
    if not MIN_OPSET <= opset <= min(MAX_OPSET, defs.onnx_opset_version()):
        raise OpsetError(
            f"opset {opset} is not supported: this graph can be exported at opsets "
            f"{MIN_OPSET} to {min(MAX_OPSET, defs.onnx_opset_version())} (default {MIN_OPSET})"
        )


def _since(op_type: str, opset: int) -> int | None:
    try:
        return defs.get_schema(op_type, opset).since_version
    except defs.SchemaError:
        return None


def _reduction(node: onnx.NodeProto) -> str:
    return next((a.s.decode() for a in node.attribute if a.name == "reduction"), "none")


# Ops whose newer versions only added options: at the older opset they mean the same as long as the
# node does not use what was added (ScatterND 18 added reduction "min" and "max" to 16's).
SAME_WHEN = {"ScatterND": (16, lambda node: _reduction(node) in ("none", "add", "mul"))}


def _means_the_same(node: onnx.NodeProto, target: int, current: int) -> bool:
    if _since(node.op_type, target) == _since(node.op_type, current):
        return True
    rule = SAME_WHEN.get(node.op_type)
    return rule is not None and target >= rule[0] and rule[1](node)


def lower_opset(model: onnx.ModelProto, target: int) -> onnx.ModelProto:
    """Relabel `model` to the default-domain opset `target` if every op means the same there."""
    current = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    if current == target:
        return model
    changed = sorted({
        node.op_type for node in model.graph.node
        if node.domain in ("", "ai.onnx") and not _means_the_same(node, target, current)
    })
    if changed:
        raise OpsetError(
            f"cannot express the graph at opset {target}: ops {changed} differ from opset {current}; "
            f"export at opset {current} or newer"
        )
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            entry.version = target
    return model
