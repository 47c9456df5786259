"""Search quality and end-to-end benchmarks on the demo zoo (issue 11).

Every search below is a real study run through the driver (``run_study``: SQLite storage, the
local executor, one worker with the sources resident and the candidate merged in memory into a
live transformers engine), one study per (space, sampler, seed), each in its own folder under
``--out``. Running the script again resumes: finished studies are read back from their storage,
unfinished ones go on to their budget, and each part's figures are written as JSON
(``OUT/part-*.json``) as soon as the part ends, so a partial run is usable.

Parts (``--parts``):

* ``search``: samplers random (Dirichlet draws), CMA-ES, TPE and GP, ``--seeds`` seeds of
  ``--trials`` trials each, on the Dirichlet linear space (5 experts) and on per-layer SLERP
  curves (format expert -> order expert). The random runs are the pool of random draws: the
  best of the first ``--random-pool`` of them (seeds in order) is the bar the other samplers
  must reach. Proxy: addition, format, order, perplexity, ``--limit`` examples per task, one
  round. Reports best proxy vs trials, held-out of each run's pick, trials to reach the bar.
* ``pruning``: TPE on the Dirichlet space, ``--prune-limit`` examples per task in chunks of
  ``--prune-chunk``, without a pruner (``--trials``) and with each of ``--pruners`` (up to
  ``--prune-trials``): examples scored and wall time until each run first reaches the unpruned
  run's final best, and the pruned run's best within the unpruned run's examples.
* ``overfit``: ``--overfit-trials`` random Dirichlet merges scored on the whole proxy split and
  the whole held-out split; the pick of a proxy of the first n examples per task against its
  held-out score, and re-scoring the proxy's top-k on half of held-out (judged on the other half).
* ``e2e``: trials per hour of a study against a merge-to-disk-and-reload loop on the same
  candidates and evals: ``mergekit-yaml`` (a fresh process, as such loops run it) or our writer
  (``run_merge``, in process), then a fresh transformers engine from the folder, then the evals.

Run (needs the demo zoo: ``mergesearch zoo``):

    python scripts/bench_search.py --quick                        # pipeline check, ~2 minutes
    python scripts/bench_search.py --output bench.md              # the figures (~50 min, 2 cores)
    python scripts/bench_search.py --parts search --spaces curves  # one part / one space
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse
import datetime as dt
import json
import math
import random
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
import _benchutil as bu  # noqa: E402

PARTS = ("search", "pruning", "overfit", "e2e")
SAMPLERS = ("random", "cmaes", "tpe", "gp")
EXPERTS = ("addition", "reverse", "format", "code", "order")
PROXY_TASKS = ("addition", "format", "order", "perplexity")
DEMO_TASKS = ("addition", "reverse", "format", "code", "order")
SPACES = {
    "dirichlet": {"method": "linear", "space": "dirichlet_linear", "base": None, "models": EXPERTS},
    "curves": {"method": "slerp", "space": "slerp_curves", "base": "format", "models": ("order",)},
}
NEAR = 0.99
SPACE_LABEL = {"dirichlet": "Dirichlet linear, 5 experts (dirichlet_linear)",
               "curves": "per-layer SLERP curves, format -> order expert (slerp_curves)"}


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--zoo", type=Path, default=ROOT / "zoo", help="the demo zoo")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "bench_search",
                   help="studies, per-part JSON and plots (kept: a second run resumes)")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    p.add_argument("--spaces", default=",".join(SPACES), help="search part: dirichlet, curves")
    p.add_argument("--samplers", default=",".join(SAMPLERS), help="search part: samplers")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--trials", type=int, default=50, help="search trials per run")
    p.add_argument("--random-pool", type=int, default=200, help="random draws whose best is the bar")
    p.add_argument("--limit", type=int, default=16, help="proxy examples per task (search, e2e)")
    p.add_argument("--prune-limit", type=int, default=48, help="proxy examples per task (pruning)")
    p.add_argument("--prune-chunk", type=int, default=8, help="examples per task per round (pruning)")
    p.add_argument("--pruners", default="successive_halving,wilcoxon")
    p.add_argument("--prune-seeds", type=int, default=None, help="default: --seeds")
    p.add_argument("--prune-trials", type=int, default=None,
                   help="trials of each pruned run (default: 2 x --trials): it may take more, cheaper trials to reach "
                        "the unpruned run's best")
    p.add_argument("--overfit-trials", type=int, default=100)
    p.add_argument("--overfit-sizes", default="8,20,48", help="proxy sizes (examples per task)")
    p.add_argument("--top-k", type=int, default=5, help="overfit: proxy top-k re-scored on held-out")
    p.add_argument("--e2e-configs", default="proxy,demo",
                   help="e2e evals: proxy (the search part's) and/or demo (demo.yaml's 5 tasks x 48)")
    p.add_argument("--e2e-trials", type=int, default=20, help="in-memory study trials per e2e config")
    p.add_argument("--e2e-disk", type=int, default=4, help="merge-to-disk candidates per e2e config")
    p.add_argument("--fresh", action="store_true", help="delete --out first")
    p.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                   help="studies run side by side in this many processes (search, pruning); default: 2 or the cores")
    p.add_argument("--held-out-limit", type=int, default=None,
                   help="held-out examples per task when a study re-scores its pick (default: the whole split)")
    p.add_argument("--quick", action="store_true", help="tiny budgets: checks the pipeline, not the figures")
    p.add_argument("--report-only", action="store_true", help="run no part: the report from OUT/part-*.json")
    p.add_argument("--output", type=Path, default=None, help="write the markdown report here (also OUT/report.md)")
    args = p.parse_args(argv)
    args.parts = _subset(p, "--parts", args.parts, PARTS)
    args.spaces = _subset(p, "--spaces", args.spaces, tuple(SPACES))
    args.samplers = _subset(p, "--samplers", args.samplers, SAMPLERS)
    args.e2e_configs = _subset(p, "--e2e-configs", args.e2e_configs, ("proxy", "demo"))
    args.pruners = [s.strip() for s in args.pruners.split(",") if s.strip()]
    if args.quick:
        args.seeds, args.trials, args.random_pool, args.limit = 1, 5, 8, 4
        args.prune_limit, args.prune_chunk, args.overfit_trials = 8, 4, 8
        args.overfit_sizes, args.top_k, args.e2e_trials, args.e2e_disk = "2,4,8", 3, 3, 1
        args.e2e_configs = ["proxy"]
        args.held_out_limit = 4
    args.overfit_sizes = sorted({int(s) for s in str(args.overfit_sizes).split(",") if s.strip()})
    args.prune_seeds = args.prune_seeds or args.seeds
    args.prune_trials = args.prune_trials or 2 * args.trials
    if "random" not in args.samplers and "search" in args.parts and not args.report_only:
        p.error("--samplers must include random: its runs are the pool of random draws")
    return args


def _subset(p: argparse.ArgumentParser, flag: str, value: str, allowed: Sequence[str]) -> list[str]:
    wanted = [s.strip() for s in value.split(",") if s.strip()]
    if bad := [s for s in wanted if s not in allowed]:
        p.error(f"{flag}: unknown {', '.join(bad)}; use {', '.join(allowed)}")
    return [s for s in allowed if s in wanted]


def log(msg: str) -> None:
    print(f"[{dt.datetime.now(dt.timezone.utc):%H:%M:%S}] {msg}", flush=True)


# --------------------------------------------------------------------------- studies


def study_file(args: argparse.Namespace, name: str, *, space: str = "dirichlet", sampler: str = "tpe",
               seed: int = 0, trials: int, tasks: Sequence[str] = PROXY_TASKS, limit: int | None,
               chunk: int | None = None, pruner: str = "none", folder: Path | None = None) -> Any:
    """A study on the zoo, as a user would write it; baselines off, the pick re-scored on held-out."""
    from mergesearch.driver.config import parse_study

    s = SPACES[space]
    zoo = args.zoo.resolve()
    raw = {
        "name": name,
        "sources": {"models": [str(zoo / "experts" / m) for m in s["models"]],
                    **({"base": str(zoo / "experts" / s["base"])} if s["base"] else {})},
        "method": s["method"], "space": s["space"],
        "evals": {"tasks": list(tasks), "proxy_limit": limit, "held_out_limit": args.held_out_limit,
                  "chunk_size": chunk or limit or 48},
        "sampler": sampler, "pruner": pruner, "budget": {"trials": trials}, "seed": seed,
        "baselines": False, "top_k": 1, "write_checkpoint": False,
        "output_dir": str(folder or args.out / "studies" / name),
        "engine": {"backend": "transformers", "dtype": "float32", "device": "cpu"},
    }
    return parse_study(raw, f"bench study {name}", ROOT / "studies" / f"{name}.yaml")


def run(sf: Any) -> dict[str, Any]:
    """Run or resume the study to its budget; its trials and the held-out score of its pick."""
    from optuna.trial import TrialState

    from mergesearch.driver.driver import run_study, scalar_value

    name = sf.config.name
    start = time.perf_counter()
    outcome = run_study(sf, log=lambda m: None)
    wall = time.perf_counter() - start
    meta = json.loads(json.dumps(outcome.study.user_attrs["mergesearch"]))
    weights = meta["weights"]
    trials = []
    for t in sorted(outcome.study.get_trials(deepcopy=False), key=lambda t: t.number):
        if t.state not in (TrialState.COMPLETE, TrialState.PRUNED):
            continue
        scores = t.user_attrs.get("scores") or {}
        trials.append({
            "number": t.number, "state": t.state.name,
            "value": scalar_value(scores, weights) if t.state == TrialState.COMPLETE else None,
            "examples": sum((t.user_attrs.get("scored") or {}).values()),
            "start": t.datetime_start.timestamp(), "end": t.datetime_complete.timestamp(),
            "timings": t.user_attrs.get("timings") or {}, "params": t.params,
            "per_example": t.user_attrs.get("examples") or {}, "plan": t.user_attrs.get("plan"),
        })
    best = outcome.best_trial
    held = outcome.study.user_attrs.get(f"held_out:{best}") if best is not None else None
    log(f"{name}: {len(trials)} trials, best {best} proxy "
        f"{max((t['value'] for t in trials if t['value'] is not None), default=float('nan')):.4f}"
        f" held-out {held['value'] if held else float('nan'):.4f} ({wall:.0f}s)")
    return {"name": name, "trials": trials, "best": best, "held_out": held["value"] if held else None,
            "weights": weights, "wall_s": wall}


def _run_spec(args: argparse.Namespace, spec: dict[str, Any]) -> dict[str, Any]:
    import optuna
    import torch

    torch.set_num_threads(1)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return lean(run(study_file(args, **spec)))


def run_studies(args: argparse.Namespace, specs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Run (or resume) each study of ``specs`` (``study_file`` keywords), ``--jobs`` side by side; results in order.

    Each study is single-threaded (one torch thread, one worker), so on 2 cores two of them run
    without slowing each other much; every figure is a score, a count or a ratio within one study.
    The processes start once and serve every part (each imports torch and transformers).
    """
    global _POOL
    if args.jobs <= 1 or len(specs) <= 1:
        return [_run_spec(args, spec) for spec in specs]
    if _POOL is None:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        _POOL = ProcessPoolExecutor(max_workers=args.jobs, mp_context=multiprocessing.get_context("spawn"))
    futures = [_POOL.submit(_run_spec, args, spec) for spec in specs]
    return [f.result() for f in futures]


