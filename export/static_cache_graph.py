"""An ONNX Runtime-only decoder for the fast CUDA path, written from the weights op by op.

The portable graph (export/onnx_export.py) spells attention out in standard ops so TensorRT
can parse it; each decode step then costs ~800 small kernels and ONNX Runtime's per-node host
overhead. This graph uses ONNX Runtime's fused contrib ops instead:

- `com.microsoft.GroupQueryAttention` on packed QKV: rotary, cache append and flash
  attention in one node, reading and writing a static (batch, kv_heads, max_cache, dim_head)
  cache that past and present share (`past_present_share_buffer`), so every decode step has
  the same shapes and addresses and can be replayed as a CUDA graph;
- `SkipSimplifiedLayerNormalization` / `SkipLayerNormalization`: residual add + norm in one
  kernel (statistics in float32), `BiasGelu` for the feed-forward; the logits head in float32.

Inputs and outputs are `models.signature.static_cache_signature`. Prompts are right-padded:
GroupQueryAttention places each row's next token at `seqlens_k`. Keep this graph away from TensorRT: its parser
has no com.microsoft ops. With a quantized precision row (fp16-int4-b32), ONNX Runtime's quantizer turns the
blocks' MatMuls into `com.microsoft.MatMulNBits` (export/quantize.py).
"""
from __future__ import annotations

import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from models.files import atomic_path
from models.graph_metadata import STATIC_CACHE, GraphMetadata, WeightsRecord
from models.precision import Precision, precision as lookup_precision
from models.progress import phase
from models.rotary import inverse_frequencies
from models.static_cache import query_head_order
from models.signature import GraphSignature, layer_cache_names, static_cache_signature
from models.transformer import Transformer
from models.weights import ModelWeights

from .onnx_export import ExportError, check_output_path, initializer_bytes, weights_record
from .quantize import check_quantization, matmulnbits, quantized_layers

MAX_WEIGHT_BYTES = 2**31 - 2**26  # one protobuf message; this graph has no external-data path


def _qkv_weight(attn, order: list[int]) -> torch.Tensor:
    """(dim, (heads + 2 kv_heads) * dim_head): query heads reordered, then key, then value."""
    if attn.fused:
        inner = attn.heads * attn.dim_head
        weight = attn.to_qkv.weight
        q, kv = weight[:inner], weight[inner:]
    else:
        q, kv = attn.to_q.weight, torch.cat((attn.to_k.weight, attn.to_v.weight))
    q = q.unflatten(0, (attn.heads, attn.dim_head))[order].flatten(0, 1)
    return torch.cat((q, kv)).T


def out_rows(order: list[int], dim_head: int) -> list[int]:
    """The output projection's input rows as this graph holds them: grouped after the reordered query heads."""
    return [head * dim_head + d for head in order for d in range(dim_head)]


def _out_weight(attn, order: list[int]) -> torch.Tensor:
    """(heads * dim_head, dim), rows following the reordered query heads."""
    return attn.to_out.weight.T[out_rows(order, attn.dim_head)]


# Each quantizable Linear's matrix in this graph. Only the output projection's rows (the input
# dimension, along which quantization blocks run) are reordered; reordered query columns do not
# change per-column scales.
_GRAPH_WEIGHTS = {"attn.to_qkv": "attn.qkv", "attn.to_q": "attn.qkv", "attn.to_k": "attn.qkv",
                  "attn.to_v": "attn.qkv", "attn.to_out": "attn.out", "ff.proj_in": "ff.in", "ff.proj_out": "ff.out"}


def static_row_orders(model: Transformer) -> dict[str, list[int]]:
    """Per Linear, the order of its input rows in this graph where it differs from the model's
    (what a fake-quantized reference needs to cut the same blocks)."""
    config = model.config
    rows = out_rows(query_head_order(config.heads, config.kv_heads), config.dim_head)
    return {} if rows == sorted(rows) else {f"layers.{i}.attn.to_out": rows for i in range(config.depth)}


def _graph_weight(layer: str) -> str:
    prefix, _, rest = layer.partition(".")
    index, _, module = rest.partition(".")
    return "to_logits" if layer == "to_logits" else f"{prefix}.{index}.{_GRAPH_WEIGHTS[module]}"


def check_static_cache_model(model: Transformer, max_cache: int, row: Precision) -> None:
    """Refuse what this graph cannot express, before any work."""
    config = model.config
    if row.scheme is not None and row.block_size is None:
        raise ExportError("the static-cache graph's MatMulNBits quantizes in blocks; give a block size (--block-size)")
    if not row.static_cache:
        supported = "fp32 or fp16"
        raise ExportError(f"the static-cache graph is written in {supported}, not {row.name}")
    if not config.causal:
        raise ExportError("the static-cache graph needs a causal model (GroupQueryAttention is causal only)")
    if config.dim_head % 16:
        raise ExportError(f"GroupQueryAttention's rotary needs dim_head divisible by 16, this model has "
                          f"{config.dim_head}; use the portable graph (export-model --with-past)")
    if max_cache < 1:
        raise ExportError("--static-cache must be at least 1 token")
    if config.max_seq_len and max_cache > config.max_seq_len:
        raise ExportError(f"--static-cache {max_cache} is past the model's max_seq_len {config.max_seq_len}")


