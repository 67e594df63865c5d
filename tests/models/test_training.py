"""The reference trainer: a stable held-out split, a loss that falls, a checkpoint that loads."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

from models.checkpoints import load_checkpoint
from models.presets import preset
from models.training import (TrainingError, TrainingSettings, held_out_loss, is_held_out, learning_rate,
                             read_corpus, train)
from models.transformer import build_model

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
import train_reference  # noqa: E402


def write_corpus(root: Path, files: int = 40) -> Path:
    for index in range(files):
        folder = root / ("pkg" if index % 2 else "") / ("site-packages" if index % 7 == 0 else "")
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"module_{index}.py").write_text(f"def function_{index}(x):\n    return x + {index}\n" * 20)
    return root


def test_the_split_depends_on_the_path_alone(tmp_path):
    corpus = read_corpus(write_corpus(tmp_path / "a"), held_out_every=4)
    again = read_corpus(write_corpus(tmp_path / "b", files=60), held_out_every=4)
    assert corpus.held_out_files and set(corpus.held_out_files) <= set(again.held_out_files)
    assert all(is_held_out(name, 4) for name in corpus.held_out_files)
    assert corpus.train.numel() + corpus.held_out.numel() == sum(
        p.stat().st_size + 1 for p in (tmp_path / "a").rglob("*.py"))


def test_skipped_folders_are_left_out(tmp_path):
    root = write_corpus(tmp_path)
    everything = read_corpus(root, held_out_every=4)
    some = read_corpus(root, held_out_every=4, skip=("site-packages",))
    assert some.files == everything.files - 6  # indices 0, 7, ..., 35 sit in site-packages
    assert not any("site-packages" in name for name in some.held_out_files)


def test_a_corpus_too_small_or_missing_is_refused(tmp_path):
    with pytest.raises(TrainingError, match="corpus folder not found"):
        read_corpus(tmp_path / "nowhere")
    (tmp_path / "one.py").write_text("x = 1\n")
    with pytest.raises(TrainingError, match="1 files: too few"):
        read_corpus(tmp_path, held_out_every=4)


def test_the_learning_rate_warms_up_then_decays_to_a_tenth():
    settings = TrainingSettings(steps=100, warmup=10, lr=1.0)
    assert learning_rate(0, settings) == pytest.approx(0.1)
    assert learning_rate(10, settings) == pytest.approx(1.0)
    assert learning_rate(100, settings) == pytest.approx(0.1)


def test_training_lowers_the_held_out_loss(tmp_path):
    corpus = read_corpus(write_corpus(tmp_path), held_out_every=4)
    model = build_model(preset("tiny"), seed=0)
    before = held_out_loss(model, corpus.held_out, seq=32, windows=4)
    result = train(model, corpus.train, TrainingSettings(steps=40, batch=8, seq=32, warmup=5, lr=3e-3))
    after = held_out_loss(model, corpus.held_out, seq=32, windows=4)
    assert result.steps_done == 40 and not model.training
    assert before > 7.5 and after < 0.5 * before  # about log2(256) bits per byte, then far less
    assert result.losses[-1][1] < result.losses[0][1]


def test_the_script_writes_a_loadable_checkpoint_prompts_and_a_report(tmp_path):
    root = write_corpus(tmp_path / "corpus")
    out = tmp_path / "out"
    out.mkdir()
    argv = ["--preset", "tiny", "--corpus", str(root), "--held-out-every", "4",
            "--steps", "5", "--batch", "2", "--seq", "32", "--device", "cpu",
            "--output", str(out / "w.safetensors"), "--prompts", str(out / "p.json"),
            "--prompt-count", "3", "--prompt-bytes", "16", "--json", str(out / "r.json")]
    assert train_reference.main(argv) == 0
    loaded = load_checkpoint(out / "w.safetensors")
    assert loaded.model.config == preset("tiny")
    report = json.loads((out / "r.json").read_text())
    assert report["steps_done"] == 5 and report["checkpoint_sha256"] == loaded.sha256
    assert report["provenance"]["argv"][2:] == argv and report["provenance"]["settings"]["steps"] == 5
    assert math.isfinite(report["held_out_bits_per_byte"]["after"])
    prompts = json.loads((out / "p.json").read_text())
    assert len(prompts) == 3 and all(0 < len(p.encode()) <= 16 for p in prompts)
    assert sorted(p.name for p in out.iterdir()) == ["p.json", "r.json", "w.safetensors"]  # no staging leftovers


def test_the_script_refuses_a_missing_corpus_in_one_line(tmp_path, capsys):
    assert train_reference.main(["--corpus", str(tmp_path / "none"), "--output", str(tmp_path / "w")]) == 2
    assert capsys.readouterr().err.strip() == f"error: corpus folder not found: {tmp_path / 'none'}"
    assert not (tmp_path / "w").exists()


def test_the_script_refuses_an_output_it_cannot_write_before_training(tmp_path, capsys):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    missing = tmp_path / "no-such-folder" / "w.safetensors"
    assert train_reference.main(["--corpus", str(corpus), "--output", str(missing)]) == 2
    assert capsys.readouterr().err.strip() == (f"error: cannot write --output {missing}: directory {missing.parent} "
                                               "does not exist; create it or choose another --output")
    weights = tmp_path / "w.safetensors"
    assert train_reference.main(["--corpus", str(corpus), "--output", str(weights), "--json", str(weights)]) == 2
    assert "--json and --output both name" in capsys.readouterr().err
    assert not weights.exists()


def test_the_half_precision_probe_reports_every_case_with_bfloat16_coarser_than_float16(tmp_path, capsys):
    import half_precision_probe
    from models.checkpoints import save_checkpoint

    save_checkpoint(build_model(preset("tiny"), 0), tmp_path / "t.safetensors")
    argv = [str(tmp_path / "t.safetensors"), "--device", "cpu", "--json", str(tmp_path / "probe.json")]
    assert half_precision_probe.main(argv) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    written = json.loads((tmp_path / "probe.json").read_text())
    assert written["provenance"]["argv"][2:] == argv and len(written["cases"]) == 5
    assert [line.split(" {")[0] for line in lines] == ["embedding_norm", "1x513 random bytes", "3x128 random bytes",
                                                       "3x513 random bytes", "1x513 ascii", "3x128 ascii"]
    for line in lines[1:]:
        row = json.loads("{" + line.split(" {", 1)[1])
        half, brain = row["float16"][0][0], row["bfloat16"][0][0]
        assert 0 < half < brain < 0.05  # 10 against 7 mantissa bits, on a random tiny model
        assert 0 <= row["worst_position"]["token"] < 256
