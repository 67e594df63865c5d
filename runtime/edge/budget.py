"""Memory budget of building and running an engine on a board whose CPU and GPU share memory,
and the largest profile and workspace that fit it (`FORMULA` says how each line is counted)."""
from __future__ import annotations

from dataclasses import dataclass, replace

from models.config import ModelConfig
from models.precision import Precision

from .targets import EdgeError

FORMULA = """Every line is in bytes, at the largest profile (batch B, sequence S, past P):

    weights        the graph's initializers (quantization scales included)
    weights copy   a second copy while the builder holds the parsed network and the serialized
                   engine, and while an engine file is deserialised (= weights)
    cache outputs  2 * depth * B * kv_heads * (S + P) * dim_head * bytes   (present.*)
    cache inputs   2 * depth * B * kv_heads * P * dim_head * bytes         (past_key_values.*)
    logits         B * S * num_tokens * 4                                   (float32 output)
    activations    B * S * (4 dim + dim_inner + 2 dim_kv_inner + ff_hidden) * bytes
                   + 2 * B * heads * S * (S + P) * 4   (one layer's live tensors, attention
                   scores and probabilities in float32, unless TensorRT fuses attention)
    workspace      the builder's workspace pool (--workspace, trtexec --memPoolSize=workspace)
    runtime        CUDA context, TensorRT and cuBLAS/cuDNN libraries (RUNTIME_GIB, an assumption)

`bytes` is the graph's activation precision. The total must fit the board's usable memory.
"""

GIB = 2**30
MIB = 2**20
RUNTIME_GIB = 0.75  # assumption: measure with tegrastats while an engine runs
DEFAULT_WORKSPACE_MIB = 1024
MIN_WORKSPACE_MIB = 128  # below this TensorRT runs out of tactics for the larger matrix products


@dataclass(frozen=True)
class Axes:
    """The largest profile's sizes (and the min/opt kept beside them)."""

    batch: tuple[int, int, int]
    sequence: tuple[int, int, int]
    past: tuple[int, int, int] | None  # None: a graph without a cache

    def spec(self, which: str) -> str | None:
        value = getattr(self, which)
        return None if value is None else ":".join(map(str, value))

    def describe(self) -> str:
        past = f", past {self.past[2]}" if self.past else ""
        return f"batch {self.batch[2]}, sequence {self.sequence[2]}{past}"


@dataclass(frozen=True)
class MemoryBudget:
    lines: dict[str, int]  # name -> bytes, in the order above
    usable: int
    axes: Axes
    workspace_mib: int
    adjusted: tuple[str, ...] = ()  # what was shrunk to fit, e.g. "workspace 1024 -> 256 MiB"

    @property
    def total(self) -> int:
        return sum(self.lines.values())

    @property
    def fits(self) -> bool:
        return self.total <= self.usable

    def describe(self) -> str:
        parts = ", ".join(f"{name} {value / GIB:.2f}" for name, value in self.lines.items())
        return f"{self.total / GIB:.2f} GiB ({parts})"

    def to_dict(self) -> dict:
        return {"bytes": dict(self.lines), "total_bytes": self.total, "usable_bytes": self.usable,
                "total_gib": round(self.total / GIB, 3), "usable_gib": round(self.usable / GIB, 3),
                "fits": self.fits, "largest_profile": self.axes.describe(), "workspace_mib": self.workspace_mib,
                "adjusted_to_fit": list(self.adjusted), "runtime_gib_assumed": RUNTIME_GIB}


def memory_budget(config: ModelConfig, row: Precision, weight_bytes: int, axes: Axes, workspace_mib: int,
                  usable_gib: float) -> MemoryBudget:
    """The lines above for `config` in `row` at the largest profile of `axes`."""
    c, width = config, row.bytes_per_value
    batch, seq, past = axes.batch[2], axes.sequence[2], axes.past[2] if axes.past else 0
    cache_layer = 2 * c.depth * batch * c.kv_heads * c.dim_head * width  # bytes per cached token
    live = 4 * c.dim + c.dim_inner + 2 * c.dim_kv_inner + c.ff_hidden
    lines = {
        "weights": weight_bytes,
        "weights copy": weight_bytes,
        "cache outputs": cache_layer * (seq + past) if axes.past else 0,
        "cache inputs": cache_layer * past,
        "logits": batch * seq * c.num_tokens * 4,
        "activations": batch * seq * live * width + 2 * batch * c.heads * seq * (seq + past) * 4,
        "workspace": workspace_mib * MIB,
        "runtime": int(RUNTIME_GIB * GIB),
    }
    return MemoryBudget(lines, int(usable_gib * GIB), axes, workspace_mib)


def _halved(span: tuple[int, int, int], floor: int) -> tuple[int, int, int] | None:
    """The range with its maximum halved (not below its minimum or `floor`), or None if it cannot shrink."""
    low, opt, high = span
    smaller = max(high // 2, floor, low)
    return None if smaller >= high else (low, min(opt, smaller), smaller)


def _shrunk(axes: Axes, fixed: set[str]) -> Axes | None:
    """A smaller largest profile: batch first, then the past, then the sequence (those not in `fixed`)."""
    for name in ("batch", "past", "sequence"):
        span = getattr(axes, name)
        smaller = _halved(span, 1) if span and name not in fixed else None
        if smaller:
            return replace(axes, **{name: smaller})
    return None


def fit_budget(config: ModelConfig, row: Precision, weight_bytes: int, axes: Axes, usable_gib: float,
               workspace_mib: int | None = None, fixed: frozenset[str] = frozenset(),
               where: str = "the board") -> MemoryBudget:
    """The budget at the largest profile and workspace that fit: a workspace not given shrinks first
    (down to MIN_WORKSPACE_MIB), then the axes not in `fixed` (batch, past, sequence maxima halved);
    what still does not fit is refused with its numbers."""
    workspace = workspace_mib or DEFAULT_WORKSPACE_MIB
    budget = first = memory_budget(config, row, weight_bytes, axes, workspace, usable_gib)
    while not budget.fits:
        if workspace_mib is None and workspace > MIN_WORKSPACE_MIB:
            workspace //= 2
        elif (smaller := _shrunk(axes, fixed)) is not None:
            axes = smaller
        else:
            break
        budget = memory_budget(config, row, weight_bytes, axes, workspace, usable_gib)
    if not budget.fits:
        raise EdgeError(f"the model does not fit {where}: at {axes.describe()} it needs {budget.describe()} but "
                        f"{budget.usable / GIB:.2f} GiB is usable; lower --batch/--seq/--past, quantize the weights "
                        "(export-model --quantize int4) or choose a larger board")
    return replace(budget, adjusted=_adjustments(first, budget))


def _adjustments(first: MemoryBudget, final: MemoryBudget) -> tuple[str, ...]:
    notes = [f"workspace {first.workspace_mib} -> {final.workspace_mib} MiB"] \
        if first.workspace_mib != final.workspace_mib else []
    for name in ("batch", "sequence", "past"):
        before, after = getattr(first.axes, name), getattr(final.axes, name)
        if before != after:
            notes.append(f"{name} {':'.join(map(str, before))} -> {':'.join(map(str, after))}")
    return tuple(notes)
