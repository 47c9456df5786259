#!/usr/bin/env python
"""Per-tensor merge bandwidth: mergesearch's merge path vs a plain copy, a naive torch chain and
mergekit 0.1.5's own per-tensor merge, side by side in one run.

For each Qwen2.5-0.5B tensor shape (embedding 151936x896, MLP 4864x896, attention 896x896),
dtype and method, every repeat times in turn:

* **copy**: ``dst.copy_(src)`` over the same number of bytes read + written as the merge;
* **ours**: the path a worker takes on this device: the fused Triton kernel
  (``mergesearch.merge.kernels``) on CUDA; on CPU the Inductor-compiled fused loop
  (``mergesearch.merge.kernels.cpu``) where it applies, else the torch reference; writing into a
  preallocated output (the engine's parameter) and checking for NaN/inf;
* **reference** (CPU): the chunked torch reference (``methods.merge_into``);
* **naive**: a plain chain of torch ops (``sum(w_i * t_i.float())``, then ``.to(dtype)``);
* **mergekit**: mergekit 0.1.5's per-tensor merge function on the same tensors, copied into the
  output.

Bandwidth is (bytes of all inputs + bytes of the output) / median time. The copy ratio is the
issue's target (>= 0.9 on GPU, >= 0.6 on CPU for linear / task_arithmetic / dare).

    python scripts/bench_merge.py --quick                    # well under a minute
    python scripts/bench_merge.py --output bench.md          # full run on this device
    python scripts/bench_merge.py --device cuda --output bench-gpu.md

The whole-candidate figures (materialising into a live engine vs ``mergekit-yaml`` + reload, and
trial overhead) are measured by ``scripts/bench_materialise.py``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import _benchutil as bu  # noqa: E402

from mergesearch.merge import methods  # noqa: E402
from mergesearch.merge.methods import TensorInputs  # noqa: E402
from mergesearch.merge.registry import get_method  # noqa: E402

SHAPES = {
    "embed": (bu.QWEN2_5_0_5B.vocab_size, bu.QWEN2_5_0_5B.hidden_size),
    "mlp": (bu.QWEN2_5_0_5B.intermediate_size, bu.QWEN2_5_0_5B.hidden_size),
    "attn": (bu.QWEN2_5_0_5B.hidden_size, bu.QWEN2_5_0_5B.hidden_size),
}
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}
METHODS = ("linear", "task_arithmetic", "dare_linear", "ties", "slerp")
TARGETED = ("linear", "task_arithmetic", "dare_linear")
WEIGHTS = (0.5, 0.3, 0.2)
DENSITY = 0.5


# --------------------------------------------------------------------------------------------
# Inputs


@dataclass
class Case:
    shape_name: str
    dtype_name: str
    method: str
    tensors: list[torch.Tensor]
    x: TensorInputs
    out: torch.Tensor

    @property
    def bytes_moved(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors) + \
            self.out.numel() * self.out.element_size()


def make_tensors(shape: tuple[int, ...], dtype: torch.dtype, n: int, device: str,
                 seed: int = 0) -> list[torch.Tensor]:
    """A base and ``n - 1`` fine-tunes (base + small noise), built in chunks to bound memory."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    base = (torch.randn(shape, generator=g) * 0.02).to(dtype)
    out = [base.to(device)]
    for _ in range(n - 1):
        t = torch.empty(shape, dtype=dtype)
        flat_b, flat_t = base.reshape(-1), t.reshape(-1)
        for s in range(0, flat_t.numel(), 1 << 24):
            e = min(flat_t.numel(), s + (1 << 24))
            noise = torch.randn(e - s, generator=g) * 0.002
            flat_t[s:e] = flat_b[s:e].float() + noise
        out.append(t.to(device))
    return out


