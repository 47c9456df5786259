"""Build the demo zoo: a tiny base model and one expert per synthetic skill, then verify them.

The base is trained from scratch on a mixture of every skill's format (and plain text); each
expert is fine-tuned from the base on one skill only. Prompts and targets are rendered with the
shipped task files in ``evals/``, and every training example whose prompt occurs in any eval
split is dropped. After training, every source and a few merges are scored and the build fails
unless the trade-off holds: each expert is strictly best on its own skill, no source is best on
all, and the uniform merge is not the best merge tried.

The result is cached: ``DIR/zoo.json`` records a hash of everything the build reads (this
module, the skills, the task files and their data, the config, the torch and transformers
versions); a rebuild happens only when it changes.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, model_validator

from mergesearch.errors import ConfigError, MergeSearchError, OutputError

__all__ = ["ZooConfig", "ZooResult", "build_zoo", "load_zoo_config", "default_evals_dir", "SOURCE_TASKS"]

SOURCE_TASKS = ("addition", "reverse", "format", "code", "order")
TEXT_TASK = "perplexity"
MANIFEST = "zoo.json"


class ZooConfig(BaseModel):
    """Everything that determines the zoo's weights."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    seed: int = 0
    arch: Literal["qwen3", "llama"] = "qwen3"
    hidden_size: int = Field(128, ge=8)
    intermediate_size: int = Field(384, ge=1)
    num_layers: int = Field(4, ge=1)
    num_heads: int = Field(2, ge=1)
    head_dim: int = Field(64, ge=64)
    vocab_size: int = 320
    skills: tuple[str, ...] = SOURCE_TASKS
    base_mix: dict[str, float] = Field(
        default_factory=lambda: {"addition": 1.0, "reverse": 0.7, "format": 0.4, "code": 0.2, "order": 1.0,
                                 "text": 0.15}
    )
    base_steps: int = Field(1200, ge=1)
    expert_steps: int = Field(300, ge=1)
    expert_steps_scale: dict[str, float] = Field(default_factory=lambda: {"addition": 2.0})
    """Per-skill multiplier of ``expert_steps`` (addition learns slowest)."""
    batch_size: int = Field(32, ge=1)
    base_lr: float = Field(3e-3, gt=0)
    expert_lr: float = Field(1e-3, gt=0)
    expert_replay: float = Field(0.25, ge=0, le=1)
    warmup_steps: int = Field(30, ge=0)
    threads: int = Field(2, ge=1)
    verify: bool = True
    verify_limit: Optional[int] = Field(None, ge=1)
    sharded_expert: str = "code"
    shard_size: str = "1MB"

    @model_validator(mode="after")
    def _known_skills(self) -> "ZooConfig":
        unknown = sorted(set(self.expert_steps_scale) - set(self.skills))
        if unknown:
            raise ValueError(f"expert_steps_scale names {unknown[0]!r}, which is not one of the skills "
                             f"({', '.join(self.skills)})")
        if any(v <= 0 for v in self.expert_steps_scale.values()):
            raise ValueError("expert_steps_scale values must be positive")
        return self


class ZooBuildError(MergeSearchError):
    """The built zoo does not show the trade-off it must show."""


@dataclass(frozen=True)
class ZooResult:
    root: Path
    sources: dict[str, Path]
    table: dict[str, dict[str, float]]
    merges: dict[str, dict[str, float]]
    rebuilt: bool
    seconds: float


def load_zoo_config(path: Optional[Path]) -> ZooConfig:
    """ZooConfig from a YAML mapping of overrides (the defaults when ``path`` is None)."""
    import yaml
    from pydantic import ValidationError

    from mergesearch.errors import format_validation

    if path is None:
        return ZooConfig()
    try:
        raw = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"Cannot read zoo config {str(path)!r}: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"Zoo config {str(path)!r} must be a mapping of settings, e.g. `base_steps: 600`.")
    try:
        return ZooConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(f"Zoo config {path}: {format_validation(err)}") from None


