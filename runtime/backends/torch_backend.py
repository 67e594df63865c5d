"""The PyTorch reference backend."""
from __future__ import annotations

import numpy as np
import torch

from models.signature import graph_signature
from models.transformer import Transformer

from .base import Backend, TensorMeta


class TorchBackend(Backend):
    """Runs the PyTorch model (eval mode, no grad) on `device`, optionally cast to `dtype`."""

    def __init__(self, model: Transformer, device: str = "cpu", dtype: torch.dtype = torch.float32):
        self.name = f"torch-{device}" if dtype == torch.float32 else f"torch-{device}-{str(dtype).removeprefix('torch.')}"
        self.model = model.to(device=device, dtype=dtype).eval()
        self.device = torch.device(device)
        self.vocab_size = model.config.num_tokens
        signature = graph_signature(model.config)
        self._inputs = [TensorMeta(s.name, s.dtype, s.dims) for s in signature.inputs]
        self._outputs = [TensorMeta(s.name, s.dtype, s.dims) for s in signature.outputs]

    @property
    def inputs(self) -> list[TensorMeta]:
        return self._inputs

    @property
    def outputs(self) -> list[TensorMeta]:
        return self._outputs

    @torch.inference_mode()
    def _run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        tensors = {name: torch.from_numpy(value).to(self.device) for name, value in feeds.items()}
        logits = self.model(tensors["input_ids"], tensors["attention_mask"])
        return {"logits": logits.float().cpu().numpy()}
