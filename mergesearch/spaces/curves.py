"""``layer_curves``: a per-layer interpolation curve per tensor filter, from K control points.

For slerp, nuslerp and linear over two models the curve is ``t`` (0 = first model, 1 = second);
genes ``t.<filter>.<k>`` in [0, 1]. Control point k sits at layer fraction k / (K - 1) and the
plan writes the K values as a mergekit gradient, so mergekit interpolates the same per-layer
values. For linear over N > 2 models each model gets its own weight curve, genes
``w.<filter>.<model>.<k>``, normalised by the merge.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any, Literal

from optuna.distributions import BaseDistribution, FloatDistribution
from pydantic import Field, ValidationInfo, field_validator

from mergesearch.errors import ConfigError
from mergesearch.merge.registry import MethodSpec
from mergesearch.plan import MergePlan
from mergesearch.spaces.base import SearchSpace, SpaceContext, SpaceOptions, lookup

Pinned = float | tuple[float, ...]


def _setting(key: str, value: Any) -> Any:
    """A t in [0, 1] or a list of per-model weights (>= 0, positive sum)."""
    key = f"{key}: " if key else ""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if not 0 <= value <= 1:
            raise ValueError(f"{key}t = {value!r} must be in [0, 1]")
        return float(value)
    if isinstance(value, (list, tuple)) and value and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        if any(v < 0 for v in value) or sum(value) <= 0:
            raise ValueError(f"{key}weights {list(value)} must be >= 0 with a positive sum")
        return tuple(float(v) for v in value)
    raise ValueError(
        f"{key}{value!r} must be {'search, ' if not key else ''}a t in [0, 1] or, for linear "
        "over N > 2 models, a list of N weights"
    )


class CurveOptions(SpaceOptions):
    kind: Literal["layer_curves"] = "layer_curves"
    control_points: int = Field(3, ge=2, le=64)
    pinned: dict[str, Pinned] = Field(
        default_factory=lambda: {"embed_tokens": 0.5, "lm_head": 0.5})
    filters: tuple[str, ...] = Field(("self_attn", "mlp"), validate_default=True)
    default: Literal["search"] | float | tuple[float, ...] = "search"
    weight_range: tuple[float, float] = (0.01, 1.0)

    @field_validator("pinned", mode="before")
    @classmethod
    def _pinned(cls, value: Any) -> Any:
        if not isinstance(value, dict):
            raise ValueError(  # noqa: TRY004 - pydantic reports ValueError only
                "must be a mapping {filter: t}, e.g. {embed_tokens: 0.5}")
        return {str(f): _setting(str(f), v) for f, v in value.items()}

    @field_validator("default", mode="before")
    @classmethod
    def _default(cls, value: Any) -> Any:
        return value if value == "search" else _setting("", value)

    @field_validator("filters")
    @classmethod
    def _filters(cls, value: tuple[str, ...], info: ValidationInfo) -> tuple[str, ...]:
        if not value:
            raise ValueError("give at least one filter, e.g. [self_attn, mlp]")
        entries = [*info.data.get("pinned", {}), *value]
        for i, f in enumerate(entries):
            if not f or f == "*":
                raise ValueError(f"filter {f!r} matches every tensor; use `default` for that")
            if f in entries[:i]:
                raise ValueError(f"filter {f!r} is listed twice (in pinned and/or filters)")
            for earlier in entries[:i]:
                if earlier in f:
                    raise ValueError(
                        f"filter {f!r} never applies: every tensor containing it also contains "
                        f"{earlier!r}, which comes first (pinned, then filters). Remove one")
        return value

    @field_validator("weight_range")
    @classmethod
    def _range(cls, value: tuple[float, float]) -> tuple[float, float]:
        lo, hi = value
        if not (0 < lo < hi):
            raise ValueError(f"must be [low, high] with 0 < low < high (a positive low keeps a "
                             f"layer's weights from summing to 0), got {list(value)}")
        return value


def _pair(ctx: SpaceContext) -> tuple[str, str] | None:
    """The two models a 2-model curve interpolates (first = t 0), or None."""
    if ctx.method == "slerp":
        if ctx.base is not None:
            return (ctx.base, ctx.models[0]) if len(ctx.models) == 1 else None
        return ctx.models if len(ctx.models) == 2 else None
    return ctx.models if len(ctx.models) == 2 else None


class LayerCurves(SearchSpace):
    """Per-filter ``t`` (or weight) curves over the depth of the model."""

    kind = "layer_curves"
    Options = CurveOptions
    methods = ("slerp", "nuslerp", "linear")
    options: CurveOptions

    def _check(self, ctx: SpaceContext, spec: MethodSpec) -> None:
        pair = _pair(ctx)
        n = len(ctx.models)
        if ctx.method == "slerp" and pair is None:
            raise ConfigError(
                f"Search space {self.name!r}: slerp interpolates exactly 2 models (a base and one "
                f"other, or two models of which the first acts as the base); the study has "
                f"{n} model(s){' and a base' if ctx.base else ''}. Use nuslerp/linear for more."
            )
        if ctx.method == "nuslerp" and pair is None:
            raise ConfigError(
                f"Search space {self.name!r}: nuslerp interpolates exactly 2 models besides the "
                f"base; the study has {n}. Use linear (one weight curve per model) for more."
            )
        if ctx.method == "linear" and n < 2:
            raise ConfigError(
                f"Search space {self.name!r} interpolates >= 2 models; the study has {n}."
            )
        for key, value in [*self.options.pinned.items(), ("default", self.options.default)]:
            if value == "search":
                continue
            if pair is not None and not isinstance(value, float):
                raise ConfigError(
                    f"Search space {self.name!r}: {key} = {list(value)} gives per-model weights, "
                    f"but {ctx.method} over 2 models takes one t in [0, 1], e.g. {key}: 0.5."
                )
            if pair is None and (not isinstance(value, tuple) or len(value) != n):
                raise ConfigError(
                    f"Search space {self.name!r}: linear over {n} models has one weight curve per "
                    f"model, so {key} must be a list of {n} weights (e.g. {[1.0] * n}), got "
                    f"{value!r}."
                )

    def _distributions(self, ctx: SpaceContext) -> Iterator[tuple[str, BaseDistribution]]:
        o = self.options
        if _pair(ctx) is not None:
            unit = FloatDistribution(0.0, 1.0)
            for f in o.filters:
                for k in range(o.control_points):
                    yield f"t.{f}.{k}", unit
            if o.default == "search":
                yield "t.default", unit
            return
        w = FloatDistribution(*o.weight_range)
        for f in o.filters:
            for i in range(len(ctx.models)):
                for k in range(o.control_points):
                    yield f"w.{f}.{i}.{k}", w
        if o.default == "search":
            for i in range(len(ctx.models)):
                yield f"w.default.{i}", w

    def _entries(self, curve: Mapping[str, Any], pinned: Mapping[str, Any], default: Any
                 ) -> list[dict[str, Any]]:
        out = [{"filter": f, "value": v} for f, v in pinned.items()]
        out += [{"filter": f, "value": curve[f]} for f in self.options.filters]
        return [*out, {"value": default}]

    def _build(self, genes: Mapping[str, Any], ctx: SpaceContext) -> dict[str, Any]:
        o = self.options
        k = range(o.control_points)
        pair = _pair(ctx)
        if pair is None:
            models = []
            for i, m in enumerate(ctx.models):
                curve = {f: [genes[f"w.{f}.{i}.{j}"] for j in k] for f in o.filters}
                pinned = {f: float(v[i]) for f, v in o.pinned.items()}
                default = genes["w.default." + str(i)] if o.default == "search" \
                    else float(o.default[i])
                models.append({"model": m, "parameters": {
                    "weight": self._entries(curve, pinned, default)}})
            return {"models": models, "merge_method": "linear"}
        t_curve = {f: [genes[f"t.{f}.{j}"] for j in k] for f in o.filters}
        t_default = genes["t.default"] if o.default == "search" else o.default
        if ctx.method == "slerp":
            return {
                "models": [{"model": pair[0]}, {"model": pair[1]}],
                "merge_method": "slerp",
                "base_model": pair[0],
                "parameters": {"t": self._entries(t_curve, o.pinned, t_default)},
            }
        one_minus = {f: [1.0 - v for v in c] for f, c in t_curve.items()}
        models = [
            {"model": pair[0], "parameters": {"weight": self._entries(
                one_minus, {f: 1.0 - v for f, v in o.pinned.items()}, 1.0 - t_default)}},
            {"model": pair[1], "parameters": {"weight": self._entries(
                t_curve, o.pinned, t_default)}},
        ]
        raw: dict[str, Any] = {"models": models, "merge_method": ctx.method}
        if ctx.method == "nuslerp" and ctx.base:
            raw["base_model"] = ctx.base
        return raw

    def _uniform_models(self, ctx: SpaceContext) -> tuple[str, ...]:
        pair = _pair(ctx)
        return tuple(pair) if ctx.method == "slerp" and pair else ctx.models

    # -- the way back ------------------------------------------------------------------------

    def _probe(self, ctx: SpaceContext, f: str | None) -> str | None:
        if f is not None:
            return f"model.layers.0.{f}.weight"
        taken = [*self.options.pinned, *self.options.filters]
        for name in ("model.layers.0.input_layernorm.weight", "model.norm.weight",
                     "model.layers.0.other.weight"):
            if not any(x in name for x in taken):
                return name
        return None

    def _invert(self, plan: MergePlan, ctx: SpaceContext) -> dict[str, Any] | None:
        o = self.options
        if not plan.models:
            return None
        positions = [j / (o.control_points - 1) for j in range(o.control_points)]
        pair = _pair(ctx)
        genes: dict[str, Any] = {}
        default_probe = self._probe(ctx, None)
        if o.default == "search" and default_probe is None:
            return None
        if pair is not None:
            def t_at(tensor: str, t: float) -> float:
                if ctx.method == "slerp":
                    return lookup(plan, "t", None, tensor, t)
                w0 = lookup(plan, "weight", pair[0], tensor, t)
                w1 = lookup(plan, "weight", pair[1], tensor, t)
                if w0 + w1 == 0:
                    raise ConfigError("weights sum to 0")
                return w1 / (w0 + w1)

            for f in o.filters:
                for j, t in enumerate(positions):
                    genes[f"t.{f}.{j}"] = t_at(self._probe(ctx, f), t)
            if o.default == "search":
                genes["t.default"] = t_at(default_probe, 0.0)
            return genes
        # N > 2 linear: one scale per curve family keeps the layer-wise ratios.
        families = [(f, self._probe(ctx, f), positions) for f in o.filters]
        if o.default == "search":
            families.append(("default", default_probe, [0.0]))
        for f, probe, points in families:
            raw = {(i, j): lookup(plan, "weight", m, probe, t)
                   for i, m in enumerate(ctx.models) for j, t in enumerate(points)}
            top = max(raw.values())
            if not top > 0:
                return None
            for (i, j), w in raw.items():
                name = f"w.default.{i}" if f == "default" else f"w.{f}.{i}.{j}"
                genes[name] = w / top * o.weight_range[1]
        return genes
