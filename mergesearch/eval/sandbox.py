"""Run untrusted Python (model-generated code plus a task's tests) in an isolated child process.

``run_python`` writes ``program + "\\n\\n" + tests`` as ``main.py`` into a fresh, empty temporary
directory and runs it with the current ``sys.executable -I -S`` (isolated mode, no site-packages:
test code gets the standard library only). The program passes only when the runner reaches the end
of the tests and reports so on stdout with a random per-run token (nonce); a program that exits
early (``sys.exit(0)``, ``os._exit(0)``) therefore never passes.

Isolation modes (``isolation_mode()`` picks the first that works on this machine, probed once):

``"namespaces"``
    ``unshare --pid --fork --kill-child --mount-proc --net --mount --ipc --uts``. Root with
    CAP_SYS_ADMIN makes them directly; anyone else (or root without it) adds ``--user
    --map-root-user``, started as the per-run uid when root. Inside, a small init (pid 1 of the
    new pid namespace) builds a private filesystem view: every mount is remounted read-only and
    nosuid; ``$HOME``, ``/root``, ``/home`` and ``/run`` are covered by empty read-only tmpfs;
    ``/tmp`` (also bound on ``/var/tmp`` and ``/dev/shm``) is a fresh tmpfs of ``scratch_bytes``
    whose ``/tmp/work`` is the working directory; the interpreter's own directories are bound
    back read-only where they lie in a hidden place. The network namespace has only a loopback
    that is down: no network at all. Init then forks the runner, which drops every privilege
    (to the per-run uid with no supplementary groups, or into a nested user namespace with all
    capabilities cleared), sets ``no_new_privs`` and the rlimits. Init ignores signals from
    inside, cannot be traced (not dumpable), reaps orphans and reports the runner's exit status;
    when it dies the kernel kills every process in the namespace, so killing the ``unshare``
    process group (done after every run, and on timeout) kills everything the program started.
    Still visible, read-only and subject to normal permissions: the rest of the filesystem (when
    not root, that includes the user's files outside ``$HOME``), and Unix sockets outside the
    hidden directories if their permissions let the program's uid connect.

``"rlimits"`` (root, no namespaces)
    The runner starts directly as the per-run uid (no supplementary groups, ``no_new_privs``) in
    its own session, with the rlimits and an empty working directory owned by that uid;
    afterwards its process group and every process of that uid are killed. It does not protect
    against: network access; reading any file the permissions allow (``$HOME`` included when
    world-readable); writing to world-writable places (``/tmp``, ``/dev/shm``); filling the disk
    with many files below the per-file limit. The interpreter must be readable by an
    unprivileged uid (it is not when Python lives under ``/root``: then this mode is unavailable).

``"rlimits-same-uid"`` (not root, no namespaces)
    As ``"rlimits"`` but under the evaluator's own uid, which cannot be dropped: the program can
    also signal every process of that uid (``kill(-1)`` kills the evaluator) and read or write
    that user's files. Use it only for trusted code.

``"none"``
    Nothing works (e.g. no namespaces and the interpreter is unreadable to other uids);
    ``run_python`` raises ``SandboxUnavailableError``, as it does when the sandbox fails to set
    itself up: an infrastructure failure is never scored as a failing program.

The per-run uid (root only) is ``2**30 + pid * 256 + slot``, unique among live evaluators, so its
``RLIMIT_NPROC`` count starts at zero and a fork bomb fails at ``1 + max_processes`` tasks
without touching any other process's limit (when not root, the nested user namespace gives the
same per-run count). Threads count as tasks too. The program's environment is only ``PATH``,
``HOME``, ``TMPDIR`` and the locale; the nonce reaches the runner through stdin, never a file.

Reasons (``SandboxResult.reason``):

=========================  ==================================================================
``passed``                 the tests ran to the end
``assertion failed``       an ``AssertionError`` escaped
``exception: <Name>``      another exception escaped (``<Name>`` is its class name)
``syntax error``           program + tests do not compile
``missing entry``          ``entry`` was given but the program does not define it as a callable
``memory limit``           ``MemoryError`` (``RLIMIT_AS``)
``file size limit``        a write failed with ``EFBIG`` (``RLIMIT_FSIZE``)
``early exit``             the process exited with status 0 before the tests finished
``exit code <n>``          the process exited with a non-zero status (``sys.exit(n)``)
``cpu limit``              ``RLIMIT_CPU`` was reached (``SIGXCPU``, or ``SIGKILL`` at the hard limit)
``timeout``                the wall-clock limit was reached; the process tree was killed
``killed by signal <SIG>`` any other fatal signal
=========================  ==================================================================

Threat model: the sandbox protects the evaluator and the machine from the program. It does not
make the score tamper-proof against a program written to cheat an in-process harness (one that
searches the runner's memory for the nonce, or redefines what the tests compare); no in-process
test harness can.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import dataclass

from mergesearch.errors import ConfigError, MergeSearchError

__all__ = [
    "MODES",
    "SandboxLimits",
    "SandboxResult",
    "SandboxUnavailableError",
    "isolation_mode",
    "run_many",
    "run_python",
]

log = logging.getLogger(__name__)

MODES = ("namespaces", "rlimits", "rlimits-same-uid")
_UID_BASE = 1 << 30
_UID_SLOTS = 256
_WORK = "/tmp/work"
_RECORD_MAX = 512
_DETAIL_MAX = 300


class SandboxUnavailableError(MergeSearchError):
    """No isolation mode works on this machine, or the sandbox failed to set itself up."""


@dataclass(frozen=True)
class SandboxLimits:
    """Limits of one run. ``memory_bytes`` caps the address space (``RLIMIT_AS``), not RSS.

    ``cpu_s`` is rounded up to whole seconds (``RLIMIT_CPU``). ``max_processes`` is how many
    processes or threads the program may add to itself. ``scratch_bytes`` caps all writable
    space (namespaces mode only). Stdout keeps its first ``output_bytes``, stderr its last.
    """

    wall_s: float = 10.0
    cpu_s: float = 5.0
    memory_bytes: int = 512 * 2**20
    file_size_bytes: int = 1 * 2**20
    max_processes: int = 0
    output_bytes: int = 64 * 1024
    scratch_bytes: int = 16 * 2**20

    def __post_init__(self) -> None:
        for name in ("wall_s", "cpu_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
                raise ConfigError(
                    f"SandboxLimits.{name} must be a positive finite number of seconds, got {value!r}; "
                    f"pass e.g. {name}=5.0."
                )
        minimum = {
            "memory_bytes": 1,
            "file_size_bytes": 1,
            "max_processes": 0,
            "output_bytes": 0,
            "scratch_bytes": 4096,
        }
        for name, low in minimum.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(
                    f"SandboxLimits.{name} must be an integer >= {low}, got {value!r}; "
                    f"pass e.g. {name}={getattr(SandboxLimits, name)!r}."
                )


@dataclass(frozen=True)
class SandboxResult:
    """Outcome of one run; ``reason`` is one of the module docstring's vocabulary.

    ``returncode``: the program's exit status (negative: the signal that killed it), None on
    timeout. ``stdout``/``stderr``: the captured streams, truncated as ``SandboxLimits`` says.
    ``isolation``: the mode it ran under.
    """

    passed: bool
    reason: str
    detail: str
    returncode: int | None
    wall_s: float
    stdout: str = ""
    stderr: str = ""
    isolation: str = ""


# The child: init of the namespaces (build the filesystem view, fork the runner, reap, report) and
# the runner (drop privileges, set rlimits, run main.py, report a nonce-tagged status record).
_CHILD = r'''
import ctypes, errno, fcntl, json, os, resource, signal, sys, traceback

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT, MS_BIND, MS_REC = 1, 2, 4, 8, 32, 4096, 16384
ATTR_RDONLY, ATTR_NOSUID = 1, 2
PR_SET_DUMPABLE, PR_SET_NO_NEW_PRIVS, CLONE_NEWUSER, SYS_MOUNT_SETATTR = 4, 38, 0x10000000, 442
libc = ctypes.CDLL(None, use_errno=True)
cfg = json.loads(sys.stdin.buffer.readline())
NONCE = cfg["nonce"].encode()
_write, _exit, _getpid = os.write, os._exit, os.getpid
RECORDS = fcntl.fcntl(1, fcntl.F_DUPFD_CLOEXEC, 100)


def record(kind, value):
    os.set_blocking(RECORDS, True)
    _write(RECORDS, b"\n" + NONCE + b":" + kind.encode() + b":" + value.encode()[:400] + b"\n")


def check(ret, what):
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, what + ": " + os.strerror(err))


def enc(s):
    return None if s is None else s.encode()


def mount(src, target, fstype, flags, data=None):
    check(libc.mount(enc(src), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)), "mount " + target)


class MountAttr(ctypes.Structure):
    _fields_ = [(n, ctypes.c_uint64) for n in ("attr_set", "attr_clr", "propagation", "userns_fd")]


def mount_setattr(path, attr_set, attr_clr, recursive):
    attr = MountAttr(attr_set, attr_clr, 0, 0)
    flags = ctypes.c_uint(0x8000 if recursive else 0)
    return libc.syscall(ctypes.c_long(SYS_MOUNT_SETATTR), ctypes.c_int(-100), enc(path), flags,
                        ctypes.byref(attr), ctypes.c_size_t(ctypes.sizeof(attr)))


def read_only_everything():
    if mount_setattr("/", ATTR_RDONLY | ATTR_NOSUID, 0, True) == 0:
        mount_setattr("/proc", 0, ATTR_RDONLY, False)
        return
    keep = {"nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC, "noatime": 1024, "nodiratime": 2048,
            "relatime": 1 << 21}
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            point = fields[4].encode().decode("unicode_escape")
            if point == "/proc":
                continue
            flags = MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID
            for opt in fields[5].split(","):
                flags |= keep.get(opt, 0)
            try:
                mount(None, point, None, flags)
            except OSError:
                pass


def inside(path, top):
    return path == top or path.startswith(top.rstrip("/") + "/")


def build_filesystem(source):
    keep = [p for p in cfg["keep"] if os.path.isdir(p)]
    fds = {p: os.open(p, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC) for p in keep}
    read_only_everything()
    hidden = []
    for d in cfg["hide"]:
        if (os.path.isdir(d) and not os.path.islink(d) and d != "/" and d not in hidden
                and not any(inside(d, t) for t in ("/tmp", "/var/tmp", "/dev/shm", *keep))):
            mount("tmpfs", d, "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, "size=64k,nr_inodes=256,mode=755")
            hidden.append(d)
    scratch = "size=%d,nr_inodes=4096,mode=1777" % cfg["scratch_bytes"]
    mount("sandbox", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, scratch)
    for d in ("/var/tmp", "/dev/shm"):
        if os.path.isdir(d) and not os.path.islink(d):
            mount("/tmp", d, None, MS_BIND)
    for p, fd in fds.items():
        if any(inside(p, h) for h in hidden + ["/tmp"]):
            os.makedirs(p, exist_ok=True)
            mount("/proc/self/fd/%d" % fd, p, None, MS_BIND | MS_REC)
        os.close(fd)
    for d in hidden:
        mount(None, d, None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC, "size=64k,mode=755")
    os.mkdir(cfg["work"], 0o700)
    path = os.path.join(cfg["work"], "main.py")
    with open(path, "wb") as f:
        f.write(source)
    if cfg["uid"] is not None:
        for p in (cfg["work"], path):
            os.chown(p, cfg["uid"], cfg["gid"])


class CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class CapData(ctypes.Structure):
    _fields_ = [(n, ctypes.c_uint32) for n in ("effective", "permitted", "inheritable")]


def drop_privileges():
    if cfg["uid"] is not None:
        os.setgroups([])
        os.setresgid(cfg["gid"], cfg["gid"], cfg["gid"])
        os.setresuid(cfg["uid"], cfg["uid"], cfg["uid"])
    else:
        check(libc.unshare(ctypes.c_int(CLONE_NEWUSER)), "unshare(CLONE_NEWUSER)")
        for name, text in (("setgroups", "deny"), ("uid_map", "65534 0 1"), ("gid_map", "65534 0 1")):
            with open("/proc/self/" + name, "w") as f:
                f.write(text)
        check(libc.capset(ctypes.byref(CapHeader(0x20080522, 0)), (CapData * 2)()), "capset")


def harden():
    prctl(PR_SET_NO_NEW_PRIVS, 1)
    prctl(PR_SET_DUMPABLE, 1)
    with open("/proc/self/status") as f:
        fields = (line.partition(":") for line in f)
        caps = {k: v.strip() for k, _, v in fields if k in ("CapPrm", "CapEff", "CapAmb")}
    if any(int(v, 16) for v in caps.values()):
        raise RuntimeError("capabilities left after dropping privileges: %r" % caps)
    if cfg["uid"] is not None and (os.getuid() == 0 or os.geteuid() == 0):
        raise RuntimeError("still root after dropping privileges")


def own_tasks():
    uid, n = str(os.getuid()), 0
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open("/proc/%s/status" % pid) as f:
                    st = dict(line.split(":", 1) for line in f if ":" in line)
            except OSError:
                continue
            if st.get("Uid", "").split()[:1] == [uid]:
                n += int(st.get("Threads", "1"))
    return n


def set_limits():
    lim = cfg["limits"]
    nproc = 1 + lim["max_processes"] + (own_tasks() - 1 if cfg["same_uid"] else 0)
    nofile = min(1024, resource.getrlimit(resource.RLIMIT_NOFILE)[1])
    for res, value in ((resource.RLIMIT_CPU, (lim["cpu"], lim["cpu"] + 1)), (resource.RLIMIT_CORE, (0, 0)),
                       (resource.RLIMIT_FSIZE, (lim["file_size_bytes"],) * 2),
                       (resource.RLIMIT_NPROC, (nproc, nproc)), (resource.RLIMIT_NOFILE, (nofile, nofile)),
                       (resource.RLIMIT_AS, (lim["memory_bytes"],) * 2)):
        resource.setrlimit(res, value)


def status_of(err):
    if isinstance(err, SystemExit):
        code = err.code
        if code is None or code == 0:
            return "early exit", 0
        if not isinstance(code, int):
            print(code, file=sys.stderr)
            code = 1
        return "exit code %d" % code, code & 0xFF
    if isinstance(err, MemoryError):
        return "memory limit", 1
    if isinstance(err, OSError) and err.errno == errno.EFBIG:
        return "file size limit", 1
    if isinstance(err, AssertionError):
        return "assertion failed", 1
    name = "".join(c for c in type(err).__name__ if c.isalnum() or c in "_.")[:60]
    return "exception: " + (name or "?"), 1


def run(source, path):
    main_pid = _getpid()
    sys.argv = [path]
    try:
        code = compile(source, path, "exec")
    except (SyntaxError, ValueError) as err:
        traceback.print_exception(type(err), err, None)
        sys.stderr.flush()
        record("status", "syntax error")
        _exit(1)
    except MemoryError:
        record("status", "memory limit")
        _exit(1)
    module = type(sys)("__main__")
    module.__file__ = path
    module.__builtins__ = __builtins__
    sys.modules["__main__"] = module
    status, exit_code = "passed", 0
    try:
        exec(code, module.__dict__)
        entry = cfg["entry"]
        if entry is not None:
            fn = module.__dict__.get(entry)
            if not callable(fn):
                print("entry %r is not defined as a callable" % entry, file=sys.stderr)
                status, exit_code = "missing entry", 1
            elif callable(module.__dict__.get("check")):
                module.__dict__["check"](fn)
    except BaseException as err:
        status, exit_code = "exception: ?", 1
        try:
            status, exit_code = status_of(err)
            if not isinstance(err, SystemExit):
                traceback.print_exception(type(err), err, err.__traceback__.tb_next)
        except BaseException:
            pass
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        try:
            stream.flush()
        except BaseException:
            pass
    if _getpid() == main_pid:
        try:
            record("status", status)
        except OSError:
            pass
    _exit(exit_code)


def prctl(option, value):
    check(libc.prctl(ctypes.c_int(option), ctypes.c_ulong(value), ctypes.c_ulong(0), ctypes.c_ulong(0),
                     ctypes.c_ulong(0)), "prctl(%d)" % option)


def init(source):
    """Pid 1: build the filesystem, fork the runner, reap until it exits, report its status."""
    prctl(PR_SET_DUMPABLE, 0)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    build_filesystem(source)
    pid = os.fork()
    if pid == 0:
        try:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            os.setsid()
            drop_privileges()
            harden()
            os.chdir(cfg["work"])
            set_limits()
        except BaseException as err:
            record("setup", "runner: %s" % err)
            _exit(125)
        run(source, os.path.join(cfg["work"], "main.py"))
    try:
        while True:
            got, status, usage = os.wait4(-1, 0)
            if got == pid:
                break
        record("exit", "%d:%.3f" % (status, usage.ru_utime + usage.ru_stime))
    finally:
        _exit(0)


def main():
    null = os.open("/dev/null", os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    try:
        with open("main.py", "rb") as f:
            source = f.read()
        if cfg["mode"] == "namespaces":
            init(source)
        harden()
        set_limits()
    except BaseException as err:
        record("setup", "%s" % err)
        _exit(125)
    run(source, os.path.abspath("main.py"))


main()
'''


class _UidPool:
    """Per-run unprivileged uids ``2**30 + pid * 256 + slot``, unique among live processes; LRU slot first."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._pid = -1
        self._free: list[int] = []

    @contextmanager
    def take(self) -> Iterator[int]:
        with self._cond:
            if self._pid != os.getpid():
                self._pid, self._free = os.getpid(), list(range(_UID_SLOTS))
            while not self._free:
                self._cond.wait()
            slot = self._free.pop(0)
            uid = _UID_BASE + (self._pid % (1 << 22)) * _UID_SLOTS + slot
        try:
            yield uid
        finally:
            with self._cond:
                if self._pid == os.getpid():
                    self._free.append(slot)
                    self._cond.notify()


