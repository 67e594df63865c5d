"""The static-cache decoder: graphs written by `export-model --static-cache N` (ONNX Runtime's
GroupQueryAttention graph) or `--static-cache N --portable` (standard ops, also for TensorRT).

Each layer's key/value cache is a preallocated (rows, kv_heads, N, dim_head) buffer and every
row keeps its own length on the device, so a decode step has fixed shapes and addresses whichever
rows are active. Started rows are prefilled as contiguous runs into their own buffer rows, with
logits computed only where asked (`logits_index`: every prompt position for parity, the last
for generation). Two runners feed the graph:

- `BoundRunner` (ONNX Runtime, CPU or CUDA): the buffers are bound as both past and present (IO
  binding), so the graph writes in place; on CUDA every decode step is one CUDA-graph replay,
  captured when the decoder is opened, and ONNX Runtime runs on PyTorch's current stream, so no
  host synchronisation is needed before a step. Prompts are prefilled one row at a time through a
  staging row with fixed addresses, so each prompt width replays a CUDA graph of its own too (on
  the H200 ~0.7 ms for up to 128 ids, where a launch-bound prefill without a graph cost ~3.4 ms at
  any width); the filled positions are then copied into the request's cache row in one copy.
- `BackendRunner` (any Backend, e.g. a TensorRT engine of the portable graph): the buffers are
  fed and the present.* outputs copied back into them.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from models.graph_metadata import STATIC_CACHE, STATIC_KINDS, GraphMetadata
from models.precision import precision
from models.signature import present_name

from ..backends import Backend, BackendError
from ..backends.base import check_io
from ..backends.onnxruntime_backend import (_import_onnxruntime, binding_type, open_session, session_io,
                                            session_metadata)
from ..resources import cache_bytes, logits_bytes, require
from .base import Decoder, DecodingError
from .captured_step import CapturedSteps
from .side_prefill import SidePrefill
from .transfer import moved, to_device


def right_pad(prompts: list[list[int]]) -> tuple[Tensor, Tensor]:
    """Ragged prompts -> (ids (b, width), lengths (b,)), padded on the right with token 0."""
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.int64)
    for row, prompt in enumerate(prompts):
        ids[row, : len(prompt)] = torch.tensor(prompt, dtype=torch.int64)
    return ids, torch.tensor([len(p) for p in prompts], dtype=torch.int64)


def prefill_width(width: int, max_cache: int) -> int:
    """The width a CUDA prefill runs at: the next power of two (at most the window). Each new prompt
    shape costs ONNX Runtime CUDA tens of ms the first time; these few are all run at open."""
    return min(max_cache, 1 << max(width - 1, 0).bit_length())


def warm_up_lengths(max_cache: int) -> list[int]:
    """Every prefill width: the full window, then the powers of two below it down to 1."""
    return [max_cache, *sorted({prefill_width(1 << i, max_cache) for i in range(max_cache.bit_length())} - {max_cache},
                               reverse=True)]


def prefill_key(width: int) -> str:
    """The name of a staged prefill width's recorded graph."""
    return f"prefill {width}"


def contiguous_runs(rows: list[int]) -> list[list[int]]:
    """[0, 1, 2, 5, 6] -> [[0, 1, 2], [5, 6]]: rows whose cache buffers form one slice."""
    runs: list[list[int]] = []
    for row in sorted(rows):
        if runs and row == runs[-1][-1] + 1:
            runs[-1].append(row)
        else:
            runs.append([row])
    return runs


def length_feeds(graph: GraphMetadata, start: Tensor, after: Tensor, total: int) -> dict[str, Tensor | np.ndarray]:
    """What each static graph kind takes to place new tokens: GroupQueryAttention wants tokens after
    the call minus 1 (int32) and the attended length; the portable graph each row's first position."""
    if graph.kind == STATIC_CACHE:
        return {"seqlens_k": (after - 1).to(torch.int32), "total_sequence_length": np.array(total, dtype=np.int32)}
    return {"positions": start}


