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
    import onnx

    def failing(path) -> None:
        assert onnx.load(str(path)).graph.node  # the whole graph is written, only not yet in place
        raise ExportError("verification failed: on purpose")

    with pytest.raises(ExportError, match="on purpose"):
        export_static_cache(tiny_model, tmp_path / "s.onnx", 16, "fp32", verify=failing, log=lambda _: None)
    assert list(tmp_path.iterdir()) == []


def test_portable_static_graph_is_opset_17_standard_ops_and_lint_clean(tiny_portable_static_onnx, tiny_source):
    import onnx

    from export.lint import lint_graph
    from models.graph_metadata import STATIC_PORTABLE, read_graph_metadata

    proto = onnx.load(str(tiny_portable_static_onnx))
    onnx.checker.check_model(proto, full_check=True)
    assert [o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")] == [17]
    assert {node.domain for node in proto.graph.node} <= {"", "ai.onnx"}
    ops = {node.op_type for node in proto.graph.node}
    assert "ScatterND" in ops and not ops & {"If", "Loop", "Scan"}
    metadata = read_graph_metadata(tiny_portable_static_onnx)
    assert metadata.kind == STATIC_PORTABLE and metadata.max_cache == 96 and metadata.weights == tiny_source.record
    assert metadata.axes["sequence"]["max"] == 96  # no profile past the window
    assert not lint_graph(proto, metadata.signature(), {"sequence": 37}).findings


def test_portable_static_graph_gets_tensorrt_profiles_from_its_axes(tiny_portable_static_onnx):
    from runtime.tensorrt.profiles import build_profiles, graph_axes

    inputs, axes, _ = graph_axes(tiny_portable_static_onnx)
    (profile,) = build_profiles(inputs, axes, batch=["1:4:8"])
    shapes = profile.to_dict()
    assert shapes["input_ids"] == {"min": [1, 1], "opt": [4, 96], "max": [8, 96]}
    assert shapes["positions"] == {"min": [1], "opt": [4], "max": [8]}
    assert shapes["past_key_values.1.value"] == {"min": [1, 2, 96, 16], "opt": [4, 2, 96, 16], "max": [8, 2, 96, 16]}


def test_the_portable_window_must_hold_a_chunk(tiny_model, tmp_path):
    from export.onnx_export import export_onnx

    with pytest.raises(ExportError, match="--static-cache 4 is too small for the standard-ops graph"):
        export_onnx(tiny_model, tmp_path / "p.onnx", static_cache=4, log=lambda _: None)


def test_the_static_graph_streams_a_sharded_checkpoint_into_external_data(tmp_path, tiny_model, monkeypatch):
    """From shards, past the inline limit: the same weights as the graph built from the model in
    memory, in OUTPUT.data beside it, and a file ONNX Runtime loads."""
    import hashlib

    import onnx
    from onnx import numpy_helper

    from export import onnx_export, static_cache_graph
    from models.checkpoints import open_checkpoint, save_checkpoint_shards

    def digests(proto):
        return sorted((t.name, tuple(t.dims), t.data_type, hashlib.sha256(numpy_helper.to_array(t).tobytes()).digest())
                      for t in proto.graph.initializer)

    monkeypatch.setattr(onnx_export, "INLINE_GRAPH_BYTES", 0)
    monkeypatch.setattr(static_cache_graph, "LOAD_CHECK_BYTES", 0)  # ONNX Runtime loads a one-layer copy
    folder = save_checkpoint_shards(tiny_model, tmp_path / "shards", max_shard_bytes=100_000)
    lines = []
    result = export_static_cache(open_checkpoint(folder).weights, tmp_path / "s.onnx", 48, "fp16", log=lines.append)
    assert result.path == tmp_path / "s.onnx" and (tmp_path / "s.onnx.data").stat().st_size > 100_000
    assert any("one-layer copy" in line for line in lines)
    assert digests(onnx.load(str(tmp_path / "s.onnx"))) == digests(build_static_cache_graph(tiny_model, 48, "fp16"))
    static_cache_graph.check_loads_in_onnxruntime(tmp_path / "s.onnx")


@pytest.mark.parametrize("kind, options, message", [
    ("static", {"max_cache": 16}, "unknown graph kind 'static'; one of logits, with-past, static-cache"),
    ("static-cache", {}, "a static-cache graph needs max_cache"),
    ("with-past", {"max_cache": 16}, "a with-past graph takes no max_cache"),
    ("static-cache", {"max_cache": 16, "opset": 18}, "written at opset 17; drop --opset"),
])
def test_export_graph_refuses_what_its_kind_cannot_take(tiny_model, tmp_path, kind, options, message):
    from export.graphs import export_graph

    with pytest.raises(ExportError, match=message):
        export_graph(tiny_model, tmp_path / "g.onnx", kind, log=lambda _: None, **options)
    assert list(tmp_path.iterdir()) == []


def test_a_quantized_graph_past_one_protobuf_message_is_refused_before_any_weight_is_read(tmp_path):
    import torch

    from export.onnx_export import meta_skeleton
    from models.precision import precision
    from models.presets import preset
    from models.weights import LazyTensors, ModelWeights

    state = meta_skeleton(preset("7b"), precision("fp32")).state_dict()
    unread = LazyTensors({name: (lambda: pytest.fail("read a weight")) for name in state},
                         {name: tuple(t.shape) for name, t in state.items()}, {name: torch.float32 for name in state})
    with pytest.raises(ExportError, match="quantized in memory, which holds at most 2 GB of weights; quantize the "
                                          "--with-past graph instead"):
        export_static_cache(ModelWeights(preset("7b"), unread), tmp_path / "q.onnx", 64, "fp16-int4-b32",
                            log=lambda _: None)
    assert list(tmp_path.iterdir()) == []
