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
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from models.files import staging_folder
from models.config import ModelConfig
from models.graph_metadata import STATIC_CACHE, GraphMetadata, WeightsRecord
from models.precision import Precision, precision as lookup_precision
from models.progress import phase
from models.rotary import inverse_frequencies
from models.static_cache import query_head_order
from models.signature import GraphSignature, layer_cache_names, static_cache_signature
from models.transformer import Transformer
from models.weights import LazyTensors, ModelWeights, dtype_of, shape_of

from .lint import LintReport
from .onnx_export import ExportError, ExportResult, check_output_path, commit, meta_skeleton, weights_record, write_graph
from .quantize import check_quantization, matmulnbits, quantized_layers

MAX_WEIGHT_BYTES = 2**31 - 2**26  # one protobuf message: what ONNX Runtime's quantizer holds in memory


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


def check_static_cache_model(config: ModelConfig, max_cache: int, row: Precision) -> None:
    """Refuse what this graph cannot express, before any work."""
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


class WeightsView:
    """The model's module tree with its tensors read from ModelWeights on access: structure
    (heads, fused, which biases exist) comes from a meta-device skeleton, a parameter or buffer
    from the weights by its state_dict name. So one weight recipe serves the shapes (on the
    skeleton itself) and the values (on this view), and no other weight is read."""

    def __init__(self, module: torch.nn.Module, weights: ModelWeights, prefix: str = ""):
        self._module, self._weights, self._prefix = module, weights, prefix

    def __getattr__(self, name: str):
        value = getattr(self._module, name)
        if name in self._module._parameters or name in self._module._buffers:
            return None if value is None else self._weights.tensors[self._prefix + name]
        if isinstance(value, torch.nn.Module):
            return WeightsView(value, self._weights, f"{self._prefix}{name}.")
        return value

    def __getitem__(self, index: int):
        return WeightsView(self._module[index], self._weights, f"{self._prefix}{index}.")