class StaticGraphWriter:
    """Writes the graph node by node: embedding, then per layer an attention block and a
    feed-forward block, then the final norm and the logits head. Residual adds are folded into
    the next block's Skip*Normalization, so each block hands on (hidden, residual, pending bias)."""

    def __init__(self, model: Transformer, max_cache: int, row: Precision):
        self.model, self.config, self.row, self.max_cache = model, model.config, row, max_cache
        self.order = query_head_order(self.config.heads, self.config.kv_heads)
        self.rms = self.config.norm == "rms"
        self.nodes, self.initializers = [], []

    def weight(self, name: str, tensor: torch.Tensor, dtype=None) -> str:
        from onnx import numpy_helper

        array = tensor.detach().float().cpu().numpy().astype(dtype or self.row.numpy_dtype)
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def node(self, op: str, inputs: list[str], outputs: list[str], domain: str = "", **attributes) -> list[str]:
        from onnx import helper

        self.nodes.append(helper.make_node(op, inputs, outputs, name=f"{op}_{len(self.nodes)}", domain=domain,
                                           **attributes))
        return outputs

    def embed(self) -> str:
        angles = torch.arange(self.max_cache, dtype=torch.float64)[:, None] * inverse_frequencies(
            self.config.dim_head, self.config.theta).double()
        self.weight("cos_cache", angles.cos())
        self.weight("sin_cache", angles.sin())
        return self.node("Gather", [self.weight("token_emb", self.model.token_emb.weight), "input_ids"], ["embedded"])[0]

    def norm(self, prefix: str, module, x: str, residual: str | None, bias: str | None) -> tuple[str, str]:
        """(normed, new residual): plain norm for the first, residual-add + norm after."""
        gamma = self.weight(f"{prefix}.weight", module.weight)
        beta = [] if self.rms else [self.weight(f"{prefix}.bias", module.bias)]
        if residual is None:
            op = "SimplifiedLayerNormalization" if self.rms else "LayerNormalization"
            out = self.node(op, [x, gamma, *beta], [f"{prefix}.out"], axis=-1, epsilon=self.config.norm_eps,
                            stash_type=1)[0]
            return out, x
        op = "SkipSimplifiedLayerNormalization" if self.rms else "SkipLayerNormalization"
        inputs = [x, residual, gamma, *beta, *([bias] if bias else [])]  # Skip*Norm: input + skip + bias
        outputs = self.node(op, inputs, [f"{prefix}.out", "", "", f"{prefix}.residual"], domain="com.microsoft",
                            epsilon=self.config.norm_eps)
        return outputs[0], outputs[3]

    def attention_block(self, i: int, attn, hidden: str, residual: str | None, bias: str | None) -> tuple[str, str]:
        """Norm, packed QKV projection, GroupQueryAttention over the shared cache, output projection."""
        config = self.config
        normed, residual = self.norm(f"layers.{i}.attn.norm", attn.norm, hidden, residual, bias)
        qkv = self.node("MatMul", [normed, self.weight(f"layers.{i}.attn.qkv", _qkv_weight(attn, self.order))],
                        [f"layers.{i}.qkv"])[0]
        past_key, past_value, present_key, present_value = layer_cache_names(i)
        attended = self.node(
            "GroupQueryAttention",
            [qkv, "", "", past_key, past_value, "seqlens_k", "total_sequence_length", "cos_cache", "sin_cache"],
            [f"layers.{i}.attended", present_key, present_value], domain="com.microsoft",
            num_heads=config.heads, kv_num_heads=config.kv_heads, do_rotary=1,
            rotary_interleaved=int(config.rotary_pairing == "interleaved"), scale=config.dim_head**-0.5)[0]
        out = self.weight(f"layers.{i}.attn.out", _out_weight(attn, self.order))
        return self.node("MatMul", [attended, out], [f"layers.{i}.attn.delta"])[0], residual

    def feed_forward_block(self, i: int, ff, hidden: str, residual: str) -> tuple[str, str, str | None]:
        """Norm, up projection with BiasGelu, down projection; its bias rides into the next norm."""
        normed, residual = self.norm(f"layers.{i}.ff.norm", ff.norm, hidden, residual, None)
        up = self.node("MatMul", [normed, self.weight(f"layers.{i}.ff.in", ff.proj_in.weight.T)],
                       [f"layers.{i}.ff.up"])[0]
        if ff.proj_in.bias is not None:
            act = self.node("BiasGelu", [up, self.weight(f"layers.{i}.ff.in.bias", ff.proj_in.bias)],
                            [f"layers.{i}.ff.act"], domain="com.microsoft")[0]
        else:
            act = self.node("Gelu", [up], [f"layers.{i}.ff.act"], domain="com.microsoft")[0]
        hidden = self.node("MatMul", [act, self.weight(f"layers.{i}.ff.out", ff.proj_out.weight.T)],
                           [f"layers.{i}.ff.delta"])[0]
        bias = self.weight(f"layers.{i}.ff.out.bias", ff.proj_out.bias) if ff.proj_out.bias is not None else None
        return hidden, residual, bias

    def logits_head(self, hidden: str, residual: str | None, bias: str | None) -> None:
        """Final norm, the positions `logits_index` asks for, then the logits head in float32:
        rounding logits to fp16 (a step of 0.004 at |logit| 4) flips greedy near-ties. Picking
        positions first is what makes a prompt cheap: the head is the largest matmul of a prefill."""
        from onnx import TensorProto

        normed, _ = self.norm("norm", self.model.norm, hidden, residual, bias)
        # GatherND with batch_dims=1 picks (b, k) positions of (b, s, dim) with no shape arithmetic, so
        # every node stays on the CUDA provider and the step can be captured as a CUDA graph
        index = self.node("Unsqueeze", ["logits_index", self.constant("last_axis", [-1])], ["logits_index.3d"])[0]
        normed = self.node("GatherND", [normed, index], ["norm.picked"], batch_dims=1)[0]
        if self.row.half:
            normed = self.node("Cast", [normed], ["norm.picked.float"], to=TensorProto.FLOAT)[0]
        self.node("MatMul", [normed, self.weight("to_logits", self.model.to_logits.weight.T, np.float32)], ["logits"])

    def constant(self, name: str, values: list[int]) -> str:
        from onnx import numpy_helper

        self.initializers.append(numpy_helper.from_array(np.array(values, dtype=np.int64), name))
        return name

    def build(self):
        hidden, residual, bias = self.embed(), None, None
        for i, layer in enumerate(self.model.layers):
            hidden, residual = self.attention_block(i, layer.attn, hidden, residual, bias)
            hidden, residual, bias = self.feed_forward_block(i, layer.ff, hidden, residual)
        self.logits_head(hidden, residual, bias)
        return self.assemble(static_cache_signature(self.config, self.max_cache, self.row.dtype))

    def assemble(self, signature: GraphSignature):
        from onnx import helper

        def value_info(spec):
            elem = helper.np_dtype_to_tensor_dtype(np.dtype(spec.dtype))
            return helper.make_tensor_value_info(spec.name, elem, list(spec.dims))

        graph = helper.make_graph(self.nodes, "rotary_transformer_static_cache",
                                  [value_info(s) for s in signature.inputs], [value_info(s) for s in signature.outputs],
                                  self.initializers)
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])


