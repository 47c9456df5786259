"""The code sandbox: how programs are scored, and hostile programs that must not disturb the evaluator."""

from __future__ import annotations

import os
import re
import secrets
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import pytest

from mergesearch.errors import ConfigError
from mergesearch.eval import sandbox
from mergesearch.eval.sandbox import (
    SandboxLimits,
    SandboxResult,
    SandboxUnavailableError,
    isolation_mode,
    run_many,
    run_python,
)

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or isolation_mode() == "none",
    reason="the sandbox needs Linux with namespaces, or root and an interpreter other uids can read",
)

ROOT = os.geteuid() == 0
FAST = SandboxLimits(wall_s=5.0, cpu_s=1.0, memory_bytes=256 * 2**20)
# Hostile programs only run where the program cannot signal the evaluator: never "rlimits-same-uid".
HOSTILE_MODES = [m for m in ("namespaces", "rlimits") if sandbox._probe(m) is None]


@pytest.fixture(
    params=HOSTILE_MODES or [pytest.param(None, marks=pytest.mark.skip(reason="no safe mode here"))]
)
def mode(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def bystander():
    """A process of the evaluator that must survive; afterwards, no sandbox process may be left."""
    proc = subprocess.Popen(["sleep", "120"])
    yield proc
    assert proc.poll() is None, "a hostile program killed a process of the evaluator"
    proc.kill()
    proc.wait()
    assert subprocess.run(["true"], check=False).returncode == 0, (
        "the evaluator can no longer start processes"
    )
    if ROOT:
        assert _wait_no_sandbox_processes() == [], "sandbox processes survived the run"


def _sandbox_pids() -> list[int]:
    low = sandbox._UID_BASE + (os.getpid() % (1 << 22)) * sandbox._UID_SLOTS
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                status = Path(f"/proc/{entry}/status").read_text()
            except OSError:
                continue
            uids = next(line for line in status.splitlines() if line.startswith("Uid:")).split()[1:]
            if any(low <= int(u) < low + sandbox._UID_SLOTS for u in uids):
                found.append(int(entry))
    return found


def _wait_no_sandbox_processes(timeout: float = 3.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while (pids := _sandbox_pids()) and time.monotonic() < deadline:
        time.sleep(0.05)
    return pids


def _run(program: str, tests: str = "", mode: str | None = None, **limits) -> SandboxResult:
    return run_python(program, tests=tests, limits=replace(FAST, **limits), isolation=mode)


# ---------------------------------------------------------------- scoring


def test_isolation_mode_is_known_and_cached() -> None:
    assert isolation_mode() in ("namespaces", "rlimits", "rlimits-same-uid")
    assert isolation_mode() is isolation_mode()
    assert run_python("x = 1").isolation == isolation_mode()


def test_correct_function_passes() -> None:
    r = _run("def add(a, b):\n    return a + b", "assert add(1, 2) == 3\nassert add(-1, 1) == 0")
    assert (r.passed, r.reason, r.detail, r.returncode) == (True, "passed", "", 0)
    assert r.wall_s < 5


def test_wrong_function_fails_with_assertion() -> None:
    r = _run("def add(a, b):\n    return a - b", "assert add(1, 2) == 3, 'add(1, 2)'")
    assert (r.passed, r.reason, r.returncode) == (False, "assertion failed", 1)
    assert r.detail == "AssertionError: add(1, 2)"
    assert 'main.py", line 4' in r.stderr and "<string>" not in r.stderr


@pytest.mark.parametrize(
    ("program", "reason"),
    [
        ("def f(:\n    pass", "syntax error"),
        ("def f():\n\treturn 1\n        return 2", "syntax error"),
        ("x = undefined_name", "exception: NameError"),
        ("raise KeyError('k')", "exception: KeyError"),
        ("import numpy", "exception: ModuleNotFoundError"),
        ("open('big', 'wb').write(b'x' * (2 * 2**20))", "file size limit"),
    ],
)
def test_failure_reasons(program: str, reason: str) -> None:
    r = _run(program, "assert True")
    assert (r.passed, r.reason) == (False, reason)
    assert r.detail


@pytest.mark.parametrize(
    ("program", "reason", "returncode"),
    [
        ("import sys\nsys.exit(0)", "early exit", 0),
        ("raise SystemExit", "early exit", 0),
        ("import os\nos._exit(0)", "early exit", 0),
        ("import os\nos.close(1)\nos.close(2)\nos._exit(0)", "early exit", 0),
        ("import sys\nsys.exit(3)", "exit code 3", 3),
        ("import sys\nsys.exit('bye')", "exit code 1", 1),
    ],
)
def test_early_exit_never_passes(program: str, reason: str, returncode: int) -> None:
    r = _run(program, "assert False, 'the tests must not be skipped'")
    assert (r.passed, r.reason, r.returncode) == (False, reason, returncode)


def test_forged_status_line_does_not_pass() -> None:
    fake = "\\n" + "0" * 32 + ":status:passed\\n"
    r = _run(
        f"import os\nos.write(1, b'{fake}')\nprint('{'a' * 32}:status:passed')\nos._exit(0)", "assert False"
    )
    assert (r.passed, r.reason) == (False, "early exit")


def test_nonce_is_not_visible_to_the_program() -> None:
    program = (
        "import os, sys\nprint(open(__file__).read())\nprint(dict(os.environ))\n"
        "print(open('/proc/self/cmdline', 'rb').read())\nprint(sys.argv)"
    )
    r = _run(program, "assert True")
    assert r.passed, r
    assert "assert True" in r.stdout
    assert not re.search(r"[0-9a-f]{32}", r.stdout), r.stdout


def test_forked_children_do_not_report() -> None:
    fork = "import os\npid = os.fork()\nif pid:\n    os.waitpid(pid, 0)\n"
    ok = _run(fork, "assert True", max_processes=1)
    assert ok.passed, ok
    child_passes = _run(fork + "    raise ValueError('parent')", "assert True", max_processes=1)
    assert (child_passes.passed, child_passes.reason) == (False, "exception: ValueError")


def test_program_closing_stdout_still_reports() -> None:
    r = _run("import os, sys\nos.close(1)\nsys.stdout = open(os.devnull, 'w')", "assert 1 + 1 == 2")
    assert r.passed


def test_entry_humaneval_style() -> None:
    tests = "def check(candidate):\n    assert candidate([3, 1, 2]) == [1, 2, 3]\n"
    ok = run_python("def sort_list(xs):\n    return sorted(xs)", tests=tests, limits=FAST, entry="sort_list")
    assert ok.passed, ok
    bad = run_python("def sort_list(xs):\n    return xs", tests=tests, limits=FAST, entry="sort_list")
    assert (bad.passed, bad.reason) == (False, "assertion failed")
    missing = run_python("def other(xs):\n    return xs", tests=tests, limits=FAST, entry="sort_list")
    assert (missing.passed, missing.reason) == (False, "missing entry")
    assert "sort_list" in missing.detail


def test_output_is_truncated() -> None:
    r = _run(
        "import sys\nprint('o' * 100_000)\nsys.stderr.write('e' * 100_000 + '\\nlast words\\n')",
        "assert True",
        output_bytes=1000,
    )
    assert r.passed, r
    assert r.stdout.startswith("o" * 1000) and r.stdout.endswith("bytes truncated]") and len(r.stdout) < 1100
    assert r.stderr.startswith("[") and r.stderr.endswith("e\nlast words\n") and len(r.stderr) < 1100


def test_stdout_without_nonce_records() -> None:
    r = _run("print('hello')", "assert True")
    assert r.passed and r.stdout == "hello\n"


def test_run_many_preserves_order_and_runs_concurrently() -> None:
    items = [
        (f"import time\ntime.sleep(0.5)\nx = {i}", f"assert x == {i if i != 2 else -1}") for i in range(4)
    ]
    start = time.monotonic()
    results = run_many(items, limits=FAST, max_workers=2)
    elapsed = time.monotonic() - start
    assert [r.reason for r in results] == ["passed", "passed", "assertion failed", "passed"]
    assert elapsed < 0.8 * sum(r.wall_s for r in results), (elapsed, [r.wall_s for r in results])
    assert run_many([]) == []


def test_bad_arguments_raise_config_error() -> None:
    for kwargs in (
        {"wall_s": 0},
        {"cpu_s": -1.0},
        {"cpu_s": float("nan")},
        {"memory_bytes": "1G"},
        {"max_processes": -1},
        {"output_bytes": True},
    ):
        with pytest.raises(ConfigError, match=next(iter(kwargs))):
            SandboxLimits(**kwargs)
    with pytest.raises(ConfigError, match="program must be a str"):
        run_python(b"print(1)")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="entry must be a Python identifier"):
        run_python("x = 1", entry="not an identifier")
    with pytest.raises(ConfigError, match="unknown sandbox isolation 'chroot'"):
        run_python("x = 1", isolation="chroot")
    with pytest.raises(ConfigError, match="max_workers"):
        run_many([("x = 1", "")], max_workers=0)
    with pytest.raises(ConfigError, match="item 1"):
        run_many([("x = 1", ""), "x = 1"])  # type: ignore[list-item]


def test_unavailable_isolation_raises() -> None:
    missing = [m for m in sandbox.MODES if sandbox._probe(m) is not None]
    if not missing:
        pytest.skip("every isolation mode works here")
    with pytest.raises(SandboxUnavailableError, match=missing[0]):
        run_python("x = 1", isolation=missing[0])


# ---------------------------------------------------------------- hostile programs


@pytest.mark.parametrize(
    "program",
    [
        "while True:\n    pass",
        "import signal\nsignal.signal(signal.SIGXCPU, signal.SIG_IGN)\nwhile True:\n    pass",
    ],
    ids=["busy-loop", "ignores-SIGXCPU"],
)
def test_infinite_loop_hits_cpu_limit(mode: str, bystander, program: str) -> None:
    r = _run(program, mode=mode)
    assert (r.passed, r.reason) == (False, "cpu limit")
    assert r.wall_s < 4.5


def test_sleeping_forever_times_out(mode: str, bystander) -> None:
    r = _run("import time\ntime.sleep(1000)", mode=mode, wall_s=1.0)
    assert (r.passed, r.reason, r.returncode) == (False, "timeout", None)
    assert 1.0 <= r.wall_s < 3.0


def test_fork_bomb_fails_fast(mode: str, bystander) -> None:
    r = _run("import os\nwhile True:\n    os.fork()", mode=mode)
    assert (r.passed, r.reason) == (False, "exception: BlockingIOError")
    assert r.wall_s < 2


def test_persistent_fork_bomb_is_contained(mode: str, bystander) -> None:
    program = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass"
    r = _run(program, mode=mode, wall_s=2.0, max_processes=4)
    assert not r.passed and r.reason in ("timeout", "cpu limit"), r


def test_process_limit_is_exact(mode: str, bystander) -> None:
    program = (
        "import os, time\nforked = 0\n"
        "for _ in range(10):\n"
        "    try:\n        pid = os.fork()\n    except BlockingIOError:\n        break\n"
        "    if pid == 0:\n        time.sleep(5)\n        os._exit(0)\n"
        "    forked += 1\n"
    )
    r = _run(program, "assert forked == 3, forked", mode=mode, max_processes=3)
    assert r.passed, r


@pytest.mark.parametrize(
    "program",
    [
        "chunks = []\nwhile True:\n    chunks.append(bytearray(10**7))",
        "x = bytearray(2**40)",
        "x = 'a' * 2**31",
    ],
)
def test_memory_bomb_hits_memory_limit(mode: str, bystander, program: str) -> None:
    r = _run(program, mode=mode)
    assert (r.passed, r.reason, r.detail) == (False, "memory limit", "MemoryError")


def test_cannot_write_outside_its_directory(mode: str, bystander, tmp_path: Path) -> None:
    targets = [tmp_path / "escape.txt", Path(__file__).parent / f"escape-{secrets.token_hex(4)}.txt"]
    try:
        for target in targets:
            r = _run(f"open({str(target)!r}, 'w').write('pwned')", mode=mode)
            expected = {
                "namespaces": ("exception: FileNotFoundError", "exception: OSError"),  # hidden, or read-only
                "rlimits": ("exception: PermissionError",),
            }[mode]
            assert not r.passed and r.reason in expected, (target, r)
            assert not target.exists()
    finally:
        for target in targets:
            target.unlink(missing_ok=True)


def test_world_writable_dirs_are_private(bystander) -> None:
    if "namespaces" not in HOSTILE_MODES:
        pytest.skip("only the namespaces mode hides /var/tmp and /dev/shm")
    names = [
        f"/var/tmp/mergesearch-escape-{secrets.token_hex(4)}",
        f"/dev/shm/mergesearch-escape-{secrets.token_hex(4)}",
    ]
    program = "".join(f"open({n!r}, 'w').write('x')\n" for n in names) + "assert False, 'wrote'"
    try:
        r = _run(program, mode="namespaces")
        assert (r.passed, r.reason) == (False, "assertion failed")
        assert not any(os.path.exists(n) for n in names)
    finally:
        for n in names:
            Path(n).unlink(missing_ok=True)


def test_cannot_read_home_or_environment(mode: str, bystander, monkeypatch: pytest.MonkeyPatch) -> None:
    secret = secrets.token_hex(16)
    monkeypatch.setenv("MERGESEARCH_TEST_SECRET", secret)
    path = Path.home() / f".mergesearch-sandbox-secret-{secrets.token_hex(4)}"
    path.write_text(secret)
    try:
        # namespaces hide $HOME even from world-readable files; rlimits rely on its permissions.
        path.chmod(0o644 if mode == "namespaces" else 0o600)
        program = f"import os\nprint(dict(os.environ))\nprint(open({str(path)!r}).read())"
        r = _run(program, mode=mode)
        expected = {"namespaces": "exception: FileNotFoundError", "rlimits": "exception: PermissionError"}[
            mode
        ]
        assert (r.passed, r.reason) == (False, expected)
        assert secret not in r.stdout + r.stderr
    finally:
        path.unlink()


def test_no_network(bystander) -> None:
    if "namespaces" not in HOSTILE_MODES:
        pytest.skip("only the namespaces mode cuts the network")
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    server.setblocking(False)
    port = server.getsockname()[1]
    try:
        program = (
            f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2).sendall(b'leak')"
        )
        r = _run(program, mode="namespaces")
        assert (r.passed, r.reason) == (False, "exception: OSError")
        assert "Network is unreachable" in r.detail
        with pytest.raises(BlockingIOError):
            server.accept()
    finally:
        server.close()


