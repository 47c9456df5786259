"""Fused merge loops for CPU, compiled by TorchInductor (``torch.compile``) into one C++ pass.

The torch references in ``mergesearch.merge.methods`` run one vectorised op at a time, so a
bf16 linear merge of three sources walks its data about seven times. Here the same per-element
arithmetic as the Triton kernels (``gta_kernel``: delta, keep mask, rescale, weight, sign
election, disjoint mean or normalisation, lambda) is written once over the flat tensors and
compiled, so each source element is read once and each output element written once.

Covered: ``linear``, ``task_arithmetic``, ``dare_linear``, ``dare_ties`` and ``ties`` (its
thresholds and index cut-offs are prepared beforehand, as for the Triton kernel). The DARE mask is
the counter-based hash of ``mergesearch.merge.rng`` in int64 arithmetic, bit-identical to the
reference. Sums are formed in the reference's order; DARE's L1 rescale factors are reduced in
another order than the reference's chunks, so they can differ in the last bit.

Compiling takes seconds per variant (method flags, number of sources, dtypes) and is cached by
Inductor on disk, so this path is used for tensors of at least ``MIN_NUMEL`` elements only;
``available()`` is False where no C++ compiler works, and callers then use the reference.
"""

from __future__ import annotations

import functools
import logging
import threading
from typing import Any, Optional

import torch

from mergesearch.merge import rng
from mergesearch.merge.methods import TensorInputs, check_linear_weights, non_finite_error
from mergesearch.merge.registry import task_arithmetic_variant

COVERED = ("linear", "task_arithmetic", "dare_linear", "dare_ties", "ties")
MIN_NUMEL = 1 << 18
"""Smaller tensors are merged by the reference: the compiled loop's gain does not pay its call."""

NONE, RANDOM, MAGNITUDE = 0, 1, 2
_log = logging.getLogger(__name__)
_LOCK = threading.Lock()
"""Serialises compiled calls: Dynamo compiles on first use of each variant and is not safe to enter
from several worker threads at once (a merge runs at memory bandwidth anyway)."""


def _uniform(idx: torch.Tensor, k0: torch.Tensor, k1: torch.Tensor) -> torch.Tensor:
    m32 = rng.M32
    lo, hi = idx & m32, idx >> 32
    h = rng.fmix32((lo * rng.GOLDEN + k0) & m32)
    h = rng.fmix32(h ^ ((hi * rng.HI_MUL + k1) & m32))
    return (h >> 8).to(torch.float32) * (1.0 / (1 << 24))


def _linear(srcs: list[torch.Tensor], w: torch.Tensor, total: torch.Tensor, out: torch.Tensor,
            normalize: bool) -> torch.Tensor:
    acc = torch.zeros(out.shape, dtype=torch.float32)
    for k, t in enumerate(srcs):
        acc = torch.addcmul(acc, t.to(torch.float32), w[k])
    if normalize:
        acc = acc / total
    out.copy_(acc)
    return torch.isfinite(out).logical_not().sum()


def _deltas(base: torch.Tensor, srcs: list[torch.Tensor], fp: torch.Tensor, ip: torch.Tensor,
            sparse: int) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    b = base.to(torch.float32)
    idx = torch.arange(b.numel(), dtype=torch.int64) if sparse != NONE else None
    raw, kept = [], []
    for k, t in enumerate(srcs):
        d = t.to(torch.float32) - b
        if sparse == RANDOM:
            keep = _uniform(idx, ip[0, k], ip[1, k]) < fp[1, k]
        elif sparse == MAGNITUDE:
            mag = d.abs()
            keep = (mag > fp[2, k]) | ((mag == fp[2, k]) & (idx < ip[2, k]))
        else:
            keep = None
        raw.append(d)
        kept.append(d if keep is None else d * keep)
    return b, raw, kept


def _l1(base: torch.Tensor, srcs: list[torch.Tensor], fp: torch.Tensor, ip: torch.Tensor,
        sparse: int) -> torch.Tensor:
    _, raw, kept = _deltas(base, srcs, fp, ip, sparse)
    return torch.stack([torch.stack([d.abs().sum(), e.abs().sum()]) for d, e in zip(raw, kept)])


def _gta(base: torch.Tensor, srcs: list[torch.Tensor], fp: torch.Tensor, ip: torch.Tensor,
         scales: torch.Tensor, divisor: torch.Tensor, lam: torch.Tensor, out: torch.Tensor,
         sparse: int, rescale: bool, consensus: bool, normalize: bool, scaled: bool) -> torch.Tensor:
    b, _, kept = _deltas(base, srcs, fp, ip, sparse)
    weighted = [(d * scales[k] if rescale else d) * fp[0, k] for k, d in enumerate(kept)]
    total = torch.zeros(b.shape, dtype=torch.float32)
    for dw in weighted:
        total = total + dw
    if consensus:
        majority = torch.where(total >= 0, 1.0, -1.0)
        mixed = torch.zeros(b.shape, dtype=torch.float32)
        div = torch.zeros(b.shape, dtype=torch.float32)
        for k, dw in enumerate(weighted):
            agree = (dw.sign() == majority).to(torch.float32)
            mixed = mixed + dw * agree
            div = div + fp[0, k] * agree
        div = torch.where(div == 0, 1.0, div)
    else:
        mixed, div = total, divisor
    if normalize:
        mixed = mixed / div
    if scaled:
        mixed = mixed * lam
    out.copy_(b + mixed)
    return torch.isfinite(out).logical_not().sum()


