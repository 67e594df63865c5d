"""--gpus: its forms, the refusal of a GPU the machine lacks, and the instance group it writes."""
from __future__ import annotations

import pytest

from runtime.serving.gpus import ALL, GpuSelectionError, instance_group, parse_gpus, resolve_gpus


@pytest.mark.parametrize("text, selection", [("all", ALL), ("1", (0,)), ("3", (0, 1, 2)), ("0,2", (0, 2)),
                                             ("device=2", (2,)), (" device=3,1 ", (3, 1))])
def test_the_forms_of_a_selection(text, selection):
    assert parse_gpus(text) == selection


@pytest.mark.parametrize("text", ["", "0", "65", "-1", "a", "0,0", "device=", "device=x", "1,-2", "2.5"])
def test_malformed_selections_are_refused(text):
    with pytest.raises(GpuSelectionError, match="--gpus"):
        parse_gpus(text)


def test_a_bare_zero_points_at_device_0():
    with pytest.raises(GpuSelectionError, match="--gpus 0 is a count of no GPUs .*; for GPU 0 alone write device=0"):
        parse_gpus("0")


def test_resolving_against_the_machine():
    assert resolve_gpus(ALL, 2) == (0, 1) and resolve_gpus((1,), 2) == (1,)
    with pytest.raises(GpuSelectionError, match=r"--gpus names GPU 2, but this machine has 2 \(ids 0 to 1\)"):
        resolve_gpus((0, 2), 2)
    with pytest.raises(GpuSelectionError, match="this machine has none that PyTorch can see; drop --gpus"):
        resolve_gpus(ALL, 0)


def test_the_instance_group_is_today_s_without_a_selection():
    assert instance_group(None, 2) == {"count": 2, "kind": "KIND_CPU"}
    assert instance_group((0, 3), 1) == {"count": 1, "kind": "KIND_GPU", "gpus": [0, 3]}
    assert instance_group(ALL, 1) == {"count": 1, "kind": "KIND_GPU"}


def test_each_gpu_gets_its_own_decode_process_that_sees_that_gpu_alone(tiny_static_onnx):
    """Instances on one GPU share a decode process; another GPU starts another, whose
    CUDA_VISIBLE_DEVICES names its GPU (ONNX Runtime on the CPU stands in for the decoder)."""
    from pathlib import Path

    from runtime.serving.limits import Limits
    from runtime.serving.scheduler import Scheduler

    limits = Limits(max_rows=1)
    first = Scheduler.in_process(Path(tiny_static_onnx), "onnxruntime", limits, gpu=0)
    same = Scheduler.in_process(Path(tiny_static_onnx), "onnxruntime", limits, gpu=0)
    other = Scheduler.in_process(Path(tiny_static_onnx), "onnxruntime", limits, gpu=1)
    try:
        assert first.pid == same.pid != other.pid
        for scheduler, gpu in ((first, "0"), (other, "1")):
            environment = Path(f"/proc/{scheduler.pid}/environ").read_bytes().split(b"\0")
            assert f"CUDA_VISIBLE_DEVICES={gpu}".encode() in environment
    finally:
        for scheduler in (first, same, other):
            scheduler.close(1.0)


def test_a_gpu_id_counts_among_the_gpus_the_server_sees(monkeypatch):
    from runtime.serving.scheduler import visible_device

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert visible_device(1) == "1"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2, 3")
    assert (visible_device(0), visible_device(1)) == ("2", "3")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-8f3a")
    assert visible_device(0) == "GPU-8f3a"
