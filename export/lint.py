"""Export lint: catch graph features that break TensorRT or freeze a dynamic dimension, and
weight quantization TensorRT cannot take."""
from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field

import onnx
from onnx import numpy_helper

from models.signature import GraphSignature

CONTROL_FLOW = {"If", "Loop", "Scan"}
QDQ = {"QuantizeLinear", "DequantizeLinear"}
# the input positions that hold axes or steps, not sizes
AXES_INPUTS = {"Slice": (3, 4), "Unsqueeze": (1,), "Squeeze": (1,), "ReduceSum": (1,), "ReduceMean": (1,),
               "ReduceMax": (1,), "ReduceMin": (1,), "ReduceProd": (1,)}


@dataclass
class LintReport:
    op_counts: Counter
    findings: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:  # True when clean
        return not self.findings

    def format(self) -> str:
        total = sum(self.op_counts.values())
        ops = ", ".join(f"{op} {n}" for op, n in self.op_counts.most_common())
        lines = [f"lint: {total} nodes, {len(self.op_counts)} op types: {ops}"]
        lines += [f"lint finding: {finding}" for finding in self.findings] or ["lint: no findings"]
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"ops": dict(self.op_counts.most_common()), "findings": list(self.findings)}


def _constants(graph: onnx.GraphProto):
    for tensor in graph.initializer:
        yield tensor.name, tensor
    for node in graph.node:
        if node.op_type == "Constant":
            for attribute in node.attribute:
                if attribute.name == "value":
                    yield node.output[0], attribute.t


def dequantize_findings(graph: onnx.GraphProto) -> list[str]:
    """Weight-only Q/DQ as TensorRT takes it: a constant weight, positive scales, zero points of
    zero, dequantized straight into a MatMul's weight input (the pattern it fuses)."""
    constants = dict(_constants(graph))
    users = defaultdict(list)
    for node in graph.node:
        for index, name in enumerate(node.input):
            users[name].append((node, index))
    findings = []
    for node in (n for n in graph.node if n.op_type in QDQ):
        scale = constants.get(node.input[1])
        if scale is None or (numpy_helper.to_array(scale) <= 0).any():
            findings.append(f"{node.op_type} {node.name!r} needs constant, positive scales (TensorRT refuses others)")
        zero_point = node.input[2] if len(node.input) > 2 else ""
        if zero_point and (zero_point not in constants or numpy_helper.to_array(constants[zero_point]).any()):
            findings.append(f"{node.op_type} {node.name!r} has a non-zero zero point; TensorRT quantizes symmetrically")
        if node.op_type != "DequantizeLinear":
            continue
        if node.input[0] not in constants:
            findings.append(f"DequantizeLinear {node.name!r} dequantizes {node.input[0]!r}, which is not a weight "
                            "initializer; only weights are quantized here")
        odd = [f"{user.op_type} {user.name!r}" for user, index in users[node.output[0]]
               if user.op_type != "MatMul" or index != 1]
        if odd:
            findings.append(f"DequantizeLinear {node.name!r} feeds {odd[0]}; weight-only dequantization must feed a "
                            "MatMul's weight input directly for TensorRT to fuse it")
    return findings


def lint_graph(model: onnx.ModelProto, signature: GraphSignature, example_sizes: dict[str, int]) -> LintReport:
    """Op histogram plus findings: control flow, sequence ops, non-standard domains,
    I/O axes that are not symbolic, constants sized by the export example, and weight
    quantization TensorRT cannot take.

    `example_sizes` maps axis name to the size used when tracing; they should be sizes no
    config dimension equals, so a constant carrying one is a dimension frozen by tracing.
    Quantization scales are shaped by the weights (blocks, columns), not by tracing.
    """
    graph = model.graph
    report = LintReport(Counter(node.op_type for node in graph.node))
    for node in graph.node:
        if node.op_type in CONTROL_FLOW:
            report.findings.append(f"node {node.name!r} is control flow ({node.op_type}); TensorRT rejects or serialises it")
        elif node.op_type.startswith("Sequence") or node.op_type in ("SplitToSequence", "ConcatFromSequence"):
            report.findings.append(f"node {node.name!r} produces or consumes a sequence ({node.op_type}); use Expand/Reshape")
        if node.domain not in ("", "ai.onnx"):
            report.findings.append(f"node {node.name!r} uses op {node.domain}::{node.op_type}, which only some runtimes implement")
    declared = {spec.name: spec for spec in signature.inputs + signature.outputs}
    for value in list(graph.input) + list(graph.output):
        spec = declared.get(value.name)
        if spec is None:
            continue
        dims = value.type.tensor_type.shape.dim
        for axis, (dim, want) in enumerate(zip(dims, spec.dims)):
            if isinstance(want, str) and not dim.dim_param:
                report.findings.append(
                    f"{value.name} dimension {axis} should be the symbolic axis {want!r} but is fixed at {dim.dim_value}"
                )
    report.findings += dequantize_findings(graph)
    frozen = {size: name for name, size in example_sizes.items()}
    scales = {name for node in graph.node if node.op_type in QDQ for name in node.input[1:]}
    # integers a node reads as axes or steps (Slice's axes [3], Unsqueeze's axes [1]) are no sizes
    uses = [(name, position in AXES_INPUTS.get(node.op_type, ())) for node in graph.node
            for position, name in enumerate(node.input)]
    axes_only = {name for name, axes in uses if axes} - {name for name, axes in uses if not axes}
    for name, tensor in _constants(graph):
        if name in scales:
            continue
        if tensor.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16):
            hits = [d for d in tensor.dims if d in frozen]
            if hits:
                report.findings.append(
                    f"constant {name!r} of shape {tuple(tensor.dims)} is sized to the traced {frozen[hits[0]]} size {hits[0]} "
                    "(a rotary table or mask folded at export?)"
                )
        elif tensor.data_type in (onnx.TensorProto.INT64, onnx.TensorProto.INT32) and len(tensor.dims) <= 1 \
                and name not in axes_only:
            values = numpy_helper.to_array(tensor).reshape(-1)
            if values.size <= 8:
                hits = sorted({frozen[int(v)] for v in values if int(v) in frozen})
                if hits:
                    report.findings.append(
                        f"shape constant {name!r} = {values.tolist()} holds the traced {hits[0]} size; that dimension was frozen"
                    )
    return report
