"""Shared helpers for the benchmark scripts in this folder.

- measuring a command (wall time, peak RSS via ``os.wait4`` and a psutil tree poll),
- describing the machine,
- formatting markdown tables,
- building random Qwen2-shaped checkpoints on disk (cached by a marker file).
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import psutil

MIB = 1024 * 1024


# --------------------------------------------------------------------------- measuring


@dataclass
class RunResult:
    """Outcome of one measured command."""

    cmd: list[str]
    returncode: int
    wall_s: float
    maxrss_mib: float | None
    """``ru_maxrss`` from ``os.wait4``: the largest single process among the child and
    its waited-for descendants (not a sum)."""
    tree_rss_mib: float | None
    """Peak of the RSS summed over the live process tree, sampled every poll interval."""
    stdout_tail: str = ""
    stderr_tail: str = ""
    timed_out: bool = False
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out and self.error is None


def _tail(path: Path, max_chars: int) -> str:
    size = path.stat().st_size
    with open(path, "rb") as fh:
        fh.seek(max(0, size - max_chars))
        return fh.read().decode("utf-8", errors="replace")


def _tree_rss(proc: psutil.Process) -> int:
    total = 0
    try:
        members = [proc, *proc.children(recursive=True)]
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return 0
    for p in members:
        try:
            total += p.memory_info().rss
        except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
            pass
    return total


def run_measured(
    cmd: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike | None = None,
    poll_s: float = 0.05,
    timeout_s: float | None = None,
    tail_chars: int = 4000,
    log_dir: str | os.PathLike | None = None,
) -> RunResult:
    """Run ``cmd`` in its own session; return wall time and peak memory.

    stdout/stderr go to files (``log_dir`` if given, else a temp dir) so a chatty
    child cannot block on a full pipe. On timeout the child's process group is killed.
    """
    cmd = [str(c) for c in cmd]
    own_tmp = None
    if log_dir is None:
        own_tmp = tempfile.TemporaryDirectory(prefix="bench-log-")
        log_dir = own_tmp.name
    log_dir = Path(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    out_path, err_path = log_dir / "stdout.log", log_dir / "stderr.log"
    try:
        with open(out_path, "wb") as out_fh, open(err_path, "wb") as err_fh:
            start = time.perf_counter()
            try:
                popen = subprocess.Popen(
                    cmd,
                    stdout=out_fh,
                    stderr=err_fh,
                    stdin=subprocess.DEVNULL,
                    env=dict(env) if env is not None else None,
                    cwd=cwd,
                    start_new_session=True,
                )
            except OSError as exc:
                return RunResult(cmd, -1, 0.0, None, None, error=f"{type(exc).__name__}: {exc}")

            peak = [0]
            timed_out = [False]
            done = threading.Event()

            def poll() -> None:
                try:
                    proc = psutil.Process(popen.pid)
                except psutil.NoSuchProcess:
                    return
                while not done.is_set():
                    peak[0] = max(peak[0], _tree_rss(proc))
                    if timeout_s is not None and time.perf_counter() - start > timeout_s:
                        timed_out[0] = True
                        try:
                            os.killpg(popen.pid, signal.SIGKILL)
                        except ProcessLookupError:
                            pass
                        return
                    done.wait(poll_s)

            poller = threading.Thread(target=poll, daemon=True)
            poller.start()
            _, status, rusage = os.wait4(popen.pid, 0)
            wall = time.perf_counter() - start
            done.set()
            poller.join()
            popen.returncode = os.waitstatus_to_exitcode(status)
        return RunResult(
            cmd=cmd,
            returncode=popen.returncode,
            wall_s=wall,
            maxrss_mib=rusage.ru_maxrss * 1024 / MIB,
            tree_rss_mib=peak[0] / MIB if peak[0] else None,
            stdout_tail=_tail(out_path, tail_chars),
            stderr_tail=_tail(err_path, tail_chars),
            timed_out=timed_out[0],
        )
    finally:
        if own_tmp is not None:
            own_tmp.cleanup()


def median(values: Iterable[float]) -> float | None:
    """Median of the values, or None when empty."""
    vals = sorted(values)
    if not vals:
        return None
    mid = len(vals) // 2
    return vals[mid] if len(vals) % 2 else (vals[mid - 1] + vals[mid]) / 2


# --------------------------------------------------------------------------- machine


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def cpu_model() -> str:
    """CPU model name from /proc/cpuinfo (falls back to platform.processor())."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info(packages: Sequence[str] = ("torch", "mergekit", "transformers", "safetensors", "mergesearch")) -> dict[str, str]:
    """A few facts that make benchmark numbers comparable."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count() or 0
    info = {
        "cpu": cpu_model(),
        "cores": f"{usable} usable / {os.cpu_count()} online",
        "ram": f"{psutil.virtual_memory().total / 2**30:.1f} GiB",
        "python": platform.python_version(),
        "os": f"{platform.system()} {platform.release()}",
    }
    for pkg in packages:
        info[pkg] = _version(pkg)
    return info


def machine_info_markdown(info: Mapping[str, str]) -> str:
    """Machine info as a markdown bullet list."""
    return "\n".join(f"- **{k}**: {v}" for k, v in info.items())


# --------------------------------------------------------------------------- markdown


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[object]], align: str | None = None) -> str:
    """A padded GitHub markdown table; ``align`` is one char per column among 'l', 'r', 'c'."""
    str_rows = [["" if c is None else str(c) for c in row] for row in rows]
    align = align or "l" * len(headers)
    widths = [len(h) for h in headers]
    for row in str_rows:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))
    widths = [max(w, 3) for w in widths]

    def fmt(cells: Sequence[str]) -> str:
        out = []
        for cell, w, a in zip(cells, widths, align):
            out.append(cell.rjust(w) if a == "r" else cell.center(w) if a == "c" else cell.ljust(w))
        return "| " + " | ".join(out) + " |"

    seps = {"l": lambda w: ":" + "-" * (w - 1), "r": lambda w: "-" * (w - 1) + ":", "c": lambda w: ":" + "-" * (w - 2) + ":"}
    lines = [fmt(headers), "| " + " | ".join(seps[a](w) for a, w in zip(align, widths)) + " |"]
    lines += [fmt(r) for r in str_rows]
    return "\n".join(lines)


def fmt_num(value: float | None, digits: int = 1) -> str:
    """Format a number, or '-' for None."""
    return "-" if value is None else f"{value:.{digits}f}"


def reproduce_command(script: str | os.PathLike, argv: Sequence[str]) -> str:
    """Shell command that reruns a script with the same arguments."""
    return shlex.join(["python", str(script), *argv])


# --------------------------------------------------------------------------- checkpoints


@dataclass(frozen=True)
class Qwen2Shape:
    """Architecture sizes of a Qwen2 decoder."""

    name: str
    hidden_size: int
    num_hidden_layers: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    tie_word_embeddings: bool = True
    max_position_embeddings: int = 32768
    rope_theta: float = 1000000.0
    rms_norm_eps: float = 1e-6

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


QWEN2_5_0_5B = Qwen2Shape(
    name="qwen2.5-0.5b",
    hidden_size=896,
    num_hidden_layers=24,
    intermediate_size=4864,
    num_attention_heads=14,
    num_key_value_heads=2,
    vocab_size=151936,
)

QWEN2_TINY = Qwen2Shape(
    name="qwen2-tiny",
    hidden_size=256,
    num_hidden_layers=4,
    intermediate_size=704,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=4096,
)


def qwen2_tensor_shapes(shape: Qwen2Shape) -> dict[str, tuple[int, ...]]:
    """HF tensor names and shapes of a Qwen2ForCausalLM checkpoint, in file order."""
    h, i, kv = shape.hidden_size, shape.intermediate_size, shape.num_key_value_heads * shape.head_dim
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (shape.vocab_size, h)}
    for n in range(shape.num_hidden_layers):
        p = f"model.layers.{n}."
        out.update(
            {
                p + "input_layernorm.weight": (h,),
                p + "mlp.down_proj.weight": (h, i),
                p + "mlp.gate_proj.weight": (i, h),
                p + "mlp.up_proj.weight": (i, h),
                p + "post_attention_layernorm.weight": (h,),
                p + "self_attn.k_proj.bias": (kv,),
                p + "self_attn.k_proj.weight": (kv, h),
                p + "self_attn.o_proj.weight": (h, h),
                p + "self_attn.q_proj.bias": (h,),
                p + "self_attn.q_proj.weight": (h, h),
                p + "self_attn.v_proj.bias": (kv,),
                p + "self_attn.v_proj.weight": (kv, h),
            }
        )
    out["model.norm.weight"] = (h,)
    if not shape.tie_word_embeddings:
        out["lm_head.weight"] = (shape.vocab_size, h)
    return out


def qwen2_config(shape: Qwen2Shape) -> dict:
    """config.json contents for a Qwen2ForCausalLM of the given shape (Qwen2.5 style)."""
    return {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "attention_dropout": 0.0,
        "bos_token_id": 0,
        "eos_token_id": 2,
        "hidden_act": "silu",
        "hidden_size": shape.hidden_size,
        "initializer_range": 0.02,
        "intermediate_size": shape.intermediate_size,
        "max_position_embeddings": shape.max_position_embeddings,
        "max_window_layers": shape.num_hidden_layers,
        "num_attention_heads": shape.num_attention_heads,
        "num_hidden_layers": shape.num_hidden_layers,
        "num_key_value_heads": shape.num_key_value_heads,
        "rms_norm_eps": shape.rms_norm_eps,
        "rope_scaling": None,
        "rope_theta": shape.rope_theta,
        "sliding_window": None,
        "use_sliding_window": False,
        "tie_word_embeddings": shape.tie_word_embeddings,
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "vocab_size": shape.vocab_size,
    }


_TOKENIZER_CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "merging fine tuned language models keeps what each one learned",
    "a linear merge averages the weights of several models",
    "slerp interpolates along the sphere between two checkpoints",
    "ties trims small deltas and elects a sign for each parameter",
    "hello world this is a tiny tokenizer for benchmarks",
]


def write_tiny_tokenizer(out_dir: str | os.PathLike, vocab_size: int = 400) -> None:
    """Write tokenizer.json + tokenizer_config.json: a small byte-level BPE like Qwen2's.

    transformers 5 loads a qwen2 checkpoint's tokenizer as Qwen2Tokenizer (byte-level BPE)
    whatever tokenizer_class says, so a WordLevel model would load but encode to nothing.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_TOKENIZER_CORPUS, trainer)
    out_dir = Path(out_dir)
    tok.save(str(out_dir / "tokenizer.json"))
    tok_cfg = {
        "tokenizer_class": "Qwen2Tokenizer",
        "model_max_length": 32768,
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "clean_up_tokenization_spaces": False,
        "errors": "replace",
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2) + "\n")


