"""Executors run jobs on workers and hand back events; the driver alone talks to the storage.

The protocol is asynchronous: ``submit`` a job whenever ``idle()`` > 0, ``poll`` for events
(progress, done, failed), and answer each progress event with ``reply(key, stop)`` — stop=True
prunes the job, which then finishes early with its partial scores.
"""

from __future__ import annotations

import queue
import threading
import traceback
from dataclasses import dataclass
from typing import Any, Literal, Optional, Protocol

from mergesearch.errors import MergeSearchError
from mergesearch.workers.worker import Job, JobResult, Progress, ResidentSources, Worker, WorkerSetup

__all__ = ["Event", "Executor", "LocalExecutor", "await_reply", "candidate_error", "drain_queue", "make_executor"]


@dataclass(frozen=True)
class Event:
    """``infra`` marks failures of the worker itself (died, hung), not of the candidate."""

    kind: Literal["progress", "done", "failed", "log"]
    key: str
    progress: Optional[Progress] = None
    result: Optional[JobResult] = None
    error: str = ""
    infra: bool = False
    worker: str = ""


class Executor(Protocol):
    def start(self) -> list[str]:
        """Start the workers; returns one line per worker (memory, setup time)."""

    def idle(self) -> int:
        """How many more jobs can be submitted now."""

    def submit(self, job: Job) -> None: ...

    def poll(self, timeout: float) -> list[Event]:
        """Events since the last poll, waiting up to ``timeout`` seconds for the first."""

    def reply(self, key: str, stop: bool) -> None:
        """Answer a progress event of job ``key``: stop=True ends its eval early."""

    def running(self) -> list[str]: ...

    def close(self) -> None: ...


def candidate_error(err: BaseException, worker: str) -> str:
    """The message of a candidate's failure: a MergeSearchError as is, anything else with its type."""
    if isinstance(err, MergeSearchError):
        return str(err)
    tb = traceback.format_exception_only(type(err), err)[-1].strip()
    return f"{tb} (in {worker})"


def drain_queue(q: "queue.Queue[Any]", timeout: float) -> list[Any]:
    """Everything in ``q``, waiting up to ``timeout`` seconds for the first item."""
    out = []
    try:
        out.append(q.get(timeout=timeout))
    except queue.Empty:
        return out
    while True:
        try:
            out.append(q.get_nowait())
        except queue.Empty:
            return out


def await_reply(box: "queue.Queue[bool]", closed: threading.Event) -> bool:
    """The driver's answer to a progress report (True: stop the eval); True once ``closed`` is set."""
    while not closed.is_set():
        try:
            return box.get(timeout=0.5)
        except queue.Empty:
            continue
    return True


class LocalExecutor:
    """Workers as threads of this process; they share one resident copy of the sources."""

    def __init__(self, setup: WorkerSetup, workers: int = 1):
        self.setup = setup
        self.n = workers
        self.events: queue.Queue[Event] = queue.Queue()
        self.jobs: queue.Queue[Optional[Job]] = queue.Queue()
        self.replies: dict[str, queue.Queue[bool]] = {}
        self._running: dict[str, str] = {}
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._workers: list[Worker] = []
        self._closed = threading.Event()

    def start(self) -> list[str]:
        shared: Optional[ResidentSources] = None
        for i in range(self.n):
            w = Worker(self.setup, name=f"local-{i}", sources=shared)
            shared = w.sources
            self._workers.append(w)
        for w in self._workers:
            t = threading.Thread(target=self._loop, args=(w,), name=w.name, daemon=True)
            t.start()
            self._threads.append(t)
        return [w.memory_summary() for w in self._workers]

    def idle(self) -> int:
        with self._lock:
            return self.n - len(self._running) - self.jobs.qsize()

    def running(self) -> list[str]:
        with self._lock:
            return list(self._running)

    def submit(self, job: Job) -> None:
        with self._lock:
            self.replies[job.key] = queue.Queue(maxsize=1)
        self.jobs.put(job)

    def reply(self, key: str, stop: bool) -> None:
        box = self.replies.get(key)
        if box is not None and box.empty():
            box.put(stop)

    def poll(self, timeout: float) -> list[Event]:
        return drain_queue(self.events, timeout)

    def _report(self, worker: Worker, progress: Progress) -> bool:
        self.events.put(Event("progress", progress.key, progress=progress, worker=worker.name))
        return await_reply(self.replies[progress.key], self._closed)

    def _loop(self, worker: Worker) -> None:
        while True:
            job = self.jobs.get()
            if job is None:
                return
            with self._lock:
                self._running[job.key] = worker.name
            try:
                result = worker.run(job, lambda p: self._report(worker, p))
                event = Event("done", job.key, result=result, worker=worker.name)
            except Exception as err:  # noqa: BLE001 - a failed candidate must not stop the study
                event = Event("failed", job.key, error=candidate_error(err, worker.name), worker=worker.name)
            with self._lock:
                self._running.pop(job.key, None)
                self.replies.pop(job.key, None)
            self.events.put(event)

    def close(self) -> None:
        self._closed.set()
        for _ in self._threads:
            self.jobs.put(None)
        for t in self._threads:
            t.join(timeout=60)
        for i, w in enumerate(self._workers):
            w.close(sources=i == 0)
        self._workers.clear()
        self._threads.clear()


def make_executor(kind: str, setup: WorkerSetup, workers: int = 1, address: Optional[str] = None,
                  trial_timeout: Optional[float] = None) -> Executor:
    if kind == "local":
        return LocalExecutor(setup, workers)
    if kind == "ray":
        import importlib.util

        if importlib.util.find_spec("ray") is None:
            raise MergeSearchError(
                "executor.kind 'ray' needs the `ray` package, which is not installed here: "
                "pip install 'ray>=2.30' (on every node of the cluster), or use executor: {kind: local}."
            )
        from mergesearch.workers.ray_executor import RayExecutor

        return RayExecutor(setup, workers, address=address, trial_timeout=trial_timeout)
    raise MergeSearchError(f"Unknown executor {kind!r}; use local or ray.")
