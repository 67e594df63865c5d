"""How much of an export can be verified in this machine's memory, decided before the export.

Verification holds the float32 PyTorch model, its reference copy in the graph's dtype (fake-
quantized for a quantized graph) and ONNX Runtime's session of the graph (which on the CPU
computes half-precision graphs through float32 copies) at once: about 10-16 bytes per parameter.
When the whole model does not fit, the export is verified on a depth-truncated copy of the same
weights (the embedding, the first blocks, the final norm and the head), exported through the same
code; the report says which. When not even that fits, the export is refused before it starts.
"""
from __future__ import annotations

from dataclasses import dataclass

from models.precision import Precision
from models.weights import ModelWeights

from ..resources import HEADROOM, ResourceError, _gib, available_bytes

TRUNCATED_LAYERS = 2
WORKSPACE_BYTES = 1 << 30  # activations of the sweep's largest case, ONNX Runtime's arenas


def verification_bytes(parameters: int, row: Precision) -> float:
    """Memory a verification of a model of `parameters` weights holds at once."""
    graph = row.float_row.torch_dtype.itemsize
    per_parameter = 4 + graph + graph + (4 if row.half else 0) + (4 if row.scheme else 0)
    return float(parameters * per_parameter + WORKSPACE_BYTES)


@dataclass(frozen=True)
class VerificationPlan:
    layers: int  # blocks the verified graph has
    depth: int  # blocks the exported model has
    needed: float  # bytes the whole model's verification would hold
    have: float

    @property
    def full(self) -> bool:
        return self.layers == self.depth

    def describe(self) -> str:
        if self.full:
            return "the whole model"
        return (f"a depth-truncated copy of the same weights ({self.layers} of {self.depth} layers), as verifying "
                f"the whole model needs about {_gib(self.needed)} and host memory has {_gib(self.have)} free")

    def to_dict(self) -> dict:
        return {"mode": "full" if self.full else "depth-truncated", "layers": self.layers, "depth": self.depth,
                "needed_bytes": int(self.needed), "available_bytes": int(self.have)}


def plan_verification(weights: ModelWeights, row: Precision, have: float | None = None) -> VerificationPlan:
    """Verify the whole model if it fits, else a depth-truncated copy; ResourceError if neither fits."""
    depth = weights.config.depth
    have = available_bytes("cpu") * HEADROOM if have is None else have
    needed = verification_bytes(weights.parameter_count(), row)
    if needed <= have:
        return VerificationPlan(depth, depth, needed, have)
    layers = min(TRUNCATED_LAYERS, depth)
    truncated = verification_bytes(weights.truncated(layers).parameter_count(), row)
    if truncated > have:
        raise ResourceError(f"cannot verify this export: even a {layers}-layer copy of the model needs about "
                            f"{_gib(truncated)} and host memory has {_gib(have)} free; pass --no-verify and check the "
                            "graph with check-parity on a larger machine")
    return VerificationPlan(layers, depth, needed, have)