def build_static_cache_graph(model: Transformer, max_cache: int, precision: str = "fp16",
                             weights: WeightsRecord | None = None):
    """The ONNX Runtime-only decoder (an onnx.ModelProto) for `model`, with a `max_cache`-token cache."""
    row = lookup_precision(precision)
    check_static_cache_model(model, max_cache, row)
    check_quantization(model, row)
    proto = StaticGraphWriter(model, max_cache, row.float_row).build()
    proto.ir_version = 8
    record = None
    if row.scheme is not None:
        proto, record = matmulnbits(proto, row, {layer: _graph_weight(layer) for layer in quantized_layers(model, row)})
    GraphMetadata(kind=STATIC_CACHE, precision=row.name, config=model.config, weights=weights_record(ModelWeights.of(model), weights),
                  max_cache=max_cache, opset=17, exporter="export/static_cache_graph.py (onnx.helper)",
                  torch_version=torch.__version__, exported_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                  quantization=record).write(proto)
    return proto


def check_loads_in_onnxruntime(data: bytes) -> None:
    """onnx.checker does not know ONNX Runtime's contrib ops (SimplifiedLayerNormalization is even
    registered under the default domain), so the consumer itself is the check: it must load."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    try:
        onnxruntime.InferenceSession(data, options, providers=["CPUExecutionProvider"])
    except Exception as error:
        raise ExportError(f"ONNX Runtime rejected the static-cache graph: {str(error).splitlines()[0]}") from None


def export_static_cache(model: Transformer, output, max_cache: int, precision: str = "fp16",
                        weights: WeightsRecord | None = None, verify=None, log=print) -> float:
    """Write the static-cache graph to `output` atomically, after checking that ONNX Runtime loads it
    and that `verify(serialized bytes)`, if given, passes. Returns the seconds the graph took."""
    output = Path(output)
    check_output_path(output)
    started = time.perf_counter()
    with phase(log, "writing the graph",
               f"writing the ONNX Runtime static-cache decoder ({precision}, {max_cache}-token cache) ..."):
        proto = build_static_cache_graph(model, max_cache, precision, weights)
        if initializer_bytes(proto) > MAX_WEIGHT_BYTES:
            raise ExportError("the static-cache graph is written as one file and is limited to 2 GB of weights")
        data = proto.SerializeToString()
    seconds = time.perf_counter() - started
    with phase(log, "loading the graph in ONNX Runtime", ""):
        check_loads_in_onnxruntime(data)
    if verify is not None:
        verify(data)
    with atomic_path(output) as temporary:
        temporary.write_bytes(data)
    return seconds