_uids = _UidPool()


@contextmanager
def _no_uid() -> Iterator[None]:
    yield None


class _Capture(threading.Thread):
    """Drains one pipe: keeps its first and last ``limit`` bytes and, given a nonce, every record line."""

    def __init__(self, fd: int, limit: int, nonce: bytes | None = None) -> None:
        super().__init__(daemon=True)
        self.fd, self.limit, self.nonce = fd, limit, nonce
        self.head = bytearray()
        self.tail = bytearray()
        self.total = 0
        self.records: dict[str, str] = {}
        self._carry = b""

    def run(self) -> None:
        try:
            while chunk := os.read(self.fd, 65536):
                self.total += len(chunk)
                if len(self.head) < self.limit:
                    self.head += chunk[: self.limit - len(self.head)]
                self.tail += chunk
                del self.tail[: max(0, len(self.tail) - self.limit)]
                if self.nonce:
                    self._scan(chunk)
        except OSError:
            pass

    def _scan(self, chunk: bytes) -> None:
        buf = self._carry + chunk
        pos, keep_from = 0, len(buf) - len(self.nonce)
        while (at := buf.find(self.nonce, pos)) >= 0:
            end = buf.find(b"\n", at)
            if end < 0:
                keep_from = at
                break
            kind, _, value = buf[at + len(self.nonce) + 1 : end].decode("utf-8", "replace").partition(":")
            self.records.setdefault(kind, value)
            pos = keep_from = end + 1
        self._carry = buf[max(0, keep_from, len(buf) - _RECORD_MAX) :]

    def _clean(self, data: bytearray) -> str:
        if self.nonce:
            data = re.sub(rb"\n?" + re.escape(self.nonce) + rb":[^\n]*\n?", b"", bytes(data))
        return bytes(data).decode("utf-8", "replace")

    def first(self) -> str:
        """The stream's first ``limit`` bytes, records removed, with a note of what was cut."""
        cut = self.total - len(self.head)
        return self._clean(self.head) + (f"\n[... {cut} more bytes truncated]" if cut else "")

    def last(self) -> str:
        """The stream's last ``limit`` bytes, with a note of what was cut."""
        cut = self.total - len(self.tail)
        return (f"[{cut} earlier bytes truncated ...]\n" if cut else "") + self._clean(self.tail)

    def last_line(self) -> str:
        lines = [line.strip() for line in self._clean(self.tail).splitlines() if line.strip()]
        return lines[-1][:_DETAIL_MAX] if lines else ""


