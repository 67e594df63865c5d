"""Writing a graph's weights beside it, or into it, one tensor at a time.

`plan_external_data` gives every large initializer of an onnx_ir model its place in the data file
and swaps its value for a reference to that place, so the graph can be serialized, relabelled,
stamped and linted before any weight is read; `write_external_data` then reads each tensor (from a
lazy value: a checkpoint on disk) and writes it at its offset. Offsets are aligned to 4 KiB
so runtimes can memory-map each tensor.

`write_inline_graph` writes a graph that keeps its weights inside, without ever serializing the
whole message: protobuf parsers merge repeated occurrences of an embedded message field, so the
file is the graph without its large initializers followed by one `graph { initializer }` record
per tensor (python protobuf holds about four times a message's size while serializing it; this
holds that for one tensor).
"""
from __future__ import annotations

import os
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


def plan_external_data(model, folder: Path, location: str, keep=lambda name: False) -> list[PlannedTensor]:
    """Point every initializer over INLINE_LIMIT_BYTES at `folder / location` (nothing is read),
    except those `keep(name)` holds in the graph."""
    import onnx_ir as ir

    planned, offset = [], 0
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if tensor is None or tensor.nbytes <= INLINE_LIMIT_BYTES or keep(value.name):
            continue
        offset = -(-offset // ALIGNMENT) * ALIGNMENT
        planned.append(PlannedTensor(value, tensor, offset, tensor.nbytes))
        value.const_value = ir.ExternalTensor(location, offset, tensor.nbytes, tensor.dtype, shape=tensor.shape,
                                              name=value.name, base_dir=str(folder))
        offset += tensor.nbytes
    return planned


def write_external_data(planned: list[PlannedTensor], path: Path) -> None:
    """Read each planned tensor and write its bytes at its offset (the caller's phase reports progress)."""
    with open(path, "wb") as handle:
        for item in planned:
            handle.seek(item.offset)
            handle.write(_tensor_buffer(item))
        handle.flush()
        os.fsync(handle.fileno())


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


GRAPH_FIELD = 7  # ModelProto.graph


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def write_inline_graph(proto, planned: list[PlannedTensor], path: Path) -> None:
    """Write `proto` (whose planned initializers point into external data) to `path` with every
    planned tensor inside it, read and serialized one at a time."""
    from onnx import GraphProto, TensorProto

    names = {item.value.name for item in planned}
    kept = [tensor for tensor in proto.graph.initializer if tensor.name not in names]
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(kept)
    key = _varint(GRAPH_FIELD << 3 | 2)  # wire type 2: length-delimited
    with open(path, "wb") as handle:
        handle.write(proto.SerializeToString())
        for item in planned:
            external = item.value.const_value
            tensor = TensorProto(name=item.value.name, dims=list(external.shape.numpy()),
                                 data_type=int(external.dtype), raw_data=bytes(_tensor_buffer(item)))
            record = GraphProto(initializer=[tensor]).SerializeToString()
            del tensor
            handle.write(key + _varint(len(record)) + record)
