"""A safetensors file read one tensor at a time with positioned reads.

`safetensors.safe_open` memory-maps the whole file: for a 13 GB checkpoint that is 13 GB of
private mapping, which counts against a process's data limit (RLIMIT_DATA, container caps) and
shows as resident memory as it is read. A streamed export needs one tensor at a time, so this
reads the format's header (8-byte little-endian length, then JSON: dtype, shape and byte range of
every tensor) and each tensor's bytes with os.pread. Writing stays with the safetensors library.
"""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import torch
from torch import Tensor

from .errors import ToolkitError

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
MAX_HEADER_BYTES = 100 << 20  # the reference implementation's own limit


class SafetensorsError(ToolkitError, ValueError):
    """A file that is not a well-formed safetensors file."""


class SafetensorsFile:
    """The header of a safetensors file, and its tensors read on request (nothing is mapped)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        size = self.path.stat().st_size
        with open(self.path, "rb") as handle:
            head = handle.read(8)
            if len(head) < 8:
                raise SafetensorsError(f"{self.path} is too short to be a safetensors file")
            (length,) = struct.unpack("<Q", head)
            if length > min(MAX_HEADER_BYTES, size - 8):
                raise SafetensorsError(f"{self.path} has a header length of {length} bytes, past the file's end")
            try:
                header = json.loads(handle.read(length))
            except (UnicodeDecodeError, json.JSONDecodeError) as error:
                raise SafetensorsError(f"{self.path} has a header that is not JSON ({error})") from None
        if not isinstance(header, dict):
            raise SafetensorsError(f"{self.path} has a header that is not a JSON object")
        self._metadata = header.pop("__metadata__", None) or {}
        self._base = 8 + length
        self._entries: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {}
        for name, entry in header.items():
            try:
                dtype, shape, (start, end) = DTYPES[entry["dtype"]], tuple(int(s) for s in entry["shape"]), \
                    entry["data_offsets"]
            except (KeyError, TypeError, ValueError):
                raise SafetensorsError(f"{self.path} describes {name!r} with an unknown dtype or a malformed "
                                       "entry") from None
            count = 1
            for dimension in shape:
                count *= dimension
            if not (0 <= start <= end <= size - self._base) or end - start != count * dtype.itemsize:
                raise SafetensorsError(f"{self.path}: {name!r} has a byte range that does not match its shape and "
                                       "dtype or lies past the file's end")
            self._entries[name] = (dtype, shape, start, end)

    def keys(self) -> list[str]:
        return list(self._entries)

    def metadata(self) -> dict[str, str]:
        return dict(self._metadata)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entries[name][1]

    def dtype(self, name: str) -> torch.dtype:
        return self._entries[name][0]

    def read(self, name: str) -> Tensor:
        """The tensor, in memory of its own (a copy of the file's bytes)."""
        dtype, shape, start, end = self._entries[name]
        buffer = bytearray(end - start)
        view, offset = memoryview(buffer), self._base + start
        fd = os.open(self.path, os.O_RDONLY)
        try:
            done = 0
            while done < len(buffer):
                count = os.preadv(fd, [view[done:]], offset + done)
                if count == 0:
                    raise SafetensorsError(f"{self.path} ended while {name!r} was read; the file is truncated")
                done += count
        finally:
            os.close(fd)
        if not buffer:
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(buffer, dtype=dtype).reshape(shape)
