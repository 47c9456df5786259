"""Fused task arithmetic: ``task_arithmetic``, ``dare_linear``, ``dare_ties`` (and the combination
step of ``ties``, see ``kernels.ties``).

One kernel, ``gta_kernel``, reads the base and every source once per element and writes the
output once. Per source ``k`` it forms ``d_k = x_k - base`` in float32, applies the keep mask
(DARE: the counter-based draw of ``mergesearch.merge.rng`` computed in-kernel with 32-bit integer
ops, so masks are bit-identical to the torch reference; TIES: a magnitude threshold and an index
cut-off for elements equal to it, both computed beforehand), the L1 rescale factor, the weight,
then the sign consensus (TIES election), the disjoint mean or weight normalisation and ``lambda``,
exactly in the order of ``methods._combine``. DARE's rescale factors need the L1 norms before and
after dropping: a first launch with ``REDUCE`` writes per-program partial sums instead.
"""

from __future__ import annotations

from typing import Optional

import torch

from mergesearch.merge import methods, rng
from mergesearch.merge.kernels import _common
from mergesearch.merge.kernels._lang import store_checked, to_output, uniform
from mergesearch.merge.kernels._triton import jit, tl
from mergesearch.merge.methods import TensorInputs
from mergesearch.merge.registry import task_arithmetic_variant

reference = methods.chunked_task_arithmetic

NONE, RANDOM, MAGNITUDE = 0, 1, 2
"""The ``SPARSE`` mode of ``gta_kernel``."""

KEEP_ALL = 2.0
"""A density that keeps every draw (draws are < 1): a source that drops nothing."""


@jit
def gta_kernel(base_ptr, srcs, out_ptr, fp_ptr, ip_ptr, scale_ptr, part_ptr, bad_ptr,
               n, divisor, lam,
               N: tl.constexpr, SPARSE: tl.constexpr, RESCALE: tl.constexpr,
               CONSENSUS: tl.constexpr, NORMALIZE: tl.constexpr, REDUCE: tl.constexpr,
               BLOCK: tl.constexpr):
    # fp_ptr: float32 [3, N] = weight, density, magnitude threshold
    # ip_ptr: int64 [3, N] = key low word, key high word, index cut-off for threshold ties
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < n
    b = tl.load(base_ptr + offs, mask=inside, other=0).to(tl.float32)
    weighted = ()
    total = tl.zeros((BLOCK,), tl.float32)
    for k in tl.static_range(N):
        d = tl.load(srcs[k] + offs, mask=inside, other=0).to(tl.float32) - b
        if SPARSE == 1:
            k0 = tl.load(ip_ptr + k).to(tl.uint32)
            k1 = tl.load(ip_ptr + N + k).to(tl.uint32)
            u = uniform(offs, k0, k1)
            kept = d * (u < tl.load(fp_ptr + N + k)).to(tl.float32)
        elif SPARSE == 2:
            thr = tl.load(fp_ptr + 2 * N + k)
            cut = tl.load(ip_ptr + 2 * N + k)
            mag = tl.abs(d)
            kept = d * ((mag > thr) | ((mag == thr) & (offs < cut))).to(tl.float32)
        else:
            kept = d
        if REDUCE:
            before = tl.sum(tl.abs(d), axis=0)
            after = tl.sum(tl.abs(kept), axis=0)
            tl.store(part_ptr + (pid * N + k) * 2, before)
            tl.store(part_ptr + (pid * N + k) * 2 + 1, after)
        else:
            if RESCALE:
                kept = kept * tl.load(scale_ptr + k)
            dw = kept * tl.load(fp_ptr + k)
            weighted = weighted + (dw,)
            total = total + dw
    if not REDUCE:
        if CONSENSUS:
            majority = tl.where(total >= 0, 1.0, -1.0)
            mixed = tl.zeros((BLOCK,), tl.float32)
            div = tl.zeros((BLOCK,), tl.float32)
            for k in tl.static_range(N):
                dw = weighted[k]
                sign = tl.where(dw > 0, 1.0, tl.where(dw < 0, -1.0, 0.0))
                agree = (sign == majority).to(tl.float32)
                mixed = mixed + dw * agree
                div = div + tl.load(fp_ptr + k) * agree
            div = tl.where(div == 0, 1.0, div)
        else:
            mixed = total
            div = divisor
        if NORMALIZE:
            mixed = mixed / div
        mixed = mixed * lam
        store_checked(out_ptr, offs, to_output(b + mixed, out_ptr), inside, bad_ptr)


