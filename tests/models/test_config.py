"""ModelConfig: JSON round trip and refusal of impossible or unknown configurations."""
from __future__ import annotations

import json

import pytest

from models.config import ConfigError, ModelConfig
from models.errors import ToolkitError
from models.presets import PRESETS, preset

BASE = dict(num_tokens=100, dim=48, depth=3, dim_head=12, heads=6, kv_heads=3)


def test_json_round_trip_with_non_default_values():
    config = ModelConfig(**BASE, ff_expansion_factor=2.5, causal=False, norm="layer", norm_eps=1e-5,
                         qkv="separate", rotary_pairing="half", theta=500000.0, ff_bias=False,
                         dropout=0.1, max_seq_len=2048)
    text = config.to_json()
    assert json.loads(text)["rotary_pairing"] == "half"
    again = ModelConfig.from_json(text)
    assert again == config
    assert ModelConfig.from_dict(config.to_dict()) == config
    assert again.to_json() == text


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_round_trip(name):
    assert ModelConfig.from_json(preset(name).to_json()) == preset(name)


def test_kv_heads_defaults_to_heads_and_derived_sizes():
    config = ModelConfig(num_tokens=10, dim=32, depth=1, dim_head=8, heads=4)
    assert config.kv_heads == 4
    assert config.dim_inner == 32 and config.dim_kv_inner == 32 and config.ff_hidden == 128
    gqa = ModelConfig(**BASE)
    assert gqa.dim_inner == 72 and gqa.dim_kv_inner == 36


def test_unknown_preset():
    with pytest.raises(ConfigError, match="unknown preset 'huge'.*small.*tiny"):
        preset("huge")


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(heads=6, kv_heads=4), r"heads \(6\) must be divisible by kv_heads \(4\)"),
        (dict(heads=4, kv_heads=8), r"heads \(4\) must be divisible by kv_heads \(8\)"),
        (dict(dim_head=15), "dim_head must be even"),
        (dict(norm="batch"), r"norm must be one of \('rms', 'layer'\), got 'batch'"),
        (dict(qkv="packed"), "qkv must be one of"),
        (dict(rotary_pairing="neox"), "rotary_pairing must be one of"),
        (dict(dim=0), "dim must be a positive integer"),
        (dict(depth=2.0), "depth must be a positive integer"),
        (dict(heads=True), "heads must be a positive integer"),
        (dict(dropout=1.0), r"dropout must be in \[0, 1\)"),
        (dict(theta=0.0), "theta must be positive"),
        (dict(norm_eps=0.0), "norm_eps must be positive"),
        (dict(ff_expansion_factor=-1.0), "ff_expansion_factor must be positive"),
        (dict(max_seq_len=0), "max_seq_len must be positive"),
    ],
)
def test_invalid_combinations_raise_config_error(changes, message):
    with pytest.raises(ConfigError, match=message) as info:
        ModelConfig(**{**BASE, **changes})
    assert isinstance(info.value, ToolkitError) and isinstance(info.value, ValueError)
    assert str(info.value).startswith("invalid model config: ")
    # the same problems are caught on the JSON path
    with pytest.raises(ConfigError, match=message):
        ModelConfig.from_dict({**BASE, **changes})


def test_all_problems_are_reported_together():
    with pytest.raises(ConfigError) as info:
        ModelConfig(**{**BASE, "dim_head": 7, "norm": "batch"})
    assert "dim_head must be even" in str(info.value) and "norm must be one of" in str(info.value)


def test_from_dict_unknown_keys_are_named():
    with pytest.raises(ConfigError, match=r"unknown model config keys \['n_layers', 'vocab'\]") as info:
        ModelConfig.from_dict({**BASE, "vocab": 3, "n_layers": 2})
    assert "num_tokens" in str(info.value)  # lists the known keys


def test_from_dict_missing_required_keys_and_wrong_types():
    with pytest.raises(ConfigError, match="incomplete model config.*num_tokens"):
        ModelConfig.from_dict({"dim": 8, "depth": 1})
    with pytest.raises(ConfigError, match="must be a JSON object, got list"):
        ModelConfig.from_dict([1, 2])


def test_from_json_rejects_invalid_json():
    with pytest.raises(ConfigError, match="not valid JSON"):
        ModelConfig.from_json("{dim: 3")


def test_replace_validates():
    config = ModelConfig(**BASE)
    assert config.replace(dim=64).dim == 64
    with pytest.raises(ConfigError, match="dim_head must be even"):
        config.replace(dim_head=3)
