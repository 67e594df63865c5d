"""The cache-feed decoder: any Backend whose graph takes `past_key_values.*` and returns
`present.*` (PyTorch, ONNX Runtime CPU/CUDA, TensorRT), driven row by row.

The batch's cache is one tensor per layer, left-padded so every row ends at the last column;
the attention mask marks each row's real tokens, and positions count only those, so a row
computes exactly what it would alone. New rows are prefilled on their own and merged in;
released rows are dropped and all-padding columns trimmed. A graph without a cache (the plain
logits graph) is driven the same way by re-feeding each row's whole sequence.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from models.signature import is_cache_input, next_cache_feeds

from ..backends import Backend
from .base import Decoder, DecodingError


def left_pad(prompts: list[list[int]], device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
    """Ragged prompts -> (ids, mask) (b, width), padded on the left so every row ends at the last column."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise DecodingError("every prompt needs at least one token")
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.int64)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = torch.tensor(prompt, dtype=torch.int64)
        mask[row, width - len(prompt):] = 1
    return ids.to(device), mask.to(device)


class _Batch:
    """Row ids (sorted), their mask (b, T) and per-input state tensors whose sequence axis is `dim`."""

    def __init__(self, rows: list[int], mask: Tensor, state: dict[str, tuple[Tensor, int]]):
        self.rows, self.mask, self.state = rows, mask, state

    def width(self) -> int:
        return self.mask.shape[1]

    def padded_to(self, width: int) -> "_Batch":
        extra = width - self.width()
        if extra == 0:
            return self

        def pad(tensor: Tensor, dim: int) -> Tensor:
            spec = [0, 0] * (tensor.dim() - 1 - dim) + [extra, 0]
            return F.pad(tensor, spec)

        return _Batch(self.rows, pad(self.mask, 1), {n: (pad(t, d), d) for n, (t, d) in self.state.items()})

    def select(self, indices: list[int]) -> "_Batch":
        index = torch.tensor(indices, device=self.mask.device)
        return _Batch([self.rows[i] for i in indices], self.mask.index_select(0, index),
                      {n: (t.index_select(0, index), d) for n, (t, d) in self.state.items()})

    def trimmed(self) -> "_Batch":
        """Drop leading columns that are padding in every row."""
        used = self.mask.any(0).nonzero()
        first = int(used[0]) if used.numel() else self.width()
        if first == 0:
            return self
        return _Batch(self.rows, self.mask[:, first:], {n: (t.narrow(d, first, t.shape[d] - first), d)
                                                        for n, (t, d) in self.state.items()})

    @staticmethod
    def merge(old: "_Batch | None", new: "_Batch") -> "_Batch":
        if old is None:
            merged = new
        else:
            width = max(old.width(), new.width())
            old, new = old.padded_to(width), new.padded_to(width)
            merged = _Batch(old.rows + new.rows, torch.cat((old.mask, new.mask)),
                            {n: (torch.cat((t, new.state[n][0])), d) for n, (t, d) in old.state.items()})
        order = sorted(range(len(merged.rows)), key=merged.rows.__getitem__)
        return merged if order == list(range(len(order))) else merged.select(order)


class CacheFeedDecoder(Decoder):
    """Decodes through `backend`, feeding each step's present.* back as the next past_key_values.*."""

    def __init__(self, backend: Backend, rows: int = 1):
        config = backend.config
        if config is None:
            raise DecodingError(f"{backend.name}: the model config is unknown; use a graph written by export-model")
        limit = config.max_seq_len
        super().__init__(backend.name, getattr(backend, "device", "cpu"), config, rows, limit,
                         f"the model's max_seq_len of {limit}; shorten the prompt or --max-new-tokens")
        self.backend = backend
        self.cache_inputs = [name for name in backend.input_names if is_cache_input(name)]
        self.cache_dtypes = {meta.name: getattr(torch, meta.dtype) for meta in backend.inputs
                             if meta.name in self.cache_inputs}
        self.mode = "cache" if self.cache_inputs else "full recompute"
        self.batch: _Batch | None = None

    @property
    def queues_steps(self) -> bool:
        # no: each step reads the ids back to check them (Backend.run) and the growing cache's
        # bookkeeping reads the mask, so the host waits for the GPU inside every step anyway
        return False

    def _empty_cache(self, rows: int) -> dict[str, Tensor]:
        c = self.config
        return {name: torch.zeros(rows, c.kv_heads, 0, c.dim_head, dtype=dtype, device=self.device)
                for name, dtype in self.cache_dtypes.items()}

    def _state(self, ids: Tensor, outputs: dict) -> dict[str, tuple[Tensor, int]]:
        if not self.cache_inputs:
            return {"input_ids": (ids, 1)}
        return {name: (tensor, 2) for name, tensor in next_cache_feeds(outputs, self.cache_inputs).items()}

    def _start(self, prompts: dict[int, list[int]], all_logits: bool):
        self._drop([row for row in prompts if row in self.lengths])
        rows = list(prompts)
        ids, mask = left_pad([prompts[row] for row in rows], self.device)
        outputs = self.backend.run({"input_ids": ids, "attention_mask": mask, **self._empty_cache(len(rows))})
        logits = outputs["logits"]  # (k, width, vocab)
        fresh = _Batch(rows, mask, self._state(ids, outputs))
        self.batch = _Batch.merge(self.batch, fresh.select(sorted(range(len(rows)), key=rows.__getitem__)))
        if all_logits:
            return [logits[i, logits.shape[1] - len(prompts[row]):] for i, row in enumerate(rows)]
        return logits[:, -1]

    def _step(self, tokens: Tensor) -> Tensor:
        batch = self.batch
        chosen = tokens.to(torch.int64)[:, None]  # (b, 1)
        mask = torch.cat((batch.mask, torch.ones_like(chosen)), dim=1)
        if self.cache_inputs:
            feeds = {"input_ids": chosen, "attention_mask": mask, **{n: t for n, (t, _) in batch.state.items()}}
        else:
            ids = torch.cat((batch.state["input_ids"][0], chosen), dim=1)
            feeds = {"input_ids": ids, "attention_mask": mask}
        outputs = self.backend.run(feeds)
        self.batch = _Batch(batch.rows, mask, self._state(feeds["input_ids"], outputs))
        return outputs["logits"][:, -1]

    def _release(self, rows: list[int]) -> None:
        self._drop(rows)

    def _drop(self, rows: list[int]) -> None:
        if self.batch is None or not rows:
            return
        keep = [i for i, row in enumerate(self.batch.rows) if row not in rows]
        self.batch = self.batch.select(keep).trimmed() if keep else None

    def close(self) -> None:
        super().close()
        self.batch = None
