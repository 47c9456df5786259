"""The `mergesearch` command line. Heavy modules (torch, ray, vllm) load inside commands only."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from mergesearch.errors import MergeSearchError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Find the best way to merge fine-tuned LLMs that share an architecture.",
)
console = Console()
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


def main(argv: Optional[list[str]] = None) -> int:
    """Entry point: user errors print one clear line and exit 2, never a traceback."""
    try:
        app(args=argv, standalone_mode=False)
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
    except Exception as exc:  # click usage errors arrive here in non-standalone mode
        import click

        if isinstance(exc, click.exceptions.ClickException):
            exc.show()
            return exc.exit_code
        if isinstance(exc, click.exceptions.Abort):
            return 1
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
