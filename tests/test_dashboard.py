"""`mergesearch dashboard`: the figures (pure), what is saved into a study, the bad inputs, the
served pages, and (integration) a real study's pages in a real headless Chromium."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

pytest.importorskip("optuna_dashboard", reason='needs the dashboard extra: pip install -e ".[dashboard]"')
pytest.importorskip("plotly", reason='needs the dashboard extra: pip install -e ".[dashboard]"')

from mergesearch.cli import main
from mergesearch.dashboard.figures import (
    FIGURE_IDS,
    TITLES,
    collect,
    plan_curves,
    study_figures,
)
from mergesearch.dashboard.publish import NOTE_HEADER, publish
from mergesearch.dashboard.server import DashboardError, bind, open_study, start
from mergesearch.errors import UnknownNameError
from mergesearch.plan import dump_plan, layer_fraction, parse_plan

ROOT = Path(__file__).resolve().parents[1]
T0 = datetime(2025, 1, 1, 12, 0, 0)


def slerp_plan(base: str, other: str) -> str:
    """A slerp plan with a t gradient on attention, a constant on the MLP, a default and a pinned
    embedding: what the slerp_curves space writes."""
    return dump_plan(parse_plan({
        "models": [{"model": base}, {"model": other}], "merge_method": "slerp", "base_model": base,
        "parameters": {"t": [{"filter": "embed_tokens", "value": 0.5},
                             {"filter": "self_attn", "value": [0.0, 0.5, 1.0]},
                             {"filter": "mlp", "value": 0.2}, {"value": 0.7}]},
        "dtype": "float32"}))


# ---------------------------------------------------------------------------------------------
# Curves of one plan


def test_curves_come_from_the_explain_resolution_on_the_sources(qwen3_family):
    from mergesearch.merge.explain import explain
    from mergesearch.plan import loads_plan

    text = slerp_plan(str(qwen3_family["base"]), str(qwen3_family["ft0"]))
    tc = plan_curves(text, 7, "trial 7")
    assert tc.x_title == "layer" and tc.method == "slerp" and tc.params == ["t"] and not tc.note
    by_group = {c.group: c for c in tc.curves}
    assert set(by_group) == {"self_attn", "mlp", "other tensors"}
    layers = 4
    assert by_group["self_attn"].x == (0.0, 1.0, 2.0, 3.0)
    assert by_group["self_attn"].y == pytest.approx([layer_fraction(i, layers) for i in range(layers)], abs=1e-6)
    assert by_group["mlp"].y == pytest.approx([0.2] * layers)
    assert by_group["other tensors"].y == pytest.approx([0.7] * layers)
    assert ("model.embed_tokens.weight", "t", None, 0.5) in tc.edges
    # the same numbers `mergesearch explain` prints
    table = explain(loads_plan(text)).tables[0]
    rows = dict(table.rows)
    assert [rows[f"layer {i}"]["global: filter 'self_attn'"] for i in range(layers)] == list(by_group["self_attn"].y)


def test_curves_without_the_sources_are_resolved_at_layer_fractions(tmp_path):
    text = slerp_plan(str(tmp_path / "gone" / "base"), str(tmp_path / "gone" / "ft"))
    tc = plan_curves(text, 3)
    assert tc.x_title == "layer fraction" and "not readable" in tc.note
    by_group = {c.group: c for c in tc.curves}
    assert by_group["self_attn"].x == (0.0, 0.5, 1.0)
    assert by_group["self_attn"].y == pytest.approx([0.0, 0.5, 1.0])
    assert by_group["mlp"].y == pytest.approx([0.2] * 3)
    assert by_group["other tensors"].y == pytest.approx([0.7] * 3)


def test_defaults_and_booleans_are_left_out(tmp_path):
    models = [str(tmp_path / n) for n in ("base", "a", "b")]
    text = dump_plan(parse_plan({
        "models": [{"model": models[0]}, {"model": models[1], "parameters": {"weight": 0.3}},
                   {"model": models[2], "parameters": {"weight": [0.1, 0.9]}}],
        "merge_method": "task_arithmetic", "base_model": models[0],
        "parameters": {"lambda": 1.0, "normalize": False}}))
    tc = plan_curves(text)
    assert tc.params == ["weight"]
    assert {c.model: c.y for c in tc.curves} == {"a": (0.3, 0.3), "b": pytest.approx((0.1, 0.9))}


# ---------------------------------------------------------------------------------------------
# Figures of a study


def _add(study: optuna.Study, n: int, scores: dict[str, float], *, worker: str, start_min: float, minutes: float,
         state: TrialState = TrialState.COMPLETE, values: list[float] | None = None, plan: str = "",
         kind: str = "search", label: str = "") -> None:
    attrs = {"kind": kind, "label": label, "scores": scores, "scored": {t: 10 for t in scores},
             "timings": {"materialise_s": 0.5, "eval_s": 4.0, "total_s": 4.5}, "worker": worker, "seed": n}
    if plan:
        attrs["plan"] = plan
    if state == TrialState.COMPLETE and values is None:
        values = [sum(scores.values()) / len(scores)]
    trial = optuna.trial.create_trial(state=state, values=values if state == TrialState.COMPLETE else None,
                                      user_attrs=attrs, intermediate_values={5: 0.1} if state == TrialState.PRUNED else None)
    trial.datetime_start = T0 + timedelta(minutes=start_min)
    trial.datetime_complete = T0 + timedelta(minutes=start_min + minutes)
    study.add_trial(trial)


def _meta(objective: str, tasks: list[str], **extra: object) -> dict[str, object]:
    return {"version": "0.1.0", "fingerprint": {}, "tasks": tasks, "weights": {t: 1.0 for t in tasks},
            "objective": objective, "config": {}, **extra}


def _make_storage(folder: Path) -> str:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    url = f"sqlite:///{folder / 'study.db'}"
    plan = slerp_plan(str(folder / "gone" / "base"), str(folder / "gone" / "ft"))
    s = optuna.create_study(study_name="syn", storage=url, direction="maximize")
    s.set_user_attr("mergesearch", _meta("mean", ["a", "b"], baselines_study="syn.baselines"))
    _add(s, 0, {"a": 0.6, "b": 0.3}, worker="w0", start_min=0, minutes=10, plan=plan)
    _add(s, 1, {"a": 0.9, "b": 0.6}, worker="w1", start_min=0, minutes=12, plan=plan.replace("0.2", "0.4"))
    _add(s, 2, {"a": 0.4}, worker="w0", start_min=15, minutes=3, state=TrialState.PRUNED, plan=plan)
    _add(s, 3, {"a": 0.7, "b": 0.7}, worker="w1", start_min=12, minutes=10, plan=plan)
    s.set_user_attr("held_out:1", {"scores": {"a": 0.8, "b": 0.5}, "value": 0.65, "gap": 0.1})
    b = optuna.create_study(study_name="syn.baselines", storage=url, direction="maximize")
    b.set_user_attr("mergesearch", _meta("mean", ["a", "b"], search_study="syn"))
    _add(b, 0, {"a": 0.8, "b": 0.2}, worker="w0", start_min=-10, minutes=5, kind="baseline", label="source: alpha")
    _add(b, 1, {"a": 0.5, "b": 0.5}, worker="w1", start_min=-10, minutes=5, kind="baseline", label="uniform merge")
    b.set_user_attr("held_out:0", {"scores": {"a": 0.7, "b": 0.2}, "value": 0.45, "gap": 0.05})
    mo = optuna.create_study(study_name="mo", storage=url, directions=["maximize", "maximize"])
    mo.set_user_attr("mergesearch", _meta("per_task", ["a", "b"]))
    for n, (a, bb) in enumerate([(0.9, 0.1), (0.5, 0.5), (0.4, 0.4), (0.1, 0.9)]):
        _add(mo, n, {"a": a, "b": bb}, values=[a, bb], worker="w0", start_min=n, minutes=1, plan=plan)
    return url


@pytest.fixture(scope="module")
def storage_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    return _make_storage(tmp_path_factory.mktemp("dash"))


def _load(url: str, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=url)


def test_study_figures_show_the_stored_evidence(storage_url):
    views = collect(_load(storage_url, "syn"), top=2)
    assert [c.number for c in views.best_curves] == [1, 3]
    figs = study_figures(views)
    assert list(figs) == [k for k in FIGURE_IDS if k != "mergesearch-pareto"], "no Pareto front for one objective"
    for gid, fig in figs.items():
        assert fig.layout.title.text == TITLES[gid]
    # curves: the best two overlaid, one panel per (parameter, tensor group), a legend entry per trial
    curves = figs["mergesearch-curves"]
    assert {a.text for a in curves.layout.annotations} == {"t · self_attn", "t · mlp", "t · other tensors"}
    assert sorted({d.name for d in curves.data}) == ["trial 1", "trial 3"]
    mlp = [d for d in curves.data if "t · mlp" in d.hovertemplate]
    assert sorted(tuple(d.y) for d in mlp) == [(0.2, 0.2, 0.2), (0.4, 0.4, 0.4)]
    # per-task scores: a line per task over complete and pruned trials, plus the best source per task
    scores = figs["mergesearch-task-scores"]
    lines = {d.name: d for d in scores.data if d.showlegend is not False}
    assert set(lines) == {"a", "b"}
    assert list(lines["a"].x) == [0, 1, 2, 3] and list(lines["b"].x) == [0, 1, 3]
    assert list(lines["a"].marker.symbol) == ["circle", "circle", "x", "circle"]
    assert any(d.name == "a: best source (source: alpha)" and list(d.y) == [0.8, 0.8] for d in scores.data)
    # proxy vs held-out: trial 1 and the baseline re-scored, each with its gap segment
    held = figs["mergesearch-held-out"]
    search = next(d for d in held.data if d.name == "search trials")
    assert list(search.x) == pytest.approx([0.75]) and list(search.y) == pytest.approx([0.65])
    assert search.customdata[0][0] == pytest.approx(0.1)
    gap = next(d for d in held.data if d.name == "gap")
    assert [v for v in gap.y if v is not None] == pytest.approx([0.75, 0.65, 0.5, 0.45])
    # timeline: two workers, busy share in the label, idle where a worker waited
    timeline = figs["mergesearch-timeline"]
    rows = {y for d in timeline.data for y in d.y}
    assert rows == {"w0 · busy 64%", "w1 · busy 84%"}
    idle = next(d for d in timeline.data if d.name == "idle")
    assert sorted(idle.customdata) == [300.0, 300.0, 300.0]
    assert {d.name for d in timeline.data} == {"complete", "pruned", "idle"}


def test_pareto_front_of_a_per_task_study(storage_url):
    figs = study_figures(collect(_load(storage_url, "mo")))
    pareto = figs["mergesearch-pareto"]
    front = next(d for d in pareto.data if d.name == "Pareto front")
    assert list(front.text) == ["#3", "#1", "#0"]
    rest = next(d for d in pareto.data if d.name == "dominated")
    assert list(rest.text) == ["#2"]


def test_publish_saves_figures_and_notes_and_keeps_a_users_note(tmp_path):
    from optuna_dashboard import get_note, save_note

    url = _make_storage(tmp_path)
    study = _load(url, "syn")
    handle = optuna.load_study(study_name="syn", storage=url, sampler=optuna.samplers.RandomSampler())
    save_note(optuna.Trial(handle, study.trials[3]._trial_id), "my own thoughts on trial 3")
    out = publish(study, top=2)
    attrs = study._storage.get_study_system_attrs(study._study_id)
    for gid in out.figures:
        chunks = sorted((k for k in attrs if k.startswith(f"dashboard:plot_data:{gid}:")),
                        key=lambda k: int(k.rsplit(":", 1)[1]))
        fig = json.loads("".join(attrs[k] for k in chunks))
        assert fig["layout"]["title"]["text"] == TITLES[gid]
    assert set(out.figures) == set(FIGURE_IDS) - {"mergesearch-pareto"}
    note = get_note(study)
    assert note.startswith(NOTE_HEADER) and "/mergesearch/studies/syn/trials/1" in note and "| 1 | [1]" in note
    assert out.trial_notes == [1] and out.kept_notes == ["trial 3"]
    assert get_note(optuna.Trial(handle, study.trials[3]._trial_id)) == "my own thoughts on trial 3"
    trial_note = get_note(optuna.Trial(handle, study.trials[1]._trial_id))
    assert "held-out 0.650 (gap +0.100)" in trial_note and "| a | 0.900 | 0.800 |" in trial_note
    again = publish(study, top=2)
    assert again.trial_notes == [1] and get_note(study) == note


def test_figures_are_saved_again_when_trials_finish(tmp_path):
    url = _make_storage(tmp_path)
    logs: list[str] = []
    running = start(url, "syn", port=0, refresh_s=0.2, log=logs.append)
    try:
        assert logs == ["saved 4 figures and 4 notes into study syn (shown on its optuna-dashboard page)"]
        study = _load(url, "syn")

        def saved_trials() -> list[int] | None:
            """The trials of the saved task-scores figure (None while the refresh is mid-write)."""
            attrs = study._storage.get_study_system_attrs(study._study_id)
            prefix = "dashboard:plot_data:mergesearch-task-scores:"
            chunks = sorted((k for k in attrs if k.startswith(prefix)), key=lambda k: int(k.rsplit(":", 1)[1]))
            try:
                return json.loads("".join(attrs[k] for k in chunks))["data"][0]["x"]
            except json.JSONDecodeError:
                return None

        assert saved_trials() == [0, 1, 2, 3]
        _add(study, 4, {"a": 0.95, "b": 0.9}, worker="w0", start_min=30, minutes=5)
        deadline = datetime.now() + timedelta(seconds=20)
        while saved_trials() != [0, 1, 2, 3, 4] and datetime.now() < deadline:
            threading.Event().wait(0.1)
        assert saved_trials() == [0, 1, 2, 3, 4]
    finally:
        running.stop_refresh.set()
        running.server.server_close()


# ---------------------------------------------------------------------------------------------
# Bad input


def test_an_unknown_study_lists_the_studies(storage_url):
    with pytest.raises(UnknownNameError) as err:
        open_study(storage_url, "sym")
    assert "Did you mean 'syn'?" in str(err.value) and "mo, syn, syn.baselines" in str(err.value)
    with pytest.raises(DashboardError, match="several studies: syn, mo. Pick one with --study NAME"):
        open_study(storage_url, None)


def test_a_port_in_use_names_a_free_one():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(DashboardError, match=rf"Port {port} on 127.0.0.1 is already in use.* --port \d+"):
            bind("127.0.0.1", port)


def test_the_cli_prints_bad_input_without_a_traceback(storage_url, tmp_path, capsys):
    def refused(*args: str) -> str:
        rc = main(["dashboard", *args])
        err = capsys.readouterr().err
        assert rc == 2 and "error:" in err and "Traceback" not in err, err
        return err

    err = refused("--storage", storage_url, "--study", "nope", "--host", "0.0.0.0")
    assert "warning:" in err and "no login" in err, "exposing the study must warn"
    assert "No study 'nope'" in err and "mo, syn, syn.baselines" in err
    assert "does not exist" in refused("--storage", f"sqlite:///{tmp_path / 'none.db'}")
    assert "study file" in refused()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        err = refused("--storage", storage_url, "--study", "syn", "--port", str(busy.getsockname()[1]))
        assert "already in use" in err and "--port" in err


# ---------------------------------------------------------------------------------------------
# Served pages (no browser)


@pytest.fixture
def served(storage_url) -> Iterator[object]:
    logs: list[str] = []
    running = start(storage_url, "syn", port=0, publish=False, refresh_s=0, log=logs.append)
    thread = threading.Thread(target=running.server.serve_forever, daemon=True)
    thread.start()
    try:
        yield running
    finally:
        running.shutdown()
        thread.join(10)


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            return r.status, r.read().decode("utf-8")
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode("utf-8")


def test_served_pages(served):
    base = served.base_url
    assert served.base_url.startswith("http://127.0.0.1:")
    status, body = _get(served.mergesearch_url)
    assert status == 200
    for gid in ("mergesearch-curves", "mergesearch-task-scores", "mergesearch-held-out", "mergesearch-timeline"):
        assert f'id="{gid}"' in body
    assert '/mergesearch/studies/syn/trials/1"' in body and "/mergesearch/studies/syn.baselines/trials/0" in body
    status, body = _get(f"{base}/mergesearch/studies/syn/trials/1")
    assert status == 200 and 'id="mergesearch-trial-curves"' in body and "merge_method: slerp" in body
    assert _get(f"{base}/mergesearch/studies/syn/trials/99")[0] == 404
    assert _get(f"{base}/mergesearch/studies/nope")[0] == 404
    status, js = _get(f"{base}/mergesearch/static/plotly.min.js")
    assert status == 200 and len(js) > 1_000_000
    status, body = _get(f"{base}/api/studies")
    assert status == 200 and {s["study_name"] for s in json.loads(body)["study_summaries"]} == {"syn", "syn.baselines", "mo"}


# ---------------------------------------------------------------------------------------------
# A real study in a real headless Chromium


def _chromium() -> str:
    """The Chromium binary; apt-get installs Debian's package when it is missing (as root), or the
    test skips saying why."""
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    if shutil.which("apt-get") is None:
        pytest.skip("Chromium is not installed and this machine has no apt-get (install chromium)")
    if os.geteuid() != 0:
        pytest.skip("Chromium is not installed and installing it needs root (apt-get install chromium)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    cmd = ["apt-get", "install", "-y", "-q", "chromium"]
    done = None
    for step in ([cmd], [["apt-get", "update", "-q"], cmd]):
        try:
            for c in step:
                done = subprocess.run(c, check=False, capture_output=True, text=True, env=env, timeout=900)
        except (OSError, subprocess.TimeoutExpired) as err:
            pytest.skip(f"`apt-get install chromium` failed: {err}")
        if done.returncode == 0 and shutil.which("chromium"):
            return str(shutil.which("chromium"))
    tail = (done.stderr or done.stdout).strip().splitlines()[-1:] if done else []
    pytest.skip(f"`apt-get install chromium` failed: {tail[0] if tail else 'no chromium after install'}")


@pytest.fixture(scope="module")
def chromium() -> str:
    """Playwright and Chromium, checked (or installed) before the study is built."""
    pytest.importorskip("playwright.sync_api", reason="needs playwright (the test extra)")
    return _chromium()


@pytest.fixture(scope="module")
def real_study(tmp_path_factory) -> Path:
    """A small real study: the tiny zoo, per-layer SLERP curves (search_spaces/slerp_curves), two
    tasks as two objectives (so it has a Pareto front), baselines and held-out re-scoring."""
    import torch

    from mergesearch.cli import main
    from mergesearch.zoo.build import ZooConfig, build_zoo

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        root = tmp_path_factory.mktemp("dash-real")
        zoo = root / "zoo"
        build_zoo(zoo, ZooConfig(base_steps=3, expert_steps=2, warmup_steps=1, verify=False, verify_limit=2,
                                 threads=1))
        study = {
            "name": "curves", "sources": {"base": str(zoo / "base"), "models": [str(zoo / "experts" / "order")]},
            "method": "slerp", "space": "slerp_curves",
            "evals": {"tasks": ["perplexity", "order"], "proxy_limit": 6, "held_out_limit": 4, "chunk_size": 6,
                      "objective": "per_task"},
            "sampler": "random", "budget": {"trials": 4}, "top_k": 2, "output_dir": "out",
            "write_checkpoint": False,
        }
        path = root / "study" / "study.yaml"
        path.parent.mkdir()
        path.write_text(yaml.safe_dump(study), encoding="utf-8")
        assert main(["run", str(path), "--quiet"]) == 0
    finally:
        torch.set_num_threads(threads)
    return path


def test_a_finished_run_leaves_its_figures_for_plain_optuna_dashboard(real_study):
    """`mergesearch run` publishes at the end, so `optuna-dashboard STORAGE` alone shows our views."""
    from optuna_dashboard import get_note

    study = optuna.load_study(study_name="curves", storage=f"sqlite:///{real_study.parent / 'out' / 'study.db'}")
    attrs = study._storage.get_study_system_attrs(study._study_id)
    saved = {gid for gid in FIGURE_IDS if any(k.startswith(f"dashboard:plot_data:{gid}:") for k in attrs)}
    assert saved == set(FIGURE_IDS)
    assert get_note(study).startswith(NOTE_HEADER)


_TRACES = "id => { const el = document.getElementById(id); return el && el.data ? el.data.length : -1; }"
_TITLE = "id => { const t = document.getElementById(id).querySelector('.gtitle'); return t ? t.textContent : ''; }"


@pytest.mark.integration
@pytest.mark.filterwarnings("ignore:Target and region quantiles")  # optuna-dashboard's importance, tiny study
def test_dashboard_in_headless_chromium(chromium, real_study, tmp_path):
    from playwright import sync_api

    from mergesearch.driver.config import load_study
    from mergesearch.driver.storage import default_storage_url

    url = default_storage_url(load_study(real_study).output_dir)
    study = _load(url, "curves")
    logs: list[str] = []
    running = start(url, None, port=0, top=3, refresh_s=0, log=logs.append)
    assert any("saved 5 figures" in line for line in logs), logs
    expected = {gid: len(fig.data) for gid, fig in study_figures(collect(study, top=3)).items()}
    assert set(expected) == set(FIGURE_IDS)
    complete = [t.number for t in study.get_trials(states=(TrialState.COMPLETE,))]
    assert len(complete) == 4
    thread = threading.Thread(target=running.server.serve_forever, daemon=True)
    thread.start()
    shots = ROOT / "test-artifacts" / "dashboard"  # kept after the run (gitignored), for CI to collect
    shots.mkdir(parents=True, exist_ok=True)
    errors: list[str] = []
    try:
        with sync_api.sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=chromium, headless=True,
                                         args=["--no-sandbox"] if os.geteuid() == 0 else [])
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.on("pageerror", lambda e: errors.append(str(e)))
            # optuna-dashboard's study page: its own charts and ours, drawn from the saved graph objects
            page.goto(running.dashboard_url)
            for gid in FIGURE_IDS:
                page.wait_for_selector(f'[id="user-defined-plot:{gid}"] .main-svg', timeout=60_000)
            for gid, n in expected.items():
                assert page.evaluate(_TRACES, f"user-defined-plot:{gid}") == n, gid
                assert page.evaluate(_TITLE, f"user-defined-plot:{gid}") == TITLES[gid]
            page.wait_for_timeout(500)
            page.screenshot(path=str(shots / "dashboard-study.png"), full_page=True)
            boxes = [page.locator(f'[id="user-defined-plot:{gid}"]').bounding_box() for gid in FIGURE_IDS]
            top, left = min(b["y"] for b in boxes) - 24, min(b["x"] for b in boxes) - 24
            clip = {"x": left, "y": top, "width": max(b["x"] + b["width"] for b in boxes) + 24 - left,
                    "height": max(b["y"] + b["height"] for b in boxes) + 24 - top}
            page.screenshot(path=str(shots / "dashboard-mergesearch-figures.png"), full_page=True, clip=clip)
            # its trial list, and the note we left on the best trial
            page.goto(running.dashboard_url + "/trials")
            page.get_by_text(f"Trial {complete[-1]}", exact=True).first.wait_for(timeout=30_000)
            listed = page.inner_text("body")
            assert all(f"Trial {n}" in listed for n in complete)
            best = collect(study).lb.rows[0].number
            page.goto(f"{running.dashboard_url}/trials?numbers={best}")
            page.get_by_text("Per-layer curves, scores and merge plan").wait_for(timeout=30_000)
            page.screenshot(path=str(shots / "dashboard-trial.png"))
            # our study page: the same figures, live
            page.goto(running.mergesearch_url)
            page.wait_for_selector("#mergesearch-timeline .main-svg", timeout=30_000)
            for gid, n in expected.items():
                assert page.evaluate(_TRACES, gid) == n, gid
            assert page.locator("table.trials tbody tr").count() == 4
            page.screenshot(path=str(shots / "mergesearch-study.png"), full_page=True)
            # our trial page: the per-layer t curves of the best trial, from its stored plan
            page.click(f'table.trials a[href$="/trials/{best}"]')
            page.wait_for_selector("#mergesearch-trial-curves .main-svg", timeout=30_000)
            drawn = page.evaluate("() => document.getElementById('mergesearch-trial-curves').data"
                                  ".map(d => [d.name, d.x, d.y])")
            want = plan_curves(study.trials[best].user_attrs["plan"], best)
            assert {n: (list(x), list(y)) for n, x, y in drawn} == {
                c.name: (list(c.x), list(c.y)) for c in want.curves}
            assert {n for n, _x, _y in drawn} == {"self_attn", "mlp", "other tensors"}
            assert len(drawn[0][1]) == 4, "one point per layer of the tiny zoo"
            page.screenshot(path=str(shots / "mergesearch-trial.png"), full_page=True)
            browser.close()
    finally:
        running.shutdown()
        thread.join(10)
    assert not errors, errors
    if os.environ.get("MERGESEARCH_UPDATE_SCREENSHOT") == "1":
        shutil.copyfile(shots / "dashboard-mergesearch-figures.png", ROOT / "docs" / "images" / "dashboard.png")
