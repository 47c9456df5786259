"""Fused ``ties``: trim + sign election + disjoint mean in one pass of ``gta_kernel``.

Trimming needs a whole-tensor order statistic, so it is prepared beforehand with torch, per
source: the magnitude threshold (``kthvalue``, as the reference) and the index cut-off for
elements equal to it (``methods.magnitude_cutoff``), plus the L1 rescale factor when ``rescale``
is set. The kernel then keeps ``|d| > threshold`` or ``|d| == threshold and index < cut-off``,
which is exactly the reference's set of kept elements, ties included.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from mergesearch.merge import methods
from mergesearch.merge.kernels import task_arithmetic as gta
from mergesearch.merge.methods import TensorInputs

reference = methods.sparse_task_arithmetic

unsupported = gta.unsupported


def magnitude_tables(x: TensorInputs) -> tuple[list[float], list[int], Optional[torch.Tensor]]:
    """Per non-base source: threshold, cut-off, and the rescale factors (None without rescale)."""
    base = x.tensors[x.base].reshape(-1).to(torch.float32)
    rescale = bool(x.shared["rescale"])
    thresholds, cutoffs, scales = [], [], []
    for i in x.non_base():
        density = x.per_input[i]["density"]
        if density >= 1 or base.numel() == 0:
            thresholds.append(-math.inf)
            cutoffs.append(0)
            scales.append(torch.ones((), device=base.device))
            continue
        if density <= 0:
            thresholds.append(math.inf)
            cutoffs.append(0)
            scales.append(torch.ones((), device=base.device))
            continue
        w = x.tensors[i].reshape(-1).to(torch.float32) - base
        w.abs_()
        threshold, cutoff = methods.magnitude_cutoff(w, density)
        thresholds.append(float(threshold))
        cutoffs.append(cutoff)
        if rescale:
            keep = w > threshold
            if cutoff:
                keep[:cutoff] |= w[:cutoff] == threshold
            before, after = w.sum(), (w * keep).sum()
            small = (before < 1e-7) | (after < 1e-7)
            scales.append(torch.where(small, 1.0, before / torch.where(small, 1.0, after)))
        del w
    return thresholds, cutoffs, (torch.stack(scales).to(torch.float32) if rescale else None)


def launch(method: str, x: TensorInputs, out: torch.Tensor) -> None:
    """ties with the kernel."""
    thresholds, cutoffs, scales = magnitude_tables(x)
    t = gta.prepare(x, out, gta.MAGNITUDE, thresholds, cutoffs, scales)
    gta.run(method, x, out, t, gta.MAGNITUDE, scales is not None)
