"""Rewrite a project .safetensors checkpoint as a folder of shards with their index
(model-0000K-of-0000N.safetensors + model.safetensors.index.json), reading the source tensor by
tensor: the whole model is never in memory.

Usage: python scripts/shard_checkpoint.py CHECKPOINT.safetensors FOLDER [--max-shard-mib 2048]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> int:
    from models.checkpoints import shard_checkpoint
    from models.errors import ToolkitError

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a project .safetensors checkpoint")
    parser.add_argument("folder", help="the folder to write (must not exist); written beside it and renamed")
    parser.add_argument("--max-shard-mib", type=int, default=2048, metavar="MIB", help="largest shard (default 2048)")
    args = parser.parse_args(argv)
    if args.max_shard_mib < 1:
        print("shard_checkpoint: error: --max-shard-mib must be at least 1", file=sys.stderr)
        return 2
    try:
        folder = shard_checkpoint(args.checkpoint, args.folder, args.max_shard_mib << 20)
    except ToolkitError as error:
        print(f"shard_checkpoint: error: {error}", file=sys.stderr)
        return 2
    print(f"shard_checkpoint: wrote {folder} ({len(list(folder.glob('*.safetensors')))} shards)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
