"""A batch-1 decoder whose decode step is a few fused Triton kernels per layer, replayed as one CUDA
graph with the engine's pick of the next token (step_and_pick): what a single stream of a large
model needs, where every step reads all the weights and the step's time is the weights' bytes
over the memory bandwidth.

Per layer: the pre-norm and the QKV product in one kernel (the norm's statistics are gathered while
the product reads x), rotary + cache write + attention over chunks of the window in one, the chunks
combined in one, the output projection with its residual add in one, the feed-forward's norm,
product, bias and GELU in one and its output projection with bias and residual in one. Prompts run
through PyTorch (the static-cache model, SDPA), whose buffers the step then reads.

It decodes one row (batch 1): at larger batches the step stops being a matrix-vector product and
the other static-cache decoders (ONNX Runtime, torch-compile-static) are the ones to use.
"""
from __future__ import annotations

import copy
import functools
import time
from typing import NamedTuple

import torch
from torch import Tensor

from models.precision import precision as lookup_precision
from models.static_cache import StaticCacheModel
from models.transformer import Transformer

from ..backends import BackendError
from ..resources import cache_bytes, require
from .base import Decoder, DecodingError
from .captured_step import CapturedSteps
from .transfer import to_device

NORMS = {None: 0, "rms": 1, "layer": 2}
CHUNK = 64  # window positions per attention program: 8 key/value heads x 17 chunks fill the GPU at 1088


class GemvConfig(NamedTuple):
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


def gemv_config(n: int, k: int, normed: bool = False) -> GemvConfig:
    """Launch settings for an [n, k] weight: 8 rows a program, K in blocks of 1024, 4 warps. On the
    7b step on an H200 that was the fastest of 16 configurations, or within 3 % of it, for every
    product but the QKV one (normed, 6,144 rows), which was 7 % faster in blocks of 512: so a normed
    product of fewer than 8,192 rows takes blocks of 512 (scripts/profile_fused.py --sweep,
    docs/benchmarks/h200-1204e/profile-fused-sweep.json)."""
    block_k = min(512 if normed and n < 8192 else 1024, max(16, 1 << (k - 1).bit_length()))
    return GemvConfig(8, block_k, 4, 2)


@functools.cache
def kernels():
    """Triton and this module's kernels, imported on first use."""
    import triton

    from . import fused_triton

    return triton, fused_triton


def launch_gemv(weight: Tensor, vector: Tensor, out: Tensor, config: GemvConfig, eps: float = 0.0, norm: int = 0,
                gamma: Tensor | None = None, gamma_row_sums: Tensor | None = None, beta_products: Tensor | None = None,
                bias: Tensor | None = None, gelu: bool = False, residual: bool = False, pdl: bool = False) -> None:
    """out = epilogue(weight @ norm(vector)) in one launch (see fused_triton.norm_gemv_kernel);
    `residual` adds out's own values. No checks: callers pass contiguous tensors of matching sizes."""
    triton, fused = kernels()
    n, k = weight.shape
    unused = weight  # never read: the flags say which pointers the kernel uses
    fused.norm_gemv_kernel[(triton.cdiv(n, config.block_n),)](
        weight, vector, out, unused if gamma is None else gamma, unused if gamma_row_sums is None else gamma_row_sums,
        unused if beta_products is None else beta_products, unused if bias is None else bias,
        out if residual else unused, n, k, weight.stride(0), eps,
        NORM=norm, HAS_BIAS=bias is not None, GELU=gelu, HAS_RESIDUAL=residual,
        BLOCK_N=config.block_n, BLOCK_K=config.block_k, PDL=pdl, num_warps=config.num_warps,
        num_stages=config.num_stages, **_pdl_option(pdl))


def _pdl_option(pdl: bool) -> dict:
    return {"launch_pdl": True} if pdl else {}


def pdl_supported(device: torch.device) -> bool:
    """Programmatic dependent launch: Hopper or later, and a Triton that can launch with it."""
    if device.type != "cuda" or torch.cuda.get_device_capability(device)[0] < 9:
        return False
    try:
        import triton.language.extra.cuda as cuda_extra
        from triton.backends.nvidia.compiler import CUDAOptions
    except ImportError:
        return False
    return hasattr(cuda_extra, "gdc_wait") and "launch_pdl" in CUDAOptions.__dataclass_fields__


class _Product(NamedTuple):
    """One fused product: its weight [n, k] and what comes before and after it."""
    weight: Tensor
    norm: int  # NORMS value
    gamma: Tensor | None
    gamma_row_sums: Tensor | None  # LayerNorm: weight @ gamma, float32
    beta_products: Tensor | None  # LayerNorm: weight @ beta, float32
    bias: Tensor | None
    gelu: bool
    config: GemvConfig


