"""The study driver: Optuna ask/tell in one process that alone writes the storage.

Flow of ``run_study``: validate everything (sources, method, space, tasks, storage) before any
trial runs; open or resume the study (trials a killed driver left RUNNING are failed and their
parameters re-enqueued); enqueue the baselines (each source alone and the uniform merge, kept in
a companion study ``NAME.baselines`` so the samplers never see them) and the start points; then
keep every worker busy — no generation barrier: whenever a worker is free the next trial is
asked. Workers report per-example scores after each round of chunks, which feed the pruner.
At the end (budget spent, wall time over, or Ctrl-C once running trials settle) the top-k
trials and the baselines are re-scored on the held-out split and the best merge is written.
"""

from __future__ import annotations

import math
import signal
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

import optuna
from optuna.trial import TrialState

from mergesearch.driver.config import StudyFile
from mergesearch.errors import ConfigError, MergeSearchError, unknown

__all__ = ["Prepared", "prepare", "run_study", "StudyOutcome", "objective_values", "scalar_value"]

BASELINES_SUFFIX = ".baselines"
MAX_CONSECUTIVE_FAILURES = 8


class StudyFailedError(MergeSearchError):
    """Every recent trial failed: the study cannot make progress."""


@dataclass
class Prepared:
    """A study file checked against the world: sources, method, space, tasks, storage."""

    study_file: StudyFile
    tasks: list[Any]
    task_names: list[str]
    weights: dict[str, float]
    space: Any
    ctx: Any
    uniform_plan: Any
    start_points: list[tuple[str, dict[str, Any]]]
    fingerprint: dict[str, Any]
    storage_url: str
    num_layers: int

    @property
    def config(self) -> Any:
        return self.study_file.config


def prepare(sf: StudyFile) -> Prepared:
    """Validate the study file against its sources, method, space and tasks (no trial runs)."""
    from mergesearch.driver.storage import default_storage_url
    from mergesearch.eval.tasks import load_tasks
    from mergesearch.io.checkpoint import open_checkpoints
    from mergesearch.merge.registry import METHODS, get_method, validate_plan
    from mergesearch.plan import dump_plan, load_plan
    from mergesearch.spaces import SpaceContext, load_space

    c = sf.config
    if c.method not in METHODS:
        raise unknown("merge method", c.method, METHODS, "the study file")
    spec = get_method(c.method)
    if spec.needs_base and sf.base is None:
        raise ConfigError(f"Method {c.method!r} needs a base model; set sources.base in the study file.")
    paths = [*([str(sf.base)] if sf.base else []), *(str(m) for m in sf.models)]
    for p in paths:
        if not Path(p).is_dir():
            raise ConfigError(
                f"Source {p!r} does not exist (paths in a study file are relative to its folder, "
                f"{sf.root}). For the demo zoo run `mergesearch zoo` first."
            )
    ckpts = open_checkpoints(paths)
    try:
        num_layers = next(iter(ckpts.values())).num_layers
    finally:
        for ck in ckpts.values():
            ck.close()
    tasks = load_tasks(sf.task_refs(), sf.task_dirs, sf.config.evals.confirm_run_unsafe_code)
    names = [t.name for t in tasks]
    for t in tasks:
        for split in ("proxy", "held_out"):
            if not t.examples(split):
                raise ConfigError(
                    f"Task {t.name!r} ({t.path}) has no {split!r} examples; a study scores candidates on "
                    "`proxy` and re-scores the best on `held_out`. Add data for both splits."
                )
    weights = {n: c.evals.weight(n) for n in names}
    space = load_space(sf.space_ref(), sf.space_dirs())
    from mergesearch.merge.importance import study_calibration

    ctx = SpaceContext(method=c.method, models=tuple(str(m) for m in sf.models),
                      base=str(sf.base) if sf.base else None, num_layers=num_layers, dtype=c.dtype,
                      sampler=c.sampler.name, calibration=study_calibration(sf))
    space.check(ctx)
    if not space.distributions(ctx):
        raise ConfigError(f"Search space {c.space!r} has no genes for method {c.method!r}; nothing to search.")
    uniform = space.uniform_plan(ctx)
    validate_plan(uniform)
    starts: list[tuple[str, dict[str, Any]]] = []
    uniform_genes = space.genes_from_plan(uniform, ctx)
    if uniform_genes is not None:
        starts.append(("uniform merge", uniform_genes))
    for ref in c.start_from:
        path = sf.resolve(ref)
        plan = load_plan(path)
        plan = plan.with_models({m: str(sf.resolve(m)) if not Path(m).is_absolute() else m
                                 for m in plan.referenced_models()})
        genes = space.genes_from_plan(plan, ctx)
        if genes is None:
            raise ConfigError(
                f"start_from {ref!r} cannot be expressed in search space {c.space!r} (method, models or "
                f"parameter layout differ); its plan is:\n{dump_plan(plan)}Remove it or pick a space that "
                "covers it."
            )
        starts.append((f"start: {Path(ref).name}", genes))
    space_text = space.path.read_text(encoding="utf-8") if getattr(space, "path", None) else repr(space)
    out = sf.output_dir
    return Prepared(sf, tasks, names, weights, space, ctx, uniform, starts, sf.fingerprint(space_text),
                    c.storage or default_storage_url(out), num_layers)


