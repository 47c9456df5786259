"""Proxy eval tasks: one YAML file per task, its examples in JSONL files.

A task file names its data (a ``proxy`` split the search scores, an optional ``held_out``
split it never sees, an optional ``fewshot`` pool), a ``prompt`` template, an optional
``target`` template (the reference answer; used for few-shot examples and training data),
generation settings and a scorer with its settings. Templates are Python format strings
over an example's JSON fields (``{a}``, ``{word}``); write ``{{`` and ``}}`` for literal
braces. Relative data paths are relative to the task file.

Loading checks everything a search would otherwise trip over later: unknown keys and
scorers, malformed or empty JSONL lines (file and line named), template fields missing
from an example, scorer settings (for example a regex that does not compile), and any
example shared by two splits (refused, with the duplicates named).

A task file with an ``lm_eval`` block instead (name, description, lm_eval) wraps an lm-eval
task: lm-eval builds its prompts and scores each doc (:mod:`mergesearch.eval.lm_eval_bridge`,
imported only for such files).

This module imports no torch.
"""

from __future__ import annotations

import dataclasses
import json
import re
import string
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from mergesearch.errors import ConfigError, format_validation, read_text_file, read_yaml_file, suggest

__all__ = [
    "SPLITS",
    "Example",
    "Task",
    "TaskSpec",
    "GenerationSettings",
    "ScorerConfig",
    "DataFiles",
    "Template",
    "load_task",
    "load_tasks",
    "find_task_files",
]

SPLITS = ("proxy", "held_out")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def check_task_name(name: str) -> str:
    """``name`` if it is a valid task name, else a ValueError saying what a name may hold."""
    if not _NAME_RE.match(name):
        raise ValueError(
            f"task name {name!r} must start with a letter or digit and use only letters, "
            "digits, '_', '-' and '.'"
        )
    return name


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class GenerationSettings(_Frozen):
    """Greedy decoding: at most ``max_new_tokens``, cut at the first stop string (or EOS)."""

    max_new_tokens: int = Field(32, ge=1, le=8192)
    stop: tuple[str, ...] = ()

    @field_validator("stop")
    @classmethod
    def _no_empty_stop(cls, stop: tuple[str, ...]) -> tuple[str, ...]:
        if any(s == "" for s in stop):
            raise ValueError("a stop string is empty; remove it (EOS always stops generation)")
        return stop


class ScorerConfig(_Frozen):
    name: str
    settings: dict[str, Any] = Field(default_factory=dict)


class DataFiles(_Frozen):
    proxy: str
    held_out: Optional[str] = None
    fewshot: Optional[str] = None


class TaskSpec(_Frozen):
    """The contents of one task YAML file."""

    name: str
    description: str = ""
    data: DataFiles
    prompt: str
    target: Optional[str] = None
    fewshot: int = Field(0, ge=0, le=64)
    fewshot_separator: str = "\n"
    generation: GenerationSettings = GenerationSettings()
    scorer: ScorerConfig

    @field_validator("name")
    @classmethod
    def _check_name(cls, name: str) -> str:
        return check_task_name(name)


@dataclass(frozen=True)
class Template:
    """A format-string template and the example fields it needs."""

    text: str
    fields: tuple[str, ...]

    @classmethod
    def parse(cls, text: str, where: str) -> Template:
        names: list[str] = []
        try:
            for _, name, spec, conv in string.Formatter().parse(text):
                if name is None:
                    continue
                if name == "" or name.isdigit():
                    raise ConfigError(
                        f"{where}: template {text!r} has a positional field '{{{name}}}'; name an "
                        "example field such as '{question}', or write '{{' for a literal brace."
                    )
                names.append(re.split(r"[.\[]", name, maxsplit=1)[0])
        except ValueError as err:
            raise ConfigError(
                f"{where}: template {text!r} is not a valid format string ({err}); write '{{{{' and "
                "'}}}}' for literal braces."
            ) from None
        return cls(text, tuple(dict.fromkeys(names)))

    def render(self, data: Mapping[str, Any], where: str = "") -> str:
        try:
            return self.text.format_map(data)
        except (KeyError, IndexError, AttributeError, ValueError) as err:
            raise ConfigError(f"{where}: cannot render template {self.text!r}: {err}") from None


