"""The bad-input corpus (tests/bad_inputs/cases.yaml): every malformed study file, merge YAML, eval
task, search space and checkpoint is refused through the CLI with exit code 2 and one `error:`
line naming the problem, never a traceback, and a refused merge leaves no output folder.

Text cases are files under tests/bad_inputs/; placeholders in them and in the command
({case}, {tmp}, {model}, {base}, {ft0}, {ft1}, {ckpt}) are filled in at test time. Checkpoint
cases build ``{ckpt}`` from the tiny qwen3 family plus the ``mutation`` the manifest names, so no
binary is committed."""

from __future__ import annotations

import json
import pickle
import shutil
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from mergesearch.cli import main
from mergesearch.testing import perturb_model

CORPUS = Path(__file__).parent / "bad_inputs"
MANIFEST = CORPUS / "cases.yaml"
CASES: list[dict[str, Any]] = yaml.safe_load(MANIFEST.read_text(encoding="utf-8"))["cases"]
TEXT_SUFFIXES = {".yaml", ".yml", ".json", ".jsonl"}


# ---------------------------------------------------------------------------------------------
# checkpoint mutations: each writes a broken copy of a tiny model into `dst`


def _single_file(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst / "model.safetensors"


def _header(path: Path) -> tuple[int, dict[str, Any], bytes]:
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return n, json.loads(data[8:8 + n]), data[8 + n:]


def _write_header(path: Path, header: dict[str, Any], body: bytes) -> None:
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + body)


def m_truncated(fam: dict[str, Path], dst: Path) -> None:
    f = _single_file(fam["base"], dst)
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])


def m_lying_offsets(fam: dict[str, Path], dst: Path) -> None:
    f = _single_file(fam["base"], dst)
    _, header, body = _header(f)
    name = next(k for k in header if k != "__metadata__")
    start, end = header[name]["data_offsets"]
    header[name]["data_offsets"] = [start, end + 4096]   # claims more bytes than its shape needs
    _write_header(f, header, body)


def m_header_too_long(fam: dict[str, Path], dst: Path) -> None:
    f = _single_file(fam["base"], dst)
    data = f.read_bytes()
    f.write_bytes(struct.pack("<Q", len(data) * 10) + data[8:])


def m_non_json_header(fam: dict[str, Path], dst: Path) -> None:
    f = _single_file(fam["base"], dst)
    junk = b"this is not json at all!"
    f.write_bytes(struct.pack("<Q", len(junk)) + junk + b"\0" * 64)


def m_empty_safetensors(fam: dict[str, Path], dst: Path) -> None:
    _single_file(fam["base"], dst).write_bytes(b"")


def m_bad_dtype_header(fam: dict[str, Path], dst: Path) -> None:
    f = _single_file(fam["base"], dst)
    _, header, body = _header(f)
    for k, v in header.items():
        if k != "__metadata__":
            v["dtype"] = "Q7"
    _write_header(f, header, body)


class _Marker:
    def __reduce__(self):
        return (print, ("unpickled!",))


def m_pickle_only(fam: dict[str, Path], dst: Path) -> None:
    dst.mkdir()
    shutil.copy(fam["base"] / "config.json", dst / "config.json")
    (dst / "pytorch_model.bin").write_bytes(pickle.dumps(_Marker()))


