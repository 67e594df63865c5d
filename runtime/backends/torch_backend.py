"""The PyTorch reference backend."""
from __future__ import annotations

import copy
from contextlib import nullcontext

import torch

from models.precision import precision as lookup_precision, precision_of_torch
from models.signature import graph_signature, past_names, present_names
from models.transformer import Transformer

from .base import Backend, BackendError, TensorMeta


class TorchBackend(Backend):
    """Runs the PyTorch model (eval mode, no grad) on `device`, optionally cast to `dtype`."""

    def __init__(self, model: Transformer, device: str = "cpu", dtype: torch.dtype = torch.float32,
                 with_past: bool = False):
        row = precision_of_torch(dtype)
        self.name = f"torch-{device}" if row.name == "fp32" else f"torch-{device}-{row.dtype}"
        first = next(model.parameters())
        if first.dtype != dtype or first.device != torch.device(device):
            model = copy.deepcopy(model)  # leave the caller's model as it is
        self.model = model.to(device=device, dtype=dtype).eval()
        self.device = torch.device(device)
        self.forward_fn = self.model
        self.config = model.config
        self.vocab_size = model.config.num_tokens
        self.with_past = with_past
        signature = graph_signature(model.config, with_past, row.dtype)
        self._inputs = [TensorMeta(s.name, s.dtype, s.dims) for s in signature.inputs]
        self._outputs = [TensorMeta(s.name, s.dtype, s.dims) for s in signature.outputs]

    @property
    def inputs(self) -> list[TensorMeta]:
        return self._inputs

    @property
    def outputs(self) -> list[TensorMeta]:
        return self._outputs

    def attention_kernels(self):
        """SDPA kernels allowed: not cuDNN's, which builds a new plan for every new sequence
        length (every decode step: ~50 ms each on an H100 with torch 2.11)."""
        if self.device.type != "cuda":
            return nullcontext()
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])

    @torch.inference_mode()
    def _run_torch(self, feeds: dict) -> dict:
        with self.attention_kernels():
            return self._forward(feeds)

    def _forward(self, feeds: dict) -> dict:
        feeds = {name: value.to(self.device) for name, value in feeds.items()}
        if not self.with_past:
            return {"logits": self.forward_fn(feeds["input_ids"], feeds["attention_mask"]).float()}
        names = past_names(self.model.config.depth)
        past = [(feeds[key], feeds[value]) for key, value in zip(names[::2], names[1::2])]
        logits, presents = self.forward_fn(feeds["input_ids"], feeds["attention_mask"], past, use_cache=True)
        cache = [tensor for layer in presents for tensor in layer]
        return {"logits": logits.float(), **dict(zip(present_names(self.model.config.depth), cache))}


class CompiledTorchBackend(TorchBackend):
    """PyTorch with torch.compile(mode="reduce-overhead"): the comparison users reach for.

    CUDA-graph outputs are overwritten by the next replay, so outputs are cloned before they
    are fed back as the next step's cache."""

    def __init__(self, model: Transformer, device: str = "cuda", dtype: torch.dtype = torch.float32,
                 with_past: bool = False, mode: str = "reduce-overhead"):
        super().__init__(model, device, dtype, with_past)
        self.name = self.name.replace("torch-", "torch-compile-dynamic-", 1)
        self.forward_fn = torch.compile(self.model, mode=mode, dynamic=True)

    def _run_torch(self, feeds: dict) -> dict:
        if hasattr(torch.compiler, "cudagraph_mark_step_begin"):
            torch.compiler.cudagraph_mark_step_begin()
        return {name: value.clone() for name, value in super()._run_torch(feeds).items()}


def open_torch(source, spec, precision: str = "fp32", with_past: bool = True, device: str | None = None,
               **_options) -> TorchBackend:
    """The registry's opener: `source` is a models.source.ModelSource; `device` overrides the spec's."""
    return TorchBackend(source.model, device or spec.resolved_device(), lookup_precision(precision).torch_dtype,
                        with_past)


def open_compiled(source, spec, precision: str = "fp32", with_past: bool = True, **_options) -> CompiledTorchBackend:
    if not torch.cuda.is_available():
        raise BackendError(f"{spec.name} with CUDA graphs needs a GPU")
    return CompiledTorchBackend(source.model, "cuda", lookup_precision(precision).torch_dtype, with_past)
