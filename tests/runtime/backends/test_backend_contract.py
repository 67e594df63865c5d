"""The Backend contract, run against every backend that works on the CPU (PyTorch, ONNX Runtime) for the same model."""
from __future__ import annotations

import numpy as np
import pytest

from runtime.backends import BackendError
from runtime.registry import open_backend
from runtime.backends.onnxruntime_backend import OnnxRuntimeBackend
from runtime.backends.torch_backend import TorchBackend

KINDS = ["torch", "onnxruntime"]


@pytest.fixture(params=KINDS)
def backend(request, tiny_model, tiny_onnx):
    if request.param == "torch":
        instance = TorchBackend(tiny_model)
    else:
        instance = OnnxRuntimeBackend(tiny_onnx, provider="cpu")
    yield instance
    instance.close()


def good_feeds(vocab: int, batch: int = 2, seq: int = 7, seed: int = 0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, size=(batch, seq), dtype=np.int64)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids)}


def test_inputs_outputs_and_vocabulary_are_declared(backend, tiny_config):
    inputs = {meta.name: meta for meta in backend.inputs}
    outputs = {meta.name: meta for meta in backend.outputs}
    assert list(inputs) == ["input_ids", "attention_mask"]
    assert list(outputs) == ["logits"]
    for meta in inputs.values():
        assert meta.dtype == "int64" and tuple(meta.shape) == ("batch", "sequence")
    assert outputs["logits"].dtype == "float32"
    assert tuple(outputs["logits"].shape) == ("batch", "sequence", tiny_config.num_tokens)
    assert backend.vocab_size == tiny_config.num_tokens


@pytest.mark.parametrize("batch, seq", [(1, 1), (2, 7), (3, 40)])
def test_run_returns_float32_logits_equal_to_pytorch(backend, tiny_model, batch, seq):
    import torch

    vocab = tiny_model.config.num_tokens
    feeds = good_feeds(vocab, batch, seq)
    out = backend.run(feeds)
    assert set(out) == {"logits"}
    logits = out["logits"]
    assert isinstance(logits, np.ndarray) and logits.shape == (batch, seq, vocab) and logits.dtype == np.float32
    with torch.no_grad():
        want = tiny_model(torch.from_numpy(feeds["input_ids"]), torch.from_numpy(feeds["attention_mask"])).numpy()
    assert np.abs(logits - want).max() <= 1e-4


def test_both_backends_agree_on_metadata(tiny_model, tiny_onnx):
    with TorchBackend(tiny_model) as torch_backend, OnnxRuntimeBackend(tiny_onnx) as ort_backend:
        describe = lambda metas: [(m.name, m.dtype, tuple(m.shape)) for m in metas]  # noqa: E731
        assert describe(torch_backend.inputs) == describe(ort_backend.inputs)
        assert describe(torch_backend.outputs) == describe(ort_backend.outputs)


def _raises(backend, feeds, *fragments):
    with pytest.raises(BackendError) as info:
        backend.run(feeds)
    message = str(info.value)
    assert message.startswith(backend.name)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return message


def test_missing_or_unexpected_inputs_are_named(backend):
    feeds = good_feeds(backend.vocab_size)
    _raises(backend, {"ids": feeds["input_ids"], "attention_mask": feeds["attention_mask"]},
            "missing ['input_ids']", "unexpected ['ids']")
    _raises(backend, {"input_ids": feeds["input_ids"]}, "missing ['attention_mask']")


def test_a_wrong_dtype_is_named_with_the_expected_one(backend):
    feeds = good_feeds(backend.vocab_size)
    feeds["input_ids"] = feeds["input_ids"].astype(np.int32)
    _raises(backend, feeds, "'input_ids'", "int64", "int32")
    feeds = good_feeds(backend.vocab_size)
    feeds["attention_mask"] = feeds["attention_mask"].astype(np.float32)
    _raises(backend, feeds, "'attention_mask'", "int64", "float32")


def test_a_wrong_rank_is_named_with_the_shape_given(backend):
    feeds = good_feeds(backend.vocab_size)
    feeds["input_ids"] = feeds["input_ids"][0]
    _raises(backend, feeds, "'input_ids'", "2 dimensions", "(7,)")
    feeds = good_feeds(backend.vocab_size)
    feeds["attention_mask"] = feeds["attention_mask"][..., None]
    _raises(backend, feeds, "'attention_mask'", "2 dimensions")


def test_inputs_disagreeing_on_batch_are_refused(backend):
    feeds = good_feeds(backend.vocab_size, batch=2)
    feeds["attention_mask"] = np.ones((3, 7), dtype=np.int64)
    _raises(backend, feeds, "batch", "3", "2")


def test_inputs_disagreeing_on_sequence_are_refused(backend):
    feeds = good_feeds(backend.vocab_size, seq=7)
    feeds["attention_mask"] = np.ones((2, 8), dtype=np.int64)
    _raises(backend, feeds, "sequence")


