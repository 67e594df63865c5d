"""The Triton kernel behind sampling_kernel.fused_choose (imports Triton: load it lazily).

One program per row holds the whole row. All integer work is 32-bit: the hash's products wrap
modulo 2**32, which is what `sampling._mix`'s int64 arithmetic masked to 32 bits computes, and
64-bit multiplies are emulated (slow) on the GPU.
"""
import triton
import triton.language as tl


@triton.jit
def _u32(value: tl.constexpr):
    """A uint32 constant (literals above 2**31 - 1 would otherwise widen the arithmetic to 64 bits)."""
    signed: tl.constexpr = value - (1 << 32) if value >= (1 << 31) else value
    return tl.full((), signed, tl.int32).to(tl.uint32, bitcast=True)


@triton.jit
def _mix(x):
    x = x ^ (x >> 16)
    x = x * _u32(0x7FEB352D)
    x = x ^ (x >> 15)
    x = x * _u32(0x2C1B3C6D)
    return x ^ (x >> 16)


@triton.jit
def _order(logits):
    """Order-preserving 32-bit keys of float32 logits."""
    raw = logits.to(tl.uint32, bitcast=True)
    return tl.where((raw >> 31) != 0, ~raw, raw | _u32(0x80000000))


@triton.jit
def choose_kernel(logits_ptr, stride, kept_ptr, temperature_ptr, key_ptr, counter_ptr, out_ptr, vocab,
                  BLOCK: tl.constexpr, CHUNK: tl.constexpr):
    row = tl.program_id(0)
    temperature = tl.load(temperature_ptr + row)
    counter = tl.load(counter_ptr + row)
    sampled = temperature > 0
    # the kept set: logits at or above the k-th largest, found by bisecting on order-preserving
    # keys (the largest t with at least k keys >= t, bit by bit), which needs no sort; only the keys
    # are live through the 32 passes (threshold 0 keeps every logit)
    kept = tl.load(kept_ptr + row).to(tl.int32)
    threshold = tl.zeros((), dtype=tl.uint32)
    if sampled:
        if kept < vocab:
            ids = tl.arange(0, BLOCK)
            order = _order(tl.load(logits_ptr + row * stride + ids, mask=ids < vocab, other=float("-inf")).to(tl.float32))
            for bit in tl.static_range(31, -1, -1):
                candidate = threshold | _u32(1 << bit)
                enough = tl.sum((order >= candidate).to(tl.int32), 0) >= kept
                threshold = tl.where(enough, candidate, threshold)
    key = _mix(tl.load(key_ptr + row).to(tl.uint32) + counter.to(tl.uint32) * _u32(0x9E3779B9))
    # then the argmax (of the noisy, filtered logits when sampled) a chunk at a time: the whole row's
    # noise at once spilled out of registers. A later chunk wins only when strictly larger, so the
    # first of tied maxima wins, as one argmax over the row picks.
    best = tl.full((), float("-inf"), tl.float32)
    chosen = tl.zeros((), dtype=tl.int32)
    for start in tl.range(0, vocab, CHUNK):
        ids = start + tl.arange(0, CHUNK)
        inside = ids < vocab
        logits = tl.load(logits_ptr + row * stride + ids, mask=inside, other=float("-inf")).to(tl.float32)
        if sampled:
            bits = _mix(_mix(key + ids.to(tl.uint32) * _u32(0x85EBCA6B)) ^ key)
            uniform = ((bits >> 8).to(tl.float32) + 0.5) * (1.0 / 16777216.0)
            gumbel = -tl.log(-tl.log(uniform))
            logits = tl.where(inside & (_order(logits) >= threshold), logits / temperature + gumbel, float("-inf"))
        value, index = tl.max(logits, 0, return_indices=True, return_indices_tie_break_left=True)
        if value > best:  # an all -inf row keeps index 0, as one argmax gives
            best = value
            chosen = start + index
    tl.store(out_ptr + row, chosen.to(tl.int64))
    tl.store(counter_ptr + row, counter + 1)
