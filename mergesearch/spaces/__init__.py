"""Search spaces: YAML files in ``search_spaces/`` that turn genes into merge plans.

A space file has ``kind:`` (one of ``KINDS``) and that kind's options. ``load_space`` finds it by
name (a file stem in the given folders or in ``search_spaces/`` of the checkout) or by path. See
docs/spaces.md. No torch here.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from mergesearch.errors import (
    ConfigError,
    UnknownNameError,
    format_validation,
    read_yaml_file,
    suggest,
)
from mergesearch.spaces.base import (
    SAMPLERS,
    SearchSpace,
    SpaceContext,
    SpaceOptions,
    equivalent,
)
from mergesearch.spaces.curves import LayerCurves
from mergesearch.spaces.dirichlet import DirichletLinear, alr_weights, dirichlet_weights
from mergesearch.spaces.groups import LayerGroups
from mergesearch.spaces.params import MethodParams

__all__ = [
    "KINDS",
    "SAMPLERS",
    "DirichletLinear",
    "LayerCurves",
    "LayerGroups",
    "MethodParams",
    "SearchSpace",
    "SpaceContext",
    "SpaceOptions",
    "alr_weights",
    "default_spaces_dir",
    "dirichlet_weights",
    "equivalent",
    "list_spaces",
    "load_space",
    "space_from_dict",
]

KINDS: dict[str, type[SearchSpace]] = {
    cls.kind: cls for cls in (DirichletLinear, LayerCurves, LayerGroups, MethodParams)
}
_SUFFIXES = (".yaml", ".yml")


def default_spaces_dir() -> Path:
    """``search_spaces/`` of a source checkout (the shipped spaces live there)."""
    return Path(__file__).resolve().parents[2] / "search_spaces"


def _description(text: str) -> str:
    """The first paragraph of the file's leading comment block."""
    lines: list[str] = []
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped.startswith("#"):
            break
        body = stripped.lstrip("#").strip()
        if not body:
            if lines:
                break
            continue
        lines.append(body)
    return " ".join(lines)


def space_from_dict(raw: Any, name: str = "", source: str = "search space",
                    **kw: Any) -> SearchSpace:
    """A space from a parsed mapping ``{kind: ..., <options>}``."""
    if not isinstance(raw, dict):
        raise ConfigError(
            f"{source} must be a YAML mapping with `kind:` and its options, got "
            f"{type(raw).__name__}."
        )
    kind = raw.get("kind")
    if kind is None:
        raise ConfigError(f"{source}: `kind` is missing; add e.g. `kind: dirichlet_linear` "
                          f"(one of {', '.join(KINDS)}).")
    if kind not in KINDS:
        raise UnknownNameError(f"{source}: unknown kind {kind!r}.{suggest(str(kind), KINDS)}")
    cls = KINDS[kind]
    fields = cls.Options.model_fields
    for key in raw:
        if key not in fields:
            raise ConfigError(
                f"{source}: unknown key {key!r} for kind {kind}.{suggest(str(key), fields)}"
            )
    try:
        options = cls.Options.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(f"{source}: {format_validation(err)}") from None
    return cls(options, name=name or kind, **kw)


def _load_file(path: Path) -> SearchSpace:
    raw, text = read_yaml_file(path, "search space file")
    return space_from_dict(raw, path.stem, f"Search space {path}", path=path,
                           description=_description(text))


def _files(dirs: Sequence[Path]) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for d in dirs:
        if not Path(d).is_dir():
            continue
        for path in sorted(Path(d).iterdir()):
            if path.suffix in _SUFFIXES and path.is_file():
                found.setdefault(path.stem, path)
    return found


def _dirs(search_dirs: Sequence[Path]) -> list[Path]:
    return [*(Path(d) for d in search_dirs), default_spaces_dir()]


def load_space(ref: str | Path, search_dirs: Sequence[Path] = ()) -> SearchSpace:
    """A space by name (file stem in `search_dirs`, then in ``search_spaces/``) or by path."""
    if isinstance(ref, Path) or Path(ref).suffix in _SUFFIXES or "/" in str(ref):
        path = Path(ref).expanduser()
        if not path.is_file():
            raise ConfigError(
                f"Search space file {str(path)!r} does not exist. Give a path to a .yaml file or "
                f"the name of a shipped space ({', '.join(_files(_dirs(search_dirs)))})."
            )
        return _load_file(path)
    files = _files(_dirs(search_dirs))
    if ref in files:
        return _load_file(files[ref])
    available = ", ".join(files) or "none"
    hint = suggest(ref, files) if files else ""
    raise UnknownNameError(
        f"Unknown search space {ref!r}.{hint if 'Did you mean' in hint else ''} Available: "
        f"{available} (files in {', '.join(str(d) for d in _dirs(search_dirs))}); a path to a "
        ".yaml file also works."
    )


def list_spaces(search_dirs: Sequence[Path] = ()) -> list[SearchSpace]:
    """Every space in `search_dirs` and ``search_spaces/`` (the first file of a name wins).

    YAML files without a known top-level ``kind:`` (e.g. study files) are not spaces and are
    skipped; a space file with bad options raises.
    """
    spaces = []
    for path in _files(_dirs(search_dirs)).values():
        try:
            raw, _ = read_yaml_file(path, "search space file")
        except ConfigError:
            continue
        if isinstance(raw, dict) and raw.get("kind") in KINDS:
            spaces.append(_load_file(path))
    return spaces
