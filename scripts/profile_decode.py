"""Where a decode step's time goes: kernels launched, GPU busy time and wall time per step.

torch.profiler's CUDA activity (CUPTI) sees every kernel in the process, ONNX Runtime's too.
Usage: python3 scripts/profile_decode.py MODEL-with-past.onnx [--context 1024] [--steps 16] [--json PATH]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def profile(backend, context: int, steps: int) -> dict:
    import torch
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from runtime.benchmark import _prefill_feeds

    feeds = _prefill_feeds(backend, 1, context, torch.device("cuda"), backend.vocab_size or 2)
    outputs = backend.run_torch(dict(feeds))
    token = torch.ones(1, 1, dtype=torch.int64, device="cuda")
    mask = feeds["attention_mask"]
    caches = [n for n in backend.input_names if n.startswith("past_key_values.")]

    def step():
        nonlocal outputs, mask
        mask = torch.cat((mask, torch.ones_like(token)), dim=1)
        step_feeds = {"input_ids": token, "attention_mask": mask,
                      **{n: outputs[n.replace("past_key_values.", "present.")] for n in caches}}
        outputs = backend.run_torch(step_feeds)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
        started = time.perf_counter()
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
        wall = time.perf_counter() - started
    kernels = [e for e in prof.events() if e.device_type.name == "CUDA"]
    busy_us = sum(e.device_time for e in kernels)
    top = {}
    for e in kernels:
        top[e.name] = top.get(e.name, 0) + e.device_time
    return {"backend": backend.name, "context": context, "steps": steps,
            "kernels_per_step": len(kernels) / steps, "gpu_busy_us_per_step": busy_us / steps,
            "wall_us_per_step": wall / steps * 1e6, "gpu_busy_fraction": busy_us / (wall * 1e6),
            "top_kernels_us_per_step": {k[:80]: v / steps for k, v in sorted(top.items(), key=lambda kv: -kv[1])[:6]}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--json")
    args = parser.parse_args()
    import torch

    from models.source import resolve_model
    from runtime.backends.onnxruntime_backend import OnnxRuntimeBackend
    from runtime.backends.torch_backend import TorchBackend

    ort_backend = OnnxRuntimeBackend(args.model, "cuda")
    meta = ort_backend.metadata
    dtype = torch.float16 if meta.get("precision") == "float16" else torch.float32
    model = resolve_model(None, None, meta["source_preset"], int(meta.get("source_seed", 0))).model
    results = [profile(TorchBackend(model, "cuda", dtype, with_past=True), args.context, args.steps),
               profile(ort_backend, args.context, args.steps)]
    for r in results:
        print(f"{r['backend']:<22} ctx {r['context']}: {r['kernels_per_step']:.0f} kernels/step, GPU busy "
              f"{r['gpu_busy_us_per_step']:.0f} us of {r['wall_us_per_step']:.0f} us wall "
              f"({r['gpu_busy_fraction']:.0%}); top: " + ", ".join(f"{k[:40]} {v:.0f}us" for k, v in
                                                               list(r['top_kernels_us_per_step'].items())[:3]))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
