"""Merge plans: frozen types that read and write mergekit's YAML, and how parameters resolve.

A plan is exactly what a mergekit 0.1.5 config says. Parameter values resolve as mergekit
evaluates them:

* a scalar applies everywhere;
* a gradient (a list of numbers) is interpolated linearly at ``t = layer / (layers_in_slice - 1)``
  (``t = 1`` for a one-layer slice) at position ``t * (len - 1)``; tensors outside the layers
  (embeddings, final norm, ``lm_head``) are evaluated at ``t = 0``;
* a list of ``{filter, value}`` entries picks the first entry whose filter is a substring of the
  tensor name (an entry without a filter, or with ``"*"``, matches everything); its value may
  itself be a gradient;
* scopes are searched from the most specific to the least: a slice source's (or a model's)
  parameters, then the output slice's, then the global ones; a scope whose setting resolves to
  nothing falls through to the next, and finally to the method's default.

This module imports no torch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Protocol, Union

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator

from mergesearch.errors import ConfigError, format_validation, read_text_file, suggest

Scalar = Union[bool, int, float, str]
Gradient = tuple[Scalar, ...]

DTYPES = ("float32", "float16", "bfloat16")
WILDCARD = "*"


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Conditional(_Frozen):
    """One ``{filter, value}`` entry; ``filter=None`` (or ``"*"``) matches every tensor."""

    value: Union[Scalar, Gradient]
    filter: Optional[str] = None

    def matches(self, tensor_name: str) -> bool:
        return self.filter is None or self.filter == WILDCARD or (
            bool(tensor_name) and self.filter in tensor_name
        )


Setting = Union[Scalar, Gradient, Conditional, tuple[Conditional, ...]]
Parameters = Optional[dict[str, Setting]]


class InputModel(_Frozen):
    model: str
    parameters: Parameters = None


class InputSlice(_Frozen):
    model: str
    layer_range: tuple[int, int]
    parameters: Parameters = None

    @field_validator("layer_range")
    @classmethod
    def _range(cls, value: tuple[int, int]) -> tuple[int, int]:
        start, end = value
        if start < 0 or end <= start:
            raise ValueError(
                f"layer_range {list(value)} is empty or negative: write [start, end) with "
                "0 <= start < end, e.g. [0, 8]"
            )
        return value

    @property
    def num_layers(self) -> int:
        return self.layer_range[1] - self.layer_range[0]


class OutputSlice(_Frozen):
    sources: tuple[InputSlice, ...]
    base_model: Optional[str] = None
    parameters: Parameters = None

    @model_validator(mode="after")
    def _same_length(self) -> "OutputSlice":
        if not self.sources:
            raise ValueError("a slice needs at least one entry in `sources`")
        lengths = {s.model: s.num_layers for s in self.sources}
        if len(set(lengths.values())) > 1:
            raise ValueError(
                f"all sources of a slice must cover the same number of layers; got {lengths}"
            )
        return self


class Calibration(_Frozen):
    """mergesearch's extension for importance-weighted methods: the calibration data.

    ``data`` is a JSONL file with a ``text`` field, an eval task file (``.yaml``) or a task name;
    ``hash`` is the content hash of the calibration texts (checked when given); ``limit`` texts of
    at most ``max_length`` tokens are used; ``cache`` is the statistics' cache folder. mergekit has
    no such key: a plan that names it can only be merged by mergesearch.
    """

    data: str
    hash: Optional[str] = None
    limit: int = 64
    max_length: int = 128
    cache: Optional[str] = None

    @field_validator("limit", "max_length")
    @classmethod
    def _positive(cls, value: int) -> int:
        if value < 1:
            raise ValueError(f"must be a positive integer, got {value!r}")
        return value


class MergePlan(_Frozen):
    """A mergekit merge configuration (the subset mergesearch reads, writes and executes)."""

    slices: Optional[tuple[OutputSlice, ...]] = None
    models: Optional[tuple[InputModel, ...]] = None
    merge_method: str
    base_model: Optional[str] = None
    parameters: Parameters = None
    dtype: Optional[str] = None
    out_dtype: Optional[str] = None
    tokenizer_source: Optional[str] = None
    chat_template: Optional[str] = None
    calibration: Optional[Calibration] = None

    @model_validator(mode="after")
    def _check(self) -> "MergePlan":
        if bool(self.slices) == bool(self.models):
            raise ValueError(
                "exactly one of `models` or `slices` must be given (and not empty)"
            )
        for key in ("dtype", "out_dtype"):
            value = getattr(self, key)
            if value is not None and value not in DTYPES:
                raise ValueError(f"{key} {value!r} is not supported.{suggest(value, DTYPES)}")
        if self.tokenizer_source == "union":
            raise ValueError(
                "tokenizer_source 'union' (building a joint vocabulary) is not supported: the "
                "sources must share one vocabulary. Use `tokenizer_source: base` or a model path"
            )
        return self

    def referenced_models(self) -> tuple[str, ...]:
        """Every model the plan reads, base first, each once, in order of appearance."""
        seen: dict[str, None] = {}
        if self.base_model:
            seen[self.base_model] = None
        for model in self.models or ():
            seen[model.model] = None
        for out_slice in self.slices or ():
            if out_slice.base_model:
                seen[out_slice.base_model] = None
            for src in out_slice.sources:
                seen[src.model] = None
        return tuple(seen)

    def with_models(self, mapping: Mapping[str, str]) -> "MergePlan":
        """The same plan with model references renamed (e.g. paths made absolute)."""
        data = self.model_dump(mode="json", exclude_none=True)

        def rename(node: Any) -> Any:
            if isinstance(node, dict):
                return {
                    k: (mapping.get(v, v) if k in ("model", "base_model") and isinstance(v, str)
                        else rename(v))
                    for k, v in node.items()
                }
            if isinstance(node, list):
                return [rename(v) for v in node]
            return node

        data = rename(data)
        if data.get("tokenizer_source") in mapping:
            data["tokenizer_source"] = mapping[data["tokenizer_source"]]
        return MergePlan.model_validate(data)


# ---------------------------------------------------------------------------------------------
# Reading and writing YAML

_KEYS = {
    "top": set(MergePlan.model_fields),
    "model": set(InputModel.model_fields),
    "slice": set(OutputSlice.model_fields),
    "source": set(InputSlice.model_fields),
    "conditional": set(Conditional.model_fields),
}
_UNSUPPORTED = {
    "modules": "multi-module configs are not supported; use `models` or `slices`",
    "tokenizer": "the `tokenizer:` block (vocabulary surgery) is not supported; use "
    "`tokenizer_source: base` or a model path",
    "residual_weight": "`residual_weight` is not supported",
}


def _check_keys(node: Any, level: str, where: str) -> None:
    if not isinstance(node, dict):
        return
    for key in node:
        if not isinstance(key, str):
            raise ConfigError(f"{where}: key {key!r} is not a string.")
        if key in _UNSUPPORTED:
            raise ConfigError(f"{where}: {_UNSUPPORTED[key]}.")
        if key not in _KEYS[level]:
            raise ConfigError(
                f"{where}: unknown key {key!r}.{suggest(key, _KEYS[level])}"
            )


def _check_parameters(params: Any, where: str) -> None:
    if params is None:
        return
    if not isinstance(params, dict):
        raise ConfigError(
            f"{where}.parameters must be a mapping of parameter names to values, "
            f"got {type(params).__name__}."
        )
    for name, setting in params.items():
        entries = setting if isinstance(setting, list) else [setting]
        for i, entry in enumerate(entries):
            if isinstance(entry, dict):
                _check_keys(entry, "conditional", f"{where}.parameters.{name}[{i}]")
                if "value" not in entry:
                    raise ConfigError(
                        f"{where}.parameters.{name}[{i}]: a conditional entry needs a `value` "
                        "(e.g. `- filter: self_attn` / `  value: 0.5`)."
                    )


def _precheck(raw: Any) -> None:
    if not isinstance(raw, dict):
        raise ConfigError(
            "A merge config must be a YAML mapping with `merge_method` and `models` or "
            f"`slices`; got {type(raw).__name__}."
        )
    _check_keys(raw, "top", "config")
    _check_parameters(raw.get("parameters"), "config")
    if "merge_method" not in raw:
        raise ConfigError("config: `merge_method` is missing (e.g. `merge_method: linear`).")
    for i, model in enumerate(raw.get("models") or []):
        if isinstance(model, str):
            raise ConfigError(
                f"config.models[{i}]: write `- model: {model}` rather than a bare string."
            )
        _check_keys(model, "model", f"config.models[{i}]")
        if isinstance(model, dict):
            if isinstance(model.get("model"), dict):
                raise ConfigError(
                    f"config.models[{i}].model: LoRA or revision references are not supported; "
                    "give a local folder path."
                )
            _check_parameters(model.get("parameters"), f"config.models[{i}]")
    for i, out_slice in enumerate(raw.get("slices") or []):
        _check_keys(out_slice, "slice", f"config.slices[{i}]")
        if isinstance(out_slice, dict):
            _check_parameters(out_slice.get("parameters"), f"config.slices[{i}]")
            for j, src in enumerate(out_slice.get("sources") or []):
                _check_keys(src, "source", f"config.slices[{i}].sources[{j}]")
                if isinstance(src, dict):
                    _check_parameters(
                        src.get("parameters"), f"config.slices[{i}].sources[{j}]"
                    )


def parse_plan(raw: Any, source: str = "config") -> MergePlan:
    """Validate a parsed YAML/JSON document as a merge plan."""
    _precheck(raw)
    try:
        return MergePlan.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(f"Invalid merge config {source}: {format_validation(err)}") from None


def loads_plan(text: str, source: str = "<string>") -> MergePlan:
    """Parse mergekit YAML text (safe loading only)."""
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{source} is not valid YAML: {err}") from None
    return parse_plan(raw, source)


def load_plan(path: Union[str, Path]) -> MergePlan:
    """Read a mergekit YAML file."""
    return loads_plan(read_text_file(path, "merge config"), str(path))


class _Dumper(yaml.SafeDumper):
    def represent_list(self, data: Iterable[Any]) -> yaml.SequenceNode:
        flow = all(isinstance(e, (int, float)) and not isinstance(e, bool) for e in data)
        return self.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


_Dumper.add_representer(list, _Dumper.represent_list)


def plan_to_dict(plan: MergePlan) -> dict[str, Any]:
    return plan.model_dump(mode="json", exclude_none=True)


def dump_plan(plan: MergePlan, header: str = "") -> str:
    """mergekit-readable YAML for the plan; `header` lines are written as comments."""
    body = yaml.dump(plan_to_dict(plan), Dumper=_Dumper, sort_keys=False, allow_unicode=True)
    comment = "".join(f"# {line}\n" if line else "#\n" for line in header.splitlines())
    return comment + body


# ---------------------------------------------------------------------------------------------
# Resolving parameters


class ParamLike(Protocol):
    name: str

    @property
    def required(self) -> bool: ...

    @property
    def default(self) -> Any: ...

    def coerce(self, value: Any) -> Any: ...


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def evaluate_setting(
    setting: Any, tensor_name: str, t: float = 0.0, coerce: Callable[[Any], Any] = lambda v: v
) -> Any:
    """The value a setting takes for one tensor at layer fraction t, or None if none applies."""
    if isinstance(setting, Conditional):
        setting = (setting,)
    if isinstance(setting, (bool, int, float, str)):
        return coerce(setting)
    if isinstance(setting, (tuple, list)):
        if not setting:
            return None
        if all(isinstance(e, (bool, int, float, str)) for e in setting):
            values = [coerce(e) for e in setting]
            if not all(_is_number(v) for v in values):
                return values[int(t * (len(values) - 1))]
            scaled = t * (len(setting) - 1)
            i0 = int(scaled)
            i1 = min(len(setting) - 1, i0 + 1)
            frac = scaled - i0
            return coerce((1 - frac) * values[i0] + frac * values[i1])
        for entry in setting:
            if not isinstance(entry, Conditional):
                entry = Conditional.model_validate(entry)
            if entry.matches(tensor_name):
                return evaluate_setting(entry.value, tensor_name, t, coerce)
        return None
    raise ConfigError(f"Unexpected parameter setting {setting!r}.")


def resolve(
    param: ParamLike, scopes: Sequence[Parameters], tensor_name: str, t: float = 0.0,
    model: Optional[str] = None,
) -> Any:
    """First value found for `param` from the most to the least specific scope, else default."""
    for scope in scopes:
        if scope and param.name in scope:
            value = evaluate_setting(scope[param.name], tensor_name, t, param.coerce)
            if value is not None:
                return value
    if param.required:
        where = f" of {model!r}" if model else ""
        raise ConfigError(
            f"Parameter {param.name!r}{where} is required by this method but has no value for "
            f"tensor {tensor_name!r}. Set it under `parameters:` (globally or for that model)."
        )
    return param.coerce(param.default) if param.default is not None else None


def layer_fraction(index: int, num_layers: int) -> float:
    """mergekit's gradient position of layer `index` in a slice of `num_layers` layers."""
    return index / (num_layers - 1) if num_layers > 1 else 1.0


