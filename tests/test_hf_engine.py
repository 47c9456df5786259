"""TransformersEngine specifics: small batches, parameters overwritten in place. The behaviour every
backend shares is checked by the conformance suite, tests/test_engines.py."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open

from mergesearch.eval.engine import cut_at_stop
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


def manual_logprobs(engine: TransformersEngine, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return torch.log_softmax(engine.model(torch.tensor([ids])).logits[0].float(), dim=-1)


# ---------------------------------------------------------------------------------------------
# generate
# ---------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------
# Bad model folders and options
# ---------------------------------------------------------------------------------------------


def test_config_is_what_the_tests_assume(qwen3_family: dict[str, Path]) -> None:
    config: dict[str, Any] = json.loads((qwen3_family["base"] / "config.json").read_text())
    assert config["tie_word_embeddings"] is True and config["head_dim"] == 32
