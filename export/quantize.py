"""Weight-only quantization of the transformer blocks' linear layers: the PyTorch reference and
the two graph rewrites, sharing one formula each.

- `fake_quantize(model, record, dtype)`: the model with every quantized Linear's weight replaced
  by what the graph computes from its integers and scales (the parity reference);
- `add_weight_dequantization(proto, model, row)`: the portable graph's MatMul weights become
  int8 / int4 initializers -> DequantizeLinear (positive scales) -> MatMul, standard ONNX that
  TensorRT and ONNX Runtime both read (formula "absmax");
- `matmulnbits(proto, row, initializers)`: ONNX Runtime's own MatMulNBits quantizer over the
  static-cache graph (its formula, "ort-mlas", is reproduced bit for bit by the reference).

Weights are (K, N) as the graphs hold them (y = x @ W): scales run per output column, blocks
along K. The embedding and norms are never quantized; the logits head only if the scheme says so.
"""
from __future__ import annotations

import copy
import logging
from contextlib import contextmanager

import numpy as np
import torch
from torch import Tensor, nn

from models.errors import ToolkitError
from models.graph_metadata import QuantizationRecord
from models.precision import Precision
from models.transformer import Transformer

from .opset import MIN_OPSET

# DequantizeLinear takes float16 / bfloat16 scales from opset 19 (before, float32 only). Half
# graphs keep their scales in their own dtype so DequantizeLinear feeds MatMul directly, the
# weight-only pattern TensorRT fuses, rather than through a Cast.
HALF_SCALE_OPSET = 19
QUANTIZABLE_FLOATS = ("fp32", "fp16")  # bf16: ONNX Runtime's CPU provider cannot verify it


class QuantizeError(ToolkitError):
    """A quantization the graph cannot express, or that the model's shapes do not allow."""


def required_opset(row: Precision) -> int:
    """The lowest opset whose DequantizeLinear expresses `row`'s weights (MIN_OPSET for float rows)."""
    if row.scheme is None:
        return MIN_OPSET
    return max(MIN_OPSET, row.scheme.qdq_opset, HALF_SCALE_OPSET if row.half else MIN_OPSET)


def quantized_layers(model: Transformer, row: Precision) -> dict[str, nn.Linear]:
    """The Linear modules `row`'s scheme quantizes, by name: every block's projections, and the
    logits head only when the scheme says so."""
    head = row.scheme is not None and row.scheme.head
    return {name: module for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and (name.startswith("layers.") or head)}


def check_quantization(model: Transformer, row: Precision, opset: int | None = None) -> int:
    """Refuse what cannot be expressed (one sentence each); return the opset to export at."""
    needed = required_opset(row)
    if row.scheme is None:
        return opset or needed
    scheme = row.scheme.name
    if row.float_row.name not in QUANTIZABLE_FLOATS:
        raise QuantizeError(f"--quantize writes fp32 or fp16 activations, not {row.float_row.name}; "
                            "export with --dtype fp16 (or fp32)")
    if opset is not None and opset < needed:
        why = ("block-wise int4 DequantizeLinear arrived in opset 21" if scheme == "int4" else
               "float16 DequantizeLinear scales arrived in opset 19")
        raise QuantizeError(f"--quantize {scheme} with --dtype {row.float_row.name} needs opset {needed} or newer "
                            f"({why}); pass --opset {needed} or leave --opset out")
    for name, linear in quantized_layers(model, row).items():
        if row.block_size and linear.in_features % row.block_size:
            fits = [b for b in row.scheme.block_sizes if linear.in_features % b == 0]
            raise QuantizeError(f"--block-size {row.block_size} does not divide {name}'s input size "
                                f"{linear.in_features}; choose {' or '.join(map(str, fits)) or 'another model'}")
    return opset or needed


# --------------------------------------------------------------------------- formulas

