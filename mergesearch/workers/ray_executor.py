"""The Ray executor: one long-lived actor per worker (one GPU each, or one CPU), managed directly.

Without ``address`` a local Ray cluster is started (and shut down by ``close``); with one, the
executor joins that cluster, so the same study scales to many nodes (mergesearch, the sources and
the task files must then be at the same paths on every node).

Sources: CPU workers share one copy per node. The driver reads every source tensor once into the
object store (raw bytes, packed into objects of up to 256 MiB) and each actor maps those objects
read-only and views them as tensors without copying. GPU workers copy the sources to their GPU.

Actors are threaded: while ``run`` scores a candidate in one thread, ``drain`` (the heartbeat, a
long poll that also hands over progress reports) and ``reply`` are answered in others. An actor
that dies (SIGKILL, OOM), stops answering heartbeats for ``heartbeat_timeout`` seconds, or runs a
job past ``trial_timeout`` is killed and replaced by a fresh one; its job ends with an ``infra``
failure, which the driver re-queues once. Jobs and results are small; weights never travel.
"""

from __future__ import annotations

import logging
import os
import queue
import re
import socket
import threading
import time
import warnings
from dataclasses import dataclass, replace
from typing import Any, Optional

from mergesearch.errors import MergeSearchError
from mergesearch.workers.executor import Event, await_reply, candidate_error, drain_queue
from mergesearch.workers.worker import Job, Progress, ResidentSources, Worker, WorkerSetup, tensor_bytes

__all__ = ["RayExecutor", "RayExecutorError", "publish_sources"]

GIB = 1024**3
CHUNK_BYTES = 256 * 1024**2
ALIGN = 64
BEAT_WAIT_S = 1.0
ACTOR_THREADS = 4


class RayExecutorError(MergeSearchError):
    """The Ray cluster cannot run the workers: unreachable, too small, or the actors do not start."""


# ---------------------------------------------------------------------------------------------
# Sources in the object store


@dataclass(frozen=True)
class PackedSources:
    """Object-store objects of raw tensor bytes; ``entries[i]`` says where each tensor of ``refs[i]`` lies.

    An entry is ``(model ref, tensor name, byte offset, byte length, torch dtype name, shape)``.
    """

    refs: tuple[Any, ...]
    entries: tuple[tuple[tuple[str, str, int, int, str, tuple[int, ...]], ...], ...]
    nbytes: int


def sources_nbytes(paths: tuple[str, ...]) -> int:
    """Bytes of every tensor of the sources, from their headers."""
    from mergesearch.io.checkpoint import open_checkpoints

    ckpts = open_checkpoints(list(paths))
    try:
        return tensor_bytes(ckpts)
    finally:
        for ck in ckpts.values():
            ck.close()