def m_auto_map(fam: dict[str, Path], dst: Path) -> None:
    shutil.copytree(fam["base"], dst)
    config = json.loads((dst / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    (dst / "config.json").write_text(json.dumps(config))


def m_shape_mismatch(fam: dict[str, Path], dst: Path) -> None:
    perturb_model(fam["base"], dst, seed=5, reshape={"model.layers.0.mlp.gate_proj.weight": (96, 64)})


def m_no_config(fam: dict[str, Path], dst: Path) -> None:
    shutil.copytree(fam["base"], dst)
    (dst / "config.json").unlink()


def m_config_not_json(fam: dict[str, Path], dst: Path) -> None:
    shutil.copytree(fam["base"], dst)
    (dst / "config.json").write_text("{'model_type': qwen3,")


def m_missing_shard(fam: dict[str, Path], dst: Path) -> None:
    shutil.copytree(fam["ft1"], dst)   # ft1 is sharded (>= 3 shards)
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    (dst / max(set(index["weight_map"].values()))).unlink()


def m_intact_copy(fam: dict[str, Path], dst: Path) -> None:
    shutil.copytree(fam["base"], dst)   # a good source, for cases about where the output goes


MUTATIONS: dict[str, Callable[[dict[str, Path], Path], None]] = {
    name[2:]: fn for name, fn in globals().items() if name.startswith("m_") and callable(fn)}


# ---------------------------------------------------------------------------------------------


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _fill(text: str, values: dict[str, str]) -> str:
    for key, value in values.items():
        text = text.replace("{" + key + "}", value)
    return text


def _materialise(case: dict[str, Any], tmp: Path, values: dict[str, str]) -> Path:
    """Copy the case file or folder into tmp with placeholders filled; the copy's path."""
    src = CORPUS / case["path"]
    dst = tmp / "case" / src.name
    dst.parent.mkdir(parents=True)
    if src.is_dir():
        shutil.copytree(src, dst)
        files = [p for p in dst.rglob("*") if p.is_file()]
    elif src.exists():
        shutil.copy(src, dst)
        files = [dst]
    else:
        return dst   # a case about a file that does not exist
    for f in files:
        if f.suffix in TEXT_SUFFIXES:
            try:
                f.write_text(_fill(f.read_text(encoding="utf-8"), values), encoding="utf-8")
            except UnicodeDecodeError:
                pass   # deliberately not UTF-8: left as it is
    return dst


def test_manifest_is_complete():
    assert len(CASES) >= 40, len(CASES)
    ids = [c["id"] for c in CASES]
    assert len(ids) == len(set(ids)), sorted({i for i in ids if ids.count(i) > 1})
    used = {(CORPUS / c["path"]).resolve() for c in CASES}
    for c in CASES:
        assert c.get("expect"), c["id"]
        assert c.get("mutation") is None or c["mutation"] in MUTATIONS, c["id"]
        assert (CORPUS / c["path"]).exists() or c.get("missing"), c["id"]
    on_disk = {p.resolve() for p in CORPUS.iterdir() if p.name != "cases.yaml"}
    on_disk = {q.resolve() for d in on_disk for q in (d.iterdir() if d.is_dir() else [d])}
    unused = sorted(str(p.relative_to(CORPUS.resolve())) for p in on_disk - used)
    assert not unused, f"corpus entries no case uses: {unused}"
    assert set(MUTATIONS) <= {c.get("mutation") for c in CASES}, "a mutation no case uses"


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_bad_input_is_refused(case, tmp_path, capsys, qwen3_family, one_torch_thread):
    values = {"tmp": str(tmp_path), "model": str(qwen3_family["base"]),
              **{k: str(v) for k, v in qwen3_family.items()}}
    if case.get("mutation"):
        values["ckpt"] = str(tmp_path / "ckpt")
        MUTATIONS[case["mutation"]](qwen3_family, tmp_path / "ckpt")
    values["case"] = str(_materialise(case, tmp_path, values))
    args = [_fill(a, values) for a in case["args"]]
    if args[0] == "merge":
        args.append("--quiet")
    target = Path(args[2]) if args[0] == "merge" else None
    before = _snapshot(target) if target is not None and target.exists() else None
    rc = main(args)
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err, out + err
    assert rc == 2, f"exit code {rc}; stdout={out!r} stderr={err!r}"
    assert err.lstrip().startswith("error:"), err
    flat = " ".join(err.split())   # rich may wrap long lines
    for fragment in ([case["expect"]] if isinstance(case["expect"], str) else case["expect"]):
        assert " ".join(_fill(fragment, values).split()) in flat, f"{fragment!r} not in {err!r}"
    if target is not None:
        if before is None:
            assert not target.exists(), f"{target} was created"
        else:
            assert _snapshot(target) == before, f"{target} was changed"
        assert not list(target.parent.glob(f".{target.name}.partial-*")), "partial output left"
    if case.get("mutation") == "pickle_only":
        assert "unpickled!" not in out + err
