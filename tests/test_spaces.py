"""Search spaces: genes -> valid merge plans, their per-layer values as mergekit reads them,
the Dirichlet parameterisations, the way back from a plan, bad input, and real merges."""

from __future__ import annotations

import itertools
import math
import random
from pathlib import Path

import numpy as np
import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution

from mergesearch.errors import ConfigError, UnknownNameError
from mergesearch.io.checkpoint import open_checkpoints
from mergesearch.merge.explain import explain
from mergesearch.merge.registry import METHODS, get_method, validate_plan
from mergesearch.merge.tasks import MergeTasks
from mergesearch.plan import dump_plan, layer_fraction, loads_plan, parse_plan
from mergesearch.spaces import (
    KINDS,
    SpaceContext,
    default_spaces_dir,
    equivalent,
    list_spaces,
    load_space,
    space_from_dict,
)
from mergesearch.spaces.params import NORMALISED

SHIPPED = ("dirichlet_linear", "slerp_curves", "layerwise_ties_dare", "task_arithmetic_groups",
           "method_params")


def _random_genes(dists, rng: random.Random) -> dict:
    return {k: rng.uniform(d.low, d.high) if isinstance(d, FloatDistribution)
            else rng.choice(d.choices) for k, d in dists.items()}


def _compile(space, ctx, genes):
    plan = space.to_plan(genes, ctx)
    validate_plan(plan)
    assert loads_plan(dump_plan(plan)) == plan, "dump/reload changes the plan"
    return plan


def _fitting_contexts():
    for method, n, base in itertools.product(METHODS, (1, 2, 3), (None, "base")):
        models = tuple(f"m{i}" for i in range(n))
        for sampler in ("tpe", "random"):
            yield SpaceContext(method, models, base, num_layers=5, dtype="float32",
                               sampler=sampler)


# ---------------------------------------------------------------------------------------------
# Shipped files


def test_every_shipped_space_loads_and_compiles_for_a_context_it_fits():
    spaces = {s.name: s for s in list_spaces()}
    assert set(SHIPPED) <= set(spaces)
    for path in default_spaces_dir().glob("*.yaml"):
        space = spaces[path.stem]
        text = path.read_text(encoding="utf-8")
        assert text.startswith("#") and "Use it" in text and "Fits" in text, path
        assert space.description and space.path == path
        rng = random.Random(0)
        fitted = []
        for ctx in _fitting_contexts():
            try:
                space.check(ctx)
            except ConfigError:
                continue
            dists = space.distributions(ctx)
            plan = _compile(space, ctx, _random_genes(dists, rng))
            assert plan.dtype == "float32" and plan.merge_method == ctx.method
            assert space.genes_from_plan(plan, ctx) is not None
            for end in ("low", "high"):
                genes = {k: getattr(d, end) if isinstance(d, FloatDistribution) else d.choices[-1]
                         for k, d in dists.items()}
                try:
                    _compile(space, ctx, genes)
                except ConfigError as err:  # all-zero linear weights cannot be normalised
                    assert ctx.method in NORMALISED and end == "low" and "sum to zero" in str(err)
            fitted.append(ctx.method)
        assert fitted, f"{path.name} fits no method"
    fits = {name: {ctx.method for ctx in _fitting_contexts() if _fits(spaces[name], ctx)}
            for name in SHIPPED}
    assert fits["dirichlet_linear"] == {"linear"}
    assert fits["slerp_curves"] == {"slerp", "nuslerp", "linear"}
    assert {"ties", "dare_ties", "della", "breadcrumbs"} <= fits["layerwise_ties_dare"]
    assert "task_arithmetic" in fits["task_arithmetic_groups"]
    assert fits["method_params"] >= set(METHODS) - {"passthrough"}


def _fits(space, ctx) -> bool:
    try:
        space.check(ctx)
        return True
    except ConfigError:
        return False


