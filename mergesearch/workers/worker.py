"""A worker: sources resident in memory, one long-lived engine, candidates merged into it in place.

Lifecycle: ``Worker(setup)`` loads every source once and builds the engine once; ``run(job)``
materialises the job's merge plan tensor by tensor straight into the engine's parameters (no
disk, no second copy of the model), scores the tasks and returns per-example scores; ``close()``
frees everything. Jobs are small (a merge plan and a seed) so they travel to remote workers.
"""

from __future__ import annotations

import math
import os
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

from mergesearch.errors import CheckpointError, ConfigError, MergeComputationError

__all__ = ["WorkerSetup", "Job", "Progress", "JobResult", "Worker", "ResidentSources", "Materializer"]


@dataclass(frozen=True)
class WorkerSetup:
    """Everything a worker needs to start; picklable."""

    sources: tuple[str, ...]
    engine_dir: str
    tasks: tuple[str, ...]
    backend: str = "transformers"
    dtype: str = "float32"
    device: str = "cpu"
    batch_size: int = 32
    chunk_size: int = 16
    limits: Mapping[str, Optional[int]] = field(default_factory=dict)


@dataclass(frozen=True)
class Job:
    """One candidate to score: a merge plan (mergekit YAML) on one split."""

    key: str
    plan: str
    split: Literal["proxy", "held_out"] = "proxy"
    seed: int = 0
    report: bool = False


@dataclass(frozen=True)
class Progress:
    """Per-task example scores so far (sent after each round of chunks when ``Job.report``)."""

    key: str
    scores: dict[str, tuple[float, ...]]
    totals: dict[str, int]


@dataclass(frozen=True)
class JobResult:
    key: str
    scores: dict[str, float]
    examples: dict[str, list[float]]
    totals: dict[str, int]
    complete: bool
    timings: dict[str, float]
    worker: str

    @property
    def scored(self) -> dict[str, int]:
        return {k: len(v) for k, v in self.examples.items()}


class ResidentSources:
    """Every tensor of every source, read once into memory (checkpoint headers kept for layout)."""

    def __init__(self, paths: tuple[str, ...], device: str = "cpu"):
        from mergesearch.io.checkpoint import open_checkpoints

        self.ckpts = open_checkpoints(list(paths))
        self.tensors: dict[str, dict[str, Any]] = {}
        self.nbytes = 0
        for ref, ckpt in self.ckpts.items():
            loaded = {}
            for name in ckpt.tensors:
                t = ckpt.read(name).to(device=device, copy=True)
                loaded[name] = t
                self.nbytes += t.numel() * t.element_size()
            self.tensors[ref] = loaded

    def close(self) -> None:
        for ckpt in self.ckpts.values():
            ckpt.close()
        self.tensors.clear()


class Materializer:
    """Writes a merge plan's output into an engine's live parameters, one tensor at a time."""

    def __init__(self, sources: ResidentSources, engine: Any):
        self.sources = sources
        self.engine = engine
        self.params = engine.state_dict()
        self.tied = bool(getattr(engine, "_tied", False))

    def __call__(self, plan: Any, seed: int = 0) -> int:
        import torch

        from mergesearch.merge.methods import TensorInputs, merge_into
        from mergesearch.merge.registry import validate_plan
        from mergesearch.merge.tasks import MergeTasks

        spec = validate_plan(plan)
        missing = [m for m in plan.referenced_models() if m not in self.sources.ckpts]
        if missing:
            raise ConfigError(
                f"The merge plan reads {missing[0]!r}, which is not one of this worker's sources "
                f"({', '.join(self.sources.ckpts)}); add it to the study's sources."
            )
        tasks = MergeTasks(plan, spec, self.sources.ckpts)
        tasks.check_params()
        written = set()
        with torch.no_grad():
            for task in tasks.tasks:
                target = self.params.get(task.name)
                if target is None:
                    if task.name == "lm_head.weight" and self.tied:
                        continue
                    raise CheckpointError(
                        f"The merge produces {task.name!r}, which the engine does not have; the plan "
                        "does not match the engine's architecture."
                    )
                params = tasks.params(task)
                inputs = TensorInputs(
                    name=task.name,
                    tensors=[self.sources.tensors[m][s] for m, s in zip(task.models, task.sources)],
                    shared=params.shared, per_input=params.per_input, base=task.base, seed=seed,
                    models=task.models,
                )
                merge_into(spec.name, inputs, target)
                written.add(task.name)
        left = sorted(set(self.params) - written)
        if left:
            raise CheckpointError(
                f"The merge plan does not produce {len(left)} of the engine's tensors (first: {left[0]!r}); "
                "a candidate must cover the whole model (check `slices:` layer ranges)."
            )
        return len(written)


