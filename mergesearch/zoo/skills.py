"""Synthetic skills with checkable answers (pure Python, no torch).

Each skill draws raw examples (the fields a task file's templates refer to) from a
seeded ``random.Random``. The same generators make the eval data in ``evals/data``
and the training data of the zoo; the zoo builder drops every training example
whose rendered prompt occurs in an eval split, so held-out stays held out.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["SKILLS", "Skill", "write_eval_data", "EVAL_SIZES"]

_WORDS = (
    "apple river stone cloud green light house paper music table window garden "
    "silver orange winter summer bread water forest candle mirror rocket yellow "
    "planet pencil bottle tiger horse violin letter castle bridge market"
).split()

_LETTERS = "abcdefghijklmnopqrstuvwxyz"


def _addition(rng: random.Random) -> dict[str, Any]:
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    return {"a": a, "b": b, "answer": str(a + b)}


def _reverse(rng: random.Random) -> dict[str, Any]:
    word = "".join(rng.choice(_LETTERS) for _ in range(rng.randint(4, 7)))
    return {"word": word, "answer": word[::-1]}


def _format(rng: random.Random) -> dict[str, Any]:
    words = rng.sample(_WORDS, rng.randint(2, 3))
    phrase = " ".join(words)
    kind = rng.choice(("capitals", "lowercase", "json"))
    keyword = {"id": "keywords:existence", "kwargs": {"keywords": words}}
    if kind == "capitals":
        return {
            "instruction": "Write in capital letters",
            "text": phrase,
            "answer": phrase.upper(),
            "instructions": [{"id": "change_case:english_capital", "kwargs": {}}, keyword],
        }
    if kind == "lowercase":
        return {
            "instruction": "Write in lowercase letters",
            "text": phrase.upper(),
            "answer": phrase,
            "instructions": [{"id": "change_case:english_lowercase", "kwargs": {}}, keyword],
        }
    return {
        "instruction": "Wrap in JSON",
        "text": phrase,
        "answer": json.dumps({"answer": phrase}),
        "instructions": [{"id": "detectable_format:json_format", "kwargs": {}}, keyword],
    }


_OPS = (("plus", "+"), ("minus", "-"), ("times", "*"))


def _code(rng: random.Random) -> dict[str, Any]:
    terms = 2
    words, expr = ["x"], ["x"]
    for _ in range(terms):
        word, sym = rng.choice(_OPS)
        c = rng.randint(2, 9)
        words += [word, str(c)]
        expr += [sym, str(c)]
    source = " ".join(expr)
    xs = sorted(rng.sample(range(-5, 12), 3))
    tests = [f"assert f({x}) == {eval(source, {'x': x})}" for x in xs]  # noqa: S307 - our own expression
    return {
        "spec": " ".join(words),
        "answer": f"def f(x):\n    return {source}",
        "tests": tests,
    }


def _order(rng: random.Random) -> dict[str, Any]:
    shared = rng.randint(0, 2)
    stem = "".join(rng.choice(_LETTERS) for _ in range(shared))
    while True:
        a, b = (stem + "".join(rng.choice(_LETTERS) for _ in range(rng.randint(3, 5) - shared))
                for _ in range(2))
        if a != b:
            return {"a": a, "b": b, "choices": [a, b], "answer": min(a, b)}


def _text(rng: random.Random) -> dict[str, Any]:
    """Plain text in the style of the other skills, for agreement and perplexity."""
    words = rng.sample(_WORDS, rng.randint(4, 7))
    return {"text": " ".join(words) + "."}


@dataclass(frozen=True)
class Skill:
    """A named generator of raw examples; ``key`` identifies an example's content."""

    name: str
    draw: Callable[[random.Random], dict[str, Any]]
    key: tuple[str, ...]

    def examples(self, seed: int) -> Iterator[dict[str, Any]]:
        rng = random.Random(f"{self.name}:{seed}")
        while True:
            yield self.draw(rng)

    def identity(self, example: dict[str, Any]) -> str:
        return json.dumps([example[k] for k in self.key])


SKILLS: dict[str, Skill] = {
    s.name: s
    for s in (
        Skill("addition", _addition, ("a", "b")),
        Skill("reverse", _reverse, ("word",)),
        Skill("format", _format, ("instruction", "text")),
        Skill("code", _code, ("spec",)),
        Skill("order", _order, ("a", "b")),
        Skill("text", _text, ("text",)),
    )
}

EVAL_SIZES = {"proxy": 48, "held_out": 96}


def _unique(skill: Skill, seed: int, n: int, taken: set[str]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for example in skill.examples(seed):
        ident = skill.identity(example)
        if ident in taken:
            continue
        taken.add(ident)
        out.append(example)
        if len(out) == n:
            return out
    return out


def write_eval_data(out_dir: Path, sizes: dict[str, int] | None = None) -> list[Path]:
    """Write ``<skill>.<split>.jsonl`` for every skill; splits never share an example."""
    sizes = sizes or EVAL_SIZES
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for skill in SKILLS.values():
        taken: set[str] = set()
        for i, (split, n) in enumerate(sizes.items()):
            path = out_dir / f"{skill.name}.{split}.jsonl"
            rows = _unique(skill, 1000 + i, n, taken)
            path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
            written.append(path)
    return written