class BoundRunner:
    """ONNX Runtime with the cache buffers bound in place (and CUDA-graph replay on CUDA)."""

    def __init__(self, model: str | Path | bytes, provider: str, cuda_graph: bool | None, stream=None):
        """`stream`: the PyTorch CUDA stream it runs on (default: the current one)."""
        self.on_cuda = provider == "cuda"
        self.cuda_graph = self.on_cuda if cuda_graph is None else cuda_graph
        options = {"enable_cuda_graph": str(int(self.cuda_graph))}
        self.torch_stream = provider == "cuda"
        if self.torch_stream:  # run on PyTorch's stream: ordered with our tensors, no sync before a run
            handle = (stream or torch.cuda.current_stream()).cuda_stream
            user_stream = {"has_user_compute_stream": "1", "user_compute_stream": str(handle)}
            try:
                self.session = self._open(model, provider, {**options, **user_stream})
            except BackendError as error:  # a build that refuses a user stream with CUDA graphs: synchronise instead
                if "CUDA graph" in str(error):
                    raise
                self.torch_stream = False
        if not self.torch_stream:
            self.session = self._open(model, provider, options)
        self.where = "the serialized graph" if isinstance(model, bytes) else str(model)
        self.graph = session_metadata(self.session, self.where)
        self.inputs, self.outputs = session_io(self.session)
        # the stream ONNX Runtime was given; a run from another current stream is ordered with it (_run)
        self.stream = (stream or torch.cuda.current_stream()) if self.torch_stream else None
        self.run_options = {"prefill": self._options(-1), "step": self._options(1),  # prefill: any shape, no graph
                            "recorded": self._options(-1)}  # the step as PyTorch records it (captured_step)
        self.run_options["recorded"].add_run_config_entry("disable_synchronize_execution_providers", "1")
        # The step and the prefills keep ONNX Runtime's end-of-run synchronisation: without it the
        # steps of this graph decoded wrong tokens on the H200 (parity failed at f78f0a8). The
        # "recorded" step runs unsynchronised only while PyTorch records it; replays are stream-ordered.
        self.step_binding = None
        self.staged: dict[int, tuple] = {}  # prefill width -> (binding, run options, feeds kept alive)

    def _options(self, graph_id: int):
        options = _import_onnxruntime().RunOptions()
        if self.cuda_graph:
            options.add_run_config_entry("gpu_graph_id", str(graph_id))
        return options

    @staticmethod
    def _open(model, provider: str, options: dict):
        try:
            return open_session(model, provider, options)
        except BackendError as error:
            if "graph capture" not in str(error):
                raise
            where = "the serialized graph" if isinstance(model, bytes) else str(model)
            raise BackendError(f"{where} cannot replay its steps as a CUDA graph: not every node runs on the CUDA "
                               "provider (GroupQueryAttention runs in fp16 or bf16 there); export it with --dtype fp16, "
                               "or with --portable for fp32") from None

    def _binding(self, feeds: dict, caches: dict[str, Tensor], logits: Tensor):
        binding = self.session.io_binding()
        for name, value in feeds.items():
            if isinstance(value, np.ndarray):
                binding.bind_cpu_input(name, value)
            else:
                self._bind(binding, name, value)
        for name, buffer in caches.items():  # past and present share the buffer
            self._bind(binding, name, buffer)
            self._bind(binding, present_name(name), buffer, output=True)
        self._bind(binding, "logits", logits, output=True)
        return binding

    @staticmethod
    def _bind(binding, name: str, tensor: Tensor, output: bool = False) -> None:
        method = binding.bind_output if output else binding.bind_input
        method(name, tensor.device.type, 0, binding_type(tensor.dtype), tuple(tensor.shape), tensor.data_ptr())

    def _run(self, binding, options) -> None:
        if self.on_cuda and not self.torch_stream:  # ONNX Runtime's own stream: wait for ours first
            torch.cuda.current_stream().synchronize()
        current = torch.cuda.current_stream() if self.stream is not None else None
        if current is not None and current != self.stream:  # a stream of its own: ordered with the caller's
            self.stream.wait_stream(current)
            self.session.run_with_iobinding(binding, options)
            current.wait_stream(self.stream)
        else:
            self.session.run_with_iobinding(binding, options)

    def prefill(self, feeds: dict, caches: dict[str, Tensor], logits: Tensor) -> None:
        self._run(self._binding(feeds, caches, logits), self.run_options["prefill"])

    def prepare_staged(self, width: int, feeds: dict, caches: dict[str, Tensor], logits: Tensor) -> None:
        """Bind a one-row prefill of `width` tokens to fixed buffers, with a CUDA graph id of its own
        (captured on its first runs, as the step's is)."""
        self.staged[width] = (self._binding(feeds, caches, logits), self._options(2 + len(self.staged)), feeds)

    def prefill_staged(self, width: int) -> None:
        binding, options, _ = self.staged[width]
        self._run(binding, options)

    def prefill_staged_unsynchronised(self, width: int) -> None:
        """A staged prefill as a plain run that returns once queued, on the current stream's capture:
        what a PyTorch CUDA graph records (as step_unsynchronised)."""
        self.session.run_with_iobinding(self.staged[width][0], self.run_options["recorded"])

    def prepare_step(self, feeds: dict, caches: dict[str, Tensor], logits: Tensor) -> None:
        """Bind the step's fixed buffers once: every later step replays with the same addresses (the
        feeds are kept referenced here, so their memory outlives the binding)."""
        self.step_feeds = (feeds, caches, logits)
        self.step_binding = self._binding(feeds, caches, logits)

    def step(self, total: np.ndarray | None) -> None:
        if total is not None and not self.cuda_graph:  # without a graph, attend only to the longest row
            self.step_binding.bind_cpu_input("total_sequence_length", total)
        self._run(self.step_binding, self.run_options["step"])

    def step_unsynchronised(self) -> None:
        """The step as a plain run that returns once queued, on the session's stream: what a PyTorch
        CUDA graph records (captured_step), never replayed by ONNX Runtime itself."""
        self.session.run_with_iobinding(self.step_binding, self.run_options["recorded"])

    def close(self) -> None:
        self.session = self.step_binding = self.step_feeds = None
        self.staged = {}