def _keep_paths() -> list[str]:
    """Directories the interpreter needs; bound back read-only where the sandbox hides their parent."""
    paths = {
        os.path.realpath(p)
        for p in (
            sys.base_prefix,
            sys.base_exec_prefix,
            sys.prefix,
            sys.exec_prefix,
            os.path.dirname(sys.executable),
        )
    }
    paths.add(os.path.dirname(os.path.realpath(sys.executable)))
    return [p for p in sorted(paths) if not any(p != q and p.startswith(q.rstrip("/") + "/") for q in paths)]


def _hide_paths() -> list[str]:
    homes = {os.path.expanduser("~"), os.environ.get("HOME", "")}
    return ["/root", "/home", "/run", *sorted(os.path.realpath(h) for h in homes if h)]


def _sweep(uid: int) -> None:
    """Kill every process of ``uid``: ``kill(-1, SIGKILL)`` sent as that uid."""
    subprocess.run(
        ["/bin/sh", "-c", "kill -9 -1 2>/dev/null; exit 0"],
        user=uid,
        group=uid,
        extra_groups=[],
        env={},
        cwd="/",
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        close_fds=True,
        timeout=30,
        check=False,
    )


def _signal_name(num: int) -> str:
    try:
        return signal.Signals(num).name
    except ValueError:
        return f"signal {num}"


