"""The rotary-attention decoder: embedding, `depth` pre-norm attention + GELU feed-forward
blocks with residuals, a final norm and logits (lucidrains' dense `Transformer` layout)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import ModelConfig
from .rotary import apply_rotary, inverse_frequencies, rotary_cos_sin

# One layer's cache: (key, value), each (batch, kv_heads, past_sequence, dim_head), rotated.
LayerCache = tuple[Tensor, Tensor]


class Norm(nn.Module):
    """RMSNorm or LayerNorm, with statistics always computed in float32.

    Written out rather than nn.RMSNorm so the exported graph uses only ops that exist
    unchanged at opset 17 (ReduceSum, Sqrt, LayerNormalization) and so a float16 graph
    keeps its norm statistics in float32, where they cannot overflow.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.rms = config.norm == "rms"
        self.eps = config.norm_eps
        self.weight = nn.Parameter(torch.ones(config.dim))
        self.bias = None if self.rms else nn.Parameter(torch.zeros(config.dim))

    def forward(self, x: Tensor) -> Tensor:
        dtype, x = x.dtype, x.float()
        if self.rms:
            mean_square = (x * x).sum(-1, keepdim=True) / x.shape[-1]
            x = x * torch.rsqrt(mean_square + self.eps) * self.weight.float()
        else:
            x = F.layer_norm(x, x.shape[-1:], self.weight.float(), self.bias.float(), self.eps)
        return x.to(dtype)


def positions_and_bias(
    attention_mask: Tensor | None, batch: int, seq: int, past: int, causal: bool, device: torch.device,
) -> tuple[Tensor, Tensor | None]:
    """Rotary positions (b, n) of the new tokens and the float32 additive attention bias (b, 1, n, past + n).

    With a padding mask (1 = token, 0 = padding, shape (b, past + n)), positions count only
    real tokens, so a left-padded row is computed exactly like the unpadded one. Masked
    keys get the most negative finite value rather than -inf: a row with every key masked
    stays finite (uniform attention) instead of turning into NaN.
    """
    total = past + seq
    query_index = torch.arange(seq, device=device) + past  # (n,)
    key_index = torch.arange(total, device=device)  # (past + n,)
    if attention_mask is None:
        positions = query_index[None].expand(batch, seq)
        allowed = None
    else:
        positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)[:, past:]  # (b, n)
        allowed = (attention_mask != 0)[:, None, None, :]  # (b, 1, 1, past + n)
    if causal:
        is_causal = key_index[None, :] <= query_index[:, None]  # (n, past + n)
        allowed = is_causal[None, None] if allowed is None else allowed & is_causal
    if allowed is None:
        return positions, None
    zero = torch.zeros((), dtype=torch.float32, device=device)
    masked = torch.full((), torch.finfo(torch.float32).min, dtype=torch.float32, device=device)
    return positions, torch.where(allowed, zero, masked)


