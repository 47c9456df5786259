"""``dirichlet_linear``: linear merge weights on the simplex over N >= 2 models.

Two parameterisations, picked by the sampler:

* ``random``: genes ``u.<i>`` (one per model) in [U_LOW, U_HIGH]; weight_i = G^-1(u_i) / sum,
  with G the Gamma(alpha, 1) CDF. Independent uniform u gives an exact Dirichlet(alpha) draw.
* every other sampler: additive log-ratio, genes ``z.<i>`` for the first N-1 models in
  [-bound, bound]; weights = softmax(z_0, ..., z_{N-2}, 0). z = 0 is the uniform merge.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Literal

from optuna.distributions import BaseDistribution, FloatDistribution
from pydantic import Field

from mergesearch.errors import ConfigError
from mergesearch.merge.registry import MethodSpec
from mergesearch.plan import MergePlan
from mergesearch.spaces.base import SearchSpace, SpaceContext, SpaceOptions, lookup

U_LOW, U_HIGH = 1e-6, 1 - 1e-6
_PROBE = "model.layers.0.mlp.gate_proj.weight"


def dirichlet_weights(u: Sequence[float], alpha: float) -> list[float]:
    """Weights from uniforms by the Gamma(alpha) inverse CDF, normalised (a Dirichlet draw)."""
    from scipy.special import gammaincinv

    x = [float(gammaincinv(alpha, ui)) for ui in u]
    total = sum(x)
    return [xi / total for xi in x]


def alr_weights(z: Sequence[float]) -> list[float]:
    """softmax(z_0, ..., z_{N-2}, 0): the inverse additive log-ratio transform."""
    logits = [*z, 0.0]
    top = max(logits)
    e = [math.exp(v - top) for v in logits]
    total = sum(e)
    return [v / total for v in e]


class DirichletOptions(SpaceOptions):
    kind: Literal["dirichlet_linear"] = "dirichlet_linear"
    alpha: float = Field(1.0, gt=0, le=1000, description="Dirichlet concentration (random sampler)")
    bound: float = Field(4.0, gt=0, le=50, description="|z| limit of the log-ratio genes")


class DirichletLinear(SearchSpace):
    """Linear weights over the study's models (the base is not mixed)."""

    kind = "dirichlet_linear"
    Options = DirichletOptions
    methods = ("linear",)
    options: DirichletOptions

    def _check(self, ctx: SpaceContext, spec: MethodSpec) -> None:
        if len(ctx.models) < 2:
            raise ConfigError(
                f"Search space {self.name!r} mixes N >= 2 models, but the study has "
                f"{len(ctx.models)} ({', '.join(ctx.models)}). Add models to `sources.models`."
            )

    def _distributions(self, ctx: SpaceContext) -> Iterator[tuple[str, BaseDistribution]]:
        if ctx.sampler == "random":
            for i in range(len(ctx.models)):
                yield f"u.{i}", FloatDistribution(U_LOW, U_HIGH)
        else:
            b = self.options.bound
            for i in range(len(ctx.models) - 1):
                yield f"z.{i}", FloatDistribution(-b, b)

    def weights(self, genes: Mapping[str, Any], ctx: SpaceContext) -> list[float]:
        """The normalised weights of ``ctx.models`` for these genes."""
        n = len(ctx.models)
        if ctx.sampler == "random":
            return dirichlet_weights([genes[f"u.{i}"] for i in range(n)], self.options.alpha)
        return alr_weights([genes[f"z.{i}"] for i in range(n - 1)])

    def _build(self, genes: Mapping[str, Any], ctx: SpaceContext) -> dict[str, Any]:
        weights = self.weights(genes, ctx)
        return {
            "models": [{"model": m, "parameters": {"weight": w}}
                       for m, w in zip(ctx.models, weights)],
            "merge_method": "linear",
        }

    def _invert(self, plan: MergePlan, ctx: SpaceContext) -> dict[str, Any] | None:
        if not plan.models or set(plan.referenced_models()) != set(ctx.models):
            return None
        w = [lookup(plan, "weight", m, _PROBE, 0.0) for m in ctx.models]
        if any(not (wi > 0) for wi in w):
            return None
        total = sum(w)
        w = [wi / total for wi in w]
        if ctx.sampler == "random":
            from scipy.special import gammainc

            alpha = self.options.alpha
            scale = alpha * len(w)
            return {f"u.{i}": float(gammainc(alpha, scale * wi)) for i, wi in enumerate(w)}
        return {f"z.{i}": math.log(wi / w[-1]) for i, wi in enumerate(w[:-1])}
