"""Prefill throughput and per-token decode latency of any backend, next to the physical floor."""
from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass

import torch

from models.config import ModelConfig

from .backends import Backend
from .floors import GpuPeaks, decode_floor_seconds, prefill_flops, prefill_floor_seconds


@dataclass
class BenchmarkResult:
    backend: str
    batch: int
    context: int
    prefill_ms: float | None = None
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


def _cache_inputs(backend: Backend) -> list[str]:
    return [name for name in backend.input_names if name.startswith("past_key_values.")]


def _prefill_feeds(backend: Backend, batch: int, context: int, device: torch.device, vocab: int) -> dict:
    generator = torch.Generator().manual_seed(batch * 100003 + context)
    feeds = {"input_ids": torch.randint(0, vocab, (batch, context), generator=generator).to(device),
             "attention_mask": torch.ones(batch, context, dtype=torch.int64, device=device)}
    for meta in backend.inputs:
        if meta.name.startswith("past_key_values."):
            _, heads, _, dim_head = meta.shape
            feeds[meta.name] = torch.zeros(batch, heads, 0, dim_head, dtype=getattr(torch, meta.dtype), device=device)
    return feeds


def measure(backend: Backend, config: ModelConfig, batch: int, context: int, new_tokens: int, warmup: int,
            iters: int, device: torch.device, bytes_per_value: int, peaks: GpuPeaks | None) -> BenchmarkResult:
    """Prefill `context` tokens (median of `iters`), then decode `new_tokens` steps through the cache."""
    timer = StepTimer(device)
    feeds = _prefill_feeds(backend, batch, context, device, config.num_tokens)
    memory = _MemoryProbe(device)
    for _ in range(warmup):
        backend.run_torch(dict(feeds))
    times = []
    for _ in range(iters):
        seconds, outputs = timer(lambda: backend.run_torch(dict(feeds)))
        times.append(seconds)
    caches = _cache_inputs(backend)
    steps = []
    if caches and new_tokens > 0:
        token = torch.ones(batch, 1, dtype=torch.int64, device=device)
        mask = feeds["attention_mask"]
        for step in range(warmup + new_tokens):
            mask = torch.cat((mask, torch.ones_like(token)), dim=1)
            step_feeds = {"input_ids": token, "attention_mask": mask}
            for name in caches:
                step_feeds[name] = outputs[name.replace("past_key_values.", "present.")]
            seconds, outputs = timer(lambda: backend.run_torch(step_feeds))
            if step >= warmup:
                steps.append(seconds)
    return _result(backend.name, config, batch, context, times, steps, memory.peak_mib(), bytes_per_value, peaks)


def measure_static(decoder, config: ModelConfig, context: int, new_tokens: int, warmup: int, iters: int,
                   bytes_per_value: int, peaks: GpuPeaks | None) -> BenchmarkResult:
    """The same measurement for a StaticCacheDecoder (runtime/static_cache.py): prefill, then steps
    replayed from its static cache."""
    batch = decoder.batch
    timer = StepTimer(decoder.device)
    generator = torch.Generator().manual_seed(batch * 100003 + context)
    prompts = torch.randint(0, config.num_tokens, (batch, context), generator=generator).tolist()
    memory = _MemoryProbe(decoder.device)
    for _ in range(warmup):
        decoder.prefill(prompts)
    times = [timer(lambda: decoder.prefill(prompts))[0] for _ in range(iters)]
    token = torch.ones(batch, dtype=torch.int64, device=decoder.device)
    steps = [timer(lambda: decoder.step(token))[0] for _ in range(warmup + new_tokens)][warmup:]
    return _result(decoder.name, config, batch, context, times, steps, memory.peak_mib(), bytes_per_value, peaks)


class _MemoryProbe:
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


def _result(name: str, config: ModelConfig, batch: int, context: int, prefill_times: list[float],
            steps: list[float], memory_mib: float | None, bytes_per_value: int,
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
        half = bytes_per_value == 2
        result.prefill_floor_ms = prefill_floor_seconds(config, batch, context, half, peaks) * 1e3
        result.prefill_x_floor = result.prefill_ms / result.prefill_floor_ms
        if result.decode_p50_ms is not None:
            result.decode_floor_ms = decode_floor_seconds(config, batch, context, bytes_per_value, peaks) * 1e3
            result.decode_x_floor = result.decode_p50_ms / result.decode_floor_ms
    return result