def make_case(shape_name: str, dtype_name: str, method: str, tensors: list[torch.Tensor]) -> Case:
    spec = get_method(method)
    shared = {p.name: p.default for p in spec.shared_params()}
    if method == "linear":
        x = TensorInputs("w", tensors, shared, [{"weight": w} for w in WEIGHTS[:len(tensors)]])
    elif method == "slerp":
        x = TensorInputs("w", tensors[:2], {"t": 0.3}, [{}, {}], base=0)
    else:
        per_input = [{}] + [{"weight": w, "density": DENSITY} for w in WEIGHTS[1:len(tensors)]]
        x = TensorInputs("model.layers.0.mlp.up_proj.weight", tensors, shared, per_input, base=0,
                         seed=1)
    out = torch.empty_like(tensors[0])
    return Case(shape_name, dtype_name, method, list(x.tensors), x, out)


# --------------------------------------------------------------------------------------------
# The contenders


def ours_fn(case: Case, device: str) -> Callable[[], None]:
    """The worker's path on this device: the fused Triton kernel on CUDA, the compiled CPU loop
    (``kernels.cpu``) on CPU where it applies, else the torch reference."""
    if device == "cuda":
        from mergesearch.merge import kernels

        def run() -> None:
            if not kernels.fused_merge_into(case.method, case.x, case.out):
                raise RuntimeError(kernels.unsupported_reason(case.method, case.x, case.out))
        return run
    from mergesearch.merge.kernels import cpu

    def run_cpu() -> None:
        if not cpu.merge_into(case.method, case.x, case.out):
            methods.merge_into(case.method, case.x, case.out)
    return run_cpu


def reference_fn(case: Case) -> Callable[[], None]:
    """The torch reference (``methods.merge_into``), chunked, one op at a time."""
    return lambda: methods.merge_into(case.method, case.x, case.out)


def naive_fn(case: Case) -> Callable[[], None]:
    """A plain chain of whole-tensor torch ops, float32 temporaries, then a cast into the output."""
    x, out = case.x, case.out
    if case.method == "linear":
        w = [p["weight"] for p in x.per_input]

        def run() -> None:
            out.copy_(sum(wi * t.float() for wi, t in zip(w, x.tensors)) / sum(w))
        return run
    if case.method == "slerp":
        def run() -> None:
            a, b = x.tensors[0].float(), x.tensors[1].float()
            dot = ((a / a.norm()) * (b / b.norm())).sum().clamp(-1, 1)
            theta = torch.acos(dot)
            t = x.shared["t"]
            out.copy_((torch.sin((1 - t) * theta) * a + torch.sin(t * theta) * b)
                      / torch.sin(theta))
        return run
    if case.method == "ties":
        return lambda: out.copy_(methods.task_arithmetic_family(methods._f32(x), "ties"))
    w = [x.per_input[i]["weight"] for i in x.non_base()]

    def run() -> None:
        b = x.tensors[0].float()
        total = torch.zeros_like(b)
        for wi, t in zip(w, x.tensors[1:]):
            d = t.float() - b
            if case.method == "dare_linear":
                d = d * (torch.rand_like(d) < DENSITY) / DENSITY
            total += wi * d
        out.copy_(b + total)
    return run


def mergekit_fn(case: Case) -> Optional[Callable[[], None]]:
    """mergekit 0.1.5's per-tensor merge (its batch kernel or group merge), or None."""
    try:
        from mergekit.merge_methods import registry
        from mergekit.merge_methods.base import TensorBatch, TensorGroup
        from mergekit.merge_methods.slerp import slerp as mk_slerp
    except ImportError:
        return None
    x, out = case.x, case.out
    if case.method == "linear":
        method = registry.get("linear")
        weight = torch.tensor([[p["weight"] for p in x.per_input]], device=out.device)

        def run() -> None:
            batch = TensorBatch(tuple(t.unsqueeze(0) for t in x.tensors))
            out.copy_(method.merge_batch(batch, weight=weight, normalize=True)[0])
        return run
    if case.method == "slerp":
        t = torch.tensor([x.shared["t"]], device=out.device)
        return lambda: out.copy_(mk_slerp(t, x.tensors[0].unsqueeze(0),
                                          x.tensors[1].unsqueeze(0))[0])
    method = registry.get(case.method)
    ids = list(range(len(x.tensors)))
    params = {
        "weight": {i: x.per_input[i]["weight"] for i in ids[1:]},
        "density": {i: x.per_input[i]["density"] for i in ids[1:]},
        **{k: x.shared[k] for k in ("normalize", "rescale", "lambda", "int8_mask")},
    }

    def run() -> None:
        group = TensorGroup.from_tensors(x.tensors, ids=ids, base_index=0, name=x.name)
        out.copy_(method.merge_group(group, **params))
    return run


