"""mergesearch's merges must equal mergekit 0.1.5's, tensor by tensor.

Each deterministic case runs the same YAML (absolute model paths) through
``mergesearch.merge.executor.run_merge`` and through mergekit's Python API in-process, then
compares every output tensor: same names, shapes and dtypes; float32 values within 1e-6 relative
to ``max(1, max|mergekit|)``; bfloat16 and float16 outputs bit-identical.

Random methods (DARE, DELLA) draw different masks by design (mergesearch uses a seeded
counter-based hash, mergekit ``torch.bernoulli``), so they are checked (a) exactly, by feeding
mergekit our masks through a patched ``torch.bernoulli``, and (b) statistically against
mergekit's own draws.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from mergekit_helpers import (
    assert_same_config,
    assert_same_tensors,
    compare,
    load_config,
    load_weights,
    render,
    run_mergekit,
    run_ours,
)
from mergesearch.merge import methods, rng
from mergesearch.merge.methods import TensorInputs
from mergesearch.testing import build_tiny_model, perturb_model

pytest.importorskip("mergekit")
pytestmark = pytest.mark.integration

FAMILIES = ("qwen3", "llama")


@pytest.fixture(scope="module")
def families(request: pytest.FixtureRequest) -> dict[str, dict[str, Path]]:
    return {name: request.getfixturevalue(f"{name}_family") for name in FAMILIES}


def _with_dtypes(template: str, dtype: str | None, out_dtype: str | None) -> str:
    lines = [template.rstrip("\n")]
    if dtype:
        lines.append(f"dtype: {dtype}")
    if out_dtype:
        lines.append(f"out_dtype: {out_dtype}")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# Deterministic methods, one YAML each. `$base`, `$ft0`... are replaced by absolute paths.

CASES: dict[str, str] = {
    "linear-normalize": """
merge_method: linear
models:
  - model: $base
    parameters: {weight: 1.0}
  - model: $ft0
    parameters: {weight: 2.0}
  - model: $ft1
    parameters: {weight: 0.5}
""",
    "linear-no-normalize": """
merge_method: linear
parameters: {normalize: false}
models:
  - model: $base
    parameters: {weight: 0.3}
  - model: $ft0
    parameters: {weight: 0.5}
  - model: $ft1
    parameters: {weight: 0.4}
""",
    "linear-4-models": """
merge_method: linear
models:
  - model: $base
    parameters: {weight: 0.1}
  - model: $ft0
    parameters: {weight: 0.2}
  - model: $ft1
    parameters: {weight: 0.3}
  - model: $ft2
    parameters: {weight: 0.4}
""",
    "slerp-scalar": """
merge_method: slerp
base_model: $base
parameters: {t: 0.3}
models:
  - model: $base
  - model: $ft0
""",
    "slerp-recipe": """
merge_method: slerp
base_model: $base
models:
  - model: $base
  - model: $ft0
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5
""",
    "slerp-gradient9-pinned": """
merge_method: slerp
base_model: $base
models:
  - model: $base
  - model: $ft0
parameters:
  t:
    - filter: embed_tokens
      value: 1
    - filter: lm_head
      value: 1
    - value: [0, 0.1, 0.2, 0.3, 0.5, 0.7, 0.8, 0.9, 1]
""",
    "slerp-gradient-unpinned": """
merge_method: slerp
base_model: $base
models:
  - model: $base
  - model: $ft0
parameters:
  t: [0.2, 0.8]
""",
    "slerp-base-listed-second": """
merge_method: slerp
base_model: $ft0
parameters: {t: 0.2}
models:
  - model: $base
  - model: $ft0
""",
    "slerp-t0": """
merge_method: slerp
base_model: $base
parameters: {t: 0}
models:
  - model: $base
  - model: $ft0
""",
    "nuslerp-base": """
merge_method: nuslerp
base_model: $base
models:
  - model: $ft0
    parameters: {weight: 0.3}
  - model: $ft1
    parameters: {weight: 0.7}
""",
    "nuslerp-no-base": """
merge_method: nuslerp
models:
  - model: $ft0
    parameters: {weight: 0.4}
  - model: $ft1
    parameters: {weight: 0.6}
""",
    "nuslerp-row-wise": """
