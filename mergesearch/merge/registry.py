"""The merge-method registry: the single place that declares each method and its parameters.

Names, defaults and semantics follow mergekit 0.1.5, except for mergesearch's own
importance-weighted methods (``mergekit=False``: docs/importance.md). Ranges are the values
mergesearch accepts (stricter than mergekit where a value is meaningless); ``search`` is the
default range a search space draws from. This module imports no torch: plans are validated without it.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

from mergesearch.errors import ConfigError, unknown
from mergesearch.plan import Conditional, MergePlan, Parameters

Scope = Literal["shared", "input", "non_base"]
BasePolicy = Literal["required", "optional", "ignored"]

_MISSING = object()


@dataclass(frozen=True)
class ParamSpec:
    """One parameter of a method.

    scope: ``shared`` (one value per tensor), ``input`` (one per input model, base included) or
    ``non_base`` (one per input model other than the base).
    """

    name: str
    kind: Literal["float", "bool"]
    scope: Scope
    default: Any = _MISSING
    low: Optional[float] = None
    high: Optional[float] = None
    low_open: bool = False
    high_open: bool = False
    search: Optional[tuple[float, float]] = None
    help: str = ""

    @property
    def required(self) -> bool:
        return self.default is _MISSING

    def coerce(self, value: Any) -> Any:
        if self.kind == "bool":
            if isinstance(value, bool):
                return value
            if isinstance(value, int) and value in (0, 1):
                return bool(value)
            if isinstance(value, str) and value.lower() in ("true", "false"):
                return value.lower() == "true"
            raise ConfigError(
                f"Parameter {self.name!r} must be true or false, got {value!r}."
            )
        if isinstance(value, bool):
            raise ConfigError(f"Parameter {self.name!r} must be a number, got {value!r}.")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"Parameter {self.name!r} must be a number, got {value!r}.")

    def check(self, value: Any, where: str) -> None:
        """Raise a ConfigError naming `where` if `value` is outside the accepted range."""
        value = self.coerce(value)
        if self.kind == "bool":
            return
        if not math.isfinite(value):
            raise ConfigError(f"{where}: {self.name} = {value!r} is not a finite number.")
        bad_low = self.low is not None and (
            value <= self.low if self.low_open else value < self.low
        )
        bad_high = self.high is not None and (
            value >= self.high if self.high_open else value > self.high
        )
        if bad_low or bad_high:
            raise ConfigError(f"{where}: {self.name} = {value!r} is out of range; {self.range_text()}.")

    def range_text(self) -> str:
        lo = "(" if self.low_open else "["
        hi = ")" if self.high_open else "]"
        low = "-inf" if self.low is None else f"{self.low:g}"
        high = "inf" if self.high is None else f"{self.high:g}"
        return f"{self.name} must be in {lo}{low}, {high}{hi}"


@dataclass(frozen=True)
class MethodSpec:
    """A merge method: its parameters and the inputs it accepts."""

    name: str
    params: tuple[ParamSpec, ...]
    base: BasePolicy
    random: bool = False
    min_inputs: int = 1
    max_inputs: Optional[int] = None
    min_non_base: Optional[int] = None
    max_non_base: Optional[int] = None
    mergekit: bool = True
    summary: str = ""
    reference: str = ""
    family: str = field(default="", compare=False)
    importance: Optional[Literal["activations", "fisher"]] = None
    """Calibration statistics the method weights elements by (see merge/importance.py)."""

    @property
    def needs_base(self) -> bool:
        return self.base == "required"

    def param(self, name: str) -> ParamSpec:
        for p in self.params:
            if p.name == name:
                return p
        raise unknown("parameter", name, [p.name for p in self.params], f"method {self.name!r}")

    def shared_params(self) -> tuple[ParamSpec, ...]:
        return tuple(p for p in self.params if p.scope == "shared")

    def input_params(self) -> tuple[ParamSpec, ...]:
        return tuple(p for p in self.params if p.scope != "shared")


def _weight(scope: Scope, low: Optional[float] = None) -> ParamSpec:
    return ParamSpec("weight", "float", scope, low=low, search=(0.0, 1.0),
                     help="mixing weight of this model")


_DENSITY = ParamSpec("density", "float", "non_base", default=1.0, low=0.0, high=1.0,
                     low_open=True, search=(0.1, 1.0),
                     help="fraction of the delta's elements kept")
_LAMBDA = ParamSpec("lambda", "float", "shared", default=1.0, search=(0.5, 1.5),
                    help="scale of the merged delta")
_GTA_FAMILY = {
    # name: (sparsification, consensus, default normalize, default rescale, random, reference)
    "task_arithmetic": (None, False, False, False, False, "https://arxiv.org/abs/2212.04089"),
    "ties": ("magnitude", True, True, False, False, "https://arxiv.org/abs/2306.01708"),
    "dare_ties": ("random", True, False, True, True, "https://arxiv.org/abs/2311.03099"),
    "dare_linear": ("random", False, False, True, True, "https://arxiv.org/abs/2311.03099"),
    "breadcrumbs": ("magnitude_outliers", False, False, False, False,
                    "https://arxiv.org/abs/2312.06795"),
    "breadcrumbs_ties": ("magnitude_outliers", True, False, False, False,
                         "https://arxiv.org/abs/2312.06795"),
    "della": ("della_magprune", True, True, True, True, "https://arxiv.org/abs/2406.11617"),
    "della_linear": ("della_magprune", False, False, True, True,
                     "https://arxiv.org/abs/2406.11617"),
}


@dataclass(frozen=True)
class TaskArithmeticVariant:
    sparsification: Optional[str]
    consensus: bool


def task_arithmetic_variant(name: str) -> TaskArithmeticVariant:
    sparsification, consensus, *_ = _GTA_FAMILY[name]
    return TaskArithmeticVariant(sparsification, consensus)


def _gta(name: str) -> MethodSpec:
    sparsification, consensus, normalize, rescale, random, ref = _GTA_FAMILY[name]
    params = [
        ParamSpec("int8_mask", "bool", "shared", default=False,
                  help="store the sign mask as int8 (memory only; same result)"),
        ParamSpec("normalize", "bool", "shared", default=normalize,
                  help="divide the merged delta by the sum of the weights"),
        ParamSpec("rescale", "bool", "shared", default=rescale,
                  help="rescale a sparsified delta to its original L1 norm"),
        _LAMBDA,
        _weight("non_base"),
        _DENSITY,
    ]
    if sparsification == "magnitude_outliers":
        params.append(ParamSpec("gamma", "float", "non_base", default=0.01, low=0.0, high=1.0,
                                high_open=True, search=(0.0, 0.1),
                                help="fraction of the largest deltas removed as outliers"))
    if sparsification == "della_magprune":
        params.append(ParamSpec("epsilon", "float", "non_base", default=0.15, low=0.0, high=1.0,
                                high_open=True, search=(0.01, 0.2),
                                help="spread of the keep probability around the density"))
    summary = {
        None: "base + weighted sum of task vectors",
        "magnitude": "trim small deltas, elect a sign, disjoint mean",
        "random": "drop deltas at random (keep rate = density), rescale",
        "magnitude_outliers": "drop the smallest and the largest deltas",
        "della_magprune": "drop deltas with a magnitude-ranked keep probability",
    }[sparsification]
    if consensus and sparsification not in ("magnitude",):
        summary += ", with TIES sign consensus"
    return MethodSpec(name, tuple(params), base="required", random=random, min_inputs=1,
                      summary=summary, reference=ref, family="task_arithmetic")


_EXPONENT = ParamSpec("exponent", "float", "shared", default=1.0, low=0.0, search=(0.0, 2.0),
                      help="power of the importance |W|*||X||_2 (0: the plain method)")

IMPORTANCE_METHODS: dict[str, MethodSpec] = {
    "importance_linear": MethodSpec(
        "importance_linear", (_weight("input"), _EXPONENT),
        base="ignored", min_inputs=1, mergekit=False, family="importance", importance="activations",
        summary="per-element linear weights w_i*(|W_i|*||X_i||_2)^p, normalised across the models",
        reference="https://arxiv.org/abs/2306.11695"),
    "importance_task_arithmetic": MethodSpec(
        "importance_task_arithmetic",
        (ParamSpec("normalize", "bool", "shared", default=False,
                   help="divide the merged delta by the sum of the per-element weights"),
         _LAMBDA,
         _weight("non_base"), _EXPONENT),
        base="required", min_inputs=1, mergekit=False, family="importance", importance="activations",
        summary="task arithmetic with per-element weights w_i*(|delta_i|*||X_i||_2)^p / mean",
        reference="https://arxiv.org/abs/2212.04089"),
    "fisher": MethodSpec(
        "fisher",
        (_weight("input"),
         ParamSpec("fisher_floor", "float", "shared", default=1e-3, low=0.0, search=(0.0, 1.0),
                   help="floor of the Fisher, as a fraction of the tensor's mean Fisher")),
        base="ignored", min_inputs=1, mergekit=False, family="importance", importance="fisher",
        summary="per-element weights w_i*max(F_i, floor), normalised (diagonal Fisher merging)",
        reference="https://arxiv.org/abs/2111.09832"),
}

METHODS: dict[str, MethodSpec] = {
    "linear": MethodSpec(
        "linear",
        (_weight("input"),
         ParamSpec("normalize", "bool", "shared", default=True,
                   help="divide by the sum of the weights")),
        base="ignored", min_inputs=1, summary="weighted average of the models",
        reference="https://arxiv.org/abs/2203.05482"),
    "slerp": MethodSpec(
        "slerp",
        (ParamSpec("t", "float", "shared", low=0.0, high=1.0, search=(0.0, 1.0),
                   help="interpolation position: 0 is the base model, 1 the other"),),
        base="required", min_inputs=2, max_inputs=2,
        summary="spherical interpolation between the base and one other model",
        reference="https://en.wikipedia.org/wiki/Slerp"),
    "nuslerp": MethodSpec(
        "nuslerp",
        (_weight("non_base", low=0.0),
         ParamSpec("nuslerp_row_wise", "bool", "shared", default=False,
                   help="interpolate rows instead of columns"),
         ParamSpec("nuslerp_flatten", "bool", "shared", default=True,
                   help="interpolate the whole tensor as one vector")),
        base="optional", min_non_base=2, max_non_base=2,
        summary="spherical interpolation of two models (or of their task vectors)"),
    "model_stock": MethodSpec(
        "model_stock",
        (ParamSpec("filter_wise", "bool", "shared", default=False,
                   help="compute the ratio per row rather than per tensor"),),
        base="required", min_inputs=3,
        summary="interpolate towards the average by the angle between task vectors",
        reference="https://arxiv.org/abs/2403.19522"),
    "passthrough": MethodSpec(
        "passthrough",
        (ParamSpec("scale", "float", "input", default=None, help="multiply the tensor"),),
        base="ignored", min_inputs=1, max_inputs=1,
        summary="copy one model's tensors (stack layers with slices)"),
    **{name: _gta(name) for name in _GTA_FAMILY},
    **IMPORTANCE_METHODS,
}


def check_calibration(plan: MergePlan, spec: MethodSpec) -> None:
    """An importance-weighted method needs the plan's ``calibration`` block."""
    if spec.importance and plan.calibration is None:
        raise ConfigError(
            f"Merge method {spec.name!r} weights elements by calibration statistics, but the config "
            "has no `calibration:`; add `calibration: {data: FILE.jsonl}` (a JSONL file with a `text` "
            "field, or an eval task name) to the merge YAML, or `calibration: FILE.jsonl` to the study file."
        )


