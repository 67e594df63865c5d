"""What fraction of the GPU's datasheet bandwidth a batch-1 decode can reach at best: a device copy,
each matrix-vector product of a preset's step alone (PyTorch's cuBLAS choice, M = 1), and the whole
step's chain of them (every layer's weights, distinct buffers, replayed as one CUDA graph, no
attention, norms or sampling): what those kernels reach with nothing else in the step. Each
single GEMV is timed over one buffer again and again, so the smaller ones may be served partly
from L2; the chain is not.

`--triton` also measures a candidate Triton GEMV (runtime/bench/gemv_kernel.py): every one of its
configurations on each shape, over all of that shape's weights in turn (so not from L2) and
replayed as one CUDA graph (so not launch-bound), against cuBLAS timed the same way, then the
chain again with the fastest configuration of each shape.

Usage: python3 scripts/hbm_bandwidth.py [--preset 7b] [--iters 50] [--triton] [--json PATH]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def timed_ms(run, iters: int) -> float:
    """Median ms of `run()` over `iters` calls, each timed with CUDA events."""
    import torch

    times = []
    for _ in range(iters + 3):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times[3:])[iters // 2]


def measure(preset_name: str, iters: int, triton: bool = False) -> dict:
    import torch

    from models.presets import preset
    from runtime.bench.floors import matmul_shapes, peaks_for

    name = torch.cuda.get_device_name()
    if peaks_for(name) is None:
        raise SystemExit(f"hbm_bandwidth: no datasheet bandwidth is on record for {name} (runtime/bench/floors.py)")
    peak = peaks_for(name).bandwidth
    config = preset(preset_name)
    source = torch.empty(2 << 30, dtype=torch.uint8, device="cuda")
    target = torch.empty_like(source)
    copy_ms = timed_ms(lambda: target.copy_(source), iters)
    shapes = matmul_shapes(config)
    weights = [torch.randn(out, inp, dtype=torch.float16, device="cuda") * 0.01 for inp, out in shapes]
    vectors = {inp: torch.randn(1, inp, dtype=torch.float16, device="cuda") for inp, _ in shapes}
    single = {}
    for (inp, out), weight in zip(shapes[:4] + shapes[-1:], weights[:4] + weights[-1:]):
        ms = timed_ms(lambda: torch.nn.functional.linear(vectors[inp], weight), iters)
        single[f"{inp}x{out}"] = {"ms": ms, "fraction_of_peak": inp * out * 2 / (ms * 1e-3) / peak}
    cublas = [lambda inp=inp, weight=weight: torch.nn.functional.linear(vectors[inp], weight)
              for (inp, _), weight in zip(shapes, weights)]
    chain_ms = timed_ms(graphed(cublas), iters)
    chain_bytes = sum(inp * out * 2 for inp, out in shapes)
    result = {"device": name, "datasheet_bandwidth": peak, "preset": preset_name,
              "copy_gb_per_s": 2 * (2 << 30) / (copy_ms * 1e-3) / 1e9,
              "copy_fraction_of_peak": 2 * (2 << 30) / (copy_ms * 1e-3) / peak,
              "gemv": single, "chain_kernels": len(shapes), "chain_bytes": chain_bytes, "chain_ms": chain_ms,
              "chain_fraction_of_peak": chain_bytes / (chain_ms * 1e-3) / peak}
    if triton:
        try:
            result["triton"] = measure_triton(shapes, weights, vectors, peak, iters)
        except Exception as error:  # keep cuBLAS's figures when Triton cannot build or run the kernel
            result["triton"] = {"error": f"{type(error).__name__}: {error}"}
    return result


def graphed(calls: list):
    """`calls` captured once as a CUDA graph (run once before, so cuBLAS and Triton pick and
    compile outside the capture); returns its replay."""
    import torch

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())  # a new stream does not wait for work queued before
    with torch.cuda.stream(stream):
        for call in calls:
            call()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            for call in calls:
                call()
    torch.cuda.synchronize()
    return graph.replay


def measure_triton(shapes: list, weights: list, vectors: dict, peak: float, iters: int) -> dict:
    """Per shape: cuBLAS and every Triton configuration over all of that shape's weights in turn;
    then the chain with the fastest configuration of each shape."""
    import torch

    from runtime.bench.gemv_kernel import CONFIGS, gemv

    by_shape: dict[tuple, list] = {}
    for shape, weight in zip(shapes, weights):
        by_shape.setdefault(shape, []).append(weight)
    outs = {out: torch.empty(1, out, dtype=torch.float16, device="cuda") for _, out in shapes}
    per_shape, best = {}, {}
    for (inp, out), group in by_shape.items():
        moved = inp * out * 2 * len(group)

        def fraction(ms: float) -> float:
            return moved / (ms * 1e-3) / peak

        cublas_ms = timed_ms(graphed([lambda w=w: torch.nn.functional.linear(vectors[inp], w) for w in group]), iters)
        tried = {}
        for config in CONFIGS:  # each as one graph of the group, as the chain runs: launch costs left out
            calls = [lambda w=w, config=config: gemv(w, vectors[inp], config, outs[out]) for w in group]
            tried[config] = timed_ms(graphed(calls), max(iters // 5, 5))
        best[(inp, out)] = min(tried, key=tried.get)
        triton_ms = timed_ms(graphed([lambda w=w: gemv(w, vectors[inp], best[(inp, out)], outs[out]) for w in group]),
                             iters)
        per_shape[f"{inp}x{out}"] = {"weights": len(group), "cublas_fraction_of_peak": fraction(cublas_ms),
                                      "triton_fraction_of_peak": fraction(triton_ms),
                                      "triton_config": best[(inp, out)]._asdict(),
                                      "configs_ms": {"/".join(map(str, c)): ms / len(group) for c, ms in tried.items()}}
    calls = [lambda inp=inp, out=out, weight=weight: gemv(weight, vectors[inp], best[(inp, out)], outs[out])
             for (inp, out), weight in zip(shapes, weights)]
    chain_ms = timed_ms(graphed(calls), iters)
    chain_bytes = sum(inp * out * 2 for inp, out in shapes)
    return {"per_shape": per_shape, "chain_ms": chain_ms, "chain_fraction_of_peak": chain_bytes / (chain_ms * 1e-3) / peak}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="7b", help="whose matrix shapes (default 7b)")
    parser.add_argument("--iters", type=int, default=50, help="timed repetitions, median reported (default 50)")
    parser.add_argument("--triton", action="store_true",
                        help="also measure the candidate Triton GEMV (every configuration on each shape, then the chain)")
    parser.add_argument("--json", metavar="PATH", help="write the figures as JSON")
    args = parser.parse_args()
    result = measure(args.preset, args.iters, args.triton)
    print(f"{result['device']}: copy {result['copy_gb_per_s']:.0f} GB/s ({result['copy_fraction_of_peak']:.1%} "
          f"of the datasheet); {result['chain_kernels']} GEMVs of {args.preset} in one graph: "
          f"{result['chain_ms']:.3f} ms, {result['chain_fraction_of_peak']:.1%}")
    for shape, figures in result["gemv"].items():
        print(f"  {shape}: {figures['ms'] * 1e3:.1f} us, {figures['fraction_of_peak']:.1%}")
    if "triton" in result and "error" in result["triton"]:
        print(f"Triton GEMV not measured: {result['triton']['error']}")
    elif "triton" in result:
        found = result["triton"]
        print(f"Triton GEMV chain: {found['chain_ms']:.3f} ms, {found['chain_fraction_of_peak']:.1%}")
        for shape, figures in found["per_shape"].items():
            print(f"  {shape} x{figures['weights']}: cuBLAS {figures['cublas_fraction_of_peak']:.1%}, Triton "
                  f"{figures['triton_fraction_of_peak']:.1%} ({figures['triton_config']})")
    if args.json:
        from runtime.provenance import write_result

        write_result(args.json, result, sys.argv, vars(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
