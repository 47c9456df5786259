"""The search-space contract: a study context, genes -> merge plan, and the way back.

No torch here: spaces are compiled and validated in the driver process.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
)
from pydantic import BaseModel, ConfigDict

from mergesearch.errors import ConfigError, UnknownNameError, suggest
from mergesearch.merge.registry import (
    MethodSpec,
    get_method,
    scale_free_weights,
    validate_plan,
)
from mergesearch.plan import (
    DTYPES,
    Conditional,
    MergePlan,
    layout,
    parse_plan,
    plan_to_dict,
    resolve,
)

SAMPLERS = ("random", "cmaes", "tpe", "gp", "nsgaii")

# Probe tensor names: equivalence of two plans is checked on these (plus one per filter).
_LAYER_PROBES = (
    "self_attn.q_proj.weight", "self_attn.o_proj.weight", "mlp.gate_proj.weight",
    "mlp.down_proj.weight", "input_layernorm.weight", "post_attention_layernorm.weight",
)
_EDGE_PROBES = ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight")
_TOLERANCE = 1e-9


@dataclass(frozen=True)
class SpaceContext:
    """What a space needs to know about the study: method, sources, depth, dtype, sampler."""

    method: str
    models: tuple[str, ...]
    base: str | None
    num_layers: int
    dtype: str | None = None
    sampler: str = "tpe"
    calibration: Any = None
    """The study's calibration (a ``plan.Calibration``), written into plans of importance methods."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "models", tuple(self.models))
        get_method(self.method)
        if not self.models or not all(isinstance(m, str) and m for m in self.models):
            raise ConfigError(f"The study needs at least one source model; got {list(self.models)}.")
        dup = sorted({m for m in self.models if self.models.count(m) > 1})
        if dup:
            raise ConfigError(f"Source model {dup[0]!r} is listed twice; list each model once.")
        if self.base is not None and self.base in self.models:
            raise ConfigError(
                f"The base model {self.base!r} is also listed as a source model; list it only as "
                "the base."
            )
        if isinstance(self.num_layers, bool) or not isinstance(self.num_layers, int) \
                or self.num_layers < 1:
            raise ConfigError(f"num_layers must be a positive integer, got {self.num_layers!r}.")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise UnknownNameError(f"Unknown dtype {self.dtype!r}.{suggest(self.dtype, DTYPES)}")
        if self.sampler not in SAMPLERS:
            raise UnknownNameError(
                f"Unknown sampler {self.sampler!r}.{suggest(self.sampler, SAMPLERS)}"
            )


