"""Executors: one conformance suite that every executor passes (local threads, Ray actors), then
what only Ray does: actors killed or hung mid-trial, sources shared through the object store, and a
whole study on a real local Ray cluster that survives a SIGKILLed worker."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from mergesearch.errors import MergeSearchError
from mergesearch.workers.executor import LocalExecutor
from mergesearch.workers.worker import Job, Worker, WorkerSetup
from mergesearch.zoo.build import ZooConfig, build_zoo, default_evals_dir
from test_driver import write_study

TINY = ZooConfig(base_steps=3, expert_steps=2, warmup_steps=1, verify=False, verify_limit=2, threads=1)
WORKERS = 2
LIMIT = 120.0
KILLS = 2

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def zoo_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("exe") / "zoo"
    build_zoo(root, TINY, log=lambda _m: None)
    return root


@pytest.fixture(scope="module")
def setup(zoo_dir) -> WorkerSetup:
    sources = (str(zoo_dir / "base"), str(zoo_dir / "experts" / "addition"), str(zoo_dir / "experts" / "order"))
    evals = default_evals_dir()
    return WorkerSetup(sources=sources, engine_dir=sources[0],
                       tasks=(str(evals / "perplexity.yaml"), str(evals / "order.yaml")),
                       chunk_size=2, limits={"proxy": 6, "held_out": 4})


def plan_text(models: list[str], weights: list[float]) -> str:
    return yaml.safe_dump({"models": [{"model": m, "parameters": {"weight": w}} for m, w in zip(models, weights)],
                           "merge_method": "linear", "dtype": "float32"})


@pytest.fixture(scope="module")
def plan(setup) -> str:
    return plan_text(list(setup.sources[1:]), [0.7, 0.3])


@pytest.fixture(scope="module")
def reference(setup, plan):
    """The plan scored by a Worker in this process: what every executor must hand back."""
    w = Worker(setup, name="reference")
    try:
        return w.run(Job("ref", plan, seed=3))
    finally:
        w.close()


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    import logging

    owned = not ray.is_initialized()
    if owned:
        ray.init(address="local", num_cpus=4, include_dashboard=False, logging_level=logging.ERROR,
                 log_to_driver=False)
    yield ray
    if owned:
        ray.shutdown()


@pytest.fixture(scope="module")
def local_exec(setup):
    ex = LocalExecutor(setup, WORKERS)
    ex.lines = ex.start()
    yield ex
    ex.close()


@pytest.fixture(scope="module")
def ray_exec(setup, ray_cluster):
    from mergesearch.workers.ray_executor import RayExecutor

    ex = RayExecutor(setup, WORKERS)
    ex.lines = ex.start()
    yield ex
    ex.close()


@pytest.fixture(params=["local", pytest.param("ray", marks=pytest.mark.integration)])
def executor(request):
    ex = request.getfixturevalue(f"{request.param}_exec")
    assert not ex.running() and ex.idle() == WORKERS, "a previous test left the executor busy"
    return ex


_BACKLOG: dict[int, list] = {}


def _events(ex, timeout: float) -> list:
    """Events not yet handed to a test first (one poll can return several), then a fresh poll."""
    held = _BACKLOG.pop(id(ex), [])
    return held or ex.poll(timeout)


def until(ex, want, on_progress=lambda e: False, limit=LIMIT):
    """Poll until ``want(event)``; progress events are answered by ``on_progress`` (stop or not).
    Events after the awaited one are kept for the next call: dropping a progress event would leave
    its worker waiting for an answer forever."""
    seen = []
    deadline = time.time() + limit
    while time.time() < deadline:
        events = _events(ex, 0.5)
        for i, e in enumerate(events):
            seen.append(e)
            if want(e):
                if events[i + 1:]:
                    _BACKLOG[id(ex)] = events[i + 1:]
                return e
            if e.kind == "progress":
                ex.reply(e.key, on_progress(e))
    pytest.fail(f"no awaited event within {limit}s; saw {[(e.kind, e.key, e.error) for e in seen]}")


def settle(ex, limit=LIMIT):
    """Wait until every worker is idle again (after a restart), answering stray events."""
    deadline = time.time() + limit
    while time.time() < deadline and ex.idle() < WORKERS:
        for e in _events(ex, 0.5):
            if e.kind == "progress":
                ex.reply(e.key, False)
    assert ex.idle() == WORKERS, "the pool was not restored"


@pytest.mark.integration
def test_ray_starts_a_local_cluster_and_stops_only_its_own(setup):
    """First in the file: before the module's shared cluster exists."""
    ray = pytest.importorskip("ray")
    from mergesearch.workers.ray_executor import RayExecutor, RayExecutorError

    if ray.is_initialized():
        pytest.skip("Ray was already initialised by an earlier test module")
    with pytest.raises(RayExecutorError, match="Cannot reach the Ray cluster at executor.address '127.0.0.1:1'"):
        RayExecutor(setup, 1, address="127.0.0.1:1").start()
    assert not ray.is_initialized()
    ex = RayExecutor(setup, 1)
    try:
        lines = ex.start()
        assert ray.is_initialized() and len(lines) == 1 and "shared via object store" in lines[0]
    finally:
        ex.close()
    assert not ray.is_initialized()


