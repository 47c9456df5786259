"""transformers and vLLM give the same greedy outputs and the same task scores on the demo zoo.

The default run uses a briefly trained zoo (the demo's architecture, tasks and prompts) and runs
the same study with each backend: every trial's per-example scores must be equal. The ``slow``
test does the same comparison on the real demo zoo, model by model, through in-place swaps.
Loglikelihood-based scores (perplexity, the lm-eval bridge's multiple choice) agree to 1e-4
absolute per example: the two backends' float32 kernels differ by ~1e-5 in log-probability.
"""

from __future__ import annotations

import os
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState
from safetensors.torch import load_file

from mergesearch.driver.config import load_study
from mergesearch.driver.driver import run_study
from mergesearch.eval.runner import evaluate
from mergesearch.eval.tasks import load_tasks
from mergesearch.zoo.build import ZooConfig, build_zoo

ROOT = Path(__file__).resolve().parents[1]
EVALS = ROOT / "evals"
SHORT = ZooConfig(base_steps=40, expert_steps=15, warmup_steps=2, verify=False, verify_limit=2, threads=1)
TASKS = ["addition", "reverse", "perplexity", str(EVALS / "lm_eval" / "addition_mc.yaml")]
SCORE_ATOL = 1e-4

pytestmark = [pytest.mark.usefixtures("one_torch_thread"), pytest.mark.integration]


@pytest.fixture(scope="module")
def vllm_ready() -> None:
    from mergesearch.errors import ConfigError
    from mergesearch.eval.vllm import import_vllm

    try:
        import_vllm()
    except ConfigError as err:
        pytest.skip(str(err))


@pytest.fixture(scope="module")
def short_zoo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("agree") / "zoo"
    build_zoo(root, SHORT)
    return root


def _study(folder: Path, zoo: Path, backend: str) -> Path:
    study = {
        "name": "agree",
        "sources": {"base": str(zoo / "base"),
                    "models": [str(zoo / "experts" / "addition"), str(zoo / "experts" / "reverse")]},
        "method": "linear",
        "space": "dirichlet_linear",
        "evals": {"tasks": TASKS, "tasks_dir": str(EVALS), "proxy_limit": 8, "held_out_limit": 4, "chunk_size": 4},
        "sampler": "random",
        "seed": 5,
        "budget": {"trials": 3},
        "top_k": 1,
        "baselines": False,
        "write_checkpoint": False,
        "engine": {"backend": backend, "dtype": "float32", "max_model_len": 512},
        "output_dir": "out",
    }
    folder.mkdir(parents=True)
    path = folder / "study.yaml"
    path.write_text(yaml.safe_dump(study), encoding="utf-8")
    return path


def _examples(path: Path) -> dict[int, dict[str, list[float]]]:
    study = optuna.load_study(study_name="agree", storage=f"sqlite:///{path.parent / 'out' / 'study.db'}")
    trials = study.get_trials(states=(TrialState.COMPLETE,))
    assert len(trials) == 3
    return {t.number: {"plan": t.user_attrs["plan"], **t.user_attrs["examples"]} for t in trials}


def test_a_study_scores_the_same_with_either_backend(tmp_path: Path, short_zoo: Path, vllm_ready: None) -> None:
    runs = {}
    for backend in ("transformers", "vllm"):
        path = _study(tmp_path / backend, short_zoo, backend)
        run_study(load_study(path), log=lambda _line: None)
        runs[backend] = _examples(path)
    hf, vl = runs["transformers"], runs["vllm"]
    assert hf.keys() == vl.keys()
    varied = {x for t in hf.values() for task, v in t.items() if task != "plan" for x in v}
    assert len(varied) > 5, "the scores should vary, or their agreement proves little"
    for number in hf:
        assert hf[number]["plan"] == vl[number]["plan"], "the same seed must propose the same candidates"
        for task in hf[number]:
            if task == "plan":
                continue
            assert vl[number][task] == pytest.approx(hf[number][task], abs=SCORE_ATOL), (number, task)


@pytest.mark.slow
def test_the_demo_zoo_generates_and_scores_the_same(vllm_ready: None) -> None:
    """On the real demo zoo (``mergesearch zoo``; MERGESEARCH_ZOO overrides ./zoo)."""
    from mergesearch.eval.hf import TransformersEngine
    from mergesearch.eval.vllm import VLLMEngine

    zoo = Path(os.environ.get("MERGESEARCH_ZOO", ROOT / "zoo"))
    if not (zoo / "zoo.json").is_file():
        pytest.skip(f"no demo zoo at {zoo}; build it with `mergesearch zoo`")
    tasks = load_tasks(["addition", "reverse", "format", "code", "order", "perplexity"], [EVALS])
    models = [zoo / "base", *sorted((zoo / "experts").iterdir())]
    hf = TransformersEngine(models[0], dtype="float32")
    vl = VLLMEngine(models[0], dtype="float32")
    try:
        for model in models:
            weights = {k: v for f in sorted(model.glob("*.safetensors")) for k, v in load_file(f).items()}
            hf.load_weights(weights.items())
            vl.load_weights(weights.items())
            for task in tasks:
                for split in ("proxy", "held_out"):
                    a, b = evaluate(hf, task, split), evaluate(vl, task, split)
                    assert b.responses == a.responses, (model.name, task.name, split)
                    assert b.scores == pytest.approx(a.scores, abs=SCORE_ATOL), (model.name, task.name, split)
    finally:
        hf.close()
        vl.close()


@pytest.mark.slow
def test_a_study_on_ray_actors_with_vllm_engines_scores_like_the_local_run(tmp_path: Path, short_zoo: Path,
                                                                          vllm_ready: None) -> None:
    """Each Ray actor builds its own in-process vLLM engine; the scores are the local run's."""
    runs = {}
    for kind in ("local", "ray"):
        path = _study(tmp_path / kind, short_zoo, "vllm")
        study = yaml.safe_load(path.read_text())
        study["executor"] = {"kind": kind, "workers": 2 if kind == "ray" else 1}
        path.write_text(yaml.safe_dump(study), encoding="utf-8")
        run_study(load_study(path), log=lambda _line: None)
        runs[kind] = _examples(path)
    for number, local in runs["local"].items():
        ray = runs["ray"][number]
        assert ray["plan"] == local["plan"]
        for task in local:
            if task != "plan":
                assert ray[task] == pytest.approx(local[task], abs=SCORE_ATOL), (number, task)
