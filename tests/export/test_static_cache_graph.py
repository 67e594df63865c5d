"""The static-cache graph as written: head order, signature, metadata, and what cannot be expressed."""
from __future__ import annotations

import dataclasses

import pytest

from export.onnx_export import ExportError
from export.static_cache_graph import build_static_cache_graph, export_static_cache, query_head_order
from models.graph_metadata import STATIC_CACHE, GraphMetadata
from models.signature import static_cache_signature
from models.transformer import build_model


def test_query_heads_are_regrouped_for_group_query_attention():
    # 4 query heads, 2 kv heads: model head j reads kv head j % 2, GQA slot p reads kv head p // 2
    order = query_head_order(4, 2)
    assert order == [0, 2, 1, 3]
    assert all(order[p] % 2 == p // 2 for p in range(4))


def test_inputs_outputs_and_metadata_follow_the_static_cache_signature(tiny_model, tiny_source):
    proto = build_static_cache_graph(tiny_model, 48, "fp16", tiny_source.record)
    signature = static_cache_signature(tiny_model.config, 48, "float16")
    dims = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in list(proto.graph.input) + list(proto.graph.output)}
    assert [v.name for v in proto.graph.input] == signature.input_names
    assert [v.name for v in proto.graph.output] == signature.output_names
    assert dims["past_key_values.1.value"] == ["batch", 2, 48, 16] and dims["total_sequence_length"] == []
    metadata = GraphMetadata.from_props({p.key: p.value for p in proto.metadata_props})
    assert metadata.kind == STATIC_CACHE and metadata.max_cache == 48 and metadata.precision == "fp16"
    assert metadata.weights == tiny_source.record and metadata.signature() == signature


@pytest.mark.parametrize("change, size, precision, message", [
    ({"dim": 48, "dim_head": 8, "heads": 4, "kv_heads": 2}, 16, "fp32", "dim_head divisible by 16, this model has 8"),
    ({"causal": False}, 16, "fp32", "needs a causal model"),
    ({"max_seq_len": 32}, 64, "fp32", "--static-cache 64 is past the model's max_seq_len 32"),
    ({}, 0, "fp32", "--static-cache must be at least 1 token"),
    ({}, 16, "bf16", "written in fp32 or fp16, not bf16"),
])
def test_what_the_graph_cannot_express_is_refused(tiny_config, change, size, precision, message):
    model = build_model(dataclasses.replace(tiny_config, **change))
    with pytest.raises(ExportError, match=message):
        build_static_cache_graph(model, size, precision)


def test_export_verifies_before_it_writes(tiny_model, tmp_path):
    def failing(data: bytes) -> None:
        assert data.startswith(b"\x08")  # the serialized ModelProto
        raise ExportError("verification failed: on purpose")

    with pytest.raises(ExportError, match="on purpose"):
        export_static_cache(tiny_model, tmp_path / "s.onnx", 16, "fp32", verify=failing, log=lambda _: None)
    assert list(tmp_path.iterdir()) == []