class Attention(nn.Module):
    """Pre-norm multi-head attention with rotary q/k and grouped-query key/value heads.

    Query head j reads key/value head j % kv_heads, the upstream `repeat('b h ... -> b (g h) ...')`
    convention, so upstream weights load without permutation.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.heads, self.kv_heads, self.dim_head = config.heads, config.kv_heads, config.dim_head
        self.pairing = config.rotary_pairing
        self.dropout = config.dropout
        self.norm = Norm(config)
        self.fused = config.qkv == "fused"
        if self.fused:
            self.to_qkv = nn.Linear(config.dim, config.dim_inner + 2 * config.dim_kv_inner, bias=False)
        else:
            self.to_q = nn.Linear(config.dim, config.dim_inner, bias=False)
            self.to_k = nn.Linear(config.dim, config.dim_kv_inner, bias=False)
            self.to_v = nn.Linear(config.dim, config.dim_kv_inner, bias=False)
        self.to_out = nn.Linear(config.dim_inner, config.dim, bias=False)
        # Set for half-precision export (Transformer.use_float32_softmax): eager PyTorch keeps
        # SDPA, whose kernels already accumulate in float32.
        self.float32_softmax = False

    def project(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        if self.fused:
            # slices rather than split(): Split changed at opset 18, Slice did not
            inner, kv_inner = self.heads * self.dim_head, self.kv_heads * self.dim_head
            qkv = self.to_qkv(x)
            return qkv[..., :inner], qkv[..., inner : inner + kv_inner], qkv[..., inner + kv_inner :]
        return self.to_q(x), self.to_k(x), self.to_v(x)

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, bias: Tensor | None, past: LayerCache | None = None
    ) -> tuple[Tensor, LayerCache]:
        q, k, v = self.project(self.norm(x))
        q = q.unflatten(-1, (self.heads, self.dim_head)).transpose(1, 2)  # (b, h, n, d)
        k = k.unflatten(-1, (self.kv_heads, self.dim_head)).transpose(1, 2)  # (b, kvh, n, d)
        v = v.unflatten(-1, (self.kv_heads, self.dim_head)).transpose(1, 2)  # (b, kvh, n, d)
        q = apply_rotary(q, cos, sin, self.pairing)
        k = apply_rotary(k, cos, sin, self.pairing)
        if past is not None:
            k = torch.cat((past[0], k), dim=2)  # (b, kvh, past + n, d)
            v = torch.cat((past[1], v), dim=2)
        present = (k, v)
        groups = self.heads // self.kv_heads
        if groups > 1:  # expand + reshape keeps the graph free of sequence ops
            b, _, total, d = k.shape
            k = k[:, None].expand(b, groups, self.kv_heads, total, d).reshape(b, self.heads, total, d)
            v = v[:, None].expand(b, groups, self.kv_heads, total, d).reshape(b, self.heads, total, d)
        if not (self.float32_softmax and q.dtype != torch.float32):
            if bias is not None and q.dtype != torch.float32:  # keep the mask finite in half precision
                bias = bias.clamp(min=torch.finfo(q.dtype).min).to(q.dtype)
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=bias, dropout_p=self.dropout if self.training else 0.0
            )  # (b, h, n, d)
        else:  # exported half precision: scores and softmax in float32, where they cannot overflow
            scores = (q * self.dim_head**-0.5) @ k.transpose(-1, -2)  # (b, h, n, past + n)
            scores = scores.float() if bias is None else scores.float() + bias
            attn = F.dropout(scores.softmax(-1), self.dropout, self.training).to(v.dtype)
            out = attn @ v  # (b, h, n, d)
        return self.to_out(out.transpose(1, 2).flatten(2)), present


class FeedForward(nn.Module):
    """Pre-norm GELU MLP."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.norm = Norm(config)
        self.proj_in = nn.Linear(config.dim, config.ff_hidden, bias=config.ff_bias)
        self.proj_out = nn.Linear(config.ff_hidden, config.dim, bias=config.ff_bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj_out(F.gelu(self.proj_in(self.norm(x))))


class Block(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.attn = Attention(config)
        self.ff = FeedForward(config)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x, cos, sin, bias, past=None, keep=None):
        attn_out, present = self.attn(x, cos, sin, bias, past)
        if keep is not None:  # padding positions attend to nothing: give them no attention output
            attn_out = attn_out * keep
        x = x + self.dropout(attn_out)
        x = x + self.dropout(self.ff(x))
        return x, present


class Transformer(nn.Module):
    """Decoder-only rotary transformer.

    forward(input_ids (b, n) int64, attention_mask (b, past + n) or None,
            past_key_values: one (key, value) per layer or None)
      -> logits (b, n, num_tokens), or (logits, present_key_values) with use_cache=True.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.token_emb = nn.Embedding(config.num_tokens, config.dim)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.depth))
        self.norm = Norm(config)
        self.to_logits = nn.Linear(config.dim, config.num_tokens, bias=False)
        self.register_buffer(
            "inv_freq", inverse_frequencies(config.dim_head, config.theta), persistent=False
        )

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        past_key_values: list[LayerCache] | None = None,
        use_cache: bool = False,
    ):
        batch, seq = input_ids.shape
        past = 0 if past_key_values is None else past_key_values[0][0].shape[2]
        x = self.token_emb(input_ids)  # (b, n, dim)
        positions, bias = positions_and_bias(
            attention_mask, batch, seq, past, self.config.causal, x.device
        )
        cos, sin = rotary_cos_sin(positions, self.inv_freq, self.config.rotary_pairing)
        # A padding query has every key masked; its softmax is uniform in exact arithmetic but
        # kernels disagree on such rows, so its attention output is zeroed to make it defined.
        keep = None if attention_mask is None else (attention_mask[:, past:, None] != 0).to(x.dtype)  # (b, n, 1)
        presents = []
        for index, layer in enumerate(self.layers):
            layer_past = None if past_key_values is None else past_key_values[index]
            x, present = layer(x, cos, sin, bias, layer_past, keep)
            presents.append(present)
        logits = self.to_logits(self.norm(x))  # (b, n, num_tokens)
        return (logits, presents) if use_cache else logits

    def _apply(self, fn, recurse=True):
        # `.half()`/`.to(dtype)` would round the rotary frequencies to 16 bits, which shifts the
        # angle at position p by about p * 5e-4 rad (0.25 rad at p = 513): keep them float32.
        super()._apply(fn, recurse)
        self.inv_freq = inverse_frequencies(self.config.dim_head, self.config.theta).to(self.inv_freq.device)
        return self

    def use_float32_softmax(self, enabled: bool = True) -> "Transformer":
        """Write attention as matmul + float32 softmax (for half-precision graphs) instead of SDPA."""
        for layer in self.layers:
            layer.attn.float32_softmax = enabled
        return self


def build_model(config: ModelConfig, seed: int = 0) -> Transformer:
    """A freshly initialised model in eval mode; the same seed gives the same weights."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Transformer(config)
    return model.eval()
