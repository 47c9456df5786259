"""The lm-eval bridge: any lm-eval task as a proxy eval, scored on the in-memory candidate.

Two pieces:

* **An lm-eval ``LM`` backed by an engine** (:func:`make_lm`; the class is ``EngineLM``). It
  answers lm-eval's three request types with the engine protocol only (``loglikelihood``,
  ``generate``), so it works unchanged for any engine, and what lm-eval scores is whatever
  weights the engine holds right now.
* **Task files with an ``lm_eval`` block** (:func:`load_lm_eval_task`, reached through
  :func:`mergesearch.eval.tasks.load_task`)::

      name: addition_mc
      description: ...
      lm_eval:
        task: addition_mc          # an lm-eval task name, or a path to an lm-eval task YAML
        include_path: tasks        # optional: folder(s) of lm-eval task YAMLs, relative to this file
        metric: acc                # the per-doc metric that is the score
        filter: none               # optional: which filter's result (default: the task's only one)
        proxy: 48                  # docs 0..47 of the task's eval split are the proxy split
        held_out: 96               # docs 48..143 are the held-out split (optional)
        num_fewshot: 0             # optional: lm-eval's --num_fewshot

  The task behaves like a :class:`mergesearch.eval.tasks.Task` for the runner: each doc is one
  example, and its score is what lm-eval's own ``process_results`` returns for that doc under
  the chosen metric. Requests are built by lm-eval (``Task.build_all_requests``, few-shot
  sampling seeded as ``simple_evaluate`` seeds it), so a proxy split of ``proxy: N`` scores
  exactly the docs and prompts ``lm_eval --limit N`` scores, and the mean of its per-doc scores
  equals lm-eval's aggregate (for mean-aggregated metrics).

* :func:`run_lm_eval` runs lm-eval's full ``simple_evaluate`` on an engine, for lm-eval's own
  report (aggregates, stderr, groups).

Per-doc scores must lie in [0, 1]. Metrics that lm-eval aggregates with the mean (``acc``,
``acc_norm``, ``exact_match``, ...) are used as they are (a value outside [0, 1] is an error);
the perplexity family is mapped to ``1 / perplexity`` of the doc (``exp(loglikelihood /
count)``, with count the words or bytes for ``word_perplexity``, ``byte_perplexity`` and
``bits_per_byte``, and 1 for ``perplexity``), whose mean is not lm-eval's corpus-level
aggregate; metrics aggregated over the whole corpus (``f1``, ``mcc``, ``bleu``, ...) are
refused.

Notes: lm-eval task YAMLs may run Python (``!function``, ``process_results``) when loaded or
scored; reference only tasks you trust. Tasks marked ``unsafe_code`` execute model-written code
and are refused unless the study file sets ``evals: {confirm_run_unsafe_code: true}`` (or
``mergesearch eval`` gets ``--confirm-run-unsafe-code``). Decoding is greedy:
a task that asks for sampling is refused. Relative ``data_files`` in a task YAML are resolved
against the YAML's folder when such a file exists there (lm-eval itself resolves them against
the current folder). Chat templates and system instructions are not applied.

lm-eval is imported only when a bridge task is loaded or an ``EngineLM`` is made.
"""

from __future__ import annotations

import copy
import difflib
import functools
import logging
import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from mergesearch.errors import ConfigError, MergeSearchError, format_validation, suggest

__all__ = [
    "LmEvalSettings",
    "LmEvalTaskSpec",
    "LmEvalTask",
    "LmEvalScorer",
    "load_lm_eval_task",
    "make_lm",
    "run_lm_eval",
    "PERPLEXITY_METRICS",
]

log = logging.getLogger(__name__)


#: Metrics mapped to ``exp(loglikelihood / count)`` = 1 / the doc's perplexity, in (0, 1].
PERPLEXITY_METRICS = ("perplexity", "word_perplexity", "byte_perplexity", "bits_per_byte")

#: lm-eval's default ``max_gen_toks`` when a generate_until request does not set one.
DEFAULT_MAX_GEN_TOKS = 256

#: The few-shot seed ``lm_eval.simple_evaluate`` uses by default (``fewshot_random_seed``).
FEWSHOT_SEED = 1234

_MEAN_AGGREGATIONS = ("mean", "nanmean")
_YAML_SUFFIXES = (".yaml", ".yml")


# ---------------------------------------------------------------------------------------------
# The task file
# ---------------------------------------------------------------------------------------------