def test_importing_spaces_imports_no_torch():
    import subprocess
    import sys

    code = "import sys, mergesearch.spaces; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_list_spaces_user_dir_overrides_and_skips_non_space_yaml(tmp_path: Path):
    (tmp_path / "dirichlet_linear.yaml").write_text("# mine\nkind: dirichlet_linear\nalpha: 0.3\n")
    (tmp_path / "study.yaml").write_text("name: demo\nmethod: linear\n")
    spaces = {s.name: s for s in list_spaces([tmp_path])}
    assert spaces["dirichlet_linear"].options.alpha == 0.3
    assert spaces["dirichlet_linear"].description == "mine"
    assert "study" not in spaces and "slerp_curves" in spaces
    assert load_space("dirichlet_linear", [tmp_path]).options.alpha == 0.3
    assert load_space(tmp_path / "dirichlet_linear.yaml").options.alpha == 0.3
    assert load_space(str(default_spaces_dir() / "slerp_curves.yaml")).kind == "layer_curves"


def test_uniform_plan():
    ctx = SpaceContext("linear", ("a", "b", "c", "d"), "base", 4, dtype="bfloat16")
    plan = load_space("dirichlet_linear").uniform_plan(ctx)
    assert plan.merge_method == "linear" and plan.dtype == "bfloat16" and plan.base_model is None
    assert [m.model for m in plan.models] == ["a", "b", "c", "d"]
    assert {m.parameters["weight"] for m in plan.models} == {0.25}
    # slerp interpolates the base and one model: its uniform merge is their average.
    slerp = SpaceContext("slerp", ("ft",), "base", 4)
    plan = load_space("slerp_curves").uniform_plan(slerp)
    assert [m.model for m in plan.models] == ["base", "ft"]


# ---------------------------------------------------------------------------------------------
# dirichlet_linear


def test_dirichlet_random_sampler_draws_have_dirichlet_moments():
    alpha, n, draws = 0.5, 3, 3000
    space = space_from_dict({"kind": "dirichlet_linear", "alpha": alpha})
    ctx = SpaceContext("linear", ("a", "b", "c"), None, 4, sampler="random")
    dists = space.distributions(ctx)
    assert list(dists) == ["u.0", "u.1", "u.2"]
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    rows = []
    for _ in range(draws):
        trial = study.ask(dists)
        plan = space.to_plan(trial.params, ctx)
        rows.append([m.parameters["weight"] for m in plan.models])
        study.tell(trial, 0.0)
    w = np.array(rows)
    assert np.allclose(w.sum(axis=1), 1.0) and (w > 0).all()
    mean = 1 / n
    var = mean * (1 - mean) / (n * alpha + 1)
    cov = -mean * mean / (n * alpha + 1)
    assert np.allclose(w.mean(axis=0), mean, atol=0.02)
    assert np.allclose(w.var(axis=0), var, rtol=0.1)
    assert abs(np.cov(w[:, 0], w[:, 1])[0, 1] - cov) < 0.012
    # alpha = 1 is uniform on the simplex: P(w_0 < 1/3) = 1 - (2/3)^2 = 5/9.
    flat = space_from_dict({"kind": "dirichlet_linear", "alpha": 1.0})
    u = np.random.default_rng(1).uniform(1e-6, 1 - 1e-6, size=(3000, n))
    w0 = [flat.weights({f"u.{i}": x for i, x in enumerate(row)}, ctx)[0] for row in u]
    assert abs(np.mean(np.array(w0) < 1 / 3) - 5 / 9) < 0.03


