"""Will it fit? Memory estimates checked before buffers are allocated, so a size that cannot be
allocated is one clear error instead of a crash half-way."""
from __future__ import annotations

import os

from models.config import ModelConfig
from models.errors import ToolkitError

HEADROOM = 0.9  # leave a tenth for the libraries' own workspaces


class ResourceError(ToolkitError):
    """A request that cannot fit in this machine's memory."""


def available_bytes(device: str) -> int:
    """Free memory where buffers of `device` would live: the GPU's free memory, or the host's
    available memory (MemAvailable; total physical memory where /proc is missing)."""
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():  # opening the backend will say so, in its own words
            return 2**62
        free, _ = torch.cuda.mem_get_info()
        return free
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def require(needed: float, what: str, device: str, fix: str) -> None:
    """Raise ResourceError naming `what`, both sizes and `fix` if `needed` bytes do not fit."""
    have = available_bytes(device) * HEADROOM
    if needed > have:
        raise ResourceError(f"{what} needs about {_gib(needed)} but {device.upper() if device == 'cuda' else 'host'} "
                            f"memory has {_gib(have)} free; {fix}")


def _gib(size: float) -> str:
    return f"{size / 2**30:.1f} GiB" if size >= 2**28 else f"{size / 2**20:.0f} MiB"


def cache_bytes(config: ModelConfig, rows: int, tokens: int, bytes_per_value: int) -> float:
    """Keys and values of every layer for `rows` rows of `tokens` tokens."""
    return 2.0 * config.depth * rows * config.kv_heads * tokens * config.dim_head * bytes_per_value


def logits_bytes(config: ModelConfig, rows: int, tokens: int) -> float:
    """float32 logits for every position."""
    return 4.0 * rows * tokens * config.num_tokens


def activation_bytes(config: ModelConfig, rows: int, tokens: int, bytes_per_value: int) -> float:
    """The largest intermediate of a forward pass over `tokens` (feed-forward hidden or attention
    scores, float32), a rough upper bound per live tensor, times a few live tensors."""
    widest = max(config.ff_hidden * tokens, config.heads * tokens * tokens)
    return 4.0 * rows * widest * max(bytes_per_value, 4) / 4


def forward_bytes(config: ModelConfig, rows: int, tokens: int, cached: int, bytes_per_value: int) -> float:
    """A forward pass over `tokens` new tokens per row with `cached` tokens already in the cache:
    its logits, its largest intermediates and the cache it returns."""
    return (logits_bytes(config, rows, tokens) + activation_bytes(config, rows, tokens, bytes_per_value)
            + cache_bytes(config, rows, cached + tokens, bytes_per_value))
