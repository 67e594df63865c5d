"""Issue 20's and 24's GPU targets, judged from the raw results a lease writes.

    python3 scripts/check_targets.py serve LOADTEST.json DECODER_SERVED_CONTEXTS.json
    python3 scripts/check_targets.py fused BENCH.json

`serve`: a `loadtest --concurrency 1,8,32,64` of `serve` (scripts/accelerator.sh serve) and the
decoder alone at the served lengths (accelerator.sh reference). The step ratio is judged on an
upper bound that holds for any server version: the 32-client level's wall time over its steps
(every step, every gap, the ramp up and down) against the decoder's step and pick; the server's
own mean step is printed beside it. `fused`: a `benchmark` of triton-fused and torch-compile-static
(accelerator.sh fused): batch 1 decode within 75 % of the HBM floor and ahead of the recipe.

Prints one line per target; exit 0 only if every target is met (1 if one is missed, 2 on bad input).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _level(loadtest: dict, clients: int) -> dict:
    for level in loadtest["levels"]:
        if level["concurrency"] == clients:
            return level
    raise ValueError(f"the loadtest has no {clients}-client level; run it with --concurrency 1,8,32,64")


def serve_targets(loadtest: dict, reference: dict) -> list[tuple[str, float, str, bool | None]]:
    """(target, value, bound, met) for issue 20's serving targets; met None: a figure shown, not judged."""
    one, busy, full = (_level(loadtest, n) for n in (1, 32, 64))
    steps = busy["server_steps"]
    alone = reference["served"]["step_and_pick_p50_ms"]
    bound = busy["seconds"] * 1000 / steps["steps"] / alone
    return [
        ("32 clients: tokens/s", busy["tokens_per_second"], ">= 20000", busy["tokens_per_second"] >= 20000),
        ("32 clients: errors", busy["errors"], "== 0", busy["errors"] == 0),
        ("32 clients: TTFT p50 ms", busy["ttft_ms"]["p50"], "<= 15", busy["ttft_ms"]["p50"] <= 15),
        ("32 clients: TTFT p99 ms", busy["ttft_ms"]["p99"], "<= 60", busy["ttft_ms"]["p99"] <= 60),
        ("32 clients: between responses p99 ms", busy["response_gap_ms"]["p99"], "<= 15",
         busy["response_gap_ms"]["p99"] <= 15),
        ("64 clients: tokens/s", full["tokens_per_second"], ">= 20000", full["tokens_per_second"] >= 20000),
        ("64 clients: errors", full["errors"], "== 0", full["errors"] == 0),
        ("1 client: ITL p50 ms", one["itl_ms"]["p50"], "<= 1.0", one["itl_ms"]["p50"] <= 1.0),
        ("1 client: TTFT p50 ms", one["ttft_ms"]["p50"], "<= 5", one["ttft_ms"]["p50"] <= 5),
        ("32 clients: rows per step", steps["mean_rows"], ">= 27", steps["mean_rows"] >= 27),
        ("32 clients: step over the decoder's alone, upper bound", bound, "<= 1.3", bound <= 1.3),
        ("the server's own mean step over the decoder's alone (not judged)", steps["mean_step_ms"] / alone, "", None),
    ]


def fused_targets(bench: dict) -> list[tuple[str, float, str, bool]]:
    """(target, value, bound, met) for issue 24's 7b batch-1 decode target."""
    def result(backend: str) -> dict:
        for row in bench["results"]:
            if row["backend"] == backend and row["batch"] == 1 and not row.get("error"):
                return row
        raise ValueError(f"the benchmark has no batch-1 result of {backend}; run accelerator.sh fused")

    fused, recipe = result("triton-fused"), result("torch-compile-static")
    fraction = fused["decode_floor_ms"] / fused["decode_p50_ms"]
    return [
        ("triton-fused batch 1: decode p50 ms", fused["decode_p50_ms"], f"<= {fused['decode_floor_ms'] / 0.75:.3f}",
         fraction >= 0.75),
        ("triton-fused batch 1: fraction of the HBM floor", fraction, ">= 0.75", fraction >= 0.75),
        ("torch-compile-static batch 1 (same run): decode p50 ms", recipe["decode_p50_ms"],
         f"> {fused['decode_p50_ms']:.3f}", recipe["decode_p50_ms"] > fused["decode_p50_ms"]),
    ]


def _load(path: str) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as error:
        raise ValueError(f"cannot read {path} ({error}); give the JSON a lease wrote") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("kind", choices=["serve", "fused"], help="which targets: issue 20's (serve) or 24's (fused)")
    parser.add_argument("files", nargs="+", help="serve: LOADTEST.json DECODER_SERVED_CONTEXTS.json; fused: BENCH.json")
    parser.add_argument("--json", action="store_true", help="print the verdicts as JSON instead of lines")
    args = parser.parse_args(argv)
    try:
        if len(args.files) != (2 if args.kind == "serve" else 1):
            raise ValueError(f"{args.kind} takes {'two files' if args.kind == 'serve' else 'one file'}; see --help")
        data = [_load(path) for path in args.files]
        rows = serve_targets(*data) if args.kind == "serve" else fused_targets(*data)
    except (ZeroDivisionError, TypeError) as error:
        print(f"check_targets: error: a file holds an empty or missing figure ({error}); was the run complete?",
              file=sys.stderr)
        return 2
    except KeyError as error:
        print(f"check_targets: error: a file lacks the field {error}; give the files in the order --help shows",
              file=sys.stderr)
        return 2
    except ValueError as error:
        print(f"check_targets: error: {error}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps([{"target": t, "value": v, "bound": b, "met": m} for t, v, b, m in rows]))
    else:
        for target, value, bound, met in rows:
            verdict = {True: "met   ", False: "MISSED", None: "      "}[met]
            shown = f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}"
            print(f"{verdict} {target}: {shown} {bound}".rstrip())
    return 0 if all(met is not False for *_, met in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
