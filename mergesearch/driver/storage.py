"""Optuna storage for studies: opening URLs with clear errors, heartbeats, recovering from a dead driver.

SQLite (the default, a file in the study's output dir) or PostgreSQL (``postgresql://``, for
studies shared by many machines), both through Optuna's ``RDBStorage`` with its heartbeats on.
Each trial names the driver that runs it in its ``driver`` user attr, and that driver records
Optuna heartbeats for it (:class:`Heartbeat`). When a study is opened again,
:func:`recover_interrupted` fails the trials whose driver is gone and queues their parameters once
more; a driver that is still alive makes it refuse instead. See docs/storage.md.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
import socket
import threading
import warnings
from pathlib import Path
from typing import Any, Self

import optuna
from optuna.trial import FrozenTrial, TrialState

from mergesearch.errors import ConfigError, MergeSearchError, StorageError

__all__ = [
    "HEARTBEAT_INTERVAL",
    "MAX_RETRIES",
    "Heartbeat",
    "requeue",
    "StorageError",
    "StudyBusyError",
    "StudyMismatchError",
    "check_study_identity",
    "default_storage_url",
    "driver_identity",
    "mask_url",
    "open_storage",
    "recover_interrupted",
]

HEARTBEAT_INTERVAL = 10
"""Seconds between two heartbeats of a running trial."""
GRACE_FACTOR = 3
"""Without an explicit grace period, a heartbeat older than this many intervals is stale."""
MAX_RETRIES = 2
"""How many times a trial interrupted again and again is queued once more (then left FAIL)."""
SQLITE_TIMEOUT_S = 60
INTERRUPTED_ATTR = "mergesearch:interrupted"
_SQLITE_MAGIC = b"SQLite format 3\x00"
_OPTUNA_TABLES = {"studies", "trials", "alembic_version", "version_info"}
_HEARTBEAT_WARNING = "Heartbeat of storage is supposed to be used with Study.optimize"
_INSTALL_HINT = 'pip install -c constraints.txt -e ".[postgres]"'
_log = logging.getLogger("mergesearch.storage")


class StudyBusyError(MergeSearchError):
    """Another driver that is still alive runs trials of this study."""


class StudyMismatchError(ConfigError):
    """The stored study was made from another study file (other sources, space, tasks...)."""


def default_storage_url(output_dir: Path) -> str:
    """``sqlite:///<absolute output_dir>/study.db``."""
    return f"sqlite:///{Path(output_dir).absolute() / 'study.db'}"