def test_dirichlet_alr_parameterisation_and_round_trip():
    space = load_space("dirichlet_linear")
    ctx = SpaceContext("linear", ("a", "b", "c", "d"), "base", 4, sampler="cmaes")
    dists = space.distributions(ctx)
    assert list(dists) == ["z.0", "z.1", "z.2"]
    assert all(d.low == -4 and d.high == 4 for d in dists.values())
    uniform = space.to_plan({"z.0": 0.0, "z.1": 0.0, "z.2": 0.0}, ctx)
    assert [m.parameters["weight"] for m in uniform.models] == [0.25] * 4
    assert space.genes_from_plan(space.uniform_plan(ctx), ctx) == {"z.0": 0, "z.1": 0, "z.2": 0}
    rng = random.Random(3)
    for _ in range(20):
        genes = _random_genes(dists, rng)
        plan = _compile(space, ctx, genes)
        w = [m.parameters["weight"] for m in plan.models]
        assert math.isclose(sum(w), 1.0) and math.isclose(math.log(w[0] / w[3]), genes["z.0"])
        back = space.genes_from_plan(plan, ctx)
        assert back.keys() == genes.keys()
        assert all(math.isclose(back[k], genes[k], abs_tol=1e-9) for k in genes)
    # random sampler: the way back finds other u with the same weights
    rctx = SpaceContext("linear", ctx.models, None, 4, sampler="random")
    plan = space.to_plan({"u.0": 0.2, "u.1": 0.5, "u.2": 0.7, "u.3": 0.9}, rctx)
    genes = space.genes_from_plan(plan, rctx)
    assert genes is not None and equivalent(space.to_plan(genes, rctx), plan, rctx)


def test_dirichlet_genes_from_user_plans():
    space = load_space("dirichlet_linear")
    ctx = SpaceContext("linear", ("a", "b", "c"), None, 4)

    def linear(weights, **extra):
        return parse_plan({"models": [{"model": m, "parameters": {"weight": w}}
                                      for m, w in weights.items()],
                           "merge_method": "linear", **extra})

    genes = space.genes_from_plan(linear({"c": 1, "a": 2, "b": 1}, dtype="bfloat16"), ctx)
    assert genes == pytest.approx({"z.0": math.log(2), "z.1": 0.0})
    assert space.genes_from_plan(linear({"a": 0, "b": 1, "c": 1}), ctx) is None
    assert space.genes_from_plan(linear({"a": 100, "b": 1, "c": 1}), ctx) is None  # |z| > 4
    assert space.genes_from_plan(linear({"a": 1, "b": 1, "x": 1}), ctx) is None
    assert space.genes_from_plan(linear({"a": 1, "b": 1, "c": [1, 2]}), ctx) is None
    assert space.genes_from_plan(
        linear({"a": 1, "b": 1, "c": 1}, parameters={"normalize": False}), ctx) is None
    slerp = parse_plan({"models": [{"model": "a"}, {"model": "b"}], "merge_method": "slerp",
                        "base_model": "a", "parameters": {"t": 0.5}})
    assert space.genes_from_plan(slerp, ctx) is None


# ---------------------------------------------------------------------------------------------
# layer_curves


def _curve_genes(dists, k):
    genes = {}
    for i, name in enumerate(dists):
        genes[name] = round(0.05 + 0.9 * ((i * 0.37) % 1.0), 4)
    return genes


