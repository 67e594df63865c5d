"""Prefill throughput and per-token decode latency of any Decoder, next to the physical floor."""
from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from models.config import ModelConfig
from models.precision import Precision

from ..decoding.base import Decoder, DecodingError
from ..decoding.engine import Engine
from ..decoding.settings import GenerationSettings
from .floors import GpuPeaks, decode_floor_seconds, prefill_flops, prefill_floor_seconds


@dataclass
class BenchmarkResult:
    backend: str
    batch: int
    context: int
    open_ms: float | None = None  # opening the decoder: session, warm-up, CUDA-graph capture / compilation
    cold_ttft_ms: float | None = None  # the first request after opening: prompt in, first token on the host
    ttft_ms: float | None = None  # the same, warm (median)
    prefill_ms: float | None = None  # a prompt with logits at every position (median)
    prefill_tokens_per_s: float | None = None
    prefill_tflops: float | None = None
    decode_p50_ms: float | None = None
    decode_p90_ms: float | None = None
    decode_p99_ms: float | None = None
    decode_tokens_per_s: float | None = None
    memory_mib: float | None = None
    prefill_floor_ms: float | None = None
    decode_floor_ms: float | None = None
    prefill_x_floor: float | None = None
    decode_x_floor: float | None = None
    error: str | None = None
    decode_mode: str | None = None  # how the decoder decodes: "cache", "full recompute", "static cache, ..."
    decode_loop: str | None = None  # the engine's loop the decode steps were timed in: "overlapped" or "plain"

    def to_dict(self) -> dict:
        return asdict(self)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


class StepTimer:
    """Wall-clock timing of one call, synchronising the GPU when there is one."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __call__(self, fn):
        if self.cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        result = fn()
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - start, result


def benchmark_prompts(rows: int, context: int, vocab: int) -> dict[int, list[int]]:
    """The same random prompts for every backend at a given batch and context."""
    generator = torch.Generator().manual_seed(rows * 100003 + context)
    ids = torch.randint(0, vocab, (rows, context), generator=generator).tolist()
    return dict(enumerate(ids))


def cache_positions(context: int, warmup: int, new_tokens: int) -> int:
    """Static-cache positions a measured run needs: the prompt, its first token, the warm-up and timed
    steps, and one more step that the overlapped loop queues behind the last timed one."""
    return context + 1 + warmup + new_tokens + 1


def first_tokens(decoder: Decoder, prompts: dict[int, list[int]]) -> Tensor:
    """What a user waits for: the prompt in, each row's first (greedy) token on the host."""
    return decoder.start(prompts).argmax(-1).cpu()


def measure(decoder: Decoder, context: int, new_tokens: int, warmup: int, iters: int, precision: Precision,
            peaks: GpuPeaks | None, open_seconds: float | None = None, overlap: bool = True) -> BenchmarkResult:
    """Time to first token (the first request after opening, then warm), full-logits prefill
    (median of `iters`), then `new_tokens` decode steps after `warmup` untimed ones."""
    timer = StepTimer(decoder.device)
    prompts = benchmark_prompts(decoder.rows, context, decoder.vocab_size)
    memory = MemoryProbe(decoder.device)
    cold = timer(lambda: first_tokens(decoder, prompts))[0]
    for _ in range(warmup):
        first_tokens(decoder, prompts)
    ttft = [timer(lambda: first_tokens(decoder, prompts))[0] for _ in range(iters)]
    times = [timer(lambda: decoder.start(prompts, all_logits=True))[0] for _ in range(iters)]
    overlap = overlap and decoder.queues_steps
    steps = decode_steps(decoder, prompts, warmup, new_tokens, overlap) if new_tokens else []
    result = result_of(decoder.name, decoder.config, decoder.rows, context, times, steps, memory.peak_mib(),
                       precision, peaks)
    result.decode_loop = ("overlapped" if overlap else "plain") if new_tokens else None
    result.cold_ttft_ms, result.ttft_ms = cold * 1e3, statistics.median(ttft) * 1e3
    result.open_ms = None if open_seconds is None else open_seconds * 1e3
    return result


