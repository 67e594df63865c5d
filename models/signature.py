"""The one declaration of the exported graph's inputs, outputs and dynamic axes.

ONNX dynamic axes, TensorRT optimisation profiles, dummy inputs and parity sweeps are all
derived from `graph_signature(config)`, so they cannot drift apart.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from .config import ModelConfig


@dataclass(frozen=True)
class Axis:
    """A symbolic dimension with its optimisation range and the size used to trace the export."""

    name: str
    min: int
    opt: int
    max: int
    example: int  # an unusual size, so a value baked into the graph is easy to spot

    def with_range(self, low: int, opt: int, high: int) -> "Axis":
        return replace(self, min=low, opt=opt, max=high)

    def sweep(self) -> list[int]:
        """Sizes for parity checks: the minimum, an odd size, the optimum and a long one."""
        return sorted({self.min, min(17, self.max), self.opt, max(self.min, self.max // 2 + 1)})


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name
    dims: tuple[str | int, ...]  # axis names (symbolic) or fixed sizes


@dataclass(frozen=True)
class GraphSignature:
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    axes: dict[str, Axis]

    @property
    def input_names(self) -> list[str]:
        return [spec.name for spec in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [spec.name for spec in self.outputs]

    def input(self, name: str) -> TensorSpec:
        return next(spec for spec in self.inputs if spec.name == name)


BATCH = Axis("batch", min=1, opt=1, max=8, example=2)
SEQUENCE = Axis("sequence", min=1, opt=128, max=1024, example=37)


def graph_signature(config: ModelConfig, float_dtype: str = "float32") -> GraphSignature:
    """Inputs input_ids / attention_mask (batch, sequence) int64; output logits (batch, sequence, vocab)."""
    axes = {axis.name: axis for axis in (BATCH, SEQUENCE)}
    token_dims = ("batch", "sequence")
    return GraphSignature(
        inputs=(TensorSpec("input_ids", "int64", token_dims), TensorSpec("attention_mask", "int64", token_dims)),
        outputs=(TensorSpec("logits", float_dtype, ("batch", "sequence", config.num_tokens)),),
        axes=axes,
    )
