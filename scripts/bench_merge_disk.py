#!/usr/bin/env python
"""Benchmark ``mergesearch merge`` against ``mergekit-yaml`` on identical on-disk merges.

Builds (once, cached under --workdir) a random Qwen2.5-0.5B-shaped base and two
fine-tunes in bf16, writes linear / slerp / ties YAML configs, runs both CLIs on each
config (alternating, --repeats times), and reports median wall time, peak RSS and the
ours/mergekit ratios as a markdown table, plus a numeric agreement check of the outputs.

    python scripts/bench_merge_disk.py --quick            # pipeline check in seconds
    python scripts/bench_merge_disk.py --repeats 3 --output bench.md
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import shlex
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _benchutil as bu  # noqa: E402

METHODS = ("linear", "slerp", "ties")
TOOLS = ("ours", "mergekit")
TOOL_LABELS = {"ours": "mergesearch", "mergekit": "mergekit-yaml"}
AGREEMENT_TOL = {"linear": 1e-2, "slerp": 1e-2}
SOURCE_NAMES = ("base", "ft0", "ft1")


@dataclass
class Sources:
    """Paths of the three checkpoints and how they were built."""

    shape: bu.Qwen2Shape
    paths: dict[str, Path]
    shard_count: int
    bytes_each: int


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--workdir", type=Path, default=Path("/tmp/mergesearch-bench"), help="cache for checkpoints, configs, outputs, logs")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {','.join(METHODS)}")
    p.add_argument("--repeats", type=int, default=1, help="runs per tool and method, alternating ours/mergekit")
    p.add_argument("--quick", action="store_true", help=f"tiny model ({bu.QWEN2_TINY.num_hidden_layers} layers, hidden {bu.QWEN2_TINY.hidden_size}, vocab {bu.QWEN2_TINY.vocab_size})")
    p.add_argument("--tools", default=",".join(TOOLS), help="comma-separated subset of ours,mergekit")
    p.add_argument("--ours-cmd", default="mergesearch merge", help="our CLI; CONFIG OUT are appended, then --ours-args")
    p.add_argument("--ours-args", default="--force --device cpu", help="extra flags for our CLI; pass as --ours-args=\"...\" when they start with a dash")
    p.add_argument("--mergekit-cmd", default="mergekit-yaml", help="mergekit CLI; CONFIG OUT are appended, then --mergekit-args")
    p.add_argument("--mergekit-args", default="", help="extra mergekit-yaml flags, as --mergekit-args=\"...\" (default: its own defaults, CPU)")
    p.add_argument("--slerp-form", choices=("models", "slices"), default="models", help="write slerp as a models: list or as the slices:/layer_range recipe (mergekit plans both identically)")
    p.add_argument("--shard-mb", type=float, default=None, help="source shard size in MB (default 500, or 4 with --quick)")
    p.add_argument("--noise-std", type=float, default=0.002, help="std of the fine-tune deltas (weights have std 0.02)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rebuild", action="store_true", help="rebuild the source checkpoints even if cached")
    p.add_argument("--no-warm-cache", action="store_true", help="skip reading the sources once before timing")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds per run before it is killed")
    p.add_argument("--keep-outputs", action="store_true", help="keep merged outputs under WORKDIR/runs")
    p.add_argument("--output", type=Path, default=None, help="write the markdown report to this file")
    p.add_argument("--append", action="store_true", help="append to --output instead of overwriting")
    args = p.parse_args(argv)
    args.methods = _split_choices(p, args.methods, METHODS, "--methods")
    args.tools = _split_choices(p, args.tools, TOOLS, "--tools")
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    return args


def _split_choices(p: argparse.ArgumentParser, value: str, allowed: tuple[str, ...], flag: str) -> list[str]:
    chosen = [v.strip() for v in value.split(",") if v.strip()]
    bad = [v for v in chosen if v not in allowed]
    if bad or not chosen:
        p.error(f"{flag}: unknown {bad or 'empty'}; choose from {','.join(allowed)}")
    return [v for v in allowed if v in chosen]


def build_sources(args: argparse.Namespace) -> Sources:
    """Build or reuse base + two fine-tunes under WORKDIR/models/SHAPE."""
    shape = bu.QWEN2_TINY if args.quick else bu.QWEN2_5_0_5B
    shard_mb = args.shard_mb if args.shard_mb is not None else (4 if args.quick else 500)
    shard_bytes = int(shard_mb * 10**6)
    root = args.workdir / "models" / shape.name
    paths: dict[str, Path] = {}
    for i, name in enumerate(SOURCE_NAMES):
        spec = bu.CheckpointSpec(
            shape=shape,
            base_seed=args.seed,
            noise_seed=None if name == "base" else args.seed + 1000 + i,
            noise_std=0.0 if name == "base" else args.noise_std,
            shard_bytes=shard_bytes,
        )
        path = root / name
        t0 = time.perf_counter()
        built = bu.build_checkpoint(path, spec, force=args.rebuild)
        state = f"built in {time.perf_counter() - t0:.1f} s" if built else "cached"
        print(f"source {name}: {path} ({state})", flush=True)
        paths[name] = path
    shard_files = list(paths["base"].glob("*.safetensors"))
    return Sources(shape, paths, len(shard_files), sum(f.stat().st_size for f in shard_files))


def method_config(method: str, sources: Sources, slerp_form: str) -> dict:
    """The mergekit-style YAML document for one method."""
    base, ft0, ft1 = (str(sources.paths[n]) for n in SOURCE_NAMES)
    if method == "linear":
        return {
            "merge_method": "linear",
            "models": [
                {"model": base, "parameters": {"weight": 0.5}},
                {"model": ft0, "parameters": {"weight": 0.3}},
                {"model": ft1, "parameters": {"weight": 0.2}},
            ],
            "dtype": "bfloat16",
        }
    if method == "slerp":
        t = [
            {"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
            {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]},
            {"value": 0.5},
        ]
        doc: dict = {"merge_method": "slerp", "base_model": base}
        if slerp_form == "slices":
            layers = [0, sources.shape.num_hidden_layers]
            doc["slices"] = [{"sources": [{"model": base, "layer_range": layers}, {"model": ft0, "layer_range": layers}]}]
        else:
            doc["models"] = [{"model": base}, {"model": ft0}]
        doc.update({"parameters": {"t": t}, "dtype": "bfloat16"})
        return doc
    if method == "ties":
        return {
            "merge_method": "ties",
            "base_model": base,
            "models": [
                {"model": base},
                {"model": ft0, "parameters": {"density": 0.5, "weight": 0.5}},
                {"model": ft1, "parameters": {"density": 0.5, "weight": 0.5}},
            ],
            "parameters": {"normalize": True},
            "dtype": "bfloat16",
        }
    raise ValueError(method)


def write_configs(args: argparse.Namespace, sources: Sources) -> dict[str, Path]:
    """Write one YAML per selected method under WORKDIR/configs/SHAPE."""
    cfg_dir = args.workdir / "configs" / sources.shape.name
    cfg_dir.mkdir(parents=True, exist_ok=True)
    out = {}
    for method in args.methods:
        path = cfg_dir / f"{method}.yaml"
        path.write_text(yaml.safe_dump(method_config(method, sources, args.slerp_form), sort_keys=False))
        out[method] = path
    return out


def tool_command(tool: str, args: argparse.Namespace, config: Path, out_dir: Path) -> list[str]:
    """Full argv for one tool."""
    if tool == "ours":
        return [*shlex.split(args.ours_cmd), str(config), str(out_dir), *shlex.split(args.ours_args)]
    return [*shlex.split(args.mergekit_cmd), str(config), str(out_dir), *shlex.split(args.mergekit_args)]


def child_env() -> dict[str, str]:
    """Environment for both tools: offline, so no hub lookups can stall a run."""
    env = dict(os.environ)
    env.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"})
    return env


def print_failure(label: str, res: bu.RunResult, lines: int = 25) -> None:
    """Show why a run failed: its error or the tail of its stderr."""
    why = res.error or ("timed out" if res.timed_out else f"exit code {res.returncode}")
    print(f"  {label} FAILED ({why}): {shlex.join(res.cmd)}", flush=True)
    tail = (res.stderr_tail.strip() or res.stdout_tail.strip()).splitlines()[-lines:]
    for line in tail:
        print(f"    | {line}", flush=True)


def run_all(args: argparse.Namespace, configs: dict[str, Path], shape_name: str) -> dict[tuple[str, str], list[bu.RunResult]]:
    """Run each method with each tool, alternating tools within every repeat."""
    env = child_env()
    results: dict[tuple[str, str], list[bu.RunResult]] = {(m, t): [] for m in args.methods for t in args.tools}
    for method in args.methods:
        for rep in range(args.repeats):
            for tool in args.tools:
                out_dir = args.workdir / "runs" / shape_name / method / tool
                if out_dir.exists():
                    shutil.rmtree(out_dir)
                out_dir.parent.mkdir(parents=True, exist_ok=True)
                log_dir = args.workdir / "logs" / shape_name / f"{method}-{tool}-{rep + 1}"
                label = f"[{method} {rep + 1}/{args.repeats}] {TOOL_LABELS[tool]}"
                print(f"{label} ...", flush=True)
                res = bu.run_measured(
                    tool_command(tool, args, configs[method], out_dir),
                    env=env,
                    timeout_s=args.timeout,
                    log_dir=log_dir,
                )
                results[(method, tool)].append(res)
                if res.ok:
                    print(f"  {label}: {res.wall_s:.2f} s, maxrss {bu.fmt_num(res.maxrss_mib, 0)} MiB, tree peak {bu.fmt_num(res.tree_rss_mib, 0)} MiB", flush=True)
                else:
                    print_failure(label, res)
    return results


def sample_tensor_names(shape: bu.Qwen2Shape) -> list[str]:
    """A handful of tensors spread over the depth and over attention / MLP / norms."""
    last, mid = shape.num_hidden_layers - 1, shape.num_hidden_layers // 2
    return [
        "model.embed_tokens.weight",
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.0.self_attn.q_proj.bias",
        f"model.layers.{mid}.self_attn.k_proj.weight",
        f"model.layers.{mid}.mlp.gate_proj.weight",
        f"model.layers.{mid}.input_layernorm.weight",
        f"model.layers.{last}.self_attn.o_proj.weight",
        f"model.layers.{last}.mlp.down_proj.weight",
        "model.norm.weight",
    ]


def compare_outputs(ours: Path, theirs: Path, names: list[str]) -> list[tuple[str, float | None, str]]:
    """(tensor, max abs diff, note) for each sampled tensor present in both outputs."""
    idx_a, idx_b = bu.safetensors_index(ours), bu.safetensors_index(theirs)
    rows: list[tuple[str, float | None, str]] = []
    only_a, only_b = sorted(set(idx_a) - set(idx_b)), sorted(set(idx_b) - set(idx_a))
    if only_a or only_b:
        rows.append(("(tensor sets)", None, f"only ours: {only_a[:3]}{'...' if len(only_a) > 3 else ''}; only mergekit: {only_b[:3]}{'...' if len(only_b) > 3 else ''}"))
    for name in names:
        if name not in idx_a or name not in idx_b:
            rows.append((name, None, "missing in " + ("ours" if name not in idx_a else "mergekit")))
            continue
        a, b = bu.load_tensor(idx_a, name), bu.load_tensor(idx_b, name)
        if a.shape != b.shape:
            rows.append((name, None, f"shape {tuple(a.shape)} vs {tuple(b.shape)}"))
            continue
        diff = (a.float() - b.float()).abs().max().item()
        note = "" if a.dtype == b.dtype else f"dtype {a.dtype} vs {b.dtype}"
        rows.append((name, diff, note))
    return rows


def agreement_section(args: argparse.Namespace, results: dict, shape: bu.Qwen2Shape) -> str:
    """Markdown for the output comparison, for methods where both last runs succeeded."""
    if set(args.tools) != set(TOOLS):
        return ""
    names = sample_tensor_names(shape)
    rows = []
    for method in args.methods:
        last = {t: results[(method, t)][-1] for t in TOOLS}
        if not all(r.ok for r in last.values()):
            rows.append((method, "-", "-", "skipped: a run failed"))
            continue
        run_dir = args.workdir / "runs" / shape.name / method
        tol = AGREEMENT_TOL.get(method)
        try:
            cmp_rows = compare_outputs(run_dir / "ours", run_dir / "mergekit", names)
        except Exception as exc:  # a malformed output must not lose the timings
            rows.append((method, "-", "-", f"ERROR reading outputs: {type(exc).__name__}: {exc}"))
            continue
        for name, diff, note in cmp_rows:
            if diff is None:
                verdict = f"MISMATCH: {note}" if tol is not None else note
            elif tol is None:
                verdict = "info only" + (f"; {note}" if note else "")
            else:
                verdict = ("ok" if diff < tol else f"MISMATCH (tol {tol:g})") + (f"; {note}" if note else "")
            rows.append((method, name, "-" if diff is None else f"{diff:.3g}", verdict))
    table = bu.markdown_table(["method", "tensor", "max abs diff", "check"], rows, "llrl")
    return (
        "### Output agreement (ours vs mergekit)\n\n"
        f"Tolerance {AGREEMENT_TOL['linear']:g} for linear and slerp; ties is reported but not checked "
        "(magnitude trimming can pick different entries on ties).\n\n" + table
    )


def _tool_stats(runs: list[bu.RunResult]) -> tuple[float | None, float | None, float | None]:
    """(median wall s, max ru_maxrss MiB, max tree RSS MiB) over successful runs."""
    good = [r for r in runs if r.ok]
    return (
        bu.median(r.wall_s for r in good),
        max((r.maxrss_mib for r in good if r.maxrss_mib is not None), default=None),
        max((r.tree_rss_mib for r in good if r.tree_rss_mib is not None), default=None),
    )


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a and b else "-"


def summary_rows(args: argparse.Namespace, results: dict) -> list[list[str]]:
    """Table rows: medians of successful runs, FAILED when none succeeded; ratios on our row."""
    rows = []
    for method in args.methods:
        stats = {tool: _tool_stats(results[(method, tool)]) for tool in args.tools}
        for tool in args.tools:
            runs = results[(method, tool)]
            ok = f"{sum(r.ok for r in runs)}/{len(runs)}"
            wall, rss, tree = stats[tool]
            if wall is None:
                rows.append([method, TOOL_LABELS[tool], ok, "FAILED", "FAILED", "FAILED", "-", "-"])
                continue
            t_ratio = m_ratio = "-"
            if tool == "ours" and "mergekit" in stats:
                t_ratio = _ratio(wall, stats["mergekit"][0])
                m_ratio = _ratio(rss, stats["mergekit"][1])
            rows.append([method, TOOL_LABELS[tool], ok, bu.fmt_num(wall, 2), bu.fmt_num(rss, 0), bu.fmt_num(tree, 0), t_ratio, m_ratio])
    return rows


def render_report(args: argparse.Namespace, argv: list[str], sources: Sources, results: dict, info: dict[str, str]) -> str:
    """The full markdown section."""
    shape = sources.shape
    headers = ["method", "tool", "ok runs", "wall s (median)", "peak RSS MiB", "peak tree RSS MiB", "time ours/mergekit", "RSS ours/mergekit"]
    table = bu.markdown_table(headers, summary_rows(args, results), "llrrrrrr")
    params = bu.param_count(shape)
    now = dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    parts = [
        f"## Disk merge benchmark: mergesearch vs mergekit-yaml ({shape.name})",
        f"Date: {now}\n\nReproduce:\n\n```\n{bu.reproduce_command('scripts/bench_merge_disk.py', argv)}\n```",
        "Machine:\n\n" + bu.machine_info_markdown(info),
        (
            f"Sources: 3 random Qwen2 checkpoints (base + 2 fine-tunes, delta std {args.noise_std:g}), "
            f"{params / 1e6:.0f}M params each, bf16, {sources.shard_count} shard(s), "
            f"{sources.bytes_each / 1e9:.2f} GB each; hidden {shape.hidden_size}, {shape.num_hidden_layers} layers, "
            f"intermediate {shape.intermediate_size}, vocab {shape.vocab_size}, tied embeddings. "
            f"{args.repeats} run(s) per tool, alternating; "
            + ("sources read once before timing (page cache warm)." if not args.no_warm_cache else "page cache not pre-warmed.")
        ),
        (
            f"Commands: `{shlex.join([*shlex.split(args.ours_cmd), 'CONFIG', 'OUT', *shlex.split(args.ours_args)])}` vs "
            f"`{shlex.join([*shlex.split(args.mergekit_cmd), 'CONFIG', 'OUT', *shlex.split(args.mergekit_args)])}`. "
            "Wall time is the median of successful runs. *peak RSS* is `ru_maxrss` from `os.wait4` "
            "(largest single process of the tree; includes mapped file pages that were touched); "
            "*peak tree RSS* is the max of the RSS summed over the process tree, polled every 50 ms. "
            "Both memory figures are the max over runs."
        ),
        table,
    ]
    agreement = agreement_section(args, results, shape)
    if agreement:
        parts.append(agreement)
    return "\n\n".join(parts) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    args.workdir = args.workdir.resolve()
    args.workdir.mkdir(parents=True, exist_ok=True)

    sources = build_sources(args)
    configs = write_configs(args, sources)
    if not args.no_warm_cache:
        t0 = time.perf_counter()
        n = bu.warm_page_cache(sources.paths.values())
        print(f"warmed page cache: {n / 1e9:.2f} GB in {time.perf_counter() - t0:.1f} s", flush=True)

    results = run_all(args, configs, sources.shape.name)
    info = bu.machine_info()
    report = render_report(args, argv, sources, results, info)
    print()
    print(report)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        sep = "\n" if args.append and args.output.exists() and args.output.stat().st_size else ""
        with open(args.output, "a" if args.append else "w") as fh:
            fh.write(sep + report)
        print(f"wrote {args.output}")
    if not args.keep_outputs:
        shutil.rmtree(args.workdir / "runs" / sources.shape.name, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