def copy_fn(case: Case) -> Callable[[], None]:
    """``dst.copy_(src)`` moving the merge's bytes: half read, half written."""
    half = case.bytes_moved // 2
    src = torch.empty(half, dtype=torch.uint8, device=case.out.device).fill_(1)
    dst = torch.empty_like(src)
    return lambda: dst.copy_(src)


# --------------------------------------------------------------------------------------------
# Timing


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], None], device: str) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def measure(case: Case, device: str, repeats: int, with_mergekit: bool
            ) -> dict[str, Optional[float]]:
    """Median seconds per contender; contenders alternate within each repeat."""
    fns: dict[str, Optional[Callable[[], None]]] = {
        "copy": copy_fn(case), "ours": ours_fn(case, device),
        "reference": reference_fn(case) if device == "cpu" else None, "naive": naive_fn(case),
        "mergekit": mergekit_fn(case) if with_mergekit else None,
    }
    times: dict[str, list[float]] = {k: [] for k, f in fns.items() if f is not None}
    for fn in fns.values():
        if fn is not None:
            fn()
    for _ in range(repeats):
        for name in times:
            times[name].append(timed(fns[name], device))
            gc.collect()
    return {k: (statistics.median(times[k]) if k in times else None) for k in fns}


# --------------------------------------------------------------------------------------------
# Report


def gbps(nbytes: int, seconds: Optional[float]) -> Optional[float]:
    return nbytes / seconds / 1e9 if seconds else None


def kernel_rows(args: argparse.Namespace) -> list[list[str]]:
    rows = []
    for shape_name in args.shapes:
        for dtype_name in args.dtypes:
            sources = make_tensors(SHAPES[shape_name], DTYPES[dtype_name], 3, args.device)
            for method in args.methods:
                case = make_case(shape_name, dtype_name, method, sources)
                t = measure(case, args.device, args.repeats,
                            not args.no_mergekit and shape_name in args.mergekit_shapes)
                nbytes = case.bytes_moved
                copy, ours = gbps(nbytes, t["copy"]), gbps(nbytes, t["ours"])
                naive, mk = gbps(nbytes, t["naive"]), gbps(nbytes, t["mergekit"])
                row = [shape_name + " " + "x".join(map(str, SHAPES[shape_name])), dtype_name,
                       method, str(len(case.tensors)), f"{nbytes / 1e6:.0f}",
                       bu.fmt_num(copy, 2), bu.fmt_num(ours, 2),
                       bu.fmt_num(ours / copy if ours and copy else None, 2),
                       bu.fmt_num(gbps(nbytes, t["reference"]), 2),
                       bu.fmt_num(naive, 2),
                       bu.fmt_num(t["naive"] / t["ours"] if t["naive"] else None, 2),
                       bu.fmt_num(mk, 2),
                       bu.fmt_num(t["mergekit"] / t["ours"] if t["mergekit"] else None, 2)]
                rows.append(row)
                print("  ".join(row), flush=True)
                del case
                gc.collect()
            del sources
            gc.collect()
    return rows