def publish_sources(paths: tuple[str, ...]) -> PackedSources:
    """Read every source tensor once into Ray's object store (needs ``ray.init`` first)."""
    import numpy as np
    import ray
    import torch

    from mergesearch.io.checkpoint import open_checkpoints

    ckpts = open_checkpoints(list(paths))
    try:
        items = [(ref, name, ck.tensors[name].nbytes) for ref, ck in ckpts.items() for name in ck.tensors]
        groups: list[list[tuple[str, str, int]]] = [[]]
        size = 0
        for item in items:
            step = -(-item[2] // ALIGN) * ALIGN
            if groups[-1] and size + step > CHUNK_BYTES:
                groups.append([])
                size = 0
            groups[-1].append(item)
            size += step
        refs, entries, total = [], [], 0
        for group in groups:
            offsets, pos = [], 0
            for _ref, _name, n in group:
                offsets.append(pos)
                pos += -(-n // ALIGN) * ALIGN
            buf = np.empty(max(pos, ALIGN), dtype=np.uint8)
            chunk = []
            for (ref, name, n), off in zip(group, offsets):
                t = ckpts[ref].read(name)
                buf[off:off + n] = t.reshape(-1).view(torch.uint8).numpy()
                chunk.append((ref, name, off, n, str(t.dtype).removeprefix("torch."), tuple(t.shape)))
                total += n
                del t
            refs.append(ray.put(buf))
            entries.append(tuple(chunk))
            del buf
        return PackedSources(tuple(refs), tuple(entries), total)
    finally:
        for ck in ckpts.values():
            ck.close()


class SharedSources(ResidentSources):
    """``ResidentSources`` whose tensors are read-only views of object-store memory.

    Every actor on a node maps the same objects, so the node holds one copy of the sources. The
    views must never be written to (merges only read their inputs).
    """

    def __init__(self, paths: tuple[str, ...], packed: PackedSources):
        import ray
        import torch

        from mergesearch.io.checkpoint import open_checkpoints

        self.ckpts = open_checkpoints(list(paths))
        self.tensors = {ref: {} for ref in self.ckpts}
        self.placement = "cpu"
        self.nbytes = 0
        self._arrays = ray.get(list(packed.refs))
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*not writable.*")
            for arr, chunk in zip(self._arrays, packed.entries):
                flat = torch.from_numpy(arr)
                for ref, name, off, n, dtype, shape in chunk:
                    self.tensors[ref][name] = flat[off:off + n].view(getattr(torch, dtype)).reshape(shape)
                    self.nbytes += n

    def close(self) -> None:
        super().close()
        self._arrays = []


def mapping_stats(pointers: list[int]) -> dict[str, Any]:
    """Linux smaps totals (bytes) of the memory mappings that hold ``pointers``, and their files."""
    wanted = sorted(set(pointers))
    stats = {"files": [], "rss": 0, "private": 0, "shared": 0}
    try:
        lines = open("/proc/self/smaps", encoding="utf-8").read().splitlines()
    except OSError:
        return stats
    hit = False
    for line in lines:
        head = line.split(None, 5)
        if head and "-" in head[0] and len(head) >= 5 and not head[0].endswith(":"):
            lo, hi = (int(x, 16) for x in head[0].split("-"))
            hit = any(lo <= p < hi for p in wanted)
            if hit:
                stats["files"].append(f"{head[3]}:{head[4]} {head[5].strip() if len(head) > 5 else ''}".strip())
            continue
        if not hit:
            continue
        key, _, value = line.partition(":")
        if key in ("Rss", "Private_Clean", "Private_Dirty", "Shared_Clean", "Shared_Dirty"):
            kib = int(value.split()[0]) * 1024
            if key == "Rss":
                stats["rss"] += kib
            elif key.startswith("Private"):
                stats["private"] += kib
            else:
                stats["shared"] += kib
    return stats


# ---------------------------------------------------------------------------------------------
# The actor


class WorkerActor:
    """The body of one Ray actor: a ``Worker`` plus the mailboxes of its progress reports."""

    def __init__(self) -> None:
        self.worker: Optional[Worker] = None
        self.outbox: queue.Queue[Progress] = queue.Queue()
        self.replies: dict[str, queue.Queue[bool]] = {}
        self.closing = threading.Event()

    def setup(self, setup: WorkerSetup, label: str, packed: Optional[PackedSources]) -> dict[str, Any]:
        import ray

        start = time.perf_counter()
        name = f"{label}@{socket.gethostname()}:{os.getpid()}"
        if setup.device.startswith("cuda"):
            setup = replace(setup, device="cuda")
        sources = SharedSources(setup.sources, packed) if packed is not None else None
        self.worker = Worker(setup, name, sources=sources)
        seconds = time.perf_counter() - start
        if packed is not None:
            line = (f"{name}: sources {packed.nbytes / GIB:.3f} GiB shared via object store, engine "
                    f"{self.worker.engine_bytes / GIB:.3f} GiB, set up in {seconds:.1f}s")
        else:
            line = self.worker.memory_summary()
        return {"name": name, "pid": os.getpid(), "node": ray.get_runtime_context().get_node_id(), "line": line}

    def _ready(self) -> Worker:
        if self.worker is None:
            raise RayExecutorError("This worker actor was not set up; call setup() first.")
        return self.worker

    def run(self, job: Job) -> tuple[str, Any]:
        """``("done", JobResult)`` or ``("failed", message)`` of a candidate's own error."""
        worker = self._ready()
        self.replies[job.key] = queue.Queue(maxsize=1)
        try:
            return "done", worker.run(job, self._report)
        except Exception as err:  # noqa: BLE001 - a failed candidate must not take the actor down
            return "failed", candidate_error(err, self.worker.name)
        finally:
            self.replies.pop(job.key, None)

    def _report(self, progress: Progress) -> bool:
        box = self.replies.get(progress.key)
        if box is None:
            return True
        self.outbox.put(progress)
        return await_reply(box, self.closing)

    def drain(self, wait: float) -> list[Progress]:
        """The heartbeat: progress reports queued so far, waiting up to ``wait`` s for the first."""
        return drain_queue(self.outbox, wait)

    def current(self) -> list[str]:
        """Keys of the jobs inside ``run`` right now."""
        return list(self.replies)

    def reply(self, key: str, stop: bool) -> None:
        box = self.replies.get(key)
        if box is not None:
            try:
                box.put_nowait(stop)
            except queue.Full:
                pass

    def memory(self, touch: bool = False) -> dict[str, Any]:
        """Where the source tensors live (smaps of their mappings), after reading them all if ``touch``."""
        import psutil

        tensors = [t for ts in self._ready().sources.tensors.values() for t in ts.values()]
        if touch:
            for t in tensors:
                if t.numel():
                    t.reshape(-1)[:: max(1, 4096 // t.element_size())].sum()
        stats = mapping_stats([t.data_ptr() for t in tensors if t.numel()])
        info = psutil.Process().memory_full_info()
        return {**stats, "pid": os.getpid(), "sources": self.worker.sources.nbytes, "process_rss": info.rss,
                "process_uss": info.uss}

    def close(self) -> None:
        self.closing.set()
        if self.worker is not None:
            self.worker.close()
            self.worker = None


# ---------------------------------------------------------------------------------------------
# The executor


@dataclass
class _Slot:
    index: int
    actor: Any = None
    label: str = ""
    name: str = ""
    pid: int = 0
    node: str = ""
    state: str = "starting"  # starting | idle | busy | retired
    setup_ref: Any = None
    since: float = 0.0
    job: Optional[Job] = None
    run_ref: Any = None
    beat_ref: Any = None
    beat_sent: float = 0.0
    restarts: int = 0
    error: str = ""


def _cause(err: BaseException) -> str:
    """A one-line reason from a Ray error (its first line and the worker's exit detail)."""
    text = str(err).strip()
    first = text.splitlines()[0].strip().rstrip(".") if text else type(err).__name__
    m = re.search(r"Worker exit detail: (.*?\.)(?: |$)", text)
    return f"{first}: {m.group(1)}" if m else first


class RayExecutor:
    """Workers as Ray actors; see the module docstring for sources, heartbeats and restarts."""

    def __init__(self, setup: WorkerSetup, workers: int = 1, address: Optional[str] = None,
                 trial_timeout: Optional[float] = None, heartbeat_timeout: float = 60.0,
                 start_timeout: float = 1800.0):
        self.setup = setup
        self.n = workers
        self.address = address
        self.trial_timeout = trial_timeout
        self.heartbeat_timeout = heartbeat_timeout
        self.start_timeout = start_timeout
        self.gpu = setup.device.startswith("cuda")
        self.slots: list[_Slot] = []
        self.pending: list[Job] = []
        self.packed: Optional[PackedSources] = None
        self._owns_ray = False
        self._cls: Any = None

    # -- start / close ------------------------------------------------------------------------

    def start(self) -> list[str]:
        import ray

        if self.n < 1:
            raise RayExecutorError(f"executor.workers must be at least 1, got {self.n}.")
        try:
            shared = self.setup.device == "cpu"
            need = sources_nbytes(self.setup.sources) if shared else 0
            self._connect(need)
            self._check_resources(need)
            if shared:
                self.packed = publish_sources(self.setup.sources)
            self._cls = ray.remote(WorkerActor)
            self.slots = [_Slot(i) for i in range(self.n)]
            for slot in self.slots:
                self._launch(slot)
            self._wait_started()
        except BaseException:
            self.close()
            raise
        return [self._lines.pop(s.index) for s in self.slots]

    def _connect(self, need: int) -> None:
        import ray

        if ray.is_initialized():
            return
        quiet = {"logging_level": logging.ERROR, "log_to_driver": False}
        if self.address:
            fix = ("Start it with `ray start --head` on its head node (and `ray start --address HEAD:6379` on "
                   "the others), or drop executor.address to start a local cluster.")
            m = re.fullmatch(r"([\w.-]+):(\d+)", self.address)
            if m:
                try:
                    socket.create_connection((m.group(1), int(m.group(2))), timeout=10).close()
                except OSError as err:
                    raise RayExecutorError(
                        f"Cannot reach the Ray cluster at executor.address {self.address!r}: {err}. {fix}"
                    ) from None
            try:
                ray.init(address=self.address, **quiet)
            except (ConnectionError, RuntimeError, ValueError) as err:
                raise RayExecutorError(
                    f"Cannot join the Ray cluster at executor.address {self.address!r}: {err} {fix}"
                ) from None
        else:
            kwargs: dict[str, Any] = {}
            store = self._store_size(need)
            if store:
                kwargs["object_store_memory"] = store
            ray.init(address="local", include_dashboard=False, **kwargs, **quiet)
        self._owns_ray = True

    @staticmethod
    def _store_size(need: int) -> Optional[int]:
        """An object store size for a local cluster when Ray's default (30% of RAM) is too small."""
        import shutil

        import psutil

        if not need:
            return None
        want = int(need * 1.25) + 256 * 1024**2
        if want <= 0.3 * psutil.virtual_memory().total:
            return None
        shm = shutil.disk_usage("/dev/shm").free if os.path.isdir("/dev/shm") else psutil.virtual_memory().available
        if want > shm:
            raise RayExecutorError(
                f"The sources take {need / GIB:.2f} GiB, but only {shm / GIB:.2f} GiB of shared memory "
                "(/dev/shm) is free for Ray's object store on this machine; free or enlarge /dev/shm, or use "
                "executor: {kind: local}."
            )
        return want

    def _check_resources(self, need: int) -> None:
        import ray

        total = ray.cluster_resources()
        where = f"the Ray cluster at {self.address}" if self.address else "the local Ray cluster"
        unit = "GPU" if self.gpu else "CPU"
        have = total.get(unit, 0)
        if have < self.n:
            fix = (f"lower executor.workers to {int(have)}" if have >= 1 else
                   ("set engine.device: cpu for CPU workers" if self.gpu else "add CPUs"))
            each = f"one {unit} each" + (f" as engine.device is {self.setup.device}" if self.gpu else "")
            raise RayExecutorError(
                f"executor.workers is {self.n} ({each}) but {where} has {have:g} {unit}s; {fix}, or join a "
                "larger cluster with executor.address."
            )
        if need:
            stores = [n["Resources"].get("object_store_memory", 0) for n in ray.nodes() if n.get("Alive")]
            largest = max(stores, default=0)
            if need > largest:
                raise RayExecutorError(
                    f"The sources take {need / GIB:.2f} GiB but the largest Ray object store of {where} holds "
                    f"{largest / GIB:.2f} GiB; start Ray with a larger --object-store-memory, or use "
                    "executor: {kind: local}."
                )

    def _launch(self, slot: _Slot) -> None:
        opts = {"num_gpus": 1, "num_cpus": 1} if self.gpu else {"num_cpus": 1}
        slot.label = f"ray-{slot.index}" + (f".{slot.restarts}" if slot.restarts else "")
        slot.actor = self._cls.options(max_concurrency=ACTOR_THREADS, max_restarts=0, max_task_retries=0,
                                       **opts).remote()
        slot.setup_ref = slot.actor.setup.remote(self.setup, slot.label, self.packed)
        slot.state = "starting"
        slot.since = time.monotonic()
        slot.job = slot.run_ref = slot.beat_ref = None
        slot.name = slot.label

    def _wait_started(self) -> None:
        import ray

        self._lines: dict[int, str] = {}
        deadline = time.monotonic() + self.start_timeout
        while any(s.state == "starting" for s in self.slots):
            refs = [s.setup_ref for s in self.slots if s.state == "starting"]
            ready, _ = ray.wait(refs, num_returns=len(refs), timeout=min(5.0, max(0.0, deadline - time.monotonic())))
            for slot in self.slots:
                if slot.state == "starting" and slot.setup_ref in ready:
                    line = self._on_setup(slot)
                    if line is None:
                        raise RayExecutorError(f"Ray worker {slot.label} could not start: {slot.error}")
                    self._lines[slot.index] = line
            if time.monotonic() > deadline and any(s.state == "starting" for s in self.slots):
                waiting = sum(s.state == "starting" for s in self.slots)
                raise RayExecutorError(
                    f"{waiting} of {self.n} Ray workers did not start within {self.start_timeout:.0f}s; the cluster "
                    f"has {ray.available_resources().get('GPU' if self.gpu else 'CPU', 0):g} "
                    f"{'GPU' if self.gpu else 'CPU'}s free. Lower executor.workers or free the cluster."
                )

    def _on_setup(self, slot: _Slot) -> Optional[str]:
        """Finish a slot's start: its startup line, or None (``slot.error`` says why) if it failed."""
        import ray
        from ray.exceptions import RayError, RayTaskError

        try:
            info = ray.get(slot.setup_ref)
        except RayTaskError as err:
            cause = err.cause if isinstance(getattr(err, "cause", None), BaseException) else err
            slot.error = str(cause) if isinstance(cause, MergeSearchError) else _cause(err)
            self._retire(slot)
            return None
        except RayError as err:
            slot.error = _cause(err)
            self._retire(slot)
            return None
        slot.setup_ref = None
        slot.name, slot.pid, slot.node = info["name"], info["pid"], info["node"]
        slot.state = "idle"
        self._beat(slot)
        return info["line"]

    def _retire(self, slot: _Slot) -> None:
        import ray

        slot.state = "retired"
        if slot.actor is not None:
            ray.kill(slot.actor, no_restart=True)
        slot.actor = slot.setup_ref = slot.run_ref = slot.beat_ref = None

    def close(self) -> None:
        import ray

        for slot in self.slots:
            if slot.actor is not None:
                try:
                    ray.kill(slot.actor, no_restart=True)
                except Exception:  # noqa: BLE001 - closing must not fail on an actor already gone
                    pass
                slot.actor = None
            slot.state = "retired"
        self.slots = []
        self.pending = []
        self.packed = None
        if self._owns_ray and ray.is_initialized():
            ray.shutdown()
        self._owns_ray = False

    # -- the protocol -------------------------------------------------------------------------

    def idle(self) -> int:
        return sum(s.state == "idle" for s in self.slots) - len(self.pending)

    def running(self) -> list[str]:
        return [s.job.key for s in self.slots if s.job is not None] + [j.key for j in self.pending]

    def capacity(self) -> int:
        return sum(s.state != "retired" for s in self.slots)

    def busy(self) -> dict[str, tuple[str, int]]:
        """Running job key -> (worker name, actor pid), for monitoring and tests."""
        return {s.job.key: (s.name, s.pid) for s in self.slots if s.job is not None}

    def submit(self, job: Job) -> None:
        self.pending.append(job)
        self._dispatch()

    def reply(self, key: str, stop: bool) -> None:
        for slot in self.slots:
            if slot.job is not None and slot.job.key == key and slot.actor is not None:
                slot.actor.reply.remote(key, stop)

    def poll(self, timeout: float) -> list[Event]:
        import ray

        deadline = time.monotonic() + timeout
        events: list[Event] = []
        while True:
            self._dispatch()
            watched = self._watched()
            left = max(0.0, deadline - time.monotonic())
            wait = min(left, 0.25)
            if watched:
                ready, _ = ray.wait(list(watched), num_returns=1, timeout=wait)
                if ready:
                    ready, _ = ray.wait(list(watched), num_returns=len(watched), timeout=0)
                for ref in sorted(ready, key=lambda r: ("run", "setup", "beat").index(watched[r][1])):
                    slot, what = watched[ref]
                    events.extend(self._on_ready(slot, what, ref))
            elif wait:
                time.sleep(wait)
            events.extend(self._check_clocks())
            if not any(s.state != "retired" for s in self.slots):
                raise RayExecutorError(f"Every Ray worker failed and could not be restarted; the last: "
                                       f"{self.slots[-1].error if self.slots else 'none started'}")
            if events or time.monotonic() >= deadline:
                self._dispatch()
                return events

    # -- inside poll --------------------------------------------------------------------------

    def _watched(self) -> dict[Any, tuple[_Slot, str]]:
        out: dict[Any, tuple[_Slot, str]] = {}
        for slot in self.slots:
            for what in ("setup", "run", "beat"):
                ref = getattr(slot, f"{what}_ref")
                if ref is not None:
                    out[ref] = (slot, what)
        return out

    def _dispatch(self) -> None:
        for slot in self.slots:
            if not self.pending:
                return
            if slot.state == "idle":
                job = self.pending.pop(0)
                slot.job = job
                slot.run_ref = slot.actor.run.remote(job)
                slot.state = "busy"
                slot.since = time.monotonic()

    def _beat(self, slot: _Slot) -> None:
        slot.beat_ref = slot.actor.drain.remote(BEAT_WAIT_S)
        slot.beat_sent = time.monotonic()

    def _on_ready(self, slot: _Slot, what: str, ref: Any) -> list[Event]:
        import ray
        from ray.exceptions import RayError, RayTaskError

        if getattr(slot, f"{what}_ref") is not ref:
            return []
        if what == "setup":
            self._on_setup(slot)
            return []
        if what == "beat":
            try:
                reports = ray.get(ref)
            except RayError as err:
                return self._lost(slot, f"died ({_cause(err)})")
            self._beat(slot)
            key = slot.job.key if slot.job is not None else None
            return [Event("progress", p.key, progress=p, worker=slot.name) for p in reports if p.key == key]
        job = slot.job
        if job is None:
            return []
        try:
            status, payload = ray.get(ref)
        except RayTaskError as err:
            event = Event("failed", job.key, error=f"{_cause(err)} (in {slot.name})", worker=slot.name)
        except RayError as err:
            return self._lost(slot, f"died ({_cause(err)})")
        else:
            if status == "done":
                event = Event("done", job.key, result=payload, worker=slot.name)
            else:
                event = Event("failed", job.key, error=payload, worker=slot.name)
        slot.job = slot.run_ref = None
        slot.state = "idle"
        return [event]

    def _check_clocks(self) -> list[Event]:
        now = time.monotonic()
        events: list[Event] = []
        for slot in self.slots:
            if slot.state == "busy" and self.trial_timeout and now - slot.since > self.trial_timeout:
                events.extend(self._lost(slot, f"ran past executor.trial_timeout ({self.trial_timeout:g}s)"))
            elif slot.state in ("idle", "busy") and now - slot.beat_sent > BEAT_WAIT_S + self.heartbeat_timeout:
                events.extend(self._lost(slot, f"did not answer heartbeats for {self.heartbeat_timeout:g}s (hung)"))
            elif slot.state == "starting" and now - slot.since > self.start_timeout:
                slot.error = f"{slot.label} did not start within {self.start_timeout:g}s"
                self._retire(slot)
        return events

    def _lost(self, slot: _Slot, why: str) -> list[Event]:
        """Kill a dead or hung actor, start a fresh one in its place, and fail its job (infra)."""
        import ray

        old = slot.name
        job = slot.job
        if slot.actor is not None:
            ray.kill(slot.actor, no_restart=True)
        slot.restarts += 1
        slot.error = f"{old} {why}"
        self._launch(slot)
        if job is None:
            return []
        return [Event("failed", job.key, infra=True, worker=old,
                      error=f"Ray worker {old} {why} while running {job.key}; the worker was restarted as "
                            f"{slot.label}.")]