@dataclass
class _Run:
    """What the supervisor saw: exit status, CPU seconds, timeout, the captured streams."""

    returncode: int | None
    cpu_s: float
    timed_out: bool
    wall_s: float
    out: _Capture
    err: _Capture


def _execute(
    source: str, limits: SandboxLimits, entry: str | None, mode: str, userns: bool | None = None
) -> SandboxResult:
    """Run ``source`` under ``mode``; ``userns``: make the namespaces through a user namespace."""
    root = os.geteuid() == 0
    if userns is None:
        userns = _variant(mode)
    if mode == "rlimits" and not root:
        raise SandboxUnavailableError(
            "isolation 'rlimits' drops to an unprivileged uid, which needs root; "
            "use 'namespaces' or (trusted code only) 'rlimits-same-uid'."
        )
    if mode == "rlimits-same-uid" and root:
        raise SandboxUnavailableError(
            "isolation 'rlimits-same-uid' would run the program as root; use 'rlimits'."
        )
    unshare = shutil.which("unshare") if mode == "namespaces" else None
    if mode == "namespaces" and unshare is None:
        raise SandboxUnavailableError("isolation 'namespaces' needs util-linux's 'unshare' command on PATH.")
    with _uids.take() if root else _no_uid() as uid:
        workdir = tempfile.mkdtemp(prefix="mergesearch-sandbox-")
        try:
            main = os.path.join(workdir, "main.py")
            with open(main, "wb") as f:
                f.write(source.encode("utf-8", "replace"))
            python = [sys.executable, "-I", "-S", "-c", _CHILD]
            env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}
            kwargs: dict = {}
            if mode == "namespaces":
                flags = [
                    "--pid",
                    "--fork",
                    "--kill-child",
                    "--mount-proc",
                    "--net",
                    "--mount",
                    "--ipc",
                    "--uts",
                ]
                argv = [unshare, *(["--user", "--map-root-user"] if userns else []), *flags, "--", *python]
                env.update(HOME=_WORK, TMPDIR="/tmp")
            else:
                argv = python
                env.update(HOME=workdir, TMPDIR=workdir)
            if uid is not None and (mode == "rlimits" or userns):
                for p in (workdir, main):
                    os.chown(p, uid, uid)
                kwargs = {"user": uid, "group": uid, "extra_groups": []}
            header = {
                "mode": mode,
                "nonce": secrets.token_hex(16),
                "entry": entry,
                "work": _WORK,
                "keep": _keep_paths(),
                "hide": _hide_paths(),
                "scratch_bytes": limits.scratch_bytes,
                "uid": None if userns else uid,
                "gid": None if userns else uid,
                "same_uid": mode == "rlimits-same-uid",
                "limits": {
                    "cpu": _cpu_rlimit(limits),
                    "memory_bytes": limits.memory_bytes,
                    "file_size_bytes": limits.file_size_bytes,
                    "max_processes": limits.max_processes,
                },
            }
            run = _supervise(argv, env, kwargs, header, workdir, limits, uid, mode)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
    return _result(run, limits, mode)


