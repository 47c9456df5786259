"""Executors run jobs on workers and hand back events; the driver alone talks to the storage.

The protocol is asynchronous: ``submit`` a job whenever ``idle()`` > 0, ``poll`` for events
(progress, done, failed), and answer each progress event with ``reply(key, stop)`` — stop=True
prunes the job, which then finishes early with its partial scores.
"""

from __future__ import annotations

import queue
import threading
import time
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

    def capacity(self) -> int:
        """Workers alive or starting; 0 means none is left and none will come back."""

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
    """Workers as threads of this process; they share one resident copy of the sources.

    A job running longer than ``trial_timeout`` seconds fails (as a worker failure, so the driver
    queues it again once) and its worker is replaced by a fresh one at once. A thread cannot be
    killed: the old worker is told to stop at its next round of chunks and then frees its engine;
    one stuck inside a single call keeps its engine until that call returns (Ray actors are killed
    outright).
    """

    def __init__(self, setup: WorkerSetup, workers: int = 1, trial_timeout: Optional[float] = None):
        self.setup = setup
        self.n = workers
        self.trial_timeout = trial_timeout
        self.events: queue.Queue[Event] = queue.Queue()
        self.jobs: queue.Queue[Optional[Job]] = queue.Queue()
        self.replies: dict[str, queue.Queue[bool]] = {}
        self._running: dict[str, tuple[str, float]] = {}
        self._abandoned: set[str] = set()
        self._stuck: set[str] = set()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._workers: list[Worker] = []
        self._shared: Optional[ResidentSources] = None
        self._replacements = 0
        self._closed = threading.Event()

    def start(self) -> list[str]:
        for i in range(self.n):
            w = Worker(self.setup, name=f"local-{i}", sources=self._shared)
            self._shared = w.sources
            self._workers.append(w)
        for w in self._workers:
            self._thread(w.name, self._loop, w)
        return [w.memory_summary() for w in self._workers]

    def _thread(self, name: str, target: Any, *args: Any) -> None:
        t = threading.Thread(target=target, args=args, name=f"mergesearch-{name}", daemon=True)
        t.start()
        self._threads.append(t)

    def idle(self) -> int:
        with self._lock:
            return self.n - len(self._running) - self.jobs.qsize()

    def running(self) -> list[str]:
        with self._lock:
            return list(self._running)

    def capacity(self) -> int:
        with self._lock:
            return self.n

    def submit(self, job: Job) -> None:
        with self._lock:
            self.replies[job.key] = queue.Queue(maxsize=1)
        self.jobs.put(job)

    def reply(self, key: str, stop: bool) -> None:
        box = self.replies.get(key)
        if box is not None and box.empty():
            box.put(stop)

    def poll(self, timeout: float) -> list[Event]:
        return self._timed_out() + drain_queue(self.events, timeout)

    def _timed_out(self) -> list[Event]:
        """Fail the jobs past ``trial_timeout`` and start a replacement worker for each."""
        if not self.trial_timeout:
            return []
        now = time.monotonic()
        events = []
        with self._lock:
            late = [(k, w) for k, (w, since) in self._running.items() if now - since > self.trial_timeout]
            for key, worker in late:
                del self._running[key]
                self._stuck.add(f"mergesearch-{worker}")
                self._abandoned.add(key)
                box = self.replies.pop(key, None)
                if box is not None and box.empty():
                    box.put(True)
        for key, old in late:
            self._replacements += 1
            name = f"local-r{self._replacements}"
            self._thread(name, self._replace, name)
            events.append(Event("failed", key, infra=True, worker=old, error=(
                f"Worker {old} ran past executor.trial_timeout ({self.trial_timeout:g}s) while running "
                f"{key}; it was told to stop and {name} replaces it. Raise trial_timeout if trials "
                f"are this slow.")))
        return events

    def _replace(self, name: str) -> None:
        try:
            w = Worker(self.setup, name=name, sources=self._shared)
        except Exception as err:  # noqa: BLE001 - the pool shrinks; the driver is told why
            why = candidate_error(err, name)
            with self._lock:
                self.n -= 1
                orphans = self._drain_jobs() if self.n == 0 else []
            self.events.put(Event("log", name, error=f"replacement worker {name} failed to start: {why}"))
            for job in orphans:
                self.events.put(Event("failed", job.key, infra=True, worker=name,
                                      error=f"No worker left to run {job.key}: {name} failed to start ({why})."))
            return
        with self._lock:
            self._workers.append(w)
        self._loop(w)

    def _drain_jobs(self) -> list[Job]:
        jobs = []
        while True:
            try:
                job = self.jobs.get_nowait()
            except queue.Empty:
                return jobs
            if job is not None:
                jobs.append(job)
                self.replies.pop(job.key, None)

    def _report(self, worker: Worker, progress: Progress) -> bool:
        box = self.replies.get(progress.key)
        if box is None:
            return True
        self.events.put(Event("progress", progress.key, progress=progress, worker=worker.name))
        return await_reply(box, self._closed)

    def _loop(self, worker: Worker) -> None:
        while True:
            job = self.jobs.get()
            if job is None:
                return
            with self._lock:
                self._running[job.key] = (worker.name, time.monotonic())
            try:
                result = worker.run(job, lambda p: self._report(worker, p))
                event = Event("done", job.key, result=result, worker=worker.name)
            except Exception as err:  # noqa: BLE001 - a failed candidate must not stop the study
                event = Event("failed", job.key, error=candidate_error(err, worker.name), worker=worker.name)
            with self._lock:
                late = job.key in self._abandoned
                self._abandoned.discard(job.key)
                self._running.pop(job.key, None)
                self.replies.pop(job.key, None)
                mine = late and worker in self._workers
                if mine:
                    self._workers.remove(worker)
            if late:
                if mine:
                    worker.close(sources=False)
                return
            self.events.put(event)

    def close(self) -> None:
        self._closed.set()
        for _ in self._threads:
            self.jobs.put(None)
        for t in self._threads:
            if t.name not in self._stuck:
                t.join(timeout=60)
        with self._lock:
            workers = list(self._workers)
            self._workers.clear()
        for w in workers:
            w.close(sources=False)
        if self._shared is not None:
            self._shared.close()
            self._shared = None
        self._threads.clear()


def make_executor(kind: str, setup: WorkerSetup, workers: int = 1, address: Optional[str] = None,
                  trial_timeout: Optional[float] = None) -> Executor:
    if kind == "local":
        return LocalExecutor(setup, workers, trial_timeout)
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
