"""Scorers on literal responses, the engine-backed scorers on tiny random models, and the runner."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import pytest
import torch

from mergesearch.errors import ConfigError
from mergesearch.eval.engine import Engine
from mergesearch.eval.hf import TransformersEngine
from mergesearch.eval.runner import ChunkReport, evaluate
from mergesearch.eval.scorers import SCORERS, ExampleScore, extract_code
from mergesearch.eval.tasks import Task, parse_task


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_task(tmp: Path, rows: list[dict[str, Any]], scorer: str, settings: dict | None = None, **spec: Any) -> Task:
    """A task over ``rows`` (its proxy split), built with ``parse_task`` from a plain dict."""
    (tmp / "proxy.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    raw = {
        "name": "t",
        "data": {"proxy": "proxy.jsonl"},
        "prompt": "{q}\n",
        "scorer": {"name": scorer, "settings": settings or {}},
        **spec,
    }
    return parse_task(raw, str(tmp / "t.yaml"), tmp)


def score(task: Task, *responses: str) -> list[ExampleScore]:
    examples = task.examples("proxy")
    assert len(examples) == len(responses)
    out = task.scorer.score_responses(examples, list(responses))
    for s, r in zip(out, responses):
        assert 0.0 <= s.score <= 1.0 and s.response == r
    return out


def test_registry() -> None:
    assert set(SCORERS) == {
        "exact_match", "regex_match", "multiple_choice", "code_pass", "ifeval", "agreement", "perplexity",
    }
    for name, cls in SCORERS.items():
        assert cls.name == name and cls.needs in {"generate", "loglikelihood", "token_scores"}


# ---------------------------------------------------------------------------------------------
# exact_match
# ---------------------------------------------------------------------------------------------

REVERSE = [{"q": "Reverse: wols", "answer": "slow"}]


def test_exact_match_strips_by_default(tmp_path: Path) -> None:
    task = make_task(tmp_path, REVERSE * 1, "exact_match", target="{answer}")
    assert [s.score for s in score(task, "  slow\n")] == [1.0]
    (miss,) = score(task, "slows")
    assert miss.score == 0.0 and miss.detail == "expected 'slow'"
    assert score(task, "SLOW")[0].score == 0.0  # case matters by default


def test_exact_match_strip_off_and_ignore_case(tmp_path: Path) -> None:
    task = make_task(tmp_path, REVERSE, "exact_match", {"strip": False}, target="{answer}")
    assert score(task, " slow")[0].score == 0.0
    assert score(task, "slow")[0].score == 1.0
    task = make_task(tmp_path, REVERSE, "exact_match", {"ignore_case": True}, target="{answer}")
    assert score(task, " SlOw ")[0].score == 1.0


def test_exact_match_reference_setting(tmp_path: Path) -> None:
    rows = [{"q": "Say the word twice: go", "w": "go"}]
    task = make_task(tmp_path, rows, "exact_match", {"reference": "{w} {w}"})
    assert score(task, "go go")[0].score == 1.0
    assert score(task, "go")[0].detail == "expected 'go go'"


# ---------------------------------------------------------------------------------------------
# regex_match
# ---------------------------------------------------------------------------------------------

SUM = [{"q": "What is 40 + 45?", "answer": "85"}]


def test_regex_last_vs_first(tmp_path: Path) -> None:
    response = "40 + 45 = 85"
    last = make_task(tmp_path, SUM, "regex_match", target="{answer}")
    first = make_task(tmp_path, SUM, "regex_match", {"select": "first"}, target="{answer}")
    assert score(last, response)[0].score == 1.0
    (s,) = score(first, response)
    assert s.score == 0.0 and s.detail == "extracted '40', expected '85'"
    assert last.scorer.extract(response) == "85" and first.scorer.extract(response) == "40"


def test_regex_numeric_compare(tmp_path: Path) -> None:
    numeric = make_task(tmp_path, SUM, "regex_match", {"numeric": True}, target="{answer}")
    text = make_task(tmp_path, SUM, "regex_match", target="{answer}")
    assert score(numeric, "The sum is 85.0")[0].score == 1.0
    assert score(text, "The sum is 85.0")[0].score == 0.0
    assert score(numeric, "85.5")[0].score == 0.0
    big = make_task(tmp_path, [{"q": "x", "answer": "1000"}], "regex_match",
                    {"numeric": True, "pattern": r"[\d,]+"}, target="{answer}")
    assert score(big, "1,000")[0].score == 1.0


def test_regex_no_match(tmp_path: Path) -> None:
    task = make_task(tmp_path, SUM, "regex_match", target="{answer}")
    (s,) = score(task, "I do not know.")
    assert s.score == 0.0 and s.detail == "no match"


def test_regex_groups_and_ignore_case(tmp_path: Path) -> None:
    rows = [{"q": "Capital of France?", "answer": "paris"}]
    named = make_task(tmp_path, rows, "regex_match",
                      {"pattern": r"Answer: (?P<a>\w+)", "group": "a", "ignore_case": True}, target="{answer}")
    assert score(named, "answer: PARIS, I think. Answer: Paris")[0].score == 1.0
    numbered = make_task(tmp_path, rows, "regex_match",
                         {"pattern": r"Answer: (\w+)", "group": 1, "select": "first"}, target="{answer}")
    assert score(numbered, "Answer: paris. Answer: Rome")[0].score == 1.0
    assert score(numbered, "answer: paris")[0].detail == "no match"  # case-sensitive pattern


# ---------------------------------------------------------------------------------------------
# ifeval
# ---------------------------------------------------------------------------------------------

IF_ROWS = [
    {
        "q": "Write in capital letters: stone river",
        "instructions": [
            {"id": "change_case:english_capital", "kwargs": {}},
            {"id": "keywords:existence", "kwargs": {"keywords": ["stone", "river"]}},
        ],
    }
]


@pytest.mark.parametrize(
    ("mode", "level", "response", "expected"),
    [
        ("strict", "prompt", "STONE RIVER", 1.0),
        ("strict", "prompt", "Sure:\nSTONE RIVER", 0.0),
        ("strict", "instruction", "Sure:\nSTONE RIVER", 0.5),
        ("loose", "prompt", "Sure:\nSTONE RIVER", 1.0),
        ("loose", "instruction", "Sure:\nSTONE RIVER", 1.0),
        ("strict", "instruction", "STONE LAKE", 0.5),
        ("loose", "instruction", "stone lake", 0.0),
        ("strict", "instruction", "   ", 0.0),
    ],
)
def test_ifeval_modes_and_levels(tmp_path: Path, mode: str, level: str, response: str, expected: float) -> None:
    task = make_task(tmp_path, IF_ROWS, "ifeval", {"mode": mode, "level": level})
    (s,) = score(task, response)
    assert s.score == expected
    if expected == 1.0:
        assert s.detail == ""
    else:
        assert s.detail.startswith("not followed: ")


def test_ifeval_detail_names_failed_instructions(tmp_path: Path) -> None:
    task = make_task(tmp_path, IF_ROWS, "ifeval")
    assert score(task, "stone lake")[0].detail == "not followed: change_case:english_capital, keywords:existence"
    assert score(task, "Stone River")[0].detail == "not followed: change_case:english_capital"


def test_ifeval_repeat_prompt_uses_example_prompt(tmp_path: Path) -> None:
    rows = [{"q": "Repeat me", "instructions": [{"id": "combination:repeat_prompt"}]}]
    task = make_task(tmp_path, rows, "ifeval")
    assert score(task, "Repeat me\n and more")[0].score == 1.0
    assert score(task, "Something else")[0].score == 0.0


# ---------------------------------------------------------------------------------------------
# code_pass
# ---------------------------------------------------------------------------------------------


def test_extract_code() -> None:
    assert extract_code("Here:\n```python\ndef f(x):\n    return x\n```\nDone.") == "def f(x):\n    return x\n"
    assert extract_code("```\nprint(1)\n```") == "print(1)\n"
    assert extract_code("```py\na = 1\n```\n```python\nb = 2\n```") == "a = 1\n"  # the first block
    assert extract_code("```python\nunterminated = 1\n").rstrip() == "unterminated = 1"
    assert extract_code("def f(x): return x") == "def f(x): return x"
    assert extract_code("") == ""


CODE_ROWS = [
    {"q": "f(x) = x + 6", "tests": ["assert f(-5) == 1", "assert f(4) == 10"]},
    {"q": "f(x) = 2x", "tests": "assert f(3) == 6"},
    {"q": "f(x) = x - 1", "tests": ["assert f(1) == 0"]},
    {"q": "f(x) = x", "tests": ["assert f(7) == 7"]},
]


def test_code_pass_correct_wrong_hostile(tmp_path: Path) -> None:
    pytest.importorskip("mergesearch.eval.sandbox")
    task = make_task(tmp_path, CODE_ROWS, "code_pass", {"wall_s": 4, "cpu_s": 1, "max_workers": 2})
    responses = [
        "Sure:\n```python\ndef f(x):\n    return x + 6\n```\nThat adds six.",  # fenced, correct
        "def f(x):\n    return x * 2",  # raw, correct
        "def f(x):\n    return x + 1",  # wrong
        "def f(x):\n    while True:\n        pass",  # hostile: never returns
    ]
    out = score(task, *responses)
    assert [s.score for s in out] == [1.0, 1.0, 0.0, 0.0]
    assert out[0].detail == "passed"
    assert out[2].detail.startswith("assertion failed")
    assert out[3].detail.startswith(("cpu limit", "timeout")), out[3].detail


def test_code_pass_early_exit_and_prefix(tmp_path: Path) -> None:
    pytest.importorskip("mergesearch.eval.sandbox")
    rows = [{"q": "f", "sig": "def f(x):\n", "tests": ["assert f(2) == 4"]}] * 1
    task = make_task(tmp_path, rows, "code_pass", {"prefix": "{sig}", "extract": "raw", "wall_s": 4, "cpu_s": 1})
    assert task.scorer.required_fields() == ("tests", "sig")
    assert score(task, "    return x * x")[0].score == 1.0
    (s,) = score(task, "    import os; os._exit(0)")
    assert s.score == 0.0 and s.detail.startswith("early exit")


# ---------------------------------------------------------------------------------------------
# Engine-backed scorers on the tiny random Qwen3 family
# ---------------------------------------------------------------------------------------------

TEXTS = [
    {"q": "cloud window garden stone mirror."},
    {"q": "rocket letter violin tiger river candle."},
    {"q": "What is 47 + 38?"},
    {"q": "green bottle paper river bridge."},
    {"q": "Reverse the word: plant"},
]


@pytest.fixture(scope="module")
def base_engine(qwen3_family: dict[str, Path]) -> TransformersEngine:
    engine = TransformersEngine(qwen3_family["base"], batch_size=4)
    assert isinstance(engine, Engine)
    return engine


@pytest.fixture(scope="module")
def ft_engine(qwen3_family: dict[str, Path]) -> TransformersEngine:
    return TransformersEngine(qwen3_family["ft0"], batch_size=4)


def test_agreement_with_itself_is_one(tmp_path: Path, qwen3_family: dict[str, Path], base_engine: TransformersEngine) -> None:
    # The reference folder is relative to the task file's folder.
    reference = os.path.relpath(qwen3_family["base"], tmp_path)
    for metric in ("argmax", "kl"):
        task = make_task(tmp_path, TEXTS, "agreement", {"reference": reference, "metric": metric})
        out = task.scorer.score(base_engine, task.examples("proxy"))
        assert len(out) == len(TEXTS)
        for s in out:
            assert s.score == pytest.approx(1.0, abs=1e-5)
            assert s.response is None


def test_agreement_with_finetune_is_below_one(
    tmp_path: Path, base_engine: TransformersEngine, ft_engine: TransformersEngine
) -> None:
    for metric in ("argmax", "kl"):
        task = make_task(tmp_path, TEXTS, "agreement", {"reference": "unused", "metric": metric})
        task.scorer.use_reference(base_engine)
        scores = [s.score for s in task.scorer.score(ft_engine, task.examples("proxy"))]
        assert all(0.0 < v <= 1.0 for v in scores), scores
        assert sum(scores) / len(scores) < 1.0 - 1e-4, (metric, scores)
        # The reference's scores are cached per text: a second call gives the same result.
        assert len(task.scorer._cache) == len(TEXTS)
        again = [s.score for s in task.scorer.score(ft_engine, task.examples("proxy"))]
        assert again == pytest.approx(scores, abs=1e-6)


def test_agreement_kl_matches_manual(tmp_path: Path, base_engine: TransformersEngine, ft_engine: TransformersEngine) -> None:
    task = make_task(tmp_path, TEXTS[:2], "agreement", {"reference": "unused", "metric": "kl"})
    task.scorer.use_reference(base_engine)
    out = task.scorer.score(ft_engine, task.examples("proxy"))
    texts = [ex.prompt for ex in task.examples("proxy")]
    for s, r, c in zip(out, base_engine.token_scores(texts), ft_engine.token_scores(texts)):
        p, q = r.logprobs.double().softmax(-1), c.logprobs.double().softmax(-1)
        kl = (p * (p.log() - q.log())).sum(-1).mean().item()
        assert s.score == pytest.approx(math.exp(-kl), abs=1e-5)


def test_agreement_missing_reference_folder(tmp_path: Path, base_engine: TransformersEngine) -> None:
    task = make_task(tmp_path, TEXTS[:1], "agreement", {"reference": "no_such_model"})
    with pytest.raises(ConfigError, match="has no config.json"):
        task.scorer.score(base_engine, task.examples("proxy"))


def test_perplexity(tmp_path: Path, base_engine: TransformersEngine, ft_engine: TransformersEngine) -> None:
    rows = [{"q": "What is 47 + 38?", "answer": "85"}, {"q": "Reverse the word: plant", "answer": "tnalp"}]
    task = make_task(tmp_path, rows, "perplexity", target="{answer}")
    examples = task.examples("proxy")
    out = task.scorer.score(base_engine, examples)
    model, tok = base_engine.model, base_engine.tokenizer
    for ex, s in zip(examples, out):
        assert 0.0 < s.score <= 1.0 and s.detail.startswith("perplexity ")
        # Manual: the whole text (prompt + target) after the engine's prefix token.
        ids = [base_engine.prefix_id] + tok(ex.prompt + ex.target, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
        nll = -logp[:-1].gather(-1, torch.tensor(ids[1:]).unsqueeze(-1)).mean().item()
        assert s.score == pytest.approx(math.exp(-nll), rel=1e-4)
    other = task.scorer.score(ft_engine, examples)
    assert [s.score for s in other] != pytest.approx([s.score for s in out], abs=1e-7)


MC_ROWS = [
    {"q": "Which is larger, 3 or 5?", "choices": ["3", "55555"], "gold": 1},
    {"q": "Pick one:", "choices": ["yes", "no thanks", "maybe so"], "gold": "no thanks"},
    {"q": "Color?", "choices": ["red", "blue green"], "gold": 0},
    {"q": "Q", "choices": ["a", "the answer is b"], "gold": 1},
]


def _manual_pick(engine: TransformersEngine, ex: Any, continuation: str, normalize: str) -> int:
    conts = [continuation.replace("{choice}", c) for c in ex.data["choices"]]
    results = engine.loglikelihood([(ex.prompt, c) for c in conts])
    values = []
    for cont, r in zip(conts, results):
        divisor = {"none": 1, "chars": len(cont), "tokens": r.num_tokens}[normalize]
        values.append(r.logprob / divisor)
    return max(range(len(values)), key=values.__getitem__)


@pytest.mark.parametrize("continuation", ["{choice}", " Answer: {choice}"])
def test_multiple_choice_picks_most_likely(tmp_path: Path, base_engine: TransformersEngine, continuation: str) -> None:
    picks = {}
    for normalize in ("none", "chars", "tokens"):
        settings = {"normalize": normalize, "continuation": continuation}
        task = make_task(tmp_path, MC_ROWS, "multiple_choice", settings)
        examples = task.examples("proxy")
        out = task.scorer.score(base_engine, examples)
        picks[normalize] = []
        for ex, s in zip(examples, out):
            pick = _manual_pick(base_engine, ex, continuation, normalize)
            picks[normalize].append(pick)
            choice = ex.data["choices"][pick]
            assert s.response == choice and s.detail == f"picked {choice!r}"
            assert s.score == float(pick == task.scorer._gold(ex.data))
    # The data is chosen so that normalising by length changes at least one pick.
    assert picks["none"] != picks["chars"], picks


# ---------------------------------------------------------------------------------------------
# Runner
# ---------------------------------------------------------------------------------------------

RUN_ROWS = [{"q": f"{w} river stone {i}", "answer": w} for i, w in enumerate(
    ["cloud", "window", "garden", "mirror", "rocket", "letter", "violin"])]


@pytest.fixture(scope="module")
def ppl_task(tmp_path_factory: pytest.TempPathFactory) -> Task:
    return make_task(tmp_path_factory.mktemp("ppl"), RUN_ROWS, "perplexity", target="{answer}")


def test_evaluate_whole_split(ppl_task: Task, base_engine: TransformersEngine) -> None:
    result = evaluate(base_engine, ppl_task)
    assert result.task == "t" and result.split == "proxy"
    assert result.total == len(RUN_ROWS) == len(result.scores) == len(result.details) == len(result.responses)
    assert result.complete and result.seconds >= 0
    assert all(0.0 < s <= 1.0 for s in result.scores)
    assert result.mean == pytest.approx(sum(result.scores) / len(result.scores))
    assert all(d.startswith("perplexity ") for d in result.details)


def test_evaluate_chunks_report_running_means(ppl_task: Task, base_engine: TransformersEngine) -> None:
    whole = evaluate(base_engine, ppl_task)
    reports: list[ChunkReport] = []
    result = evaluate(base_engine, ppl_task, chunk_size=3, on_chunk=reports.append)
    assert [r.done for r in reports] == [3, 6, 7]
    assert all(r.total == 7 and r.task == "t" and r.split == "proxy" for r in reports)
    for r in reports:
        assert r.scores == result.scores[: r.done]
        assert r.mean == pytest.approx(sum(result.scores[: r.done]) / r.done)
    assert result.complete
    # Chunking does not change a score (beyond batch padding noise).
    assert result.scores == pytest.approx(whole.scores, rel=1e-4)


def test_evaluate_stops_early(ppl_task: Task, base_engine: TransformersEngine) -> None:
    seen: list[int] = []

    def stop_after_two_chunks(report: ChunkReport) -> bool:
        seen.append(report.done)
        return report.done >= 4

    result = evaluate(base_engine, ppl_task, chunk_size=2, on_chunk=stop_after_two_chunks)
    assert seen == [2, 4]
    assert len(result.scores) == 4 and result.total == 7
    assert not result.complete


class Pruned(Exception):
    pass


def test_evaluate_on_chunk_exception_propagates(ppl_task: Task, base_engine: TransformersEngine) -> None:
    def prune(report: ChunkReport) -> None:
        if report.done >= 2:
            raise Pruned(report.mean)

    with pytest.raises(Pruned):
        evaluate(base_engine, ppl_task, chunk_size=2, on_chunk=prune)


def test_evaluate_limit_and_bad_arguments(ppl_task: Task, base_engine: TransformersEngine) -> None:
    result = evaluate(base_engine, ppl_task, limit=3)
    assert result.total == 3 and len(result.scores) == 3 and result.complete
    assert evaluate(base_engine, ppl_task, limit=100).total == 7
    with pytest.raises(ConfigError, match="limit must be a positive"):
        evaluate(base_engine, ppl_task, limit=0)
    with pytest.raises(ConfigError, match="chunk_size must be a positive"):
        evaluate(base_engine, ppl_task, chunk_size=0)
    with pytest.raises(ConfigError, match="no 'held_out' split"):
        evaluate(base_engine, ppl_task, split="held_out")


def test_evaluate_generation_task_keeps_responses(tmp_path: Path, base_engine: TransformersEngine) -> None:
    task = make_task(tmp_path, RUN_ROWS[:4], "exact_match", target="{answer}",
                     generation={"max_new_tokens": 4, "stop": ["\n"]})
    reports: list[ChunkReport] = []
    result = evaluate(base_engine, task, chunk_size=3, on_chunk=reports.append)
    expected = base_engine.generate([ex.prompt for ex in task.examples("proxy")], max_new_tokens=4, stop=["\n"])
    assert list(result.responses) == expected
    assert [r.done for r in reports] == [3, 4]
    for score_, detail, response, ex in zip(result.scores, result.details, result.responses, task.examples("proxy")):
        assert score_ == float(response.strip() == ex.target)
        assert detail == ("" if score_ else f"expected {ex.target!r}")