def _product(weight: Tensor, norm=None, bias: Tensor | None = None, gelu: bool = False) -> _Product:
    sums = products = None
    kind = None if norm is None else ("rms" if norm.rms else "layer")
    if kind == "layer":
        sums = weight.float() @ norm.weight.float()
        products = weight.float() @ norm.bias.float()
    return _Product(weight, NORMS[kind], None if norm is None else norm.weight, sums, products, bias, gelu,
                    gemv_config(*weight.shape, normed=norm is not None))


class FusedStep:
    """The decode step's launches over a StaticCacheModel of one row (its weights and buffers)."""

    @torch.no_grad()  # the LayerNorm products and a separate QKV's concatenation hold no autograd graph
    def __init__(self, module: StaticCacheModel, chunk: int = CHUNK):
        model, config = module.model, module.model.config
        self.config, self.module, self.chunk = config, module, chunk
        self.eps = config.norm_eps
        device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
        self.layers = []
        for layer in model.layers:
            attn, ff = layer.attn, layer.ff
            qkv = attn.to_qkv.weight if attn.fused else torch.cat(
                (attn.to_q.weight, attn.to_k.weight, attn.to_v.weight)).contiguous()
            self.layers.append((_product(qkv, attn.norm), _product(attn.to_out.weight),
                                _product(ff.proj_in.weight, ff.norm, ff.proj_in.bias, gelu=True),
                                _product(ff.proj_out.weight, bias=ff.proj_out.bias)))
        self.head = _product(model.to_logits.weight, model.norm)
        self.embedding = model.token_emb.weight
        self.inv_freq = model.inv_freq.to(device)
        self.caches = module.caches()
        window = self.caches[0][0].shape[2]
        self.chunks = -(-window // chunk)
        inner, kv_inner = config.heads * config.dim_head, config.kv_heads * config.dim_head
        self.token = torch.zeros(1, dtype=torch.int64, device=device)
        self.position = torch.zeros(1, dtype=torch.int64, device=device)
        self.x = torch.zeros(1, config.dim, dtype=dtype, device=device)
        self.qkv = torch.zeros(inner + 2 * kv_inner, dtype=dtype, device=device)
        self.attended = torch.zeros(inner, dtype=dtype, device=device)
        self.hidden = torch.zeros(config.ff_hidden, dtype=dtype, device=device)
        self.logits = torch.zeros(1, config.num_tokens, dtype=torch.float32, device=device)
        self.part_max = torch.zeros(config.heads * self.chunks, dtype=torch.float32, device=device)
        self.part_sum = torch.zeros_like(self.part_max)
        self.part_out = torch.zeros(config.heads * self.chunks * config.dim_head, dtype=torch.float32, device=device)
        self.ieee = dtype == torch.float32
        self.pdl = pdl_supported(device)  # the products launched with programmatic dependent launch

    def _gemv(self, product: _Product, vector: Tensor, out: Tensor, residual: bool = False) -> None:
        launch_gemv(product.weight, vector, out, product.config, self.eps, product.norm, product.gamma,
                    product.gamma_row_sums, product.beta_products, product.bias, product.gelu, residual, self.pdl)

    def _attention(self, keys: Tensor, values: Tensor) -> None:
        triton, fused = kernels()
        config = self.config
        groups = config.heads // config.kv_heads
        fused.attention_kernel[(config.kv_heads, self.chunks)](
            self.qkv, keys, values, self.position, self.inv_freq, self.part_max, self.part_sum, self.part_out,
            keys.shape[2], config.dim_head ** -0.5, HEADS=config.heads, KV_HEADS=config.kv_heads, D=config.dim_head,
            GROUPS=groups, GROUPS_PAD=max(16, triton.next_power_of_2(groups)), CHUNK=self.chunk,
            BLOCK_T=min(64, max(16, triton.next_power_of_2(self.chunk))),
            HALF_PAIRING=config.rotary_pairing == "half", IEEE=self.ieee, num_warps=4)
        fused.combine_kernel[(config.heads,)](
            self.part_max, self.part_sum, self.part_out, self.position, self.attended, CHUNK=self.chunk,
            CHUNKS=self.chunks, CHUNKS_PAD=triton.next_power_of_2(self.chunks), D=config.dim_head,
            TRIGGER=self.pdl, num_warps=4)

    def run(self, token: Tensor | None = None) -> None:
        """One step: `token` (1,) (default: the one in `self.token`) at `self.position` -> `self.logits`;
        the position advances."""
        torch.index_select(self.embedding, 0, self.token if token is None else token, out=self.x)
        for (qkv, out, up, down), (keys, values) in zip(self.layers, self.caches):
            self._gemv(qkv, self.x, self.qkv)
            self._attention(keys, values)
            self._gemv(out, self.attended, self.x, residual=True)
            self._gemv(up, self.x, self.hidden)
            self._gemv(down, self.hidden, self.x, residual=True)
        self._gemv(self.head, self.x, self.logits)
        self.position.add_(1)


def check_fusable(config, rows: int) -> None:
    """What the fused step supports, refused in one sentence each before any weights move."""
    if rows != 1:
        raise DecodingError(f"triton-fused decodes one row (batch 1), not {rows}; for batches use "
                            "onnxruntime-cuda-static or torch-compile-static")
    if not config.causal:
        raise DecodingError("triton-fused decodes causal models only (this config has causal: false)")
    if config.dim_head & (config.dim_head - 1) or config.dim_head < 16:
        raise DecodingError(f"triton-fused needs dim_head a power of two of at least 16, not {config.dim_head}")


def check_triton() -> None:
    """Triton imports (it ships with PyTorch's CUDA wheels), said before any weights move."""
    try:
        kernels()
    except ImportError as error:
        raise BackendError(f"triton-fused needs Triton, which did not import ({error}); install the triton "
                           "package that matches your PyTorch") from None


class FusedDecoder(Decoder):
    """`graph=False` launches the kernels every step (Triton's interpreter runs them on the CPU in tests)."""

    def __init__(self, model: Transformer, max_cache: int, device: str = "cuda", dtype: torch.dtype = torch.float16,
                 rows: int = 1, graph: bool = True, chunk: int = CHUNK):
        config = model.config
        check_fusable(config, rows)
        check_triton()
        super().__init__("triton-fused", device, config, 1, max_cache,
                         f"the {max_cache}-token static cache; ask for fewer tokens")
        require(cache_bytes(config, 1, max_cache, torch.empty((), dtype=dtype).element_size()),
                f"the static cache of 1 row x {max_cache} tokens", self.device.type, "use a smaller --context")
        first = next(model.parameters())
        if first.device != self.device or first.dtype != dtype:
            model = copy.deepcopy(model).to(device=self.device, dtype=dtype)  # leave the caller's model as it is
        self.module = StaticCacheModel(model.eval(), 1, max_cache).eval()
        self.fused = FusedStep(self.module, chunk)
        self.mode = "static cache, fused Triton step" + (" as one CUDA graph" if graph else "")
        self.graph: torch.cuda.CUDAGraph | None = None
        started = time.perf_counter()
        if graph:
            self._capture()
            # the engine's pick recorded with the step (step_and_pick): one replay a token, and the
            # ids fed back on the device
            self.recorded = CapturedSteps(torch.cuda.Stream(self.device))
        self.open_seconds = time.perf_counter() - started

    @torch.inference_mode()
    def _capture(self) -> None:
        """Compile the kernels (one eager step), then record the step as one CUDA graph."""
        self._start({0: [0]}, False)
        self.fused.run()
        torch.cuda.synchronize(self.device)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.fused.run()
        self.graph = graph

    @torch.inference_mode()
    def _start(self, prompts: dict[int, list[int]], all_logits: bool):
        prompt = prompts[0]
        ids = to_device([prompt], torch.int64, self.device)
        index = (torch.arange(len(prompt), device=self.device)[None] if all_logits
                 else to_device([[len(prompt) - 1]], torch.int64, self.device))
        logits = self.module.prefill(ids, index, slice(0, 1)).float()
        self.fused.position.fill_(len(prompt))
        return [logits[0]] if all_logits else logits[:, -1]

    @torch.inference_mode()
    def _step(self, tokens: Tensor) -> Tensor:
        self.fused.token.copy_(tokens.reshape(1))
        if self.graph is not None:
            self.graph.replay()
        else:
            self.fused.run()
        return self.fused.logits

    @torch.inference_mode()
    def _recorded_step(self, tokens: Tensor) -> Tensor:
        self.fused.run(tokens.reshape(1))  # read where the pick writes them: no copy
        return self.fused.logits

    def _recorded_logits(self) -> Tensor:
        return self.fused.logits

    def _release(self, rows: list[int]) -> None:
        pass  # a start writes its row's position and cache from 0

    def close(self) -> None:
        recorded, self.graph, self.recorded = self.recorded, None, None
        try:
            if recorded is not None:
                recorded.close()  # waits for a replay still queued: raises after a CUDA error
        finally:
            super().close()


def open_fused(source, spec, rows: int = 1, precision: str = "fp16", max_cache: int | None = None,
               **_options) -> FusedDecoder:
    """The registry's opener for triton-fused (weights in, a batch-1 fused decoder out)."""
    check_fusable(source.config, rows)  # the config only: the weights are not loaded for a refusal
    if not torch.cuda.is_available():
        raise BackendError(f"{spec.name} runs Triton kernels as a CUDA graph and needs a GPU")
    if max_cache is None:
        raise DecodingError(f"{spec.name} needs the largest number of tokens a row will hold (max_cache)")
    dtype = lookup_precision(precision).torch_dtype
    return FusedDecoder(source.model, max_cache, "cuda", dtype)
