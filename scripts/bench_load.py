"""Load on the driver: many workers, ~1000 very short trials, one storage.

Runs a real study (TPE over the Dirichlet linear space of two experts of a tiny zoo; the eval is
the perplexity task cut to one proxy example) with N local worker threads or Ray actors, and
measures what the driver spends per trial as the study grows: asking the sampler (and storing the
new trial) and telling the result (and storing the scores), p50 / p99 per block of trials; the
storage's commit rate, counted by SQLAlchemy on the storage engine itself; and which threads and
processes wrote it (only the driver may: its loop and its heartbeat thread). With Ray, each
actor's open files are checked while it runs: none may hold the storage.

    python scripts/bench_load.py                          # 8 local workers, 1000 trials
    python scripts/bench_load.py --executor ray           # 8 Ray CPU actors
    python scripts/bench_load.py --trials 120 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any, Optional

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _benchutil import machine_info, machine_info_markdown, markdown_table, reproduce_command  # noqa: E402

DRIVER_THREADS = ("MainThread", "mergesearch-heartbeat")


def write_load_study(folder: Path, zoo: Path, trials: int, workers: int, executor: str,
                     sampler: str = "tpe") -> Path:
    study = {
        "name": "load",
        "sources": {"models": [str(zoo / "experts" / "addition"), str(zoo / "experts" / "order")]},
        "method": "linear",
        "space": "dirichlet_linear",
        "evals": {"tasks": ["perplexity"], "proxy_limit": 1, "held_out_limit": 1, "chunk_size": 1},
        "sampler": sampler,
        "pruner": "none",
        "baselines": False,
        "budget": {"trials": trials},
        "top_k": 1,
        "write_checkpoint": False,
        "seed": 0,
        "executor": {"kind": executor, "workers": workers},
        "engine": {"batch_size": 1},
        "output_dir": "out",
    }
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "study.yaml"
    path.write_text(yaml.safe_dump(study), encoding="utf-8")
    return path


class StorageWrites:
    """Every commit on the storages the driver opens while active: when, and from which thread."""

    def __init__(self) -> None:
        self.commits: list[tuple[float, str, int]] = []
        self._lock = threading.Lock()
        self._patched: Optional[Any] = None

    def _on_commit(self, _conn: Any) -> None:
        with self._lock:
            self.commits.append((time.perf_counter(), threading.current_thread().name, os.getpid()))

    def __enter__(self) -> "StorageWrites":
        from sqlalchemy import event

        from mergesearch.driver import storage

        real = storage.open_storage

        def counted(*args: Any, **kwargs: Any) -> Any:
            st = real(*args, **kwargs)
            event.listen(st.engine, "commit", self._on_commit)
            return st

        self._patched = (storage, real)
        storage.open_storage = counted
        return self

    def __exit__(self, *exc: object) -> None:
        storage, real = self._patched
        storage.open_storage = real


class ActorFiles:
    """With Ray: samples each busy actor's open files while the study runs."""

    def __init__(self, made: list, storage_file: Path) -> None:
        self.made = made
        self.storage_file = storage_file.resolve()
        self.checked: set[int] = set()
        self.holding: set[int] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            ex = self.made[0] if self.made else None
            if ex is None or not hasattr(ex, "busy"):
                continue
            for _key, (_name, pid) in list(ex.busy().items()):
                try:
                    fds = os.listdir(f"/proc/{pid}/fd")
                    files = {os.path.realpath(f"/proc/{pid}/fd/{fd}") for fd in fds}
                except OSError:
                    continue
                self.checked.add(pid)
                if any(f.startswith(str(self.storage_file)) for f in files):
                    self.holding.add(pid)

    def __enter__(self) -> "ActorFiles":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


def summarise(latency: dict[str, list[float]], commits: list[tuple[float, str, int]], started: float,
              ended: float, block: int) -> dict[str, Any]:
    from mergesearch.driver.driver import percentile

    rows = []
    n = len(latency["tell"])
    for lo in range(0, n, block):
        row = {"trials": f"{lo + 1}-{min(lo + block, n)}"}
        for name in ("ask", "tell"):
            xs = latency[name][lo:lo + block]
            row[f"{name}_p50_ms"] = percentile(xs, 50) * 1e3
            row[f"{name}_p99_ms"] = percentile(xs, 99) * 1e3
        rows.append(row)
    in_run = [c for c in commits if started <= c[0] <= ended]
    threads: dict[str, int] = {}
    for _t, name, _pid in commits:
        threads[name] = threads.get(name, 0) + 1
    wall = ended - started
    return {
        "blocks": rows,
        "all": {name: {"p50_ms": percentile(xs, 50) * 1e3, "p99_ms": percentile(xs, 99) * 1e3,
                       "max_ms": max(xs) * 1e3 if xs else None} for name, xs in latency.items()},
        "trials": n, "wall_s": wall, "trials_per_s": n / wall if wall else None,
        "commits": len(in_run), "commits_per_s": len(in_run) / wall if wall else None,
        "commits_per_trial": len(in_run) / n if n else None,
        "writer_threads": threads, "writer_pids": sorted({pid for *_x, pid in commits}),
    }


