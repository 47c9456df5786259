"""Plotly figures of a study, from what the driver stores (docs/studies.md, "Stored per trial").

Pure functions: :func:`plan_curves` turns a trial's merge plan into per-layer parameter curves,
:func:`collect` reads a study once into :class:`StudyViews`, and the ``*_figure`` functions build
one ``plotly.graph_objects.Figure`` each. Nothing here writes to the storage.

The curves come from the resolution ``mergesearch explain`` prints (:func:`mergesearch.merge.explain.explain`):
for every parameter, its effective value per output layer and per tensor group (the ``filter:``
entry that decided it), read from the sources' safetensors headers. When the sources are not on
this machine (a storage opened from elsewhere), the plan is probed without them: the same
parameter resolution at the layer fractions where the plan's gradients have control points,
which draws the same piecewise-linear curves against the layer fraction instead of the layer.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna
from optuna.trial import TrialState

from mergesearch.driver.report import Leaderboard, Row, leaderboard
from mergesearch.errors import MergeSearchError

if TYPE_CHECKING:
    import plotly.graph_objects as go

# Ids of the graph objects saved into a study (valid HTML ids, see optuna_dashboard).
FIGURE_IDS = ("mergesearch-curves", "mergesearch-task-scores", "mergesearch-held-out",
              "mergesearch-pareto", "mergesearch-timeline")
TITLES = {
    "mergesearch-curves": "Per-layer parameters of the best trials",
    "mergesearch-task-scores": "Per-task proxy scores by trial",
    "mergesearch-held-out": "Proxy vs held-out (gap = proxy - held-out)",
    "mergesearch-pareto": "Pareto front of the per-task scores",
    "mergesearch-timeline": "Trials per worker over time (busy / idle)",
}
_STATE_COLORS = {"complete": "#2ca02c", "pruned": "#ff7f0e", "failed": "#d62728", "running": "#1f77b4",
                 "waiting": "#9467bd"}
_IDLE_COLOR = "rgba(160,160,160,0.35)"
_DASHES = ("solid", "dash", "dot", "dashdot", "longdash", "longdashdot")
_PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
            "#bcbd22", "#17becf")
_LAYER_ROW = re.compile(r"layer (\d+)")
_GROUP = re.compile(r"(global|slice|model): (.*)")
_OTHER_PROBE = "__mergesearch_other__"


# ---------------------------------------------------------------------------------------------
# Per-layer curves of one merge plan


@dataclass(frozen=True)
class Curve:
    """One parameter's value along the layers, for one model (None: shared) and tensor group."""

    param: str
    model: str | None
    group: str
    x: tuple[float, ...]
    y: tuple[float, ...]

    @property
    def name(self) -> str:
        if self.model and self.group == "all tensors":
            return self.model
        return f"{self.model} · {self.group}" if self.model else self.group


@dataclass(frozen=True)
class TrialCurves:
    """The per-layer parameters of one trial. ``x_title`` is "layer" (resolved on the sources'
    tensors) or "layer fraction" (probed without them); ``edges`` are the values of tensors
    outside the layers (embeddings, final norm, lm_head) as (tensor, parameter, model, value)."""

    number: int
    label: str
    method: str
    curves: tuple[Curve, ...]
    edges: tuple[tuple[str, str, str | None, Any], ...] = ()
    x_title: str = "layer"
    note: str = ""

    @property
    def params(self) -> list[str]:
        return list(dict.fromkeys(c.param for c in self.curves))


def short_names(models: Iterable[str]) -> dict[str, str]:
    """Model path -> its folder name, or more of the path where two folders share a name."""
    models = list(dict.fromkeys(models))
    names: dict[str, str] = {}
    for depth in range(1, 6):
        names = {m: "/".join(Path(m).parts[-depth:]) for m in models}
        if len(set(names.values())) == len(models):
            break
    return names


def _group_label(group: str) -> str:
    """explain's group label ("global: filter 'mlp'", "model: all", "method default") shortened."""
    m = _GROUP.fullmatch(group)
    scope, body = (m.group(1), m.group(2)) if m else ("", group)
    if body == "all":
        body = "all tensors"
    elif body == "default":
        body = "other tensors"
    elif body.startswith("filter "):
        body = body[len("filter "):].strip("'\"")
    return f"{scope} {body}" if scope == "slice" else body


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _is_default(spec: Any, values: Iterable[float]) -> bool:
    default = None if spec.required else _number(spec.default)
    return default is not None and all(math.isclose(v, default, abs_tol=1e-9) for v in values)


