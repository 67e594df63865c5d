"""Trace three blocks, write N: the graph whose blocks 2..N-2 are clones of block 1 computes what
the graph traced at full depth computes, bit for bit, with the same weights; and when blocks 1 and
2 do not correspond, the export traces the whole depth instead."""
from __future__ import annotations

import collections
import hashlib

import numpy as np
import pytest
from onnx import numpy_helper

from export import replicate_layers as replication
from export.onnx_export import trace_to_onnx
from models.transformer import build_model
from models.weights import ModelWeights

SIZES = {"batch": 2, "sequence": 5, "past_sequence": 3, "logits_positions": 2}


@pytest.fixture(scope="module")
def deep_weights(tiny_config):
    return ModelWeights.of(build_model(tiny_config.replace(depth=4), seed=3))


def _graph(weights, kind: str, replicate: bool):
    import onnx_ir as ir

    graph, signature, _ = trace_to_onnx(weights, 17, "fp32", with_past=kind == "with-past",
                                        static_cache=64 if kind == "static" else None, replicate=replicate)
    return ir.serde.serialize_model(graph), signature


def _feeds(session, num_tokens: int, kind: str) -> dict:
    rng, feeds = np.random.default_rng(0), {}
    for spec in session.get_inputs():
        shape = [d if isinstance(d, int) else SIZES.get(d, 3) for d in spec.shape]
        if spec.name == "attention_mask":
            feeds[spec.name] = np.ones((2, 8 if kind == "with-past" else 5), np.int64)
        elif "int64" in spec.type:
            high = {"input_ids": num_tokens, "positions": 64 - 5, "logits_index": 5}[spec.name]
            feeds[spec.name] = rng.integers(0, high, size=shape).astype(np.int64)
        else:
            feeds[spec.name] = rng.standard_normal(shape).astype(np.float32)
    return feeds


@pytest.mark.parametrize("kind", ["with-past", "static"])
def test_repeated_blocks_compute_what_the_full_trace_computes(deep_weights, kind):
    import onnxruntime

    (repeated, signature), (full, _) = _graph(deep_weights, kind, True), _graph(deep_weights, kind, False)
    assert [v.name for v in repeated.graph.input] == signature.input_names
    assert [v.name for v in repeated.graph.output] == signature.output_names

    def digests(proto):  # weights by name; the optimizer's constants by value (their names are counters)
        return sorted((t.name if t.name.startswith("model.") else "", hashlib.sha256(
            numpy_helper.to_array(t).tobytes()).digest()) for t in proto.graph.initializer)

    assert digests(repeated) == digests(full)
    layers = collections.Counter(node.name.rsplit("__layer", 1)[-1] for node in repeated.graph.node
                                 if "__layer" in node.name)
    assert set(layers) == {"2"}  # block 2 is a clone of block 1; 3 is the traced block 2, renamed
    sessions = [onnxruntime.InferenceSession(p.SerializeToString(), providers=["CPUExecutionProvider"])
                for p in (repeated, full)]
    feeds = _feeds(sessions[0], deep_weights.config.num_tokens, kind)
    for a, b in zip(*(session.run(None, feeds) for session in sessions)):
        assert np.array_equal(a, b)


def test_blocks_that_do_not_correspond_are_traced_at_full_depth(deep_weights, monkeypatch):
    calls = []

    def mismatch(model, depth):
        calls.append(depth)
        raise replication.TemplateMismatch("blocks 1 and 2 differ")

    monkeypatch.setattr(replication, "replicate_layers", mismatch)
    proto, _ = _graph(deep_weights, "logits", True)
    assert calls == [4] and not any("__layer" in node.name for node in proto.graph.node)
    assert {t.name for t in proto.graph.initializer} >= {"model.layers.3.attn.to_qkv.weight.T"}


def test_block_names_move_between_layers():
    assert replication._layer_name("model.layers.1.attn.to_qkv.weight", 1, 7) == "model.layers.7.attn.to_qkv.weight"
    assert replication._layer_name("past_key_values.1.value", 1, 12) == "past_key_values.12.value"
    assert replication._layer_name("present.2.key", 2, 31) == "present.31.key"
    assert replication._layer_name("model.layers.11.ff.proj_in.bias", 1, 3) == "model.layers.11.ff.proj_in.bias"
    assert replication._layer_name("val_1", 1, 3) == "val_1"
