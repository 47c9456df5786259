"""The eval engine protocol: what scorers and workers need from a loaded model.

An engine is built once from a model folder and then reused: a candidate's weights are
written into it in place with ``load_weights``. All decoding is greedy.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

__all__ = ["Engine", "LoglikelihoodResult", "TokenScores", "cut_at_stop"]


@dataclass(frozen=True)
class LoglikelihoodResult:
    """Log-probability of a continuation given its context, summed over its tokens."""

    logprob: float
    num_tokens: int
    is_greedy: bool


@dataclass(frozen=True)
class TokenScores:
    """Per-position next-token log-probabilities of a text.

    ``targets[i]`` is the token at position ``i + 1``; ``logprobs[i]`` is the model's
    log-softmax over the vocabulary at position ``i`` (a float32 tensor ``[T-1, V]``).
    """

    targets: Any
    logprobs: Any


@runtime_checkable
class Engine(Protocol):
    """A long-lived model that generates and scores text and takes new weights in place."""

    model_dir: str

    def generate(
        self, prompts: Sequence[str], *, max_new_tokens: int, stop: Sequence[str] = ()
    ) -> list[str]:
        """Greedy continuations, cut before the first stop string; EOS always stops."""

    def loglikelihood(self, requests: Sequence[tuple[str, str]]) -> list[LoglikelihoodResult]:
        """Score ``(context, continuation)`` pairs."""

    def token_scores(self, texts: Sequence[str]) -> list[TokenScores]:
        """Next-token log-probabilities at every position of each text."""

    def load_weights(self, named_tensors: Iterable[tuple[str, Any]]) -> None:
        """Overwrite weights in place (checkpoint tensor names); no engine rebuild."""

    def close(self) -> None:
        """Release the model; the engine is unusable afterwards."""


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """``text`` up to (not including) the earliest occurrence of any stop string."""
    cut = len(text)
    for s in stop:
        i = text.find(s)
        if 0 <= i < cut:
            cut = i
    return text[:cut]
