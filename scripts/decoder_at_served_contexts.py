"""The decoder's step alone at the contexts a served batch holds: `loadtest`'s seeded workload
(prompts of 1..128 ids, 1..256 new tokens) run through 32 closed-loop rows on paper, the rows'
lengths taken at several moments, and the step timed with each set of lengths (rows started with
prompts of those lengths, synchronised steps), next to the step with every row at one context. Each
is timed as `benchmark` times a step and as the server replays it (with a greedy pick, recorded as
one CUDA graph), median and mean.
This is the decoder-alone reference for the served step ratio: a step's attention costs what its rows hold.

Usage: python3 scripts/decoder_at_served_contexts.py [--rows 32] [--cache 1024] [--moments 8] [--json PATH]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from profile_engine import decoder_arguments, open_static, sync  # noqa: E402  (scripts/ is on the path when run as a script)


def served_lengths(rows: int, vocab: int, moments: int, warm_steps: int = 2000, every: int = 97) -> list[list[int]]:
    """Each row's length (prompt + tokens so far) at `moments` steps of a closed loop of `rows` clients."""
    from runtime.serving.loadtest import Workload

    requests = iter(Workload(4096, vocab, 128, 256).build())
    table = []
    for _ in range(rows):
        request = next(requests)
        table.append([len(request["prompt_ids"]), request["max_new_tokens"], 0])
    taken = []
    for step in range(warm_steps + moments * every):
        if step >= warm_steps and (step - warm_steps) % every == 0:
            taken.append([prompt + produced for prompt, _, produced in table])
        for row in table:
            row[2] += 1
            if row[2] >= row[1]:
                request = next(requests)
                row[:] = [len(request["prompt_ids"]), request["max_new_tokens"], 0]
    return taken


def step_ms(decoder, lengths: list[int], steps: int) -> dict[str, float]:
    """The step over rows of these lengths, synchronised: as `benchmark` times it (decoder.step)
    and as the server replays it (step_and_pick with a greedy pick, recorded as one CUDA graph with
    the step where the decoder records one); median and mean ms of each."""
    import torch

    decoder.start({row: [1 + row % 7] * length for row, length in enumerate(lengths)})
    tokens = torch.ones(len(lengths), dtype=torch.int64, device=decoder.device)

    def pick(logits):
        ids = logits.argmax(-1)
        tokens.copy_(ids)
        return ids

    runs = {"step": lambda: decoder.step(tokens), "step_and_pick": lambda: decoder.step_and_pick(tokens, pick, "greedy")}
    result = {}
    for name, run in runs.items():
        for _ in range(3):  # step_and_pick's first call runs unrecorded, the second records
            run()
        times = []
        for _ in range(steps):
            sync(decoder)
            started = time.perf_counter()
            run()
            sync(decoder)
            times.append((time.perf_counter() - started) * 1e3)
        result[f"{name}_p50_ms"], result[f"{name}_mean_ms"] = statistics.median(times), statistics.mean(times)
    decoder.release(range(len(lengths)))
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    decoder_arguments(parser, "rows decoding (the served batch)")
    parser.add_argument("--moments", type=int, default=8, help="sets of served lengths timed")
    parser.add_argument("--steps", type=int, default=24, help="steps timed per set")
    parser.add_argument("--json", metavar="PATH", help="write the results here")
    args = parser.parse_args()
    decoder = open_static(args.backend, args.preset, args.dtype, args.rows, args.cache)
    moments = served_lengths(args.rows, decoder.vocab_size, args.moments)
    served = [step_ms(decoder, lengths, args.steps) for lengths in moments]
    uniform = {context: step_ms(decoder, [context] * args.rows, args.steps) for context in (128, 256, 384)}
    decoder.close()
    result = {"served": {key: statistics.mean(s[key] for s in served) for key in served[0]}, "served_moments": served,
              "mean_length": statistics.mean(n for lengths in moments for n in lengths),
              "longest": [max(lengths) for lengths in moments], "uniform": uniform}
    print(f"decoder alone, {args.rows} rows at served lengths (mean {result['mean_length']:.0f}, longest "
          f"{min(result['longest'])}..{max(result['longest'])}):", flush=True)
    for label, times in [("served lengths", result["served"]), *((f"every row at {c}", t) for c, t in uniform.items())]:
        print(f"  {label:16s}: " + ", ".join(f"{key} {ms:.3f}" for key, ms in times.items()), flush=True)
    if args.json:
        from runtime.provenance import script_command, write_result

        write_result(args.json, result, script_command(None), vars(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