# ---------------------------------------------------------------------------------------------
# Objectives


def scalar_value(scores: Mapping[str, float], weights: Mapping[str, float]) -> float:
    """The weighted mean of per-task scores (the single objective, and the ranking key)."""
    total = sum(weights.values())
    return sum(weights[t] * scores.get(t, 0.0) for t in weights) / total


def objective_values(scores: Mapping[str, float], weights: Mapping[str, float], objective: str) -> list[float]:
    if objective == "per_task":
        return [scores[t] for t in weights]
    return [scalar_value(scores, weights)]


def make_sampler(name: str, options: Mapping[str, Any], seed: int) -> optuna.samplers.BaseSampler:
    classes = {
        "random": optuna.samplers.RandomSampler,
        "cmaes": optuna.samplers.CmaEsSampler,
        "tpe": optuna.samplers.TPESampler,
        "gp": optuna.samplers.GPSampler,
        "nsgaii": optuna.samplers.NSGAIISampler,
    }
    kwargs = {"seed": seed, **options}
    if name == "cmaes":
        kwargs.setdefault("warn_independent_sampling", False)
    try:
        return classes[name](**kwargs)
    except TypeError as err:
        raise ConfigError(f"sampler.options for {name!r}: {err}. See Optuna's {classes[name].__name__}.") from None
    except ImportError as err:
        raise ConfigError(f"Sampler {name!r} needs a package that is missing: {err}.") from None


def make_pruner(name: str, options: Mapping[str, Any], first_round: int, total: int) -> optuna.pruners.BasePruner:
    if name == "none":
        return optuna.pruners.NopPruner()
    defaults: dict[str, dict[str, Any]] = {
        "median": {"n_startup_trials": 4, "n_warmup_steps": first_round},
        "successive_halving": {"min_resource": first_round, "reduction_factor": 3},
        "hyperband": {"min_resource": first_round, "max_resource": total, "reduction_factor": 3},
        "wilcoxon": {"p_threshold": 0.1},
    }
    classes = {
        "median": optuna.pruners.MedianPruner,
        "successive_halving": optuna.pruners.SuccessiveHalvingPruner,
        "hyperband": optuna.pruners.HyperbandPruner,
        "wilcoxon": optuna.pruners.WilcoxonPruner,
    }
    try:
        return classes[name](**{**defaults[name], **options})
    except (TypeError, ValueError) as err:
        raise ConfigError(f"pruner.options for {name!r}: {err}. See Optuna's {classes[name].__name__}.") from None


# ---------------------------------------------------------------------------------------------
# The run


@dataclass
class _Running:
    study: optuna.Study
    trial: optuna.Trial
    kind: str
    started: float
    reported: dict[str, int] = field(default_factory=dict)
    step: int = 0
    pruned: bool = False


