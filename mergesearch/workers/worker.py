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
from collections.abc import Callable, Iterator, Mapping
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
    max_model_len: Optional[int] = None
    kv_cache_gib: float = 1.0
    chunk_size: int = 16
    confirm_run_unsafe_code: bool = False
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


GIB = 1024**3


def tensor_bytes(ckpts: Mapping[str, Any]) -> int:
    """Bytes of every tensor of open checkpoints, from their headers."""
    return sum(info.nbytes for ckpt in ckpts.values() for info in ckpt.tensors.values())


def host_available_bytes() -> Optional[int]:
    """MemAvailable of this machine (Linux), or None where it cannot be read."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


class PeakMemory:
    """Peak memory above the starting point while the block runs: CUDA allocator peak on a GPU,
    the process's resident high-water mark (``VmHWM``, reset through ``/proc/self/clear_refs``) on
    CPU. Per process: with several workers in one process the figure covers all of them."""

    def __init__(self, device: str):
        self.device = device
        self.bytes: Optional[int] = None

    @staticmethod
    def _status(key: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
        raise OSError(key)

    def __enter__(self) -> "PeakMemory":
        self._start = None
        try:
            if self.device.startswith("cuda"):
                import torch

                torch.cuda.reset_peak_memory_stats(self.device)
                self._start = torch.cuda.memory_allocated(self.device)
            else:
                Path("/proc/self/clear_refs").write_text("5")
                self._start = self._status("VmRSS")
        except (OSError, ValueError, RuntimeError):
            self._start = None
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._start is None:
            return
        try:
            if self.device.startswith("cuda"):
                import torch

                peak = torch.cuda.max_memory_allocated(self.device)
            else:
                peak = self._status("VmHWM")
        except (OSError, ValueError, RuntimeError):
            return
        self.bytes = max(0, peak - self._start)


def process_memory_bytes(device: str) -> Optional[int]:
    """Memory this process holds now on ``device``: allocated CUDA memory or resident set size."""
    try:
        if device.startswith("cuda"):
            import torch

            return int(torch.cuda.memory_allocated(device))
        return PeakMemory._status("VmRSS")
    except (OSError, ValueError, RuntimeError):
        return None


class ResidentSources:
    """Every tensor of every source, read once into memory (checkpoint headers kept for layout).

    Placement: on a CUDA ``device`` the sources go to GPU memory when they fit next to the engine
    (``reserve`` bytes), else to pinned host memory (each tensor is copied to the GPU when merged);
    on CPU they stay in host memory. Sources that fit nowhere raise ``ConfigError`` saying how much
    memory is needed and what to change.
    """

    def __init__(self, paths: tuple[str, ...], device: str = "cpu", reserve: int = 0):
        from mergesearch.io.checkpoint import open_checkpoints

        self.ckpts = open_checkpoints(list(paths))
        self.tensors: dict[str, dict[str, Any]] = {}
        need = tensor_bytes(self.ckpts)
        self.placement = self._place(need, device, reserve)
        target = device if self.placement == "gpu" else "cpu"
        self.nbytes = 0
        for ref, ckpt in self.ckpts.items():
            loaded = {}
            for name in ckpt.tensors:
                t = ckpt.read(name)
                if self.placement == "gpu":
                    t = t.to(device=target)
                elif self.placement == "pinned":
                    t = t.pin_memory()
                loaded[name] = t
                self.nbytes += t.numel() * t.element_size()
            self.tensors[ref] = loaded

    def _place(self, need: int, device: str, reserve: int) -> str:
        host = host_available_bytes()
        fix = ("use fewer or smaller sources, store them in bfloat16, set engine.dtype: bfloat16, or "
               "run on a machine with more memory")
        if device.startswith("cuda"):
            import torch

            free, _total = torch.cuda.mem_get_info(device)
            if need + reserve <= free:
                return "gpu"
            if host is None or need <= host:
                return "pinned"
            raise ConfigError(
                f"The sources need {need / GIB:.2f} GiB: {free / GIB:.2f} GiB are free on {device} "
                f"(after {reserve / GIB:.2f} GiB for the engine) and {host / GIB:.2f} GiB in host "
                f"memory; {fix}."
            )
        if host is not None and need + reserve > host:
            raise ConfigError(
                f"The sources and the engine need {(need + reserve) / GIB:.2f} GiB of memory but "
                f"{host / GIB:.2f} GiB are available on this machine; {fix}, or use fewer workers per "
                "machine."
            )
        return "cpu"

    def close(self) -> None:
        for ckpt in self.ckpts.values():
            ckpt.close()
        self.tensors.clear()


class Materializer:
    """Writes a merge plan's output into an engine, one tensor at a time.

    Engines that expose their live parameters (``state_dict()``, the transformers engine) are
    written in place; others (vLLM, whose parameters are stacked and repacked) get the merged
    tensors streamed through ``load_weights``, each merged into a fresh buffer just before the
    engine's loader copies it, so at most one merged tensor exists outside the engine.

    ``kernel`` picks how each tensor is merged: ``"auto"`` uses the fused Triton kernel
    (``mergesearch.merge.kernels``) for parameters on a CUDA device, and on CPU the
    Inductor-compiled fused loop (``kernels.cpu``) for large tensors of the methods it covers,
    else the torch reference; ``"triton"`` tries the kernel on any device (CPU needs
    ``TRITON_INTERPRET=1``);
    ``"torch"`` always uses the reference. When the kernel does not apply (an uncovered method,
    no triton, ...) the reference merges the tensor and a warning is logged once per method.
    """

    def __init__(self, sources: ResidentSources, engine: Any,
                 kernel: Literal["auto", "triton", "torch"] = "auto"):
        if kernel not in ("auto", "triton", "torch"):
            raise ConfigError(f"Unknown merge kernel choice {kernel!r}; use auto, triton or torch.")
        self.sources = sources
        self.engine = engine
        self.in_place = callable(getattr(engine, "state_dict", None))
        self.params = engine.state_dict() if self.in_place else {}
        self.specs = ({n: (tuple(t.shape), t.dtype) for n, t in self.params.items()} if self.in_place
                      else engine.weight_specs())
        self.tied = bool(getattr(engine, "_tied", False))
        self.kernel = kernel
        self.warned: set[str] = set()
        self.stats: dict[tuple[str, str], Any] = {}

    def _importance(self, plan: Any, spec: Any) -> Any:
        """The sources' calibration statistics a plan's importance-weighted method reads, loaded
        (or calibrated) once per calibration and kept resident beside the sources."""
        if not spec.importance:
            return {}
        from mergesearch.merge.importance import stats_for_plan

        key = (plan.calibration.model_dump_json() if plan.calibration else "", spec.importance)
        if key not in self.stats:
            self.stats[key] = stats_for_plan(plan, {m: c.path for m, c in self.sources.ckpts.items()})
        return self.stats[key]

    def _merge(self, method: str, inputs: Any, target: Any) -> None:
        """One tensor: the fused kernel where it applies, else the torch reference."""
        import logging

        from mergesearch.merge.methods import merge_into

        if self.kernel == "auto" and not target.is_cuda:
            from mergesearch.merge.kernels import cpu

            if cpu.merge_into(method, inputs, target):
                return
        elif self.kernel == "triton" or (self.kernel == "auto" and target.is_cuda):
            from mergesearch.merge import kernels

            if kernels.fused_merge_into(method, inputs, target):
                return
            if method not in self.warned:
                self.warned.add(method)
                reason = kernels.unsupported_reason(method, inputs, target) or "not applicable"
                logging.getLogger(__name__).warning("%s; using the torch reference", reason)
        merge_into(method, inputs, target)

    def __call__(self, plan: Any, seed: int = 0) -> int:
        import torch

        from mergesearch.merge.executor import importance_inputs
        from mergesearch.merge.methods import TensorInputs
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
        stats = self._importance(plan, spec)
        todo = []
        for task in tasks.tasks:
            if task.name not in self.specs:
                if task.name == "lm_head.weight" and self.tied:
                    continue
                raise CheckpointError(
                    f"The merge produces {task.name!r}, which the engine does not have; the plan "
                    "does not match the engine's architecture."
                )
            todo.append(task)
        left = sorted(set(self.specs) - {t.name for t in todo})
        if left:
            raise CheckpointError(
                f"The merge plan does not produce {len(left)} of the engine's tensors (first: {left[0]!r}); "
                "a candidate must cover the whole model (check `slices:` layer ranges)."
            )

        def merged(target_of: Callable[[Any], Any]) -> Iterator[tuple[str, Any]]:
            for task in todo:
                target = target_of(task)
                params = tasks.params(task)
                inputs = TensorInputs(
                    name=task.name,
                    tensors=[self.sources.tensors[m][s].to(target.device, non_blocking=True)
                             for m, s in zip(task.models, task.sources)],
                    shared=params.shared, per_input=params.per_input, base=task.base, seed=seed,
                    models=task.models, importance=importance_inputs(spec, stats, task),
                )
                self._merge(spec.name, inputs, target)
                yield task.name, target

        with torch.no_grad():
            if self.in_place:
                return sum(1 for _ in merged(lambda task: self.params[task.name]))
            device = getattr(self.engine, "device", torch.device("cpu"))

            def fresh(task: Any) -> Any:
                shape, dtype = self.specs[task.name]
                return torch.empty(shape, dtype=dtype, device=device)

            return self.engine.load_weights(merged(fresh))


def build_engine(setup: WorkerSetup) -> Any:
    if setup.backend == "transformers":
        from mergesearch.eval.hf import TransformersEngine

        return TransformersEngine(setup.engine_dir, dtype=setup.dtype, device=setup.device,
                                  batch_size=setup.batch_size)
    if setup.backend == "vllm":
        from mergesearch.eval.vllm import VLLMEngine

        return VLLMEngine(setup.engine_dir, dtype=setup.dtype, device=setup.device, batch_size=setup.batch_size,
                          max_model_len=setup.max_model_len, kv_cache_gib=setup.kv_cache_gib)
    raise ConfigError(f"Unknown engine backend {setup.backend!r}; use transformers or vllm.")


def engine_bytes_estimate(setup: WorkerSetup) -> int:
    """Bytes of the engine's weights in ``setup.dtype``, from the engine checkpoint's header."""
    import torch

    from mergesearch.io.checkpoint import Checkpoint

    ckpt = Checkpoint(setup.engine_dir)
    try:
        numel = sum(info.numel for info in ckpt.tensors.values())
    finally:
        ckpt.close()
    itemsize = getattr(torch, setup.dtype, torch.float32).itemsize
    return numel * itemsize


class Worker:
    """Sources + engine, set up once; scores one job at a time."""

    def __init__(self, setup: WorkerSetup, name: Optional[str] = None,
                 sources: Optional[ResidentSources] = None):
        from mergesearch.eval.tasks import load_tasks

        start = time.perf_counter()
        self.setup = setup
        self.name = name or f"{socket.gethostname()}:{os.getpid()}"
        self.memory_before = process_memory_bytes(setup.device)
        self.tasks = load_tasks([Path(t) for t in setup.tasks], (), setup.confirm_run_unsafe_code)
        self.shared_sources = sources is not None
        self.sources = sources if sources is not None else ResidentSources(
            setup.sources, setup.device, reserve=engine_bytes_estimate(setup))
        self.engine = build_engine(setup)
        self.materialise = Materializer(self.sources, self.engine)
        self.engine_bytes = sum(math.prod(shape) * dtype.itemsize for shape, dtype in self.materialise.specs.values())
        self.memory_after = process_memory_bytes(setup.device)
        self.scratch_bytes: Optional[int] = None
        self.setup_seconds = time.perf_counter() - start

    def memory_summary(self) -> str:
        """One line: where the sources live, engine size, measured process memory, set-up time."""
        where = {"gpu": self.setup.device, "pinned": "pinned host memory", "cpu": "host memory"}
        shared = " (shared)" if self.shared_sources else ""
        line = (f"{self.name}: sources {self.sources.nbytes / GIB:.3f} GiB in "
                f"{where.get(self.sources.placement, self.sources.placement)}{shared}, engine "
                f"{self.engine_bytes / GIB:.3f} GiB")
        if self.memory_before is not None and self.memory_after is not None:
            kind = "GPU memory allocated" if self.setup.device.startswith("cuda") else "process RSS"
            line += (f"; {kind} {self.memory_after / GIB:.3f} GiB "
                     f"(+{(self.memory_after - self.memory_before) / GIB:.3f} GiB for this worker)")
        return line + f"; set up in {self.setup_seconds:.1f}s"

    def run(self, job: Job, report: Optional[Callable[[Progress], bool]] = None) -> JobResult:
        """Materialise and score; ``report`` returning True stops the eval early (pruned)."""
        from mergesearch.eval.runner import evaluate_interleaved
        from mergesearch.plan import loads_plan

        start = time.perf_counter()
        plan = loads_plan(job.plan, f"plan of {job.key}")
        t0 = time.perf_counter()
        with PeakMemory(self.setup.device) as peak:
            self.materialise(plan, job.seed)
        t1 = time.perf_counter()
        self.scratch_bytes = peak.bytes

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
                     "total_s": total, **({"scratch_mib": peak.bytes / 2**20} if peak.bytes is not None else {})},
            worker=self.name,
        )

    def close(self, sources: bool = True) -> None:
        """Free the engine, and the sources unless other workers share them."""
        self.engine.close()
        self.materialise.params = {}
        self.materialise.stats = {}
        if sources:
            self.sources.close()
