"""Device functions shared by the kernels (Triton ``@jit`` helpers)."""

from __future__ import annotations

from mergesearch.merge.kernels._triton import jit, tl


@jit
def fmix32(h):
    """murmur3's 32-bit finaliser (``rng.fmix32``) on uint32 values."""
    h = h ^ (h >> 16)
    h = h * tl.cast(0x85EBCA6B, tl.uint32)
    h = h ^ (h >> 13)
    h = h * tl.cast(0xC2B2AE35, tl.uint32)
    return h ^ (h >> 16)


@jit
def uniform(index, k0, k1):
    """``rng.uniform_from_index``: float32 draws in [0, 1) for int64 element indices."""
    lo = index.to(tl.uint32)
    hi = (index >> 32).to(tl.uint32)
    h = fmix32(lo * tl.cast(0x9E3779B1, tl.uint32) + k0)
    h = fmix32(h ^ (hi * tl.cast(0x27D4EB2F, tl.uint32) + k1))
    return (h >> 8).to(tl.float32) * 5.9604644775390625e-08


@jit
def to_output(y, out_ptr):
    """float32 ``y`` in the element type of ``out_ptr``, rounded to nearest even as torch does.

    bfloat16 is rounded with integer ops (Triton's interpreter truncates float32 -> bfloat16).
    """
    if out_ptr.dtype.element_ty == tl.bfloat16:
        bits = y.to(tl.uint32, bitcast=True)
        rounded = (bits + tl.cast(0x7FFF, tl.uint32) + ((bits >> 16) & 1)) >> 16
        rounded = tl.where(y != y, tl.cast(0x7FC0, tl.uint32), rounded)
        return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return y.to(out_ptr.dtype.element_ty)


@jit
def store_checked(out_ptr, offs, y, inside, bad_ptr):
    """Store ``y`` (already in the output dtype); add its count of NaN/inf to ``*bad_ptr``."""
    tl.store(out_ptr + offs, y, mask=inside)
    yf = y.to(tl.float32)
    bad = tl.sum((((yf != yf) | (tl.abs(yf) == float("inf"))) & inside).to(tl.int32), axis=0)
    tl.atomic_add(bad_ptr, bad, mask=bad > 0)
