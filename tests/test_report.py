"""The leaderboard, its rendering, `status` and the progress display, on real Optuna SQLite studies."""

from __future__ import annotations

import io
import json
from datetime import datetime, timedelta
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState
from rich.console import Console

from mergesearch.driver.report import (
    Progress,
    StorageOpenError,
    leaderboard,
    leaderboard_json,
    pareto_front,
    render_leaderboard,
    status_command,
    summary_lines,
)
from mergesearch.errors import UnknownNameError

T0 = datetime(2025, 1, 1, 12, 0, 0)
WEIGHTS = {"a": 2.0, "b": 1.0}


def _mean(a: float, b: float) -> float:
    return (2 * a + b) / 3


def _add(study: optuna.Study, n: int, scores: dict[str, float], *, state: TrialState = TrialState.COMPLETE,
         values: list[float] | None = None, kind: str = "search", label: str = "", **attrs: object) -> None:
    user_attrs = {"kind": kind, "label": label, "scores": scores, "scored": {t: 20 for t in scores},
                  "timings": {"materialise_s": 1.0, "eval_s": 5.0, "overhead_s": 0.5, "total_s": 6.5},
                  "worker": "local-0", "seed": n, **attrs}
    if state == TrialState.COMPLETE and values is None:
        values = [_mean(scores["a"], scores["b"])]
    trial = optuna.trial.create_trial(state=state, values=values if state == TrialState.COMPLETE else None,
                                      user_attrs=user_attrs)
    trial.datetime_start = T0 + timedelta(minutes=10 * n)
    trial.datetime_complete = T0 + timedelta(minutes=10 * n + 10)
    study.add_trial(trial)


def _meta(objective: str, weights: dict[str, float], **extra: object) -> dict[str, object]:
    return {"version": "0.1.0", "fingerprint": {}, "tasks": list(weights), "weights": weights,
            "objective": objective, "config": {}, **extra}


@pytest.fixture(scope="module")
def storage_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    url = f"sqlite:///{tmp_path_factory.mktemp('report') / 'study.db'}"

    # The driver's layout: a search study and its ".baselines" companion.
    s = optuna.create_study(study_name="demo", storage=url, direction="maximize")
    s.set_user_attr("mergesearch", _meta("mean", WEIGHTS, baselines_study="demo.baselines"))
    _add(s, 0, {"a": 0.6, "b": 0.3}, kind="start", label="start: my.yaml")
    _add(s, 1, {"a": 0.9, "b": 0.6})
    _add(s, 2, {"a": 0.7, "b": 0.7})
    pruned = {"scores": {"a": 0.3}, "scored": {"a": 8}}
    trial = optuna.trial.create_trial(state=TrialState.PRUNED, intermediate_values={8: 0.3},
                                      user_attrs={"kind": "search", "label": "", **pruned})
    trial.datetime_start, trial.datetime_complete = T0 + timedelta(minutes=30), T0 + timedelta(minutes=40)
    s.add_trial(trial)
    _add(s, 4, {}, state=TrialState.FAIL, error="worker ran out of memory\ntraceback ...")
    _add(s, 5, {"a": 0.45, "b": 0.9})
    s.ask()
    s.enqueue_trial({})
    s.set_user_attr("held_out:1", {"scores": {"a": 0.8, "b": 0.5}, "value": 0.7, "gap": 0.1})

    b = optuna.create_study(study_name="demo.baselines", storage=url, direction="maximize")
    b.set_user_attr("mergesearch", _meta("mean", WEIGHTS, baselines_study="demo.baselines", search_study="demo"))
    _add(b, 0, {"a": 0.8, "b": 0.2}, kind="baseline", label="source: alpha")
    _add(b, 1, {"a": 0.3, "b": 0.8}, kind="baseline", label="source: beta")
    _add(b, 2, {"a": 0.7, "b": 0.5}, kind="baseline", label="uniform merge")
    b.set_user_attr("held_out:0", {"scores": {"a": 0.75, "b": 0.2}, "value": _mean(0.75, 0.2)})
    b.set_user_attr("held_out:2", {"scores": {"a": 0.6, "b": 0.45}, "value": _mean(0.6, 0.45)})

    # One objective per task, weights a=1, b=3; baselines inside the study.
    p = optuna.create_study(study_name="pt", storage=url, directions=["maximize", "maximize"])
    p.set_user_attr("mergesearch", _meta("per_task", {"a": 1.0, "b": 3.0}))
    for n, (x, y) in enumerate([(0.9, 0.1), (0.2, 0.8), (0.5, 0.5), (0.1, 0.7)]):
        _add(p, n, {"a": x, "b": y}, values=[x, y])
    _add(p, 4, {"a": 0.4, "b": 0.4}, values=[0.4, 0.4], kind="baseline", label="uniform merge")
    return url


def _load(url: str, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=url)


