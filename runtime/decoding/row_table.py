"""Every decoder row's sampling settings on the device, written when a request joins its row.

The engine samples every row of every step from this one table (an idle row's pick is never read),
so rows stay in place as requests come and go: a join costs a few small device writes and a leave
none, where building the running rows' settings afresh whenever the batch changed cost five copies
to the device and a gather and scatter of the logits each step.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .sampling import RowSettings, row_kept
from .settings import GenerationSettings


class RowTable:
    def __init__(self, rows: int, vocab_size: int, device: torch.device):
        self.vocab_size = vocab_size
        self.settings = RowSettings(temperature=torch.zeros(rows, dtype=torch.float32, device=device),
                                    kept=torch.full((rows,), vocab_size, dtype=torch.int64, device=device),
                                    keys=torch.zeros(rows, dtype=torch.int64, device=device),
                                    counters=torch.zeros(rows, dtype=torch.int64, device=device), widest=0)
        self._mass = torch.ones(rows, dtype=torch.float64, device=device)  # top_p of each row
        self._rows: dict[int, tuple[int, bool]] = {}  # running row -> (kept count if sampled else 0, uses top_p)

    def join(self, rows: list[int], index: Tensor, fresh: RowSettings, settings: list[GenerationSettings]) -> None:
        """Requests with `settings` joined `rows` (`index`: the same rows on the device); `fresh`:
        their RowSettings as their first pick left them (counters already moved on)."""
        table = self.settings
        for name in ("temperature", "kept", "keys", "counters"):
            getattr(table, name).index_copy_(0, index, getattr(fresh, name))
        if fresh.top_p is None:
            self._mass.index_fill_(0, index, 1.0)
        else:
            self._mass.index_copy_(0, index, fresh.top_p)
        for row, setting in zip(rows, settings):
            sampled = setting.temperature > 0
            self._rows[row] = (row_kept(setting, self.vocab_size) if sampled else 0, sampled and setting.top_p < 1.0)
        self._refresh()

    def leave(self, rows: list[int]) -> None:
        for row in rows:
            self._rows.pop(row, None)
        self._refresh()

    def _refresh(self) -> None:
        self.settings.widest = max((kept for kept, _ in self._rows.values()), default=0)
        self.settings.top_p = self._mass if any(nucleus for _, nucleus in self._rows.values()) else None