class LmEvalSettings(BaseModel):
    """The ``lm_eval`` block of a task file."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    task: str = Field(min_length=1)
    include_path: Union[str, list[str], None] = None
    metric: str = Field(min_length=1)
    filter: Optional[str] = None
    proxy: int = Field(ge=1)
    held_out: Optional[int] = Field(None, ge=1)
    num_fewshot: Optional[int] = Field(None, ge=0, le=64)

    @field_validator("task", "metric")
    @classmethod
    def _strip(cls, value: str) -> str:
        if value != value.strip():
            raise ValueError(f"{value!r} has leading or trailing spaces; remove them")
        return value

    def include_paths(self) -> list[str]:
        if self.include_path is None:
            return []
        return [self.include_path] if isinstance(self.include_path, str) else list(self.include_path)


class LmEvalTaskSpec(BaseModel):
    """A task file whose examples and scores come from an lm-eval task."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    description: str = ""
    lm_eval: LmEvalSettings

    @field_validator("name")
    @classmethod
    def _check_name(cls, name: str) -> str:
        from mergesearch.eval.tasks import check_task_name

        return check_task_name(name)


def _parse_spec(raw: Any, source: str) -> LmEvalTaskSpec:
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: a task file must be a YAML mapping with name and lm_eval.")
    unknown_keys = sorted(set(raw) - set(LmEvalTaskSpec.model_fields))
    if unknown_keys:
        raise ConfigError(
            f"{source}: unknown key {unknown_keys[0]!r}; a task file with an `lm_eval` block takes only "
            f"name, description and lm_eval (lm-eval builds the prompts and scores)."
            f"{suggest(unknown_keys[0], LmEvalTaskSpec.model_fields)}"
        )
    if "name" not in raw:
        raise ConfigError(f"{source}: missing required field 'name'.")
    block = raw.get("lm_eval")
    if not isinstance(block, dict):
        raise ConfigError(
            f"{source}: `lm_eval` must be a mapping with at least task, metric and proxy, got "
            f"{type(block).__name__}."
        )
    bad = sorted(set(block) - set(LmEvalSettings.model_fields))
    if bad:
        raise ConfigError(
            f"{source}: unknown key {bad[0]!r} in the lm_eval block.{suggest(bad[0], LmEvalSettings.model_fields)}"
        )
    missing = [k for k in ("task", "metric", "proxy") if k not in block]
    if missing:
        raise ConfigError(
            f"{source}: the lm_eval block has no {missing[0]!r}; it needs task (an lm-eval task name "
            "or YAML path), metric (the per-doc score, e.g. acc) and proxy (how many docs)."
        )
    try:
        return LmEvalTaskSpec.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(f"{source}: {format_validation(err)}") from None


# ---------------------------------------------------------------------------------------------
# Finding and building lm-eval tasks
# ---------------------------------------------------------------------------------------------


def _import_lm_eval() -> None:
    try:
        import lm_eval  # noqa: F401
    except ImportError as err:  # pragma: no cover - lm-eval is a dependency
        raise ConfigError(f"The lm-eval bridge needs the lm-eval package ({err}); pip install lm-eval.") from None


def _manager(include_paths: tuple[str, ...]) -> Any:
    """An lm-eval TaskManager over the include paths only (cheap: no built-in tasks)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_defaults=False, include_path=list(include_paths) or None)


@functools.lru_cache(maxsize=1)
def _builtin_manager() -> Any:
    """lm-eval's TaskManager over its built-in tasks (some 15k names; seconds to index, so once)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_defaults=True)


def _looks_like_path(ref: str) -> bool:
    return ref.endswith(_YAML_SUFFIXES) or "/" in ref or "\\" in ref


def _beside(base_dir: Path, ref: str) -> Path:
    """``ref`` (``~`` expanded) as is when absolute, else relative to the task file's folder."""
    path = Path(ref).expanduser()
    return path if path.is_absolute() else base_dir / path


def _check_include_paths(paths: Sequence[str], base_dir: Path, source: str) -> tuple[str, ...]:
    out = []
    for p in paths:
        path = _beside(base_dir, p)
        if not path.is_dir():
            raise ConfigError(
                f"{source}: include_path {p!r} is not a folder ({path} does not exist); it must be a "
                "folder of lm-eval task YAMLs, relative to the task file."
            )
        out.append(str(path.resolve()))
    return tuple(out)