class BackendRunner:
    """Any Backend of the portable static graph: buffers fed, present.* copied back into them."""

    def __init__(self, backend: Backend):
        if backend.graph is None or backend.graph.kind not in STATIC_KINDS:
            raise BackendError(f"{backend.name} does not run a static-cache graph")
        self.backend, self.graph, self.cuda_graph = backend, backend.graph, getattr(backend, "cuda_graphs", False)
        self.step_feeds = None

    def _run(self, feeds: dict, caches: dict[str, Tensor], logits: Tensor) -> None:
        feeds = {n: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for n, v in feeds.items()}
        outputs = self.backend.run({**feeds, **caches})
        for name, buffer in caches.items():
            buffer.copy_(outputs[present_name(name)])
        logits.copy_(outputs["logits"])

    def prefill(self, feeds: dict, caches: dict[str, Tensor], logits: Tensor) -> None:
        self._run(feeds, caches, logits)

    def prepare_step(self, feeds: dict, caches: dict[str, Tensor], logits: Tensor) -> None:
        self.step_feeds = (feeds, caches, logits)

    def step(self, total: np.ndarray | None) -> None:
        feeds, caches, logits = self.step_feeds
        if total is not None:
            feeds = {**feeds, "total_sequence_length": total}
        self._run(feeds, caches, logits)

    def close(self) -> None:
        pass  # the backend belongs to whoever opened it


