"""The precision table, the graph metadata record and the weights a graph is checked against."""
from __future__ import annotations

import json

import onnx
import pytest
import torch

from models.graph_metadata import LOGITS, STATIC_CACHE, WITH_PAST, GraphMetadata, GraphMetadataError, WeightsRecord
from models.precision import PRECISIONS, PrecisionError, precision, precision_of_torch
from models.source import ModelRequest, WeightsMismatch, reference_source


def test_each_precision_row_agrees_with_torch_numpy_and_onnx():
    for row in PRECISIONS.values():
        assert precision(row.name) is row and precision(row.dtype) is row and precision_of_torch(row.torch_dtype) is row
        assert torch.empty((), dtype=row.torch_dtype).element_size() == row.bytes_per_value
        assert onnx.helper.tensor_dtype_to_np_dtype(row.onnx_type).name == row.dtype
        assert row.numpy_dtype == onnx.helper.tensor_dtype_to_np_dtype(row.onnx_type)
        assert row.numpy_dtype.name == row.dtype  # bfloat16: ml_dtypes', as onnx uses
    assert PRECISIONS["bf16"].cpu_note
    assert [row.name for row in PRECISIONS.values() if row.exact_tokens] == ["fp32"]
    with pytest.raises(PrecisionError, match="unknown precision 'fp8'; choose one of fp32, fp16, bf16"):
        precision("fp8")


def _metadata(tiny_config, **changes) -> GraphMetadata:
    fields = dict(kind=WITH_PAST, precision="fp16", config=tiny_config,
                  weights=WeightsRecord("preset tiny (seed 3)", "ab" * 32, "tiny", 3),
                  axes={"batch": {"min": 1, "opt": 1, "max": 8}}, opset=17)
    return GraphMetadata(**{**fields, **changes})


def test_metadata_round_trips_through_metadata_props(tiny_config):
    for kind, max_cache in ((LOGITS, None), (WITH_PAST, None), (STATIC_CACHE, 64)):
        record = _metadata(tiny_config, kind=kind, max_cache=max_cache)
        props = record.to_props()
        assert all(isinstance(v, str) for v in props.values()) and props["precision"] == "float16"
        assert GraphMetadata.from_props(props) == record
        assert record.signature().with_past == (kind != LOGITS)


def test_graphs_written_before_graph_kind_existed_are_still_read(tiny_config):
    props = _metadata(tiny_config).to_props()
    del props["graph_kind"]
    assert GraphMetadata.from_props(props).kind == WITH_PAST
    props["graph_kind"] = "onnxruntime-static-cache"
    props["max_cache"] = "32"
    assert GraphMetadata.from_props(props).kind == STATIC_CACHE


@pytest.mark.parametrize("change, message", [
    ({"model_config": None}, "is not a graph written by this toolkit"),
    ({"model_config": "{not json"}, "damaged toolkit metadata"),
    ({"precision": "int3"}, "unknown precision 'int3'"),
    ({"graph_kind": "mystery"}, "unknown graph_kind 'mystery'"),
    ({"source_seed": "-1"}, "source_seed '-1' is not a non-negative integer"),
    ({"axes": "[1, 2]"}, "axes must map axis names"),
    ({"max_cache": "lots"}, "damaged toolkit metadata"),
])
def test_foreign_or_damaged_metadata_is_refused_in_one_sentence(tiny_config, change, message):
    props = _metadata(tiny_config).to_props()
    for key, value in change.items():
        if value is None:
            del props[key]
        else:
            props[key] = value
    with pytest.raises(GraphMetadataError, match=message):
        GraphMetadata.from_props(props, "m.onnx")


def test_reference_weights_are_rebuilt_from_the_record_and_their_hash_checked(tiny_config, tiny_source):
    recorded = _metadata(tiny_config, weights=tiny_source.record)
    assert reference_source(recorded, "m.onnx").sha256 == tiny_source.sha256
    with pytest.raises(WeightsMismatch, match="are not the files m.onnx was exported from"):
        reference_source(recorded, "m.onnx", ModelRequest(preset="tiny", seed=1))
    unknown = _metadata(tiny_config, weights=WeightsRecord("ck.pt", "cd" * 32))
    with pytest.raises(WeightsMismatch, match="does not record a preset"):
        reference_source(unknown, "m.onnx")


def test_quantized_rows_carry_weight_bytes_with_scales_and_the_scheme_tolerance():
    int4 = precision("fp16-int4-b32")
    assert int4.dtype == "float16" and int4.float_row is PRECISIONS["fp16"] and int4.torch_dtype == torch.float16
    assert int4.weight_bytes == 0.5 + 2 / 32 and int4.tolerance.forced_top1 == 0.97 and not int4.exact_tokens
    assert int4.matrix_bytes(64, 256) == 64 * 256 / 2 + 2 * 256 * 2  # 2 blocks of 32 rows, fp16 scales
    int8 = precision("fp32-int8")  # per output channel: one float32 scale per column
    assert int8.block_size is None and int8.matrix_bytes(256, 64) == 256 * 64 + 64 * 4
    assert not int8.static_cache and precision("fp16-int8-b32").static_cache  # MatMulNBits is block-wise
    assert PRECISIONS["fp16"].tolerance.forced_top1 == PRECISIONS["fp16"].tolerance.min_top1
    for bad, message in (("fp16-int4", "block size of 32, 64, 128, not None"), ("fp16-int4-b48", "not 48"),
                         ("fp16-int3-b32", "spelled like fp16-int4-b32")):
        with pytest.raises(PrecisionError, match=message):
            precision(bad)


def test_quantized_metadata_round_trips_and_stays_readable_as_its_float_precision(tiny_config):
    from models.graph_metadata import QuantizationRecord

    record = QuantizationRecord("int4", 32, "qdq", "absmax", ("layers.0.attn.to_qkv", "layers.0.ff.proj_in"))
    quantized = _metadata(tiny_config, precision="fp16-int4-b32", quantization=record)
    props = quantized.to_props()
    assert props["precision"] == "float16"  # what a release before quantization reads
    assert json.loads(props["quantization"])["bits"] == 4
    assert GraphMetadata.from_props(props) == quantized
    props["quantization"] = props["quantization"].replace('"absmax"', '"guesswork"')
    with pytest.raises(GraphMetadataError, match="damaged toolkit metadata"):
        GraphMetadata.from_props(props, "m.onnx")
    assert GraphMetadata.from_props(_metadata(tiny_config).to_props()).quantization is None
