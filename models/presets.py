"""Named model configurations."""
from __future__ import annotations

from .config import ConfigError, ModelConfig

PRESETS: dict[str, ModelConfig] = {
    # Small enough for CI on two CPU cores; the embedded default model.
    "tiny": ModelConfig(num_tokens=256, dim=64, depth=2, dim_head=16, heads=4, kv_heads=2),
    # GPT-2-small scale, for benchmarks.
    "small": ModelConfig(num_tokens=32000, dim=768, depth=12, dim_head=64, heads=12),
}
DEFAULT_PRESET = "tiny"
DEFAULT_SEED = 0


def preset(name: str) -> ModelConfig:
    """Return the named preset config, or raise ConfigError listing the known names."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}") from None