def _console(width: int = 200) -> tuple[Console, io.StringIO]:
    buf = io.StringIO()
    return Console(file=buf, width=width, color_system=None, force_terminal=False), buf


def test_ordering_counts_and_rate(storage_url: str) -> None:
    lb = leaderboard(_load(storage_url, "demo"))
    assert [r.number for r in lb.rows] == [1, 2, 5, 0]
    assert [r.rank for r in lb.rows] == [1, 2, 3, 4]
    assert lb.rows[0].value == pytest.approx(0.8)
    assert lb.rows[3].kind == "start" and lb.rows[3].name == "start: my.yaml"
    assert lb.counts == {"complete": 4, "pruned": 1, "failed": 1, "running": 1, "waiting": 1}
    assert lb.best is not None and lb.best.number == 1
    assert lb.trials_per_hour == pytest.approx(6.0)  # six finished trials between 12:00 and 13:00
    assert lb.rows[0].timings["total_s"] == 6.5 and lb.rows[0].duration_s == 6.5
    assert lb.failed[0].error.startswith("worker ran out of memory")
    top = leaderboard(_load(storage_url, "demo"), top=2)
    assert [r.number for r in top.rows] == [1, 2] and top.n_complete == 4


def test_baselines_held_out_and_gap(storage_url: str) -> None:
    lb = leaderboard(_load(storage_url, "demo"))
    assert lb.baselines_study == "demo.baselines"
    assert [r.label for r in lb.baselines] == ["source: alpha", "source: beta", "uniform merge"]
    assert all(r.study == "demo.baselines" for r in lb.baselines)
    best = lb.rows[0]
    assert best.held_out_value == pytest.approx(0.7)
    assert best.held_out_scores == {"a": 0.8, "b": 0.5}
    assert best.gap == pytest.approx(0.8 - 0.7)
    assert lb.rows[1].held_out_value is None and lb.rows[1].gap is None
    alpha = lb.baselines[0]
    assert alpha.held_out_value == pytest.approx(_mean(0.75, 0.2))
    assert alpha.gap == pytest.approx(_mean(0.8, 0.2) - _mean(0.75, 0.2))
    assert lb.best_source is alpha and lb.uniform is lb.baselines[2]
    m = lb.margins()
    assert m["proxy"]["vs_best_source"] == pytest.approx(0.8 - 0.6)
    assert m["proxy"]["vs_uniform"] == pytest.approx(0.8 - _mean(0.7, 0.5))
    assert m["held_out"]["vs_best_source"] == pytest.approx(0.7 - _mean(0.75, 0.2))
    assert m["held_out"]["vs_uniform"] == pytest.approx(0.7 - _mean(0.6, 0.45))


def test_pruned_trials_keep_partial_scores(storage_url: str) -> None:
    lb = leaderboard(_load(storage_url, "demo"))
    (p,) = lb.pruned
    assert p.number == 3 and p.state == "pruned"
    assert p.scores == {"a": 0.3} and p.scored == {"a": 8} and p.pruned_at == 8
    assert p.value == pytest.approx(0.3)  # mean over the tasks it reached


def test_per_task_objective_weights_and_pareto(storage_url: str) -> None:
    lb = leaderboard(_load(storage_url, "pt"))
    assert lb.objective == "per_task"
    assert [r.number for r in lb.rows] == [1, 3, 2, 0]
    assert [round(r.value, 4) for r in lb.rows] == [0.65, 0.55, 0.5, 0.3]  # (a + 3 b) / 4
    assert lb.rows[0].values == (0.2, 0.8)
    assert [r.label for r in lb.baselines] == ["uniform merge"] and lb.baselines[0].number == 4
    assert set(lb.pareto) == {0, 1, 2}
    assert [r.number for r in pareto_front(lb.rows, lb.tasks)] == [1, 2, 0]
    assert leaderboard(_load(storage_url, "demo")).pareto == ()


def test_json(storage_url: str) -> None:
    data = leaderboard_json(leaderboard(_load(storage_url, "demo")))
    data = json.loads(json.dumps(data))
    assert data["study"] == "demo" and data["tasks"] == ["a", "b"] and data["weights"] == WEIGHTS
    assert data["best"]["number"] == 1 and data["best"]["gap"] == pytest.approx(0.1)
    assert [r["number"] for r in data["rows"]] == [1, 2, 5, 0]
    assert [r["name"] for r in data["baselines"]] == ["source: alpha", "source: beta", "uniform merge"]
    assert data["pruned"][0]["scores"] == {"a": 0.3}
    assert data["comparison"]["proxy"]["vs_best_source"] == pytest.approx(0.2)
    assert data["counts"]["failed"] == 1 and data["trials_per_hour"] == pytest.approx(6.0)


