"""The driver under load (issue 9): many local workers, many very short trials. The full run
(8 workers, 1000 trials) is ``scripts/bench_load.py``, recorded in RELIABILITY.md; this checks
the same measurement on a short study, and that only the driver writes the storage."""

from __future__ import annotations

import importlib.util
import math
import os
from pathlib import Path

import pytest

from mergesearch.zoo.build import ZooConfig, build_zoo

ROOT = Path(__file__).resolve().parents[1]
TRIALS = 40

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _bench_load():
    spec = importlib.util.spec_from_file_location("bench_load", ROOT / "scripts" / "bench_load.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_eight_workers_many_short_trials_only_the_driver_writes(tmp_path):
    bench = _bench_load()
    zoo = tmp_path / "zoo"
    build_zoo(zoo, ZooConfig(base_steps=3, expert_steps=2, warmup_steps=1, verify=False, verify_limit=2, threads=1),
              log=lambda _m: None)
    lines: list[str] = []
    out = bench.run_load(tmp_path / "run", zoo, TRIALS, 8, "local", block=20, log=lines.append)
    assert out["counts"]["complete"] == TRIALS and out["counts"]["failed"] == 0 and out["counts"]["running"] == 0
    assert out["max_in_flight"] <= 2 * 8, (
        "the driver kept asking while results waited to be told (it used to ask the whole budget before "
        "telling any trial when trials were fast); in flight may be the 8 running plus those just finished")
    assert out["trials"] == TRIALS and [b["trials"] for b in out["blocks"]] == ["1-20", "21-40"]
    assert sum("set up in" in line for line in lines) == 8
    assert any(line.startswith("driver time per trial: ask p50") for line in lines)
    for name in ("ask", "tell"):
        stats = out["all"][name]
        assert 0 < stats["p50_ms"] <= stats["p99_ms"] <= stats["max_ms"] and math.isfinite(stats["max_ms"])
    assert out["commits"] >= 2 * TRIALS, "every trial is stored at least when asked and when told"
    assert set(out["writer_threads"]) <= set(bench.DRIVER_THREADS), (
        f"a worker thread wrote the storage: {out['writer_threads']}")
    assert out["writer_pids"] == [os.getpid()]
    text = bench.report(out, ["--trials", str(TRIALS)])
    assert "| 21-40 " in text and "commits/s" in text


def test_percentile_interpolates_between_order_statistics():
    from mergesearch.driver.driver import percentile

    assert percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert percentile([1.0, 2.0], 50) == 1.5
    assert percentile([1.0, 2.0, 3.0, 4.0, 5.0], 100) == 5.0
    assert percentile([7.0], 99) == 7.0
    assert math.isnan(percentile([], 50))
