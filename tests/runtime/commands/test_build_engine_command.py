"""`build-engine` in-process on a machine without TensorRT: everything is checked before the library is needed."""
from __future__ import annotations

import sys

from command_helpers import assert_one_line_error
from runtime.commands.build_engine import main


def test_bad_inputs_and_a_missing_library_are_one_error_line_and_write_nothing(tiny_onnx, tmp_path, capsys, monkeypatch):

    assert main([str(tmp_path / "missing.onnx")]) == 2
    assert_one_line_error(capsys, "build-engine", "ONNX model not found")
    assert main([str(tiny_onnx), "--batch", "8:4:2", "--output", str(tmp_path / "m.engine")]) == 2
    assert_one_line_error(capsys, "build-engine", "--batch 8:4:2: need min <= opt <= max")
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"\x00garbage")
    assert main([str(corrupt), "--output", str(tmp_path / "c.engine")]) == 2
    assert_one_line_error(capsys, "build-engine", "cannot read ONNX file")
    for name in ("tensorrt", "tensorrt_rtx", "tensorrt_rtx_bindings"):
        monkeypatch.setitem(sys.modules, name, None)
    assert main([str(tiny_onnx), "--output", str(tmp_path / "m.engine")]) == 2
    assert_one_line_error(capsys, "build-engine", "no TensorRT library is installed", "NVIDIA's package index")
    assert not list(tmp_path.glob("*.engine*")) and not list(tmp_path.glob(".*partial"))


def test_a_machine_without_a_gpu_is_told_so(tiny_onnx, tmp_path, capsys, monkeypatch):
    """Without a GPU it only said to install TensorRT; the missing GPU comes first now, with or
    without the library."""
    from runtime.tensorrt import builder, library

    def no_gpu():
        raise builder.EngineBuildError("no CUDA GPU is visible; TensorRT engines are built and run on the GPU they "
                                       "target")

    monkeypatch.setattr(builder, "gpu_identity", no_gpu)
    for name in ("tensorrt", "tensorrt_rtx", "tensorrt_rtx_bindings"):
        monkeypatch.setitem(sys.modules, name, None)
    assert main([str(tiny_onnx), "--output", str(tmp_path / "m.engine")]) == 2
    line = assert_one_line_error(capsys, "build-engine", "no CUDA GPU is visible here",
                                 "run build-engine on a machine with an NVIDIA GPU", "no TensorRT library is installed")
    assert line.index("no CUDA GPU") < line.index("no TensorRT library")
    monkeypatch.setattr(library, "load_tensorrt", lambda flavour: object())  # the library is there, the GPU is not
    assert main([str(tiny_onnx), "--output", str(tmp_path / "m.engine")]) == 2
    assert_one_line_error(capsys, "build-engine", "no CUDA GPU is visible", "on a machine with an NVIDIA GPU")
    assert not list(tmp_path.glob("*.engine*"))
