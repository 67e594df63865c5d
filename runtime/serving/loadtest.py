"""Load against a running `generate`: N concurrent streaming clients over a seeded mix of prompt and
output lengths and settings; requests/s, tokens/s, time to first token, inter-token latency per
token as the client sees it (0 between tokens of one response), time between responses and tokens
per response."""
from __future__ import annotations

import random
import threading
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

from .clients import GrpcStreamer, StreamResult, http_generate, openai_body, openai_generate


@dataclass(frozen=True)
class Workload:
    requests: int
    vocab_size: int
    max_prompt_tokens: int
    max_new_tokens: int
    seed: int = 0

    def build(self) -> list[dict]:
        """Seeded requests: prompts of 1..max_prompt_tokens ids, outputs of 1..max_new_tokens, greedy or sampled."""
        rng = random.Random(self.seed)
        made = []
        for index in range(self.requests):
            prompt = [rng.randrange(self.vocab_size) for _ in range(rng.randint(1, self.max_prompt_tokens))]
            request = {"prompt_ids": prompt, "max_new_tokens": rng.randint(1, self.max_new_tokens),
                       "seed": index}
            if rng.random() < 0.5:
                request.update(temperature=round(rng.uniform(0.5, 1.2), 2), filter_thres=rng.choice([0.5, 0.9]))
            made.append(request)
        return made


def run_level(requests: list[dict], concurrency: int, client: tuple | list[tuple], timeout: float,
              workers: int = 1) -> dict:
    """`concurrency` threads, each with its own client (`client`: what make_client takes, or a list
    of them: client i talks to server i modulo their number), take requests in turn until none are
    left. With `workers` > 1 the threads are spread over that many processes, so the load
    generator's own GIL does not cap what it can receive."""
    clients = [client] if isinstance(client, tuple) else list(client)
    workers = max(1, min(workers, concurrency))
    if workers > 1:
        results, seconds = _in_processes(requests, concurrency, clients, timeout, workers)
        return summarize(results, concurrency, seconds)
    started = time.perf_counter()
    done = _in_threads(requests, _cursor(len(requests)), concurrency, _client_maker(clients, 0), timeout)
    return summarize([done.get(i) for i in range(len(requests))], concurrency, time.perf_counter() - started)


def _client_maker(clients: list[tuple], offset: int) -> Callable[[int], "Client"]:
    """Thread i's client (i counted from `offset` across processes): servers taken in turn."""
    return lambda index: make_client(clients[(offset + index) % len(clients)])


def _in_threads(requests: list[dict], take: Callable[[], int | None], concurrency: int,
                client: Callable[[int], "Client"], timeout: float) -> dict[int, StreamResult]:
    """`concurrency` threads that each run `take()`'s next request until it returns None."""
    results: dict[int, StreamResult] = {}

    def worker(index: int) -> None:
        session = client(index)
        try:
            while True:
                request = take()
                if request is None:
                    return
                try:
                    results[request] = session.generate(requests[request], timeout)
                except Exception as error:  # a malformed response fails this request, not the worker
                    results[request] = StreamResult(error=f"{type(error).__name__}: {error}")
        finally:
            session.close()

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout * len(requests) + 10)
    return results


def _cursor(count: int, counter=None) -> Callable[[], int | None]:
    """The next request's index, 0..count-1, then None; `counter` (a multiprocessing Value) shares
    one sequence between processes, so every client takes the next request wherever it runs and
    no process runs out while another still has a queue (a level ends with its last requests only)."""
    if counter is None:
        lock, box = threading.Lock(), [0]

        def take() -> int | None:
            with lock:
                index, box[0] = box[0], box[0] + 1
            return index if index < count else None
        return take

    def take_shared() -> int | None:
        with counter.get_lock():
            index = counter.value
            counter.value += 1
        return index if index < count else None
    return take_shared


def make_client(spec: tuple) -> "Client":
    """("grpc", host:port), ("http", url) or ("openai", url, vocabulary size, API key or None)."""
    kind, address = spec[:2]
    if kind == "openai":
        return OpenAIClient(address, *spec[2:])
    return GrpcStreamer(address) if kind == "grpc" else HttpClient(address)