def check_linear_weights(weights: Sequence[float], where: str) -> None:
    """Normalised linear weights must not sum to zero."""
    if sum(weights) == 0:
        raise ConfigError(
            f"The linear weights {list(weights)} sum to zero for {where}, so they cannot be "
            "normalised; use weights with a non-zero sum or `normalize: false`."
        )


def scale_free_weights(method: str, normalize: Any = True) -> bool:
    """Whether only the ratios of a method's per-model weights change the merge."""
    return method in ("nuslerp", "importance_linear", "fisher") or (method == "linear" and bool(normalize))


def check_della(method: str, density: float, epsilon: float, where: str) -> None:
    """DELLA's keep probabilities density +/- epsilon must lie inside (0, 1)."""
    if density < 1 and (density + epsilon >= 1 or density - epsilon <= 0):
        raise ConfigError(
            f"{method} needs density +/- epsilon inside (0, 1), but for {where} "
            f"density={density:g} and epsilon={epsilon:g}. Lower epsilon below "
            "min(density, 1 - density)."
        )


def get_method(name: str) -> MethodSpec:
    try:
        return METHODS[name]
    except KeyError:
        raise unknown("merge method", name, METHODS) from None


def _literals(setting: Any) -> Iterator[Any]:
    if isinstance(setting, Conditional):
        setting = (setting,)
    if isinstance(setting, (tuple, list)):
        for entry in setting:
            if isinstance(entry, Conditional):
                yield from _literals(entry.value)
            else:
                yield entry
    else:
        yield setting


