"""The one declaration of the exported graphs' inputs, outputs and dynamic axes.

ONNX dynamic axes, TensorRT optimisation profiles, dummy inputs, feed checks and parity
sweeps are all derived from `graph_signature(config)` (the portable graphs) and
`static_cache_signature(config, max_cache)` (the ONNX Runtime fast path), so they cannot
drift apart. The names of the key/value cache tensors are spelled here and nowhere else.
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

    @property
    def with_past(self) -> bool:
        return any(is_cache_input(name) for name in self.input_names)

    @property
    def cache_inputs(self) -> list[str]:
        return [name for name in self.input_names if is_cache_input(name)]


BATCH = Axis("batch", min=1, opt=1, max=8, example=2)
SEQUENCE = Axis("sequence", min=1, opt=128, max=1024, example=37)
PAST = Axis("past_sequence", min=0, opt=128, max=1024, example=5)
LOGITS_POSITIONS = Axis("logits_positions", min=1, opt=1, max=1024, example=3)  # static graphs: positions given logits
# An axis whose size is the sum of others: the attention mask covers cached and new tokens.
SUM_AXES = {"total_sequence": ("past_sequence", "sequence")}


CACHE_INPUT_PREFIX = "past_key_values."
CACHE_OUTPUT_PREFIX = "present."


def past_names(depth: int) -> list[str]:
    return [name for i in range(depth) for name in layer_cache_names(i)[:2]]


def present_names(depth: int) -> list[str]:
    return [name for i in range(depth) for name in layer_cache_names(i)[2:]]


def layer_cache_names(layer: int) -> tuple[str, str, str, str]:
    """(past key, past value, present key, present value) of one layer."""
    return (f"{CACHE_INPUT_PREFIX}{layer}.key", f"{CACHE_INPUT_PREFIX}{layer}.value",
            f"{CACHE_OUTPUT_PREFIX}{layer}.key", f"{CACHE_OUTPUT_PREFIX}{layer}.value")


def is_cache_input(name: str) -> bool:
    return name.startswith(CACHE_INPUT_PREFIX)


def present_name(past_name: str) -> str:
    """The output that carries `past_name`'s cache forward: past_key_values.3.key -> present.3.key."""
    return CACHE_OUTPUT_PREFIX + past_name.removeprefix(CACHE_INPUT_PREFIX)


def next_cache_feeds(outputs: dict, cache_inputs: list[str]) -> dict:
    """The cache feeds of the next step: each present.* output fed back as its past_key_values.* input."""
    return {name: outputs[present_name(name)] for name in cache_inputs}


def graph_signature(config: ModelConfig, with_past: bool = False, cache_dtype: str = "float32") -> GraphSignature:
    """The plain graph: input_ids / attention_mask (batch, sequence) -> logits (batch, sequence, vocab).

    With past: attention_mask covers (batch, past_sequence + sequence), each layer's cache
    comes in as past_key_values.{i}.key/value (batch, kv_heads, past_sequence, dim_head) and
    goes out, extended by the new tokens, as present.{i}.key/value, in `cache_dtype` (the
    graph's precision). Logits are always float32.
    """
    logits = TensorSpec("logits", "float32", ("batch", "sequence", config.num_tokens))
    ids = TensorSpec("input_ids", "int64", ("batch", "sequence"))
    if not with_past:
        return GraphSignature(
            inputs=(ids, TensorSpec("attention_mask", "int64", ("batch", "sequence"))),
            outputs=(logits,), axes={axis.name: axis for axis in (BATCH, SEQUENCE)},
        )
    cache_in = ("batch", config.kv_heads, "past_sequence", config.dim_head)
    cache_out = ("batch", config.kv_heads, "total_sequence", config.dim_head)
    return GraphSignature(
        inputs=(ids, TensorSpec("attention_mask", "int64", ("batch", "total_sequence")),
                *(TensorSpec(name, cache_dtype, cache_in) for name in past_names(config.depth))),
        outputs=(logits, *(TensorSpec(name, cache_dtype, cache_out) for name in present_names(config.depth))),
        axes={axis.name: axis for axis in (BATCH, SEQUENCE, PAST)},
    )


def resolve_sizes(sizes: dict[str, int]) -> dict[str, int]:
    """Add the derived axes (total_sequence = past_sequence + sequence) to known axis sizes."""
    sizes = dict(sizes)
    for name, parts in SUM_AXES.items():
        if all(part in sizes for part in parts):
            sizes[name] = sum(sizes[part] for part in parts)
    return sizes


def static_cache_signature(config: ModelConfig, max_cache: int, cache_dtype: str = "float16",
                           portable: bool = False) -> GraphSignature:
    """The static-cache graphs: a fixed (batch, kv_heads, max_cache, dim_head) cache per layer that
    past_key_values.* and present.* share, and logits only at the positions `logits_index`
    (batch, logits_positions) picks (every position for parity, the last for generation).

    ONNX Runtime's GroupQueryAttention graph takes seqlens_k int32 (batch) = tokens in the cache
    after the call minus 1, and total_sequence_length int32 scalar; the portable graph (standard
    ops) takes positions int64 (batch) = the position of each row's first new token."""
    cache = ("batch", config.kv_heads, max_cache, config.dim_head)
    if portable:
        lengths = (TensorSpec("positions", "int64", ("batch",)),)
    else:
        lengths = (TensorSpec("seqlens_k", "int32", ("batch",)), TensorSpec("total_sequence_length", "int32", ()))
    return GraphSignature(
        inputs=(TensorSpec("input_ids", "int64", ("batch", "sequence")), *lengths,
                TensorSpec("logits_index", "int64", ("batch", "logits_positions")),
                *(TensorSpec(name, cache_dtype, cache) for name in past_names(config.depth))),
        outputs=(TensorSpec("logits", "float32", ("batch", "logits_positions", config.num_tokens)),
                 *(TensorSpec(name, cache_dtype, cache) for name in present_names(config.depth))),
        axes={axis.name: axis for axis in (BATCH, SEQUENCE, LOGITS_POSITIONS)},
    )