def default_evals_dir() -> Path:
    """``evals/`` of a source checkout (the demo tasks ship there)."""
    return Path(__file__).resolve().parents[2] / "evals"


def _inputs_hash(config: ZooConfig, evals_dir: Path) -> str:
    import torch
    import transformers

    h = hashlib.sha256()
    h.update(json.dumps(config.model_dump(mode="json"), sort_keys=True).encode())
    h.update(f"torch={torch.__version__} transformers={transformers.__version__}".encode())
    here = Path(__file__).resolve().parent
    for path in (here / "build.py", here / "skills.py", Path(__file__).resolve().parents[1] / "testing.py"):
        h.update(path.read_bytes())
    for path in sorted(evals_dir.rglob("*")):
        nested = path.relative_to(evals_dir).parts[:-1]
        if nested and nested[0] != "data":
            continue  # other task collections (evals/lm_eval/) do not shape the zoo
        if path.is_file() and path.suffix in (".yaml", ".yml", ".jsonl"):
            h.update(str(path.relative_to(evals_dir)).encode())
            h.update(path.read_bytes())
    return h.hexdigest()[:16]


class _Batcher:
    """Token batches for causal LM training; loss only on the target (all tokens if none)."""

    def __init__(self, tokenizer: Any, tasks: Mapping[str, Any], seed: int, banned: set[str]) -> None:
        from mergesearch.zoo.skills import SKILLS

        self.tok = tokenizer
        self.tasks = tasks
        self.banned = banned
        self.streams = {name: SKILLS[_skill_of(name)].examples(seed) for name in tasks}
        self.eos = tokenizer.eos_token_id
        self.pad = tokenizer.pad_token_id

    def example(self, task_name: str) -> tuple[list[int], list[int]]:
        task = self.tasks[task_name]
        for data in self.streams[task_name]:
            prompt = task.render_prompt(data)
            if prompt in self.banned:
                continue
            p_ids = self.tok(prompt, add_special_tokens=False)["input_ids"]
            if task.spec.target is None:
                ids = [self.eos] + p_ids + [self.eos]
                return ids, ids
            t_ids = self.tok(task.render_target(data), add_special_tokens=False)["input_ids"] + [self.eos]
            return p_ids + t_ids, [-100] * len(p_ids) + t_ids
        raise ZooBuildError(f"the {task_name} skill ran out of examples")

    def batch(self, names: Sequence[str]) -> tuple[Any, Any, Any]:
        import torch

        rows = [self.example(n) for n in names]
        width = max(len(ids) for ids, _ in rows)
        ids = torch.full((len(rows), width), self.pad, dtype=torch.long)
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, (i, lab) in enumerate(rows):
            ids[r, : len(i)] = torch.tensor(i)
            labels[r, : len(lab)] = torch.tensor(lab)
            mask[r, : len(i)] = 1
        return ids, labels, mask


def _skill_of(task_name: str) -> str:
    return "text" if task_name == TEXT_TASK else task_name


def _train(
    model: Any,
    batcher: _Batcher,
    pick: Callable[[Any], list[str]],
    steps: int,
    lr: float,
    warmup: int,
    seed: int,
    log: Callable[[str], None],
    label: str,
) -> float:
    import random

    import torch

    rng = random.Random(f"{label}:{seed}")
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.0)

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(steps - warmup, 1)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    smooth = None
    start = time.perf_counter()
    for step in range(steps):
        ids, labels, mask = batcher.batch(pick(rng))
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        smooth = loss.item() if smooth is None else 0.95 * smooth + 0.05 * loss.item()
        if (step + 1) % 100 == 0 or step + 1 == steps:
            log(f"  {label}: step {step + 1}/{steps} loss {smooth:.3f} ({time.perf_counter() - start:.0f}s)")
    model.eval()
    return float(smooth or 0.0)