merge_method: nuslerp
base_model: $base
parameters: {nuslerp_row_wise: true, nuslerp_flatten: false}
models:
  - model: $base
  - model: $ft0
    parameters: {weight: 1.0}
  - model: $ft1
    parameters: {weight: 2.0}
""",
    "nuslerp-flatten-false": """
merge_method: nuslerp
parameters: {nuslerp_flatten: false}
models:
  - model: $ft0
    parameters: {weight: 0.25}
  - model: $ft1
    parameters: {weight: 0.75}
""",
    "task_arithmetic": """
merge_method: task_arithmetic
base_model: $base
models:
  - model: $base
  - model: $ft0
    parameters: {weight: 0.6}
  - model: $ft1
    parameters: {weight: 0.9}
""",
    "task_arithmetic-lambda": """
merge_method: task_arithmetic
base_model: $base
parameters: {lambda: 0.7}
models:
  - model: $ft0
    parameters: {weight: 1.0}
  - model: $ft1
    parameters: {weight: 0.5}
""",
    "task_arithmetic-normalize": """
merge_method: task_arithmetic
base_model: $base
parameters: {normalize: true, lambda: 1.3}
models:
  - model: $base
  - model: $ft0
    parameters: {weight: 0.2}
  - model: $ft1
    parameters: {weight: 0.6}
""",
    "task_arithmetic-negative-weight": """
merge_method: task_arithmetic
base_model: $base
models:
  - model: $ft0
    parameters: {weight: -0.5}
  - model: $ft1
    parameters: {weight: 1.5}
""",
    "ties-d05": """
merge_method: ties
base_model: $base
parameters: {density: 0.5, weight: 1.0, int8_mask: true}
models:
  - model: $base
  - model: $ft0
  - model: $ft1
""",
    "ties-d07-weights": """
merge_method: ties
base_model: $base
parameters: {density: 0.7}
models:
  - model: $base
  - model: $ft0
    parameters: {weight: 0.8}
  - model: $ft1
    parameters: {weight: 0.4}
""",
    "ties-gradient-density": """
merge_method: ties
base_model: $base
parameters: {weight: 0.5, normalize: false}
models:
  - model: $base
  - model: $ft0
    parameters: {density: [0.3, 0.9]}
  - model: $ft1
    parameters:
      density:
        - filter: mlp
          value: [0.9, 0.2]
        - value: 0.6
""",
    "ties-3-models": """
merge_method: ties
base_model: $base
parameters: {density: 0.6}
models:
  - model: $base
  - model: $ft0
    parameters: {weight: 0.5}
  - model: $ft1
    parameters: {weight: 0.3}
  - model: $ft2
    parameters: {weight: 0.9}
""",
    "breadcrumbs": """
merge_method: breadcrumbs
base_model: $base
parameters: {density: 0.8, gamma: 0.05}
models:
  - model: $base
  - model: $ft0
    parameters: {weight: 0.7}
  - model: $ft1
    parameters: {weight: 0.5, gamma: 0.1, density: 0.6}
""",
    "breadcrumbs_ties": """
merge_method: breadcrumbs_ties
base_model: $base
parameters: {density: 0.7, gamma: 0.02, weight: 1.0}
models:
  - model: $base
  - model: $ft0
  - model: $ft1
    parameters: {weight: 0.6}
""",
    "model_stock-2": """
merge_method: model_stock
base_model: $base
models:
  - model: $base
  - model: $ft0
  - model: $ft1
""",
    "model_stock-3": """
merge_method: model_stock
base_model: $base
models:
  - model: $ft0
  - model: $ft1
  - model: $ft2
""",
    "model_stock-filter_wise": """
merge_method: model_stock
base_model: $base
parameters: {filter_wise: true}
models:
  - model: $base
  - model: $ft0
  - model: $ft1
""",
    "passthrough": """
merge_method: passthrough
models:
  - model: $ft0
""",
    "passthrough-scale": """
merge_method: passthrough
models:
  - model: $ft1
    parameters:
      scale:
        - filter: o_proj
          value: 0.5
        - filter: down_proj
          value: [0, 1]
        - value: 1.0
