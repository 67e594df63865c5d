"""Write a preset with random weights as a sharded checkpoint, one tensor at a time: the large
presets (1b, 7b) never have to fit in memory. Pass the folder to any --checkpoint. (For any other
config: models.random_weights.write_random_checkpoint.)

Usage: python scripts/write_preset.py NAME FOLDER [--seed 0] [--dtype fp32|fp16|bf16] [--max-shard-mib 2048]
"""
from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> int:
    import torch

    from models.errors import ToolkitError
    from models.presets import parameter_count, preset
    from models.random_weights import write_random_checkpoint

    dtypes = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", help="a preset: tiny, small, 1b or 7b")
    parser.add_argument("folder", help="the folder to write (must not exist); written beside it and renamed")
    parser.add_argument("--seed", type=int, default=0, help="weight seed (default 0)")
    parser.add_argument("--dtype", choices=list(dtypes), default="fp32", help="stored precision (default fp32)")
    parser.add_argument("--max-shard-mib", type=int, default=2048, metavar="MIB", help="largest shard (default 2048)")
    args = parser.parse_args(argv)
    try:
        config = preset(args.name)
        if args.max_shard_mib < 1:
            raise ToolkitError("--max-shard-mib must be at least 1")
        if args.seed < 0:
            raise ToolkitError(f"--seed must be 0 or more, got {args.seed}")
        count = parameter_count(config)
        needed, parent = count * dtypes[args.dtype].itemsize, Path(args.folder).resolve().parent
        if parent.is_dir() and shutil.disk_usage(parent).free < needed:
            raise ToolkitError(f"{args.name} in {args.dtype} needs {needed / 2**30:.1f} GiB and {parent} has "
                               f"{shutil.disk_usage(parent).free / 2**30:.1f} GiB free; choose another folder")
        print(f"write_preset: {args.name}, {count / 1e9:.2f}B parameters, "
              f"{count * dtypes[args.dtype].itemsize / 2**30:.1f} GiB in {args.dtype}", flush=True)
        started = time.perf_counter()
        folder = write_random_checkpoint(config, args.folder, args.seed, dtypes[args.dtype], args.max_shard_mib << 20)
    except ToolkitError as error:
        print(f"write_preset: error: {error}", file=sys.stderr)
        return 2
    print(f"write_preset: wrote {folder} in {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
