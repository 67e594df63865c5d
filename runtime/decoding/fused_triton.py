"""The Triton kernels behind fused_step (imports Triton: load it lazily).

Two kernels make a layer's decode step for one row, with a third to combine attention's chunks:
- `norm_gemv_kernel`: out = epilogue(W @ norm(x)). The pre-norm is folded into the product: the
  program reads all of x for its rows anyway, so it sums x and x*x in the same pass, reduces
  W @ (x * gamma) and applies the norm's scale (and LayerNorm's shift, through the precomputed
  W @ gamma and W @ beta) at the end. Epilogues: bias, GELU (erf), residual add.
- `attention_kernel`: for one key/value head and one chunk of the window, rotary on the query heads
  of its group and on the new key, the new key and value written into the cache (by the chunk that
  holds the position), and a flash-decoding pass over the chunk's keys; partial max, sum and output.
- `combine_kernel`: each query head's chunks combined into the attention output.
On Hopper and later GPUs the products are launched with programmatic dependent launch (PDL): each
lets the next launch early and waits for the one before only once it has read its first block of
weights, so that block loads while the kernel before drains. The attention kernels are launched
plainly; the combine lets the output projection launch as it starts.
LayerNorm's variance is E[x^2] - mean^2 in float32, which loses digits only where |mean| is hundreds of
times x's spread. Roundings follow the PyTorch model's: a linear layer's output is rounded to the model's dtype
before GELU or the residual add.
"""
import triton
import triton.language as tl


@triton.jit
def _accumulate(acc, total, squares, w, vector, gamma, cols, k, NORM: tl.constexpr):
    """One block of columns: acc += w * (x * gamma); with a norm, x's sum and sum of squares too."""
    inside = cols < k
    x = tl.load(vector + cols, mask=inside, other=0.0).to(tl.float32)
    if NORM != 0:
        total += x
        squares += x * x
        x = x * tl.load(gamma + cols, mask=inside, other=0.0).to(tl.float32)
    return acc + w.to(tl.float32) * x[None, :], total, squares


@triton.jit
def norm_gemv_kernel(weight, vector, out, gamma, gamma_row_sums, beta_products, bias, residual,
                     n, k, stride_n, eps,
                     NORM: tl.constexpr, HAS_BIAS: tl.constexpr, GELU: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr):
    if PDL:  # the next kernel may launch now; its programs wait (gdc_wait) for this one to complete
        tl.extra.cuda.gdc_launch_dependents()
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    total = tl.zeros((BLOCK_K,), dtype=tl.float32)
    squares = tl.zeros((BLOCK_K,), dtype=tl.float32)
    # the first block of weights is read before waiting for the kernel before (weights are never written), so with
    # PDL it streams in while that kernel finishes
    cols = tl.arange(0, BLOCK_K)
    w = tl.load(weight + rows[:, None] * stride_n + cols[None, :], mask=(rows[:, None] < n) & (cols[None, :] < k),
                other=0.0)
    if PDL:
        tl.extra.cuda.gdc_wait()
    acc, total, squares = _accumulate(acc, total, squares, w, vector, gamma, cols, k, NORM)
    for start in range(BLOCK_K, k, BLOCK_K):
        cols = start + tl.arange(0, BLOCK_K)
        w = tl.load(weight + rows[:, None] * stride_n + cols[None, :], mask=(rows[:, None] < n) & (cols[None, :] < k),
                    other=0.0)
        acc, total, squares = _accumulate(acc, total, squares, w, vector, gamma, cols, k, NORM)
    y = tl.sum(acc, axis=1)
    if NORM == 1:  # RMSNorm: x * rsqrt(mean(x^2) + eps) * gamma
        y = y * tl.rsqrt(tl.sum(squares, axis=0) / k + eps)
    if NORM == 2:  # LayerNorm: ((x - mean) * rstd) * gamma + beta
        mean = tl.sum(total, axis=0) / k
        variance = tl.maximum(tl.sum(squares, axis=0) / k - mean * mean, 0.0)
        shift = tl.load(gamma_row_sums + rows, mask=rows < n, other=0.0)
        y = (y - mean * shift) * tl.rsqrt(variance + eps) + tl.load(beta_products + rows, mask=rows < n, other=0.0)
    if HAS_BIAS:
        y += tl.load(bias + rows, mask=rows < n, other=0.0).to(tl.float32)
    if GELU:
        y = y.to(out.dtype.element_ty).to(tl.float32)
        y = 0.5 * y * (1.0 + tl.erf(y * 0.7071067811865476))
    if HAS_RESIDUAL:
        y = y.to(out.dtype.element_ty).to(tl.float32)
        y += tl.load(residual + rows, mask=rows < n, other=0.0).to(tl.float32)
    tl.store(out + rows, y.to(out.dtype.element_ty), mask=rows < n)