""",
}

# Cases that also run with `dtype: float32` + `out_dtype: bfloat16` (bit-identical bf16).
BF16_OUT = (
    "linear-normalize", "linear-no-normalize", "slerp-recipe", "slerp-gradient9-pinned",
    "nuslerp-base", "nuslerp-row-wise", "task_arithmetic-normalize", "ties-d07-weights",
    "breadcrumbs", "model_stock-2", "passthrough-scale",
)


def _deterministic_params() -> Iterator[pytest.param]:
    for case, template in CASES.items():
        fams = ("qwen3",) if "$ft2" in template else FAMILIES
        for fam in fams:
            yield pytest.param(fam, case, None, None, id=f"{fam}-{case}")
    for case in BF16_OUT:
        yield pytest.param("qwen3", case, "float32", "bfloat16", id=f"qwen3-{case}-f32-to-bf16")


@pytest.mark.parametrize("family,case,dtype,out_dtype", list(_deterministic_params()))
def test_deterministic_method_matches_mergekit(
    families: dict[str, dict[str, Path]], tmp_path: Path, family: str, case: str,
    dtype: str | None, out_dtype: str | None,
) -> None:
    template = _with_dtypes(CASES[case], dtype, out_dtype)
    ours, _ = compare(template, families[family], tmp_path, exact=out_dtype == "bfloat16")
    expected_dtype = {None: torch.float32, "bfloat16": torch.bfloat16}[out_dtype]
    assert {t.dtype for t in load_weights(ours).values()} == {expected_dtype}


@pytest.mark.parametrize("family", FAMILIES)
def test_slerp_t0_is_exactly_the_base(families: dict[str, dict[str, Path]], tmp_path: Path,
                                     family: str) -> None:
    models = families[family]
    ours = run_ours(render(CASES["slerp-t0"], models), tmp_path / "ours")
    merged, base = load_weights(ours), load_weights(models["base"])
    assert sorted(merged) == sorted(base)
    for name, tensor in base.items():
        assert torch.equal(merged[name], tensor), name


def test_tied_and_untied_heads(families: dict[str, dict[str, Path]], tmp_path: Path) -> None:
    """Qwen3 (tied) writes no lm_head; Llama (untied) writes one; both say so in config."""
    for family, tied in (("qwen3", True), ("llama", False)):
        ours = run_ours(render(CASES["linear-normalize"], families[family]), tmp_path / family)
        assert ("lm_head.weight" in load_weights(ours)) is not tied
        assert load_config(ours)["tie_word_embeddings"] is tied


# ---------------------------------------------------------------------------------------------
# dtype: bfloat16 (or float16) on float32 sources: inputs are rounded first, as mergekit does.

BF16_COMPUTE = {
    "linear": CASES["linear-normalize"],
    "slerp": CASES["slerp-recipe"],
}


@pytest.mark.parametrize(
    "family,dtype", [("qwen3", "bfloat16"), ("llama", "bfloat16"), ("qwen3", "float16")]
)
@pytest.mark.parametrize("case", sorted(BF16_COMPUTE))
def test_half_dtype_rounds_inputs_like_mergekit(
    families: dict[str, dict[str, Path]], tmp_path: Path, family: str, case: str, dtype: str
) -> None:
    template = _with_dtypes(BF16_COMPUTE[case], dtype, None)
    ours, _ = compare(template, families[family], tmp_path, exact=True)
    merged = load_weights(ours)
    assert {t.dtype for t in merged.values()} == {getattr(torch, dtype)}
    # The result differs from merging the float32 inputs and rounding once at the end, so the
    # inputs really were rounded first.
    f32 = load_weights(run_ours(render(_with_dtypes(BF16_COMPUTE[case], "float32", dtype),
                                       families[family]), tmp_path / "f32"))
    assert any(not torch.equal(merged[n], f32[n]) for n in merged)


# ---------------------------------------------------------------------------------------------
# Parameters at global / model / slice / source level


def _linear_combo(models: dict[str, Path], name_a: str, wa: float, name_b: str, wb: float,
                  tensor_a: str, tensor_b: str | None = None) -> torch.Tensor:
    a = load_weights(models[name_a])[tensor_a]
    b = load_weights(models[name_b])[tensor_b or tensor_a]
    return wa * a + wb * b


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.allclose(a, b, rtol=1e-6, atol=1e-6 * max(1.0, float(b.abs().max())))


@pytest.mark.parametrize("family", FAMILIES)
def test_model_params_override_global(families: dict[str, dict[str, Path]], tmp_path: Path,
                                      family: str) -> None:
    models = families[family]
    template = """
merge_method: linear
parameters:
  normalize: false
  weight: 0.25
