"""Merge plans: YAML round trips, mergekit-compatible dumps and parameter resolution."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import yaml

from mergesearch.errors import ConfigError
from mergesearch.merge.registry import METHODS, get_method, validate_plan
from mergesearch.plan import (
    Conditional,
    dump_plan,
    evaluate_setting,
    layer_fraction,
    load_plan,
    loads_plan,
    resolve,
)

EXAMPLES = sorted((Path(__file__).parent.parent / "examples").glob("*.yaml"))

RECIPES = [
    """
models:
  - model: a
  - model: b
merge_method: slerp
base_model: a
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5
dtype: bfloat16
""",
    """
models:
  - model: a
    parameters: {weight: 0.25}
  - model: b
    parameters: {weight: 0.25}
  - model: c
    parameters: {weight: 0.3}
  - model: d
    parameters: {weight: 0.2}
merge_method: linear
dtype: float16
out_dtype: bfloat16
tokenizer_source: base
""",
    """
slices:
  - sources:
      - model: a
        layer_range: [0, 4]
        parameters:
          weight: [0.2, 0.8]
          density: 0.5
      - model: base
        layer_range: [0, 4]
    parameters:
      lambda: 0.9
  - sources:
      - model: a
        layer_range: [4, 8]
        parameters: {weight: 0.5, density: [0.3, 0.9]}
      - model: base
        layer_range: [4, 8]
merge_method: dare_ties
base_model: base
parameters:
  normalize: true
  int8_mask: true