def _find_entry(ref: str, include_paths: tuple[str, ...], base_dir: Path, source: str) -> tuple[Any, Any]:
    """lm-eval's index entry for a task name or YAML path, and the TaskManager that knows it;
    a ConfigError naming near names if there is none."""
    from lm_eval.tasks._index import TaskIndex

    if _looks_like_path(ref):
        path = _beside(base_dir, ref)
        if not path.is_file():
            raise ConfigError(
                f"{source}: lm-eval task file {ref!r} does not exist ({path}); give a path relative "
                "to the task file, or an lm-eval task name."
            )
        try:
            entry = TaskIndex.entry_from_path(path)
        except Exception as err:  # noqa: BLE001 - a user's YAML; lm-eval raises anything
            raise ConfigError(f"{source}: lm-eval cannot read task YAML {str(path)!r}: {err}") from None
        if entry is None:
            raise ConfigError(
                f"{source}: {str(path)!r} is not an lm-eval task YAML (it has no `task:` or `group:` key)."
            )
        return entry, _manager(include_paths)
    manager = _manager(include_paths)
    local = manager.task_index
    if ref in local:
        return local[ref], manager
    builtin = _builtin_manager().task_index
    if ref in builtin:
        return builtin[ref], _builtin_manager()
    close = difflib.get_close_matches(ref, [*local, *builtin], n=5, cutoff=0.6)
    if close:
        hint = f" Near names: {', '.join(close)}."
    elif local:
        hint = f" The include_path has: {', '.join(sorted(local)[:20])}."
    else:
        hint = " List lm-eval's tasks with `lm-eval ls tasks`."
    where = f" in {', '.join(include_paths)} or" if include_paths else ""
    raise ConfigError(
        f"{source}: no lm-eval task named {ref!r}{where} among lm-eval's built-in tasks.{hint} A task of "
        "your own goes in a YAML file: give its path, or its folder as include_path."
    )


def _kind(entry: Any) -> str:
    return entry.kind.name  # TASK, PY_TASK, GROUP, TAG


def _resolve_data_files(cfg: dict[str, Any], yaml_dir: Path) -> None:
    """Make relative ``dataset_kwargs.data_files`` absolute when they exist beside the YAML."""
    kwargs = cfg.get("dataset_kwargs")
    if not isinstance(kwargs, dict) or "data_files" not in kwargs:
        return

    def fix(value: Any) -> Any:
        if isinstance(value, str):
            p = Path(value).expanduser()
            if not p.is_absolute() and (yaml_dir / p).exists():
                return str((yaml_dir / p).resolve())
            return value
        if isinstance(value, list):
            return [fix(v) for v in value]
        if isinstance(value, dict):
            return {k: fix(v) for k, v in value.items()}
        return value

    cfg["dataset_kwargs"] = {**kwargs, "data_files": fix(kwargs["data_files"])}


_CONFIRM_IN_FILE = ("setting `evals: {confirm_run_unsafe_code: true}` in the study file (or "
                    "`mergesearch eval --confirm-run-unsafe-code`)")
_CONFIRM_IN_CALL = "passing confirm_run_unsafe_code=True"


def _unsafe_error(name: str, source: str, how: str = _CONFIRM_IN_FILE) -> ConfigError:
    return ConfigError(
        f"{source}: lm-eval task {name!r} is marked unsafe_code: scoring it executes code the model "
        f"wrote. Run it only on a sandboxed machine, and confirm it by {how}."
    )


def _build_leaf_task(entry: Any, source: str, confirm_unsafe: bool, how: str = _CONFIRM_IN_FILE) -> Any:
    """Build one lm-eval task object (loads its dataset); groups and tags are refused."""
    from lm_eval.tasks import TaskManager
    from lm_eval.tasks._yaml_loader import load_yaml

    kind = _kind(entry)
    if kind in ("GROUP", "TAG"):
        raise ConfigError(
            f"{source}: {entry.name!r} is an lm-eval {kind.lower()} of several tasks; a proxy task is one "
            "lm-eval task with one metric. Write one task file per subtask (or use run_lm_eval for "
            "the group's report)."
        )
    if entry.yaml_path is not None:
        try:
            cfg = load_yaml(entry.yaml_path, resolve_func=True)
        except Exception as err:  # noqa: BLE001 - a user's YAML and its !function imports
            raise ConfigError(f"{source}: lm-eval cannot load task YAML {str(entry.yaml_path)!r}: {err}") from None
        for key in ("group", "tag", "task_list"):
            cfg.pop(key, None)
        cfg.setdefault("task", entry.name)
        _resolve_data_files(cfg, Path(entry.yaml_path).parent)
    else:
        cfg = copy.deepcopy(entry.cfg or {})
    if cfg.get("unsafe_code") and not confirm_unsafe:
        raise _unsafe_error(entry.name, source, how)
    try:
        loaded = TaskManager(include_defaults=False).load(cfg)
    except MergeSearchError:
        raise
    except Exception as err:  # noqa: BLE001 - dataset download, templates, user code
        raise ConfigError(
            f"{source}: lm-eval cannot build task {entry.name!r}: {type(err).__name__}: {err}. (Hub "
            "datasets need the network; for local data use `dataset_path: json` with "
            "`dataset_kwargs: {data_files: {test: FILE.jsonl}}`.)"
        ) from None
    tasks = list(loaded["tasks"].values())
    if len(tasks) != 1:
        raise ConfigError(f"{source}: {entry.name!r} builds {len(tasks)} lm-eval tasks; a proxy task needs one.")
    task = tasks[0]
    if getattr(task, "UNSAFE_CODE", False) and not confirm_unsafe:
        raise _unsafe_error(entry.name, source, how)
    return task


