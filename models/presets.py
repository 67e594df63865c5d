"""Named model configurations."""
from __future__ import annotations

from .config import ConfigError, ModelConfig

PRESETS: dict[str, ModelConfig] = {
    # Small enough for CI on two CPU cores; the embedded default model.
    "tiny": ModelConfig(num_tokens=256, dim=64, depth=2, dim_head=16, heads=4, kv_heads=2),
    # GPT-2-small scale, for benchmarks.
    "small": ModelConfig(num_tokens=32000, dim=768, depth=12, dim_head=64, heads=12),
    # Deployment sizes (1.0B and 5.9B parameters: GELU feed-forward, not SwiGLU); too large to build in memory on a
    # small machine, so they are written as shards first (scripts/write_preset.py).
    "1b": ModelConfig(num_tokens=32000, dim=2048, depth=20, dim_head=64, heads=32, kv_heads=8),
    "7b": ModelConfig(num_tokens=32000, dim=4096, depth=32, dim_head=128, heads=32, kv_heads=8),  # Llama-2-7B's shape
}
DEFAULT_PRESET = "tiny"
DEFAULT_SEED = 0


def preset(name: str) -> ModelConfig:
    """Return the named preset config, or raise ConfigError listing the known names."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}") from None


def parameter_count(config: ModelConfig) -> int:
    """Weights of a model of `config`, counted without building it."""
    attention = config.dim * (config.dim_inner + 2 * config.dim_kv_inner) + config.dim_inner * config.dim
    ff = 2 * config.dim * config.ff_hidden + (config.ff_hidden + config.dim if config.ff_bias else 0)
    norm = config.dim * (1 if config.norm == "rms" else 2)
    return 2 * config.num_tokens * config.dim + config.depth * (attention + ff + 2 * norm) + norm