class StaticGraphWriter:
    """Writes the graph node by node: embedding, then per layer an attention block and a
    feed-forward block, then the final norm and the logits head. Residual adds are folded into
    the next block's Skip*Normalization, so each block hands on (hidden, residual, pending bias).

    Each weight is a recipe over the module tree (`make(module) -> Tensor`): run on the meta
    skeleton for its shape, and on a WeightsView only when the graph is written, so a checkpoint
    streams into the file one tensor at a time."""

    def __init__(self, weights: ModelWeights, max_cache: int, row: Precision):
        self.weights, self.config, self.row, self.max_cache = weights, weights.config, row, max_cache
        self.skeleton = meta_skeleton(weights.config, lookup_precision("fp32"))
        self.view = WeightsView(self.skeleton, weights)
        self.order = query_head_order(self.config.heads, self.config.kv_heads)
        self.rms = self.config.norm == "rms"
        self.nodes, self.constants, self.recipes = [], [], {}

    def weight(self, name: str, make, dtype=None) -> str:
        """Declare initializer `name` = make(module tree), in `dtype` (default: the row's)."""
        self.recipes[name] = (make, np.dtype(dtype or self.row.numpy_dtype))
        return name

    def node(self, op: str, inputs: list[str], outputs: list[str], domain: str = "", **attributes) -> list[str]:
        from onnx import helper

        self.nodes.append(helper.make_node(op, inputs, outputs, name=f"{op}_{len(self.nodes)}", domain=domain,
                                           **attributes))
        return outputs

    def embed(self) -> str:
        angles = torch.arange(self.max_cache, dtype=torch.float64)[:, None] * inverse_frequencies(
            self.config.dim_head, self.config.theta).double()
        self.weight("cos_cache", lambda m: angles.cos())
        self.weight("sin_cache", lambda m: angles.sin())
        return self.node("Gather", [self.weight("token_emb", lambda m: m.token_emb.weight), "input_ids"],
                         ["embedded"])[0]

    def norm(self, prefix: str, module, x: str, residual: str | None, bias: str | None) -> tuple[str, str]:
        """(normed, new residual): plain norm for the first, residual-add + norm after. `module`
        picks the norm from the module tree."""
        gamma = self.weight(f"{prefix}.weight", lambda m: module(m).weight)
        beta = [] if self.rms else [self.weight(f"{prefix}.bias", lambda m: module(m).bias)]
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

    def attention_block(self, i: int, hidden: str, residual: str | None, bias: str | None) -> tuple[str, str]:
        """Norm, packed QKV projection, GroupQueryAttention over the shared cache, output projection."""
        config, order = self.config, self.order
        normed, residual = self.norm(f"layers.{i}.attn.norm", lambda m: m.layers[i].attn.norm, hidden, residual,
                                     bias)
        qkv_weight = self.weight(f"layers.{i}.attn.qkv", lambda m: _qkv_weight(m.layers[i].attn, order))
        qkv = self.node("MatMul", [normed, qkv_weight], [f"layers.{i}.qkv"])[0]
        past_key, past_value, present_key, present_value = layer_cache_names(i)
        attended = self.node(
            "GroupQueryAttention",
            [qkv, "", "", past_key, past_value, "seqlens_k", "total_sequence_length", "cos_cache", "sin_cache"],
            [f"layers.{i}.attended", present_key, present_value], domain="com.microsoft",
            num_heads=config.heads, kv_num_heads=config.kv_heads, do_rotary=1,
            rotary_interleaved=int(config.rotary_pairing == "interleaved"), scale=config.dim_head**-0.5)[0]
        out = self.weight(f"layers.{i}.attn.out", lambda m: _out_weight(m.layers[i].attn, order))
        return self.node("MatMul", [attended, out], [f"layers.{i}.attn.delta"])[0], residual

    def feed_forward_block(self, i: int, hidden: str, residual: str) -> tuple[str, str, str | None]:
        """Norm, up projection with BiasGelu, down projection; its bias rides into the next norm."""
        ff = self.skeleton.layers[i].ff
        normed, residual = self.norm(f"layers.{i}.ff.norm", lambda m: m.layers[i].ff.norm, hidden, residual, None)
        up_weight = self.weight(f"layers.{i}.ff.in", lambda m: m.layers[i].ff.proj_in.weight.T)
        up = self.node("MatMul", [normed, up_weight], [f"layers.{i}.ff.up"])[0]
        if ff.proj_in.bias is not None:
            up_bias = self.weight(f"layers.{i}.ff.in.bias", lambda m: m.layers[i].ff.proj_in.bias)
            act = self.node("BiasGelu", [up, up_bias], [f"layers.{i}.ff.act"], domain="com.microsoft")[0]
        else:
            act = self.node("Gelu", [up], [f"layers.{i}.ff.act"], domain="com.microsoft")[0]
        down_weight = self.weight(f"layers.{i}.ff.out", lambda m: m.layers[i].ff.proj_out.weight.T)
        hidden = self.node("MatMul", [act, down_weight], [f"layers.{i}.ff.delta"])[0]
        bias = (self.weight(f"layers.{i}.ff.out.bias", lambda m: m.layers[i].ff.proj_out.bias)
                if ff.proj_out.bias is not None else None)
        return hidden, residual, bias

    def logits_head(self, hidden: str, residual: str | None, bias: str | None) -> None:
        """Final norm, the positions `logits_index` asks for, then the logits head in float32:
        rounding logits to fp16 (a step of 0.004 at |logit| 4) flips greedy near-ties. Picking
        positions first is what makes a prompt cheap: the head is the largest matmul of a prefill."""
        from onnx import TensorProto

        normed, _ = self.norm("norm", lambda m: m.norm, hidden, residual, bias)
        # GatherND with batch_dims=1 picks (b, k) positions of (b, s, dim) with no shape arithmetic, so
        # every node stays on the CUDA provider and the step can be captured as a CUDA graph
        index = self.node("Unsqueeze", ["logits_index", self.constant("last_axis", [-1])], ["logits_index.3d"])[0]
        normed = self.node("GatherND", [normed, index], ["norm.picked"], batch_dims=1)[0]
        if self.row.half:
            normed = self.node("Cast", [normed], ["norm.picked.float"], to=TensorProto.FLOAT)[0]
        head = self.weight("to_logits", lambda m: m.to_logits.weight.T, np.float32)
        self.node("MatMul", [normed, head], ["logits"])

    def constant(self, name: str, values: list[int]) -> str:
        from onnx import numpy_helper

        self.constants.append(numpy_helper.from_array(np.array(values, dtype=np.int64), name))
        return name

    def build(self):
        """The graph as an onnx_ir Model whose weights are lazy: each is read when serialized."""
        hidden, residual, bias = self.embed(), None, None
        for i in range(self.config.depth):
            hidden, residual = self.attention_block(i, hidden, residual, bias)
            hidden, residual, bias = self.feed_forward_block(i, hidden, residual)
        self.logits_head(hidden, residual, bias)
        return self.bind(self.assemble(static_cache_signature(self.config, self.max_cache, self.row.dtype)))

    def _shape(self, make) -> tuple[int, ...]:
        return tuple(make(self.skeleton).shape)

    def assemble(self, signature: GraphSignature):
        """The nodes as a ModelProto whose weights are still graph inputs (placeholders)."""
        from onnx import helper

        def value_info(name, dtype, dims):
            return helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(np.dtype(dtype)), list(dims))

        weights = [value_info(name, dtype, self._shape(make)) for name, (make, dtype) in self.recipes.items()]
        graph = helper.make_graph(self.nodes, "rotary_transformer_static_cache",
                                  [value_info(s.name, s.dtype, s.dims) for s in signature.inputs] + weights,
                                  [value_info(s.name, s.dtype, s.dims) for s in signature.outputs], self.constants)
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])

    def bind(self, proto):
        """Turn the weight placeholders into initializers whose values are read on demand."""
        import onnx_ir as ir

        model = ir.serde.deserialize_model(proto)
        model.ir_version = 8
        for value in [v for v in model.graph.inputs if v.name in self.recipes]:
            make, dtype = self.recipes[value.name]
            model.graph.inputs.remove(value)
            value.const_value = ir.LazyTensor(
                lambda make=make, dtype=dtype, name=value.name: ir.Tensor(self._read(make, dtype), name=name),
                dtype=ir.DataType.from_numpy(dtype), shape=ir.Shape(self._shape(make)), name=value.name)
            model.graph.register_initializer(value)
        return model

    def _read(self, make, dtype: np.dtype) -> np.ndarray:
        return np.ascontiguousarray(make(self.view).detach().float().cpu().numpy().astype(dtype))


