"""The ``reloop`` command: argument wiring only; the logic lives in the packages."""

from __future__ import annotations

import logging
import os
import re
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.markdown import Markdown
from rich.markup import escape
from rich.table import Table
from typer.core import TyperArgument, TyperCommand, TyperGroup

from reloop.config import ConfigError, demo_config_path, load_config, parse_override


class _FlagsWithoutType:
    """Help without a ``<bool>`` type next to flags (``--resume/--no-resume`` says it all)."""

    def get_params(self, ctx: Any) -> list[Any]:
        params = super().get_params(ctx)  # type: ignore[misc]
        for p in params:
            if getattr(p, "is_flag", False) and p.metavar is None:
                p.metavar = ""
        return params


class _Command(_FlagsWithoutType, TyperCommand):
    """Usage lines name arguments in capitals (``reloop run [OPTIONS] CONFIG``), not ``{config}``."""

    def collect_usage_pieces(self, ctx: Any) -> list[str]:
        pieces = [self.options_metavar] if self.options_metavar else []
        for p in self.get_params(ctx):
            if isinstance(p, TyperArgument):
                name = (p.metavar or p.name or "").upper()
                pieces.append((name if p.required else f"[{name}]") + ("..." if p.nargs != 1 else ""))
        return pieces


class _Group(_FlagsWithoutType, TyperGroup):
    pass


def _typer(**kwargs: Any) -> typer.Typer:
    return typer.Typer(cls=_Group, no_args_is_help=True, **kwargs)


app = _typer(
    add_completion=False, help="Keep CTR models accurate under drift: compare and run model-updating strategies."
)
data_app = _typer(help="Look at a dataset as the protocol will see it.")
app.add_typer(data_app, name="data")
from reloop.serve.cli import retrain as _retrain_command  # noqa: E402  (after _Command, which it uses)
from reloop.serve.cli import serve as _serve_command  # noqa: E402

app.command("serve", cls=_Command)(_serve_command)
app.command("retrain", cls=_Command)(_retrain_command)
bench_app = _typer(help="Reproduce the papers' comparisons.")
app.add_typer(bench_app, name="bench")
console = Console(stderr=True)
_LOG_HANDLER: logging.Handler | None = None


def _configure_logging() -> None:
    """reloop's log lines (``logging.getLogger("reloop")``) on stderr through rich, without file:line."""
    global _LOG_HANDLER
    logger = logging.getLogger("reloop")
    if _LOG_HANDLER is not None:
        logger.removeHandler(_LOG_HANDLER)
    _LOG_HANDLER = RichHandler(console=console, show_path=False, markup=False, rich_tracebacks=False)
    _LOG_HANDLER.setFormatter(logging.Formatter("%(message)s", datefmt="[%X]"))
    logger.addHandler(_LOG_HANDLER)
    logger.setLevel(logging.INFO)
    logger.propagate = False


def _version(value: bool) -> None:
    if value:
        try:
            from importlib.metadata import version

            v = version("reloop")
        except ImportError:  # importlib.metadata.PackageNotFoundError: a source checkout on sys.path
            from reloop import __version__ as v
        typer.echo(f"reloop {v}")
        raise typer.Exit()


def _threads_setting(value: str) -> str:
    from reloop.threads import parse_threads

    try:
        parsed = parse_threads(value)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None
    return "auto" if parsed is None else str(parsed)