def max_in_flight(study: Any) -> int:
    """The most trials asked and not yet told at any moment, from their stored start and end times."""
    edges = []
    for t in study.get_trials(deepcopy=False):
        if t.datetime_start is not None:
            edges.append((t.datetime_start, 1))
            if t.datetime_complete is not None:
                edges.append((t.datetime_complete, -1))
    most = now = 0
    for _when, step in sorted(edges, key=lambda e: (e[0], e[1])):
        now += step
        most = max(most, now)
    return most


def run_load(work: Path, zoo: Path, trials: int, workers: int, executor: str, block: int,
             log: Any = print) -> dict[str, Any]:
    """Run the load study in ``work`` and return the measured summary (see the module docstring)."""
    from mergesearch.driver.config import load_study
    from mergesearch.driver.driver import run_study
    from mergesearch.workers import executor as executor_module

    path = write_load_study(work, zoo, trials, workers, executor)
    made: list = []
    real = executor_module.make_executor

    def spy(*args: Any, **kwargs: Any) -> Any:
        made.append(real(*args, **kwargs))
        return made[-1]

    executor_module.make_executor = spy
    marks: dict[str, float] = {}

    def on_log(line: str) -> None:
        if "set up in" in line:
            marks["start"] = time.perf_counter()
            log(line)
        elif line.startswith("driver time per trial"):
            marks["end"] = time.perf_counter()
            log(line)

    try:
        with StorageWrites() as writes, ActorFiles(made, work / "out" / "study.db") as files:
            outcome = run_study(load_study(path), log=on_log)
    finally:
        executor_module.make_executor = real
    started = marks.get("start", min(c[0] for c in writes.commits))
    ended = marks.get("end", time.perf_counter())
    out = summarise(outcome.latency, writes.commits, started, ended, block)
    out.update(executor=executor, workers=workers, counts=outcome.counts, max_in_flight=max_in_flight(outcome.study),
               actors_checked=len(files.checked), actors_holding_storage=len(files.holding))
    return out


def report(out: dict[str, Any], argv: list[str]) -> str:
    rows = [[r["trials"], f"{r['ask_p50_ms']:.1f}", f"{r['ask_p99_ms']:.1f}", f"{r['tell_p50_ms']:.1f}",
             f"{r['tell_p99_ms']:.1f}"] for r in out["blocks"]]
    lines = [
        f"### Driver under load: {out['workers']} {out['executor']} workers, {out['trials']} trials",
        "",
        machine_info_markdown(machine_info(("torch", "optuna", "sqlalchemy", "ray", "mergesearch"))),
        "",
        markdown_table(["trials", "ask p50 ms", "ask p99 ms", "tell p50 ms", "tell p99 ms"], rows),
        "",
        f"- {out['trials']} trials in {out['wall_s']:.0f} s ({out['trials_per_s']:.1f} trials/s); "
        f"counts {out['counts']}; at most {out['max_in_flight']} trials in flight at once",
        f"- storage: {out['commits']} commits, {out['commits_per_s']:.1f} commits/s, "
        f"{out['commits_per_trial']:.1f} per trial",
        f"- writers: threads {out['writer_threads']} in pid(s) {out['writer_pids']}"
        + (f"; Ray actors checked {out['actors_checked']}, holding the storage file "
           f"{out['actors_holding_storage']}" if out["executor"] == "ray" else ""),
        "",
        f"Reproduce: `{reproduce_command('scripts/bench_load.py', argv)}`",
    ]
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=1000)
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--executor", choices=("local", "ray"), default="local")
    ap.add_argument("--block", type=int, default=100, help="trials per row of the latency table")
    ap.add_argument("--work", type=Path, default=Path("runs/bench_load"))
    ap.add_argument("--zoo", type=Path, default=None, help="a zoo folder (default: a tiny one built in --work)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    from mergesearch.zoo.build import ZooConfig, build_zoo

    zoo = args.zoo
    if zoo is None:
        zoo = args.work / "zoo"
        if not (zoo / "zoo.json").is_file():
            build_zoo(zoo, ZooConfig(base_steps=3, expert_steps=2, warmup_steps=1, verify=False,
                                     verify_limit=2, threads=1), log=lambda _m: None)
    run_dir = args.work / f"{args.executor}-{args.workers}x{args.trials}-{int(time.time())}"
    if args.executor == "ray":
        import logging

        import ray

        ray.init(address="local", num_cpus=args.workers, include_dashboard=False,
                 logging_level=logging.ERROR, log_to_driver=False)
    try:
        out = run_load(run_dir, zoo.resolve(), args.trials, args.workers, args.executor, args.block)
    finally:
        if args.executor == "ray":
            import ray

            ray.shutdown()
    print(report(out, argv))
    if args.json:
        args.json.write_text(json.dumps(out, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