def plan_curves(plan_text: str, number: int = -1, label: str = "") -> TrialCurves:
    """The per-layer curves of a merge plan (mergekit YAML text, a trial's ``plan`` user attr).

    Parameters that keep their method default everywhere (e.g. ``lambda: 1.0``) and boolean ones
    are left out. Raises MergeSearchError for a plan that cannot be parsed or resolved.
    """
    from mergesearch.merge.registry import get_method
    from mergesearch.plan import loads_plan

    plan = loads_plan(plan_text, f"plan of trial {number}")
    spec = get_method(plan.merge_method)
    names = short_names(plan.referenced_models())
    try:
        raw, edges, x_title, note = _explained(plan, names)
    except MergeSearchError as err:
        raw, edges = _probed(plan, spec, names)
        x_title = "layer fraction"
        note = (f"The sources are not readable here ({str(err).splitlines()[0][:160]}), so the plan is "
                "resolved at layer fractions (0 = first layer, 1 = last).")
    keep = []
    for param in dict.fromkeys(c.param for c in raw):
        p = spec.param(param)
        values = [v for c in raw if c.param == param for v in c.y]
        values += [v for _t, e_param, _m, v in edges if e_param == param]
        if p.kind != "bool" and not _is_default(p, values):
            keep.append(param)
    return TrialCurves(
        number=number, label=label or f"trial {number}", method=plan.merge_method,
        curves=tuple(c for c in raw if c.param in keep),
        edges=tuple(e for e in edges if e[1] in keep), x_title=x_title, note=note)


def _explained(plan: Any, names: Mapping[str, str]) -> tuple[list[Curve], list[Any], str, str]:
    """Curves from :func:`mergesearch.merge.explain.explain` (needs the sources' headers)."""
    from mergesearch.merge.explain import explain

    exp = explain(plan)
    curves: list[Curve] = []
    edges: list[tuple[str, str, str | None, Any]] = []
    for table in exp.tables:
        model = names.get(table.model, table.model) if table.model else None
        points: dict[str, list[tuple[int, float]]] = {}
        for row, values in table.rows:
            layer = _LAYER_ROW.fullmatch(row)
            for group, value in values.items():
                v = _number(value)
                if v is None:
                    continue
                if layer:
                    points.setdefault(group, []).append((int(layer.group(1)), v))
                else:
                    edges.append((row, table.param, model, v))
        for group, pts in points.items():
            pts.sort()
            curves.append(Curve(table.param, model, _group_label(group),
                                tuple(float(x) for x, _ in pts), tuple(y for _, y in pts)))
    return curves, edges, "layer", ""


def _breakpoints(plan: Any) -> list[float]:
    """Layer fractions where some gradient of the plan has a control point (at least 0 and 1)."""
    lengths = {2}

    def walk(node: Any) -> None:
        if isinstance(node, (tuple, list)):
            if node and all(_number(e) is not None for e in node):
                lengths.add(len(node))
            for e in node:
                walk(e)
        elif hasattr(node, "value"):
            walk(node.value)

    scopes = [plan.parameters, *(m.parameters for m in plan.models or ())]
    for scope in scopes:
        for setting in (scope or {}).values():
            walk(setting)
    return sorted({k / (n - 1) for n in lengths for k in range(n)})


def _probed(plan: Any, spec: Any, names: Mapping[str, str]) -> tuple[list[Curve], list[Any]]:
    """Curves without the sources: the plan's parameters resolved on probe tensor names (a
    filter that only names tensors outside the layers, like ``embed_tokens``, goes to the edges)."""
    from mergesearch.spaces.base import _EDGE_PROBES, _LAYER_PROBES, lookup

    if not plan.models:
        return [], []
    from mergesearch.spaces.base import plan_filters

    filters = plan_filters(plan)
    edge_only = [f for f in filters if any(f in e for e in _EDGE_PROBES) and not any(f in p for p in _LAYER_PROBES)]
    layer_filters = [f for f in filters if f not in edge_only]
    probes = [(f, f"model.layers.0.{f}.weight") for f in layer_filters]
    probes.append(("other tensors" if layer_filters else "all tensors", f"model.layers.0.{_OTHER_PROBE}.weight"))
    xs = _breakpoints(plan)
    targets: list[tuple[Any, str | None]] = [(p, None) for p in spec.shared_params()]
    for p in spec.input_params():
        for m in plan.models:
            if p.scope == "non_base" and m.model == plan.base_model:
                continue
            targets.append((p, m.model))
    curves: list[Curve] = []
    edges: list[tuple[str, str, str | None, Any]] = []
    for p, model in targets:
        short = names.get(model, model) if model else None
        try:
            for group, tensor in probes:
                ys = [_number(lookup(plan, p.name, model, tensor, x)) for x in xs]
                if all(y is not None for y in ys):
                    curves.append(Curve(p.name, short, group, tuple(xs), tuple(y for y in ys if y is not None)))
            for tensor in _EDGE_PROBES:
                v = _number(lookup(plan, p.name, model, tensor, 0.0))
                if v is not None:
                    edges.append((tensor, p.name, short, v))
        except MergeSearchError:
            continue
    return curves, edges