# ---------------------------------------------------------------------------------------------
# Conformance: every executor


def test_start_says_one_line_per_worker(executor):
    assert len(executor.lines) == WORKERS
    for line in executor.lines:
        assert "sources" in line and "engine" in line and "set up in" in line


def test_scores_equal_the_in_process_worker(executor, plan, reference):
    executor.submit(Job("same", plan, seed=3))
    e = until(executor, lambda e: e.kind != "progress")
    assert e.kind == "done", e.error
    r = e.result
    assert r.key == "same" and r.complete and r.worker and e.worker
    assert r.scores == reference.scores
    assert r.examples == reference.examples
    assert r.totals == reference.totals == {"perplexity": 6, "order": 6}


def test_progress_reply_stop_ends_early_with_partial_scores(executor, plan):
    assert executor.idle() == WORKERS and executor.running() == []
    executor.submit(Job("early", plan, report=True))
    assert executor.idle() == WORKERS - 1
    first = until(executor, lambda e: e.kind == "progress")
    assert first.key == "early" and first.progress.totals == {"perplexity": 6, "order": 6}
    assert all(len(v) == 2 for v in first.progress.scores.values())
    assert executor.running() == ["early"] and executor.idle() == WORKERS - 1
    executor.reply("early", True)
    e = until(executor, lambda e: e.kind != "progress")
    assert e.kind == "done" and not e.result.complete
    assert e.result.scored == {"perplexity": 2, "order": 2}
    assert executor.running() == [] and executor.idle() == WORKERS


def test_a_bad_candidate_fails_without_blaming_the_worker(executor, plan, tmp_path):
    bad = plan_text([str(tmp_path / "not-a-source"), "also-missing"], [0.5, 0.5])
    executor.submit(Job("bad", bad))
    e = until(executor, lambda e: e.kind != "progress")
    assert e.kind == "failed" and not e.infra
    assert "not one of this worker's sources" in e.error
    executor.submit(Job("after", plan))
    assert until(executor, lambda e: e.kind != "progress").kind == "done"
    assert executor.idle() == WORKERS


def test_every_worker_is_used_at_once(executor, plan):
    for i in range(WORKERS):
        executor.submit(Job(f"par{i}", plan))
    assert executor.idle() == 0
    done = set()
    while len(done) < WORKERS:
        e = until(executor, lambda e: e.kind != "progress")
        assert e.kind == "done", e.error
        done.add(e.result.worker)
    assert len(done) == WORKERS


def test_a_local_job_past_trial_timeout_fails_and_its_worker_is_replaced(setup, plan, reference):
    """The eval waits forever for the driver's answer to its progress report (a hung eval): the job
    fails as a worker failure at the time-out, the worker stops at its next round and frees its
    engine, and a fresh worker scores the next job like the reference."""
    ex = LocalExecutor(setup, 1, trial_timeout=2.0)
    ex.start()
    try:
        ex.submit(Job("hung", plan, report=True))
        first = until(ex, lambda e: e.kind == "progress")
        old = ex._workers[0]
        started = time.time()
        e = until(ex, lambda e: e.kind == "failed", limit=30)
        assert e.key == "hung" and e.infra and e.worker == old.name
        assert "trial_timeout (2s)" in e.error and "local-r1 replaces it" in e.error
        assert time.time() - started < 10
        assert ex.idle() == 1 and ex.running() == []
        ex.reply(first.key, False)
        ex.submit(Job("after", plan, seed=3))
        done = until(ex, lambda e: e.kind != "progress")
        assert done.kind == "done" and done.result.worker == "local-r1"
        assert done.result.scores == reference.scores
        assert old not in ex._workers and len(ex._workers) == 1
    finally:
        ex.close()