def test_slerp_curves_per_layer_values_match_mergekit_interpolation(llama_family):
    space = load_space("slerp_curves")
    base, ft = str(llama_family["base"]), str(llama_family["ft0"])
    ctx = SpaceContext("slerp", (ft,), base, num_layers=4)
    dists = space.distributions(ctx)
    assert list(dists) == [*(f"t.self_attn.{k}" for k in range(3)),
                           *(f"t.mlp.{k}" for k in range(3)), "t.default"]
    genes = _curve_genes(dists, 3)
    plan = _compile(space, ctx, genes)
    assert plan.base_model == base and [m.model for m in plan.models] == [base, ft]
    exp = explain(plan)
    assert exp.warnings == []
    (table,) = exp.tables
    anchors = np.linspace(0, 1, 3)
    seen = set()
    for row, values in table.rows:
        for label, value in values.items():
            if not row.startswith("layer "):
                assert label == "global: default" or "embed_tokens" in label \
                    or "lm_head" in label, (row, label)
                continue
            layer = int(row.split()[1])
            frac = layer_fraction(layer, 4)
            for f in ("self_attn", "mlp"):
                if f in label:
                    cps = [genes[f"t.{f}.{k}"] for k in range(3)]
                    assert value == pytest.approx(np.interp(frac, anchors, cps), abs=1e-6)
                    seen.add(f)
            if label == "global: default":
                assert value == pytest.approx(genes["t.default"], abs=1e-6)
    assert seen == {"self_attn", "mlp"}
    # Exact values, tensor by tensor, as the merge applies them.
    spec = get_method("slerp")
    tasks = MergeTasks(plan, spec, open_checkpoints([base, ft]))
    pinned = []
    for task in tasks.tasks:
        t = tasks.params(task).shared["t"]
        if "embed_tokens" in task.name or "lm_head" in task.name:
            pinned.append(t)
        elif task.out_layer is not None and ("self_attn" in task.name or "mlp" in task.name):
            f = "self_attn" if "self_attn" in task.name else "mlp"
            cps = [genes[f"t.{f}.{k}"] for k in range(3)]
            assert t == pytest.approx(np.interp(task.t, anchors, cps), abs=1e-12)
        else:
            assert t == genes["t.default"], task.name
    assert pinned == [0.5, 0.5], "embed_tokens and lm_head are pinned at 0.5"


@pytest.mark.parametrize("method", ["nuslerp", "linear"])
def test_two_model_weight_curves_give_the_same_t(llama_family, method):
    space = space_from_dict({"kind": "layer_curves", "control_points": 4,
                             "filters": ["q_proj", "mlp"], "pinned": {"embed_tokens": 0.0},
                             "default": 0.3})
    a, b = str(llama_family["ft0"]), str(llama_family["ft1"])
    base = str(llama_family["base"]) if method == "nuslerp" else None
    ctx = SpaceContext(method, (a, b), base, num_layers=4)
    dists = space.distributions(ctx)
    assert "t.default" not in dists and len(dists) == 8
    genes = _curve_genes(dists, 4)
    plan = _compile(space, ctx, genes)
    tasks = MergeTasks(plan, get_method(method), open_checkpoints(list(plan.referenced_models())))
    anchors = np.linspace(0, 1, 4)
    for task in tasks.tasks:
        p = tasks.params(task)
        w = {m: p.per_input[i]["weight"] for i, m in enumerate(task.models) if m != base}
        t = w[b] / (w[a] + w[b])
        if "embed_tokens" in task.name:
            assert t == 0.0
        elif task.out_layer is not None and ("q_proj" in task.name or "mlp" in task.name):
            f = "q_proj" if "q_proj" in task.name else "mlp"
            cps = [genes[f"t.{f}.{k}"] for k in range(4)]
            assert t == pytest.approx(np.interp(task.t, anchors, cps), abs=1e-12)
        else:
            assert t == pytest.approx(0.3, abs=1e-12)
    assert space.genes_from_plan(plan, ctx) == pytest.approx(genes, abs=1e-9)


def test_linear_curves_over_three_models():
    space = space_from_dict({"kind": "layer_curves", "control_points": 2, "filters": ["mlp"],
                             "pinned": {"lm_head": [1, 0, 0]}})
    ctx = SpaceContext("linear", ("a", "b", "c"), None, num_layers=3)
    dists = space.distributions(ctx)
    assert list(dists) == ["w.mlp.0.0", "w.mlp.0.1", "w.mlp.1.0", "w.mlp.1.1", "w.mlp.2.0",
                           "w.mlp.2.1", "w.default.0", "w.default.1", "w.default.2"]
    genes = _curve_genes(dists, 2)
    plan = _compile(space, ctx, genes)
    back = space.genes_from_plan(plan, ctx)
    assert back is not None and equivalent(space.to_plan(back, ctx), plan, ctx)
    with pytest.raises(ConfigError, match="list of 3 weights"):
        load_space("slerp_curves").distributions(ctx)