def _wants_sampling(gen_kwargs: Mapping[str, Any]) -> bool:
    """True when generation kwargs ask for sampling (``do_sample: false`` always means greedy)."""
    do_sample = gen_kwargs.get("do_sample")
    if do_sample is not None:
        return bool(do_sample)
    try:
        return float(gen_kwargs.get("temperature") or 0.0) > 0.0
    except (TypeError, ValueError):
        return True


def _aggregation_name(fn: Any) -> str:
    from lm_eval.api.registry import AGGREGATION_REGISTRY

    for name, registered in AGGREGATION_REGISTRY.items():
        if registered is fn:
            return name
    return getattr(fn, "__name__", repr(fn))


def _check_metric(task: Any, metric: str, filter_name: Optional[str], source: str) -> tuple[str, str]:
    """Validate ``metric`` (and ``filter``; ``metric,filter`` is accepted too) against the task."""
    if "," in metric:
        metric, _, from_metric = metric.partition(",")
        if filter_name is not None and filter_name != from_metric:
            raise ConfigError(
                f"{source}: metric {metric + ',' + from_metric!r} names filter {from_metric!r} but filter "
                f"is {filter_name!r}; give the filter once."
            )
        filter_name = from_metric
    aggregations = dict(task.aggregation())
    higher = dict(task.higher_is_better())
    if metric not in aggregations:
        have = ", ".join(sorted(aggregations)) or "none"
        raise ConfigError(
            f"{source}: lm-eval task {task.config.task!r} does not report metric {metric!r}."
            f"{suggest(metric, aggregations) if aggregations else ''} It reports: {have}."
        )
    filters = [f.name for f in getattr(task, "_filters", ())]
    if not filters:
        raise ConfigError(f"{source}: lm-eval task {task.config.task!r} has no filter pipeline, so lm-eval reports no metrics for it.")
    if filter_name is None:
        if len(filters) > 1:
            raise ConfigError(
                f"{source}: lm-eval task {task.config.task!r} reports each metric under {len(filters)} filters "
                f"({', '.join(filters)}); choose one with `filter:` in the lm_eval block."
            )
        filter_name = filters[0]
    elif filter_name not in filters:
        raise ConfigError(
            f"{source}: lm-eval task {task.config.task!r} has no filter {filter_name!r}.{suggest(filter_name, filters)}"
        )
    if metric in PERPLEXITY_METRICS:
        return metric, filter_name
    agg = _aggregation_name(aggregations[metric])
    usable = sorted(
        m for m, fn in aggregations.items()
        if m in PERPLEXITY_METRICS or (_aggregation_name(fn) in _MEAN_AGGREGATIONS and higher.get(m, True))
    )
    if agg not in _MEAN_AGGREGATIONS:
        raise ConfigError(
            f"{source}: metric {metric!r} of lm-eval task {task.config.task!r} is aggregated over all docs "
            f"({agg}), not as a mean of per-doc scores, so it gives no per-doc score in [0, 1]. Use "
            f"{', '.join(usable) or 'a mean-aggregated metric'} as the proxy score (run_lm_eval gives the "
            "corpus-level report)."
        )
    if higher.get(metric) is False:
        raise ConfigError(
            f"{source}: metric {metric!r} of lm-eval task {task.config.task!r} is lower-is-better; a proxy "
            f"score must be higher-is-better in [0, 1]. Use {', '.join(usable) or 'another metric'}."
        )
    return metric, filter_name


def _doc_score(metric: str, value: Any, where: str) -> float:
    """The [0, 1] score of one doc from its lm-eval per-doc metric value."""
    if metric in PERPLEXITY_METRICS:
        if metric == "perplexity":
            ll, count = value, 1
        else:
            try:
                ll, count = value
            except (TypeError, ValueError):
                raise ConfigError(
                    f"{where}: metric {metric!r} gave {value!r}, not lm-eval's (loglikelihood, count) pair."
                ) from None
        try:
            ll, count = float(ll), float(count)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: metric {metric!r} gave {value!r}, not a number.") from None
        if math.isnan(ll):
            return math.nan  # a broken candidate (NaN log-probabilities); the worker reports it
        if count <= 0:
            return 1.0  # an empty doc: nothing to predict
        return math.exp(min(ll / count, 0.0))
    if isinstance(value, bool):
        return float(value)
    try:
        score = float(value)
    except (TypeError, ValueError):
        raise ConfigError(
            f"{where}: metric {metric!r} gave {value!r} for this doc, not a number; choose a metric with a "
            "per-doc score in [0, 1] (acc, acc_norm, exact_match, ...)."
        ) from None
    if math.isnan(score):
        return math.nan  # a broken candidate (NaN log-probabilities); the worker reports it
    if not 0.0 <= score <= 1.0:
        raise ConfigError(
            f"{where}: metric {metric!r} gave {score!r} for this doc, outside [0, 1]; a proxy score must lie "
            "in [0, 1]. Choose another metric (acc, acc_norm, exact_match, ...)."
        )
    return score


