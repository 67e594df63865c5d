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

Inputs: `input_ids` int64 (batch, sequence), `seqlens_k` int32 (batch) = tokens in the cache
after this call minus 1, `total_sequence_length` int32 scalar, `past_key_values.{i}.key|value`
(batch, kv_heads, max_cache, dim_head). Outputs: `logits` float32 (batch, sequence, num_tokens),
`present.{i}.key|value` (the same buffers). Prompts are right-padded: GroupQueryAttention
places each row's next token at `seqlens_k`. Keep this graph away from TensorRT: its parser
has no com.microsoft ops.
"""
from __future__ import annotations

import numpy as np
import torch

from models.transformer import Transformer
from models.rotary import inverse_frequencies

from .onnx_export import TOOLKIT_VERSION, ExportError

GRAPH_KIND = "onnxruntime-static-cache"
NP_DTYPES = {"fp32": np.float32, "fp16": np.float16}


def query_head_order(heads: int, kv_heads: int) -> list[int]:
    """GroupQueryAttention gives query head p the kv head p // (heads / kv_heads); this model
    (like upstream) gives query head j the kv head j % kv_heads. Listing, for each new slot p,
    the model's head that belongs there makes the two agree."""
    groups = heads // kv_heads
    return [i * kv_heads + g for g in range(kv_heads) for i in range(groups)]


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


def _out_weight(attn, order: list[int]) -> torch.Tensor:
    """(heads * dim_head, dim), rows following the reordered query heads."""
    weight = attn.to_out.weight.unflatten(1, (attn.heads, attn.dim_head))[:, order].flatten(1)
    return weight.T


class _Graph:
    """Collects nodes and initializers; names are unique by construction."""

    def __init__(self, dtype: str):
        self.dtype = NP_DTYPES[dtype]
        self.nodes, self.initializers = [], []

    def weight(self, name: str, tensor: torch.Tensor, dtype=None) -> str:
        from onnx import numpy_helper

        array = tensor.detach().float().cpu().numpy().astype(dtype or self.dtype)
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def node(self, op: str, inputs: list[str], outputs: list[str], domain: str = "", **attributes) -> list[str]:
        from onnx import helper

        self.nodes.append(helper.make_node(op, inputs, outputs, name=f"{op}_{len(self.nodes)}", domain=domain,
                                           **attributes))
        return outputs


