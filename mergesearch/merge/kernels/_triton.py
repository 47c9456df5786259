"""Optional Triton: the kernel modules import ``triton``/``tl``/``jit`` from here.

Without Triton installed, ``triton`` is None, ``tl`` is a stand-in whose attributes are None (so
``BLOCK: tl.constexpr`` annotations still evaluate) and ``jit`` returns the plain function: the
kernel modules import, and the launchers are never called. Triton decides once, at its own
import, whether ``@triton.jit`` compiles for the GPU or runs in its CPU interpreter
(``TRITON_INTERPRET=1``); this module only reads that decision.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Optional

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

    class _MissingLanguage:
        def __getattr__(self, name: str) -> Any:
            return None

    tl = _MissingLanguage()


def available() -> bool:
    """Whether Triton imported."""
    return triton is not None


def jit(fn: Callable[..., Any]) -> Any:
    """``triton.jit``, or the plain function when Triton is not installed."""
    return triton.jit(fn) if triton is not None else fn


def interpreting() -> bool:
    """Whether Triton runs kernels in its interpreter (on CPU tensors) rather than compiling."""
    if triton is None:
        return False
    standard_sum = getattr(getattr(triton.language, "standard", None), "sum", None)
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:
        InterpretedFunction = None
    if standard_sum is None or InterpretedFunction is None:
        return os.environ.get("TRITON_INTERPRET", "0") == "1"
    return isinstance(standard_sum, InterpretedFunction)


def unusable_reason(device_type: str) -> Optional[str]:
    """Why kernels cannot run on ``device_type`` tensors in this process, or None if they can."""
    if triton is None:
        return "triton is not installed"
    if interpreting():
        return None
    if device_type != "cuda":
        return (f"{device_type} tensors need Triton's interpreter (set TRITON_INTERPRET=1 before "
                "triton is imported)")
    return None


def launch_options() -> dict[str, Any]:
    """Compiler options for every launch: no FMA contraction, so sums round as torch's do."""
    return {} if interpreting() else {"enable_fp_fusion": False}