class SpaceOptions(BaseModel):
    """Base of every kind's options: frozen, unknown keys rejected."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class SearchSpace(ABC):
    """A family of merge plans indexed by genes (named Optuna parameters).

    Subclasses set ``kind``, ``Options`` and ``methods`` (the merge methods they fit) and
    implement ``_check``, ``_distributions``, ``_build`` and ``_invert``.
    """

    kind: ClassVar[str]
    Options: ClassVar[type[SpaceOptions]]
    methods: ClassVar[tuple[str, ...] | None] = None

    def __init__(self, options: SpaceOptions, name: str | None = None,
                 path: Path | None = None, description: str = ""):
        self.options = options
        self.name = name or self.kind
        self.path = path
        self.description = description

    def __repr__(self) -> str:
        where = f" from {self.path}" if self.path else ""
        return f"SearchSpace({self.name!r}{where}: {self.as_dict()})"

    def as_dict(self) -> dict[str, Any]:
        """The space's file content: ``kind`` and every option (defaults filled in)."""
        return {"kind": self.kind, **self.options.model_dump(mode="json", exclude={"kind"})}

    # -- the contract ------------------------------------------------------------------------

    def check(self, ctx: SpaceContext) -> None:
        """ConfigError if the space cannot search this method / these sources."""
        if self.methods is not None and ctx.method not in self.methods:
            raise ConfigError(
                f"Search space {self.name!r} (kind {self.kind}) does not fit merge method "
                f"{ctx.method!r}: it searches {', '.join(self.methods)}. Pick one of those methods, "
                "or a space that fits (`method_params` fits every method)."
            )
        self._check(ctx, get_method(ctx.method))
        try:
            self._compile(_midpoint(dict(self._distributions(ctx))), ctx)
        except ConfigError as err:
            raise ConfigError(
                f"Search space {self.name!r} does not fit this study ({ctx.method}, "
                f"{len(ctx.models)} model(s){', with a base' if ctx.base else ', no base'}): {err}"
            ) from None

    def distributions(self, ctx: SpaceContext) -> dict[str, BaseDistribution]:
        """Gene name -> distribution, in a stable order."""
        self.check(ctx)
        return dict(self._distributions(ctx))

    def to_plan(self, genes: Mapping[str, Any], ctx: SpaceContext) -> MergePlan:
        """The merge plan of these genes (valid for the registry, mergekit-readable)."""
        dists = self.distributions(ctx)
        return self._compile(check_genes(genes, dists, self.name), ctx)

    def genes_from_plan(self, plan: MergePlan, ctx: SpaceContext) -> dict[str, Any] | None:
        """Genes whose plan merges exactly what ``plan`` merges, or None if the space cannot.

        ``dtype``/``out_dtype`` are ignored (the study's dtype wins); everything else must match
        on every tensor, checked by resolving both plans on standard decoder tensor names.
        """
        dists = self.distributions(ctx)
        if plan.merge_method != ctx.method:
            return None
        try:
            genes = self._invert(plan, ctx)
        except ConfigError:
            return None
        if genes is None or set(genes) != set(dists):
            return None
        out: dict[str, Any] = {}
        for name, dist in dists.items():
            value = _snap(genes[name], dist)
            if value is None:
                return None
            out[name] = value
        try:
            compiled = self._compile(out, ctx)
        except ConfigError:
            return None
        return out if equivalent(compiled, plan, ctx) else None

    def uniform_plan(self, ctx: SpaceContext) -> MergePlan:
        """The uniform-merge baseline: linear, equal weights over the models the space mixes."""
        models = self._uniform_models(ctx)
        raw: dict[str, Any] = {
            "models": [{"model": m, "parameters": {"weight": 1.0 / len(models)}} for m in models],
            "merge_method": "linear",
        }
        if ctx.dtype:
            raw["dtype"] = ctx.dtype
        return parse_plan(raw, "uniform merge")

    # -- for subclasses ----------------------------------------------------------------------

    def _uniform_models(self, ctx: SpaceContext) -> tuple[str, ...]:
        return ctx.models

    def _compile(self, genes: Mapping[str, Any], ctx: SpaceContext) -> MergePlan:
        raw = self._build(genes, ctx)
        if ctx.dtype:
            raw["dtype"] = ctx.dtype
        if ctx.calibration is not None and get_method(ctx.method).importance:
            raw["calibration"] = ctx.calibration.model_dump(mode="json", exclude_none=True)
        plan = parse_plan(raw, f"compiled by search space {self.name!r}")
        validate_plan(plan)
        return plan

    @abstractmethod
    def _check(self, ctx: SpaceContext, spec: MethodSpec) -> None: ...

    @abstractmethod
    def _distributions(self, ctx: SpaceContext) -> Iterator[tuple[str, BaseDistribution]]: ...

    @abstractmethod
    def _build(self, genes: Mapping[str, Any], ctx: SpaceContext) -> dict[str, Any]: ...

    @abstractmethod
    def _invert(self, plan: MergePlan, ctx: SpaceContext) -> dict[str, Any] | None: ...


# ---------------------------------------------------------------------------------------------
# Genes


def check_genes(genes: Mapping[str, Any], dists: Mapping[str, BaseDistribution],
                space: str) -> dict[str, Any]:
    """The genes as plain values, or a ConfigError naming a missing, extra or bad gene."""
    missing = [n for n in dists if n not in genes]
    if missing:
        raise ConfigError(
            f"Search space {space!r} needs genes {missing[:5]}{' ...' if len(missing) > 5 else ''}"
            f"; got {sorted(genes)[:5]}."
        )
    for name in genes:
        if name not in dists:
            raise UnknownNameError(
                f"Gene {name!r} is not part of search space {space!r}.{suggest(name, dists)}"
            )
    out: dict[str, Any] = {}
    for name, dist in dists.items():
        value = genes[name]
        if isinstance(dist, FloatDistribution):
            ok = (isinstance(value, (int, float)) and not isinstance(value, bool)
                  and math.isfinite(value) and dist.low <= value <= dist.high)
            if not ok:
                raise ConfigError(
                    f"Gene {name!r} = {value!r} of search space {space!r} must be a number in "
                    f"[{dist.low:g}, {dist.high:g}]."
                )
            out[name] = float(value)
        elif isinstance(dist, CategoricalDistribution):
            if value not in dist.choices or isinstance(value, bool) != isinstance(
                    dist.choices[0], bool):
                raise ConfigError(
                    f"Gene {name!r} = {value!r} of search space {space!r} must be one of "
                    f"{list(dist.choices)}."
                )
            out[name] = value
        else:
            raise ConfigError(f"Gene {name!r}: unsupported distribution {dist!r}.")
    return out


def _midpoint(dists: Mapping[str, BaseDistribution]) -> dict[str, Any]:
    return {n: (d.low + d.high) / 2 if isinstance(d, FloatDistribution) else d.choices[0]
            for n, d in dists.items()}