def _save(model: Any, tok_dir: Path, out: Path, max_shard_size: Optional[str]) -> None:
    from mergesearch.testing import _copy_tokenizer

    tmp = out.with_name(f".{out.name}.partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(tmp, safe_serialization=True, **kwargs)
    _copy_tokenizer(tok_dir, tmp)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)


def _merge_plans(experts: Sequence[str]) -> dict[str, str]:
    """The verification merges as mergekit YAML, with paths relative to ``merges/``."""

    def models(weight: float, extra: str = "") -> str:
        return "\n".join(
            f"  - model: ../experts/{e}\n    parameters: {{weight: {weight}{extra}}}" for e in experts
        )

    def task_arithmetic(weight: float) -> str:
        return f"merge_method: task_arithmetic\nbase_model: ../base\nmodels:\n{models(weight)}\ndtype: float32\n"

    def upweighted(skill: str) -> str:
        listed = "\n".join(
            f"  - model: ../experts/{e}\n    parameters: {{weight: {2.0 if e == skill else 1.0}}}" for e in experts
        )
        return f"merge_method: linear\nmodels:\n{listed}\ndtype: float32\n"

    return {
        "uniform linear": f"merge_method: linear\nmodels:\n{models(1.0)}\ndtype: float32\n",
        **{f"linear, {e} x2": upweighted(e) for e in experts},
        "task arithmetic 0.3": task_arithmetic(0.3),
        "task arithmetic 0.5": task_arithmetic(0.5),
        "task arithmetic 0.8": task_arithmetic(0.8),
        "ties 0.5/0.5": (
            f"merge_method: ties\nbase_model: ../base\nmodels:\n{models(0.5, ', density: 0.5')}\n"
            "dtype: float32\n"
        ),
    }


def merge_file_name(name: str) -> str:
    """File name under ``merges/`` of a verification merge (``task arithmetic 0.3`` -> ``task-arithmetic-03.yaml``)."""
    return name.replace(",", "").replace(" ", "-").replace("/", "-").replace(".", "") + ".yaml"


def _score_all(engine: Any, tasks: Mapping[str, Any], split: str, limit: Optional[int]) -> dict[str, float]:
    from mergesearch.eval.runner import evaluate

    return {name: evaluate(engine, task, split, limit=limit).mean for name, task in tasks.items()}


def _verify(table: Mapping[str, Mapping[str, float]], merges: Mapping[str, Mapping[str, float]],
            skills: Sequence[str]) -> list[str]:
    problems = []
    for skill in skills:
        mine = table[skill][skill]
        rivals = {src: row[skill] for src, row in table.items() if src != skill}
        beaten = {src: v for src, v in rivals.items() if v >= mine}
        if beaten:
            problems.append(
                f"the {skill} expert ({mine:.3f}) is not strictly best on {skill}: "
                + ", ".join(f"{s} {v:.3f}" for s, v in beaten.items())
            )
    for src, row in table.items():
        if all(row[t] >= max(other[t] for other in table.values()) for t in skills):
            problems.append(f"{src} is best on every skill")
    mean = lambda row: sum(row[t] for t in skills) / len(skills)  # noqa: E731
    uniform = mean(merges["uniform linear"])
    if all(mean(row) <= uniform for name, row in merges.items() if name != "uniform linear"):
        problems.append(f"the uniform merge ({uniform:.3f}) is the best merge tried")
    return problems