models:
  - model: $base
  - model: $ft0
    parameters:
      weight: 0.75
"""
    ours, _ = compare(template, models, tmp_path)
    merged = load_weights(ours)
    for name in ("model.layers.1.self_attn.q_proj.weight", "model.embed_tokens.weight",
                 "model.norm.weight"):
        assert _close(merged[name], _linear_combo(models, "base", 0.25, "ft0", 0.75, name)), name


SCOPED_SLICES = """
merge_method: linear
parameters:
  normalize: false
  weight: 0.1
slices:
  - sources:
      - model: $base
        layer_range: [0, 2]
        parameters: {weight: 0.6}
      - model: $ft0
        layer_range: [0, 2]
    parameters: {weight: 0.3}
  - sources:
      - model: $base
        layer_range: [2, 4]
      - model: $ft0
        layer_range: [2, 4]
        parameters:
          weight:
            - filter: mlp
              value: [0.2, 0.8]
"""


@pytest.mark.parametrize("family", FAMILIES)
def test_source_over_slice_over_global(families: dict[str, dict[str, Path]], tmp_path: Path,
                                       family: str) -> None:
    """Source params beat slice params, which beat global params; a conditional that matches
    nothing falls through to the next scope; gradients restart in every slice."""
    models = families[family]
    ours, _ = compare(SCOPED_SLICES, models, tmp_path)
    merged = load_weights(ours)
    expect = {
        # slice 0: base from its source (0.6), ft0 from the slice (0.3); embeddings too
        "model.layers.0.self_attn.k_proj.weight": (0.6, 0.3),
        "model.layers.1.mlp.up_proj.weight": (0.6, 0.3),
        "model.embed_tokens.weight": (0.6, 0.3),
        # slice 1: base from global (0.1); ft0's mlp from its source gradient, the rest global
        "model.layers.2.self_attn.k_proj.weight": (0.1, 0.1),
        "model.layers.2.mlp.up_proj.weight": (0.1, 0.2),
        "model.layers.3.mlp.up_proj.weight": (0.1, 0.8),
        "model.norm.weight": (0.1, 0.1),
    }
    for name, (wa, wb) in expect.items():
        assert _close(merged[name], _linear_combo(models, "base", wa, "ft0", wb, name)), name


SLICE_CASES = {
    "slerp-gradient-per-slice": """
merge_method: slerp
base_model: $base
parameters: {t: 0.5}
slices:
  - sources:
      - model: $base
        layer_range: [0, 2]
      - model: $ft0
        layer_range: [0, 2]
    parameters:
      t: [0, 1]
  - sources:
      - model: $base
        layer_range: [2, 3]
      - model: $ft0
        layer_range: [2, 3]
    parameters:
      t: [0.2, 0.4]
  - sources:
      - model: $base
        layer_range: [3, 4]
      - model: $ft0
        layer_range: [3, 4]
""",
    "ties-slices-scopes": """
merge_method: ties
base_model: $base
parameters: {weight: 0.5, density: 0.9}
slices:
  - sources:
      - model: $base
        layer_range: [0, 2]
      - model: $ft0
        layer_range: [0, 2]
        parameters: {density: 0.3}
      - model: $ft1
        layer_range: [0, 2]
    parameters: {density: 0.6, weight: 1.0}
  - sources:
      - model: $base
        layer_range: [2, 4]
      - model: $ft0
        layer_range: [2, 4]
        parameters: {weight: [0.2, 1.0]}
      - model: $ft1
        layer_range: [2, 4]
""",
    "linear-shifted-ranges": """
merge_method: linear
slices:
  - sources:
      - model: $base
        layer_range: [0, 2]
        parameters: {weight: 0.7}
      - model: $ft0
        layer_range: [2, 4]
        parameters: {weight: 0.3}
  - sources:
      - model: $base
        layer_range: [2, 4]
        parameters: {weight: 0.4}
      - model: $ft0
        layer_range: [0, 2]
        parameters: {weight: 0.6}
""",
    "task_arithmetic-slice-level-base": """
merge_method: task_arithmetic
base_model: $base
slices:
  - sources:
      - model: $base
        layer_range: [0, 2]
      - model: $ft0
        layer_range: [0, 2]
        parameters: {weight: 0.5}
  - sources:
      - model: $ft1
        layer_range: [2, 4]
      - model: $ft0
        layer_range: [2, 4]
        parameters: {weight: 0.5}
    base_model: $ft1
