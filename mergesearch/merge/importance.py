"""Calibration statistics for importance-weighted merging, computed once per model and cached.

Each source model runs (transformers, from its local folder) over calibration texts, one text at
a time so no padding enters the statistics. Forward pre-hooks on every ``nn.Linear`` add the
input's per-channel sums of ``x^2`` and ``|x|`` to running totals (activations are never kept),
and a backward pass per text adds the squared gradient of the text's log-likelihood to every
parameter's running total. The result, per weight tensor of the checkpoint:

* ``act_l2:NAME``: ``||X||_2`` per input channel over every calibration token (Wanda's norm);
* ``act_mean_abs:NAME``: mean ``|x|`` per input channel;
* ``fisher:NAME``: the diagonal empirical Fisher, the mean over texts of the squared gradient.

Statistics are cached as safetensors in a cache folder under a key of the model's content
(config.json and weight files) and the calibration texts' content, so calibrating again is a
cache hit; the file is written atomically.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union, cast

import torch

from mergesearch.errors import CheckpointError, ConfigError
from mergesearch.plan import Calibration, MergePlan

__all__ = [
    "CalibrationData",
    "Stats",
    "cache_path",
    "calibrate",
    "compute_stats",
    "default_cache_dir",
    "load_data",
    "load_stats",
    "model_hash",
    "resolve_calibration",
    "stat_keys",
    "stats_for_plan",
    "study_calibration",
    "tensor_stats",
]

FORMAT = "mergesearch-importance-1"
STAT_KEYS = ("act_l2", "act_mean_abs", "fisher")
Stats = dict[str, torch.Tensor]


def default_cache_dir() -> Path:
    """``$MERGESEARCH_CACHE_DIR/importance``, else ``~/.cache/mergesearch/importance``."""
    root = os.environ.get("MERGESEARCH_CACHE_DIR")
    return (Path(root) if root else Path.home() / ".cache" / "mergesearch") / "importance"


@dataclass(frozen=True)
class CalibrationData:
    """The calibration texts, where they came from and their content hash."""

    source: str
    texts: tuple[str, ...]

    @property
    def hash(self) -> str:
        return hashlib.sha256(json.dumps(self.texts, ensure_ascii=False).encode("utf-8")).hexdigest()


_FIX = ("give a JSONL file with one {\"text\": ...} object per line, or the name of an eval task "
        "(its proxy prompts are used)")


def load_data(ref: str, limit: int = 64, task_dirs: Sequence[Path] = (),
              base_dir: Optional[Path] = None) -> CalibrationData:
    """The first ``limit`` calibration texts of ``ref``: a ``.jsonl`` file (field ``text``), an eval
    task file (``.yaml``/``.yml``) or a task name looked up in ``task_dirs`` (proxy split: each
    example's prompt followed by its target)."""
    from mergesearch.eval.tasks import load_tasks, read_jsonl
    from mergesearch.zoo.build import default_evals_dir

    if not isinstance(ref, str) or not ref.strip():
        raise ConfigError(f"Calibration data {ref!r} is empty; {_FIX}.")
    path = Path(ref).expanduser()
    if not path.is_absolute() and base_dir is not None:
        path = base_dir / path
    if path.suffix == ".jsonl":
        if not path.is_file():
            raise ConfigError(f"Calibration data file {str(path)!r} does not exist; {_FIX}.")
        texts = []
        for lineno, row in read_jsonl(path):
            text = row.get("text")
            if not isinstance(text, str) or not text.strip():
                raise ConfigError(f"{path}:{lineno}: calibration lines need a non-empty string field "
                                  f"`text`, got {text!r}.")
            texts.append(text)
        source = str(path.resolve())
    elif path.suffix in (".yaml", ".yml") or not path.suffix:
        if path.suffix and not path.is_file():
            raise ConfigError(f"Calibration task file {str(path)!r} does not exist; {_FIX}.")
        dirs = [*task_dirs, default_evals_dir()]
        task = load_tasks([path if path.suffix else ref], dirs)[0]
        texts = [ex.prompt + (ex.target or "") for ex in task.examples("proxy")]
        source = str(Path(task.path).resolve()) if task.path else ref
    else:
        raise ConfigError(f"Calibration data {ref!r} is neither a .jsonl file nor an eval task; {_FIX}.")
    texts = [t for t in texts if t.strip()][:limit]
    if not texts:
        raise ConfigError(f"Calibration data {ref!r} holds no text; {_FIX}.")
    return CalibrationData(source, tuple(texts))


_HASHES: dict[tuple[Any, ...], str] = {}


def model_hash(path: Union[str, Path]) -> str:
    """sha256 of a model folder's config.json and weight files (memoised per size and mtime)."""
    path = Path(path).resolve()
    files = sorted([path / "config.json", *path.glob("*.safetensors"), *path.glob("*.safetensors.index.json")])
    files = [f for f in files if f.is_file()]
    if not any(f.suffix == ".safetensors" for f in files):
        raise CheckpointError(f"{path} has no safetensors weights to calibrate.")
    key = (str(path), *((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files))
    if key not in _HASHES:
        h = hashlib.sha256()
        for f in files:
            h.update(f.name.encode("utf-8") + b"\0")
            with open(f, "rb") as fh:
                h.update(hashlib.file_digest(fh, "sha256").digest())
        _HASHES[key] = h.hexdigest()
    return _HASHES[key]


def cache_path(cache_dir: Union[str, Path], model: Union[str, Path], data_hash: str, max_length: int) -> Path:
    return Path(cache_dir) / f"{model_hash(model)[:24]}-{data_hash[:24]}-len{max_length}.safetensors"


def compute_stats(path: Union[str, Path], texts: Sequence[str], max_length: int) -> tuple[Stats, int]:
    """Activation and Fisher statistics of the model at ``path`` (see the module doc) and the
    number of tokens they cover. Only tensors of the checkpoint are kept."""
    from mergesearch.io.checkpoint import Checkpoint

    path = Path(path)
    ckpt = Checkpoint(path)
    try:
        names = set(ckpt.tensors)
    finally:
        ckpt.close()
    from mergesearch.eval.hf import TransformersEngine

    engine = TransformersEngine(path, dtype="float32")
    model, tokenizer = engine.model, engine.tokenizer
    model.requires_grad_(True)
    sq: dict[str, torch.Tensor] = {}
    ab: dict[str, torch.Tensor] = {}
    rows: dict[str, int] = {}
    hooks = []

    def hook(name: str) -> Any:
        def accumulate(_module: Any, args: tuple[Any, ...]) -> None:
            x = args[0].detach().to(torch.float64).reshape(-1, args[0].shape[-1])
            sq[name] = sq.get(name, 0) + x.square().sum(dim=0)
            ab[name] = ab.get(name, 0) + x.abs().sum(dim=0)
            rows[name] = rows.get(name, 0) + x.shape[0]
        return accumulate

    for mod_name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and f"{mod_name}.weight" in names:
            hooks.append(module.register_forward_pre_hook(hook(f"{mod_name}.weight")))
    params = {n: p for n, p in model.named_parameters() if n in names}
    if not params:
        raise CheckpointError(f"None of {path}'s tensor names match the transformers model's parameters; "
                              "it cannot be calibrated.")
    fisher = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    used = tokens = 0
    try:
        for text in texts:
            ids = tokenizer(text, truncation=True, max_length=max_length, return_tensors="pt")["input_ids"]
            if ids.shape[1] < 2:
                continue
            model.zero_grad(set_to_none=True)
            loss = model(input_ids=ids, labels=ids).loss
            (loss * (ids.shape[1] - 1)).backward()
            for n, p in params.items():
                if p.grad is not None:
                    fisher[n].add_(p.grad.detach().to(torch.float32).square())
            used += 1
            tokens += ids.shape[1]
    finally:
        for h in hooks:
            h.remove()
        model.zero_grad(set_to_none=True)
        engine.close()
    if not used:
        raise ConfigError(f"Every calibration text is shorter than 2 tokens for {path}; use longer texts.")
    stats: Stats = {}
    for name, total in sq.items():
        stats[f"act_l2:{name}"] = total.sqrt().to(torch.float32).contiguous()
        stats[f"act_mean_abs:{name}"] = (ab[name] / rows[name]).to(torch.float32).contiguous()
    for name, f in fisher.items():
        stats[f"fisher:{name}"] = (f / used).contiguous()
    return stats, tokens


def calibrate(model: Union[str, Path], data: CalibrationData, max_length: int = 128,
              cache_dir: Optional[Union[str, Path]] = None) -> tuple[Path, bool]:
    """The cache file of ``model``'s statistics on ``data`` (computed and written if missing) and
    whether it was a cache hit."""
    from safetensors.torch import save

    from mergesearch.io.writer import atomic_write_bytes

    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = cache_path(cache, model, data.hash, max_length)
    if target.is_file():
        return target, True
    stats, tokens = compute_stats(model, data.texts, max_length)
    meta = {"format": FORMAT, "model": str(Path(model).resolve()), "model_hash": model_hash(model),
            "data": data.source, "data_hash": data.hash, "texts": str(len(data.texts)),
            "tokens": str(tokens), "max_length": str(max_length)}
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"Cannot create the calibration cache folder {cache}: {err}; pick another "
                          "with --out (or calibration.cache_dir in the study file).") from None
    atomic_write_bytes(target, save(stats, metadata=meta))
    return target, False


def load_stats(path: Path, keys: Sequence[str] = STAT_KEYS) -> dict[str, Stats]:
    """The statistics ``keys`` of a cache file as ``{tensor name: {stat: tensor}}``."""
    from safetensors import safe_open

    out: dict[str, Stats] = {}
    with safe_open(str(path), framework="pt") as f:
        for key in f.keys():  # noqa: SIM118 - safe_open is not a dict
            stat, name = key.split(":", 1)
            if stat in keys:
                out.setdefault(name, {})[stat] = f.get_tensor(key)
    return out


def stat_keys(spec: Any) -> tuple[str, ...]:
    """The statistics a method reads."""
    return ("fisher",) if spec.importance == "fisher" else ("act_l2",)


def resolve_calibration(cal: Calibration, base_dir: Optional[Path] = None,
                        task_dirs: Sequence[Path] = ()) -> CalibrationData:
    """The texts a plan's ``calibration`` names, checked against its ``hash`` when it has one."""
    data = load_data(cal.data, cal.limit, task_dirs, base_dir)
    if cal.hash is not None and not data.hash.startswith(cal.hash):
        raise ConfigError(
            f"The calibration data {cal.data!r} has changed: its content hash is {data.hash[:16]}, the "
            f"config says {cal.hash}. Restore the data the merge was calibrated on, or remove `hash:` "
            "to calibrate on the new data (the merge will differ)."
        )
    return data


def stats_for_plan(plan: MergePlan, models: Mapping[str, Union[str, Path]], base_dir: Optional[Path] = None,
                   cache_dir: Optional[Union[str, Path]] = None) -> dict[str, dict[str, Stats]]:
    """Per model reference of ``models`` (mapped to its folder), its statistics on the plan's
    calibration data (``base_dir`` resolves a relative data path), calibrated now if they are not
    cached in ``cache_dir``, else the plan's ``calibration.cache``, else the default cache folder."""
    from mergesearch.merge.registry import check_calibration, get_method

    spec = get_method(plan.merge_method)
    check_calibration(plan, spec)
    cal = cast(Calibration, plan.calibration)
    data = resolve_calibration(cal, base_dir)
    return {ref: load_stats(calibrate(path, data, cal.max_length, cache_dir or cal.cache)[0], stat_keys(spec))
            for ref, path in models.items()}


def tensor_stats(stats: Mapping[str, Mapping[str, Stats]], models: Sequence[str],
                 sources: Sequence[str]) -> tuple[Stats, ...]:
    """Per input of one output tensor: its statistics (``{}`` for a tensor that has none)."""
    return tuple(dict(stats.get(m, {}).get(s, {})) for m, s in zip(models, sources))


def study_calibration(sf: Any, log: Optional[Any] = None) -> Optional[Calibration]:
    """A study's calibration: every source calibrated (or found in the cache) on the study's
    ``calibration`` data, as the ``calibration`` block its candidate plans carry; None for methods
    that need none."""
    from mergesearch.merge.registry import get_method

    c = sf.config
    spec = get_method(c.method)
    if not spec.importance:
        return None
    if c.calibration is None:
        raise ConfigError(
            f"Method {c.method!r} weights elements by calibration statistics, but the study file has no "
            "`calibration:`; add `calibration: FILE.jsonl` (one {\"text\": ...} per line) or "
            "`calibration: TASK` (an eval task's proxy prompts) to it (docs/importance.md)."
        )
    cal = c.calibration
    data = load_data(cal.data, cal.limit, sf.task_dirs, sf.root)
    cache = sf.resolve(cal.cache_dir) if cal.cache_dir else default_cache_dir()
    for model in [*([sf.base] if sf.base else []), *sf.models]:
        path, hit = calibrate(model, data, cal.max_length, cache)
        if log is not None:
            log(f"calibration of {Path(model).name}: {'cached' if hit else 'computed'} ({path.name})")
    return Calibration(data=data.source, hash=data.hash, limit=cal.limit, max_length=cal.max_length,
                       cache=str(cache))
