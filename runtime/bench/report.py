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


COLUMNS = (  # header, width, format, field
    ("open ms", 9, ".0f", "open_ms"), ("cold TTFT", 10, ".2f", "cold_ttft_ms"), ("TTFT ms", 9, ".2f", "ttft_ms"),
    ("prefill ms", 11, ".2f", "prefill_ms"), ("tok/s", 11, ".0f", "prefill_tokens_per_s"),
    ("TFLOP/s", 9, ".2f", "prefill_tflops"), ("x floor", 8, ".1f", "prefill_x_floor"),
    ("dec p50", 9, ".3f", "decode_p50_ms"), ("p90", 8, ".3f", "decode_p90_ms"), ("p99", 8, ".3f", "decode_p99_ms"),
    ("x floor", 8, ".1f", "decode_x_floor"), ("MiB", 8, ".0f", "memory_mib"),
)


def format_table(results: list) -> str:
    """One row per backend x batch x context; TTFT is prompt in to first token on the host, prefill
    computes logits at every prompt position, decode is per step."""
    width = max([28] + [len(r.backend) + 2 for r in results])
    lines = [f"{'backend':<{width}}{'batch':>6}{'ctx':>6}" + "".join(f"{h:>{w}}" for h, w, _, _ in COLUMNS)]
    for r in results:
        row = f"{r.backend:<{width}}{r.batch:>6}{r.context:>6}"
        if r.error:
            lines.append(f"{row}  skipped: {r.error}")
            continue
        lines.append(row + "".join(f"{'-' if getattr(r, f) is None else format(getattr(r, f), spec):>{w}}"
                                   for _, w, spec, f in COLUMNS))
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