# ---------------------------------------------------------------------------------------------
# Layer layout


@dataclass(frozen=True)
class SliceLayout:
    """One output slice with every input resolved to (model, first layer)."""

    index: int
    sources: tuple[InputSlice, ...]
    base_model: Optional[str]
    parameters: Parameters
    first_out_layer: int

    @property
    def num_layers(self) -> int:
        return self.sources[0].num_layers

    def source_params(self, model: Optional[str]) -> list[Parameters]:
        """Scopes for `model` (None: shared parameters), most specific first."""
        scopes: list[Parameters] = []
        if model is not None:
            scopes += [s.parameters for s in self.sources if s.model == model]
        return scopes + [self.parameters]


@dataclass(frozen=True)
class PlanLayout:
    slices: tuple[SliceLayout, ...]
    global_parameters: Parameters

    @property
    def num_out_layers(self) -> int:
        return sum(s.num_layers for s in self.slices)

    def scopes(self, out_slice: SliceLayout, model: Optional[str]) -> list[Parameters]:
        return out_slice.source_params(model) + [self.global_parameters]

    def out_layers(self) -> Iterable[tuple[int, SliceLayout, int, float]]:
        """(output layer, its slice, layer offset in the slice, gradient fraction t)."""
        for s in self.slices:
            for offset in range(s.num_layers):
                yield s.first_out_layer + offset, s, offset, layer_fraction(offset, s.num_layers)