@functools.lru_cache(maxsize=None)
def _compiled(name: str) -> Any:
    fn = {"linear": _linear, "gta": _gta, "l1": _l1}[name]
    return torch.compile(fn, dynamic=True, fullgraph=True,
                         options={"cpp.enable_floating_point_contract_flag": "fast"} if name == "linear" else None)


def available() -> bool:
    """Whether Inductor compiles and runs a loop here (a working C++ compiler)."""
    with _LOCK:
        return _available()


@functools.lru_cache(maxsize=1)
def _available() -> bool:
    """Whether Inductor compiles and runs a loop here (a working C++ compiler)."""
    try:
        x = torch.arange(8, dtype=torch.float32)
        out = torch.empty(8, dtype=torch.float32)
        _compiled("linear")([x, x], torch.tensor([1.0, 2.0]), torch.tensor(3.0), out, True)
        return bool(torch.equal(out, x))
    except Exception as err:  # noqa: BLE001 - any compiler failure means: use the reference
        _log.warning("compiled CPU merge loops unavailable (%s); using the torch reference", err)
        return False


def unsupported(method: str, x: TensorInputs, out: torch.Tensor, min_numel: int = MIN_NUMEL) -> Optional[str]:
    """Why the compiled loop does not apply to these arguments, or None."""
    from mergesearch.merge.kernels import _common

    if method not in COVERED:
        return f"merge method {method!r} has no compiled CPU loop"
    if out.device.type != "cpu":
        return f"output on {out.device}"
    if out.numel() < min_numel:
        return f"{x.name!r} has fewer than {min_numel} elements"
    if method != "linear" and (x.base is None or len(x.tensors) < 2):
        return "no base model and source"
    for t in (*x.tensors, out):
        if t.device.type != "cpu" or not t.is_contiguous() or t.shape != out.shape:
            return "inputs that are not contiguous CPU tensors of the output's shape"
        if t.dtype not in _common.FLOAT_DTYPES:
            return f"dtype {t.dtype}"
    rows = range(len(x.tensors)) if method == "linear" else x.non_base()
    return _common.scalar_problem(x, ("weight", "density"), rows)


def merge_into(method: str, x: TensorInputs, out: torch.Tensor, min_numel: int = MIN_NUMEL) -> bool:
    """Merge one tensor with the compiled loop; False (nothing touched) when it does not apply."""
    if unsupported(method, x, out, min_numel) or not available():
        return False
    with _LOCK:
        bad = _merge(method, x, out)
    if int(bad):
        raise non_finite_error(x.name, method, int(bad))
    return True


def _merge(method: str, x: TensorInputs, out: torch.Tensor) -> torch.Tensor:
    """Run the compiled loop; returns the count of non-finite outputs."""
    flat = [t.reshape(-1) for t in x.tensors]
    dest = out.reshape(-1)
    if method != "linear":
        return _merge_gta(method, x, flat, dest)
    weights = [float(p["weight"]) for p in x.per_input]
    if x.shared["normalize"]:
        check_linear_weights(weights, repr(x.name))
    w = torch.tensor(weights, dtype=torch.float32)
    return _compiled("linear")(flat, w, w.sum(), dest, bool(x.shared["normalize"]))


def _merge_gta(method: str, x: TensorInputs, flat: list[torch.Tensor], dest: torch.Tensor) -> torch.Tensor:
    from mergesearch.merge.kernels import task_arithmetic as gta
    from mergesearch.merge.kernels.ties import magnitude_tables

    variant = task_arithmetic_variant(method)
    others = x.non_base()
    base, srcs = flat[x.base], [flat[i] for i in others]
    if variant.sparsification == "magnitude":
        sparse = MAGNITUDE
        thresholds, cutoffs, scales = magnitude_tables(x)
        t = gta.prepare(x, dest, gta.MAGNITUDE, thresholds, cutoffs, scales)
        rescale = scales is not None
        if scales is None:
            scales = torch.ones(len(others), dtype=torch.float32)
    else:
        sparse = RANDOM if variant.sparsification == "random" else NONE
        t = gta.prepare(x, dest, sparse)
        scales = torch.ones(len(others), dtype=torch.float32)
        rescale = (sparse == RANDOM and bool(x.shared["rescale"])
                   and any(d < 1 for d in t["dropping"]))
        if rescale:
            sums = _compiled("l1")(base, srcs, t["fp"], t["ip"], sparse)
            before, after = sums.unbind(-1)
            use = (before >= 1e-7) & (after >= 1e-7)
            dropping = torch.tensor([d < 1 for d in t["dropping"]])
            scales = torch.where(use & dropping, before / torch.where(use, after, 1.0), 1.0)
        if sparse == RANDOM and not any(d < 1 for d in t["dropping"]):
            sparse = NONE
    lam = float(x.shared["lambda"])
    return _compiled("gta")(base, srcs, t["fp"], t["ip"], scales.to(torch.float32),
                            torch.tensor(t["divisor"], dtype=torch.float32),
                            torch.tensor(lam, dtype=torch.float32), dest, sparse, rescale,
                            variant.consensus, bool(x.shared["normalize"]), lam != 1)