@app.callback()
def _main(
    threads: Annotated[
        str,
        typer.Option(
            metavar="N|auto",
            callback=_threads_setting,
            envvar="RELOOP_THREADS",
            help="torch intra-op threads. auto (default): 1 for small models or a busy host, else one per free CPU "
            "(docs/guide/quickstart.md#threads); a number overrides it.",
        ),
    ] = "auto",
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    from reloop.threads import set_command_setting

    _configure_logging()
    set_command_setting(threads)  # run_experiment applies it (auto: once the model is known)
    if threads != "auto":
        import torch

        torch.set_num_threads(int(threads))


SetOption = Annotated[
    list[str] | None,
    typer.Option("--set", metavar="KEY=VALUE", help="Override a config key: a.b.c=<YAML value> (repeatable)."),
]
ProgressOption = Annotated[bool, typer.Option(help="Show progress bars.")]
ResumeOption = Annotated[bool, typer.Option(help="Continue a killed run from its last finished period.")]

_KEY_PART = re.compile(r"[\w\-.\[\]]+")


def message_keys(message: str) -> list[str]:
    """The dotted keys a config error names: the leading ``key: key: ...`` of each ``; ``-joined problem,
    joined (``data: periods.by: time needs ...`` -> ``data.periods.by``)."""
    keys = []
    for problem in message.split("; "):
        parts = []
        for segment in problem.split(": ")[:-1]:
            if not _KEY_PART.fullmatch(segment):
                break
            parts.append(segment)
        if parts:
            keys.append(".".join(parts))
    return keys


def blame_override(message: str, overrides: list[str] | None) -> str | None:
    """The ``--set`` item a config error is about: the first whose key is, contains or lies inside a dotted
    key the message names (``train.lrr`` for ``train.lrr: Extra inputs ...``); None: the file's."""
    keys = message_keys(message)
    for item in overrides or []:
        key = item.partition("=")[0].strip()
        if any(k == key or k.startswith(key + ".") or key.startswith(k + ".") for k in keys):
            return item
    return None


def _config_error(config: Path | str, e: Exception, overrides: list[str] | None = None) -> None:
    message = str(e)
    blamed = blame_override(message, overrides)
    where = f"--set {blamed}" if blamed else ("" if message.startswith("--set") else str(config))
    text = f"{escape(where)}: {escape(message)}" if where else f": {escape(message)}"
    # soft_wrap: a long path stays one piece (copyable, greppable) instead of being cut at the terminal width
    console.print(f"[red]config error[/]{' ' if where else ''}{text}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


def _load(config: Path, overrides: list[str] | None):
    try:
        return load_config(config, overrides or [])
    except ConfigError as e:
        _config_error(config, e, overrides)


def _fail(e: Exception) -> None:
    console.print(f"[red]error[/]: {escape(str(e))}", highlight=False, soft_wrap=True)
    raise typer.Exit(1) from None


@app.command(cls=_Command)
def run(
    config: Annotated[
        Path,
        typer.Argument(metavar="CONFIG", help="YAML config (`reloop init DATA` writes one; examples in configs/)."),
    ],
    out: Annotated[Path, typer.Option(metavar="DIR", help="Result directory.")] = Path("runs/latest"),
    set_: SetOption = None,
    resume: ResumeOption = False,
    progress: ProgressOption = True,
    nproc: Annotated[
        int,
        typer.Option(
            metavar="N",
            help="Data-parallel processes on this machine (torchrun; gloo on CPU, NCCL on GPU); rank 0 writes OUT.",
        ),
    ] = 1,
) -> None:
    """Run every strategy of CONFIG period by period and write tables and plots to OUT."""
    from reloop import distributed as rd
    from reloop.data.validate import DataError
    from reloop.protocol.experiment import run_experiment

    if nproc > 1 and not rd.launched_by_torchrun():  # re-launch this command under torchrun
        args = ["run", str(config), "--out", str(out), "--progress" if progress else "--no-progress"]
        args += ["--resume"] if resume else []
        for item in set_ or []:
            args += ["--set", item]
        raise typer.Exit(rd.launch_local(nproc, args, threads=_threads_per_process(nproc)))
    cfg = _load(config, set_)
    try:
        if rd.launched_by_torchrun():
            from reloop.protocol.scaleout import run_experiment_distributed

            result = run_experiment_distributed(cfg, out, resume=resume, show_progress=progress, console=console)
        else:
            result = run_experiment(cfg, out, resume=resume, show_progress=progress, console=console)
    except ConfigError as e:  # raised when the run starts, e.g. device: cuda without a GPU
        _config_error(config, e, set_)
    except (DataError, FileNotFoundError) as e:
        _fail(e)
    if rd.launched_by_torchrun() and rd.env_from_torchrun()[0] != 0:
        return  # rank 0 reports
    Console().print(Markdown(result.markdown))
    files = getattr(result, "files", None) or ["config.yaml", "periods.csv", "summary.csv", "summary.md", "periods.png"]
    console.print(f"results in [bold]{out}[/]: {' '.join(files)}", soft_wrap=True)


@app.command(cls=_Command)
def tune(
    config: Annotated[Path, typer.Argument(metavar="CONFIG", help="YAML config whose runs are tuned.")],
    out: Annotated[
        Path,
        typer.Option(metavar="DIR", help="Result directory (tune.csv, tuned.yaml and the chosen config's results)."),
    ] = Path("runs/tune"),
    set_: SetOption = None,
    run_name: Annotated[
        list[str] | None,
        typer.Option("--run", metavar="NAME", help="Tune only this run (repeatable); default: every run."),
    ] = None,
    train: Annotated[
        bool, typer.Option(help="Also choose the base training settings (train.lr, train.epochs) with IU first.")
    ] = True,
    progress: ProgressOption = True,
) -> None:
    """Choose each run's settings on the valid periods only, then run the chosen config once (test reported once)."""
    from reloop.data.validate import DataError
    from reloop.protocol.tune import tune_experiment

    cfg = _load(config, set_)
    unknown = [r for r in run_name or [] if r not in cfg.runs]
    if unknown:
        _config_error(config, ConfigError(f"--run: unknown run(s) {unknown}; runs: {sorted(cfg.runs)}"), set_)
    try:
        _, result = tune_experiment(cfg, out, run_name or None, train, show_progress=progress, console=console)
    except ConfigError as e:
        _config_error(config, e, set_)
    except (DataError, FileNotFoundError, ValueError) as e:
        _fail(e)
    Console().print(Markdown(result.markdown))
    console.print(f"results in [bold]{out}[/]: {' '.join(result.files)}", soft_wrap=True)


def _threads_per_process(nproc: int) -> int:
    """Threads for each of ``nproc`` processes: the user's number, or the free CPUs shared out."""
    from reloop.threads import choose_threads, current_setting, host_load

    setting = current_setting()
    if isinstance(setting, int):
        return setting
    return max(1, choose_threads(None, host_load()).threads // nproc)


@app.command(cls=_Command)
def demo(
    out: Annotated[Path, typer.Option(metavar="DIR", help="Result directory.")] = Path("runs/demo"),
    set_: SetOption = None,
    resume: ResumeOption = False,
    progress: ProgressOption = True,
) -> None:
    """The drift benchmark on the embedded synthetic stream (no data to fetch; about 2 minutes on 2 cores)."""
    run(demo_config_path(), out=out, set_=set_, resume=resume, progress=progress)


@app.command("init", cls=_Command)
def init(
    data: Annotated[
        Path, typer.Argument(metavar="DATA", help="A CSV file, a Parquet file or a directory of Parquet shards.")
    ],
    out: Annotated[Path, typer.Option(metavar="FILE", help="Where to write the config.")] = Path("reloop.yaml"),
    delimiter: Annotated[
        str | None, typer.Option(metavar="CHAR", help="CSV delimiter (default: sniffed from the first lines).")
    ] = None,
    label: Annotated[
        str | None, typer.Option(metavar="COLUMN", help="The 0/1 label column (default: found by name and values).")
    ] = None,
    time: Annotated[
        str | None,
        typer.Option(
            metavar="COLUMN", help="The time column, or 'none' for the file order (default: found by name and values)."
        ),
    ] = None,
    user: Annotated[
        str | None, typer.Option(metavar="COLUMN", help="The user-id column, or 'none' (default: found by name).")
    ] = None,
    force: Annotated[bool, typer.Option(help="Overwrite FILE if it exists.")] = False,
) -> None:
    """Inspect DATA (columns, types, label, time, user, cardinalities) and write a commented config ready to run."""
    from reloop.init_config import InitError, write_config

    try:
        profile, _ = write_config(data, out, delimiter=delimiter, label=label, time=time, user=user, force=force)
    except (InitError, FileNotFoundError) as e:
        _fail(e)
    table = Table(
        title=f"{data}: {profile.rows:,} rows" + (f", delimiter {profile.delimiter!r}" if profile.delimiter else "")
    )
    for col in ("column", "type", "distinct", "missing", "role", "examples"):
        table.add_column(col, justify="right" if col in ("distinct", "missing") else "left")
    for c in profile.columns:
        role = c.role if c.role != "feature" else c.kind or ""
        if c.role == "user":
            role = "user (categorical)"
        if c.role == "skipped":
            role = f"left out: {c.note}"
        table.add_row(c.name, c.dtype, f"{c.distinct:,}", f"{c.missing:.0%}", role, ", ".join(c.examples[:3]))
    Console().print(table)
    for note in profile.notes:
        console.print(f"[yellow]note[/]: {escape(note)}", highlight=False)
    console.print(f"wrote [bold]{out}[/]; next: [bold]reloop run {out}[/]")


@data_app.command("inspect", cls=_Command)
def data_inspect(
    config: Annotated[Path, typer.Argument(metavar="CONFIG", help="YAML config.")], set_: SetOption = None
) -> None:
    """Rows, label rate and the share of never-seen ids per period; components that could not act."""
    from reloop.data.encode import EncoderConfig
    from reloop.data.inspect import inspect_stream
    from reloop.data.prepare import prepare_stream
    from reloop.data.validate import DataError
    from reloop.preflight import preflight

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
    for finding in preflight(cfg, [end - start for start, end in prepared.stream.bounds]):
        colour = "red" if finding.level == "error" else "yellow"
        console.print(f"[{colour}]{finding.level}[/] {escape(str(finding))}", highlight=False)


@bench_app.command("paper", cls=_Command)
def bench_paper(
    data: Annotated[
        str, typer.Option(metavar="NAME", help="movielens100k, movielens100k-implicit or synthetic.")
    ] = "movielens100k",
    seeds: Annotated[int, typer.Option(metavar="N", help="Number of seeds (0..N-1).")] = 5,
    out: Annotated[Path, typer.Option(metavar="DIR", help="Report directory.")] = Path("runs/paper"),
    section: Annotated[
        list[str] | None,
        typer.Option(metavar="S", help="Only these sections or groups (repeatable; 'zoo' = every zoo-* section)."),
    ] = None,
    ml_path: Annotated[Path, typer.Option(metavar="DIR", help="MovieLens-100K directory.")] = Path(
        "../shared/data/movielens-100k"
    ),
    jobs: Annotated[
        int,
        typer.Option(
            metavar="N", help="Sections run in this many worker processes (1 torch thread each unless --threads)."
        ),
    ] = 1,
    set_: SetOption = None,
    progress: ProgressOption = True,
) -> None:
    """ASMG, ReLoop and ReLoop2 comparisons plus their combinations, as one Markdown report."""
    from reloop.bench.paper import datasets, run_paper, select_sections
    from reloop.threads import current_setting, set_command_setting

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
        _config_error("", e)
    setting = current_setting()
    threads = setting if isinstance(setting, int) else None
    if jobs > 1 and threads is None:  # workers: one thread each (paper.py), not "auto" on top of it
        set_command_setting(None)
        os.environ["RELOOP_THREADS"] = "1"
    try:
        report = run_paper(
            data, out, list(range(seeds)), section, ml_path, progress, overrides, console, jobs=jobs, threads=threads
        )
    except ConfigError as e:
        _config_error("", e, set_)
    console.print(f"report: [bold]{report}[/]")


@app.command(cls=_Command)
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
