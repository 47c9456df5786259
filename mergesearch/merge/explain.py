"""What a merge YAML really does: each parameter's effective value per layer and tensor group,
and the conditional entries that can never apply. Reads safetensors headers only (no torch).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from mergesearch.io.checkpoint import open_checkpoints
from mergesearch.merge.registry import ParamSpec, validate_plan
from mergesearch.merge.tasks import MergeTasks, TensorTask
from mergesearch.plan import Conditional, MergePlan, Parameters


@dataclass
class ParamTable:
    """One parameter (for one model, if per-model): values per output row and tensor group."""

    param: str
    model: Optional[str]
    groups: list[str]
    members: dict[str, list[str]]
    rows: list[tuple[str, dict[str, Any]]]


@dataclass
class Explanation:
    method: str
    tables: list[ParamTable] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def _scope_label(task: TensorTask, scopes: list[Parameters], index: int, model: Optional[str]) -> str:
    n_specific = len(task.slice.source_params(model)) - 1
    if index < n_specific:
        return "model"
    return "slice" if index == n_specific else "global"


def _decider(setting: Any, name: str) -> str:
    if isinstance(setting, Conditional):
        setting = (setting,)
    if isinstance(setting, tuple) and setting and isinstance(setting[0], Conditional):
        for entry in setting:
            if entry.matches(name):
                return "default" if entry.filter in (None, "*") else f"filter {entry.filter!r}"
        return ""
    return "all"


def _label(param: ParamSpec, task: TensorTask, scopes: list[Parameters], model: Optional[str],
           name: str) -> str:
    for i, scope in enumerate(scopes):
        if scope and param.name in scope:
            decided = _decider(scope[param.name], name)
            if decided:
                return f"{_scope_label(task, scopes, i, model)}: {decided}"
    return "method default"


def _row(task: TensorTask) -> str:
    if task.out_layer is not None:
        return f"layer {task.out_layer}"
    return task.group()


def _conditional_lists(plan: MergePlan) -> Iterator[tuple[str, str, tuple[Conditional, ...]]]:
    scopes: list[tuple[str, Parameters]] = [("parameters", plan.parameters)]
    scopes += [(f"models[{i}].parameters", m.parameters) for i, m in enumerate(plan.models or ())]
    for i, s in enumerate(plan.slices or ()):
        scopes.append((f"slices[{i}].parameters", s.parameters))
        scopes += [(f"slices[{i}].sources[{j}].parameters", src.parameters)
                   for j, src in enumerate(s.sources)]
    for where, params in scopes:
        for name, setting in (params or {}).items():
            if isinstance(setting, Conditional):
                setting = (setting,)
            if isinstance(setting, tuple) and setting and isinstance(setting[0], Conditional):
                yield where, name, setting


def dead_entries(plan: MergePlan, tensor_names: list[str]) -> list[str]:
    """Warnings for conditional entries that can never decide a value."""
    warnings = []
    for where, param, entries in _conditional_lists(plan):
        catch_all = None
        for i, entry in enumerate(entries):
            label = f"{where}.{param}[{i}]" + (f" (filter {entry.filter!r})" if entry.filter else "")
            if catch_all is not None:
                warnings.append(f"{label} never applies: it comes after the catch-all entry "
                                f"[{catch_all}], and the first matching entry wins.")
                continue
            if entry.filter in (None, "*"):
                catch_all = i
                continue
            matched = [n for n in tensor_names if entry.matches(n)]
            if not matched:
                warnings.append(f"{label} never applies: no tensor name contains {entry.filter!r}.")
                continue
            if all(any(e.matches(n) for e in entries[:i]) for n in matched):
                warnings.append(f"{label} never applies: every tensor it matches is already "
                                "matched by an earlier entry.")
    return warnings


def _fmt(value: Any) -> Any:
    return round(value, 6) if isinstance(value, float) else value


def explain(plan: MergePlan, base_dir: Optional[Path] = None) -> Explanation:
    """Resolve every parameter for every output tensor, grouped as the config groups them."""
    spec = validate_plan(plan)
    ckpts = open_checkpoints(list(plan.referenced_models()), base_dir)
    tasks = MergeTasks(plan, spec, ckpts)
    tasks.check_params()
    result = Explanation(spec.name)
    names = sorted({t.name for t in tasks.tasks} | {s for t in tasks.tasks for s in t.sources})
    result.warnings = dead_entries(plan, names)
    resolved = {t.name: tasks.params(t) for t in tasks.tasks}

    targets: list[tuple[ParamSpec, Optional[str]]] = [(p, None) for p in spec.shared_params()]
    models = list(dict.fromkeys(m for t in tasks.tasks for m in t.models))
    targets += [(p, m) for p in spec.input_params() for m in models]
    for param, model in targets:
        table = ParamTable(param.name, model, [], {}, [])
        rows: dict[str, dict[str, Any]] = {}
        for task in tasks.tasks:
            if model is None:
                value = resolved[task.name].shared[param.name]
                scopes = tasks.layout.scopes(task.slice, None)
                name = task.name
            else:
                if model not in task.models:
                    continue
                i = task.models.index(model)
                if param.name not in resolved[task.name].per_input[i]:
                    continue
                value = resolved[task.name].per_input[i][param.name]
                scopes = tasks.layout.scopes(task.slice, model)
                name = task.sources[i]
            group = _label(param, task, scopes, model, name)
            if group not in table.members:
                table.groups.append(group)
                table.members[group] = []
            if task.group() not in table.members[group]:
                table.members[group].append(task.group())
            rows.setdefault(_row(task), {})[group] = _fmt(value)
        if rows:
            table.rows = list(rows.items())
            result.tables.append(table)
    return result


def render(exp: Explanation, console) -> None:
    """Print an Explanation with rich tables."""
    from rich.table import Table

    console.print(f"[bold]merge_method[/bold]: {exp.method}")
    for table in exp.tables:
        title = table.param + (f"  (model {table.model})" if table.model else "")
        t = Table(title=title, title_justify="left", show_lines=False)
        t.add_column("tensors")
        for g in table.groups:
            members = table.members[g]
            shown = ", ".join(members[:3]) + (f", +{len(members) - 3}" if len(members) > 3 else "")
            t.add_column(f"{g}\n[dim]{shown}[/dim]", justify="right")
        for row, values in table.rows:
            t.add_row(row, *[str(values.get(g, "")) for g in table.groups])
        console.print(t)
    if exp.warnings:
        console.print("[bold yellow]Warnings[/bold yellow]")
        for w in exp.warnings:
            console.print(f"  [yellow]![/yellow] {w}")
    else:
        console.print("[green]Every conditional entry applies to some tensor.[/green]")
