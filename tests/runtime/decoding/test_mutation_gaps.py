"""Static-cache decoder paths the mutation pass (scripts/mutation_pass.py) found no CPU test
exercising: a row that filled its whole window and was released must not disturb the rows that
keep decoding (every step still writes every row of the fixed-shape buffers)."""
from __future__ import annotations

import pytest
import torch

from export.onnx_export import build_portable_static_graph
from export.static_cache_graph import build_static_cache_graph
from runtime.decoding.static_cache import StaticCacheDecoder

WINDOW = 16


def last_logits(model, tokens: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return model(torch.tensor([tokens]))[0, -1]


@pytest.mark.parametrize("build", [build_static_cache_graph, build_portable_static_graph], ids=["gqa", "portable"])
def test_a_released_full_row_leaves_the_other_rows_decoding_exactly(tiny_model, build):
    data = build(tiny_model, WINDOW, "fp32").SerializeToString()
    history = {0: [1] * 10, 1: [3, 4, 5], 2: [8, 9]}
    with StaticCacheDecoder(data, 3, "cpu") as decoder:
        decoder.start(history)
        for step in range(WINDOW - 10):  # row 0 fills its window
            tokens = [7 + step, 9 + step, 11 + step]
            logits = decoder.step(torch.tensor(tokens))
            for index, row in enumerate(decoder.active):
                history[row].append(tokens[index])
                torch.testing.assert_close(logits[index], last_logits(tiny_model, history[row]), atol=1e-4, rtol=0)
        assert decoder.lengths[0] == WINDOW
        decoder.release([0])
        for step in range(4):  # the full row is gone; its buffer row is still written by every step
            tokens = [20 + step, 30 + step]
            logits = decoder.step(torch.tensor(tokens))
            for index, row in enumerate(decoder.active):
                history[row].append(tokens[index])
                torch.testing.assert_close(logits[index], last_logits(tiny_model, history[row]), atol=1e-4, rtol=0,
                                           msg=lambda m: f"row {row} after the release: {m}")
        decoder.start({0: [2, 3]})  # the slot is usable again, from position 0
        history[0] = [2, 3]
        logits = decoder.step(torch.tensor([4, 40, 41]))
        for index, (row, token) in enumerate(zip(decoder.active, [4, 40, 41])):
            history[row].append(token)
            torch.testing.assert_close(logits[index], last_logits(tiny_model, history[row]), atol=1e-4, rtol=0)
