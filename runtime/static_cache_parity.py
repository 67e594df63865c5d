"""Parity of the static-cache decoder with PyTorch: prompt logits, teacher-forced decode steps
and greedy continuations, judged with the same tolerances as every other backend."""
from __future__ import annotations

import numpy as np
import torch

from models.transformer import Transformer

from .backends.torch_backend import TorchBackend
from .generation import GenerationSettings, Generator
from .generation_parity import GenerationParity, agreement, token_agreement
from .parity import TOLERANCES, Case, ParityReport, Tolerance, compare_outputs
from .static_cache import StaticCacheDecoder


def ragged_prompts(batch: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    """`batch` random prompts: the first `length` tokens long, the others shorter (ragged rows)."""
    rng = np.random.default_rng([seed, batch, length])
    lengths = [length] + [max(1, length * (batch - row) // (batch + 1)) for row in range(1, batch)]
    return [rng.integers(0, vocab, size=n).tolist() for n in lengths]


def _reference_logits(model: Transformer, rows: list[list[int]], device: str) -> list[np.ndarray]:
    with torch.inference_mode():
        return [model(torch.tensor([row], device=device))[0].float().cpu().numpy() for row in rows]


def check_static_cache(model: Transformer, make_decoder, batches: list[int], lengths: list[int], steps: int = 8,
                       precision: str = "float32", tolerance: Tolerance | None = None, seed: int = 0,
                       device: str = "cpu", progress=None) -> ParityReport:
    """For each batch x prompt length: prefill ragged prompts, then feed `steps` random tokens one
    by one; compare the prompt logits and every step's logits with PyTorch's full forward pass.
    `make_decoder(batch)` opens a StaticCacheDecoder."""
    tolerance = tolerance or TOLERANCES[precision]
    report = None
    vocab = model.config.num_tokens
    for batch in batches:
        with make_decoder(batch) as decoder:
            if report is None:
                report = ParityReport("torch", decoder.name, precision, tolerance)
            for length in lengths:
                if length + steps > decoder.max_cache:
                    continue
                case = Case(batch, length, padded=batch > 1)
                if progress:
                    progress(case)
                prompts = ragged_prompts(batch, length, vocab, seed)
                fed = np.random.default_rng([seed, batch, length, 1]).integers(0, vocab, size=(batch, steps))
                expected = _reference_logits(model, [p + fed[r].tolist() for r, p in enumerate(prompts)], device)
                logits = decoder.prefill(prompts).cpu().numpy()
                ref = np.concatenate([expected[r][: len(p)] for r, p in enumerate(prompts)])
                got = np.concatenate([logits[r, : len(p)] for r, p in enumerate(prompts)])
                report.results.append(compare_outputs(ref, got, tolerance, case, "logits (prompt)"))
                got_steps = []
                for j in range(steps):
                    step = decoder.step(torch.as_tensor(fed[:, j], device=decoder.device))
                    got_steps.append(step.clone().cpu().numpy())  # the decoder reuses its output buffer
                ref_steps = np.stack([[expected[r][len(p) + j] for j in range(steps)] for r, p in enumerate(prompts)])
                report.results.append(compare_outputs(ref_steps, np.stack(got_steps, axis=1), tolerance,
                                                      Case(batch, 1, padded=batch > 1, past=length),
                                                      f"logits ({steps} decode steps)"))
    return report


def compare_static_generation(model: Transformer, decoder: StaticCacheDecoder, prompts: list[list[int]],
                              new_tokens: int, device: str = "cpu", min_top1: float | None = None) -> GenerationParity:
    """Greedy tokens of PyTorch and the decoder, token by token; for half precision (`min_top1`)
    also the decoder's argmax when fed PyTorch's continuation (teacher forcing)."""
    settings = GenerationSettings(max_new_tokens=new_tokens, temperature=0.0)
    with TorchBackend(model, device=device, with_past=True) as reference:
        expected = Generator(reference).generate(prompts, settings, record_margins=True)
    actual = decoder.generate(prompts, settings)
    compared, matched, divergence = token_agreement(expected, actual)
    forced = None
    if min_top1 is not None:  # right-padded rows: position len(prompt) - 1 predicts the first new token
        predicted = decoder.prefill([p + t[:-1] for p, t in zip(prompts, expected.tokens)]).argmax(-1).cpu()
        forced = agreement([predicted[r, len(p) - 1: len(p) - 1 + len(t)]
                            for r, (p, t) in enumerate(zip(prompts, expected.tokens))], expected.tokens)
    return GenerationParity("torch", decoder.name, compared, matched, divergence, forced, min_top1)