def test_rendering_shows_the_numbers(storage_url: str) -> None:
    console, buf = _console()
    render_leaderboard(leaderboard(_load(storage_url, "demo")), console)
    out = buf.getvalue()
    for expected in ("Study demo", "4 complete, 1 pruned, 1 failed, 1 running, 1 waiting", "6.0 trials/hour",
                     "0.800", "0.700", "+0.100", "h 0.800", "h 0.500", "start: my.yaml", "source: alpha",
                     "uniform merge", "Baselines", "Pruned", "8 ex", "worker ran out of memory",
                     "beats best source (source: alpha, 0.600) by +0.200 and uniform merge (0.633) by +0.167",
                     "Held-out: 0.700 (gap +0.100) vs best source by +0.133 and uniform merge by +0.150"):
        assert expected in out, expected
    assert out.index("Trials (4 complete") < out.index("Baselines") < out.index("Best: trial 1")


def test_summary_when_a_baseline_wins(storage_url: str) -> None:
    lb = leaderboard(_load(storage_url, "pt"))
    assert summary_lines(lb)[0].startswith("Best: trial 1 (search), proxy 0.650 — beats uniform merge")
    console, buf = _console()
    render_leaderboard(lb, console)
    assert "◆" in buf.getvalue() and "Held-out: not scored yet" in buf.getvalue()


def test_status_command(storage_url: str, tmp_path: Path) -> None:
    console, buf = _console()
    lb = status_command(storage_url, "demo", 3, False, console)
    assert lb is not None and len(lb.rows) == 3 and "Best: trial 1" in buf.getvalue()

    console, buf = _console()
    status_command(storage_url, "demo", 10, True, console)
    assert json.loads(buf.getvalue())["best"]["number"] == 1

    console, buf = _console()
    assert status_command(storage_url, None, 10, False, console) is None  # demo and pt: ambiguous
    assert "demo.baselines" in buf.getvalue() and "--study NAME" in buf.getvalue()

    with pytest.raises(UnknownNameError, match="Did you mean 'demo'"):
        status_command(storage_url, "demi", 10, False, console)
    with pytest.raises(StorageOpenError, match="does not exist"):
        status_command(f"sqlite:///{tmp_path / 'missing.db'}", None, 10, False, console)
    assert not (tmp_path / "missing.db").exists()

    single = f"sqlite:///{tmp_path / 'one.db'}"
    optuna.create_study(study_name="only", storage=single)
    optuna.create_study(study_name="only.baselines", storage=single)
    console, buf = _console()
    lb = status_command(single, None, 10, False, console)
    assert lb is not None and lb.study_name == "only" and "No trial has completed yet." in buf.getvalue()


def test_progress_plain_lines() -> None:
    console, buf = _console()
    best = {"number": 7, "value": 0.71234, "scores": {"a": 0.8, "b": 0.55}, "label": "trial 7"}
    with Progress(console, total_trials=10, wall_time_s=1800, tasks=["a", "b"], min_interval_s=60) as prog:
        assert not prog.live_mode
        prog.update({"complete": 1, "pruned": 1, "failed": 0, "running": 2, "waiting": 0}, best, 720.0)
        prog.update({"complete": 1, "pruned": 1, "failed": 0, "running": 2, "waiting": 0}, best, 725.0)
        prog.log("trial 7 pruned at 96 examples")
        prog.update({"complete": 2, "pruned": 1, "failed": 0, "running": 1, "waiting": 0}, best, 730.0)
        assert prog.eta()[1] == "wall time"
    lines = buf.getvalue().splitlines()
    assert len(lines) == 4  # first update, the log line, the finished trial, the final line
    assert lines[0].startswith("[12m00s] 2/10 trials done (1 complete, 1 pruned, 0 failed, 2 running)")
    assert "10.0 trials/h" in lines[0] and "ETA 18m00s (wall-time budget)" in lines[0]
    assert "best: trial 7 0.712 [a 0.800 b 0.550]" in lines[0]
    assert lines[1] == "trial 7 pruned at 96 examples"
    assert lines[2].startswith("[12m10s] 3/10 trials done") and lines[3] == lines[2]


def test_progress_eta_from_rate_and_live_mode() -> None:
    console, buf = _console()
    prog = Progress(console, total_trials=10, wall_time_s=None, tasks=["a"])
    prog.update({"complete": 5, "finished": 5}, None, 1800.0)
    assert prog.rate_per_hour == pytest.approx(10.0)
    assert prog.eta() == (pytest.approx(1800.0), "trials")
    assert "best: —" in prog.status_line()

    buf = io.StringIO()
    term = Console(file=buf, width=120, force_terminal=True, color_system=None)
    with Progress(term, total_trials=4, wall_time_s=None, tasks=["a"]) as live:
        assert live.live_mode
        live.log("trial 0 done")
        live.update({"complete": 1}, {"number": 0, "value": 0.5, "scores": {"a": 0.5}, "label": "uniform merge"}, 60.0)
    out = buf.getvalue()
    assert "trial 0 done" in out and "1/4 trials done" in out and "uniform merge" in out