_POOL: Any = None


def best_so_far(values: Sequence[float | None]) -> list[float]:
    out, best = [], -math.inf
    for v in values:
        if v is not None:
            best = max(best, v)
        out.append(best)
    return out


def first_reach(values: Sequence[float | None], bar: float) -> int | None:
    """1-based trial count at which the best so far first reaches ``bar`` (None: never)."""
    for i, b in enumerate(best_so_far(values), 1):
        if b >= bar - 1e-12:
            return i
    return None


def censored_median(values: Sequence[float | None], *, missing_is_largest: bool = True) -> float | None:
    """Median where None means 'not reached': larger than any number (trials to a bar), or smaller
    (a ratio that was never measured); None if the median itself was not reached."""
    missing = math.inf if missing_is_largest else -math.inf
    vals = sorted(values, key=lambda v: missing if v is None else v)
    if not vals:
        return None
    mid = len(vals) // 2
    if len(vals) % 2:
        return vals[mid]
    a, b = vals[mid - 1], vals[mid]
    return None if a is None or b is None else (a + b) / 2


def save(args: argparse.Namespace, part: str, data: dict[str, Any]) -> None:
    path = args.out / f"part-{part}.json"
    path.write_text(json.dumps(data, indent=1, default=str) + "\n")
    log(f"wrote {path}")


