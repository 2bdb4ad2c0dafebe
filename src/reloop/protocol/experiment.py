"""``reloop run``: every run × seed of a config, with progress, written as result files."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from reloop.config import Config, dump_config
from reloop.data.encode import EncoderConfig
from reloop.data.prepare import prepare_stream
from reloop.data.tensors import Stream
from reloop.device import runtime_device
from reloop.protocol.metrics import auc, logloss
from reloop.protocol.report import plot_periods, read_periods, summarize, write_periods, write_summary
from reloop.protocol.runner import check_resume, pretrain, run_one


@dataclass
class ExperimentResult:
    out: Path
    rows: list[dict[str, Any]]
    summary: list[dict[str, Any]]
    markdown: str


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


def run_experiment(cfg: Config, out: Path, resume: bool = False, show_progress: bool = True,
                   console: Console | None = None, pretrain_dir: Path | None = None) -> ExperimentResult:
    """Run every run × seed of ``cfg`` into ``out``. ``pretrain_dir`` shares Θ0 between experiments
    that use the same data and model (the paper benchmark pairs all its sections on one Θ0 per seed)."""
    console = console or Console(stderr=True)
    device = runtime_device(cfg.device)  # resolved once (a ConfigError naming `device` before any work)
    prepared = prepare_stream(cfg.data, cfg.protocol.pretrain, EncoderConfig(**cfg.encoder.model_dump()))
    stream = prepared.stream
    if resume:  # a checkpoint made with other settings stops the run before OUT is touched
        check_resume(cfg, stream, out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(dump_config(cfg))
    console.print(f"[bold]data[/]: {len(stream.rows):,} rows in {stream.n_periods} periods; {prepared.report}")
    oracle = oracle_by_period(stream)
    if oracle:
        (out / "oracle.json").write_text(json.dumps(oracle, indent=1))
    if device.type != "cpu":
        console.print(f"[bold]device[/]: {device}")
    stream = stream.to(device)  # one copy of the encoded stream; every period is then a slice of it

    pre_rows = stream.bounds[cfg.protocol.pretrain - 1][1]
    all_rows: list[dict[str, Any]] = []
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
    with Progress(*columns, console=console, disable=not show_progress, transient=False) as bar:
        for seed in cfg.protocol.seeds:
            task = bar.add_task(f"seed {seed}: pretrain Θ0", total=pre_rows * cfg.train.pretrain_epochs)
            theta0, optim0 = pretrain(cfg, stream, seed, pretrain_dir or out, device=device,
                                      on_batch=lambda n, task=task: bar.advance(task, n))
            bar.update(task, completed=pre_rows * cfg.train.pretrain_epochs)
            for name, spec in cfg.runs.items():
                task = bar.add_task(f"seed {seed}: {name}", total=None)
                done = {"rows": 0}

                def tick(_run: str, n: int, task=task, done=done) -> None:
                    done["rows"] += n
                    bar.update(task, completed=done["rows"])

                rows = run_one(cfg, stream, name, spec, seed, theta0, optim0, out=out, resume=resume,
                               progress=tick if show_progress else None, device=device)
                bar.update(task, total=max(done["rows"], 1), completed=max(done["rows"], 1))
                all_rows.extend(rows)
                test = [r["auc"] for r in rows if r["phase"] == "test"]
                console.log(f"seed {seed} {name}: test AUC {sum(test) / max(len(test), 1):.4f}")
    return write_results(cfg, out, all_rows, {p: o["auc"] for p, o in oracle.items()})


def write_results(cfg: Config, out: Path, rows: list[dict[str, Any]],
                  oracle_auc: dict[int, float] | None = None) -> ExperimentResult:
    write_periods(rows, out / "periods.csv")
    summary = summarize(rows)
    title = f"{cfg.data.get('source')} · model {cfg.model.get('name')} · test periods · seeds {cfg.protocol.seeds}"
    md = write_summary(summary, out / "summary.csv", out / "summary.md", title)
    plot_periods(rows, out / "periods.png", "auc", oracle_auc, title=f"AUC per served period — {title}")
    return ExperimentResult(out, rows, summary, md)


def load_result(out: Path) -> list[dict[str, Any]]:
    return read_periods(out / "periods.csv")