def _plan_shards(shapes: Mapping[str, tuple[int, ...]], bytes_per_el: int, shard_bytes: int) -> list[list[str]]:
    shards: list[list[str]] = [[]]
    size = 0
    for name, shp in shapes.items():
        n = bytes_per_el
        for d in shp:
            n *= d
        if shards[-1] and size + n > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += n
    return shards


_MARKER = ".bench_build.json"
_BUILD_FORMAT = 2


@dataclass(frozen=True)
class CheckpointSpec:
    """What to build: a base (noise_std=0) or a fine-tune = base + noise_std * N(0, 1)."""

    shape: Qwen2Shape
    base_seed: int = 0
    noise_seed: int | None = None
    noise_std: float = 0.0
    shard_bytes: int = 500 * 10**6
    init_std: float = 0.02
    norm_std: float = 0.02
    format: int = field(default=_BUILD_FORMAT)

    def marker(self) -> dict:
        return asdict(self)


def checkpoint_is_built(out_dir: str | os.PathLike, spec: CheckpointSpec) -> bool:
    """True when ``out_dir`` holds a finished build of exactly ``spec``."""
    marker = Path(out_dir) / _MARKER
    try:
        return json.loads(marker.read_text()) == json.loads(json.dumps(spec.marker()))
    except (OSError, ValueError):
        return False


