"""The eval engine protocol: what scorers and workers need from a loaded model.

An engine is built once from a model folder and then reused: a candidate's weights are
written into it in place with ``load_weights``. All decoding is greedy.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

__all__ = [
    "Engine",
    "LoglikelihoodResult",
    "TokenScores",
    "WeightLoad",
    "check_model_dir",
    "cut_at_stop",
    "eos_token_ids",
    "loglikelihood_ids",
]


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

    def weight_specs(self) -> dict[str, tuple[tuple[int, ...], Any]]:
        """Checkpoint tensor name -> (shape, torch dtype) of every weight ``load_weights`` needs."""

    def load_weights(self, named_tensors: Iterable[tuple[str, Any]]) -> int:
        """Overwrite every weight in place (checkpoint tensor names); no engine rebuild.

        The tensors must be a whole candidate: each name of ``weight_specs`` once (a tied
        ``lm_head.weight`` may be passed and is ignored). A bad name or shape, a missing tensor
        or an error while loading leaves the engine refusing to score until a whole set loads.
        Returns how many tensors were written.
        """

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


def eos_token_ids(tokenizer: Any, generation_config: Any) -> list[int]:
    """The token ids that end a generation: the tokenizer's EOS and the generation config's."""
    ids = {tokenizer.eos_token_id, *_as_list(getattr(generation_config, "eos_token_id", None))}
    return sorted(i for i in ids if i is not None)


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def loglikelihood_ids(
    encode: Any, prefix_id: int, max_length: int, context: str, continuation: str
) -> tuple[list[int], int]:
    """Token ids of ``context + continuation`` and how many trailing ones are the continuation.

    The continuation is tokenised in context when the context's tokens are a prefix of the
    whole text's, else on its own; an empty context becomes the prefix token. The sequence
    keeps its last ``max_length + 1`` tokens (the last one is only predicted).
    """
    from mergesearch.errors import ConfigError

    ctx = encode(context) or [prefix_id]
    whole = encode(context + continuation)
    if whole[: len(ctx)] == ctx and len(whole) > len(ctx):
        cont = whole[len(ctx) :]
    else:
        cont = encode(continuation)
    if not cont:
        raise ConfigError(f"Continuation {continuation!r} is empty after tokenisation.")
    return (ctx + cont)[-(max_length + 1) :], len(cont)


def check_model_dir(path: Any, backend: str) -> dict[str, Any]:
    """A model folder's config.json (``io.checkpoint.read_model_config``), its refusals prefixed
    with the backend; a model that ships its own code (``auto_map``) is refused as unsafe:
    running it would need ``trust_remote_code``, which mergesearch never sets."""
    from pathlib import Path

    from mergesearch.errors import CheckpointError, UnsafeCheckpointError
    from mergesearch.io.checkpoint import read_model_config

    try:
        return read_model_config(Path(path))
    except UnsafeCheckpointError:
        raise
    except CheckpointError as err:
        raise CheckpointError(f"{backend} cannot load {str(path)!r}: {err}") from None


class WeightLoad:
    """Checks a stream of named tensors against an engine's ``weight_specs`` as it is loaded.

    ``check(name, tensor)`` names the bad tensor (unknown name, other shape, given twice);
    ``finish()`` names the first missing one. ``skip`` holds names that are accepted and
    ignored (a tied ``lm_head.weight``).
    """

    def __init__(self, specs: dict[str, tuple[tuple[int, ...], Any]], model_dir: str, skip: Iterable[str] = ()):
        self.specs = specs
        self.model_dir = model_dir
        self.skip = set(skip)
        self.seen: set[str] = set()

    def check(self, name: str, tensor: Any) -> bool:
        """True when the tensor is to be written, False when it is skipped."""
        from mergesearch.errors import CheckpointError, TensorMismatchError

        spec = self.specs.get(name)
        if spec is None:
            if name in self.skip:
                return False
            raise CheckpointError(
                f"Engine for {self.model_dir!r} has no tensor {name!r}; the candidate does not "
                "match the engine's architecture."
            )
        if tuple(tensor.shape) != tuple(spec[0]):
            raise TensorMismatchError(
                f"Tensor {name!r} has shape {tuple(tensor.shape)} but the engine's is {tuple(spec[0])}."
            )
        if name in self.seen:
            raise CheckpointError(f"Tensor {name!r} was given twice in one weight load; pass each tensor once.")
        self.seen.add(name)
        return True

    def finish(self) -> int:
        from mergesearch.errors import CheckpointError

        missing = sorted(set(self.specs) - self.seen)
        if missing:
            raise CheckpointError(
                f"The weights loaded into the engine for {self.model_dir!r} lack {len(missing)} of its "
                f"{len(self.specs)} tensors (first: {missing[0]!r}); load_weights takes a whole "
                "candidate, every tensor once."
            )
        return len(self.seen)
