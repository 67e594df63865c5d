"""The static-cache decoder: a graph written by `export-model --static-cache N` on ONNX Runtime.

Each layer's key/value cache is a preallocated (rows, kv_heads, N, dim_head) buffer bound as
both past and present (IO binding), and every row keeps its own length in `seqlens_k`, so a
decode step has fixed shapes and addresses whichever rows are active; on CUDA it is replayed
as one CUDA graph (ONNX Runtime's `enable_cuda_graph`), which removes the per-node launch
overhead that dominates a batch-1 step. Prompts run outside the graph (`gpu_graph_id` -1),
each contiguous run of started rows in one call that writes into those rows' buffers only.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from models.graph_metadata import STATIC_CACHE
from models.precision import precision
from models.signature import present_name

from ..backends import BackendError
from ..backends.base import check_io
from ..backends.onnxruntime_backend import (_import_onnxruntime, _numpy_dtype, open_session, session_io,
                                            session_metadata)
from ..resources import cache_bytes, logits_bytes, require
from .base import Decoder, DecodingError


def right_pad(prompts: list[list[int]]) -> tuple[Tensor, Tensor]:
    """Ragged prompts -> (ids (b, width), lengths (b,)), padded on the right with token 0."""
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.int64)
    for row, prompt in enumerate(prompts):
        ids[row, : len(prompt)] = torch.tensor(prompt, dtype=torch.int64)
    return ids, torch.tensor([len(p) for p in prompts], dtype=torch.int64)


def contiguous_runs(rows: list[int]) -> list[list[int]]:
    """[0, 1, 2, 5, 6] -> [[0, 1, 2], [5, 6]]: rows whose cache buffers form one slice."""
    runs: list[list[int]] = []
    for row in sorted(rows):
        if runs and row == runs[-1][-1] + 1:
            runs[-1].append(row)
        else:
            runs.append([row])
    return runs


class StaticCacheDecoder(Decoder):
    """`model` is a path or the serialized bytes of a static-cache graph. Not thread-safe: one
    decoder owns its cache buffers."""

    def __init__(self, model: str | Path | bytes, rows: int = 1, provider: str = "cuda", cuda_graph: bool | None = None):
        self.cuda_graph = provider == "cuda" if cuda_graph is None else cuda_graph
        self.session = open_session(model, provider, {"enable_cuda_graph": str(int(self.cuda_graph))})
        where = "the serialized graph" if isinstance(model, bytes) else str(model)
        graph = session_metadata(self.session, where)
        if graph.kind != STATIC_CACHE:
            raise BackendError(f"{where} is not a static-cache graph (export it with export-model --static-cache N)")
        check_io(graph.signature(), *session_io(self.session), where)
        self.max_cache = graph.max_cache
        super().__init__(f"onnxruntime-{provider}-static-cache", "cuda" if provider == "cuda" else "cpu", graph.config,
                         rows, self.max_cache,
                         f"the graph's {self.max_cache}-token static cache; re-export with a larger --static-cache")
        self.graph, self.provider, self.mode = graph, provider, "static cache"
        self._allocate(graph.signature().cache_inputs)
        ort = _import_onnxruntime()
        self._run_options = {name: ort.RunOptions() for name in ("prefill", "step")}
        if self.cuda_graph:
            self._run_options["prefill"].add_run_config_entry("gpu_graph_id", "-1")  # variable shapes: no graph
            self._run_options["step"].add_run_config_entry("gpu_graph_id", "1")

    def _allocate(self, cache_names: list[str]) -> None:
        c, rows, device = self.config, self.rows, self.device
        row = precision(self.graph.precision)
        require(cache_bytes(c, rows, self.max_cache, row.bytes_per_value) + logits_bytes(c, rows, 1),
                f"the static cache of {rows} row(s) x {self.max_cache} tokens", device.type,
                "use fewer rows or a graph exported with a smaller --static-cache")
        dtype = row.torch_dtype
        self.caches = {name: torch.zeros(rows, c.kv_heads, self.max_cache, c.dim_head, dtype=dtype, device=device)
                       for name in cache_names}
        self.step_ids = torch.zeros(rows, 1, dtype=torch.int64, device=device)
        self.seqlens = torch.zeros(rows, dtype=torch.int32, device=device)  # per row: tokens held - 1
        self.row_active = torch.zeros(rows, dtype=torch.int32, device=device)
        self.active_index: Tensor | None = None  # None when every row is active
        self.step_logits = torch.zeros(rows, 1, c.num_tokens, dtype=torch.float32, device=device)
        self._step_binding = self._binding(slice(0, rows), self.step_ids, self.seqlens, self.max_cache, self.step_logits)

    def _bind(self, binding, name: str, tensor: Tensor, output: bool = False) -> None:
        method = binding.bind_output if output else binding.bind_input
        method(name, self.device.type, 0, _numpy_dtype(tensor.dtype), tuple(tensor.shape), tensor.data_ptr())

    def _binding(self, rows: slice, ids: Tensor, seqlens: Tensor, total: int, logits: Tensor):
        binding = self.session.io_binding()
        self._bind(binding, "input_ids", ids)
        self._bind(binding, "seqlens_k", seqlens)
        binding.bind_cpu_input("total_sequence_length", np.array(total, dtype=np.int32))
        for name, buffer in self.caches.items():  # past and present share the buffer
            self._bind(binding, name, buffer[rows])
            self._bind(binding, present_name(name), buffer[rows], output=True)
        self._bind(binding, "logits", logits, output=True)
        return binding

    def _run(self, binding, kind: str) -> None:
        if self.device.type == "cuda":
            torch.cuda.current_stream().synchronize()  # ONNX Runtime runs on its own stream
        self.session.run_with_iobinding(binding, self._run_options[kind])

    def _prefill_run(self, run: list[int], prompts: dict[int, list[int]]) -> Tensor:
        """Fill the cache rows of one contiguous run; return their logits (k, width, vocab)."""
        ids, lengths = right_pad([prompts[row] for row in run])
        if ids.shape[1] > self.max_cache:
            raise DecodingError(f"a {ids.shape[1]}-token prompt does not fit {self.capacity_hint}")
        rows = slice(run[0], run[-1] + 1)
        seqlens = (lengths - 1).to(torch.int32).to(self.device)
        logits = torch.empty(len(run), ids.shape[1], self.config.num_tokens, dtype=torch.float32, device=self.device)
        self._run(self._binding(rows, ids.to(self.device), seqlens, ids.shape[1], logits), "prefill")
        self.seqlens[rows] = seqlens
        self.row_active[rows] = 1
        return logits

    def _start(self, prompts: dict[int, list[int]], all_logits: bool):
        per_row = {}
        for run in contiguous_runs(list(prompts)):
            logits = self._prefill_run(run, prompts)
            for i, row in enumerate(run):
                per_row[row] = logits[i, : len(prompts[row])]  # right-padded: the prompt's own positions
        self._update_active(set(self.lengths) | set(prompts))
        if all_logits:
            return [per_row[row] for row in prompts]
        return torch.stack([per_row[row][-1] for row in prompts])

    def _update_active(self, active: set[int]) -> None:
        self.active_index = None if len(active) == self.rows else torch.tensor(sorted(active), device=self.device)

    def _step(self, tokens: Tensor) -> Tensor:
        if self.active_index is None:
            self.step_ids.copy_(tokens.reshape(self.rows, 1))
        else:
            self.step_ids.index_copy_(0, self.active_index, tokens.reshape(-1, 1))
        self.seqlens.add_(self.row_active)
        if not self.cuda_graph:  # without a graph, the true longest row keeps attention short
            self._step_binding.bind_cpu_input("total_sequence_length",
                                              np.array(max(self.lengths.values()) + 1, dtype=np.int32))
        self._run(self._step_binding, "step")
        if self.active_index is None:
            return self.step_logits[:, 0]
        return self.step_logits[:, 0].index_select(0, self.active_index)

    def _release(self, rows: list[int]) -> None:
        index = torch.tensor(rows, device=self.device)
        self.row_active.index_fill_(0, index, 0)
        self.seqlens.index_fill_(0, index, 0)
        self._update_active(set(self.lengths) - set(rows))

    def close(self) -> None:
        super().close()
        self.session = self._step_binding = None
        self.caches.clear()


def open_static_cache(target, spec, rows: int = 1, precision: str | None = None, max_cache: int | None = None,
                      **_options) -> StaticCacheDecoder:
    """The registry's opener for the *-static backends: `target` is a static-cache graph (path or
    bytes), or a ModelSource whose weights are written into one in memory, `max_cache` tokens deep."""
    if hasattr(target, "model"):
        from export.static_cache_graph import build_static_cache_graph

        if max_cache is None:
            raise DecodingError("writing a static-cache graph from weights needs max_cache")
        target = build_static_cache_graph(target.model, max_cache, precision or "fp32", target.record).SerializeToString()
    return StaticCacheDecoder(target, rows, spec.device)