def test_curve_genes_from_user_plans(llama_family):
    space = load_space("slerp_curves")
    ctx = SpaceContext("slerp", ("ft",), "base", num_layers=4)

    def slerp(t):
        return parse_plan({"models": [{"model": "base"}, {"model": "ft"}],
                           "merge_method": "slerp", "base_model": "base",
                           "parameters": {"t": t}})

    assert space.genes_from_plan(slerp(0.5), ctx) == {k: 0.5 for k in space.distributions(ctx)}
    three = [{"filter": "embed_tokens", "value": 0.5}, {"filter": "lm_head", "value": 0.5},
             {"filter": "mlp", "value": [1, 0.5, 0]}, {"value": 0.2}]
    genes = space.genes_from_plan(slerp(three), ctx)
    assert genes["t.mlp.0"] == 1 and genes["t.mlp.2"] == 0 and genes["t.self_attn.1"] == 0.2
    five = [{"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]}, {"value": 0.5}]
    assert space.genes_from_plan(slerp(five), ctx) is None  # not a 3-point curve
    assert space.genes_from_plan(slerp(0.7), ctx) is None  # embeddings are pinned at 0.5
    other_base = parse_plan({"models": [{"model": "base"}, {"model": "ft"}],
                             "merge_method": "slerp", "base_model": "ft",
                             "parameters": {"t": 0.5}})
    assert space.genes_from_plan(other_base, ctx) is None


# ---------------------------------------------------------------------------------------------
# layer_groups


def test_layer_groups_are_exact_per_layer(llama_family):
    space = space_from_dict({"kind": "layer_groups", "groups": 3, "embeddings": True})
    base = str(llama_family["base"])
    models = (str(llama_family["ft0"]), str(llama_family["ft1"]))
    ctx = SpaceContext("dare_ties", models, base, num_layers=4)
    dists = space.distributions(ctx)
    assert list(dists)[:4] == ["weight.0.0", "weight.0.1", "weight.0.2", "weight.0.embed"]
    assert dists["density.1.2"].low == 0.1 and dists["weight.0.0"].high == 1.0
    assert [space.group_of(i, ctx) for i in range(4)] == [0, 0, 1, 2]
    genes = _random_genes(dists, random.Random(5))
    plan = _compile(space, ctx, genes)
    assert plan.models[0].parameters["weight"][2].value == tuple(
        genes[f"weight.0.{g}"] for g in (0, 0, 1, 2))
    tasks = MergeTasks(plan, get_method("dare_ties"), open_checkpoints([base, *models]))
    checked = 0
    for task in tasks.tasks:
        p = tasks.params(task)
        for i, m in enumerate(models):
            values = p.per_input[task.models.index(m)]
            if task.out_layer is not None:
                slot = str(space.group_of(task.out_layer, ctx))
            elif "embed_tokens" in task.name or "lm_head" in task.name:
                slot = "embed"
            else:
                slot = "0"  # final norm: gradient position 0
            for name in ("weight", "density"):
                assert values[name] == pytest.approx(genes[f"{name}.{i}.{slot}"], abs=1e-12)
                checked += 1
    assert checked > 50
    assert space.genes_from_plan(plan, ctx) == pytest.approx(genes, abs=1e-12)


def test_layer_groups_options():
    ta = load_space("task_arithmetic_groups")
    ctx = SpaceContext("task_arithmetic", ("a", "b"), "base", num_layers=8)
    assert list(ta.distributions(ctx)) == [f"weight.{i}.{g}" for i in range(2) for g in range(4)]
    della = load_space("layerwise_ties_dare")
    dctx = SpaceContext("della", ("a",), "base", num_layers=2)
    d = della.distributions(dctx)
    assert list(d) == ["weight.0.0", "weight.0.1", "density.0.0", "density.0.1"]  # capped
    assert d["density.0.0"].low == pytest.approx(0.16) and d["density.0.0"].high == 0.84
    fixed = space_from_dict({"kind": "layer_groups", "groups": "layers", "search_density": False,
                             "fixed": {"density": 0.5, "lambda": 1.2, "normalize": True}})
    plan = fixed.to_plan({k: 0.5 for k in fixed.distributions(ctx)}, ctx)
    assert plan.parameters == {"density": 0.5, "lambda": 1.2, "normalize": True}
    assert len(plan.models[0].parameters["weight"]) == 8
    one = SpaceContext("ties", ("a",), "base", num_layers=1)
    plan = della.to_plan({k: 0.5 for k in della.distributions(one)}, one)
    assert plan.models[0].parameters == {"weight": 0.5, "density": 0.5}


# ---------------------------------------------------------------------------------------------
# method_params


def test_method_params_genes_ranges_and_fixed():
    space = load_space("method_params")
    ties = SpaceContext("ties", ("a", "b"), "base", num_layers=4)
    d = space.distributions(ties)
    assert list(d) == ["normalize", "rescale", "lambda", "weight.0", "weight.1", "density.0",
                       "density.1"]
    assert isinstance(d["normalize"], CategoricalDistribution)
    assert (d["lambda"].low, d["lambda"].high) == (0.5, 1.5)
    assert (d["density.0"].low, d["density.0"].high) == (0.1, 1.0)
    assert list(space.distributions(SpaceContext("task_arithmetic", ("a",), "base", 4))) == [
        "normalize", "rescale", "lambda", "weight.0"]
    della = space.distributions(SpaceContext("della", ("a",), "base", 4))
    assert della["density.0"].high + della["epsilon.0"].high < 1
    assert della["density.0"].low - della["epsilon.0"].high > 0
    assert list(space.distributions(SpaceContext("slerp", ("a", "b"), None, 4))) == ["t"]
    lin = SpaceContext("linear", ("a", "b"), None, 4)
    assert space.genes_from_plan(space.uniform_plan(lin), lin) == {
        "weight.0": 1.0, "weight.1": 1.0, "normalize": True}
    custom = space_from_dict({"kind": "method_params", "ranges": {"weight": [0.2, 0.8]},
                              "fixed": {"normalize": True, "lambda": 1.0}})
    d = custom.distributions(ties)
    assert list(d) == ["rescale", "weight.0", "weight.1", "density.0", "density.1"]
    assert (d["weight.0"].low, d["weight.0"].high) == (0.2, 0.8)
    plan = _compile(custom, ties, _random_genes(d, random.Random(1)))
    assert plan.parameters["lambda"] == 1.0 and plan.base_model == "base"
    assert space.genes_from_plan(plan, ties) is not None


# ---------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize("raw, match", [
    ({"alpha": 1.0}, "`kind` is missing"),
    ({"kind": "dirichlet_lineer"}, "Did you mean 'dirichlet_linear'"),
    ({"kind": "dirichlet_linear", "alpah": 2}, "unknown key 'alpah'.*Did you mean 'alpha'"),
    ({"kind": "dirichlet_linear", "alpha": -1}, "alpha"),
    ({"kind": "dirichlet_linear", "bound": 0}, "bound"),
    ({"kind": "layer_curves", "control_points": 1}, "control_points"),
    ({"kind": "layer_curves", "filters": []}, "at least one filter"),
    ({"kind": "layer_curves", "filters": ["self", "self_attn"]}, "'self_attn' never applies"),
    ({"kind": "layer_curves", "pinned": {"mlp": 0.5}}, "'mlp' is listed twice"),
    ({"kind": "layer_curves", "pinned": {"lm_head": 1.5}}, r"must be in \[0, 1\]"),
    ({"kind": "layer_curves", "default": "serch"}, "default"),
    ({"kind": "layer_groups", "groups": 0}, "groups"),
    ({"kind": "layer_groups", "weight": [1, 0]}, "low < high"),
    ({"kind": "method_params", "ranges": {"wieght": [0, 1]}}, "Did you mean 'weight'"),
    ([1, 2], "must be a YAML mapping"),
])
def test_bad_space_files(tmp_path: Path, raw, match):
    import yaml

    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=match) as err:
        load_space(path)
    assert str(path) in str(err.value)