def mask_url(url: str) -> str:
    """The URL with its password replaced by ``***`` (also for URLs SQLAlchemy cannot parse)."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - an unparsable URL is shown without what may be a password
        scheme, sep, rest = url.partition("://")
        userinfo, at, host = rest.rpartition("@")
        if not (sep and at):
            return url
        user = userinfo.split(":", 1)[0]
        return f"{scheme}://{user}{':***' if ':' in userinfo else ''}@{host}"


# -- opening ----------------------------------------------------------------------------------


def open_storage(url: str, *, heartbeat_interval: int | None = HEARTBEAT_INTERVAL,
                 grace_period: int | None = None, read_only: bool = False) -> optuna.storages.RDBStorage:
    """Optuna's ``RDBStorage`` for ``url`` with heartbeats on, or a StorageError that names the fix.

    ``grace_period`` (seconds after the last heartbeat before another machine may take a trial
    over) defaults to ``3 * heartbeat_interval``; ``heartbeat_interval=None`` turns heartbeats
    off. ``read_only`` skips the check that a SQLite location is writable (for readers such as
    ``mergesearch status``).
    """
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError, TypeError):
        hint = (f" For a SQLite file write sqlite:///{Path(url).absolute()}." if "://" not in str(url) else "")
        raise StorageError(
            f"Storage URL {mask_url(str(url))!r} is not a database URL.{hint} Use sqlite:///path/to/study.db "
            "(one machine) or postgresql://user:password@host:5432/dbname (many machines)."
        ) from None
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        engine_kwargs = _sqlite_engine_kwargs(parsed, url, read_only)
    elif backend == "postgresql":
        engine_kwargs = _postgres_engine_kwargs(parsed)
    else:
        fix = " (write postgresql://, not postgres://)" if backend == "postgres" else ""
        raise StorageError(
            f"Storage URL scheme {parsed.drivername!r} in {mask_url(url)!r} is not supported{fix}. Use "
            "sqlite:///path/to/study.db (the default, one machine) or "
            "postgresql://user:password@host:5432/dbname (many machines)."
        )
    try:
        parsed.get_dialect().import_dbapi()
    except NoSuchModuleError:
        raise StorageError(
            f"Storage URL {mask_url(url)!r} names a database driver SQLAlchemy does not know "
            f"({parsed.drivername!r}); use postgresql:// (psycopg) or postgresql+psycopg2://."
        ) from None
    except ImportError as err:
        module = err.name or parsed.get_driver_name()
        install = _INSTALL_HINT if module.startswith("psycopg") else f"pip install {module}"
        raise StorageError(
            f"Storage URL {mask_url(url)!r} needs the Python module {module!r}, which is not installed: "
            f"{install}."
        ) from None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        try:
            storage = optuna.storages.RDBStorage(
                url, engine_kwargs=engine_kwargs, heartbeat_interval=heartbeat_interval,
                grace_period=(grace_period or GRACE_FACTOR * heartbeat_interval) if heartbeat_interval else None,
                heartbeat_stale_trial_callback=_requeue_stale)
        except Exception as err:  # noqa: BLE001 - any failure to open becomes one message with a fix
            raise _open_error(url, parsed, err) from None
    # The driver uses heartbeats with ask/tell on purpose (one process runs many trials at once).
    warnings.filterwarnings("ignore", message=_HEARTBEAT_WARNING)
    return storage


def _sqlite_engine_kwargs(parsed: Any, url: str, read_only: bool) -> dict[str, Any]:
    database = parsed.database
    if not database or database == ":memory:" or parsed.query.get("mode") == "memory":
        raise StorageError(
            f"Storage URL {url!r} names no SQLite file, so nothing would persist; use sqlite:///path/to/study.db."
        )
    path = Path(database).absolute()
    if path.is_dir():
        raise StorageError(f"SQLite storage {str(path)!r} is a folder; name a file, e.g. sqlite:///{path}/study.db.")
    if not read_only:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            blocker = next((p for p in (path.parent, *path.parent.parents) if p.exists()), None)
            why = (f"{str(blocker)!r} is a file, not a folder" if blocker is not None and not blocker.is_dir()
                   else err.strerror or str(err))
            raise StorageError(
                f"Cannot create the folder {str(path.parent)!r} for SQLite storage {str(path)!r}: {why}. "
                "Choose another output_dir (or storage URL)."
            ) from None
    if path.is_file() and path.stat().st_size > 0:
        _check_sqlite_file(path)
    if not read_only:
        target = path if path.exists() else path.parent
        if not os.access(target, os.W_OK) or not os.access(path.parent, os.W_OK):
            raise StorageError(
                f"SQLite storage {str(path)!r} is read-only here (SQLite must write the file and its journal "
                "beside it). Choose a writable output_dir (or storage URL), or copy the study.db somewhere writable."
            )
    return {"connect_args": {"timeout": SQLITE_TIMEOUT_S}}


def _check_sqlite_file(path: Path) -> None:
    import sqlite3

    try:
        with open(path, "rb") as f:
            magic = f.read(len(_SQLITE_MAGIC))
    except OSError as err:
        raise StorageError(f"Cannot read SQLite storage {str(path)!r}: {err.strerror or err}.") from None
    if magic != _SQLITE_MAGIC:
        raise StorageError(
            f"{str(path)!r} exists but is not an SQLite database, so it cannot hold a study. Move the file "
            "away, or point `storage:` (or `output_dir:`) somewhere else."
        )
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=SQLITE_TIMEOUT_S) as conn:
            tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        conn.close()
    except sqlite3.Error as err:
        raise StorageError(f"SQLite storage {str(path)!r} cannot be read: {err}. Move it away or choose "
                           "another storage.") from None
    if tables and not tables & _OPTUNA_TABLES:
        raise StorageError(
            f"{str(path)!r} is an SQLite database of something else (tables: {', '.join(sorted(tables)[:6])}), "
            "not an Optuna study storage; point `storage:` (or `output_dir:`) somewhere else."
        )


def _postgres_engine_kwargs(parsed: Any) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"pool_pre_ping": True, "pool_recycle": 3600}
    if parsed.get_driver_name() in ("psycopg", "psycopg2"):
        connect = {"connect_timeout": 10, "application_name": "mergesearch"}
        kwargs["connect_args"] = {k: v for k, v in connect.items() if k not in parsed.query}
    return kwargs


def _open_error(url: str, parsed: Any, err: BaseException) -> StorageError:
    cause = getattr(err, "orig", None) or err.__cause__ or err
    text = " ".join(str(cause).split()) or type(cause).__name__
    if parsed.password:
        text = text.replace(str(parsed.password), "***")
    text = text[:400].rstrip(" .")
    if parsed.get_backend_name() == "sqlite":
        path = Path(parsed.database).absolute()
        if "not a database" in text or "malformed" in text:
            fix = "Move the file away, or point `storage:` (or `output_dir:`) somewhere else."
        elif "readonly" in text or "read-only" in text or "unable to open" in text:
            fix = "Choose a writable output_dir (or storage URL)."
        elif "optuna storage upgrade" in text or "compatible" in text:
            fix = f"Upgrade the stored schema: optuna storage upgrade --storage {mask_url(url)}"
        else:
            fix = "Check the file, or choose another storage."
        return StorageError(f"Cannot open SQLite storage {str(path)!r}: {_sentence(text)} {fix}")
    host, port, db, user = parsed.host or "localhost", parsed.port or 5432, parsed.database, parsed.username
    where = f"PostgreSQL at host {host}, port {port}, database {db!r}" + (f", user {user!r}" if user else "")
    low = text.lower()
    if f'database "{db}" does not exist' in low:
        fix = (f"Create the database first: createdb -h {host} -p {port}{f' -U {user}' if user else ''} {db} "
               f"(or CREATE DATABASE {db}; in psql), or fix its name in the URL.")
    elif "password" in low or "authentication" in low or ("role" in low and "does not exist" in low):
        fix = ("Check the user name and password in the URL (postgresql://USER:PASSWORD@HOST:PORT/DB) and that "
               "the server's pg_hba.conf lets this user in from this machine.")
    elif "permission denied" in low:
        fix = (f"Let the user create tables: make it the database owner (ALTER DATABASE {db} OWNER TO {user}) "
               f"or GRANT CREATE ON SCHEMA public TO {user}.")
    elif any(s in low for s in ("refused", "timeout", "timed out", "could not translate", "resolve",
                                "no route", "unreachable", "could not connect", "connection failed")):
        fix = (f"Check that the server is running and reachable from this machine (pg_isready -h {host} -p {port}), "
               "that its listen_addresses and firewall let this machine in, and the host and port in the URL.")
    elif "optuna storage upgrade" in low or "compatible" in low:
        fix = f"Upgrade the stored schema: optuna storage upgrade --storage {mask_url(url)}"
    else:
        fix = "Check the URL, the server and the database."
    return StorageError(f"Cannot open storage {mask_url(url)} ({where}): {_sentence(text)} {fix}")


def _sentence(text: str) -> str:
    return text if text.endswith(("?", "!")) else text + "."


# -- who runs a trial -------------------------------------------------------------------------


def _proc_stat(pid: int) -> list[str] | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _start_time(pid: int) -> str | None:
    """The process's start time (clock ticks since boot), which tells a reused pid apart."""
    fields = _proc_stat(pid)
    return fields[19] if fields and len(fields) > 19 else None


