"""Where a served decode step's time goes, without Triton: the decoder's step alone, the engine's step
(sampling and the id copy added; recorded with the step as one CUDA graph, and not), the engine
under churn (also with the admitted rows' recorded prefills queued beside the step), and the
server's driver (scheduler, responder threads) over streams whose sends cost what a python-backend
send costs (a GIL-free wait of --send-ms).

Usage: python3 scripts/profile_engine.py [--backend onnxruntime-cuda-static] [--preset small] [--dtype fp16] [--rows 32] [--cache 1024]
       [--batches 1,8,32] [--steps 300] [--send-ms 0.2] [--cprofile] [--json PATH]
"""
from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def open_static(backend: str, preset: str, dtype: str, rows: int, cache: int, overlap_prefill: bool = False,
                record_step: bool | None = None):
    from models.source import resolve_model
    from runtime.commands.targets import decoder_target
    from runtime.decoding.open import open_decoder

    target = decoder_target(resolve_model(preset_name=preset), backend, cache, dtype)
    return open_decoder(target, backend, rows=rows, precision=dtype, max_cache=cache, overlap_prefill=overlap_prefill,
                        record_step=record_step)


def decoder_arguments(parser: argparse.ArgumentParser, rows_help: str = "the decoder's rows") -> None:
    """What open_static takes, as options: --backend, --preset, --dtype, --rows, --cache."""
    parser.add_argument("--backend", default="onnxruntime-cuda-static", help="a static-cache decoder backend")
    parser.add_argument("--preset", default="small", help="the model preset (random weights from its seed)")
    parser.add_argument("--dtype", default="fp16", help="the graph's precision")
    parser.add_argument("--rows", type=int, default=32, help=rows_help)
    parser.add_argument("--cache", type=int, default=1024, help="the static cache's length")


def sync(decoder) -> None:
    import torch

    if decoder.device.type == "cuda":
        torch.cuda.synchronize()


def decoder_alone(decoder, batch: int, steps: int) -> float:
    """Median ms of decoder.step over `batch` rows, synchronised."""
    import torch

    decoder.start({row: [1 + row] * 16 for row in range(batch)})
    token = torch.ones(batch, dtype=torch.int64, device=decoder.device)
    times = []
    for _ in range(steps):
        sync(decoder)
        started = time.perf_counter()
        decoder.step(token)
        sync(decoder)
        times.append(time.perf_counter() - started)
    decoder.release(range(batch))
    return statistics.median(times) * 1e3


def engine_steps(decoder, batch: int, steps: int, sampled: bool, profiler: cProfile.Profile | None) -> float:
    """Median ms of engine.step with `batch` rows decoding (half of them sampled if `sampled`)."""
    from runtime.decoding.engine import Engine
    from runtime.decoding.settings import GenerationSettings

    engine = Engine(decoder, prefill_tokens=16 * batch)
    engine.warm_up()
    for row in range(batch):
        engine.submit([1 + row] * 16, GenerationSettings(steps + 2, 0.8 if sampled and row % 2 else 0.0, 0.9, seed=row))
    engine.step()
    times = []
    if profiler:
        profiler.enable()
    for _ in range(steps):
        started = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - started)
    if profiler:
        profiler.disable()
    while not engine.idle:
        engine.step()
    return statistics.median(times) * 1e3


def prefill_ms(decoder, widths: list[int], repeats: int = 20) -> dict[int, float]:
    """Median ms to start one row with a prompt of each width, synchronised."""
    times = {}
    for width in widths:
        samples = []
        for _ in range(repeats):
            sync(decoder)
            started = time.perf_counter()
            decoder.start({0: [7] * width})
            sync(decoder)
            samples.append(time.perf_counter() - started)
            decoder.release([0])
        times[width] = statistics.median(samples) * 1e3
    return times


