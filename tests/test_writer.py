"""The streaming SafetensorsWriter and AtomicDir: exact round trips, sharding, atomicity on
failure (exceptions, a full disk, stale temporary folders) and the free-space precheck."""

from __future__ import annotations

import json
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from mergesearch.cli import main
from mergesearch.errors import ConfigError, OutputError
from mergesearch.io.writer import TORCH_TO_ST, AtomicDir, OutTensor, SafetensorsWriter, parse_size

INDEX = "model.safetensors.index.json"


def make_tensors() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {
        "model.embed_tokens.weight": torch.randn(40, 16, generator=gen),
        "model.layers.0.self_attn.q_proj.weight": torch.randn(16, 16, generator=gen)
        .to(torch.bfloat16),
        "model.layers.0.mlp.up_proj.weight": torch.randn(24, 16, generator=gen).to(torch.float16),
        # non-contiguous input: must be written in its logical (row-major) order
        "model.layers.0.mlp.down_proj.weight": torch.randn(24, 16, generator=gen).t(),
        "model.layers.0.input_layernorm.weight": torch.randn(16, generator=gen)
        .to(torch.bfloat16),
        "model.norm.weight": torch.randn(16, generator=gen).to(torch.float16),
        "scalar": torch.tensor(3.25),
        "empty": torch.zeros(0, 4),
    }


def spec_of(name: str, t: torch.Tensor) -> OutTensor:
    return OutTensor(name, TORCH_TO_ST[str(t.dtype).removeprefix("torch.")], tuple(t.shape))


def write_all(dest: Path, tensors: dict[str, torch.Tensor], max_shard_size="5GB",
              order=None) -> Path:
    specs = [spec_of(n, t) for n, t in tensors.items()]
    with AtomicDir(dest) as out:
        writer = SafetensorsWriter(out, specs, max_shard_size)
        for name in order or reversed(list(tensors)):  # any order, not the layout's
            writer.write(name, tensors[name])
        writer.finish()
        return out.commit()


def assert_same(loaded: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor]) -> None:
    assert set(loaded) == set(tensors)
    for name, t in tensors.items():
        assert loaded[name].dtype == t.dtype, name
        assert loaded[name].shape == t.shape, name
        assert torch.equal(loaded[name], t), name


def partials(parent: Path, name: str) -> list[Path]:
    return sorted(parent.glob(f".{name}.partial-*"))


# ---------------------------------------------------------------------------------------------
# round trips


def test_single_shard_round_trip(tmp_path):
    tensors = make_tensors()
    dest = write_all(tmp_path / "out", tensors)
    assert sorted(p.name for p in dest.iterdir()) == ["model.safetensors"]
    assert_same(load_file(dest / "model.safetensors"), tensors)


def test_several_shards_round_trip_and_index(tmp_path):
    tensors = make_tensors()
    sizes = {n: t.numel() * t.element_size() for n, t in tensors.items()}
    limit = 2600  # embed_tokens alone (2560 B) fills a shard; the rest spread over several
    dest = write_all(tmp_path / "out", tensors, max_shard_size=limit)

    files = sorted(p.name for p in dest.glob("*.safetensors"))
    n = len(files)
    assert n >= 3
    assert files == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert not (dest / "model.safetensors").exists()

    index = json.loads((dest / INDEX).read_text())
    assert index["metadata"]["total_size"] == sum(sizes.values())
    assert set(index["weight_map"]) == set(tensors)
    assert set(index["weight_map"].values()) == set(files)

    loaded: dict[str, torch.Tensor] = {}
    for f in files:
        shard = load_file(dest / f)
        assert sum(sizes[k] for k in shard) <= limit or len(shard) == 1, f
        for name in shard:
            assert index["weight_map"][name] == f, name
        loaded.update(shard)
    assert_same(loaded, tensors)


def test_string_shard_size_and_tensor_larger_than_a_shard(tmp_path):
    tensors = {"big": torch.randn(64, 64), "small": torch.randn(4)}  # 16 KiB and 16 B
    dest = write_all(tmp_path / "out", tensors, max_shard_size="1KB")
    index = json.loads((dest / INDEX).read_text())
    assert index["weight_map"]["big"] != index["weight_map"]["small"]
    loaded = {}
    for f in set(index["weight_map"].values()):
        loaded.update(load_file(dest / f))
    assert_same(loaded, tensors)


def test_wrong_tensor_and_missing_tensor_are_refused(tmp_path):
    tensors = make_tensors()
    specs = [spec_of(n, t) for n, t in tensors.items()]
    dest = tmp_path / "out"
    with pytest.raises(OutputError, match="never written"):
        with AtomicDir(dest) as out:
            writer = SafetensorsWriter(out, specs)
            with pytest.raises(OutputError, match="expected F32"):
                writer.write("model.embed_tokens.weight", torch.zeros(40, 16, dtype=torch.float16))
            writer.write("scalar", tensors["scalar"])
            writer.finish()
    assert not dest.exists()
    assert not partials(tmp_path, "out")


# ---------------------------------------------------------------------------------------------
# parse_size


@pytest.mark.parametrize("value,expected", [
    ("500MB", 500 * 1000**2),
    ("2GiB", 2 * 1024**3),
    (123, 123),
    ("123", 123),
    ("1.5GB", 1_500_000_000),
    ("10kb", 10_000),
    ("5 GB", 5 * 1000**3),
    ("64KiB", 64 * 1024),
    ("5G", 5 * 1000**3),
])
def test_parse_size_accepts(value, expected):
    assert parse_size(value) == expected


