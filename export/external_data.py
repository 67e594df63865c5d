"""Writing a graph's weights beside it, one tensor at a time.

`plan_external_data` gives every large initializer of an onnx_ir model its place in the data file
and swaps its value for a reference to that place, so the graph can be serialized, relabelled,
stamped and linted before any weight is read; `write_external_data` then reads each tensor (from a
lazy value: a memory-mapped checkpoint) and writes it at its offset. Offsets are aligned to 4 KiB
so runtimes can memory-map each tensor.
"""
from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ALIGNMENT = 4096
INLINE_LIMIT_BYTES = 1024  # smaller tensors stay in the graph file, as onnx.save_model's size_threshold


@dataclass
class PlannedTensor:
    value: object  # the onnx_ir Value whose const_value now points into the data file
    tensor: object  # its original (lazy) value, read when written
    offset: int
    length: int


def plan_external_data(model, folder: Path, location: str) -> list[PlannedTensor]:
    """Point every initializer over INLINE_LIMIT_BYTES at `folder / location` (nothing is read)."""
    import onnx_ir as ir

    planned, offset = [], 0
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if tensor is None or tensor.nbytes <= INLINE_LIMIT_BYTES:
            continue
        offset = -(-offset // ALIGNMENT) * ALIGNMENT
        planned.append(PlannedTensor(value, tensor, offset, tensor.nbytes))
        value.const_value = ir.ExternalTensor(location, offset, tensor.nbytes, tensor.dtype, shape=tensor.shape,
                                              name=value.name, base_dir=str(folder))
        offset += tensor.nbytes
    return planned


def write_external_data(planned: list[PlannedTensor], path: Path,
                        progress: Callable[[int, int], None] | None = None) -> int:
    """Read each planned tensor and write its bytes at its offset; return the bytes written.
    `progress(done, total)` is called at most once a second."""
    total = sum(item.length for item in planned)
    done, reported = 0, time.monotonic()
    with open(path, "wb") as handle:
        for item in planned:
            handle.seek(item.offset)
            handle.write(_tensor_buffer(item))
            done += item.length
            if progress is not None and time.monotonic() - reported >= 1.0:
                progress(done, total)
                reported = time.monotonic()
        handle.flush()
        os.fsync(handle.fileno())
    return done


def _tensor_buffer(item: PlannedTensor):
    """The tensor's bytes, without a copy where its array already holds them as stored (4-bit
    tensors are packed first)."""
    array = item.tensor.numpy()
    if array.nbytes == item.length and array.flags.c_contiguous:
        data = memoryview(array.reshape(-1).view(np.uint8))
    else:
        data = item.tensor.tobytes()
    if len(data) != item.length:
        raise ValueError(f"initializer {item.value.name} gave {len(data)} bytes, expected {item.length}")
    return data
