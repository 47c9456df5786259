"""Study storage on real SQLite files and a real PostgreSQL server: opening URLs, heartbeats,
recovering from a killed driver, refusing to mix studies."""

from __future__ import annotations

import os
import select
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from mergesearch.driver.storage import (
    INTERRUPTED_ATTR,
    MAX_RETRIES,
    Heartbeat,
    StorageError,
    StudyBusyError,
    StudyMismatchError,
    _heartbeat_ages,
    _machine,
    check_study_identity,
    default_storage_url,
    driver_identity,
    mask_url,
    open_storage,
    recover_interrupted,
)
from mergesearch.errors import ConfigError, MergeSearchError

optuna.logging.set_verbosity(optuna.logging.WARNING)

BACKENDS = ["sqlite", pytest.param("postgresql", marks=pytest.mark.integration)]


@pytest.fixture(params=BACKENDS)
def url(request, tmp_path) -> str:
    if request.param == "sqlite":
        return default_storage_url(tmp_path / "out")
    return request.getfixturevalue("postgres_url")


def _name() -> str:
    return f"s-{uuid.uuid4().hex[:10]}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _snapshot(trial: optuna.trial.FrozenTrial) -> tuple:
    return (trial.number, trial.state, trial.values, trial.params, trial.user_attrs, trial.intermediate_values,
            trial.datetime_start, trial.datetime_complete)


def _running_trial(study: optuna.Study, driver: str) -> optuna.Trial:
    t = study.ask()
    t.suggest_float("x", 0, 1)
    t.set_user_attr("kind", "search")
    t.set_user_attr("driver", driver)
    return t


def _last_beat(storage: optuna.storages.RDBStorage, trial_id: int) -> object:
    from optuna.storages._rdb import models

    session = storage.scoped_session()
    try:
        return models.TrialHeartbeatModel.where_trial_id(trial_id, session).heartbeat
    finally:
        session.close()


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


# -- a killed driver --------------------------------------------------------------------------

DRIVER = r"""
import sys, time
import optuna
from optuna.trial import TrialState
from mergesearch.driver.storage import Heartbeat, driver_identity, open_storage

optuna.logging.set_verbosity(optuna.logging.WARNING)
url, name = sys.argv[1], sys.argv[2]
storage = open_storage(url, heartbeat_interval=1)
study = optuna.create_study(study_name=name, storage=storage, direction="maximize")
for i in range(3):
    t = study.ask()
    x = t.suggest_float("x", 0, 1)
    t.suggest_categorical("c", ["a", "b"])
    t.set_user_attr("kind", "search")
    t.set_user_attr("scores", {"order": x})
    study.tell(t, x)
t = study.ask()
t.suggest_float("x", 0, 1)
t.report(0.1, 0)
study.tell(t, state=TrialState.PRUNED)
t = study.ask()
t.set_user_attr("error", "boom")
study.tell(t, state=TrialState.FAIL)
study.enqueue_trial({}, user_attrs={"kind": "baseline", "label": "uniform merge", "plan": "merge_method: linear"})
with Heartbeat(storage) as hb:
    running = []
    for kind in ("baseline", "search"):
        t = study.ask()
        if kind == "search":
            t.suggest_float("x", 0, 1)
            t.suggest_categorical("c", ["a", "b"])
            t.set_user_attr("kind", "search")
            t.set_user_attr("label", "")
            t.set_user_attr("plan", "merge_method: linear\nmodels: []")
        t.set_user_attr("scores", {"order": 0.25})
        t.report(0.25, 2)
        t.set_user_attr("driver", driver_identity())
        hb.add(t._trial_id)
        running.append(t.number)
    study.enqueue_trial({"x": 0.125, "c": "b"}, user_attrs={"kind": "start", "label": "start: mine.yaml"})
    print("ready", *running, flush=True)
    time.sleep(600)
"""


