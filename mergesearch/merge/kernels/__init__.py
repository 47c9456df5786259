"""Fused Triton merge kernels: one pass over the sources, written straight into the output.

``fused_merge_into(method, x, out)`` merges one tensor with a kernel when it can and returns
True; it returns False, having touched nothing, when the kernel does not apply (a method it does
not cover, Triton not installed, CPU tensors without Triton's interpreter, a tensor-valued
parameter, more than ``MAX_SOURCES`` sources, ...), and the caller uses the torch reference
(``mergesearch.merge.methods.merge_into``). ``unsupported_reason`` says why. Like the reference,
a result holding NaN/inf raises ``MergeComputationError`` naming the tensor.

Each kernel module holds its kernel(s), its launcher and ``reference``, the torch function of
``methods`` that it must match. Nothing here imports Triton until a kernel is asked for.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Optional

if TYPE_CHECKING:
    import torch

    from mergesearch.merge.methods import TensorInputs

COVERED = ("linear", "task_arithmetic", "dare_linear", "dare_ties", "ties", "slerp")
"""The methods with a fused kernel; every other method uses the torch reference."""


def _module(method: str):
    from mergesearch.merge.kernels import linear, slerp, task_arithmetic, ties

    return {"linear": linear, "slerp": slerp, "ties": ties}.get(method, task_arithmetic)


def covers(method: str) -> bool:
    return method in COVERED


def _plan(method: str, x: "TensorInputs", out: "torch.Tensor"
          ) -> tuple[Optional[Callable[[], None]], Optional[str]]:
    if method not in COVERED:
        return None, f"merge method {method!r} is not covered by the fused kernel"
    from mergesearch.merge.kernels import _triton

    if not _triton.available():
        return None, f"the fused kernel is unavailable for {method!r}: triton is not installed"
    module = _module(method)
    if method in ("linear", "slerp"):
        why = module.unsupported(x, out)
        run = lambda: module.launch(x, out, method)  # noqa: E731
    else:
        why = module.unsupported(method, x, out)
        run = lambda: module.launch(method, x, out)  # noqa: E731
    if why:
        return None, f"the fused kernel cannot merge {x.name!r} with {method!r}: {why}"
    return run, None


def unsupported_reason(method: str, x: "TensorInputs", out: "torch.Tensor") -> Optional[str]:
    """Why ``fused_merge_into`` would return False for these arguments, or None."""
    return _plan(method, x, out)[1]


def fused_merge_into(method: str, x: "TensorInputs", out: "torch.Tensor") -> bool:
    """Merge one tensor into ``out`` with the fused kernel; False if it does not apply."""
    run, _ = _plan(method, x, out)
    if run is None:
        return False
    run()
    return True


__all__ = ["COVERED", "covers", "fused_merge_into", "unsupported_reason"]