def test_bad_references(tmp_path: Path):
    with pytest.raises(UnknownNameError, match="Did you mean 'slerp_curves'.*Available: .*"
                                               "dirichlet_linear"):
        load_space("slerp_curve")
    with pytest.raises(UnknownNameError, match="Available"):
        load_space("nothing_like_it")
    with pytest.raises(ConfigError, match="does not exist"):
        load_space(tmp_path / "missing.yaml")
    (tmp_path / "broken.yaml").write_text("kind: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_space(tmp_path / "broken.yaml")
    with pytest.raises(UnknownNameError, match="Did you mean 'cmaes'"):
        SpaceContext("linear", ("a", "b"), None, 4, sampler="cmaes2")
    with pytest.raises(UnknownNameError, match="Did you mean 'linear'"):
        SpaceContext("linaer", ("a", "b"), None, 4)
    with pytest.raises(ConfigError, match="listed twice"):
        SpaceContext("linear", ("a", "a"), None, 4)
    with pytest.raises(ConfigError, match="num_layers"):
        SpaceContext("linear", ("a", "b"), None, 0)


@pytest.mark.parametrize("space, ctx, match", [
    ("slerp_curves", SpaceContext("ties", ("a", "b"), "base", 4),
     "does not fit merge method 'ties'.*slerp, nuslerp, linear"),
    ("slerp_curves", SpaceContext("slerp", ("a", "b", "c"), None, 4), "exactly 2 models"),
    ("slerp_curves", SpaceContext("slerp", ("a", "b"), "base", 4), "exactly 2 models"),
    ("slerp_curves", SpaceContext("nuslerp", ("a", "b", "c"), "base", 4), "exactly 2 models"),
    ("dirichlet_linear", SpaceContext("linear", ("a",), None, 4), "N >= 2 models"),
    ("dirichlet_linear", SpaceContext("ties", ("a", "b"), "base", 4), "does not fit"),
    ("layerwise_ties_dare", SpaceContext("dare_ties", ("a", "b"), None, 4), "sources.base"),
    ("layerwise_ties_dare", SpaceContext("slerp", ("a",), "base", 4), "does not fit"),
    ("method_params", SpaceContext("model_stock", ("a",), "base", 4), "at least 3"),
    ("method_params", SpaceContext("ties", ("a",), None, 4), "needs a base"),
])
def test_space_does_not_fit_study(space, ctx, match):
    with pytest.raises(ConfigError, match=match):
        load_space(space).check(ctx)
    with pytest.raises(ConfigError):
        load_space(space).distributions(ctx)


@pytest.mark.parametrize("raw, ctx, match", [
    ({"kind": "layer_groups", "density": [0.3, 0.6]},
     SpaceContext("task_arithmetic", ("a",), "base", 4), "does not sparsify"),
    ({"kind": "layer_groups", "density": [0.05, 0.9]},
     SpaceContext("della", ("a",), "base", 4), r"density \+/- epsilon"),
    ({"kind": "layer_groups", "fixed": {"weight": 0.5}},
     SpaceContext("ties", ("a",), "base", 4), "searched by this space"),
    ({"kind": "layer_groups", "fixed": {"lamda": 0.5}},
     SpaceContext("ties", ("a",), "base", 4), "Did you mean 'lambda'"),
    ({"kind": "layer_groups", "fixed": {"lambda": "x"}},
     SpaceContext("ties", ("a",), "base", 4), "lambda"),
    ({"kind": "method_params", "ranges": {"t": [0, 1]}},
     SpaceContext("ties", ("a",), "base", 4), "Unknown parameter 't'"),
    ({"kind": "method_params", "ranges": {"density": [0, 0.5]}},
     SpaceContext("ties", ("a",), "base", 4), "out of range"),
    ({"kind": "method_params", "ranges": {"normalize": [0, 1]}},
     SpaceContext("ties", ("a",), "base", 4), "true/false"),
    ({"kind": "method_params", "ranges": {"lambda": [0, 1]}, "fixed": {"lambda": 1}},
     SpaceContext("ties", ("a",), "base", 4), "both"),
    ({"kind": "layer_curves", "pinned": {"embed_tokens": [1, 0]}},
     SpaceContext("slerp", ("a",), "base", 4), "takes one t"),
])
def test_bad_options_for_the_study(raw, ctx, match):
    with pytest.raises(ConfigError, match=match):
        space_from_dict(raw).check(ctx)


def test_bad_genes():
    space = load_space("dirichlet_linear")
    ctx = SpaceContext("linear", ("a", "b", "c"), None, 4)
    with pytest.raises(ConfigError, match="needs genes.*z.1"):
        space.to_plan({"z.0": 0.0}, ctx)
    with pytest.raises(UnknownNameError, match="'z.2' is not part"):
        space.to_plan({"z.0": 0.0, "z.1": 0.0, "z.2": 1.0}, ctx)
    with pytest.raises(ConfigError, match=r"must be a number in \[-4, 4\]"):
        space.to_plan({"z.0": 9.0, "z.1": 0.0}, ctx)
    with pytest.raises(ConfigError, match="must be one of"):
        load_space("method_params").to_plan({"filter_wise": "yes"},
                                            SpaceContext("model_stock", ("a", "b"), "base", 4))


def test_kinds_are_documented():
    docs = (default_spaces_dir().parent / "docs" / "spaces.md").read_text(encoding="utf-8")
    for kind in KINDS:
        assert f"`{kind}`" in docs


# ---------------------------------------------------------------------------------------------
# Real merges


def test_compiled_plans_merge_real_checkpoints(llama_family, tmp_path: Path, one_torch_thread):
    from safetensors import safe_open

    from mergesearch.merge.executor import run_merge

    base = str(llama_family["base"])
    models = (str(llama_family["ft0"]), str(llama_family["ft1"]))

    def tensors(folder: Path) -> dict:
        out = {}
        for f in sorted(folder.glob("*.safetensors")):
            with safe_open(str(f), "pt") as h:
                out.update({k: h.get_tensor(k) for k in h.keys()})  # noqa: SIM118
        return out

    # Task arithmetic with weight 0 in group 0 (layers 0-1) keeps those layers and the edge
    # tensors (position 0) at the base; group 1 (layers 2-3) moves away from it.
    space = load_space("task_arithmetic_groups")
    ctx = SpaceContext("task_arithmetic", models, base, num_layers=4, dtype="float32")
    genes = {k: 0.0 if k.endswith((".0", ".1")) else 0.7
             for k in space.distributions(ctx)}
    report = run_merge(space.to_plan(genes, ctx), tmp_path / "ta")
    merged, src = tensors(report.out_dir), tensors(Path(base))
    assert merged.keys() == src.keys()
    for name, value in merged.items():
        same = bool((value == src[name]).all())
        assert same == ("layers.2." not in name and "layers.3." not in name), name

    curves = load_space("slerp_curves")
    sctx = SpaceContext("slerp", (models[0],), base, num_layers=4, dtype="float32")
    plan = curves.to_plan({k: 0.5 for k in curves.distributions(sctx)}, sctx)
    report = run_merge(plan, tmp_path / "slerp")
    assert report.tensors == len(merged)
    assert loads_plan((report.out_dir / "mergekit_config.yml").read_text()) == plan