@dataclass
class StudyOutcome:
    study: optuna.Study
    baselines: optuna.Study
    storage_url: str
    output_dir: Path
    best_trial: Optional[int]
    best_dir: Optional[Path]
    interrupted: bool
    counts: dict[str, int]
    latency: dict[str, list[float]] = field(default_factory=dict)


class _Reporter:
    """Where the driver says what happens (a rich display, or nothing in tests)."""

    UPDATE_EVERY_S = 1.0

    def __init__(self, log: Optional[Callable[[str], None]] = None,
                 update: Optional[Callable[[dict[str, int], Optional[dict[str, Any]], float], None]] = None):
        self.log = log or (lambda _m: None)
        self._update = update
        self._last = -math.inf

    def update(self, study: optuna.Study, weights: Mapping[str, float], elapsed: float, *, force: bool = False) -> None:
        """Counts and best so far, at most once per ``UPDATE_EVERY_S`` (each reads every trial), only if a display listens."""
        if self._update is None or (not force and time.monotonic() - self._last < self.UPDATE_EVERY_S):
            return
        self._last = time.monotonic()
        self._update(_counts(study), _best(study, weights), elapsed)


def _counts(study: optuna.Study) -> dict[str, int]:
    out = {"complete": 0, "pruned": 0, "failed": 0, "running": 0, "waiting": 0, "retried": 0}
    trials = study.get_trials(deepcopy=False)
    retried = {t.user_attrs.get("retry_of") for t in trials if t.user_attrs.get("retry_of") is not None}
    for t in trials:
        if t.state == TrialState.COMPLETE:
            out["complete"] += 1
        elif t.state == TrialState.PRUNED:
            out["pruned"] += 1
        elif t.state == TrialState.FAIL:
            if t.number in retried:
                out["retried"] += 1
            else:
                out["failed"] += 1
        elif t.state == TrialState.RUNNING:
            out["running"] += 1
        elif t.state == TrialState.WAITING:
            out["waiting"] += 1
    out["finished"] = out["complete"] + out["pruned"] + out["failed"]
    return out


def _best(study: optuna.Study, weights: Mapping[str, float]) -> Optional[dict[str, Any]]:
    best = None
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        scores = t.user_attrs.get("scores") or {}
        value = scalar_value(scores, weights)
        if best is None or value > best["value"]:
            best = {"number": t.number, "value": value, "scores": scores,
                    "label": t.user_attrs.get("label") or f"trial {t.number}"}
    return best