class StaticCacheDecoder(Decoder):
    """`model`: a path or the serialized bytes of a static-cache graph (run by ONNX Runtime on
    `provider`), or a Backend that runs one. Not thread-safe: one decoder owns its buffers."""

    def __init__(self, model: str | Path | bytes | Backend, rows: int = 1, provider: str = "cuda",
                 cuda_graph: bool | None = None, staged_prefill: bool | None = None, overlap_prefill: bool = False,
                 record_step: bool | None = None):
        """`staged_prefill`: start prompts one row at a time through fixed buffers (default: when the
        steps replay CUDA graphs, so the prefills do too); logits at every prompt position (parity)
        always take the batched prefill. `overlap_prefill` (with staged prefills): run them on a second
        ONNX Runtime session and a CUDA stream of their own, so that `start_beside` prefills while a
        step decodes (the graph's weights are then held twice); recorded prefills are queued there
        from the caller's thread, others run in a thread of their own. `record_step` (CUDA, default
        on): the session runs on a stream of its own, so that step_and_pick records the step and the
        caller's pick as one PyTorch CUDA graph (runtime.decoding.captured_step), and each staged
        prefill width is recorded as a graph too."""
        stream = None
        if isinstance(model, Backend):
            runner, where, device, name = BackendRunner(model), model.name, model.device, model.name
        else:
            if provider == "cuda" and cuda_graph is not False and record_step is not False:
                stream = torch.cuda.Stream()
            runner = BoundRunner(model, provider, cuda_graph, stream)
            where, device, name = runner.where, "cuda" if provider == "cuda" else "cpu", f"onnxruntime-{provider}"
            if runner.graph.kind not in STATIC_KINDS:
                raise BackendError(f"{where} is not a static-cache graph (export it with export-model --static-cache N)")

            check_io(runner.graph.signature(), runner.inputs, runner.outputs, where)
        self.runner, self.graph = runner, runner.graph
        self.max_cache, self.cuda_graph = self.graph.max_cache, runner.cuda_graph
        name = name.removesuffix("-static-cache") + f"-{self.graph.kind}"  # ...-static-cache or ...-static-cache-portable
        super().__init__(name, device, self.graph.config, rows, self.max_cache,
                         f"the graph's {self.max_cache}-token static cache; re-export with a larger --static-cache")
        self.mode, self.open_seconds = "static cache", 0.0
        self.pad_prefill = self.device.type == "cuda"  # CUDA: prompts run at the widths warmed at open
        self.staged_prefill = isinstance(runner, BoundRunner) and (self.cuda_graph if staged_prefill is None
                                                                   else staged_prefill)
        self.beside = None  # overlap_prefill's second session
        if overlap_prefill and self.staged_prefill:
            self.beside = SidePrefill(provider == "cuda", lambda stream: BoundRunner(model, provider, runner.cuda_graph, stream))
            self.mode = "static cache, prefills beside the step"
        self.stage_runner = runner if self.beside is None else self.beside.runner
        self.recorded = CapturedSteps(stream) if stream is not None and runner.stream is not None else None
        # with a recorded step, each staged prefill width is recorded too, on its session's stream
        self.prefills = None
        if self.recorded is not None and self.staged_prefill and self.stage_runner.stream is not None:
            self.prefills = CapturedSteps(self.stage_runner.stream)
        if self.recorded is not None:
            self.mode = "static cache, step and sampling as one CUDA graph" + (", prefills beside it" if self.beside else "")
        self._parked: set[int] = set()  # rows whose prefill runs beside the step
        started = time.perf_counter()
        self._allocate()
        self._warm_up()
        self.open_seconds = time.perf_counter() - started

    @property
    def queues_steps(self) -> bool:
        # ONNX Runtime's own step graph (and a plain run) synchronise their stream before they return
        return self.recorded is not None and not self.recorded.broken

    def _allocate(self) -> None:
        c, rows, device = self.config, self.rows, self.device
        row = precision(self.graph.precision)
        require(cache_bytes(c, rows, self.max_cache, row.bytes_per_value) + logits_bytes(c, rows, 1),
                f"the static cache of {rows} row(s) x {self.max_cache} tokens", device.type,
                "use fewer rows or a graph exported with a smaller --static-cache")
        names = self.graph.signature().cache_inputs
        # every layer's keys and values in one block, so a staged prefill lands in its row in one copy
        self.cache_block = torch.zeros(len(names), rows, c.kv_heads, self.max_cache, c.dim_head,
                                       dtype=row.torch_dtype, device=device)
        self.caches = {name: self.cache_block[i] for i, name in enumerate(names)}
        self.held = torch.zeros(rows, dtype=torch.int64, device=device)  # tokens each row holds
        self.row_active = torch.zeros(rows, dtype=torch.int64, device=device)
        self.step_ids = torch.zeros(rows, 1, dtype=torch.int64, device=device)
        self.step_logits = torch.zeros(rows, 1, c.num_tokens, dtype=torch.float32, device=device)
        feeds = {"input_ids": self.step_ids, "logits_index": torch.zeros(rows, 1, dtype=torch.int64, device=device)}
        if self.graph.kind == STATIC_CACHE:
            self.seqlens = torch.zeros(rows, dtype=torch.int32, device=device)
            feeds.update(seqlens_k=self.seqlens, total_sequence_length=np.array(self.max_cache, dtype=np.int32))
        else:
            feeds["positions"] = self.held
        self.runner.prepare_step(feeds, self.caches, self.step_logits)
        if self.staged_prefill:
            self._allocate_stage(names)

    def _allocate_stage(self, names: list[str]) -> None:
        """One row of everything a prefill binds, at fixed addresses, bound once per prefill width."""
        c, device = self.config, self.device
        self.stage_block = torch.zeros(len(names), 1, *self.cache_block.shape[2:], dtype=self.cache_block.dtype,
                                       device=device)
        self.stage_ids = torch.zeros(1, self.max_cache, dtype=torch.int64, device=device)
        self.stage_last = torch.zeros(1, 1, dtype=torch.int64, device=device)  # logits_index: the last position
        self.stage_row = torch.zeros(1, dtype=torch.int64, device=device)  # the cache row a recorded prefill fills
        self.stage_logits = torch.zeros(1, 1, c.num_tokens, dtype=torch.float32, device=device)
        if self.graph.kind == STATIC_CACHE:
            self.stage_seqlens = torch.zeros(1, dtype=torch.int32, device=device)  # the prompt's length - 1
        else:
            self.stage_start = torch.zeros(1, dtype=torch.int64, device=device)  # every prompt starts at 0
        for width in warm_up_lengths(self.max_cache):
            if self.graph.kind == STATIC_CACHE:
                lengths = {"seqlens_k": self.stage_seqlens, "total_sequence_length": np.array(width, dtype=np.int32)}
            else:
                lengths = {"positions": self.stage_start}
            self.stage_runner.prepare_staged(width, {"input_ids": self.stage_ids[:, :width], "logits_index": self.stage_last,
                                               **lengths}, {n: self.stage_block[i] for i, n in enumerate(names)},
                                       self.stage_logits)

    def _warm_up(self) -> None:
        """Run a prompt of every prefill width (the full window first) and a step now, so the memory
        arena holds the largest prompt, each width's kernels are loaded and chosen (the first run of a
        shape costs tens of ms) and the step's CUDA graph is captured when the decoder opens, not
        during the first request."""
        if self.device.type != "cuda":
            return
        for length in warm_up_lengths(self.max_cache):
            self._start_batched({0: [0] * length}, False)
            for _ in range(3 if self.staged_prefill else 0):  # ONNX Runtime captures a graph id's third run
                self._start_staged({0: [0] * length}, park=False)()
        self.lengths[0] = 1
        # ONNX Runtime captures the step on its third run: with prefills beside the step, now, not
        # while the side session runs (a capture is global to the process)
        for _ in range(3 if self.beside is not None else 1):
            self._step(torch.zeros(len(self.active), dtype=torch.int64, device=self.device))
        if self.recorded is not None:  # the plain run a recording makes: its kernels chosen, its scratch held
            torch.cuda.synchronize()
            with torch.cuda.stream(self.recorded.stream):
                self._device_step(torch.zeros(self.rows, dtype=torch.int64, device=self.device), unsynchronised=True)
            torch.cuda.synchronize()
        if self.prefills is not None:
            self._record_prefills()
        self.lengths.clear()
        self._release([0])
        torch.cuda.synchronize()

    def _prefill_run(self, run: list[int], prompts: dict[int, list[int]], all_logits: bool) -> Tensor:
        """Fill the cache rows of one contiguous run; return their logits (k, positions, vocab)."""
        ids, lengths = right_pad([prompts[row] for row in run])
        if ids.shape[1] > self.max_cache:
            raise DecodingError(f"a {ids.shape[1]}-token prompt does not fit {self.capacity_hint}")
        if self.pad_prefill:  # a width warmed at open (the padding is never attended to)
            ids = torch.nn.functional.pad(ids, (0, prefill_width(ids.shape[1], self.max_cache) - ids.shape[1]))
        rows, width = slice(run[0], run[-1] + 1), ids.shape[1]
        lengths = moved(lengths, self.device)
        index = (torch.arange(width, device=self.device).expand(len(run), width) if all_logits
                 else (lengths - 1)[:, None])  # right-padded: each row's own last position
        start = torch.zeros(len(run), dtype=torch.int64, device=self.device)
        feeds = {"input_ids": moved(ids, self.device), "logits_index": index.contiguous(),
                 **length_feeds(self.graph, start, lengths, width)}
        logits = torch.empty(len(run), index.shape[1], self.config.num_tokens, dtype=torch.float32, device=self.device)
        self.runner.prefill(feeds, {name: buffer[rows] for name, buffer in self.caches.items()}, logits)
        self.held[rows] = lengths
        self.row_active[rows] = 1
        return logits

    def _prefill_staged(self, row: int, prompt: list[int], logits: Tensor) -> None:
        """One row's prompt through the staging row (a CUDA graph replay of its width on CUDA), then
        into the row's cache; its next-token logits go to `logits` (vocab,)."""
        length = len(prompt)
        width = prefill_width(length, self.max_cache)  # one of the widths bound at open
        self.stage_ids[0, :length].copy_(to_device(prompt, torch.int64, self.device))
        self.stage_last.fill_(length - 1)
        if self.graph.kind == STATIC_CACHE:
            self.stage_seqlens.fill_(length - 1)
        if self._recorded_prefill(width):
            self.stage_row.fill_(row)
            self.prefills.replay(prefill_key(width))  # queued: no wait for the step before it, nor for the prefill
        else:
            self.stage_runner.prefill_staged(width)
            self.cache_block[:, row, :, :length].copy_(self.stage_block[:, 0, :, :length])
        logits.copy_(self.stage_logits[0, 0])  # now: the next staged prefill overwrites the buffer

    def _staged_work(self, width: int):
        """A staged prefill of `width` and the copy of its window into the cache row `stage_row` names,
        unsynchronised: what _record_prefills records. The window's positions past the prompt hold the
        padding's keys and values until the row's steps overwrite them; no step attends to them first.
        Beside the step, a full-window copy and the step's write of a parked row's last position may
        race on that position: both are padding, overwritten before the row attends to it."""
        window = (slice(None), slice(None), slice(None), slice(None, width))

        def work() -> None:
            self.stage_runner.prefill_staged_unsynchronised(width)
            self.cache_block[window].index_copy_(1, self.stage_row, self.stage_block[window])

        return work

    def _record_prefills(self) -> None:
        """Record each staged width's prefill, with its copy into the cache, as a graph of its own
        (CUDA, with a recorded step; called at open): an admission then queues one replay where ONNX
        Runtime's replay of its own graph waited for the step before it and for the prefill."""
        for width in self.stage_runner.staged:
            work = self._staged_work(width)
            if self.device.type == "cuda":  # the plain run first: its kernels loaded, its scratch held
                torch.cuda.synchronize()
                with torch.cuda.stream(self.prefills.stream):
                    work()
                torch.cuda.synchronize()
            self.prefills.record(prefill_key(width), self.stage_row, None, work)

    def _recorded_prefill(self, width: int) -> bool:
        return self.prefills is not None and self.prefills.ready(prefill_key(width), self.stage_row, None)

    def _start_staged(self, prompts: dict[int, list[int]], park: bool):
        """Prefill `prompts` through the staging row, beside the caller's next step when the decoder
        has a side session; returns the call that activates the rows and gives their logits. `park`:
        the rows are idle through a step meanwhile (see _park)."""
        logits = torch.empty(len(prompts), self.config.num_tokens, dtype=torch.float32, device=self.device)
        if park:
            self._park(list(prompts))

        def prefill_all():
            for i, (row, prompt) in enumerate(prompts.items()):
                self._prefill_staged(row, prompt, logits[i])

        if self.beside is not None and self.device.type == "cuda":  # written there: not reused before that stream is past it
            logits.record_stream(self.beside.stream)
        if self.beside is None:
            wait = prefill_all()
        elif all(self._recorded_prefill(prefill_width(len(p), self.max_cache)) for p in prompts.values()):
            wait = self.beside.queue(prefill_all)  # replays, queued on the side stream once the step is: no thread
        else:
            wait = self.beside.run(prefill_all)

        def finish() -> Tensor:
            self._parked.difference_update(prompts)
            try:
                if wait is not None:
                    wait()
            except BaseException:  # the rows stay idle: back to an idle row's position
                self.held.index_fill_(0, to_device(list(prompts), torch.int64, self.device), 0)
                raise
            # index_copy_, not `held[row] = n`: a Python number set into one element of a CUDA
            # tensor is copied from the host and waited for, which held the host (and the GPU
            # after it) until the step and the prefill had run, once per admitted row
            rows = to_device(list(prompts), torch.int64, self.device)
            self.held.index_copy_(0, rows, to_device([len(p) for p in prompts.values()], torch.int64, self.device))
            self.row_active.index_fill_(0, rows, 1)
            return logits

        return finish

    def _park(self, rows: list[int]) -> None:
        """An idle row still goes through every step, which writes its keys and values at the row's
        held position: hold it at the last one while its prompt lands in front of it. A row started
        beside a step wants at least one new token, so its prompt ends before that position."""
        self._parked.update(rows)
        self.held.index_fill_(0, to_device(rows, torch.int64, self.device), self.max_cache - 1)

    def _start_beside(self, prompts: dict[int, list[int]]):
        if self.beside is None or max(len(p) for p in prompts.values()) >= self.max_cache:
            return None
        return self._start_staged(prompts, park=True)

    def _start(self, prompts: dict[int, list[int]], all_logits: bool):
        if self.staged_prefill and not all_logits:
            return self._start_staged(prompts, park=False)()
        return self._start_batched(prompts, all_logits)

    def _start_batched(self, prompts: dict[int, list[int]], all_logits: bool):
        per_row = {}
        for run in contiguous_runs(list(prompts)):
            logits = self._prefill_run(run, prompts, all_logits)
            for i, row in enumerate(run):
                per_row[row] = logits[i, : len(prompts[row])] if all_logits else logits[i, -1]
        if all_logits:
            return [per_row[row] for row in prompts]
        return torch.stack([per_row[row] for row in prompts])

    def _step_every_row(self, tokens: Tensor) -> Tensor:
        return self._device_step(tokens)

    def _device_step(self, tokens: Tensor, unsynchronised: bool = False) -> Tensor:
        self.step_ids.copy_(tokens.reshape(self.rows, 1))
        return self._run_step(unsynchronised)

    def _recorded_step(self, tokens: Tensor) -> Tensor:
        return self._device_step(tokens, unsynchronised=True)

    def _recorded_logits(self) -> Tensor:
        return self.step_logits[:, 0]

    def _step(self, tokens: Tensor) -> Tensor:
        if len(self.lengths) == self.rows:
            return self._step_every_row(tokens)
        index = self._active_index()
        self.step_ids.index_copy_(0, index, tokens.reshape(-1, 1))
        return self._run_step().index_select(0, index)

    def _run_step(self, unsynchronised: bool = False) -> Tensor:
        """One step over every row (an inactive row's position does not advance); (rows, vocab) logits.
        `unsynchronised`: as a PyTorch CUDA graph records it."""
        if self.graph.kind == STATIC_CACHE:
            self.seqlens.copy_(self.held)  # tokens held before the step = tokens after it minus 1
        if unsynchronised:  # a graph: attends to the whole window, whatever the rows hold now
            self.runner.step_unsynchronised()
        else:
            if self.beside is not None:  # this run holds the host until it is done: prefills queued beside it go first
                self.beside.launch_queued()
            self.runner.step(self._attended())
        self.held.add_(self.row_active)
        return self.step_logits[:, 0]

    def _attended(self) -> np.ndarray | None:
        """GroupQueryAttention's total_sequence_length for a step without a CUDA graph: the longest row."""
        if self.graph.kind != STATIC_CACHE:
            return None
        longest = self.max_cache - 1 if self._parked else max(self.lengths.values())
        return np.array(longest + 1, dtype=np.int32)

    def _release(self, rows: list[int]) -> None:
        index = to_device(rows, torch.int64, self.device)
        self.row_active.index_fill_(0, index, 0)
        self.held.index_fill_(0, index, 0)

    def close(self) -> None:
        super().close()
        if self.beside is not None:  # first: its thread may still replay a prefill graph (a fallback's)
            self.beside.close()
        for graphs in (self.recorded, self.prefills):
            if graphs is not None:
                graphs.close()
        if self.runner is not None:
            self.runner.close()
        self.runner = self.stage_runner = self.beside = None
        self.caches, self.cache_block, self.stage_block = {}, None, None


def open_static_cache(target, spec, rows: int = 1, overlap_prefill: bool = False, record_step: bool | None = None,
                      **_options) -> StaticCacheDecoder:
    """The registry's opener for the *-static backends: `target` is a static-cache graph (a path, or
    serialized bytes; runtime.commands.targets writes one from weights)."""
    return StaticCacheDecoder(target, rows, spec.device, overlap_prefill=overlap_prefill, record_step=record_step)
