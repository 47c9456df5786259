"""The `mergesearch` command line. Heavy modules (torch, ray, vllm) load inside commands only."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console

from mergesearch.errors import MergeSearchError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Find the best way to merge fine-tuned LLMs that share an architecture.",
)
console = Console() if sys.stdout.isatty() else Console(width=160)
err_console = Console(stderr=True)


@app.command()
def merge(
    config: Path = typer.Argument(..., help="mergekit YAML file."),
    out_dir: Path = typer.Argument(..., help="Folder to write the merged checkpoint to."),
    device: str = typer.Option("cpu", help="Where to compute: cpu, cuda or cuda:N."),
    seed: int = typer.Option(0, help="Seed of random methods (dare_*, della*)."),
    force: bool = typer.Option(False, "--force", help="Replace OUT_DIR if it exists."),
    max_shard_size: str = typer.Option("5GB", help="Largest safetensors shard, e.g. 500MB."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Merge models as CONFIG says (the counterpart of mergekit-yaml), atomically, into OUT_DIR."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from mergesearch.merge.executor import run_merge
    from mergesearch.plan import load_plan

    plan = load_plan(config)
    yaml_text = config.read_text(encoding="utf-8")
    with Progress(TextColumn("[bold]merging"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), TextColumn("{task.description}"), console=err_console,
                  disable=quiet, transient=True) as bar:
        job = bar.add_task("", total=None)

        def progress(done: int, total: int, name: str) -> None:
            bar.update(job, completed=done, total=total, description=name)

        report = run_merge(plan, out_dir, base_dir=config.parent.absolute(), device=device,
                           seed=seed, force=force, max_shard_size=max_shard_size,
                           config_yaml=yaml_text, progress=progress)
    console.print(
        f"[green]Wrote[/green] {report.out_dir}: {report.tensors} tensors, "
        f"{report.bytes_written / 1e6:.1f} MB; peak RSS {report.peak_rss_bytes / 2**20:.0f} MiB, "
        f"largest working set {report.peak_tensor_bytes / 2**20:.1f} MiB."
    )
    for note in report.notes:
        console.print(f"[yellow]note[/yellow]: {note}")


@app.command()
def explain(
    config: Path = typer.Argument(..., help="mergekit YAML file."),
) -> None:
    """Show every parameter's effective value per layer and tensor group, and dead entries."""
    from mergesearch.merge.explain import explain as do_explain
    from mergesearch.merge.explain import render
    from mergesearch.plan import load_plan

    render(do_explain(load_plan(config), base_dir=config.parent.absolute()), console)


@app.command()
def methods(name: Optional[str] = typer.Argument(None, help="Show one method's parameters.")) -> None:
    """List the merge methods and their parameters."""
    from rich.table import Table

    from mergesearch.merge.registry import METHODS, get_method

    if name is None:
        table = Table("method", "base model", "random", "parameters", "what it does")
        for spec in METHODS.values():
            table.add_row(spec.name, spec.base, "yes" if spec.random else "",
                          ", ".join(p.name for p in spec.params), spec.summary)
        console.print(table)
        return
    spec = get_method(name)
    table = Table("parameter", "per", "default", "valid", "search range", "meaning",
                  title=f"{spec.name}: {spec.summary}", title_justify="left")
    for p in spec.params:
        default = "required" if p.required else repr(p.default)
        valid = "true/false" if p.kind == "bool" else p.range_text().split(" in ")[-1]
        search = "" if p.search is None else f"{p.search[0]:g} .. {p.search[1]:g}"
        per = {"shared": "tensor", "input": "model", "non_base": "model (not base)"}[p.scope]
        table.add_row(p.name, per, default, valid, search, p.help)
    console.print(table)


