"""Weight-only quantization: the formulas, the graphs they write (Q/DQ and MatMulNBits), tight parity
with the fake-quantized PyTorch model, the lint, and what cannot be expressed."""
from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import pytest
import torch
from onnx import helper, numpy_helper

from export.lint import lint_graph
from export.onnx_export import example_sizes, export_onnx
from export.quantize import (QuantizeError, absmax_quantize, check_quantization,
                             matmulnbits, mlas_fake_quant, required_opset)
from export.static_cache_graph import build_static_cache_graph
from models.graph_metadata import GraphMetadata, read_graph_metadata
from models.precision import precision
from models.transformer import build_model
from runtime.backends.onnxruntime_backend import OnnxRuntimeBackend
from runtime.backends.torch_backend import TorchBackend
from runtime.decoding.static_cache import StaticCacheDecoder
from runtime.verify.decoding import check_decoder
from runtime.verify.reference import parity_reference
from runtime.verify.tensors import Case, check_parity


# --------------------------------------------------------------------------- formulas

def test_absmax_scales_are_positive_and_rounding_is_half_to_even():
    weight = torch.tensor([[1.0, 0.7], [-0.5, -0.35], [0.25, 0.0], [0.0, 0.0]])  # (K 4, N 2)
    q, scale = absmax_quantize(weight, 8, None, torch.float32)  # one scale per output column
    assert scale.tolist() == pytest.approx([1 / 127, 0.7 / 127])
    assert q[:, 0].tolist() == [127, -64, 32, 0]  # -63.5 rounds to even
    q, scale = absmax_quantize(weight, 4, 2, torch.float32)  # blocks of 2 rows
    assert scale.shape == (2, 2) and scale[1, 1] == 1.0  # an all-zero block still gets a positive scale
    assert q[:, 1].tolist() == [7, -4, 0, 0]  # -3.5 rounds to even, int4 range [-8, 7]
    _, half = absmax_quantize(weight, 4, 2, torch.float16)
    assert half.dtype == torch.float16 and bool((half > 0).all())


@pytest.mark.parametrize("dtype, bits", [(np.float32, 4), (np.float16, 4), (np.float32, 8), (np.float16, 8)])
def test_the_mlas_reference_matches_onnxruntime_quantizer_bit_for_bit(dtype, bits):
    rng = np.random.default_rng(bits)
    weight = (rng.standard_normal((64, 48)) * 0.1).astype(dtype)  # (K, N)
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")], "g",
                              [helper.make_tensor_value_info("x", elem, ["M", 64])],
                              [helper.make_tensor_value_info("y", elem, ["M", 48])], [numpy_helper.from_array(weight, "W")])
    row = precision(f"{'fp16' if dtype == np.float16 else 'fp32'}-int{bits}-b32")
    proto, record = matmulnbits(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), row, {"w": "W"})
    assert record.format == "matmulnbits" and record.formula == "ort-mlas" and record.layers == ("w",)
    arrays = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    packed = arrays[f"W_Q{bits}"].reshape(48, -1)  # (N, K * bits / 8): column n, low nibble first
    q = (np.stack([packed & 0xF, packed >> 4], -1).reshape(48, -1) if bits == 4 else packed).T.astype(np.float32)
    scales = np.repeat(arrays["W_scales"].astype(np.float32).T, 32, axis=0)  # (K, N)
    graph_weight = (q - 2 ** (bits - 1)) * scales
    np.testing.assert_array_equal(graph_weight, mlas_fake_quant(torch.from_numpy(weight), bits, 32,
                                                                torch.float16 if dtype == np.float16 else torch.float32))


# --------------------------------------------------------------------------- what cannot be expressed

def test_each_scheme_names_its_opset_and_impossible_combinations_are_refused(tiny_model):
    assert [required_opset(precision(n)) for n in ("fp32", "fp32-int8", "fp16-int8", "fp32-int4-b32")] == [17, 17, 19, 21]
    refusals = [
        ("fp32-int4-b32", 17, "needs opset 21 or newer (block-wise int4 DequantizeLinear arrived in opset 21); "
                              "pass --opset 21 or leave --opset out"),
        ("fp16-int8", 18, "needs opset 19 or newer (float16 DequantizeLinear scales"),
        ("bf16-int4-b32", None, "writes fp32 or fp16 activations, not bf16"),
        ("fp32-int4-b128", None, "--block-size 128 does not divide layers.0.attn.to_qkv's input size 64; choose 32 or 64"),
    ]
    for name, opset, message in refusals:
        with pytest.raises(QuantizeError, match=message.replace("(", r"\(").replace(")", r"\)")):
            check_quantization(tiny_model, precision(name), opset)
    ff_only = build_model(dataclasses.replace(tiny_model.config, dim=128, heads=8, dim_head=16, kv_heads=2))
    assert check_quantization(ff_only, precision("fp32-int4-b128"), None) == 21  # K = 128 and ff 512


# --------------------------------------------------------------------------- the portable (Q/DQ) graphs

def traced_sizes(config) -> dict[str, int]:
    """The sizes export traced at, as its lint sees them (the batch is left out, as export leaves it)."""
    sizes = example_sizes(config)
    return {"sequence": sizes["sequence"], "past_sequence": sizes["past_sequence"],
            "total_sequence": sizes["sequence"] + sizes["past_sequence"]}


def _dequantized(proto) -> dict[str, np.ndarray]:
    """Every DequantizeLinear's weight as the graph computes it, by layer."""
    arrays = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    weights = {}
    for node in (n for n in proto.graph.node if n.op_type == "DequantizeLinear"):
        q, scale = arrays[node.input[0]].astype(np.float32), arrays[node.input[1]].astype(np.float32)
        block = next((a.i for a in node.attribute if a.name == "block_size"), 0)
        weights[node.name.removesuffix(".dequantize")] = q * (np.repeat(scale, block, axis=0) if block else scale)
    return weights


