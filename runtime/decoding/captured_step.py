"""A decode step and the engine's work on its logits, recorded as one PyTorch CUDA graph.

ONNX Runtime replays its own CUDA graph of the step, then synchronises its stream before `run`
returns (CUDAGraphManager::Replay). So the host waits for the whole step before it can queue the
sampling kernel, the copy of the ids into the next step's input and the copy to the host, and the
GPU idles while it does. Here the step's kernels are recorded by PyTorch instead: ONNX Runtime runs
the step once, unsynchronised, on a stream PyTorch is capturing, together with the engine's
sampling, into one graph whose replay returns at once. The host then waits only for the ids. Each
staged prefill width is recorded the same way, with the copy into its cache row, so an admission
does not wait for the step queued before it either.

Everything the graph touches keeps its address: the decoder's bound buffers, the engine's input and
row-table tensors. ONNX Runtime's scratch for the step comes from its arena, which does not give
memory back, so the recorded addresses stay valid; the decoder's other runs on that session
(prefills) reuse them only in stream order, before or after a replay.

triton-fused records its Triton step with the pick the same way, on a stream of its own, to save
the launches between the step's graph and the pick's kernels.
"""
from __future__ import annotations

import warnings
from typing import Callable

import torch
from torch import Tensor


class CapturedSteps:
    """The recorded graphs of one decoder, one per key (a variant of the caller's pick)."""

    def __init__(self, stream: "torch.cuda.Stream | None"):
        """`stream`: the non-default stream the graphs are recorded on (for ONNX Runtime, the one its
        session runs on)."""
        self.stream = stream
        # key -> (graph, tokens, pick, ids); holding tokens and pick (and so what pick reads) keeps
        # the recorded addresses theirs, where a newer caller's tensors might reuse freed memory
        self.graphs: dict[str, tuple] = {}
        self.broken: dict[str, str] = {}  # key -> why recording it failed (it is not tried again)
        self._ran: dict[str, tuple[Tensor, Callable]] = {}  # key -> the tokens and pick that last ran unrecorded

    def ready(self, key: str, tokens: Tensor, pick: Callable) -> bool:
        """Whether the graph of `key` was recorded with these very `tokens` and `pick`."""
        graph = self.graphs.get(key)
        return graph is not None and graph[1] is tokens and graph[2] is pick

    def warm(self, key: str, tokens: Tensor, pick: Callable) -> bool:
        """Whether `pick` has run unrecorded with `tokens` (its kernels are loaded and compiled, which
        must not happen while a graph is recorded)."""
        before = self._ran.get(key)
        return before is not None and before[0] is tokens and before[1] is pick

    def ran(self, key: str, tokens: Tensor, pick: Callable) -> None:
        """Note that `pick` ran, unrecorded and to the end, with `tokens`."""
        self._ran[key] = (tokens, pick)

    def record(self, key: str, tokens: Tensor, pick: Callable, work: Callable[[], Tensor]) -> bool:
        """Record `work()` (the step, then `pick` on its logits, returning the ids; or a staged prefill,
        returning None, with `tokens` its row index) as the graph of `key`; nothing runs. False, with
        a warning, where it cannot be recorded."""
        if key in self.broken:
            return False
        try:
            graph, ids = self._capture(work, tokens)
        except Exception as error:  # e.g. a provider that synchronises inside its run
            self.broken[key] = f"{type(error).__name__}: {error}"
            warnings.warn(f"the {key!r} graph could not be recorded as a CUDA graph ({self.broken[key]}); "
                          "stepping without it instead")
            return False
        self.graphs[key] = (graph, tokens, pick, ids)
        self._ran.pop(key, None)
        return True

    def _capture(self, work: Callable[[], Tensor], tokens: Tensor) -> tuple:
        """(a graph of `work` on the session's stream, the ids it writes)."""
        graph = torch.cuda.CUDAGraph()
        current = torch.cuda.current_stream()
        self.stream.wait_stream(current)
        try:
            # relaxed: ONNX Runtime may still grow its arena (cudaMalloc) while it is recorded
            with torch.cuda.graph(graph, stream=self.stream, capture_error_mode="relaxed"):
                ids = work()
        except BaseException:  # a failed capture_end can leave the capture stream current
            torch.cuda.set_stream(current)
            torch.cuda.synchronize()
            raise
        current.wait_stream(self.stream)
        return graph, ids

    def replay(self, key: str) -> Tensor:
        """Queue the graph of `key` on the current stream; its ids (a buffer the next replay reuses)."""
        graph, _, _, ids = self.graphs[key]
        graph.replay()
        return ids

    def close(self) -> None:
        """Wait for any replay still queued, then drop the graphs (their memory goes back)."""
        if self.graphs and self.stream is not None:
            torch.cuda.synchronize()
        self.graphs.clear()
        self._ran.clear()
