"""Sharded safetensors checkpoints: written one shard at a time, read lazily, loaded by every
--checkpoint; refusals for a missing shard, a shard that lacks a tensor, an index pointing outside
its folder, non-float weights and a corrupt index."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from models.checkpoints import CheckpointError, load_checkpoint, save_checkpoint, save_checkpoint_shards
from models.shards import INDEX_NAME, ShardedState

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def shards(tiny_model, tmp_path):
    return save_checkpoint_shards(tiny_model, tmp_path / "ck", max_shard_bytes=64 << 10)


def test_a_sharded_checkpoint_loads_the_same_weights(tiny_model, shards):
    files = sorted(p.name for p in shards.glob("*.safetensors"))
    assert len(files) > 3 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    index = json.loads((shards / INDEX_NAME).read_text())
    assert set(index["weight_map"]) == set(tiny_model.state_dict()) and index["metadata"]["total_size"] > 0
    loaded = load_checkpoint(shards)
    for name, tensor in tiny_model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[name], tensor), name
    assert loaded.model.config == tiny_model.config and loaded.layout == "project" and len(loaded.sha256) == 64
    assert not list(shards.parent.glob(".ck.partial-*"))


def test_tensors_are_read_only_when_asked(shards):
    state = ShardedState(shards)
    assert len(state) == len(json.loads((shards / INDEX_NAME).read_text())["weight_map"])
    assert isinstance(state["token_emb.weight"], torch.Tensor)


def test_the_script_shards_a_single_file_checkpoint_tensor_by_tensor(tiny_model, tmp_path):
    single = save_checkpoint(tiny_model, tmp_path / "one.safetensors")
    out = subprocess.run([sys.executable, "scripts/shard_checkpoint.py", str(single), str(tmp_path / "sharded"),
                          "--max-shard-mib", "1"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert load_checkpoint(tmp_path / "sharded").model.config == tiny_model.config
    again = subprocess.run([sys.executable, "scripts/shard_checkpoint.py", str(single), str(tmp_path / "sharded")],
                           cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert again.returncode == 2 and "already exists; choose a new folder" in again.stderr


def _edit_index(folder: Path, change) -> None:
    index = json.loads((folder / INDEX_NAME).read_text())
    change(index)
    (folder / INDEX_NAME).write_text(json.dumps(index))


def test_refusals_name_the_problem(shards, tmp_path):
    first = sorted(shards.glob("*.safetensors"))[0]
    cases = []
    outside = tmp_path / "outside"
    import shutil
    shutil.copytree(shards, outside)
    _edit_index(outside, lambda i: i["weight_map"].update({"norm.weight": "../ck/" + first.name}))
    cases.append((outside, "outside its folder"))
    missing = tmp_path / "missing"
    shutil.copytree(shards, missing)
    (missing / first.name).unlink()
    cases.append((missing, f"shard {first.name} that {INDEX_NAME} names is missing"))
    lying = tmp_path / "lying"
    shutil.copytree(shards, lying)
    other = sorted(lying.glob("*.safetensors"))[-1].name
    _edit_index(lying, lambda i: i["weight_map"].update({"token_emb.weight": other}))
    cases.append((lying, f"shard {other} does not hold 'token_emb.weight'"))
    corrupt = tmp_path / "corrupt"
    shutil.copytree(shards, corrupt)
    (corrupt / INDEX_NAME).write_text("{not json")
    cases.append((corrupt, "not a safetensors index"))
    bare = tmp_path / "bare"
    bare.mkdir()
    cases.append((bare, f"is a folder without {INDEX_NAME}"))
    for folder, words in cases:
        with pytest.raises(CheckpointError, match=words.replace("(", r"\(").replace(")", r"\)")):
            load_checkpoint(folder)


def test_integer_weights_are_refused(tiny_model, tmp_path):
    from models.shards import write_shards

    state = {name: t.clone() for name, t in tiny_model.state_dict().items()}
    state["norm.weight"] = torch.ones_like(state["norm.weight"], dtype=torch.int64)
    metadata = {"format": "rotary-transformer", "config": tiny_model.config.to_json()}
    folder = write_shards(state.items(), tmp_path / "ints", metadata)
    with pytest.raises(CheckpointError, match="norm.weight holds int64 values, not floating point"):
        load_checkpoint(folder)


def test_export_model_takes_a_sharded_checkpoint(shards, tmp_path, capsys):
    from runtime.commands.export_model import main

    assert main(["--checkpoint", str(shards), "--output", str(tmp_path / "m.onnx"), "--no-verify"]) == 0, \
        capsys.readouterr().err
    assert (tmp_path / "m.onnx").is_file()


def test_export_model_refuses_to_write_over_a_file_of_the_checkpoint_folder(shards, capsys):
    from runtime.commands.export_model import main

    shard = sorted(shards.glob("*.safetensors"))[0]
    before = shard.read_bytes()
    assert main(["--checkpoint", str(shards), "--output", str(shard), "--no-verify"]) == 2
    assert f"--output {shard} is a file of the --checkpoint folder" in capsys.readouterr().err
    assert shard.read_bytes() == before


def test_shards_get_the_permissions_of_any_new_file(shards):
    from models.files import new_file_mode

    assert {path.stat().st_mode & 0o777 for path in shards.iterdir()} == {new_file_mode()}


def test_non_finite_weights_are_named_by_every_reader(tiny_model, tmp_path, capsys):
    import copy

    from models.weights import NonFiniteWeights
    from runtime.commands.export_model import main

    broken = copy.deepcopy(tiny_model)
    with torch.no_grad():
        broken.layers[0].attn.to_out.weight[0, 0] = float("nan")
    folder = save_checkpoint_shards(broken, tmp_path / "nan", max_shard_bytes=64 << 10)
    with pytest.raises(NonFiniteWeights, match="tensor layers.0.attn.to_out.weight holds NaN or infinite values"):
        load_checkpoint(folder).model
    assert main(["--checkpoint", str(folder), "--output", str(tmp_path / "m.onnx"), "--no-verify"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("export-model: error: the weights' tensor layers.0.attn.to_out.weight holds NaN") and \
        "torch.onnx.export failed" not in err
    assert not (tmp_path / "m.onnx").exists()
