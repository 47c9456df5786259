"""Worker lifecycle: sources resident once, merges written into the live engine in place, memory
measured and checked against what the machine has."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mergesearch.errors import ConfigError, MergeComputationError
from mergesearch.eval.hf import TransformersEngine
from mergesearch.merge.executor import run_merge
from mergesearch.plan import loads_plan
from mergesearch.workers import worker as W

EVALS = Path(__file__).resolve().parents[1] / "evals"

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def plan_text(family: dict[str, Path], method: str = "ties") -> str:
    base, ft0, ft1 = (family[k] for k in ("base", "ft0", "ft1"))
    if method == "ties":
        return (f"merge_method: ties\nbase_model: {base}\nparameters: {{normalize: true}}\nmodels:\n"
                f"  - model: {ft0}\n    parameters: {{weight: 0.6, density: 0.5}}\n"
                f"  - model: {ft1}\n    parameters: {{weight: 0.4, density: 0.7}}\n")
    return (f"merge_method: linear\nmodels:\n  - model: {base}\n    parameters: {{weight: 0.2}}\n"
            f"  - model: {ft0}\n    parameters: {{weight: 0.5}}\n  - model: {ft1}\n    parameters: {{weight: 0.3}}\n")


@pytest.fixture()
def live(qwen3_family):
    paths = tuple(str(qwen3_family[k]) for k in ("base", "ft0", "ft1"))
    sources = W.ResidentSources(paths)
    engine = TransformersEngine(paths[0], dtype="float32")
    yield sources, engine
    engine.close()
    sources.close()


@pytest.mark.parametrize("method", ["linear", "ties"])
def test_a_candidate_is_written_into_the_live_parameters_and_equals_the_merge_on_disk(live, qwen3_family, tmp_path, method):
    sources, engine = live
    materialise = W.Materializer(sources, engine)
    before = {name: t.data_ptr() for name, t in engine.state_dict().items()}
    plan = loads_plan(plan_text(qwen3_family, method), "plan")
    assert materialise(plan, seed=3) == len(before)
    after = engine.state_dict()
    assert {name: t.data_ptr() for name, t in after.items()} == before, "weights must be overwritten in place"
    run_merge(plan, tmp_path / "disk", seed=3)
    on_disk = {}
    for f in (tmp_path / "disk").glob("*.safetensors"):
        on_disk.update(load_file(f))
    for name, tensor in after.items():
        torch.testing.assert_close(tensor, on_disk[name], rtol=0, atol=0, msg=name)


def test_the_engine_generates_with_the_new_weights_without_a_rebuild(live, qwen3_family, tmp_path):
    sources, engine = live
    plan = loads_plan(plan_text(qwen3_family, "linear"), "plan")
    W.Materializer(sources, engine)(plan)
    run_merge(plan, tmp_path / "disk")
    fresh = TransformersEngine(str(tmp_path / "disk"), dtype="float32")
    try:
        prompts = ["1+2=", "reverse: abc ->"]
        assert engine.generate(prompts, max_new_tokens=6) == fresh.generate(prompts, max_new_tokens=6)
    finally:
        fresh.close()


def test_a_merge_that_produces_nan_fails_naming_the_tensor(live, qwen3_family):
    sources, engine = live
    name = "model.layers.1.mlp.up_proj.weight"
    sources.tensors[str(qwen3_family["ft0"])][name][0, 0] = float("nan")
    with pytest.raises(MergeComputationError, match="up_proj.*NaN/inf"):
        W.Materializer(sources, engine)(loads_plan(plan_text(qwen3_family, "linear"), "plan"))


def test_sources_are_read_once_and_the_worker_reports_measured_memory(qwen3_family, tmp_path):
    paths = tuple(str(qwen3_family[k]) for k in ("base", "ft0"))
    setup = W.WorkerSetup(sources=paths, engine_dir=paths[0], tasks=(str(EVALS / "perplexity.yaml"),))
    worker = W.Worker(setup, name="w0")
    try:
        expected = sum(p.stat().st_size for d in paths for p in Path(d).glob("*.safetensors"))
        assert expected * 0.99 < worker.sources.nbytes <= expected
        assert worker.sources.placement == "cpu"
        line = worker.memory_summary()
        assert line.startswith("w0: sources ") and "host memory" in line and "process RSS" in line
        twin = W.Worker(setup, name="w1", sources=worker.sources)
        assert twin.sources is worker.sources and "(shared)" in twin.memory_summary()
        twin.close(sources=False)
    finally:
        worker.close()


def test_sources_that_do_not_fit_in_memory_are_refused_with_the_sizes(qwen3_family, monkeypatch):
    monkeypatch.setattr(W, "host_available_bytes", lambda: 1024)
    with pytest.raises(ConfigError, match=r"need .* GiB of memory but 0.00 GiB are available.*fewer workers"):
        W.ResidentSources((str(qwen3_family["base"]),))


def test_peak_memory_measures_an_allocation_above_the_start():
    # 256 MiB: far above malloc's mmap threshold, so the pages are new to the process (a small
    # block could reuse memory freed earlier in the session, which the RSS peak rightly ignores)
    with W.PeakMemory("cpu") as peak:
        block = torch.ones(64 * 2**20)
        block += 1
    del block
    assert peak.bytes is not None and peak.bytes >= 200 * 2**20
