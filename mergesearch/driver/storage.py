"""Optuna storage for studies: opening URLs with clear errors, heartbeats, recovering from a dead driver.

SQLite (the default, a file in the study's output dir) or PostgreSQL (``postgresql://``, for
studies shared by many machines). Trials carry a ``driver`` user attr naming the process that
runs them, and that process records Optuna heartbeats for them; when a study is opened again,
trials whose driver is gone (its heartbeat is stale, or its process on this host has exited)
are marked FAIL and their parameters queued once more. See docs/storage.md.
"""

from __future__ import annotations

import os
import socket
import threading
import uuid
from pathlib import Path
from typing import Any, Optional

import optuna
from optuna.trial import FrozenTrial, TrialState

from mergesearch.errors import ConfigError, MergeSearchError

__all__ = [
    "StorageError", "StudyBusyError", "StudyMismatchError", "default_storage_url", "open_storage",
    "driver_identity", "Heartbeat", "recover_interrupted", "check_study_identity", "requeue",
]

HEARTBEAT_INTERVAL = 10
_SQLITE_MAGIC = b"SQLite format 3\x00"
_RUN_NONCE = uuid.uuid4().hex[:8]


class StorageError(MergeSearchError):
    """A storage URL that cannot be opened, or a database that cannot be used."""


class StudyBusyError(MergeSearchError):
    """Another live driver is running this study."""


class StudyMismatchError(ConfigError):
    """The stored study was made from another study file (other sources, space, tasks...)."""


def default_storage_url(output_dir: Path) -> str:
    return f"sqlite:///{Path(output_dir).absolute() / 'study.db'}"


def mask(url: str) -> str:
    """The URL with its password replaced by ***."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - a URL we cannot parse is shown without its userinfo
        head, _, tail = url.partition("@")
        return f"{head.split('://')[0]}://***@{tail}" if tail else url


def _start_time(pid: int) -> Optional[str]:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return fields[19]
    except (OSError, IndexError):
        return None


def driver_identity() -> str:
    """``host:pid:start:nonce`` of this driver run (start time and nonce guard against pid reuse)."""
    return f"{socket.gethostname()}:{os.getpid()}:{_start_time(os.getpid()) or '-'}:{_RUN_NONCE}"


def _owner_alive(identity: str) -> Optional[bool]:
    """True/False for a driver on this host; None when it runs elsewhere (only heartbeats tell)."""
    parts = identity.split(":")
    if len(parts) != 4 or parts[0] != socket.gethostname():
        return None
    try:
        pid = int(parts[1])
    except ValueError:
        return False
    if pid == os.getpid():
        return parts[3] == _RUN_NONCE
    if _start_time(pid) is None:
        return False
    return parts[2] in ("-", _start_time(pid))


def requeue(study: optuna.Study, trial: FrozenTrial) -> Optional[int]:
    """Queue a failed trial's parameters once more (once per trial); returns its number if queued."""
    if trial.user_attrs.get("retry_of") is not None:
        return None
    existing = {t.user_attrs.get("retry_of") for t in study.get_trials(deepcopy=False)}
    if trial.number in existing:
        return None
    attrs = {k: v for k, v in trial.user_attrs.items() if k in ("kind", "label", "plan")}
    study.enqueue_trial(dict(trial.params), user_attrs={**attrs, "retry_of": trial.number},
                        skip_if_exists=False)
    return trial.number


