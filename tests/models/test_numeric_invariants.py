"""Numbers the mutation pass (scripts/mutation_pass.py) found no other CPU test pinning: the
half-precision attention that exports write (matmul + float32 softmax) against the fp32 model,
and the defined output of padding positions."""
from __future__ import annotations

import copy

import torch

from models.transformer import build_model


def test_float32_softmax_attention_keeps_the_causal_and_padding_mask(tiny_config):
    """fp16 graphs are exported through Attention's float32-softmax branch (use_float32_softmax),
    which eager fp32 never takes: a left-padded fp16 row must give the unpadded fp32 row's logits
    (within fp16 rounding, 1.3e-3 measured), and dropping the mask there moves them by ~0.6."""
    model = build_model(tiny_config, seed=0)
    half = copy.deepcopy(model).half().use_float32_softmax(True)
    generator = torch.Generator().manual_seed(0)
    real = torch.randint(0, tiny_config.num_tokens, (1, 12), generator=generator)
    pads = torch.randint(0, tiny_config.num_tokens, (1, 8), generator=generator)  # real ids as padding
    ids = torch.cat((pads, real), dim=1)
    mask = torch.ones_like(ids)
    mask[0, :8] = 0
    with torch.no_grad():
        reference = model(real)[0]
        alone = half(real)[0].float()
        padded = half(ids, mask)[0, 8:].float()
        unmasked = half(ids)[0, 8:].float()
    assert half.layers[0].attn.float32_softmax and reference.abs().max() > 1.0
    torch.testing.assert_close(alone, reference, atol=1e-2, rtol=0)  # causal mask kept
    torch.testing.assert_close(padded, reference, atol=1e-2, rtol=0)  # padding mask kept
    assert (unmasked - reference).abs().max() > 0.1  # the padding is visible without the mask


def test_padding_positions_get_no_attention_output(tiny_model):
    """A padding query has every key masked; its attention output is defined as zero (kernels
    disagree on uniform attention over masked keys, and parity compares every position), so
    its logits are those of the attention-free path: embedding, feed-forwards, norm, head."""
    vocab = tiny_model.config.num_tokens
    ids = torch.randint(0, vocab, (2, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    with torch.no_grad():
        logits = tiny_model(ids, mask)
        x = tiny_model.token_emb(ids[1:, :4])
        for layer in tiny_model.layers:
            x = x + layer.ff(x)
        attention_free = tiny_model.to_logits(tiny_model.norm(x))[0]
        attending = tiny_model(ids[1:, :4])[0]  # the same tokens as real ones: attention is not zero there
    torch.testing.assert_close(logits[1, :4], attention_free, atol=1e-5, rtol=0)
    assert (attending - attention_free).abs().max() > 1e-2
