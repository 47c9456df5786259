"""Run a task on an engine, in chunks, keeping every example's score."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Optional

from mergesearch.errors import ConfigError

__all__ = ["TaskResult", "ChunkReport", "evaluate"]


@dataclass(frozen=True)
class TaskResult:
    """Per-example scores of one task on one split; ``complete`` is False if stopped early."""

    task: str
    split: str
    scores: tuple[float, ...]
    details: tuple[str, ...]
    responses: tuple[Optional[str], ...]
    total: int
    seconds: float

    @property
    def complete(self) -> bool:
        return len(self.scores) == self.total

    @property
    def mean(self) -> float:
        return sum(self.scores) / len(self.scores) if self.scores else 0.0


@dataclass(frozen=True)
class ChunkReport:
    """Progress after a chunk: examples scored so far and their running mean."""

    task: str
    split: str
    done: int
    total: int
    scores: tuple[float, ...]

    @property
    def mean(self) -> float:
        return sum(self.scores) / len(self.scores) if self.scores else 0.0


def evaluate(
    engine: Any,
    task: Any,
    split: str = "proxy",
    *,
    chunk_size: Optional[int] = None,
    limit: Optional[int] = None,
    on_chunk: Optional[Callable[[ChunkReport], Optional[bool]]] = None,
) -> TaskResult:
    """Score ``task``'s ``split`` with ``engine``.

    With ``chunk_size``, examples are scored in chunks of that many and ``on_chunk`` gets the
    running mean after each; returning True stops early (the result is then incomplete), and an
    exception it raises (a pruner's, for instance) propagates.
    """
    examples: Sequence[Any] = task.examples(split)
    if limit is not None:
        if limit < 1:
            raise ConfigError(f"limit must be a positive number of examples, got {limit!r}.")
        examples = examples[:limit]
    if chunk_size is not None and chunk_size < 1:
        raise ConfigError(f"chunk_size must be a positive number of examples, got {chunk_size!r}.")
    step = chunk_size or len(examples)
    start_time = time.perf_counter()
    scores: list[float] = []
    details: list[str] = []
    responses: list[Optional[str]] = []
    for start in range(0, len(examples), step):
        chunk = examples[start : start + step]
        for s in task.scorer.score(engine, chunk):
            scores.append(min(max(float(s.score), 0.0), 1.0))
            details.append(s.detail)
            responses.append(s.response)
        if on_chunk is not None:
            report = ChunkReport(task.name, split, len(scores), len(examples), tuple(scores))
            if on_chunk(report):
                break
    return TaskResult(
        task=task.name,
        split=split,
        scores=tuple(scores),
        details=tuple(details),
        responses=tuple(responses),
        total=len(examples),
        seconds=time.perf_counter() - start_time,
    )
