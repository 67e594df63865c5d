"""numpy <-> torch for every dtype a graph uses. numpy has no bfloat16: it is held as
ml_dtypes.bfloat16 (as onnx does), which torch.from_numpy and .numpy() do not know, so
bfloat16 crosses as its raw 16 bits."""
from __future__ import annotations

import numpy as np
import torch

from models.precision import numpy_dtype


def to_torch(array: np.ndarray) -> torch.Tensor:
    """A CPU tensor sharing `array`'s memory where it can (a copy when it is not contiguous)."""
    array = np.ascontiguousarray(array)
    if array.dtype.name == "bfloat16":
        return torch.from_numpy(array.view(np.uint16)).view(torch.bfloat16)
    return torch.from_numpy(array)


def to_numpy(tensor: torch.Tensor) -> np.ndarray:
    """A numpy array of `tensor`'s values, brought to the host."""
    tensor = tensor.detach().cpu()
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.uint16).numpy().view(numpy_dtype("bfloat16"))
    return tensor.numpy()