def _cpu_rlimit(limits: SandboxLimits) -> int:
    return max(1, math.ceil(limits.cpu_s))


def _supervise(
    argv: list[str],
    env: dict,
    kwargs: dict,
    header: dict,
    workdir: str,
    limits: SandboxLimits,
    uid: int | None,
    mode: str,
) -> _Run:
    """Start the child, send the header, wait up to ``wall_s``, kill its process group, sweep its uid."""
    start = time.monotonic()
    try:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=workdir,
            env=env,
            start_new_session=True,
            close_fds=True,
            **kwargs,
        )
    except OSError as err:
        raise SandboxUnavailableError(f"could not start the sandbox ({mode}): {err}") from err
    out = _Capture(proc.stdout.fileno(), limits.output_bytes, header["nonce"].encode())
    err = _Capture(proc.stderr.fileno(), limits.output_bytes)
    out.start()
    err.start()
    exited = threading.Event()

    def wait_exit() -> None:
        try:
            os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)
        except ChildProcessError:
            pass
        finally:
            exited.set()

    threading.Thread(target=wait_exit, daemon=True).start()
    timed_out = False
    returncode: int | None = None
    cpu = 0.0
    try:
        with suppress(OSError):
            proc.stdin.write(json.dumps(header).encode() + b"\n")
            proc.stdin.close()
        timed_out = not exited.wait(limits.wall_s)
    finally:
        with suppress(OSError):
            os.killpg(proc.pid, signal.SIGKILL)
        exited.wait()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
            returncode = os.waitstatus_to_exitcode(status)
            cpu = usage.ru_utime + usage.ru_stime
        except ChildProcessError:
            pass
        proc.returncode = -1 if returncode is None else returncode
        wall = time.monotonic() - start
        if uid is not None:
            _sweep(uid)
        for capture, stream in ((out, proc.stdout), (err, proc.stderr)):
            capture.join(5)
            if not capture.is_alive():
                stream.close()
    return _Run(returncode, cpu, timed_out, wall, out, err)


