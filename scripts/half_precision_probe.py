"""Where half-precision error comes from, with PyTorch alone (no ONNX): a checkpoint cast to
float16 and bfloat16 against its float32 self, on random bytes (ids 0..255, drawn as check-parity
draws its sweep) and on ASCII (ids 32..126, what Python source is made of).

Usage: python3 scripts/half_precision_probe.py CHECKPOINT [--device cuda|cpu]
Prints one JSON line per case: per dtype, the 3 outputs with the largest max abs / max |ref| and
the index of the worst element, and the token at the worst bfloat16 position.
(docs/benchmarks/h100-half-precision-parity.json, "pytorch_half_vs_fp32_probe".)
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.checkpoints import load_checkpoint  # noqa: E402
from runtime.backends.torch_backend import TorchBackend  # noqa: E402
from runtime.provenance import script_command, write_result  # noqa: E402
from runtime.verify.tensors import Case, make_feeds  # noqa: E402

CASES = ((Case(1, 513), False), (Case(3, 128), False), (Case(3, 513), False), (Case(1, 513), True), (Case(3, 128), True))


def worst_outputs(want: dict, got: dict, count: int = 3) -> list[tuple[float, str, list[int]]]:
    """(max abs / max |ref|, output name, index of the worst element), largest first."""
    rows = []
    for name, reference in want.items():
        error = (got[name].float() - reference.float()).abs()
        index = np.unravel_index(int(error.argmax()), tuple(error.shape))
        rows.append((round(float(error.max() / reference.float().abs().max()), 4), name, [int(i) for i in index]))
    return sorted(rows, reverse=True)[:count]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="a .safetensors checkpoint (e.g. from scripts/train_reference.py)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="where to run")
    parser.add_argument("--json", metavar="PATH", help="also write the figures, with their provenance, as JSON")
    args = parser.parse_args(argv)
    report = {"checkpoint": args.checkpoint, "cases": {}}
    model = load_checkpoint(args.checkpoint).model
    norms = model.token_emb.weight.detach().float().norm(dim=1)
    report["embedding_norm"] = {"median": float(norms.median()), "min": float(norms.min()), "max": float(norms.max())}
    print("embedding_norm", json.dumps(report["embedding_norm"]))
    reference = TorchBackend(model, device=args.device, with_past=True)
    halves = {name: TorchBackend(model, device=args.device, dtype=getattr(torch, name), with_past=True)
              for name in ("float16", "bfloat16")}
    for case, ascii_only in CASES:
        feeds = make_feeds(case, reference.inputs, 256, 0)
        if ascii_only:
            feeds["input_ids"] = np.random.default_rng(1).integers(32, 127, size=feeds["input_ids"].shape)
        tensors = {name: torch.from_numpy(value).to(args.device) for name, value in feeds.items()}
        want = reference.run(dict(tensors))
        row = {}
        for name, backend in halves.items():
            cast = {k: v.to(getattr(torch, name)) if v.is_floating_point() else v for k, v in tensors.items()}
            row[name] = worst_outputs(want, backend.run(cast))
        _, output, index = row["bfloat16"][0]
        batch_row, position = index[0], index[2] if output.startswith("present") else index[1]
        token = int(feeds["input_ids"][batch_row, position])
        row["worst_position"] = {"row": batch_row, "position": position, "token": token,
                                 "token_emb_norm": float(norms[token])}
        label = f"{case.label} {'ascii' if ascii_only else 'random bytes'}"
        report["cases"][label] = row
        print(label, json.dumps(row))
    if args.json:
        write_result(args.json, report, script_command(argv), vars(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
