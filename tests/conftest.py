"""Shared session-scoped fixtures: tiny deterministic model families and a tokenizer."""

from __future__ import annotations

from pathlib import Path

import pytest

from mergesearch.testing import build_family, build_tiny_model, build_tokenizer, perturb_model


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


def _postgres_bin() -> Path | None:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"))
    return found[-1].parent if found else None


@pytest.fixture(scope="session")
def postgres_url():
    """A throwaway PostgreSQL server (Debian's package, installed with apt-get if missing)."""
    import os
    import shutil
    import socket
    import subprocess
    import tempfile

    bindir = _postgres_bin()
    if bindir is None and os.geteuid() == 0 and shutil.which("apt-get"):
        subprocess.run(["apt-get", "install", "-y", "-q", "postgresql"], capture_output=True,
                       env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"}, timeout=600)
        bindir = _postgres_bin()
    if bindir is None:
        pytest.skip("PostgreSQL server is not installed and `apt-get install postgresql` failed "
                    "(needs root and the Debian package mirror)")
    if os.geteuid() == 0:
        runas = ["runuser", "-u", "postgres", "--"]
        data = Path(tempfile.mkdtemp(prefix="mergesearch-pg-"))
        shutil.chown(data, "postgres", "postgres")
    else:
        runas = []
        data = Path(tempfile.mkdtemp(prefix="mergesearch-pg-"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    subprocess.run([*runas, str(bindir / "initdb"), "-D", str(data / "db"), "-A", "trust", "-U", "postgres",
                    "--no-sync"], check=True, capture_output=True)
    subprocess.run([*runas, str(bindir / "pg_ctl"), "-D", str(data / "db"), "-w", "-l", str(data / "log"), "-o",
                    f"-p {port} -k {data} -c listen_addresses=127.0.0.1 -c fsync=off", "start"],
                   check=True, capture_output=True)
    try:
        subprocess.run([*runas, str(bindir / "psql"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres",
                        "-c", "CREATE DATABASE mergesearch"], check=True, capture_output=True)
        yield f"postgresql://postgres@127.0.0.1:{port}/mergesearch"
    finally:
        subprocess.run([*runas, str(bindir / "pg_ctl"), "-D", str(data / "db"), "-m", "immediate", "stop"],
                       capture_output=True)
        shutil.rmtree(data, ignore_errors=True)
