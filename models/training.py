"""A byte-level reference training run, so quality figures (quantization, parity) can be measured on
a model whose predictions mean something: a randomly initialised model sits on near-ties, where any
rounding flips its argmax.

The corpus is a folder of text files read as UTF-8 bytes (one token per byte, as `generate`'s text
prompts). Files are split into training and held-out sets by a hash of their relative path, so the
split does not depend on the order files are listed in or on how many there are.
"""
from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from .errors import ToolkitError
from .transformer import Transformer


class TrainingError(ToolkitError):
    """A corpus or setting that cannot train the model."""


@dataclass(frozen=True)
class ByteCorpus:
    train: torch.Tensor  # uint8, the training files joined
    held_out: torch.Tensor  # uint8, the held-out files joined
    files: int
    held_out_files: list[str]


def is_held_out(relative_path: str, every: int) -> bool:
    """One file in `every` is held out, chosen by a hash of its path relative to the corpus root."""
    digest = hashlib.sha256(relative_path.encode()).digest()
    return int.from_bytes(digest[:4], "little") % every == 0


def read_corpus(root: str | Path, pattern: str = "*.py", held_out_every: int = 20,
                max_bytes: int | None = None, skip: tuple[str, ...] = ()) -> ByteCorpus:
    """Every file under `root` matching `pattern` (sorted, recursive) outside folders named in
    `skip`, split by `is_held_out`; the training part stops growing at `max_bytes`."""
    root = Path(root)
    if not root.is_dir():
        raise TrainingError(f"corpus folder not found: {root}")
    train, held, held_names, count = bytearray(), bytearray(), [], 0
    for path in sorted(root.rglob(pattern)):
        relative = path.relative_to(root).as_posix()
        if not path.is_file() or set(skip) & set(relative.split("/")[:-1]):
            continue
        try:
            data = path.read_bytes()
        except OSError:
            continue  # an unreadable file is not worth failing a corpus over
        count += 1
        if is_held_out(relative, held_out_every):
            held += data + b"\n"
            held_names.append(relative)
        elif max_bytes is None or len(train) < max_bytes:
            train += data + b"\n"
    if not train or not held:
        raise TrainingError(f"corpus {root} ({pattern}) has {count} files: too few to hold one in "
                            f"{held_out_every} out; give a larger folder or --held-out-every")
    as_tensor = lambda b: torch.frombuffer(bytearray(b), dtype=torch.uint8).clone()  # noqa: E731
    return ByteCorpus(as_tensor(train), as_tensor(held), count, held_names)


@dataclass(frozen=True)
class TrainingSettings:
    steps: int = 1000
    batch: int = 32
    seq: int = 512
    lr: float = 1e-3
    warmup: int = 100
    weight_decay: float = 0.1
    clip: float = 1.0
    seed: int = 0
    max_seconds: float | None = None  # stop early (and say so) past this wall-clock time


@dataclass
class TrainingResult:
    steps_done: int
    seconds: float
    tokens: int
    losses: list[tuple[int, float]] = field(default_factory=list)  # (step, training loss in nats/byte)
    stopped_early: bool = False


def batches(data: torch.Tensor, batch: int, seq: int, generator: torch.Generator) -> torch.Tensor:
    """`batch` random windows of seq + 1 bytes as int64 (inputs are [:, :-1], targets [:, 1:])."""
    if data.numel() <= seq + 1:
        raise TrainingError(f"the corpus has {data.numel()} bytes, fewer than one window of {seq + 1}")
    starts = torch.randint(0, data.numel() - seq - 1, (batch,), generator=generator)
    return torch.stack([data[s: s + seq + 1] for s in starts.tolist()]).long()


def learning_rate(step: int, settings: TrainingSettings) -> float:
    """Linear warm-up, then cosine decay to a tenth."""
    if step < settings.warmup:
        return settings.lr * (step + 1) / settings.warmup
    progress = (step - settings.warmup) / max(1, settings.steps - settings.warmup)
    return settings.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, progress))))


def train(model: Transformer, data: torch.Tensor, settings: TrainingSettings,
          progress: Callable[[int, float, float], None] | None = None) -> TrainingResult:
    """AdamW on next-byte prediction; bf16 autocast on CUDA. The model is left in eval mode."""
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(settings.seed)
    decay, rest = [], []  # weight decay on matrices, not on the embedding, norms and biases
    for name, parameter in model.named_parameters():
        (decay if parameter.dim() >= 2 and "token_emb" not in name else rest).append(parameter)
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": settings.weight_decay},
                                   {"params": rest, "weight_decay": 0.0}], lr=settings.lr, betas=(0.9, 0.95),
                                  fused=device.type == "cuda")
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    result, start = TrainingResult(0, 0.0, 0), time.perf_counter()
    model.train()
    for step in range(settings.steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, settings)
        window = batches(data, settings.batch, settings.seq, generator).to(device, non_blocking=True)
        with autocast:
            logits = model(window[:, :-1])
        loss = F.cross_entropy(logits.float().flatten(0, 1), window[:, 1:].flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), settings.clip)
        optimizer.step()
        result.steps_done, result.tokens = step + 1, (step + 1) * settings.batch * settings.seq
        last = step + 1 == settings.steps
        if step % 50 == 0 or last:
            value = float(loss.detach())
            result.losses.append((step, value))
            if progress:
                progress(step, value, time.perf_counter() - start)
        if settings.max_seconds is not None and time.perf_counter() - start > settings.max_seconds and not last:
            result.stopped_early = True
            break
    result.seconds = time.perf_counter() - start
    model.eval()
    return result


def held_out_windows(data: torch.Tensor, seq: int, windows: int) -> torch.Tensor:
    """Up to `windows` evenly spaced windows of seq + 1 bytes as int64 (windows, seq + 1); only
    whole windows, so none when the text is shorter than one."""
    stride = max(1, (data.numel() - seq - 1) // windows)
    starts = [index * stride for index in range(windows) if index * stride + seq + 1 <= data.numel()]
    return torch.stack([data[s: s + seq + 1] for s in starts]).long() if starts else torch.empty(0, seq + 1).long()


@torch.inference_mode()
def held_out_loss(model: Transformer, data: torch.Tensor, seq: int = 512, windows: int = 64) -> float:
    """Mean next-byte loss in bits per byte over `windows` evenly spaced windows of held-out text."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for window in held_out_windows(data, seq, windows).to(device):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(window[None, :-1])
        total += float(F.cross_entropy(logits.float()[0], window[1:], reduction="sum"))
        count += seq
    return total / count / math.log(2)
