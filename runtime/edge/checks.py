"""Will a JetPack's TensorRT take this graph? Checked before anything is packed: an error refuses
the bundle, a warning (a limit that is not confirmed) is written into it."""
from __future__ import annotations

from dataclasses import dataclass, field

from onnx import defs

from export.lint import lint_graph
from models.graph_metadata import STATIC_CACHE, GraphMetadata
from models.precision import precision

from .targets import JetPack


@dataclass
class GraphCheck:
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"errors": list(self.errors), "warnings": list(self.warnings)}


def _newer_ops(proto, limit: int) -> dict[str, int]:
    """Standard ops whose definition at the graph's opset is newer than `limit`: op -> since opset."""
    opset = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    newer = {}
    for node in proto.graph.node:
        if node.domain in ("", "ai.onnx"):
            since = defs.get_schema(node.op_type, opset).since_version
            if since > limit:
                newer[node.op_type] = since
    return newer


def check_for_jetpack(proto, metadata: GraphMetadata, jetpack: JetPack) -> GraphCheck:
    """Graph kind, standard ops TensorRT parses (the export lint's checks, Q/DQ included), and op
    definitions no newer than the opset the JetPack's parser documents."""
    check = GraphCheck()
    if metadata.kind == STATIC_CACHE:
        check.errors.append("the static-cache graph runs on ONNX Runtime only (its com.microsoft ops do not parse "
                            "in TensorRT); package a portable graph instead: export-model --static-cache N --portable "
                            "(the same static cache in standard ops) or export-model --with-past")
        return check
    check.errors += lint_graph(proto, metadata.signature(), {}).findings
    newer = _newer_ops(proto, jetpack.max_opset)
    if newer:
        ops = ", ".join(f"{op}-{since}" for op, since in sorted(newer.items()))
        message = (f"{ops} {'is' if len(newer) == 1 else 'are'} newer than opset {jetpack.max_opset}, the last "
                   f"TensorRT {jetpack.tensorrt}'s ONNX parser documents")
        if jetpack.confirmed("max_opset"):
            check.errors.append(f"{message}; export at opset {jetpack.max_opset} or lower")
        else:
            check.warnings.append(f"{message} (unconfirmed: {jetpack.unconfirmed['max_opset']}); if the build "
                                  "fails to parse it, use --quantize int8 or an unquantized graph")
    if precision(metadata.precision).float_row.name == "fp32":
        check.warnings.append("the graph is float32: Orin's tensor cores run fp16 and bf16; export --dtype fp16")
    return check
