"""``method_params``: every searchable parameter of any registry method, as flat genes.

A float parameter is searched over its registry ``search`` range (or ``ranges:`` in the file), a
bool as a categorical {false, true}. Shared parameters are one gene ``<param>``; per-model ones
one gene per model, ``<param>.<model index>``. ``fixed:`` sets parameters that are not searched.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any, Literal

from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
)
from pydantic import Field, field_validator

from mergesearch.errors import ConfigError, suggest, unknown
from mergesearch.merge.registry import (
    METHODS,
    MethodSpec,
    ParamSpec,
    check_linear_weights,
    get_method,
    scale_free_weights,
)
from mergesearch.plan import MergePlan
from mergesearch.spaces.base import SearchSpace, SpaceContext, SpaceOptions, lookup
from mergesearch.spaces.groups import density_range, has_density

ALL_PARAMS = tuple(sorted({p.name for m in METHODS.values() for p in m.params}))
# Methods whose per-model weights are normalised to sum to one.
NORMALISED = ("linear", "importance_linear", "fisher")
# Parameters that never change the merged weights (int8_mask only saves memory).
INERT = ("int8_mask",)
_PROBE = "model.layers.0.mlp.gate_proj.weight"


class ParamOptions(SpaceOptions):
    kind: Literal["method_params"] = "method_params"
    ranges: dict[str, tuple[float, float]] = Field(default_factory=dict)
    fixed: dict[str, bool | float] = Field(default_factory=dict)

    @field_validator("ranges", "fixed")
    @classmethod
    def _names(cls, value: dict[str, Any]) -> dict[str, Any]:
        for name in value:
            if name not in ALL_PARAMS:
                raise ValueError(f"unknown parameter {name!r}.{suggest(name, ALL_PARAMS)}")
        return value

    @field_validator("ranges")
    @classmethod
    def _ranges(cls, value: dict[str, tuple[float, float]]) -> dict[str, tuple[float, float]]:
        for name, (lo, hi) in value.items():
            if not lo < hi:
                raise ValueError(f"{name}: [low, high] needs low < high, got {[lo, hi]}")
        return value


def roles(ctx: SpaceContext, spec: MethodSpec) -> tuple[str | None, tuple[str, ...]]:
    """(base model the plan names, the other inputs). slerp without a base uses the first model."""
    if spec.base == "ignored":
        return None, ctx.models
    if ctx.base is not None:
        return ctx.base, ctx.models
    if spec.name == "slerp":
        return ctx.models[0], ctx.models[1:]
    return None, ctx.models


class MethodParams(SearchSpace):
    """The method's own parameters, with the registry's ranges."""

    kind = "method_params"
    Options = ParamOptions
    methods = None
    options: ParamOptions

    def _where(self) -> str:
        return f"Search space {self.name!r}"

    def _searched(self, spec: MethodSpec) -> list[tuple[ParamSpec, BaseDistribution]]:
        o = self.options
        out: list[tuple[ParamSpec, BaseDistribution]] = []
        for p in spec.params:
            if p.name in o.fixed or p.name in INERT:
                continue
            if p.name == "density" and not has_density(spec.name):
                continue
            if p.kind == "bool":
                out.append((p, CategoricalDistribution((False, True))))
            elif p.name == "density" and "epsilon" in {q.name for q in spec.params}:
                eps = self._epsilon_high(spec)
                out.append((p, FloatDistribution(*density_range(
                    spec, o.ranges.get("density"), eps, self._where()))))
            elif p.name in o.ranges:
                out.append((p, FloatDistribution(*o.ranges[p.name])))
            elif p.search is not None:
                out.append((p, FloatDistribution(*p.search)))
        return out

    def _epsilon_high(self, spec: MethodSpec) -> float:
        o = self.options
        if "epsilon" in o.fixed:
            return float(o.fixed["epsilon"])
        return (o.ranges.get("epsilon") or spec.param("epsilon").search)[1]

    def _check(self, ctx: SpaceContext, spec: MethodSpec) -> None:
        o, where = self.options, self._where()
        names = [p.name for p in spec.params]
        for name in [*o.ranges, *o.fixed]:
            if name not in names:
                raise unknown("parameter", name, names, f"{where} for method {spec.name!r}")
        for name, (lo, hi) in o.ranges.items():
            p = spec.param(name)
            if name in o.fixed:
                raise ConfigError(f"{where}: {name!r} is both in `ranges` and `fixed`; keep one.")
            if p.kind == "bool":
                raise ConfigError(f"{where}: {name!r} is true/false, searched as a choice; "
                                  "remove it from `ranges` (or set it under `fixed`).")
            p.check(lo, f"{where} ranges.{name}")
            p.check(hi, f"{where} ranges.{name}")
            if name == "density" and not has_density(spec.name):
                raise ConfigError(f"{where}: {spec.name} does not sparsify, so density has no "
                                  "effect; remove it from `ranges`.")
        for name, value in o.fixed.items():
            spec.param(name).check(value, f"{where} fixed")
        base, _ = roles(ctx, spec)
        if spec.needs_base and base is None:
            raise ConfigError(f"{where}: {spec.name} needs a base model; set `sources.base`.")

    def _targets(self, ctx: SpaceContext, spec: MethodSpec, p: ParamSpec) -> list[int | None]:
        if p.scope == "shared":
            return [None]
        base, inputs = roles(ctx, spec)
        n = len(inputs) + (1 if p.scope == "input" and base is not None else 0)
        return list(range(n))

    def _ordered(self, ctx: SpaceContext, spec: MethodSpec) -> list[str]:
        """The models in per-model gene order: the inputs, then the base for `input` params."""
        base, inputs = roles(ctx, spec)
        return [*inputs, *([base] if base is not None else [])]

    def _distributions(self, ctx: SpaceContext) -> Iterator[tuple[str, BaseDistribution]]:
        spec = get_method(ctx.method)
        for p, dist in self._searched(spec):
            for i in self._targets(ctx, spec, p):
                yield (p.name if i is None else f"{p.name}.{i}"), dist

    def _build(self, genes: Mapping[str, Any], ctx: SpaceContext) -> dict[str, Any]:
        spec = get_method(ctx.method)
        base, inputs = roles(ctx, spec)
        ordered = self._ordered(ctx, spec)
        shared: dict[str, Any] = dict(self.options.fixed)
        per_model: dict[str, dict[str, Any]] = {m: {} for m in ordered}
        for p, _ in self._searched(spec):
            for i in self._targets(ctx, spec, p):
                if i is None:
                    shared[p.name] = genes[p.name]
                else:
                    per_model[ordered[i]][p.name] = genes[f"{p.name}.{i}"]
        if spec.name in NORMALISED and shared.get("normalize", True):
            check_linear_weights([per_model[m].get("weight", shared.get("weight", 0.0))
                                  for m in ordered], f"search space {self.name!r}")
        listed = [*([base] if base is not None else []), *inputs]
        models = [{"model": m, **({"parameters": per_model[m]} if per_model[m] else {})}
                  for m in listed]
        raw: dict[str, Any] = {"models": models, "merge_method": spec.name}
        if base is not None:
            raw["base_model"] = base
        if shared:
            raw["parameters"] = shared
        return raw

    def _invert(self, plan: MergePlan, ctx: SpaceContext) -> dict[str, Any] | None:
        if not plan.models:
            return None
        spec = get_method(ctx.method)
        ordered = self._ordered(ctx, spec)
        genes = {}
        for p, _ in self._searched(spec):
            for i in self._targets(ctx, spec, p):
                model = None if i is None else ordered[i]
                name = p.name if i is None else f"{p.name}.{i}"
                genes[name] = lookup(plan, p.name, model, _PROBE, 0.0)
        weights = [n for n in genes if n.startswith("weight.")]
        scale_free = scale_free_weights(spec.name, spec.name != "linear" or lookup(plan, "normalize", None, _PROBE, 0.0))
        top = max((genes[n] for n in weights), default=0.0)
        if scale_free and top > 0:
            high = dict(self._distributions(ctx))[weights[0]].high
            genes.update({n: genes[n] / top * high for n in weights})
        return genes