def _weights_of(model: Transformer | ModelWeights) -> ModelWeights:
    return model if isinstance(model, ModelWeights) else ModelWeights.of(model)


def _static_graph(weights: ModelWeights, max_cache: int, row: Precision):
    """(onnx_ir Model, quantization record): the graph with lazy weights, or for a quantized row
    the graph ONNX Runtime's quantizer rewrote (in memory, so limited to one protobuf message)."""
    import onnx_ir as ir

    check_static_cache_model(weights.config, max_cache, row)
    skeleton = meta_skeleton(weights.config, row.float_row)
    check_quantization(skeleton, row)
    if row.scheme is not None and weights.nbytes(row.float_row.torch_dtype) > MAX_WEIGHT_BYTES:
        raise ExportError("a quantized static-cache graph is quantized in memory, which holds at most 2 GB of weights; "
                          "quantize the --with-past graph instead")
    graph = StaticGraphWriter(weights, max_cache, row.float_row).build()
    if row.scheme is None:
        return graph, None
    proto, record = matmulnbits(ir.serde.serialize_model(graph), row,
                                {layer: _graph_weight(layer) for layer in quantized_layers(skeleton, row)})
    return ir.serde.deserialize_model(proto), record


def _metadata(weights: ModelWeights, max_cache: int, row: Precision, record: WeightsRecord | None,
              quantization) -> GraphMetadata:
    return GraphMetadata(kind=STATIC_CACHE, precision=row.name, config=weights.config,
                         weights=weights_record(weights, record), max_cache=max_cache, opset=17,
                         exporter="export/static_cache_graph.py (onnx.helper, onnx_ir)", torch_version=torch.__version__,
                         exported_at=datetime.now(timezone.utc).isoformat(timespec="seconds"), quantization=quantization)


