"""The positioned-read safetensors reader: the same tensors as the safetensors library, and one
sentence for a header that lies about its tensors' bytes."""
from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from models.safetensors_file import SafetensorsError, SafetensorsFile


def _write(path, header: dict, data: bytes) -> None:
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


def test_it_reads_what_the_library_wrote(tmp_path):
    tensors = {"a": torch.randn(3, 5), "b": torch.arange(7, dtype=torch.int64), "c": torch.randn(4).to(torch.bfloat16),
               "empty": torch.zeros(0, 2)}
    save_file(tensors, str(tmp_path / "t.safetensors"), metadata={"k": "v"})
    opened = SafetensorsFile(tmp_path / "t.safetensors")
    expected = load_file(str(tmp_path / "t.safetensors"))
    assert sorted(opened.keys()) == sorted(expected) and opened.metadata() == {"k": "v"}
    for name, tensor in expected.items():
        assert opened.shape(name) == tuple(tensor.shape) and opened.dtype(name) == tensor.dtype
        assert torch.equal(opened.read(name), tensor)


@pytest.mark.parametrize("header, data, words", [
    ({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 12]}}, bytes(16), "does not match its shape"),
    ({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, bytes(8), "past the file's end"),
    ({"w": {"dtype": "Q7", "shape": [4], "data_offsets": [0, 16]}}, bytes(16), "unknown dtype"),
    ({"w": {"shape": [4]}}, bytes(16), "malformed entry"),
], ids=["short-range", "past-end", "dtype", "malformed"])
def test_a_header_that_lies_is_refused_before_reading(tmp_path, header, data, words):
    _write(tmp_path / "bad.safetensors", header, data)
    with pytest.raises(SafetensorsError, match=words):
        SafetensorsFile(tmp_path / "bad.safetensors")


def test_a_header_length_past_the_end_and_a_non_json_header_are_refused(tmp_path):
    (tmp_path / "long.safetensors").write_bytes(struct.pack("<Q", 10**6) + b"{}")
    with pytest.raises(SafetensorsError, match="past the file's end"):
        SafetensorsFile(tmp_path / "long.safetensors")
    (tmp_path / "text.safetensors").write_bytes(struct.pack("<Q", 4) + b"nope")
    with pytest.raises(SafetensorsError, match="not JSON"):
        SafetensorsFile(tmp_path / "text.safetensors")
