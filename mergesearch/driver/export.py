"""`mergesearch export`: a trial of a stored study as mergekit YAML, a checkpoint and a model card.

What is exported is read from the study's Optuna storage only (the schema the driver writes:
docs/studies.md, "Stored per trial"): the trial's merge plan (``plan``, mergekit YAML, written
out exactly as stored), its merge seed, its proxy scores and the held-out scores of the study's
``held_out:N`` attr. The checkpoint is merged again from the sources with that plan and seed
(:func:`mergesearch.merge.executor.run_merge`), so the sources must be at the paths the plan
names, as on the machine that ran the study.

The output folder appears complete or not at all: everything is written into a hidden folder
beside it (:class:`mergesearch.io.writer.AtomicDir`) and renamed into place at the end; with
``force`` an existing folder is replaced only once the new one is complete.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional, Union

import optuna
from optuna.trial import FrozenTrial

from mergesearch.driver.report import (
    BASELINES_SUFFIX,
    Leaderboard,
    Row,
    StorageOpenError,
    leaderboard,
    pareto_front,
)
from mergesearch.driver.storage import mask_url
from mergesearch.errors import CheckpointError, ConfigError, MergeSearchError, OutputError, UnknownNameError, suggest

__all__ = ["MODES", "CONFIG_FILE", "CARD_FILE", "ExportResult", "Exported", "export_study", "open_study",
           "select_trials"]

MODES = ("best", "trial", "pareto")
CONFIG_FILE = "config.yaml"
CARD_FILE = "README.md"
CHECKPOINT_STAGING = ".checkpoint"


# ---------------------------------------------------------------------------------------------
# Finding the study and the trials


@dataclass
class OpenedStudy:
    study: optuna.Study
    storage_url: str
    study_file: Any = None  # the StudyFile when one was given (or could be rebuilt from the storage)

    @property
    def masked_url(self) -> str:
        return mask_url(self.storage_url)


def _main_names(names: Sequence[str]) -> list[str]:
    """Study names without the baselines companions of other studies."""
    return [n for n in names if not (n.endswith(BASELINES_SUFFIX) and n[: -len(BASELINES_SUFFIX)] in names)]


def open_study(study_path: Optional[Union[str, Path]], storage_url: Optional[str],
               name: Optional[str]) -> OpenedStudy:
    """The stored study of a study file (its storage and name), or ``name`` in ``storage_url``."""
    from mergesearch.driver.report import _open

    sf = None
    if study_path is not None:
        if storage_url is not None:
            raise ConfigError("Give a study file or --storage URL [--study NAME], not both.")
        from mergesearch.driver.config import load_study
        from mergesearch.driver.storage import default_storage_url

        sf = load_study(study_path)
        storage_url = sf.config.storage or default_storage_url(sf.output_dir)
        name = name or sf.config.name
    elif storage_url is None:
        raise ConfigError("Give a study file (mergesearch export STUDY.yaml OUT) or "
                          "--storage URL [--study NAME] OUT.")
    storage = _open(storage_url)
    names = [s.study_name for s in storage.get_all_studies()]
    main = _main_names(names)
    where = mask_url(storage_url)
    if not names:
        raise StorageOpenError(f"Storage {where!r} holds no study yet. Run one with `mergesearch run STUDY.yaml`.")
    if name is None:
        if len(main) != 1:
            raise ConfigError(f"Storage {where!r} holds {len(main)} studies: {', '.join(main)}. "
                              "Pick one with --study NAME.")
        name = main[0]
    if name not in names:
        hint = suggest(name, main).strip()
        raise UnknownNameError(f"No study {name!r} in storage {where!r}. Studies there: {', '.join(main)}."
                               + (f" {hint}" if hint.startswith("Did") else ""))
    if name not in main:
        owner = name[: -len(BASELINES_SUFFIX)]
        raise ConfigError(f"Study {name!r} holds the baselines of study {owner!r} (each source alone and the "
                          f"uniform merge), not search trials; export from {owner!r} (--study {owner}).")
    study = optuna.load_study(study_name=name, storage=storage)
    if sf is None:
        sf = _stored_study_file(study)
    return OpenedStudy(study, storage_url, sf)


def _stored_study_file(study: optuna.Study) -> Any:
    """The study file rebuilt from the stored config (to find its task files), or None."""
    from mergesearch.driver.config import parse_study

    meta = study.user_attrs.get("mergesearch") or {}
    config = meta.get("config")
    if not isinstance(config, dict):
        return None
    path = Path(meta["study_file"]) if meta.get("study_file") else None
    try:
        return parse_study(config, "the stored study config", path)
    except MergeSearchError:
        return None


def ranges(numbers: Sequence[int]) -> str:
    """``0-3, 6, 8-9`` for [0, 1, 2, 3, 6, 8, 9]; ``none`` for []."""
    nums = sorted(set(numbers))
    if not nums:
        return "none"
    parts, start, prev = [], nums[0], nums[0]
    for n in nums[1:] + [None]:  # type: ignore[list-item]
        if n is not None and n == prev + 1:
            prev = n
            continue
        parts.append(str(start) if start == prev else f"{start}-{prev}")
        if n is not None:
            start = prev = n
    return ", ".join(parts)


def select_trials(study: optuna.Study, lb: Leaderboard, mode: str, number: Optional[int] = None) -> list[Row]:
    """The rows to export: the best (as `mergesearch status` shows it), trial ``number``, or the
    Pareto front (of the objectives for ``per_task``, else of the per-task proxy scores)."""
    if mode not in MODES:
        raise ConfigError(f"Unknown export mode {mode!r}; use one of {', '.join(MODES)}.")
    complete = {r.number: r for r in lb.rows}
    if mode == "trial":
        if number is None:
            raise ConfigError("--trial needs a trial number.")
        if number in complete:
            return [complete[number]]
        trials = {t.number: t for t in study.get_trials(deepcopy=False)}
        if number not in trials:
            raise ConfigError(
                f"Study {study.study_name!r} has no trial {number}. Its trials: {ranges(list(trials))}; "
                f"complete (exportable): {ranges(list(complete))}.")
        t = trials[number]
        state = t.state.name.lower().replace("fail", "failed")
        why = ("it is a baseline; its merge is in the study's baselines" if t.user_attrs.get("kind") == "baseline"
               else f"it is {state}, not complete, so it has no final scores")
        raise ConfigError(f"Trial {number} of study {study.study_name!r} cannot be exported: {why}. "
                          f"Complete trials: {ranges(list(complete))}.")
    if not complete:
        c = lb.counts
        raise ConfigError(
            f"Study {study.study_name!r} has no complete trial yet ({sum(c.values())} trials: "
            + ", ".join(f"{v} {k}" for k, v in c.items() if v) + "). Run it (mergesearch run STUDY.yaml) "
            "and export once a trial has completed.")
    if mode == "best":
        if lb.best is None:
            raise ConfigError(f"Study {study.study_name!r} has no best trial (no complete trial has a finite "
                              f"score); export one with --trial N (complete: {ranges(list(complete))}).")
        return [lb.best]
    if lb.pareto:
        return [complete[n] for n in lb.pareto if n in complete]
    front = {r.number for r in pareto_front(list(complete.values()), lb.tasks)}
    return [r for r in lb.rows if r.number in front]


# ---------------------------------------------------------------------------------------------
# What goes into the files


def _f(x: Optional[float], nd: int = 4, signed: bool = False) -> str:
    if x is None:
        return "—"
    return f"{x:+.{nd}f}" if signed else f"{x:.{nd}f}"


def config_header(study_name: str, row: Row, lb: Leaderboard, method: str, random: bool,
                  seed: int, calibration: Any = None) -> str:
    """The comment lines above the exported YAML: where it comes from, its scores, how to reproduce it.

    ``calibration`` (the plan's, for mergesearch's importance-weighted methods) replaces the
    mergekit line: mergekit cannot reproduce those merges."""
    label = f" ({row.label})" if row.label else ""
    lines = [
        f"mergesearch export of study {study_name!r}, trial {row.number}{label}: rank {row.rank} of "
        f"{lb.n_complete} complete trials by proxy score",
        f"proxy {_f(row.value)}"
        + (f", held-out {_f(row.held_out_value)} (gap {_f(row.gap, signed=True)})"
           if row.held_out_value is not None else ", held-out not scored"),
        "per task (proxy" + (" / held-out" if row.held_out_scores else "") + "): " + ", ".join(
            f"{t} {_f(row.scores.get(t), 3)}" + (f" / {_f(row.held_out_scores.get(t), 3)}" if row.held_out_scores else "")
            for t in lb.tasks),
        "",
        f"Reproduce with mergekit 0.1.5:  mergekit-yaml {CONFIG_FILE} OUT",
        f"or with mergesearch:            mergesearch merge {CONFIG_FILE} OUT" + (f" --seed {seed}" if random else ""),
        "Model paths are the sources' local paths on the machine that ran the study.",
    ]
    if calibration is not None:
        lines[4:6] = [
            f"MERGEKIT CANNOT REPRODUCE THIS MERGE: {method} is mergesearch's importance-weighted method; each",
            "element's weight comes from calibration statistics of the sources on",
            f"{calibration.data} (content hash {calibration.hash}).",
            "The checkpoint exported beside this file is the authority; reproduce it with mergesearch:",
            f"  mergesearch merge {CONFIG_FILE} OUT   (calibrates again on the same data, or reads the cache)",
        ]
    if random:
        lines += [
            "",
            f"RANDOM METHOD ({method}): mergesearch drew its masks with a counter-based generator (seed {seed});",
            "mergekit draws its masks with torch's RNG, so mergekit-yaml gives another draw, not this model.",
            "The checkpoint exported beside this file is the authority; `mergesearch merge` with",
            f"--seed {seed} reproduces it bit for bit.",
        ]
    return "".join(f"# {line}\n" if line else "#\n" for line in lines)


def _count_lines(path: Path) -> Optional[int]:
    try:
        with open(path, encoding="utf-8") as f:
            return sum(1 for line in f if line.strip())
    except OSError:
        return None


def _find_task_file(ref: str, dirs: Sequence[Path]) -> Optional[Path]:
    p = Path(ref)
    if p.suffix:
        return p if p.is_file() else None
    for d in dirs:
        for ext in (".yaml", ".yml"):
            if (d / f"{ref}{ext}").is_file():
                return d / f"{ref}{ext}"
    return None


def eval_definitions(sf: Any, tasks: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Per task: description, scorer, task file and the examples in each split (best effort: a
    task file that cannot be found or read leaves only the name)."""
    import yaml

    out: dict[str, dict[str, Any]] = {t: {"name": t} for t in tasks}
    if sf is None:
        return out
    try:
        refs, dirs = sf.task_refs(), sf.task_dirs
    except Exception:  # noqa: BLE001 - the card can do without the definitions
        return out
    for ref in refs:
        path = _find_task_file(ref, dirs)
        if path is None:
            continue
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError):
            continue
        if not isinstance(raw, dict) or raw.get("name") not in out:
            continue
        info = out[raw["name"]]
        info.update({"description": str(raw.get("description") or ""), "file": str(path)})
        if isinstance(raw.get("lm_eval"), dict):
            lm = raw["lm_eval"]
            info["scorer"] = f"lm-eval {lm.get('task')} ({lm.get('metric', 'acc')})"
            for split in ("proxy", "held_out"):
                if isinstance(lm.get(split), int):
                    info[f"{split}_total"] = lm[split]
        else:
            scorer = raw.get("scorer")
            info["scorer"] = str(scorer.get("name")) if isinstance(scorer, dict) else ""
            data = raw.get("data") if isinstance(raw.get("data"), dict) else {}
            for split in ("proxy", "held_out"):
                if isinstance(data.get(split), str):
                    n = _count_lines(path.parent / data[split])
                    if n is not None:
                        info[f"{split}_total"] = n
    return out


