"""Where triton-fused's decode loop spends the time its CUDA graph does not (7b, fp16, batch 1, random
weights from seed 0; a 200-token prompt, then about 200 steps): the engine's step timed with a
device synchronisation around it (how `benchmark` timed decode steps before commit 02b886f) and
back to back (mean), the decoder's step_and_pick and the id copy without the engine's Python, the
recorded step + pick graph on the GPU (CUDA events) and as the host sees it, and a profile of the
engine's host time. Its output on an H200 is docs/benchmarks/h200-1204e/decode-loop-overhead.txt.

Usage (GPU): PYTHONPATH=. python3 scripts/decode_loop_overhead.py
"""
import cProfile
import pstats
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    from models.presets import preset
    from models.transformer import Transformer
    from runtime.bench.measure import StepTimer
    from runtime.decoding.engine import Engine
    from runtime.decoding.fused_decoder import FusedDecoder
    from runtime.decoding.sampling import GREEDY
    from runtime.decoding.settings import GenerationSettings

    with torch.device("cuda"):
        torch.manual_seed(0)
        model = Transformer(preset("7b")).half().eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0, 0.02)
    decoder = FusedDecoder(model, 1088, "cuda", torch.float16)
    engine = Engine(decoder, prefill_tokens=2048)
    engine.warm_up()
    engine.submit([1] * 200, GenerationSettings(max_new_tokens=800))
    for _ in range(5):
        engine.step()
    torch.cuda.synchronize()

    timer = StepTimer(torch.device("cuda"))
    times = [timer(engine.step)[0] for _ in range(100)]
    print(f"StepTimer(engine.step) p50 {statistics.median(times) * 1e3:.3f} ms")
    started, steps = time.perf_counter(), 100
    for _ in range(steps):
        engine.step()
    print(f"engine.step back to back {(time.perf_counter() - started) / steps * 1e3:.3f} ms")

    pick, times = engine._pick(GREEDY), []
    for _ in range(100):
        started = time.perf_counter()
        _, ids = decoder.step_and_pick(engine._inputs, pick, GREEDY)
        engine._to_host(engine._copy_to_host(ids))
        times.append(time.perf_counter() - started)
    print(f"step_and_pick + to_host p50 {statistics.median(times) * 1e3:.3f} ms")

    graph, times = decoder.recorded.graphs[GREEDY][0], []
    for _ in range(100):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    print(f"recorded graph replay (events) p50 {statistics.median(times):.3f} ms")
    times = []
    for _ in range(100):
        started = time.perf_counter()
        graph.replay()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    print(f"recorded graph replay + synchronize wall p50 {statistics.median(times) * 1e3:.3f} ms")

    profile = cProfile.Profile()  # the engine's host time: the part before the replay is queued and after the ids are back
    profile.enable()
    for _ in range(100):
        engine.step()
    profile.disable()
    pstats.Stats(profile).sort_stats("tottime").print_stats(18)


if __name__ == "__main__":
    main()
