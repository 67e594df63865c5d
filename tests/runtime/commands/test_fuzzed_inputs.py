"""A small seeded fuzzer: mutated graphs, sidecars and checkpoints must each end in a clean
`error:` line or a valid result; never a traceback, an internal error, a hang or a changed input.
Bounded: a fixed number of cases, each checked against a time limit."""
from __future__ import annotations

import faulthandler
import hashlib
import json
import sys
import time

import numpy as np
import pytest

from runtime.commands import check_parity

CASES = 24  # per file kind
SECONDS_PER_CASE = 20


def mutate(data: bytes, rng: np.random.Generator) -> bytes:
    """Truncate, flip bytes, or splice in garbage, as a damaged download or disk would."""
    kind = rng.integers(3)
    if kind == 0:
        return data[: int(rng.integers(0, len(data)))]
    buffer = bytearray(data)
    if kind == 1:
        for position in rng.integers(0, len(buffer), size=int(rng.integers(1, 16))):
            buffer[position] ^= int(rng.integers(1, 256))
        return bytes(buffer)
    position = int(rng.integers(0, len(buffer)))
    return bytes(buffer[:position]) + rng.bytes(int(rng.integers(1, 64))) + bytes(buffer[position:])


def mutate_json(text: str, rng: np.random.Generator) -> str:
    """Wrong JSON types in place of fields, or damaged bytes."""
    data = json.loads(text)
    if rng.integers(2) == 0:
        return mutate(text.encode(), rng).decode("utf-8", errors="replace")
    key = sorted(data)[int(rng.integers(len(data)))]
    data[key] = [None, 3, "x", [1], {"a": 1}, 1.5, True][int(rng.integers(7))]
    return json.dumps(data)


def run_case(argv: list[str], inputs: list, capsys) -> None:
    """One case: a clean verdict or one error line, within the time limit, inputs unchanged."""
    before = [hashlib.sha256(p.read_bytes()).hexdigest() for p in inputs]
    faulthandler.dump_traceback_later(SECONDS_PER_CASE * 3, exit=True, file=sys.__stderr__)  # a hang fails loudly
    started = time.monotonic()
    try:
        code = check_parity.main(argv)
    finally:
        faulthandler.cancel_dump_traceback_later()
    err = capsys.readouterr().err
    assert time.monotonic() - started < SECONDS_PER_CASE
    assert "Traceback" not in err and "internal error" not in err, err
    assert code in (0, 1, 2), (code, err)
    if code:
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("check-parity: error:"), err
    assert [hashlib.sha256(p.read_bytes()).hexdigest() for p in inputs] == before


@pytest.mark.parametrize("seed", range(CASES))
def test_mutated_graph(seed, tiny_past_onnx, tmp_path, capsys):
    rng = np.random.default_rng([7, seed])
    path = tmp_path / "mutated.onnx"
    path.write_bytes(mutate(tiny_past_onnx.read_bytes(), rng))
    run_case([str(path), "--batch", "1", "--seq", "1,5"], [path], capsys)


@pytest.mark.parametrize("seed", range(CASES))
def test_mutated_checkpoint(seed, tiny_model, tiny_past_onnx, tmp_path, capsys):
    from models.checkpoints import save_checkpoint

    rng = np.random.default_rng([11, seed])
    path = save_checkpoint(tiny_model, tmp_path / "ck.safetensors")
    path.write_bytes(mutate(path.read_bytes(), rng))
    run_case([str(tiny_past_onnx), "--checkpoint", str(path), "--batch", "1", "--seq", "1,5"], [path], capsys)


@pytest.mark.parametrize("seed", range(CASES))
def test_mutated_engine_sidecar(seed, tmp_path, capsys):
    from runtime.tensorrt.engine_files import Sidecar

    rng = np.random.default_rng([13, seed])
    engine = tmp_path / "model.engine"
    engine.write_bytes(rng.bytes(256))
    good = Sidecar(profiles=[{"input_ids": {"min": [1, 1], "opt": [1, 8], "max": [2, 16]}}], options={},
                   flavour="tensorrt", library_version="10.3.0", gpu_name="Orin", compute_capability="8.7",
                   onnx_sha256="ab" * 32, build_seconds=1.0, graph_metadata={"model_config": "{}"})
    sidecar = tmp_path / "model.engine.json"
    sidecar.write_text(mutate_json(good.to_json(), rng))
    run_case([str(engine), "--backend", "tensorrt"], [engine, sidecar], capsys)