def _share(requests: list[dict], counter, threads: int, offset: int, clients: list[tuple], timeout: float, ready, go,
           out) -> None:
    """One worker process: its threads (numbered from `offset` among all), taking requests from the
    shared counter from `go` on."""
    ready.put(True)
    go.wait()
    out.put(list(_in_threads(requests, _cursor(len(requests), counter), threads, _client_maker(clients, offset),
                             timeout).items()))


def _in_processes(requests: list[dict], concurrency: int, clients: list[tuple], timeout: float,
                  workers: int) -> tuple[list[StreamResult | None], float]:
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    ready, go, out, counter = context.Queue(), context.Event(), context.Queue(), context.Value("i", 0)
    threads = [concurrency // workers + (i < concurrency % workers) for i in range(workers)]
    processes = [context.Process(target=_share, args=(requests, counter, count, sum(threads[:k]), clients, timeout,
                                                      ready, go, out), daemon=True)
                 for k, count in enumerate(threads)]
    for process in processes:
        process.start()
    for _ in processes:
        ready.get(timeout=120)
    started = time.perf_counter()
    go.set()
    results: list[StreamResult | None] = [None] * len(requests)
    for _ in processes:
        for index, result in out.get(timeout=timeout * len(requests) + 10):
            results[index] = result
    seconds = time.perf_counter() - started
    for process in processes:
        process.join(10)
    return results, seconds


def summarize(results: list[StreamResult | None], concurrency: int, seconds: float) -> dict:
    done = [r for r in results if r is not None and r.error is None]
    errors = [r.error if r is not None else "no result (client timed out)" for r in results
              if r is None or r.error is not None]
    tokens = sum(len(r.tokens) for r in done)
    responses = sum(len(r.response_sizes) for r in done)
    ttft = [r.ttft for r in done if r.ttft is not None]
    itl = [gap for r in done for gap in r.itl]
    gaps = [gap for r in done for gap in r.response_gaps]
    return {"concurrency": concurrency, "requests": len(results), "errors": len(errors), "seconds": seconds,
            "requests_per_second": len(done) / seconds, "tokens": tokens, "tokens_per_second": tokens / seconds,
            "ttft_ms": _percentiles(ttft), "itl_ms": _percentiles(itl), "response_gap_ms": _percentiles(gaps),
            "responses": responses, "tokens_per_response": {
                "mean": tokens / responses if responses else None,
                "max": max((size for r in done for size in r.response_sizes), default=None)},
            "error_messages": sorted(set(errors))[:5]}


def _percentiles(values: list[float]) -> dict:
    if not values:
        return {"p50": None, "p99": None}
    return {name: float(np.percentile(values, q)) * 1e3 for name, q in (("p50", 50), ("p99", 99))}


class HttpClient:
    def __init__(self, url: str):
        self.url = url

    def generate(self, request: dict, timeout: float) -> StreamResult:
        return http_generate(self.url, request, timeout)

    def close(self) -> None:
        pass


class OpenAIClient:
    """The same requests through /v1/completions (streamed, with each chunk's token ids)."""

    def __init__(self, url: str, vocab_size: int, api_key: str | None = None):
        self.url, self.vocab_size, self.api_key = url, vocab_size, api_key

    def generate(self, request: dict, timeout: float) -> StreamResult:
        return openai_generate(self.url, openai_body(request, self.vocab_size), timeout, self.api_key)

    def close(self) -> None:
        pass


Client = GrpcStreamer | HttpClient | OpenAIClient


def plot_levels(levels: list[dict], path: str) -> None:
    """Latency (TTFT and inter-token, p50 and p99) against concurrency, one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4.5))
    x = [level["concurrency"] for level in levels]
    for key, label in (("ttft_ms", "time to first token"), ("itl_ms", "inter-token latency")):
        for quantile, style in (("p50", "-o"), ("p99", "--o")):
            values = [level[key][quantile] for level in levels]
            axis.plot(x, [float("nan") if v is None else v for v in values], style, label=f"{label} {quantile}")
    axis.set_xscale("log", base=2)
    if any(level[key][q] for level in levels for key in ("ttft_ms", "itl_ms") for q in ("p50", "p99")):
        axis.set_yscale("log")  # not when no request succeeded: nothing positive to scale
    axis.set_xlabel("concurrent streaming clients")
    axis.set_ylabel("ms")
    axis.set_title("generate latency vs concurrency")
    axis.grid(True, which="both", alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