# ---------------------------------------------------------------------------------------------
# The task object the runner sees
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LmEvalExample:
    """One lm-eval doc as an example: ``index`` is lm-eval's doc id, ``prompt`` its context."""

    split: str
    index: int
    where: str
    data: Mapping[str, Any]
    prompt: str
    target: Optional[str]
    query: str


class LmEvalScorer:
    """Scores docs with lm-eval's own requests, filters and ``process_results``."""

    name = "lm_eval"

    def __init__(self, task: Any, metric: str, filter_name: str, requests: Mapping[int, Sequence[Any]],
                 source: str) -> None:
        self.task = task
        self.metric = metric
        self.filter = filter_name
        self.requests = requests
        self.source = source
        self.needs = task.OUTPUT_TYPE

    def score(self, engine: Any, examples: Sequence[Any]) -> list[Any]:
        from mergesearch.eval.scorers import ExampleScore

        if not examples:
            return []
        lm = make_lm(engine)
        per_doc: dict[int, list[Any]] = {}
        by_type: dict[str, list[Any]] = defaultdict(list)
        for ex in examples:
            fresh = [_fresh(inst) for inst in self.requests[ex.index]]
            per_doc[ex.index] = fresh
            for inst in fresh:
                by_type[inst.request_type].append(inst)
        for reqtype, insts in by_type.items():
            answers = getattr(lm, reqtype)(insts)
            for inst, answer in zip(insts, answers):
                # Greedy decoding: every repeat would give the same answer.
                inst.resps.extend([answer] * max(int(inst.repeats or 1), 1))
        flat = [inst for ex in examples for inst in per_doc[ex.index]]
        for ensemble in self.task._filters:
            if ensemble.name == self.filter:
                ensemble.apply(flat)
        out = []
        for ex in examples:
            insts = per_doc[ex.index]
            try:
                metrics = self.task.process_results(ex.data, [inst.filtered_resps[self.filter] for inst in insts])
            except MergeSearchError:
                raise
            except Exception as err:  # noqa: BLE001 - lm-eval's and the task's own code
                raise ConfigError(
                    f"{ex.where}: lm-eval's process_results failed: {type(err).__name__}: {err}"
                ) from None
            if self.metric not in metrics:
                raise ConfigError(
                    f"{ex.where}: lm-eval reported {', '.join(sorted(metrics)) or 'no metrics'} for this doc, "
                    f"not {self.metric!r}; set `metric:` in {self.source} to one of them."
                )
            value = metrics[self.metric]
            score = _doc_score(self.metric, value, ex.where)
            response = None
            if self.needs == "generate_until":
                first = insts[0].resps[0] if insts and insts[0].resps else None
                response = first if isinstance(first, str) else None
            detail = f"{self.metric}={_short(value)}"
            out.append(ExampleScore(score, detail, response))
        return out


def _fresh(inst: Any) -> Any:
    """A copy of a built request without answers (requests are reused for every candidate)."""
    new = copy.copy(inst)
    new.resps = []
    new.filtered_resps = {}
    return new


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, tuple):
        return "(" + ", ".join(_short(v) for v in value) + ")"
    return repr(value) if isinstance(value, str) else str(value)


@dataclass(frozen=True)
class LmEvalTask:
    """A loaded lm-eval-backed task; the runner uses ``name``, ``examples`` and ``scorer``."""

    spec: LmEvalTaskSpec
    path: Optional[Path]
    splits: Mapping[str, tuple[LmEvalExample, ...]]
    scorer: LmEvalScorer = field(repr=False)
    lm_eval_task: Any = field(repr=False, default=None)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def metric(self) -> str:
        return self.scorer.metric

    def examples(self, split: str = "proxy") -> tuple[LmEvalExample, ...]:
        from mergesearch.eval.tasks import split_examples

        fix = (f"add `{split}: N` (a number of docs after the proxy docs) to the lm_eval block of "
               f"{self.path or 'the task file'}")
        return split_examples(self.splits, split, self.name, fix)


def _target_text(task: Any, doc: Any) -> Any:
    """The doc's reference answer as text (a multiple-choice gold index becomes its choice)."""
    try:
        target = task.doc_to_target(doc)
        if task.OUTPUT_TYPE == "multiple_choice" and isinstance(target, int) and not task.multiple_input:
            choices = task.doc_to_choice(doc)
            if 0 <= target < len(choices):
                return choices[target]
    except Exception:  # noqa: BLE001 - only for display; lm-eval scores with its own
        return None
    return target