@app.command()
def calibrate(
    models: list[Path] = typer.Argument(..., help="Model folders (safetensors) to calibrate."),
    data: str = typer.Option(..., "--data", help="JSONL file with a `text` field, or an eval task name or file."),
    out: Optional[Path] = typer.Option(None, "--out", help="Cache folder (default ~/.cache/mergesearch/importance)."),
    limit: int = typer.Option(64, help="Use the first N texts."),
    max_length: int = typer.Option(128, help="Cut each text to this many tokens."),
) -> None:
    """Activation (Wanda ||X||_2, mean |x|) and diagonal Fisher statistics of each model on the
    calibration data, cached for the importance-weighted methods (docs/importance.md)."""
    from mergesearch.errors import ConfigError
    from mergesearch.merge.importance import calibrate as run_calibration
    from mergesearch.merge.importance import default_cache_dir, load_data

    _quiet_libraries()
    if limit < 1 or max_length < 2:
        raise ConfigError(f"--limit must be >= 1 and --max-length >= 2, got {limit} and {max_length}.")
    for m in models:
        if not m.is_dir():
            raise ConfigError(f"Model folder {str(m)!r} does not exist; give local model folders.")
    texts = load_data(data, limit, [Path.cwd() / "evals"], Path.cwd())
    console.print(f"calibration data {texts.source}: {len(texts.texts)} texts, content hash {texts.hash[:16]}")
    for m in models:
        path, hit = run_calibration(m, texts, max_length, out or default_cache_dir())
        console.print(f"{m}: {'cache hit' if hit else 'computed'} -> {path}")


@app.command("example-models")
def example_models(
    out_dir: Path = typer.Argument(Path("examples/models"), help="Where to build them."),
    layers: int = typer.Option(8, min=1, help="Transformer layers per model."),
) -> None:
    """Build a tiny Qwen3 base and three synthetic fine-tunes for the shipped examples."""
    from mergesearch.testing import build_family

    if (out_dir / "ft2" / "config.json").is_file():
        console.print(f"{out_dir} already holds the example models.")
        return
    paths = build_family(out_dir, "qwen3", n_finetunes=3, num_layers=layers)
    console.print(f"[green]Built[/green] {', '.join(str(p) for p in paths.values())}")


@app.command()
def zoo(
    out_dir: Path = typer.Argument(Path("zoo"), help="Where to build the demo models."),
    evals: Optional[Path] = typer.Option(None, help="Folder of the demo task files (default: evals/ of the checkout)."),
    force: bool = typer.Option(False, "--force", help="Rebuild even if the cached zoo is up to date."),
    config: Optional[Path] = typer.Option(None, help="YAML file overriding zoo settings (steps, sizes, skills)."),
) -> None:
    """Build (or reuse) the demo zoo: a base and one expert per skill, verified to trade off."""
    from mergesearch.zoo.build import build_zoo, load_zoo_config, render_table

    settings = load_zoo_config(config)
    result = build_zoo(out_dir, settings, evals_dir=evals, force=force, log=console.print)
    if not result.rebuilt:
        console.print(render_table(result.table, result.merges, list(settings.skills), "held_out"),
                      markup=False)
    console.print(f"zoo ready in {result.root} ({result.seconds:.0f}s)")


