"""One request's generation settings, checked with errors that name their flag."""
from __future__ import annotations

import math
from dataclasses import dataclass

from .errors import DecodingError


def kept_count(filter_thres: float, vocab_size: int) -> int:
    """How many logits survive the top-k filter (at least one), float rounding as upstream."""
    return max(1, math.ceil((1.0 - filter_thres) * vocab_size))


@dataclass
class GenerationSettings:
    max_new_tokens: int = 64
    temperature: float = 0.0  # <= 0: greedy
    filter_thres: float = 0.9  # keep the top (1 - filter_thres) fraction of logits
    seed: int = 0
    eos_id: int | None = None
    top_k: int = 0  # keep at most this many logits; 0: no limit beyond filter_thres
    top_p: float = 1.0  # nucleus: keep the most likely tokens up to this probability mass; 1: all

    def check(self, vocab_size: int | None = None) -> None:
        """Sane values, each error naming its flag."""
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise DecodingError(f"--max-new-tokens must be at least 1, got {self.max_new_tokens}")
        if not math.isfinite(self.temperature):
            raise DecodingError(f"--temperature must be a finite number, got {self.temperature}")
        if not (math.isfinite(self.filter_thres) and 0.0 <= self.filter_thres < 1.0):
            raise DecodingError(f"--filter-thres must be in [0, 1), got {self.filter_thres}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise DecodingError(f"--top-k must be 0 (off) or a positive count, got {self.top_k}")
        if not (math.isfinite(self.top_p) and 0.0 < self.top_p <= 1.0):
            raise DecodingError(f"--top-p must be in (0, 1], got {self.top_p}")
        if not -2**63 <= self.seed < 2**63:
            raise DecodingError(f"--seed must fit in 64 bits, got {self.seed}")
        if self.eos_id is not None and vocab_size is not None and not 0 <= self.eos_id < vocab_size:
            raise DecodingError(f"--eos-id {self.eos_id} is outside the vocabulary 0..{vocab_size - 1}")
