"""Checkpoint save/load: the project's safetensors format, and refusal of bad files."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from models.checkpoints import CheckpointError, load_checkpoint, save_checkpoint
from models.config import ModelConfig
from models.errors import ToolkitError
from models.transformer import build_model

SMALL = ModelConfig(num_tokens=40, dim=16, depth=2, dim_head=4, heads=4, kv_heads=2, norm="layer",
                    rotary_pairing="half", ff_expansion_factor=3.0, theta=5000.0)


def logits(model, seed=0):
    ids = torch.randint(0, model.config.num_tokens, (2, 9), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(ids)


def test_safetensors_round_trip(tmp_path):
    model = build_model(SMALL, seed=3)
    path = save_checkpoint(model, tmp_path / "model.safetensors")
    assert path == tmp_path / "model.safetensors"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]  # no temporary left
    loaded = load_checkpoint(path)
    assert loaded.layout == "project"
    assert loaded.model.config == SMALL
    assert loaded.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert not loaded.model.training
    assert torch.equal(logits(loaded.model), logits(model))
    # the config travels in the safetensors metadata
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        assert ModelConfig.from_json(handle.metadata()["config"]) == SMALL


def test_round_trip_of_the_tiny_preset(tmp_path, tiny_model):
    path = save_checkpoint(tiny_model, tmp_path / "tiny.safetensors")
    loaded = load_checkpoint(path)
    assert loaded.model.config == tiny_model.config
    assert torch.equal(logits(loaded.model, 1), logits(tiny_model, 1))


def test_config_override_changes_non_shape_fields(tmp_path):
    model = build_model(SMALL, seed=0)
    path = save_checkpoint(model, tmp_path / "m.safetensors")
    loaded = load_checkpoint(path, {"causal": False})
    assert loaded.model.config == SMALL.replace(causal=False)
    assert (logits(loaded.model) - logits(model)).abs().max() > 1e-4


def test_override_with_the_wrong_shapes_names_the_tensor(tmp_path):
    path = save_checkpoint(build_model(SMALL), tmp_path / "m.safetensors")
    with pytest.raises(CheckpointError, match=r"does not match its config: (token_emb|to_logits).weight has shape \(40, 16\), expected \(41, 16\)"):
        load_checkpoint(path, {"num_tokens": 41})
    with pytest.raises(CheckpointError, match="cannot build a model config.*unknown model config keys"):
        load_checkpoint(path, {"layers": 3})


def test_torch_saved_project_state_dict_needs_a_config(tmp_path):
    model = build_model(SMALL, seed=1)
    path = tmp_path / "weights.pt"
    torch.save({"state_dict": model.state_dict()}, path)  # a wrapped state_dict
    with pytest.raises(CheckpointError, match="carries no config"):
        load_checkpoint(path)
    loaded = load_checkpoint(path, SMALL.to_dict())
    assert torch.equal(logits(loaded.model), logits(model))
    (tmp_path / "config.json").write_text(SMALL.to_json())  # a sidecar config also works
    assert load_checkpoint(path).model.config == SMALL


def test_missing_file(tmp_path):
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(CheckpointError, match="checkpoint not found") as info:
        load_checkpoint(missing)
    assert str(missing) in str(info.value)
    assert isinstance(info.value, ToolkitError)


def test_directory_is_refused(tmp_path):
    with pytest.raises(CheckpointError, match="is a folder without model.safetensors.index.json"):
        load_checkpoint(tmp_path)


@pytest.mark.parametrize("prefix", [b"", b"\x80\x02", b"PK\x03\x04"], ids=["plain", "pickle-magic", "zip-magic"])
def test_random_bytes(tmp_path, prefix):
    path = tmp_path / "random.pt"
    path.write_bytes(prefix + np.random.default_rng(0).bytes(4096))
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        load_checkpoint(path)


@pytest.mark.parametrize("keep", [0.5, 0.999, 20, 5])
def test_truncated_safetensors(tmp_path, keep):
    good = save_checkpoint(build_model(SMALL), tmp_path / "good.safetensors")
    data = good.read_bytes()
    cut = int(len(data) * keep) if isinstance(keep, float) else keep
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(data[:cut])
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        load_checkpoint(bad)


def test_truncated_torch_save(tmp_path):
    path = tmp_path / "sd.pt"
    torch.save(build_model(SMALL).state_dict(), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        load_checkpoint(path)


def test_foreign_state_dict_names_expected_keys(tmp_path):
    path = tmp_path / "foreign.pt"
    torch.save({"encoder.weight": torch.zeros(4, 4), "decoder.bias": torch.zeros(4)}, path)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert "unrecognised checkpoint layout" in message
    for key in ("token_emb.weight", "layers.0.attn.norm.weight", "layers.0.0.to_q.weight", "encoder.weight"):
        assert key in message


def test_upstream_checkpoint_with_a_missing_tensor(tmp_path, upstream_model):
    state = dict(upstream_model.state_dict())
    del state["layers.1.1.3.weight"]
    path = tmp_path / "broken.pt"
    torch.save(state, path)
    with pytest.raises(CheckpointError):
        load_checkpoint(path)


def test_non_tensor_values_are_refused(tmp_path):
    path = tmp_path / "mixed.pt"
    torch.save({"token_emb.weight": torch.zeros(2, 2), "step": 3}, path)
    with pytest.raises(CheckpointError, match="expected a dict of tensors"):
        load_checkpoint(path)


class NotAStateDict:
    def __init__(self):
        self.weights = torch.zeros(3)



def _side_effect(path: str) -> dict:
    Path(path).write_text("unpickling ran code")
    return {}


class Malicious:
    """Unpickling this object calls _side_effect: what weights_only loading must never do."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (_side_effect, (str(self.path),))


