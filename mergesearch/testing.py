"""Tiny, deterministic Hugging Face checkpoints for tests, benchmarks and demos.

Everything here is built locally from a seed (no hub access): a byte-level BPE
tokenizer trained on an embedded corpus, randomly initialised Qwen3/Llama
causal LMs, and synthetic "fine-tunes" made by adding seeded noise to a base.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "SPECIAL_TOKENS",
    "CHAT_TEMPLATE",
    "build_tokenizer",
    "build_tiny_model",
    "perturb_model",
    "build_family",
]

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS: tuple[str, ...] = (ENDOFTEXT, IM_START, IM_END)

CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

_ENGLISH = """\
The quick brown fox jumps over the lazy dog. A merge combines the weights of
several fine-tuned models that share one architecture into a single model.
When two models were trained from the same base, their task vectors often
point in compatible directions, so averaging them keeps much of each skill.
Researchers compare linear averaging, spherical interpolation, task
arithmetic, TIES and DARE. Each method has a few parameters, such as the
weight of every model, the density of the kept deltas, or the interpolation
factor, and the best values depend on the models and on the evaluation.
Question: What is the capital of France? Answer: The capital of France is Paris.
Question: How many legs does a spider have? Answer: A spider has eight legs.
Question: Which planet is known as the red planet? Answer: Mars is the red planet.
She opened the window, looked at the garden, and said that the weather was
finally warm enough for a long walk by the river before dinner.
They were reading about history, science, music and mathematics in the library
while the teacher explained how the experiment should be repeated carefully.
Please summarize the following text in one sentence. The user asked for help,
and the assistant answered with a clear, short and correct explanation.
It is important to test every function with small inputs, because small inputs
make failures easy to understand and fast to reproduce on any computer.
"""

_CODE = """\
def add(a: int, b: int) -> int:
    return a + b


def fibonacci(n):
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a


class Counter:
    def __init__(self, start=0):
        self.value = start

    def increment(self, step=1):
        self.value += step
        return self.value


import json
from pathlib import Path

data = {"name": "model", "layers": 4, "hidden_size": 64, "dtype": "float32"}
Path("config.json").write_text(json.dumps(data, indent=2))
for i, item in enumerate(sorted(data.items())):
    if item[0].startswith("h"):
        print(f"{i}: {item[0]} = {item[1]}")
    else:
        continue
result = [x * x for x in range(10) if x % 2 == 0]
print(result == [0, 4, 16, 36, 64], result)
"""


def _corpus() -> list[str]:
    arithmetic = [f"{a} + {b} = {a + b}" for a in range(0, 60, 7) for b in range(3, 90, 11)]
    products = [f"{a} * {b} = {a * b}" for a in range(2, 13) for b in range(2, 13, 3)]
    numbers = [" ".join(str(n) for n in range(k, k + 25)) for k in range(0, 1000, 125)]
    return [*_ENGLISH.splitlines(), *_CODE.splitlines(), *arithmetic, *products, *numbers]


_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
)

_MIN_VOCAB = 256 + len(SPECIAL_TOKENS)

_DTYPES = ("float32", "bfloat16", "float16")

_ARCHS = ("qwen3", "llama")


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def build_tokenizer(out_dir: Path, vocab_size: int = 512) -> Path:
    """Train a deterministic byte-level BPE tokenizer and save it in HF format.

    The vocabulary has exactly ``vocab_size`` entries (ids 0-2 are
    ``<|endoftext|>``, ``<|im_start|>``, ``<|im_end|>``; if the corpus runs out
    of merges the rest is filled with ``<|reserved_N|>`` special tokens).
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    if not isinstance(vocab_size, int) or isinstance(vocab_size, bool) or vocab_size < _MIN_VOCAB:
        raise ValueError(f"vocab_size must be an int >= {_MIN_VOCAB}, got {vocab_size!r}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_SPLIT_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    missing = vocab_size - tok.get_vocab_size(with_added_tokens=True)
    if missing > 0:
        tok.add_special_tokens([f"<|reserved_{i}|>" for i in range(missing)])
    tok.save(str(out_dir / "tokenizer.json"), pretty=True)

    added = json.loads((out_dir / "tokenizer.json").read_text(encoding="utf-8"))["added_tokens"]
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "added_tokens_decoder": {
            str(t["id"]): {
                "content": t["content"],
                "lstrip": t["lstrip"],
                "normalized": t["normalized"],
                "rstrip": t["rstrip"],
                "single_word": t["single_word"],
                "special": t["special"],
            }
            for t in added
        },
        "additional_special_tokens": [IM_START, IM_END],
        "bos_token": None,
        "eos_token": IM_END,
        "pad_token": ENDOFTEXT,
        "unk_token": None,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 2048,
        "chat_template": CHAT_TEMPLATE,
    }
    _write_json(out_dir / "tokenizer_config.json", tokenizer_config)
    _write_json(
        out_dir / "special_tokens_map.json",
        {"additional_special_tokens": [IM_START, IM_END], "eos_token": IM_END, "pad_token": ENDOFTEXT},
    )
    return out_dir