def _examples_cell(scored: Optional[int], total: Optional[int]) -> str:
    if scored is None and total is None:
        return "—"
    if scored is None:
        return f"— of {total}"
    return f"{scored}" + (f" of {total}" if total is not None else "")


def card_sections(opened: OpenedStudy, lb: Leaderboard, row: Row, trial: FrozenTrial, method: str,
                  random: bool, seed: int, held: Mapping[str, Any],
                  defs: Mapping[str, Mapping[str, Any]]) -> list[tuple[str, str]]:
    """The model card's scores, baselines, eval definitions and search sections."""
    study = opened.study
    meta = study.user_attrs.get("mergesearch") or {}
    config = meta.get("config") if isinstance(meta.get("config"), dict) else {}
    has_held = row.held_out_value is not None
    sections = []

    # Scores
    rows = ["| task | weight | proxy | held-out | gap (proxy − held-out) |", "| --- | ---: | ---: | ---: | ---: |"]
    for t in lb.tasks:
        p, h = row.scores.get(t), row.held_out_scores.get(t)
        gap = p - h if p is not None and h is not None else None
        rows.append(f"| {t} | {lb.weights.get(t, 1.0):g} | {_f(p)} | {_f(h)} | {_f(gap, signed=True)} |")
    objective = "weighted mean" if lb.objective != "per_task" else "weighted mean of the objectives"
    rows.append(f"| **{objective}** | | **{_f(row.value)}** | **{_f(row.held_out_value)}** | "
                f"**{_f(row.gap, signed=True)}** |")
    text = "\n".join(rows) + "\n\n" + (
        "Proxy scores are what the search optimised, so the best of many candidates is flattered by them; "
        "held-out scores come from examples the search never saw."
        if has_held else
        "Held-out: not scored (the study re-scores its top trials on the held-out split when it ends).")
    sections.append(("Scores", text))

    # Baselines
    base = [b for b in lb.baselines if b.state == "complete"]
    if base:
        lines = ["| model | proxy | held-out |", "| --- | ---: | ---: |",
                 f"| **this merge (trial {row.number})** | **{_f(row.value)}** | **{_f(row.held_out_value)}** |"]
        lines += [f"| {b.name} | {_f(b.value)} | {_f(b.held_out_value)} |" for b in base]
        sections.append(("Compared with the sources and the uniform merge", "\n".join(lines)))

    # Evals
    ev = config.get("evals") if isinstance(config.get("evals"), dict) else {}
    held_examples = held.get("examples") if isinstance(held.get("examples"), dict) else {}
    lines = ["| task | description | scorer | proxy examples | held-out examples |",
             "| --- | --- | --- | ---: | ---: |"]
    for t in lb.tasks:
        d = defs.get(t, {})
        h_scored = len(held_examples[t]) if isinstance(held_examples.get(t), list) else None
        lines.append(f"| {t} | {d.get('description') or '—'} | {d.get('scorer') or '—'} | "
                     f"{_examples_cell(row.scored.get(t), d.get('proxy_total'))} | "
                     f"{_examples_cell(h_scored, d.get('held_out_total'))} |")
    limits = []
    if ev.get("proxy_limit"):
        limits.append(f"the first {ev['proxy_limit']} proxy examples")
    if ev.get("held_out_limit"):
        limits.append(f"the first {ev['held_out_limit']} held-out examples")
    files = [f"`{d['file']}`" for d in defs.values() if d.get("file")]
    text = "\n".join(lines) + "\n\n" + (
        "Examples: scored of those in the split. " + (f"The study used only {' and '.join(limits)} of each task. "
                                                       if limits else "")
        + "The proxy split scores every candidate; the held-out split is never seen by the search."
        + (f" Task files: {', '.join(files)}." if files else ""))
    sections.append(("Evals", text))

    # Search
    sampler = config.get("sampler") or {}
    pruner = config.get("pruner") or {}
    budget = config.get("budget") or {}
    c = lb.counts
    items = [
        f"Study: `{study.study_name}` in `{opened.masked_url}`"
        + (f" (study file `{meta['study_file']}`)" if meta.get("study_file") else ""),
        f"Method: `{method}`" + (f", search space `{config['space']}`" if config.get("space") else ""),
        f"Sampler: `{sampler.get('name', '?')}`"
        + (f" with options `{json.dumps(sampler['options'], sort_keys=True)}`" if sampler.get("options") else "")
        + f"; pruner: `{pruner.get('name', 'none')}`"
        + (f"; sampler seed {config['seed']}" if config.get("seed") is not None else ""),
        "Objective: " + ("the weighted mean of the task scores" if lb.objective != "per_task"
                         else "one objective per task (multi-objective)"),
        f"Trials: {c.get('complete', 0)} complete, {c.get('pruned', 0)} pruned, {c.get('failed', 0)} failed"
        + (f" (budget {budget['trials']} search trials)" if budget.get("trials") else "")
        + (f"; baselines: {len(base)}" if base else ""),
        f"This merge: trial {row.number}" + (f" ({row.label})" if row.label else f" ({row.kind})")
        + f", rank {row.rank} of {lb.n_complete} by proxy score, merge seed {seed}"
        + (" (the masks of this random method depend on it)" if random else ""),
    ]
    if trial.params:
        items.append("Genes: " + ", ".join(f"`{k}` {v:.4g}" if isinstance(v, float) else f"`{k}` {v}"
                                            for k, v in sorted(trial.params.items())))
    items.append(f"mergesearch {meta.get('version') or _version()}; exported "
                 f"{datetime.now(timezone.utc).isoformat(timespec='seconds')}")
    sections.append(("How it was found", "\n".join(f"- {i}" for i in items)))
    return sections