# ---------------------------------------------------------------------------------------------
# A study read once


@dataclass(frozen=True)
class Span:
    """One trial on the timeline: which worker ran it, from when to when, how it ended."""

    worker: str
    number: int
    study: str
    state: str
    start: datetime
    end: datetime
    label: str = ""


@dataclass(frozen=True)
class StudyViews:
    """What the figures need from a study: its leaderboard (all complete trials ranked), the
    curves of its best ``top`` trials, the timeline spans of it and its baselines, and the plans."""

    study_name: str
    lb: Leaderboard
    best_curves: tuple[TrialCurves, ...]
    spans: tuple[Span, ...]
    plans: dict[int, str] = field(default_factory=dict)
    labels: dict[int, str] = field(default_factory=dict)


def _label(t: Any) -> str:
    return str(t.user_attrs.get("label") or f"trial {t.number}")


def spans_of(studies: Sequence[optuna.Study], now: datetime | None = None) -> list[Span]:
    """Timeline spans of every started trial of ``studies`` (running ones end ``now``)."""
    from mergesearch.driver.report import BASELINES_SUFFIX

    now = now or datetime.now()
    spans = []
    for study in studies:
        short = "baseline " if study.study_name.endswith(BASELINES_SUFFIX) else ""
        for t in study.get_trials(deepcopy=False):
            if t.datetime_start is None:
                continue
            state = {TrialState.COMPLETE: "complete", TrialState.PRUNED: "pruned", TrialState.FAIL: "failed",
                     TrialState.RUNNING: "running"}.get(t.state, t.state.name.lower())
            end = t.datetime_complete or now
            # the driver records the worker when a trial ends
            worker = t.user_attrs.get("worker") or ("(running)" if state == "running" else "(unknown)")
            spans.append(Span(str(worker), t.number, study.study_name, state,
                              t.datetime_start, max(end, t.datetime_start), f"{short}{_label(t)}"))
    spans.sort(key=lambda s: s.start)
    return spans


def collect(study: optuna.Study, top: int = 3) -> StudyViews:
    """Read ``study`` (and its baselines companion) once: leaderboard, best curves, timeline."""
    lb = leaderboard(study, top=None)
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    plans = {n: t.user_attrs["plan"] for n, t in trials.items() if t.user_attrs.get("plan")}
    labels = {n: _label(t) for n, t in trials.items()}
    best = []
    for row in lb.rows[:max(0, top)]:
        if row.number in plans:
            try:
                best.append(plan_curves(plans[row.number], row.number, labels[row.number]))
            except MergeSearchError:
                continue
    studies = [study]
    if lb.baselines_study:
        studies.append(optuna.load_study(study_name=lb.baselines_study, storage=study._storage))
    return StudyViews(study.study_name, lb, tuple(best), tuple(spans_of(studies)), plans, labels)


# ---------------------------------------------------------------------------------------------
# Figures


def _go() -> Any:
    import plotly.graph_objects as go

    return go


def _empty(title: str, message: str, height: int | None) -> go.Figure:
    go = _go()
    fig = go.Figure()
    fig.update_layout(title={"text": title}, height=height, xaxis={"visible": False}, yaxis={"visible": False},
                      annotations=[{"text": message, "showarrow": False, "xref": "paper", "yref": "paper",
                                    "x": 0.5, "y": 0.5, "font": {"size": 13}}])
    return fig


def _base_layout(fig: go.Figure, title: str, height: int | None) -> go.Figure:
    fig.update_layout(title={"text": title, "x": 0.01, "xanchor": "left"}, height=height,
                      margin={"l": 60, "r": 20, "t": 60, "b": 40}, template="plotly_white",
                      legend={"orientation": "h", "yanchor": "top", "y": -0.2, "x": 0})
    return fig


