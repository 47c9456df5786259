"""The lm-eval bridge: an lm-eval LM backed by our engine, and lm-eval tasks as proxy evals.

Tasks are lm-eval task YAMLs on local JSONL data (``dataset_path: json``), since hub datasets
cannot be downloaded here. The reference for every per-doc score is lm-eval's own evaluator
(``simple_evaluate`` with ``log_samples``) run on the same engine and docs.
"""

from __future__ import annotations

import json
import math
import random
import re
from pathlib import Path
from typing import Any, ClassVar

import pytest
import yaml

from mergesearch.errors import ConfigError
from mergesearch.eval import lm_eval_bridge as bridge
from mergesearch.eval.engine import LoglikelihoodResult
from mergesearch.eval.runner import evaluate, evaluate_interleaved
from mergesearch.eval.tasks import find_task_files, load_task, load_tasks

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "evals" / "lm_eval"

MC_PROXY, MC_HELD = 5, 7
GEN_PROXY, GEN_HELD = 5, 3
ROLL_PROXY, ROLL_HELD = 3, 2


# ---------------------------------------------------------------------------------------------
# Fixtures: an engine, local-data lm-eval tasks and our task files wrapping them
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def engine(qwen3_family: dict[str, Path]) -> Any:
    from mergesearch.eval.hf import TransformersEngine

    return TransformersEngine(qwen3_family["ft0"], batch_size=8)


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def write_yaml(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def mc_config(**over: Any) -> dict[str, Any]:
    """Multiple choice, one few-shot example from the same split (seeded as lm-eval seeds it)."""
    return {
        "task": "bridge_mc",
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": "mc.jsonl"}},  # relative: resolved beside the YAML
        "test_split": "test",
        "fewshot_split": "test",
        "num_fewshot": 1,
        "output_type": "multiple_choice",
        "doc_to_text": "What is {{a}} + {{b}}?\n",
        "doc_to_choice": "{{choices}}",
        "doc_to_target": "label",
        "target_delimiter": "",
        "fewshot_delimiter": "\n",
        "metric_list": [
            {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
            {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True},
        ],
        **over,
    }


def gen_config(**over: Any) -> dict[str, Any]:
    return {
        "task": "bridge_gen",
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": "gen.jsonl"}},
        "test_split": "test",
        "output_type": "generate_until",
        "doc_to_text": "Reverse the word: {{word}}\n",
        "doc_to_target": "{{answer}}",
        "generation_kwargs": {"until": ["\n"], "max_gen_toks": 5, "do_sample": False},
        "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}],
        **over,
    }


def roll_config(**over: Any) -> dict[str, Any]:
    return {
        "task": "bridge_roll",
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": "text.jsonl"}},
        "test_split": "test",
        "output_type": "loglikelihood_rolling",
        "doc_to_text": "",
        "doc_to_target": "{{text}}",
        "metric_list": [
            {"metric": "word_perplexity", "aggregation": "weighted_perplexity", "higher_is_better": False},
            {"metric": "byte_perplexity", "aggregation": "weighted_perplexity", "higher_is_better": False},
            {"metric": "bits_per_byte", "aggregation": "bits_per_byte", "higher_is_better": False},
        ],
        **over,
    }


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory: pytest.TempPathFactory, engine: Any) -> Path:
    """A folder with our task files; its ``tasks/`` subfolder holds the lm-eval YAMLs and data."""
    root = tmp_path_factory.mktemp("lm_eval_bridge")
    tasks = root / "tasks"
    tasks.mkdir()
    rng = random.Random(7)
    mc = []
    for _ in range(MC_PROXY + MC_HELD):
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        choices = [str(a + b), str(a + b + 1), str(a + b + 10)]
        rng.shuffle(choices)
        mc.append({"a": a, "b": b, "choices": choices, "label": choices.index(str(a + b))})
    write_jsonl(tasks / "mc.jsonl", mc)
    # The generation task's answers are the engine's own greedy responses for even docs and a
    # wrong answer for odd ones, so the exact_match pattern is known without lm-eval.
    words = ["".join(rng.choice("abcdefgh") for _ in range(4)) for _ in range(GEN_PROXY + GEN_HELD)]
    responses = engine.generate([f"Reverse the word: {w}\n" for w in words], max_new_tokens=5, stop=["\n"])
    write_jsonl(tasks / "gen.jsonl", [
        {"word": w, "answer": r if i % 2 == 0 else "no such answer"} for i, (w, r) in enumerate(zip(words, responses))
    ])
    vocab = ["river", "apple", "stone", "cloud", "green", "light", "house", "paper", "music"]
    write_jsonl(tasks / "text.jsonl", [
        {"text": " ".join(rng.choice(vocab) for _ in range(rng.randint(3, 12))) + "."}
        for _ in range(ROLL_PROXY + ROLL_HELD)
    ])
    write_yaml(tasks / "bridge_mc.yaml", mc_config())
    write_yaml(tasks / "bridge_gen.yaml", gen_config())
    write_yaml(tasks / "bridge_roll.yaml", roll_config())
    write_yaml(root / "mc.yaml", {"name": "mc", "lm_eval": {
        "task": "bridge_mc", "include_path": "tasks", "metric": "acc", "proxy": MC_PROXY, "held_out": MC_HELD}})
    write_yaml(root / "gen.yaml", {"name": "gen", "description": "by path", "lm_eval": {
        "task": "tasks/bridge_gen.yaml", "metric": "exact_match", "proxy": GEN_PROXY, "held_out": GEN_HELD}})
    write_yaml(root / "roll.yaml", {"name": "roll", "lm_eval": {
        "task": "tasks/bridge_roll.yaml", "metric": "word_perplexity", "proxy": ROLL_PROXY, "held_out": ROLL_HELD}})
    return root


@pytest.fixture(scope="module")
def tasks(lm_dir: Path) -> dict[str, Any]:
    return {name: load_task(lm_dir / f"{name}.yaml") for name in ("mc", "gen", "roll")}


@pytest.fixture(scope="module")
def reference(engine: Any, lm_dir: Path) -> dict[str, Any]:
    """lm-eval's evaluator on our LM over every proxy + held-out doc, with per-sample metrics."""
    return bridge.run_lm_eval(
        engine, ["bridge_mc", "tasks/bridge_gen.yaml", "tasks/bridge_roll.yaml"], include_path="tasks",
        base_dir=lm_dir, limit=MC_PROXY + MC_HELD, log_samples=True,
    )


def scores(engine: Any, task: Any) -> list[float]:
    return [s for split in ("proxy", "held_out") for s in evaluate(engine, task, split).scores]


# ---------------------------------------------------------------------------------------------
# The LM
# ---------------------------------------------------------------------------------------------


class FakeEngine:
    """Records calls; answers deterministically. Has no tokenizer (rolling degrades)."""

    model_dir = "fake"

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []

    def generate(self, prompts, *, max_new_tokens, stop=()):
        self.calls.append(("generate", (list(prompts), max_new_tokens, tuple(stop))))
        return [f"{p}|{max_new_tokens}" for p in prompts]

    def loglikelihood(self, requests):
        self.calls.append(("loglikelihood", list(requests)))
        return [LoglikelihoodResult(-float(len(c) + len(x)), len(x), len(x) == 1) for c, x in requests]


def instance(request_type: str, args: tuple) -> Any:
    from lm_eval.api.instance import Instance

    return Instance(request_type=request_type, doc={}, arguments=args, idx=0)


def test_lm_is_an_lm_eval_lm() -> None:
    from lm_eval.api.model import LM

    lm = bridge.make_lm(FakeEngine())
    assert isinstance(lm, LM) and isinstance(lm, bridge.EngineLM)


def test_lm_loglikelihood_is_the_engines(engine: Any) -> None:
    pairs = [("What is 1 + 2?\n", "3"), ("The ", "cloud window"), ("", "hello world"), ("x", " y")]
    lm = bridge.make_lm(engine)
    got = lm.loglikelihood([instance("loglikelihood", p) for p in pairs])
    want = engine.loglikelihood(pairs)
    assert got == [(w.logprob, w.is_greedy) for w in want]
    assert lm.loglikelihood(pairs) == got  # plain tuples work too


def test_lm_generate_until_maps_lm_evals_kwargs() -> None:
    fake = FakeEngine()
    lm = bridge.make_lm(fake)
    out = lm.generate_until([
        instance("generate_until", ("a", {"until": "\n", "max_gen_toks": 3})),
        instance("generate_until", ("b", {"until": ["\n", "Q:"]})),
        instance("generate_until", ("c", {"until": "\n", "max_gen_toks": 3, "do_sample": False, "temperature": 0.7})),
        instance("generate_until", ("d", {"max_new_tokens": 9})),
    ])
    assert out == ["a|3", "b|256", "c|3", "d|9"]  # order kept across batches; lm-eval's default 256
    calls = sorted(args for kind, args in fake.calls)
    assert calls == [(["a", "c"], 3, ("\n",)), (["b"], 256, ("\n", "Q:")), (["d"], 9, ())]


@pytest.mark.parametrize("kwargs", [{"do_sample": True}, {"temperature": 0.8}, {"num_beams": 4}],
                         ids=["do_sample", "temperature", "beams"])
def test_lm_refuses_sampling(kwargs: dict[str, Any]) -> None:
    lm = bridge.make_lm(FakeEngine())
    with pytest.raises(ConfigError, match="greedily"):
        lm.generate_until([instance("generate_until", ("a", {"until": "\n", **kwargs}))])


def test_lm_rolling_without_a_tokenizer_is_one_loglikelihood() -> None:
    fake = FakeEngine()
    assert bridge.make_lm(fake).loglikelihood_rolling([("some text",), ("",)]) == [-9.0, 0.0]
    assert fake.calls == [("loglikelihood", [("", "some text")])]


def test_lm_rolling_equals_lm_evals_windows(engine: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Texts longer than max_length are scored in lm-eval's rolling windows: each token once."""
    import torch
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    text = "river apple stone cloud apple green river light house paper music stone cloud."
    ids = engine.tokenizer.encode(text, add_special_tokens=False)

    def direct(max_len: int) -> float:
        total = 0.0
        windows = get_rolling_token_windows(token_list=ids, prefix_token=engine.prefix_id, max_seq_len=max_len,
                                            context_len=1)
        for ctx, pred in map(make_disjoint_window, windows):
            seq = ctx + pred
            with torch.inference_mode():
                logits = engine.model(torch.tensor([seq[:-1]])).logits.float()
            lp = torch.log_softmax(logits, -1)[0, -len(pred):]
            total += float(lp.gather(-1, torch.tensor(pred)[:, None]).sum())
        return total

    lm = bridge.make_lm(engine)
    whole = lm.loglikelihood_rolling([instance("loglikelihood_rolling", (text,))])[0]
    assert whole == pytest.approx(direct(len(ids) + 5), abs=1e-4)
    assert whole == pytest.approx(sum(float(s.logprobs.gather(-1, s.targets[:, None]).sum())
                                      for s in engine.token_scores([text])), abs=1e-4)
    for max_len in (6, 9):
        monkeypatch.setattr(engine, "max_length", max_len)
        assert len(lm._windows(text)) > 2
        assert lm.loglikelihood_rolling([(text,)])[0] == pytest.approx(direct(max_len), abs=1e-4)


# ---------------------------------------------------------------------------------------------
# Bridge tasks score what lm-eval scores
# ---------------------------------------------------------------------------------------------


def test_bridge_tasks_load_as_tasks(tasks: dict[str, Any], lm_dir: Path) -> None:
    mc = tasks["mc"]
    assert isinstance(mc, bridge.LmEvalTask) and mc.name == "mc" and mc.path == lm_dir / "mc.yaml"
    assert [len(mc.examples(s)) for s in ("proxy", "held_out")] == [MC_PROXY, MC_HELD]
    assert [ex.index for ex in mc.examples("held_out")] == list(range(MC_PROXY, MC_PROXY + MC_HELD))
    ex = mc.examples("proxy")[0]
    # One few-shot example, then the doc's question; the target is the gold choice's text.
    assert ex.prompt.endswith(f"What is {ex.data['a']} + {ex.data['b']}?\n") and ex.prompt.count("What is") == 2
    assert ex.target == str(ex.data["a"] + ex.data["b"])
    assert [t.name for t in load_tasks(["mc", "gen"], [lm_dir])] == ["mc", "gen"]


@pytest.mark.parametrize("name", ["mc", "gen", "roll"])
def test_per_doc_scores_equal_lm_evals(name: str, engine: Any, tasks: dict[str, Any],
                                       reference: dict[str, Any]) -> None:
    task = tasks[name]
    lm_name = task.lm_eval_task.config.task
    n = len(task.examples("proxy")) + len(task.examples("held_out"))
    samples = sorted(reference["samples"][lm_name], key=lambda s: s["doc_id"])[:n]
    assert [s["doc_id"] for s in samples] == list(range(n))
    examples = [*task.examples("proxy"), *task.examples("held_out")]
    # Same prompts (few-shot contexts included) as lm-eval built.
    assert [ex.prompt for ex in examples] == [s["arguments"][0][0] for s in samples]
    got = scores(engine, task)
    if name == "roll":
        want = [math.exp(s["word_perplexity"][0] / s["word_perplexity"][1]) for s in samples]
        assert all(0.0 < g <= 1.0 for g in got)
    else:
        want = [float(s[task.metric]) for s in samples]
        assert 0.0 in got and 1.0 in got, "a comparison of constant scores would prove little"
    assert got == pytest.approx(want, abs=1e-9)


def test_generation_scores_are_the_known_pattern(engine: Any, tasks: dict[str, Any]) -> None:
    result = evaluate(engine, tasks["gen"], "proxy")
    assert result.scores == tuple(float(i % 2 == 0) for i in range(GEN_PROXY))
    assert result.responses[0] is not None and result.details[1] == "exact_match=0"


def test_aggregate_is_the_mean_of_proxy_scores(engine: Any, tasks: dict[str, Any], lm_dir: Path) -> None:
    """lm-eval's own report with limit = proxy equals the mean of our proxy scores."""
    report = bridge.run_lm_eval(engine, ["bridge_mc", "bridge_gen"], include_path=lm_dir / "tasks", limit=MC_PROXY)
    assert MC_PROXY == GEN_PROXY
    for name, lm_name in (("mc", "bridge_mc"), ("gen", "bridge_gen")):
        task = tasks[name]
        ours = evaluate(engine, task, "proxy").mean
        assert report["results"][lm_name][f"{task.metric},none"] == pytest.approx(ours, abs=1e-12)


def test_bridge_task_in_the_chunked_runner(engine: Any, tasks: dict[str, Any]) -> None:
    task = tasks["mc"]
    whole = evaluate(engine, task, "held_out")
    means = []
    chunked = evaluate(engine, task, "held_out", chunk_size=3, on_chunk=lambda r: means.append(r.mean))
    assert chunked.scores == whole.scores and chunked.complete
    assert len(means) == 3 and means[-1] == pytest.approx(whole.mean)
    stopped = evaluate(engine, task, "held_out", chunk_size=2, on_chunk=lambda r: True)
    assert not stopped.complete and stopped.scores == whole.scores[:2]
    results = evaluate_interleaved(engine, [tasks["mc"], tasks["gen"]], "proxy", chunk_size=2)
    assert [r.scores for r in results] == [evaluate(engine, tasks[n], "proxy").scores for n in ("mc", "gen")]


# ---------------------------------------------------------------------------------------------
# Bad input: ConfigError naming the value and the fix
# ---------------------------------------------------------------------------------------------


class FakeManager:
    """Stands in for lm-eval's built-in index (building the real one takes many seconds)."""

    task_index: ClassVar[dict[str, Any]] = {"hellaswag": None, "arc_easy": None, "bridge_mcq_builtin": None}


@pytest.fixture()
def no_builtin(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bridge, "_builtin_manager", lambda: FakeManager())


def task_file(lm_dir: Path, name: str, block: dict[str, Any], **top: Any) -> Path:
    data = {"name": "bad", **top, "lm_eval": block}
    return write_yaml(lm_dir / f"{name}.yaml", data)


MC_BLOCK = {"task": "bridge_mc", "include_path": "tasks", "metric": "acc", "proxy": 2}


@pytest.mark.parametrize(
    ("block", "top", "match"),
    [
        ({**MC_BLOCK, "task": "bridge_mcq"}, {}, r"no lm-eval task named 'bridge_mcq'.*Near names: bridge_mc"),
        ({**MC_BLOCK, "metric": "accuracy"}, {}, r"does not report metric 'accuracy'.*It reports: acc, acc_norm"),
        ({**MC_BLOCK, "metric": "acc", "filter": "strict"}, {}, r"no filter 'strict'"),
        ({**MC_BLOCK, "metrc": "acc"}, {}, r"unknown key 'metrc' in the lm_eval block.*Did you mean 'metric'"),
        ({**MC_BLOCK, "proxy": 0}, {}, r"proxy"),
        ({**MC_BLOCK, "proxy": 10, "held_out": 10}, {}, r"has 12 docs.*fewer than proxy 10 \+ held_out 10"),
        ({k: v for k, v in MC_BLOCK.items() if k != "metric"}, {}, r"no 'metric'"),
        (MC_BLOCK, {"data": {"proxy": "x.jsonl"}}, r"unknown key 'data'.*only name, description and lm_eval"),
        ({**MC_BLOCK, "include_path": "nowhere"}, {}, r"include_path 'nowhere' is not a folder"),
        ({**MC_BLOCK, "task": "tasks/missing.yaml"}, {}, r"'tasks/missing.yaml' does not exist"),
    ],
    ids=["task-name", "metric", "filter", "block-key", "proxy-zero", "too-few-docs", "no-metric", "top-key",
         "include-path", "task-path"],
)
def test_bad_task_files(lm_dir: Path, no_builtin: None, block: dict[str, Any], top: dict[str, Any],
                        match: str) -> None:
    path = task_file(lm_dir, "bad", block, **top)
    with pytest.raises(ConfigError, match=match):
        load_task(path)


def test_unknown_name_without_near_names_says_how_to_list(lm_dir: Path, no_builtin: None) -> None:
    with pytest.raises(ConfigError, match=r"no lm-eval task named 'zzzzqqq'.*include_path has: .*bridge_mc"):
        load_task(task_file(lm_dir, "bad", {**MC_BLOCK, "task": "zzzzqqq"}))


def test_unsafe_task_needs_confirmation(lm_dir: Path, engine: Any) -> None:
    write_yaml(lm_dir / "tasks" / "unsafe.yaml", gen_config(task="bridge_unsafe", unsafe_code=True))
    block = {"task": "tasks/unsafe.yaml", "metric": "exact_match", "proxy": 2}
    with pytest.raises(ConfigError, match=r"'bridge_unsafe' is marked unsafe_code.*confirm_run_unsafe_code: true"):
        load_task(task_file(lm_dir, "unsafe", block))
    with pytest.raises(ConfigError, match="unknown key 'confirm_run_unsafe_code'|confirm_run_unsafe_code"):
        load_task(task_file(lm_dir, "unsafe2", {**block, "confirm_run_unsafe_code": True}))
    task = load_task(task_file(lm_dir, "unsafe", block), confirm_run_unsafe_code=True)
    assert len(evaluate(engine, task, "proxy").scores) == 2
    with pytest.raises(ConfigError, match="confirm_run_unsafe_code=True"):
        bridge.run_lm_eval(engine, "tasks/unsafe.yaml", base_dir=lm_dir, limit=1)


@pytest.mark.parametrize(
    ("config", "metric", "match"),
    [
        (gen_config(task="bridge_sample", generation_kwargs={"until": ["\n"], "do_sample": True, "temperature": 0.7}),
         "exact_match", r"samples.*do_sample: false"),
        (mc_config(task="bridge_f1", metric_list=[{"metric": "f1", "aggregation": "f1", "higher_is_better": True}]),
         "f1", r"aggregated over all docs \(f1\)"),
        (gen_config(task="bridge_lower", metric_list=[
            {"metric": "exact_match", "aggregation": "mean", "higher_is_better": False}]),
         "exact_match", r"lower-is-better"),
    ],
    ids=["sampling", "corpus-metric", "lower-is-better"],
)
def test_unusable_lm_eval_tasks(lm_dir: Path, config: dict[str, Any], metric: str, match: str) -> None:
    write_yaml(lm_dir / "tasks" / f"{config['task']}.yaml", config)
    block = {"task": f"tasks/{config['task']}.yaml", "metric": metric, "proxy": 2}
    with pytest.raises(ConfigError, match=match):
        load_task(task_file(lm_dir, "unusable", block))


def test_groups_are_refused_as_proxy_tasks(lm_dir: Path) -> None:
    write_yaml(lm_dir / "tasks" / "group.yaml", {"group": "bridge_group", "task": ["bridge_mc", "bridge_gen"]})
    with pytest.raises(ConfigError, match=r"'bridge_group' is an lm-eval group.*one task file per subtask"):
        load_task(task_file(lm_dir, "group", {**MC_BLOCK, "task": "bridge_group"}))


def test_metric_may_name_its_filter_as_lm_evals_results_do(lm_dir: Path) -> None:
    task = load_task(task_file(lm_dir, "comma", {**MC_BLOCK, "metric": "acc_norm,none"}))
    assert (task.metric, task.scorer.filter) == ("acc_norm", "none")
    with pytest.raises(ConfigError, match="give the filter once"):
        load_task(task_file(lm_dir, "comma", {**MC_BLOCK, "metric": "acc,none", "filter": "other"}))


def test_num_fewshot_override(lm_dir: Path) -> None:
    """num_fewshot overrides the YAML's as lm-eval's --num_fewshot does; a pinned 0 is refused."""
    block = {"task": "tasks/bridge_gen.yaml", "metric": "exact_match", "proxy": 2}
    task = load_task(task_file(lm_dir, "shots", {**block, "num_fewshot": 2}))
    assert [ex.prompt.count("Reverse the word") for ex in task.examples("proxy")] == [3, 3]
    write_yaml(lm_dir / "tasks" / "pinned.yaml", gen_config(task="bridge_pinned", num_fewshot=0))
    with pytest.raises(ConfigError, match=r"pins num_fewshot: 0.*remove num_fewshot: 2"):
        load_task(task_file(lm_dir, "shots", {**block, "task": "tasks/pinned.yaml", "num_fewshot": 2}))


def test_held_out_split_must_be_configured(lm_dir: Path) -> None:
    task = load_task(task_file(lm_dir, "nohold", MC_BLOCK))
    with pytest.raises(ConfigError, match=r"no 'held_out' split.*held_out: N"):
        task.examples("held_out")


def test_metric_outside_unit_interval_is_an_error(lm_dir: Path, engine: Any, tasks: dict[str, Any]) -> None:
    scorer = tasks["mc"].scorer
    with pytest.raises(ConfigError, match=r"gave 3.0 for this doc, outside \[0, 1\]"):
        bridge._doc_score("acc", 3.0, "doc 0")
    with pytest.raises(ConfigError, match="not a number"):
        bridge._doc_score("acc", (1, 2), "doc 0")
    assert bridge._doc_score("byte_perplexity", (-2.0, 4), "doc 0") == pytest.approx(math.exp(-0.5))
    assert bridge._doc_score("perplexity", -0.25, "doc 0") == pytest.approx(math.exp(-0.25))
    # NaN is a broken candidate, not a bad config: it passes through for the worker to report.
    assert math.isnan(bridge._doc_score("acc", float("nan"), "doc 0"))
    assert scorer.metric == "acc"


def test_run_lm_eval_bad_arguments(engine: Any, lm_dir: Path, no_builtin: None) -> None:
    with pytest.raises(ConfigError, match=r"no option 'log_sample'.*Did you mean 'log_samples'"):
        bridge.run_lm_eval(engine, "tasks/bridge_mc.yaml", base_dir=lm_dir, log_sample=True)
    with pytest.raises(ConfigError, match="limit must be a positive"):
        bridge.run_lm_eval(engine, "tasks/bridge_mc.yaml", base_dir=lm_dir, limit=0)
    with pytest.raises(ConfigError, match=r"no lm-eval task named 'bridge_mcc'.*Near names: bridge_mc"):
        bridge.run_lm_eval(engine, "bridge_mcc", include_path=lm_dir / "tasks")


# ---------------------------------------------------------------------------------------------
# The shipped example
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", find_task_files(SHIPPED), ids=lambda p: p.name)
def test_shipped_lm_eval_task_loads(path: Path) -> None:
    task = load_task(path)
    assert task.name == path.stem and task.spec.description
    proxy, held_out = task.examples("proxy"), task.examples("held_out")
    assert proxy and held_out
    queries = [ex.query for ex in (*proxy, *held_out)]
    assert len(set(queries)) == len(queries), "a doc repeats, or proxy and held-out share one"
    text = path.read_text(encoding="utf-8")
    assert text.startswith("#") and re.search(r"^# Run:", text, re.MULTILINE)


def test_shipped_example_exists() -> None:
    assert find_task_files(SHIPPED), "evals/lm_eval/ must ship an example task file"


@pytest.mark.slow
def test_builtin_task_names_are_found_and_suggested(lm_dir: Path) -> None:
    """lm-eval's real built-in index (slow to build): a typo gets the real name suggested."""
    with pytest.raises(ConfigError, match=r"Near names: .*hellaswag"):
        load_task(task_file(lm_dir, "builtin", {"task": "hellaswg", "metric": "acc", "proxy": 2}))