@dataclass(frozen=True)
class Example:
    """One example: its raw fields, the rendered prompt (few-shot prefix included) and target."""

    split: str
    index: int
    where: str
    data: Mapping[str, Any]
    prompt: str
    target: Optional[str]
    query: str


@dataclass(frozen=True)
class Task:
    """A loaded task: spec, its file, examples per split and its scorer."""

    spec: TaskSpec
    path: Optional[Path]
    splits: Mapping[str, tuple[Example, ...]]
    scorer: Any = field(repr=False)
    prefix: str = ""

    @property
    def name(self) -> str:
        return self.spec.name

    def examples(self, split: str = "proxy") -> tuple[Example, ...]:
        where = self.path or "the task file"
        return split_examples(self.splits, split, self.name, f"add `data: {{{split}: FILE.jsonl}}` to {where}")

    def render_prompt(self, data: Mapping[str, Any]) -> str:
        """The prompt for raw example fields, with this task's few-shot prefix."""
        return self.prefix + Template.parse(self.spec.prompt, self.name).render(data, self.name)

    def render_target(self, data: Mapping[str, Any]) -> str:
        if self.spec.target is None:
            raise ConfigError(f"Task {self.name!r} has no `target` template; add one.")
        return Template.parse(self.spec.target, self.name).render(data, self.name)


