"""`mergesearch explain`: effective values per layer and group, and warnings on dead entries."""

from __future__ import annotations

import pytest

from mergesearch.cli import main
from mergesearch.merge.explain import explain
from mergesearch.plan import loads_plan


def _slerp(family, t_block: str) -> str:
    return f"""
models:
  - model: {family['base']}
  - model: {family['ft0']}
merge_method: slerp
base_model: {family['base']}
parameters:
  t:
{t_block}
"""


PUBLISHED = """    - filter: embed_tokens
      value: 1
    - filter: lm_head
      value: 1
    - value: 1
    - filter: self
      value: [0, 0.1, 0.2, 0.3, 0.5, 0.7, 0.8, 0.9, 1]"""

GRADIENT = """    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5"""


def test_published_recipe_dead_entries_are_reported(llama_family):
    exp = explain(loads_plan(_slerp(llama_family, PUBLISHED)))
    assert len(exp.warnings) == 1
    assert "t[3] (filter 'self') never applies" in exp.warnings[0]
    assert "catch-all" in exp.warnings[0]
    table = exp.tables[0]
    values = {v for _, row in table.rows for v in row.values()}
    assert values == {1.0}, "with the dead gradient, every tensor gets t = 1"


def test_filter_matching_nothing_and_shadowed_entries(qwen3_family):
    block = """    - filter: self
      value: 0.2
    - filter: self_attn
      value: 0.4
    - filter: lm_head
      value: 0.9
    - filter: no_such_tensor
      value: 0.1
    - value: 0.5"""
    exp = explain(loads_plan(_slerp(qwen3_family, block)))
    text = "\n".join(exp.warnings)
    assert "filter 'self_attn') never applies: every tensor it matches is already matched" in text
    assert "filter 'no_such_tensor') never applies: no tensor name contains" in text
    assert "filter 'lm_head') never applies" in text, "qwen3 fixture ties lm_head to embed_tokens"


def test_values_per_layer_and_group_match_the_gradient(llama_family):
    exp = explain(loads_plan(_slerp(llama_family, GRADIENT)))
    assert exp.warnings == []
    table = exp.tables[0]
    rows = dict(table.rows)
    attn = next(g for g in table.groups if "self_attn" in g)
    mlp = next(g for g in table.groups if "'mlp'" in g)
    default = next(g for g in table.groups if "default" in g)
    assert [rows[f"layer {i}"][attn] for i in range(4)] == pytest.approx(
        [0.0, 0.5 * 2 / 3 + 0.3 / 3, 0.3 / 3 + 0.7 * 2 / 3, 1.0], abs=1e-6)
    assert rows["layer 0"][mlp] == 1.0 and rows["layer 3"][mlp] == 0.0
    assert rows["model.embed_tokens.weight"][default] == 0.5
    assert rows["lm_head.weight"][default] == 0.5
    assert set(table.members[attn]) >= {"self_attn.q_proj.weight", "self_attn.o_proj.weight"}


def test_per_model_parameters_are_shown_per_model(llama_family):
    text = f"""
models:
  - model: {llama_family['ft0']}
    parameters:
      weight: 0.7
      density: [0.2, 0.8]
  - model: {llama_family['ft1']}
    parameters: {{weight: 0.3}}
merge_method: ties
base_model: {llama_family['base']}
"""
    exp = explain(loads_plan(text))
    by_key = {(t.param, t.model): t for t in exp.tables}
    dens = dict(by_key[("density", str(llama_family["ft0"]))].rows)
    assert list(dens["layer 0"].values()) == [0.2]
    assert list(dens["layer 3"].values()) == [pytest.approx(0.8)]
    assert ("weight", str(llama_family["base"])) not in by_key, "the base has no weight in ties"


def test_cli_explain_prints_table_and_warning(llama_family, tmp_path, capsys):
    cfg = tmp_path / "recipe.yaml"
    cfg.write_text(_slerp(llama_family, PUBLISHED))
    assert main(["explain", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert "never applies" in out and "layer 3" in out
