"""``reloop bench paper``: the three papers' comparisons (and combinations no paper tried) in one report.

Each *section* is a set of runs on one base model; every section of one dataset and model shares
Θ0 per seed (``pretrain_dir``), so all comparisons are paired. The report is one Markdown file with a
table per section and the per-period plots.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console

from reloop.config import parse_config, set_dotted
from reloop.models import MODELS
from reloop.protocol.experiment import run_experiment

ML100K_DEFAULT = Path("../shared/data/movielens-100k")

SKETCH = {"sketch": {"arrays": 64, "bits": 10}}
EXACT = {"exact": {"size": 5000, "top_k": 64}}


def datasets(ml_path: Path) -> dict[str, dict[str, Any]]:
    return {
        "movielens100k": {
            "source": "movielens",
            "path": str(ml_path),
            "label": {"rating_at_least": 4},
            "periods": {"count": 31, "by": "rows"},
        },
        "movielens100k-implicit": {
            "source": "movielens",
            "path": str(ml_path),
            "label": {"rating_at_least": 4},
            "implicit": {"negatives": 1, "history": 30},
            "periods": {"count": 31, "by": "rows"},
        },
        "synthetic": {"source": "synthetic", "synthetic": {"seed": 0}, "periods": {"count": 31, "by": "rows"}},
    }


def _gru(variant: str = "multi", k: int = 3, hidden: int = 4) -> dict[str, Any]:
    return {"asmg_gru": {"k": k, "hidden": hidden, "variant": variant}}


def asmg_runs() -> dict[str, dict[str, Any]]:
    """ASMG Table 1 rows and its ablations (Peng et al. 2021, §4.2–4.3)."""
    return {
        "IU": {"update": "incremental"},
        "BU-3": {"update": {"batch": 3}},
        "BU-5": {"update": {"batch": 5}},
        "BU-7": {"update": {"batch": 7}},
        "SPMF": {"update": {"replay": {"reservoir": 0.3}}},
        "IncCTR": {"update": "incremental", "loss": {"distill": 0.2}},
        "SML": {"update": "incremental", "generator": "sml"},
        "ASMG-Linear": {"update": "incremental", "generator": {"asmg_linear": {"k": 3}}},
        "ASMG-GRU-single": {"update": "incremental", "generator": _gru("single")},
        "ASMG-GRU-multi": {"update": "incremental", "generator": _gru("multi")},
        "ASMG-GRU-full": {"update": "incremental", "generator": _gru("full")},
        "ASMG-GRU-zero": {"update": "incremental", "generator": _gru("zero")},
        "ASMG-GRU-unif": {"update": "incremental", "generator": _gru("unif")},
    }


def asmg_sensitivity_runs() -> dict[str, dict[str, Any]]:
    runs: dict[str, dict[str, Any]] = {"IU": {"update": "incremental"}}
    for k in range(1, 7):
        runs[f"GRU k={k}"] = {"update": "incremental", "generator": _gru(k=k)}
    for d in (8, 12, 16):
        runs[f"GRU d={d}"] = {"update": "incremental", "generator": _gru(hidden=d)}
    return runs


def reloop_runs(alphas: tuple[float, ...] = (0.1, 0.3, 0.5, 0.7, 0.9)) -> dict[str, dict[str, Any]]:
    """ReLoop (Cai et al. 2022): IU vs IU+KD (IncCTR) vs IU+SC over α, plus the scale-normalised blend."""
    runs: dict[str, dict[str, Any]] = {
        "IU": {"update": "incremental"},
        "IU+KD": {"update": "incremental", "loss": {"distill": 0.3}},
    }
    for a in alphas:
        runs[f"IU+SC α={a}"] = {"update": "incremental", "loss": {"self_correction": a}}
    runs["IU+SC α=0.5 normalized"] = {"update": "incremental", "loss": {"self_correction": 0.5, "scale": "normalized"}}
    return runs


def reloop2_runs() -> dict[str, dict[str, Any]]:
    """ReLoop2 (Zhu et al. 2023) Table 2 shape, with IU and IncCTR as slow learners, and its sweeps.

    Defaults: memory reset at every model update (the paper's life cycle), γ = 1, key = the field
    embeddings (ours; ``key: hidden`` is the paper's layer and is ablated below).
    """
    mem = lambda m, **kw: {**m, "lambda": 0.3, "temperature": 0.1, **kw}  # noqa: E731
    runs: dict[str, dict[str, Any]] = {
        "IU": {"update": "incremental"},
        "IU+exact": {"update": "incremental", "memory": mem(EXACT)},
        "IU+sketch": {"update": "incremental", "memory": mem(SKETCH)},
        "IncCTR": {"update": "incremental", "loss": {"distill": 0.3}},
        "IncCTR+sketch": {"update": "incremental", "loss": {"distill": 0.3}, "memory": mem(SKETCH)},
        "no-update": {"update": "none"},
        "no-update+sketch": {"update": "none", "memory": mem(SKETCH)},
        "sketch key=hidden": {"update": "incremental", "memory": mem(SKETCH, key="hidden")},
        "exact key=hidden": {"update": "incremental", "memory": mem(EXACT, key="hidden")},
        "sketch kept": {"update": "incremental", "memory": mem(SKETCH, reset_on_update=False)},
        "exact kept": {"update": "incremental", "memory": mem(EXACT, reset_on_update=False)},
        "sketch γ=0": {"update": "incremental", "memory": mem(SKETCH, gamma=0.0)},
    }
    for lam in (0.1, 0.5, 0.7, 0.9):
        runs[f"sketch λ={lam}"] = {"update": "incremental", "memory": mem(SKETCH, **{"lambda": lam})}
    for k, bits in ((16, 10), (180, 10), (64, 6), (64, 14)):
        runs[f"sketch K={k} L={bits}"] = {
            "update": "incremental",
            "memory": mem({"sketch": {"arrays": k, "bits": bits}}),
        }
    runs["sketch centroid"] = {
        "update": "incremental",
        "memory": mem({"sketch": {**SKETCH["sketch"], "similarity": "centroid"}}),
    }
    for tau in (0.01, 1.0):
        runs[f"sketch τ={tau}"] = {"update": "incremental", "memory": mem(SKETCH, temperature=tau)}
    runs["sketch write=errors"] = {"update": "incremental", "memory": mem(SKETCH, write="errors", error_threshold=0.3)}
    return runs


def reloop2_delay_runs() -> dict[str, dict[str, Any]]:
    """The memory under label latency: run with ``protocol.feedback_delay`` set by the section."""
    mem = lambda m: {**m, "lambda": 0.3, "temperature": 0.1}  # noqa: E731
    return {
        "IU": {"update": "incremental"},
        "IU+exact": {"update": "incremental", "memory": mem(EXACT)},
        "IU+sketch": {"update": "incremental", "memory": mem(SKETCH)},
    }


def reloop2_table2_runs() -> dict[str, dict[str, Any]]:
    """ReLoop2's Table 2 rows for one more base model: IU and IncCTR, each with and without memory."""
    mem = lambda m: {**m, "lambda": 0.3, "temperature": 0.1}  # noqa: E731
    return {
        "IU": {"update": "incremental"},
        "IU+exact": {"update": "incremental", "memory": mem(EXACT)},
        "IU+sketch": {"update": "incremental", "memory": mem(SKETCH)},
        "IncCTR": {"update": "incremental", "loss": {"distill": 0.3}},
        "IncCTR+sketch": {"update": "incremental", "loss": {"distill": 0.3}, "memory": mem(SKETCH)},
    }


def zoo_runs() -> dict[str, dict[str, Any]]:
    """ReLoop on one base model: plain retraining, +KD (IncCTR), +SC (α = 0.5)."""
    return {
        "IU": {"update": "incremental"},
        "IU+KD": {"update": "incremental", "loss": {"distill": 0.3}},
        "IU+SC": {"update": "incremental", "loss": {"self_correction": 0.5}},
    }


def combo_runs() -> dict[str, dict[str, Any]]:
    """Combinations no paper tried: slow loop (ASMG, SC loss) × fast loop (sketch memory)."""
    sc = {"self_correction": 0.5}
    mem = {**SKETCH, "lambda": 0.3, "temperature": 0.1}
    return {
        "IU": {"update": "incremental"},
        "SC": {"update": "incremental", "loss": sc},
        "ASMG": {"update": "incremental", "generator": _gru()},
        "sketch": {"update": "incremental", "memory": mem},
        "ASMG+SC": {"update": "incremental", "loss": sc, "generator": _gru()},
        "ASMG+sketch": {"update": "incremental", "generator": _gru(), "memory": mem},
        "SC+sketch": {"update": "incremental", "loss": sc, "memory": mem},
        "ASMG+SC+sketch": {"update": "incremental", "loss": sc, "generator": _gru(), "memory": mem},
    }


@dataclass
class Section:
    name: str
    title: str
    model: dict[str, Any]
    runs: Callable[[], dict[str, dict[str, Any]]]
    protocol: dict[str, Any] = field(default_factory=dict)
    group: str = ""  # sections of one group are reported together in one table (the zoo)
    history: bool = False  # add the users' last-30-positives feature (the sequence models need it)


EMB_MLP = {"name": "emb_mlp", "embedding_dim": 8, "hidden_units": [40, 20, 10]}
DEEPFM = {"name": "deepfm", "embedding_dim": 16, "hidden_units": [128, 64]}
DCN = {"name": "dcn", "embedding_dim": 16, "hidden_units": [128, 64]}
SEQUENCE_MODELS = ("din", "dien", "bst")
HISTORY = 30


def _zoo_sections() -> list[Section]:

    return [
        Section(
            f"zoo-{name}",
            f"ReLoop across the zoo: {name}",
            {"name": name, "embedding_dim": 16, "hidden_units": [128, 64]},
            zoo_runs,
            group="zoo",
            history=name in SEQUENCE_MODELS,
        )
        for name in sorted(MODELS)
    ]


SECTIONS = [
    Section("asmg", "ASMG comparison (Table 1 rows and ablations), Embedding&MLP", EMB_MLP, asmg_runs),
    Section("asmg-sensitivity", "ASMG-GRU sensitivity to k and hidden size d", EMB_MLP, asmg_sensitivity_runs),
    Section("reloop-deepfm", "ReLoop self-correction vs KD, DeepFM", DEEPFM, reloop_runs),
    Section("reloop-dcn", "ReLoop self-correction vs KD, DCN", DCN, reloop_runs),
    Section("reloop2-deepfm", "ReLoop2 error memory, DeepFM", DEEPFM, reloop2_runs),
    Section("reloop2-dcn", "ReLoop2 error memory, DCN", DCN, reloop2_runs),
    *[
        Section(
            f"reloop2-{m}",
            f"ReLoop2 error memory, {m.upper()} (behaviour-sequence model, last-30 history)",
            {"name": m, "embedding_dim": 16, "hidden_units": [128, 64]},
            reloop2_table2_runs,
            history=True,
        )
        for m in SEQUENCE_MODELS
    ],
    Section(
        "reloop2-delay1",
        "ReLoop2 with labels one serving batch late, DeepFM",
        DEEPFM,
        reloop2_delay_runs,
        {"feedback_delay": 1},
    ),
    Section(
        "reloop2-delay3",
        "ReLoop2 with labels three serving batches late, DeepFM",
        DEEPFM,
        reloop2_delay_runs,
        {"feedback_delay": 3},
    ),
    Section("combos", "Combinations no paper tried, Embedding&MLP", EMB_MLP, combo_runs),
    *_zoo_sections(),
]
GROUPS = {"zoo": "ReLoop across the model zoo: IU vs +KD (β = 0.3) vs +SC (α = 0.5)"}


def select_sections(names: list[str] | None) -> list[Section]:
    """Sections by name or group name (``zoo`` = every ``zoo-*`` section); all when ``names`` is empty."""
    if not names:
        return list(SECTIONS)
    known = {s.name for s in SECTIONS} | set(GROUPS)
    unknown = sorted(set(names) - known)
    if unknown:
        raise ValueError(f"--section: unknown {unknown}; choose from {sorted(known)}")
    return [s for s in SECTIONS if s.name in names or (s.group and s.group in names)]


def section_config(
    section: Section,
    data: str,
    seeds: list[int],
    ml_path: Path = ML100K_DEFAULT,
    overrides: dict[str, Any] | None = None,
):
    """The run config of one section: the shared protocol and training settings, then ``--set``."""

    data_cfg = datasets(ml_path)[data]
    if section.history:  # the data sets' own feature (MovieLens: last positives; synthetic: the same)
        if data_cfg["source"] == "synthetic":
            data_cfg["synthetic"] = {**data_cfg.get("synthetic", {}), "history": HISTORY}
        else:
            data_cfg["history"] = HISTORY
    raw = {
        "data": data_cfg,
        "model": section.model,
        "train": {
            "epochs": 1,
            "pretrain_epochs": 5,
            "batch_size": 256 if data.startswith("movielens") else 1024,
            "lr": 1e-3,
        },
        # guard_periods 0: the papers serve every generated / BU model; reloop's out-of-sample check would
        # change what their tables compare (``--set protocol.guard_periods=1`` turns it on)
        "protocol": {
            "pretrain": 10,
            "warmup": 10,
            "valid": 3,
            "test": 7,
            "seeds": seeds,
            "guard_periods": 0,
            **section.protocol,
        },
        "runs": section.runs(),
    }
    for key, value in (overrides or {}).items():
        set_dotted(raw, key, value)
    return parse_config(raw)  # checks the data block too, before a worker process loads it


@dataclass
class SectionResult:
    name: str
    markdown: str
    summary: list[dict[str, Any]]
    minutes: float
    runs: int
    error: str = ""


def run_section(
    section: Section,
    data: str,
    out: Path,
    seeds: list[int],
    ml_path: Path = ML100K_DEFAULT,
    overrides: dict[str, Any] | None = None,
    show_progress: bool = False,
    console: Console | None = None,
    threads: int | None = None,
) -> SectionResult:
    """Run one section (resumable) under ``out/<name>``; a model the data cannot feed is reported, not fatal."""
    if threads:
        import torch

        torch.set_num_threads(threads)
    started = time.time()
    cfg = section_config(section, data, seeds, ml_path, overrides)
    try:
        result = run_experiment(
            cfg,
            out / section.name,
            resume=True,
            show_progress=show_progress,
            console=console,
            pretrain_dir=out / f"pretrain-{section.model['name']}",
        )
    except ValueError as e:
        if not str(e).startswith("model"):
            raise
        # A model the data cannot feed (a sequence model without a behaviour sequence) is reported.
        return SectionResult(section.name, "", [], (time.time() - started) / 60, 0, str(e).splitlines()[0])
    return SectionResult(section.name, result.markdown, result.summary, (time.time() - started) / 60, len(cfg.runs))


def _group_table(title: str, members: list[tuple[Section, SectionResult]]) -> str:
    lines = [
        f"## {title}\n",
        "| model | IU AUC | +KD AUC imp% | +SC AUC imp% | IU gAUC | +KD gAUC imp% | +SC gAUC imp% | "
        "+KD LogLoss imp% | +SC LogLoss imp% |",
        "|---|" + "---|" * 8,
    ]
    skipped = []
    for section, res in members:
        if res.error:
            skipped.append(f"* {section.model['name']}: skipped — {res.error}")
            continue
        by = {e["run"]: e for e in res.summary}
        iu, kd, sc = by["IU"], by["IU+KD"], by["IU+SC"]
        lines.append(
            f"| {section.model['name']} | {iu['auc_mean']:.4f} ± {iu['auc_std']:.4f} | "
            f"{kd['auc_imp_pct']:+.2f} | {sc['auc_imp_pct']:+.2f} | {iu['gauc_mean']:.4f} | "
            f"{kd['gauc_imp_pct']:+.2f} | {sc['gauc_imp_pct']:+.2f} | {kd['logloss_imp_pct']:+.2f} | "
            f"{sc['logloss_imp_pct']:+.2f} |"
        )
    minutes = sum(r.minutes for _, r in members)
    return "\n".join(lines + [""] + skipped + [f"\n_{len(members)} models × 3 runs in {minutes:.1f} min._\n"])


def run_paper(
    data: str,
    out: Path,
    seeds: list[int],
    sections: list[str] | None = None,
    ml_path: Path = ML100K_DEFAULT,
    show_progress: bool = True,
    overrides: dict[str, Any] | None = None,
    console: Console | None = None,
    jobs: int = 1,
    threads: int | None = None,
) -> Path:
    """Run the chosen sections on one dataset and write ``out/report.md``.

    ``jobs`` > 1 runs sections in that many worker processes (each with ``threads`` torch threads,
    default 1): on a 2-core machine ``jobs=2`` nearly halves the wall time. Every section resumes
    from its checkpoints, so a killed report picks up where it stopped.
    """
    console = console or Console(stderr=True)
    chosen = select_sections(sections)
    for section in chosen:  # fail on a bad --set before any work starts
        section_config(section, data, seeds, ml_path, overrides)
    started = time.time()
    results: dict[str, SectionResult] = {}
    if jobs <= 1:
        for section in chosen:
            results[section.name] = run_section(
                section, data, out, seeds, ml_path, overrides, show_progress, console, threads
            )
    else:
        results = _run_parallel(chosen, data, out, seeds, ml_path, overrides, jobs, threads or 1, console)
    total = (time.time() - started) / 60
    parts = [
        f"# reloop paper benchmark — {data}, seeds {seeds}\n",
        "Each table: mean ± std over seeds of the mean over the 7 test periods; imp% vs IU. "
        "Runs of one model share Θ0 per seed.\n",
    ]
    done_groups: set[str] = set()
    for section in chosen:
        res = results[section.name]
        if section.group:
            if section.group not in done_groups:
                done_groups.add(section.group)
                members = [(s, results[s.name]) for s in chosen if s.group == section.group]
                parts.append(_group_table(GROUPS[section.group], members))
            continue
        if res.error:
            parts.append(f"## {section.title}\n\nskipped: {res.error}\n")
            continue
        figure = (
            f"![{section.name}: AUC per period, difference to IU per period with the seed band, "
            f"AUC imp% per run]({section.name}/periods.png)"
        )
        parts.append(
            f"## {section.title}\n\n{res.markdown}\n{figure}\n\n"
            f"_{res.runs} runs × {len(seeds)} seeds in {res.minutes:.1f} min._\n"
        )
    parts.append(f"_Whole report: {total:.1f} min wall time, jobs={jobs}._\n")
    report = out / "report.md"
    report.write_text("\n".join(parts))
    return report


def _run_section_args(args: tuple) -> SectionResult:
    return run_section(*args)


def _run_parallel(
    chosen: list[Section],
    data: str,
    out: Path,
    seeds: list[int],
    ml_path: Path,
    overrides: dict[str, Any] | None,
    jobs: int,
    threads: int,
    console: Console,
) -> dict[str, SectionResult]:
    import multiprocessing as mp
    import signal

    from rich.progress import Progress

    results: dict[str, SectionResult] = {}
    # Longest sections first, so the last worker is not left alone with a long one.
    order = sorted(chosen, key=lambda s: -len(s.runs()))
    args = [(s, data, out, seeds, ml_path, overrides, False, None, threads) for s in order]
    pool = mp.get_context("spawn").Pool(jobs, maxtasksperchild=None)

    def stop(signum, _frame):  # a killed report takes its workers with it (they resume next time)
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        with Progress(console=console, transient=False) as progress:
            task = progress.add_task(f"{len(chosen)} sections on {jobs} workers", total=len(chosen))
            for res in pool.imap_unordered(_run_section_args, args):
                results[res.name] = res
                progress.advance(task)
                progress.console.print(
                    f"{res.name}: {res.runs} runs in {res.minutes:.1f} min"
                    + (f" (skipped: {res.error})" if res.error else "")
                )
        pool.close()
    finally:
        pool.terminate()
        pool.join()
        signal.signal(signal.SIGTERM, previous)
    return results