def _machine() -> str:
    """Kernel boot and pid namespace: pids are comparable only between processes that share them."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        ns = os.readlink("/proc/self/ns/pid")
    except OSError:
        return "-"
    return hashlib.sha1(f"{boot}/{ns}".encode()).hexdigest()[:8]


_identity: tuple[int, str] = (-1, "")


def driver_identity() -> str:
    """``host:pid:machine-start`` of this process, stored in each trial's ``driver`` user attr."""
    global _identity
    pid = os.getpid()
    if _identity[0] != pid:
        _identity = (pid, f"{socket.gethostname()}:{pid}:{_machine()}-{_start_time(pid) or '-'}")
    return _identity[1]


def _parse_identity(identity: str) -> tuple[str, int, str | None, str | None] | None:
    parts = identity.split(":")
    if len(parts) not in (2, 3) or not parts[1].isdigit():
        return None
    machine = start = None
    if len(parts) == 3:
        machine, _, start = parts[2].partition("-")
    return parts[0], int(parts[1]), machine, start


def _pid_alive(pid: int) -> bool:
    """Alive and not a zombie (from /proc when it can be read, else by signal 0)."""
    from mergesearch.io.writer import _pid_alive as signal_alive

    fields = _proc_stat(pid)
    if fields is not None:
        return fields[0] not in ("Z", "X")
    return signal_alive(pid)


