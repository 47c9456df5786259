"""TransformersEngine on tiny random models: greedy generation, scoring, in-place weight loads."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open

from mergesearch.errors import CheckpointError, ConfigError, TensorMismatchError
from mergesearch.eval.engine import Engine, cut_at_stop
from mergesearch.eval.hf import TransformersEngine
from mergesearch.testing import build_tiny_model, perturb_model


pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROMPTS = [
    "What is 1 + 2?\n",
    "hello world this is a much longer prompt with many words in it",
    "x",
    "Reverse the word: plant\n",
    "cloud window garden stone mirror.",
    "The ",
]


@pytest.fixture(scope="module")
def untied_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> Path:
    """A 2-layer Qwen3 with an untied head. The tied tiny models mostly echo their last input
    token, so their generations cannot tell a padding bug from a correct batch; this one's can."""
    return build_tiny_model(
        tmp_path_factory.mktemp("untied") / "m",
        "qwen3",
        num_layers=2,
        tie_word_embeddings=False,
        dtype="float32",
        tokenizer_dir=tokenizer_dir,
        seed=3,
    )


@pytest.fixture(scope="module")
def engine(untied_dir: Path) -> TransformersEngine:
    return TransformersEngine(untied_dir, batch_size=8)


def read_tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (a safe_open handle, not a dict)
                tensors[key] = f.get_tensor(key)
    return tensors


def manual_greedy(engine: TransformersEngine, prompt: str, n: int) -> list[int]:
    """Greedy decoding, one unpadded sequence, full forward pass per token, no KV cache."""
    ids = engine.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    new: list[int] = []
    with torch.no_grad():
        for _ in range(n):
            logits = engine.model(torch.tensor([ids + new])).logits[0, -1]
            token = int(logits.argmax())
            if token in engine.eos_ids:
                break
            new.append(token)
    return new