def _result(run: _Run, limits: SandboxLimits, mode: str) -> SandboxResult:
    """Classify a finished run into the reason vocabulary of the module docstring."""
    records = run.out.records
    if "setup" in records:
        raise SandboxUnavailableError(f"the sandbox ({mode}) failed to set itself up: {records['setup']}")
    returncode, cpu = run.returncode, run.cpu_s
    if "exit" in records:
        raw, _, used = records["exit"].partition(":")
        returncode, cpu = os.waitstatus_to_exitcode(int(raw)), float(used or 0)
    status = records.get("status")
    detail = run.err.last_line()
    if run.timed_out:
        reason, detail, returncode = "timeout", f"wall-clock limit of {limits.wall_s:g} s reached", None
    elif status is not None:
        reason = status
    elif returncode is not None and returncode < 0:
        sig = -returncode
        if sig == signal.SIGXCPU or (sig == signal.SIGKILL and cpu >= _cpu_rlimit(limits)):
            reason, detail = "cpu limit", f"CPU limit of {_cpu_rlimit(limits)} s reached ({cpu:.2f} s used)"
        else:
            reason = f"killed by signal {_signal_name(sig)}"
    elif returncode == 0:
        reason = "early exit"
    else:
        reason = f"exit code {returncode}"
    if reason == "passed" and returncode != 0:
        reason = f"exit code {returncode}"
    if reason == "early exit" or reason.startswith("exit code"):
        detail = detail or f"exited with status {returncode} before the tests finished"
    passed = reason == "passed"
    return SandboxResult(
        passed=passed,
        reason=reason,
        detail="" if passed else detail,
        returncode=returncode,
        wall_s=round(run.wall_s, 3),
        stdout=run.out.first(),
        stderr=run.err.last(),
        isolation=mode,
    )


