"""How often weight-only quantization changes a checkpoint's argmax, on held-out text: PyTorch with
the weights the graphs compute (export.quantize.fake_quantize) against the float32 model, teacher-forced
with real text, over many more positions than check-parity's greedy continuations.

Usage: python3 scripts/quantized_agreement.py CHECKPOINT [--corpus DIR] [--windows 64 --seq 512]
       [--schemes int8,int4-b32,int4-b64,int4-b128] [--json PATH]
The held-out files are those scripts/train_reference.py held out (same corpus, pattern and split).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def parse_args(argv=None) -> argparse.Namespace:
    import sysconfig

    parser = argparse.ArgumentParser(prog="quantized_agreement.py", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("checkpoint", help="a .safetensors checkpoint (e.g. from train_reference.py)")
    parser.add_argument("--corpus", default=sysconfig.get_paths()["stdlib"], metavar="DIR", help="the training corpus")
    parser.add_argument("--pattern", default="*.py", help="its files (recursive glob)")
    parser.add_argument("--held-out-every", type=int, default=20, metavar="N", help="as at training")
    parser.add_argument("--windows", type=int, default=64, help="held-out windows")
    parser.add_argument("--seq", type=int, default=512, help="bytes per window")
    parser.add_argument("--schemes", default="int8,int4-b32,int4-b64,int4-b128",
                        help="weight schemes, as in the precision rows (fp16-SCHEME)")
    parser.add_argument("--device", default="auto", help="cuda, cpu or auto")
    parser.add_argument("--json", metavar="PATH", help="write the figures as JSON")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    import torch

    from export.quantize import QuantizeError, check_quantization, fake_quantize, quantized_layers
    from models.checkpoints import load_checkpoint
    from models.graph_metadata import QuantizationRecord
    from models.precision import precision
    from models.training import held_out_windows, read_corpus
    from runtime.provenance import script_command, write_result
    from train_reference import SKIP

    args = parse_args(argv)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    torch.backends.cuda.matmul.allow_tf32 = False  # the reference is float32
    model = load_checkpoint(args.checkpoint).model.float().to(device).eval()
    data = read_corpus(args.corpus, args.pattern, args.held_out_every, skip=SKIP).held_out
    windows = held_out_windows(data, args.seq, args.windows).to(device)

    @torch.inference_mode()
    def predictions(net) -> tuple[torch.Tensor, torch.Tensor]:
        logits = torch.cat([net(w[None, :-1])[0] for w in windows])  # (windows * seq, vocab)
        top2 = logits.topk(2, dim=-1)
        return top2.indices[:, 0], top2.values[:, 0] - top2.values[:, 1]

    reference, margin = predictions(model)
    targets = windows[:, 1:].flatten()
    report = {"checkpoint": args.checkpoint, "positions": int(targets.numel()),
              "float32_next_byte_accuracy": float((reference == targets).float().mean()),
              "float32_margin_median": float(margin.median()), "schemes": {}}
    print(f"{targets.numel():,} held-out positions; float32 predicts the next byte {report['float32_next_byte_accuracy']:.2%} "
          f"of the time; median top-2 margin {report['float32_margin_median']:.2f}")
    for name in args.schemes.split(","):
        row = precision(f"fp16-{name}")
        try:
            check_quantization(model, row)
        except QuantizeError as error:
            print(f"  {name:10} skipped: {error}")
            continue
        record = QuantizationRecord(row.scheme.name, row.block_size, "qdq", "absmax",
                                    tuple(quantized_layers(model, row)))
        candidate, _ = predictions(fake_quantize(model, record, torch.float16))
        agreement = float((candidate == reference).float().mean())
        report["schemes"][name] = {"top1_agreement": agreement,
                                   "next_byte_accuracy": float((candidate == targets).float().mean())}
        print(f"  {name:10} top-1 agreement with float32 {agreement:.2%}; next-byte accuracy "
              f"{report['schemes'][name]['next_byte_accuracy']:.2%}", flush=True)
    if args.json:
        write_result(args.json, report, script_command(argv), vars(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