def _start_driver(tmp_path: Path, url: str, name: str) -> tuple[subprocess.Popen, list[int]]:
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    proc = subprocess.Popen([sys.executable, str(script), url, name], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        if select.select([proc.stdout], [], [], 1)[0]:
            line = proc.stdout.readline()
            if line.startswith("ready"):
                return proc, [int(n) for n in line.split()[1:]]
        if proc.poll() is not None:
            break
    proc.kill()
    pytest.fail(f"the driver script did not get ready: {proc.stderr.read()[-3000:]}")


def test_a_killed_driver_is_recovered_once(tmp_path, url):
    name = _name()
    proc, running = _start_driver(tmp_path, url, name)
    try:
        storage = open_storage(url, heartbeat_interval=1)
        study = optuna.load_study(study_name=name, storage=storage)
        before = {t.number: _snapshot(t) for t in study.get_trials()}
        with pytest.raises(StudyBusyError, match=rf"trial {running[0]} is running in process {proc.pid} on this"):
            recover_interrupted(study)
        assert {t.number: _snapshot(t) for t in study.get_trials()} == before
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()

    assert sorted(recover_interrupted(study)) == running
    trials = study.get_trials()
    for n, snap in before.items():
        if n not in running:
            assert _snapshot(trials[n]) == snap, f"trial {n} was touched"
    for n in running:
        t = trials[n]
        assert t.state == TrialState.FAIL
        assert t.user_attrs["error"].startswith("interrupted: its driver (pid")
        assert t.user_attrs["scores"] == {"order": 0.25} and t.intermediate_values == {2: 0.25}
        assert t.user_attrs["driver"] == before[n][4]["driver"]
        [retry] = [r for r in trials if r.user_attrs.get("retry_of") == n]
        assert retry.state == TrialState.WAITING
        assert retry.user_attrs == {"retry_of": n, **{k: t.user_attrs[k] for k in ("kind", "label", "plan")
                                                         if k in t.user_attrs}}
    assert [t.user_attrs["label"] for t in trials if t.state == TrialState.WAITING] == [
        "start: mine.yaml", "uniform merge", ""]

    assert recover_interrupted(study) == []
    assert len(study.get_trials()) == len(trials)

    again = optuna.load_study(study_name=name, storage=open_storage(url))
    asked = [again.ask() for _ in range(3)]
    assert asked[0].suggest_float("x", 0, 1) == 0.125
    assert asked[1].user_attrs["plan"] == "merge_method: linear" and asked[1].user_attrs["kind"] == "baseline"
    search = trials[running[1]]
    assert asked[2].suggest_float("x", 0, 1) == search.params["x"]
    assert asked[2].suggest_categorical("c", ["a", "b"]) == search.params["c"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_driver_on_another_machine_is_waited_for_until_its_heartbeat_is_stale(tmp_path, request, backend):
    url = default_storage_url(tmp_path) if backend == "sqlite" else request.getfixturevalue("postgres_url")
    storage = open_storage(url, heartbeat_interval=1, grace_period=1)
    study = optuna.create_study(study_name=_name(), storage=storage)
    beating = _running_trial(study, "elsewhere:4242:0badf00d-77")
    storage.record_heartbeat(beating._trial_id)
    silent = _running_trial(study, "elsewhere:4243:0badf00d-78")
    study.enqueue_trial({"x": 0.5})
    waiting = study.get_trials()[-1]
    busy = r"trial 0 is running in pid 4242 on elsewhere \(last heartbeat \d+ s ago\)"
    with pytest.raises(StudyBusyError, match=busy):
        recover_interrupted(study)
    assert _heartbeat_ages(storage, [beating._trial_id, silent._trial_id]).keys() == {beating._trial_id}
    time.sleep(2.2)
    assert recover_interrupted(study) == [0, 1]
    trials = study.get_trials()
    assert [t.state for t in trials[:3]] == [TrialState.FAIL, TrialState.FAIL, TrialState.WAITING]
    assert _snapshot(trials[2]) == _snapshot(waiting)
    assert [t.user_attrs["retry_of"] for t in trials[3:]] == [0, 1]
    assert "pid 4242 on elsewhere" in trials[0].user_attrs["error"]


@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")
def test_optunas_own_stale_trial_check_queues_the_same_way(tmp_path):
    storage = open_storage(default_storage_url(tmp_path), heartbeat_interval=1, grace_period=1)
    study = optuna.create_study(study_name=_name(), storage=storage)
    t = _running_trial(study, "elsewhere:1:-")
    t.set_user_attr("plan", "p")
    storage.record_heartbeat(t._trial_id)
    time.sleep(2.2)
    optuna.storages.fail_stale_trials(study)
    trials = study.get_trials()
    assert trials[0].state == TrialState.FAIL
    assert trials[1].state == TrialState.WAITING and trials[1].user_attrs == {"retry_of": 0, "kind": "search",
                                                                              "plan": "p"}
    assert recover_interrupted(study) == [] and len(study.get_trials()) == 2


def test_this_process_holds_its_trials_only_inside_a_heartbeat(tmp_path):
    storage = open_storage(default_storage_url(tmp_path), heartbeat_interval=1)
    study = optuna.create_study(study_name=_name(), storage=storage)
    t = _running_trial(study, driver_identity())
    with Heartbeat(storage, interval=0.2) as hb:
        hb.add(t._trial_id)
        assert hb.trial_ids == {t._trial_id}
        first = _last_beat(storage, t._trial_id)
        with pytest.raises(StudyBusyError, match="running in this very process"):
            recover_interrupted(study)
        time.sleep(1.5)
        assert _last_beat(storage, t._trial_id) > first
    assert recover_interrupted(study) == [0]


def test_a_reused_pid_or_a_dead_pid_is_not_a_live_driver(tmp_path):
    storage = open_storage(default_storage_url(tmp_path))
    study = optuna.create_study(study_name=_name(), storage=storage)
    host = socket.gethostname()
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        _running_trial(study, f"{host}:{sleeper.pid}")
        with pytest.raises(StudyBusyError, match=f"process {sleeper.pid} on this machine"):
            recover_interrupted(study)
        study.tell(0, state=TrialState.FAIL)
        _running_trial(study, f"{host}:{sleeper.pid}:{_machine()}-1")
        _running_trial(study, f"{host}:{_dead_pid()}:{_machine()}-1")
        _running_trial(study, f"{host}:{_dead_pid()}")
        assert recover_interrupted(study) == [1, 2, 3]
    finally:
        sleeper.kill()
        sleeper.wait()


def test_an_interrupted_retry_is_queued_again_up_to_the_limit(tmp_path):
    storage = open_storage(default_storage_url(tmp_path))
    study = optuna.create_study(study_name=_name(), storage=storage)
    dead = f"{socket.gethostname()}:{_dead_pid()}"
    _running_trial(study, dead)
    numbers = []
    for i in range(MAX_RETRIES):
        numbers += recover_interrupted(study)
        t = study.ask()
        t.set_user_attr("driver", dead)
        if i == 0:
            t.suggest_float("x", 0, 1)
    assert numbers == list(range(MAX_RETRIES))
    assert recover_interrupted(study) == []
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL] * (MAX_RETRIES + 1)
    assert [t.user_attrs.get("retry_of") for t in trials] == [None, *range(MAX_RETRIES)]
    assert "not queued again" in trials[-1].user_attrs["error"]
    assert trials[1].params == trials[0].params == trials[-1].system_attrs["fixed_params"]


def test_recovery_finishes_the_work_of_a_recovery_that_was_cut_short(tmp_path):
    storage = open_storage(default_storage_url(tmp_path))
    study = optuna.create_study(study_name=_name(), storage=storage)
    t = _running_trial(study, "gone:1")
    storage.set_trial_system_attr(t._trial_id, INTERRUPTED_ATTR, "gone:1")
    storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
    assert recover_interrupted(study) == [0]
    assert recover_interrupted(study) == []


def test_heartbeat_without_heartbeats_only_tracks_trials():
    storage = optuna.storages.InMemoryStorage()
    study = optuna.create_study(storage=storage)
    t = _running_trial(study, driver_identity())
    with Heartbeat(storage) as hb:
        assert not hb.enabled
        hb.add(t._trial_id)
        with pytest.raises(StudyBusyError):
            recover_interrupted(study)
        hb.discard(t._trial_id)
        assert hb.trial_ids == frozenset()
    assert recover_interrupted(study) == [0]


def test_a_status_reader_and_the_driver_share_a_sqlite_file(tmp_path):
    url = default_storage_url(tmp_path)
    writer = open_storage(url, heartbeat_interval=1)
    study = optuna.create_study(study_name="shared", storage=writer)
    errors: list[BaseException] = []
    stop = threading.Event()

    def read() -> None:
        reader = optuna.load_study(study_name="shared", storage=open_storage(url, read_only=True))
        while not stop.is_set():
            try:
                reader.get_trials(deepcopy=False)
            except BaseException as err:  # noqa: BLE001 - collected for the assertion below
                errors.append(err)
                return

    thread = threading.Thread(target=read)
    thread.start()
    try:
        with Heartbeat(writer, interval=0.05) as hb:
            for _ in range(25):
                t = study.ask()
                hb.add(t._trial_id)
                t.set_user_attr("examples", {"order": [1.0] * 50})
                study.tell(t, t.suggest_float("x", 0, 1))
                hb.discard(t._trial_id)
    finally:
        stop.set()
        thread.join()
    assert not errors
    assert len(study.get_trials(states=(TrialState.COMPLETE,))) == 25


# -- opening URLs -----------------------------------------------------------------------------


def test_default_url_is_an_absolute_sqlite_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert default_storage_url(Path("out")) == f"sqlite:///{tmp_path}/out/study.db"


def test_sqlite_parent_folders_are_created(tmp_path):
    url = default_storage_url(tmp_path / "a" / "b" / "c")
    storage = open_storage(url)
    optuna.create_study(study_name="x", storage=storage)
    assert (tmp_path / "a" / "b" / "c" / "study.db").is_file()
    assert optuna.load_study(study_name="x", storage=url).study_name == "x"


@pytest.mark.parametrize("content, match", [
    (b"these are not the trials you are looking for\n" * 10, "is not an SQLite database"),
    (b"SQLite format 3\x00" + b"\xff" * 200, "cannot be read|Cannot open SQLite"),
])
def test_a_file_that_is_not_a_study_database_is_refused_and_kept(tmp_path, content, match):
    path = tmp_path / "study.db"
    path.write_bytes(content)
    with pytest.raises(StorageError, match=match):
        open_storage(f"sqlite:///{path}")
    assert path.read_bytes() == content


def test_a_sqlite_database_of_another_program_is_refused(tmp_path):
    path = tmp_path / "study.db"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE photos (id INTEGER)")
    conn.close()
    before = path.read_bytes()
    with pytest.raises(StorageError, match=r"database of something else \(tables: photos\)"):
        open_storage(f"sqlite:///{path}")
    assert path.read_bytes() == before


def test_sqlite_paths_that_cannot_be_used(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(StorageError, match=r"Cannot create the folder .*file' is a file, not a folder"):
        open_storage(f"sqlite:///{tmp_path}/file/sub/study.db")
    with pytest.raises(StorageError, match="is a folder"):
        open_storage(f"sqlite:///{tmp_path}")
    for url in ("sqlite://", "sqlite:///:memory:"):
        with pytest.raises(StorageError, match="names no SQLite file"):
            open_storage(url)


def test_a_read_only_location_is_refused(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        if os.access(folder, os.W_OK):
            folder = Path("/proc/sys")
            if os.access(folder, os.W_OK):
                pytest.skip("running as root with no read-only folder to try")
        with pytest.raises(StorageError, match="is read-only here"):
            open_storage(f"sqlite:///{folder}/study.db")
    finally:
        (tmp_path / "ro").chmod(0o755)


@pytest.mark.parametrize("url, match", [
    ("mysql://me:hunter2@db.example/x", "scheme 'mysql'.*not supported.*sqlite:///.*postgresql://"),
    ("postgres://me:hunter2@db.example/x", r"write postgresql://, not postgres://"),
    ("runs/study.db", r"not a database URL\. For a SQLite file write sqlite:///"),
    ("http://me:hunter2@[::1/x", "not a database URL"),
    ("postgresql+nosuchdriver://me:hunter2@h/x", "driver SQLAlchemy does not know"),
    ("postgresql+pg8000://me:hunter2@h/x", "needs the Python module 'pg8000'.*pip install pg8000"),
])
def test_unusable_urls_name_the_fix_without_the_password(url, match):
    with pytest.raises(StorageError, match=match) as err:
        open_storage(url)
    assert "hunter2" not in str(err.value)


def test_a_missing_postgresql_driver_names_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "psycopg", None)
    with pytest.raises(StorageError, match=r"needs the Python module 'psycopg'.*"
                                           r'pip install -c constraints.txt -e "\.\[postgres\]"'):
        open_storage("postgresql://me:hunter2@127.0.0.1:5432/x")


def test_an_unreachable_postgresql_names_host_port_and_how_to_check():
    port = _free_port()
    with pytest.raises(StorageError) as err:
        open_storage(f"postgresql://me:hunter2@127.0.0.1:{port}/studies")
    msg = str(err.value)
    assert f"host 127.0.0.1, port {port}, database 'studies'" in msg
    assert "pg_isready" in msg and "hunter2" not in msg and "me:***@" in msg


@pytest.mark.integration
def test_postgresql_login_and_database_errors(postgres_url):
    from sqlalchemy.engine import make_url

    good = make_url(postgres_url)
    with pytest.raises(StorageError, match="password authentication failed.*Check the user name and password") as e:
        open_storage(good.set(password="hunter2").render_as_string(hide_password=False))
    assert "hunter2" not in str(e.value) and good.password not in str(e.value)
    with pytest.raises(StorageError, match=rf"database \"nostudies\" does not exist.*createdb -h 127.0.0.1 -p "
                                           rf"{good.port} -U postgres nostudies") as e:
        open_storage(good.set(database="nostudies").render_as_string(hide_password=False))
    assert good.password not in str(e.value)


@pytest.mark.integration
def test_postgresql_user_without_rights_on_the_schema(postgres_url):
    import sqlalchemy
    from sqlalchemy.engine import make_url

    good = make_url(postgres_url)
    role = f"r{uuid.uuid4().hex[:8]}"
    engine = sqlalchemy.create_engine(postgres_url, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(sqlalchemy.text(f"CREATE ROLE {role} LOGIN PASSWORD 'pw-{role}'"))
        conn.execute(sqlalchemy.text(f"CREATE DATABASE {role}"))
    engine.dispose()
    url = good.set(username=role, password=f"pw-{role}", database=role).render_as_string(hide_password=False)
    with pytest.raises(StorageError, match=f"permission denied.*GRANT CREATE ON SCHEMA public TO {role}") as e:
        open_storage(url)
    assert f"pw-{role}" not in str(e.value)


@pytest.mark.integration
def test_postgresql_study_round_trip_with_heartbeats(postgres_url):
    storage = open_storage(postgres_url, heartbeat_interval=1)
    assert storage.engine.pool._pre_ping
    study = optuna.create_study(study_name=_name(), storage=storage)
    with Heartbeat(storage) as hb:
        t = study.ask()
        hb.add(t._trial_id)
        assert 0 <= _heartbeat_ages(storage, [t._trial_id])[t._trial_id] < 5
        study.tell(t, t.suggest_float("x", 0, 1))
        hb.discard(t._trial_id)
    assert optuna.load_study(study_name=study.study_name, storage=postgres_url).best_trial.number == 0


def test_mask_url_hides_passwords_even_in_urls_that_do_not_parse():
    assert mask_url("postgresql://me:hunter2@h:5432/db") == "postgresql://me:***@h:5432/db"
    assert "hunter2" not in mask_url("postgresql://me:hunter2@h:notaport/db")
    assert mask_url("sqlite:////tmp/x.db") == "sqlite:////tmp/x.db"


# -- the identity of a study ------------------------------------------------------------------


def test_study_identity_is_stored_then_checked(tmp_path):
    url = default_storage_url(tmp_path)
    study = optuna.create_study(study_name="demo", storage=open_storage(url))
    fingerprint = {"method": "ties", "space": "layer_groups", "models": ("a", "b"), "tasks": {"order": 1.0}}
    check_study_identity(study, fingerprint)
    assert study.user_attrs["mergesearch"]["fingerprint"]["models"] == ["a", "b"]
    check_study_identity(optuna.load_study(study_name="demo", storage=url), dict(fingerprint))
    study.tell(study.ask(), 1.0)
    before = (study.user_attrs, [_snapshot(t) for t in study.get_trials()])

    other = {**fingerprint, "space": "dirichlet_linear", "tasks": {"order": 1.0, "addition": 2.0}}
    with pytest.raises(StudyMismatchError) as err:
        check_study_identity(optuna.load_study(study_name="demo", storage=url), other)
    msg = str(err.value)
    assert isinstance(err.value, ConfigError) and isinstance(err.value, MergeSearchError)
    assert "space: stored 'layer_groups', now 'dirichlet_linear'" in msg
    assert "tasks.addition: stored (none), now 2.0" in msg
    assert "method" not in msg.split("Differences:")[1].split(". To start")[0]
    assert "change `name:` in the study file" in msg and "Study 'demo'" in msg
    again = optuna.load_study(study_name="demo", storage=url)
    assert (again.user_attrs, [_snapshot(t) for t in again.get_trials()]) == before


def test_study_identity_keeps_other_study_attrs(tmp_path):
    study = optuna.create_study(storage=open_storage(default_storage_url(tmp_path)))
    study.set_user_attr("mergesearch", {"version": "1"})
    check_study_identity(study, {"k": 1})
    assert study.user_attrs["mergesearch"] == {"version": "1", "fingerprint": {"k": 1}}
