"""Our own pages, for what optuna-dashboard has no place for: a trial's per-layer curves (a trial
page there takes notes and artifacts, not figures), and every mergesearch figure of a study on
one live page (read from the storage on each load, so it needs no write access).

Plain HTML around plotly's own ``Figure.to_html``; plotly.js is served from the installed plotly
package (no CDN), so the pages work without internet access.
"""

from __future__ import annotations

import html
import math
from collections.abc import Mapping, Sequence
from typing import Any

from mergesearch.dashboard.figures import (
    StudyViews,
    TrialCurves,
    curves_figure,
    study_figures,
)
from mergesearch.dashboard.publish import study_page, trial_page
from mergesearch.driver.report import Leaderboard, Row, summary_lines

PLOTLY_JS = "/mergesearch/static/plotly.min.js"
_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#222;background:#fafafa}
header{background:#263238;color:#fff;padding:10px 24px;display:flex;gap:24px;align-items:baseline}
header a{color:#b3e5fc} header b{font-size:18px}
main{padding:16px 24px} h1{font-size:22px;margin:8px 0} h2{font-size:17px;margin:22px 0 8px}
.grid{display:grid;grid-template-columns:repeat(2,minmax(0,1fr));gap:16px}
@media (max-width:1250px){.grid{grid-template-columns:minmax(0,1fr)}}
.card{background:#fff;border:1px solid #e0e0e0;border-radius:6px;padding:8px}
table{border-collapse:collapse;background:#fff;font-size:13px} td,th{border:1px solid #e0e0e0;padding:3px 8px;text-align:right}
th{background:#f0f0f0} td.l,th.l{text-align:left} pre{background:#fff;border:1px solid #e0e0e0;padding:8px;overflow:auto}
.muted{color:#666} .summary p{margin:4px 0}
"""


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _f(x: float | None, signed: bool = False) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "—"
    return f"{x:+.3f}" if signed else f"{x:.3f}"


def page(title: str, body: str, dashboard_url: str | None = None) -> str:
    """A whole HTML page with the header bar."""
    links = ['<a href="/mergesearch">mergesearch studies</a>']
    if dashboard_url:
        links.append(f'<a href="{_e(dashboard_url)}">this study in optuna-dashboard</a>')
    links.append('<a href="/dashboard">optuna-dashboard</a>')
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{_e(title)}</title>'
            f'<meta name="viewport" content="width=device-width,initial-scale=1"><style>{_CSS}</style>'
            f'<script src="{PLOTLY_JS}"></script></head><body><header><b>mergesearch</b>{" ".join(links)}'
            f"</header><main>{body}</main></body></html>")


def _figure_div(fig: Any, div_id: str, height: int = 460) -> str:
    if fig.layout.height is None:
        fig.update_layout(height=height)
    return ('<div class="card">' + fig.to_html(full_html=False, include_plotlyjs=False, div_id=div_id,
                                               config={"displaylogo": False, "responsive": True}) + "</div>")


def _table(head: Sequence[str], rows: Sequence[Sequence[str]], left: int = 0, cls: str = "") -> str:
    th = "".join(f'<th class="{"l" if i < left else ""}">{_e(h)}</th>' for i, h in enumerate(head))
    body = "".join("<tr>" + "".join(f'<td class="{"l" if i < left else ""}">{c}</td>' for i, c in enumerate(r))
                   + "</tr>" for r in rows)
    return f'<table class="{cls}"><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>'


def _trial_rows(lb: Leaderboard, rows: Sequence[Row], study: str, ranked: bool) -> list[list[str]]:
    out = []
    for r in rows:
        link = f'<a href="{_e(trial_page(study, r.number))}">{r.number}</a>'
        cells = [str(r.rank or "") if ranked else "", link, _e(r.name), _e(r.state), _f(r.value),
                 _f(r.held_out_value), _f(r.gap, True), *(_f(r.scores.get(t)) for t in lb.tasks),
                 _e(r.worker), f"{r.duration_s:.1f}s" if r.duration_s is not None else "—"]
        out.append(cells)
    return out


def studies_page(entries: Sequence[tuple[str, int, int | None]]) -> str:
    """The list of the storage's studies: (name, trials, optuna-dashboard study id)."""
    rows = [[f'<a href="{_e(study_page(n))}">{_e(n)}</a>', str(count),
             f'<a href="/dashboard/studies/{sid}">optuna-dashboard</a>' if sid is not None else ""]
            for n, count, sid in entries]
    body = "<h1>Studies</h1>" + _table(["study", "trials", ""], rows, left=1, cls="studies")
    return page("mergesearch studies", body)


def overview_page(views: StudyViews, dashboard_url: str | None, limit: int = 100) -> str:
    """Every mergesearch figure of a study, its summary, ranked trials and baselines."""
    lb = views.lb
    name = views.study_name
    parts = [f"<h1>Study {_e(name)}</h1>",
             f'<p class="muted">objective: {_e(lb.objective)} over {_e(", ".join(lb.tasks))}; '
             f'{sum(lb.counts.values())} trials (' + ", ".join(f"{v} {k}" for k, v in lb.counts.items() if v)
             + "). This page reads the storage on each load.</p>",
             '<div class="summary">' + "".join(f"<p>{_e(line)}</p>" for line in summary_lines(lb)) + "</div>",
             '<div class="grid">']
    for gid, fig in study_figures(views).items():
        parts.append(_figure_div(fig, gid))
    parts.append("</div>")
    head = ["rank", "trial", "label", "state", "proxy", "held-out", "gap", *lb.tasks, "worker", "time"]
    shown = lb.rows[:limit]
    parts.append(f"<h2>Trials ({len(shown)} of {lb.n_complete} complete, best first; a trial number opens its "
                 "per-layer curves)</h2>")
    parts.append(_table(head, _trial_rows(lb, shown, name, True), left=0, cls="trials"))
    if lb.pruned:
        parts.append(f"<h2>Pruned ({len(lb.pruned)}, partial scores)</h2>")
        parts.append(_table(head, _trial_rows(lb, lb.pruned[:limit], name, False), cls="pruned"))
    if lb.baselines:
        parts.append(f"<h2>Baselines (study {_e(lb.baselines_study or name)})</h2>")
        rows = []
        for r in lb.baselines:
            cells = _trial_rows(lb, [r], r.study, False)[0]
            rows.append(cells)
        parts.append(_table(head, rows, cls="baselines"))
    return page(f"mergesearch · {name}", "\n".join(parts), dashboard_url)


def trial_page_html(study_name: str, number: int, attrs: Mapping[str, Any], state: str,
                    row: Row | None, lb: Leaderboard, curves: TrialCurves | None, curves_error: str,
                    dashboard_url: str | None) -> str:
    """One trial: per-layer curves, per-task proxy/held-out scores, timings and the merge plan."""
    label = attrs.get("label") or f"trial {number}"
    parts = [f"<h1>Trial {number} of {_e(study_name)}: {_e(label)}</h1>",
             f'<p><a href="{_e(study_page(study_name))}">back to the study</a> · state {_e(state)}'
             + (f" · rank {row.rank} of {lb.n_complete}" if row is not None and row.rank else "")
             + (f" · proxy {_f(row.value)}" if row is not None else "")
             + (f" · held-out {_f(row.held_out_value)} (gap {_f(row.gap, True)})"
                if row is not None and row.held_out_value is not None else "") + "</p>"]
    if curves is not None:
        parts.append(_figure_div(curves_figure([curves]), "mergesearch-trial-curves",
                                 height=max(360, 260 * len(curves.params) + 120)))
        if curves.note:
            parts.append(f'<p class="muted">{_e(curves.note)}</p>')
        if curves.edges:
            parts.append("<h2>Outside the layers</h2>")
            parts.append(_table(["tensor", "parameter", "model", "value"],
                                [[_e(t), _e(p), _e(m or ""), f"{v:.4g}"] for t, p, m, v in curves.edges],
                                left=3, cls="edges"))
    else:
        parts.append(f'<p class="muted">No per-layer curves: {_e(curves_error)}</p>')
    scores = attrs.get("scores") or {}
    scored = attrs.get("scored") or {}
    held = row.held_out_scores if row is not None else {}
    tasks = list(lb.tasks) or list(scores)
    parts.append("<h2>Scores per task</h2>")
    parts.append(_table(["task", "proxy", "held-out", "proxy examples"],
                        [[_e(t), _f(scores.get(t)), _f(held.get(t)), str(scored.get(t, "—"))] for t in tasks],
                        left=1, cls="scores"))
    timings = attrs.get("timings") or {}
    info = [f"worker {_e(attrs.get('worker') or '?')}", f"seed {_e(attrs.get('seed', '—'))}"]
    info += [f"{_e(k)} {v:.2f}" for k, v in timings.items() if isinstance(v, (int, float))]
    parts.append(f'<p class="muted">{" · ".join(info)}</p>')
    if attrs.get("error"):
        parts.append(f"<h2>Error</h2><pre>{_e(attrs['error'])}</pre>")
    if attrs.get("plan"):
        parts.append(f"<h2>Merge plan (mergekit YAML)</h2><pre>{_e(attrs['plan'])}</pre>")
    return page(f"mergesearch · {study_name} · trial {number}", "\n".join(parts), dashboard_url)


def not_found_page(message: str) -> str:
    return page("not found", f"<h1>Not found</h1><p>{_e(message)}</p>")
