"""One exception hierarchy: every error a user can cause is a MergeSearchError.

Messages name the bad value and say how to fix it. The CLI prints them without a traceback.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from typing import Any


class MergeSearchError(Exception):
    """Base class of every error mergesearch reports to a user."""


class ConfigError(MergeSearchError):
    """A merge YAML, study file or option is malformed or inconsistent."""


class UnknownNameError(ConfigError):
    """A name (method, parameter, key, dtype, ...) that is not one of the valid ones."""


class CheckpointError(MergeSearchError):
    """A source checkpoint is missing, unreadable, unsafe or incompatible."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint that could only be read by unpickling or by running its own code."""


class TensorMismatchError(CheckpointError):
    """Sources disagree on a tensor: missing in one, or of another shape."""


class MergeComputationError(MergeSearchError):
    """A merge produced an invalid result (NaN/inf) or could not be computed."""


class OutputError(MergeSearchError):
    """Writing an output failed; the destination was left untouched."""


class StorageError(MergeSearchError):
    """A study storage URL that cannot be opened, or a database that cannot be used."""


def suggest(name: str, valid: Iterable[str]) -> str:
    """' Did you mean X?' for the closest valid name, or a list of the valid names."""
    valid = sorted(set(valid))
    close = difflib.get_close_matches(name, valid, n=1, cutoff=0.6)
    if close:
        return f" Did you mean {close[0]!r}?"
    return f" Valid: {', '.join(valid)}."


def unknown(kind: str, name: str, valid: Iterable[str], where: str = "") -> UnknownNameError:
    """An UnknownNameError for `name` that suggests the nearest valid one."""
    place = f" in {where}" if where else ""
    return UnknownNameError(f"Unknown {kind} {name!r}{place}.{suggest(name, valid)}")


def format_validation(err: Any) -> str:
    """A pydantic ValidationError as 'where: what' lines (the first five), without pydantic noise."""
    lines = []
    for e in err.errors()[:5]:
        loc = []
        for part in e["loc"]:
            if isinstance(part, int):
                loc.append(f"[{part}]")
            elif part[:1].isupper() or "[" in part or part.startswith(("tuple", "function")):
                continue
            else:
                loc.append(("." if loc else "") + part)
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key; remove it or check its spelling"
        lines.append(f"{''.join(loc) or 'config'}: {msg}")
    return "; ".join(dict.fromkeys(lines))


def read_text_file(path: Any, what: str) -> str:
    """The UTF-8 text of a user's file; a ConfigError naming ``what`` and the path otherwise."""
    from pathlib import Path

    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{what[:1].upper()}{what[1:]} {str(path)!r} does not exist.") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"Cannot read {what} {str(path)!r}: {err}") from None


def read_yaml_file(path: Any, what: str) -> tuple[Any, str]:
    """A user's YAML file, safe-loaded, and its text; a ConfigError naming ``what`` otherwise."""
    import yaml

    text = read_text_file(path, what)
    try:
        return yaml.safe_load(text), text
    except yaml.YAMLError as err:
        raise ConfigError(f"{what[:1].upper()}{what[1:]} {path} is not valid YAML: {err}") from None
