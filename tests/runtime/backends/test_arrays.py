"""runtime.backends.arrays and bfloat16 through the backend contract: numpy has no bfloat16,
so it travels as ml_dtypes' and crosses to torch as raw bits."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from models.precision import numpy_dtype
from runtime.backends.arrays import to_numpy, to_torch
from runtime.backends.onnxruntime_backend import binding_type
from runtime.backends.torch_backend import TorchBackend
from runtime.verify.tensors import Case, cast_feeds, check_parity


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.bool])
def test_round_trip_keeps_values_and_dtype(dtype):
    tensor = (torch.arange(-6, 6) * 0.375).reshape(3, 4).to(dtype)
    array = to_numpy(tensor)
    assert array.dtype == numpy_dtype(str(dtype).removeprefix("torch."))
    back = to_torch(array)
    assert back.dtype == dtype and torch.equal(back, tensor)


def test_bfloat16_values_survive_as_numbers():
    array = to_numpy(torch.tensor([1.5, -2.25, 3.0e38], dtype=torch.bfloat16))
    assert array.dtype.name == "bfloat16"
    assert array.astype(np.float32).tolist() == [1.5, -2.25, pytest.approx(3.0e38, rel=1e-2)]
    strided = to_numpy(torch.arange(8, dtype=torch.bfloat16))[::2]  # not contiguous
    assert to_torch(strided).tolist() == [0.0, 2.0, 4.0, 6.0]


def test_cast_feeds_gives_a_bfloat16_cache_its_dtype(tiny_model):
    with TorchBackend(tiny_model, dtype=torch.bfloat16, with_past=True) as backend:
        feeds = {"input_ids": np.zeros((1, 1), np.int64), "attention_mask": np.ones((1, 3), np.int64),
                 **{m.name: np.ones((1, m.shape[1], 2, m.shape[3]), np.float32) for m in backend.inputs[2:]}}
        cast = cast_feeds(feeds, backend.inputs)
    assert {cast[m.name].dtype.name for m in backend.inputs[2:]} == {"bfloat16"}
    assert cast["input_ids"].dtype == np.int64 and cast["attention_mask"].dtype == np.int64


def test_a_bfloat16_backend_with_past_runs_through_numpy_and_passes_its_row(tiny_model):
    """What check-parity does with a bf16 graph with past, on the CPU: bf16 caches cross numpy."""
    cases = [Case(1, 1, past=3), Case(2, 5, past=7), Case(2, 1, padded=True, past=7)]
    with TorchBackend(tiny_model, with_past=True) as reference, \
            TorchBackend(tiny_model, dtype=torch.bfloat16, with_past=True) as candidate:
        report = check_parity(reference, candidate, cases, "bf16")
    assert report, report.summary()
    assert {r.output for r in report.results} >= {"logits", "present.0.key"}
    assert 0 < report.worst().max_abs < 0.2  # bf16 rounding is there, and small


def test_binding_type_names_bfloat16_by_its_onnx_number():
    from onnx import TensorProto, helper
    import onnxruntime as ort

    assert binding_type(torch.bfloat16) == TensorProto.BFLOAT16
    assert binding_type(torch.float16) is np.float16 and binding_type(torch.int64) is np.int64
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "identity",
                              [helper.make_tensor_value_info("x", TensorProto.BFLOAT16, [3])],
                              [helper.make_tensor_value_info("y", TensorProto.BFLOAT16, [3])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x, y = torch.tensor([1.5, -2.25, 7.0], dtype=torch.bfloat16), torch.zeros(3, dtype=torch.bfloat16)
    binding = session.io_binding()
    binding.bind_input("x", "cpu", 0, binding_type(x.dtype), (3,), x.data_ptr())
    binding.bind_output("y", "cpu", 0, binding_type(y.dtype), (3,), y.data_ptr())
    session.run_with_iobinding(binding)
    assert torch.equal(y, x)