@app.command("eval")
def eval_cmd(
    tasks: list[str] = typer.Argument(..., help="Task files, or task names found in --tasks-dir."),
    model: Path = typer.Option(..., "--model", "-m", help="Model folder (safetensors + config.json)."),
    split: str = typer.Option("proxy", help="proxy, held_out or both."),
    tasks_dir: Path = typer.Option(Path("evals"), help="Where task names are looked up."),
    limit: Optional[int] = typer.Option(None, min=1, help="Score only the first N examples."),
    dtype: str = typer.Option("auto", help="auto, float32, float16 or bfloat16."),
    device: str = typer.Option("cpu", help="cpu, cuda or cuda:N."),
    show: int = typer.Option(0, min=0, help="Print the first N responses and details per task."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write per-example scores to this file."),
    backend: str = typer.Option("transformers", help="Eval engine: transformers or vllm."),
    confirm_run_unsafe_code: bool = typer.Option(
        False, "--confirm-run-unsafe-code", help="Allow lm-eval tasks that execute model-written code."),
) -> None:
    """Score a model on proxy eval tasks (the scores a search would see)."""
    import json

    from rich.table import Table

    from mergesearch.errors import ConfigError
    from mergesearch.eval.hf import TransformersEngine
    from mergesearch.eval.runner import evaluate
    from mergesearch.eval.tasks import SPLITS, load_tasks

    splits = list(SPLITS) if split == "both" else [split]
    if any(s not in SPLITS for s in splits):
        raise ConfigError(f"--split {split!r} is not one of proxy, held_out, both.")
    if backend not in ("transformers", "vllm"):
        raise ConfigError(f"--backend {backend!r} is not one of transformers, vllm.")
    _quiet_libraries()
    loaded = load_tasks(tasks, [tasks_dir], confirm_run_unsafe_code)
    if backend == "vllm":
        from mergesearch.eval.vllm import VLLMEngine

        engine = VLLMEngine(model, dtype=dtype, device=device)
    else:
        engine = TransformersEngine(model, dtype=dtype, device=device)
    table = Table("task", *splits, "examples", "seconds", title=str(model))
    dump = {}
    for task in loaded:
        row, count, secs = [], 0, 0.0
        for s in splits:
            if s not in task.splits:
                row.append("-")
                continue
            result = evaluate(engine, task, s, limit=limit)
            row.append(f"{result.mean:.3f}")
            count, secs = count + len(result.scores), secs + result.seconds
            dump[f"{task.name}/{s}"] = {"mean": result.mean, "scores": result.scores,
                                        "details": result.details, "responses": result.responses}
            for i in range(min(show, len(result.scores))):
                console.print(f"[dim]{task.name}/{s}[{i}][/dim] score={result.scores[i]:.2f} "
                              f"response={result.responses[i]!r} {result.details[i]}", markup=True,
                              highlight=False)
        table.add_row(task.name, *row, str(count), f"{secs:.1f}")
    console.print(table)
    if json_out is not None:
        json_out.write_text(json.dumps(dump, indent=1) + "\n", encoding="utf-8")


def _quiet_libraries() -> None:
    """Keep Optuna's, transformers' and vLLM's own chatter out of the study display."""
    import logging
    import os
    import warnings

    import optuna

    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except ImportError:
        pass


def _save_dashboard_figures(study: Any, top: int) -> None:
    """With the dashboard extra installed, a finished run leaves its figures and notes in the
    study, so plain ``optuna-dashboard STORAGE`` shows them too."""
    import importlib.util

    if any(importlib.util.find_spec(m) is None for m in ("optuna_dashboard", "plotly")):
        return
    from mergesearch.dashboard.server import save_figures

    save_figures(study, top, log=lambda m: console.print(m, highlight=False),
                 warn=lambda m: console.print(f"[yellow]warning[/yellow]: {m}", highlight=False))


def _run_study(study_path: Path, n_trials: Optional[int], quiet: bool) -> None:
    from mergesearch.driver.config import load_study
    from mergesearch.driver.driver import prepare, run_study
    from mergesearch.driver.report import Progress, leaderboard, render_leaderboard
    from mergesearch.driver.storage import mask_url

    _quiet_libraries()
    sf = load_study(study_path)
    prep = prepare(sf)
    c = sf.config
    console.print(f"study [bold]{c.name}[/bold]: {c.method} over {len(prep.ctx.models)} models, space "
                  f"{c.space}, sampler {c.sampler.name}, pruner {c.pruner.name}, tasks "
                  f"{', '.join(prep.task_names)}; storage {mask_url(prep.storage_url)}", highlight=False)
    total = n_trials if n_trials is not None else c.budget.trials
    with Progress(console, total, c.budget.wall_time, prep.task_names, live=False if quiet else None) as progress:
        outcome = run_study(sf, n_trials=n_trials, log=progress.log, update=progress.update, prepared=prep)
    render_leaderboard(leaderboard(outcome.study, top=max(c.top_k, 5), baselines=outcome.baselines), console)
    if outcome.best_dir is not None:
        console.print(f"[green]best merge[/green] (trial {outcome.best_trial}) written to {outcome.best_dir}; "
                      f"its mergekit YAML and the top {c.top_k} are in {outcome.output_dir / 'best'}",
                      highlight=False)
    if outcome.interrupted:
        console.print("[yellow]interrupted[/yellow]: run the same command again to resume the study.")
    else:
        _save_dashboard_figures(outcome.study, c.top_k)
        console.print(f"next: [bold]mergesearch dashboard {study_path}[/bold] to inspect the trials, "
                      f"[bold]mergesearch export {study_path} OUT[/bold] for the winner's YAML, checkpoint "
                      "and model card", highlight=False)


@app.command()
def run(
    study: Path = typer.Argument(..., help="Study file (YAML); see studies/ and docs/studies.md."),
    n_trials: Optional[int] = typer.Option(None, "--n-trials", help="Total search trials (overrides budget.trials)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No live display; one line per finished trial."),
) -> None:
    """Run a merge search (or resume it: finished trials are kept, --n-trials is the total)."""
    _run_study(study, n_trials, quiet)


@app.command()
def status(
    study: Optional[Path] = typer.Argument(None, help="Study file whose stored results to show."),
    storage: Optional[str] = typer.Option(None, help="Storage URL instead of a study file."),
    name: Optional[str] = typer.Option(None, "--study", help="Study name in --storage."),
    top: int = typer.Option(10, min=1, help="Rows of the leaderboard."),
    json_out: bool = typer.Option(False, "--json", help="Print the leaderboard as JSON."),
) -> None:
    """Leaderboard of a study: proxy, held-out, gap, per-task scores, baselines."""
    from mergesearch.driver.report import status_command
    from mergesearch.errors import ConfigError

    _quiet_libraries()

    if study is not None:
        from mergesearch.driver.config import load_study
        from mergesearch.driver.storage import default_storage_url

        sf = load_study(study)
        storage = sf.config.storage or default_storage_url(sf.output_dir)
        name = sf.config.name
    elif storage is None:
        raise ConfigError("Give a study file (mergesearch status STUDY.yaml) or --storage URL [--study NAME].")
    status_command(storage, name, top, json_out, console)


@app.command()
def dashboard(
    study: Optional[Path] = typer.Argument(None, help="Study file whose storage to serve."),
    storage: Optional[str] = typer.Option(None, help="Storage URL instead of a study file."),
    name: Optional[str] = typer.Option(None, "--study", help="Study name in --storage."),
    host: str = typer.Option("127.0.0.1", help="Address to listen on; anything but loopback exposes the study."),
    port: int = typer.Option(8080, min=0, max=65535, help="Port (0: any free port)."),
    top: int = typer.Option(3, min=1, help="Best trials whose per-layer curves are overlaid."),
    no_publish: bool = typer.Option(False, "--no-publish", help="Do not save figures and notes into the study."),
    refresh: float = typer.Option(30.0, min=0, help="Seconds between checks for new trials to re-save figures (0: never)."),
) -> None:
    """Serve optuna-dashboard on a study's storage, with mergesearch's figures (docs/dashboard.md)."""
    from mergesearch.dashboard.server import dashboard_command

    _quiet_libraries()
    dashboard_command(study, storage, name, host=host, port=port, top=top, publish=not no_publish,
                      refresh_s=refresh, console=console, err_console=err_console)


@app.command()
def demo(
    trials: Optional[int] = typer.Option(None, "--n-trials", help="Search trials (default: the demo study's budget)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No live display."),
) -> None:
    """Build the demo zoo if missing, then run the demo study (studies/demo.yaml) end to end."""
    from mergesearch.zoo.build import build_zoo, default_evals_dir, load_zoo_config

    root = default_evals_dir().parent
    result = build_zoo(root / "zoo", load_zoo_config(None), log=console.print)
    console.print(f"zoo ready in {result.root}" + (" (built now)" if result.rebuilt else " (cached)"))
    _run_study(root / "studies" / "demo.yaml", trials, quiet)


@app.command()
def export(
    study: Optional[Path] = typer.Argument(None, help="Study file (YAML); leave out with --storage."),
    out: Optional[Path] = typer.Argument(None, help="Folder to write; must not exist unless --force."),
    storage: Optional[str] = typer.Option(None, help="Storage URL instead of a study file."),
    name: Optional[str] = typer.Option(None, "--study", help="Study name in the storage."),
    trial: Optional[int] = typer.Option(None, "--trial", help="Export trial N."),
    best: bool = typer.Option(False, "--best", help="Export the best trial, as `status` ranks it (the default)."),
    pareto: bool = typer.Option(False, "--pareto", help="Export every trial of the Pareto front into OUT/trial-N/."),
    force: bool = typer.Option(False, "--force", help="Replace OUT if it exists (once the new one is complete)."),
    fmt: str = typer.Option("text", "--format", help="text, or json: one JSON object for scripts."),
    device: str = typer.Option("cpu", help="Where to merge: cpu, cuda or cuda:N."),
    max_shard_size: str = typer.Option("5GB", help="Largest safetensors shard, e.g. 500MB."),
) -> None:
    """Export a trial as mergekit YAML, a merged checkpoint and a model card (docs/studies.md#export)."""
    import json

    from mergesearch.driver.export import export_study, open_study
    from mergesearch.errors import ConfigError
    from mergesearch.merge.registry import get_method

    _quiet_libraries()
    if fmt not in ("text", "json"):
        raise ConfigError(f"--format {fmt!r} is not one of text, json.")
    if storage is not None and out is None:
        study, out = None, study
    if out is None:
        raise ConfigError("Give the output folder: mergesearch export STUDY.yaml OUT "
                          "(or --storage URL [--study NAME] OUT).")
    if sum([best, pareto, trial is not None]) > 1:
        raise ConfigError("Give one of --best, --trial N, --pareto.")
    mode = "pareto" if pareto else "trial" if trial is not None else "best"
    opened = open_study(study, storage, name)
    log = (lambda m: err_console.print(m, highlight=False, markup=False)) if fmt == "text" else None
    result = export_study(opened, out, mode=mode, trial=trial, force=force, device=device,
                          max_shard_size=max_shard_size, log=log)
    if fmt == "json":
        console.out(json.dumps(result.to_json(), indent=2), highlight=False)
        return
    for e in result.exports:
        held = (f", held-out {e.held_out:.4f} (gap {e.gap:+.4f})" if e.held_out is not None and e.gap is not None
                else ", held-out not scored")
        console.print(f"[green]Exported[/green] trial {e.trial} of study {result.study} to {e.dir}: proxy "
                      f"{e.proxy:.4f}{held}; {e.tensors} tensors, {e.bytes_written / 1e6:.1f} MB", highlight=False)
        how = (f"mergekit-yaml {e.dir / 'config.yaml'} OUT_DIR" if get_method(e.method).mergekit else
               f"mergesearch merge {e.dir / 'config.yaml'} OUT_DIR (mergekit cannot reproduce {e.method})")
        console.print(f"  {e.dir / 'config.yaml'} (mergekit YAML), {e.dir / 'README.md'} (model card); "
                      f"reproduce: {how}", highlight=False)
        if e.random:
            console.print(f"  [yellow]note[/yellow]: {e.method} is random; mergekit draws other masks, so the "
                          f"checkpoint is the authority (mergesearch merge ... --seed {e.seed} reproduces it)",
                          highlight=False)
    if result.mode == "pareto":
        console.print(f"Pareto front: {len(result.exports)} trial(s); index in {result.out_dir / 'README.md'}",
                      highlight=False)


def main(argv: Optional[list[str]] = None) -> int:
    """Entry point: user errors print one clear line and exit 2, never a traceback."""
    try:
        rc = app(args=argv, standalone_mode=False)
    except MergeSearchError as err:
        from rich.markup import escape

        err_console.print(f"[bold red]error:[/bold red] {escape(str(err))}", highlight=False,
                          soft_wrap=True)
        return 2
    except KeyboardInterrupt:
        err_console.print("[yellow]interrupted[/yellow]")
        return 130
    except typer.Exit as exc:
        return exc.exit_code
    except Exception as exc:  # usage errors of click, or of the click typer vendors (typer._click)
        if not type(exc).__module__.startswith(("click", "typer")):
            raise
        if callable(getattr(exc, "show", None)):
            exc.show()
            return int(getattr(exc, "exit_code", 2))
        if type(exc).__name__ == "Abort":
            err_console.print("[yellow]aborted[/yellow]")
            return 130
        raise
    return rc if isinstance(rc, int) else 0

if __name__ == "__main__":
    sys.exit(main())
