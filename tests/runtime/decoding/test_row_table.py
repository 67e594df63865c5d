"""The engine's table of every row's sampling settings: a row's picks from the table equal its picks
alone, and the batch-wide facts (the widest kept count, whether a nucleus row runs) follow joins and leaves."""
from __future__ import annotations

import torch

from runtime.decoding.row_table import RowTable
from runtime.decoding.sampling import RowSettings, choose, seed_key
from runtime.decoding.settings import GenerationSettings

VOCAB = 64


def test_packed_settings_hold_every_field_exactly():
    settings = [GenerationSettings(4, 0.7, 0.5, seed=2**63 - 1, top_p=0.3), GenerationSettings(4, 0.0, 0.9, seed=-5)]
    rows = RowSettings.of(settings, [3, 2**40], VOCAB, torch.device("cpu"))
    assert rows.temperature.dtype == torch.float32 and rows.temperature.tolist() == [torch.tensor(0.7).item(), 0.0]
    assert rows.keys.tolist() == [seed_key(2**63 - 1), seed_key(-5)] and rows.counters.tolist() == [3, 2**40]
    assert rows.kept.tolist() == [32, 7] and rows.widest == 32 and rows.top_p.tolist() == [0.3, 1.0]


def test_rows_picked_from_the_table_equal_their_picks_alone():
    table = RowTable(4, VOCAB, torch.device("cpu"))
    joined = {1: GenerationSettings(8, 0.9, 0.0, seed=1, top_k=5), 3: GenerationSettings(8, 1.1, 0.5, seed=2, top_p=0.8)}
    fresh = RowSettings.of(list(joined.values()), [0, 0], VOCAB, torch.device("cpu"))
    fresh.counters.add_(1)  # as the first pick left them
    table.join(list(joined), torch.tensor(list(joined)), fresh, list(joined.values()))
    logits = torch.randn(4, VOCAB, generator=torch.Generator().manual_seed(2))
    picked = choose(logits, table.settings)
    for row, setting in joined.items():
        alone = choose(logits[row:row + 1], RowSettings.of([setting], [1], VOCAB, torch.device("cpu")))
        assert int(picked[row]) == int(alone[0])
    assert table.settings.counters[[1, 3]].tolist() == [2, 2]


def test_the_widest_kept_count_and_the_nucleus_follow_the_running_rows():
    table, cpu = RowTable(3, VOCAB, torch.device("cpu")), torch.device("cpu")

    def join(row, setting):
        table.join([row], torch.tensor([row]), RowSettings.of([setting], [1], VOCAB, cpu), [setting])

    join(0, GenerationSettings(8, 0.0, 0.0))  # greedy: keeps nothing for the sampler
    assert table.settings.widest == 0 and table.settings.top_p is None
    join(1, GenerationSettings(8, 1.0, 0.5, top_p=0.9))
    join(2, GenerationSettings(8, 1.0, 0.0, top_k=40))
    assert table.settings.widest == 40 and table.settings.top_p.tolist() == [1.0, 0.9, 1.0]
    table.leave([1])
    assert table.settings.widest == 40 and table.settings.top_p is None
    table.leave([2])
    assert table.settings.widest == 0


def test_a_row_taken_over_from_a_nucleus_request_keeps_its_whole_distribution():
    """Row 0's nucleus request leaves and a plain sampled one joins it while row 1 still runs a
    nucleus: the table must not keep row 0's old top_p."""
    cpu = torch.device("cpu")
    table = RowTable(2, VOCAB, cpu)
    nucleus = [GenerationSettings(8, 1.0, 0.0, seed=1, top_p=0.2), GenerationSettings(8, 1.0, 0.0, seed=2, top_p=0.5)]
    table.join([0, 1], torch.tensor([0, 1]), RowSettings.of(nucleus, [1, 1], VOCAB, cpu), nucleus)
    table.leave([0])
    plain = GenerationSettings(8, 1.0, 0.0, seed=3)
    table.join([0], torch.tensor([0]), RowSettings.of([plain], [1], VOCAB, cpu), [plain])
    assert table.settings.top_p.tolist() == [1.0, 0.5]
    logits = torch.linspace(0.0, 8.0, VOCAB).expand(2, VOCAB)  # a leftover top_p of 0.2 would keep two tokens
    draws = {int(choose(logits, table.settings)[0]) for _ in range(200)}
    assert len(draws) > 4