def _try(mode: str, userns: bool) -> str | None:
    try:
        result = _execute("x = 1\n\nassert x == 1\n", SandboxLimits(wall_s=30.0), None, mode, userns)
    except (SandboxUnavailableError, OSError) as err:
        return str(err)
    if not result.passed:
        return f"{result.reason}: {result.detail or result.stderr[-_DETAIL_MAX:]}"
    return None


@functools.cache
def _setup(mode: str) -> tuple[bool, str | None]:
    """(whether ``mode`` uses a user namespace, why it cannot run here or None), probed once.

    As root, namespaces are made directly (needs CAP_SYS_ADMIN), else from the run's uid
    through a user namespace (needs an interpreter that uid can read).
    """
    variants = [False, True] if mode == "namespaces" and os.geteuid() == 0 else [mode == "namespaces"]
    reasons = []
    for userns in variants:
        why = _try(mode, userns)
        if why is None:
            return userns, None
        reasons.append(why)
    return variants[-1], "; ".join(reasons)


def _probe(mode: str) -> str | None:
    """None when ``mode`` runs a trivial passing program on this machine, else why not."""
    return _setup(mode)[1]


def _variant(mode: str) -> bool:
    return _setup(mode)[0]


@functools.cache
def isolation_mode() -> str:
    """The strongest isolation that works here: ``namespaces``, ``rlimits``, ``rlimits-same-uid`` or ``none``.

    Probed once per process by running a trivial program; a fallback is logged as a warning.
    """
    why = _probe("namespaces")
    if why is None:
        return "namespaces"
    fallback = "rlimits" if os.geteuid() == 0 else "rlimits-same-uid"
    why_not = _probe(fallback)
    if why_not is None:
        log.warning("sandbox: namespaces unavailable (%s); falling back to %r isolation", why, fallback)
        return fallback
    log.warning("sandbox: no isolation works: namespaces: %s; %s: %s", why, fallback, why_not)
    return "none"


