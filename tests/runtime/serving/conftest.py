"""The offline reference for the scheduler and server tests."""
from __future__ import annotations

import pytest


@pytest.fixture
def offline_tokens():
    """tokens(target, prompt, settings): offline `generate` of that prompt alone, the reference."""
    from runtime.decoding.generation import generate
    from runtime.decoding.open import open_decoder

    decoders = {}

    def tokens(target, prompt, settings):
        if target not in decoders:
            decoders[target] = open_decoder(target, "onnxruntime", rows=1)
        return generate(decoders[target], [prompt], settings).tokens[0]

    yield tokens
    for decoder in decoders.values():
        decoder.close()
