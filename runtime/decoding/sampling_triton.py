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
                  BLOCK: tl.constexpr):
    row = tl.program_id(0)
    ids = tl.arange(0, BLOCK)
    inside = ids < vocab
    pointers = logits_ptr + row * stride + ids
    temperature = tl.load(temperature_ptr + row)
    counter = tl.load(counter_ptr + row)
    if temperature > 0:
        # the kept set: logits at or above the k-th largest, found by bisecting on order-preserving
        # keys (the largest t with at least k keys >= t, bit by bit), which needs no sort. Only the
        # keys live through the 32 passes: with the logits and the noise held too, a 32k-token row
        # spilled out of registers and every pass read it back from local memory. The logits are
        # read again afterwards (from L2).
        kept = tl.load(kept_ptr + row).to(tl.int32)
        threshold = tl.zeros((), dtype=tl.uint32)
        if kept < vocab:
            order = _order(tl.load(pointers, mask=inside, other=float("-inf")).to(tl.float32))
            for bit in tl.static_range(31, -1, -1):
                candidate = threshold | _u32(1 << bit)
                enough = tl.sum((order >= candidate).to(tl.int32), 0) >= kept
                threshold = tl.where(enough, candidate, threshold)
        logits = tl.load(pointers, mask=inside, other=float("-inf")).to(tl.float32)
        key = _mix(tl.load(key_ptr + row).to(tl.uint32) + counter.to(tl.uint32) * _u32(0x9E3779B9))
        bits = _mix(_mix(key + ids.to(tl.uint32) * _u32(0x85EBCA6B)) ^ key)
        uniform = ((bits >> 8).to(tl.float32) + 0.5) * (1.0 / 16777216.0)
        gumbel = -tl.log(-tl.log(uniform))
        scaled = tl.where(inside & (_order(logits) >= threshold), logits / temperature + gumbel, float("-inf"))
        tl.store(out_ptr + row, tl.argmax(scaled, 0, tie_break_left=True).to(tl.int64))
    else:
        logits = tl.load(pointers, mask=inside, other=float("-inf")).to(tl.float32)
        tl.store(out_ptr + row, tl.argmax(logits, 0, tie_break_left=True).to(tl.int64))
    tl.store(counter_ptr + row, counter + 1)


@triton.jit
def threshold_kernel(logits_ptr, stride, kept_ptr, temperature_ptr, threshold_ptr, vocab, BLOCK: tl.constexpr):
    """choose_kernel's filter alone: each sampled row's threshold key (0 keeps every logit)."""
    row = tl.program_id(0)
    kept = tl.load(kept_ptr + row).to(tl.int32)
    threshold = tl.zeros((), dtype=tl.uint32)
    if tl.load(temperature_ptr + row) > 0:
        if kept < vocab:
            ids = tl.arange(0, BLOCK)
            order = _order(tl.load(logits_ptr + row * stride + ids, mask=ids < vocab, other=float("-inf")).to(tl.float32))
            for bit in tl.static_range(31, -1, -1):
                candidate = threshold | _u32(1 << bit)
                enough = tl.sum((order >= candidate).to(tl.int32), 0) >= kept
                threshold = tl.where(enough, candidate, threshold)
    tl.store(threshold_ptr + row, threshold.to(tl.int32, bitcast=True))


@triton.jit
def pick_kernel(logits_ptr, stride, threshold_ptr, temperature_ptr, key_ptr, counter_ptr, out_ptr, vocab,
                BLOCK: tl.constexpr):
    """choose_kernel after threshold_kernel: the noise, both argmaxes and the counter's advance."""
    row = tl.program_id(0)
    ids = tl.arange(0, BLOCK)
    inside = ids < vocab
    logits = tl.load(logits_ptr + row * stride + ids, mask=inside, other=float("-inf")).to(tl.float32)
    temperature = tl.load(temperature_ptr + row)
    counter = tl.load(counter_ptr + row)
    if temperature > 0:
        threshold = tl.load(threshold_ptr + row).to(tl.uint32, bitcast=True)
        key = _mix(tl.load(key_ptr + row).to(tl.uint32) + counter.to(tl.uint32) * _u32(0x9E3779B9))
        bits = _mix(_mix(key + ids.to(tl.uint32) * _u32(0x85EBCA6B)) ^ key)
        uniform = ((bits >> 8).to(tl.float32) + 0.5) * (1.0 / 16777216.0)
        gumbel = -tl.log(-tl.log(uniform))
        scaled = tl.where(inside & (_order(logits) >= threshold), logits / temperature + gumbel, float("-inf"))
        tl.store(out_ptr + row, tl.argmax(scaled, 0, tie_break_left=True).to(tl.int64))
    else:
        tl.store(out_ptr + row, tl.argmax(logits, 0, tie_break_left=True).to(tl.int64))
    tl.store(counter_ptr + row, counter + 1)
