"""Train a preset on byte-level text and save it as a checkpoint, so quality figures (quantized
graphs against float, issue 14) are measured on a model with real margins instead of random weights.

Usage: python3 scripts/train_reference.py --preset small --output /tmp/small-trained.safetensors
       [--corpus DIR --pattern '*.py'] [--steps N --batch B --seq L --lr LR --seed S]
       [--max-minutes M] [--prompts PATH --prompt-bytes N --prompt-count K] [--json PATH]
The default corpus is the running interpreter's standard library (*.py): present on every machine,
plain text, and the same for one Python version (installed packages and test suites skipped). One file in 20 is held out (by a hash of its path);
the held-out loss and the prompts come from those files only.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import sysconfig
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


SKIP = ("site-packages", "dist-packages", "test", "tests")  # installed packages; the stdlib's huge test suite


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="train_reference.py", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--preset", default="small", help="the model preset to train")
    parser.add_argument("--output", required=True, metavar="PATH", help="the .safetensors checkpoint to write (required)")
    parser.add_argument("--corpus", default=sysconfig.get_paths()["stdlib"], metavar="DIR",
                        help="folder of text files; the default is this Python's standard library")
    parser.add_argument("--pattern", default="*.py", help="which files of the corpus to read (recursive glob)")
    parser.add_argument("--held-out-every", type=int, default=20, metavar="N", help="hold one file in N out")
    parser.add_argument("--steps", type=int, default=2500, help="optimizer steps (3.5 minutes for small on an H100)")
    parser.add_argument("--batch", type=int, default=32, help="windows per step")
    parser.add_argument("--seq", type=int, default=512, help="bytes per window")
    parser.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (AdamW, cosine to a tenth)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the initial weights and of the windows")
    parser.add_argument("--max-minutes", type=float, help="stop early after this long (the JSON says so)")
    parser.add_argument("--device", default="auto", help="cuda, cpu or auto (cuda when there is one)")
    parser.add_argument("--prompts", metavar="PATH",
                        help="also write held-out text prompts as a JSON list (for check-parity --prompt)")
    parser.add_argument("--prompt-count", type=int, default=8, help="how many prompts --prompts writes")
    parser.add_argument("--prompt-bytes", type=int, default=64, help="bytes per prompt")
    parser.add_argument("--json", metavar="PATH", help="write a JSON report (settings, losses, held-out loss)")
    return parser.parse_args(argv)


def held_out_prompts(data, count: int, length: int) -> list[str]:
    """`count` prompts of about `length` bytes, evenly spaced through the held-out text, each starting
    at a line start and cut at a character boundary (valid UTF-8, so byte ids round-trip)."""
    text = bytes(data.tolist())
    prompts, stride = [], max(1, len(text) // (count + 1))
    for index in range(1, count + 1):
        start = text.rfind(b"\n", 0, index * stride) + 1
        piece = text[start: start + length].decode("utf-8", errors="ignore")
        prompts.append(piece)
    return prompts


def main(argv=None) -> int:
    import torch

    from models.checkpoints import save_checkpoint
    from models.errors import ToolkitError
    from models.files import atomic_path, sha256_file
    from models.presets import preset
    from models.transformer import build_model
    from models.training import TrainingSettings, held_out_loss, read_corpus, train
    from runtime.commands.common import Files, check_files
    from runtime.provenance import script_command, write_result

    args = parse_args(argv)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    try:  # every output writable before minutes of training, not after
        check_files(Files(outputs={"--output": args.output, "--prompts": args.prompts, "--json": args.json}))
        corpus = read_corpus(args.corpus, args.pattern, args.held_out_every, skip=SKIP)
        config = preset(args.preset)
    except ToolkitError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"corpus {args.corpus} ({args.pattern}): {corpus.files} files, {corpus.train.numel():,} bytes to train on, "
          f"{corpus.held_out.numel():,} held out", flush=True)
    torch.backends.cuda.matmul.allow_tf32 = True
    model = build_model(config, args.seed).to(device)
    settings = TrainingSettings(steps=args.steps, batch=args.batch, seq=args.seq, lr=args.lr, seed=args.seed,
                                max_seconds=None if args.max_minutes is None else 60 * args.max_minutes)
    before = held_out_loss(model, corpus.held_out, args.seq, windows=16)
    result = train(model, corpus.train, settings,
                   progress=lambda step, loss, seconds: print(f"  step {step:5d}  loss {loss:.3f} nats/byte  "
                                                              f"{seconds:6.0f} s", flush=True))
    after = held_out_loss(model, corpus.held_out, args.seq, windows=64)
    print(f"held-out loss {before:.2f} -> {after:.3f} bits/byte after {result.steps_done} steps "
          f"({result.tokens:,} bytes, {result.seconds:.0f} s{', stopped early' if result.stopped_early else ''})")
    save_checkpoint(model.float().cpu(), args.output)
    report = {
        "preset": args.preset, "config": json.loads(config.to_json()), "checkpoint": args.output,
        "checkpoint_sha256": sha256_file(args.output), "corpus": args.corpus, "pattern": args.pattern,
        "files": corpus.files, "train_bytes": corpus.train.numel(), "held_out_bytes": corpus.held_out.numel(),
        "settings": vars(settings), "steps_done": result.steps_done, "stopped_early": result.stopped_early,
        "seconds": round(result.seconds, 1), "tokens": result.tokens, "losses_nats": result.losses,
        "held_out_bits_per_byte": {"before": round(before, 3), "after": round(after, 3)},
        "device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "python": platform.python_version(),
    }
    if args.prompts:
        with atomic_path(Path(args.prompts)) as temporary:
            temporary.write_text(json.dumps(held_out_prompts(corpus.held_out, args.prompt_count, args.prompt_bytes)))
    if args.json:
        write_result(args.json, report, script_command(argv), vars(args))
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
