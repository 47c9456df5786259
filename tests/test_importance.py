"""Importance-weighted merging: calibration statistics, their cache, the three methods, the
worker path, a study through the driver and its export."""

from __future__ import annotations

import json
import math
from pathlib import Path

import optuna
import pytest
import torch
import yaml
from optuna.trial import TrialState
from safetensors.torch import load_file

from mergesearch.cli import main
from mergesearch.driver.config import load_study
from mergesearch.driver.driver import run_study
from mergesearch.driver.export import export_study, open_study
from mergesearch.errors import CheckpointError, ConfigError, MergeSearchError
from mergesearch.merge import importance as imp
from mergesearch.merge.executor import run_merge
from mergesearch.merge.methods import TensorInputs, merge_tensor
from mergesearch.merge.registry import validate_plan
from mergesearch.plan import loads_plan, parse_plan
from mergesearch.zoo.build import ZooConfig, build_zoo

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TEXTS = [f"What is {a} + {b}?\n{a + b}" for a, b in ((12, 30), (7, 58), (41, 9), (66, 23), (5, 5), (80, 11))]


def _inputs(tensors, per_input, shared, importance=(), base=None) -> TensorInputs:
    return TensorInputs(name="model.layers.0.mlp.up_proj.weight", tensors=tensors, shared=shared,
                        per_input=per_input, base=base, importance=importance)


def _rand(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g)


@pytest.fixture(scope="module")
def calib_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("calib") / "calib.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS), encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------
# The methods


def test_importance_linear_with_exponent_zero_is_exactly_linear():
    tensors = [_rand(16, 8, seed=i) for i in range(3)]
    acts = [{"act_l2": _rand(8, seed=10 + i).abs()} for i in range(3)]
    per = [{"weight": w} for w in (0.2, 0.5, 0.3)]
    got = merge_tensor("importance_linear", _inputs(tensors, per, {"exponent": 0.0}, acts))
    want = merge_tensor("linear", _inputs(tensors, per, {"normalize": True}))
    assert torch.equal(got, want)


def test_importance_linear_matches_a_hand_computation():
    a = torch.tensor([[1.0, -2.0], [0.5, 4.0]])
    b = torch.tensor([[3.0, 1.0], [-1.0, 2.0]])
    xa, xb = torch.tensor([1.0, 0.5]), torch.tensor([2.0, 1.0])
    wa, wb, p = 0.6, 0.4, 2.0
    want = torch.empty(2, 2)
    for r in range(2):
        for c in range(2):
            sa = wa * (abs(a[r, c]) * xa[c]) ** p
            sb = wb * (abs(b[r, c]) * xb[c]) ** p
            want[r, c] = (sa * a[r, c] + sb * b[r, c]) / (sa + sb)
    got = merge_tensor("importance_linear", _inputs(
        [a, b], [{"weight": wa}, {"weight": wb}], {"exponent": p}, [{"act_l2": xa}, {"act_l2": xb}]))
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    # a larger exponent moves each element towards the source with the larger |W|*||X||
    sharper = merge_tensor("importance_linear", _inputs(
        [a, b], [{"weight": wa}, {"weight": wb}], {"exponent": 8.0}, [{"act_l2": xa}, {"act_l2": xb}]))
    assert (sharper[0, 0] - b[0, 0]).abs() < (got[0, 0] - b[0, 0]).abs()


def test_tensors_without_activation_statistics_fall_back_to_the_plain_method():
    norm = [_rand(8, seed=i) for i in range(2)]
    per = [{"weight": 0.7}, {"weight": 0.3}]
    got = merge_tensor("importance_linear", _inputs(norm, per, {"exponent": 1.5}, [{}, {}]))
    assert torch.equal(got, merge_tensor("linear", _inputs(norm, per, {"normalize": True})))
    embed = [_rand(10, 4, seed=i) for i in range(3)]
    shared = {"exponent": 1.0, "lambda": 0.8, "normalize": False}
    ta_per = [{}, {"weight": 0.5}, {"weight": 0.9}]
    got = merge_tensor("importance_task_arithmetic", _inputs(embed, ta_per, shared, [{}, {}, {}], base=0))
    want = merge_tensor("task_arithmetic", _inputs(
        embed, ta_per, {"lambda": 0.8, "normalize": False, "rescale": False, "int8_mask": False}, base=0))
    assert torch.equal(got, want)


