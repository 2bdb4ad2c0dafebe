"""``reloop run``: every run × seed of a config, with progress, written as result files."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)

from reloop import threads as host_threads
from reloop.components import build_update
from reloop.config import Config, RunSpec, dump_config, expert_spec
from reloop.data.encode import EncoderConfig
from reloop.data.prepare import prepare_stream
from reloop.data.tensors import Stream
from reloop.distributed import runtime_device
from reloop.preflight import check_before_run
from reloop.protocol.metrics import auc, logloss
from reloop.protocol.report import (
    plot_periods,
    read_periods,
    summarize,
    write_periods,
    write_summary,
)
from reloop.protocol.runner import check_resume, fresh_model, pretrain, run_seed
from reloop.threads import apply_threads, current_setting, dense_work
from reloop.update.generators.config import parse_generator
from reloop.update.replay import Replay
from reloop.update.strategies import BatchWindow, FullRetrain

log = logging.getLogger(__name__)


@dataclass
class ExperimentResult:
    out: Path
    rows: list[dict[str, Any]]
    summary: list[dict[str, Any]]
    markdown: str
    files: list[str] = field(default_factory=list)  # the result files written into ``out``


def oracle_by_period(stream: Stream) -> dict[int, dict[str, float]]:
    """AUC / LogLoss of the true click probabilities (synthetic data only): the ceiling."""
    if stream.truth is None:
        return {}
    out = {}
    for i in range(1, stream.n_periods + 1):
        y = stream.period(i).data["label"].numpy()
        p = stream.truth_of(i).numpy()
        out[i] = {"auc": auc(y, p), "logloss": logloss(y, p)}
    return out


def _dense_work(cfg: Config, stream: Stream) -> float:
    """Dense multiply-adds of one training step of the run's model (for the automatic thread count)."""
    import torch

    with torch.random.fork_rng(devices=[]):  # building a model draws from the global RNG
        model = fresh_model(cfg, stream, 0)
    return dense_work(model, cfg.train.batch_size)


def expected_rows(cfg: Config, spec: RunSpec, period_rows: Sequence[int]) -> int:
    """Rows a run trains on over all its periods (what its progress bar counts): the base update's rows
    (exact for none, incremental, batch and full; replay adds ``ratio`` × the period, capped by the
    reservoir at run time) plus a learned generator's rows (``epochs`` × the periods its steps are
    judged on). An estimate where noted; the bar is clamped to it and completed at the end."""

    rows = lambda a, b: sum(period_rows[max(a, 1) - 1 : b])
    strategy = build_update(spec.update)
    gen_name, gen = parse_generator(spec.generator)
    min_models: int = getattr(gen, "k", 1)
    gen_epochs: int = getattr(gen, "epochs", 1)
    first, last = cfg.protocol.pretrain + 1, cfg.protocol.pretrain + cfg.protocol.served_periods
    total = 0.0
    for i, t in enumerate(range(first, last + 1), start=1):
        if strategy.trains:
            if isinstance(strategy, FullRetrain):
                epochs = cfg.train.pretrain_epochs if strategy.start == "scratch" else cfg.train.epochs
                total += epochs * rows(1, t)
            elif isinstance(strategy, BatchWindow):
                total += cfg.train.epochs * rows(t - strategy.window + 1, t)
            else:
                total += cfg.train.epochs * rows(t, t) * (1 + (strategy.ratio if isinstance(strategy, Replay) else 0))
        if gen_name != "identity" and i >= min_models:  # learns on D_{t+1} once it holds enough models
            variant = getattr(gen, "variant", "single")
            n = 1 if variant == "single" or gen_name != "asmg_gru" else (i if variant == "full" else min(i, min_models))
            total += gen_epochs * rows(t - n + 2, t + 1)
    return int(total)


