"""The rotary Transformer: upstream parity, padding, caching, variants and seeded init."""
from __future__ import annotations

import pytest
import torch

from models.checkpoints import load_checkpoint
from models.config import ModelConfig
from models.transformer import build_model

SMALL = ModelConfig(num_tokens=50, dim=32, depth=2, dim_head=8, heads=4, kv_heads=2)


def ids_for(vocab: int, shape, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------- upstream parity

@pytest.mark.parametrize("override", [None, {"qkv": "fused"}], ids=["inferred", "fused"])
def test_upstream_checkpoint_parity(upstream_model, upstream_checkpoint, upstream_reference, override):
    loaded = load_checkpoint(upstream_checkpoint, override)
    assert loaded.layout == "upstream"
    assert loaded.model.config.qkv == (override or {}).get("qkv", "separate")
    assert not loaded.model.training
    for shape, seed in (((2, 23), 0), ((1, 1), 1), ((3, 64), 2)):
        ids = ids_for(64, shape, seed)
        want = upstream_reference(upstream_model, ids)
        with torch.no_grad():
            got = loaded.model(ids)
            got_masked = loaded.model(ids, torch.ones_like(ids))
        assert got.shape == want.shape == (*shape, 64)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
        torch.testing.assert_close(got_masked, want, atol=1e-5, rtol=0)


def test_upstream_inferred_config(upstream_checkpoint):
    config = load_checkpoint(upstream_checkpoint).model.config
    assert (config.num_tokens, config.dim, config.depth) == (64, 32, 2)
    assert (config.dim_head, config.heads, config.kv_heads) == (8, 4, 2)
    assert config.ff_expansion_factor == 4.0 and config.ff_hidden == 128
    assert config.theta == 10000.0
    assert config.norm == "rms" and config.rotary_pairing == "interleaved" and config.causal
    assert config.norm_eps == torch.finfo(torch.float32).eps


def test_upstream_inferred_config_other_shapes(tmp_path, upstream_reference):
    """No grouped-query heads, depth 3, expansion 2: nothing is a hard-coded default."""
    from native_sparse_attention_pytorch.transformer import Transformer as UpstreamTransformer

    torch.manual_seed(3)
    upstream = UpstreamTransformer(num_tokens=40, dim=24, depth=3, dim_head=6, heads=2,
                                   ff_expansion_factor=2.0).eval()
    path = tmp_path / "up.pt"
    torch.save(upstream.state_dict(), path)
    loaded = load_checkpoint(path)
    config = loaded.model.config
    assert (config.dim_head, config.heads, config.kv_heads, config.depth) == (6, 2, 2, 3)
    assert config.ff_expansion_factor == 2.0 and config.theta == 10000.0
    ids = ids_for(40, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(ids), upstream_reference(upstream, ids), atol=1e-5, rtol=0)


# --------------------------------------------------------------------------- padding and masks

def test_left_padding_matches_unpadded(tiny_model):
    vocab = tiny_model.config.num_tokens
    real = ids_for(vocab, (1, 9), seed=4)
    other = ids_for(vocab, (1, 13), seed=5)
    pad = 4
    padded = torch.cat((torch.full((1, pad), 7), real), dim=1)  # pad with a real token id, not 0
    ids = torch.cat((other, padded))
    mask = torch.ones_like(ids)
    mask[1, :pad] = 0
    with torch.no_grad():
        alone = tiny_model(real)
        other_alone = tiny_model(other)
        batch = tiny_model(ids, mask)
        unmasked = tiny_model(padded)
    torch.testing.assert_close(batch[1, pad:], alone[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(batch[0], other_alone[0], atol=1e-5, rtol=0)
    # without the mask the pad tokens change the result, so the mask is what made it equal
    assert (unmasked[0, pad:] - alone[0]).abs().max() > 1e-3


def test_fully_masked_row_stays_finite_and_isolated(tiny_model):
    vocab = tiny_model.config.num_tokens
    ids = ids_for(vocab, (2, 6), seed=6)
    mask = torch.ones_like(ids)
    mask[0] = 0
    with torch.no_grad():
        logits = tiny_model(ids, mask)
        second_alone = tiny_model(ids[1:])
    assert torch.isfinite(logits).all()
    torch.testing.assert_close(logits[1], second_alone[0], atol=1e-5, rtol=0)


def test_dropout_inactive_in_eval_active_in_train(tiny_config):
    model = build_model(tiny_config.replace(dropout=0.5), seed=0)
    ids = ids_for(tiny_config.num_tokens, (2, 12))
    assert not model.training
    with torch.no_grad():
        first, second = model(ids), model(ids)
    assert torch.equal(first, second)
    torch.testing.assert_close(first, build_model(tiny_config, seed=0)(ids).detach(), atol=1e-6, rtol=0)
    model.train()
    with torch.no_grad():
        assert (model(ids) - first).abs().max() > 1e-3  # dropout=0.5 is really wired in


# --------------------------------------------------------------------------- incremental decoding

VARIANTS = {
    "tiny-fused-rms-interleaved": {},
    "layer-norm": dict(norm="layer"),
    "half-pairing": dict(rotary_pairing="half"),
    "separate-qkv": dict(qkv="separate"),
    "mha-no-bias": dict(kv_heads=4, ff_bias=False),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_incremental_decoding_matches_full_forward(variant):
    model = build_model(SMALL.replace(**VARIANTS[variant]), seed=1)
    ids = ids_for(SMALL.num_tokens, (2, 10), seed=8)
    with torch.no_grad():
        full = model(ids)
        logits, cache = model(ids[:, :6], use_cache=True)
        steps = [logits]
        for t in range(6, 10):
            logits, cache = model(ids[:, t : t + 1], past_key_values=cache, use_cache=True)
            steps.append(logits)
    assert torch.isfinite(full).all() and full.shape == (2, 10, SMALL.num_tokens)
    assert len(cache) == SMALL.depth
    k, v = cache[0]
    assert k.shape == v.shape == (2, model.config.kv_heads, 10, SMALL.dim_head)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=0)


def test_incremental_decoding_with_left_padding():
    model = build_model(SMALL, seed=2)
    ids = ids_for(SMALL.num_tokens, (2, 9), seed=9)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    with torch.no_grad():
        full = model(ids, mask)
        logits, cache = model(ids[:, :5], mask[:, :5], use_cache=True)
        steps = [logits]
        for t in range(5, 9):
            logits, cache = model(ids[:, t : t + 1], mask[:, : t + 1], past_key_values=cache, use_cache=True)
            steps.append(logits)
    torch.testing.assert_close(torch.cat(steps, dim=1)[:, 3:], full[:, 3:], atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.cat(steps, dim=1)[1], full[1], atol=1e-5, rtol=0)


# --------------------------------------------------------------------------- variants

def test_separate_qkv_equals_fused_with_the_same_weights():
    fused = build_model(SMALL, seed=3)
    separate = build_model(SMALL.replace(qkv="separate"), seed=4)
    state = {}
    inner, kv_inner = SMALL.dim_inner, SMALL.dim_kv_inner
    for key, value in fused.state_dict().items():
        if key.endswith("attn.to_qkv.weight"):
            prefix = key.removesuffix("to_qkv.weight")
            state[prefix + "to_q.weight"] = value[:inner]
            state[prefix + "to_k.weight"] = value[inner : inner + kv_inner]
            state[prefix + "to_v.weight"] = value[inner + kv_inner :]
        else:
            state[key] = value
    separate.load_state_dict(state)
    ids = ids_for(SMALL.num_tokens, (2, 11))
    with torch.no_grad():
        torch.testing.assert_close(separate(ids), fused(ids), atol=1e-6, rtol=0)


def test_half_pairing_equals_interleaved_with_permuted_qk_features():
    """Pairs (2i, 2i+1) of the interleaved layout are pairs (i, i+d/2) of the half layout."""
    config = SMALL.replace(qkv="separate")
    interleaved = build_model(config, seed=5)
    half = build_model(config.replace(rotary_pairing="half"), seed=6)
    d = config.dim_head
    perm = torch.tensor([2 * j for j in range(d // 2)] + [2 * j + 1 for j in range(d // 2)])
    state = {}
    for key, value in interleaved.state_dict().items():
        if key.endswith(("to_q.weight", "to_k.weight")):
            value = value.unflatten(0, (-1, d))[:, perm].flatten(0, 1)
        state[key] = value
    half.load_state_dict(state)
    ids = ids_for(config.num_tokens, (2, 15))
    with torch.no_grad():
        want, got = interleaved(ids), half(ids)
        unpermuted = build_model(config.replace(rotary_pairing="half"), seed=5)(ids)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert (unpermuted - want).abs().max() > 1e-3


def test_layer_norm_variant():
    model = build_model(SMALL.replace(norm="layer"), seed=0)
    keys = set(model.state_dict())
    assert "norm.bias" in keys and "layers.0.attn.norm.bias" in keys
    norm = model.norm
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.5, 0.5)
        x = torch.randn(3, 5, SMALL.dim)
        want = torch.nn.functional.layer_norm(x, (SMALL.dim,), norm.weight, norm.bias, SMALL.norm_eps)
        torch.testing.assert_close(norm(x), want, atol=1e-6, rtol=0)
        ids = ids_for(SMALL.num_tokens, (1, 7))
        rms = build_model(SMALL, seed=0)
        assert torch.isfinite(model(ids)).all()
        assert (model(ids) - rms(ids)).abs().max() > 1e-4


def test_rms_norm_matches_torch_rmsnorm():
    model = build_model(SMALL, seed=0)
    norm = model.norm
    reference = torch.nn.RMSNorm(SMALL.dim, eps=SMALL.norm_eps)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        reference.weight.copy_(norm.weight)
        x = torch.randn(2, 4, SMALL.dim) * 3
        torch.testing.assert_close(norm(x), reference(x), atol=1e-6, rtol=1e-6)


def test_causality(tiny_model):
    """Changing a later token leaves earlier logits unchanged."""
    ids = ids_for(tiny_model.config.num_tokens, (1, 12), seed=12)
    changed = ids.clone()
    changed[0, 8] = (changed[0, 8] + 1) % tiny_model.config.num_tokens
    with torch.no_grad():
        a, b = tiny_model(ids), tiny_model(changed)
    torch.testing.assert_close(a[:, :8], b[:, :8], atol=1e-6, rtol=0)
    assert (a[:, 8:] - b[:, 8:]).abs().max() > 1e-4


# --------------------------------------------------------------------------- seeded init

def test_seeded_init_is_deterministic_and_seed_dependent(tiny_config):
    state = torch.random.get_rng_state()
    a, b, c = (build_model(tiny_config, seed=s).state_dict() for s in (0, 0, 1))
    assert torch.equal(torch.random.get_rng_state(), state)  # the global RNG is left alone
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    differing = [k for k in a if not torch.equal(a[k], c[k])]
    assert "token_emb.weight" in differing and any("to_qkv" in k for k in differing)
    assert not build_model(tiny_config).training


def test_half_precision_keeps_rotary_frequencies_float32(tiny_config):
    """Rounding the frequencies to fp16 shifts the angle at position ~1000 by ~0.5 rad; the
    layer-0 keys (no attention upstream of them) would then be off by ~5% of their scale."""
    model = build_model(tiny_config)
    half = build_model(tiny_config).half()
    assert half.inv_freq.dtype == torch.float32
    ids = torch.randint(0, tiny_config.num_tokens, (1, 1000), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        _, full = model(ids, use_cache=True)
        _, reduced = half(ids, use_cache=True)
    key, key_half = full[0][0], reduced[0][0].float()
    assert (key - key_half).abs().max() < 5e-3 * key.abs().max()