def lean(run_: dict[str, Any]) -> dict[str, Any]:
    keep = ("number", "state", "value", "examples", "start", "end", "timings")
    return {**run_, "trials": [{k: t[k] for k in keep} for t in run_["trials"]]}


def zoo_worker(args: argparse.Namespace, tasks: Sequence[str], chunk: int, limits: dict[str, int | None]) -> Any:
    """A worker over the 5 experts (the Dirichlet space's sources), as a study's local executor builds it."""
    from mergesearch.workers.worker import Worker, WorkerSetup

    zoo = args.zoo.resolve()
    paths = tuple(str(p) for p in (ROOT / "evals" / f"{t}.yaml" for t in tasks))
    setup = WorkerSetup(sources=tuple(str(zoo / "experts" / m) for m in EXPERTS),
                        engine_dir=str(zoo / "experts" / EXPERTS[0]), tasks=paths, chunk_size=chunk, limits=limits)
    return Worker(setup, name="bench")


# --------------------------------------------------------------------------- part 1: search


def part_search(args: argparse.Namespace) -> dict[str, Any]:
    config = {"seeds": args.seeds, "trials": args.trials, "random_pool": args.random_pool, "limit": args.limit,
              "tasks": list(PROXY_TASKS)}
    path = args.out / "part-search.json"
    earlier = json.loads(path.read_text()) if path.exists() else {}
    out: dict[str, Any] = {"config": config,
                           "spaces": earlier.get("spaces", {}) if earlier.get("config") == config else {}}
    n_random = max(args.seeds, math.ceil(args.random_pool / args.trials))
    for space in args.spaces:
        keys = [(sampler, seed) for sampler in args.samplers
                for seed in range(n_random if sampler == "random" else args.seeds)]
        done = run_studies(args, [{"name": f"search-{space}-{sampler}-s{seed}", "space": space, "sampler": sampler,
                                   "seed": seed, "trials": args.trials, "limit": args.limit} for sampler, seed in keys])
        runs: dict[str, list[dict[str, Any]]] = {}
        for (sampler, _seed), r in zip(keys, done):
            runs.setdefault(sampler, []).append(r)
        pool = [t["value"] for r in runs["random"] for t in r["trials"]][: args.random_pool]
        bar = max(v for v in pool if v is not None)
        summary = {}
        for sampler, rs in runs.items():
            rs = rs[: args.seeds]
            curves = [best_so_far([t["value"] for t in r["trials"]]) for r in rs]
            reach = [first_reach([t["value"] for t in r["trials"]], bar) for r in rs]
            summary[sampler] = {
                "curves": curves, "reach": reach, "reach_median": censored_median(reach),
                "final": [c[-1] for c in curves], "held_out": [r["held_out"] for r in rs],
                "trial_s": statistics.median(t["timings"].get("total_s", 0) for r in rs for t in r["trials"]),
                "study_s": [r["wall_s"] for r in rs],
            }
        out["spaces"][space] = {"bar": bar, "pool_size": len(pool), "summary": summary, "runs": runs}
        if path.exists():
            on_disk = json.loads(path.read_text())
            if on_disk.get("config") == config:
                out["spaces"] = {**on_disk["spaces"], space: out["spaces"][space]}
        save(args, "search", out)
    return out


# --------------------------------------------------------------------------- part 2: pruning


