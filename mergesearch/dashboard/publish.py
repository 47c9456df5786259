"""Save our figures and notes into a study, where optuna-dashboard's own UI shows them.

optuna-dashboard's extension points, public API only: ``save_plotly_graph_object`` (a plotly
figure stored in the study's system attrs, drawn on the study's main page) and ``save_note``
(Markdown notes on the study and on trials). Our notes start with :data:`NOTE_HEADER`; a note
someone wrote in the dashboard (one that does not) is never overwritten.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import optuna

from mergesearch.dashboard.figures import StudyViews, collect, study_figures
from mergesearch.driver.report import Leaderboard, Row, summary_lines

NOTE_HEADER = "###### mergesearch"
"""First line of every note mergesearch writes (and the mark that it may replace the note)."""


@dataclass
class Published:
    """What :func:`publish` wrote: graph-object ids, trial numbers given a note, notes kept."""

    figures: list[str] = field(default_factory=list)
    study_note: bool = False
    trial_notes: list[int] = field(default_factory=list)
    kept_notes: list[str] = field(default_factory=list)


def study_page(study_name: str) -> str:
    """The path of our overview page of a study."""
    return f"/mergesearch/studies/{quote(study_name, safe='')}"


def trial_page(study_name: str, number: int) -> str:
    """The path of our page of one trial (its per-layer curves, scores and plan)."""
    return f"{study_page(study_name)}/trials/{number}"


def _f(x: float | None, signed: bool = False) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "—"
    return f"{x:+.3f}" if signed else f"{x:.3f}"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def study_note(lb: Leaderboard, top: int) -> str:
    """The Markdown note of a study: the summary of `mergesearch status`, the best trials with
    links to their curves, and where the figures are."""
    name = lb.study_name
    lines = [NOTE_HEADER, "", f"**{name}**: refreshed by `mergesearch dashboard` when it starts.", ""]
    lines += [f"{line}  " for line in summary_lines(lb)]
    where = ("mergesearch's charts (per-layer parameters of the best trials, per-task scores, proxy vs held-out, "
             "timeline per worker) are on this page; they and every trial's per-layer curves are also on "
             f"[the mergesearch page of this study]({study_page(name)}).")
    lines += ["", where, ""]
    if lb.rows:
        head = ["rank", "trial", "proxy", "held-out", "gap", *lb.tasks]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in lb.rows[:top]:
            link = f"[{r.number}]({trial_page(name, r.number)})"
            lines.append("| " + " | ".join([str(r.rank), link, _f(r.value), _f(r.held_out_value), _f(r.gap, True),
                                            *(_f(r.scores.get(t)) for t in lb.tasks)]) + " |")
    return "\n".join(lines) + "\n"


def trial_note(lb: Leaderboard, r: Row) -> str:
    """The Markdown note of one trial: rank, per-task proxy and held-out scores, gap, timings."""
    name = lb.study_name
    lines = [NOTE_HEADER, ""]
    title = (f"**Trial {r.number}**" + (f" ({_cell(r.label)})" if r.label else "")
             + (f", rank {r.rank} of {lb.n_complete}" if r.rank else "") + f", {r.state}")
    lines += [title + "  ", f"proxy {_f(r.value)}" + (f", held-out {_f(r.held_out_value)} (gap {_f(r.gap, True)})"
                                                      if r.held_out_value is not None else "") + "  ",
              f"[Per-layer curves, scores and merge plan]({trial_page(name, r.number)})", ""]
    lines += ["| task | proxy | held-out |", "|---|---|---|"]
    for t in lb.tasks:
        lines.append(f"| {_cell(t)} | {_f(r.scores.get(t))} | {_f(r.held_out_scores.get(t))} |")
    if r.timings or r.worker:
        timing = ", ".join(f"{k.removesuffix('_s')} {v:.1f}s" for k, v in r.timings.items() if k.endswith("_s"))
        lines += ["", f"worker `{r.worker or '?'}`" + (f"; {timing}" if timing else "")]
    return "\n".join(lines) + "\n"


def _writable(current: str) -> bool:
    return not current.strip() or current.startswith(NOTE_HEADER)


def publish(study: optuna.Study, views: StudyViews | None = None, *, top: int = 3,
            log: Callable[[str], None] | None = None) -> Published:
    """Save the figures into ``study`` (replacing the previous ones) and write the study note and
    the notes of its ``top`` best trials and of every trial re-scored on held-out."""
    from optuna_dashboard import get_note, save_note, save_plotly_graph_object

    views = views or collect(study, top=top)
    out = Published()
    for gid, fig in study_figures(views).items():
        save_plotly_graph_object(study, fig, graph_object_id=gid)
        out.figures.append(gid)
    lb = views.lb
    note = study_note(lb, max(top, 5))
    current = get_note(study)
    if current == note:
        out.study_note = True
    elif _writable(current):
        save_note(study, note)
        out.study_note = True
    else:
        out.kept_notes.append("study")
    # A Trial handle for save_note/get_note; a RandomSampler so that no sampler hook runs on it.
    handle = optuna.load_study(study_name=study.study_name, storage=study._storage,
                               sampler=optuna.samplers.RandomSampler())
    ids = {t.number: t._trial_id for t in study.get_trials(deepcopy=False)}
    chosen = [r for r in lb.rows if (r.rank or 0) <= top or r.held_out_value is not None]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for r in chosen:
            if r.number not in ids:
                continue
            trial = optuna.Trial(handle, ids[r.number])
            body = trial_note(lb, r)
            current = get_note(trial)
            if current == body:
                out.trial_notes.append(r.number)
            elif _writable(current):
                save_note(trial, body)
                out.trial_notes.append(r.number)
            else:
                out.kept_notes.append(f"trial {r.number}")
    if log and out.kept_notes:
        log(f"kept the notes you wrote on {', '.join(out.kept_notes)} (mergesearch writes only empty notes "
            f"or its own, which start with {NOTE_HEADER!r})")
    return out


def signature(study: optuna.Study) -> Any:
    """Changes whenever something the figures show changes (trials finish, held-out scores)."""
    trials = study.get_trials(deepcopy=False)
    attrs = study.user_attrs
    return (len(trials), tuple(sorted((t.number, t.state.name) for t in trials if t.state.is_finished())),
            tuple(sorted(k for k in attrs if k.startswith(("held_out:", "finished")))))