def manual_logprobs(engine: TransformersEngine, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return torch.log_softmax(engine.model(torch.tensor([ids])).logits[0].float(), dim=-1)


# ---------------------------------------------------------------------------------------------
# generate
# ---------------------------------------------------------------------------------------------


def test_is_an_engine(engine: TransformersEngine) -> None:
    assert isinstance(engine, Engine)
    assert engine.generate([], max_new_tokens=4) == []


def test_generate_is_greedy_and_respects_max_new_tokens(engine: TransformersEngine) -> None:
    for prompt in PROMPTS[:4]:
        tokens = manual_greedy(engine, prompt, 10)
        assert tokens, "the test model should generate something"
        for n in (1, 4, 10):
            (out,) = engine.generate([prompt], max_new_tokens=n)
            assert out == engine.tokenizer.decode(tokens[:n], skip_special_tokens=True), (prompt, n)


def test_generate_deterministic_and_batch_invariant(untied_dir: Path, engine: TransformersEngine) -> None:
    alone = [engine.generate([p], max_new_tokens=12)[0] for p in PROMPTS]
    assert len(set(alone)) == len(alone), "outputs should be distinct, or the comparison proves little"
    assert engine.generate(PROMPTS, max_new_tokens=12) == alone  # one left-padded batch
    assert engine.generate(PROMPTS, max_new_tokens=12) == alone  # again: deterministic
    assert engine.generate(PROMPTS[::-1], max_new_tokens=12) == alone[::-1]  # order kept
    small = TransformersEngine(untied_dir, batch_size=2)  # several batches of other widths
    assert small.generate(PROMPTS, max_new_tokens=12) == alone
    assert small.generate([PROMPTS[0]] * 3, max_new_tokens=12) == [alone[0]] * 3


def _stop_in(text: str) -> str:
    """A printable ASCII character of ``text`` past its start, to use as a stop string."""
    for ch in text[2:]:
        if ch.isascii() and ch.isprintable():
            return ch
    raise AssertionError(f"no usable stop character in {text!r}")


def test_stop_strings_cut_output(engine: TransformersEngine) -> None:
    full = engine.generate(PROMPTS, max_new_tokens=12)
    stops = [_stop_in(text) for text in full]
    for prompt, text, stop in zip(PROMPTS, full, stops):
        (out,) = engine.generate([prompt], max_new_tokens=12, stop=[stop])
        assert stop not in out
        assert out == text[: text.index(stop)]
        # Two characters, the later one first in the list: still cut at the earliest.
        two = text[text.index(stop):][:2]
        (out2,) = engine.generate([prompt], max_new_tokens=12, stop=["\x00never", two])
        assert two not in out2 and out2 == text[: text.index(two)]
    # The same stops in one batch (the union applies to every row).
    batch = engine.generate(PROMPTS, max_new_tokens=12, stop=stops)
    for out, text in zip(batch, full):
        assert not any(s in out for s in stops)
        assert out == cut_at_stop(text, stops)
    # A stop string that never occurs changes nothing.
    assert engine.generate(PROMPTS, max_new_tokens=12, stop=["\x00never"]) == full


def test_stop_on_tied_model(qwen3_family: dict[str, Path]) -> None:
    """The tied base model answers '\\n\\n...' to a prompt ending in a newline: a stop at '\\n' leaves nothing."""
    base = TransformersEngine(qwen3_family["base"])
    (full,) = base.generate(["What is 1 + 2?\n"], max_new_tokens=6)
    assert "\n" in full
    assert base.generate(["What is 1 + 2?\n"], max_new_tokens=6, stop=["\n"]) == [cut_at_stop(full, ["\n"])]


def test_cut_at_stop() -> None:
    assert cut_at_stop("abc\ndef", ["\n"]) == "abc"
    assert cut_at_stop("abcdef", ["e", "c"]) == "ab"
    assert cut_at_stop("abcdef", []) == "abcdef"
    assert cut_at_stop("abcdef", ["x"]) == "abcdef"
    assert cut_at_stop("", ["x"]) == ""


# ---------------------------------------------------------------------------------------------
# loglikelihood and token_scores
# ---------------------------------------------------------------------------------------------

REQUESTS = [
    ("What is 1 + 2?\n", "3"),
    ("Reverse the word: plant\n", "tnalp"),
    ("hello world this is a much longer prompt with many words", " and a longer continuation too"),
    ("Which is larger, 3 or 5?\n", "5"),
    ("", "hello"),
    ("x", "y"),
]


def test_loglikelihood_matches_manual(untied_dir: Path, engine: TransformersEngine) -> None:
    small = TransformersEngine(untied_dir, batch_size=2)
    results = small.loglikelihood(REQUESTS)
    assert len(results) == len(REQUESTS)
    tok = engine.tokenizer
    for (context, continuation), res in zip(REQUESTS, results):
        ctx = tok(context, add_special_tokens=False)["input_ids"] or [engine.prefix_id]
        whole = tok(context + continuation, add_special_tokens=False)["input_ids"]
        cont = whole[len(ctx):] if context else tok(continuation, add_special_tokens=False)["input_ids"]
        if context:
            assert whole[: len(ctx)] == ctx  # these requests split cleanly at the boundary
        logp = manual_logprobs(engine, ctx + cont)
        positions = range(len(ctx) - 1, len(ctx) - 1 + len(cont))
        expected = sum(logp[p, t].item() for p, t in zip(positions, cont))
        greedy = all(int(logp[p].argmax()) == t for p, t in zip(positions, cont))
        assert res.num_tokens == len(cont)
        assert res.logprob == pytest.approx(expected, abs=1e-4)
        assert res.logprob < 0
        assert res.is_greedy == greedy
    # Batched and one by one agree.
    for req, res in zip(REQUESTS, results):
        (one,) = engine.loglikelihood([req])
        assert one.logprob == pytest.approx(res.logprob, abs=1e-4) and one.num_tokens == res.num_tokens


def test_loglikelihood_is_greedy(engine: TransformersEngine) -> None:
    tok = engine.tokenizer
    checked = 0
    for context in PROMPTS:
        tokens = manual_greedy(engine, context, 3)
        continuation = tok.decode(tokens)
        ctx = tok(context, add_special_tokens=False)["input_ids"]
        if tok(context + continuation, add_special_tokens=False)["input_ids"] != ctx + tokens:
            continue  # does not survive a decode/encode round trip; try another prompt
        (res,) = engine.loglikelihood([(context, continuation)])
        assert res.is_greedy and res.num_tokens == len(tokens)
        # Any other first token is not greedy.
        other = next(t for t in range(5, 300) if t != tokens[0] and tok(context + tok.decode([t]), add_special_tokens=False)["input_ids"] == ctx + [t])
        (res,) = engine.loglikelihood([(context, tok.decode([other]))])
        assert not res.is_greedy
        checked += 1
    assert checked >= 2


def test_token_scores(untied_dir: Path, engine: TransformersEngine) -> None:
    texts = [p for p in PROMPTS] + ["a"]
    small = TransformersEngine(untied_dir, batch_size=3)
    scores = small.token_scores(texts)
    vocab = engine.model.config.vocab_size
    for text, ts in zip(texts, scores):
        ids = [engine.prefix_id] + engine.tokenizer(text, add_special_tokens=False)["input_ids"]
        assert ts.targets.dtype == torch.long and ts.targets.tolist() == ids[1:]
        assert ts.logprobs.shape == (len(ids) - 1, vocab)
        assert ts.logprobs.dtype == torch.float32
        assert torch.allclose(ts.logprobs.logsumexp(-1), torch.zeros(len(ids) - 1), atol=1e-4)
        manual = manual_logprobs(engine, ids)[:-1]
        assert torch.allclose(ts.logprobs, manual, atol=1e-4)
        (alone,) = engine.token_scores([text])
        assert torch.allclose(alone.logprobs, ts.logprobs, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# load_weights
# ---------------------------------------------------------------------------------------------


def _identity(engine: TransformersEngine) -> dict[str, tuple[int, int]]:
    return {n: (id(p), p.data_ptr()) for n, p in engine.model.named_parameters()}


@pytest.mark.parametrize("source", ["ft0", "ft1"])  # ft1 is sharded
def test_load_weights_in_place(qwen3_family: dict[str, Path], source: str) -> None:
    a = TransformersEngine(qwen3_family["base"])
    b = TransformersEngine(qwen3_family[source])
    texts = PROMPTS[:3]
    before_scores = a.token_scores(texts)
    model, ident = a.model, _identity(a)

    tensors = read_tensors(qwen3_family[source])
    written = a.load_weights(tensors.items())
    assert written == len(tensors) == len(a.tensor_names())

    assert a.model is model and _identity(a) == ident  # same module, same parameter storage
    for x, y, old in zip(a.token_scores(texts), b.token_scores(texts), before_scores):
        assert torch.equal(x.targets, y.targets)
        assert torch.allclose(x.logprobs, y.logprobs, atol=1e-6)
        assert not torch.allclose(x.logprobs, old.logprobs, atol=1e-6)
    for name, t in a.state_dict().items():
        assert torch.equal(t, tensors[name])

    # Writing the base back restores it exactly.
    a.load_weights(read_tensors(qwen3_family["base"]).items())
    for x, old in zip(a.token_scores(texts), before_scores):
        assert torch.equal(x.logprobs, old.logprobs)


def test_load_weights_untied_head_and_generation(tmp_path: Path, untied_dir: Path) -> None:
    other = perturb_model(untied_dir, tmp_path / "other", seed=7, scale=0.5)
    a, b = TransformersEngine(untied_dir), TransformersEngine(other)
    ident = _identity(a)
    tensors = read_tensors(other)
    assert "lm_head.weight" in tensors
    assert a.load_weights(tensors.items()) == len(tensors)
    assert _identity(a) == ident
    assert a.generate(PROMPTS, max_new_tokens=8) == b.generate(PROMPTS, max_new_tokens=8)


def test_load_weights_tied_head_is_skipped(qwen3_family: dict[str, Path]) -> None:
    a = TransformersEngine(qwen3_family["base"])
    assert "lm_head.weight" not in a.tensor_names()
    embed = a.state_dict()["model.embed_tokens.weight"]
    assert a.load_weights([("lm_head.weight", torch.zeros_like(embed))]) == 0
    assert torch.equal(a.state_dict()["model.embed_tokens.weight"], embed)


def test_load_weights_errors(qwen3_family: dict[str, Path]) -> None:
    a = TransformersEngine(qwen3_family["base"])
    k = a.state_dict()["model.layers.0.self_attn.k_proj.weight"]
    assert k.shape == (32, 64)  # one kv head of head_dim 32: not square, so .T changes the shape
    with pytest.raises(CheckpointError) as err:
        a.load_weights([("model.layers.9.self_attn.k_proj.weight", k.clone())])
    assert "no tensor 'model.layers.9.self_attn.k_proj.weight'" in str(err.value)
    with pytest.raises(TensorMismatchError) as err:
        a.load_weights([("model.layers.0.self_attn.k_proj.weight", k.clone().T.contiguous())])
    msg = str(err.value)
    assert "model.layers.0.self_attn.k_proj.weight" in msg
    assert "(64, 32)" in msg and "(32, 64)" in msg
    with pytest.raises(TensorMismatchError):
        a.load_weights([("model.norm.weight", torch.ones(65))])


# ---------------------------------------------------------------------------------------------
# Bad model folders and options
# ---------------------------------------------------------------------------------------------


def _copy(src: Path, dst: Path, skip: tuple[str, ...] = ()) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        if f.name not in skip:
            shutil.copyfile(f, dst / f.name)
    return dst


def test_bad_model_dirs(tmp_path: Path, qwen3_family: dict[str, Path], tokenizer_dir: Path) -> None:
    base = qwen3_family["base"]
    cases: dict[str, tuple[Path, str]] = {}
    cases["missing"] = (tmp_path / "nope", "no config.json")
    cases["tokenizer only"] = (tokenizer_dir, "no config.json")
    bad_json = _copy(base, tmp_path / "bad_json")
    (bad_json / "config.json").write_text("{not json", encoding="utf-8")
    cases["bad config"] = (bad_json, "cannot load")
    cases["no weights"] = (_copy(base, tmp_path / "no_weights", skip=("model.safetensors",)), "cannot load")
    corrupt = _copy(base, tmp_path / "corrupt")
    (corrupt / "model.safetensors").write_bytes(b"garbage")
    cases["corrupt weights"] = (corrupt, "cannot load")
    no_tok = _copy(base, tmp_path / "no_tok", skip=("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"))
    cases["no tokenizer"] = (no_tok, "tokenizer")
    dropped = perturb_model(base, tmp_path / "dropped", seed=1, drop=["model.layers.0.mlp.up_proj.weight"])
    cases["missing tensor"] = (dropped, "model.layers.0.mlp.up_proj.weight")
    reshaped = perturb_model(base, tmp_path / "reshaped", seed=1, reshape={"model.layers.0.mlp.up_proj.weight": (64, 64)})
    cases["wrong shape"] = (reshaped, "cannot load")
    for what, (path, fragment) in cases.items():
        with pytest.raises(CheckpointError) as err:
            TransformersEngine(path)
        assert fragment in str(err.value), (what, str(err.value))
        assert str(path) in str(err.value), what


def test_bad_options(qwen3_family: dict[str, Path]) -> None:
    with pytest.raises(ConfigError, match="dtype 'float64'"):
        TransformersEngine(qwen3_family["base"], dtype="float64")
    for bad in (0, -1, 1.5):
        with pytest.raises(ConfigError, match="batch_size"):
            TransformersEngine(qwen3_family["base"], batch_size=bad)  # type: ignore[arg-type]


def test_close(qwen3_family: dict[str, Path]) -> None:
    e = TransformersEngine(qwen3_family["base"])
    e.close()
    assert e.model is None and e.tensor_names() == []


def test_config_is_what_the_tests_assume(qwen3_family: dict[str, Path]) -> None:
    config: dict[str, Any] = json.loads((qwen3_family["base"] / "config.json").read_text())
    assert config["tie_word_embeddings"] is True and config["head_dim"] == 32