def test_elements_where_every_score_is_zero_get_the_plain_weights():
    a, b = torch.ones(2, 3), torch.full((2, 3), 3.0)
    got = merge_tensor("importance_linear", _inputs(
        [a, b], [{"weight": 0.25}, {"weight": 0.75}], {"exponent": 1.0},
        [{"act_l2": torch.zeros(3)}, {"act_l2": torch.zeros(3)}]))
    torch.testing.assert_close(got, torch.full((2, 3), 0.25 + 0.75 * 3))


@pytest.mark.parametrize("normalize", [False, True])
def test_importance_task_arithmetic_with_exponent_zero_is_exactly_task_arithmetic(normalize):
    tensors = [_rand(12, 6, seed=i) for i in range(3)]
    acts = [{"act_l2": _rand(6, seed=20 + i).abs()} for i in range(3)]
    per = [{}, {"weight": 0.7}, {"weight": 0.4}]
    got = merge_tensor("importance_task_arithmetic", _inputs(
        tensors, per, {"exponent": 0.0, "lambda": 1.2, "normalize": normalize}, acts, base=0))
    want = merge_tensor("task_arithmetic", _inputs(
        tensors, per, {"lambda": 1.2, "normalize": normalize, "rescale": False, "int8_mask": False}, base=0))
    assert torch.equal(got, want)


def test_importance_task_arithmetic_matches_a_hand_computation():
    base = torch.tensor([[0.0, 1.0], [2.0, -1.0]])
    e1 = base + torch.tensor([[1.0, -0.5], [0.0, 2.0]])
    e2 = base + torch.tensor([[0.5, 1.0], [3.0, 1.0]])
    x1, x2 = torch.tensor([1.0, 2.0]), torch.tensor([0.5, 1.0])
    w1, w2, p, lam = 0.8, 0.5, 1.0, 0.9
    want = base.clone()
    for r in range(2):
        for c in range(2):
            d1, d2 = e1[r, c] - base[r, c], e2[r, c] - base[r, c]
            s1, s2 = (abs(d1) * x1[c]) ** p, (abs(d2) * x2[c]) ** p
            mean = (s1 + s2) / 2
            m1, m2 = (s1 / mean, s2 / mean) if mean > 0 else (1.0, 1.0)
            want[r, c] += lam * (w1 * m1 * d1 + w2 * m2 * d2)
    got = merge_tensor("importance_task_arithmetic", _inputs(
        [base, e1, e2], [{}, {"weight": w1}, {"weight": w2}], {"exponent": p, "lambda": lam, "normalize": False},
        [{"act_l2": torch.ones(2)}, {"act_l2": x1}, {"act_l2": x2}], base=0))
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_fisher_matches_a_hand_computation_and_reduces_to_linear():
    a = torch.tensor([[1.0, 2.0, 3.0]])
    b = torch.tensor([[-1.0, 0.0, 5.0]])
    fa, fb = torch.tensor([[4.0, 0.0, 1.0]]), torch.tensor([[1.0, 0.0, 3.0]])
    wa, wb, floor = 0.5, 1.5, 0.25
    per = [{"weight": wa}, {"weight": wb}]
    stats = [{"fisher": fa}, {"fisher": fb}]
    mean = (fa.sum() + fb.sum()) / 6
    want = torch.empty(1, 3)
    for c in range(3):
        ga, gb = max(fa[0, c], floor * mean), max(fb[0, c], floor * mean)
        want[0, c] = (wa * ga * a[0, c] + wb * gb * b[0, c]) / (wa * ga + wb * gb)
    got = merge_tensor("fisher", _inputs([a, b], per, {"fisher_floor": floor}, stats))
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    linear = merge_tensor("linear", _inputs([a, b], per, {"normalize": True}))
    huge = merge_tensor("fisher", _inputs([a, b], per, {"fisher_floor": 1e12}, stats))
    torch.testing.assert_close(huge, linear, rtol=1e-6, atol=1e-6)
    equal = merge_tensor("fisher", _inputs([a, b], per, {"fisher_floor": 0.0}, [{"fisher": fa}, {"fisher": fa}]))
    torch.testing.assert_close(equal[:, [0, 2]], linear[:, [0, 2]], rtol=1e-6, atol=1e-6)
    # column 1: every Fisher is zero and the floor is zero, so the plain weights apply
    torch.testing.assert_close(equal[:, 1], linear[:, 1])
    assert torch.equal(merge_tensor("fisher", _inputs([a, b], per, {"fisher_floor": 0.1}, [{}, {}])), linear)


# ---------------------------------------------------------------------------------------------
# Calibration and its cache


