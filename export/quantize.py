"""Weight-only quantization of the transformer blocks' linear layers: the PyTorch reference and
the two graph rewrites, sharing one formula each.

- `fake_quantize(model, record, dtype)`: the model with every quantized Linear's weight replaced
  by what the graph computes from its integers and scales (the parity reference);
- `dequantize_weights(graph, skeleton, weights, row)`: the portable graph's MatMul weights become
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

import torch
from torch import Tensor, nn

from models.errors import ToolkitError
from models.graph_metadata import QuantizationRecord
from models.precision import Precision
from models.transformer import Transformer
from models.weights import ModelWeights

from .opset import MIN_OPSET

# DequantizeLinear takes float16 / bfloat16 scales from opset 19 (before, float32 only). Half
# graphs keep their scales in their own dtype so DequantizeLinear feeds MatMul directly, the
# weight-only pattern TensorRT fuses, rather than through a Cast.
HALF_SCALE_OPSET = 19
QUANTIZABLE_FLOATS = ("fp32", "fp16")  # bf16: ONNX Runtime's CPU provider cannot verify it


SCALE_SUFFIX = ".weight_scale"  # a quantized layer's scales initializer: "<layer>.weight_scale"


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

def _quantized_tensors(name: str, q: Tensor, scale: Tensor, row: Precision):
    """(quantized weight, scale) as onnx_ir tensors: INT8, or INT4 packed two to a byte."""
    import ml_dtypes
    import onnx_ir as ir

    values = q.numpy()
    values = values.astype(ml_dtypes.int4) if row.scheme.bits == 4 else values
    return (ir.Tensor(values, name=f"{name}.weight_quantized"),
            ir.Tensor(scale.numpy().astype(row.numpy_dtype), name=f"{name}{SCALE_SUFFIX}"))


class _LayerQuantizer:
    """Quantizes one layer at a time, when its integers or scales are first read, and keeps only
    the last layer's result (the writer reads a layer's two tensors one after the other)."""

    def __init__(self, weights: ModelWeights, row: Precision):
        self.weights, self.row, self.layer, self.tensors = weights, row, None, None

    def read(self, layer: str, which: int):
        if self.layer != layer:
            weight = self.weights.tensors[f"{layer}.weight"].detach().float().T  # (K, N) as the graph holds it
            q, scale = absmax_quantize(weight, self.row.scheme.bits, self.row.block_size, self.row.torch_dtype)
            self.layer, self.tensors = layer, _quantized_tensors(layer, q, scale, self.row)
        return self.tensors[which]


def _lazy(quantizer: _LayerQuantizer, layer: str, which: int, dtype, shape: tuple[int, ...], name: str):
    import onnx_ir as ir

    return ir.LazyTensor(lambda: quantizer.read(layer, which), dtype=dtype, shape=ir.Shape(shape), name=name)


def dequantize_weights(graph, skeleton: Transformer, weights: ModelWeights, row: Precision) -> QuantizationRecord:
    """Rewrite the traced graph (onnx_ir, weights bound lazily) in place: each quantized layer's
    MatMul weight becomes DequantizeLinear(q, scale) -> MatMul; q and scale are computed from the
    weights when written, one layer at a time."""
    import onnx_ir as ir

    from .streamed_weights import RECIPE

    layers = quantized_layers(skeleton, row)
    quantizer, found = _LayerQuantizer(weights, row), set()
    integer = ir.DataType.INT4 if row.scheme.bits == 4 else ir.DataType.INT8
    scale_type = {"fp32": ir.DataType.FLOAT, "fp16": ir.DataType.FLOAT16}[row.float_row.name]
    for node in list(graph.graph):
        recipe = node.inputs[1].meta.get(RECIPE) if node.op_type == "MatMul" and len(node.inputs) == 2 else None
        layer = recipe.state_name.removesuffix(".weight") if recipe is not None and recipe.transposed else None
        if layer not in layers or layer in found:
            continue
        weight, linear = node.inputs[1], layers[layer]
        rows, columns = linear.in_features, linear.out_features
        scale_shape = (rows // row.block_size, columns) if row.block_size else (columns,)
        values = []
        for which, (suffix, dtype, shape) in enumerate((("weight_quantized", integer, (rows, columns)),
                                                          (SCALE_SUFFIX[1:], scale_type, scale_shape))):
            name = f"{layer}.{suffix}"
            value = ir.Value(name=name, shape=ir.Shape(shape), type=ir.TensorType(dtype),
                             const_value=_lazy(quantizer, layer, which, dtype, shape, name))
            graph.graph.register_initializer(value)
            values.append(value)
        blocked = {"axis": 0, "block_size": row.block_size} if row.block_size else {"axis": 1}
        dequantize = ir.node("DequantizeLinear", values, attributes=blocked, name=f"{layer}.dequantize")
        dequantize.outputs[0].name = f"{layer}.weight"
        graph.graph.insert_before(node, dequantize)
        weight.replace_all_uses_with(dequantize.outputs[0])
        if not weight.uses():
            del graph.graph.initializers[weight.name]
        found.add(layer)
    missing = sorted(set(layers) - found)
    if missing:
        raise QuantizeError(f"the exported graph has no MatMul that reads {missing[0]}'s weight; "
                            "the exporter changed the graph's layout, so it cannot be quantized")
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
