"""The ``reloop`` command: argument wiring only; the logic lives in the packages."""
from __future__ import annotations

import sys
from importlib import resources
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markdown import Markdown
from rich.table import Table

from reloop.config import ConfigError, load_config, parse_override

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Keep CTR models accurate under drift: compare and run model-updating strategies.")
data_app = typer.Typer(no_args_is_help=True, help="Look at a dataset as the protocol will see it.")
app.add_typer(data_app, name="data")
from reloop.serve.cli import retrain as _retrain_command  # noqa: E402
from reloop.serve.cli import serve as _serve_command  # noqa: E402

app.command("serve")(_serve_command)
app.command("retrain")(_retrain_command)
bench_app = typer.Typer(no_args_is_help=True, help="Reproduce the papers' comparisons.")
app.add_typer(bench_app, name="bench")
console = Console(stderr=True)



@app.callback()
def _main(threads: Annotated[Optional[int], typer.Option(
        help="torch intra-op threads (default: torch's choice; 1 is fastest for small models on busy machines).",
        envvar="RELOOP_THREADS")] = None) -> None:
    if threads:
        import os

        import torch

        torch.set_num_threads(threads)
        os.environ["RELOOP_THREADS"] = str(threads)  # processes started by `run --nproc` use the same


SetOption = Annotated[Optional[list[str]], typer.Option("--set", help="Override a config key: a.b.c=<YAML value>.")]


def _load(config: Path, overrides: list[str] | None):
    try:
        return load_config(config, overrides or [])
    except ConfigError as e:
        console.print(f"[red]config error[/] {config}: {e}")
        raise typer.Exit(2) from None


def _fail(e: Exception) -> None:
    console.print(f"[red]error[/]: {e}")
    raise typer.Exit(1) from None


@app.command()
def run(config: Annotated[Path, typer.Argument(help="YAML config (see configs/).")],
        out: Annotated[Path, typer.Option(help="Result directory.")] = Path("runs/latest"),
        set_: SetOption = None,
        resume: Annotated[bool, typer.Option(help="Continue a killed run from its last finished period.")] = False,
        progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
        nproc: Annotated[int, typer.Option(help="Data-parallel processes on this machine (torchrun; gloo on CPU, "
                                                "NCCL on GPU); rank 0 writes OUT.")] = 1) -> None:
    """Run every strategy of CONFIG period by period and write tables and plots to OUT."""
    from reloop import distributed as rd
    from reloop.data.validate import DataError
    from reloop.protocol.experiment import run_experiment

    if nproc > 1 and not rd.launched_by_torchrun():  # re-launch this command under torchrun
        args = ["run", str(config), "--out", str(out), "--progress" if progress else "--no-progress"]
        args += ["--resume"] if resume else []
        for item in set_ or []:
            args += ["--set", item]
        raise typer.Exit(rd.launch_local(nproc, args))
    cfg = _load(config, set_)
    try:
        if rd.launched_by_torchrun():
            result = rd.run_experiment_distributed(cfg, out, resume=resume, show_progress=progress, console=console)
        else:
            result = run_experiment(cfg, out, resume=resume, show_progress=progress, console=console)
    except ConfigError as e:  # raised when the run starts, e.g. device: cuda without a GPU
        console.print(f"[red]config error[/] {config}: {e}")
        raise typer.Exit(2) from None
    except (DataError, FileNotFoundError) as e:
        _fail(e)
    if rd.launched_by_torchrun() and rd.env_from_torchrun()[0] != 0:
        return  # rank 0 reports
    Console().print(Markdown(result.markdown))
    console.print(f"results in [bold]{out}[/]: config.yaml periods.csv summary.csv summary.md periods.png")


def demo_config_path() -> Path:
    return Path(str(resources.files("reloop") / "configs" / "demo.yaml"))


@app.command()
def demo(out: Annotated[Path, typer.Option(help="Result directory.")] = Path("runs/demo"),
         set_: SetOption = None, resume: bool = False, progress: bool = True) -> None:
    """The drift benchmark on the embedded synthetic stream (no data to fetch; minutes on 2 cores)."""
    run(demo_config_path(), out=out, set_=set_, resume=resume, progress=progress)


@data_app.command("inspect")
def data_inspect(config: Path, set_: SetOption = None) -> None:
    """Rows, label rate and the share of never-seen ids per period."""
    from reloop.data.encode import EncoderConfig
    from reloop.data.inspect import inspect_stream
    from reloop.data.prepare import prepare_stream
    from reloop.data.validate import DataError

    cfg = _load(config, set_)
    try:
        prepared = prepare_stream(cfg.data, cfg.protocol.pretrain, EncoderConfig(**cfg.encoder.model_dump()))
    except (DataError, FileNotFoundError) as e:
        _fail(e)
    console.print(prepared.report)
    table = Table(title=f"{config} — {len(prepared.stream.rows):,} rows")
    rows = inspect_stream(prepared.stream, cfg.protocol)
    for col in rows[0]:
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(*[f"{v:.3f}" if isinstance(v, float) else str(v) for v in r.values()])
    Console().print(table)


@bench_app.command("paper")
def bench_paper(data: Annotated[str, typer.Option(help="movielens100k, movielens100k-implicit or synthetic.")] = "movielens100k",
                seeds: Annotated[int, typer.Option(help="Number of seeds (0..N-1).")] = 5,
                out: Annotated[Path, typer.Option(help="Report directory.")] = Path("runs/paper"),
                section: Annotated[Optional[list[str]], typer.Option(
                    help="Only these sections or groups (repeatable; 'zoo' = every zoo-* section).")] = None,
                ml_path: Annotated[Path, typer.Option(help="MovieLens-100K directory.")] = Path("../shared/data/movielens-100k"),
                jobs: Annotated[int, typer.Option(help="Sections run in this many worker processes "
                                                       "(1 torch thread each unless --threads).")] = 1,
                set_: SetOption = None, progress: bool = True) -> None:
    """ASMG, ReLoop and ReLoop2 comparisons plus their combinations, as one Markdown report."""
    import os

    from reloop.bench.paper import datasets, run_paper, select_sections

    if data not in datasets(ml_path):
        console.print(f"[red]--data[/]: unknown dataset {data!r}; choose {sorted(datasets(ml_path))}")
        raise typer.Exit(2)
    try:
        select_sections(section)
    except ValueError as e:
        console.print(f"[red]{e}[/]")
        raise typer.Exit(2) from None
    if jobs < 1:
        console.print(f"[red]--jobs[/]: must be >= 1, got {jobs}")
        raise typer.Exit(2)
    try:
        overrides = dict(parse_override(item) for item in set_ or [])
    except ConfigError as e:
        console.print(f"[red]config error[/]: {e}")
        raise typer.Exit(2) from None
    threads = int(os.environ["RELOOP_THREADS"]) if os.environ.get("RELOOP_THREADS") else None
    try:
        report = run_paper(data, out, list(range(seeds)), section, ml_path, progress, overrides, console,
                           jobs=jobs, threads=threads)
    except ConfigError as e:
        console.print(f"[red]config error[/]: {e}")
        raise typer.Exit(2) from None
    console.print(f"report: [bold]{report}[/]")


@app.command()
def models() -> None:
    """List the registered base models with their papers."""
    from reloop.models import MODELS

    table = Table(title="reloop model zoo")
    table.add_column("name")
    table.add_column("paper")
    for name, cls in sorted(MODELS.items()):
        table.add_row(name, cls.paper)
    Console().print(table)


def main() -> None:  # pragma: no cover
    sys.exit(app())


if __name__ == "__main__":  # python -m reloop.cli / torchrun -m reloop.cli
    main()
