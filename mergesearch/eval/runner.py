"""Run a task on an engine, in chunks, keeping every example's score."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Optional

from mergesearch.errors import ConfigError

__all__ = ["TaskResult", "ChunkReport", "evaluate", "evaluate_interleaved", "InterleavedReport"]


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
    _check_sizes(limit, chunk_size)
    examples: Sequence[Any] = task.examples(split)
    if limit is not None:
        examples = examples[:limit]
    step = chunk_size or len(examples)
    start_time = time.perf_counter()
    scores: list[float] = []
    details: list[str] = []
    responses: list[Optional[str]] = []
    for start in range(0, len(examples), step):
        _score_chunk(engine, task, examples[start : start + step], scores, details, responses)
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


def _check_sizes(limit: Optional[int], chunk_size: Optional[int]) -> None:
    if limit is not None and limit < 1:
        raise ConfigError(f"limit must be a positive number of examples, got {limit!r}.")
    if chunk_size is not None and chunk_size < 1:
        raise ConfigError(f"chunk_size must be a positive number of examples, got {chunk_size!r}.")


def _score_chunk(engine: Any, task: Any, chunk: Sequence[Any], scores: list[float], details: list[str],
                 responses: list[Optional[str]]) -> None:
    for s in task.scorer.score(engine, chunk):
        scores.append(min(max(float(s.score), 0.0), 1.0))
        details.append(s.detail)
        responses.append(s.response)


@dataclass(frozen=True)
class InterleavedReport:
    """Progress of several tasks scored round-robin: per-task scores so far."""

    split: str
    scores: dict[str, tuple[float, ...]]
    totals: dict[str, int]

    @property
    def done(self) -> int:
        return sum(len(v) for v in self.scores.values())

    @property
    def total(self) -> int:
        return sum(self.totals.values())


def evaluate_interleaved(
    engine: Any,
    tasks: Sequence[Any],
    split: str = "proxy",
    *,
    chunk_size: int,
    limit: Optional[int] = None,
    on_round: Optional[Callable[[InterleavedReport], Optional[bool]]] = None,
) -> list[TaskResult]:
    """Score several tasks a chunk of each at a time, so every running mean covers every task.

    After each round (one chunk of every unfinished task) ``on_round`` gets the scores so far;
    returning True stops (the results are then incomplete).
    """
    _check_sizes(limit, chunk_size)
    examples = {t.name: list(t.examples(split))[:limit] for t in tasks}
    state = {t.name: ([], [], []) for t in tasks}
    seconds = {t.name: 0.0 for t in tasks}
    offset = 0
    while any(offset < len(examples[t.name]) for t in tasks):
        for t in tasks:
            chunk = examples[t.name][offset : offset + chunk_size]
            if chunk:
                start = time.perf_counter()
                _score_chunk(engine, t, chunk, *state[t.name])
                seconds[t.name] += time.perf_counter() - start
        offset += chunk_size
        if on_round is not None:
            report = InterleavedReport(split, {n: tuple(s[0]) for n, s in state.items()},
                                       {n: len(e) for n, e in examples.items()})
            if on_round(report):
                break
    return [
        TaskResult(task=t.name, split=split, scores=tuple(state[t.name][0]), details=tuple(state[t.name][1]),
                   responses=tuple(state[t.name][2]), total=len(examples[t.name]), seconds=seconds[t.name])
        for t in tasks
    ]
