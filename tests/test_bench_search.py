"""scripts/bench_search.py: its counting helpers, and the whole pipeline in ``--quick`` mode."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "bench_search.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_search", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_best_so_far_skips_pruned_trials(bench) -> None:
    assert bench.best_so_far([0.2, None, 0.1, 0.5]) == [0.2, 0.2, 0.2, 0.5]


def test_first_reach_counts_trials_from_one(bench) -> None:
    assert bench.first_reach([0.1, None, 0.3, 0.4], 0.3) == 3
    assert bench.first_reach([0.1, 0.2], 0.3) is None


def test_censored_median_treats_not_reached_as_largest(bench) -> None:
    assert bench.censored_median([3, None, 10, 7, None]) == 10
    assert bench.censored_median([3, None, None, None, 1]) is None
    assert bench.censored_median([4, 8]) == 6


def _run(values, examples):
    trials = [{"value": v, "state": "PRUNED" if v is None else "COMPLETE", "examples": e, "start": float(i),
               "end": float(i + 1), "timings": {"total_s": e / 10}} for i, (v, e) in enumerate(zip(values, examples))]
    return {"trials": trials}


def test_pruning_is_compared_at_the_unpruned_runs_best(bench) -> None:
    base = _run([0.1, 0.5, 0.3, 0.4], [10, 10, 10, 10])
    pruned = _run([0.2, None, None, 0.45, None, 0.5, 0.6], [10, 2, 2, 10, 2, 10, 10])
    row = bench.compare_pruned(base, pruned)
    assert row["bar"] == 0.5 and row["final_pruned"] == 0.6
    assert (row["reach_none"], row["examples_none"]) == (2, 20)
    assert (row["reach_pruned"], row["examples_pruned"]) == (6, 36)
    assert row["examples_ratio"] == 20 / 36
    assert row["pruned_best_in_budget"] == 0.5  # 36 examples <= the unpruned run's 40; the 0.6 comes after
    assert row["examples_total"] == [40, 46] and row["pruned_trials"] == 3
    assert row["worker_total"] == pytest.approx([4.0, 4.6])
    never = bench.compare_pruned(base, _run([0.2, None], [10, 2]))
    assert never["reach_pruned"] is None and never["examples_ratio"] is None


def test_censored_median_can_count_not_reached_as_smallest(bench) -> None:
    low = lambda vals: bench.censored_median(vals, missing_is_largest=False)  # noqa: E731
    assert low([2.0, None, 3.0]) == 2.0
    assert low([None, None, 3.0]) is None
    assert low([1.0, 3.0, None, 5.0]) == 2.0


def test_parts_and_spaces_are_checked(bench) -> None:
    with pytest.raises(SystemExit):
        bench.parse_args(["--parts", "search,nope"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--samplers", "tpe"])


def test_quick_run_writes_every_part_and_the_report(tmp_path: Path) -> None:
    """The whole pipeline, every part, on a tiny zoo built here (about 2 minutes on 2 cores); set
    MERGESEARCH_ZOO to use another zoo."""
    zoo = Path(os.environ["MERGESEARCH_ZOO"]) if os.environ.get("MERGESEARCH_ZOO") else tmp_path / "zoo"
    if not (zoo / "zoo.json").is_file():
        from mergesearch.zoo.build import ZooConfig, build_zoo

        build_zoo(zoo, ZooConfig(base_steps=3, expert_steps=2, warmup_steps=1, verify=False, verify_limit=2,
                                 threads=1), log=lambda _m: None)
    out = tmp_path / "out"
    report = tmp_path / "bench.md"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--zoo", str(zoo), "--out", str(out),
                           "--output", str(report)], check=False, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for part in ("search", "pruning", "overfit", "e2e"):
        assert (out / f"part-{part}.json").is_file(), part
    search = json.loads((out / "part-search.json").read_text())
    assert set(search["spaces"]) == {"dirichlet", "curves"}
    for space in search["spaces"].values():
        assert set(space["summary"]) == {"random", "cmaes", "tpe", "gp"}
        assert all(len(c) == 5 for s in space["summary"].values() for c in s["curves"])
    e2e = json.loads((out / "part-e2e.json").read_text())
    assert all(d["max_diff"] < 1e-6 for d in e2e["configs"]["proxy"]["disk"].values())
    for png in ("samplers", "pruning", "overfit"):
        assert (out / f"bench-search-{png}.png").stat().st_size > 1000
    text = report.read_text()
    for title in ("### Samplers", "### Pruning", "### Proxy overfit", "### End to end"):
        assert title in text
