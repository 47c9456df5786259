"""The transformers engine: one model built once, weights overwritten in place per candidate."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from mergesearch.errors import CheckpointError, ConfigError
from mergesearch.eval.engine import (
    LoglikelihoodResult,
    TokenScores,
    WeightLoad,
    check_model_dir,
    cut_at_stop,
    eos_token_ids,
    loglikelihood_ids,
)

__all__ = ["TransformersEngine"]

_DTYPES = ("auto", "float32", "float16", "bfloat16")


class TransformersEngine:
    """A causal LM from a local model folder, run with transformers (CPU or CUDA).

    Generation is batched and greedy with left padding and a KV cache; scoring batches are
    right padded. ``load_weights`` copies tensors into the existing parameters.
    """

    def __init__(
        self,
        model_dir: str | Path,
        *,
        dtype: str = "auto",
        device: str = "cpu",
        batch_size: int = 32,
    ) -> None:
        import torch
        from safetensors import SafetensorError
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if dtype not in _DTYPES:
            raise ConfigError(f"Engine dtype {dtype!r} is not one of {', '.join(_DTYPES)}.")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"Engine batch_size must be a positive integer, got {batch_size!r}.")
        self.model_dir = str(model_dir)
        path = Path(model_dir)
        check_model_dir(path, "transformers")
        self.device = torch.device(device)
        self.batch_size = batch_size
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
            self.model, info = AutoModelForCausalLM.from_pretrained(
                path,
                dtype=dtype if dtype == "auto" else getattr(torch, dtype),
                local_files_only=True,
                use_safetensors=True,
                output_loading_info=True,
            )
        except (OSError, ValueError, RuntimeError, SafetensorError) as err:
            raise CheckpointError(f"transformers cannot load {str(path)!r}: {err}") from None
        missing = sorted(info.get("missing_keys") or ())
        if missing:
            raise CheckpointError(
                f"{str(path)!r} lacks {len(missing)} tensor(s) the model needs (first: {missing[0]!r}); "
                "transformers would fill them with random values."
            )
        if not self._encode("Hello"):
            raise CheckpointError(
                f"{str(path)!r} has no usable tokenizer (text encodes to no tokens); copy the model's "
                "tokenizer files (tokenizer.json, tokenizer_config.json) into the folder."
            )
        self.model.to(self.device).eval()
        self.model.requires_grad_(False)
        tok = self.tokenizer
        self.eos_ids = eos_token_ids(tok, self.model.generation_config)
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else (self.eos_ids or [0])[0]
        self.prefix_id = tok.bos_token_id if tok.bos_token_id is not None else self.pad_id
        self.max_length = int(getattr(self.model.config, "max_position_embeddings", 2048) or 2048)
        self._params = dict(self.model.named_parameters())
        self._tied = bool(getattr(self.model.config, "tie_word_embeddings", False))
        self._stale: str | None = None

    def _check_ready(self) -> None:
        if self.model is None:
            raise CheckpointError(f"The engine for {self.model_dir!r} was closed; build a new one.")
        if self._stale:
            raise CheckpointError(
                f"The engine for {self.model_dir!r} holds a partly loaded candidate ({self._stale}); "
                "load a whole candidate with load_weights before scoring."
            )

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def generate(self, prompts: Sequence[str], *, max_new_tokens: int, stop: Sequence[str] = ()) -> list[str]:
        import torch

        self._check_ready()
        if not prompts:
            return []
        encoded = [self._encode(p) or [self.prefix_id] for p in prompts]
        keep = max(self.max_length - max_new_tokens, 1)
        encoded = [ids[-keep:] for ids in encoded]
        order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
        out: list[str] = [""] * len(prompts)
        stop = list(stop)
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            width = max(len(encoded[i]) for i in idx)
            ids = torch.full((len(idx), width), self.pad_id, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for row, i in enumerate(idx):
                n = len(encoded[i])
                ids[row, width - n :] = torch.tensor(encoded[i])
                mask[row, width - n :] = 1
            kwargs: dict[str, Any] = {}
            if stop:
                kwargs.update(stop_strings=stop, tokenizer=self.tokenizer)
            with torch.inference_mode():
                gen = self.model.generate(
                    input_ids=ids.to(self.device),
                    attention_mask=mask.to(self.device),
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    num_beams=1,
                    eos_token_id=self.eos_ids or None,
                    pad_token_id=self.pad_id,
                    **kwargs,
                )
            for row, i in enumerate(idx):
                new = gen[row, width:].tolist()
                cut = next((k for k, t in enumerate(new) if t in self.eos_ids), len(new))
                text = self.tokenizer.decode(new[:cut], skip_special_tokens=True)
                out[i] = cut_at_stop(text, stop)
        return out

    def _forward_logprobs(self, seqs: Sequence[list[int]]) -> Any:
        import torch

        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for row, s in enumerate(seqs):
            ids[row, : len(s)] = torch.tensor(s)
            mask[row, : len(s)] = 1
        with torch.inference_mode():
            logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).logits
        return torch.log_softmax(logits.float(), dim=-1).cpu()

    def loglikelihood(self, requests: Sequence[tuple[str, str]]) -> list[LoglikelihoodResult]:
        import torch

        self._check_ready()
        seqs = [loglikelihood_ids(self._encode, self.prefix_id, self.max_length, c, x) for c, x in requests]
        out: list[LoglikelihoodResult] = [None] * len(seqs)  # type: ignore[list-item]
        order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i][0]))
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            logprobs = self._forward_logprobs([seqs[i][0][:-1] for i in idx])
            for row, i in enumerate(idx):
                seq, n = seqs[i]
                end = len(seq) - 1
                lp = logprobs[row, end - n : end]
                target = torch.tensor(seq[-n:], dtype=torch.long)
                picked = lp.gather(-1, target.unsqueeze(-1)).squeeze(-1)
                greedy = bool((lp.argmax(-1) == target).all())
                out[i] = LoglikelihoodResult(float(picked.sum()), n, greedy)
        return out

    def token_scores(self, texts: Sequence[str]) -> list[TokenScores]:
        import torch

        self._check_ready()
        encoded = [[self.prefix_id] + self._encode(t) for t in texts]
        encoded = [s[: self.max_length] for s in encoded]
        out: list[TokenScores] = [None] * len(texts)  # type: ignore[list-item]
        order = sorted(range(len(texts)), key=lambda i: -len(encoded[i]))
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            logprobs = self._forward_logprobs([encoded[i] for i in idx])
            for row, i in enumerate(idx):
                n = len(encoded[i])
                out[i] = TokenScores(
                    targets=torch.tensor(encoded[i][1:], dtype=torch.long),
                    logprobs=logprobs[row, : n - 1].clone(),
                )
        return out

    def tensor_names(self) -> list[str]:
        """Checkpoint tensor names this engine holds (``lm_head.weight`` omitted when tied)."""
        return list(self._params)

    def weight_specs(self) -> dict[str, tuple[tuple[int, ...], Any]]:
        return {n: (tuple(p.shape), p.dtype) for n, p in self._params.items()}

    def load_weights(self, named_tensors: Iterable[tuple[str, Any]]) -> int:
        """Copy a whole candidate into the live parameters; returns how many were written."""
        import torch

        if self.model is None:
            raise CheckpointError(f"The engine for {self.model_dir!r} was closed; build a new one.")
        load = WeightLoad(self.weight_specs(), self.model_dir, skip=("lm_head.weight",) if self._tied else ())
        self._stale = "a weight load did not finish"
        with torch.no_grad():
            for name, tensor in named_tensors:
                if load.check(name, tensor):
                    self._params[name].copy_(tensor)
        count = load.finish()
        self._stale = None
        return count

    def state_dict(self) -> dict[str, Any]:
        """The live parameters by checkpoint name (views, not copies)."""
        return {n: p.detach() for n, p in self._params.items()}

    def close(self) -> None:
        self.model = None  # type: ignore[assignment]
        self._params = {}
