"""Run a merge plan to a checkpoint on disk, one output tensor at a time.

Memory stays at about one tensor per source plus the result: inputs are read lazily through
safetensors' mmap, merged in float32 on the chosen device, cast, and streamed to their place in
the output shards. The output folder appears complete or not at all.
"""

from __future__ import annotations

import json
import os
import resource
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import torch

from mergesearch.errors import CheckpointError, ConfigError, OutputError
from mergesearch.io.card import model_card
from mergesearch.io.checkpoint import FLOAT_DTYPES, Checkpoint, open_checkpoints
from mergesearch.io.writer import (
    DEFAULT_SHARD_SIZE,
    TORCH_TO_ST,
    AtomicDir,
    OutTensor,
    SafetensorsWriter,
)
from mergesearch.merge.methods import TensorInputs, merge_tensor
from mergesearch.merge.registry import MethodSpec, validate_plan
from mergesearch.merge.tasks import MergeTasks, TensorTask
from mergesearch.plan import MergePlan, dump_plan

TOKENIZER_FILES = (
    "tokenizer_config.json", "special_tokens_map.json", "tokenizer.json", "tokenizer.model",
    "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json",
)
CHAT_TEMPLATES = {
    "chatml": (
        "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + "
        "message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}"
        "{{ '<|im_start|>assistant\\n' }}{% endif %}"
    ),
}


@dataclass
class MergeReport:
    """What a merge did: tensors, bytes, peak memory."""

    out_dir: Optional[Path] = None
    tensors: int = 0
    bytes_written: int = 0
    peak_rss_bytes: int = 0
    peak_tensor_bytes: int = 0
    notes: list[str] = field(default_factory=list)


def torch_dtype(name: str) -> torch.dtype:
    return getattr(torch, name)


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def resolve_device(device: str) -> torch.device:
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"Unknown device {device!r}; use cpu, cuda or cuda:N.") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"Device {device!r} was asked for but no CUDA GPU is available; "
                          "use --device cpu.")
    return dev


