"""Where triton-fused's batch-1 step spends its time: the whole step replayed as its CUDA graph, then
its parts each recorded as a graph of their own (the products with their fused norms and epilogues,
the attention kernels), and a profiler's per-kernel GPU time over replays of the step.

With PDL (Hopper and later) it also times the step with every kernel launched plainly; --sweep times
each product's role under 16 launch configurations, --chunks the attention with other window chunks.

Usage: python3 scripts/profile_fused.py [--preset 7b] [--context 1024] [--window 1088] [--sweep]
       [--chunks 32,64,128] [--json PATH]
"""
from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hbm_bandwidth import graphed as record, timed_ms  # noqa: E402  (scripts/ is on the path when run as a script)


ROLES = {"qkv": (0, "x", "qkv", False), "out": (1, "attended", "x", True), "up": (2, "x", "hidden", False),
         "down": (3, "hidden", "x", True), "head": (None, "x", "logits", False)}  # role -> (layer index, in, out, residual)


def role_products(fused, index):
    return [fused.head] if index is None else [layer[index] for layer in fused.layers]


def roles(fused, at_context) -> dict:
    """Each role's products over every layer as one graph, as the step runs them (norm and epilogues
    fused) and as plain matrix-vector products of the same weights with the same launch settings."""
    from runtime.decoding.fused_decoder import launch_gemv

    found = {}
    for role, (index, vector, out, residual) in ROLES.items():
        products = role_products(fused, index)
        vector, out = getattr(fused, vector), getattr(fused, out)

        def as_fused():
            for product in products:
                fused._gemv(product, vector, out, residual)

        def plain():
            for product in products:
                launch_gemv(product.weight, vector, out, product.config)

        moved = sum(p.weight.numel() * p.weight.element_size() for p in products)
        fused_ms, plain_ms = timed_ms(record([at_context(as_fused)]), 50), timed_ms(record([at_context(plain)]), 50)
        found[role] = {"fused_ms": fused_ms, "plain_ms": plain_ms, "bytes": moved}
        print(f"  {role}: fused {fused_ms:.3f} ms, plain {plain_ms:.3f} ms ({moved / 1e9:.2f} GB)", flush=True)
    return found


def set_config(fused, index, config) -> None:
    """Launch the products of one role (layer index, or None: the head) with `config` from now on."""
    if index is None:
        fused.head = fused.head._replace(config=config)
    else:
        fused.layers = [layer[:index] + (layer[index]._replace(config=config),) + layer[index + 1:]
                        for layer in fused.layers]