class Driver:
    def __init__(self, prep: Prepared, reporter: _Reporter, n_trials: Optional[int] = None):
        self.prep = prep
        self.c = prep.config
        self.reporter = reporter
        self.total = n_trials if n_trials is not None else self.c.budget.trials
        if self.total <= 0:
            raise ConfigError(f"--n-trials must be positive, got {self.total}.")
        self.running: dict[str, _Running] = {}
        self.stop_requested = False
        self.interrupts = 0
        self.consecutive_failures = 0
        self.scratch_logged = False
        self.last_error = ""
        self.offsets: dict[str, int] = {}
        self.proxy_totals: dict[str, int] = {}
        self.latency: dict[str, list[float]] = {"ask": [], "tell": []}
        self.baselines_done = False

    # -- set up -------------------------------------------------------------------------------

    def open(self) -> None:
        from mergesearch.driver.storage import check_study_identity, open_storage, recover_interrupted

        p = self.prep
        c = self.c
        self.storage = open_storage(p.storage_url)
        directions = ["maximize"] * (len(p.task_names) if c.evals.objective == "per_task" else 1)
        limit = c.evals.proxy_limit
        offset = 0
        for t in p.tasks:
            n = len(t.examples("proxy")[:limit] if limit else t.examples("proxy"))
            self.offsets[t.name] = offset
            self.proxy_totals[t.name] = n
            offset += n
        first_round = sum(min(c.evals.chunk_size, n) for n in self.proxy_totals.values())
        pruner = make_pruner(c.pruner.name, c.pruner.options, first_round, offset)
        sampler = make_sampler(c.sampler.name, c.sampler.options, c.seed)
        self.study = optuna.create_study(study_name=c.name, storage=self.storage, sampler=sampler,
                                         pruner=pruner, directions=directions, load_if_exists=True)
        check_study_identity(self.study, p.fingerprint)
        self.baselines = optuna.create_study(
            study_name=c.name + BASELINES_SUFFIX, storage=self.storage,
            sampler=optuna.samplers.RandomSampler(seed=c.seed), directions=directions, load_if_exists=True)
        check_study_identity(self.baselines, p.fingerprint)
        meta = {"version": _version(), "fingerprint": p.fingerprint, "tasks": p.task_names,
                "weights": p.weights, "objective": c.evals.objective, "config": p.study_file.dump(),
                "baselines_study": self.baselines.study_name, "study_file": str(p.study_file.path or "")}
        self.study.set_user_attr("mergesearch", meta)
        self.baselines.set_user_attr("mergesearch", {**meta, "search_study": c.name})
        for s in (self.study, self.baselines):
            for n in recover_interrupted(s):
                self.reporter.log(f"trial {n} of {s.study_name} was left running by a stopped driver: "
                                  "marked failed and queued again")
        self._enqueue_initial()

    def _enqueue_initial(self) -> None:
        from mergesearch.plan import dump_plan, parse_plan

        p = self.prep
        if self.c.baselines and not self.baselines.get_trials(deepcopy=False):
            sources = [*([p.ctx.base] if p.ctx.base else []), *p.ctx.models]
            for src in sources:
                plan = parse_plan({"models": [{"model": src, "parameters": {"weight": 1.0}}],
                                   "merge_method": "linear", "dtype": p.ctx.dtype}, "source baseline")
                self.baselines.enqueue_trial({}, user_attrs={"kind": "baseline", "label": f"source: {_short(src)}",
                                                             "plan": dump_plan(plan)})
            self.baselines.enqueue_trial({}, user_attrs={"kind": "baseline", "label": "uniform merge",
                                                         "plan": dump_plan(p.uniform_plan)})
        if not self.study.get_trials(deepcopy=False):
            for label, genes in p.start_points:
                self.study.enqueue_trial(genes, user_attrs={"kind": "start", "label": label})

    # -- asking -------------------------------------------------------------------------------

    def _search_budget_left(self) -> int:
        counts = _counts(self.study)
        in_flight = sum(1 for r in self.running.values() if r.study is self.study)
        return self.total - counts["finished"] - in_flight

    def _baseline_waiting(self) -> bool:
        if self.baselines_done:
            return False
        waiting = any(t.state == TrialState.WAITING for t in self.baselines.get_trials(deepcopy=False))
        self.baselines_done = not waiting
        return waiting

    def _next_job(self) -> Optional[Any]:
        from mergesearch.workers.worker import Job

        if self._baseline_waiting():
            trial = self.baselines.ask()
            return self._start(self.baselines, trial, trial.user_attrs.get("plan", ""), "baseline", Job)
        if self._search_budget_left() <= 0:
            return None
        trial = self.study.ask()
        kind = trial.user_attrs.get("kind", "search")
        dists = self.prep.space.distributions(self.prep.ctx)
        try:
            genes = {name: _suggest(trial, name, d) for name, d in dists.items()}
            plan_text = _dump(self.prep.space.to_plan(genes, self.prep.ctx))
        except MergeSearchError as err:
            self._fail(self.study, trial, f"the genes do not compile to a merge plan: {err}")
            return self._next_job()
        return self._start(self.study, trial, plan_text, kind, Job)

    def _start(self, study: optuna.Study, trial: optuna.Trial, plan_text: str, kind: str, job_cls: Any) -> Any:
        from mergesearch.driver.storage import driver_identity

        seed = self.c.seed * 1_000_003 + trial.number
        trial.set_user_attr("plan", plan_text)
        trial.set_user_attr("kind", kind)
        trial.set_user_attr("seed", seed)
        trial.set_user_attr("driver", driver_identity())
        key = f"{'b' if study is self.baselines else 's'}:{trial.number}"
        self.running[key] = _Running(study, trial, kind, time.time())
        self.heartbeat.add(trial._trial_id)
        prune = study is self.study and self.c.pruner.name != "none"
        return job_cls(key=key, plan=plan_text, split="proxy", seed=seed, report=prune)

    # -- events -------------------------------------------------------------------------------

    def _on_progress(self, event: Any) -> bool:
        r = self.running.get(event.key)
        if r is None:
            return True
        if r.pruned:
            return True
        trial = r.trial
        scores = event.progress.scores
        if self.c.pruner.name == "wilcoxon":
            w = self.prep.weights
            wsum = sum(w.values())
            n_all = sum(self.proxy_totals.values())
            for task, vals in scores.items():
                done = r.reported.get(task, 0)
                for i in range(done, len(vals)):
                    scale = w[task] / wsum * n_all / max(self.proxy_totals[task], 1)
                    trial.report(vals[i] * scale, self.offsets[task] + i)
                r.reported[task] = len(vals)
        else:
            means = {t: sum(v) / len(v) for t, v in scores.items() if v}
            done = sum(len(v) for v in scores.values())
            trial.report(scalar_value(means, {t: self.prep.weights[t] for t in means}), done)
            r.step = done
        if trial.should_prune():
            r.pruned = True
            done = sum(len(v) for v in scores.values())
            self.reporter.log(f"trial {trial.number} pruned after {done} examples")
            return True
        return False

    def _on_done(self, event: Any) -> None:
        r = self.running.pop(event.key)
        self.heartbeat.discard(r.trial._trial_id)
        res = event.result
        t = r.trial
        for k, v in {"scores": res.scores, "scored": res.scored, "examples": res.examples,
                     "timings": {k2: round(v2, 4) for k2, v2 in res.timings.items()}, "worker": res.worker}.items():
            t.set_user_attr(k, v)
        if r.pruned:
            r.study.tell(t, state=TrialState.PRUNED)
            self.consecutive_failures = 0
            return
        if not res.complete:
            self._fail(r.study, t, "interrupted before its eval finished")
            self._requeue(r)
            return
        values = objective_values(res.scores, self.prep.weights, self.c.evals.objective)
        if not all(math.isfinite(v) for v in values):
            self._fail(r.study, t, f"non-finite objective {values}")
            return
        r.study.tell(t, values)
        self.consecutive_failures = 0
        label = t.user_attrs.get("label") or f"trial {t.number}"
        self.reporter.log(f"{label}: {scalar_value(res.scores, self.prep.weights):.4f} "
                          f"({res.timings['total_s']:.1f}s on {res.worker})")
        if not self.scratch_logged and "scratch_mib" in res.timings:
            self.scratch_logged = True
            self.reporter.log(f"merge scratch memory on {res.worker}: {res.timings['scratch_mib']:.1f} MiB above "
                              f"the resident sources and engine; merge {res.timings['materialise_s']:.2f}s, "
                              f"eval {res.timings['eval_s']:.2f}s")

    def _fail(self, study: optuna.Study, trial: optuna.Trial, error: str) -> None:
        trial.set_user_attr("error", error[:2000])
        study.tell(trial, state=TrialState.FAIL)
        self.consecutive_failures += 1
        self.last_error = error
        self.reporter.log(f"trial {trial.number} failed: {error.splitlines()[0][:300]}")

    def _on_failed(self, event: Any) -> None:
        r = self.running.pop(event.key)
        self.heartbeat.discard(r.trial._trial_id)
        self._fail(r.study, r.trial, event.error)
        if event.infra and r.trial.user_attrs.get("retry_of") is None:
            self._requeue(r)
            self.reporter.log(f"trial {r.trial.number} queued again (its worker failed)")

    def _requeue(self, r: _Running) -> None:
        from mergesearch.driver.storage import requeue

        requeue(r.study, r.study.get_trials(deepcopy=False)[r.trial.number])
        if r.study is self.baselines:
            self.baselines_done = False

    # -- loop ---------------------------------------------------------------------------------

    def loop(self, executor: Any, started: float) -> None:
        wall = self.c.budget.wall_time
        while True:
            out_of_time = wall is not None and time.time() - started > wall
            asking = not self.stop_requested and not out_of_time
            if asking:
                for _ in range(executor.idle()):
                    t0 = time.perf_counter()
                    job = self._next_job()
                    if job is None:
                        break
                    self.latency["ask"].append(time.perf_counter() - t0)
                    executor.submit(job)
            self.reporter.update(self.study, self.prep.weights, time.time() - started)
            if not self.running:
                if not (asking and (self._search_budget_left() > 0 or self._baseline_waiting())):
                    self.reporter.update(self.study, self.prep.weights, time.time() - started, force=True)
                    return
                if executor.capacity() == 0:
                    raise MergeSearchError(
                        "Every worker is gone and none could be started again, so the study stops with "
                        f"{self._search_budget_left()} trial(s) of its budget left; the log above says why "
                        "(memory, a broken engine). Fix that, then run the study again to resume it.")
            for event in executor.poll(timeout=0.5):
                if event.kind == "progress":
                    executor.reply(event.key, self.interrupts > 1 or self._on_progress(event))
                elif event.kind in ("done", "failed"):
                    t0 = time.perf_counter()
                    (self._on_done if event.kind == "done" else self._on_failed)(event)
                    self.latency["tell"].append(time.perf_counter() - t0)
                elif event.kind == "log":
                    self.reporter.log(event.error)
            if self.consecutive_failures >= MAX_CONSECUTIVE_FAILURES and not self.stop_requested:
                self.stop_requested = True
                self.failed_out = True


