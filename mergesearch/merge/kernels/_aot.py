"""Compile every kernel variant for a CUDA target ahead of time, without a GPU.

Triton's interpreter accepts some programs the compiler rejects; this catches those on a
CPU-only machine (Triton ships ``ptxas``). Run ``python -m mergesearch.merge.kernels._aot``
without ``TRITON_INTERPRET`` set.
"""

from __future__ import annotations

import sys
from typing import Any

from mergesearch.merge.kernels import _common


def _attrs(fn: Any, signature: dict[str, Any]) -> dict[tuple[int, ...], list]:
    """The alignment hints a launch on 16-byte aligned tensors and a length of 16k gets."""
    hint = [["tt.divisibility", 16]]
    attrs: dict[tuple[int, ...], list] = {}
    for i, name in enumerate(fn.arg_names):
        kind = signature[name]
        if isinstance(kind, tuple):
            attrs.update({(i, j): hint for j, k in enumerate(kind) if k.startswith("*")})
        elif kind.startswith("*") or kind in ("i32", "i64"):
            attrs[(i,)] = hint
    return attrs


def variants() -> list[tuple[Any, dict[str, Any], dict[str, Any]]]:
    """(kernel, signature, constexprs) for each compiled specialisation worth checking."""
    from mergesearch.merge.kernels import linear, slerp, task_arithmetic

    out = []
    for dtypes, normalize in ((("*bf16", "*bf16", "*bf16"), True), (("*fp32", "*fp16"), False)):
        out.append((linear.linear_kernel,
                    {"srcs": dtypes, "w_ptr": "*fp32", "out_ptr": dtypes[0], "bad_ptr": "*i32",
                     "n": "i32", "total": "fp32"},
                    {"N": len(dtypes), "NORMALIZE": normalize}))
    gta_sig = {"base_ptr": "*bf16", "srcs": ("*bf16", "*bf16"), "out_ptr": "*bf16",
               "fp_ptr": "*fp32", "ip_ptr": "*i64", "scale_ptr": "*fp32", "part_ptr": "*fp32",
               "bad_ptr": "*i32", "n": "i64", "divisor": "fp32", "lam": "fp32"}
    for sparse, rescale, consensus, reduce in ((0, False, False, False), (1, True, True, False),
                                               (1, False, False, True), (2, True, True, False)):
        out.append((task_arithmetic.gta_kernel, gta_sig,
                    {"N": 2, "SPARSE": sparse, "RESCALE": rescale, "CONSENSUS": consensus,
                     "NORMALIZE": True, "REDUCE": reduce}))
    out.append((slerp.slerp_reduce_kernel, {"a_ptr": "*fp16", "b_ptr": "*fp16",
                                            "part_ptr": "*fp32", "n": "i32"}, {}))
    out.append((slerp.slerp_kernel, {"a_ptr": "*fp32", "b_ptr": "*fp32", "out_ptr": "*fp16",
                                     "bad_ptr": "*i32", "n": "i32", "coef_a": "fp32",
                                     "coef_b": "fp32"}, {}))
    return out


def compile_all(arch: int = 90) -> list[str]:
    """Compile each variant for ``sm_<arch>``; returns their names, raises on the first error."""
    import triton
    from triton.backends.compiler import GPUTarget

    from mergesearch.merge.kernels import _triton

    if _triton.interpreting():
        raise RuntimeError("TRITON_INTERPRET=1 is set: unset it to compile the kernels.")
    target = GPUTarget("cuda", arch, 32)
    done = []
    for fn, signature, constexprs in variants():
        constexprs = {**constexprs, "BLOCK": _common.BLOCK}
        signature = {**signature, **{k: "constexpr" for k in constexprs}}
        source = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs,
                                           attrs=_attrs(fn, signature))
        triton.compile(source, target=target,
                       options={"num_warps": _common.NUM_WARPS, "enable_fp_fusion": False})
        done.append(f"{fn.__name__}{constexprs}")
    return done


if __name__ == "__main__":
    for line in compile_all(int(sys.argv[1]) if len(sys.argv) > 1 else 90):
        print("compiled", line)