def build_engine(setup: WorkerSetup) -> Any:
    if setup.backend == "transformers":
        from mergesearch.eval.hf import TransformersEngine

        return TransformersEngine(setup.engine_dir, dtype=setup.dtype, device=setup.device,
                                  batch_size=setup.batch_size)
    if setup.backend == "vllm":
        try:
            from mergesearch.eval.vllm import VLLMEngine  # type: ignore[import-not-found]
        except ImportError:
            raise ConfigError(
                "engine.backend 'vllm' is not available in this installation; use backend: transformers."
            ) from None
        return VLLMEngine(setup.engine_dir, dtype=setup.dtype, device=setup.device)
    raise ConfigError(f"Unknown engine backend {setup.backend!r}; use transformers or vllm.")


class Worker:
    """Sources + engine, set up once; scores one job at a time."""

    def __init__(self, setup: WorkerSetup, name: Optional[str] = None,
                 sources: Optional[ResidentSources] = None):
        from mergesearch.eval.tasks import load_tasks

        start = time.perf_counter()
        self.setup = setup
        self.name = name or f"{socket.gethostname()}:{os.getpid()}"
        self.tasks = load_tasks([Path(t) for t in setup.tasks])
        self.sources = sources if sources is not None else ResidentSources(setup.sources, setup.device)
        self.engine = build_engine(setup)
        self.materialise = Materializer(self.sources, self.engine)
        self.engine_bytes = sum(t.numel() * t.element_size() for t in self.materialise.params.values())
        self.setup_seconds = time.perf_counter() - start

    def memory_summary(self) -> str:
        gib = 1024**3
        return (f"{self.name}: sources {self.sources.nbytes / gib:.3f} GiB resident, engine "
                f"{self.engine_bytes / gib:.3f} GiB, set up in {self.setup_seconds:.1f}s")

    def run(self, job: Job, report: Optional[Callable[[Progress], bool]] = None) -> JobResult:
        """Materialise and score; ``report`` returning True stops the eval early (pruned)."""
        from mergesearch.eval.runner import evaluate_interleaved
        from mergesearch.plan import loads_plan

        start = time.perf_counter()
        plan = loads_plan(job.plan, f"plan of {job.key}")
        t0 = time.perf_counter()
        self.materialise(plan, job.seed)
        t1 = time.perf_counter()

        def on_round(r: Any) -> bool:
            if not job.report or report is None:
                return False
            return bool(report(Progress(job.key, r.scores, r.totals)))

        results = evaluate_interleaved(self.engine, self.tasks, job.split, chunk_size=self.setup.chunk_size,
                                       limit=self.setup.limits.get(job.split), on_round=on_round)
        t2 = time.perf_counter()
        for r in results:
            if any(math.isnan(s) for s in r.scores):
                raise MergeComputationError(f"Task {r.task!r} produced NaN scores for {job.key}.")
        eval_s = t2 - t1
        total = time.perf_counter() - start
        return JobResult(
            key=job.key,
            scores={r.task: r.mean for r in results},
            examples={r.task: list(r.scores) for r in results},
            totals={r.task: r.total for r in results},
            complete=all(r.complete for r in results),
            timings={"materialise_s": t1 - t0, "eval_s": eval_s, "overhead_s": total - eval_s - (t1 - t0),
                     "total_s": total},
            worker=self.name,
        )

    def close(self, sources: bool = True) -> None:
        """Free the engine, and the sources unless other workers share them."""
        self.engine.close()
        self.materialise.params = {}
        if sources:
            self.sources.close()