def _suggest(trial: optuna.Trial, name: str, dist: Any) -> Any:
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    if isinstance(dist, FloatDistribution):
        return trial.suggest_float(name, dist.low, dist.high, log=dist.log, step=dist.step)
    if isinstance(dist, IntDistribution):
        return trial.suggest_int(name, dist.low, dist.high, log=dist.log, step=dist.step)
    if isinstance(dist, CategoricalDistribution):
        return trial.suggest_categorical(name, dist.choices)
    raise ConfigError(f"Gene {name!r} has an unsupported distribution {dist!r}.")


def _dump(plan: Any) -> str:
    from mergesearch.plan import dump_plan

    return dump_plan(plan)


def _short(path: str) -> str:
    return Path(path).name


def _version() -> str:
    from mergesearch import __version__

    return __version__


# ---------------------------------------------------------------------------------------------
# Finish: held-out re-scoring and the best merge


def _held_out_candidates(study: optuna.Study, weights: Mapping[str, float], top_k: int) -> list[Any]:
    done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
    done.sort(key=lambda t: (-scalar_value(t.user_attrs.get("scores") or {}, weights), t.number))
    return done[:top_k]


def finish(driver: Driver, executor: Any, log: Callable[[str], None]) -> tuple[Optional[int], Optional[Path]]:
    """Re-score the top-k and the baselines on held-out; write the best configs and checkpoint."""
    from mergesearch.workers.worker import Job

    p = driver.prep
    c = driver.c
    todo: list[tuple[optuna.Study, Any]] = []
    for study, trials in ((driver.study, _held_out_candidates(driver.study, p.weights, c.top_k)),
                          (driver.baselines, driver.baselines.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))):
        for t in trials:
            if f"held_out:{t.number}" not in study.user_attrs:
                todo.append((study, t))
    if todo:
        log(f"re-scoring {len(todo)} trial(s) on the held-out split")
    pending: dict[str, tuple[optuna.Study, Any]] = {}
    queue = list(todo)
    while queue or pending:
        while queue and executor.idle() > 0:
            study, t = queue.pop(0)
            key = f"h:{'b' if study is driver.baselines else 's'}:{t.number}"
            pending[key] = (study, t)
            executor.submit(Job(key=key, plan=t.user_attrs["plan"], split="held_out",
                                seed=t.user_attrs.get("seed", 0)))
        for event in executor.poll(timeout=0.5):
            if event.kind == "progress":
                executor.reply(event.key, False)
                continue
            if event.kind == "log":
                log(event.error)
                continue
            study, t = pending.pop(event.key)
            if event.kind == "failed":
                log(f"held-out scoring of trial {t.number} failed: {event.error}")
                continue
            res = event.result
            value = scalar_value(res.scores, p.weights)
            proxy = scalar_value(t.user_attrs.get("scores") or {}, p.weights)
            study.set_user_attr(f"held_out:{t.number}", {
                "scores": res.scores, "value": value, "gap": proxy - value,
                "examples": res.examples, "timings": res.timings})
    best = _held_out_candidates(driver.study, p.weights, c.top_k)
    if not best:
        return None, None
    return best[0].number, write_best(driver, best)


