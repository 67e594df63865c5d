"""The fused sampling kernel's time per call on CUDA, one row (an admission's first pick) and a
decode step's rows, as one kernel and as two (the filter's threshold, then the pick), with the
registers and spills Triton reports for each; both give the same ids.

Usage: python3 scripts/bench_sampling_kernel.py [--vocab 32000] [--rows 1,32] [--repeats 200] [--json PATH]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def launches(variant: str, logits, rows, out, thresholds, warps: int):
    """Launch `variant` once; the compiled kernels it launched."""
    import triton

    from runtime.decoding import sampling_triton as k

    count, vocab = logits.shape
    block = triton.next_power_of_2(vocab)
    if variant == "one kernel":
        return [k.choose_kernel[(count,)](logits, logits.stride(0), rows.kept, rows.temperature, rows.keys,
                                          rows.counters, out, vocab, BLOCK=block, num_warps=warps)]
    first = k.threshold_kernel[(count,)](logits, logits.stride(0), rows.kept, rows.temperature, thresholds, vocab,
                                         BLOCK=block, num_warps=warps)
    second = k.pick_kernel[(count,)](logits, logits.stride(0), thresholds, rows.temperature, rows.keys, rows.counters,
                                     out, vocab, BLOCK=block, num_warps=warps)
    return [first, second]


def time_variant(variant: str, count: int, vocab: int, repeats: int, warps: int) -> dict:
    import torch

    from runtime.decoding.sampling import RowSettings
    from runtime.decoding.settings import GenerationSettings

    logits = torch.randn(count, vocab, device="cuda", generator=torch.Generator("cuda").manual_seed(0)) * 3
    settings = [GenerationSettings(8, 0.8, 0.9, seed=row) for row in range(count)]
    rows = RowSettings.of(settings, [0] * count, vocab, torch.device("cuda"))
    out = torch.empty(count, dtype=torch.int64, device="cuda")
    thresholds = torch.empty(count, dtype=torch.int32, device="cuda")
    compiled = launches(variant, logits, rows, out, thresholds, warps)
    first_ids = out.clone()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(repeats):
        launches(variant, logits, rows, out, thresholds, warps)
    end.record()
    torch.cuda.synchronize()
    return {"variant": variant, "rows": count, "warps": warps, "us_per_call": start.elapsed_time(end) * 1e3 / repeats,
            "registers": [getattr(c, "n_regs", None) for c in compiled],
            "spills": [getattr(c, "n_spills", None) for c in compiled], "ids": first_ids.tolist()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, default=32000, help="the logits' width")
    parser.add_argument("--rows", default="1,32", help="batch sizes, comma-separated")
    parser.add_argument("--warps", default="8,16,32", help="Triton num_warps settings tried, comma-separated")
    parser.add_argument("--repeats", type=int, default=200, help="timed launches per setting")
    parser.add_argument("--json", metavar="PATH", help="write the results here")
    args = parser.parse_args()
    results = []
    for count in (int(r) for r in args.rows.split(",")):
        for warps in (int(w) for w in args.warps.split(",")):
            for variant in ("one kernel", "two kernels"):
                result = time_variant(variant, count, args.vocab, args.repeats, warps)
                results.append(result)
                print(f"{count:3d} rows, {warps:2d} warps, {variant:11s}: {result['us_per_call']:7.1f} us/call, "
                      f"registers {result['registers']}, spills {result['spills']}", flush=True)
            same = results[-1]["ids"] == results[-2]["ids"]
            print(f"    same ids: {same}", flush=True)
    if args.json:
        from runtime.provenance import script_command, write_result

        write_result(args.json, {"results": results}, script_command(sys.argv), vars(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