def sweep(fused, at_context) -> dict:
    """Each product's role (qkv, out, up, down over every layer; the head) timed as one graph under
    each candidate launch configuration; the fastest is kept in `fused` for the rest of the run."""
    from runtime.decoding.fused_decoder import GemvConfig

    candidates = [GemvConfig(n, k, warps, 2) for n, k in ((1, 1024), (2, 1024), (4, 1024), (4, 2048), (8, 512),
                                                          (8, 1024), (16, 256), (16, 512)) for warps in (4, 8)]
    found = {}
    for role, (index, vector, out, residual) in ROLES.items():
        timings = {}
        for config in candidates:
            set_config(fused, index, config)

            def run(products=role_products(fused, index)):
                for product in products:
                    fused._gemv(product, getattr(fused, vector), getattr(fused, out), residual)

            timings[config] = timed_ms(record([at_context(run)]), 20)
        best = min(timings, key=timings.get)
        set_config(fused, index, best)
        found[role] = {"best": best._asdict(), "best_ms": timings[best],
                       "all": [{**c._asdict(), "ms": ms} for c, ms in timings.items()]}
        print(f"  {role}: fastest {tuple(best)} {timings[best]:.3f} ms, slowest {max(timings.values()):.3f} ms",
              flush=True)
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="7b")
    parser.add_argument("--context", type=int, default=1024, help="tokens in the row when the step is timed")
    parser.add_argument("--window", type=int, default=1088, help="the static cache's length")
    parser.add_argument("--sweep", action="store_true", help="time each product's role under 16 launch configurations")
    parser.add_argument("--chunks", type=lambda text: [int(c) for c in text.split(",")], default=[],
                        help="also time the attention kernels with these window chunks (e.g. 32,64,128,256)")
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args()

    import torch
    from torch.profiler import ProfilerActivity, profile

    from models.presets import preset
    from models.transformer import Transformer
    from runtime.bench.floors import peaks_for
    from runtime.decoding.fused_decoder import FusedDecoder

    config = preset(args.preset)
    with torch.device("cuda"):
        torch.manual_seed(0)
        model = Transformer(config).half().eval()  # random weights drawn on the GPU: only timing matters here
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0, 0.02)
    decoder = FusedDecoder(model, args.window, "cuda", torch.float16)
    fused = decoder.fused
    decoder.start({0: [1] * args.context})
    result = {"preset": args.preset, "context": args.context, "window": args.window}
    with torch.inference_mode():
        def at_context(run):
            def reset_then_run():
                fused.position.fill_(args.context)
                run()
            return reset_then_run

        def products():
            for qkv, out, up, down in fused.layers:
                fused._gemv(qkv, fused.x, fused.qkv)
                fused._gemv(out, fused.attended, fused.x, residual=True)
                fused._gemv(up, fused.x, fused.hidden)
                fused._gemv(down, fused.hidden, fused.x, residual=True)
            fused._gemv(fused.head, fused.x, fused.logits)

        def attention():
            for keys, values in fused.caches:
                fused._attention(keys, values)

        result["step_ms"] = timed_ms(record([at_context(fused.run)]), 50)
        result["products_ms"] = timed_ms(record([at_context(products)]), 50)
        result["attention_ms"] = timed_ms(record([at_context(attention)]), 50)
        result["pdl"] = fused.pdl
        if fused.pdl:  # the same step with every kernel launched plainly
            record([at_context(fused.run)])()
            logits = fused.logits.clone()
            fused.pdl = False
            replay = record([at_context(fused.run)])
            result["step_ms_without_pdl"] = timed_ms(replay, 50)
            replay()
            result["pdl_logits_max_abs_diff"] = (fused.logits - logits).abs().max().item()
            fused.pdl = True
            print(f"  without programmatic dependent launch: {result['step_ms_without_pdl']:.3f} ms "
                  f"(logits differ by {result['pdl_logits_max_abs_diff']:.3g})", flush=True)
        if args.chunks:
            from runtime.decoding.fused_decoder import FusedStep

            result["attention_ms_by_chunk"] = {}
            for chunk in args.chunks:
                other = FusedStep(decoder.module, chunk)
                other.pdl = fused.pdl
                other.qkv.copy_(fused.qkv)

                def attention_of(other=other):
                    for keys, values in other.caches:
                        other._attention(keys, values)

                other.position.fill_(args.context)
                result["attention_ms_by_chunk"][chunk] = timed_ms(record([attention_of]), 50)
            print("attention alone by chunk: " + ", ".join(f"{c}: {ms:.3f} ms" for c, ms in
                                                           result["attention_ms_by_chunk"].items()))
        result["roles"] = roles(fused, at_context)
        if args.sweep:
            result["sweep"] = sweep(fused, at_context)
            result["step_ms_after_sweep"] = timed_ms(record([at_context(fused.run)]), 50)
            print(f"step with each role's fastest configuration: {result['step_ms_after_sweep']:.3f} ms", flush=True)
        step = record([at_context(fused.run)])
        for _ in range(3):
            step()
        torch.cuda.synchronize()
        steps = 20
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                step()
            torch.cuda.synchronize()
    kernels = defaultdict(lambda: [0.0, 0])
    for event in prof.events():
        if event.device_type.name == "CUDA":
            kernels[event.name[:90]][0] += event.device_time_total / steps
            kernels[event.name[:90]][1] += 1
    result["kernels_us_per_step"] = {name: round(us, 1) for name, (us, _) in
                                     sorted(kernels.items(), key=lambda item: -item[1][0])}
    result["kernel_count_per_step"] = sum(count for _, count in kernels.values()) / steps
    result["gpu_busy_ms"] = sum(us for us, _ in kernels.values()) / 1e3
    weights = sum(p.numel() * p.element_size() for name, p in model.named_parameters() if "token_emb" not in name)
    kv = 2 * config.depth * config.kv_heads * config.dim_head * args.context * 2
    result["bytes_per_step"] = weights + kv
    peaks = peaks_for(torch.cuda.get_device_name())
    if peaks:
        result["fraction_of_datasheet"] = (weights + kv) / (result["step_ms"] * 1e-3) / peaks.bandwidth
    print(f"step {result['step_ms']:.3f} ms (products alone {result['products_ms']:.3f}, attention alone "
          f"{result['attention_ms']:.3f}); GPU busy {result['gpu_busy_ms']:.3f} ms in "
          f"{result['kernel_count_per_step']:.0f} kernels; {result.get('fraction_of_datasheet', 0):.1%} of the datasheet")
    for name, us in list(result["kernels_us_per_step"].items())[:12]:
        print(f"  {us:8.1f} us  {name}")
    if args.json:
        from runtime.provenance import script_command, write_result

        write_result(args.json, result, script_command(None), vars(args))
    decoder.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