def write_best(driver: Driver, ranked: Sequence[Any]) -> Optional[Path]:
    """mergekit YAML of the top-k under OUT/best/, and the best merged checkpoint (atomically)."""
    from mergesearch.io.writer import atomic_write_text
    from mergesearch.merge.executor import run_merge
    from mergesearch.plan import loads_plan

    p = driver.prep
    out = p.study_file.output_dir / "best"
    out.mkdir(parents=True, exist_ok=True)
    configs = []
    for rank, t in enumerate(ranked, 1):
        held = driver.study.user_attrs.get(f"held_out:{t.number}") or {}
        proxy = scalar_value(t.user_attrs.get("scores") or {}, p.weights)
        lines = [
            f"# Rank {rank} of study {driver.c.name!r}: trial {t.number}"
            + (f" ({t.user_attrs.get('label')})" if t.user_attrs.get("label") else ""),
            f"# proxy score {proxy:.4f}" + (f", held-out {held['value']:.4f} (gap {held['gap']:+.4f})" if held else ""),
            "# per task (proxy): " + ", ".join(f"{k} {v:.3f}" for k, v in (t.user_attrs.get("scores") or {}).items()),
            f"# Reproduce with mergekit:  mergekit-yaml {out.name}/rank{rank}-trial{t.number}.yaml OUT_DIR",
            f"# or with mergesearch:      mergesearch merge {out.name}/rank{rank}-trial{t.number}.yaml OUT_DIR",
        ]
        plan = loads_plan(t.user_attrs["plan"])
        if plan.calibration is not None:
            lines[-2] = (f"# mergekit cannot reproduce this merge ({plan.merge_method}, importance-weighted on calibration "
                         f"data {plan.calibration.hash}); the checkpoint is the authority")
        seed = t.user_attrs.get("seed")
        if seed is not None and loads_plan(t.user_attrs["plan"]).merge_method in ("dare_ties", "dare_linear", "della",
                                                                                  "della_linear", "breadcrumbs",
                                                                                  "breadcrumbs_ties"):
            lines.append(f"# random method: mergesearch used --seed {seed}")
        path = out / f"rank{rank}-trial{t.number}.yaml"
        atomic_write_text(path, "\n".join(lines) + "\n" + t.user_attrs["plan"])
        configs.append(str(path))
    for old in out.glob("rank*-trial*.yaml"):
        if str(old) not in configs:
            old.unlink()
    best = ranked[0]
    best_dir: Optional[Path] = None
    if driver.c.write_checkpoint:
        best_dir = out / "model"
        previous = driver.study.user_attrs.get("finished") or {}
        if previous.get("best_trial") != best.number or not (best_dir / "config.json").is_file():
            run_merge(loads_plan(best.user_attrs["plan"]), best_dir, force=True,
                      seed=best.user_attrs.get("seed", 0))
    driver.study.set_user_attr("finished", {
        "best_trial": best.number, "best_dir": str(best_dir) if best_dir else None, "configs": configs,
        "at": datetime.now(timezone.utc).isoformat(timespec="seconds")})
    return best_dir


