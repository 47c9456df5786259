"""Model cards (README.md with Hugging Face front matter) for merged checkpoints."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Optional

import yaml

DEFAULT_TAGS = ("merge", "mergekit", "mergesearch")


def model_card(
    name: str,
    base_models: Sequence[str],
    merge_method: str,
    config_yaml: str,
    scores: Optional[Mapping[str, float]] = None,
    notes: Sequence[str] = (),
    *,
    sections: Sequence[tuple[str, str]] = (),
    tags: Sequence[str] = DEFAULT_TAGS,
) -> str:
    """A README.md: front matter (base_model list, tags), the merge YAML and scores if known.

    ``sections`` are extra ``(title, markdown body)`` sections, placed after the scores and
    before the notes and the configuration (``mergesearch export`` adds the held-out scores,
    the eval definitions and the search that found the merge).
    """
    front = {
        "base_model": list(base_models),
        "library_name": "transformers",
        "tags": list(tags),
    }
    lines = ["---", yaml.safe_dump(front, sort_keys=False).rstrip(), "---", "", f"# {name}", "",
             f"A merge of {len(base_models)} models with the `{merge_method}` method, made with "
             "[mergesearch](https://github.com/mergesearch/mergesearch).", "", "## Models merged",
             ""]
    lines += [f"- {m}" for m in base_models]
    if scores:
        lines += ["", "## Scores", "", "| eval | score |", "| --- | ---: |"]
        lines += [f"| {k} | {v:.4f} |" for k, v in scores.items()]
    for title, body in sections:
        lines += ["", f"## {title}", "", body.rstrip()]
    if notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    lines += ["", "## Configuration", "", "The following mergekit YAML produced this model:", "",
              "```yaml", config_yaml.rstrip(), "```", ""]
    return "\n".join(lines)
