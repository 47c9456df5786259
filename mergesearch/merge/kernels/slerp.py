"""Fused ``slerp``: one reduction pass, then one elementwise pass.

``slerp_reduce_kernel`` reads both tensors once and writes per-program partial sums of ``a*a``,
``b*b`` and ``a*b``; torch turns them into the norms, the cosine and the two coefficients
(``methods.slerp_from_dot``, which also takes the linear fallback for near-colinear pairs);
``slerp_kernel`` then writes ``c_a * a + c_b * b``. The reference reduces the normalised vectors
chunk by chunk, so the coefficients agree to float32 rounding, not bit for bit.
"""

from __future__ import annotations

from typing import Optional

import torch

from mergesearch.merge import methods
from mergesearch.merge.kernels import _common
from mergesearch.merge.kernels._lang import store_checked, to_output
from mergesearch.merge.kernels._triton import jit, tl
from mergesearch.merge.methods import TensorInputs

reference = methods.slerp


@jit
def slerp_reduce_kernel(a_ptr, b_ptr, part_ptr, n, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < n
    a = tl.load(a_ptr + offs, mask=inside, other=0).to(tl.float32)
    b = tl.load(b_ptr + offs, mask=inside, other=0).to(tl.float32)
    tl.store(part_ptr + pid * 3, tl.sum(a * a, axis=0))
    tl.store(part_ptr + pid * 3 + 1, tl.sum(b * b, axis=0))
    tl.store(part_ptr + pid * 3 + 2, tl.sum(a * b, axis=0))


@jit
def slerp_kernel(a_ptr, b_ptr, out_ptr, bad_ptr, n, coef_a, coef_b, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < n
    a = tl.load(a_ptr + offs, mask=inside, other=0).to(tl.float32)
    b = tl.load(b_ptr + offs, mask=inside, other=0).to(tl.float32)
    store_checked(out_ptr, offs, to_output(coef_a * a + coef_b * b, out_ptr), inside, bad_ptr)


def unsupported(x: TensorInputs, out: torch.Tensor) -> Optional[str]:
    if x.base is None or len(x.tensors) != 2:
        return "slerp needs a base and exactly one other model"
    if isinstance(x.shared.get("t"), torch.Tensor):
        return "a tensor-valued 't'"
    return _common.layout_problem(x.tensors, out)


def coefficients(t: float, a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """SLERP's coefficients from one fused reduction pass over ``a`` and ``b``."""
    n = a.numel()
    part = torch.empty((_common.grid(n)[0], 3), dtype=torch.float32, device=a.device)
    _common.launch(slerp_reduce_kernel, n, a, b, part, n)
    sq_a, sq_b, ab = part.sum(dim=0).unbind()
    norm_a, norm_b = sq_a.sqrt(), sq_b.sqrt()
    norm_a = torch.where(norm_a > eps, norm_a, torch.ones_like(norm_a))
    norm_b = torch.where(norm_b > eps, norm_b, torch.ones_like(norm_b))
    return methods.slerp_from_dot(t, (ab / (norm_a * norm_b)).clamp(-1, 1))


def launch(x: TensorInputs, out: torch.Tensor, method: str = "slerp") -> None:
    """slerp with the kernels."""
    a, b = x.tensors[x.base], x.tensors[x.non_base()[0]]
    n = out.numel()
    if n == 0:
        return
    coef_a, coef_b = coefficients(float(x.shared["t"]), a, b)
    bad = _common.bad_counter(out)
    _common.launch(slerp_kernel, n, a, b, out, bad, n, float(coef_a), float(coef_b))
    _common.check_finite(bad, x, method)