def engine_churn(decoder, clients: int, seconds: float, seed: int = 0) -> dict:
    """The serve workload through the engine alone (no transport): `clients` closed-loop requests
    from loadtest's own seeded workload (prompts of 1..128 ids, 1..256 new tokens, half sampled)."""
    import itertools

    from runtime.decoding.engine import Engine
    from runtime.decoding.settings import GenerationSettings
    from runtime.serving.loadtest import Workload

    requests = itertools.cycle(Workload(4096, decoder.vocab_size, 128, 256, seed).build())
    engine = Engine(decoder)
    engine.warm_up()
    names = ("temperature", "filter_thres", "seed")

    def submit():
        request = next(requests)
        engine.submit(request["prompt_ids"], GenerationSettings(request["max_new_tokens"],
                                                                **{n: request[n] for n in names if n in request}))

    for _ in range(clients):
        submit()
    tokens = steps = rows = admitted = 0
    step_times = []
    started = time.perf_counter()
    while time.perf_counter() - started < seconds:
        waiting = engine.waiting
        step_started = time.perf_counter()
        events = engine.step()
        step_times.append(time.perf_counter() - step_started)
        admitted += waiting - engine.waiting
        steps, rows, tokens = steps + 1, rows + engine.stats.rows, tokens + sum(e.token is not None for e in events)
        submit_more = time.perf_counter() - started < seconds
        for event in events:
            if event.finish and submit_more:
                submit()
    elapsed = time.perf_counter() - started
    while not engine.idle:  # the open requests run out (nothing new is submitted)
        engine.step()
    step_times.sort()
    return {"clients": clients, "tokens_per_s": tokens / elapsed, "rows_per_step": rows / max(steps, 1),
            "step_ms_mean": elapsed / max(steps, 1) * 1e3, "step_ms_p50": step_times[len(step_times) // 2] * 1e3,
            "step_ms_p99": step_times[int(len(step_times) * 0.99)] * 1e3, "admissions_per_step": admitted / max(steps, 1)}


def churn_runs(decoder, batches: list[int], seconds: float, label: str) -> list[dict]:
    results = [engine_churn(decoder, clients, seconds) for clients in batches]
    for result in results:
        print(f"engine churn, {label}, {result['clients']:3d} clients: {result['tokens_per_s']:.0f} tokens/s, "
              f"{result['rows_per_step']:.1f} rows, step mean {result['step_ms_mean']:.3f} p50 {result['step_ms_p50']:.3f} "
              f"p99 {result['step_ms_p99']:.3f} ms, {result['admissions_per_step']:.3f} admissions/step", flush=True)
    return results


class TimedStream:
    """A stream whose send waits `send_s` without the GIL, as a python-backend send does."""

    def __init__(self, send_s: float, done):
        self.send_s, self.done, self.tokens, self.responses = send_s, done, 0, 0

    def send(self, tokens, final):
        time.sleep(self.send_s)
        self.tokens += len(tokens)
        self.responses += 1
        if final:
            self.done(self)

    def fail(self, message):
        self.done(self)

    def end(self):
        self.done(self)

    def cancelled(self):
        return False


def served(decoder, clients: int, seconds: float, send_s: float, senders: int) -> dict:
    """Closed-loop clients against the scheduler: tokens/s, rows per step, step ms, tokens/response."""
    from runtime.decoding.settings import GenerationSettings
    from runtime.serving.limits import Limits
    from runtime.serving.requests import GenerateRequest
    from runtime.serving.scheduler import Scheduler

    scheduler = Scheduler(decoder, Limits(max_rows=decoder.rows, max_queue=4 * clients), senders=senders).start()
    finished, lock, stop = [], threading.Lock(), time.monotonic() + seconds + 1.0  # past the measured second
    counter = iter(range(10**9))

    def submit():
        index = next(counter)
        settings = GenerationSettings(128 + index % 128, 0.8 if index % 2 else 0.0, 0.9, seed=index)
        scheduler.submit(GenerateRequest([1 + index % 200] * (1 + index % 128), settings, False), TimedStream(send_s, done))

    def done(stream):
        with lock:
            finished.append(stream)
        if time.monotonic() < stop:
            submit()

    for _ in range(clients):
        submit()
    time.sleep(seconds)
    before = scheduler.metrics.snapshot()
    time.sleep(1.0)
    after = scheduler.metrics.snapshot()
    scheduler.close(30)
    steps = after["steps"] - before["steps"]
    with lock:
        tokens, responses = sum(s.tokens for s in finished), sum(s.responses for s in finished)
    return {"clients": clients, "tokens_per_s": after["tokens_total"] - before["tokens_total"],
            "rows_per_step": (after["step_rows"] - before["step_rows"]) / max(steps, 1),
            "step_ms": (after["step_seconds"] - before["step_seconds"]) / max(steps, 1) * 1e3,
            "tokens_per_response": tokens / max(responses, 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    decoder_arguments(parser)
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--send-ms", type=float, default=0.2)
    parser.add_argument("--serve-seconds", type=float, default=4.0)
    parser.add_argument("--senders", default="1,2,8", help="the responder's sender threads, comma-separated settings")
    parser.add_argument("--cprofile", action="store_true", help="print the engine's hottest functions at the largest batch")
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    # the engine's step recorded with its pick as one PyTorch CUDA graph (the default), and
    # ONNX Runtime's own graph of the step with the pick after it (record_step=False), one process
    plain = open_static(args.backend, args.preset, args.dtype, args.rows, args.cache, record_step=False)
    decoder = open_static(args.backend, args.preset, args.dtype, args.rows, args.cache)
    rows = []
    for batch in batches:
        profiler = cProfile.Profile() if args.cprofile and batch == batches[-1] else None
        row = {"batch": batch, "decoder_ms": decoder_alone(plain, batch, args.steps),
               "engine_greedy_ms": engine_steps(decoder, batch, args.steps, False, None),
               "engine_mixed_ms": engine_steps(decoder, batch, args.steps, True, profiler),
               "unrecorded_greedy_ms": engine_steps(plain, batch, args.steps, False, None),
               "unrecorded_mixed_ms": engine_steps(plain, batch, args.steps, True, None)}
        rows.append(row)
        print(f"batch {batch:3d}: decoder {row['decoder_ms']:.3f} ms, engine greedy {row['engine_greedy_ms']:.3f} ms, "
              f"engine half sampled {row['engine_mixed_ms']:.3f} ms (step not recorded: {row['unrecorded_greedy_ms']:.3f}"
              f" / {row['unrecorded_mixed_ms']:.3f})", flush=True)
        if profiler:
            text = io.StringIO()
            pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(18)
            print(text.getvalue()[-4000:])
    prefill = prefill_ms(decoder, [w for w in (1, 16, 64, 128, 512) if w <= args.cache])
    print("prefill, one row: " + ", ".join(f"{w} ids {ms:.3f} ms" for w, ms in prefill.items()), flush=True)
    churn = churn_runs(decoder, batches, args.serve_seconds, "step recorded")
    churn_unrecorded = churn_runs(plain, batches, args.serve_seconds, "step not recorded")
    plain.close()
    beside = open_static(args.backend, args.preset, args.dtype, args.rows, args.cache, overlap_prefill=True)
    churn_beside = churn_runs(beside, batches, args.serve_seconds, "prefills beside")
    beside.close()
    serving = []
    for senders, clients in ((s, c) for s in (int(n) for n in args.senders.split(",")) for c in batches):
        result = {"senders": senders, **served(decoder, clients, args.serve_seconds, args.send_ms / 1e3, senders)}
        serving.append(result)
        print(f"served, {clients:3d} clients, {senders} senders: {result['tokens_per_s']:.0f} tokens/s, {result['rows_per_step']:.1f} rows "
              f"per step of {result['step_ms']:.3f} ms, {result['tokens_per_response']:.2f} tokens/response", flush=True)
    decoder.close()
    if args.json:
        from runtime.provenance import script_command, write_result

        write_result(args.json, {"steps": rows, "prefill_ms": prefill, "churn": churn, "churn_unrecorded": churn_unrecorded,
                                 "churn_beside": churn_beside,
                                 "served": serving}, script_command(None), vars(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
