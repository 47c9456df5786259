"""Expand a merge plan into one task per output tensor, checked against the sources' headers.

No torch here: tasks are built from safetensors headers alone, so ``explain`` and validation are
cheap. The order is mergekit's: embeddings, then the layers, then the final norm and ``lm_head``.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Optional

from mergesearch.errors import CheckpointError, TensorMismatchError
from mergesearch.io.checkpoint import LAYER_RE, TIED_HEAD, Checkpoint, layer_index
from mergesearch.merge.registry import MethodSpec, check_della, check_linear_weights
from mergesearch.plan import MergePlan, PlanLayout, SliceLayout, layout, resolve


@dataclass(frozen=True)
class TensorTask:
    """One output tensor: which source tensors feed it, at which gradient position."""

    name: str
    slice: SliceLayout
    t: float
    models: tuple[str, ...]
    sources: tuple[str, ...]
    base: Optional[int]
    out_layer: Optional[int]
    shape: tuple[int, ...]

    def group(self) -> str:
        """The tensor's name without its layer prefix, e.g. ``self_attn.q_proj.weight``."""
        m = LAYER_RE.match(self.name)
        return m.group("suffix")[1:] if m else self.name


@dataclass(frozen=True)
class ResolvedParams:
    shared: dict[str, Any]
    per_input: tuple[dict[str, Any], ...]


def _is_pre(name: str) -> bool:
    return "embed" in name


def _rename_layer(name: str, index: int) -> str:
    m = LAYER_RE.match(name)
    return f"{m.group('prefix')}{index}{m.group('suffix')}" if m else name


def _base_index(spec: MethodSpec, s: SliceLayout) -> Optional[int]:
    if spec.base == "ignored" or s.base_model is None:
        return None
    models = [src.model for src in s.sources]
    return models.index(s.base_model) if s.base_model in models else None