def run_study(
    study_file: StudyFile,
    *,
    n_trials: Optional[int] = None,
    log: Optional[Callable[[str], None]] = None,
    update: Optional[Callable[[dict[str, int], Optional[dict[str, Any]], float], None]] = None,
    prepared: Optional[Prepared] = None,
) -> StudyOutcome:
    """Run (or resume) a study to its budget, then re-score on held-out and write the best merge."""
    from mergesearch.driver.storage import Heartbeat
    from mergesearch.workers.executor import make_executor
    from mergesearch.workers.worker import WorkerSetup

    reporter = _Reporter(log, update)
    prep = prepared or prepare(study_file)
    c = prep.config
    driver = Driver(prep, reporter, n_trials)
    driver.open()
    sources = (*([prep.ctx.base] if prep.ctx.base else ()), *prep.ctx.models)
    setup = WorkerSetup(
        sources=tuple(sources), engine_dir=sources[0], tasks=tuple(str(t.path) for t in prep.tasks),
        backend=c.engine.backend, dtype=c.engine.dtype, device=c.engine.device, batch_size=c.engine.batch_size,
        max_model_len=c.engine.max_model_len, kv_cache_gib=c.engine.kv_cache_gib,
        confirm_run_unsafe_code=c.evals.confirm_run_unsafe_code, chunk_size=c.evals.chunk_size, limits={"proxy": c.evals.proxy_limit, "held_out": c.evals.held_out_limit})
    executor = make_executor(c.executor.kind, setup, c.executor.workers, c.executor.address,
                             c.executor.trial_timeout)
    started = time.time()
    previous = _install_sigint(driver, reporter)
    try:
        for line in executor.start():
            reporter.log(line)
        with Heartbeat(driver.storage) as hb:
            driver.heartbeat = hb
            driver.loop(executor, started)
            if driver.latency["tell"]:
                reporter.log(latency_line(driver.latency))
            if getattr(driver, "failed_out", False):
                raise StudyFailedError(
                    f"{MAX_CONSECUTIVE_FAILURES} trials in a row failed; the last error: {driver.last_error}. "
                    "Finished trials are kept; fix the cause and run the study again to resume."
                )
            if driver.interrupts > 1:
                best_number, best_dir = None, None
            else:
                best_number, best_dir = finish(driver, executor, reporter.log)
    finally:
        _restore_sigint(previous)
        executor.close()
    return StudyOutcome(driver.study, driver.baselines, prep.storage_url, study_file.output_dir,
                        best_number, best_dir, driver.interrupts > 0, _counts(driver.study), driver.latency)


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) by linear interpolation between order statistics."""
    xs = sorted(values)
    if not xs:
        return math.nan
    pos = (len(xs) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def latency_line(latency: Mapping[str, Sequence[float]]) -> str:
    """The driver's own time per trial: asking the sampler (and storing the trial) and telling the result."""
    parts = [f"{name} p50 {percentile(xs, 50) * 1e3:.1f} ms, p99 {percentile(xs, 99) * 1e3:.1f} ms"
             for name, xs in latency.items() if xs]
    return f"driver time per trial: {'; '.join(parts)} (over {len(latency.get('tell', ()))} results)"


def _install_sigint(driver: Driver, reporter: _Reporter) -> Any:
    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(_sig: int, _frame: Any) -> None:
        driver.interrupts += 1
        driver.stop_requested = True
        if driver.interrupts == 1:
            reporter.log("interrupted: no new trials; waiting for the running ones, then held-out re-scoring "
                         "(Ctrl-C again to stop the running trials early and skip it)")
        else:
            reporter.log("interrupted again: stopping running trials early")

    return signal.signal(signal.SIGINT, handler)


def _restore_sigint(previous: Any) -> None:
    if previous is not None:
        signal.signal(signal.SIGINT, previous)
