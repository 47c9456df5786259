"""Study files: what to merge, how to search, what to score, and where to keep the results.

A study file is YAML validated into a frozen ``StudyConfig``; relative paths in it (models, task
files, search space files, start recipes, output dir) are taken from the study file's folder.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator, model_validator

from mergesearch.errors import ConfigError, format_validation, read_yaml_file, suggest

__all__ = [
    "SAMPLERS", "PRUNERS", "CalibrationConfig", "StudyConfig", "StudyFile", "load_study", "parse_duration",
]

SAMPLERS = ("random", "cmaes", "tpe", "gp", "nsgaii")
MULTI_OBJECTIVE_SAMPLERS = ("random", "tpe", "gp", "nsgaii")
PRUNERS = ("none", "median", "successive_halving", "hyperband", "wilcoxon")
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(value: Union[str, int, float]) -> float:
    """Seconds from ``90``, ``"90s"``, ``"15m"``, ``"2h"`` or ``"1d"``."""
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a duration; write e.g. 600, '10m' or '2h'")
    if isinstance(value, (int, float)):
        seconds = float(value)
    else:
        m = _DURATION.match(str(value))
        if not m:
            raise ValueError(f"{value!r} is not a duration; write e.g. 600, '10m' or '2h'")
        seconds = float(m.group(1)) * _UNITS[m.group(2)]
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(f"the wall time must be positive, got {value!r}")
    return seconds


Duration = Annotated[Optional[float], BeforeValidator(lambda v: None if v is None else parse_duration(v))]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class SourcesConfig(_Frozen):
    """The checkpoints to merge: ``models`` (the fine-tunes) and an optional shared ``base``."""

    base: Optional[str] = None
    models: tuple[str, ...] = Field(min_length=1)

    @model_validator(mode="after")
    def _distinct(self) -> "SourcesConfig":
        seen = [*([self.base] if self.base else []), *self.models]
        dup = sorted({m for m in seen if seen.count(m) > 1})
        if dup:
            raise ValueError(f"model {dup[0]!r} is listed twice; list each source once")
        return self


class EvalsConfig(_Frozen):
    """The proxy evals that score each candidate and how they combine into the objective."""

    tasks: tuple[str, ...] = Field(min_length=1)
    weights: dict[str, float] = Field(default_factory=dict)
    objective: Literal["mean", "per_task"] = "mean"
    tasks_dir: Optional[str] = None
    proxy_limit: Optional[int] = Field(None, ge=1)
    held_out_limit: Optional[int] = Field(None, ge=1)
    chunk_size: int = Field(16, ge=1)
    confirm_run_unsafe_code: bool = False

    @model_validator(mode="after")
    def _weights(self) -> "EvalsConfig":
        names = [Path(t).stem for t in self.tasks]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"task {dup[0]!r} is listed twice; list each task once")
        for name, w in self.weights.items():
            if name not in names:
                raise ValueError(f"weights has {name!r}, which is not one of the tasks.{suggest(name, names)}")
            if not math.isfinite(w) or w < 0:
                raise ValueError(f"weight of {name!r} must be a number >= 0, got {w!r}")
        if sum(self.weight(n) for n in names) <= 0:
            raise ValueError("every task weight is 0; give at least one task a positive weight")
        return self

    def weight(self, task: str) -> float:
        return float(self.weights.get(task, 1.0))


class SamplerConfig(_Frozen):
    """An Optuna sampler by name; ``options`` go to its constructor."""

    name: Literal["random", "cmaes", "tpe", "gp", "nsgaii"] = "tpe"
    options: dict[str, Any] = Field(default_factory=dict)


class PrunerConfig(_Frozen):
    """Multi-fidelity pruning over eval examples; ``options`` go to the Optuna pruner."""

    name: Literal["none", "median", "successive_halving", "hyperband", "wilcoxon"] = "none"
    options: dict[str, Any] = Field(default_factory=dict)


class BudgetConfig(_Frozen):
    """``trials``: search trials in total (baselines not counted); ``wall_time``: e.g. ``30m``."""

    trials: int = Field(gt=0)
    wall_time: Duration = None


STUDY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]*")


class ExecutorConfig(_Frozen):
    """Where trials run: ``local`` (in this process) or ``ray`` (actors; ``address`` joins a cluster)."""

    kind: Literal["local", "ray"] = "local"
    workers: int = Field(1, ge=1)
    address: Optional[str] = None
    trial_timeout: Duration = None


class EngineConfig(_Frozen):
    """The eval engine each worker builds once: backend, dtype, device, batch size.

    ``max_model_len`` and ``kv_cache_gib`` size vLLM's context and KV cache (vllm only).
    """

    backend: Literal["transformers", "vllm"] = "transformers"
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "float32"
    device: str = "cpu"
    batch_size: int = Field(32, ge=1)
    max_model_len: Optional[int] = Field(None, ge=16)
    kv_cache_gib: float = Field(1.0, gt=0)


class CalibrationConfig(_Frozen):
    """Calibration data of importance-weighted methods (docs/importance.md): ``data`` is a JSONL
    file with a ``text`` field or an eval task (its proxy prompts); the first ``limit`` texts, cut
    to ``max_length`` tokens; statistics are cached in ``cache_dir`` (default
    ``~/.cache/mergesearch/importance``)."""

    data: str = Field(min_length=1)
    limit: int = Field(64, ge=1)
    max_length: int = Field(128, ge=2)
    cache_dir: Optional[str] = None


class StudyConfig(_Frozen):
    """A study file. See docs/studies.md for every key."""

    name: str
    sources: SourcesConfig
    method: str
    space: str
    evals: EvalsConfig
    sampler: SamplerConfig = SamplerConfig()
    pruner: PrunerConfig = PrunerConfig()
    budget: BudgetConfig
    seed: int = 0
    executor: ExecutorConfig = ExecutorConfig()
    engine: EngineConfig = EngineConfig()
    storage: Optional[str] = None
    top_k: int = Field(3, ge=1)
    output_dir: Optional[str] = None
    baselines: bool = True
    start_from: tuple[str, ...] = ()
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    write_checkpoint: bool = True
    calibration: Optional[CalibrationConfig] = None

    @field_validator("name")
    @classmethod
    def _plain_name(cls, value: str) -> str:
        if not STUDY_NAME.fullmatch(value):
            raise ValueError(
                f"{value!r} is not a plain study name; use letters, digits and _ . : - only, starting with a "
                "letter or digit (no slashes or spaces: the name is a storage key and part of output paths), "
                "e.g. name: my-study")
        return value

    @field_validator("sampler", "pruner", mode="before")
    @classmethod
    def _by_name(cls, value: Any) -> Any:
        return {"name": value} if isinstance(value, str) else value

    @field_validator("calibration", mode="before")
    @classmethod
    def _by_data(cls, value: Any) -> Any:
        return {"data": value} if isinstance(value, str) else value

    @model_validator(mode="after")
    def _consistent(self) -> "StudyConfig":
        if self.evals.objective == "per_task" and self.sampler.name not in MULTI_OBJECTIVE_SAMPLERS:
            raise ValueError(
                f"sampler {self.sampler.name!r} optimises one objective but evals.objective is "
                f"'per_task'; use one of {', '.join(MULTI_OBJECTIVE_SAMPLERS)} or objective: mean"
            )
        if self.evals.objective == "per_task" and self.pruner.name != "none":
            raise ValueError(
                "Optuna's pruners need one objective; set pruner: none or evals.objective: mean"
            )
        if self.sampler.name == "nsgaii" and self.evals.objective != "per_task":
            raise ValueError("nsgaii is a multi-objective sampler; set evals.objective: per_task or use cmaes/tpe/gp")
        return self


class StudyFile:
    """A validated study file with its paths resolved against the file's folder."""

    def __init__(self, config: StudyConfig, path: Optional[Path]):
        self.config = config
        self.path = path
        self.root = path.parent.resolve() if path is not None else Path.cwd().resolve()

    def resolve(self, ref: str) -> Path:
        p = Path(ref).expanduser()
        return p if p.is_absolute() else (self.root / p).resolve()

    @property
    def output_dir(self) -> Path:
        return self.resolve(self.config.output_dir or f"runs/{self.config.name}")

    @property
    def base(self) -> Optional[Path]:
        return self.resolve(self.config.sources.base) if self.config.sources.base else None

    @property
    def models(self) -> list[Path]:
        return [self.resolve(m) for m in self.config.sources.models]

    @property
    def task_dirs(self) -> list[Path]:
        from mergesearch.zoo.build import default_evals_dir

        dirs = [self.resolve(self.config.evals.tasks_dir)] if self.config.evals.tasks_dir else []
        return [*dirs, self.root / "evals", default_evals_dir()]

    def task_refs(self) -> list[str]:
        return [str(self.resolve(t)) if Path(t).suffix else t for t in self.config.evals.tasks]

    def space_dirs(self) -> list[Path]:
        return [self.root / "search_spaces"]

    def space_ref(self) -> Union[str, Path]:
        ref = self.config.space
        return self.resolve(ref) if Path(ref).suffix else ref

    def fingerprint(self, space_text: str) -> dict[str, Any]:
        """What a stored study must share with this file to be resumed by it."""
        c = self.config
        return {
            "method": c.method,
            "space": hashlib.sha256(space_text.encode("utf-8")).hexdigest()[:16],
            "base": str(self.base) if self.base else None,
            "models": [str(m) for m in self.models],
            "tasks": [Path(t).stem for t in c.evals.tasks],
            "weights": {Path(t).stem: c.evals.weight(Path(t).stem) for t in c.evals.tasks},
            "objective": c.evals.objective,
            "proxy_limit": c.evals.proxy_limit,
            "dtype": c.dtype,
            **({"calibration": c.calibration.model_dump(exclude={"cache_dir"})} if c.calibration else {}),
        }

    def dump(self) -> dict[str, Any]:
        return json.loads(self.config.model_dump_json())


def parse_study(raw: Any, source: str = "study file", path: Optional[Path] = None) -> StudyFile:
    if not isinstance(raw, dict):
        raise ConfigError(f"{source} must be a YAML mapping of study settings, got {type(raw).__name__}.")
    known = set(StudyConfig.model_fields)
    for key in raw:
        if key not in known:
            raise ConfigError(f"{source}: unknown key {key!r}.{suggest(str(key), known)}")
    try:
        config = StudyConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(f"{source}: {format_validation(err)}") from None
    return StudyFile(config, path)


def load_study(path: Union[str, Path]) -> StudyFile:
    """Read and validate a study file (see docs/studies.md)."""
    path = Path(path)
    raw, _ = read_yaml_file(path, "study file")
    return parse_study(raw, str(path), path)