def _version() -> str:
    from mergesearch import __version__

    return __version__


# ---------------------------------------------------------------------------------------------
# Writing


@dataclass
class Exported:
    """One exported trial: where, what, and its scores."""

    trial: int
    dir: Path
    files: list[str]
    method: str
    random: bool
    seed: int
    label: str
    kind: str
    rank: Optional[int]
    models: list[str]
    proxy: Optional[float]
    proxy_scores: dict[str, float]
    held_out: Optional[float]
    held_out_scores: dict[str, float]
    gap: Optional[float]
    tensors: int = 0
    bytes_written: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "trial": self.trial, "dir": str(self.dir), "config": str(self.dir / CONFIG_FILE),
            "card": str(self.dir / CARD_FILE), "checkpoint": str(self.dir), "files": self.files,
            "method": self.method, "random": self.random, "seed": self.seed, "label": self.label,
            "kind": self.kind, "rank": self.rank, "models": self.models,
            "proxy": {"value": self.proxy, "scores": self.proxy_scores},
            "held_out": ({"value": self.held_out, "scores": self.held_out_scores}
                         if self.held_out is not None else None),
            "gap": self.gap, "tensors": self.tensors, "bytes": self.bytes_written,
        }


@dataclass
class ExportResult:
    study: str
    storage: str  # masked
    mode: str
    out_dir: Path
    exports: list[Exported] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        from mergesearch.driver.report import _clean

        return _clean({"study": self.study, "storage": self.storage, "mode": self.mode,
                       "out": str(self.out_dir), "trials": [e.trial for e in self.exports],
                       "exports": [e.to_json() for e in self.exports]})


