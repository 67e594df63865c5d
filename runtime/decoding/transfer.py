"""Small host values onto the device without stopping the host."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor


def to_device(values: Sequence, dtype: torch.dtype, device: torch.device | str) -> Tensor:
    """`values` as a tensor on `device`. On CUDA through pinned memory and an asynchronous copy:
    `torch.tensor(values, device="cuda")` copies from pageable memory and waits for every kernel
    queued before it, and an admission made a dozen of them per served step. PyTorch's pinned
    allocator keeps the buffer until the copy has run."""
    device = torch.device(device)
    if device.type != "cuda":
        return torch.tensor(values, dtype=dtype, device=device)
    return torch.tensor(values, dtype=dtype, pin_memory=True).to(device, non_blocking=True)


def moved(tensor: Tensor, device: torch.device | str) -> Tensor:
    """A host tensor on `device`, as `to_device` copies: through pinned memory on CUDA, so the copy
    is queued after the work before it instead of waiting for that work to run."""
    if torch.device(device).type != "cuda" or tensor.device.type != "cpu":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)
