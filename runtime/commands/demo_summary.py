"""Prints the short summary at the end of `make demo` from the reports it wrote."""
from __future__ import annotations

import json
import sys
from pathlib import Path


def main(directory: str) -> int:
    folder = Path(directory)
    export = json.loads((folder / "export.json").read_text())
    parity = json.loads((folder / "parity.json").read_text())
    worst = parity["worst"]
    print()
    print("demo summary")
    print(f"  model      {export['source']}, {export['config']['depth']} layers, dim {export['config']['dim']}")
    print(f"  exported   {export['output']} (opset {export['opset']}, {export['dtype']}) in {export['export_seconds']:.1f} s, "
          f"{sum(export['lint']['ops'].values())} nodes, lint findings: {len(export['lint']['findings'])}")
    print(f"  parity     {'PASSED' if parity['passed'] else 'FAILED'} over {len(parity['cases'])} shapes, "
          f"worst {worst['case']}: max abs error {worst['max_abs']:.2e} (tolerance {parity['tolerance']['atol']:g})")
    generated = folder / "generate.json"
    if generated.exists():
        gen = json.loads(generated.read_text())
        print(f"  generate   {len(gen['tokens'])} greedy tokens through the key/value cache on {gen['backend']} "
              f"at {gen['decode_tokens_per_second']:.0f} tokens/s: {gen['tokens'][:8]}...")
    print(f"  files      {', '.join(sorted(p.name for p in folder.iterdir() if p.is_file()))} in {folder}/")
    print("  (the default model has random weights: its text is noise; the numbers are what matters)")
    return 0 if parity["passed"] else 1


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1] if len(sys.argv) > 1 else "build/demo"))
