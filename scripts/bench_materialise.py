#!/usr/bin/env python
"""Per-candidate cost of a trial: merge in memory into a live engine vs merge to disk and reload.

Two measurements, side by side in one run:

1. *Materialise vs disk*: for each method, the time to merge a candidate straight into the weights
   of a live transformers engine (sources resident in memory, ``Materializer``) vs
   ``mergekit-yaml CONFIG OUT`` followed by building a fresh engine from ``OUT`` (what a
   merge-to-disk search loop pays per candidate). Same YAML, same ~0.5B-parameter bf16 sources
   (random Qwen2.5-0.5B shapes, built once by ``bench_merge_disk.py``'s builder), and a check that
   the live engine then holds mergekit's weights.
2. *Trial overhead*: a real study on the demo zoo (``studies/demo.yaml``'s method, space and evals;
   the zoo must exist: ``mergesearch zoo``); from each trial's stored timings, the share of trial
   time that is not the eval (merge + plan parsing + bookkeeping), per executor.

    python scripts/bench_materialise.py --quick                  # pipeline check, ~1 minute
    python scripts/bench_materialise.py --output bench.md        # full run, ~10 minutes
"""

from __future__ import annotations

import argparse
import datetime as dt
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
import _benchutil as bu  # noqa: E402
import bench_merge_disk as disk  # noqa: E402

METHODS = ("linear", "ties", "slerp")
CHECK_TOL = {"linear": 1e-2, "slerp": 1e-2}


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--workdir", type=Path, default=Path("/tmp/mergesearch-bench"),
                   help="cache for the source checkpoints (shared with bench_merge_disk.py)")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {','.join(METHODS)}")
    p.add_argument("--repeats", type=int, default=3, help="timed candidates per method and path")
    p.add_argument("--quick", action="store_true", help="tiny sources and 3 trials: checks the pipeline, not the figures")
    p.add_argument("--zoo", type=Path, default=ROOT / "zoo", help="the demo zoo (mergesearch zoo)")
    p.add_argument("--trials", type=int, default=12, help="search trials of the overhead study")
    p.add_argument("--executors", default="local", help="comma-separated: local, ray (ray runs 2 workers)")
    p.add_argument("--skip", default="", help="comma-separated sections to skip: disk, overhead")
    p.add_argument("--output", type=Path, default=None, help="write the markdown report here")
    args = p.parse_args(argv)
    args.methods = [m for m in METHODS if m in args.methods.split(",")]
    args.executors = [e.strip() for e in args.executors.split(",") if e.strip()]
    args.skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    if args.quick:
        args.repeats = 1
        args.trials = min(args.trials, 3)
    # the source builder of bench_merge_disk.py reads these
    args.shard_mb, args.noise_std, args.seed, args.rebuild, args.slerp_form = None, 0.002, 0, False, "models"
    return args


def _time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def disk_section(args: argparse.Namespace) -> str:
    """Materialise into a live engine vs mergekit-yaml + a fresh engine, per method."""
    from safetensors import safe_open

    from mergesearch.eval.hf import TransformersEngine
    from mergesearch.plan import loads_plan
    from mergesearch.workers.worker import Materializer, ResidentSources

    sources = disk.build_sources(args)
    bu.warm_page_cache(sources.paths.values())
    paths = tuple(str(sources.paths[n]) for n in disk.SOURCE_NAMES)
    t0 = time.perf_counter()
    resident = ResidentSources(paths)
    load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    engine = TransformersEngine(paths[0], dtype="bfloat16")
    engine_s = time.perf_counter() - t0
    materialise = Materializer(resident, engine)
    rows, checks = [], []
    work = Path(tempfile.mkdtemp(prefix="bench-materialise-", dir=args.workdir))
    try:
        for method in args.methods:
            doc = disk.method_config(method, sources, args.slerp_form)
            text = yaml.safe_dump(doc, sort_keys=False)
            plan = loads_plan(text, f"{method} config")
            t0 = time.perf_counter()
            materialise(plan, 0)
            first = time.perf_counter() - t0
            ours = _time(lambda: materialise(plan, 0), args.repeats)
            config = work / f"{method}.yaml"
            config.write_text(text)
            merged, reload_times, merge_times = work / f"{method}-out", [], []
            for _ in range(args.repeats):
                shutil.rmtree(merged, ignore_errors=True)
                res = bu.run_measured(["mergekit-yaml", str(config), str(merged)], timeout_s=3600)
                if not res.ok:
                    raise SystemExit(f"mergekit-yaml failed on {method}:\n{res.stderr_tail}")
                merge_times.append(res.wall_s)
                t0 = time.perf_counter()
                fresh = TransformersEngine(str(merged), dtype="bfloat16")
                reload_times.append(time.perf_counter() - t0)
                fresh.close()
            theirs_merge, theirs_reload = statistics.median(merge_times), statistics.median(reload_times)
            rows.append([method, f"{first:.2f}", f"{ours:.2f}", f"{theirs_merge:.2f}", f"{theirs_reload:.2f}",
                         f"{theirs_merge + theirs_reload:.2f}", f"{(theirs_merge + theirs_reload) / ours:.1f}x"])
            live = engine.state_dict()
            worst = 0.0
            for f in sorted(merged.glob("*.safetensors")):
                with safe_open(str(f), framework="pt") as st:
                    for name in st.keys():
                        if name in live:
                            diff = (live[name].float() - st.get_tensor(name).float()).abs().max().item()
                            worst = max(worst, diff)
            tol = CHECK_TOL.get(method)
            verdict = "reported" if tol is None else ("ok" if worst <= tol else "MISMATCH")
            checks.append([method, f"{worst:.3g}", verdict])
    finally:
        engine.close()
        resident.close()
        shutil.rmtree(work, ignore_errors=True)
    params = bu.param_count(sources.shape) / 1e6
    head = (f"Sources: base + 2 fine-tunes, {params:.0f}M parameters each, bf16 ({sources.bytes_each / 1e9:.2f} GB "
            f"each); engine: transformers, bf16, CPU. Set-up paid once per worker: sources read into memory "
            f"in {load_s:.1f}s, engine built in {engine_s:.1f}s. Median of {args.repeats} candidate(s) per path. "
            "*in memory*: `Materializer` writes the merge into the live engine's parameters; *to disk*: "
            "`mergekit-yaml CONFIG OUT` (a fresh process, as a merge-to-disk loop runs it) plus building a "
            "transformers engine from OUT. *first candidate* includes compiling the CPU merge loops for "
            "this method and dtype (once per worker, cached on disk by Inductor); *speed-up* is "
            "*to disk total* / *in memory*.\n\n")
    table = bu.markdown_table(["method", "first candidate s", "in memory s", "mergekit-yaml s", "engine reload s", "to disk total s",
                               "speed-up"], rows, align="lrrrrrr")
    check = bu.markdown_table(["method", "max abs diff, live engine vs mergekit output", "check"], checks, align="lrl")
    return head + table + "\n\nThe live engine holds mergekit's weights afterwards (ties is reported, not checked: " \
        "magnitude trimming may keep different elements on exact ties):\n\n" + check + "\n"


