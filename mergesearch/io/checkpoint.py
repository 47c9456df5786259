"""Lazy, safe reading of Hugging Face checkpoint folders (safetensors only, never pickle).

Headers are parsed and checked without torch (names, dtypes, shapes, offsets against the file
size); tensors are read one at a time through safetensors' mmap when asked for.
"""

from __future__ import annotations

import json
import os
import re
import struct
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Optional

from mergesearch.errors import CheckpointError, UnsafeCheckpointError

INDEX_FILE = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
            "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
FLOAT_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}
TORCH_NAMES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
               "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8",
               "BOOL": "bool", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}
LAYER_RE = re.compile(r"^(?P<prefix>(?:.*\.)?layers\.)(?P<index>\d+)(?P<suffix>\..+)$")
MAX_HEADER = 100 * 1024 * 1024
TIED_HEAD = "lm_head.weight"


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor's bytes are: ``offsets`` relative to the data section at ``data_start``."""

    name: str
    file: Path
    dtype: str
    shape: tuple[int, ...]
    offsets: tuple[int, int]
    data_start: int = 0

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.offsets[1] - self.offsets[0]


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Parse one safetensors file's header, checking it against the file's real size."""
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path} is truncated: it has no safetensors header.")
            (length,) = struct.unpack("<Q", head)
            if length > MAX_HEADER or 8 + length > size:
                raise CheckpointError(
                    f"{path} is truncated or not a safetensors file: its header claims "
                    f"{length} bytes but the file has {size}."
                )
            raw = f.read(length)
    except OSError as err:
        raise CheckpointError(f"Cannot read {path}: {err}") from None
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CheckpointError(f"{path} has a corrupted safetensors header (not JSON).") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path} has a corrupted safetensors header.")
    data_size = size - 8 - length
    infos: dict[str, TensorInfo] = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape = meta["dtype"], tuple(int(d) for d in meta["shape"])
            start, end = (int(o) for o in meta["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: the header entry of {name!r} is malformed.") from None
        if dtype not in ITEMSIZE:
            raise CheckpointError(f"{path}: tensor {name!r} has unknown dtype {dtype!r}.")
        info = TensorInfo(name, path, dtype, shape, (start, end), 8 + length)
        if not (0 <= start <= end <= data_size) or info.nbytes != info.numel * ITEMSIZE[dtype]:
            raise CheckpointError(
                f"{path} is corrupted or truncated: tensor {name!r} ({dtype}, {list(shape)}) "
                f"claims bytes [{start}, {end}) but the data section has {data_size} bytes. "
                "Re-download or re-save the checkpoint."
            )
        infos[name] = info
    return infos


def layer_index(name: str) -> Optional[int]:
    m = LAYER_RE.match(name)
    return int(m.group("index")) if m else None


def read_model_config(path: Path) -> dict[str, Any]:
    """A model folder's config.json; refused when missing, not a JSON object, or when the model
    ships its own code (``auto_map``, which would need trust_remote_code)."""
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"{path} has no config.json; it is not a model folder.")
    try:
        config = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{cfg_path} is not valid JSON: {err}") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{cfg_path} must hold a JSON object.")
    if config.get("auto_map"):
        raise UnsafeCheckpointError(
            f"{path} needs trust_remote_code (its config.json has `auto_map`, i.e. it "
            "runs code shipped with the weights). mergesearch never runs such code; use an "
            "architecture that transformers implements natively."
        )
    return config


class Checkpoint:
    """A local Hugging Face model folder holding safetensors weights."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._handles: dict[Path, Any] = {}
        p = self.path
        if not p.exists():
            raise CheckpointError(
                f"Model folder {str(p)!r} does not exist. Give a local folder that holds "
                "config.json and *.safetensors (hub names are not downloaded)."
            )
        if not p.is_dir():
            raise CheckpointError(f"{str(p)!r} is a file; give the model folder that contains it.")
        self.config = self._read_config()
        self.tensors = self._read_index()

    def __repr__(self) -> str:
        return f"Checkpoint({str(self.path)!r})"

    def _read_config(self) -> dict[str, Any]:
        return read_model_config(self.path)

    def _read_index(self) -> dict[str, TensorInfo]:
        index_path = self.path / INDEX_FILE
        if index_path.is_file():
            try:
                weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
            except (OSError, KeyError, TypeError, json.JSONDecodeError) as err:
                raise CheckpointError(f"{index_path} is malformed: {err}") from None
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(f.name for f in self.path.glob("*.safetensors"))
            weight_map = None
        if not files:
            pickles = sorted(f.name for f in self.path.iterdir() if f.suffix in PICKLE_SUFFIXES)
            if pickles:
                raise UnsafeCheckpointError(
                    f"{self.path} holds only pickle weights ({', '.join(pickles[:3])}). "
                    "mergesearch never unpickles (it can run arbitrary code). Convert it once, "
                    "in an environment you trust, with transformers: "
                    "AutoModelForCausalLM.from_pretrained(path).save_pretrained(out, "
                    "safe_serialization=True)."
                )
            raise CheckpointError(f"{self.path} holds no *.safetensors weights.")
        tensors: dict[str, TensorInfo] = {}
        for fname in files:
            fpath = self.path / fname
            if Path(fname).name != fname or not fpath.is_file():
                raise CheckpointError(
                    f"{index_path} names shard {fname!r}, which is missing from {self.path}."
                )
            tensors.update(read_header(fpath))
        if weight_map is not None:
            missing = [n for n, f in weight_map.items() if n not in tensors]
            if missing:
                raise CheckpointError(
                    f"{index_path} lists {len(missing)} tensors not found in its shards "
                    f"(e.g. {missing[0]!r}); the checkpoint is incomplete."
                )
        return tensors

    @cached_property
    def num_layers(self) -> int:
        """Number of transformer layers (from config.json, checked against tensor names)."""
        cfg = self.config.get("text_config", self.config)
        n = cfg.get("num_hidden_layers") or cfg.get("n_layer") or cfg.get("num_layers")
        found = {i for i in map(layer_index, self.tensors) if i is not None}
        if n is None:
            return max(found) + 1 if found else 0
        if found and max(found) + 1 != n:
            raise CheckpointError(
                f"{self.path}: config.json says num_hidden_layers={n} but the weights have "
                f"layers 0..{max(found)}."
            )
        return int(n)

    @property
    def tied_embeddings(self) -> bool:
        cfg = self.config.get("text_config", self.config)
        return bool(cfg.get("tie_word_embeddings", self.config.get("tie_word_embeddings", True)))

    @property
    def embed_name(self) -> Optional[str]:
        return next((n for n in self.tensors if n.endswith("embed_tokens.weight")), None)

    def has(self, name: str) -> bool:
        return self.info(name) is not None

    def info(self, name: str) -> Optional[TensorInfo]:
        """Tensor metadata; a missing ``lm_head.weight`` of a tied model is its embedding."""
        if name in self.tensors:
            return self.tensors[name]
        if name == TIED_HEAD and self.tied_embeddings and self.embed_name:
            return self.tensors[self.embed_name]
        return None

    def read(self, name: str):
        """Load one tensor (torch) into its own memory with positioned reads.

        Unlike an mmap of the whole file, pages of tensors already dropped do not stay in this
        process's resident memory, so memory is bounded by the tensors alive at once.
        """
        import torch

        info = self.info(name)
        if info is None:
            raise CheckpointError(f"{self.path} has no tensor {name!r}.")
        fd = self._handles.get(info.file)
        if fd is None:
            try:
                fd = os.open(info.file, os.O_RDONLY)
            except OSError as err:
                raise CheckpointError(f"Cannot open {info.file}: {err}") from None
            self._handles[info.file] = fd
        buf = torch.empty(info.nbytes, dtype=torch.uint8)
        view = memoryview(buf.numpy())
        pos = info.data_start + info.offsets[0]
        try:
            while view:
                got = os.preadv(fd, [view], pos)
                if got == 0:
                    raise OSError("unexpected end of file")
                view = view[got:]
                pos += got
        except OSError as err:
            raise CheckpointError(
                f"Cannot read {info.name!r} from {info.file}: {err}. The file may have been "
                "truncated or changed while reading."
            ) from None
        return buf.view(getattr(torch, TORCH_NAMES[info.dtype])).reshape(info.shape)

    def close(self) -> None:
        for fd in self._handles.values():
            try:
                os.close(fd)
            except OSError:
                pass
        self._handles.clear()

    @property
    def model_type(self) -> Optional[str]:
        return self.config.get("model_type")


def open_checkpoints(paths: list[str], base_dir: Optional[Path] = None) -> dict[str, Checkpoint]:
    """Open every model of a plan; relative paths are taken from `base_dir` (the YAML's folder)."""
    out: dict[str, Checkpoint] = {}
    for ref in paths:
        p = Path(ref).expanduser()
        if not p.is_absolute() and base_dir is not None and not p.exists():
            candidate = base_dir / p
            if candidate.exists():
                p = candidate
        out[ref] = Checkpoint(p)
    types = {ref: c.model_type for ref, c in out.items()}
    if len(set(types.values())) > 1:
        raise CheckpointError(
            f"The models have different architectures {types}; only models of one architecture "
            "can be merged."
        )
    return out
