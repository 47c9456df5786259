"""Checkpoint: lazy, safe reading of single-file and sharded safetensors folders, and clear
CheckpointErrors (naming the file) for every kind of corruption."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mergesearch.errors import CheckpointError
from mergesearch.io.checkpoint import Checkpoint, open_checkpoints, read_header

INDEX = "model.safetensors.index.json"


def all_tensors(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def split_file(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + length]), raw[8 + length:]


def join_file(path: Path, header: dict, data: bytes) -> None:
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    path.write_bytes(struct.pack("<Q", len(head)) + head + data)


@pytest.fixture
def single(tmp_path, qwen3_family) -> Path:
    """A private copy of the single-file base model (safe to corrupt)."""
    return Path(shutil.copytree(qwen3_family["base"], tmp_path / "single"))


@pytest.fixture
def sharded(tmp_path, qwen3_family) -> Path:
    """A private copy of the sharded ft1 (safe to corrupt)."""
    return Path(shutil.copytree(qwen3_family["ft1"], tmp_path / "sharded"))


# ---------------------------------------------------------------------------------------------
# reading


def test_single_file_checkpoint(qwen3_family):
    folder = qwen3_family["base"]
    ckpt = Checkpoint(folder)
    reference = load_file(folder / "model.safetensors")
    assert set(ckpt.tensors) == set(reference)
    assert ckpt.num_layers == 4
    assert ckpt.model_type == "qwen3"
    for name, tensor in reference.items():
        info = ckpt.info(name)
        assert info.file == folder / "model.safetensors"
        assert info.shape == tuple(tensor.shape)
        got = ckpt.read(name)
        assert got.dtype == tensor.dtype and torch.equal(got, tensor), name
    ckpt.close()


def test_sharded_checkpoint(qwen3_family):
    folder = qwen3_family["ft1"]
    shards = sorted(folder.glob("*.safetensors"))
    assert len(shards) >= 3 and (folder / INDEX).is_file()
    ckpt = Checkpoint(folder)
    weight_map = json.loads((folder / INDEX).read_text())["weight_map"]
    reference = all_tensors(folder)
    assert set(ckpt.tensors) == set(reference) == set(weight_map)
    assert ckpt.num_layers == 4
    for name, tensor in reference.items():
        assert ckpt.info(name).file.name == weight_map[name]
        assert torch.equal(ckpt.read(name), tensor), name
    # the same tensors as the single-file model they were perturbed from, by name and shape
    base = Checkpoint(qwen3_family["base"])
    assert {n: i.shape for n, i in base.tensors.items()} == {
        n: i.shape for n, i in ckpt.tensors.items()}


def test_tied_lm_head_resolves_to_embeddings(qwen3_family):
    ckpt = Checkpoint(qwen3_family["base"])
    assert ckpt.tied_embeddings
    assert "lm_head.weight" not in ckpt.tensors
    assert ckpt.has("lm_head.weight")
    assert ckpt.info("lm_head.weight") == ckpt.info("model.embed_tokens.weight")
    assert torch.equal(ckpt.read("lm_head.weight"), ckpt.read("model.embed_tokens.weight"))


def test_untied_model_has_its_own_lm_head(llama_family):
    folder = llama_family["base"]
    ckpt = Checkpoint(folder)
    assert not ckpt.tied_embeddings
    assert ckpt.num_layers == 4
    assert "lm_head.weight" in ckpt.tensors
    info = ckpt.info("lm_head.weight")
    assert info.name == "lm_head.weight"
    reference = load_file(folder / "model.safetensors")
    assert torch.equal(ckpt.read("lm_head.weight"), reference["lm_head.weight"])
    assert not torch.equal(ckpt.read("lm_head.weight"), ckpt.read("model.embed_tokens.weight"))


def test_untied_model_without_lm_head_does_not_borrow_embeddings(tmp_path, qwen3_family):
    folder = Path(shutil.copytree(qwen3_family["base"], tmp_path / "untied"))
    config = json.loads((folder / "config.json").read_text())
    config["tie_word_embeddings"] = False
    (folder / "config.json").write_text(json.dumps(config))
    ckpt = Checkpoint(folder)
    assert not ckpt.has("lm_head.weight")
    with pytest.raises(CheckpointError, match="no tensor 'lm_head.weight'"):
        ckpt.read("lm_head.weight")


def test_relative_paths_resolve_from_base_dir(qwen3_family):
    base = qwen3_family["base"]
    ckpts = open_checkpoints([base.name], base_dir=base.parent)
    assert ckpts[base.name].path == base.parent / base.name


# ---------------------------------------------------------------------------------------------
# corruption: every case is a CheckpointError that names the file


def expect_error(folder: Path, *fragments: str) -> str:
    with pytest.raises(CheckpointError) as info:
        Checkpoint(folder)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return message


def test_truncated_file(single):
    path = single / "model.safetensors"
    raw = path.read_bytes()
    path.write_bytes(raw[:-100])
    msg = expect_error(single, str(path), "truncated", "Re-download")
    assert "claims bytes" in msg


def test_file_shorter_than_header_length(single):
    path = single / "model.safetensors"
    path.write_bytes(b"\x01\x02\x03")
    expect_error(single, str(path), "truncated", "no safetensors header")


def test_header_lies_about_offsets(single):
    path = single / "model.safetensors"
    header, data = split_file(path)
    name = "model.norm.weight"
    start, end = header[name]["data_offsets"]
    shift = len(data)  # same size, but entirely past the end of the data section
    header[name]["data_offsets"] = [start + shift, end + shift]
    join_file(path, header, data)
    expect_error(single, str(path), repr(name), f"[{start + shift}, {end + shift})",
                 f"data section has {len(data)} bytes")


def test_header_offsets_disagree_with_shape(single):
    path = single / "model.safetensors"
    header, data = split_file(path)
    name = "model.norm.weight"
    header[name]["shape"] = [header[name]["shape"][0] * 2]
    join_file(path, header, data)
    expect_error(single, str(path), repr(name), "corrupted")


def test_header_length_larger_than_file(single):
    path = single / "model.safetensors"
    raw = path.read_bytes()
    claimed = len(raw) + 1000
    path.write_bytes(struct.pack("<Q", claimed) + raw[8:])
    expect_error(single, str(path), f"header claims {claimed} bytes",
                 f"the file has {len(raw)}")


def test_huge_header_length(single):
    path = single / "model.safetensors"
    raw = path.read_bytes()
    path.write_bytes(struct.pack("<Q", 2**63) + raw[8:])
    expect_error(single, str(path), "not a safetensors file")


def test_garbage_header_json(single):
    path = single / "model.safetensors"
    raw = bytearray(path.read_bytes())
    (length,) = struct.unpack("<Q", raw[:8])
    raw[8:8 + length] = b"{garbage!" + b"x" * (length - 9)
    path.write_bytes(bytes(raw))
    expect_error(single, str(path), "corrupted safetensors header", "not JSON")


def test_header_that_is_not_an_object(single):
    path = single / "model.safetensors"
    _, data = split_file(path)
    head = b"[1, 2, 3]" + b" " * 7
    path.write_bytes(struct.pack("<Q", len(head)) + head + data)
    expect_error(single, str(path), "corrupted safetensors header")


def test_malformed_header_entry(single):
    path = single / "model.safetensors"
    header, data = split_file(path)
    del header["model.norm.weight"]["dtype"]
    join_file(path, header, data)
    expect_error(single, str(path), "'model.norm.weight'", "malformed")


def test_unknown_dtype_in_header(single):
    path = single / "model.safetensors"
    header, data = split_file(path)
    header["model.norm.weight"]["dtype"] = "F7"
    join_file(path, header, data)
    expect_error(single, str(path), "'model.norm.weight'", "unknown dtype 'F7'")


def test_index_names_missing_shard(sharded):
    index = sharded / INDEX
    victim = sorted(sharded.glob("*.safetensors"))[1]
    victim.unlink()
    expect_error(sharded, str(index), repr(victim.name), "missing")


def test_index_lists_tensor_not_in_shards(sharded):
    index = sharded / INDEX
    data = json.loads(index.read_text())
    some_shard = next(iter(data["weight_map"].values()))
    data["weight_map"]["model.layers.9.mlp.up_proj.weight"] = some_shard
    index.write_text(json.dumps(data))
    expect_error(sharded, str(index), "'model.layers.9.mlp.up_proj.weight'", "incomplete")


def test_index_that_is_not_json(sharded):
    index = sharded / INDEX
    index.write_text("{not json")
    expect_error(sharded, str(index), "malformed")


def test_config_that_is_not_json(single):
    cfg = single / "config.json"
    cfg.write_text("{'model_type': qwen3,")
    expect_error(single, str(cfg), "not valid JSON")


def test_config_that_is_not_an_object(single):
    cfg = single / "config.json"
    cfg.write_text("[1, 2]")
    expect_error(single, str(cfg), "JSON object")


def test_missing_config(single):
    (single / "config.json").unlink()
    expect_error(single, str(single), "no config.json")


def test_layer_count_disagrees_with_config(single):
    cfg = single / "config.json"
    config = json.loads(cfg.read_text())
    config["num_hidden_layers"] = 6
    cfg.write_text(json.dumps(config))
    ckpt = Checkpoint(single)
    with pytest.raises(CheckpointError, match="num_hidden_layers=6"):
        ckpt.num_layers


def test_a_file_instead_of_a_folder(single):
    with pytest.raises(CheckpointError, match="is a file"):
        Checkpoint(single / "model.safetensors")


def test_read_header_of_intact_file_matches_safetensors(qwen3_family):
    path = qwen3_family["base"] / "model.safetensors"
    infos = read_header(path)
    reference = load_file(path)
    assert set(infos) == set(reference)
    for name, t in reference.items():
        assert infos[name].shape == tuple(t.shape)
        assert infos[name].nbytes == t.numel() * t.element_size()
