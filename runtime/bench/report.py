"""How benchmark results are shown: the environment they came from, a table and a chart."""
from __future__ import annotations

import platform
from datetime import datetime, timezone

from models.errors import ToolkitError
from models.files import atomic_path


def environment() -> dict:
    import onnxruntime
    import torch

    cuda = torch.cuda.is_available()
    return {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "host": platform.node(),
            "device": torch.cuda.get_device_name(0) if cuda else f"CPU ({platform.processor() or platform.machine()})",
            "torch": torch.__version__, "cuda": torch.version.cuda if cuda else None,
            "onnxruntime": onnxruntime.__version__, "python": platform.python_version()}


def format_table(results: list) -> str:
    head = (f"{'backend':<28}{'batch':>6}{'ctx':>6}{'prefill ms':>11}{'tok/s':>11}{'TFLOP/s':>9}{'x floor':>8}"
            f"{'dec p50':>9}{'p90':>8}{'p99':>8}{'x floor':>8}{'MiB':>8}")
    lines = [head]

    def cell(value, width, spec):
        return f"{'-' if value is None else format(value, spec):>{width}}"

    for r in results:
        if r.error:
            lines.append(f"{r.backend:<28}{r.batch:>6}{r.context:>6}  skipped: {r.error}")
            continue
        lines.append(f"{r.backend:<28}{r.batch:>6}{r.context:>6}{cell(r.prefill_ms, 11, '.2f')}"
                     f"{cell(r.prefill_tokens_per_s, 11, '.0f')}{cell(r.prefill_tflops, 9, '.2f')}"
                     f"{cell(r.prefill_x_floor, 8, '.1f')}{cell(r.decode_p50_ms, 9, '.3f')}{cell(r.decode_p90_ms, 8, '.3f')}"
                     f"{cell(r.decode_p99_ms, 8, '.3f')}{cell(r.decode_x_floor, 8, '.1f')}{cell(r.memory_mib, 8, '.0f')}")
    return "\n".join(lines)


def plot(results: list, path: str, title: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ToolkitError("--plot needs matplotlib; pip install matplotlib (or the [plot] extra)") from None

    figure, axis = plt.subplots(figsize=(7, 4.5))
    series: dict[tuple[str, int], list] = {}
    for r in results:
        if r.decode_p50_ms is not None:
            series.setdefault((r.backend, r.batch), []).append((r.context, r.decode_p50_ms))
    for (backend, batch), points in sorted(series.items()):
        points.sort()
        axis.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=f"{backend} (batch {batch})")
    floors = sorted({(r.context, r.decode_floor_ms) for r in results if r.decode_floor_ms and r.batch == min(x.batch for x in results)})
    if floors:
        axis.plot([f[0] for f in floors], [f[1] for f in floors], "k--", label="bandwidth floor")
    axis.set_xlabel("context (tokens in cache)")
    axis.set_ylabel("decode latency p50 (ms/token)")
    axis.set_yscale("log")
    axis.set_title(title, fontsize=9)
    axis.grid(True, alpha=0.3)
    axis.legend(fontsize=7)
    figure.tight_layout()
    with atomic_path(path) as temporary:
        figure.savefig(temporary, format="png", dpi=120)
    plt.close(figure)
