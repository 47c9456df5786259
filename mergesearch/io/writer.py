"""Atomic, streaming writing of sharded safetensors checkpoints.

The layout (shards, offsets, headers) is fixed up front from the output tensors' names, dtypes
and shapes, so each tensor is written to its place as soon as it is computed: memory stays at
one tensor, not one shard. Everything goes into a hidden temporary folder beside the destination,
is fsynced, and is renamed into place only when complete; a crash or a full disk leaves the old
folder (or none), never a half-written checkpoint.
"""

from __future__ import annotations

import errno
import json
import os
import re
import secrets
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import torch

from mergesearch.errors import ConfigError, OutputError
from mergesearch.io.checkpoint import INDEX_FILE, ITEMSIZE

DEFAULT_SHARD_SIZE = 5 * 1000**3
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "KB": 1000, "MB": 1000**2, "GB": 1000**3, "TB": 1000**4,
          "KIB": 1024, "MIB": 1024**2, "GIB": 1024**3, "TIB": 1024**4,
          "K": 1000, "M": 1000**2, "G": 1000**3, "T": 1000**4}
TORCH_TO_ST = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64"}


def parse_size(value: Union[int, str]) -> int:
    """Bytes from 5000000, '500MB', '2GiB', ..."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    m = _SIZE_RE.match(str(value))
    if not m or float(m.group(1)) <= 0:
        raise ConfigError(f"Shard size {value!r} is not a size; write e.g. 5GB, 500MB or 2GiB.")
    unit = (m.group(2) or "").upper()
    if unit not in _UNITS:
        raise ConfigError(f"Shard size {value!r} has unknown unit {unit!r}; use KB, MB or GB.")
    size = int(float(m.group(1)) * _UNITS[unit])
    if size <= 0:
        raise ConfigError(f"Shard size {value!r} is less than one byte; write e.g. 500MB.")
    return size


@dataclass(frozen=True)
class OutTensor:
    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = ITEMSIZE[self.dtype]
        for d in self.shape:
            n *= d
        return n


@dataclass
class _Shard:
    file: str
    tensors: list[OutTensor]
    header: bytes
    offsets: dict[str, int]

    @property
    def size(self) -> int:
        return 8 + len(self.header) + sum(t.nbytes for t in self.tensors)


def _plan_shards(tensors: Sequence[OutTensor], max_shard_size: int) -> list[_Shard]:
    groups: list[list[OutTensor]] = [[]]
    size = 0
    for t in tensors:
        if groups[-1] and size + t.nbytes > max_shard_size:
            groups.append([])
            size = 0
        groups[-1].append(t)
        size += t.nbytes
    n = len(groups)
    shards = []
    for i, group in enumerate(groups):
        fname = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        offsets, pos = {}, 0
        for t in group:
            header[t.name] = {"dtype": t.dtype, "shape": list(t.shape),
                              "data_offsets": [pos, pos + t.nbytes]}
            offsets[t.name] = pos
            pos += t.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        shards.append(_Shard(fname, group, raw, offsets))
    return shards


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _disk_error(err: OSError, dest: Path, what: str) -> OutputError:
    if err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return OutputError(
            f"Disk full (or file size limit) while writing {what} for {dest}: {err.strerror}. "
            f"Nothing was written to {dest}; free space and run again."
        )
    return OutputError(f"Writing {what} for {dest} failed: {err}. Nothing was written to {dest}.")


def atomic_write_text(path: Union[str, Path], text: str) -> None:
    """Write a text file that appears complete or not at all (temp file, fsync, rename)."""
    atomic_write_bytes(path, text.encode("utf-8"), "a text file")


def atomic_write_bytes(path: Union[str, Path], data: bytes, what: str = "a file") -> None:
    """Write a file that appears complete or not at all (temp file, fsync, rename)."""
    path = Path(path).absolute()
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise _disk_error(err, path, what) from None


class AtomicDir:
    """A folder that appears at `dest` complete, or not at all."""

    def __init__(self, dest: Union[str, Path], force: bool = False):
        # abspath, not absolute(): `a/missing/../b` is `a/b`; left as is, exists() is False for it and the
        # existing `a/b` would be replaced without --force (or a source through --force)
        self.dest = Path(os.path.abspath(dest))
        self.force = force
        if self.dest.exists() and not force:
            raise OutputError(
                f"Output folder {self.dest} already exists; choose another path or pass --force "
                "to replace it (the old one stays until the new one is complete)."
            )
        if self.dest.exists() and not self.dest.is_dir():
            raise OutputError(f"{self.dest} exists and is not a folder; refusing to replace it.")
        parent = self.dest.parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise OutputError(f"Cannot create {parent}: {err}") from None
        self._clean_stale(parent)
        self.tmp = parent / f".{self.dest.name}.partial-{os.getpid()}-{secrets.token_hex(4)}"
        try:
            self.tmp.mkdir()
        except OSError as err:
            raise _disk_error(err, self.dest, "a temporary folder") from None
        self.done = False

    def _clean_stale(self, parent: Path) -> None:
        for old in parent.glob(f".{self.dest.name}.partial-*"):
            try:
                pid = int(old.name.rsplit("-", 2)[1])
            except (IndexError, ValueError):
                continue
            if not _pid_alive(pid):
                shutil.rmtree(old, ignore_errors=True)

    def free_bytes(self) -> int:
        st = os.statvfs(self.tmp)
        return st.f_bavail * st.f_frsize

    def write_bytes(self, relpath: str, data: bytes) -> None:
        target = self.tmp / relpath
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            with open(target, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        except OSError as err:
            raise _disk_error(err, self.dest, relpath) from None

    def write_text(self, relpath: str, text: str) -> None:
        self.write_bytes(relpath, text.encode("utf-8"))

    def copy_file(self, src: Path, relpath: Optional[str] = None) -> None:
        self.write_bytes(relpath or src.name, src.read_bytes())

    def commit(self) -> Path:
        """fsync and move the finished folder into place (replacing the old one with force)."""
        try:
            _fsync_dir(self.tmp)
            old = None
            if self.dest.exists():
                old = self.dest.parent / f".{self.dest.name}.old-{secrets.token_hex(4)}"
                os.rename(self.dest, old)
            os.rename(self.tmp, self.dest)
            _fsync_dir(self.dest.parent)
        except OSError as err:
            self.abort()
            raise _disk_error(err, self.dest, "the final rename") from None
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        self.done = True
        return self.dest

    def abort(self) -> None:
        if not self.done:
            shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> "AtomicDir":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()


class SafetensorsWriter:
    """Writes a fixed list of tensors as (sharded) safetensors into an AtomicDir."""

    def __init__(self, out: AtomicDir, tensors: Sequence[OutTensor],
                 max_shard_size: Union[int, str] = DEFAULT_SHARD_SIZE):
        self.out = out
        names = [t.name for t in tensors]
        if len(set(names)) != len(names):
            raise OutputError("Duplicate output tensor names; this is a bug in the merge plan.")
        self.shards = _plan_shards(tensors, parse_size(max_shard_size))
        self.total = sum(s.size for s in self.shards)
        free = out.free_bytes()
        if self.total > free:
            raise OutputError(
                f"Not enough disk space for {out.dest}: the checkpoint needs "
                f"{self.total / 1e9:.2f} GB, {free / 1e9:.2f} GB are free. Nothing was written."
            )
        self._where = {t.name: (s, t) for s in self.shards for t in s.tensors}
        self._fds: dict[str, int] = {}
        self._pending = set(names)
        for shard in self.shards:
            try:
                fd = os.open(out.tmp / shard.file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            except OSError as err:
                self.close()
                raise _disk_error(err, out.dest, shard.file) from None
            self._fds[shard.file] = fd
            head = len(shard.header).to_bytes(8, "little") + shard.header
            self._pwrite(fd, memoryview(head), 0, f"the header of {shard.file}")

    def write(self, name: str, tensor) -> None:
        """Write one torch tensor (already in its output dtype) at its place."""
        shard, spec = self._where[name]
        if tuple(tensor.shape) != spec.shape or TORCH_TO_ST.get(str(tensor.dtype)[6:]) != spec.dtype:
            raise OutputError(
                f"Tensor {name!r} is {tensor.dtype} {list(tensor.shape)}, expected {spec.dtype} "
                f"{list(spec.shape)}; this is a bug in the merge plan."
            )
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
        buf = memoryview(data.numpy())
        pos = 8 + len(shard.header) + shard.offsets[name]
        self._pwrite(self._fds[shard.file], buf, pos, f"tensor {name!r}")
        self._pending.discard(name)

    def _pwrite(self, fd: int, buf: memoryview, pos: int, what: str) -> None:
        try:
            while buf:
                written = os.pwrite(fd, buf, pos)
                buf = buf[written:]
                pos += written
        except OSError as err:
            self.close()
            raise _disk_error(err, self.out.dest, what) from None

    def finish(self) -> None:
        """Check completeness, fsync the shards and write the index."""
        if self._pending:
            missing = sorted(self._pending)
            self.close()
            raise OutputError(f"{len(missing)} tensors were never written (e.g. {missing[0]!r}).")
        try:
            for fd in self._fds.values():
                os.fsync(fd)
        except OSError as err:
            self.close()
            raise _disk_error(err, self.out.dest, "the shards") from None
        self.close()
        if len(self.shards) > 1:
            index = {
                "metadata": {"total_size": sum(t.nbytes for s in self.shards for t in s.tensors)},
                "weight_map": {t.name: s.file for s in self.shards for t in s.tensors},
            }
            self.out.write_text(INDEX_FILE, json.dumps(index, indent=2) + "\n")

    def close(self) -> None:
        for fd in self._fds.values():
            try:
                os.close(fd)
            except OSError:
                pass
        self._fds.clear()