""",
    "model_stock-ft1-as-base-slices": """
merge_method: model_stock
base_model: $ft1
slices:
  - sources:
      - model: $ft1
        layer_range: [0, 4]
      - model: $ft0
        layer_range: [0, 4]
      - model: $base
        layer_range: [0, 4]
""",
    "task_arithmetic-slice-base": """
merge_method: task_arithmetic
base_model: $base
slices:
  - sources:
      - model: $base
        layer_range: [0, 4]
      - model: $ft0
        layer_range: [0, 4]
        parameters:
          weight:
            - filter: self_attn
              value: [1, 0]
            - value: 0.5
      - model: $ft1
        layer_range: [0, 4]
        parameters: {weight: 0.25}
    parameters:
      lambda: [0.5, 1.5]
""",
}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("case", sorted(SLICE_CASES))
def test_slices_match_mergekit(families: dict[str, dict[str, Path]], tmp_path: Path,
                               family: str, case: str) -> None:
    compare(SLICE_CASES[case], families[family], tmp_path)


NAMES_IN_FILTERS = """
merge_method: linear
parameters:
  normalize:
    - filter: layers.0.
      value: false
    - value: true
slices:
  - sources:
      - model: $base
        layer_range: [2, 4]
        parameters:
          weight:
            - filter: layers.3.
              value: 0.9
            - value: 0.5
      - model: $ft0
        layer_range: [0, 2]
        parameters: {weight: 1.0}
  - sources:
      - model: $base
        layer_range: [0, 2]
        parameters: {weight: 0.5}
      - model: $ft0
        layer_range: [2, 4]
        parameters: {weight: 0.5}
"""


@pytest.mark.parametrize("family", FAMILIES)
def test_filters_see_source_names_for_model_params(
    families: dict[str, dict[str, Path]], tmp_path: Path, family: str
) -> None:
    """As in mergekit, a per-model parameter's filter is matched against that model's *source*
    tensor name, a shared parameter's filter against the *output* name."""
    models = families[family]
    ours, _ = compare(NAMES_IN_FILTERS, models, tmp_path)
    merged = load_weights(ours)
    base, ft0 = load_weights(models["base"]), load_weights(models["ft0"])
    suffix = "self_attn.v_proj.weight"
    # out layer 0 = base layer 2 (weight 0.5) + ft0 layer 0 (1.0), normalize false (output name)
    expect0 = 0.5 * base[f"model.layers.2.{suffix}"] + 1.0 * ft0[f"model.layers.0.{suffix}"]
    # out layer 1 = base layer 3 (0.9: its source name matches) + ft0 layer 1, normalized
    expect1 = (0.9 * base[f"model.layers.3.{suffix}"] + ft0[f"model.layers.1.{suffix}"]) / 1.9
    # out layer 3 = base layer 1 (0.5: "layers.3." is only the output name) + ft0 layer 3
    expect3 = (0.5 * base[f"model.layers.1.{suffix}"] + 0.5 * ft0[f"model.layers.3.{suffix}"])
    assert _close(merged[f"model.layers.0.{suffix}"], expect0)
    assert _close(merged[f"model.layers.1.{suffix}"], expect1)
    assert _close(merged[f"model.layers.3.{suffix}"], expect3)


# ---------------------------------------------------------------------------------------------
# Passthrough layer stacking

STACK = """
merge_method: passthrough
slices:
  - sources:
      - model: $base
        layer_range: [0, 3]
  - sources:
      - model: $ft0
        layer_range: [1, 4]
"""