@pytest.mark.parametrize("value", [
    "junk", "", "5XB", "-5MB", "0", "0GB", 0, -1, True, None, "5 MiBs", "MB", "1e3",
    "0.5",
])
def test_parse_size_rejects(value):
    with pytest.raises(ConfigError, match="Shard size"):
        parse_size(value)


# ---------------------------------------------------------------------------------------------
# atomicity


def test_exception_inside_atomic_dir_leaves_nothing(tmp_path):
    dest = tmp_path / "out"
    with pytest.raises(RuntimeError, match="boom"):
        with AtomicDir(dest) as out:
            tmp = out.tmp
            out.write_text("config.json", "{}")
            writer = SafetensorsWriter(out, [spec_of("x", torch.zeros(3))])
            writer.write("x", torch.zeros(3))
            assert tmp.is_dir() and (tmp / "model.safetensors").exists()
            raise RuntimeError("boom")
    assert not dest.exists()
    assert not tmp.exists()
    assert not partials(tmp_path, "out")
    assert list(tmp_path.iterdir()) == []


def test_existing_destination_needs_force(tmp_path):
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "old.txt").write_text("old")
    with pytest.raises(OutputError, match="already exists.*--force"):
        AtomicDir(dest)
    assert (dest / "old.txt").read_text() == "old"
    assert not partials(tmp_path, "out")


def test_failure_with_force_keeps_old_folder(tmp_path):
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "old.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with AtomicDir(dest, force=True) as out:
            out.write_text("new.txt", "new")
            raise RuntimeError("merge failed")
    assert sorted(p.name for p in dest.iterdir()) == ["old.txt"]
    assert (dest / "old.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_success_with_force_replaces_old_folder(tmp_path):
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "old.txt").write_text("old")
    with AtomicDir(dest, force=True) as out:
        out.write_text("new.txt", "new")
        out.commit()
    assert sorted(p.name for p in dest.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no .old-* or .partial-*


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_partial_folder_is_cleaned_up(tmp_path):
    import os

    dead = _dead_pid()
    stale = tmp_path / f".out.partial-{dead}-deadbeef"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half written")
    live = tmp_path / f".out.partial-{os.getpid()}-0000live"  # a running writer's: kept
    live.mkdir()
    other = tmp_path / f".other.partial-{dead}-deadbeef"  # another destination's: kept
    other.mkdir()

    with AtomicDir(tmp_path / "out") as out:
        out.write_text("a.txt", "a")
        out.commit()
    assert not stale.exists()
    assert live.is_dir() and other.is_dir()
    assert (tmp_path / "out" / "a.txt").read_text() == "a"


# ---------------------------------------------------------------------------------------------
# free space and a full disk


def test_free_space_precheck(tmp_path, monkeypatch):
    monkeypatch.setattr(AtomicDir, "free_bytes", lambda self: 100)
    tensors = make_tensors()
    dest = tmp_path / "out"
    seen: list[Path] = []
    with pytest.raises(OutputError, match="Not enough disk space") as info:
        with AtomicDir(dest) as out:
            try:
                SafetensorsWriter(out, [spec_of(n, t) for n, t in tensors.items()])
            finally:
                seen = list(out.tmp.iterdir())
    assert seen == [], "files were written before the free-space check"
    assert "Nothing was written" in str(info.value)
    assert not dest.exists()
    assert not partials(tmp_path, "out")


def _linear_yaml(tmp_path: Path, family: dict[str, Path]) -> Path:
    cfg = {"merge_method": "linear", "models": [
        {"model": str(family["base"]), "parameters": {"weight": 1.0}},
        {"model": str(family["ft0"]), "parameters": {"weight": 1.0}},
    ]}
    path = tmp_path / "merge.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


def test_free_space_precheck_through_cli(tmp_path, monkeypatch, capsys, qwen3_family):
    monkeypatch.setattr(AtomicDir, "free_bytes", lambda self: 1000)
    out = tmp_path / "merged"
    rc = main(["merge", str(_linear_yaml(tmp_path, qwen3_family)), str(out), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "error:" in err and "Not enough disk space" in err and "Traceback" not in err, err
    assert not out.exists()
    assert not partials(tmp_path, "merged")


def _merge_with_file_size_limit(config: Path, out: Path, limit: int, *extra: str):
    def limit_writes() -> None:  # runs in the child before exec
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes fail with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    code = "import sys; from mergesearch.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run(
        [sys.executable, "-c", code, "merge", str(config), str(out), "--quiet", *extra],
        preexec_fn=limit_writes, capture_output=True, text=True, timeout=120,
    )


# 1000 B: fails inside the first tensor's bytes; 300 KiB: fails part way through the shard.
@pytest.mark.parametrize("limit", [1000, 300 * 1024])
def test_disk_full_leaves_no_output(tmp_path, qwen3_family, limit):
    out = tmp_path / "merged"
    proc = _merge_with_file_size_limit(_linear_yaml(tmp_path, qwen3_family), out, limit)
    assert proc.returncode == 2, proc.stderr
    assert "error:" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert "Disk full (or file size limit)" in proc.stderr, proc.stderr
    assert f"Nothing was written to {out}" in proc.stderr, proc.stderr
    assert not out.exists()
    assert not partials(tmp_path, "merged")


def test_disk_full_with_force_keeps_old_output(tmp_path, qwen3_family):
    out = tmp_path / "merged"
    out.mkdir()
    (out / "old.txt").write_text("old")
    proc = _merge_with_file_size_limit(_linear_yaml(tmp_path, qwen3_family), out, 64 * 1024,
                                       "--force")
    assert proc.returncode == 2, proc.stderr
    assert "Disk full (or file size limit)" in proc.stderr, proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["old.txt"]
    assert (out / "old.txt").read_text() == "old"
    assert not partials(tmp_path, "merged")