_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


def _resolve(isolation: str | None) -> str:
    """The mode to run under; raises when it cannot run here."""
    if isolation is None:
        mode = isolation_mode()
        if mode == "none":
            raise SandboxUnavailableError(
                "no sandbox isolation works on this machine (see the warning logged by "
                "mergesearch.eval.sandbox); "
                "permit user namespaces, or install Python where an unprivileged uid can read it."
            )
        return mode
    if isolation not in MODES:
        raise ConfigError(f"unknown sandbox isolation {isolation!r}; use one of {', '.join(MODES)}, or None.")
    why = _probe(isolation)
    if why is not None:
        raise SandboxUnavailableError(f"isolation {isolation!r} does not work on this machine: {why}")
    return isolation


def run_python(
    program: str,
    *,
    tests: str = "",
    limits: SandboxLimits = SandboxLimits(),
    entry: str | None = None,
    isolation: str | None = None,
) -> SandboxResult:
    """Run ``program`` then ``tests`` in the sandbox; passed only if the tests ran to the end.

    ``entry``: name of the function under test (HumanEval's ``entry_point``): it must be defined
    as a callable, and if the tests define ``check``, ``check(<entry>)`` runs after them.
    ``isolation``: one of ``MODES`` to insist on (default: ``isolation_mode()``).
    Raises ``SandboxUnavailableError`` when that isolation cannot run here.
    """
    for name, value in (("program", program), ("tests", tests)):
        if not isinstance(value, str):
            raise ConfigError(
                f"run_python: {name} must be a str of Python source, got {type(value).__name__}."
            )
    if not isinstance(limits, SandboxLimits):
        raise ConfigError(f"run_python: limits must be a SandboxLimits, got {type(limits).__name__}.")
    if entry is not None and (not isinstance(entry, str) or not _IDENT.match(entry)):
        raise ConfigError(
            f"run_python: entry must be a Python identifier (the function's name), got {entry!r}."
        )
    return _execute(program + "\n\n" + tests, limits, entry, _resolve(isolation))


def run_many(
    items: Sequence[tuple[str, str]],
    limits: SandboxLimits = SandboxLimits(),
    max_workers: int = 2,
    *,
    isolation: str | None = None,
) -> list[SandboxResult]:
    """``run_python(program, tests=tests)`` for each item, ``max_workers`` at a time; results in order."""
    if isinstance(max_workers, bool) or not isinstance(max_workers, int) or max_workers < 1:
        raise ConfigError(f"run_many: max_workers must be an integer >= 1, got {max_workers!r}.")
    items = list(items)
    for i, item in enumerate(items):
        if not (isinstance(item, tuple) and len(item) == 2 and all(isinstance(s, str) for s in item)):
            raise ConfigError(
                f"run_many: item {i} must be a (program, tests) tuple of two str, got {item!r:.80}."
            )
    if not items:
        return []
    mode = _resolve(isolation)
    with ThreadPoolExecutor(max_workers=min(max_workers, len(items))) as pool:
        return list(pool.map(lambda it: run_python(it[0], tests=it[1], limits=limits, isolation=mode), items))