class MergeTasks:
    """All output tensors of a plan over opened checkpoints."""

    def __init__(self, plan: MergePlan, spec: MethodSpec, checkpoints: Mapping[str, Checkpoint]):
        self.plan = plan
        self.spec = spec
        self.ckpts = checkpoints
        self.layout: PlanLayout = layout(plan, lambda ref: checkpoints[ref].num_layers)
        self.tasks: list[TensorTask] = self._build()

    # -- construction ------------------------------------------------------------------------

    def _check_inputs(self, name: str, models: list[str], sources: list[str]) -> tuple[int, ...]:
        shapes = {}
        for model, src in zip(models, sources):
            info = self.ckpts[model].info(src)
            if info is None:
                raise TensorMismatchError(
                    f"Tensor {src!r} is missing from {model!r} but the merge needs it for "
                    f"{name!r}. All sources must have the same architecture and tensors; "
                    "check that this model is not pruned or of another size."
                )
            shapes[model] = info.shape
        if len(set(shapes.values())) > 1:
            listed = ", ".join(f"{m}: {list(s)}" for m, s in shapes.items())
            if "embed_tokens" in name or name == TIED_HEAD:
                raise TensorMismatchError(
                    f"Vocabulary size mismatch in {name!r} ({listed}). Merging needs one shared "
                    "vocabulary, as in mergekit 0.1.5 without a `tokenizer:` block; resize the "
                    "sources' embeddings to a common tokenizer (or merge only models that share "
                    "the base's tokenizer)."
                )
            raise TensorMismatchError(
                f"Shape mismatch in {name!r}: {listed}. These models cannot be merged tensor by "
                "tensor (was one of them pruned or built with another width?)."
            )
        return next(iter(shapes.values()))

    def _edge_task(self, name: str, s: SliceLayout) -> TensorTask:
        models = [src.model for src in s.sources]
        shape = self._check_inputs(name, models, [name] * len(models))
        return TensorTask(name, s, 0.0, tuple(models), (name,) * len(models),
                          _base_index(self.spec, s), None, shape)

    def _build(self) -> list[TensorTask]:
        slices = self.layout.slices
        first, last = slices[0], slices[-1]
        ref = self.ckpts[first.sources[0].model]
        edge_names: list[str] = []
        for model in dict.fromkeys(src.model for s in (first, last) for src in s.sources):
            for name in self.ckpts[model].tensors:
                if layer_index(name) is None and name not in edge_names:
                    edge_names.append(name)
        if TIED_HEAD in edge_names:
            post_models = [src.model for src in last.sources]
            if all(TIED_HEAD not in self.ckpts[m].tensors for m in post_models):
                edge_names.remove(TIED_HEAD)
        if not ref.num_layers and not edge_names:
            raise CheckpointError(f"{ref.path} has no tensors to merge.")

        pre = [self._edge_task(n, first) for n in edge_names if _is_pre(n)]
        post = [self._edge_task(n, last) for n in edge_names if not _is_pre(n)]
        layers: list[TensorTask] = []
        for out_layer, s, offset, t in self.layout.out_layers():
            lead = s.sources[0]
            lead_layer = lead.layer_range[0] + offset
            names = [n for n in self.ckpts[lead.model].tensors if layer_index(n) == lead_layer]
            if not names:
                raise CheckpointError(
                    f"{lead.model!r} has no tensors for layer {lead_layer}; is num_hidden_layers "
                    "in its config.json right?"
                )
            for src in s.sources[1:]:
                src_layer = src.layer_range[0] + offset
                for name in self.ckpts[src.model].tensors:
                    if layer_index(name) == src_layer:
                        renamed = _rename_layer(name, lead_layer)
                        if renamed not in names:
                            names.append(renamed)
            for name in names:
                models = [src.model for src in s.sources]
                sources = [_rename_layer(name, src.layer_range[0] + offset) for src in s.sources]
                out_name = _rename_layer(name, out_layer)
                shape = self._check_inputs(out_name, models, sources)
                layers.append(TensorTask(out_name, s, t, tuple(models), tuple(sources),
                                         _base_index(self.spec, s), out_layer, shape))
        return pre + layers + post

    # -- parameters --------------------------------------------------------------------------

    def params(self, task: TensorTask) -> ResolvedParams:
        """Every parameter's value for this tensor, exactly as the merge applies it."""
        scopes = self.layout.scopes
        shared = {p.name: resolve(p, scopes(task.slice, None), task.name, task.t)
                  for p in self.spec.shared_params()}
        per_input = []
        for i, (model, src) in enumerate(zip(task.models, task.sources)):
            values = {}
            for p in self.spec.input_params():
                if p.scope == "non_base" and i == task.base:
                    continue
                values[p.name] = resolve(p, scopes(task.slice, model), src, task.t, model)
            per_input.append(values)
        return ResolvedParams(shared, tuple(per_input))

    def check_params(self) -> None:
        """Resolve every tensor's parameters once, so bad values fail before any work is done."""
        for task in self.tasks:
            params = self.params(task)
            if self.spec.name == "linear" and params.shared["normalize"]:
                check_linear_weights([p["weight"] for p in params.per_input],
                                     f"{task.name!r} ({', '.join(task.models)})")
            for model, p in zip(task.models, params.per_input):
                if "epsilon" in p:
                    check_della(self.spec.name, p["density"], p["epsilon"],
                                f"{task.name!r} of {model!r}")

    # -- output config -----------------------------------------------------------------------

    @property
    def donor(self) -> str:
        return self.plan.base_model or self.plan.referenced_models()[0]

    def has_lm_head(self) -> bool:
        return any(t.name == TIED_HEAD for t in self.tasks)

    def out_config(self, dtype_name: str) -> dict[str, Any]:
        """The donor's config.json with dtype, layer count, per-layer lists and tying updated."""
        donor = self.ckpts[self.donor]
        config = copy.deepcopy(donor.config)
        target = config.get("text_config", config)
        key = "dtype" if "dtype" in config or "torch_dtype" not in config else "torch_dtype"
        config[key] = dtype_name
        n_out = self.layout.num_out_layers
        n_donor = donor.num_layers
        mapping = [(s.sources[0].model, s.sources[0].layer_range[0] + offset)
                   for _, s, offset, _ in self.layout.out_layers()]
        if [i for _, i in mapping] != list(range(n_donor)):
            for k in _per_layer_keys(target, n_donor):
                new = []
                for model, src_layer in mapping:
                    src_cfg = self.ckpts[model].config
                    src_cfg = src_cfg.get("text_config", src_cfg)
                    values = src_cfg.get(k)
                    if not isinstance(values, list) or src_layer >= len(values):
                        values = target[k]
                        src_layer = min(src_layer, len(values) - 1)
                    new.append(values[src_layer])
                target[k] = new
            for k in ("num_hidden_layers", "n_layer", "num_layers"):
                if k in target:
                    target[k] = n_out
        if "tie_word_embeddings" in target or self.has_lm_head():
            target["tie_word_embeddings"] = not self.has_lm_head()
        return config


def _per_layer_keys(cfg: Mapping[str, Any], n: Optional[int] = None) -> dict[str, Any]:
    n = n if n is not None else cfg.get("num_hidden_layers")
    return {k: v for k, v in cfg.items() if isinstance(v, list) and n and len(v) == n
            and not re.search(r"architectures|_ids?$", k)}