@pytest.mark.parametrize("kind", ["custom-object", "full-module", "code-on-load"])
def test_pickled_objects_are_refused_by_weights_only(tmp_path, kind):
    path = tmp_path / f"{kind}.pt"
    marker = tmp_path / "marker.txt"
    if kind == "custom-object":
        torch.save(NotAStateDict(), path)
    elif kind == "full-module":
        torch.save(build_model(SMALL), path)
    else:
        torch.save(Malicious(marker), path)
    with pytest.raises(CheckpointError, match="weights_only=True") as info:
        load_checkpoint(path)
    assert "state_dict" in str(info.value)
    assert not marker.exists()


def test_weights_only_refusal_message_is_plain_text(tmp_path):
    path = tmp_path / "obj.pt"
    torch.save(NotAStateDict(), path)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    assert "\x1b" not in str(info.value)


def test_json_metadata_is_not_trusted_blindly(tmp_path):
    """A safetensors file whose stored config does not fit its tensors is refused, not half-loaded."""
    from safetensors.torch import save_file

    model = build_model(SMALL)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    path = tmp_path / "mismatch.safetensors"
    save_file(state, str(path), metadata={"format": "rotary-transformer",
                                          "config": json.dumps({**SMALL.to_dict(), "depth": 3})})
    with pytest.raises(CheckpointError, match="does not match its config: missing keys"):
        load_checkpoint(path)


def test_upstream_hidden_size_survives_inference(tmp_path, upstream_reference):
    from native_sparse_attention_pytorch.transformer import Transformer as UpstreamTransformer

    torch.manual_seed(0)
    upstream = UpstreamTransformer(num_tokens=16, dim=152, depth=1, dim_head=8, heads=2,
                                   ff_expansion_factor=8 / 3).eval()
    assert upstream.layers[0][1][1].weight.shape == (405, 152)
    path = tmp_path / "up.pt"
    torch.save(upstream.state_dict(), path)
    loaded = load_checkpoint(path)
    assert loaded.model.config.ff_hidden == 405
    ids = torch.randint(0, 16, (1, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(ids), upstream_reference(upstream, ids), atol=1e-5, rtol=0)


def _umask() -> int:
    import os

    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_written_files_honour_the_umask(tmp_path):
    path = save_checkpoint(build_model(SMALL), tmp_path / "m.safetensors")
    assert path.stat().st_mode & 0o777 == 0o666 & ~_umask()
