"""Helpers for comparing mergesearch's merges with mergekit 0.1.5's, tensor by tensor."""

from __future__ import annotations

import json
import string
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional

import torch
import yaml
from safetensors.torch import load_file

from mergesearch.merge.executor import run_merge as ms_run_merge
from mergesearch.plan import loads_plan

REL_TOL = 1e-6


def render(template: str, models: Mapping[str, Path]) -> str:
    """Substitute ``$base``, ``$ft0``... with the models' absolute paths."""
    paths = {k: str(Path(v).resolve()) for k, v in models.items()}
    return string.Template(template).substitute(paths)


def run_ours(yaml_text: str, out_dir: Path, seed: int = 0) -> Path:
    ms_run_merge(loads_plan(yaml_text), out_dir, seed=seed)
    return Path(out_dir)


def run_mergekit(yaml_text: str, out_dir: Path) -> Path:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    config = MergeConfiguration.model_validate(yaml.safe_load(yaml_text))
    run_merge(config, str(out_dir), options=MergeOptions(quiet=True, write_model_card=False))
    return Path(out_dir)


def load_weights(model_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint folder, over all its safetensors shards."""
    files = sorted(Path(model_dir).glob("*.safetensors"))
    assert files, f"no safetensors in {model_dir}"
    out: dict[str, torch.Tensor] = {}
    for f in files:
        part = load_file(str(f))
        assert not set(part) & set(out), f"tensor stored twice in {model_dir}"
        out.update(part)
    return out


def load_config(model_dir: Path) -> dict[str, Any]:
    return json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))


def max_rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a64, b64 = a.to(torch.float64), b.to(torch.float64)
    if a64.numel() == 0:
        return 0.0
    scale = max(1.0, float(b64.abs().max()))
    return float((a64 - b64).abs().max()) / scale


def assert_same_tensors(
    ours: Mapping[str, torch.Tensor],
    theirs: Mapping[str, torch.Tensor],
    *,
    exact: bool = False,
    rel_tol: float = REL_TOL,
) -> None:
    """Same names, shapes and dtypes; values within ``rel_tol`` (or bit-identical if exact)."""
    assert sorted(ours) == sorted(theirs), (
        f"tensor names differ: only ours {sorted(set(ours) - set(theirs))}, "
        f"only mergekit {sorted(set(theirs) - set(ours))}"
    )
    bad = []
    for name in sorted(ours):
        a, b = ours[name], theirs[name]
        assert a.shape == b.shape, f"{name}: shape {tuple(a.shape)} != mergekit {tuple(b.shape)}"
        assert a.dtype == b.dtype, f"{name}: dtype {a.dtype} != mergekit {b.dtype}"
        if exact:
            if not torch.equal(a, b):
                n = int((a != b).sum())
                bad.append(f"{name}: {n}/{a.numel()} elements differ "
                           f"(max rel err {max_rel_err(a, b):.3g})")
        else:
            err = max_rel_err(a, b)
            if not err <= rel_tol:
                bad.append(f"{name}: max rel err {err:.3g} > {rel_tol:g}")
    assert not bad, "outputs differ from mergekit:\n" + "\n".join(bad[:20])


CONFIG_KEYS = ("num_hidden_layers", "tie_word_embeddings")


def assert_same_config(ours_dir: Path, theirs_dir: Path,
                       keys: tuple[str, ...] = CONFIG_KEYS) -> None:
    ours, theirs = load_config(ours_dir), load_config(theirs_dir)
    for key in keys:
        assert ours.get(key) == theirs.get(key), (
            f"config.json {key}: ours {ours.get(key)!r} != mergekit {theirs.get(key)!r}"
        )


def compare(
    template: str,
    models: Mapping[str, Path],
    tmp_path: Path,
    *,
    exact: Optional[bool] = None,
    seed: int = 0,
) -> tuple[Path, Path]:
    """Run the same config through both tools and assert equal outputs and configs.

    ``exact`` defaults to bit-identical comparison when the output dtype is not float32.
    """
    text = render(template, models)
    ours = run_ours(text, tmp_path / "ours", seed=seed)
    theirs = run_mergekit(text, tmp_path / "mergekit")
    a, b = load_weights(ours), load_weights(theirs)
    if exact is None:
        exact = next(iter(b.values())).dtype != torch.float32
    assert_same_tensors(a, b, exact=exact)
    assert_same_config(ours, theirs)
    return ours, theirs
