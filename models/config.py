"""Model configuration: one dataclass that round-trips through JSON."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any, Literal

from .errors import ToolkitError

NORMS = ("rms", "layer")
QKV_LAYOUTS = ("fused", "separate")
ROTARY_PAIRINGS = ("interleaved", "half")


class ConfigError(ToolkitError, ValueError):
    """An impossible or unknown model configuration."""


@dataclass(frozen=True)
class ModelConfig:
    """Hyper-parameters of the rotary transformer.

    Names follow the upstream constructor
    (`native_sparse_attention_pytorch.transformer.Transformer`); the rest are this
    project's variant options.
    """

    num_tokens: int
    dim: int
    depth: int
    dim_head: int = 64
    heads: int = 8
    kv_heads: int | None = None  # grouped-query attention; None means `heads`
    ff_expansion_factor: float = 4.0
    causal: bool = True
    norm: Literal["rms", "layer"] = "rms"
    norm_eps: float = 1e-6
    qkv: Literal["fused", "separate"] = "fused"
    rotary_pairing: Literal["interleaved", "half"] = "interleaved"
    theta: float = 10000.0
    ff_bias: bool = True
    dropout: float = 0.0
    max_seq_len: int | None = None  # trained context, checked by generation; None: unbounded

    def __post_init__(self) -> None:
        if self.kv_heads is None:
            object.__setattr__(self, "kv_heads", self.heads)
        problems = list(self._problems())
        if problems:
            raise ConfigError("invalid model config: " + "; ".join(problems))

    def _problems(self):
        for name in ("num_tokens", "dim", "depth", "dim_head", "heads", "kv_heads"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                yield f"{name} must be a positive integer, got {value!r}"
        if isinstance(self.heads, int) and isinstance(self.kv_heads, int) and self.kv_heads >= 1:
            if self.heads % self.kv_heads:
                yield f"heads ({self.heads}) must be divisible by kv_heads ({self.kv_heads})"
        if isinstance(self.dim_head, int) and self.dim_head % 2:
            yield f"dim_head must be even for rotary embeddings, got {self.dim_head}"
        for name in ("ff_expansion_factor", "theta", "dropout", "norm_eps"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value != value or value in (
                    float("inf"), float("-inf")):
                yield f"{name} must be a finite number, got {value!r}"
                return
        for name in ("causal", "ff_bias"):
            if not isinstance(getattr(self, name), bool):
                yield f"{name} must be true or false, got {getattr(self, name)!r}"
        if self.max_seq_len is not None and (not isinstance(self.max_seq_len, int) or isinstance(self.max_seq_len, bool)):
            yield f"max_seq_len must be a positive integer or null, got {self.max_seq_len!r}"
            return
        if self.norm not in NORMS:
            yield f"norm must be one of {NORMS}, got {self.norm!r}"
        if self.qkv not in QKV_LAYOUTS:
            yield f"qkv must be one of {QKV_LAYOUTS}, got {self.qkv!r}"
        if self.rotary_pairing not in ROTARY_PAIRINGS:
            yield f"rotary_pairing must be one of {ROTARY_PAIRINGS}, got {self.rotary_pairing!r}"
        if not self.ff_expansion_factor > 0:
            yield f"ff_expansion_factor must be positive, got {self.ff_expansion_factor}"
        if not self.theta > 0:
            yield f"theta must be positive, got {self.theta}"
        if not 0.0 <= self.dropout < 1.0:
            yield f"dropout must be in [0, 1), got {self.dropout}"
        if not self.norm_eps > 0:
            yield f"norm_eps must be positive, got {self.norm_eps}"
        if self.max_seq_len is not None and self.max_seq_len < 1:
            yield f"max_seq_len must be positive or null, got {self.max_seq_len}"

    @property
    def dim_inner(self) -> int:
        return self.heads * self.dim_head

    @property
    def dim_kv_inner(self) -> int:
        return self.kv_heads * self.dim_head

    @property
    def ff_hidden(self) -> int:
        # int() as upstream, after rounding away float noise: a factor inferred as hidden/dim
        # must give back exactly `hidden`
        return int(round(self.dim * self.ff_expansion_factor, 6))

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        if not isinstance(data, dict):
            raise ConfigError(f"a model config must be a JSON object, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown model config keys {unknown}; known keys are {sorted(known)}")
        try:
            return cls(**data)
        except TypeError as error:  # missing required keys
            raise ConfigError(f"incomplete model config: {error}") from None

    @classmethod
    def from_json(cls, text: str) -> "ModelConfig":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise ConfigError(f"model config is not valid JSON: {error}") from None
        return cls.from_dict(data)