@pytest.mark.parametrize("bad", ["vocab", -1])
def test_token_ids_outside_the_vocabulary_are_refused(backend, bad):
    feeds = good_feeds(backend.vocab_size)
    value = backend.vocab_size if bad == "vocab" else bad
    feeds["input_ids"][1, 3] = value
    _raises(backend, feeds, f"token id {value} is out of range", f"0..{backend.vocab_size - 1}")


def test_last_valid_token_id_is_accepted(backend):
    feeds = good_feeds(backend.vocab_size)
    feeds["input_ids"][0, 0] = backend.vocab_size - 1
    feeds["input_ids"][0, 1] = 0
    assert np.isfinite(backend.run(feeds)["logits"]).all()


def test_context_manager_closes_the_backend(backend, monkeypatch):
    closed = []
    original = backend.close

    def spy():
        closed.append(True)
        original()

    monkeypatch.setattr(backend, "close", spy)
    with backend as entered:
        assert entered is backend
        backend.run(good_feeds(backend.vocab_size))
    assert closed == [True]
    if isinstance(backend, OnnxRuntimeBackend):
        assert backend.session is None


def test_context_manager_closes_on_error(tiny_onnx):
    with pytest.raises(RuntimeError):
        with OnnxRuntimeBackend(tiny_onnx) as backend:
            raise RuntimeError("boom")
    assert backend.session is None


def test_onnxruntime_backend_metadata_and_errors(tiny_onnx, tiny_source, tmp_path):
    with open_backend("onnxruntime", tiny_onnx) as backend:
        assert backend.name == "onnxruntime-cpu"
        assert backend.graph.weights == tiny_source.record
    with pytest.raises(BackendError, match="ONNX model not found"):
        OnnxRuntimeBackend(tmp_path / "missing.onnx")
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x00not an onnx model" * 10)
    with pytest.raises(BackendError, match="ONNX Runtime cannot load"):
        OnnxRuntimeBackend(garbage)
    with pytest.raises(BackendError, match="unknown ONNX Runtime provider 'tpu'"):
        OnnxRuntimeBackend(tiny_onnx, provider="tpu")
    with pytest.raises(BackendError, match="unknown backend 'tflite'"):
        open_backend("tflite", tiny_onnx)


def test_malformed_metadata_is_a_backend_error(tiny_onnx, tmp_path):
    import onnx

    proto = onnx.load(str(tiny_onnx))
    for prop in proto.metadata_props:
        if prop.key == "model_config":
            prop.value = "{not json"
    path = tmp_path / "bad_metadata.onnx"
    onnx.save(proto, str(path))
    with pytest.raises(BackendError, match="bad_metadata.onnx has damaged toolkit metadata .model config is not valid"):
        OnnxRuntimeBackend(path)


def test_run_answers_torch_feeds_with_tensors_equal_to_its_numpy_answer(backend):
    import torch

    feeds = good_feeds(backend.vocab_size)
    from_numpy = backend.run(feeds)["logits"]
    from_torch = backend.run({name: torch.from_numpy(value) for name, value in feeds.items()})["logits"]
    assert isinstance(from_torch, torch.Tensor) and from_torch.dtype == torch.float32
    assert np.array_equal(from_torch.numpy(), from_numpy)


def test_torch_feeds_are_checked_like_numpy_feeds(backend):
    import torch

    feeds = {name: torch.from_numpy(value) for name, value in good_feeds(backend.vocab_size).items()}
    _raises(backend, {**feeds, "attention_mask": feeds["attention_mask"].int()},
            "input 'attention_mask' must be int64, got int32")
    too_big = feeds["input_ids"].clone()
    too_big[1, 3] = backend.vocab_size
    _raises(backend, {**feeds, "input_ids": too_big}, f"token id {backend.vocab_size} is out of range")
    _raises(backend, {**feeds, "input_ids": feeds["input_ids"].numpy()}, "feeds mix numpy arrays and torch tensors")


def test_half_precision_caches_keep_their_dtype_through_the_numpy_edge(tiny_model):
    """The default numpy <-> torch conversion keeps fp16: a present cache fed back as the next
    step's past is the dtype the graph declares, never widened to float32 on the way."""
    import torch

    with TorchBackend(tiny_model, dtype=torch.float16, with_past=True) as backend:
        feeds = good_feeds(backend.vocab_size, batch=1, seq=3)
        for meta in backend.inputs[2:]:
            feeds[meta.name] = np.zeros((1, meta.shape[1], 0, meta.shape[3]), np.float16)
        outputs = backend.run(feeds)
    assert outputs["logits"].dtype == np.float32
    assert {value.dtype for name, value in outputs.items() if name.startswith("present")} == {np.dtype(np.float16)}