class Merger:
    """A validated plan over opened sources: computes output tensors one by one."""

    def __init__(self, plan: MergePlan, base_dir: Optional[Path] = None, device: str = "cpu",
                 seed: int = 0):
        self.plan = plan
        self.spec = validate_plan(plan)
        self.device = resolve_device(device)
        self.seed = seed
        self.ckpts = open_checkpoints(list(plan.referenced_models()), base_dir)
        self.tasks = MergeTasks(plan, self.spec, self.ckpts)
        self.tasks.check_params()
        self.in_dtype = torch_dtype(plan.dtype) if plan.dtype else None
        self.peak_live_bytes = 0
        self.stats = {}
        if self.spec.importance:
            from mergesearch.merge.importance import stats_for_plan

            self.stats = stats_for_plan(plan, {m: c.path for m, c in self.ckpts.items()}, base_dir)

    def out_dtype_name(self) -> str:
        if self.plan.out_dtype or self.plan.dtype:
            return self.plan.out_dtype or self.plan.dtype
        info = self.ckpts[self.tasks.donor].info(self.tasks.tasks[0].sources[0])
        return FLOAT_DTYPES.get(info.dtype, "float32")

    def _load(self, task: TensorTask) -> list[torch.Tensor]:
        tensors = []
        for model, src in zip(task.models, task.sources):
            ckpt = self.ckpts[model]
            info = ckpt.info(src)
            if info.dtype not in FLOAT_DTYPES:
                raise CheckpointError(
                    f"Tensor {src!r} of {model!r} has dtype {info.dtype}, which cannot be merged; "
                    "only float32, float16 and bfloat16 weights are supported (dequantize first)."
                )
            x = ckpt.read(src)
            if self.in_dtype is not None:
                x = x.to(self.in_dtype)
            tensors.append(x.to(device=self.device))
        return tensors

    def merge(self, task: TensorTask, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The merged tensor for one task, in `dtype`."""
        params = self.tasks.params(task)
        tensors = self._load(task)
        inputs = TensorInputs(
            name=task.name, tensors=tensors, shared=params.shared,
            per_input=params.per_input, base=task.base, seed=self.seed, models=task.models,
            importance=importance_inputs(self.spec, self.stats, task),
        )
        result = merge_tensor(self.spec.name, inputs, dtype)
        live = sum(t.numel() * t.element_size() for t in tensors)
        live += result.numel() * result.element_size()
        self.peak_live_bytes = max(self.peak_live_bytes, live)
        return result

    def close(self) -> None:
        for ckpt in self.ckpts.values():
            ckpt.close()


def importance_inputs(spec: MethodSpec, stats: Mapping[str, Any], task: TensorTask) -> tuple[Any, ...]:
    """The calibration statistics one tensor's merge reads (none for other methods)."""
    if not spec.importance:
        return ()
    from mergesearch.merge.importance import tensor_stats

    return tensor_stats(stats, task.models, task.sources)


def importance_note(plan: MergePlan) -> str:
    """Why mergekit cannot reproduce an importance-weighted merge, for YAML headers and cards."""
    cal = plan.calibration
    data = f"{cal.data} (content hash {cal.hash or 'not recorded'})" if cal else "its calibration data"
    return (f"{plan.merge_method} is mergesearch's importance-weighted method: each element's weight comes "
            f"from calibration statistics of the sources on {data}. mergekit has no such method and "
            "cannot reproduce this merge; the checkpoint is the authority, and `mergesearch merge` on this "
            "YAML reproduces it (it calibrates the sources again on the same data, or reads its cache).")


def _tokenizer_donor(plan: MergePlan, ckpts: dict[str, Checkpoint]) -> Checkpoint:
    source = plan.tokenizer_source
    if source in (None, "base"):
        ref = plan.base_model or plan.referenced_models()[0]
    else:
        ref = source
    if ref not in ckpts:
        ckpts[ref] = open_checkpoints([ref])[ref]
    return ckpts[ref]


def _chat_template(plan: MergePlan, ckpts: dict[str, Checkpoint]) -> Optional[str]:
    name = plan.chat_template
    if not name:
        return None
    if name == "auto":
        found = []
        for ckpt in ckpts.values():
            jinja = ckpt.path / "chat_template.jinja"
            if jinja.is_file():
                found.append(jinja.read_text(encoding="utf-8").strip())
                continue
            cfg = ckpt.path / "tokenizer_config.json"
            if cfg.is_file():
                tpl = json.loads(cfg.read_text(encoding="utf-8")).get("chat_template")
                if isinstance(tpl, str):
                    found.append(tpl.strip())
        return Counter(found).most_common(1)[0][0] if found else None
    if name in CHAT_TEMPLATES:
        return CHAT_TEMPLATES[name]
    if "{" in name:
        return name
    raise ConfigError(
        f"chat_template {name!r} is neither 'auto', a known template ({', '.join(CHAT_TEMPLATES)}) "
        "nor a Jinja template string."
    )


def _write_tokenizer(out: AtomicDir, plan: MergePlan, ckpts: dict[str, Checkpoint]) -> None:
    donor = _tokenizer_donor(plan, ckpts)
    template = _chat_template(plan, ckpts)
    for fname in TOKENIZER_FILES + ("generation_config.json",):
        src = donor.path / fname
        if not src.is_file():
            continue
        if template is not None and fname == "chat_template.jinja":
            continue
        if template is not None and fname == "tokenizer_config.json":
            cfg = json.loads(src.read_text(encoding="utf-8"))
            cfg.pop("chat_template", None)
            out.write_text(fname, json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")
            continue
        out.copy_file(src)
    if template is not None:
        out.write_text("chat_template.jinja", template)


def run_merge(
    plan: MergePlan,
    out_dir: Union[str, Path],
    *,
    base_dir: Optional[Path] = None,
    device: str = "cpu",
    seed: int = 0,
    force: bool = False,
    max_shard_size: Union[int, str] = DEFAULT_SHARD_SIZE,
    scores: Optional[dict[str, float]] = None,
    config_yaml: Optional[str] = None,
    progress: Optional[Callable[[int, int, str], None]] = None,
) -> MergeReport:
    """Merge `plan` into a new checkpoint folder at `out_dir` (atomically)."""
    merger = Merger(plan, base_dir=base_dir, device=device, seed=seed)
    dest = Path(os.path.abspath(out_dir)).resolve()
    for ckpt in merger.ckpts.values():
        src = ckpt.path.resolve()
        if dest.exists() and (src == dest or dest in src.parents):
            raise OutputError(f"Output folder {out_dir} holds the source {ckpt.path}; --force would delete it. "
                              "Choose another output folder.")
    report = MergeReport()
    out_dtype = merger.out_dtype_name()
    st_dtype = TORCH_TO_ST[out_dtype]
    tasks = merger.tasks.tasks
    out_specs = [OutTensor(t.name, st_dtype, t.shape) for t in tasks]
    try:
        with AtomicDir(out_dir, force=force) as out:
            writer = SafetensorsWriter(out, out_specs, max_shard_size)
            try:
                for i, task in enumerate(tasks):
                    result = merger.merge(task, torch_dtype(out_dtype))
                    writer.write(task.name, result)
                    del result
                    if progress:
                        progress(i + 1, len(tasks), task.name)
                writer.finish()
            finally:
                writer.close()
            config = merger.tasks.out_config(out_dtype)
            out.write_text("config.json", json.dumps(config, indent=2, ensure_ascii=False) + "\n")
            _write_tokenizer(out, plan, merger.ckpts)
            yaml_text = config_yaml or dump_plan(plan)
            if not merger.spec.mergekit:
                report.notes.append(importance_note(plan))
            if merger.spec.random:
                report.notes.append(
                    f"{plan.merge_method} is random: this checkpoint was drawn with mergesearch's "
                    f"counter-based generator (seed {seed}); mergekit draws other masks, so this "
                    "checkpoint, not the YAML, is the authority."
                )
            out.write_text("mergekit_config.yml", yaml_text)
            out.write_text("README.md", model_card(
                Path(out_dir).name, plan.referenced_models(), plan.merge_method, yaml_text,
                scores=scores, notes=report.notes))
            report.out_dir = out.commit()
    finally:
        merger.close()
    report.tensors = len(tasks)
    report.peak_tensor_bytes = merger.peak_live_bytes
    report.bytes_written = writer.total
    report.peak_rss_bytes = peak_rss()
    return report