def _copy_tokenizer(src_dir: Path, out_dir: Path) -> None:
    src_dir = Path(src_dir)
    if not (src_dir / "tokenizer.json").is_file():
        raise ValueError(f"tokenizer_dir has no tokenizer.json: {src_dir}")
    for name in _TOKENIZER_FILES:
        if (src_dir / name).is_file():
            shutil.copyfile(src_dir / name, out_dir / name)


def _token_ids(tokenizer_json: Path) -> tuple[int, dict[str, int | None]]:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_json))
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    return tok.get_vocab_size(with_added_tokens=True), ids


def _check_positive(**values: Any) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{name} must be a positive int, got {value!r}")


def _torch_dtype(dtype: str) -> Any:
    import torch

    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {_DTYPES}, got {dtype!r}")
    return getattr(torch, dtype)


def _parse_size(size: str | int) -> int:
    if isinstance(size, int) and not isinstance(size, bool):
        if size <= 0:
            raise ValueError(f"max_shard_size must be positive, got {size!r}")
        return size
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", size) if isinstance(size, str) else None
    if match is None or match.group(2).upper() not in units or float(match.group(1)) <= 0:
        raise ValueError(f"max_shard_size must be a positive int or a size like '200KB', got {size!r}")
    return int(float(match.group(1)) * units[match.group(2).upper()])


def _clear_weights(out_dir: Path) -> None:
    for path in out_dir.glob("*.safetensors"):
        path.unlink()
    index = out_dir / "model.safetensors.index.json"
    if index.exists():
        index.unlink()


