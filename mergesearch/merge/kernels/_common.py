"""Checks and launch plumbing shared by the kernel launchers."""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Any, Optional

import torch

from mergesearch.merge.kernels import _triton
from mergesearch.merge.methods import TensorInputs, non_finite_error

BLOCK = 2048
NUM_WARPS = 8
MAX_SOURCES = 8
"""Sources beyond this fall back to the torch reference (each source is one kernel argument and
its weighted delta stays in registers)."""

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def layout_problem(tensors: Sequence[torch.Tensor], out: torch.Tensor) -> Optional[str]:
    """Why these tensors cannot be read and written flat by a kernel, or None."""
    if out.dtype not in FLOAT_DTYPES:
        return f"output dtype {out.dtype} (kernels write float32, float16 or bfloat16)"
    bad = _triton.unusable_reason(out.device.type)
    if bad:
        return bad
    for t in tensors:
        if t.dtype not in FLOAT_DTYPES:
            return f"input dtype {t.dtype} (kernels read float32, float16 or bfloat16)"
        if t.device != out.device:
            return f"inputs on {t.device} and output on {out.device}"
        if t.shape != out.shape:
            return f"input shape {tuple(t.shape)} differs from the output's {tuple(out.shape)}"
        if not t.is_contiguous():
            return "a non-contiguous input"
    if not out.is_contiguous():
        return "a non-contiguous output"
    if len(tensors) > MAX_SOURCES + 1:
        return f"{len(tensors)} inputs (the kernels take at most {MAX_SOURCES} besides the base)"
    return None


def scalar_problem(x: TensorInputs, names: Sequence[str], rows: Sequence[int]) -> Optional[str]:
    """Why a per-input parameter is not a plain number (e.g. a per-element tensor), or None."""
    for i in rows:
        for name in names:
            value = x.per_input[i].get(name)
            if value is not None and (isinstance(value, bool)
                                      or not isinstance(value, numbers.Real)):
                return f"a non-scalar {name!r} ({type(value).__name__})"
    for name, value in x.shared.items():
        if isinstance(value, torch.Tensor):
            return f"a tensor-valued {name!r}"
    return None


def grid(numel: int) -> tuple[int]:
    return (max(1, -(-numel // BLOCK)),)


def launch(kernel: Any, numel: int, *args: Any, **constexprs: Any) -> None:
    kernel[grid(numel)](*args, BLOCK=BLOCK, num_warps=NUM_WARPS, **constexprs,
                        **_triton.launch_options())


def bad_counter(out: torch.Tensor) -> torch.Tensor:
    return torch.zeros(1, dtype=torch.int32, device=out.device)


def check_finite(bad: torch.Tensor, x: TensorInputs, method: str) -> None:
    """Raise the reference's MergeComputationError if the kernel counted NaN/inf outputs."""
    count = int(bad.item())
    if count:
        raise non_finite_error(x.name, method, count)