def _check_replace(out: Path, protected: Sequence[tuple[str, Path]]) -> None:
    """Refuse to replace (--force) a folder that holds a source, the storage or the study file."""
    if not out.exists():
        return
    out = out.resolve()  # OUT given as SRC/../x, or through a symlink, must not slip past the check
    for what, p in protected:
        try:
            rp = p.resolve()
        except OSError:
            continue
        if rp == out or out in rp.parents:
            raise OutputError(f"{out} holds {what} {p}; --force would delete it. Choose another output folder.")


def _protected(opened: OpenedStudy, plans: Sequence[Any]) -> list[tuple[str, Path]]:
    out: list[tuple[str, Path]] = []
    for plan in plans:
        out += [("the source", Path(m)) for m in plan.referenced_models()]
    url = opened.storage_url
    if url.startswith("sqlite:///"):
        out.append(("the study storage", Path(url[len("sqlite:///"):])))
    if opened.study_file is not None and getattr(opened.study_file, "path", None):
        out.append(("the study file", Path(opened.study_file.path)))
    return out


def _plan_of(t: FrozenTrial) -> tuple[str, Any]:
    from mergesearch.plan import loads_plan

    text = t.user_attrs.get("plan")
    if not isinstance(text, str) or not text.strip():
        raise ConfigError(f"Trial {t.number} stored no merge plan (its `plan` user attr is missing); "
                          "only trials run by mergesearch can be exported.")
    return text, loads_plan(text, f"the plan of trial {t.number}")