def layout(plan: MergePlan, num_layers_of: Callable[[str], int]) -> PlanLayout:
    """Normalise `models:` into one full-depth slice (adding the base model as mergekit does)."""
    if plan.models:
        sources = [
            InputSlice(model=m.model, layer_range=(0, num_layers_of(m.model)),
                       parameters=m.parameters)
            for m in plan.models
        ]
        if plan.base_model and plan.base_model not in {m.model for m in plan.models}:
            sources.append(
                InputSlice(model=plan.base_model, layer_range=(0, num_layers_of(plan.base_model)))
            )
        lengths = {s.model: s.num_layers for s in sources}
        if len(set(lengths.values())) > 1:
            raise ConfigError(
                f"The models have different numbers of layers {lengths}; merge them with "
                "`slices:` and explicit `layer_range`s instead of `models:`."
            )
        slices = (OutputSlice(sources=tuple(sources)),)
    else:
        slices = plan.slices or ()
    out, first = [], 0
    for i, s in enumerate(slices):
        for src in s.sources:
            available = num_layers_of(src.model)
            if src.layer_range[1] > available:
                raise ConfigError(
                    f"slices[{i}]: layer_range {list(src.layer_range)} of {src.model!r} goes past "
                    f"its {available} layers; the end must be <= {available}."
                )
        out.append(SliceLayout(i, tuple(s.sources), s.base_model or plan.base_model,
                               s.parameters, first))
        first += s.sources[0].num_layers
    return PlanLayout(tuple(out), plan.parameters)


def is_finite_number(value: Any) -> bool:
    return _is_number(value) and math.isfinite(value)