def load_lm_eval_task(raw: Any, path: Optional[Path] = None, source: Optional[str] = None,
                      confirm_run_unsafe_code: bool = False) -> LmEvalTask:
    """Validate a task mapping with an ``lm_eval`` block and build its lm-eval task and examples.

    Tasks marked ``unsafe_code`` are refused unless ``confirm_run_unsafe_code`` (the study's
    ``evals.confirm_run_unsafe_code``).
    """
    source = source or (str(path) if path is not None else "task")
    spec = _parse_spec(raw, source)
    s = spec.lm_eval
    base_dir = path.parent if path is not None else Path.cwd()
    include_paths = _check_include_paths(s.include_paths(), base_dir, source)
    _import_lm_eval()
    entry, _ = _find_entry(s.task, include_paths, base_dir, source)
    task = _build_leaf_task(entry, source, confirm_run_unsafe_code)
    name = task.config.task
    metric, filter_name = _check_metric(task, s.metric, s.filter, source)
    if task.OUTPUT_TYPE == "generate_until" and _wants_sampling(task.config.generation_kwargs or {}):
        raise ConfigError(
            f"{source}: lm-eval task {name!r} samples (generation_kwargs {task.config.generation_kwargs}); "
            "mergesearch decodes greedily. Set `do_sample: false` (and temperature 0) in the task's "
            "generation_kwargs."
        )
    # As lm_eval.simple_evaluate does: num_fewshot overrides the YAML's, which defaults to 0 ...
    default_shots = task.get_config("num_fewshot")
    if s.num_fewshot is not None and s.num_fewshot != default_shots:
        if default_shots == 0:  # ... except that lm-eval never overrides a YAML's explicit 0.
            raise ConfigError(
                f"{source}: lm-eval task {name!r} pins num_fewshot: 0 in its YAML, which lm-eval never "
                f"overrides; remove num_fewshot: {s.num_fewshot} from the lm_eval block (or edit the YAML)."
            )
        task.set_config(key="num_fewshot", value=s.num_fewshot)
    elif default_shots is None:
        task.set_config(key="num_fewshot", value=0)
    task.set_fewshot_seed(seed=FEWSHOT_SEED)

    sizes = {"proxy": s.proxy, **({"held_out": s.held_out} if s.held_out else {})}
    wanted = sum(sizes.values())
    have = len(task.eval_docs)
    if have < wanted:
        held = f" + held_out {s.held_out}" if s.held_out else ""
        raise ConfigError(
            f"{source}: lm-eval task {name!r} has {have} docs in its eval split, fewer than proxy "
            f"{s.proxy}{held} = {wanted}; lower them."
        )
    try:
        task.build_all_requests(limit=wanted)
    except Exception as err:  # noqa: BLE001 - templates and user code of the task
        raise ConfigError(
            f"{source}: lm-eval cannot build the requests of task {name!r}: {type(err).__name__}: {err}"
        ) from None
    requests: dict[int, list[Any]] = defaultdict(list)
    docs: dict[int, Any] = {}
    for inst in task.instances:
        requests[inst.doc_id].append(inst)
        docs[inst.doc_id] = inst.doc
    for insts in requests.values():
        insts.sort(key=lambda i: i.idx)
    splits: dict[str, tuple[LmEvalExample, ...]] = {}
    start = 0
    for split, n in sizes.items():
        examples = []
        for doc_id in range(start, start + n):
            if doc_id not in requests:
                raise ConfigError(f"{source}: lm-eval built no request for doc {doc_id} of task {name!r}.")
            first = requests[doc_id][0]
            context = first.args[0] if first.args and isinstance(first.args[0], str) else str(first.args)
            target = _target_text(task, docs[doc_id])
            examples.append(
                LmEvalExample(
                    split=split,
                    index=doc_id,
                    where=f"{source}: lm-eval task {name!r} doc {doc_id}",
                    data=docs[doc_id],
                    prompt=context,
                    target=None if target is None else str(target),
                    query=context,
                )
            )
        splits[split] = tuple(examples)
        start += n
    scorer = LmEvalScorer(task, metric, filter_name, dict(requests), source)
    return LmEvalTask(spec=spec, path=path, splits=splits, scorer=scorer, lm_eval_task=task)


# ---------------------------------------------------------------------------------------------
# The lm-eval LM backed by an engine
# ---------------------------------------------------------------------------------------------


def _args(request: Any) -> tuple:
    """A request's arguments: an lm-eval ``Instance`` or a plain tuple."""
    args = getattr(request, "args", request)
    return args if isinstance(args, tuple) else (args,)


def _stops(until: Any) -> tuple[str, ...]:
    if until is None:
        return ()
    if isinstance(until, str):
        until = [until]
    if not isinstance(until, (list, tuple)) or not all(isinstance(u, str) for u in until):
        raise ConfigError(f"generate_until: `until` must be a string or a list of strings, got {until!r}.")
    return tuple(u for u in until if u)