def decode_steps(decoder: Decoder, prompts: dict[int, list[int]], warmup: int, new_tokens: int,
                 overlap: bool = False) -> list[float]:
    """Seconds per engine step with every row decoding (greedy; the id copy to the host included),
    after `warmup` untimed steps: the decode loop `generate` and the server run. Each step is timed
    from the previous step's return to its own, as that loop's caller sees it: a step returns once
    its ids are on the host, so nothing more is synchronised (a device synchronisation before and
    after each step, as the prefill timings make, added about 0.06 ms a step on an H200 that the
    loop itself never spends). `overlap`: the engine's overlapped loop, each step queued before the
    ids of the one before are read (measure() asks for it where the decoder queues its steps, as
    generate and the server do); without it, the plain loop."""
    engine = Engine(decoder, prefill_tokens=sum(len(p) for p in prompts.values()), overlap=overlap)
    engine.warm_up()  # kernels loaded and the step recorded before any step is timed
    # overlapped, one token more, so that every timed call still queues a step behind the one it reads
    settings = GenerationSettings(max_new_tokens=warmup + new_tokens + 1 + overlap)
    handles = [engine.submit(prompts[row], settings) for row in sorted(prompts)]
    try:
        if overlap:
            engine.step()  # queues the admission; each call from here reports the step queued by the one before
        times, last = [], time.perf_counter()
        for step in range(1 + warmup + new_tokens):  # step 0 admits: every row prefilled, its first token picked
            events = engine.step()
            now = time.perf_counter()
            times.append(now - last)
            last = now
            decoded = [event for event in events if event.token is not None]
            if len(decoded) != len(prompts):  # a step that decoded nothing would time as a very fast one
                failure = next((event.error for event in events if event.error), "no token")
                raise DecodingError(f"decode step {step} gave {len(decoded)} of {len(prompts)} tokens ({failure})")
        return times[1 + warmup:]
    finally:
        for handle in handles:
            engine.cancel(handle)


class MemoryProbe:
    """Peak GPU memory from here on: PyTorch's allocator peak or, for libraries with their own
    allocator (ONNX Runtime, TensorRT), the drop in free device memory."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        if self.cuda:
            torch.cuda.synchronize()
            self.free_before, _ = torch.cuda.mem_get_info()
            torch.cuda.reset_peak_memory_stats()

    def peak_mib(self) -> float | None:
        if not self.cuda:
            return None
        free_after, _ = torch.cuda.mem_get_info()
        return max(torch.cuda.max_memory_allocated(), self.free_before - free_after) / 2**20


def result_of(name: str, config: ModelConfig, batch: int, context: int, prefill_times: list[float],
              steps: list[float], memory_mib: float | None, precision: Precision,
              peaks: GpuPeaks | None) -> BenchmarkResult:
    result = BenchmarkResult(name, batch, context, memory_mib=memory_mib)
    prefill = statistics.median(prefill_times)
    result.prefill_ms = prefill * 1e3
    result.prefill_tokens_per_s = batch * context / prefill
    result.prefill_tflops = prefill_flops(config, batch, context) / prefill / 1e12
    if steps:
        result.decode_p50_ms = percentile(steps, 50) * 1e3
        result.decode_p90_ms = percentile(steps, 90) * 1e3
        result.decode_p99_ms = percentile(steps, 99) * 1e3
        result.decode_tokens_per_s = batch / statistics.median(steps)
    if peaks is not None:
        result.prefill_floor_ms = prefill_floor_seconds(config, batch, context, precision, peaks) * 1e3
        result.prefill_x_floor = result.prefill_ms / result.prefill_floor_ms
        if result.decode_p50_ms is not None:
            result.decode_floor_ms = decode_floor_seconds(config, batch, context, precision, peaks) * 1e3
            result.decode_x_floor = result.decode_p50_ms / result.decode_floor_ms
    return result