def test_a_local_worker_stuck_in_one_call_is_abandoned_and_its_late_result_dropped(setup, plan, reference):
    """Fault injection: the worker's merge blocks until released. The job fails
    at the time-out; the replacement serves the next job; when the stuck call returns, its result is
    dropped (no event for the failed job) and the old worker's thread ends."""
    ex = LocalExecutor(setup, 1, trial_timeout=2.0)
    ex.start()
    release = threading.Event()
    stuck = ex._workers[0]
    real = stuck.materialise

    def blocked(*args, **kwargs):
        release.wait(60)
        return real(*args, **kwargs)

    stuck.materialise = blocked
    try:
        ex.submit(Job("stuck", plan))
        e = until(ex, lambda e: e.kind == "failed", limit=30)
        assert e.key == "stuck" and e.infra and "trial_timeout" in e.error
        ex.submit(Job("next", plan, seed=3))
        done = until(ex, lambda e: e.kind != "progress")
        assert done.key == "next" and done.kind == "done" and done.result.worker == "local-r1"
        assert done.result.scores == reference.scores
        release.set()
        thread = next(t for t in ex._threads if t.name == f"mergesearch-{stuck.name}")
        thread.join(60)
        assert not thread.is_alive(), "the abandoned worker's thread ends once its call returns"
        assert [ev for ev in _events(ex, 1.0) if ev.key == "stuck"] == []
        assert stuck not in ex._workers and ex.idle() == 1
    finally:
        release.set()
        ex.close()


@pytest.mark.parametrize("kind", ["local", pytest.param("ray", marks=pytest.mark.integration)])
def test_close_stops_the_workers(kind, setup, plan, request):
    if kind == "local":
        ex = LocalExecutor(setup, 1)
    else:
        request.getfixturevalue("ray_cluster")
        from mergesearch.workers.ray_executor import RayExecutor

        ex = RayExecutor(setup, 1)
    assert len(ex.start()) == 1
    ex.submit(Job("one", plan))
    assert until(ex, lambda e: e.kind != "progress").kind == "done"
    if kind == "local":
        threads = list(ex._threads)
        ex.close()
        assert not any(t.is_alive() for t in threads)
    else:
        import ray
        from ray.exceptions import RayActorError

        actor = ex.slots[0].actor
        ex.close()
        with pytest.raises(RayActorError):
            ray.get(actor.drain.remote(0.0), timeout=60)
        assert ray.is_initialized(), "close shut down a cluster it did not start"
    assert ex.running() == []
    ex.close()


# ---------------------------------------------------------------------------------------------
# Ray only


@pytest.mark.integration
def test_a_sigkilled_actor_fails_its_trial_and_is_restarted(ray_exec, plan, reference):
    ray_exec.submit(Job("victim", plan, report=True))
    until(ray_exec, lambda e: e.kind == "progress")
    name, pid = ray_exec.busy()["victim"]
    os.kill(pid, signal.SIGKILL)
    e = until(ray_exec, lambda e: e.kind == "failed")
    assert e.key == "victim" and e.infra and e.worker == name
    assert name in e.error and "died" in e.error and "restarted" in e.error
    settle(ray_exec)
    pids = {s.pid for s in ray_exec.slots}
    assert pid not in pids and len(pids) == WORKERS
    for i in range(WORKERS):
        ray_exec.submit(Job(f"next{i}", plan, seed=3))
    for _ in range(WORKERS):
        done = until(ray_exec, lambda e: e.kind != "progress")
        assert done.kind == "done" and done.result.scores == reference.scores


@pytest.mark.integration
@pytest.mark.parametrize("limit", ["trial_timeout", "heartbeat_timeout"])
def test_a_hung_actor_is_killed_and_replaced(ray_exec, plan, monkeypatch, limit):
    monkeypatch.setattr(ray_exec, limit, 3.0)
    ray_exec.submit(Job("hung", plan, report=True))
    first = until(ray_exec, lambda e: e.kind == "progress")
    name, pid = ray_exec.busy()["hung"]
    os.kill(pid, signal.SIGSTOP)
    try:
        ray_exec.reply(first.key, False)
        started = time.time()
        e = until(ray_exec, lambda e: e.kind == "failed", limit=60)
        assert e.key == "hung" and e.infra and name in e.error
        assert ("trial_timeout" if limit == "trial_timeout" else "heartbeats") in e.error
        assert time.time() - started < 30
    finally:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    monkeypatch.undo()
    settle(ray_exec)
    ray_exec.submit(Job("after-hang", plan))
    assert until(ray_exec, lambda e: e.kind != "progress").kind == "done"


