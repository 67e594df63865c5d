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
    result = BenchmarkResult(backend.name, batch, context)
    timer = StepTimer(device)
    feeds = _prefill_feeds(backend, batch, context, device, config.num_tokens)
    if device.type == "cuda":
        torch.cuda.synchronize()
        free_before, total = torch.cuda.mem_get_info()
        torch.cuda.reset_peak_memory_stats()
    for _ in range(warmup):
        backend.run_torch(dict(feeds))
    times = []
    for _ in range(iters):
        seconds, outputs = timer(lambda: backend.run_torch(dict(feeds)))
        times.append(seconds)
    prefill = statistics.median(times)
    result.prefill_ms = prefill * 1e3
    result.prefill_tokens_per_s = batch * context / prefill
    result.prefill_tflops = prefill_flops(config, batch, context) / prefill / 1e12
    caches = _cache_inputs(backend)
    if caches and new_tokens > 0:
        token = torch.ones(batch, 1, dtype=torch.int64, device=device)
        mask = feeds["attention_mask"]
        steps = []
        for step in range(warmup + new_tokens):
            mask = torch.cat((mask, torch.ones_like(token)), dim=1)
            step_feeds = {"input_ids": token, "attention_mask": mask}
            for name in caches:
                step_feeds[name] = outputs[name.replace("past_key_values.", "present.")]
            seconds, outputs = timer(lambda: backend.run_torch(step_feeds))
            if step >= warmup:
                steps.append(seconds)
        result.decode_p50_ms = percentile(steps, 50) * 1e3
        result.decode_p90_ms = percentile(steps, 90) * 1e3
        result.decode_p99_ms = percentile(steps, 99) * 1e3
        result.decode_tokens_per_s = batch / statistics.median(steps)
    if device.type == "cuda":
        free_after, _ = torch.cuda.mem_get_info()
        result.memory_mib = max(torch.cuda.max_memory_allocated(), free_before - free_after) / 2**20
    if peaks is not None:
        half = bytes_per_value == 2
        result.prefill_floor_ms = prefill_floor_seconds(config, batch, context, half, peaks) * 1e3
        result.prefill_x_floor = result.prefill_ms / result.prefill_floor_ms
        if result.decode_p50_ms is not None:
            result.decode_floor_ms = decode_floor_seconds(config, batch, context, bytes_per_value, peaks) * 1e3
            result.decode_x_floor = result.decode_p50_ms / result.decode_floor_ms
    return result