def kernel_section(args: argparse.Namespace, argv: list[str], info: dict[str, str]) -> str:
    """The per-tensor kernel benchmark as a markdown section."""
    path = ("fused Triton kernel (`mergesearch.merge.kernels`)" if args.device == "cuda"
            else "the CPU dispatch path: the Inductor-compiled fused loop (`mergesearch.merge.kernels.cpu`) "
            "for linear and the task-arithmetic family, the torch reference (`methods.merge_into`) for slerp")
    headers = ["tensor", "dtype", "method", "inputs", "MB moved", "copy GB/s", "ours GB/s",
               "ours/copy", "reference GB/s", "naive GB/s", "naive time/ours", "mergekit GB/s",
               "mergekit time/ours"]
    table = bu.markdown_table(headers, kernel_rows(args), "lllrrrrrrrrrr")
    now = dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    device = (torch.cuda.get_device_name() if args.device == "cuda"
              else f"CPU ({info['cpu']}, {info['cores']}), no GPU")
    return "\n\n".join([
        f"### Per-tensor merge bandwidth ({args.device})",
        f"Date: {now}. Device: {device}. Path measured as *ours*: {path}.",
        f"Reproduce:\n\n```\n{bu.reproduce_command('scripts/bench_merge.py', argv)}\n```",
        "Machine:\n\n" + bu.machine_info_markdown(info),
        (f"Qwen2.5-0.5B tensor shapes, random values (base ~N(0, 0.02), fine-tunes = base + "
         f"N(0, 0.002)); linear over 3 models (weights {WEIGHTS}), task arithmetic family over "
         f"a base + 2 (weights {WEIGHTS[1:]}, density {DENSITY}), slerp over 2 (t = 0.3). "
         f"*MB moved* = bytes of all inputs + the output; GB/s = MB moved / median time of "
         f"{args.repeats} repeat(s), contenders alternating within each repeat. *copy*: "
         "`dst.copy_(src)` moving the same bytes. *reference*: the chunked torch reference "
         "(CPU only). *naive*: whole-tensor torch ops with float32 "
         "temporaries (`sum(w_i * t_i.float())`, DARE with `torch.rand`, TIES as the unchunked "
         "reference), cast into the output. *mergekit*: mergekit 0.1.5's per-tensor merge "
         "(`merge_batch` of its linear kernel, `merge_group` of its task-arithmetic methods, its "
         "`slerp`), copied into the output; it computes in the input dtype. Time ratios > 1 mean "
         "ours is faster."),
        table,
    ]) + "\n"


# --------------------------------------------------------------------------------------------


def _choices(p: argparse.ArgumentParser, value: str, allowed, flag: str) -> list[str]:
    chosen = [v.strip() for v in value.split(",") if v.strip()]
    bad = [v for v in chosen if v not in allowed]
    if bad or not chosen:
        p.error(f"{flag}: unknown {bad or 'empty'}; choose from {','.join(allowed)}")
    return chosen


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                   help="auto: cuda when available")
    p.add_argument("--quick", action="store_true",
                   help="MLP and attention shapes, bf16, linear/task_arithmetic/dare_linear, 1 repeat")
    p.add_argument("--shapes", default=None, help=f"comma list of {','.join(SHAPES)}")
    p.add_argument("--dtypes", default=None, help=f"comma list of {','.join(DTYPES)}")
    p.add_argument("--methods", default=None, help=f"comma list of {','.join(METHODS)}")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats (median); default 3")
    p.add_argument("--no-mergekit", action="store_true", help="skip mergekit's merge")
    p.add_argument("--mergekit-shapes", default=None,
                   help="shapes on which mergekit runs (default: all)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--output", type=Path, help="write the markdown report here")
    p.add_argument("--append", action="store_true", help="append to --output")
    args = p.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is visible")
    quick = args.quick
    args.shapes = _choices(p, args.shapes or ("mlp,attn" if quick else ",".join(SHAPES)),
                           SHAPES, "--shapes")
    args.dtypes = _choices(p, args.dtypes or ("bf16" if quick else "bf16,fp32"), DTYPES,
                           "--dtypes")
    args.methods = _choices(p, args.methods or (",".join(TARGETED) if quick
                                                else ",".join(METHODS)), METHODS, "--methods")
    args.mergekit_shapes = _choices(p, args.mergekit_shapes or ",".join(SHAPES), SHAPES,
                                    "--mergekit-shapes")
    args.repeats = args.repeats or (1 if quick else 3)
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    return args


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    info = bu.machine_info(("torch", "triton", "mergekit", "mergesearch"))
    info["torch threads"] = str(torch.get_num_threads())
    if args.device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    report = kernel_section(args, argv, info)
    print()
    print(report)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        with open(args.output, "a" if args.append else "w") as fh:
            fh.write(report)
        print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