@pytest.mark.integration
def test_cpu_actors_share_one_copy_of_the_sources(ray_exec, setup):
    import ray

    from mergesearch.workers.ray_executor import sources_nbytes

    size = sources_nbytes(setup.sources)
    assert ray_exec.packed is not None and ray_exec.packed.nbytes == size
    assert all(f"sources {size / 1024**3:.3f} GiB shared via object store" in line for line in ray_exec.lines)
    stats = ray.get([s.actor.memory.remote(True) for s in ray_exec.slots])
    files = set()
    for m in stats:
        # every source tensor lies in the object store's shared mapping, read but never copied
        assert m["sources"] == size
        assert m["files"] and all("/dev/shm/plasma" in f for f in m["files"]), m["files"]
        assert m["rss"] >= 0.9 * size
        assert m["private"] <= 0.05 * size, m
        assert m["shared"] >= 0.9 * size
        assert m["process_rss"] - m["process_uss"] >= 0.9 * size
        files.update(m["files"])
    assert len(files) == 1, f"the actors map different copies: {files}"
    assert len({m["pid"] for m in stats}) == WORKERS


@pytest.mark.integration
def test_packed_sources_round_trip_every_dtype_bit_for_bit(tmp_path, ray_cluster, monkeypatch):
    """bf16 has no numpy dtype: tensors travel as raw bytes and come back as views of the same bits."""
    import json

    import torch
    from safetensors.torch import save_file

    from mergesearch.io.checkpoint import Checkpoint
    from mergesearch.workers import ray_executor

    monkeypatch.setattr(ray_executor, "CHUNK_BYTES", 256)
    g = torch.Generator().manual_seed(0)
    tensors = {
        "a.bf16": torch.randn(7, 5, generator=g).to(torch.bfloat16),
        "b.f16": torch.randn(3, generator=g).to(torch.float16),
        "c.f32": torch.randn(4, 33, generator=g),
        "d.i64": torch.arange(3, dtype=torch.int64),
        "e.scalar": torch.tensor(2.5),
        "f.empty": torch.zeros(0, 4),
        "g.u8": torch.arange(5, dtype=torch.uint8),
    }
    paths = []
    for i in range(2):
        folder = tmp_path / f"m{i}"
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 1}))
        save_file({k: v + i if v.is_floating_point() else v for k, v in tensors.items()}, str(folder / "model.safetensors"))
        paths.append(str(folder))
    packed = ray_executor.publish_sources(tuple(paths))
    assert len(packed.refs) > 2
    assert packed.nbytes == 2 * sum(t.numel() * t.element_size() for t in tensors.values())
    shared = ray_executor.SharedSources(tuple(paths), packed)
    try:
        for ref in paths:
            ck = Checkpoint(ref)
            for name in tensors:
                want, got = ck.read(name), shared.tensors[ref][name]
                assert got.dtype == want.dtype and got.shape == want.shape
                assert torch.equal(got.reshape(-1).view(torch.uint8), want.reshape(-1).view(torch.uint8)), name
                if got.numel():
                    assert got.data_ptr() % 64 == 0
            ck.close()
    finally:
        shared.close()


@pytest.mark.integration
def test_a_cluster_too_small_is_refused_with_the_fix(setup, ray_cluster):
    from dataclasses import replace

    from mergesearch.workers.ray_executor import RayExecutor, RayExecutorError

    cpus = int(ray_cluster.cluster_resources()["CPU"])
    with pytest.raises(RayExecutorError, match=f"executor.workers is 99 .* has {cpus} CPUs; lower executor.workers to {cpus}"):
        RayExecutor(setup, 99).start()
    with pytest.raises(RayExecutorError, match="has 0 GPUs; set engine.device: cpu"):
        RayExecutor(replace(setup, device="cuda"), 1).start()
    assert ray_cluster.is_initialized()