@pytest.mark.parametrize("family", FAMILIES)
def test_passthrough_stacking(families: dict[str, dict[str, Path]], tmp_path: Path,
                              family: str) -> None:
    """Layers [0, 3) of base + [1, 4) of ft0 give 6 layers, tensor for tensor as mergekit.

    mergekit 0.1.5 copies Qwen3's 4-entry ``layer_types`` unchanged next to
    ``num_hidden_layers: 6``, and transformers' config validation then rejects it, so mergekit
    raises after writing the weights but before writing config.json. In that case the weights it
    did write are still compared, and ours must have a 6-entry ``layer_types`` and load and run
    in transformers.
    """
    from transformers import AutoModelForCausalLM

    models = families[family]
    text = render(STACK, models)
    ours = run_ours(text, tmp_path / "ours")
    merged = load_weights(ours)
    theirs = tmp_path / "mergekit"
    try:
        run_mergekit(text, theirs)
    except Exception as err:
        assert "layer_types" in str(err), f"mergekit failed for another reason: {err!r}"
        assert family == "qwen3"
        assert_same_tensors(merged, load_weights(theirs), exact=True)
    else:
        assert_same_tensors(merged, load_weights(theirs), exact=True)
        assert_same_config(ours, theirs)

    cfg = load_config(ours)
    assert cfg["num_hidden_layers"] == 6
    if "layer_types" in load_config(models["base"]):
        assert len(cfg["layer_types"]) == 6
    base, ft0 = load_weights(models["base"]), load_weights(models["ft0"])
    for out_layer, (src, layer) in enumerate(
        [(base, 0), (base, 1), (base, 2), (ft0, 1), (ft0, 2), (ft0, 3)]
    ):
        for suffix in ("self_attn.o_proj.weight", "mlp.down_proj.weight",
                       "input_layernorm.weight"):
            assert torch.equal(merged[f"model.layers.{out_layer}.{suffix}"],
                               src[f"model.layers.{layer}.{suffix}"])

    model = AutoModelForCausalLM.from_pretrained(ours)
    assert model.config.num_hidden_layers == 6 and len(model.model.layers) == 6
    with torch.no_grad():
        logits = model(torch.tensor([[1, 5, 9, 42]])).logits
    assert logits.shape == (1, 4, model.config.vocab_size)
    assert bool(torch.isfinite(logits).all())


# ---------------------------------------------------------------------------------------------
# Random methods: exact arithmetic with shared masks, statistics against mergekit's draws

RANDOM_METHODS = ("dare_ties", "dare_linear", "della", "della_linear")