def _scopes(plan: MergePlan) -> Iterator[tuple[str, Parameters, Optional[str]]]:
    yield "parameters", plan.parameters, None
    for i, m in enumerate(plan.models or ()):
        yield f"models[{i}] ({m.model}).parameters", m.parameters, m.model
    for i, s in enumerate(plan.slices or ()):
        yield f"slices[{i}].parameters", s.parameters, None
        for j, src in enumerate(s.sources):
            yield f"slices[{i}].sources[{j}] ({src.model}).parameters", src.parameters, src.model


def _check_inputs(spec: MethodSpec, models: list[str], base: Optional[str], where: str) -> None:
    if len(set(models)) != len(models):
        raise ConfigError(f"{where}: a model is listed twice: {models}.")
    has_base = base is not None and base in models
    if spec.base == "required" and base is None:
        raise ConfigError(
            f"Merge method {spec.name!r} needs `base_model:` (the model the task vectors are "
            f"taken from); add `base_model: <path>` to the config."
        )
    if spec.base == "required" and not has_base:
        raise ConfigError(f"{where}: base model {base!r} must be one of the slice's sources.")
    count = len(models)
    non_base = count - int(has_base and spec.base != "ignored")
    if count < spec.min_inputs or (spec.max_inputs is not None and count > spec.max_inputs):
        want = (f"exactly {spec.min_inputs}" if spec.min_inputs == spec.max_inputs else
                f"at least {spec.min_inputs}" if spec.max_inputs is None else
                f"{spec.min_inputs} to {spec.max_inputs}")
        raise ConfigError(
            f"{where}: merge method {spec.name!r} takes {want} input models "
            f"(base included), got {count}: {models}."
        )
    if spec.min_non_base is not None and not (
        spec.min_non_base <= non_base <= (spec.max_non_base or non_base)
    ):
        raise ConfigError(
            f"{where}: merge method {spec.name!r} takes exactly {spec.min_non_base} models "
            f"besides the base, got {non_base}."
        )


