"""The study driver end to end on a tiny zoo: real Optuna storage, real engine, real merges."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from mergesearch.driver.config import load_study
from mergesearch.driver.driver import BASELINES_SUFFIX, prepare, run_study, scalar_value
from mergesearch.errors import ConfigError, MergeSearchError
from mergesearch.zoo.build import ZooConfig, build_zoo

ROOT = Path(__file__).resolve().parents[1]
TINY = ZooConfig(base_steps=3, expert_steps=2, warmup_steps=1, verify=False, verify_limit=2, threads=1)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def zoo_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("drv") / "zoo"
    build_zoo(root, TINY)
    return root


def write_study(folder: Path, zoo: Path, **over) -> Path:
    """A small study over two experts of the tiny zoo; ``over`` replaces top-level keys."""
    study = {
        "name": "t",
        "sources": {"base": str(zoo / "base"), "models": [str(zoo / "experts" / "addition"),
                                                       str(zoo / "experts" / "order")]},
        "method": "linear",
        "space": "dirichlet_linear",
        "evals": {"tasks": ["perplexity", "order"], "proxy_limit": 6, "held_out_limit": 4, "chunk_size": 2},
        "sampler": "random",
        "budget": {"trials": 3},
        "top_k": 2,
        "output_dir": "out",
    }
    for key, value in over.items():
        if value is None:
            study.pop(key, None)
        else:
            study[key] = value
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "study.yaml"
    path.write_text(yaml.safe_dump(study), encoding="utf-8")
    return path


def stored(path: Path) -> tuple[optuna.Study, optuna.Study]:
    url = f"sqlite:///{path.parent / 'out' / 'study.db'}"
    return (optuna.load_study(study_name="t", storage=url),
            optuna.load_study(study_name="t" + BASELINES_SUFFIX, storage=url))


def test_study_runs_end_to_end_and_stores_the_evidence(tmp_path, zoo_dir):
    path = write_study(tmp_path / "s", zoo_dir)
    logs: list[str] = []
    updates: list[tuple[float, dict, dict]] = []
    outcome = run_study(load_study(path), log=logs.append,
                        update=lambda counts, best, _elapsed: updates.append((time.monotonic(), counts, best)))
    study, baselines = stored(path)
    search = study.get_trials(states=(TrialState.COMPLETE,))
    assert len(search) == 3
    # the display: its last update has the final counts and best; earlier ones at most one a second
    assert updates[-1][1]["complete"] == 3 and updates[-1][1]["running"] == 0
    assert updates[-1][2]["number"] == max(search, key=lambda t: t.values[0]).number
    assert all(b[0] - a[0] >= 0.99 for a, b in zip(updates[:-2], updates[1:-1]))
    labels = sorted(t.user_attrs["label"] for t in baselines.get_trials(states=(TrialState.COMPLETE,)))
    assert labels == ["source: addition", "source: base", "source: order", "uniform merge"]
    meta = study.user_attrs["mergesearch"]
    assert meta["tasks"] == ["perplexity", "order"]
    for t in search:
        a = t.user_attrs
        assert set(a["scores"]) == {"perplexity", "order"}
        assert a["scored"] == {"perplexity": 6, "order": 6}
        assert all(len(v) == 6 and all(0.0 <= x <= 1.0 for x in v) for v in a["examples"].values())
        assert t.values[0] == pytest.approx(scalar_value(a["scores"], {"perplexity": 1.0, "order": 1.0}))
        assert set(a["timings"]) == {"materialise_s", "eval_s", "overhead_s", "total_s", "scratch_mib"}
        assert 0 <= a["timings"]["scratch_mib"] < 64, "merge scratch must stay near one tensor, not a model copy"
        assert a["worker"] and isinstance(a["seed"], int) and a["driver"]
        plan = yaml.safe_load(a["plan"])
        assert plan["merge_method"] == "linear" and len(plan["models"]) == 2
    # held-out re-scoring of the top-k and every baseline, with the gap
    top = sorted(search, key=lambda t: -t.values[0])[:2]
    for t in top:
        held = study.user_attrs[f"held_out:{t.number}"]
        assert held["gap"] == pytest.approx(t.values[0] - held["value"])
        assert all(len(v) == 4 for v in held["examples"].values())
    for t in baselines.get_trials(states=(TrialState.COMPLETE,)):
        assert f"held_out:{t.number}" in baselines.user_attrs
    # best configs and checkpoint
    assert outcome.best_trial == top[0].number
    best_dir = path.parent / "out" / "best"
    configs = sorted(best_dir.glob("rank*-trial*.yaml"))
    assert [c.name.split("-")[0] for c in configs] == ["rank1", "rank2"]
    assert study.user_attrs["finished"]["best_trial"] == top[0].number
    assert (best_dir / "model" / "config.json").is_file()
    assert not [p for p in best_dir.iterdir() if p.name.startswith(".")]


def test_the_written_checkpoint_scores_what_the_in_memory_merge_scored(tmp_path, zoo_dir):
    """Materialising into the live engine and merging to disk give the same model."""
    from mergesearch.eval.hf import TransformersEngine
    from mergesearch.eval.runner import evaluate
    from mergesearch.eval.tasks import load_tasks

    path = write_study(tmp_path / "s", zoo_dir, budget={"trials": 2}, top_k=1)
    outcome = run_study(load_study(path))
    study, _ = stored(path)
    held = study.user_attrs[f"held_out:{outcome.best_trial}"]
    engine = TransformersEngine(outcome.best_dir, dtype="float32")
    for task in load_tasks(["perplexity", "order"], [ROOT / "evals"]):
        result = evaluate(engine, task, "held_out", limit=4)
        assert list(result.scores) == pytest.approx(held["examples"][task.name], abs=1e-5)


def test_resume_keeps_finished_trials_and_n_trials_is_the_total(tmp_path, zoo_dir):
    path = write_study(tmp_path / "s", zoo_dir, budget={"trials": 2}, baselines=False)
    run_study(load_study(path))
    study, _ = stored(path)
    first = {t.number: (t.datetime_complete, t.params) for t in study.get_trials()}
    assert len(first) == 2
    run_study(load_study(path), n_trials=4)
    study, _ = stored(path)
    trials = study.get_trials()
    assert len(trials) == 4 and all(t.state == TrialState.COMPLETE for t in trials)
    for n, (done, params) in first.items():
        assert (trials[n].datetime_complete, trials[n].params) == (done, params)
    run_study(load_study(path), n_trials=4)
    assert len(stored(path)[0].get_trials()) == 4


def test_a_study_with_other_sources_is_refused_and_nothing_is_lost(tmp_path, zoo_dir):
    path = write_study(tmp_path / "s", zoo_dir, budget={"trials": 1}, baselines=False)
    run_study(load_study(path))
    before = stored(path)[0].get_trials()
    other = write_study(tmp_path / "s", zoo_dir, budget={"trials": 1}, baselines=False,
                        sources={"base": str(zoo_dir / "base"),
                                 "models": [str(zoo_dir / "experts" / "addition"),
                                            str(zoo_dir / "experts" / "reverse")]})
    with pytest.raises(MergeSearchError, match="models") as err:
        run_study(load_study(other))
    assert "name" in str(err.value)
    after = stored(path)[0].get_trials()
    assert [(t.number, t.state, t.values) for t in after] == [(t.number, t.state, t.values) for t in before]


def test_pruned_trials_keep_their_partial_scores(tmp_path, zoo_dir):
    path = write_study(tmp_path / "s", zoo_dir, budget={"trials": 6}, baselines=False, top_k=1,
                       evals={"tasks": ["perplexity"], "proxy_limit": 8, "held_out_limit": 2, "chunk_size": 2},
                       pruner={"name": "median", "options": {"n_startup_trials": 1, "n_warmup_steps": 0}})
    run_study(load_study(path))
    study, _ = stored(path)
    pruned = study.get_trials(states=(TrialState.PRUNED,))
    assert pruned, [t.intermediate_values for t in study.get_trials()]
    for t in pruned:
        assert 0 < t.user_attrs["scored"]["perplexity"] < 8
        assert len(t.user_attrs["examples"]["perplexity"]) == t.user_attrs["scored"]["perplexity"]
        assert t.intermediate_values


def test_wilcoxon_pruner_gets_per_example_steps(tmp_path, zoo_dir):
    path = write_study(tmp_path / "s", zoo_dir, budget={"trials": 3}, baselines=False, top_k=1,
                       pruner={"name": "wilcoxon", "options": {"p_threshold": 0.5}})
    run_study(load_study(path))
    study, _ = stored(path)
    done = study.get_trials(states=(TrialState.COMPLETE,))
    assert done and sorted(done[0].intermediate_values) == list(range(12))


DRIVER_SCRIPT = """
import sys
from mergesearch.driver.config import load_study
from mergesearch.driver.driver import run_study
run_study(load_study(sys.argv[1]))
"""


def test_a_killed_driver_loses_no_finished_trial(tmp_path, zoo_dir):
    path = write_study(tmp_path / "s", zoo_dir, budget={"trials": 4}, baselines=False, top_k=1,
                       evals={"tasks": ["perplexity", "order"], "proxy_limit": 24, "held_out_limit": 2,
                              "chunk_size": 2})
    db = path.parent / "out" / "study.db"
    proc = subprocess.Popen([sys.executable, "-c", DRIVER_SCRIPT, str(path)], cwd=tmp_path,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 240
    try:
        while time.time() < deadline:
            if db.exists():
                try:
                    trials = optuna.load_study(study_name="t", storage=f"sqlite:///{db}").get_trials()
                except Exception:  # noqa: BLE001 - the study may not exist yet
                    trials = []
                states = [t.state for t in trials]
                if TrialState.COMPLETE in states and TrialState.RUNNING in states:
                    break
            time.sleep(0.2)
        else:
            pytest.fail("the driver never had a finished and a running trial")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    study, _ = stored(path)
    finished = {t.number: t.values for t in study.get_trials(states=(TrialState.COMPLETE,))}
    running = [t for t in study.get_trials() if t.state == TrialState.RUNNING]
    assert finished and running
    run_study(load_study(path))
    study, _ = stored(path)
    trials = study.get_trials()
    for n, values in finished.items():
        assert trials[n].values == values
    for t in running:
        assert trials[t.number].state == TrialState.FAIL
        retries = [r for r in trials if r.user_attrs.get("retry_of") == t.number]
        assert len(retries) == 1 and retries[0].state == TrialState.COMPLETE
        assert retries[0].params == t.params
    assert sum(t.state == TrialState.COMPLETE for t in trials) == 4


@pytest.mark.integration
def test_study_on_postgresql(tmp_path, zoo_dir, postgres_url):
    path = write_study(tmp_path / "s", zoo_dir, budget={"trials": 2}, baselines=False, top_k=1,
                       storage=postgres_url, name="pg_study")
    run_study(load_study(path))
    study = optuna.load_study(study_name="pg_study", storage=postgres_url)
    assert len(study.get_trials(states=(TrialState.COMPLETE,))) == 2
    assert "finished" in study.user_attrs
    run_study(load_study(path), n_trials=3)
    assert len(optuna.load_study(study_name="pg_study", storage=postgres_url).get_trials()) == 3


@pytest.mark.parametrize(
    "over, match",
    [
        ({"sampler": "annealing"}, "sampler"),
        ({"space": "dirichlet_linea"}, "dirichlet_linear"),
        ({"method": "slerpp"}, "slerp"),
        ({"budget": {"trials": 0}}, "trials"),
        ({"evals": {"tasks": ["additon"]}}, "addition"),
        ({"method": "ties", "space": "dirichlet_linear"}, "linear"),
        ({"storage": "mysql://nobody@localhost/x"}, "sqlite"),
        ({"sampler": "cmaes", "evals": {"tasks": ["order"], "objective": "per_task"}}, "per_task"),
        ({"colour": "blue"}, "colour"),
    ],
)
def test_bad_study_files_are_refused_before_anything_runs(tmp_path, zoo_dir, over, match):
    path = write_study(tmp_path / "s", zoo_dir, **over)
    with pytest.raises(MergeSearchError, match=match):
        sf = load_study(path)
        prep = prepare(sf)
        run_study(sf, prepared=prep)
    assert not (path.parent / "out" / "study.db").exists() or "storage" in over


def test_missing_sources_name_the_fix(tmp_path, zoo_dir):
    path = write_study(tmp_path / "s", zoo_dir, sources={"models": ["../nowhere/a", "../nowhere/b"]})
    with pytest.raises(ConfigError, match="mergesearch zoo"):
        prepare(load_study(path))


def test_shipped_studies_are_valid(tmp_path, zoo_dir, monkeypatch):
    """Every file in studies/ validates and fits its space against a zoo laid out like the real one."""
    (tmp_path / "zoo").symlink_to(zoo_dir)
    monkeypatch.setenv("MERGESEARCH_CACHE_DIR", str(tmp_path / "cache"))   # calibration of importance studies
    files = sorted((ROOT / "studies").glob("*.yaml"))
    assert files
    from mergesearch.plan import load_plan

    (tmp_path / "studies").mkdir()
    for src in [*files, *(ROOT / "studies").glob("*.jsonl")]:
        (tmp_path / "studies" / src.name).write_text(src.read_text(encoding="utf-8"), encoding="utf-8")
    for src in files:
        if "merge_method" in yaml.safe_load(src.read_text(encoding="utf-8")):
            load_plan(tmp_path / "studies" / src.name)
            continue
        head = src.read_text(encoding="utf-8").splitlines()[0]
        assert head.startswith("# "), f"{src.name} needs a header comment"
        assert "mergesearch" in src.read_text(encoding="utf-8").split("\nname:")[0], src.name
        dst = tmp_path / "studies" / src.name
        prep = prepare(load_study(dst))
        assert prep.task_names, src.name


def test_cli_run_and_status(tmp_path, zoo_dir, capsys):
    from mergesearch.cli import main

    path = write_study(tmp_path / "s", zoo_dir, budget={"trials": 2}, top_k=1)
    assert main(["run", str(path), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "uniform merge" in out and "best merge" in out
    assert main(["status", str(path), "--json"]) == 0
    import json

    board = json.loads(capsys.readouterr().out)
    assert board
    assert main(["status", "--storage", f"sqlite:///{path.parent / 'out' / 'study.db'}", "--study", "nope"]) == 2
    assert "Unknown study 'nope'" in capsys.readouterr().err
    assert main(["run", str(tmp_path / "missing.yaml")]) == 2


def _hang_second_eval(monkeypatch):
    """Fault injection: the second proxy eval of the process blocks until the returned event is set."""
    import threading

    from mergesearch.eval import runner

    real = runner.evaluate_interleaved
    release = threading.Event()
    calls = []

    def hang_on_second_call(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            release.wait(120)
        return real(*args, **kwargs)

    monkeypatch.setattr(runner, "evaluate_interleaved", hang_on_second_call)
    return release


def test_a_hung_eval_on_the_local_executor_times_out_and_the_study_goes_on(tmp_path, zoo_dir, monkeypatch):
    release = _hang_second_eval(monkeypatch)
    path = write_study(tmp_path / "s", zoo_dir, budget={"trials": 3}, baselines=False, top_k=1,
                       executor={"kind": "local", "workers": 1, "trial_timeout": 3})
    logs: list[str] = []
    try:
        outcome = run_study(load_study(path), log=logs.append)
    finally:
        release.set()
    study, _ = stored(path)
    trials = study.get_trials()
    hung = trials[1]
    assert hung.state == TrialState.FAIL and "trial_timeout (3s)" in hung.user_attrs["error"]
    retry = [t for t in trials if t.user_attrs.get("retry_of") == 1]
    assert len(retry) == 1 and retry[0].state == TrialState.COMPLETE and retry[0].params == hung.params
    assert retry[0].user_attrs["worker"] == "local-r1"
    assert outcome.counts["complete"] == 3 and outcome.counts["retried"] == 1 and outcome.counts["failed"] == 0
    assert any("trial 1 queued again" in line for line in logs)


def test_when_no_worker_can_be_replaced_the_study_stops_with_the_reason_and_keeps_its_trials(
        tmp_path, zoo_dir, monkeypatch):
    from mergesearch.workers import executor as executor_module

    release = _hang_second_eval(monkeypatch)
    real_worker = executor_module.Worker
    made = []

    def worker_or_out_of_memory(*args, **kwargs):
        if made:
            raise MemoryError("cannot allocate the engine")
        made.append(real_worker(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(executor_module, "Worker", worker_or_out_of_memory)
    path = write_study(tmp_path / "s", zoo_dir, budget={"trials": 3}, baselines=False, top_k=1,
                       executor={"kind": "local", "workers": 1, "trial_timeout": 3})
    logs: list[str] = []
    try:
        with pytest.raises(MergeSearchError, match="Every worker is gone") as err:
            run_study(load_study(path), log=logs.append)
    finally:
        release.set()
    assert "2 trial(s) of its budget left" in str(err.value)
    assert any("local-r1 failed to start: MemoryError: cannot allocate the engine" in line for line in logs)
    study, _ = stored(path)
    states = [t.state for t in study.get_trials()]
    assert states[:2] == [TrialState.COMPLETE, TrialState.FAIL], "the finished trial is kept"
    assert TrialState.RUNNING not in states


def test_a_trial_whose_eval_scores_nan_fails_with_the_reason_and_is_never_best(tmp_path, zoo_dir, monkeypatch):
    """Fault injection: the second proxy eval of the study returns NaN scores."""
    import dataclasses

    from mergesearch.eval import runner

    real = runner.evaluate_interleaved
    calls = []

    def nan_on_second_call(*args, **kwargs):
        results = real(*args, **kwargs)
        calls.append(kwargs.get("split", args[2] if len(args) > 2 else "proxy"))
        if len(calls) == 2:
            results = [dataclasses.replace(r, scores=tuple(float("nan") for _ in r.scores)) for r in results]
        return results

    monkeypatch.setattr(runner, "evaluate_interleaved", nan_on_second_call)
    path = write_study(tmp_path / "s", zoo_dir, budget={"trials": 3}, baselines=False, top_k=3)
    outcome = run_study(load_study(path))
    study, _ = stored(path)
    failed = study.get_trials(states=(TrialState.FAIL,))
    assert [t.number for t in failed] == [1]
    assert "NaN" in failed[0].user_attrs["error"]
    complete = study.get_trials(states=(TrialState.COMPLETE,))
    assert [t.number for t in complete] == [0, 2], "the study goes on; the failed trial counts in the budget"
    assert outcome.best_trial != 1 and outcome.best_trial in {t.number for t in complete}
    assert "held_out:1" not in study.user_attrs
