"""Random weights for a config of any size, one tensor at a time, straight into shards: a 7B model
never has to be in memory to exist on disk.

Each tensor draws from PyTorch's default initialisation for its module (Linear: uniform within
1/sqrt(fan_in); Embedding: standard normal; norms: ones and zeros) with a generator seeded from
(seed, tensor name), so a tensor's values do not depend on the others. The values differ from
`build_model(config, seed)`, which draws every tensor from one generator in module order.
"""
from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor, nn

from .config import ModelConfig


def random_tensors(config: ModelConfig, seed: int = 0, dtype: torch.dtype = torch.float32) -> Iterator[tuple[str, Tensor]]:
    """(name, tensor) for every weight of a model of `config`, in state_dict order, each made when asked."""
    from .transformer import Transformer

    with torch.device("meta"):
        skeleton = Transformer(config)  # shapes and module types only; no memory
    owners = {f"{prefix}.{name}" if prefix else name: module
              for prefix, module in skeleton.named_modules() for name, _ in module.named_parameters(recurse=False)}
    for name, meta in skeleton.state_dict().items():
        digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
        generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
        yield name, _draw(owners[name], name, tuple(meta.shape), generator).to(dtype)


def _draw(module: nn.Module, name: str, shape: tuple[int, ...], generator: torch.Generator) -> Tensor:
    if isinstance(module, nn.Embedding):
        return torch.randn(shape, generator=generator)
    if isinstance(module, nn.Linear):
        bound = 1.0 / math.sqrt(module.in_features)
        return torch.empty(shape).uniform_(-bound, bound, generator=generator)
    return torch.ones(shape) if name.endswith("weight") else torch.zeros(shape)  # a norm's scale and shift


def write_random_checkpoint(config: ModelConfig, folder: str | os.PathLike, seed: int = 0,
                            dtype: torch.dtype = torch.float32, max_shard_bytes: int = 2 << 30) -> Path:
    """A sharded checkpoint of random weights, written tensor by tensor (at most one shard in memory)."""
    from .checkpoints import FORMAT_NAME
    from .shards import write_shards

    metadata = {"format": FORMAT_NAME, "config": config.to_json(), "random_seed": str(seed)}
    return write_shards(random_tensors(config, seed, dtype), folder, metadata, max_shard_bytes)
