"""Where an admission's time goes: a decode step over `--rows - 1` running rows with one request
admitted, against the same step without one, split into the engine's phases (host time to queue
each, and the wait for the ids), with PyTorch's profiler naming the GPU work of the admission steps.

Each admitted request asks for one new token, so it leaves in the step that admits it and every
measured step runs the same rows. Prompts of each width in --widths, greedy and sampled.

Usage: python3 scripts/profile_admission.py [--preset small] [--dtype fp16] [--rows 32] [--cache 1024]
       [--widths 1,16,128] [--repeats 40] [--beside] [--nucleus] [--trace-steps 12] [--json PATH]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from profile_engine import decoder_arguments, open_static  # noqa: E402  (scripts/ is on the path when run as a script)

PHASES = ("_admit", "_decode", "_start", "_copy_to_host", "_to_host")


def timed_phases(engine) -> dict[str, list[float]]:
    """Wrap the engine's phases (and the decoder's start_beside) so each call's host time is kept."""
    spent: dict[str, list[float]] = {}

    def wrap(owner, name: str, label: str) -> None:
        original = getattr(owner, name)

        def timed(*args, **kwargs):
            started = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                spent.setdefault(label, []).append((time.perf_counter() - started) * 1e3)

        setattr(owner, name, timed)

    for phase in PHASES:
        wrap(engine, phase, phase.strip("_"))
    wrap(engine.decoder, "start_beside", "start_beside")
    return spent


def fill(engine, rows: int, steps: int, nucleus: bool) -> None:
    """`rows` requests long enough to outlast the run, admitted and stepped once: greedy, or with
    `nucleus` sampled with top_p (whose steps are not recorded: they hold the host until done)."""
    from runtime.decoding.settings import GenerationSettings

    settings = GenerationSettings(steps, 0.8, 0.9, top_p=0.9) if nucleus else GenerationSettings(steps, 0.0)
    for row in range(rows):
        engine.submit([1 + row] * 16, settings)
    engine.step()


def admission_steps(engine, width: int, sampled: bool, repeats: int, spent: dict) -> dict:
    """Median ms of a step that admits one `width`-token request and of the plain step after it,
    and the median host ms of each phase in the admitting steps."""
    from runtime.decoding.settings import GenerationSettings

    settings = GenerationSettings(1, 0.8 if sampled else 0.0, 0.9, seed=width)
    admitting, plain, phases = [], [], {}
    for repeat in range(repeats):
        engine.submit([3 + repeat % 50] * width, settings)
        spent.clear()
        started = time.perf_counter()
        engine.step()
        admitting.append((time.perf_counter() - started) * 1e3)
        for name, times in spent.items():
            phases.setdefault(name, []).append(sum(times))
        started = time.perf_counter()
        engine.step()
        plain.append((time.perf_counter() - started) * 1e3)
    result = {"width": width, "sampled": sampled, "admitting_ms": statistics.median(admitting),
              "plain_ms": statistics.median(plain), "phases_ms": {n: statistics.median(t) for n, t in phases.items()}}
    result["admission_ms"] = result["admitting_ms"] - result["plain_ms"]
    return result


def gpu_work(engine, width: int, steps: int) -> list[dict]:
    """PyTorch's profiler over `steps` admitting steps: the GPU work by name, largest first."""
    from torch.profiler import ProfilerActivity, profile

    from runtime.decoding.settings import GenerationSettings

    settings = GenerationSettings(1, 0.8, 0.9, seed=1)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as trace:
        for repeat in range(steps):
            engine.submit([5 + repeat] * width, settings)
            engine.step()
    rows = []
    for event in trace.key_averages():
        device_us = getattr(event, "self_device_time_total", None) or getattr(event, "self_cuda_time_total", 0)
        if device_us > 0 or event.self_cpu_time_total > 0:
            rows.append({"name": event.key[:90], "calls_per_step": event.count / steps,
                         "device_us_per_step": device_us / steps, "host_us_per_step": event.self_cpu_time_total / steps})
    return sorted(rows, key=lambda r: -(r["device_us_per_step"] + r["host_us_per_step"]))[:40]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    decoder_arguments(parser, "the decoder's rows; all but one keep decoding")
    parser.add_argument("--widths", default="1,16,128", help="prompt lengths admitted, comma-separated")
    parser.add_argument("--repeats", type=int, default=40, help="admitting steps timed per width and setting")
    parser.add_argument("--beside", action="store_true", help="prefill beside the decode step (a second session)")
    parser.add_argument("--nucleus", action="store_true", help="the decoding rows sample with top_p (steps not recorded)")
    parser.add_argument("--trace-steps", type=int, default=12, help="admitting steps under PyTorch's profiler (0: none)")
    parser.add_argument("--json", metavar="PATH", help="write the results here")
    args = parser.parse_args()
    from runtime.decoding.engine import Engine

    decoder = open_static(args.backend, args.preset, args.dtype, args.rows, args.cache, overlap_prefill=args.beside)
    engine = Engine(decoder, prefill_tokens=16 * args.rows)  # the first step admits every filling row
    engine.warm_up()
    widths = [int(w) for w in args.widths.split(",")]
    fill(engine, args.rows - 1, 2 * args.repeats * len(widths) * 2 + args.trace_steps + 8, args.nucleus)
    spent = timed_phases(engine)
    results = []
    for width in widths:
        for sampled in (False, True):
            result = admission_steps(engine, width, sampled, args.repeats, spent)
            results.append(result)
            phases = ", ".join(f"{n} {ms:.3f}" for n, ms in result["phases_ms"].items())
            print(f"width {width:4d} {'sampled' if sampled else 'greedy '}: step {result['admitting_ms']:.3f} ms with the "
                  f"admission, {result['plain_ms']:.3f} without (+{result['admission_ms']:.3f}); host ms: {phases}", flush=True)
    work = gpu_work(engine, widths[-1], args.trace_steps) if args.trace_steps else []
    for row in work[:25]:
        print(f"  {row['device_us_per_step']:8.1f} us GPU {row['host_us_per_step']:8.1f} us host "
              f"{row['calls_per_step']:6.2f}/step  {row['name']}")
    decoder.close()
    if args.json:
        from runtime.provenance import script_command, write_result

        write_result(args.json, {"admissions": results, "gpu_work": work}, script_command(None), vars(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
