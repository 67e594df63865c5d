"""The transformer over fixed-size key/value buffers: every row has its own position, new keys
and values are written into the buffers at those positions, and attention runs over the whole
window with a mask. Every decode step has the same shapes, so CUDA graphs replay it.

One forward serves two users:
- `torch-compile-static` (gpt-fast's recipe): buffers live in the module and are updated in
  place (`index_put_`), the decode step compiled with mode="reduce-overhead", fullgraph=True;
- `export-model --static-cache N --portable`: buffers come in as inputs and go out as outputs
  (a ScatterND per layer), standard ONNX ops only, for ONNX Runtime and TensorRT.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .rotary import apply_rotary, rotary_cos_sin
from .transformer import Transformer


def query_head_order(heads: int, kv_heads: int) -> list[int]:
    """Grouped-query kernels (GroupQueryAttention, SDPA's enable_gqa) give query head p the kv head
    p // (heads / kv_heads); this model (like upstream) gives query head j the kv head j % kv_heads.
    Listing, for each kernel slot p, the model's head that belongs there makes the two agree."""
    groups = heads // kv_heads
    return [i * kv_heads + g for g in range(kv_heads) for i in range(groups)]


def window_bias(positions: Tensor, window: int) -> Tensor:
    """(b, 1, 1, s, window) float32: 0 where key index <= the query's position, else the most
    negative finite float (a row never has every key masked: its own key is always visible)."""
    keys = torch.arange(window, device=positions.device)
    allowed = keys[None, None, None, None, :] <= positions[:, None, None, :, None]
    zero = torch.zeros((), dtype=torch.float32, device=positions.device)
    masked = torch.full((), torch.finfo(torch.float32).min, dtype=torch.float32, device=positions.device)
    return torch.where(allowed, zero, masked)


def write_positions(cache: Tensor, new: Tensor, positions: Tensor, in_place: bool) -> Tensor:
    """Write `new` (b, kvh, s, d) into `cache` (b, kvh, N, d) at each row's `positions` (b, s)."""
    b, kvh, s, _ = new.shape
    rows = torch.arange(b, device=new.device)[:, None, None].expand(b, kvh, s)
    heads = torch.arange(kvh, device=new.device)[None, :, None].expand(b, kvh, s)
    index = (rows, heads, positions[:, None, :].expand(b, kvh, s))
    new = new.to(cache.dtype)
    return cache.index_put_(index, new) if in_place else cache.index_put(index, new)


def attend_window(attn, x: Tensor, cos: Tensor, sin: Tensor, bias: Tensor, positions: Tensor,
                  keys: Tensor, values: Tensor, in_place: bool) -> tuple[Tensor, Tensor, Tensor]:
    """One pre-norm attention over the window: (output (b, s, dim), keys, values after the write).

    Query head j reads kv head j % kv_heads (upstream's convention). Queries are grouped per kv
    head ((b, kvh, g*s, d)) instead of expanding the cache to every query head, so the cache is
    read once and never copied."""
    heads, kv_heads, dim_head = attn.heads, attn.kv_heads, attn.dim_head
    groups = heads // kv_heads
    q, k, v = attn.project(attn.norm(x))
    b, s, _ = q.shape
    q = apply_rotary(q.unflatten(-1, (heads, dim_head)).transpose(1, 2), cos, sin, attn.pairing)  # (b, h, s, d)
    k = apply_rotary(k.unflatten(-1, (kv_heads, dim_head)).transpose(1, 2), cos, sin, attn.pairing)  # (b, kvh, s, d)
    v = v.unflatten(-1, (kv_heads, dim_head)).transpose(1, 2)
    keys = write_positions(keys, k, positions, in_place)
    values = write_positions(values, v, positions, in_place)
    if in_place:  # PyTorch: one fused SDPA kernel, as gpt-fast runs it
        return attn.to_out(_sdpa_window(q, keys, values, bias, kv_heads).to(x.dtype)), keys, values
    q = q.unflatten(1, (groups, kv_heads)).transpose(1, 2).flatten(2, 3)  # (b, kvh, g*s, d)
    scores = (q * dim_head**-0.5) @ keys.transpose(-1, -2).to(q.dtype)  # (b, kvh, g*s, N)
    scores = scores.float().unflatten(2, (groups, s)) + bias  # (b, kvh, g, s, N)
    attn_weights = scores.softmax(-1).flatten(2, 3).to(values.dtype)
    out = (attn_weights @ values).unflatten(2, (groups, s))  # (b, kvh, g, s, d)
    out = out.transpose(1, 2).flatten(1, 2).transpose(1, 2).flatten(2)  # (b, s, h * d), head j = g * kvh + kvh_j
    return attn.to_out(out.to(x.dtype)), keys, values


def _sdpa_window(q: Tensor, keys: Tensor, values: Tensor, bias: Tensor, kv_heads: int) -> Tensor:
    """Window attention through F.scaled_dot_product_attention with grouped kv heads; (b, s, h * d)."""
    import torch.nn.functional as F

    heads = q.shape[1]
    order = torch.tensor(query_head_order(heads, kv_heads), device=q.device)
    mask = bias[:, 0].clamp(min=torch.finfo(q.dtype).min).to(q.dtype)  # (b, 1, s, N)
    out = F.scaled_dot_product_attention(q.index_select(1, order), keys.to(q.dtype), values.to(q.dtype),
                                         attn_mask=mask, enable_gqa=heads != kv_heads)  # (b, h, s, d), kernel order
    out = out.index_select(1, torch.argsort(order))  # back to the model's head order
    return out.transpose(1, 2).flatten(2)


def static_forward(model: Transformer, input_ids: Tensor, positions: Tensor, caches: list[tuple[Tensor, Tensor]],
                   in_place: bool, logits_index: Tensor | None = None, head: Tensor | None = None
                   ) -> tuple[Tensor, list[tuple[Tensor, Tensor]]]:
    """Logits float32 for tokens at `positions` (b,) onwards, and the caches after the write.
    `caches`: per layer (keys, values), each (b, kv_heads, N, dim_head). `logits_index` (b, k)
    picks the positions (within this call) that get logits: (b, k, vocab); None: all (b, s, vocab).
    `head`: a float32 copy of the logits weight for half-precision models (rounding logits to fp16
    flips greedy near-ties); None uses the model's own."""
    seq = input_ids.shape[1]
    window = caches[0][0].shape[2]
    token_positions = positions[:, None] + torch.arange(seq, device=positions.device)  # (b, s)
    x = model.token_emb(input_ids)
    cos, sin = rotary_cos_sin(token_positions, model.inv_freq, model.config.rotary_pairing)
    bias = window_bias(token_positions, window)
    written = []
    for layer, (keys, values) in zip(model.layers, caches):
        out, keys, values = attend_window(layer.attn, x, cos, sin, bias, token_positions, keys, values, in_place)
        x = x + out
        x = x + layer.ff(x)
        written.append((keys, values))
    x = model.norm(x)
    if logits_index is not None:
        x = x.gather(1, logits_index[:, :, None].expand(-1, -1, x.shape[-1]))  # (b, k, dim)
    if head is not None:
        return x.float() @ head.T, written
    return model.to_logits(x).float(), written


class StaticCacheGraph(nn.Module):
    """The exported graph: (input_ids, positions, logits_index, past caches...) -> (logits, present caches...)."""

    def __init__(self, model: Transformer):
        super().__init__()
        self.model = model
        weight = model.to_logits.weight
        self.head = None if weight.dtype == torch.float32 else nn.Parameter(weight.detach().float(), requires_grad=False)

    def forward(self, input_ids: Tensor, positions: Tensor, logits_index: Tensor, caches: list[tuple[Tensor, Tensor]]):
        return static_forward(self.model, input_ids, positions, [tuple(c) for c in caches], False, logits_index,
                              self.head)


class StaticCacheModel(nn.Module):
    """gpt-fast's layout: the model plus its key/value buffers for `rows` rows of `window` tokens,
    written in place; `forward(input_ids, positions)` -> logits (b, s, vocab)."""

    def __init__(self, model: Transformer, rows: int, window: int):
        super().__init__()
        self.model = model
        config, first = model.config, next(model.parameters())
        shape = (rows, config.kv_heads, window, config.dim_head)
        for i in range(config.depth):
            self.register_buffer(f"keys_{i}", torch.zeros(shape, dtype=first.dtype, device=first.device))
            self.register_buffer(f"values_{i}", torch.zeros(shape, dtype=first.dtype, device=first.device))

    def caches(self, rows: slice | None = None) -> list[tuple[Tensor, Tensor]]:
        pick = (lambda t: t) if rows is None else (lambda t: t[rows])
        return [(pick(getattr(self, f"keys_{i}")), pick(getattr(self, f"values_{i}")))
                for i in range(self.model.config.depth)]

    def forward(self, input_ids: Tensor, positions: Tensor) -> Tensor:
        """One decode step for every row: (b, 1) tokens at `positions` (b,) -> logits (b, 1, vocab)."""
        return static_forward(self.model, input_ids, positions, self.caches(), in_place=True)[0]

    def prefill(self, input_ids: Tensor, logits_index: Tensor, rows: slice) -> Tensor:
        """Fill a contiguous run of rows' buffers from position 0 (views written in place)."""
        positions = torch.zeros(input_ids.shape[0], dtype=torch.int64, device=input_ids.device)
        return static_forward(self.model, input_ids, positions, self.caches(rows), True, logits_index)[0]