def _study_file(args: argparse.Namespace, folder: Path, executor: str) -> Path:
    doc = yaml.safe_load((ROOT / "studies" / "demo.yaml").read_text())
    zoo = args.zoo.resolve()
    doc["name"] = f"bench-{executor}"
    doc["sources"] = {"base": str(zoo / "base"),
                      "models": [str(zoo / "experts" / Path(m).name) for m in doc["sources"]["models"]]}
    doc.pop("start_from", None)
    doc["budget"] = {"trials": args.trials}
    doc["executor"] = {"kind": executor, "workers": 2 if executor == "ray" else 1}
    doc["output_dir"] = str(folder / "out")
    doc["top_k"] = 1
    doc.pop("baselines", None)
    path = folder / f"{executor}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def overhead_section(args: argparse.Namespace) -> str:
    """Share of trial time outside the eval, from a real study's stored per-trial timings."""
    from mergesearch.driver.config import load_study
    from mergesearch.driver.driver import run_study

    if not (args.zoo / "base").is_dir():
        raise SystemExit(f"No demo zoo at {args.zoo}; build it with `mergesearch zoo` first.")
    rows = []
    for executor in args.executors:
        folder = Path(tempfile.mkdtemp(prefix=f"bench-overhead-{executor}-"))
        try:
            study_file = load_study(_study_file(args, folder, executor))
            t0 = time.perf_counter()
            outcome = run_study(study_file, log=lambda line: None)
            wall = time.perf_counter() - t0
            timings = [t.user_attrs["timings"] for t in outcome.study.trials if "timings" in t.user_attrs]
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        total = sum(t["total_s"] for t in timings)
        merge = sum(t["materialise_s"] for t in timings)
        other = sum(t["overhead_s"] for t in timings)
        scratch = max((t.get("scratch_mib", 0.0) for t in timings), default=0.0)
        rows.append([executor, str(len(timings)), f"{wall:.0f}", f"{statistics.median(t['materialise_s'] for t in timings):.3f}",
                     f"{statistics.median(t['eval_s'] for t in timings):.2f}", f"{100 * merge / total:.2f}%",
                     f"{100 * other / total:.2f}%", f"{100 * (merge + other) / total:.2f}%", f"{scratch:.1f}"])
    head = (f"A study on the demo zoo (demo.yaml's task arithmetic over 5 experts, its 5 proxy tasks), "
            f"{args.trials} search trials; figures from each trial's stored timings. *overhead* = everything "
            "in a trial but the eval (merge + plan parsing + bookkeeping), as a share of the trial's time.\n\n")
    return head + bu.markdown_table(
        ["executor", "trials", "study wall s", "merge s (median)", "eval s (median)", "merge share",
         "other overhead share", "trial overhead share", "peak merge scratch MiB"], rows, align="lrrrrrrrr") + "\n"


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    parts = [f"## Materialise in memory vs merge to disk (issue 7)\n\nDate: {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC\n\n"
             f"Reproduce:\n\n```\n{bu.reproduce_command('scripts/bench_materialise.py', argv)}\n```\n\nMachine:\n\n"
             f"{bu.machine_info_markdown(bu.machine_info())}\n"]
    sections = [("disk", "### Per-candidate merge\n\n", disk_section),
                ("overhead", "### Trial overhead\n\n", overhead_section)]
    for name, title, section in sections:
        if name in args.skip:
            continue
        parts.append(title + section(args))
        report = "\n".join(parts)
        print(report)
        if args.output:
            args.output.write_text(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