def curves_figure(items: Sequence[TrialCurves], title: str | None = None, height: int | None = None) -> go.Figure:
    """Per-layer parameter curves. One trial: a subplot per parameter with a line per (model,
    tensor group). Several trials (the best few): a subplot per (parameter, model, tensor group)
    with the trials overlaid, a colour per trial."""
    from plotly.subplots import make_subplots

    go = _go()
    title = title or (TITLES["mergesearch-curves"] if len(items) != 1 else
                      f"Per-layer parameters of {items[0].label} ({items[0].method})")
    params = list(dict.fromkeys(p for item in items for p in item.params))
    if not params:
        why = ("no complete trial yet" if not items else
               "every parameter is the same on every layer and tensor group, or the method default")
        return _empty(title, why, height)
    x_title = items[0].x_title
    many = len(items) > 1
    if many:
        panels = list(dict.fromkeys((c.param, c.name) for item in items for c in item.curves))
        panel_titles = [f"{p} · {n}" for p, n in panels]
    else:
        panels = [(p, None) for p in params]
        panel_titles = params
    cols = min(len(panels), 3 if many else 1)
    rows = math.ceil(len(panels) / cols)
    fig = make_subplots(rows=rows, cols=cols, shared_xaxes=True, subplot_titles=panel_titles,
                        vertical_spacing=min(0.15, 0.45 / rows), horizontal_spacing=0.06)
    series = list(dict.fromkeys(c.name for item in items for c in item.curves))
    for ti, item in enumerate(items):
        shown = False
        for c in item.curves:
            i = panels.index((c.param, c.name) if many else (c.param, None))
            color = _PALETTE[(ti if many else series.index(c.name)) % len(_PALETTE)]
            fig.add_trace(go.Scatter(
                x=list(c.x), y=list(c.y), mode="lines+markers", name=item.label if many else c.name,
                legendgroup=item.label if many else c.name, showlegend=not (many and shown),
                line={"color": color}, marker={"size": 5},
                hovertemplate=f"{item.label}<br>{c.param} · {c.name}<br>{x_title} %{{x}}: %{{y:.4g}}<extra></extra>",
            ), row=i // cols + 1, col=i % cols + 1)
            shown = True
    for param in params:
        values = [v for item in items for c in item.curves if c.param == param for v in c.y]
        lo, hi = min(values), max(values)
        pad = max(0.05, 0.1 * (hi - lo))
        for i, (p, _n) in enumerate(panels):
            if p == param:
                fig.update_yaxes(range=[lo - pad, hi + pad], row=i // cols + 1, col=i % cols + 1)
    for col in range(1, cols + 1):
        fig.update_xaxes(title_text=x_title, row=rows, col=col)
    if x_title == "layer" and max(len(c.x) for i in items for c in i.curves) <= 12:
        fig.update_xaxes(dtick=1)
    fig.update_annotations(font={"size": 12})
    return _base_layout(fig, title, height)


def _task_rows(lb: Leaderboard) -> list[Row]:
    return sorted([*lb.rows, *lb.pruned], key=lambda r: r.number)


def task_scores_figure(lb: Leaderboard, height: int | None = None) -> go.Figure:
    """Per-task proxy scores of every complete (●) and pruned (✕, partial scores) trial, by trial
    number, with the best source's score on each task as a dotted line."""
    go = _go()
    title = TITLES["mergesearch-task-scores"]
    rows = _task_rows(lb)
    if not rows or not lb.tasks:
        return _empty(title, "no scored trial yet", height)
    fig = go.Figure()
    sources = [r for r in lb.baselines if r.is_source and r.state == "complete"]
    for i, task in enumerate(lb.tasks):
        pts = [r for r in rows if task in r.scores]
        color = _PALETTE[i % len(_PALETTE)]
        fig.add_trace(go.Scatter(
            x=[r.number for r in pts], y=[r.scores[task] for r in pts], mode="lines+markers", name=task,
            legendgroup=task, line={"color": color, "width": 1},
            marker={"color": color, "size": 7,
                    "symbol": ["x" if r.state == "pruned" else "circle" for r in pts]},
            text=[f"{r.name} ({r.state})" for r in pts],
            hovertemplate=f"trial %{{x}}: %{{text}}<br>{task} %{{y:.3f}}<extra></extra>"))
        best_src = max((r for r in sources if task in r.scores), key=lambda r: r.scores[task], default=None)
        if best_src is not None:
            fig.add_trace(go.Scatter(
                x=[rows[0].number, rows[-1].number], y=[best_src.scores[task]] * 2, mode="lines",
                name=f"{task}: best source ({best_src.name})", legendgroup=task, showlegend=False,
                line={"color": color, "dash": "dot", "width": 1},
                hovertemplate=f"{task}: best source alone ({best_src.name}) %{{y:.3f}}<extra></extra>"))
    fig.update_xaxes(title_text="trial")
    fig.update_yaxes(title_text="proxy score")
    return _base_layout(fig, title, height)


def held_out_figure(lb: Leaderboard, height: int | None = None) -> go.Figure:
    """Proxy (x) vs held-out (y) of every trial re-scored on held-out (the top-k and the
    baselines), the diagonal, and each gap drawn as a vertical segment down from the diagonal."""
    go = _go()
    title = TITLES["mergesearch-held-out"]
    groups = [
        ("search trials", [r for r in lb.rows if r.held_out_value is not None and r.value is not None],
         "circle", "#1f77b4"),
        ("sources alone", [r for r in lb.baselines if r.is_source and r.held_out_value is not None
                           and r.value is not None], "diamond", "#7f7f7f"),
        ("uniform merge", [r for r in lb.baselines if r.is_uniform and r.held_out_value is not None
                           and r.value is not None], "square", "#9467bd"),
    ]
    points = [r for _n, rs, _s, _c in groups for r in rs]
    if not points:
        return _empty(title, "nothing re-scored on held-out yet: a study re-scores its top-k and the "
                             "baselines when it ends", height)
    fig = go.Figure()
    values = [v for r in points for v in (r.value, r.held_out_value) if v is not None]
    lo, hi = min(values), max(values)
    pad = max(0.02, (hi - lo) * 0.08)
    fig.add_trace(go.Scatter(x=[lo - pad, hi + pad], y=[lo - pad, hi + pad], mode="lines", name="held-out = proxy",
                             line={"color": "#bbbbbb", "dash": "dash"}, hoverinfo="skip"))
    gx: list[float | None] = []
    gy: list[float | None] = []
    for r in points:
        gx += [r.value, r.value, None]
        gy += [r.value, r.held_out_value, None]
    fig.add_trace(go.Scatter(x=gx, y=gy, mode="lines", name="gap", line={"color": "#d62728", "width": 1},
                             hoverinfo="skip"))
    for name, rows, symbol, color in groups:
        if not rows:
            continue
        text = [f"#{r.number}" if r.kind != "baseline" else r.name.removeprefix("source: ") for r in rows]
        fig.add_trace(go.Scatter(
            x=[r.value for r in rows], y=[r.held_out_value for r in rows], mode="markers+text", name=name,
            text=text, textposition="top center", textfont={"size": 10},
            marker={"symbol": symbol, "size": 10, "color": color},
            customdata=[[r.gap if r.gap is not None else float("nan"), r.name] for r in rows],
            hovertemplate="%{customdata[1]}<br>proxy %{x:.3f}<br>held-out %{y:.3f}<br>gap %{customdata[0]:+.3f}"
                          "<extra></extra>"))
    fig.update_xaxes(title_text="proxy score (searched on)")
    fig.update_yaxes(title_text="held-out score", scaleanchor="x", scaleratio=1)
    return _base_layout(fig, title, height)


def pareto_figure(lb: Leaderboard, height: int | None = None) -> go.Figure | None:
    """For a per-task (multi-objective) study: the complete trials on their task scores with the
    Pareto front highlighted (a scatter for 2 tasks, a scatter matrix for more). None otherwise."""
    if lb.objective != "per_task" or len(lb.tasks) < 2:
        return None
    go = _go()
    title = TITLES["mergesearch-pareto"]
    rows = [r for r in lb.rows if all(t in r.scores for t in lb.tasks)]
    if not rows:
        return _empty(title, "no complete trial yet", height)
    front = [r for r in rows if r.number in lb.pareto]
    rest = [r for r in rows if r.number not in lb.pareto]
    sources = [r for r in lb.baselines if r.state == "complete" and all(t in r.scores for t in lb.tasks)]
    fig = go.Figure()
    parts = [("dominated", rest, "#bbbbbb", "circle"), ("Pareto front", front, "#d62728", "circle"),
             ("baselines", sources, "#7f7f7f", "diamond")]
    if len(lb.tasks) == 2:
        a, b = lb.tasks
        for name, rs, color, symbol in parts:
            if not rs:
                continue
            rs = sorted(rs, key=lambda r: r.scores[a])
            fig.add_trace(go.Scatter(
                x=[r.scores[a] for r in rs], y=[r.scores[b] for r in rs],
                mode="lines+markers+text" if name == "Pareto front" else "markers+text", name=name,
                text=[f"#{r.number}" if r.kind != "baseline" else r.name.removeprefix("source: ") for r in rs],
                textposition="top center", textfont={"size": 10},
                line={"shape": "hv", "color": color} if name == "Pareto front" else None,
                marker={"color": color, "size": 9, "symbol": symbol},
                hovertemplate=f"%{{text}}<br>{a} %{{x:.3f}}<br>{b} %{{y:.3f}}<extra></extra>"))
        fig.update_xaxes(title_text=a)
        fig.update_yaxes(title_text=b)
    else:
        for name, rs, color, symbol in parts:
            if not rs:
                continue
            fig.add_trace(go.Splom(
                dimensions=[{"label": t, "values": [r.scores[t] for r in rs]} for t in lb.tasks], name=name,
                text=[f"{r.name} (#{r.number})" for r in rs], diagonal={"visible": False}, showupperhalf=False,
                marker={"color": color, "size": 7, "symbol": symbol}))
    return _base_layout(fig, title, height)


def timeline_figure(spans: Sequence[Span], height: int | None = None) -> go.Figure:
    """One row per worker: a bar per trial it ran (coloured by how the trial ended) and grey
    bars where it was idle between two trials; the row label says how busy it was."""
    go = _go()
    title = TITLES["mergesearch-timeline"]
    if not spans:
        return _empty(title, "no trial has started yet", height)
    by_worker: dict[str, list[Span]] = {}
    for s in spans:
        by_worker.setdefault(s.worker, []).append(s)
    labels = {}
    idle: list[tuple[str, datetime, datetime]] = []
    for worker, ss in by_worker.items():
        ss.sort(key=lambda s: s.start)
        first, last = ss[0].start, max(s.end for s in ss)
        busy = 0.0
        cursor = first
        for s in ss:
            if s.start > cursor:
                idle.append((worker, cursor, s.start))
                cursor = s.start
            if s.end > cursor:
                busy += (s.end - cursor).total_seconds()
                cursor = s.end
        span = (last - first).total_seconds()
        labels[worker] = f"{worker} · busy {100 * busy / span:.0f}%" if span > 0 else worker
    fig = go.Figure()

    def ms(a: datetime, b: datetime) -> float:
        return (b - a).total_seconds() * 1000.0

    for state in ("complete", "pruned", "failed", "running", "waiting"):
        ss = [s for s in spans if s.state == state]
        if not ss:
            continue
        fig.add_trace(go.Bar(
            orientation="h", y=[labels[s.worker] for s in ss], x=[ms(s.start, s.end) for s in ss],
            base=[s.start.isoformat() for s in ss], name=state, marker={"color": _STATE_COLORS[state]},
            text=[s.label for s in ss], textposition="none",
            customdata=[[s.number, (s.end - s.start).total_seconds()] for s in ss],
            hovertemplate="%{text} (trial %{customdata[0]})<br>%{base|%H:%M:%S} for %{customdata[1]:.1f}s"
                          "<extra></extra>"))
    if idle:
        fig.add_trace(go.Bar(
            orientation="h", y=[labels[w] for w, _a, _b in idle], x=[ms(a, b) for _w, a, b in idle],
            base=[a.isoformat() for _w, a, _b in idle], name="idle", marker={"color": _IDLE_COLOR},
            customdata=[(b - a).total_seconds() for _w, a, b in idle],
            hovertemplate="idle %{customdata:.1f}s<extra></extra>"))
    fig.update_layout(barmode="overlay", bargap=0.3)
    fig.update_xaxes(type="date", title_text="time")
    fig.update_yaxes(autorange="reversed")
    return _base_layout(fig, title, height)


def study_figures(views: StudyViews, height: int | None = None) -> dict[str, go.Figure]:
    """Every figure of a study, keyed by its graph-object id (the Pareto front only for per-task
    studies)."""
    figs = {
        "mergesearch-curves": curves_figure(views.best_curves, height=height),
        "mergesearch-task-scores": task_scores_figure(views.lb, height),
        "mergesearch-held-out": held_out_figure(views.lb, height),
        "mergesearch-timeline": timeline_figure(views.spans, height),
    }
    pareto = pareto_figure(views.lb, height)
    if pareto is not None:
        figs["mergesearch-pareto"] = pareto
    return {k: figs[k] for k in FIGURE_IDS if k in figs}