tokenizer_source: a
chat_template: chatml
""",
]


@pytest.mark.parametrize("text", RECIPES)
def test_round_trip_and_mergekit_reads_the_dump(text):
    plan = loads_plan(text)
    dumped = dump_plan(plan, header="made by a test\n\nsecond paragraph")
    assert dumped.startswith("# made by a test\n#\n# second paragraph\n")
    again = loads_plan(dumped)
    assert again == plan
    assert dump_plan(again) == dump_plan(plan)
    from mergekit.config import MergeConfiguration

    theirs = MergeConfiguration.model_validate(yaml.safe_load(dumped))
    assert theirs.merge_method == plan.merge_method
    assert yaml.safe_load(theirs.to_yaml()) == yaml.safe_load(dump_plan(plan))


def test_plan_is_frozen():
    plan = loads_plan(RECIPES[0])
    with pytest.raises(Exception):
        plan.merge_method = "linear"


def _random_setting(rng: random.Random, depth: int = 0):
    kind = rng.choice(["scalar", "gradient", "conditional"] if depth == 0 else ["scalar", "gradient"])
    if kind == "scalar":
        return round(rng.uniform(-1, 2), 3)
    if kind == "gradient":
        return [round(rng.uniform(0, 1), 3) for _ in range(rng.randint(1, 9))]
    entries = []
    for _ in range(rng.randint(1, 4)):
        entry = {"value": _random_setting(rng, 1)}
        if rng.random() < 0.8:
            entry["filter"] = rng.choice(["self_attn", "mlp", "embed_tokens", "lm_head", "q_proj",
                                          "self", "norm", "*"])
        entries.append(entry)
    return entries


NAMES = ["model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight",
         "model.layers.3.mlp.up_proj.weight", "model.layers.1.input_layernorm.weight",
         "model.norm.weight", "lm_head.weight"]


def test_evaluate_setting_matches_mergekit_on_random_settings():
    from mergekit.config import ConditionalParameter
    from mergekit.config import evaluate_setting as theirs

    rng = random.Random(0)
    as_float = lambda v: float(v)  # noqa: E731
    checked = 0
    for _ in range(400):
        raw = _random_setting(rng)
        ours_setting = loads_plan(yaml.safe_dump(
            {"models": [{"model": "a"}], "merge_method": "linear", "parameters": {"x": raw}}
        )).parameters["x"]
        their_setting = (
            [ConditionalParameter.model_validate(e) for e in raw]
            if isinstance(raw, list) and raw and isinstance(raw[0], dict) else raw
        )
        for name in NAMES:
            for t in (0.0, 1.0, rng.random(), 1 / 3):
                a = evaluate_setting(ours_setting, name, t, as_float)
                b = theirs(name, their_setting, t, validate=as_float)
                assert a == b, (raw, name, t)
                checked += 1
    assert checked == 400 * len(NAMES) * 4


def test_gradient_positions_follow_mergekit():
    grad = (0.0, 0.5, 0.3, 0.7, 1.0)
    assert [layer_fraction(i, 9) for i in (0, 4, 8)] == [0.0, 0.5, 1.0]
    assert layer_fraction(0, 1) == 1.0
    values = [evaluate_setting(grad, "x", layer_fraction(i, 9)) for i in range(9)]
    assert values[0] == 0.0 and values[2] == 0.5 and values[4] == 0.3 and values[8] == 1.0
    assert values[1] == pytest.approx(0.25) and values[3] == pytest.approx(0.4)
    assert evaluate_setting((0.0, 1.0), "model.embed_tokens.weight", 0.0) == 0.0
    assert evaluate_setting(("a", "b", "c"), "x", 0.99) == "b"


def test_first_matching_filter_wins_and_unmatched_falls_through():
    setting = (Conditional(filter="self", value=1.0), Conditional(filter="self_attn", value=2.0))
    assert evaluate_setting(setting, "model.layers.0.self_attn.q_proj.weight") == 1.0
    assert evaluate_setting(setting, "model.layers.0.mlp.up_proj.weight") is None
    star = (Conditional(filter="*", value=3.0),)
    assert evaluate_setting(star, "anything") == 3.0


def test_resolve_precedence_source_then_slice_then_global():
    spec = get_method("ties")
    weight, density, lam = spec.param("weight"), spec.param("density"), spec.param("lambda")
    source = {"weight": (Conditional(filter="mlp", value=0.9),)}
    slice_ = {"weight": 0.5, "lambda": 0.7}
    global_ = {"weight": 0.1, "density": (0.2, 0.4)}
    scopes = [source, slice_, global_]
    assert resolve(weight, scopes, "model.layers.0.mlp.up_proj.weight") == 0.9
    assert resolve(weight, scopes, "model.layers.0.self_attn.q_proj.weight") == 0.5
    assert resolve(density, scopes, "x", t=0.5) == pytest.approx(0.3)
    assert resolve(lam, [None, global_], "x") == 1.0
    with pytest.raises(ConfigError, match="weight"):
        resolve(weight, [{}, None], "model.norm.weight", model="m")


def test_every_method_is_declared_once_with_valid_defaults():
    expected = {"linear", "slerp", "nuslerp", "task_arithmetic", "ties", "dare_ties",
                "dare_linear", "breadcrumbs", "breadcrumbs_ties", "della", "della_linear",
                "model_stock", "passthrough", "importance_linear", "importance_task_arithmetic", "fisher"}
    assert set(METHODS) == expected
    from mergesearch.merge.methods import IMPLEMENTATIONS

    assert set(IMPLEMENTATIONS) == expected
    for spec in METHODS.values():
        for p in spec.params:
            if not p.required and p.default is not None:
                p.check(p.default, f"{spec.name}.{p.name}")
            if p.search is not None:
                p.check(p.search[0], p.name)
                p.check(p.search[1], p.name)
    assert {n for n, s in METHODS.items() if s.random} == {
        "dare_ties", "dare_linear", "della", "della_linear"}


def test_interpolated_values_are_checked_at_their_endpoints():
    bad = RECIPES[0].replace("[0, 0.5, 0.3, 0.7, 1]", "[0, 0.5, 1.3]")
    with pytest.raises(ConfigError, match=r"t = 1.3 is out of range"):
        validate_plan(loads_plan(bad))


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_shipped_examples_are_valid_and_say_how_to_run(path):
    text = path.read_text()
    header = [line for line in text.splitlines() if line.startswith("#")]
    assert any("mergesearch merge" in line or "mergesearch explain" in line for line in header)
    plan = load_plan(path)
    validate_plan(plan)
    assert loads_plan(dump_plan(plan)) == plan


def test_examples_exist():
    assert len(EXAMPLES) >= 4
