"""Shared session-scoped fixtures: tiny deterministic model families, a tokenizer, and a throwaway
PostgreSQL server."""

from __future__ import annotations

from pathlib import Path

import pytest

from mergesearch.testing import (
    build_family,
    build_tiny_model,
    build_tokenizer,
    perturb_model,
)


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 512-token byte-level BPE tokenizer with chatml special tokens."""
    return build_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="session")
def qwen3_family(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> dict[str, Path]:
    """Qwen3 base (4 layers, tied embeddings, float32) + ft0..ft2; ft1 is sharded (>= 3 shards)."""
    root = tmp_path_factory.mktemp("qwen3_family")
    base = build_tiny_model(
        root / "base",
        "qwen3",
        num_layers=4,
        tie_word_embeddings=True,
        dtype="float32",
        tokenizer_dir=tokenizer_dir,
    )
    family = {"base": base}
    for i in range(3):
        shard = "200KB" if i == 1 else None
        family[f"ft{i}"] = perturb_model(base, root / f"ft{i}", seed=1000 + i, max_shard_size=shard)
    return family


@pytest.fixture(scope="session")
def llama_family(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> dict[str, Path]:
    """Llama base (4 layers, untied embeddings, float32) + ft0, ft1."""
    return build_family(
        tmp_path_factory.mktemp("llama_family"),
        "llama",
        n_finetunes=2,
        num_layers=4,
        tie_word_embeddings=False,
        dtype="float32",
        tokenizer_dir=tokenizer_dir,
    )


@pytest.fixture(scope="module")
def one_torch_thread():
    """Torch on one thread for a module: tiny models gain nothing from threads, and on a busy
    shared CPU extra threads cost a lot."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _postgres_bindir() -> Path | None:
    """The newest PostgreSQL server binaries: Debian's /usr/lib/postgresql/N/bin, else initdb on PATH."""
    import re
    import shutil

    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"),
                   key=lambda p: [int(x) for x in re.findall(r"\d+", p.parent.parent.name)])
    if found:
        return found[-1].parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb and (Path(initdb).parent / "pg_ctl").exists() else None


def _install_postgres() -> str:
    """apt-get install postgresql (as root); '' when it worked, else why not."""
    import os
    import shutil
    import subprocess

    if shutil.which("apt-get") is None:
        return "the PostgreSQL server is not installed and this machine has no apt-get"
    if os.geteuid() != 0:
        return "the PostgreSQL server is not installed and installing it needs root (apt-get install postgresql)"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    cmd = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "postgresql"]
    done = None
    for step in ([cmd], [["apt-get", "update", "-q"], cmd]):
        try:
            for c in step:
                done = subprocess.run(c, check=False, capture_output=True, text=True, env=env, timeout=900)
        except (OSError, subprocess.TimeoutExpired) as err:
            return f"`apt-get install postgresql` failed: {err}"
        if done.returncode == 0 and _postgres_bindir() is not None:
            return ""
    tail = (done.stderr or done.stdout).strip().splitlines()[-1:] if done else []
    return f"`apt-get install postgresql` failed: {tail[0] if tail else 'no server binaries after install'}"


@pytest.fixture(scope="session")
def postgres_url():
    """``postgresql://postgres:PASSWORD@127.0.0.1:PORT/mergesearch`` on a throwaway server.

    A fresh cluster (Debian's package; apt-get installs it when missing, or the tests skip saying
    why) in a temp folder, run as the ``postgres`` user when we are root, password auth over TCP on
    127.0.0.1 at a free port, durability off for speed (about 1.5 s to start). Removed at the end.
    """
    import os
    import pwd
    import secrets
    import shutil
    import socket
    import subprocess
    import tempfile

    bindir = _postgres_bindir()
    if bindir is None:
        why = _install_postgres()
        bindir = _postgres_bindir()
        if bindir is None:
            pytest.skip(f"no PostgreSQL server for the storage tests: {why}")
    root = os.geteuid() == 0
    base = Path(tempfile.mkdtemp(prefix="mergesearch-pg-", dir="/tmp" if root else None))
    runas: list[str] = []
    if root:
        try:
            pw = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("PostgreSQL is installed but there is no `postgres` user to run it as (initdb refuses root)")
        os.chown(base, pw.pw_uid, pw.pw_gid)
        runas = ["runuser", "-u", "postgres", "--"]
    password = "ms-" + secrets.token_hex(8)
    (base / "pw").write_text(password + "\n")
    if root:
        os.chown(base / "pw", pw.pw_uid, pw.pw_gid)

    def run(*cmd: str) -> subprocess.CompletedProcess:
        return subprocess.run([*runas, *cmd], check=False, capture_output=True, text=True, timeout=120)

    def log_tail() -> str:
        try:
            return (base / "log").read_text()[-2000:]
        except OSError:
            return ""

    started = False
    try:
        init = run(str(bindir / "initdb"), "-D", str(base / "db"), "-U", "postgres", "--auth-local=trust",
                   "--auth-host=scram-sha-256", f"--pwfile={base / 'pw'}", "--no-sync", "--no-instructions",
                   "-E", "UTF8", "--locale=C")
        assert init.returncode == 0, f"initdb failed: {init.stderr or init.stdout}"
        opts = ("-c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off -c full_page_writes=off "
                f"-c max_connections=60 -c shared_buffers=16MB -k {base}")
        for _ in range(5):
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            start = run(str(bindir / "pg_ctl"), "-D", str(base / "db"), "-w", "-t", "60", "-l", str(base / "log"),
                        "-o", f"-p {port} {opts}", "start")
            if start.returncode == 0:
                started = True
                break
        assert started, f"PostgreSQL did not start: {start.stderr or start.stdout}\n{log_tail()}"
        made = run(str(bindir / "psql"), "-h", str(base), "-p", str(port), "-U", "postgres", "-q",
                   "-v", "ON_ERROR_STOP=1", "-c", "CREATE DATABASE mergesearch")
        assert made.returncode == 0, f"CREATE DATABASE failed: {made.stderr}"
        yield f"postgresql://postgres:{password}@127.0.0.1:{port}/mergesearch"
    finally:
        if started:
            run(str(bindir / "pg_ctl"), "-D", str(base / "db"), "-m", "immediate", "stop")
        shutil.rmtree(base, ignore_errors=True)
