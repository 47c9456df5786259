"""Fused ``linear``: ``out = sum_i w_i * x_i`` (divided by ``sum_i w_i`` when normalising).

One pass: each program reads ``BLOCK`` elements of every input once, accumulates in float32 in
input order with fused multiply-adds (``methods.linear``'s ``addcmul_`` is one on CPU and CUDA),
divides, casts to the output dtype, stores, and counts non-finite results.
"""

from __future__ import annotations

from typing import Optional

import torch

from mergesearch.merge import methods
from mergesearch.merge.kernels import _common
from mergesearch.merge.kernels._lang import store_checked, to_output
from mergesearch.merge.kernels._triton import jit, tl
from mergesearch.merge.methods import TensorInputs
from mergesearch.merge.registry import check_linear_weights

reference = methods.linear


@jit
def linear_kernel(srcs, w_ptr, out_ptr, bad_ptr, n, total,
                  N: tl.constexpr, NORMALIZE: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < n
    acc = tl.zeros((BLOCK,), tl.float32)
    for k in tl.static_range(N):
        x = tl.load(srcs[k] + offs, mask=inside, other=0).to(tl.float32)
        acc = tl.fma(x, tl.load(w_ptr + k), acc)
    if NORMALIZE:
        acc = acc / total
    store_checked(out_ptr, offs, to_output(acc, out_ptr), inside, bad_ptr)


def unsupported(x: TensorInputs, out: torch.Tensor) -> Optional[str]:
    return (_common.scalar_problem(x, ["weight"], range(len(x.tensors)))
            or _common.layout_problem(x.tensors, out))


def launch(x: TensorInputs, out: torch.Tensor, method: str = "linear") -> None:
    """Merge with the kernel (``unsupported`` must have returned None)."""
    weights = [p["weight"] for p in x.per_input]
    w = torch.tensor(weights, dtype=torch.float32)
    normalize = bool(x.shared["normalize"])
    if normalize:
        check_linear_weights(weights, repr(x.name))
    if out.numel() == 0:
        return
    bad = _common.bad_counter(out)
    _common.launch(linear_kernel, out.numel(), tuple(x.tensors), w.to(out.device), out, bad,
                   out.numel(), float(w.sum()), N=len(x.tensors), NORMALIZE=normalize)
    _common.check_finite(bad, x, method)
