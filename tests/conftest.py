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