def _snap(value: Any, dist: BaseDistribution) -> Any:
    """`value` inside `dist` (float bounds widened by a rounding tolerance), else None."""
    if isinstance(dist, CategoricalDistribution):
        return value if value in dist.choices else None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    slack = 1e-9 * max(1.0, dist.high - dist.low)
    if value < dist.low - slack or value > dist.high + slack:
        return None
    return min(max(float(value), dist.low), dist.high)


# ---------------------------------------------------------------------------------------------
# Reading a plan back: point look-ups and semantic equivalence


def lookup(plan: MergePlan, param: str, model: str | None, tensor: str, t: float) -> Any:
    """The value `param` takes for `model` (None: shared) on `tensor` at layer fraction `t`.

    Only for ``models:`` plans (one implicit full-depth slice).
    """
    spec = get_method(plan.merge_method).param(param)
    scopes = []
    if model is not None:
        scopes += [m.parameters for m in plan.models or () if m.model == model]
    scopes.append(plan.parameters)
    return resolve(spec, scopes, tensor, t, model)


def plan_filters(plan: MergePlan) -> list[str]:
    """The tensor filters a plan's conditional parameters name, in order of first appearance."""
    found: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, Conditional):
            if node.filter not in (None, "*") and node.filter not in found:
                found.append(node.filter)
        elif isinstance(node, (tuple, list)):
            for e in node:
                walk(e)

    scopes = [plan.parameters, *(m.parameters for m in plan.models or ())]
    for s in plan.slices or ():
        scopes += [s.parameters, *(src.parameters for src in s.sources)]
    for scope in scopes:
        for setting in (scope or {}).values():
            walk(setting)
    return found


def resolved_values(plan: MergePlan, num_layers: int, filters: set[str] = frozenset()
                    ) -> dict[tuple[str, str | None, str], Any]:
    """(tensor, model or None, parameter) -> value, over probe tensors of every layer.

    Weights of linear (normalised) and nuslerp are divided by their sum, since only their
    ratios change the merge.
    """
    spec = get_method(plan.merge_method)
    lay = layout(plan, lambda _: num_layers)
    layer_suffixes = [*_LAYER_PROBES, *(f"{f}.weight" for f in sorted(filters))]
    edges = [*_EDGE_PROBES, *(f"model.{f}.weight" for f in sorted(filters))]
    probes = []
    for name in edges:
        s = lay.slices[0] if "embed" in name else lay.slices[-1]
        probes.append((name, s, 0.0))
    for out_layer, s, _, t in lay.out_layers():
        probes += [(f"model.layers.{out_layer}.{suffix}", s, t) for suffix in layer_suffixes]
    values: dict[tuple[str, str | None, str], Any] = {
        (f"slice {s.index}", s.base_model, "sources"):
            frozenset((src.model, src.layer_range) for src in s.sources)
        for s in lay.slices
    }
    for name, s, t in probes:
        shared = {p.name: resolve(p, lay.scopes(s, None), name, t) for p in spec.shared_params()}
        values.update({(name, None, k): v for k, v in shared.items()})
        weights: dict[str, float] = {}
        for src in s.sources:
            if spec.base != "ignored" and src.model == s.base_model:
                params = [p for p in spec.input_params() if p.scope == "input"]
            else:
                params = list(spec.input_params())
            for p in params:
                value = resolve(p, lay.scopes(s, src.model), name, t, src.model)
                values[(name, src.model, p.name)] = value
                if p.name == "weight":
                    weights[src.model] = value
        scale_free = scale_free_weights(spec.name, shared.get("normalize"))
        total = sum(weights.values())
        if scale_free and total != 0:
            for model, w in weights.items():
                values[(name, model, "weight")] = w / total
    return values


def _close(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool) or a is None or b is None:
        return a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(a, b, rel_tol=_TOLERANCE, abs_tol=_TOLERANCE)
    return a == b


def equivalent(a: MergePlan, b: MergePlan, ctx: SpaceContext) -> bool:
    """Whether two plans merge the same inputs with the same parameters on every probe tensor.

    dtype and out_dtype are not compared.
    """
    da, db = plan_to_dict(a), plan_to_dict(b)
    for key in ("tokenizer_source", "chat_template"):
        if da.get(key) != db.get(key):
            return False
    if a.merge_method != b.merge_method or set(a.referenced_models()) != set(b.referenced_models()):
        return False
    try:
        filters = set(plan_filters(a)) | set(plan_filters(b))
        va = resolved_values(a, ctx.num_layers, filters)
        vb = resolved_values(b, ctx.num_layers, filters)
    except ConfigError:
        return False
    return va.keys() == vb.keys() and all(_close(va[k], vb[k]) for k in va)