def open_storage(url: str, *, heartbeat_interval: int = HEARTBEAT_INTERVAL,
                 grace_period: Optional[int] = None) -> optuna.storages.RDBStorage:
    """An Optuna RDB storage with heartbeats; StorageError naming the fix when it cannot be used."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, SQLAlchemyError

    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError):
        raise StorageError(
            f"Storage URL {mask(url)!r} is not a database URL; use sqlite:///path/to/study.db or "
            "postgresql://user:password@host:5432/dbname."
        ) from None
    backend = parsed.get_backend_name()
    kwargs: dict[str, Any] = {}
    if backend == "sqlite":
        if not parsed.database or parsed.database == ":memory:":
            raise StorageError(f"Storage URL {url!r} names no SQLite file; use sqlite:///path/to/study.db.")
        path = Path(parsed.database)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise StorageError(f"Cannot create the folder of SQLite storage {str(path)!r}: {err.strerror}.") from None
        if path.exists() and path.stat().st_size > 0:
            with open(path, "rb") as f:
                if f.read(16) != _SQLITE_MAGIC:
                    raise StorageError(
                        f"{str(path)!r} exists but is not an SQLite database; point `storage:` (or "
                        "`output_dir:`) somewhere else, or move the file away."
                    )
        if not os.access(path.parent, os.W_OK):
            raise StorageError(f"Cannot write SQLite storage in {str(path.parent)!r} (read-only); choose another "
                               "output_dir or storage URL.")
        kwargs = {"connect_args": {"timeout": 60}}
    elif backend == "postgresql":
        module = {"postgresql": "psycopg", "postgresql+psycopg": "psycopg",
                  "postgresql+psycopg2": "psycopg2"}.get(parsed.drivername, "psycopg")
        try:
            __import__(module)
        except ImportError:
            raise StorageError(
                f"PostgreSQL storage ({parsed.drivername}://) needs the {module} driver: "
                "pip install -c constraints.txt -e \".[postgres]\" (installs psycopg 3)."
            ) from None
        kwargs = {"pool_pre_ping": True, "connect_args": {"connect_timeout": 10}}
    else:
        raise StorageError(
            f"Storage URL scheme {parsed.drivername!r} is not supported; use sqlite:///path/to/study.db "
            "(default) or postgresql://user:password@host:5432/dbname."
        )
    try:
        return optuna.storages.RDBStorage(
            url, engine_kwargs=kwargs, heartbeat_interval=heartbeat_interval,
            grace_period=grace_period or 3 * heartbeat_interval,
            heartbeat_stale_trial_callback=_requeue_stale)
    except (SQLAlchemyError, ValueError, RuntimeError) as err:
        reason = str(getattr(err, "orig", None) or err).strip().splitlines()[0][:300]
        where = (f"host {parsed.host or 'localhost'}, port {parsed.port or 5432}, database {parsed.database!r}"
                 if backend == "postgresql" else repr(parsed.database))
        raise StorageError(
            f"Cannot open storage {mask(url)} ({where}): {reason}. Check that the server is running and "
            "reachable, the user and password are right and the database exists (createdb NAME)."
        ) from None


def _heartbeat_enabled(storage: Any) -> bool:
    from optuna.storages._heartbeat import is_heartbeat_enabled

    return isinstance(storage, optuna.storages.RDBStorage) and is_heartbeat_enabled(storage)


def _requeue_stale(study: optuna.Study, trial: FrozenTrial) -> None:
    requeue(study, trial)


class Heartbeat:
    """Records Optuna heartbeats for the driver's running trials from a daemon thread."""

    def __init__(self, storage: Any, interval: Optional[float] = None):
        self.storage = storage
        enabled = _heartbeat_enabled(storage)
        self.interval = interval or (storage.get_heartbeat_interval() if enabled else None)
        self.enabled = enabled
        self.ids: set[int] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def add(self, trial_id: int) -> None:
        with self._lock:
            self.ids.add(trial_id)
        self._beat([trial_id])

    def discard(self, trial_id: int) -> None:
        with self._lock:
            self.ids.discard(trial_id)

    def _beat(self, ids: Any) -> None:
        if not self.enabled:
            return
        for trial_id in ids:
            try:
                self.storage.record_heartbeat(trial_id)
            except Exception:  # noqa: BLE001 - a missed beat is retried next interval
                pass

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            with self._lock:
                ids = list(self.ids)
            self._beat(ids)

    def __enter__(self) -> "Heartbeat":
        if self.enabled:
            self._thread = threading.Thread(target=self._run, name="mergesearch-heartbeat", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)


def recover_interrupted(study: optuna.Study) -> list[int]:
    """Fail the trials a gone driver left RUNNING and queue their parameters again (once).

    Stale heartbeats are handled by Optuna's ``fail_stale_trials`` (its failed-trial callback
    re-queues); a trial whose driver process on this host has exited is failed at once. A
    running trial whose driver is alive raises StudyBusyError. Returns the re-queued numbers.
    """
    storage = study._storage
    before = {t.user_attrs.get("retry_of") for t in study.get_trials(deepcopy=False)}
    optuna.storages.fail_stale_trials(study)
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        owner = t.user_attrs.get("driver")
        alive = _owner_alive(owner) if owner else False
        if alive is None:
            raise StudyBusyError(
                f"Trial {t.number} of study {study.study_name!r} is running on another machine "
                f"({owner.split(':')[0]}, pid {owner.split(':')[1]}) whose heartbeat is fresh. Only one driver may run a study; "
                f"wait for it to finish, or stop it and wait {storage.get_heartbeat_interval() * 3 if _heartbeat_enabled(storage) else 0}s "
                "before resuming."
            )
        if alive:
            raise StudyBusyError(
                f"Study {study.study_name!r} is being run by another driver on this machine (pid "
                f"{owner.split(':')[1]}). Only one driver may run a study: wait for it, or stop it first."
            )
        try:
            storage.set_trial_user_attr(t._trial_id, "error", "its driver stopped while it ran")
            storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
        except (RuntimeError, optuna.exceptions.UpdateFinishedTrialError):
            continue
        requeue(study, study.get_trials(deepcopy=False)[t.number])
    after = {t.user_attrs.get("retry_of") for t in study.get_trials(deepcopy=False)}
    return sorted(n for n in after - before if n is not None)


def check_study_identity(study: optuna.Study, fingerprint: dict[str, Any]) -> None:
    """Refuse to resume a stored study made from a different study file (nothing is changed)."""
    stored = (study.user_attrs.get("mergesearch") or {}).get("fingerprint")
    if stored is None or stored == fingerprint:
        return
    diffs = [f"{k}: stored {stored.get(k)!r}, now {fingerprint.get(k)!r}"
             for k in sorted(set(stored) | set(fingerprint)) if stored.get(k) != fingerprint.get(k)]
    raise StudyMismatchError(
        f"Study {study.study_name!r} in this storage was made with other settings ({'; '.join(diffs)}). "
        "Studies cannot be mixed: give this one a new `name:` (or another output_dir / storage), or "
        "restore the original settings to resume it."
    )