def test_make_executor_builds_both_kinds(setup):
    from mergesearch.workers.executor import make_executor
    from mergesearch.workers.ray_executor import RayExecutor

    assert isinstance(make_executor("local", setup, 2), LocalExecutor)
    ex = make_executor("ray", setup, 2, "ray://nowhere:10001", 30.0)
    assert isinstance(ex, RayExecutor) and ex.n == 2 and ex.address == "ray://nowhere:10001"
    assert ex.trial_timeout == 30.0
    with pytest.raises(MergeSearchError, match="use local or ray"):
        make_executor("dask", setup)


# ---------------------------------------------------------------------------------------------
# A whole study on Ray


@pytest.mark.integration
def test_a_study_on_ray_survives_workers_killed_several_times(tmp_path, zoo_dir, ray_cluster, monkeypatch):
    from mergesearch.driver.config import load_study
    from mergesearch.driver.driver import run_study
    from mergesearch.workers import executor as executor_module

    made = []
    real = executor_module.make_executor

    def spy(*args, **kwargs):
        made.append(real(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(executor_module, "make_executor", spy)
    path = write_study(tmp_path / "s", zoo_dir, executor={"kind": "ray", "workers": 2}, budget={"trials": 5},
                       evals={"tasks": ["perplexity", "order"], "proxy_limit": 24, "held_out_limit": 2,
                              "chunk_size": 2}, top_k=1, baselines=False)
    url = f"sqlite:///{path.parent / 'out' / 'study.db'}"
    killed: list[dict] = []
    opened: list[bool] = []
    storage_file = (path.parent / "out" / "study.db").resolve()
    stop = threading.Event()

    def assassin():
        """SIGKILL the actor of a RUNNING search trial (not a retry) once another trial has
        finished, KILLS times, each time a trial that finished after the previous kill."""
        while not stop.is_set() and len(killed) < KILLS:
            time.sleep(0.05)
            if not made or not hasattr(made[0], "busy"):
                continue
            try:
                trials = optuna.load_study(study_name="t", storage=url).get_trials()
            except Exception:  # noqa: BLE001 - the study may not exist yet
                continue
            done = {t.number: t.values for t in trials if t.state == TrialState.COMPLETE}
            running = {t.number for t in trials
                       if t.state == TrialState.RUNNING and t.user_attrs.get("retry_of") is None}
            if killed and not set(done) - set(killed[-1]["finished"]):
                continue
            for key, (_name, pid) in made[0].busy().items():
                if not (done and key.startswith("s:") and int(key[2:]) in running):
                    continue
                try:
                    actor = next(s.actor for s in made[0].slots if s.pid == pid)
                    inside = ray_cluster.get(actor.current.remote(), timeout=10)
                except Exception:  # noqa: BLE001 - the actor moved on; look again
                    continue
                if inside == [key]:
                    files = {os.path.realpath(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")}
                    opened.append(any(f.startswith(str(storage_file)) for f in files))
                    killed.append({"number": int(key[2:]), "pid": pid, "finished": done})
                    os.kill(pid, signal.SIGKILL)
                    break

    watcher = threading.Thread(target=assassin, daemon=True)
    watcher.start()
    logs: list[str] = []
    try:
        outcome = run_study(load_study(path), log=logs.append)
    finally:
        stop.set()
        watcher.join(timeout=10)
    assert len(killed) == KILLS, f"only {len(killed)} kill(s): no trial was running on an actor in time"
    assert sum("shared via object store" in line for line in logs) == 2
    assert opened == [False] * KILLS, "an actor held the storage file open mid-trial: only the driver writes it"
    trials = optuna.load_study(study_name="t", storage=url).get_trials()
    for kill in killed:
        for n, values in kill["finished"].items():
            assert trials[n].state == TrialState.COMPLETE and trials[n].values == values, "a finished trial changed"
        victim = trials[kill["number"]]
        assert victim.state == TrialState.FAIL
        assert "died" in victim.user_attrs["error"] and str(kill["pid"]) in victim.user_attrs["error"]
        retries = [t for t in trials if t.user_attrs.get("retry_of") == victim.number]
        assert len(retries) == 1 and retries[0].state == TrialState.COMPLETE
        assert retries[0].params == victim.params
        assert any(f"trial {victim.number} queued again" in line for line in logs)
    assert outcome.counts["complete"] == 5 and outcome.counts["retried"] == KILLS and outcome.counts["failed"] == 0
    assert all(t.user_attrs["worker"].startswith("ray-") for t in trials if t.state == TrialState.COMPLETE)
    assert outcome.best_dir is not None and (outcome.best_dir / "config.json").is_file()
    assert not made[0].slots, "the executor was not closed"
