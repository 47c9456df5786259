"""What a study found, read back from its Optuna storage: the leaderboard, its rendering, and the
live progress display of `mergesearch run`.

Everything here reads only the stored schema (trial and study user attrs written by the driver),
so `mergesearch status` works on any storage the driver wrote, from any machine, while a study
runs or after it ended. No torch import.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

import optuna
from optuna.trial import FrozenTrial, TrialState
from rich.console import Console, Group
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from mergesearch.errors import ConfigError, MergeSearchError, unknown

if TYPE_CHECKING:
    from typing_extensions import Self

BASELINES_SUFFIX = ".baselines"
STATES = ("complete", "pruned", "failed", "running", "waiting")
_STATE_NAMES = {
    TrialState.COMPLETE: "complete",
    TrialState.PRUNED: "pruned",
    TrialState.FAIL: "failed",
    TrialState.RUNNING: "running",
    TrialState.WAITING: "waiting",
}


class StorageOpenError(ConfigError):
    """A storage URL that cannot be opened, or holds no study to show."""


# ---------------------------------------------------------------------------------------------
# Data


@dataclass(frozen=True)
class Row:
    """One trial as the leaderboard shows it. ``value`` is the scalar proxy value (the ranking key):
    the stored objective for a single objective, the weighted mean of the per-task values for
    ``per_task``; for a pruned trial the weighted mean of its partial scores."""

    number: int
    study: str
    state: str
    kind: str
    label: str
    value: float | None
    values: tuple[float, ...]
    scores: dict[str, float]
    scored: dict[str, int]
    held_out_value: float | None = None
    held_out_scores: dict[str, float] = field(default_factory=dict)
    gap: float | None = None
    timings: dict[str, float] = field(default_factory=dict)
    duration_s: float | None = None
    worker: str = ""
    seed: int | None = None
    error: str = ""
    retry_of: int | None = None
    pruned_at: int | None = None
    rank: int | None = None
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        """What to call the trial: its label, or its kind."""
        return self.label or self.kind

    @property
    def is_uniform(self) -> bool:
        return self.kind == "baseline" and self.label.lower().startswith("uniform")

    @property
    def is_source(self) -> bool:
        return self.kind == "baseline" and not self.is_uniform


@dataclass(frozen=True)
class Leaderboard:
    """A study's results. ``rows``: complete non-baseline trials, best first (cut to ``top``);
    ``baselines``: each source alone and the uniform merge (all of them, any state);
    ``pruned``/``failed``: those trials, pruned ones with their partial scores, best first."""

    study_name: str
    baselines_study: str | None
    tasks: tuple[str, ...]
    weights: dict[str, float]
    objective: str
    rows: tuple[Row, ...]
    baselines: tuple[Row, ...]
    pruned: tuple[Row, ...]
    failed: tuple[Row, ...]
    counts: dict[str, int]
    n_complete: int
    best: Row | None
    trials_per_hour: float | None
    pareto: tuple[int, ...]
    finished: dict[str, Any] | None

    @property
    def best_source(self) -> Row | None:
        """The best source model alone on proxy (complete baselines only)."""
        return _max_value(r for r in self.baselines if r.is_source and r.state == "complete")

    @property
    def uniform(self) -> Row | None:
        return next((r for r in self.baselines if r.is_uniform and r.state == "complete"), None)

    def margins(self) -> dict[str, dict[str, float | None]]:
        """Best trial minus the best source and minus the uniform merge, on proxy and held-out."""
        best, src, uni = self.best, self.best_source, self.uniform
        held_src = _max_value((r for r in self.baselines if r.is_source and r.held_out_value is not None),
                              key="held_out_value")
        return {
            "proxy": {"vs_best_source": _diff(best and best.value, src and src.value),
                      "vs_uniform": _diff(best and best.value, uni and uni.value)},
            "held_out": {"vs_best_source": _diff(best and best.held_out_value, held_src and held_src.held_out_value),
                         "vs_uniform": _diff(best and best.held_out_value, uni and uni.held_out_value)},
        }


def _diff(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def _max_value(rows: Any, key: str = "value") -> Row | None:
    best = None
    for r in rows:
        v = getattr(r, key)
        if v is not None and (best is None or v > getattr(best, key)):
            best = r
    return best


def weighted_mean(scores: Mapping[str, float], weights: Mapping[str, float]) -> float | None:
    """The weighted mean over the tasks present in ``scores`` (weights renormalised); None if none."""
    present = [(t, w) for t, w in weights.items() if scores.get(t) is not None]
    total = sum(w for _t, w in present)
    if not present or total <= 0:
        return None
    return sum(w * float(scores[t]) for t, w in present) / total


def _meta(study: optuna.Study) -> tuple[tuple[str, ...], dict[str, float], str, dict[str, Any]]:
    meta = study.user_attrs.get("mergesearch") or {}
    tasks = list(meta.get("tasks") or meta.get("weights") or [])
    if not tasks:
        for t in study.get_trials(deepcopy=False):
            for task in t.user_attrs.get("scores") or {}:
                if task not in tasks:
                    tasks.append(task)
    stored = meta.get("weights") or {}
    weights = {t: float(stored.get(t, 1.0)) for t in tasks}
    objective = meta.get("objective") or ("per_task" if len(study.directions) > 1 else "mean")
    return tuple(tasks), weights, objective, meta


def _row(t: FrozenTrial, study_name: str, held: Mapping[str, Any], tasks: Sequence[str],
         weights: Mapping[str, float], objective: str) -> Row:
    ua = t.user_attrs
    state = _STATE_NAMES.get(t.state, t.state.name.lower())
    scores = {k: float(v) for k, v in (ua.get("scores") or {}).items()}
    values = tuple(float(v) for v in (t.values or ()))
    if state == "complete" and values:
        if objective == "per_task" and len(values) == len(tasks):
            value = weighted_mean(dict(zip(tasks, values)), weights)
        else:
            value = values[0]
    else:
        value = weighted_mean(scores, weights)
    h = held.get(f"held_out:{t.number}") or {}
    h_scores = {k: float(v) for k, v in (h.get("scores") or {}).items()}
    h_value = h.get("value")
    if h_value is None and h_scores:
        h_value = weighted_mean(h_scores, weights)
    gap = None
    if h_value is not None:
        h_value = float(h_value)
        gap = value - h_value if value is not None else h.get("gap")
    timings = {k: float(v) for k, v in (ua.get("timings") or {}).items()}
    duration = timings.get("total_s")
    if duration is None and t.datetime_start and t.datetime_complete:
        duration = (t.datetime_complete - t.datetime_start).total_seconds()
    scored = {k: int(v) for k, v in (ua.get("scored") or {}).items()}
    pruned_at = None
    if state == "pruned":
        pruned_at = sum(scored.values()) if scored else (max(t.intermediate_values) if t.intermediate_values else None)
    return Row(
        number=t.number, study=study_name, state=state, kind=ua.get("kind") or "search",
        label=ua.get("label") or "", value=value, values=values, scores=scores, scored=scored,
        held_out_value=h_value, held_out_scores=h_scores, gap=gap, timings=timings, duration_s=duration,
        worker=str(ua.get("worker") or ""), seed=ua.get("seed"), error=str(ua.get("error") or ""),
        retry_of=ua.get("retry_of"), pruned_at=pruned_at, params=dict(t.params),
    )


def _rank_key(r: Row) -> tuple[float, int]:
    return (-(r.value if r.value is not None else -math.inf), r.number)


def pareto_front(rows: Sequence[Row], tasks: Sequence[str]) -> list[Row]:
    """The rows no other row dominates on the per-task proxy scores (maximised), in input order.
    Rows missing a task score are left out."""
    points = [(r, tuple(r.scores[t] for t in tasks)) for r in rows if all(t in r.scores for t in tasks)]

    def dominates(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
        return all(x >= y for x, y in zip(a, b)) and any(x > y for x, y in zip(a, b))

    return [r for r, p in points if not any(dominates(q, p) for _o, q in points)]


def _trials_per_hour(trials: Sequence[FrozenTrial]) -> float | None:
    done = [t for t in trials if t.state.is_finished() and t.datetime_start and t.datetime_complete]
    if not done:
        return None
    span = (max(t.datetime_complete for t in done) - min(t.datetime_start for t in done)).total_seconds()
    return len(done) * 3600.0 / span if span > 0 else None


def leaderboard(study: optuna.Study, top: int | None = None,
                baselines: optuna.Study | None = None) -> Leaderboard:
    """The leaderboard of ``study``. Baselines come from trials of kind "baseline" in ``study`` and
    from the companion baselines study (``baselines``, or the one the study's "mergesearch" attr
    names as "baselines_study", else "<name>.baselines" when it exists in the same storage)."""
    tasks, weights, objective, meta = _meta(study)
    if baselines is None:
        baselines = _companion(study, meta)
    trials = study.get_trials(deepcopy=False)
    held = study.user_attrs
    rows = [_row(t, study.study_name, held, tasks, weights, objective) for t in trials]
    base_rows = [r for r in rows if r.kind == "baseline"]
    if baselines is not None:
        b_held = baselines.user_attrs
        base_rows += [_row(t, baselines.study_name, b_held, tasks, weights, objective)
                      for t in baselines.get_trials(deepcopy=False)]
    searched = [r for r in rows if r.kind != "baseline"]
    complete = sorted((r for r in searched if r.state == "complete"), key=_rank_key)
    complete = [_with_rank(r, i) for i, r in enumerate(complete, 1)]
    counts = {s: 0 for s in STATES}
    for t in trials:
        name = _STATE_NAMES.get(t.state)
        if name:
            counts[name] += 1
    finished = study.user_attrs.get("finished")
    best = complete[0] if complete else None
    if isinstance(finished, Mapping):
        best = next((r for r in complete if r.number == finished.get("best_trial")), best)
    base_rows.sort(key=lambda r: (r.is_uniform, r.study != study.study_name, r.number))
    pareto: tuple[int, ...] = ()
    if objective == "per_task":
        pareto = tuple(r.number for r in pareto_front(complete, tasks))
    return Leaderboard(
        study_name=study.study_name,
        baselines_study=baselines.study_name if baselines is not None else None,
        tasks=tasks, weights=weights, objective=objective,
        rows=tuple(complete[:top] if top is not None else complete),
        baselines=tuple(base_rows),
        pruned=tuple(sorted((r for r in searched if r.state == "pruned"), key=_rank_key)),
        failed=tuple(r for r in searched if r.state == "failed"),
        counts=counts, n_complete=len(complete), best=best,
        trials_per_hour=_trials_per_hour(trials),
        pareto=pareto,
        finished=dict(finished) if isinstance(finished, Mapping) else None,
    )


def _with_rank(r: Row, rank: int) -> Row:
    from dataclasses import replace

    return replace(r, rank=rank)


def _companion(study: optuna.Study, meta: Mapping[str, Any]) -> optuna.Study | None:
    name = meta.get("baselines_study")
    if not name and not study.study_name.endswith(BASELINES_SUFFIX):
        name = study.study_name + BASELINES_SUFFIX
    if not name or name == study.study_name:
        return None
    storage = study._storage
    try:
        storage.get_study_id_from_name(name)
    except KeyError:
        return None
    return optuna.load_study(study_name=name, storage=storage)


# ---------------------------------------------------------------------------------------------
# JSON


def _clean(x: Any) -> Any:
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, Mapping):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if isinstance(x, datetime):
        return x.isoformat()
    return x


def _row_json(r: Row) -> dict[str, Any]:
    return _clean({**asdict(r), "name": r.name})


def leaderboard_json(lb: Leaderboard) -> dict[str, Any]:
    """The leaderboard as plain JSON-ready data (`mergesearch status --json`)."""
    return _clean({
        "study": lb.study_name,
        "baselines_study": lb.baselines_study,
        "tasks": list(lb.tasks),
        "weights": lb.weights,
        "objective": lb.objective,
        "counts": lb.counts,
        "complete": lb.n_complete,
        "trials_per_hour": lb.trials_per_hour,
        "best": _row_json(lb.best) if lb.best else None,
        "comparison": lb.margins(),
        "rows": [_row_json(r) for r in lb.rows],
        "baselines": [_row_json(r) for r in lb.baselines],
        "pruned": [_row_json(r) for r in lb.pruned],
        "failed": [_row_json(r) for r in lb.failed],
        "pareto": list(lb.pareto),
        "finished": lb.finished,
    })


# ---------------------------------------------------------------------------------------------
# Rendering


def _f(x: float | None, signed: bool = False) -> str:
    if x is None:
        return "—"
    return f"{x:+.3f}" if signed else f"{x:.3f}"


def _secs(s: float | None) -> str:
    if s is None:
        return "—"
    s = max(0.0, s)
    if s < 60:
        return f"{s:.0f}s" if s >= 10 else f"{s:.1f}s"
    if s < 3600:
        return f"{int(s // 60)}m{int(s % 60):02d}s"
    return f"{int(s // 3600)}h{int(s % 3600 // 60):02d}m"


def _gap_text(gap: float | None) -> Text:
    if gap is None:
        return Text("—", style="dim")
    return Text(_f(gap, signed=True), style="yellow" if gap > 0.05 else "")


def _task_cell(r: Row, task: str, with_held_out: bool) -> Text:
    text = Text(_f(r.scores.get(task)))
    if task in r.scored and r.state != "complete":
        text.append(f" ({r.scored[task]})", style="dim")
    if with_held_out and task in r.held_out_scores:
        text.append(f"\nh {_f(r.held_out_scores[task])}", style="cyan")
    return text


def _table(rows: Sequence[Row], lb: Leaderboard, title: str, *, baseline_table: bool) -> Table:
    held = any(r.held_out_value is not None for r in rows)
    table = Table(title=title, title_justify="left", title_style="bold", header_style="bold", show_lines=held)
    if not baseline_table:
        table.add_column("rank", justify="right")
    table.add_column("trial", justify="right")
    table.add_column("baseline" if baseline_table else "kind / label")
    table.add_column("proxy", justify="right", style="bold")
    table.add_column("held-out", justify="right", style="cyan")
    table.add_column("gap", justify="right")
    for task in lb.tasks:
        table.add_column(task + (f" ×{lb.weights[task]:g}" if len(set(lb.weights.values())) > 1 else ""),
                         justify="right")
    table.add_column("time", justify="right", style="dim")
    for r in rows:
        first = [] if baseline_table else [str(r.rank) if r.rank is not None else ""]
        name = Text(r.name)
        if r.number in lb.pareto and not baseline_table:
            name.append(" ◆", style="magenta")
        if r.state != "complete":
            name.append(f" ({r.state})", style="dim")
        best = lb.best is not None and (r.study, r.number) == (lb.best.study, lb.best.number)
        table.add_row(
            *first, f"{'b' if r.study != lb.study_name else ''}{r.number}", name, _f(r.value),
            _f(r.held_out_value), _gap_text(r.gap),
            *(_task_cell(r, t, held) for t in lb.tasks), _secs(r.duration_s),
            style="green" if best else None,
        )
    return table


def summary_lines(lb: Leaderboard) -> list[str]:
    """One or two plain sentences: what the best trial beat, on proxy and on held-out."""
    best = lb.best
    if best is None:
        return ["No trial has completed yet."]
    m = lb.margins()
    src, uni = lb.best_source, lb.uniform
    parts = [f"Best: trial {best.number} ({best.name}), proxy {_f(best.value)}"]
    cmp = []
    if src is not None:
        cmp.append(f"best source ({src.name}, {_f(src.value)}) by {_f(m['proxy']['vs_best_source'], True)}")
    if uni is not None:
        cmp.append(f"uniform merge ({_f(uni.value)}) by {_f(m['proxy']['vs_uniform'], True)}")
    if cmp:
        beat = all((v or 0) > 0 for v in m["proxy"].values() if v is not None)
        parts.append(("beats " if beat else "compared with ") + " and ".join(cmp) + " on proxy")
    lines = [", ".join(parts[:1]) + (" — " + parts[1] + "." if len(parts) > 1 else ".")]
    if best.held_out_value is not None:
        held = [f"Held-out: {_f(best.held_out_value)} (gap {_f(best.gap, True)})"]
        hcmp = []
        if m["held_out"]["vs_best_source"] is not None:
            hcmp.append(f"best source by {_f(m['held_out']['vs_best_source'], True)}")
        if m["held_out"]["vs_uniform"] is not None:
            hcmp.append(f"uniform merge by {_f(m['held_out']['vs_uniform'], True)}")
        if hcmp:
            held.append(" vs " + " and ".join(hcmp))
        elif lb.baselines:
            held.append("; the baselines were not re-scored on held-out")
        lines.append("".join(held) + ".")
    elif lb.n_complete:
        lines.append("Held-out: not scored yet (the study re-scores its top trials when it ends).")
    return lines


def render_leaderboard(lb: Leaderboard, console: Console, *, show_pruned: bool = True,
                       max_pruned: int = 5) -> None:
    """Print the leaderboard: header, ranked trials, baselines, a few pruned trials, the summary."""
    c = lb.counts
    total = sum(c.values())
    head = Text(f"Study {lb.study_name}", style="bold")
    head.append(f" — {total} trials: " + ", ".join(f"{c[s]} {s}" for s in STATES if c.get(s) or s == "complete"))
    if lb.trials_per_hour is not None:
        head.append(f" · {lb.trials_per_hour:.1f} trials/hour")
    console.print(head)
    weights = ", ".join(f"{t} {w:g}" for t, w in lb.weights.items())
    obj = ("weighted mean of the task scores" if lb.objective != "per_task"
           else "one objective per task (ranked by their weighted mean; ◆ = Pareto front)")
    console.print(Text(f"Objective: {obj}; weights: {weights}", style="dim"))
    shown = f"top {len(lb.rows)} of {lb.n_complete}" if len(lb.rows) < lb.n_complete else f"{lb.n_complete}"
    if lb.rows:
        console.print(_table(lb.rows, lb, f"Trials ({shown} complete, by proxy value)", baseline_table=False))
    else:
        console.print("No complete trial yet.")
    if lb.baselines:
        title = "Baselines (each source alone, and the uniform merge)"
        if any(r.study != lb.study_name for r in lb.baselines):
            title += f"; trial bN is trial N of study {lb.baselines_study}"
        console.print(_table(lb.baselines, lb, title, baseline_table=True))
    if show_pruned and lb.pruned:
        t = Table(title=f"Pruned ({len(lb.pruned)}; partial scores, best first)", title_justify="left",
                  title_style="bold", header_style="bold")
        t.add_column("trial", justify="right")
        t.add_column("pruned at", justify="right")
        t.add_column("partial", justify="right")
        for task in lb.tasks:
            t.add_column(task, justify="right")
        for r in lb.pruned[:max_pruned]:
            t.add_row(str(r.number), f"{r.pruned_at} ex" if r.pruned_at is not None else "—", _f(r.value),
                      *(_task_cell(r, task, False) for task in lb.tasks))
        console.print(t)
    if lb.failed:
        console.print(Text(f"{len(lb.failed)} failed trial(s); the last error: "
                           f"{(lb.failed[-1].error or 'unknown').splitlines()[0][:200]}", style="red"))
    for line in summary_lines(lb):
        console.print(Text(line, style="bold"))
    if lb.finished and lb.finished.get("configs"):
        console.print(Text(f"Best configs: {', '.join(lb.finished['configs'][:3])}"
                           + (f"; merged model: {lb.finished['best_dir']}" if lb.finished.get("best_dir") else ""),
                           style="dim"))


# ---------------------------------------------------------------------------------------------
# `mergesearch status`


def _safe_url(url: str) -> str:
    from sqlalchemy.exc import SQLAlchemyError

    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except (ImportError, ValueError, SQLAlchemyError):
        return url


def _open(url: str) -> Any:
    from pathlib import Path

    from sqlalchemy.exc import SQLAlchemyError

    if url.startswith("sqlite:///") and url != "sqlite:///:memory:":
        path = Path(url[len("sqlite:///"):])
        if not path.is_file():
            raise StorageOpenError(f"No study storage at {str(path)!r} (from {url!r}): the file does not exist. "
                                   "Run the study first, or pass the storage URL it was run with.")
    try:
        from mergesearch.driver.storage import open_storage
    except ImportError:
        open_storage = None
    try:
        if open_storage is not None:
            return open_storage(url, read_only=True)
        return optuna.storages.RDBStorage(url)
    except MergeSearchError:
        raise
    except (SQLAlchemyError, optuna.exceptions.OptunaError, ImportError, ValueError, RuntimeError, OSError) as err:
        raise StorageOpenError(f"Cannot open storage {_safe_url(url)!r}: {str(err).splitlines()[0]}") from None


def _studies_table(storage: Any, url: str) -> tuple[Table, list[dict[str, Any]]]:
    table = Table(title=f"Studies in {_safe_url(url)}", title_justify="left", header_style="bold")
    for col in ("study", "trials", "complete", "best proxy", "started"):
        table.add_column(col, justify="left" if col in ("study", "started") else "right")
    data = []
    for s in storage.get_all_studies():
        study = optuna.load_study(study_name=s.study_name, storage=storage)
        lb = leaderboard(study, top=1)
        started = min((t.datetime_start for t in study.get_trials(deepcopy=False) if t.datetime_start), default=None)
        item = {"study": s.study_name, "trials": sum(lb.counts.values()), "complete": lb.n_complete,
                "best": lb.best.value if lb.best else None, "started": started.isoformat() if started else None}
        data.append(item)
        table.add_row(s.study_name, str(item["trials"]), str(item["complete"]), _f(item["best"]),
                      (item["started"] or "—")[:19])
    return table, data


def status_command(storage_url: str, study_name: str | None, top: int, as_json: bool,
                   console: Console) -> Leaderboard | None:
    """Print the leaderboard of ``study_name`` in ``storage_url`` (JSON with ``as_json``). Without a
    name: the only study (its baselines companion aside), or a list of the studies (returns None)."""
    if top is not None and top <= 0:
        raise ConfigError(f"--top must be positive, got {top}.")
    storage = _open(storage_url)
    names = [s.study_name for s in storage.get_all_studies()]
    if not names:
        raise StorageOpenError(f"Storage {_safe_url(storage_url)!r} holds no study yet. Run one with "
                               "`mergesearch run STUDY.yaml`.")
    if study_name is None:
        main = [n for n in names if not (n.endswith(BASELINES_SUFFIX) and n[: -len(BASELINES_SUFFIX)] in names)]
        if len(main) == 1:
            study_name = main[0]
        else:
            table, data = _studies_table(storage, storage_url)
            if as_json:
                console.out(json.dumps({"studies": _clean(data)}, indent=2), highlight=False)
            else:
                console.print(table)
                console.print("Several studies: pick one with --study NAME.")
            return None
    if study_name not in names:
        raise unknown("study", study_name, names, where=f"storage {_safe_url(storage_url)!r}")
    study = optuna.load_study(study_name=study_name, storage=storage)
    lb = leaderboard(study, top=top)
    if as_json:
        console.out(json.dumps(leaderboard_json(lb), indent=2), highlight=False)
    else:
        render_leaderboard(lb, console)
    return lb


# ---------------------------------------------------------------------------------------------
# Live progress of `mergesearch run`


def _label_suffix(best: Mapping[str, Any]) -> str:
    label = best.get("label") or ""
    return f" ({label})" if label and label != f"trial {best.get('number')}" else ""


class Progress:
    """The live display of a running study. Use as a context manager; the driver calls
    ``update(counts, best, elapsed_s)`` (counts keyed complete/pruned/failed/running/waiting; best:
    {"number", "value", "scores", "label"} or None) and ``log(message)``. On a terminal it is a rich
    Live area with log lines above it; otherwise (CI logs, pipes) it prints a compact status line
    on each finished trial and at most every ``min_interval_s`` seconds."""

    def __init__(self, console: Console, total_trials: int, wall_time_s: float | None, tasks: Sequence[str],
                 *, live: bool | None = None, min_interval_s: float = 10.0):
        self.console = console
        self.total = int(total_trials)
        self.wall_time_s = wall_time_s
        self.tasks = list(tasks)
        self.live_mode = console.is_terminal and not console.is_dumb_terminal if live is None else live
        self.min_interval_s = min_interval_s
        self.counts: dict[str, int] = {}
        self.best: dict[str, Any] | None = None
        self.elapsed_s = 0.0
        self._live: Live | None = None
        self._last_line = -math.inf
        self._last_done = 0
        self._updated = False

    def __enter__(self) -> Self:
        if self.live_mode:
            self._live = Live(self._render(), console=self.console, refresh_per_second=4, transient=False)
            self._live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._live is not None:
            self._live.update(self._render(), refresh=True)
            self._live.__exit__(*exc)
            self._live = None
        elif self._updated:
            self.console.print(self.status_line(), markup=False, highlight=False, soft_wrap=True)

    # -- numbers --------------------------------------------------------------------------------

    @property
    def done(self) -> int:
        c = self.counts
        if "finished" in c:
            return int(c["finished"])
        return int(c.get("complete", 0) + c.get("pruned", 0) + c.get("failed", 0))

    @property
    def rate_per_hour(self) -> float | None:
        if self.done <= 0 or self.elapsed_s <= 0:
            return None
        return self.done * 3600.0 / self.elapsed_s

    def eta(self) -> tuple[float | None, str]:
        """Seconds left and why: "trials" (remaining trials at the current rate) or "wall time"."""
        remaining = max(0, self.total - self.done)
        rate = self.rate_per_hour
        by_trials = remaining * 3600.0 / rate if rate else None
        by_wall = max(0.0, self.wall_time_s - self.elapsed_s) if self.wall_time_s else None
        if remaining == 0:
            return 0.0, "trials"
        if by_wall is not None and (by_trials is None or by_wall < by_trials):
            return by_wall, "wall time"
        return by_trials, "trials"

    # -- driver API -----------------------------------------------------------------------------

    def update(self, counts: Mapping[str, int], best: Mapping[str, Any] | None, elapsed_s: float) -> None:
        self.counts = dict(counts)
        self.best = dict(best) if best else None
        self.elapsed_s = float(elapsed_s)
        self._updated = True
        if self._live is not None:
            self._live.update(self._render())
            return
        now = time.monotonic()
        if self.done > self._last_done or now - self._last_line >= self.min_interval_s:
            self._last_done = self.done
            self._last_line = now
            self.console.print(self.status_line(), markup=False, highlight=False, soft_wrap=True)

    def log(self, message: str) -> None:
        target = self._live.console if self._live is not None else self.console
        target.print(message, markup=False, highlight=False, soft_wrap=True)

    # -- rendering ------------------------------------------------------------------------------

    def _counts_text(self) -> str:
        c = self.counts
        parts = [f"{self.done}/{self.total} trials done", f"{c.get('complete', 0)} complete",
                 f"{c.get('pruned', 0)} pruned", f"{c.get('failed', 0)} failed", f"{c.get('running', 0)} running"]
        if c.get("retried"):
            parts.append(f"{c['retried']} retried")
        return parts[0] + " (" + ", ".join(parts[1:]) + ")"

    def _rate_text(self, elapsed: bool = True) -> str:
        rate = self.rate_per_hour
        eta, why = self.eta()
        text = f"{rate:.1f} trials/h" if rate is not None else "— trials/h"
        if elapsed:
            text += f" · elapsed {_secs(self.elapsed_s)}"
        if eta is not None:
            text += f" · ETA {_secs(eta)}" + (" (wall-time budget)" if why == "wall time" else "")
        return text

    def _best_text(self) -> str:
        b = self.best
        if not b:
            return "best: —"
        label = _label_suffix(b)
        scores = b.get("scores") or {}
        tasks = self.tasks or list(scores)
        per_task = " ".join(f"{t} {_f(scores.get(t))}" for t in tasks)
        value = b.get("value")
        return f"best: trial {b.get('number')}{label} {_f(value)}" + (f" [{per_task}]" if per_task else "")

    def status_line(self) -> str:
        """The compact one-line status used outside a terminal."""
        return f"[{_secs(self.elapsed_s)}] {self._counts_text()} · {self._rate_text(elapsed=False)} · {self._best_text()}"

    def _render(self) -> Group:
        bar = ProgressBar(total=max(1, self.total), completed=min(self.done, self.total), width=40)
        line = Table.grid(padding=(0, 1))
        line.add_row(bar, Text(self._counts_text()))
        best = Table.grid(padding=(0, 2))
        b = self.best
        if b:
            best.add_row(Text("best", style="bold green"),
                         Text(f"trial {b.get('number')}{_label_suffix(b)}"),
                         Text(_f(b.get("value")), style="bold"),
                         *(Text(f"{t} {_f((b.get('scores') or {}).get(t))}") for t in self.tasks))
        else:
            best.add_row(Text("best", style="bold"), Text("— (no complete trial yet)", style="dim"))
        return Group(line, Text(self._rate_text(), style="dim"), best)
