"""Export time and peak memory at real model sizes, each export in a fresh process.

For each preset, writes a random sharded checkpoint once (scripts/write_preset.py's writer) into
--cache, then runs `export-model --checkpoint FOLDER --dtype fp16 --with-past` and records the
wall time and the child's peak resident memory (getrusage). `--baseline REV` also runs the same
export from another commit's checkout (a git worktree) for comparison, where its memory allows.

Usage: python scripts/bench_export.py [--presets small 1b 7b] [--cache DIR] [--baseline REV]
                                      [--verify] [--output docs/benchmarks/cpu-export] [--phases-only]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def run_measured(command: list[str], cwd: Path, log_path: Path) -> dict:
    """Run `command`; its wall seconds, peak RSS (bytes) and exit code."""
    started = time.perf_counter()
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, cwd=cwd, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(process.pid, 0)
    return {"seconds": round(time.perf_counter() - started, 1), "peak_rss_bytes": usage.ru_maxrss * 1024,
            "exit_code": os.waitstatus_to_exitcode(status)}


def phases_from_log(path: Path) -> dict:
    """The last progress line of each phase in an export's log: each phase took at least that long
    (progress lines come every 5 s)."""
    import re

    found: dict[str, int] = {}
    for line in path.read_text().splitlines():
        match = re.match(r"\s+still (tracing the model|writing the weights) \((\d+) s\)", line)
        if match:
            found[{"tracing the model": "tracing_s_at_least", "writing the weights": "writing_s_at_least"}[
                match.group(1)]] = int(match.group(2))
    return found


def checkpoint(name: str, cache: Path) -> Path:
    """The preset's random bf16 shards, written once, in a child process: a child's peak RSS counts
    its parent's resident memory at the fork, so this process must stay small."""
    folder = cache / f"{name}-bf16-seed0"
    if not folder.exists():
        print(f"bench_export: writing the {name} checkpoint to {folder} ...", flush=True)
        code = ("import sys, torch; from models.presets import preset; "
                "from models.random_weights import write_random_checkpoint; "
                "write_random_checkpoint(preset(sys.argv[1]), sys.argv[2], 0, torch.bfloat16)")
        subprocess.run([sys.executable, "-c", code, name, str(folder)], cwd=ROOT, check=True)
    return folder


def export_command(python: str, folder: Path, output: Path, verify: bool) -> list[str]:
    return [python, "-m", "runtime.commands.export_model", "--checkpoint", str(folder), "--dtype", "fp16",
            "--with-past", "--output", str(output), "--verify" if verify else "--no-verify"]


def baseline_tree(revision: str, cache: Path) -> Path:
    tree = cache / f"baseline-{revision}"
    if not tree.exists():
        subprocess.run(["git", "worktree", "add", "--detach", str(tree), revision], cwd=ROOT, check=True,
                       capture_output=True)
    return tree


def write_phases(output: Path, argv: list[str] | None) -> None:
    """phases.json: each streamed export's phases, read from its log."""
    from runtime.provenance import script_command, write_result

    phases = {log.stem: phases_from_log(log) for log in sorted(output.glob("*-streamed.log"))}
    write_result(output / "phases.json", {"source": "the logs beside this file", "phases": phases},
                 script_command(argv))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["small", "1b", "7b"], help="presets to export (default: small 1b 7b)")
    parser.add_argument("--cache", default="/tmp/rotary-bench-export", help="checkpoints and graphs (default %(default)s)")
    parser.add_argument("--baseline", metavar="REV", help="also export from this commit (the export before streaming)")
    parser.add_argument("--baseline-presets", nargs="+", default=["small"], help="presets the baseline runs (default small)")
    parser.add_argument("--verify", action="store_true", help="verify each export (default --no-verify)")
    parser.add_argument("--output", default=str(ROOT / "docs/benchmarks/cpu-export"), help="results folder")
    parser.add_argument("--phases-only", action="store_true",
                        help="only (re)write phases.json from the logs already in --output")
    args = parser.parse_args(argv)
    if args.phases_only:
        write_phases(Path(args.output), argv)
        return 0
    from models.presets import parameter_count, preset

    cache, output = Path(args.cache), Path(args.output)
    cache.mkdir(parents=True, exist_ok=True)
    output.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in args.presets:
        folder = checkpoint(name, cache)
        runs = [("streamed (this commit)", ROOT)]
        if args.baseline and name in args.baseline_presets:
            runs.append((f"in memory ({args.baseline})", baseline_tree(args.baseline, cache)))
        for label, tree in runs:
            graph = cache / f"{name}-{'base' if tree != ROOT else 'new'}.onnx"
            print(f"bench_export: {name}, {label} ...", flush=True)
            result = run_measured(export_command(sys.executable, folder, graph, args.verify), tree,
                                  output / f"{name}-{'baseline' if tree != ROOT else 'streamed'}.log")
            files = [graph, graph.with_name(graph.name + ".data")]
            result.update(preset=name, exporter=label, parameters=parameter_count(preset(name)),
                          written_bytes=sum(f.stat().st_size for f in files if f.exists()))
            rows.append(result)
            print(f"  {json.dumps(result)}", flush=True)
            for f in files:
                f.unlink(missing_ok=True)
    from runtime.provenance import script_command, write_result

    report = {"date": datetime.date.today().isoformat(),
              "export": "export-model --checkpoint FOLDER (bf16 shards) --dtype fp16 --with-past "
                        + ("--verify" if args.verify else "--no-verify"), "rows": rows}
    write_result(output / "results.json", report, script_command(argv))
    write_phases(output, argv)
    return 0 if all(row["exit_code"] == 0 for row in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
