"""Counter-based random numbers for random merge methods (DARE, DELLA).

The keep/drop draw for element ``i`` of a tensor is a pure function of ``(seed, stream, tensor
name, i)``: two rounds of murmur3's 32-bit finaliser over the element index and a 64-bit key
derived from the rest. Only 32-bit integer multiply, xor and shifts are used, so the Triton kernel
computes bit-identical draws on a GPU. ``stream`` separates the source models of one merge (their
position among the non-base inputs), so no two sources share a mask.
"""

from __future__ import annotations

import hashlib

import torch

M32 = 0xFFFFFFFF
GOLDEN = 0x9E3779B1
HI_MUL = 0x27D4EB2F
CHUNK = 1 << 20


def stream_key(seed: int, stream: int, tensor_name: str) -> tuple[int, int]:
    """Two 32-bit keys for one (seed, stream, tensor) triple."""
    digest = hashlib.blake2b(f"{seed}|{stream}|{tensor_name}".encode(), digest_size=8).digest()
    value = int.from_bytes(digest, "little")
    return value & M32, value >> 32


def fmix32(h: torch.Tensor) -> torch.Tensor:
    """murmur3's finaliser on uint32 values held in int64 (products wrap mod 2**64)."""
    h = h ^ (h >> 16)
    h = (h * 0x85EBCA6B) & M32
    h = h ^ (h >> 13)
    h = (h * 0xC2B2AE35) & M32
    return h ^ (h >> 16)


def uniform_from_index(index: torch.Tensor, key: tuple[int, int]) -> torch.Tensor:
    """float32 draws in [0, 1) (24-bit resolution) for int64 element indices."""
    k0, k1 = key
    lo = index & M32
    hi = index >> 32
    h = fmix32((lo * GOLDEN + k0) & M32)
    h = fmix32(h ^ ((hi * HI_MUL + k1) & M32))
    return (h >> 8).to(torch.float32) * (1.0 / (1 << 24))


def uniform(numel: int, key: tuple[int, int], device: torch.device | str = "cpu") -> torch.Tensor:
    """Draws for elements 0..numel-1, computed in chunks to bound int64 scratch memory."""
    out = torch.empty(numel, dtype=torch.float32, device=device)
    for start in range(0, numel, CHUNK):
        stop = min(numel, start + CHUNK)
        idx = torch.arange(start, stop, dtype=torch.int64, device=device)
        out[start:stop] = uniform_from_index(idx, key)
    return out