def _max_new_tokens(kwargs: Mapping[str, Any]) -> int:
    for key in ("max_gen_toks", "max_new_tokens", "max_tokens", "max_completion_tokens"):
        value = kwargs.get(key)
        if value is not None:
            try:
                n = int(value)
            except (TypeError, ValueError):
                n = 0
            if n < 1:
                raise ConfigError(f"generate_until: {key} must be a positive number of tokens, got {value!r}.")
            return n
    return DEFAULT_MAX_GEN_TOKS


@functools.lru_cache(maxsize=1)
def _lm_class() -> type:
    from lm_eval.api.model import LM

    class EngineLM(LM):
        """An lm-eval ``LM`` answered by a mergesearch engine (protocol methods only).

        ``loglikelihood`` is the engine's; ``generate_until`` is greedy, ``until`` -> stop
        strings and ``max_gen_toks`` -> ``max_new_tokens`` (lm-eval's default 256), and a request
        that asks for sampling is refused; ``loglikelihood_rolling`` is ``loglikelihood("",
        text)`` (the engine conditions an empty context on its prefix token, as lm-eval does),
        cut into lm-eval's rolling windows when the engine has a ``tokenizer`` and a
        ``max_length`` the text exceeds.
        """

        def __init__(self, engine: Any) -> None:
            super().__init__()
            self.engine = engine

        @property
        def tokenizer(self) -> Any:
            return getattr(self.engine, "tokenizer", None)

        @property
        def max_length(self) -> Optional[int]:
            return getattr(self.engine, "max_length", None)

        def get_model_info(self) -> dict[str, Any]:
            return {"engine": type(self.engine).__name__, "model_dir": str(getattr(self.engine, "model_dir", ""))}

        def loglikelihood(self, requests: Sequence[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
            pairs = []
            for req in requests:
                args = _args(req)
                if len(args) < 2 or not isinstance(args[0], str) or not isinstance(args[1], str):
                    raise ConfigError(f"loglikelihood: expected (context, continuation) strings, got {args!r}.")
                pairs.append((args[0], args[1]))
            results = self.engine.loglikelihood(pairs) if pairs else []
            out = [(float(r.logprob), bool(r.is_greedy)) for r in results]
            for pair, answer in zip(pairs, out):
                self.cache_hook.add_partial("loglikelihood", pair, answer)
            return out

        def loglikelihood_rolling(self, requests: Sequence[Any], disable_tqdm: bool = False) -> list[float]:
            pairs: list[tuple[str, str]] = []
            owners: list[int] = []
            texts = []
            for i, req in enumerate(requests):
                text = _args(req)[0]
                if not isinstance(text, str):
                    raise ConfigError(f"loglikelihood_rolling: expected a string, got {text!r}.")
                texts.append(text)
                for window in self._windows(text):
                    pairs.append(window)
                    owners.append(i)
            totals = [0.0] * len(texts)
            for owner, r in zip(owners, self.engine.loglikelihood(pairs) if pairs else []):
                totals[owner] += float(r.logprob)
            for text, total in zip(texts, totals):
                self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
            return totals

        def _windows(self, text: str) -> list[tuple[str, str]]:
            """(context, continuation) texts covering ``text`` as lm-eval's rolling windows do."""
            if not text:
                return []
            tok, max_length = self.tokenizer, self.max_length
            if tok is None or not max_length:
                return [("", text)]
            ids = tok.encode(text, add_special_tokens=False)
            if len(ids) <= max_length:
                return [("", text)]
            from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

            windows = []
            start = 0
            for context, pred in map(
                make_disjoint_window,
                get_rolling_token_windows(token_list=ids, prefix_token=-1, max_seq_len=max_length, context_len=1),
            ):
                if start == 0:
                    windows.append(("", tok.decode(pred)))
                else:
                    windows.append((tok.decode(context), tok.decode(pred)))
                start += len(pred)
            return windows

        def generate_until(self, requests: Sequence[Any], disable_tqdm: bool = False) -> list[str]:
            groups: dict[tuple[tuple[str, ...], int], list[int]] = defaultdict(list)
            contexts = []
            for i, req in enumerate(requests):
                args = _args(req)
                context = args[0]
                kwargs = args[1] if len(args) > 1 and args[1] is not None else {}
                if not isinstance(context, str) or not isinstance(kwargs, Mapping):
                    raise ConfigError(f"generate_until: expected (context, gen_kwargs), got {args!r}.")
                if _wants_sampling(kwargs):
                    raise ConfigError(
                        f"generate_until: the request asks for sampling ({dict(kwargs)}); mergesearch "
                        "engines decode greedily. Set do_sample: false (temperature 0) in the task's "
                        "generation_kwargs."
                    )
                if int(kwargs.get("num_beams", 1) or 1) != 1:
                    raise ConfigError(
                        f"generate_until: num_beams {kwargs['num_beams']} asks for beam search; mergesearch "
                        "engines decode greedily. Remove num_beams from the task's generation_kwargs."
                    )
                contexts.append(context)
                groups[(_stops(kwargs.get("until")), _max_new_tokens(kwargs))].append(i)
            out = [""] * len(contexts)
            for (stop, max_new), idx in groups.items():
                texts = self.engine.generate([contexts[i] for i in idx], max_new_tokens=max_new, stop=stop)
                for i, text in zip(idx, texts):
                    out[i] = text
            for req, text in zip(requests, out):
                self.cache_hook.add_partial("generate_until", _args(req), text)
            return out

    return EngineLM


def make_lm(engine: Any) -> Any:
    """An lm-eval ``LM`` (``EngineLM``) that answers with ``engine``'s current weights."""
    _import_lm_eval()
    return _lm_class()(engine)


def __getattr__(name: str) -> Any:
    if name == "EngineLM":
        _import_lm_eval()
        return _lm_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ---------------------------------------------------------------------------------------------
# lm-eval's own evaluator on an engine
# ---------------------------------------------------------------------------------------------


def run_lm_eval(
    engine: Any,
    tasks: Union[str, Path, Sequence[Union[str, Path]]],
    *,
    limit: Optional[Union[int, float]] = None,
    include_path: Union[str, Path, Sequence[Union[str, Path]], None] = None,
    num_fewshot: Optional[int] = None,
    confirm_run_unsafe_code: bool = False,
    log_samples: bool = False,
    bootstrap_iters: int = 0,
    base_dir: Union[str, Path, None] = None,
    **simple_evaluate_kwargs: Any,
) -> dict[str, Any]:
    """``lm_eval.simple_evaluate`` of the engine's current weights; lm-eval's results dict.

    ``tasks`` are lm-eval task, group or tag names (looked up in ``include_path``, then among
    lm-eval's built-in tasks) or task YAML paths (relative to ``base_dir``, default the current
    folder). ``limit`` is lm-eval's (the first N docs of each task). Tasks marked ``unsafe_code``
    are refused unless ``confirm_run_unsafe_code``. ``bootstrap_iters`` is 0 by default (no
    stderr); lm-eval's own default is 100000. Other keyword arguments go to ``simple_evaluate``.
    """
    import inspect

    _import_lm_eval()
    import lm_eval
    from lm_eval.tasks import TaskManager

    own = set(inspect.signature(run_lm_eval).parameters) - {"engine", "simple_evaluate_kwargs"}
    allowed = set(inspect.signature(lm_eval.simple_evaluate).parameters) - own - {
        "model", "model_args", "task_manager"}
    for key in simple_evaluate_kwargs:
        if key not in allowed:
            raise ConfigError(
                f"run_lm_eval: no option {key!r} (it takes lm_eval.simple_evaluate's).{suggest(key, own | allowed)}"
            )
    options = {"fewshot_random_seed": FEWSHOT_SEED, **simple_evaluate_kwargs}
    refs = [tasks] if isinstance(tasks, (str, Path)) else list(tasks)
    if not refs:
        raise ConfigError("run_lm_eval: no tasks given; name at least one lm-eval task or task YAML.")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, (int, float)) or limit <= 0):
        raise ConfigError(f"run_lm_eval: limit must be a positive number of docs (or a fraction < 1), got {limit!r}.")
    base = Path(base_dir) if base_dir is not None else Path.cwd()
    paths = [] if include_path is None else (
        [include_path] if isinstance(include_path, (str, Path)) else list(include_path)
    )
    includes = _check_include_paths([str(p) for p in paths], base, "run_lm_eval")
    objects: list[Any] = []
    for ref in refs:
        where = f"run_lm_eval task {str(ref)!r}"
        entry, manager = _find_entry(str(ref), includes, base, where)
        kind = _kind(entry)
        if kind not in ("GROUP", "TAG"):
            objects.append(_build_leaf_task(entry, where, confirm_run_unsafe_code, _CONFIRM_IN_CALL))
            continue
        try:
            loaded = manager.load(entry.name if entry.name in manager.task_index else str(entry.yaml_path))
        except Exception as err:  # noqa: BLE001 - datasets, templates, user code
            raise ConfigError(f"{where}: lm-eval cannot build {kind.lower()} {entry.name!r}: {err}") from None
        for task in loaded["tasks"].values():
            if getattr(task, "UNSAFE_CODE", False) and not confirm_run_unsafe_code:
                raise _unsafe_error(task.config.task, where, _CONFIRM_IN_CALL)
        objects.extend([loaded["groups"][entry.name]] if kind == "GROUP" else loaded["tasks"].values())
    results = lm_eval.simple_evaluate(
        model=make_lm(engine),
        tasks=objects,
        limit=limit,
        num_fewshot=num_fewshot,
        confirm_run_unsafe_code=confirm_run_unsafe_code,
        log_samples=log_samples,
        bootstrap_iters=bootstrap_iters,
        task_manager=TaskManager(include_defaults=False),
        **options,
    )
    return dict(results) if results is not None else {}