def build_static_cache_graph(model: Transformer, max_cache: int, dtype: str = "fp16",
                             source: dict[str, str] | None = None):
    """The ONNX Runtime-only decoder (an onnx.ModelProto) for `model`, with a `max_cache`-token cache."""
    from onnx import TensorProto, helper

    config = model.config
    if dtype not in NP_DTYPES:
        raise ExportError(f"the static-cache graph is written in fp32 or fp16, not {dtype!r}")
    if not config.causal:
        raise ExportError("the static-cache graph needs a causal model (GroupQueryAttention is causal only)")
    if config.dim_head % 16:
        raise ExportError(f"GroupQueryAttention's rotary needs dim_head divisible by 16, this model has "
                          f"{config.dim_head}; use the portable graph (export-model --with-past)")
    if config.max_seq_len and max_cache > config.max_seq_len:
        raise ExportError(f"--static-cache {max_cache} is past the model's max_seq_len {config.max_seq_len}")
    if max_cache < 1:
        raise ExportError("--static-cache must be at least 1 token")
    g = _Graph(dtype)
    elem = TensorProto.FLOAT16 if dtype == "fp16" else TensorProto.FLOAT
    order = query_head_order(config.heads, config.kv_heads)
    rms = config.norm == "rms"

    angles = torch.arange(max_cache, dtype=torch.float64)[:, None] * inverse_frequencies(
        config.dim_head, config.theta).double()
    cos, sin = g.weight("cos_cache", angles.cos()), g.weight("sin_cache", angles.sin())
    hidden = g.node("Gather", [g.weight("token_emb", model.token_emb.weight), "input_ids"], ["embedded"])[0]

    def norm(prefix: str, module, x: str, residual: str | None, bias: str | None) -> tuple[str, str]:
        """(normed, new residual): plain norm for the first, residual-add + norm after."""
        gamma = g.weight(f"{prefix}.weight", module.weight)
        beta = [] if rms else [g.weight(f"{prefix}.bias", module.bias)]
        if residual is None:
            op = "SimplifiedLayerNormalization" if rms else "LayerNormalization"
            out = g.node(op, [x, gamma, *beta], [f"{prefix}.out"], axis=-1, epsilon=config.norm_eps,
                         stash_type=1)[0]
            return out, x
        op = "SkipSimplifiedLayerNormalization" if rms else "SkipLayerNormalization"
        inputs = [x, residual, gamma, *beta, *([bias] if bias else [])]  # Skip*Norm: input + skip + bias
        outputs = g.node(op, inputs, [f"{prefix}.out", "", "", f"{prefix}.residual"], domain="com.microsoft",
                         epsilon=config.norm_eps)
        return outputs[0], outputs[3]

    residual, pending_bias = None, None
    for i, layer in enumerate(model.layers):
        attn, ff = layer.attn, layer.ff
        normed, residual = norm(f"layers.{i}.attn.norm", attn.norm, hidden, residual, pending_bias)
        qkv = g.node("MatMul", [normed, g.weight(f"layers.{i}.attn.qkv", _qkv_weight(attn, order))],
                     [f"layers.{i}.qkv"])[0]
        attended = g.node(
            "GroupQueryAttention",
            [qkv, "", "", f"past_key_values.{i}.key", f"past_key_values.{i}.value", "seqlens_k",
             "total_sequence_length", cos, sin],
            [f"layers.{i}.attended", f"present.{i}.key", f"present.{i}.value"], domain="com.microsoft",
            num_heads=config.heads, kv_num_heads=config.kv_heads, do_rotary=1,
            rotary_interleaved=int(config.rotary_pairing == "interleaved"), scale=config.dim_head**-0.5)[0]
        hidden = g.node("MatMul", [attended, g.weight(f"layers.{i}.attn.out", _out_weight(attn, order))],
                        [f"layers.{i}.attn.delta"])[0]
        normed, residual = norm(f"layers.{i}.ff.norm", ff.norm, hidden, residual, None)
        up = g.node("MatMul", [normed, g.weight(f"layers.{i}.ff.in", ff.proj_in.weight.T)], [f"layers.{i}.ff.up"])[0]
        if ff.proj_in.bias is not None:
            act = g.node("BiasGelu", [up, g.weight(f"layers.{i}.ff.in.bias", ff.proj_in.bias)],
                         [f"layers.{i}.ff.act"], domain="com.microsoft")[0]
        else:
            act = g.node("Gelu", [up], [f"layers.{i}.ff.act"], domain="com.microsoft")[0]
        hidden = g.node("MatMul", [act, g.weight(f"layers.{i}.ff.out", ff.proj_out.weight.T)],
                        [f"layers.{i}.ff.delta"])[0]
        pending_bias = (g.weight(f"layers.{i}.ff.out.bias", ff.proj_out.bias)
                        if ff.proj_out.bias is not None else None)
    normed, _ = norm("norm", model.norm, hidden, residual, pending_bias)
    # The logits head runs in float32: rounding logits to fp16 (a step of 0.004 at |logit| 4) flips
    # greedy near-ties; the extra weight bytes cost a few percent of a decode step.
    if dtype != "fp32":
        normed = g.node("Cast", [normed], ["norm.out.float"], to=TensorProto.FLOAT)[0]
    g.node("MatMul", [normed, g.weight("to_logits", model.to_logits.weight.T, np.float32)], ["logits"])

    cache_shape = ["batch", config.kv_heads, max_cache, config.dim_head]
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"]),
              helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, ["batch"]),
              helper.make_tensor_value_info("total_sequence_length", TensorProto.INT32, [])]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "sequence", config.num_tokens])]
    for i in range(config.depth):
        for kind in ("key", "value"):
            inputs.append(helper.make_tensor_value_info(f"past_key_values.{i}.{kind}", elem, cache_shape))
            outputs.append(helper.make_tensor_value_info(f"present.{i}.{kind}", elem, cache_shape))
    graph = helper.make_graph(g.nodes, "rotary_transformer_static_cache", inputs, outputs, g.initializers)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)],
                              producer_name="rotary-transformer-toolkit", producer_version=TOOLKIT_VERSION)
    proto.ir_version = 8
    props = {"graph_kind": GRAPH_KIND, "model_config": config.to_json(), **(source or {}),
             "precision": "float16" if dtype == "fp16" else "float32", "max_cache": str(max_cache),
             "with_past": "true", "opset": "17", "torch_version": torch.__version__,
             "exporter": "export/static_cache_graph.py (onnx.helper)", "toolkit_version": TOOLKIT_VERSION}
    for key, value in props.items():
        proto.metadata_props.add(key=key, value=value)
    return proto


def export_static_cache(model: Transformer, output, max_cache: int, dtype: str = "fp16",
                        source: dict[str, str] | None = None, verify: bool = True, log=print):
    """Write the static-cache graph to `output` (atomically), after checking it and, with `verify`,
    running the static-cache parity sweep on ONNX Runtime (CPU). Returns (seconds, report or None)."""
    import time
    from pathlib import Path

    from models.files import atomic_path

    from .onnx_export import check_output_path

    output = Path(output)
    check_output_path(output)
    started = time.perf_counter()
    log(f"writing the ONNX Runtime static-cache decoder ({dtype}, {max_cache}-token cache) ...")
    proto = build_static_cache_graph(model, max_cache, dtype, source)
    if sum(len(t.raw_data) for t in proto.graph.initializer) > 2**31 - 2**26:
        raise ExportError("the static-cache graph is written as one file and is limited to 2 GB of weights")
    data = proto.SerializeToString()
    seconds = time.perf_counter() - started
    from runtime.static_cache import StaticCacheDecoder
    from runtime.static_cache_parity import check_static_cache

    # onnx.checker does not know ONNX Runtime's contrib ops (SimplifiedLayerNormalization is even
    # registered under the default domain), so the consumer itself is the check: it must load.
    try:
        StaticCacheDecoder(data, 1, "cpu").close()
    except Exception as error:
        raise ExportError(f"ONNX Runtime rejected the static-cache graph: {str(error).splitlines()[0]}") from None
    report = None
    if verify:
        precision = "float16" if dtype == "fp16" else "float32"
        lengths = [n for n in (1, 19, 4 * 19) if n + 8 <= max_cache]
        report = check_static_cache(model, lambda batch: StaticCacheDecoder(data, batch, "cpu"), [1, 3], lengths,
                                    precision=precision)
        log(report.summary())
        if not report:
            raise ExportError(f"verification failed: {report.summary()}")
    with atomic_path(output) as temporary:
        temporary.write_bytes(data)
    return seconds, report
