"""Importance-weighted merging vs plain linear vs TIES on the demo zoo, at an equal trial budget.

Three studies over the same sources (base + the addition, reverse and order experts), the same
three proxy tasks, the same sampler (TPE) and seed, and the same number of search trials:

* ``importance_linear``: per-model weights in [0.05, 1] and the exponent p in [0, 2]
  (search_spaces/importance_weights.yaml), calibrated on studies/calibration.jsonl;
* ``linear``: per-model weights in [0.05, 1], normalised (the same space with ``normalize`` fixed);
* ``ties``: per-model weights in [0.05, 1], densities, lambda and normalize (method_params).

Each study runs once per sampler seed (``--seeds``) and re-scores its top 3 on the held-out split.
The first table gives, per method, mean ± sd over seeds of the best proxy score, the held-out
score of that trial (per task too), the mean proxy score over trials and the median merge time;
the second each seed; the third the sources alone and the uniform merge (baselines of the first
linear study).

Run (from the repository root, after `mergesearch zoo`), torch on one thread:

    OMP_NUM_THREADS=1 python scripts/bench_importance.py            # 3 seeds x 20 trials per method
    OMP_NUM_THREADS=1 python scripts/bench_importance.py --trials 16 --seeds 0 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
EXPERTS = ("addition", "reverse", "order")
TASKS = ("addition", "reverse", "order")


def _spaces(out: Path) -> dict[str, Path]:
    """Space files for the three studies, written under ``out``."""
    spaces = {
        "importance_linear": {"kind": "method_params", "ranges": {"weight": [0.05, 1.0]}, "fixed": {}},
        "linear": {"kind": "method_params", "ranges": {"weight": [0.05, 1.0]}, "fixed": {"normalize": True}},
        "ties": {"kind": "method_params", "ranges": {"weight": [0.05, 1.0]}, "fixed": {}},
    }
    paths = {}
    for method, space in spaces.items():
        path = out / "spaces" / f"{method}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("# bench_importance search space (see scripts/bench_importance.py)\n"
                        + yaml.safe_dump(space), encoding="utf-8")
        paths[method] = path
    return paths


def _study(method: str, space: Path, out: Path, zoo: Path, trials: int, seed: int, baselines: bool,
           cache: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    study: dict[str, Any] = {
        "name": f"bench_{method}_seed{seed}",
        "sources": {"base": str(zoo / "base"), "models": [str(zoo / "experts" / e) for e in EXPERTS]},
        "method": method,
        "space": str(space),
        "evals": {"tasks": list(TASKS), "chunk_size": 16},
        "sampler": "tpe",
        "budget": {"trials": trials},
        "seed": seed,
        "top_k": 3,
        "baselines": baselines,
        "write_checkpoint": False,
        "output_dir": str(out / method),
    }
    if method == "importance_linear":
        study["calibration"] = {"data": str(ROOT / "studies" / "calibration.jsonl"), "cache_dir": str(cache)}
    path = out / f"{method}.yaml"
    path.write_text(yaml.safe_dump(study, sort_keys=False), encoding="utf-8")
    return path


def _summary(method: str, outcome: Any, wall: float, calib_s: float) -> dict[str, Any]:
    from mergesearch.driver.report import leaderboard

    lb = leaderboard(outcome.study)
    rows = list(lb.rows)
    best = lb.best
    merges = [r.timings.get("materialise_s") for r in rows if r.timings.get("materialise_s") is not None]
    return {
        "method": method,
        "complete": len(rows),
        "best_trial": best.number if best else None,
        "best_proxy": best.value if best else None,
        "best_held_out": best.held_out_value if best else None,
        "best_scores": dict(best.scores) if best else {},
        "best_held_out_scores": dict(best.held_out_scores) if best else {},
        "mean_proxy": statistics.fmean(r.value for r in rows if r.value is not None) if rows else None,
        "median_merge_s": statistics.median(merges) if merges else None,
        "wall_s": wall,
        "calibration_s": calib_s,
        "best_params": (outcome.study.trials[best.number].params if best else {}),
        "baselines": [{"name": b.name, "proxy": b.value, "held_out": b.held_out_value, "scores": dict(b.scores)}
                      for b in lb.baselines if b.state == "complete"],
    }


def _f(x: Any, nd: int = 3) -> str:
    return "—" if x is None else f"{x:.{nd}f}"


def _ms(values: list[Any], nd: int = 3) -> str:
    """mean ± sd (sample) of the non-missing values."""
    v = [x for x in values if x is not None]
    if not v:
        return "—"
    return f"{statistics.fmean(v):.{nd}f}" + (f" ± {statistics.stdev(v):.{nd}f}" if len(v) > 1 else "")


def table(results: list[dict[str, Any]], methods: list[str]) -> str:
    """One row per method over seeds (mean ± sd), then each seed, then the baselines."""
    head = ("| method | seeds x trials | best proxy | held-out of best | "
            + " | ".join(f"{t} held-out of best" for t in TASKS)
            + " | mean proxy over trials | median merge s | study wall s |")
    lines = [head, "|" + " --- |" * (head.count("|") - 1)]
    for m in methods:
        rs = [r for r in results if r["method"] == m]
        if not rs:
            continue
        per = " | ".join(_ms([r["best_held_out_scores"].get(t) for r in rs]) for t in TASKS)
        calib = sum(r["calibration_s"] for r in rs)
        wall = f"{statistics.fmean(r['wall_s'] for r in rs):.0f}" + (f" (+{calib:.0f} calibration)" if calib else "")
        lines.append(f"| **{m}** | {len(rs)} x {rs[0]['complete']} | {_ms([r['best_proxy'] for r in rs])} | "
                     f"{_ms([r['best_held_out'] for r in rs])} | {per} | {_ms([r['mean_proxy'] for r in rs])} | "
                     f"{_ms([r['median_merge_s'] for r in rs], 2)} | {wall} |")
    lines += ["", "| method | seed | best trial | best proxy | held-out of best | "
              + " | ".join(f"{t} proxy / held-out" for t in TASKS) + " | mean proxy over trials |",
              "| --- | ---: | ---: | ---: | ---: | " + " | ".join("---" for _ in TASKS) + " | ---: |"]
    for r in results:
        per = " | ".join(f"{_f(r['best_scores'].get(t))} / {_f(r['best_held_out_scores'].get(t))}" for t in TASKS)
        lines.append(f"| {r['method']} | {r['seed']} | {r['best_trial']} | {_f(r['best_proxy'])} | "
                     f"{_f(r['best_held_out'])} | {per} | {_f(r['mean_proxy'])} |")
    baselines = next((r["baselines"] for r in results if r["baselines"]), [])
    if baselines:
        lines += ["", "| baseline | proxy | held-out | " + " | ".join(f"{t} proxy" for t in TASKS) + " |",
                  "| --- | ---: | ---: | " + " | ".join("---:" for _ in TASKS) + " |"]
        for b in baselines:
            lines.append(f"| {b['name']} | {_f(b['proxy'])} | {_f(b['held_out'])} | "
                         + " | ".join(_f(b["scores"].get(t)) for t in TASKS) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--zoo", type=Path, default=ROOT / "zoo")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "bench_importance")
    p.add_argument("--trials", type=int, default=20, help="search trials per study (default 20)")
    p.add_argument("--seeds", default="0,1,2", help="sampler seeds; one study per method and seed")
    p.add_argument("--methods", default="importance_linear,linear,ties")
    p.add_argument("--json", type=Path, default=None, help="also write the results as JSON")
    args = p.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from mergesearch.cli import _quiet_libraries
    from mergesearch.driver.config import load_study
    from mergesearch.driver.driver import prepare, run_study

    _quiet_libraries()

    if not (args.zoo / "zoo.json").is_file():
        print(f"no demo zoo at {args.zoo}; build it with `mergesearch zoo`", file=sys.stderr)
        return 2
    if args.out.exists():
        shutil.rmtree(args.out)
    args.out.mkdir(parents=True)
    spaces = _spaces(args.out)
    methods = [m for m in args.methods.split(",") if m]
    results = []
    seeds = [int(x) for x in args.seeds.split(",") if x]
    for seed in seeds:
        for method in methods:
            tag = f"{method}-seed{seed}"
            path = _study(method, spaces[method], args.out / f"seed{seed}", args.zoo, args.trials, seed,
                          baselines=(method == "linear" and seed == seeds[0]), cache=args.out / "cache")
            t0 = time.perf_counter()
            prepared = prepare(load_study(path))   # calibrates the sources for importance methods
            calib_s = time.perf_counter() - t0 if method == "importance_linear" else 0.0
            t1 = time.perf_counter()
            outcome = run_study(load_study(path), prepared=prepared, log=lambda m, tag=tag: print(f"[{tag}] {m}", flush=True))
            results.append({**_summary(method, outcome, time.perf_counter() - t1, calib_s), "seed": seed})
            print(f"[{tag}] done in {time.perf_counter() - t0:.0f}s", flush=True)
    print()
    print(table(results, methods))
    for r in results:
        print(f"best {r['method']} seed {r['seed']} (trial {r['best_trial']}): "
              + ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(r["best_params"].items())))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
