"""The candidate GEMV kernel, run by Triton's interpreter on the CPU: every configuration the
bandwidth script times computes weight @ vector, edges (N and K not multiples of the blocks)
included. The GPU suite checks the compiled kernel in fp16."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
ROOT = Path(__file__).resolve().parents[3]

SCRIPT = r"""
import torch
from runtime.bench.gemv_kernel import CONFIGS, gemv

torch.manual_seed(0)
worst = 0.0
for n, k in ((37, 300), (64, 1024), (5, 1500)):
    weight, vector = torch.randn(n, k), torch.randn(k)
    for config in {(c.block_n, c.block_k): c for c in CONFIGS}.values():
        worst = max(worst, (gemv(weight, vector, config) - weight @ vector).abs().max().item())
wide = torch.randn(6, 1600)
sliced = wide[:, 100:1600]  # row stride 1600, not K: the kernel must step rows by the stride
worst = max(worst, (gemv(sliced, vector) - sliced @ vector).abs().max().item())
out = torch.empty(1, 5)
row = gemv(weight, vector.view(1, -1), out=out)
assert row is out
print(worst, tuple(row.shape))
"""


def test_every_configuration_computes_the_product():
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    worst, shape = out.stdout.split(maxsplit=1)
    assert float(worst) < 1e-3
    assert shape.strip() == "(1, 5)"


def test_a_weight_not_row_major_a_vector_of_another_shape_and_a_wrong_out_are_refused():
    import torch

    from runtime.bench.gemv_kernel import gemv

    with pytest.raises(ValueError, match=r"row-major \[N, K\] weight.*\(4, 3\)"):
        gemv(torch.zeros(3, 4).t(), torch.zeros(3))
    with pytest.raises(ValueError, match=r"vector of K values.*\(2, 2\)"):
        gemv(torch.zeros(3, 4), torch.zeros(2, 2))
    with pytest.raises(ValueError, match=r"out must be a contiguous \(1, 3\) torch.float32 tensor on cpu; got \(3,\)"):
        gemv(torch.zeros(3, 4), torch.zeros(1, 4), out=torch.zeros(3))
