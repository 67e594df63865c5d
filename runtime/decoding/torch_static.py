"""PyTorch the way gpt-fast serves it, as a Decoder: the key/value buffers live in a module
(models/static_cache.py), every decode step has fixed shapes, and the step is compiled with
torch.compile(mode="reduce-overhead", fullgraph=True) so it replays as a CUDA graph; prompts are
compiled separately (dynamic shapes). The strongest PyTorch baseline for the benchmark."""
from __future__ import annotations

import copy
import time

import torch
from torch import Tensor

from models.precision import precision as lookup_precision
from models.static_cache import StaticCacheModel
from models.transformer import Transformer

from ..backends import BackendError
from ..resources import cache_bytes, require
from .base import Decoder, DecodingError
from .static_cache import contiguous_runs, right_pad
from .transfer import moved, to_device


class TorchStaticDecoder(Decoder):
    """`compile=False` runs the same static-cache math eagerly (for tests on the CPU)."""

    def __init__(self, model: Transformer, rows: int, max_cache: int, device: str = "cuda",
                 dtype: torch.dtype = torch.float32, compile: bool = True):
        config = model.config
        super().__init__("torch-compile-static" if compile else f"torch-{device}-static", device, config, rows,
                         max_cache, f"the {max_cache}-token static cache; ask for fewer tokens")
        require(cache_bytes(config, rows, max_cache, torch.empty((), dtype=dtype).element_size()),
                f"the static cache of {rows} row(s) x {max_cache} tokens", self.device.type, "use fewer rows")
        first = next(model.parameters())
        if first.device != self.device or first.dtype != dtype:
            model = copy.deepcopy(model).to(device=self.device, dtype=dtype)  # leave the caller's model as it is
        self.module = StaticCacheModel(model.eval(), rows, max_cache).eval()
        self.mode = "static cache, torch.compile" if compile else "static cache, eager"
        self.positions = torch.zeros(rows, dtype=torch.int64, device=self.device)
        self.row_active = torch.zeros(rows, dtype=torch.int64, device=self.device)
        self.step_ids = torch.zeros(rows, 1, dtype=torch.int64, device=self.device)
        self.decode, self.prefill = self.module, self.module.prefill
        if compile:
            # a server admits requests into any rows: each new (first row, run length) may compile
            # prefill once more, past dynamo's default limit of 8 (FailOnRecompileLimitHit on the H200)
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
            self.decode = torch.compile(self.module, mode="reduce-overhead", fullgraph=True)
            self.prefill = torch.compile(self.module.prefill, fullgraph=True, dynamic=True)
        started = time.perf_counter()
        self._warm_up()
        self.open_seconds = time.perf_counter() - started

    @torch.inference_mode()
    def _warm_up(self) -> None:
        """Compile and capture now, not during the first request."""
        if self.device.type != "cuda":
            return
        for _ in range(3):  # reduce-overhead records its CUDA graph after warm-up runs
            self._start({0: [0, 0]}, False)
            self.lengths[0] = 2
            self._step(torch.zeros(1, dtype=torch.int64, device=self.device))
            self.lengths.clear()
            self._release([0])
        torch.cuda.synchronize()

    @torch.inference_mode()
    def _start(self, prompts: dict[int, list[int]], all_logits: bool):
        per_row = {}
        for run in contiguous_runs(list(prompts)):
            ids, lengths = right_pad([prompts[row] for row in run])
            lengths = moved(lengths, self.device)
            width = ids.shape[1]
            index = (torch.arange(width, device=self.device).expand(len(run), width) if all_logits
                     else (lengths - 1)[:, None])
            logits = self.prefill(moved(ids, self.device), index.contiguous(), slice(run[0], run[-1] + 1)).clone()
            self.positions[run[0]: run[-1] + 1] = lengths
            self.row_active[run[0]: run[-1] + 1] = 1
            for i, row in enumerate(run):
                per_row[row] = logits[i, : len(prompts[row])] if all_logits else logits[i, -1]
        if all_logits:
            return [per_row[row] for row in prompts]
        return torch.stack([per_row[row] for row in prompts])

    @torch.inference_mode()
    def _step_every_row(self, tokens: Tensor) -> Tensor:
        self.step_ids.copy_(tokens.reshape(self.rows, 1))
        return self._run_step()

    @torch.inference_mode()
    def _step(self, tokens: Tensor) -> Tensor:
        index = self._active_index()
        self.step_ids.index_copy_(0, index, tokens.reshape(-1, 1))
        return self._run_step().index_select(0, index)

    def _run_step(self) -> Tensor:
        if hasattr(torch.compiler, "cudagraph_mark_step_begin"):
            torch.compiler.cudagraph_mark_step_begin()
        logits = self.decode(self.step_ids, self.positions)
        self.positions.add_(self.row_active)
        return logits[:, 0]

    def _release(self, rows: list[int]) -> None:
        index = to_device(rows, torch.int64, self.device)
        self.row_active.index_fill_(0, index, 0)
        self.positions.index_fill_(0, index, 0)


def open_torch_static(source, spec, rows: int = 1, precision: str = "fp32", max_cache: int | None = None,
                      **_options) -> TorchStaticDecoder:
    """The registry's opener for torch-compile-static (weights in, a compiled static-cache decoder out)."""
    if not torch.cuda.is_available():
        raise BackendError(f"{spec.name} replays CUDA graphs and needs a GPU")
    if max_cache is None:
        raise DecodingError(f"{spec.name} needs the largest number of tokens a row will hold (max_cache)")
    return TorchStaticDecoder(source.model, rows, max_cache, "cuda", lookup_precision(precision).torch_dtype)