@triton.jit
def _rotary(angle_freqs, position, dims, HALF_PAIRING: tl.constexpr, D: tl.constexpr):
    """For the dims 0..D-1 of a head at `position`: the dim each one is paired with, and cos and
    signed sin of its angle, so that rotated = x * cos + x[partner] * sin (models/rotary.py). One
    angle per dim, shared by every head the program rotates."""
    if HALF_PAIRING:
        partner = (dims + D // 2) % D
        sign = tl.where(dims < D // 2, -1.0, 1.0)
        frequency = tl.load(angle_freqs + dims % (D // 2))
    else:
        partner = dims ^ 1
        sign = tl.where(dims % 2 == 0, -1.0, 1.0)
        frequency = tl.load(angle_freqs + dims // 2)
    angle = position.to(tl.float32) * frequency
    return partner, tl.cos(angle), sign * tl.sin(angle)


@triton.jit
def _rotated(base, heads, dims, partner, cos, sin):
    """The heads at base + heads (offsets, (G,) or scalar) rotated, float32 (G, D) or (D,)."""
    x = tl.load(base + heads + dims).to(tl.float32)
    other = tl.load(base + heads + partner).to(tl.float32)
    return x * cos + other * sin


@triton.jit
def _attend(q, k, v, valid, m, s, acc, scale, IEEE: tl.constexpr):
    """One block of cached keys and values folded into the running max, sum and output."""
    if IEEE:
        scores = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
    else:
        scores = tl.dot(q, tl.trans(k)) * scale  # (G, T)
    scores = tl.where(valid[None, :], scores, float("-inf"))
    new_m = tl.maximum(m, tl.max(scores, axis=1))
    correction = tl.exp(m - new_m)
    p = tl.exp(scores - new_m[:, None])
    s = s * correction + tl.sum(p, axis=1)
    if IEEE:
        acc = acc * correction[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
    else:
        acc = acc * correction[:, None] + tl.dot(p.to(v.dtype), v)
    return new_m, s, acc


@triton.jit
def attention_kernel(qkv, keys, values, position_ptr, inv_freq, part_max, part_sum, part_out, window, scale,
                     HEADS: tl.constexpr, KV_HEADS: tl.constexpr, D: tl.constexpr, GROUPS: tl.constexpr,
                     GROUPS_PAD: tl.constexpr, CHUNK: tl.constexpr, BLOCK_T: tl.constexpr,
                     HALF_PAIRING: tl.constexpr, IEEE: tl.constexpr):
    # Launched plainly, once the QKV product has completed: launched with PDL (waiting for the product after
    # loading the first block of keys and values), the 7b step took 4 % longer on the H200
    head = tl.program_id(0)  # the key/value head
    chunk = tl.program_id(1)
    chunks = tl.num_programs(1)
    position = tl.load(position_ptr)  # written by the step before: complete
    first = chunk * CHUNK
    if first <= position:
        dtype = keys.dtype.element_ty
        dims = tl.arange(0, D)
        cache = head * window * D
        last = tl.minimum(first + CHUNK, position)  # cached keys before the new one
        # the first block of cached keys and values (written by earlier steps) is loaded before the query is
        # rotated, so that it streams in meanwhile
        t = first + tl.arange(0, BLOCK_T)
        valid = t < last
        k = tl.load(keys + cache + t[:, None] * D + dims[None, :], mask=valid[:, None], other=0.0)
        v = tl.load(values + cache + t[:, None] * D + dims[None, :], mask=valid[:, None], other=0.0)
        partner, cos, sin = _rotary(inv_freq, position, dims, HALF_PAIRING, D)
        group = tl.arange(0, GROUPS_PAD)
        query_heads = group * KV_HEADS + head  # query head j reads key/value head j % KV_HEADS
        in_group = group < GROUPS
        q = _rotated(qkv, (tl.where(in_group, query_heads, 0) * D)[:, None], dims[None, :], partner[None, :],
                     cos[None, :], sin[None, :])
        q = tl.where(in_group[:, None], q, 0.0).to(dtype)  # (G, D)
        m = tl.full((GROUPS_PAD,), float("-inf"), dtype=tl.float32)
        s = tl.zeros((GROUPS_PAD,), dtype=tl.float32)
        acc = tl.zeros((GROUPS_PAD, D), dtype=tl.float32)
        if position < first + CHUNK:  # this chunk holds the new token: rotate and write its key and value
            k_new = _rotated(qkv + HEADS * D, head * D, dims, partner, cos, sin).to(dtype)
            v_new = tl.load(qkv + (HEADS + KV_HEADS) * D + head * D + dims)
            tl.store(keys + cache + position * D + dims, k_new)
            tl.store(values + cache + position * D + dims, v_new)
            m = tl.sum(q.to(tl.float32) * k_new.to(tl.float32)[None, :], axis=1) * scale
            s = tl.full((GROUPS_PAD,), 1.0, dtype=tl.float32)
            acc = tl.zeros((GROUPS_PAD, D), dtype=tl.float32) + v_new.to(tl.float32)[None, :]
        m, s, acc = _attend(q, k, v, valid, m, s, acc, scale, IEEE)
        for start in range(first + BLOCK_T, last, BLOCK_T):
            later = start + tl.arange(0, BLOCK_T)
            inside = later < last
            later_k = tl.load(keys + cache + later[:, None] * D + dims[None, :], mask=inside[:, None], other=0.0)
            later_v = tl.load(values + cache + later[:, None] * D + dims[None, :], mask=inside[:, None], other=0.0)
            m, s, acc = _attend(q, later_k, later_v, inside, m, s, acc, scale, IEEE)
        slot = query_heads * chunks + chunk  # partials laid out [query head, chunk]
        tl.store(part_max + slot, m, mask=in_group)
        tl.store(part_sum + slot, s, mask=in_group)
        tl.store(part_out + slot[:, None] * D + dims[None, :], acc, mask=in_group[:, None])


@triton.jit
def _combine(part_max, part_sum, part_out, out, head, chunks, used, CHUNKS_PAD: tl.constexpr, D: tl.constexpr):
    """Query head `head`'s first `used` chunks -> its attention output."""
    index = tl.arange(0, CHUNKS_PAD)
    live = index < used
    slot = head * chunks + index
    m = tl.load(part_max + slot, mask=live, other=float("-inf"))
    s = tl.load(part_sum + slot, mask=live, other=0.0)
    weight = tl.where(live, tl.exp(m - tl.max(m, axis=0)), 0.0)
    dims = tl.arange(0, D)
    o = tl.load(part_out + slot[:, None] * D + dims[None, :], mask=live[:, None], other=0.0)
    result = tl.sum(o * weight[:, None], axis=0) / tl.sum(s * weight, axis=0)
    tl.store(out + head * D + dims, result.to(out.dtype.element_ty))


@triton.jit
def combine_kernel(part_max, part_sum, part_out, position_ptr, out, CHUNK: tl.constexpr, CHUNKS: tl.constexpr,
                   CHUNKS_PAD: tl.constexpr, D: tl.constexpr, TRIGGER: tl.constexpr):
    if TRIGGER:  # the output projection launches now and loads its first weights while the chunks combine
        tl.extra.cuda.gdc_launch_dependents()
    _combine(part_max, part_sum, part_out, out, tl.program_id(0), CHUNKS, tl.load(position_ptr) // CHUNK + 1,
             CHUNKS_PAD, D)
