"""The fused sampling kernel's time per call on CUDA, for one row (an admission's first pick) and a
decode step's rows, at each Triton num_warps and pick chunk tried, with the registers and spills
Triton reports; each setting's ids are compared with the PyTorch ops' (`sampling.choose`, OPS).

Usage: python3 scripts/bench_sampling_kernel.py [--vocab 32000] [--rows 1,32] [--warps 8,16,32]
       [--chunks 2048,4096,8192] [--repeats 200] [--json PATH]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def time_setting(count: int, vocab: int, warps: int, chunk: int, repeats: int) -> dict:
    """us per launch of the kernel over `count` sampled rows, and whether its ids equal the ops'."""
    import torch
    import triton

    from runtime.decoding.sampling import OPS, RowSettings, choose
    from runtime.decoding.sampling_triton import choose_kernel
    from runtime.decoding.settings import GenerationSettings

    logits = torch.randn(count, vocab, device="cuda", generator=torch.Generator("cuda").manual_seed(0)) * 3
    settings = [GenerationSettings(8, 0.8, 0.9, seed=row) for row in range(count)]
    rows = RowSettings.of(settings, [0] * count, vocab, torch.device("cuda"))
    reference = choose(logits, RowSettings.of(settings, [0] * count, vocab, torch.device("cuda")), OPS)
    out = torch.empty(count, dtype=torch.int64, device="cuda")
    block = triton.next_power_of_2(vocab)

    def launch():
        return choose_kernel[(count,)](logits, logits.stride(0), rows.kept, rows.temperature, rows.keys, rows.counters,
                                       out, vocab, BLOCK=block, CHUNK=min(chunk, block), num_warps=warps)

    compiled = launch()
    agree = int((out == reference).sum())
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(repeats):
        launch()
    end.record()
    torch.cuda.synchronize()
    return {"rows": count, "warps": warps, "chunk": chunk, "us_per_call": start.elapsed_time(end) * 1e3 / repeats,
            "registers": getattr(compiled, "n_regs", None), "spills": getattr(compiled, "n_spills", None),
            "ids_equal_to_ops": agree}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, default=32000, help="the logits' width")
    parser.add_argument("--rows", default="1,32", help="batch sizes, comma-separated")
    parser.add_argument("--warps", default="8,16,32", help="Triton num_warps settings, comma-separated")
    parser.add_argument("--chunks", default="2048,4096,8192", help="logits per pass of the pick, comma-separated")
    parser.add_argument("--repeats", type=int, default=200, help="timed launches per setting")
    parser.add_argument("--json", metavar="PATH", help="write the results here")
    args = parser.parse_args()
    results = []
    for count in (int(r) for r in args.rows.split(",")):
        for warps in (int(w) for w in args.warps.split(",")):
            for chunk in (int(c) for c in args.chunks.split(",")):
                result = time_setting(count, args.vocab, warps, chunk, args.repeats)
                results.append(result)
                print(f"{count:3d} rows, {warps:2d} warps, chunk {chunk:5d}: {result['us_per_call']:6.1f} us/call, "
                      f"{result['registers']} registers, {result['spills']} spills, ids equal to the ops' "
                      f"{result['ids_equal_to_ops']}/{count}", flush=True)
    if args.json:
        from runtime.provenance import script_command, write_result

        write_result(args.json, {"results": results}, script_command(None), vars(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