@contextmanager
def bernoulli_from(masks: list[torch.Tensor]) -> Iterator[list[torch.Tensor]]:
    """Make ``torch.bernoulli`` return ``masks`` in order, recording the probabilities asked."""
    original = torch.bernoulli
    asked: list[torch.Tensor] = []

    def fake(probs: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        asked.append(probs.clone())
        mask = masks[len(asked) - 1]
        assert mask.shape == probs.shape
        return mask.to(probs.dtype)

    torch.bernoulli = fake
    try:
        yield asked
    finally:
        torch.bernoulli = original


def _mergekit_method(name: str):
    from mergekit.merge_methods.registry import get

    return get(name)


def _random_inputs(shape: tuple[int, ...], n: int, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=gen)
    return [base] + [base + 0.1 * torch.randn(shape, generator=gen) for _ in range(n)]


@pytest.mark.parametrize("method", RANDOM_METHODS)
@pytest.mark.parametrize("rescale", [True, False])
def test_random_method_with_our_masks_equals_mergekit(method: str, rescale: bool) -> None:
    """Given the same keep masks, the rest of the arithmetic (rescale by the L1 ratio, weights,
    sign consensus, normalize) equals mergekit's exactly; della's keep probabilities too."""
    from mergekit.merge_methods.base import TensorGroup

    shape = (48, 64)
    tensors = _random_inputs(shape, 3, seed=7)
    name = "model.layers.0.mlp.up_proj.weight"
    density, epsilon, seed = [0.4, 0.7, 0.55], [0.1, 0.2, 0.05], 123
    weights = [0.8, 0.5, 1.2]
    per_input = [{}] + [
        {"weight": w, "density": d, "epsilon": e} for w, d, e in zip(weights, density, epsilon)
    ]
    shared = {"int8_mask": False, "normalize": method == "della", "rescale": rescale,
              "lambda": 0.9}
    x = TensorInputs(name=name, tensors=tensors, shared=shared, per_input=per_input, base=0,
                     seed=seed)
    ours = methods.merge_tensor(method, x)

    masks, probs = [], []
    for row in range(3):
        delta = tensors[row + 1] - tensors[0]
        key = rng.stream_key(seed, row, name)
        if method.startswith("della"):
            p = methods.della_probabilities(delta, density[row], epsilon[row])
        else:
            p = torch.full_like(delta, density[row])
        probs.append(p)
        masks.append(methods.random_keep(delta, p, key))
    group = TensorGroup.from_tensors(tensors, base_index=0, name=name)
    params = {"weight": [*weights], "density": [*density], "rescale": rescale,
              "normalize": shared["normalize"], "lambda": 0.9}
    if method.startswith("della"):
        params["epsilon"] = [*epsilon]
    with bernoulli_from(masks) as asked:
        (theirs,) = _mergekit_method(method)([group], parameters=params)
    assert len(asked) == 3
    for p_ours, p_theirs in zip(probs, asked):
        assert torch.equal(p_ours, p_theirs.reshape(p_ours.shape))
    assert_same_tensors({name: ours}, {name: theirs})


@pytest.mark.parametrize("density", [0.1, 0.5, 0.9])
def test_bernoulli_keep_rate_and_l1_rescale(density: float) -> None:
    from mergekit.sparsify import RescaleNorm, SparsificationMethod, sparsify

    gen = torch.Generator().manual_seed(3)
    delta = torch.randn(512, 512, generator=gen)
    n = delta.numel()
    std = (density * (1 - density) / n) ** 0.5
    ours = methods.bernoulli(delta, density, True, rng.stream_key(0, 0, "w"))
    torch.manual_seed(0)
    theirs = sparsify(delta, density, SparsificationMethod.random, rescale_norm=RescaleNorm.l1)
    for out in (ours, theirs):
        kept = out != 0
        assert abs(float(kept.float().mean()) - density) < 5 * std
        # L1 norm preserved; every kept element scaled by the same L1 ratio (not 1/density)
        assert float(out.abs().sum()) == pytest.approx(float(delta.abs().sum()), rel=1e-5)
        ratio = out[kept] / delta[kept]
        l1_ratio = float(delta.abs().sum() / (delta * kept).abs().sum())
        assert torch.allclose(ratio, torch.full_like(ratio, l1_ratio), rtol=1e-5)
    if density < 0.9:  # the L1 ratio differs measurably from 1/density
        ratio = float((ours[ours != 0] / delta[ours != 0]).mean())
        assert ratio != pytest.approx(1 / density, rel=1e-4)
    # no rescale: kept values untouched
    plain = methods.bernoulli(delta, density, False, rng.stream_key(0, 0, "w"))
    assert torch.equal(plain[plain != 0], delta[plain != 0])


def test_della_keep_probability_rises_with_rank() -> None:
    """Keep rates per magnitude decile match mergekit's statistically, rise with the rank and
    average to the density."""
    from mergekit.sparsify import SparsificationMethod, sparsify

    density, epsilon, draws = 0.5, 0.2, 8
    gen = torch.Generator().manual_seed(11)
    delta = torch.randn(256, 512, generator=gen)
    ranks = delta.abs().argsort(dim=1).argsort(dim=1)
    decile = (ranks * 10) // delta.shape[1]
    ours = torch.zeros(10)
    theirs = torch.zeros(10)
    torch.manual_seed(1)
    for s in range(draws):
        a = methods.della_magprune(delta, density, epsilon, False, rng.stream_key(s, 0, "w"), "w")
        b = sparsify(delta, density, SparsificationMethod.della_magprune, epsilon=epsilon)
        for d in range(10):
            sel = decile == d
            ours[d] += float((a[sel] != 0).float().mean()) / draws
            theirs[d] += float((b[sel] != 0).float().mean()) / draws
    per_decile = delta.numel() / 10 * draws
    expected = torch.tensor([density - epsilon + 2 * epsilon * (d + 0.5) / 10 for d in range(10)])
    tol = 5 * (0.25 / per_decile) ** 0.5 + 2 * epsilon / 10 / delta.shape[1]
    assert torch.all(ours[1:] > ours[:-1]), ours
    assert torch.allclose(ours, expected, atol=tol), (ours, expected)
    assert torch.allclose(theirs, expected, atol=tol), (theirs, expected)
    assert float(ours.mean()) == pytest.approx(density, abs=tol)


@pytest.mark.parametrize("method", RANDOM_METHODS)
def test_mean_over_seeds_approaches_expectation(method: str) -> None:
    """Without rescale, the mean over seeds tends to base + sum_i w_i * p_i * delta_i, with p_i
    the keep probability (the density for DARE, the rank-based one for DELLA)."""
    consensus = method in ("dare_ties", "della")
    # sign consensus is not linear in the masks, except with a single task vector
    tensors = _random_inputs((128, 128), 1 if consensus else 2, seed=5)
    density = [0.3, 0.6][: len(tensors) - 1]
    weights = [0.7, 0.4][: len(tensors) - 1]
    per_input = [{}] + [{"weight": w, "density": d, "epsilon": 0.1}
                        for w, d in zip(weights, density)]
    shared = {"int8_mask": False, "normalize": False, "rescale": False, "lambda": 1.0}
    seeds = 200
    total = torch.zeros_like(tensors[0], dtype=torch.float64)
    for s in range(seeds):
        x = TensorInputs(name="t", tensors=tensors, shared=shared, per_input=per_input, base=0,
                         seed=s)
        total += methods.merge_tensor(method, x).double()
    mean = total / seeds
    base = tensors[0].double()
    expect = base.clone()
    var = torch.zeros_like(base)
    for i, (w, d) in enumerate(zip(weights, density), start=1):
        delta = tensors[i].double() - base
        if method.startswith("della"):
            p = methods.della_probabilities(delta.float(), d, 0.1).double()
        else:
            p = torch.full_like(delta, d)
        expect += w * p * delta
        var += (w * delta) ** 2 * p * (1 - p)
    z = (mean - expect) / (var / seeds).sqrt().clamp(min=1e-12)
    assert float(z.abs().max()) < 6.0
    assert abs(float(z.mean())) < 0.05 and float(z.std()) == pytest.approx(1.0, abs=0.05)


@pytest.fixture(scope="module")
def wide_pair(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> dict[str, Path]:
    """A 1-layer Llama with hidden 256 / intermediate 1024 and a fine-tune of it."""
    root = tmp_path_factory.mktemp("wide_pair")
    base = build_tiny_model(root / "base", "llama", num_layers=1, hidden_size=256,
                            intermediate_size=1024, num_heads=4, num_kv_heads=2,
                            tie_word_embeddings=False, tokenizer_dir=tokenizer_dir)
    return {"base": base,
            "ft0": perturb_model(base, root / "ft0", seed=5, scale=0.05),
            "ft1": perturb_model(base, root / "ft1", seed=6, scale=0.05)}


RANDOM_TEMPLATE = """
merge_method: {method}
base_model: $base
parameters: {{density: 0.4, weight: 1.0{extra}}}
models:
  - model: $base
  - model: $ft0
"""


@pytest.mark.parametrize("method", RANDOM_METHODS)
def test_random_method_run_merge(wide_pair: dict[str, Path], tmp_path: Path, method: str) -> None:
    """Full merges: same seed -> bit-identical checkpoints, another seed -> other masks; the
    keep rate and the L1 rescale agree with mergekit's run of the same YAML."""
    extra = ", epsilon: 0.15" if method.startswith("della") else ""
    template = RANDOM_TEMPLATE.format(method=method, extra=extra)
    text = render(template, wide_pair)
    a = load_weights(run_ours(text, tmp_path / "a", seed=1))
    b = load_weights(run_ours(text, tmp_path / "b", seed=1))
    c = load_weights(run_ours(text, tmp_path / "c", seed=2))
    torch.manual_seed(0)
    theirs_dir = run_mergekit(text, tmp_path / "mergekit")
    theirs = load_weights(theirs_dir)
    assert sorted(a) == sorted(theirs)
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name}: same seed, different output"
        assert a[name].shape == theirs[name].shape and a[name].dtype == theirs[name].dtype
    assert_same_config(tmp_path / "a", theirs_dir)

    base, ft = load_weights(wide_pair["base"]), load_weights(wide_pair["ft0"])
    name = "model.layers.0.mlp.up_proj.weight"  # 1024 x 256
    assert not torch.equal(a[name], c[name]), "different seeds gave the same mask"
    delta = ft[name] - base[name]
    n = delta.numel()
    rates = []
    for out in (a[name], c[name], theirs[name]):
        kept = out != base[name]
        rate = float(kept.float().mean())
        rates.append(rate)
        assert abs(rate - 0.4) < 6 * (0.24 / n) ** 0.5, rate
        # rescale (default on) preserves the L1 norm of the delta (single model, weight 1)
        got = (out - base[name]).abs().sum()
        assert float(got) == pytest.approx(float(delta.abs().sum()), rel=1e-4)
    overlap = float(((a[name] != base[name]) & (c[name] != base[name])).float().mean())
    assert overlap == pytest.approx(0.4 * 0.4, abs=0.02)