def validate_plan(plan: MergePlan) -> MethodSpec:
    """Check the plan against its method: names, ranges, base model and number of inputs."""
    spec = get_method(plan.merge_method)
    names = [p.name for p in spec.params]
    for where, params, model in _scopes(plan):
        for name, setting in (params or {}).items():
            if name not in names:
                if not names:
                    raise ConfigError(f"{where}: method {spec.name!r} takes no parameters, "
                                      f"but {name!r} is set.")
                raise unknown("parameter", name, names, f"{where} for method {spec.name!r}")
            p = spec.param(name)
            if p.scope == "shared" and model is not None:
                raise ConfigError(
                    f"{where}: {name!r} is one value per tensor for {spec.name!r}, not per model; "
                    "set it under the global (or slice) `parameters:`."
                )
            for value in _literals(setting):
                p.check(value, where)
    if plan.models:
        models = [m.model for m in plan.models]
        if plan.base_model and plan.base_model not in models:
            if spec.base == "ignored":
                raise ConfigError(
                    f"base_model {plan.base_model!r} is not one of `models`, and {spec.name!r} "
                    "would merge it as one more input (as mergekit does). Remove `base_model`, "
                    "or list it under `models:` with its parameters."
                )
            models.append(plan.base_model)
        _check_inputs(spec, models, plan.base_model if spec.base != "ignored" else None,
                      "config.models")
    for i, s in enumerate(plan.slices or ()):
        base = s.base_model or plan.base_model
        _check_inputs(spec, [src.model for src in s.sources],
                      base if spec.base != "ignored" else None, f"config.slices[{i}]")
    return spec