PARAMS = ("weight", "density")


def unsupported(method: str, x: TensorInputs, out: torch.Tensor) -> Optional[str]:
    if x.base is None:
        return "no base model"
    if len(x.tensors) < 2:
        return "no model besides the base"
    return (_common.scalar_problem(x, PARAMS, x.non_base())
            or _common.layout_problem(x.tensors, out))


def prepare(x: TensorInputs, out: torch.Tensor, sparse: int,
            thresholds: Optional[list[float]] = None, cutoffs: Optional[list[int]] = None,
            scales: Optional[torch.Tensor] = None) -> dict:
    """Per-source tables and scalars for ``gta_kernel`` (``sparse`` is NONE, RANDOM or MAGNITUDE)."""
    others = x.non_base()
    f32 = torch.float32
    weights = [float(x.per_input[i]["weight"]) for i in others]
    densities = [float(x.per_input[i]["density"]) if sparse == RANDOM
                 and x.per_input[i]["density"] < 1 else KEEP_ALL for i in others]
    keys = [rng.stream_key(x.seed, row, x.name) for row in range(len(others))]
    fp = torch.tensor([weights, densities, thresholds or [0.0] * len(others)], dtype=f32)
    ip = torch.tensor([[k[0] for k in keys], [k[1] for k in keys], cutoffs or [0] * len(others)],
                      dtype=torch.int64)
    return dict(
        base=x.tensors[x.base], srcs=tuple(x.tensors[i] for i in others),
        fp=fp.to(out.device), ip=ip.to(out.device), scales=scales,
        divisor=float(_plain_divisor(fp[0])), n_src=len(others), dropping=densities,
    )


def _plain_divisor(weights: torch.Tensor) -> torch.Tensor:
    divisor = weights.reshape(-1, 1).sum(dim=0)
    divisor[divisor.abs() < 1e-8] = 1
    return divisor


def run(method: str, x: TensorInputs, out: torch.Tensor, t: dict, sparse: int,
        rescale: bool) -> None:
    """Launch the merge pass, then raise if the result holds NaN/inf."""
    n = out.numel()
    if n == 0:
        return
    consensus = task_arithmetic_variant(method).consensus
    bad = _common.bad_counter(out)
    scales = t["scales"] if rescale else t["fp"]
    _common.launch(gta_kernel, n, t["base"], t["srcs"], out, t["fp"], t["ip"], scales, t["fp"],
                   bad, n, t["divisor"], float(x.shared["lambda"]), N=t["n_src"], SPARSE=sparse,
                   RESCALE=rescale, CONSENSUS=consensus, NORMALIZE=bool(x.shared["normalize"]),
                   REDUCE=False)
    _common.check_finite(bad, x, method)


def dare_scales(t: dict, out: torch.Tensor) -> torch.Tensor:
    """Per-source L1 rescale factors (before / after dropping; 1 where either is < 1e-7)."""
    n = out.numel()
    programs = _common.grid(n)[0]
    part = torch.empty((programs, t["n_src"], 2), dtype=torch.float32, device=out.device)
    _common.launch(gta_kernel, n, t["base"], t["srcs"], out, t["fp"], t["ip"], t["fp"], part,
                   part, n, 1.0, 1.0, N=t["n_src"], SPARSE=RANDOM, RESCALE=False,
                   CONSENSUS=False, NORMALIZE=False, REDUCE=True)
    before, after = part.sum(dim=0).unbind(-1)
    use = (before >= 1e-7) & (after >= 1e-7)
    dropping = torch.tensor([d < 1 for d in t["dropping"]], device=out.device)
    return torch.where(use & dropping, before / torch.where(use, after, 1.0), 1.0)


def launch(method: str, x: TensorInputs, out: torch.Tensor) -> None:
    """task_arithmetic, dare_linear or dare_ties with the kernel."""
    sparse = RANDOM if task_arithmetic_variant(method).sparsification == "random" else NONE
    t = prepare(x, out, sparse)
    rescale = (sparse == RANDOM and bool(x.shared["rescale"])
               and any(d < 1 for d in t["dropping"]) and out.numel() > 0)
    if rescale:
        t["scales"] = dare_scales(t, out)
    run(method, x, out, t, sparse, rescale)