def read_jsonl(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """(line number, object) for every line; names the file and line of any bad one."""
    text = read_text_file(path, "data file")
    rows = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            raise ConfigError(
                f"{path}:{lineno}: empty line; every line of a JSONL file must be one JSON object "
                "(delete the blank line)."
            )
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise ConfigError(f"{path}:{lineno}: not valid JSON ({err.msg} at column {err.colno}).") from None
        if not isinstance(obj, dict):
            raise ConfigError(
                f"{path}:{lineno}: expected a JSON object with the example's fields, got "
                f"{type(obj).__name__}."
            )
        rows.append((lineno, obj))
    if not rows:
        raise ConfigError(f"Data file {path} has no examples; add one JSON object per line.")
    return rows


def split_examples(splits: Mapping[str, tuple[Any, ...]], split: str, task: str, fix: str) -> tuple[Any, ...]:
    """A task's examples of ``split``, or a ConfigError naming the splits it has and the ``fix``."""
    if split not in splits:
        raise ConfigError(f"Task {task!r} has no {split!r} split (it has: {', '.join(sorted(splits))}); {fix}.")
    return splits[split]


def _parse_spec(raw: Any, source: str) -> TaskSpec:
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: a task file must be a YAML mapping with name, data, prompt and scorer.")
    unknown = sorted(set(raw) - set(TaskSpec.model_fields))
    if unknown:
        raise ConfigError(
            f"{source}: unknown key {unknown[0]!r}.{suggest(unknown[0], TaskSpec.model_fields)}"
        )
    missing = [k for k in ("name", "data", "prompt", "scorer") if k not in raw]
    if missing:
        raise ConfigError(
            f"{source}: missing required field {missing[0]!r}; a task file needs name, data "
            "(with a proxy split), prompt and scorer."
        )
    try:
        return TaskSpec.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(f"{source}: {format_validation(err)}") from None


def _check_overlap(splits: Mapping[str, tuple[Example, ...]], source: str) -> None:
    seen: dict[str, Example] = {}
    clashes: list[str] = []
    for split in ("fewshot", "proxy", "held_out"):
        for ex in splits.get(split, ()):
            other = seen.get(ex.query)
            if other is not None and other.split != ex.split:
                clashes.append(f"{other.where} and {ex.where} ({ex.query[:60]!r})")
            else:
                seen.setdefault(ex.query, ex)
    if clashes:
        more = f" and {len(clashes) - 5} more" if len(clashes) > 5 else ""
        raise ConfigError(
            f"{source}: {len(clashes)} example(s) occur in two splits, so the held-out score would "
            f"not be held out: {'; '.join(clashes[:5])}{more}. Remove them from one of the files."
        )


def parse_task(raw: Any, source: str = "task", base_dir: Path | None = None) -> Task:
    """Validate a task mapping and load its data files (relative to ``base_dir``)."""
    from mergesearch.eval.scorers import make_scorer

    spec = _parse_spec(raw, source)
    base_dir = base_dir or Path.cwd()
    prompt = Template.parse(spec.prompt, f"{source}: prompt")
    target = Template.parse(spec.target, f"{source}: target") if spec.target is not None else None
    if spec.fewshot and spec.data.fewshot is None:
        raise ConfigError(
            f"{source}: fewshot is {spec.fewshot} but data has no fewshot file; add "
            "`data: {fewshot: FILE.jsonl}` or set fewshot: 0."
        )
    if spec.fewshot and target is None:
        raise ConfigError(f"{source}: fewshot examples need a `target` template to show the answers.")
    scorer = make_scorer(spec, source, base_dir)
    needed = set(prompt.fields) | set(target.fields if target else ()) | set(scorer.required_fields())

    files = {"fewshot": spec.data.fewshot, "proxy": spec.data.proxy, "held_out": spec.data.held_out}
    loaded: dict[str, tuple[Example, ...]] = {}
    prefix = ""
    for split, rel in files.items():
        if rel is None:
            continue
        path = Path(rel) if Path(rel).is_absolute() else base_dir / rel
        examples = []
        for i, (lineno, data) in enumerate(read_jsonl(path)):
            where = f"{path}:{lineno}"
            missing = sorted(needed - set(data))
            if missing:
                raise ConfigError(
                    f"{where}: example has no field {missing[0]!r}, which the task's templates or "
                    f"scorer use (it has: {', '.join(sorted(data)) or 'nothing'})."
                )
            query = prompt.render(data, where)
            examples.append(
                Example(
                    split=split,
                    index=i,
                    where=where,
                    data=data,
                    prompt=prefix + query,
                    target=target.render(data, where) if target else None,
                    query=query,
                )
            )
            if split != "fewshot":
                scorer.check_example(data, where)
        if split == "fewshot":
            if len(examples) < spec.fewshot:
                raise ConfigError(
                    f"{path}: fewshot is {spec.fewshot} but the file has only {len(examples)} examples."
                )
            shots = examples[: spec.fewshot]
            prefix = "".join(s.query + (s.target or "") + spec.fewshot_separator for s in shots)
        loaded[split] = tuple(examples)
    _check_overlap({k: v if k != "fewshot" else v[: spec.fewshot] for k, v in loaded.items()}, source)
    return Task(spec=spec, path=None, splits=loaded, scorer=scorer, prefix=prefix)


def load_task(path: str | Path, confirm_run_unsafe_code: bool = False) -> Any:
    """Load and validate one task file.

    A file with an ``lm_eval`` block wraps an lm-eval task (see
    :mod:`mergesearch.eval.lm_eval_bridge`) and loads as an ``LmEvalTask``, which the runner
    uses like a :class:`Task`; any other file loads as a :class:`Task`. lm-eval tasks that run
    model-written code load only with ``confirm_run_unsafe_code``.
    """
    path = Path(path)
    raw, _ = read_yaml_file(path, "task file")
    if isinstance(raw, dict) and "lm_eval" in raw:
        from mergesearch.eval.lm_eval_bridge import load_lm_eval_task

        return load_lm_eval_task(raw, path, confirm_run_unsafe_code=confirm_run_unsafe_code)
    task = parse_task(raw, str(path), path.parent)
    return dataclasses.replace(task, path=path)


def find_task_files(root: str | Path) -> list[Path]:
    """Task YAML files in a folder (not recursive), sorted by name."""
    root = Path(root)
    return sorted(p for p in root.glob("*.yaml") if p.is_file()) + sorted(
        p for p in root.glob("*.yml") if p.is_file()
    )


def load_tasks(refs: Iterable[str | Path], search_dirs: Sequence[Path] = (),
               confirm_run_unsafe_code: bool = False) -> list[Any]:
    """Load tasks by path, or by name from ``search_dirs`` (``addition`` -> ``DIR/addition.yaml``)."""
    tasks: list[Task] = []
    names: set[str] = set()
    for ref in refs:
        path = Path(ref)
        if not path.suffix:
            found = [d / f"{ref}{ext}" for d in search_dirs for ext in (".yaml", ".yml")]
            found = [p for p in found if p.is_file()]
            if not found:
                available = [p.stem for d in search_dirs for p in find_task_files(d)]
                raise ConfigError(f"No task named {str(ref)!r}.{suggest(str(ref), available)}")
            path = found[0]
        task = load_task(path, confirm_run_unsafe_code)
        if task.name in names:
            raise ConfigError(f"Two tasks are named {task.name!r}; rename one (the `name:` field of {path}).")
        names.add(task.name)
        tasks.append(task)
    return tasks