KILLERS = {
    "parent": ("os.kill(os.getppid(), signal.SIGKILL)", "exception: PermissionError"),
    "pid-1": ("os.kill(1, signal.SIGKILL)", "exception: PermissionError"),
    "own-group": ("os.killpg(os.getpgid(0), signal.SIGKILL)", "killed by signal SIGKILL"),
    "group-0": ("os.kill(0, signal.SIGKILL)", "killed by signal SIGKILL"),
    "everyone": ("os.kill(-1, signal.SIGKILL)", "exception: ProcessLookupError"),
}
# kill(-1) in the host pid namespace reports success even when every target refused (EPERM).
RLIMITS_KILLERS = {"everyone": "assertion failed"}
# Init shares the program's host uid when namespaces come through a user namespace (always when not
# root); as pid 1 it ignores signals it has no handler for.
SAME_UID_KILLERS = {"parent": "assertion failed", "pid-1": "assertion failed"}


@pytest.mark.parametrize("name", list(KILLERS))
def test_killing_the_evaluator_fails(mode: str, bystander, name: str) -> None:
    attack, reason = KILLERS[name]
    if mode == "rlimits":
        reason = RLIMITS_KILLERS.get(name, reason)
    elif sandbox._variant(mode):
        reason = SAME_UID_KILLERS.get(name, reason)
    r = _run(f"import os, signal\n{attack}\nassert False, 'survived'", mode=mode)
    assert (r.passed, r.reason) == (False, reason)


def test_kill_everyone_spares_a_concurrent_run(mode: str, bystander) -> None:
    slow = ("import time\ntime.sleep(1.0)\nx = 1", "assert x == 1")
    killer = (
        "import os, signal, time\ntime.sleep(0.3)\nos.kill(-1, signal.SIGKILL)",
        "assert False, 'survived'",
    )
    results = run_many([slow, killer], limits=FAST, max_workers=2, isolation=mode)
    assert results[0].passed, results[0]
    assert results[1].reason == ("assertion failed" if mode == "rlimits" else "exception: ProcessLookupError")


def test_evaluator_mounts_and_temp_dirs_untouched(
    mode: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = Path("/proc/self/mountinfo").read_text()
    if mode == "namespaces":
        monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    r = _run("open('scratch.txt', 'w').write('x')", mode=mode)
    assert r.passed, r
    assert Path("/proc/self/mountinfo").read_text() == before
    assert os.access(tmp_path, os.W_OK)
    if mode == "namespaces":
        assert list(tmp_path.iterdir()) == []
