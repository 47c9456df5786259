"""Torch reference implementations of the merge methods, one output tensor at a time.

Inputs arrive in their storage dtype (or the plan's ``dtype``) on the compute device; all
arithmetic is float32. Elementwise methods (``linear``, ``slerp``'s interpolation, task arithmetic
and DARE) run over chunks of ``CHUNK`` elements and write straight into the output tensor, so
memory is the inputs plus the output plus one chunk of scratch; methods that need a whole-tensor
order statistic (TIES, breadcrumbs, DELLA, model stock, nuslerp) work on float32 copies. The
arithmetic follows mergekit 0.1.5 step by step so results agree to float32 rounding; the fused
kernels of the workers must match these functions.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Optional

import torch

from mergesearch.errors import MergeComputationError
from mergesearch.merge import rng
from mergesearch.merge.registry import (
    METHODS,
    check_della,
    check_linear_weights,
    task_arithmetic_variant,
)


@dataclass
class TensorInputs:
    """Everything one merge of one tensor needs.

    ``per_input[i]`` holds the per-model parameters of ``tensors[i]``; ``base`` is the index of
    the base model's tensor (None when the method has no base).
    """

    name: str
    tensors: Sequence[torch.Tensor]
    shared: dict[str, Any]
    per_input: Sequence[dict[str, Any]]
    base: Optional[int] = None
    seed: int = 0
    models: Sequence[str] = field(default_factory=tuple)
    importance: Sequence[Mapping[str, torch.Tensor]] = field(default_factory=tuple)
    """Per input, its calibration statistics for this tensor (``act_l2``: ||X||_2 per input
    channel of a linear layer's weight; ``fisher``: the diagonal Fisher); empty for other methods."""

    def non_base(self) -> list[int]:
        return [i for i in range(len(self.tensors)) if i != self.base]


CHUNK = 1 << 20
PASS_CHUNK = 1 << 17
"""Chunk of the elementwise passes that write the output: small enough for the float32 scratch
to stay in cache. Reductions (DARE's L1 norms, SLERP's norms and dot) keep ``CHUNK``, so results
do not depend on it."""


def _spans(numel: int, size: int = CHUNK) -> Iterator[tuple[int, int]]:
    for start in range(0, numel, size):
        yield start, min(numel, start + size)


def _flat(x: TensorInputs) -> list[torch.Tensor]:
    return [t.reshape(-1) for t in x.tensors]


def _f32(x: TensorInputs) -> TensorInputs:
    """The same inputs as float32 copies (for whole-tensor methods)."""
    return replace(x, tensors=[t.to(torch.float32) for t in x.tensors])


# ---------------------------------------------------------------------------------------------
# Sparsification


def _rescaled(delta: torch.Tensor, mask: torch.Tensor, rescale: bool) -> torch.Tensor:
    masked = delta * mask
    if not rescale:
        return masked
    before = delta.abs().sum()
    after = masked.abs().sum()
    if before < 1e-7 or after < 1e-7:
        return masked
    return masked * (before / after)


def magnitude(delta: torch.Tensor, density: float, rescale: bool) -> torch.Tensor:
    """Keep the ``density`` fraction of largest-magnitude elements (at least one).

    The k-th largest magnitude is found by selection, not a full sort; elements tied with it are
    kept in index order until exactly k are kept (zeros need no tie-break: they add nothing).
    """
    if density >= 1:
        return delta
    if density <= 0 or delta.numel() == 0:
        return torch.zeros_like(delta)
    w = delta.abs().reshape(-1)
    threshold, cutoff = magnitude_cutoff(w, density)
    keep = w > threshold
    if cutoff:
        keep[:cutoff] |= w[:cutoff] == threshold
    return _rescaled(delta, keep.reshape(delta.shape).to(delta.dtype), rescale)


def magnitude_cutoff(w: torch.Tensor, density: float) -> tuple[torch.Tensor, int]:
    """TIES trimming of flat magnitudes ``w`` (0 < density < 1) as a threshold and a cut-off.

    Exactly ``k = max(1, int(density * n))`` elements are kept: those above the threshold (the
    k-th largest value) and those equal to it at indices below the cut-off.
    """
    n = w.numel()
    k = max(1, int(density * n))
    threshold = torch.kthvalue(w.cpu() if w.device.type == "mps" else w, n - k + 1).values
    missing = k - int((w > threshold).sum())
    if missing > 0 and float(threshold) > 0:
        tied = (w == threshold).nonzero().reshape(-1)
        return threshold, int(tied[missing - 1]) + 1
    return threshold, 0


def magnitude_outliers(delta: torch.Tensor, density: float, rescale: bool,
                       gamma: float) -> torch.Tensor:
    """Drop the ``gamma`` largest fraction, then the smallest, keeping ``density``."""
    if density >= 1:
        return delta
    n = delta.numel()
    target = int(density * n)
    n_top = int(gamma * n)
    n_bottom = max(0, n - target - n_top)
    order = torch.sort(delta.abs().reshape(-1), descending=False).indices
    mask = torch.zeros(n, dtype=delta.dtype, device=delta.device)
    mask[order[n_bottom:n_bottom + target]] = 1
    return _rescaled(delta, mask.reshape_as(delta), rescale)


def random_keep(delta: torch.Tensor, keep_prob: torch.Tensor | float,
                key: tuple[int, int]) -> torch.Tensor:
    """The counter-based keep mask (1.0 kept, 0.0 dropped) for each element of ``delta``."""
    u = rng.uniform(delta.numel(), key, delta.device).reshape(delta.shape)
    return (u < keep_prob).to(delta.dtype)


def bernoulli(delta: torch.Tensor, density: float, rescale: bool,
              key: tuple[int, int]) -> torch.Tensor:
    """DARE: keep each element with probability ``density``."""
    if density >= 1:
        return delta
    return _rescaled(delta, random_keep(delta, density, key), rescale)


def della_probabilities(delta: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """Per-element keep probability rising linearly with the magnitude rank within each row."""
    rows = delta.unsqueeze(0) if delta.dim() < 2 else delta
    n = rows.shape[1]
    ranks = torch.argsort(torch.argsort(rows.abs(), dim=1, stable=True), dim=1).to(torch.float32)
    rank_norm = ranks / (n - 1) if n > 1 else torch.zeros_like(ranks)
    probs = (density - epsilon) + rank_norm.clamp(0, 1) * 2 * epsilon
    return probs.reshape(delta.shape)


def della_magprune(delta: torch.Tensor, density: float, epsilon: float, rescale: bool,
                   key: tuple[int, int], name: str) -> torch.Tensor:
    if density >= 1:
        return delta
    if density <= 0:
        return torch.zeros_like(delta)
    check_della("della", density, epsilon, repr(name))
    mask = random_keep(delta, della_probabilities(delta, density, epsilon), key)
    return _rescaled(delta, mask, rescale)


# ---------------------------------------------------------------------------------------------
# Methods


def linear(x: TensorInputs, out: torch.Tensor) -> None:
    weights = [p["weight"] for p in x.per_input]
    w = torch.tensor(weights, dtype=torch.float32, device=out.device)
    total = w.sum()
    if x.shared["normalize"]:
        check_linear_weights(weights, repr(x.name))
    flat, dest = _flat(x), out.reshape(-1)
    scratch = torch.empty(min(dest.numel(), PASS_CHUNK), dtype=torch.float32, device=out.device)
    for start, stop in _spans(dest.numel(), PASS_CHUNK):
        acc = scratch[:stop - start].zero_()
        for tensor, coefficient in zip(flat, w):
            acc.addcmul_(tensor[start:stop], coefficient)
        if x.shared["normalize"]:
            acc.div_(total)
        dest[start:stop] = acc


def slerp_coefficients(t: float, a: torch.Tensor, b: torch.Tensor, dot_threshold: float = 0.9995,
                       eps: float = 1e-8) -> tuple[torch.Tensor, torch.Tensor]:
    """SLERP's two coefficients for flat tensors a (at t = 0) and b (at t = 1).

    Norms and the dot product are reduced over chunks as mergekit does; near-colinear pairs
    (|cos| > dot_threshold) fall back to linear interpolation.
    """
    norms_a, norms_b = [], []
    for start, stop in _spans(a.numel()):
        norms_a.append(torch.linalg.vector_norm(a[start:stop].to(torch.float32)))
        norms_b.append(torch.linalg.vector_norm(b[start:stop].to(torch.float32)))
    norm_a = torch.linalg.vector_norm(torch.stack(norms_a))
    norm_b = torch.linalg.vector_norm(torch.stack(norms_b))
    norm_a = torch.where(norm_a > eps, norm_a, torch.ones_like(norm_a))
    norm_b = torch.where(norm_b > eps, norm_b, torch.ones_like(norm_b))
    dots = [((a[start:stop].to(torch.float32) / norm_a)
             * (b[start:stop].to(torch.float32) / norm_b)).sum()
            for start, stop in _spans(a.numel())]
    return slerp_from_dot(t, torch.stack(dots).sum().clamp(-1, 1), dot_threshold)


def slerp_from_dot(t: float, dot: torch.Tensor, dot_threshold: float = 0.9995
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """SLERP's two coefficients from the cosine ``dot`` (a float32 scalar in [-1, 1])."""
    t32 = torch.tensor(t, dtype=torch.float32, device=dot.device)
    if dot.abs() > dot_threshold:
        return 1 - t32, t32
    theta = torch.acos(dot)
    sin_theta = torch.sin(theta)
    return torch.sin((1 - t32) * theta) / sin_theta, torch.sin(t32 * theta) / sin_theta


def slerp(x: TensorInputs, out: torch.Tensor) -> None:
    a = x.tensors[x.base].reshape(-1)
    b = x.tensors[x.non_base()[0]].reshape(-1)
    dest = out.reshape(-1)
    if a.numel() == 0:
        return
    coef_a, coef_b = slerp_coefficients(x.shared["t"], a, b)
    size = min(a.numel(), PASS_CHUNK)
    scratch_a, scratch_b = (torch.empty(size, dtype=torch.float32, device=out.device)
                            for _ in range(2))
    for start, stop in _spans(a.numel(), PASS_CHUNK):
        sa = scratch_a[:stop - start].copy_(a[start:stop]).mul_(coef_a)
        sb = scratch_b[:stop - start].copy_(b[start:stop]).mul_(coef_b)
        dest[start:stop] = sa.add_(sb)


def nuslerp_pair(t: float, v0: torch.Tensor, v1: torch.Tensor, row_wise: bool,
                 flatten: bool, eps: float = 1e-8) -> torch.Tensor:
    shape = v0.shape
    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif row_wise:
        v0, v1 = v0.transpose(0, -1), v1.transpose(0, -1)
    u0 = v0 / torch.norm(v0, dim=-1, keepdim=True).clamp(min=1e-7)
    u1 = v1 / torch.norm(v1, dim=-1, keepdim=True).clamp(min=1e-7)
    cos = torch.sum(u0 * u1, dim=-1, keepdim=True).clamp(-1, 1)
    colinear = (1 - cos.square()) <= eps ** 2
    theta = torch.acos(torch.where(colinear, torch.zeros_like(cos), cos))
    sin_theta = torch.sin(theta)
    result = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / sin_theta
    result = torch.where(colinear, (1 - t) * v0 + t * v1, result)
    if row_wise and not flatten:
        result = result.transpose(0, -1)
    return result.reshape(shape)


def nuslerp(x: TensorInputs) -> torch.Tensor:
    i0, i1 = x.non_base()
    w0, w1 = x.per_input[i0]["weight"], x.per_input[i1]["weight"]
    total = w0 + w1
    t = 0.5 if abs(total) < 1e-6 else w1 / total
    row_wise, flatten = x.shared["nuslerp_row_wise"], x.shared["nuslerp_flatten"]
    if x.base is not None:
        base = x.tensors[x.base]
        return base + nuslerp_pair(t, x.tensors[i0] - base, x.tensors[i1] - base,
                                   row_wise, flatten)
    return nuslerp_pair(t, x.tensors[i0], x.tensors[i1], row_wise, flatten)


def model_stock(x: TensorInputs) -> torch.Tensor:
    w0 = x.tensors[x.base]
    ws = [x.tensors[i] for i in x.non_base()]
    shape = w0.shape
    if x.shared["filter_wise"]:
        if w0.dim() == 1:
            w0, ws = w0.unsqueeze(0), [w.unsqueeze(0) for w in ws]
    else:
        w0, ws = w0.reshape(-1), [w.reshape(-1) for w in ws]
    offsets = [w - w0 for w in ws]
    cosines = []
    for i, a in enumerate(offsets):
        for b in offsets[i + 1:]:
            norms = torch.norm(a, dim=-1) * torch.norm(b, dim=-1)
            cosines.append(((a * b).sum(dim=-1) / norms.clamp(min=1e-6)).clamp(-1, 1))
    cos = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
    n = len(ws)
    denominator = 1 + (n - 1) * cos
    singular = denominator.abs() < 1e-6
    safe = torch.where(singular, torch.ones_like(denominator), denominator)
    t = torch.where(singular, torch.zeros_like(cos), (n * cos) / safe)
    average = sum(ws) / n
    return (t * average + (1 - t) * w0).reshape(shape)


def passthrough(x: TensorInputs) -> torch.Tensor:
    scale = x.per_input[0].get("scale")
    tensor = x.tensors[0]
    return tensor if scale is None else tensor * scale


def sparsified_deltas(x: TensorInputs, method: str, base: torch.Tensor
                      ) -> tuple[torch.Tensor, list[int]]:
    """Stacked float32 (non-base) task vectors after the method's sparsification."""
    variant = task_arithmetic_variant(method)
    others = x.non_base()
    rescale = x.shared["rescale"]
    deltas = base.new_empty((len(others), *base.shape))
    for row, i in enumerate(others):
        p = x.per_input[i]
        delta = x.tensors[i].to(torch.float32) - base
        key = rng.stream_key(x.seed, row, x.name)
        if variant.sparsification == "magnitude":
            delta = magnitude(delta, p["density"], rescale)
        elif variant.sparsification == "random":
            delta = bernoulli(delta, p["density"], rescale, key)
        elif variant.sparsification == "magnitude_outliers":
            delta = magnitude_outliers(delta, p["density"], rescale, p["gamma"])
        elif variant.sparsification == "della_magprune":
            delta = della_magprune(delta, p["density"], p["epsilon"], rescale, key, x.name)
        deltas[row] = delta
    return deltas, others


def _combine(deltas: torch.Tensor, weights: torch.Tensor, consensus: bool, shared: dict[str, Any]
             ) -> torch.Tensor:
    """Weight the task vectors, apply sign consensus if asked, sum, normalise and scale."""
    deltas = deltas * weights
    if consensus:
        sign = deltas.sign()
        majority = (deltas.sum(dim=0) >= 0).to(deltas.dtype) * 2 - 1
        mask = (sign == majority).to(deltas.dtype)
        mixed = (deltas * mask).sum(dim=0)
        divisor = (weights * mask).sum(dim=0)
        divisor[divisor == 0] = 1
    else:
        mixed = deltas.sum(dim=0)
        divisor = weights.sum(dim=0)
        divisor[divisor.abs() < 1e-8] = 1
    if shared["normalize"]:
        mixed = mixed / divisor
    if shared["lambda"] != 1:
        mixed = mixed * shared["lambda"]
    return mixed


def chunked_task_arithmetic(x: TensorInputs, method: str, out: torch.Tensor) -> None:
    """Task arithmetic and DARE, chunk by chunk (DARE's L1 rescale takes a first pass)."""
    variant = task_arithmetic_variant(method)
    flat, dest = _flat(x), out.reshape(-1)
    base = flat[x.base]
    others = x.non_base()
    f32 = torch.float32
    weights = torch.tensor([x.per_input[i]["weight"] for i in others], dtype=f32,
                           device=out.device).reshape(-1, 1)
    dropping = [variant.sparsification == "random" and x.per_input[i]["density"] < 1
                for i in others]
    keys = [rng.stream_key(x.seed, row, x.name) for row in range(len(others))]
    scales = [1.0] * len(others)
    if x.shared["rescale"] and any(dropping):
        before = [torch.zeros((), dtype=f32, device=out.device) for _ in others]
        after = [torch.zeros((), dtype=f32, device=out.device) for _ in others]
        for start, stop in _spans(dest.numel()):
            idx = torch.arange(start, stop, dtype=torch.int64, device=out.device)
            b = base[start:stop].to(f32)
            for row, i in enumerate(others):
                if dropping[row]:
                    delta = flat[i][start:stop].to(f32) - b
                    keep = rng.uniform_from_index(idx, keys[row]) < x.per_input[i]["density"]
                    before[row] += delta.abs().sum()
                    after[row] += (delta * keep).abs().sum()
        for row in range(len(others)):
            if dropping[row] and before[row] >= 1e-7 and after[row] >= 1e-7:
                scales[row] = before[row] / after[row]
    for start, stop in _spans(dest.numel(), PASS_CHUNK):
        b = base[start:stop].to(f32)
        idx = (torch.arange(start, stop, dtype=torch.int64, device=out.device)
               if any(dropping) else None)
        deltas = torch.empty((len(others), stop - start), dtype=f32, device=out.device)
        for row, i in enumerate(others):
            delta = flat[i][start:stop].to(f32) - b
            if dropping[row]:
                keep = rng.uniform_from_index(idx, keys[row]) < x.per_input[i]["density"]
                delta = delta * keep
                if x.shared["rescale"]:
                    delta = delta * scales[row]
            deltas[row] = delta
        dest[start:stop] = b + _combine(deltas, weights, variant.consensus, x.shared)


def task_arithmetic_family(x: TensorInputs, method: str) -> torch.Tensor:
    """Plain whole-tensor reference of every task-arithmetic method (float32 in, float32 out)."""
    base = x.tensors[x.base].to(torch.float32)
    if len(x.tensors) == 1:
        return base
    deltas, others = sparsified_deltas(x, method, base)
    weights = torch.tensor([x.per_input[i]["weight"] for i in others], dtype=deltas.dtype,
                           device=deltas.device)
    weights = weights.reshape(-1, *([1] * base.dim()))
    return base + _combine(deltas, weights, task_arithmetic_variant(method).consensus, x.shared)


def sparse_task_arithmetic(x: TensorInputs, method: str, out: torch.Tensor) -> None:
    """TIES, breadcrumbs and DELLA: whole-tensor sparsification, then a chunked combination."""
    base = x.tensors[x.base].to(torch.float32).reshape(-1)
    dest = out.reshape(-1)
    if len(x.tensors) == 1:
        dest.copy_(base)
        return
    deltas, others = sparsified_deltas(x, method, base.reshape(x.tensors[x.base].shape))
    deltas = deltas.reshape(len(others), -1)
    weights = torch.tensor([x.per_input[i]["weight"] for i in others], dtype=torch.float32,
                           device=out.device).reshape(-1, 1)
    consensus = task_arithmetic_variant(method).consensus
    for start, stop in _spans(dest.numel(), PASS_CHUNK):
        dest[start:stop] = base[start:stop] + _combine(deltas[:, start:stop], weights, consensus,
                                                       x.shared)


# ---------------------------------------------------------------------------------------------
# Importance-weighted methods (mergesearch's own; mergekit has no counterpart)


def _stat(x: TensorInputs, key: str, rows: Sequence[int]) -> Optional[list[torch.Tensor]]:
    """Statistic ``key`` of each input in ``rows`` as float32 on the output's device, or None when
    one of them has none (embeddings and norms have no activation statistics)."""
    if len(x.importance) != len(x.tensors):
        return None
    stats = [x.importance[i].get(key) for i in rows]
    if any(s is None for s in stats):
        return None
    device = x.tensors[0].device
    return [s.to(device=device, dtype=torch.float32) for s in stats]


def importance_coefficients(scores: torch.Tensor, weights: Sequence[float], exponent: float
                            ) -> torch.Tensor:
    """Per-element coefficients ``w_i * s_i^p / sum_j w_j * s_j^p`` of stacked ``scores``.

    Scores are divided by their maximum first (the ratio is unchanged; the power cannot
    overflow). Where every weighted score is zero the coefficients are the plain ``w_i / sum w``.
    """
    w = torch.tensor(list(weights), dtype=torch.float32, device=scores.device)
    w = w.reshape(-1, *([1] * (scores.dim() - 1)))
    top = scores.amax()
    s = (scores / top if top > 0 else torch.ones_like(scores)).pow(exponent)
    weighted = w * s
    total = weighted.sum(dim=0)
    plain = (w / w.sum()).expand_as(weighted)
    ok = total.abs() > 1e-30
    return torch.where(ok, weighted / torch.where(ok, total, torch.ones_like(total)), plain)


def importance_linear(x: TensorInputs, out: torch.Tensor) -> None:
    """``linear`` with per-element weights ``w_i * (|W_i| * ||X_i||_2)^p``, normalised.

    ``p = 0`` and tensors without activation statistics are merged by ``linear`` (normalised)."""
    p = float(x.shared["exponent"])
    acts = _stat(x, "act_l2", range(len(x.tensors)))
    plain = replace(x, shared={"normalize": True})
    if p == 0 or acts is None or x.tensors[0].dim() != 2:
        linear(plain, out)
        return
    weights = [q["weight"] for q in x.per_input]
    check_linear_weights(weights, repr(x.name))
    tensors = torch.stack([t.to(torch.float32) for t in x.tensors])
    scores = tensors.abs() * torch.stack(acts).unsqueeze(1)
    out.copy_((importance_coefficients(scores, weights, p) * tensors).sum(dim=0))


def importance_task_arithmetic(x: TensorInputs, out: torch.Tensor) -> None:
    """Task arithmetic whose task vectors are weighted per element by
    ``w_i * m_i``, ``m_i = s_i^p / mean_j s_j^p`` with ``s_i = |delta_i| * ||X_i||_2``.

    ``p = 0`` (``m_i = 1``) and tensors without activation statistics are ``task_arithmetic``."""
    p = float(x.shared["exponent"])
    others = x.non_base()
    acts = _stat(x, "act_l2", others)
    if p == 0 or acts is None or not others or x.tensors[0].dim() != 2:
        chunked_task_arithmetic(replace(x, shared={**x.shared, "rescale": False}), "task_arithmetic", out)
        return
    base = x.tensors[x.base].to(torch.float32)
    deltas = torch.stack([x.tensors[i].to(torch.float32) - base for i in others])
    scores = deltas.abs() * torch.stack(acts).unsqueeze(1)
    relative = importance_coefficients(scores, [1.0] * len(others), p) * len(others)
    weights = torch.tensor([x.per_input[i]["weight"] for i in others], dtype=torch.float32,
                           device=base.device).reshape(-1, 1, 1)
    out.copy_(base + _combine(deltas, weights * relative, False, x.shared))


def fisher(x: TensorInputs, out: torch.Tensor) -> None:
    """Diagonal Fisher merging: per-element weights ``w_i * max(F_i, floor)``, normalised, with
    ``floor = fisher_floor * mean(F)`` over every input of this tensor (a relative floor, so one
    range fits every tensor). Tensors without Fisher statistics are merged by ``linear``."""
    stats = _stat(x, "fisher", range(len(x.tensors)))
    if stats is None:
        linear(replace(x, shared={"normalize": True}), out)
        return
    weights = [q["weight"] for q in x.per_input]
    check_linear_weights(weights, repr(x.name))
    f = torch.stack(stats).reshape(len(stats), *x.tensors[0].shape)
    floor = float(x.shared["fisher_floor"]) * f.mean()
    tensors = torch.stack([t.to(torch.float32) for t in x.tensors])
    out.copy_((importance_coefficients(torch.maximum(f, floor), weights, 1.0) * tensors).sum(dim=0))


def _whole(fn: Callable[[TensorInputs], torch.Tensor]) -> Callable[[TensorInputs, torch.Tensor], None]:
    def run(x: TensorInputs, out: torch.Tensor) -> None:
        out.copy_(fn(_f32(x)))
    return run


def _gta(name: str) -> Callable[[TensorInputs, torch.Tensor], None]:
    if task_arithmetic_variant(name).sparsification in (None, "random"):
        return lambda x, out: chunked_task_arithmetic(x, name, out)
    return lambda x, out: sparse_task_arithmetic(x, name, out)


IMPLEMENTATIONS: dict[str, Callable[[TensorInputs, torch.Tensor], None]] = {
    "linear": linear,
    "slerp": slerp,
    "nuslerp": _whole(nuslerp),
    "model_stock": _whole(model_stock),
    "passthrough": _whole(passthrough),
    **{name: _gta(name) for name, spec in METHODS.items() if spec.family == "task_arithmetic"},
    "importance_linear": importance_linear,
    "importance_task_arithmetic": importance_task_arithmetic,
    "fisher": fisher,
}


def merge_into(method: str, x: TensorInputs, out: torch.Tensor) -> None:
    """Merge one tensor with the torch reference of `method` into `out` (any float dtype).

    Raises MergeComputationError if the result (after the cast) holds NaN or inf.
    """
    IMPLEMENTATIONS[method](x, out)
    if not all_finite(out):
        raise non_finite_error(x.name, method, int((~torch.isfinite(out)).sum()))


def all_finite(t: torch.Tensor) -> bool:
    """Whether every element of ``t`` is finite.

    A float32 sum is NaN/inf whenever an element is (NaN and inf propagate through every partial
    sum), and is several times faster than ``isfinite`` on 16-bit tensors; only when the sum
    overflows from finite values are the elements checked one by one.
    """
    return bool(torch.isfinite(t.sum(dtype=torch.float32))) or bool(torch.isfinite(t).all())


def non_finite_error(name: str, method: str, count: int) -> MergeComputationError:
    """The error for a merge whose result holds ``count`` NaN/inf values."""
    return MergeComputationError(
        f"Merging {name!r} with {method!r} produced {count} NaN/inf values; check the "
        "sources for NaN/inf weights and the parameters for extreme values."
    )


def merge_tensor(method: str, x: TensorInputs, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Merge one tensor into a new tensor of `dtype`."""
    ref = x.tensors[0]
    out = torch.empty(ref.shape, dtype=dtype, device=ref.device)
    merge_into(method, x, out)
    return out