def part_pruning(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {"config": {"seeds": args.prune_seeds, "trials": args.trials, "pruned_trials": args.prune_trials,
                                      "limit": args.prune_limit, "chunk": args.prune_chunk, "sampler": "tpe",
                                      "space": "dirichlet"},
                           "runs": {}}
    keys = [(pruner, seed) for pruner in ["none", *args.pruners] for seed in range(args.prune_seeds)]
    done = run_studies(args, [{"name": f"prune-{pruner}-s{seed}", "sampler": "tpe", "seed": seed,
                               "trials": args.trials if pruner == "none" else args.prune_trials,
                               "limit": args.prune_limit, "chunk": args.prune_chunk, "pruner": pruner}
                              for pruner, seed in keys])
    for (pruner, _seed), r in zip(keys, done):
        out["runs"].setdefault(pruner, []).append(r)
    save(args, "pruning", out)
    return out


def compare_pruned(base: dict[str, Any], pruned: dict[str, Any]) -> dict[str, Any]:
    """Examples and wall time each run needs to reach the unpruned run's final best (the same best)."""
    def cumulative(r: dict[str, Any], n: int) -> tuple[int, float]:
        return sum(t["examples"] for t in r["trials"][:n]), r["trials"][n - 1]["end"] - r["trials"][0]["start"]

    bar = best_so_far([t["value"] for t in base["trials"]])[-1]
    budget = sum(t["examples"] for t in base["trials"])
    row: dict[str, Any] = {
        "bar": bar, "final_pruned": best_so_far([t["value"] for t in pruned["trials"]])[-1],
        "trials_pruned": len(pruned["trials"]), "pruned_trials": sum(t["state"] == "PRUNED" for t in pruned["trials"]),
        "examples_total": [budget, sum(t["examples"] for t in pruned["trials"])],
        "worker_total": [sum(t["timings"].get("total_s", 0.0) for t in r["trials"]) for r in (base, pruned)],
    }
    spent, best_in_budget = 0, None
    for t in pruned["trials"]:
        spent += t["examples"]
        if spent > budget:
            break
        if t["value"] is not None and (best_in_budget is None or t["value"] > best_in_budget):
            best_in_budget = t["value"]
    row["pruned_best_in_budget"] = best_in_budget
    for key, r in (("none", base), ("pruned", pruned)):
        n = first_reach([t["value"] for t in r["trials"]], bar)
        row[f"reach_{key}"] = n
        row[f"examples_{key}"], row[f"wall_{key}"] = cumulative(r, n) if n else (None, None)
    reached = row["reach_pruned"] is not None
    row["examples_ratio"] = row["examples_none"] / max(row["examples_pruned"], 1) if reached else None
    row["wall_ratio"] = row["wall_none"] / max(row["wall_pruned"], 1e-9) if reached else None
    return row


# --------------------------------------------------------------------------- part 3: overfit


def part_overfit(args: argparse.Namespace) -> dict[str, Any]:
    from mergesearch.workers.worker import Job

    full = max(args.overfit_sizes)
    pool = run(study_file(args, "overfit-pool", sampler="random", seed=0, trials=args.overfit_trials, limit=full))
    weights = pool["weights"]
    cache_path = args.out / "overfit-held-out.json"
    cache: dict[str, dict[str, list[float]]] = json.loads(cache_path.read_text()) if cache_path.exists() else {}
    todo = [t for t in pool["trials"] if str(t["number"]) not in cache]
    if todo:
        worker = zoo_worker(args, PROXY_TASKS, 96, {"held_out": None if not args.quick else 2 * full})
        try:
            for i, t in enumerate(todo):
                res = worker.run(Job(key=str(t["number"]), plan=t["plan"], split="held_out"))
                cache[str(t["number"])] = res.examples
                if i % 10 == 9 or i == len(todo) - 1:
                    cache_path.write_text(json.dumps(cache))
                    log(f"overfit: {len(cache)}/{len(pool['trials'])} scored on held-out")
        finally:
            worker.close()

    def mean_of(examples: dict[str, list[float]], lo: int, hi: int | None) -> float:
        total = sum(weights.values())
        return sum(w * statistics.fmean(examples[t][lo:hi]) for t, w in weights.items()) / total

    cands = []
    for t in pool["trials"]:
        held = cache[str(t["number"])]
        half = min(len(v) for v in held.values()) // 2
        cands.append({"number": t["number"],
                      "proxy": {str(n): mean_of(t["per_example"], 0, n) for n in args.overfit_sizes},
                      "held_out": mean_of(held, 0, None), "held_a": mean_of(held, 0, half),
                      "held_b": mean_of(held, half, 2 * half)})
    rng = random.Random(0)
    subsets = [list(range(len(cands)))] + [rng.sample(range(len(cands)), max(2, len(cands) // 2))
                                           for _ in range(200)]
    rows = []
    for n in args.overfit_sizes:
        picks = {"proxy": [], "rescored": [], "gap": [], "gap_b": [], "same": 0}
        for sub in subsets:
            ranked = sorted(sub, key=lambda i: -cands[i]["proxy"][str(n)])
            top = ranked[0]
            res = max(ranked[: args.top_k], key=lambda i: cands[i]["held_a"])
            picks["proxy"].append(cands[top]["held_b"])
            picks["rescored"].append(cands[res]["held_b"])
            picks["gap"].append(cands[top]["proxy"][str(n)] - cands[top]["held_out"])
            picks["gap_b"].append(cands[top]["proxy"][str(n)] - cands[top]["held_b"])
            picks["same"] += top == res
        top = cands[max(range(len(cands)), key=lambda i: cands[i]["proxy"][str(n)])]
        rows.append({
            "n": n, "pick": top["number"], "pick_proxy": top["proxy"][str(n)],
            "pick_held_out": top["held_out"], "pick_gap": top["proxy"][str(n)] - top["held_out"],
            "boot_gap": statistics.fmean(picks["gap"]), "boot_gap_b": statistics.fmean(picks["gap_b"]),
            "boot_proxy_pick_b": statistics.fmean(picks["proxy"]),
            "boot_rescored_pick_b": statistics.fmean(picks["rescored"]),
            "boot_rescore_better": sum(r > p for r, p in zip(picks["rescored"], picks["proxy"])) / len(subsets),
            "boot_rescore_worse": sum(r < p for r, p in zip(picks["rescored"], picks["proxy"])) / len(subsets),
            "boot_same": picks["same"] / len(subsets),
        })
    oracle_b = max(c["held_b"] for c in cands)
    out = {"config": {"trials": args.overfit_trials, "sizes": args.overfit_sizes, "top_k": args.top_k,
                      "subsets": len(subsets) - 1, "held_out_examples": {t: len(v) for t, v in
                                                                         cache[str(pool['trials'][0]['number'])].items()}},
           "rows": rows, "oracle_b": oracle_b, "mean_b": statistics.fmean(c["held_b"] for c in cands),
           "candidates": cands}
    save(args, "overfit", out)
    return out


# --------------------------------------------------------------------------- part 4: e2e


def disk_candidate(tool: str, plan_text: str, tmp: Path, tasks: Any, limit: int | None, chunk: int) -> dict[str, Any]:
    """Merge one candidate to a folder, build a fresh engine from it and score the proxy split."""
    from mergesearch.eval.runner import evaluate_interleaved
    from mergesearch.merge.executor import run_merge
    from mergesearch.plan import loads_plan
    from mergesearch.workers.worker import WorkerSetup, build_engine

    out_dir = tmp / f"merged-{tool}"
    shutil.rmtree(out_dir, ignore_errors=True)
    t0 = time.perf_counter()
    if tool == "mergekit":
        cfg = tmp / "candidate.yaml"
        cfg.write_text(plan_text)
        exe = shutil.which("mergekit-yaml") or "mergekit-yaml"
        res = bu.run_measured([exe, str(cfg), str(out_dir)], env={**os.environ, "OMP_NUM_THREADS": "1"},
                              timeout_s=600)
        if not res.ok:
            raise RuntimeError(f"mergekit-yaml failed ({res.returncode}): {res.stderr_tail[-1500:]}")
    else:
        run_merge(loads_plan(plan_text), out_dir, force=True)
    t1 = time.perf_counter()
    engine = build_engine(WorkerSetup(sources=(), engine_dir=str(out_dir), tasks=()))
    t2 = time.perf_counter()
    try:
        results = evaluate_interleaved(engine, tasks, "proxy", chunk_size=chunk, limit=limit)
    finally:
        engine.close()
    t3 = time.perf_counter()
    shutil.rmtree(out_dir, ignore_errors=True)
    return {"merge_s": t1 - t0, "load_s": t2 - t1, "eval_s": t3 - t2, "total_s": t3 - t0,
            "scores": {r.task: r.mean for r in results}}


def in_memory_candidate(worker: Any, plan_text: str) -> dict[str, Any]:
    """What a study's worker does with the candidate: merge into the live engine, score the proxy split."""
    from mergesearch.workers.worker import Job

    t0 = time.perf_counter()
    res = worker.run(Job(key="e2e", plan=plan_text, split="proxy"))
    return {"merge_s": res.timings["materialise_s"], "load_s": 0.0, "eval_s": res.timings["eval_s"],
            "total_s": time.perf_counter() - t0, "scores": res.scores}


def part_e2e(args: argparse.Namespace) -> dict[str, Any]:
    from mergesearch.eval.tasks import load_tasks

    out: dict[str, Any] = {"configs": {}}
    have_mergekit = shutil.which("mergekit-yaml") is not None
    for cfg in args.e2e_configs:
        tasks_, limit, chunk = (PROXY_TASKS, args.limit, args.limit) if cfg == "proxy" else (DEMO_TASKS, None, 16)
        name = f"e2e-{cfg}"
        folder = args.out / "studies" / name
        shutil.rmtree(folder, ignore_errors=True)
        study = run(study_file(args, name, sampler="tpe", seed=0, trials=args.e2e_trials, tasks=tasks_,
                               limit=limit, chunk=chunk, folder=folder))
        tr = study["trials"]
        span = tr[-1]["end"] - tr[0]["start"]
        tasks = load_tasks(list(tasks_), [ROOT / "evals"])
        disk: dict[str, list[dict[str, Any]]] = {}
        tools = ["memory", *(["mergekit"] if have_mergekit else []), "ours"]
        worker = zoo_worker(args, tasks_, chunk, {"proxy": limit})
        with tempfile.TemporaryDirectory(prefix="bench-search-", dir=args.out) as tmp:
            for t in tr[: args.e2e_disk]:
                for tool in tools:
                    if tool == "memory":
                        r = in_memory_candidate(worker, t["plan"])
                    else:
                        r = disk_candidate(tool, t["plan"], Path(tmp), tasks, limit, chunk)
                    r["diff"] = max(abs(v - statistics.fmean(t["per_example"][k])) for k, v in r["scores"].items())
                    disk.setdefault(tool, []).append(r)
                    log(f"e2e {cfg}: trial {t['number']} via {tool}: {r['total_s']:.2f}s "
                        f"(merge {r['merge_s']:.2f}, load {r['load_s']:.2f}, eval {r['eval_s']:.2f}), "
                        f"score diff {r['diff']:.2g}")
        worker.close()
        out["configs"][cfg] = {
            "tasks": list(tasks_), "limit": limit, "trials": len(tr), "study_wall_s": study["wall_s"],
            "span_s": span, "trial_s": statistics.median(t["timings"]["total_s"] for t in tr),
            "materialise_s": statistics.median(t["timings"]["materialise_s"] for t in tr),
            "eval_s": statistics.median(t["timings"]["eval_s"] for t in tr),
            "disk": {tool: {"n": len(rs), **{k: statistics.median(r[k] for r in rs)
                                             for k in ("merge_s", "load_s", "eval_s", "total_s")},
                            "max_diff": max(r["diff"] for r in rs)} for tool, rs in disk.items()},
        }
        save(args, "e2e", out)
    return out


# --------------------------------------------------------------------------- report


def _f(v: float | None, d: int = 3) -> str:
    return "-" if v is None else f"{v:.{d}f}"


def _spread(vals: Sequence[float | None], d: int = 3) -> str:
    v = [x for x in vals if x is not None]
    if not v:
        return "-"
    return f"{statistics.median(v):.{d}f} [{min(v):.{d}f}, {max(v):.{d}f}]"


def _times(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}x"


def _reach(v: float | None, limit: int) -> str:
    return f">{limit}" if v is None else f"{v:g}"


def report_search(data: dict[str, Any], plots: Path) -> list[str]:
    c = data["config"]
    lines = [f"{c['seeds']} seeds x {c['trials']} trials per sampler; proxy: {', '.join(c['tasks'])}, "
             f"{c['limit']} examples per task; bar = best of the first {c['random_pool']} random draws "
             "(the random runs, seeds in order). *best@n*: best proxy score after n trials, median "
             "[min, max] over seeds; *held-out*: the driver's held-out re-score of each run's pick; "
             "*trials to bar*: per seed (`>N`: not within the run), median.", ""]
    for space, sd in data["spaces"].items():
        n = c["trials"]
        marks = sorted({m for m in (5, 10, 25, n) if m <= n})
        rows = []
        for sampler, s in sd["summary"].items():
            near = [next((i for i, v in enumerate(cv, 1) if v >= NEAR * sd["bar"]), None) for cv in s["curves"]]
            rows.append([sampler, *[_spread([cv[m - 1] for cv in s["curves"]]) for m in marks],
                         _spread(s["held_out"]), " ".join(_reach(r, n) for r in s["reach"]),
                         _reach(s["reach_median"], n), _reach(censored_median(near), n)])
        bar_runs = [r for r in sd["runs"]["random"] if r["trials"] and max(
            (t["value"] for t in r["trials"] if t["value"] is not None), default=None) == sd["bar"]]
        held = f"; its held-out score {bar_runs[0]['held_out']:.4f}" if bar_runs and bar_runs[0]["held_out"] else ""
        lines += [f"**{SPACE_LABEL[space]}**: bar {sd['bar']:.4f} (best of {sd['pool_size']} random draws{held}).",
                  "", bu.markdown_table(["sampler", *[f"best@{m}" for m in marks], "held-out of pick",
                                         "trials to bar (per seed)", "median",
                                         f"median trials to {100 * NEAR:g}% of bar"], rows,
                                        "l" + "r" * (len(marks) + 4)), ""]
    lines += ["Cost per trial (medians over the runs): *merge* and *eval* from the trials' stored timings; "
              "*driver* = (first trial start to last trial end) / trials - merge - eval: asking the sampler, "
              "the storage writes, the executor hand-off; *study* = the whole `run_study` call / trials (worker "
              "set-up and the held-out re-score of the pick included).", ""]
    rows = []
    for space, sd in data["spaces"].items():
        for sampler, rs in sd["runs"].items():
            merge = statistics.median(t["timings"]["materialise_s"] for r in rs for t in r["trials"])
            ev = statistics.median(t["timings"]["eval_s"] for r in rs for t in r["trials"])
            span = statistics.median((r["trials"][-1]["end"] - r["trials"][0]["start"]) / len(r["trials"]) for r in rs)
            study = statistics.median(r["wall_s"] / len(r["trials"]) for r in rs)
            rows.append([space, sampler, len(rs), _f(merge), _f(ev), _f(span - merge - ev), _f(span), _f(study),
                         f"{100 * (span - merge - ev) / span:.0f}%"])
    lines += [bu.markdown_table(["space", "sampler", "runs", "merge s", "eval s", "driver s", "wall s per trial",
                                 "study s per trial", "driver share"], rows, "llrrrrrrr"), ""]
    plot_search(data, plots)
    return lines


def pyplot() -> Any:
    """matplotlib's pyplot on the file-only Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_png(fig: Any, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_search(data: dict[str, Any], plots: Path) -> None:
    plt = pyplot()
    spaces = list(data["spaces"])
    fig, axes = plt.subplots(1, len(spaces), figsize=(6 * len(spaces), 4), squeeze=False)
    for ax, space in zip(axes[0], spaces):
        sd = data["spaces"][space]
        for sampler, s in sd["summary"].items():
            n = len(s["curves"][0])
            xs = list(range(1, n + 1))
            cols = list(zip(*s["curves"]))
            ax.plot(xs, [statistics.median(c) for c in cols], label=sampler)
            ax.fill_between(xs, [min(c) for c in cols], [max(c) for c in cols], alpha=0.15)
        ax.axhline(sd["bar"], color="k", ls="--", lw=1, label=f"best of {sd['pool_size']} random")
        ax.set_title(SPACE_LABEL[space], fontsize=9)
        ax.set_xlabel("trials")
        ax.set_ylabel("best proxy score so far")
        ax.legend(fontsize=8)
    save_png(fig, plots / "bench-search-samplers.png")


def report_pruning(data: dict[str, Any], plots: Path) -> list[str]:
    c = data["config"]
    pruned_n = c.get("pruned_trials", c["trials"])
    lines = [f"TPE on the Dirichlet space, {c['seeds']} seeds; {c['limit']} proxy examples per task in rounds of "
             f"{c['chunk']} (one round = {c['chunk']} of every task). Each seed: one run without a pruner "
             f"({c['trials']} trials) and one with each pruner (up to {pruned_n} trials, as pruned trials are "
             "cheaper). *bar*: the unpruned run's final best (the same best for both); *examples / wall to bar*: "
             "examples scored (pruned trials included) and wall time from the first trial's start until the best "
             "so far first reaches the bar (`-`: not within the pruned run's trials); *best within the unpruned "
             "run's examples*: the pruned run's best before it has scored as many examples as the whole unpruned "
             "run; *worker s*: the trials' merge + eval time, summed.", ""]
    rows = []
    runs = data["runs"]
    compare = {pruner: [compare_pruned(base, pruned) for base, pruned in zip(runs["none"], rs)]
               for pruner, rs in runs.items() if pruner != "none"}
    for pruner, rs in compare.items():
        for i, r in enumerate(rs):
            rows.append([pruner, i, _f(r["bar"]), _f(r["pruned_best_in_budget"]), _f(r["final_pruned"]),
                         f"{r['pruned_trials']} / {r['trials_pruned']}",
                         f"{r['reach_none']} / {r['reach_pruned'] or '-'}",
                         f"{r['examples_none']} / {r['examples_pruned'] or '-'}", _times(r["examples_ratio"]),
                         f"{r['wall_none']:.0f} / {_f(r['wall_pruned'], 0)}",
                         _times(r["wall_ratio"]), f"{r['examples_total'][0]} / {r['examples_total'][1]}",
                         f"{r['worker_total'][0]:.0f} / {r['worker_total'][1]:.0f}"])
        med_ex, med_wall = (censored_median([r[k] for r in rs], missing_is_largest=False)
                            for k in ("examples_ratio", "wall_ratio"))
        reached = sum(r["reach_pruned"] is not None for r in rs)
        rows.append([f"**{pruner}, median**", f"reached {reached}/{len(rs)}", _f(statistics.median(r["bar"] for r in rs)),
                     _f(statistics.median(r["pruned_best_in_budget"] or 0.0 for r in rs)),
                     _f(statistics.median(r["final_pruned"] for r in rs)), "", "", "",
                     f"**{_times(med_ex)}**", "", f"**{_times(med_wall)}**", "", ""])
    lines += [bu.markdown_table(["pruner", "seed", "bar (unpruned best)", "pruned: best within the unpruned run's examples",
                                 "pruned: final best", "pruned / all trials", "trials to bar none / pruned",
                                 "examples to bar none / pruned", "examples ratio", "wall s to bar none / pruned",
                                 "wall ratio", "examples, whole runs", "worker s, whole runs"], rows,
                                "llrrrrrrrrrrr"), ""]
    plot_pruning(data, plots)
    return lines


def plot_pruning(data: dict[str, Any], plots: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for (pruner, rs), color in zip(data["runs"].items(), ("C0", "C1", "C2", "C3")):
        for i, r in enumerate(rs):
            xs, total = [], 0
            for t in r["trials"]:
                total += t["examples"]
                xs.append(total)
            ax.step(xs, best_so_far([t["value"] for t in r["trials"]]), where="post", color=color, alpha=0.6,
                    label=pruner if i == 0 else None)
    ax.set_xscale("log")
    ax.set_xlabel("examples scored (cumulative)")
    ax.set_ylabel("best proxy score so far")
    ax.set_title("TPE, Dirichlet linear: with and without pruning (one line per seed)", fontsize=9)
    ax.legend(fontsize=8)
    save_png(fig, plots / "bench-search-pruning.png")


def report_overfit(data: dict[str, Any], plots: Path) -> list[str]:
    c = data["config"]
    held = ", ".join(f"{k} {v}" for k, v in c["held_out_examples"].items())
    lines = [f"{c['trials']} random Dirichlet merges (5 experts), each scored on the whole proxy split and the "
             f"whole held-out split ({held} examples). A proxy of n examples per task is the first n of "
             "each task (what `evals.proxy_limit: n` scores). *pick*: the best of all candidates by that proxy. "
             f"Then over {c['subsets']} random halves of the pool: *gap* = proxy - held-out of the pick; "
             f"*held-out B*: the pick's score on the second half of held-out; *re-scored*: the proxy's "
             f"top-{c['top_k']} re-scored on the first half of held-out (A), the best there picked, judged on B. "
             f"Mean held-out B of all candidates: {data['mean_b']:.4f}; best: {data['oracle_b']:.4f}.", ""]
    rows = [[r["n"], r["pick"], _f(r["pick_proxy"]), _f(r["pick_held_out"]), f"{r['pick_gap']:+.3f}",
             f"{r['boot_gap']:+.3f}", _f(r["boot_proxy_pick_b"]), _f(r["boot_rescored_pick_b"]),
             f"{100 * r['boot_rescore_better']:.0f}% / {100 * r['boot_rescore_worse']:.0f}%"] for r in data["rows"]]
    lines += [bu.markdown_table(["proxy n/task", "pick (trial)", "pick proxy", "pick held-out", "gap",
                                 "gap, mean over halves", "held-out B: proxy pick", "held-out B: re-scored top-k",
                                 "re-scored better / worse"], rows, "rrrrrrrrr"), ""]
    plot_overfit(data, plots)
    return lines


def plot_overfit(data: dict[str, Any], plots: Path) -> None:
    plt = pyplot()
    sizes = [r["n"] for r in data["rows"]]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    ax = axes[0]
    for n in sizes:
        ax.scatter([c["proxy"][str(n)] for c in data["candidates"]],
                   [c["held_out"] for c in data["candidates"]], s=8, alpha=0.6, label=f"proxy n={n}")
    lo = min(c["held_out"] for c in data["candidates"])
    hi = max(max(v for v in c["proxy"].values()) for c in data["candidates"])
    ax.plot([lo, hi], [lo, hi], "k--", lw=1)
    ax.set_xlabel("proxy score")
    ax.set_ylabel("held-out score")
    ax.legend(fontsize=8)
    ax.set_title("random Dirichlet merges: proxy vs held-out", fontsize=9)
    ax = axes[1]
    ax.plot(sizes, [r["boot_gap"] for r in data["rows"]], "o-", label="gap of the pick (proxy - held-out)")
    ax.plot(sizes, [r["boot_proxy_pick_b"] - data["mean_b"] for r in data["rows"]], "s-",
            label="held-out B of the proxy pick - pool mean")
    ax.plot(sizes, [r["boot_rescored_pick_b"] - data["mean_b"] for r in data["rows"]], "^-",
            label="held-out B of the re-scored pick - pool mean")
    ax.axhline(0, color="k", lw=0.5)
    ax.set_xlabel("proxy examples per task")
    ax.legend(fontsize=8)
    ax.set_title("means over random halves of the pool", fontsize=9)
    save_png(fig, plots / "bench-search-overfit.png")


def report_e2e(data: dict[str, Any]) -> list[str]:
    rows = []
    labels = {"memory": "in memory (a study's worker) + driver", "mergekit": "mergekit-yaml + fresh engine",
              "ours": "our writer (run_merge) + fresh engine"}
    for cfg, d in data["configs"].items():
        per = d["span_s"] / d["trials"]
        driver = max(per - d["trial_s"], 0.0)
        evals = f"{', '.join(d['tasks'])} x {d['limit'] or 48}"
        rows.append([cfg, evals, "the study (run_study)", d["trials"], _f(d["materialise_s"]), "-",
                     _f(d["eval_s"]), _f(driver), _f(per), f"{3600 / per:.0f}", "-", "-"])
        mem = d["disk"]["memory"]["total_s"] + driver
        for tool, r in d["disk"].items():
            total = r["total_s"] + (driver if tool == "memory" else 0.0)
            rows.append([cfg, evals, labels[tool], r["n"], _f(r["merge_s"]), _f(r["load_s"]), _f(r["eval_s"]),
                         _f(driver) if tool == "memory" else "-", _f(total), f"{3600 / total:.0f}",
                         f"**{total / mem:.1f}x**" if tool != "memory" else "1x", f"{r['max_diff']:.1g}"])
    return ["*the study*: `run_study` on the Dirichlet space (TPE, SQLite, one local worker) over all its "
            "trials: s per trial = first trial start to last trial end / trials, so the driver's own time "
            "(asking, storage writes) is in; *driver s* = that minus the trials' median merge + eval. The "
            "other rows take the study's first candidates again, in turns per candidate so that they share "
            "the machine's load: *in memory*: the study's worker path (`Worker.run`: merge into the live "
            "engine, score) plus the study's driver time per trial; *mergekit-yaml* (a fresh process, as a "
            "merge-to-disk loop runs it) or *our writer* (`run_merge` in process) to a folder, then a fresh "
            "transformers engine from it, then the same evals. Medians per candidate. *speed-up*: seconds per "
            "candidate / in memory's. *score diff*: largest task-score difference to the study's own trial.", "",
            bu.markdown_table(["evals", "tasks x examples", "loop", "candidates", "merge s", "engine load s",
                               "eval s", "driver s", "s per candidate", "trials/hour", "in memory is faster by",
                               "score diff"], rows, "lllrrrrrrrrr"), ""]


def report(args: argparse.Namespace, argv: list[str]) -> str:
    plots = args.out
    info = bu.machine_info(("torch", "transformers", "optuna", "mergekit", "mergesearch"))
    head = [f"Date: {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC", "",
            f"Reproduce: `{bu.reproduce_command('scripts/bench_search.py', argv)}`", "",
            "Machine:", "", bu.machine_info_markdown(info), ""]
    body: list[str] = []
    for part, title, fn in (("search", "Samplers", report_search), ("pruning", "Pruning", report_pruning),
                            ("overfit", "Proxy overfit", report_overfit)):
        path = args.out / f"part-{part}.json"
        if path.exists():
            body += [f"### {title}", "", *fn(json.loads(path.read_text()), plots)]
    path = args.out / "part-e2e.json"
    if path.exists():
        body += ["### End to end", "", *report_e2e(json.loads(path.read_text()))]
    return "\n".join(head + body) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    import optuna
    import torch

    torch.set_num_threads(1)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    zoo = args.zoo
    if not all((zoo / d / "config.json").is_file() for d in ["base", *(f"experts/{e}" for e in EXPERTS)]):
        raise SystemExit(f"No complete demo zoo at {zoo}; build it with `mergesearch zoo` or pass --zoo PATH.")
    if args.fresh:
        shutil.rmtree(args.out, ignore_errors=True)
    args.out.mkdir(parents=True, exist_ok=True)
    parts = {"search": part_search, "pruning": part_pruning, "overfit": part_overfit, "e2e": part_e2e}
    try:
        for part in [] if args.report_only else args.parts:
            start = time.perf_counter()
            log(f"part {part}")
            parts[part](args)
            log(f"part {part} done in {time.perf_counter() - start:.0f}s")
    finally:
        if _POOL is not None:
            _POOL.shutdown(cancel_futures=True)
    text = report(args, argv)
    (args.out / "report.md").write_text(text)
    if args.output:
        args.output.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