def _independent_stats(model_dir: Path, texts, max_length: int):
    """Activation norms and Fisher of one q_proj, recomputed by keeping every activation."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, local_files_only=True)
    name = "model.layers.1.self_attn.q_proj"
    module = model.get_submodule(name)
    seen = []
    module.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach().reshape(-1, args[0].shape[-1])))
    fisher = torch.zeros_like(module.weight)
    n = 0
    for text in texts:
        ids = tok(text, truncation=True, max_length=max_length, return_tensors="pt")["input_ids"]
        model.zero_grad()
        out = model(input_ids=ids, labels=ids)
        (out.loss * (ids.shape[1] - 1)).backward()
        fisher += module.weight.grad.square()
        n += 1
    x = torch.cat(seen).double()
    return f"{name}.weight", x.square().sum(0).sqrt().float(), x.abs().mean(0).float(), fisher / n


def test_calibration_matches_an_independent_computation_and_is_cached(qwen3_family, calib_file, tmp_path, monkeypatch):
    data = imp.load_data(str(calib_file), limit=5)
    assert len(data.texts) == 5
    cache = tmp_path / "cache"
    path, hit = imp.calibrate(qwen3_family["ft0"], data, max_length=32, cache_dir=cache)
    assert not hit and path.parent == cache
    assert [p.name for p in cache.iterdir()] == [path.name], "no temporary file is left behind"
    stats = load_file(path)
    name, l2, mean_abs, fisher = _independent_stats(qwen3_family["ft0"], data.texts, 32)
    torch.testing.assert_close(stats[f"act_l2:{name}"], l2, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stats[f"act_mean_abs:{name}"], mean_abs, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stats[f"fisher:{name}"], fisher, rtol=1e-4, atol=1e-10)
    assert stats[f"fisher:{name}"].abs().sum() > 0
    # every linear weight of the checkpoint has activation stats; embeddings and norms have only Fisher
    assert "act_l2:model.layers.0.mlp.down_proj.weight" in stats
    assert "fisher:model.embed_tokens.weight" in stats and "act_l2:model.embed_tokens.weight" not in stats
    assert "fisher:model.norm.weight" in stats and "act_l2:model.norm.weight" not in stats

    def boom(*_a, **_k):
        raise AssertionError("a cache hit must not calibrate again")

    monkeypatch.setattr(imp, "compute_stats", boom)
    again, hit = imp.calibrate(qwen3_family["ft0"], data, max_length=32, cache_dir=cache)
    assert hit and again == path
    other = imp.load_data(str(calib_file), limit=4)
    assert other.hash != data.hash
    assert imp.cache_path(cache, qwen3_family["ft0"], other.hash, 32) != path
    assert imp.cache_path(cache, qwen3_family["ft1"], data.hash, 32) != path


def test_calibration_data_from_an_eval_task_uses_its_proxy_prompts():
    data = imp.load_data("addition", limit=3)
    assert len(data.texts) == 3 and data.texts[0].startswith("What is ") and data.source.endswith("addition.yaml")


def test_the_cli_calibrates_then_hits_the_cache(qwen3_family, calib_file, tmp_path, capsys):
    args = ["calibrate", str(qwen3_family["ft1"]), "--data", str(calib_file), "--out", str(tmp_path),
            "--limit", "2", "--max-length", "16"]
    assert main(args) == 0
    assert "computed" in capsys.readouterr().out
    assert main(args) == 0
    assert "cache hit" in capsys.readouterr().out
    assert len(list(tmp_path.glob("*.safetensors"))) == 1


@pytest.mark.parametrize("content, match", [
    (None, "does not exist"),
    ("", "has no examples"),
    ('{"prompt": "no text field"}\n', "non-empty string field `text`"),
    ('{"text": "   "}\n', "non-empty string field `text`"),
])
def test_bad_calibration_data_is_refused_naming_the_file(tmp_path, content, match):
    path = tmp_path / "calib.jsonl"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ConfigError, match=match) as err:
        imp.load_data(str(path))
    assert str(path) in str(err.value)


def test_unknown_calibration_kinds_and_tasks_are_refused():
    with pytest.raises(ConfigError, match="neither a .jsonl file nor an eval task"):
        imp.load_data("data.csv")
    with pytest.raises(ConfigError, match="No task named"):
        imp.load_data("no_such_task")


# ---------------------------------------------------------------------------------------------
# Plans, the executor and the worker


def _plan(family, method: str, calib: Path, cache: Path, **params) -> str:
    cal = f"calibration: {{data: {calib}, limit: 4, max_length: 24, cache: {cache}}}\n"
    if method == "importance_task_arithmetic":
        return (f"merge_method: {method}\nbase_model: {family['base']}\n{cal}"
                f"parameters: {json.dumps(params)}\nmodels:\n  - model: {family['base']}\n"
                f"  - model: {family['ft0']}\n    parameters: {{weight: 0.7}}\n"
                f"  - model: {family['ft1']}\n    parameters: {{weight: 0.5}}\n")
    return (f"merge_method: {method}\n{cal}parameters: {json.dumps(params)}\nmodels:\n"
            f"  - model: {family['ft0']}\n    parameters: {{weight: 0.6}}\n"
            f"  - model: {family['ft1']}\n    parameters: {{weight: 0.4}}\n")


def _merged(out: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for f in out.glob("*.safetensors"):
        tensors.update(load_file(f))
    return tensors


@pytest.mark.parametrize("method, plain, params", [
    ("importance_linear", "linear", {"exponent": 0.0}),
    ("importance_task_arithmetic", "task_arithmetic", {"exponent": 0.0, "lambda": 0.9}),
])
def test_a_checkpoint_with_exponent_zero_equals_the_plain_method(qwen3_family, calib_file, tmp_path, method, plain, params):
    text = _plan(qwen3_family, method, calib_file, tmp_path / "cache", **params)
    run_merge(loads_plan(text), tmp_path / "imp")
    plain_text = text.replace(method, plain).replace('"exponent": 0.0', '"normalize": true' if plain == "linear" else '"normalize": false')
    plain_plan = parse_plan({k: v for k, v in yaml.safe_load(plain_text).items() if k != "calibration"})
    run_merge(plain_plan, tmp_path / "plain")
    got, want = _merged(tmp_path / "imp"), _merged(tmp_path / "plain")
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), name


def test_the_worker_merges_importance_methods_like_the_executor(qwen3_family, calib_file, tmp_path):
    from mergesearch.eval.hf import TransformersEngine
    from mergesearch.workers import worker as W

    paths = tuple(str(qwen3_family[k]) for k in ("base", "ft0", "ft1"))
    sources = W.ResidentSources(paths)
    engine = TransformersEngine(paths[0], dtype="float32")
    try:
        materialise = W.Materializer(sources, engine)
        for method, params in (("importance_linear", {"exponent": 1.5}), ("fisher", {"fisher_floor": 0.01}),
                               ("importance_task_arithmetic", {"exponent": 1.0, "lambda": 1.0})):
            plan = loads_plan(_plan(qwen3_family, method, calib_file, tmp_path / "cache", **params))
            materialise(plan)
            run_merge(plan, tmp_path / method)
            on_disk = _merged(tmp_path / method)
            live = engine.state_dict()
            for name, tensor in on_disk.items():
                torch.testing.assert_close(live[name], tensor, rtol=0, atol=0, msg=f"{method} {name}")
            plain = _merged_plain(qwen3_family, method, tmp_path)
            differs = [n for n in on_disk if not torch.equal(on_disk[n], plain[n])]
            assert differs, f"{method} with calibration must differ from the plain merge"
            assert all(".layers." in n or n == "lm_head.weight" or method == "fisher" for n in differs)
        assert len(materialise.stats) == 2, "statistics are loaded once per calibration and kind (activations, Fisher)"
    finally:
        engine.close()
        sources.close()


def _merged_plain(family, method: str, tmp_path: Path) -> dict[str, torch.Tensor]:
    out = tmp_path / f"plain-{method}"
    if method == "importance_task_arithmetic":
        raw = {"merge_method": "task_arithmetic", "base_model": str(family["base"]),
               "models": [{"model": str(family["base"])}, {"model": str(family["ft0"]), "parameters": {"weight": 0.7}},
                          {"model": str(family["ft1"]), "parameters": {"weight": 0.5}}]}
    else:
        raw = {"merge_method": "linear", "models": [{"model": str(family["ft0"]), "parameters": {"weight": 0.6}},
                                                    {"model": str(family["ft1"]), "parameters": {"weight": 0.4}}]}
    run_merge(parse_plan(raw), out)
    return _merged(out)


def test_importance_methods_need_calibration_and_a_nonnegative_exponent(qwen3_family, calib_file, tmp_path):
    text = _plan(qwen3_family, "importance_linear", calib_file, tmp_path, exponent=1.0)
    no_cal = "\n".join(line for line in text.splitlines() if not line.startswith("calibration"))
    with pytest.raises(ConfigError, match=r"no `calibration:`.*calibration: \{data: FILE.jsonl\}"):
        run_merge(loads_plan(no_cal), tmp_path / "out")
    with pytest.raises(ConfigError, match=r"exponent = -0.5 is out of range; exponent must be in \[0, inf\]"):
        validate_plan(loads_plan(text.replace('"exponent": 1.0', '"exponent": -0.5')))
    with pytest.raises(ConfigError, match="fisher_floor = -1.0 is out of range"):
        validate_plan(loads_plan(_plan(qwen3_family, "fisher", calib_file, tmp_path, fisher_floor=-1.0)))
    missing = text.replace(str(calib_file), str(tmp_path / "gone.jsonl"))
    with pytest.raises(ConfigError, match="gone.jsonl' does not exist"):
        run_merge(loads_plan(missing), tmp_path / "out")
    changed = text.replace("limit: 4,", "limit: 4, hash: 0123abcd,")
    with pytest.raises(ConfigError, match="has changed: its content hash is"):
        run_merge(loads_plan(changed), tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------
# A study through the driver, and its export


@pytest.fixture(scope="module")
def tiny_zoo(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("imp_zoo") / "zoo"
    build_zoo(root, ZooConfig(base_steps=3, expert_steps=2, warmup_steps=1, verify=False, verify_limit=2, threads=1))
    return root


def _study(folder: Path, zoo: Path, **over) -> Path:
    study = {
        "name": "imp",
        "sources": {"models": [str(zoo / "experts" / "addition"), str(zoo / "experts" / "order")]},
        "method": "importance_linear",
        "space": "importance_weights",
        "calibration": {"data": "order", "limit": 4, "max_length": 32, "cache_dir": "cache"},
        "evals": {"tasks": ["order"], "proxy_limit": 4, "held_out_limit": 2, "chunk_size": 2},
        "sampler": "random",
        "budget": {"trials": 2},
        "top_k": 1,
        "output_dir": "out",
        **over,
    }
    study = {k: v for k, v in study.items() if v is not None}
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "study.yaml"
    path.write_text(yaml.safe_dump(study), encoding="utf-8")
    return path


def test_an_importance_study_runs_through_the_driver_and_exports(tiny_zoo, tmp_path):
    path = _study(tmp_path / "s", tiny_zoo)
    logs: list[str] = []
    outcome = run_study(load_study(path), log=logs.append)
    url = f"sqlite:///{tmp_path / 's' / 'out' / 'study.db'}"
    study = optuna.load_study(study_name="imp", storage=url)
    done = study.get_trials(states=(TrialState.COMPLETE,))
    assert len(done) == 2 and outcome.best_trial is not None
    assert {"exponent", "weight.0", "weight.1"} <= set(done[0].params)
    plan = loads_plan(done[0].user_attrs["plan"])
    assert plan.merge_method == "importance_linear" and plan.calibration is not None
    assert plan.calibration.data.endswith("order.yaml") and len(plan.calibration.hash) == 64
    assert len(list((tmp_path / "s" / "cache").glob("*.safetensors"))) == 2
    assert all(math.isfinite(t.value) for t in done)
    ranked = (tmp_path / "s" / "out" / "best").glob("rank1-trial*.yaml")
    assert "mergekit cannot reproduce this merge" in next(ranked).read_text()

    result = export_study(open_study(path, None, None), tmp_path / "export")
    header = (tmp_path / "export" / "config.yaml").read_text()
    assert "MERGEKIT CANNOT REPRODUCE THIS MERGE" in header and "mergekit-yaml" not in header
    assert plan.calibration.hash in header and "merge_method: importance_linear" in header
    card = (tmp_path / "export" / "README.md").read_text()
    assert "mergekit has no such method" in card and "checkpoint is the authority" in card
    exported = loads_plan(header)
    assert exported.calibration == loads_plan(study.trials[result.exports[0].trial].user_attrs["plan"]).calibration
    run_merge(exported, tmp_path / "again")
    again, got = _merged(tmp_path / "again"), _merged(tmp_path / "export")
    assert again.keys() == got.keys() and all(torch.equal(again[n], got[n]) for n in got)


def test_a_study_with_an_importance_method_needs_calibration_data(tiny_zoo, tmp_path):
    from mergesearch.driver.driver import prepare

    with pytest.raises(ConfigError, match="no `calibration:`; add `calibration: FILE.jsonl`"):
        prepare(load_study(_study(tmp_path / "a", tiny_zoo, calibration=None)))
    with pytest.raises(ConfigError, match="missing.jsonl' does not exist"):
        prepare(load_study(_study(tmp_path / "b", tiny_zoo, calibration="missing.jsonl")))
    with pytest.raises(MergeSearchError, match="limit"):
        load_study(_study(tmp_path / "c", tiny_zoo, calibration={"data": "order", "limit": 0}))


def test_a_model_folder_without_weights_cannot_be_calibrated(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="no safetensors weights"):
        imp.model_hash(tmp_path)
