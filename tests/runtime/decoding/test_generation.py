"""The token loop and its parts: sampling semantics, end tokens, byte-level text, and the graph a
with-past export writes."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from runtime.backends import BackendError
from runtime.backends.onnxruntime_backend import OnnxRuntimeBackend
from runtime.decoding.base import DecodingError
from runtime.decoding.cache_feed import CacheFeedDecoder, left_pad
from runtime.decoding.generation import GenerationSettings, generate
from runtime.decoding.text import TextPieces, decode_bytes, encode_text


def test_with_past_graph_has_the_declared_names_and_symbolic_axes(tiny_past_onnx, tiny_config):
    graph = onnx.load(str(tiny_past_onnx), load_external_data=False).graph
    dims = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in list(graph.input) + list(graph.output)}
    assert dims["input_ids"] == ["batch", "sequence"]
    assert dims["attention_mask"] == ["batch", "total_sequence"]
    for i in range(tiny_config.depth):
        for kind in ("key", "value"):
            assert dims[f"past_key_values.{i}.{kind}"] == ["batch", tiny_config.kv_heads, "past_sequence",
                                                           tiny_config.dim_head]
            present = dims[f"present.{i}.{kind}"]
            assert present[2] in ("past_sequence + sequence", "sequence + past_sequence")
    assert [o.name for o in graph.output][0] == "logits"


def test_end_token_stops_a_row(torch_decoder):
    with torch_decoder(1) as decoder:
        free = generate(decoder, [[1, 2, 3]], GenerationSettings(max_new_tokens=10)).tokens[0]
        stop = free[3]
        stopped = generate(decoder, [[1, 2, 3]], GenerationSettings(max_new_tokens=10, eos_id=stop)).tokens[0]
    assert stopped == free[: free.index(stop) + 1]


def test_prompt_past_max_seq_len_is_refused_before_any_work(tiny_model):
    from runtime.backends.torch_backend import TorchBackend

    limited = TorchBackend(tiny_model.__class__(tiny_model.config.replace(max_seq_len=16)).eval(), with_past=True)
    with CacheFeedDecoder(limited, rows=1) as decoder:
        with pytest.raises(DecodingError, match="prompt plus 8 new tokens is 18 tokens, past the model's max_seq_len of 16"):
            generate(decoder, [list(range(10))], GenerationSettings(max_new_tokens=8))
        assert decoder.lengths == {}


def test_backends_refuse_caches_of_inconsistent_shapes(tiny_past_onnx, tiny_model):
    backend = OnnxRuntimeBackend(tiny_past_onnx)
    feeds = {"input_ids": np.ones((1, 1), np.int64), "attention_mask": np.ones((1, 4), np.int64)}
    for i in range(tiny_model.config.depth):
        for kind in ("key", "value"):
            feeds[f"past_key_values.{i}.{kind}"] = np.zeros((1, 2, 3, 16), np.float32)
    feeds["past_key_values.1.value"] = np.zeros((1, 2, 5, 16), np.float32)
    with pytest.raises(BackendError, match="past_sequence"):
        backend.run(feeds)
    feeds["past_key_values.1.value"] = np.zeros((1, 2, 3, 16), np.float32)
    feeds["attention_mask"] = np.ones((1, 9), np.int64)
    with pytest.raises(BackendError, match="total_sequence is 9 but past_sequence \\+ sequence is 4"):
        backend.run(feeds)
    feeds["attention_mask"] = np.ones((1, 4), np.int64)
    feeds["past_key_values.0.key"] = np.zeros((1, 3, 3, 16), np.float32)
    with pytest.raises(BackendError, match="dimension 1 must be 2"):
        backend.run(feeds)


def streamed(tokens: list[int]) -> list[str]:
    pieces = TextPieces()
    return [pieces.piece(token, final=index == len(tokens) - 1) for index, token in enumerate(tokens)]


def test_streamed_text_pieces_join_to_the_offline_text():
    """What a server streams (one piece per token) joins, character for character, to what offline
    generate writes (decode_bytes); a multi-byte character comes whole, in the piece of its last byte."""
    text = "héllo wörld ✓ 日本 🙂"
    tokens = encode_text(text, 256)
    pieces = streamed(tokens)
    assert "".join(pieces) == decode_bytes(tokens) == text
    assert pieces[:3] == ["h", "", "é"] and pieces[-4:] == ["", "", "", "🙂"]
    # unfinished characters: cut by an id of 256 or over, by a new lead byte, by the end of the stream
    for tokens in ([0xE6, 0x97, 300, 0x41], [0xC3, 0xE6, 0x97, 0xA5], [0x41, 0xF0, 0x9F], [0xFF, 0x80, 0xC3]):
        assert "".join(streamed(tokens)) == decode_bytes(tokens), tokens
    rng = np.random.default_rng(0)  # random bytes (valid characters appear among them) and a few large ids
    for _ in range(200):
        tokens = [int(t) for t in rng.choice([*range(0x80, 0x100), *range(0x80, 0x100), 65, 300, 0xE6], size=12)]
        assert "".join(streamed(tokens)) == decode_bytes(tokens), tokens


def test_byte_level_text_and_left_padding():
    assert encode_text("hé", 256) == [104, 195, 169]
    assert decode_bytes([104, 195, 169, 300]) == "hé<300>"
    with pytest.raises(DecodingError, match="at least 256 tokens"):
        encode_text("hi", 64)
    ids, mask = left_pad([[1, 2, 3], [4]])
    assert ids.tolist() == [[1, 2, 3], [0, 0, 4]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
