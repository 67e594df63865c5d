"""Where a decode step's time goes: kernels launched, GPU busy time and wall time per step.

torch.profiler's CUDA activity (CUPTI) sees every kernel in the process, ONNX Runtime's too.
Usage: python3 scripts/profile_decode.py MODEL.onnx [--backend torch,onnxruntime-cuda] [--context 1024]
       [--steps 16] [--json PATH]
MODEL is a graph exported --with-past or --static-cache; the torch backend runs the weights it records.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def profile(decoder, context: int, steps: int) -> dict:
    import torch
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from runtime.bench.measure import benchmark_prompts

    decoder.start(benchmark_prompts(decoder.rows, context, decoder.vocab_size))
    token = torch.ones(decoder.rows, dtype=torch.int64, device=decoder.device)
    for _ in range(3):
        decoder.step(token)
    torch.cuda.synchronize()
    with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
        started = time.perf_counter()
        for _ in range(steps):
            decoder.step(token)
        torch.cuda.synchronize()
        wall = time.perf_counter() - started
    kernels = [e for e in prof.events() if e.device_type.name == "CUDA"]
    busy_us = sum(e.device_time for e in kernels)
    top = {}
    for e in kernels:
        top[e.name] = top.get(e.name, 0) + e.device_time
    return {"backend": decoder.name, "context": context, "steps": steps,
            "kernels_per_step": len(kernels) / steps, "gpu_busy_us_per_step": busy_us / steps,
            "wall_us_per_step": wall / steps * 1e6, "gpu_busy_fraction": busy_us / (wall * 1e6),
            "top_kernels_us_per_step": {k[:80]: v / steps for k, v in sorted(top.items(), key=lambda kv: -kv[1])[:6]}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--backend", default="torch,onnxruntime-cuda", help="comma-separated backends to profile")
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--json")
    args = parser.parse_args()

    from models.graph_metadata import read_graph_metadata
    from models.source import reference_source
    from runtime.commands.targets import decoder_target
    from runtime.decoding.open import open_decoder
    from runtime.provenance import script_command, write_result
    from runtime.registry import WEIGHTS, backend_spec

    metadata = read_graph_metadata(args.model)
    results = []
    for name in args.backend.split(","):
        weights, max_cache = backend_spec(name).opens == WEIGHTS, args.context + args.steps + 4
        target = (decoder_target(reference_source(metadata, args.model), name, max_cache, metadata.precision)
                  if weights else args.model)
        with open_decoder(target, name, precision=metadata.precision, max_cache=max_cache) as decoder:
            results.append(profile(decoder, args.context, args.steps))
    for r in results:
        print(f"{r['backend']:<22} ctx {r['context']}: {r['kernels_per_step']:.0f} kernels/step, GPU busy "
              f"{r['gpu_busy_us_per_step']:.0f} us of {r['wall_us_per_step']:.0f} us wall "
              f"({r['gpu_busy_fraction']:.0%}); top: " + ", ".join(f"{k[:40]} {v:.0f}us" for k, v in
                                                               list(r['top_kernels_us_per_step'].items())[:3]))
    if args.json:
        write_result(args.json, {"results": results}, script_command(None), vars(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