def absmax_quantize(weight: Tensor, bits: int, block: int | None, scale_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """(q int8 (K, N), positive scales in `scale_dtype`: (N,) per output channel or (K / block, N)).
    scale = max|w| / (2^(bits-1) - 1), rounded to its dtype; q = round_half_even(w / scale), clipped."""
    rows, columns = weight.shape
    qmax = 2 ** (bits - 1) - 1
    blocks = weight.detach().float().reshape(rows // (block or rows), block or rows, columns)  # (blocks, block, N)
    scale = (blocks.abs().amax(1) / qmax).to(scale_dtype)  # (blocks, N)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero block: any positive scale
    q = torch.round(blocks / scale.float()[:, None, :]).clamp(-qmax - 1, qmax)  # torch.round: half to even
    q = q.reshape(rows, columns).to(torch.int8)
    return q, scale if block else scale[0]


def dequantize(q: Tensor, scale: Tensor, block: int | None) -> Tensor:
    """What DequantizeLinear computes, in float32: q * scale, the scale repeated over its block."""
    scale = scale.float().reshape(-1, q.shape[1])
    return q.float() * scale.repeat_interleave(block or q.shape[0], dim=0)


def absmax_fake_quant(weight: Tensor, bits: int, block: int | None, dtype: torch.dtype) -> Tensor:
    q, scale = absmax_quantize(weight, bits, block, dtype)
    return dequantize(q, scale, block)


def mlas_fake_quant(weight: Tensor, bits: int, block: int | None, dtype: torch.dtype) -> Tensor:
    """ONNX Runtime's symmetric MatMulNBits quantization (MLAS `range2scale`), bit for bit: per
    column and block, m = the signed weight of largest magnitude, scale = -m / 2^(bits-1) in the
    weights' dtype, q = floor(w * (1 / scale) + mid + 0.5) clipped to [0, 2^bits - 1] (mid is
    the implicit zero point), dequantized as (q - mid) * scale."""
    rows, columns = weight.shape
    mid = 2 ** (bits - 1)
    blocks = weight.to(dtype).float().reshape(rows // block, block, columns)
    high, low = blocks.amax(1), blocks.amin(1)
    signed_max = torch.where(high.abs() > low.abs(), high, low)
    scale = (-signed_max / mid).to(dtype).float()
    reciprocal = torch.where(scale != 0, 1.0 / scale, torch.zeros_like(scale))
    shifted = blocks * reciprocal[:, None, :] + mid  # float32 multiply, then add, as MLAS does
    q = torch.floor(shifted.double() + 0.5).clamp(0, 2 * mid - 1)
    return ((q - mid).float() * scale[:, None, :]).reshape(rows, columns)


FORMULAS = {"absmax": absmax_fake_quant, "ort-mlas": mlas_fake_quant}  # keys: models.graph_metadata.SCALE_FORMULAS


def fake_quantize(model: Transformer, record: QuantizationRecord, dtype: torch.dtype,
                  row_orders: dict[str, list[int]] | None = None) -> Transformer:
    """A copy of `model` (float32) whose `record.layers` hold the weights the graph computes.
    `dtype` is the graph's weight dtype (scales are rounded to it); `row_orders` gives, per
    layer, the order of the input rows in the graph's matrix where it differs from the model's
    (blocks run along those rows)."""
    quantize = FORMULAS[record.formula]
    result = copy.deepcopy(model).float()
    modules = dict(result.named_modules())
    with torch.no_grad():
        for name in record.layers:
            linear = modules[name]
            rows = (row_orders or {}).get(name)
            weight = linear.weight.T if rows is None else linear.weight.T[rows]  # (K, N) as the graph holds it
            fake = quantize(weight, record.bits, record.block_size, dtype)
            if rows is not None:
                fake = fake[torch.argsort(torch.as_tensor(rows))]
            linear.weight.copy_(fake.T)
    return result


# --------------------------------------------------------------------------- the portable graph: Q/DQ

def _weight_bytes(weight: Tensor, dtype: np.dtype) -> bytes:
    return np.ascontiguousarray(weight.detach().float().T.numpy().astype(dtype)).tobytes()


def _dequantize_initializers(name: str, q: Tensor, scale: Tensor, row: Precision):
    """(quantized weight, scale) initializers: INT8, or INT4 packed two to a byte."""
    import ml_dtypes
    from onnx import numpy_helper

    values = q.numpy()
    values = values.astype(ml_dtypes.int4) if row.scheme.bits == 4 else values
    return (numpy_helper.from_array(values, f"{name}.weight_quantized"),
            numpy_helper.from_array(scale.numpy().astype(row.numpy_dtype), f"{name}.weight_scale"))


def add_weight_dequantization(proto, model: Transformer, row: Precision) -> QuantizationRecord:
    """Rewrite the exported graph in place: each quantized layer's MatMul weight (found by its
    bytes, as the exporter folded it to (K, N)) becomes DequantizeLinear(q, scale) -> MatMul."""
    from onnx import helper

    layers = quantized_layers(model, row)
    wanted = {_weight_bytes(linear.weight, row.numpy_dtype): name for name, linear in layers.items()}
    graph = proto.graph
    weights = {t.name: t for t in graph.initializer if len(t.dims) == 2}
    found: dict[str, str] = {}  # initializer -> layer
    for node in graph.node:
        if node.op_type == "MatMul" and node.input[1] in weights and weights[node.input[1]].raw_data in wanted:
            found[node.input[1]] = wanted[weights[node.input[1]].raw_data]
    missing = sorted(set(layers) - set(found.values()))
    if missing:
        raise QuantizeError(f"the exported graph has no MatMul weight equal to {missing[0]}'s; "
                            "the exporter changed the graph's layout, so it cannot be quantized")
    nodes, written = [], set()
    for node in graph.node:
        layer = found.get(node.input[1]) if node.op_type == "MatMul" else None
        if layer is not None and layer not in written:  # one DequantizeLinear per weight, before its first use
            q, scale = absmax_quantize(layers[layer].weight.T, row.scheme.bits, row.block_size, row.torch_dtype)
            graph.initializer.extend(_dequantize_initializers(layer, q, scale, row))
            blocked = {"axis": 0, "block_size": row.block_size} if row.block_size else {"axis": 1}
            nodes.append(helper.make_node("DequantizeLinear", [f"{layer}.weight_quantized", f"{layer}.weight_scale"],
                                          [f"{layer}.weight"], name=f"{layer}.dequantize", **blocked))
            written.add(layer)
        if layer is not None:
            node.input[1] = f"{layer}.weight"
        nodes.append(node)
    kept = [t for t in graph.initializer if t.name not in found]
    graph.ClearField("initializer")
    graph.initializer.extend(kept)
    graph.ClearField("node")
    graph.node.extend(nodes)
    return QuantizationRecord(row.scheme.name, row.block_size, "qdq", "absmax", tuple(layers))


# --------------------------------------------------------------------------- the static-cache graph: MatMulNBits

@contextmanager
def _quiet_quantizer():
    logger = logging.getLogger("onnxruntime.quantization")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def matmulnbits(proto, row: Precision, initializers: dict[str, str]):
    """ONNX Runtime's MatMulNBits quantizer (symmetric, DEFAULT algorithm) over the MatMuls whose
    weight is one of `initializers` (layer -> initializer name); returns (new proto, record).
    The quantizer rewrites the proto it is given."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    targets = set(initializers.values())
    others = [node.name for node in proto.graph.node if node.op_type == "MatMul" and node.input[1] not in targets]
    with _quiet_quantizer():
        quantizer = MatMulNBitsQuantizer(proto, bits=row.scheme.bits, block_size=row.block_size, is_symmetric=True,
                                         nodes_to_exclude=others)
        quantizer.process()
    result = quantizer.model.model
    written = sum(node.op_type == "MatMulNBits" for node in result.graph.node)
    if written != len(targets):
        raise QuantizeError(f"ONNX Runtime's quantizer wrote {written} MatMulNBits nodes for {len(targets)} weights")
    return result, QuantizationRecord(row.scheme.name, row.block_size, "matmulnbits", "ort-mlas",
                                      tuple(initializers))