def run_experiment(
    cfg: Config,
    out: Path,
    resume: bool = False,
    show_progress: bool = True,
    console: Console | None = None,
    pretrain_dir: Path | None = None,
    threads: int | str | None = None,
) -> ExperimentResult:
    """Run every run × seed of ``cfg`` into ``out``. ``pretrain_dir`` shares Θ0 between experiments
    that use the same data and model (the paper benchmark pairs all its sections on one Θ0 per seed).

    ``threads``: torch intra-op threads, a number or ``"auto"`` (:mod:`reloop.threads`: from the model's
    size and the host's free CPUs); None takes ``reloop --threads`` (``auto`` by default) or
    ``RELOOP_THREADS`` and, outside the command with neither set, leaves torch as it is.

    Before any training, :func:`reloop.preflight.check_before_run` refuses runs with a component that can
    never act; those that cannot act in some periods are printed on ``console`` as warnings.
    """

    console = console or Console(stderr=True)
    device = runtime_device(cfg.device)  # resolved once (a ConfigError naming `device` before any work)
    prepared = prepare_stream(cfg.data, cfg.protocol.pretrain, EncoderConfig(**cfg.encoder.model_dump()))
    stream = prepared.stream
    findings = check_before_run(cfg, [end - start for start, end in stream.bounds])
    for finding in findings:
        console.print(f"[yellow]warning[/] {escape(str(finding))}", highlight=False)
    if resume:  # a checkpoint made with other settings stops the run before OUT is touched
        check_resume(cfg, stream, out)
    setting = threads if threads is not None else current_setting()
    work = _dense_work(cfg, stream) if setting == "auto" else None
    choice = apply_threads(setting, work)
    # a model large enough for several threads: the host's load is looked at again before each run
    recheck = (
        setting == "auto" and work is not None and work >= host_threads.SMALL_WORK
    )  # read at run time (a tunable module constant)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(dump_config(cfg))
    console.print(f"[bold]data[/]: {len(stream.rows):,} rows in {stream.n_periods} periods; {prepared.report}")
    if choice is not None:
        console.print(f"[bold]threads[/]: {choice.describe()}")
    oracle = oracle_by_period(stream)
    if oracle:
        (out / "oracle.json").write_text(json.dumps(oracle, indent=1))
    if device.type != "cpu":
        console.print(f"[bold]device[/]: {device}")
    stream = stream.to(device)  # one copy of the encoded stream; every period is then a slice of it

    pre_rows = stream.bounds[cfg.protocol.pretrain - 1][1]
    sizes = [end - start for start, end in stream.bounds]
    all_rows: list[dict[str, Any]] = []
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
    with Progress(*columns, console=console, disable=not show_progress, transient=False) as bar:
        for seed in cfg.protocol.seeds:
            task = bar.add_task(f"seed {seed}: pretrain Θ0", total=pre_rows * cfg.train.pretrain_epochs)
            theta0, optim0 = pretrain(
                cfg,
                stream,
                seed,
                pretrain_dir or out,
                device=device,
                on_batch=lambda n, task=task: bar.advance(task, n),
            )
            bar.update(task, completed=pre_rows * cfg.train.pretrain_epochs)
            tasks: dict[str, tuple[Any, int]] = {}  # run -> (its progress bar, its row total)

            def progress_for(name: str, seed: int = seed, tasks: dict[str, tuple[Any, int]] = tasks) -> Any:
                """Before each run: re-check threads for a large model; a bar with the run's row total."""
                nonlocal choice
                if recheck and choice is not None:
                    again = apply_threads(setting, work)
                    if again is not None and again.threads != choice.threads:
                        console.print(f"[bold]threads[/]: {again.describe()}")
                        choice = again
                total = max(expected_rows(cfg, expert_spec(cfg, name)[0], sizes), 1)
                task = bar.add_task(f"seed {seed}: {name}", total=total)
                tasks[name] = (task, total)
                done = {"rows": 0}

                def tick(_run: str, n: int) -> None:
                    done["rows"] += n
                    bar.update(task, completed=min(done["rows"], total))

                return tick if show_progress else None

            def finished(
                name: str, rows: list[dict[str, Any]], seed: int = seed, tasks: dict[str, tuple[Any, int]] = tasks
            ) -> None:
                task, total = tasks[name]
                bar.update(task, completed=total)
                test = [r["auc"] for r in rows if r["phase"] == "test"]
                log.info("seed %s %s: test AUC %.4f", seed, name, sum(test) / max(len(test), 1))

            all_rows += run_seed(
                cfg,
                stream,
                seed,
                theta0,
                optim0,
                out=out,
                resume=resume,
                device=device,
                progress_for=progress_for,
                on_run=finished,
                own_theta0=True,  # this seed's Θ0 is not used after its runs
                pretrain_dir=pretrain_dir or out,
            )
    result = write_results(cfg, out, all_rows, {p: o["auc"] for p, o in oracle.items()})
    if oracle:
        result.files.append("oracle.json")
    return result


def write_results(
    cfg: Config, out: Path, rows: list[dict[str, Any]], oracle_auc: dict[int, float] | None = None
) -> ExperimentResult:
    write_periods(rows, out / "periods.csv")
    summary = summarize(rows)
    title = f"{cfg.data.get('source')} · model {cfg.model.get('name')} · test periods · seeds {cfg.protocol.seeds}"
    md = write_summary(summary, out / "summary.csv", out / "summary.md", title)
    plot_periods(rows, out / "periods.png", "auc", oracle_auc, title=f"AUC per served period — {title}")
    files = ["config.yaml", "periods.csv", "summary.csv", "summary.md", "periods.png"]
    return ExperimentResult(out, rows, summary, md, [f for f in files if (out / f).exists()])


def load_result(out: Path) -> list[dict[str, Any]]:
    return read_periods(out / "periods.csv")