# Trials this process's Heartbeats hold: (storage key, trial id).
_held: set[tuple[str, int]] = set()
_held_lock = threading.Lock()


def _storage_key(storage: Any) -> str:
    backend = getattr(storage, "_backend", storage)
    return str(getattr(backend, "url", None) or id(backend))


def _local_owner_alive(storage: Any, trial: FrozenTrial, identity: str) -> bool | None:
    """Whether the driver named by ``identity`` still runs; None when it is not on this machine."""
    parsed = _parse_identity(identity)
    if parsed is None:
        return None
    host, pid, machine, start = parsed
    if host != socket.gethostname():
        return None
    if machine not in (None, "-") and machine != _machine():
        return None
    known_start = start not in (None, "-")
    if pid == os.getpid() and (not known_start or start == _start_time(pid)):
        with _held_lock:
            return (_storage_key(storage), trial._trial_id) in _held
    if not _pid_alive(pid):
        return False
    return not known_start or _start_time(pid) in (None, start)


# -- heartbeats -------------------------------------------------------------------------------


class Heartbeat:
    """Records Optuna heartbeats for the trials this driver runs, from a daemon thread.

    Use as a context manager around the ask/tell loop; ``add`` a trial when it starts (its first
    heartbeat is recorded at once) and ``discard`` it once told. Without heartbeats on the storage
    it only remembers which trials this process holds.
    """

    def __init__(self, storage: Any, interval: float | None = None):
        from optuna.storages._heartbeat import is_heartbeat_enabled

        self.storage = storage
        self.enabled = is_heartbeat_enabled(storage)
        self.interval = interval or (storage.get_heartbeat_interval() if self.enabled else None)
        self._key = _storage_key(storage)
        self._ids: set[int] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._failing = False

    @property
    def trial_ids(self) -> frozenset[int]:
        with self._lock:
            return frozenset(self._ids)

    def add(self, trial_id: int) -> None:
        with self._lock:
            self._ids.add(trial_id)
        with _held_lock:
            _held.add((self._key, trial_id))
        self._beat([trial_id])

    def discard(self, trial_id: int) -> None:
        with self._lock:
            self._ids.discard(trial_id)
        with _held_lock:
            _held.discard((self._key, trial_id))

    def _beat(self, ids: list[int]) -> None:
        if not self.enabled:
            return
        for trial_id in ids:
            try:
                self.storage.record_heartbeat(trial_id)
                self._failing = False
            except Exception as err:  # noqa: BLE001 - a missed beat is retried next interval
                if not self._failing:
                    _log.warning("could not record the heartbeat of trial id %s (retrying): %s", trial_id, err)
                self._failing = True

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            with self._lock:
                ids = sorted(self._ids)
            self._beat(ids)

    def __enter__(self) -> Self:
        self._stop.clear()
        if self.enabled and self._thread is None:
            self._thread = threading.Thread(target=self._run, name="mergesearch-heartbeat", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None
        with self._lock:
            ids, self._ids = self._ids, set()
        with _held_lock:
            _held.difference_update((self._key, i) for i in ids)


# -- recovery ---------------------------------------------------------------------------------


def _grace(storage: Any) -> float | None:
    backend = getattr(storage, "_backend", storage)
    interval = getattr(backend, "heartbeat_interval", None)
    if interval is None:
        return None
    return float(getattr(backend, "grace_period", None) or 2 * interval)


def _heartbeat_ages(storage: Any, trial_ids: list[int]) -> dict[int, float]:
    """Seconds since each trial's last heartbeat, by the database's clock (trials without one absent)."""
    backend = getattr(storage, "_backend", storage)
    if not trial_ids or not isinstance(backend, optuna.storages.RDBStorage):
        return {}
    try:
        import sqlalchemy
        from optuna.storages._rdb import models

        session = backend.scoped_session()
        try:
            now = session.execute(sqlalchemy.func.now()).scalar().replace(tzinfo=None)
            rows = (session.query(models.TrialHeartbeatModel)
                    .filter(models.TrialHeartbeatModel.trial_id.in_(trial_ids)).all())
            ages = {r.trial_id: (now - r.heartbeat.replace(tzinfo=None)).total_seconds() for r in rows}
            session.commit()
        finally:
            session.close()
    except Exception:  # noqa: BLE001 - Optuna internals moved: judge by stale ids alone
        return {}
    return ages


def _owner_text(identity: str | None) -> str:
    parsed = _parse_identity(identity or "")
    if parsed is None:
        return f"driver {identity!r}" if identity else "an unknown process (no driver recorded)"
    return f"pid {parsed[1]} on {parsed[0]}"


def _busy_reason(study: optuna.Study, trial: FrozenTrial, stale: set[int], ages: dict[int, float],
                 grace: float | None) -> str | None:
    """Why ``trial`` is still in the hands of a live driver, or None when its driver is gone."""
    owner = trial.user_attrs.get("driver")
    head = f"Study {study.study_name!r} is being run by another driver: its trial {trial.number}"
    alive = _local_owner_alive(study._storage, trial, owner) if owner else None
    if alive is False:
        return None
    parsed = _parse_identity(owner or "")
    if alive:
        who = "this very process" if parsed and parsed[1] == os.getpid() else f"process {parsed[1]} on this machine"
        stop = "" if parsed and parsed[1] == os.getpid() else f" (Ctrl-C in its terminal, or kill {parsed[1]})"
        return (f"{head} is running in {who}. Only one driver may run a study at a time: wait for it to finish, "
                f"or stop it{stop} and run again to resume.")
    if grace is None:
        return (f"{head} is running in {_owner_text(owner)}, and this storage records no heartbeats, so "
                "whether that driver is alive cannot be told. Wait for it to finish, or stop it first.")
    if trial._trial_id in stale:
        return None
    age = ages.get(trial._trial_id)
    if age is None:
        started = trial.datetime_start or datetime.datetime.now()
        age = (datetime.datetime.now() - started).total_seconds()
        if age > grace:
            return None
        seen = f"started {age:.0f} s ago and has no heartbeat yet"
    else:
        seen = f"last heartbeat {age:.0f} s ago"
    return (f"{head} is running in {_owner_text(owner)} ({seen}). Only one driver may run a study at a time: "
            f"wait for it to finish, or stop it; its trials are taken over {grace:.0f} s after its last heartbeat.")


def _chain_depth(trial: FrozenTrial, by_number: dict[int, FrozenTrial]) -> int:
    depth, seen = 0, set()
    while isinstance(trial.user_attrs.get("retry_of"), int) and trial.number not in seen:
        seen.add(trial.number)
        parent = by_number.get(trial.user_attrs["retry_of"])
        if parent is None:
            return depth + 1
        trial, depth = parent, depth + 1
    return depth


def _requeue(study: optuna.Study, trial: FrozenTrial, trials: list[FrozenTrial]) -> bool:
    """Queue ``trial``'s parameters once more (once per trial, at most MAX_RETRIES in a chain)."""
    if any(t.user_attrs.get("retry_of") == trial.number for t in trials):
        return False
    if _chain_depth(trial, {t.number: t for t in trials}) >= MAX_RETRIES:
        return False
    params = {**trial.system_attrs.get("fixed_params", {}), **trial.params}
    attrs = {k: trial.user_attrs[k] for k in ("kind", "label", "plan") if k in trial.user_attrs}
    study.enqueue_trial(params, user_attrs={**attrs, "retry_of": trial.number}, skip_if_exists=False)
    return True


def requeue(study: optuna.Study, trial: FrozenTrial) -> bool:
    """Queue a failed trial's parameters once more (once per trial, at most MAX_RETRIES in a chain)."""
    return _requeue(study, trial, study.get_trials(deepcopy=False))


def _requeue_stale(study: optuna.Study, trial: FrozenTrial) -> None:
    """Optuna's heartbeat-stale callback (when Optuna's own ``fail_stale_trials`` fails a trial)."""
    requeue(study, trial)


def _fail(storage: Any, trial: FrozenTrial, last: bool) -> bool:
    owner = trial.user_attrs.get("driver")
    reason = f"interrupted: its driver ({_owner_text(owner)}) stopped while this trial ran"
    if last:
        reason += f"; not queued again (interrupted {MAX_RETRIES + 1} times in a row)"
    try:
        storage.set_trial_system_attr(trial._trial_id, INTERRUPTED_ATTR, owner or "")
        storage.set_trial_user_attr(trial._trial_id, "error", reason)
        return bool(storage.set_trial_state_values(trial._trial_id, TrialState.FAIL))
    except optuna.exceptions.UpdateFinishedTrialError:
        return False


def recover_interrupted(study: optuna.Study) -> list[int]:
    """Fail the trials a gone driver left RUNNING and queue their parameters again; their numbers.

    A RUNNING trial's driver is gone when its process on this machine has exited (a reused pid is
    told apart by its start time), or, for a driver elsewhere, when Optuna finds its heartbeat
    stale (``grace_period`` of the storage). If any driver is alive, StudyBusyError is raised and
    nothing is changed. Failed trials keep their attrs and get ``error``; the queued copy carries
    ``retry_of`` and the original's ``kind``/``label``/``plan``. WAITING and finished trials are
    left alone, and a trial is never queued twice (an interrupted retry is queued again up to
    MAX_RETRIES times in a chain).
    """
    storage = study._storage
    running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    gone: list[FrozenTrial] = []
    if running:
        grace = _grace(storage)
        stale = set(storage._get_stale_trial_ids(study._study_id)) if grace is not None else set()
        ages = _heartbeat_ages(storage, [t._trial_id for t in running])
        for t in running:
            busy = _busy_reason(study, t, stale, ages, grace)
            if busy:
                raise StudyBusyError(busy)
            gone.append(t)
    if gone:
        by_number = {t.number: t for t in study.get_trials(deepcopy=False)}
        for t in gone:
            _fail(storage, t, last=_chain_depth(t, by_number) >= MAX_RETRIES)
    requeued = []
    trials = study.get_trials(deepcopy=False)
    for t in trials:
        if t.state == TrialState.FAIL and INTERRUPTED_ATTR in t.system_attrs and _requeue(study, t, trials):
            requeued.append(t.number)
            trials = study.get_trials(deepcopy=False)
    return requeued


# -- identity ---------------------------------------------------------------------------------


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict) and value:
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: value}


