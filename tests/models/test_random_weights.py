"""Large presets: random weights written tensor by tensor into shards (never the whole model in
memory), a model too large for the machine refused before anything is built, and the counts."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from models.checkpoints import load_checkpoint
from models.config import ConfigError
from models.presets import PRESETS, parameter_count
from models.random_weights import random_tensors
from models.source import check_buildable
from models.transformer import build_model

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name", ["tiny", "small"])
def test_parameter_count_matches_the_built_model(name):
    assert parameter_count(PRESETS[name]) == sum(p.numel() for p in build_model(PRESETS[name]).parameters())


def test_the_large_presets_have_their_sizes():
    assert round(parameter_count(PRESETS["1b"]) / 1e9, 2) == 1.01
    assert round(parameter_count(PRESETS["7b"]) / 1e9, 2) == 5.90
    big = PRESETS["7b"]
    assert (big.dim, big.depth, big.heads, big.kv_heads) == (4096, 32, 32, 8)


def test_random_tensors_follow_the_default_initialisation_and_their_seed():
    tensors = dict(random_tensors(PRESETS["tiny"], seed=3))
    assert set(tensors) == set(build_model(PRESETS["tiny"]).state_dict())
    linear = tensors["layers.0.attn.to_out.weight"]
    assert linear.abs().max() <= 1 / PRESETS["tiny"].dim_inner ** 0.5
    assert torch.equal(tensors["norm.weight"], torch.ones_like(tensors["norm.weight"]))
    assert 0.8 < tensors["token_emb.weight"].std() < 1.2
    again = dict(random_tensors(PRESETS["tiny"], seed=3))
    other = dict(random_tensors(PRESETS["tiny"], seed=4))
    assert all(torch.equal(tensors[n], again[n]) for n in tensors)
    assert not torch.equal(tensors["token_emb.weight"], other["token_emb.weight"])


def test_the_script_writes_a_checkpoint_every_command_loads(tmp_path):
    out = subprocess.run([sys.executable, "scripts/write_preset.py", "tiny", str(tmp_path / "tiny"), "--dtype", "bf16",
                          "--max-shard-mib", "1"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    loaded = load_checkpoint(tmp_path / "tiny")
    assert loaded.model.config == PRESETS["tiny"]
    expected = dict(random_tensors(PRESETS["tiny"], seed=0, dtype=torch.bfloat16))
    assert torch.equal(loaded.model.state_dict()["norm.weight"], expected["norm.weight"].float())


def test_the_script_refuses_a_negative_seed_and_a_folder_without_the_room(tmp_path, monkeypatch, capsys):
    import shutil
    from collections import namedtuple

    sys.path.insert(0, str(ROOT / "scripts"))
    import write_preset

    assert write_preset.main(["tiny", str(tmp_path / "a"), "--seed", "-1"]) == 2
    assert "write_preset: error: --seed must be 0 or more, got -1" in capsys.readouterr().err
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(1 << 30, 1 << 30, 1 << 20))
    assert write_preset.main(["7b", str(tmp_path / "b"), "--dtype", "fp16"]) == 2
    assert f"GiB and {tmp_path} has 0.0 GiB free; choose another folder" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_a_model_too_large_for_the_machine_is_refused_before_it_is_built():
    check_buildable(PRESETS["small"], "small", memory_bytes=64 << 30)
    with pytest.raises(ConfigError, match=r"preset 7b has 5.9B parameters \(22 GiB in fp32\), more than half of "
                                          r"this machine's 24 GiB: write it as shards first"):
        check_buildable(PRESETS["7b"], "7b", memory_bytes=24 << 30)