def build_tiny_model(
    out_dir: Path,
    arch: str = "qwen3",
    *,
    num_layers: int = 4,
    hidden_size: int = 64,
    intermediate_size: int = 128,
    num_heads: int = 2,
    num_kv_heads: int = 1,
    head_dim: int | None = None,
    vocab_size: int = 512,
    tie_word_embeddings: bool = True,
    seed: int = 0,
    dtype: str = "float32",
    max_shard_size: str | int | None = None,
    tokenizer_dir: Path | None = None,
) -> Path:
    """Save a seeded, randomly initialised Qwen3 or Llama causal LM with its tokenizer.

    RMSNorm weights are set to ``1 + 0.1 * N(0, 1)`` so they are not all ones.
    Output is byte-identical for identical arguments.
    """
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

    if arch not in _ARCHS:
        raise ValueError(f"arch must be one of {_ARCHS}, got {arch!r}")
    _check_positive(
        num_layers=num_layers,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        vocab_size=vocab_size,
    )
    if head_dim is None:
        if hidden_size % num_heads:
            raise ValueError(
                f"hidden_size={hidden_size} is not divisible by num_heads={num_heads}; pass head_dim"
            )
        head_dim = hidden_size // num_heads
    _check_positive(head_dim=head_dim)
    if head_dim % 2:
        raise ValueError(f"head_dim must be even for rotary embeddings, got {head_dim!r}")
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads={num_heads} is not divisible by num_kv_heads={num_kv_heads}")
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    torch_dtype = _torch_dtype(dtype)
    if max_shard_size is not None:
        _parse_size(max_shard_size)

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if tokenizer_dir is not None:
        _copy_tokenizer(Path(tokenizer_dir), out_dir)
    else:
        build_tokenizer(out_dir, vocab_size=vocab_size)
    tok_size, ids = _token_ids(out_dir / "tokenizer.json")
    if tok_size > vocab_size:
        raise ValueError(f"vocab_size={vocab_size} is smaller than the tokenizer's {tok_size} tokens")
    eos_id, pad_id = ids[IM_END], ids[ENDOFTEXT]

    config_cls, model_cls = {
        "qwen3": (Qwen3Config, Qwen3ForCausalLM),
        "llama": (LlamaConfig, LlamaForCausalLM),
    }[arch]
    config = config_cls(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=head_dim,
        max_position_embeddings=2048,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=None,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls(config)
        gen = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith("norm.weight"):
                    param.copy_(1.0 + 0.1 * torch.randn(param.shape, generator=gen))
    model = model.to(torch_dtype)
    model.config.dtype = torch_dtype
    eos_ids = [i for i in (eos_id, pad_id) if i is not None]
    model.generation_config = GenerationConfig(
        bos_token_id=None,
        eos_token_id=eos_ids or None,
        pad_token_id=pad_id,
    )
    _clear_weights(out_dir)
    save_kwargs: dict[str, Any] = {}
    if max_shard_size is not None:
        save_kwargs["max_shard_size"] = max_shard_size
    model.save_pretrained(out_dir, safe_serialization=True, **save_kwargs)
    return out_dir


def _tensor_seed(seed: int, name: str, salt: str) -> int:
    digest = hashlib.sha256(f"{seed}\0{salt}\0{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _read_tensors(src_dir: Path) -> dict[str, Any]:
    from safetensors import safe_open

    index = src_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        files = sorted(set(weight_map.values()))
    elif (src_dir / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise ValueError(f"no model.safetensors or model.safetensors.index.json in {src_dir}")
    tensors: dict[str, Any] = {}
    for file in files:
        with safe_open(str(src_dir / file), framework="pt") as f:
            for key in f.keys():
                tensors[key] = f.get_tensor(key)
    return tensors


def _write_tensors(tensors: dict[str, Any], out_dir: Path, max_shard_size: str | int | None) -> None:
    from safetensors.torch import save_file

    metadata = {"format": "pt"}
    limit = _parse_size(max_shard_size) if max_shard_size is not None else None
    shards: list[dict[str, Any]] = [{}]
    used = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if limit is not None and shards[-1] and used + nbytes > limit:
            shards.append({})
            used = 0
        shards[-1][name] = tensor
        used += nbytes
    if len(shards) == 1:
        save_file(shards[0], str(out_dir / "model.safetensors"), metadata=metadata)
        return
    weight_map: dict[str, str] = {}
    for i, shard in enumerate(shards, start=1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out_dir / file), metadata=metadata)
        weight_map.update({name: file for name in shard})
    index = {
        "metadata": {
            "total_parameters": sum(t.numel() for t in tensors.values()),
            "total_size": sum(t.numel() * t.element_size() for t in tensors.values()),
        },
        "weight_map": dict(sorted(weight_map.items())),
    }
    _write_json(out_dir / "model.safetensors.index.json", index)


def perturb_model(
    src_dir: Path,
    out_dir: Path,
    *,
    seed: int,
    scale: float = 0.02,
    dtype: str | None = None,
    max_shard_size: str | int | None = None,
    drop: Sequence[str] = (),
    reshape: dict[str, tuple[int, ...]] | None = None,
) -> Path:
    """Write a synthetic fine-tune of ``src_dir``: each tensor plus ``N(0,1) * scale * std``.

    Noise is seeded per (seed, tensor name), so it does not depend on which other
    tensors are present. ``drop`` omits tensors; ``reshape`` replaces tensors by
    random ones of the given shape. Non-weight files are copied; ``config.json``
    gets its dtype updated when ``dtype`` is given.
    """
    import torch

    src_dir, out_dir = Path(src_dir), Path(out_dir)
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not scale >= 0:
        raise ValueError(f"scale must be a non-negative number, got {scale!r}")
    out_torch_dtype = _torch_dtype(dtype) if dtype is not None else None
    if max_shard_size is not None:
        _parse_size(max_shard_size)
    if not src_dir.is_dir():
        raise ValueError(f"src_dir does not exist: {src_dir}")
    if out_dir.resolve() == src_dir.resolve():
        raise ValueError(f"out_dir must differ from src_dir, got {out_dir}")
    if isinstance(drop, str):
        raise ValueError(f"drop must be a sequence of tensor names, got the string {drop!r}")
    reshape = dict(reshape or {})

    tensors = _read_tensors(src_dir)
    unknown = sorted((set(drop) | set(reshape)) - set(tensors))
    if unknown:
        raise ValueError(f"unknown tensor names in drop/reshape: {unknown}")
    both = sorted(set(drop) & set(reshape))
    if both:
        raise ValueError(f"tensor names both dropped and reshaped: {both}")
    for name, shape in reshape.items():
        if not isinstance(shape, (tuple, list)) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape
        ):
            raise ValueError(f"reshape[{name!r}] must be a tuple of positive ints, got {shape!r}")

    out: dict[str, Any] = {}
    for name, tensor in tensors.items():
        if name in drop:
            continue
        target = out_torch_dtype or tensor.dtype
        if not tensor.is_floating_point():
            out[name] = tensor.clone()
            continue
        t32 = tensor.to(torch.float32)
        std = float(t32.std()) if t32.numel() > 1 else 0.0
        gen = torch.Generator().manual_seed(_tensor_seed(seed, name, "reshape" if name in reshape else "noise"))
        if name in reshape:
            new = torch.randn(tuple(reshape[name]), generator=gen) * (std or 1.0)
        else:
            new = t32 + torch.randn(t32.shape, generator=gen) * (scale * std)
        out[name] = new.to(target).contiguous()

    out_dir.mkdir(parents=True, exist_ok=True)
    _clear_weights(out_dir)
    for path in sorted(src_dir.iterdir()):
        if path.is_file() and path.suffix != ".safetensors" and path.name != "model.safetensors.index.json":
            shutil.copyfile(path, out_dir / path.name)
    config_path = out_dir / "config.json"
    if dtype is not None and config_path.is_file():
        config = json.loads(config_path.read_text(encoding="utf-8"))
        keys = [k for k in ("dtype", "torch_dtype") if k in config] or ["dtype"]
        for key in keys:
            config[key] = dtype
        _write_json(config_path, config)
    _write_tensors(out, out_dir, max_shard_size)
    return out_dir


def _finetune_seed(seed: int, index: int) -> int:
    return 1000 * (seed + 1) + index


def build_family(
    root: Path, arch: str = "qwen3", n_finetunes: int = 2, **model_kwargs: Any
) -> dict[str, Path]:
    """Build ``root/base`` and ``n_finetunes`` perturbed copies ``root/ft{i}``.

    ``model_kwargs`` go to :func:`build_tiny_model`; fine-tune ``i`` uses seed
    ``1000 * (seed + 1) + i``. Returns ``{"base": ..., "ft0": ..., ...}``.
    """
    if not isinstance(n_finetunes, int) or isinstance(n_finetunes, bool) or n_finetunes < 0:
        raise ValueError(f"n_finetunes must be a non-negative int, got {n_finetunes!r}")
    root = Path(root)
    base = build_tiny_model(root / "base", arch, **model_kwargs)
    seed = model_kwargs.get("seed", 0)
    family = {"base": base}
    for i in range(n_finetunes):
        family[f"ft{i}"] = perturb_model(base, root / f"ft{i}", seed=_finetune_seed(seed, i))
    return family