def _short(value: Any, limit: int = 120) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_study_identity(study: optuna.Study, fingerprint: dict[str, Any]) -> None:
    """Refuse (StudyMismatchError, nothing changed) to resume a study stored with another fingerprint.

    The fingerprint is stored in the study's ``mergesearch`` user attr when it has none yet.
    """
    new = json.loads(json.dumps(fingerprint, default=str))
    meta = study.user_attrs.get("mergesearch")
    meta = meta if isinstance(meta, dict) else {}
    stored = meta.get("fingerprint")
    if stored is None:
        study.set_user_attr("mergesearch", {**meta, "fingerprint": new})
        return
    if stored == new:
        return
    old_flat, new_flat = _flatten(stored), _flatten(new)
    missing = object()
    diffs = [f"{k}: stored {_short(old_flat.get(k, missing)) if k in old_flat else '(none)'}, "
             f"now {_short(new_flat[k]) if k in new_flat else '(none)'}"
             for k in sorted(set(old_flat) | set(new_flat)) if old_flat.get(k, missing) != new_flat.get(k, missing)]
    backend = getattr(study._storage, "_backend", study._storage)
    where = mask_url(backend.url) if isinstance(backend, optuna.storages.RDBStorage) else "this storage"
    raise StudyMismatchError(
        f"Study {study.study_name!r} in {where} was made with other settings; a stored study is never mixed "
        f"with others. Differences: {'; '.join(diffs)}. To start a new study, change `name:` in the study file "
        "(or use another `output_dir:` or `storage:`); to resume this one, restore the stored settings."
    )