def _check_sources(number: int, plan: Any, base_dir: Optional[Path]) -> None:
    missing = []
    for m in plan.referenced_models():
        p = Path(m)
        if not p.is_absolute() and base_dir is not None:
            p = base_dir / p
        if not p.is_dir():
            missing.append(m)
    if missing:
        raise CheckpointError(
            f"Trial {number} merges {', '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} not on this "
            "machine. The exported checkpoint is merged again from the sources: export where the study ran, or "
            "put the sources at the same paths.")


def export_study(
    opened: OpenedStudy,
    out_dir: Union[str, Path],
    *,
    mode: str = "best",
    trial: Optional[int] = None,
    force: bool = False,
    device: str = "cpu",
    max_shard_size: Union[int, str] = "5GB",
    log: Optional[Callable[[str], None]] = None,
) -> ExportResult:
    """Export the selected trial(s) of ``opened`` into ``out_dir`` (atomically; see the module doc).

    One trial: ``out_dir`` is a Hugging Face model folder (config.json, safetensors shards,
    tokenizer, README.md) with the mergekit YAML as config.yaml (and mergekit_config.yml, the
    name mergekit itself uses). ``pareto``: one such folder per trial, ``out_dir/trial-N``, and
    an index README.md.
    """
    from mergesearch.io.card import model_card
    from mergesearch.io.writer import AtomicDir
    from mergesearch.merge import executor
    from mergesearch.merge.registry import get_method

    log = log or (lambda _m: None)
    study = opened.study
    out = Path(os.path.abspath(out_dir))  # `x/missing/../y` is `x/y`, so the checks below see it
    if out.exists() and not force:
        raise OutputError(f"Output folder {out} already exists; choose another path or pass --force to replace "
                          "it (the old one stays until the new one is complete).")
    lb = leaderboard(study)
    rows = select_trials(study, lb, mode, trial)
    by_number = {t.number: t for t in study.get_trials(deepcopy=False)}
    base_dir = getattr(opened.study_file, "root", None)
    plans = {}
    for r in rows:
        text, plan = _plan_of(by_number[r.number])
        _check_sources(r.number, plan, base_dir)
        plans[r.number] = (text, plan)
    _check_replace(out, _protected(opened, [p for _t, p in plans.values()]))
    defs = eval_definitions(opened.study_file, lb.tasks)
    result = ExportResult(study.study_name, opened.masked_url, mode, out)
    single = mode != "pareto"
    with AtomicDir(out, force=force) as target:
        for r in rows:
            t = by_number[r.number]
            text, plan = plans[r.number]
            spec = get_method(plan.merge_method)
            seed = int(t.user_attrs.get("seed", 0) or 0)
            rel = "" if single else f"trial-{r.number}"
            yaml_text = config_header(study.study_name, r, lb, spec.name, spec.random, seed,
                                      None if spec.mergekit else plan.calibration) + text
            log(f"merging trial {r.number} ({spec.name}, {len(plan.referenced_models())} models)"
                + (f" into {rel}/" if rel else ""))
            dest = target.tmp / (CHECKPOINT_STAGING if single else rel)
            report = executor.run_merge(plan, dest, base_dir=base_dir, device=device, seed=seed,
                                        max_shard_size=max_shard_size, config_yaml=yaml_text)
            if single:
                for child in sorted(dest.iterdir()):
                    os.rename(child, target.tmp / child.name)
                dest.rmdir()
            held = study.user_attrs.get(f"held_out:{r.number}") or {}
            notes = list(report.notes)
            notes.append("The `base_model` entries are the sources' local paths on the machine that ran the "
                         "study; replace them with Hub ids before uploading this card.")
            card = model_card(
                f"{study.study_name}, trial {r.number}", plan.referenced_models(), spec.name, yaml_text,
                notes=notes,
                sections=card_sections(opened, lb, r, t, spec.name, spec.random, seed, held, defs))
            prefix = f"{rel}/" if rel else ""
            target.write_text(prefix + CONFIG_FILE, yaml_text)
            target.write_text(prefix + CARD_FILE, card)
            where = target.tmp / rel if rel else target.tmp
            result.exports.append(Exported(
                trial=r.number, dir=out / rel if rel else out,
                files=sorted(p.relative_to(where).as_posix() for p in where.rglob("*") if p.is_file()),
                method=spec.name, random=spec.random, seed=seed, label=r.label, kind=r.kind, rank=r.rank,
                models=list(plan.referenced_models()), proxy=r.value, proxy_scores=dict(r.scores),
                held_out=r.held_out_value, held_out_scores=dict(r.held_out_scores), gap=r.gap,
                tensors=report.tensors, bytes_written=report.bytes_written))
        if not single:
            target.write_text(CARD_FILE, pareto_index(study.study_name, lb, result.exports))
        target.commit()
    return result


def pareto_index(study_name: str, lb: Leaderboard, exports: Sequence[Exported]) -> str:
    """The README.md at the top of a --pareto export: one line per trial of the front."""
    what = ("the objectives (one per task)" if lb.objective == "per_task" else "the per-task proxy scores")
    lines = [f"# Pareto front of study {study_name}", "",
             f"{len(exports)} trial(s) that no other complete trial beats on every task ({what}). Each folder "
             f"is a checkpoint with its mergekit YAML ({CONFIG_FILE}) and model card ({CARD_FILE}).", "",
             "| folder | rank | proxy | held-out | " + " | ".join(lb.tasks) + " |",
             "| --- | ---: | ---: | ---: | " + " | ".join("---:" for _ in lb.tasks) + " |"]
    for e in exports:
        lines.append(f"| [trial-{e.trial}](trial-{e.trial}/) | {e.rank} | {_f(e.proxy)} | {_f(e.held_out)} | "
                     + " | ".join(_f(e.proxy_scores.get(t)) for t in lb.tasks) + " |")
    return "\n".join(lines) + "\n"