def build_static_cache_graph(model: Transformer | ModelWeights, max_cache: int, precision: str = "fp16",
                             weights: WeightsRecord | None = None):
    """The ONNX Runtime-only decoder (an onnx.ModelProto, every weight in it) for `model`, with a
    `max_cache`-token cache."""
    import onnx_ir as ir

    source, row = _weights_of(model), lookup_precision(precision)
    graph, quantization = _static_graph(source, max_cache, row)
    proto = ir.serde.serialize_model(graph)
    _metadata(source, max_cache, row, weights, quantization).write(proto)
    return proto


LOAD_CHECK_BYTES = 256 << 20  # above this, ONNX Runtime's load check runs on a small copy of the graph
CHECK_VOCABULARY = 256


def check_loads_in_onnxruntime(data: bytes | Path) -> None:
    """onnx.checker does not know ONNX Runtime's contrib ops (SimplifiedLayerNormalization is even
    registered under the default domain), so the consumer itself is the check: it must load."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    try:
        onnxruntime.InferenceSession(data if isinstance(data, bytes) else str(data), options,
                                     providers=["CPUExecutionProvider"])
    except Exception as error:
        raise ExportError(f"ONNX Runtime rejected the static-cache graph: {str(error).splitlines()[0]}") from None


def load_check_copy(weights: ModelWeights) -> ModelWeights:
    """One block of the same weights and the first CHECK_VOCABULARY tokens: the same ops, attributes
    and block shapes as the whole graph, small enough for ONNX Runtime's CPU session to hold."""
    one = weights.truncated(1)
    vocabulary = min(CHECK_VOCABULARY, weights.config.num_tokens)
    cut = {"token_emb.weight", "to_logits.weight"}
    tensors = LazyTensors({name: (lambda name=name: one.tensors[name][:vocabulary] if name in cut else one.tensors[name])
                           for name in one.tensors},
                          {name: (vocabulary, *shape_of(one.tensors, name)[1:]) if name in cut else
                           shape_of(one.tensors, name) for name in one.tensors},
                          {name: dtype_of(one.tensors, name) for name in one.tensors})
    return ModelWeights(one.config.replace(num_tokens=vocabulary), tensors)


def _load_checker(weights: ModelWeights, max_cache: int, precision: str, log):
    """The check of the written file: ONNX Runtime loads it, or, for weights past LOAD_CHECK_BYTES
    (of which its CPU session would hold several copies), the same graph written from load_check_copy."""
    if weights.nbytes() <= LOAD_CHECK_BYTES:
        return check_loads_in_onnxruntime

    def check(_path: Path) -> None:
        log("  ONNX Runtime's load check runs on a one-layer copy of the graph (same ops and block shapes)")
        check_loads_in_onnxruntime(build_static_cache_graph(load_check_copy(weights), max_cache, precision)
                                   .SerializeToString())

    return check


def export_static_cache(model: Transformer | ModelWeights, output, max_cache: int, precision: str = "fp16",
                        weights: WeightsRecord | None = None, verify=None, log=print) -> ExportResult:
    """Write the static-cache graph to `output` atomically, weights streamed one tensor at a time
    (into OUTPUT.data past INLINE_GRAPH_BYTES), after checking that ONNX Runtime loads it and that
    `verify(path)`, if given, passes."""
    output = Path(output)
    check_output_path(output)
    source, row = _weights_of(model), lookup_precision(precision)
    started = time.perf_counter()
    with phase(log, "writing the graph",
               f"writing the ONNX Runtime static-cache decoder ({precision}, {max_cache}-token cache) ..."):
        graph, quantization = _static_graph(source, max_cache, row)
    metadata = _metadata(source, max_cache, row, weights, quantization)
    with staging_folder(output) as folder:
        written, report = write_graph(graph, folder / output.name, 17, metadata, _op_counts, True, log,
                                      check=_load_checker(source, max_cache, precision, log))
        seconds = time.perf_counter() - started
        if verify is not None:
            verify(written[-1])
        commit(written, output)
    return ExportResult(output, seconds, 17, report, static_cache_signature(source.config, max_cache,
                                                                           row.float_row.dtype))


def _op_counts(proto) -> LintReport:
    """This graph is written op by op, so there is nothing to lint; the report counts its ops."""
    return LintReport(Counter(node.op_type for node in proto.graph.node))
