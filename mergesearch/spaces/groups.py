"""``layer_groups``: a weight (and density) per model and per contiguous group of layers, for
the task-arithmetic family (task_arithmetic, ties, dare_ties, dare_linear, breadcrumbs,
breadcrumbs_ties, della, della_linear).

Each (model, parameter) is written as a gradient of exactly ``num_layers`` values, value i being
the value of layer i's group. mergekit reads a gradient at position ``i / (n - 1) * (n - 1) = i``
for layer i, so every layer gets exactly its group's value. Tensors outside the layers
(embeddings, final norm, lm_head) are read at position 0, i.e. they get the first group's values
unless ``embeddings: true`` gives embed_tokens and lm_head their own genes.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any, Literal

from optuna.distributions import BaseDistribution, FloatDistribution
from pydantic import Field, field_validator

from mergesearch.errors import ConfigError, unknown
from mergesearch.merge.registry import (
    METHODS,
    MethodSpec,
    get_method,
    task_arithmetic_variant,
)
from mergesearch.plan import MergePlan, layer_fraction
from mergesearch.spaces.base import SearchSpace, SpaceContext, SpaceOptions, lookup

TASK_ARITHMETIC_FAMILY = tuple(n for n, m in METHODS.items() if m.family == "task_arithmetic")
EDGE_FILTERS = ("embed_tokens", "lm_head")
_DELLA_MARGIN = 0.01


def _range(value: tuple[float, float]) -> tuple[float, float]:
    lo, hi = value
    if not lo < hi:
        raise ValueError(f"must be [low, high] with low < high, got {list(value)}")
    return value


def has_density(method: str) -> bool:
    """Whether density changes the merge (the method sparsifies its task vectors)."""
    spec = get_method(method)
    return spec.family == "task_arithmetic" and \
        task_arithmetic_variant(method).sparsification is not None


def density_range(spec: MethodSpec, given: tuple[float, float] | None, epsilon_high: float,
                  where: str) -> tuple[float, float]:
    """The density range to search; for DELLA kept inside (epsilon, 1 - epsilon)."""
    param = spec.param("density")
    if given is None:
        lo, hi = param.search
        if "epsilon" in {p.name for p in spec.params}:
            lo = max(lo, epsilon_high + _DELLA_MARGIN)
            hi = min(hi, 1 - epsilon_high - _DELLA_MARGIN)
            if not lo < hi:
                raise ConfigError(f"{where}: epsilon up to {epsilon_high:g} leaves no valid "
                                  "density; lower epsilon below 0.45.")
        return lo, hi
    lo, hi = given
    if lo <= 0 or hi > 1:
        raise ConfigError(f"{where}: density range {list(given)} must lie in (0, 1].")
    if "epsilon" in {p.name for p in spec.params} and (
            lo - epsilon_high <= 0 or hi + epsilon_high >= 1):
        raise ConfigError(
            f"{where}: {spec.name} needs density +/- epsilon inside (0, 1); with epsilon up to "
            f"{epsilon_high:g} the density range must lie inside ({epsilon_high:g}, "
            f"{1 - epsilon_high:g}), e.g. [{epsilon_high + 0.05:.2f}, {1 - epsilon_high - 0.05:.2f}]."
            " Narrow the range or lower epsilon."
        )
    return lo, hi


def check_fixed(spec: MethodSpec, fixed: Mapping[str, Any], where: str,
                exclude: tuple[str, ...] = ()) -> None:
    for name, value in fixed.items():
        if name in exclude:
            raise ConfigError(f"{where}: {name!r} is searched by this space; remove it from `fixed`.")
        if name not in {p.name for p in spec.params}:
            raise unknown("parameter", name, [p.name for p in spec.params],
                          f"{where} `fixed` for method {spec.name!r}")
        spec.param(name).check(value, f"{where} fixed")


class GroupOptions(SpaceOptions):
    kind: Literal["layer_groups"] = "layer_groups"
    groups: int | Literal["layers"] = 4
    weight: tuple[float, float] | None = None
    density: tuple[float, float] | None = None
    search_density: bool = True
    embeddings: bool = False
    fixed: dict[str, bool | float] = Field(default_factory=dict)

    @field_validator("groups", mode="before")
    @classmethod
    def _groups(cls, value: Any) -> Any:
        if value == "layers" or (isinstance(value, int) and not isinstance(value, bool)
                                 and value >= 1):
            return value
        raise ValueError(f"must be a positive number of layer groups (e.g. 4) or 'layers' (one "
                         f"group per layer), got {value!r}")

    @field_validator("weight", "density")
    @classmethod
    def _ranges(cls, value: tuple[float, float] | None) -> tuple[float, float] | None:
        return None if value is None else _range(value)


class LayerGroups(SearchSpace):
    """Per-model, per-layer-group weights and densities with a base model."""

    kind = "layer_groups"
    Options = GroupOptions
    methods = TASK_ARITHMETIC_FAMILY
    options: GroupOptions

    def num_groups(self, ctx: SpaceContext) -> int:
        g = self.options.groups
        return ctx.num_layers if g == "layers" else min(g, ctx.num_layers)

    def group_of(self, layer: int, ctx: SpaceContext) -> int:
        """The group of a layer: contiguous groups whose sizes differ by at most one."""
        return layer * self.num_groups(ctx) // ctx.num_layers

    def _searches_density(self, ctx: SpaceContext) -> bool:
        return self.options.search_density and has_density(ctx.method)

    def _weight_range(self, spec: MethodSpec) -> tuple[float, float]:
        return self.options.weight or spec.param("weight").search

    def _density_range(self, spec: MethodSpec) -> tuple[float, float]:
        eps = float(self.options.fixed.get("epsilon", 0.15))
        return density_range(spec, self.options.density, eps,
                             f"Search space {self.name!r}")

    def _check(self, ctx: SpaceContext, spec: MethodSpec) -> None:
        where = f"Search space {self.name!r}"
        if ctx.base is None:
            raise ConfigError(
                f"{where}: {ctx.method} adds task vectors to a base model; set `sources.base`."
            )
        if self.options.density is not None and not self.options.search_density:
            raise ConfigError(
                f"{where}: `density` is a search range but `search_density` is false; remove "
                "one of them."
            )
        if self.options.density is not None and not has_density(ctx.method):
            raise ConfigError(
                f"{where}: {ctx.method} does not sparsify, so density has no effect; remove "
                "`density` from the space (or use ties/dare_ties/...)."
            )
        searched = ("weight", "density") if self._searches_density(ctx) else ("weight",)
        check_fixed(spec, self.options.fixed, where, searched)
        if self._searches_density(ctx):
            self._density_range(spec)

    def _distributions(self, ctx: SpaceContext) -> Iterator[tuple[str, BaseDistribution]]:
        spec = get_method(ctx.method)
        params = [("weight", FloatDistribution(*self._weight_range(spec)))]
        if self._searches_density(ctx):
            params.append(("density", FloatDistribution(*self._density_range(spec))))
        slots = [str(g) for g in range(self.num_groups(ctx))]
        if self.options.embeddings:
            slots.append("embed")
        for name, dist in params:
            for i in range(len(ctx.models)):
                for slot in slots:
                    yield f"{name}.{i}.{slot}", dist

    def _setting(self, genes: Mapping[str, Any], name: str, i: int, ctx: SpaceContext) -> Any:
        n = ctx.num_layers
        values = [genes[f"{name}.{i}.{self.group_of(layer, ctx)}"] for layer in range(n)]
        layered: Any = values if n > 1 else values[0]
        if not self.options.embeddings:
            return layered
        edge = genes[f"{name}.{i}.embed"]
        return [*({"filter": f, "value": edge} for f in EDGE_FILTERS), {"value": layered}]

    def _build(self, genes: Mapping[str, Any], ctx: SpaceContext) -> dict[str, Any]:
        names = ["weight", "density"] if self._searches_density(ctx) else ["weight"]
        models = [{"model": m, "parameters": {p: self._setting(genes, p, i, ctx) for p in names}}
                  for i, m in enumerate(ctx.models)]
        raw: dict[str, Any] = {"models": models, "merge_method": ctx.method,
                               "base_model": ctx.base}
        if self.options.fixed:
            raw["parameters"] = dict(self.options.fixed)
        return raw

    def _invert(self, plan: MergePlan, ctx: SpaceContext) -> dict[str, Any] | None:
        if not plan.models or plan.base_model != ctx.base:
            return None
        names = ["weight", "density"] if self._searches_density(ctx) else ["weight"]
        first = {}
        for layer in range(ctx.num_layers):
            first.setdefault(self.group_of(layer, ctx), layer)
        genes = {}
        for name in names:
            for i, m in enumerate(ctx.models):
                for g, layer in first.items():
                    genes[f"{name}.{i}.{g}"] = lookup(
                        plan, name, m, f"model.layers.{layer}.mlp.gate_proj.weight",
                        layer_fraction(layer, ctx.num_layers))
                if self.options.embeddings:
                    genes[f"{name}.{i}.embed"] = lookup(plan, name, m,
                                                        "model.embed_tokens.weight", 0.0)
        return genes