def build_checkpoint(out_dir: str | os.PathLike, spec: CheckpointSpec, *, force: bool = False) -> bool:
    """Write a random sharded bf16 Qwen2 checkpoint; returns False if a matching one existed.

    Base tensors come from one generator seeded with ``base_seed`` walked in file order, so
    every fine-tune regenerates the identical base and adds its own noise stream.
    """
    import torch
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    if not force and checkpoint_is_built(out_dir, spec):
        return False
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)

    shapes = qwen2_tensor_shapes(spec.shape)
    shards = _plan_shards(shapes, 2, spec.shard_bytes)
    base_gen = torch.Generator().manual_seed(spec.base_seed)
    noise_gen = torch.Generator().manual_seed(spec.noise_seed) if spec.noise_std else None

    weight_map: dict[str, str] = {}
    total = 0
    for idx, names in enumerate(shards, start=1):
        fname = f"model-{idx:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for name in names:
            shp = shapes[name]
            t = torch.randn(shp, generator=base_gen, dtype=torch.float32)
            if name.endswith("norm.weight"):
                t.mul_(spec.norm_std).add_(1.0)
            else:
                t.mul_(spec.init_std)
            if noise_gen is not None:
                t.add_(torch.randn(shp, generator=noise_gen, dtype=torch.float32), alpha=spec.noise_std)
            tensors[name] = t.to(torch.bfloat16)
            total += tensors[name].numel() * 2
            weight_map[name] = fname
        save_file(tensors, str(out_dir / fname), metadata={"format": "pt"})
        del tensors

    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    (out_dir / "config.json").write_text(json.dumps(qwen2_config(spec.shape), indent=2) + "\n")
    gen_cfg = {"bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 0}
    (out_dir / "generation_config.json").write_text(json.dumps(gen_cfg, indent=2) + "\n")
    write_tiny_tokenizer(out_dir)
    (out_dir / _MARKER).write_text(json.dumps(spec.marker(), indent=2) + "\n")
    return True


def param_count(shape: Qwen2Shape) -> int:
    """Number of parameters stored on disk for the shape."""
    total = 0
    for shp in qwen2_tensor_shapes(shape).values():
        n = 1
        for d in shp:
            n *= d
        total += n
    return total


def warm_page_cache(dirs: Iterable[str | os.PathLike], chunk: int = 16 * MIB) -> int:
    """Read every file under ``dirs`` once so the first timed run is not a cold read."""
    total = 0
    for d in dirs:
        for path in sorted(Path(d).rglob("*")):
            if path.is_file():
                with open(path, "rb", buffering=0) as fh:
                    while block := fh.read(chunk):
                        total += len(block)
    return total


# --------------------------------------------------------------------------- reading outputs


def safetensors_index(model_dir: str | os.PathLike) -> dict[str, Path]:
    """Tensor name -> shard path for a HF safetensors directory (sharded or not)."""
    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: model_dir / fname for name, fname in weight_map.items()}
    out: dict[str, Path] = {}
    from safetensors import safe_open

    for path in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as fh:
            for name in fh.keys():
                out[name] = path
    return out


def load_tensor(index: Mapping[str, Path], name: str):
    """Load one tensor from a directory index built by :func:`safetensors_index`."""
    from safetensors import safe_open

    with safe_open(str(index[name]), framework="pt") as fh:
        return fh.get_tensor(name)