@pytest.fixture(scope="module")
def tiny_int8_onnx(tmp_path_factory, tiny_model, tiny_source):
    """The tiny model with past, fp32 activations, int8 weights per output channel (opset 17)."""
    path = tmp_path_factory.mktemp("int8") / "model-int8.onnx"
    export_onnx(tiny_model, path, precision="fp32-int8", weights=tiny_source.record, with_past=True,
                log=lambda _: None)
    onnx.checker.check_model(str(path), full_check=True)
    return path


@pytest.mark.parametrize("which", ["int8", "int4"])
def test_quantized_graphs_hold_the_reference_weights_lint_clean_and_pass_tight_parity(
        which, tiny_int8_onnx, tiny_int4_export, tiny_model):
    path = tiny_int8_onnx if which == "int8" else tiny_int4_export[0]
    proto, metadata = onnx.load(str(path)), read_graph_metadata(path)
    record = metadata.quantization
    assert record.format == "qdq" and record.block_size == (None if which == "int8" else 32)
    assert len(record.layers) == 8 and "to_logits" not in record.layers  # 4 per block; the head stays float
    reference = parity_reference(tiny_model, metadata)
    modules = dict(reference.model.named_modules())
    graph_weights = _dequantized(proto)
    assert sorted(graph_weights) == sorted(record.layers)
    for layer, weight in graph_weights.items():  # the formula the graph computes is the reference's, exactly
        np.testing.assert_array_equal(weight, modules[layer].weight.detach().T.numpy())
    report = lint_graph(proto, metadata.signature(), traced_sizes(tiny_model.config))
    assert report.findings == [] and report.op_counts["DequantizeLinear"] == 8
    cases = [Case(1, 1), Case(3, 17, padded=True)] + ([Case(3, 1, past=9)] if metadata.with_past else [])
    with TorchBackend(reference.model, with_past=metadata.with_past) as torch_model, OnnxRuntimeBackend(path) as graph:
        parity = check_parity(torch_model, graph, cases, reference.row.name)
    assert parity and reference.row.name == "fp32", parity.summary()
    assert max(r.max_abs for r in parity.results) < 1e-4


def test_the_float_reference_uses_the_scheme_row(tiny_int4_export, tiny_model):
    reference = parity_reference(tiny_model, read_graph_metadata(tiny_int4_export[0]), against="float")
    assert reference.model is tiny_model and reference.row.name == "fp32-int4-b32"
    assert reference.row.tolerance.forced_top1 == 0.97 and not reference.row.exact_tokens


def test_lint_explains_dequantization_tensorrt_cannot_take(tiny_int8_onnx, tiny_model):
    proto = onnx.load(str(tiny_int8_onnx))
    dq = next(n for n in proto.graph.node if n.op_type == "DequantizeLinear")
    scale = next(t for t in proto.graph.initializer if t.name == dq.input[1])
    scale.CopyFrom(numpy_helper.from_array(-numpy_helper.to_array(scale), scale.name))
    proto.graph.initializer.append(numpy_helper.from_array(np.ones(scale.dims, np.int8), "zero_point"))
    dq.input.append("zero_point")
    user = next(n for n in proto.graph.node if dq.output[0] in n.input)
    transposed = helper.make_node("Transpose", [dq.output[0]], ["transposed"], name="t", perm=[1, 0])
    proto.graph.node.append(transposed)
    signature = read_graph_metadata(tiny_int8_onnx).signature()
    findings = lint_graph(proto, signature, traced_sizes(tiny_model.config)).findings
    assert len(findings) == 3, findings
    assert "needs constant, positive scales" in findings[0] and "non-zero zero point" in findings[1]
    assert "feeds Transpose 't'; weight-only dequantization must feed a MatMul's weight input" in findings[2]
    assert user.op_type == "MatMul"


def test_refused_quantization_fails_before_tracing(tmp_path, tiny_model, monkeypatch):
    from export import onnx_export

    monkeypatch.setattr(onnx_export, "trace_to_onnx", lambda *a, **k: pytest.fail("traced"))
    with pytest.raises(QuantizeError, match="needs opset 21"):
        export_onnx(tiny_model, tmp_path / "m.onnx", opset=20, precision="fp32-int4-b32", log=lambda _: None)
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- the static-cache graph (MatMulNBits)

@pytest.mark.parametrize("name", ["fp32-int4-b32", "fp16-int8-b32"])
def test_static_cache_graph_quantized_by_onnxruntime_matches_its_reference(tiny_model, tiny_source, name):
    proto = build_static_cache_graph(tiny_model, 48, name, tiny_source.record)
    ops = [node.op_type for node in proto.graph.node]
    assert ops.count("MatMulNBits") == 8 and ops.count("MatMul") == 1  # the float logits head
    metadata = GraphMetadata.from_props({p.key: p.value for p in proto.metadata_props})
    assert metadata.precision == name and metadata.quantization.format == "matmulnbits"
    reference = parity_reference(tiny_model, metadata)  # MLAS formula, output rows in the graph's head order
    data = proto.SerializeToString()
    report = check_decoder(reference.model, lambda rows: StaticCacheDecoder(data, rows, "cpu"), [1, 3], [1, 19],
                           precision=reference.row.name)
    assert report, report.summary()


def test_the_static_cache_graph_is_quantized_in_blocks_only(tiny_model):
    from export.onnx_export import ExportError

    with pytest.raises(ExportError, match="MatMulNBits quantizes in blocks; give a block size"):
        build_static_cache_graph(tiny_model, 16, "fp16-int8")