def render_table(table: Mapping[str, Mapping[str, float]], merges: Mapping[str, Mapping[str, float]],
                 tasks: Sequence[str], split: str) -> str:
    """The sources x tasks table as Markdown (best source per skill in bold)."""
    skills = list(tasks)
    head = ["model", *tasks, "skill mean"]
    lines = [f"Scores on the `{split}` split (mean over examples, in [0, 1]).", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for group in (table, merges):
        for name, row in group.items():
            best = {t: row[t] >= max(r[t] for r in table.values()) for t in tasks}
            cells = [(f"**{row[t]:.2f}**" if group is table and best[t] and t in skills else f"{row[t]:.2f}")
                     for t in tasks]
            label = name if group is merges else ("base" if name == "base" else f"expert: {name}")
            mean = sum(row[t] for t in skills) / len(skills)
            lines.append("| " + " | ".join([label, *cells, f"{mean:.3f}"]) + " |")
    return "\n".join(lines) + "\n"


def build_zoo(
    out: str | Path,
    config: ZooConfig = ZooConfig(),
    *,
    evals_dir: Optional[Path] = None,
    force: bool = False,
    log: Callable[[str], None] = print,
) -> ZooResult:
    """Build (or reuse) the zoo in ``out`` and verify the trade-off; raises ZooBuildError if it fails."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mergesearch.eval.hf import TransformersEngine
    from mergesearch.eval.tasks import load_tasks
    from mergesearch.testing import build_tiny_model, build_tokenizer
    from mergesearch.zoo.skills import SKILLS

    start = time.perf_counter()
    root = Path(out)
    evals_dir = Path(evals_dir) if evals_dir else default_evals_dir()
    unknown = [s for s in config.skills if s not in SKILLS or s == "text"]
    if unknown:
        raise ConfigError(f"Unknown zoo skill {unknown[0]!r}; skills are {', '.join(SOURCE_TASKS)}.")
    if config.sharded_expert not in config.skills:
        raise ConfigError(f"sharded_expert {config.sharded_expert!r} is not one of the skills {config.skills}.")
    if not (evals_dir / f"{config.skills[0]}.yaml").is_file():
        raise ConfigError(
            f"No task files in {str(evals_dir)!r}; the zoo is rendered with the demo tasks of a "
            "source checkout (pass --evals DIR)."
        )
    key = _inputs_hash(config, evals_dir)
    manifest_path = root / MANIFEST
    sources = {"base": root / "base", **{s: root / "experts" / s for s in config.skills}}
    if not force and manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        if manifest.get("key") == key and all((p / "config.json").is_file() for p in sources.values()):
            log(f"zoo in {root} is up to date (key {key}); pass --force to rebuild")
            return ZooResult(root, sources, manifest["table"], manifest["merges"], False,
                             time.perf_counter() - start)

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputError(f"Cannot create the zoo folder {str(root)!r}: {err.strerror or err}. "
                          "Choose another folder: mergesearch zoo DIR.") from None
    if manifest_path.exists():
        manifest_path.unlink()
    tasks = {t.name: t for t in load_tasks([*config.skills, TEXT_TASK], [evals_dir])}
    banned = {ex.query for t in tasks.values() for split in t.splits.values() for ex in split}

    tok_dir = root / ".tokenizer"
    build_tokenizer(tok_dir, vocab_size=259)
    init_dir = root / ".init"
    build_tiny_model(
        init_dir, config.arch, num_layers=config.num_layers, hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size, num_heads=config.num_heads,
        num_kv_heads=config.num_heads, head_dim=config.head_dim, vocab_size=config.vocab_size,
        tie_word_embeddings=False, seed=config.seed, tokenizer_dir=tok_dir,
    )
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    batcher = _Batcher(tokenizer, tasks, config.seed, banned)

    log(f"training the base on a mixture of {', '.join(config.skills)} and text")
    model = AutoModelForCausalLM.from_pretrained(init_dir, dtype=torch.float32)
    names = [*config.skills, TEXT_TASK]
    weights = [config.base_mix.get(_skill_of(n), 1.0) for n in names]
    _train(model, batcher, lambda rng: rng.choices(names, weights, k=config.batch_size),
           config.base_steps, config.base_lr, config.warmup_steps, config.seed, log, "base")
    _save(model, tok_dir, sources["base"], None)
    for skill in config.skills:
        log(f"fine-tuning the {skill} expert")
        model = AutoModelForCausalLM.from_pretrained(sources["base"], dtype=torch.float32)
        _train(model, batcher,
               lambda rng, s=skill: [s if rng.random() >= config.expert_replay else rng.choices(names, weights)[0]
                                     for _ in range(config.batch_size)],
               round(config.expert_steps * config.expert_steps_scale.get(skill, 1.0)), config.expert_lr,
               config.warmup_steps,
               config.seed, log, skill)
        shard = config.shard_size if skill == config.sharded_expert else None
        _save(model, tok_dir, sources[skill], shard)
    shutil.rmtree(init_dir, ignore_errors=True)

    log("scoring every source and a few merges on the held-out split")
    eval_tasks = {n: tasks[n] for n in config.skills}
    engine = TransformersEngine(sources["base"], dtype="float32")
    table: dict[str, dict[str, float]] = {}
    for name, path in sources.items():
        engine.load_weights(_read_all(path))
        table[name] = _score_all(engine, eval_tasks, "held_out", config.verify_limit)
    merges = {}
    merges_dir = root / "merges"
    merges_dir.mkdir(exist_ok=True)
    for name, yaml_text in _merge_plans(config.skills).items():
        fname = merge_file_name(name)
        (merges_dir / fname).write_text(
            f"# A merge of the demo zoo, scored when the zoo was built.\n"
            f"# Run: mergesearch merge {root.name}/merges/{fname} out/{fname.removesuffix('.yaml')}\n"
            + yaml_text, encoding="utf-8")
        engine.load_weights(_merged_tensors(yaml_text, merges_dir))
        merges[name] = _score_all(engine, eval_tasks, "held_out", config.verify_limit)
    engine.close()

    text = render_table(table, merges, list(config.skills), "held_out")
    (root / "TABLE.md").write_text(text, encoding="utf-8")
    log(text)
    problems = _verify(table, merges, config.skills) if config.verify else []
    if problems:
        raise ZooBuildError(
            "The zoo does not show the trade-off it must: " + "; ".join(problems)
            + ". Change the zoo config (steps, learning rates) or the skills, then rebuild."
        )
    manifest = {"key": key, "config": config.model_dump(), "table": table, "merges": merges,
                "sources": {k: str(v.relative_to(root)) for k, v in sources.items()},
                "built_seconds": round(time.perf_counter() - start, 1)}
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return ZooResult(root, sources, table, merges, True, time.perf_counter() - start)


def _read_all(path: Path) -> Iterator[tuple[str, Any]]:
    from mergesearch.io.checkpoint import Checkpoint

    ckpt = Checkpoint(path)
    try:
        for name in ckpt.tensors:
            yield name, ckpt.read(name)
    finally:
        ckpt.close()


def _merged_tensors(yaml_text: str, base_dir: Path) -> Iterator[tuple[str, Any]]:
    from mergesearch.merge.executor import Merger
    from mergesearch.plan import loads_plan

    merger = Merger(loads_plan(yaml_text), base_dir=base_dir)
    try:
        for task in merger.tasks.tasks:
            yield task.name, merger.merge(task)
    finally:
        merger.close()


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python scripts/build_demo_zoo.py [OUT] [--force]``."""
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", default=str(Path.cwd() / "zoo"))
    parser.add_argument("--force", action="store_true", help="rebuild even if the cache is up to date")
    parser.add_argument("--evals", default=None, help="folder of the demo task files (default: evals/)")
    args = parser.parse_args(argv)
    try:
        result = build_zoo(args.out, evals_dir=Path(args.evals) if args.evals else None, force=args.force)
    except MergeSearchError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    if not result.rebuilt:
        print(render_table(result.table, result.merges, list(ZooConfig().skills), "held_out"))
    print(f"zoo ready in {result.root} ({result.seconds:.0f}s)")
    return 0
