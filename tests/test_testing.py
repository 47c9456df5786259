"""Tests for the tiny checkpoint builders in mergesearch.testing."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from mergesearch.testing import (
    SPECIAL_TOKENS,
    build_family,
    build_tiny_model,
    build_tokenizer,
    perturb_model,
)


def _weights(model_dir: Path) -> dict[str, torch.Tensor]:
    index = model_dir / "model.safetensors.index.json"
    files = (
        sorted(set(json.loads(index.read_text())["weight_map"].values()))
        if index.exists()
        else ["model.safetensors"]
    )
    out: dict[str, torch.Tensor] = {}
    for file in files:
        with safe_open(str(model_dir / file), framework="pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def _digests(model_dir: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(model_dir.iterdir())
        if p.is_file()
    }


def _logits(model_dir: Path) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    model.eval()
    ids = torch.tensor([[0, 5, 17, 300, 42, 2]])
    with torch.no_grad():
        return model(input_ids=ids).logits


# --- tokenizer -----------------------------------------------------------------------


def test_tokenizer_loads_and_round_trips(tokenizer_dir: Path) -> None:
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    assert isinstance(tok, PreTrainedTokenizerFast)
    assert len(tok) == 512
    assert tok.eos_token == "<|im_end|>"
    assert tok.pad_token == "<|endoftext|>"
    assert [tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == [0, 1, 2]
    for text in ["The quick brown fox.", "def f(x):\n    return x * 42\n", "naïve 🙂 日本 0123"]:
        ids = tok(text)["input_ids"]
        assert all(0 <= i < 512 for i in ids)
        assert tok.decode(ids) == text
    assert len(tok("the model")["input_ids"]) < len("the model")


def test_tokenizer_chat_template(tokenizer_dir: Path) -> None:
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    rendered = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    ids = tok(rendered)["input_ids"]
    assert ids.count(tok.convert_tokens_to_ids("<|im_start|>")) == 3
    assert json.loads((tokenizer_dir / "tokenizer_config.json").read_text())["chat_template"]


def test_tokenizer_deterministic_and_other_sizes(tmp_path: Path, tokenizer_dir: Path) -> None:
    again = build_tokenizer(tmp_path / "again")
    assert _digests(again) == _digests(tokenizer_dir)
    big = AutoTokenizer.from_pretrained(build_tokenizer(tmp_path / "big", vocab_size=1500))
    assert len(big) == 1500
    with pytest.raises(ValueError, match="100"):
        build_tokenizer(tmp_path / "small", vocab_size=100)


# --- models ------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["qwen3_family", "llama_family"])
def test_family_members_load_with_finite_logits(family: str, request: pytest.FixtureRequest) -> None:
    members: dict[str, Path] = request.getfixturevalue(family)
    logits = {name: _logits(path) for name, path in members.items()}
    for name, value in logits.items():
        assert value.shape == (1, 6, 512), name
        assert torch.isfinite(value).all(), name
    for name in members:
        if name != "base":
            assert not torch.equal(logits[name], logits["base"]), name


def test_qwen3_family_layout(qwen3_family: dict[str, Path]) -> None:
    assert set(qwen3_family) == {"base", "ft0", "ft1", "ft2"}
    config = AutoConfig.from_pretrained(qwen3_family["base"])
    assert config.model_type == "qwen3"
    assert config.num_hidden_layers == 4
    assert config.tie_word_embeddings is True
    base = _weights(qwen3_family["base"])
    assert "lm_head.weight" not in base
    assert all(t.dtype == torch.float32 for t in base.values())
    for path in qwen3_family.values():
        assert (path / "tokenizer.json").is_file()
        assert (path / "generation_config.json").is_file()
        assert set(_weights(path)) == set(base)


def test_llama_family_layout(llama_family: dict[str, Path]) -> None:
    assert set(llama_family) == {"base", "ft0", "ft1"}
    config = AutoConfig.from_pretrained(llama_family["base"])
    assert config.model_type == "llama"
    assert config.tie_word_embeddings is False
    base = _weights(llama_family["base"])
    assert "lm_head.weight" in base
    assert not torch.equal(base["lm_head.weight"], base["model.embed_tokens.weight"])
    ft0, ft1 = _weights(llama_family["ft0"]), _weights(llama_family["ft1"])
    assert not torch.equal(ft0["lm_head.weight"], ft1["lm_head.weight"])


def test_norms_are_not_all_ones(qwen3_family: dict[str, Path]) -> None:
    norms = {k: v for k, v in _weights(qwen3_family["base"]).items() if k.endswith("norm.weight")}
    assert any("q_norm" in k for k in norms) and "model.norm.weight" in norms
    for name, tensor in norms.items():
        assert not torch.all(tensor == 1.0), name
        assert torch.allclose(tensor.mean(), torch.tensor(1.0), atol=0.1), name


def test_loaded_weights_match_files(qwen3_family: dict[str, Path]) -> None:
    model = AutoModelForCausalLM.from_pretrained(qwen3_family["ft1"])
    state = model.state_dict()
    for name, tensor in _weights(qwen3_family["ft1"]).items():
        assert torch.equal(state[name], tensor), name
    assert torch.equal(state["lm_head.weight"], state["model.embed_tokens.weight"])


def test_sharded_checkpoint_index(qwen3_family: dict[str, Path]) -> None:
    ft1 = qwen3_family["ft1"]
    index = json.loads((ft1 / "model.safetensors.index.json").read_text())
    shards = sorted(ft1.glob("model-*.safetensors"))
    assert len(shards) >= 3
    assert not (ft1 / "model.safetensors").exists()
    assert sorted(set(index["weight_map"].values())) == [p.name for p in shards]
    assert all(p.name.endswith(f"-of-{len(shards):05d}.safetensors") for p in shards)
    weights = _weights(ft1)
    assert set(index["weight_map"]) == set(weights)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in weights.values())
    for file in set(index["weight_map"].values()):
        with safe_open(str(ft1 / file), framework="pt") as f:
            assert all(index["weight_map"][k] == file for k in f.keys())


def test_build_tiny_model_sharded_and_bf16(tmp_path: Path, tokenizer_dir: Path) -> None:
    out = build_tiny_model(
        tmp_path / "m",
        "llama",
        num_layers=2,
        dtype="bfloat16",
        max_shard_size="100KB",
        tokenizer_dir=tokenizer_dir,
    )
    assert len(list(out.glob("model-*.safetensors"))) >= 3
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert all(t.dtype == torch.bfloat16 for t in _weights(out).values())
    assert torch.isfinite(_logits(out).float()).all()


def test_build_is_deterministic(tmp_path: Path, tokenizer_dir: Path) -> None:
    kwargs = dict(num_layers=2, seed=7, tokenizer_dir=tokenizer_dir)
    a = build_tiny_model(tmp_path / "a", "qwen3", **kwargs)
    b = build_tiny_model(tmp_path / "b", "qwen3", **kwargs)
    assert _digests(a) == _digests(b)
    c = build_tiny_model(tmp_path / "c", "qwen3", **{**kwargs, "seed": 8})
    assert _digests(c)["model.safetensors"] != _digests(a)["model.safetensors"]
    pa = perturb_model(a, tmp_path / "pa", seed=3, max_shard_size="50KB")
    pb = perturb_model(b, tmp_path / "pb", seed=3, max_shard_size="50KB")
    assert _digests(pa) == _digests(pb)


def test_build_family_defaults(tmp_path: Path) -> None:
    family = build_family(tmp_path, "qwen3", n_finetunes=2, num_layers=1, hidden_size=32, num_heads=2)
    assert family == {"base": tmp_path / "base", "ft0": tmp_path / "ft0", "ft1": tmp_path / "ft1"}
    assert (tmp_path / "base" / "tokenizer.json").is_file()
    w = {name: _weights(path) for name, path in family.items()}
    key = "model.layers.0.mlp.up_proj.weight"
    assert not torch.equal(w["ft0"][key], w["ft1"][key])


# --- perturb_model ---------------------------------------------------------------


def test_perturb_noise_is_scaled(qwen3_family: dict[str, Path]) -> None:
    base, ft0 = _weights(qwen3_family["base"]), _weights(qwen3_family["ft0"])
    for name, tensor in base.items():
        delta = ft0[name] - tensor
        assert delta.abs().max() > 0, name
        ratio = (delta.std() / (0.02 * tensor.std())).item()
        assert 0.5 < ratio < 1.5, (name, ratio)


def test_perturb_drop_reshape_dtype(tmp_path: Path, qwen3_family: dict[str, Path]) -> None:
    base_dir = qwen3_family["base"]
    dropped = "model.layers.1.mlp.gate_proj.weight"
    reshaped = "model.layers.2.self_attn.q_proj.weight"
    out = perturb_model(
        base_dir,
        tmp_path / "p",
        seed=5,
        dtype="bfloat16",
        drop=[dropped],
        reshape={reshaped: (32, 64)},
    )
    base, new = _weights(base_dir), _weights(out)
    assert set(new) == set(base) - {dropped}
    assert tuple(new[reshaped].shape) == (32, 64)
    assert all(t.dtype == torch.bfloat16 for t in new.values())
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == "bfloat16"
    assert config["num_hidden_layers"] == 4
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (out / name).read_bytes() == (base_dir / name).read_bytes()

    plain = _weights(perturb_model(base_dir, tmp_path / "q", seed=5))
    key = "model.layers.0.self_attn.k_proj.weight"
    assert torch.equal(new[key], plain[key].to(torch.bfloat16))


def test_perturb_scale_zero_reshards_exactly(tmp_path: Path, qwen3_family: dict[str, Path]) -> None:
    src = qwen3_family["ft1"]
    out = perturb_model(src, tmp_path / "copy", seed=0, scale=0.0)
    assert (out / "model.safetensors").is_file()
    assert not (out / "model.safetensors.index.json").exists()
    a, b = _weights(src), _weights(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --- argument validation -------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"arch": "mistral"}, "mistral"),
        ({"num_layers": 0}, "num_layers"),
        ({"hidden_size": 65}, "65"),
        ({"num_heads": 2, "num_kv_heads": 3}, "num_kv_heads=3"),
        ({"dtype": "int8"}, "int8"),
        ({"vocab_size": 300, "tokenizer_dir": "TOK"}, "vocab_size=300"),
        ({"max_shard_size": "12 parsecs"}, "12 parsecs"),
        ({"seed": -1}, "-1"),
    ],
)
def test_build_tiny_model_bad_args(
    tmp_path: Path, tokenizer_dir: Path, kwargs: dict, match: str
) -> None:
    if kwargs.get("tokenizer_dir") == "TOK":
        kwargs = {**kwargs, "tokenizer_dir": tokenizer_dir}
    with pytest.raises(ValueError, match=match):
        build_tiny_model(tmp_path / "bad", **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"drop": ["no.such.tensor"]}, "no.such.tensor"),
        ({"reshape": {"no.such.tensor": (2, 2)}}, "no.such.tensor"),
        ({"reshape": {"model.norm.weight": (0,)}}, "model.norm.weight"),
        ({"dtype": "float64"}, "float64"),
        ({"scale": -1.0}, "-1.0"),
        ({"max_shard_size": 0}, "max_shard_size"),
        ({"drop": "model.norm.weight"}, "model.norm.weight"),
    ],
)
def test_perturb_model_bad_args(
    tmp_path: Path, qwen3_family: dict[str, Path], kwargs: dict, match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        perturb_model(qwen3_family["base"], tmp_path / "bad", seed=1, **kwargs)


def test_perturb_model_bad_paths(tmp_path: Path, qwen3_family: dict[str, Path]) -> None:
    with pytest.raises(ValueError, match="out_dir"):
        perturb_model(qwen3_family["base"], qwen3_family["base"], seed=1)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty"):
        perturb_model(tmp_path / "empty", tmp_path / "out", seed=1)


def test_build_family_bad_args(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="-2"):
        build_family(tmp_path, n_finetunes=-2)
    with pytest.raises(ValueError, match="gpt2"):
        build_family(tmp_path, arch="gpt2")
