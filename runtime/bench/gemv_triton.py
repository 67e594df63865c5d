"""The Triton kernel behind gemv_kernel.gemv (imports Triton: load it lazily)."""
import triton
import triton.language as tl


@triton.jit
def gemv_kernel(weight, vector, out, n, k, stride_n, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """out[rows] = weight[rows, :] @ vector for this program's BLOCK_N rows, in float32."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for start in range(0, k, BLOCK_K):
        cols = start + tl.arange(0, BLOCK_K)
        inside = (rows[:, None] < n) & (cols[None, :] < k)
        w = tl.load(weight + rows[:, None] * stride_n + cols[None, :], mask=inside, other=0.0)
        x = tl.load(vector + cols, mask=cols < k, other=0.0)
        acc += w.to(tl.float32) * x[None, :].to(tl.float32)
    tl.store(out + rows, tl.sum(acc, axis=1).to(out.dtype.element_ty), mask=rows < n)
