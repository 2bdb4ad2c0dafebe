"""Result files (a contract other tools read): periods.csv, summary.csv/.md, periods.png.

``summary``: per run, each seed's mean over the test periods, then mean ± std over seeds (std with
ddof=1 when there are several seeds); imp% = (m − m_IU) / m_IU · 100 (sign flipped for LogLoss so
that positive is better), as in the ASMG and ReLoop2 papers.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

#: ``fallback``: why the step engine's guard served the updated model instead of the generated one
#: (empty when the generated model, or the only model, served that period)
PERIOD_COLUMNS = ["run", "seed", "period", "phase", "auc", "gauc", "logloss", "rows", "fallback"]
SUMMARY_COLUMNS = ["run", "auc_mean", "auc_std", "gauc_mean", "gauc_std", "logloss_mean", "logloss_std", "auc_imp_pct"]


def write_periods(rows: list[dict[str, Any]], path: Path) -> None:
    """Write per-period metric rows to ``path`` as ``periods.csv`` (columns ``PERIOD_COLUMNS``)."""
    with path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=PERIOD_COLUMNS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.6f}" if isinstance(v := r.get(k, ""), float) else v) for k in PERIOD_COLUMNS})


def read_periods(path: Path) -> list[dict[str, Any]]:
    """Read a ``periods.csv`` back into rows (the inverse of :func:`write_periods`)."""
    out = []
    with path.open() as fh:
        for r in csv.DictReader(fh):
            out.append(
                {
                    "run": r["run"],
                    "seed": int(r["seed"]),
                    "period": int(r["period"]),
                    "phase": r["phase"],
                    "auc": float(r["auc"]),
                    "gauc": float(r["gauc"]),
                    "logloss": float(r["logloss"]),
                    "rows": int(r["rows"]),
                    "fallback": r.get("fallback") or "",  # absent from files written before reloop had a guard
                }
            )
    return out


def _nanmean(values: list[float]) -> float:
    """Mean of the finite values; NaN (and no numpy warning) when there are none, e.g. gAUC without users."""
    arr = np.asarray(values, dtype=np.float64)
    arr = arr[~np.isnan(arr)]
    return float(arr.mean()) if len(arr) else float("nan")


def _mean_std(values: list[float]) -> tuple[float, float]:
    arr = np.asarray([v for v in values if not math.isnan(v)], dtype=np.float64)
    if len(arr) == 0:
        return float("nan"), float("nan")
    return float(arr.mean()), float(arr.std(ddof=1)) if len(arr) > 1 else 0.0


def summarize(rows: list[dict[str, Any]], phase: str = "test", baseline: str = "IU") -> list[dict[str, Any]]:
    """One entry per run (in first-seen order): mean ± std over seeds of each seed's mean over the
    ``phase`` periods, and imp% vs ``baseline``.

    Keys: ``run``, ``seeds``, ``{auc,gauc,logloss}_mean``, ``..._std`` (ddof = 1; 0 with one seed)
    and ``..._imp_pct`` = sign · (m − m_base) / m_base · 100 (sign −1 for LogLoss, so positive is
    better; NaN when no run is called ``baseline``).
    """
    runs = list(dict.fromkeys(r["run"] for r in rows))
    out = []
    for run in runs:
        sel = [r for r in rows if r["run"] == run and r["phase"] == phase]
        seeds = sorted({r["seed"] for r in sel})
        entry: dict[str, Any] = {"run": run, "seeds": len(seeds)}
        for m in ("auc", "gauc", "logloss"):
            per_seed = [_nanmean([r[m] for r in sel if r["seed"] == s]) for s in seeds]
            entry[f"{m}_mean"], entry[f"{m}_std"] = _mean_std(per_seed)
        out.append(entry)
    base = next((e for e in out if e["run"] == baseline), None)
    for e in out:
        for m, sign in (("auc", 1), ("gauc", 1), ("logloss", -1)):
            e[f"{m}_imp_pct"] = (
                sign * (e[f"{m}_mean"] - base[f"{m}_mean"]) / base[f"{m}_mean"] * 100
                if base is not None
                else float("nan")
            )
    return out


def write_summary(summary: list[dict[str, Any]], csv_path: Path, md_path: Path, title: str = "") -> str:
    with csv_path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=SUMMARY_COLUMNS, extrasaction="ignore")
        w.writeheader()
        for e in summary:
            w.writerow({k: (f"{e[k]:.6f}" if isinstance(e[k], float) else e[k]) for k in SUMMARY_COLUMNS})
    md = summary_markdown(summary, title)
    md_path.write_text(md)
    return md


def summary_markdown(summary: list[dict[str, Any]], title: str = "") -> str:
    lines = [f"### {title}", ""] if title else []
    lines += [
        "| run | AUC | gAUC | LogLoss | AUC imp% | gAUC imp% | LogLoss imp% | seeds |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for e in summary:

        def f(m: str, e: dict[str, Any] = e) -> str:
            return f"{e[m + '_mean']:.4f} ± {e[m + '_std']:.4f}"

        def imp(m: str, e: dict[str, Any] = e) -> str:
            v = e[f"{m}_imp_pct"]
            return "" if math.isnan(v) else f"{v:+.2f}"

        lines.append(
            f"| {e['run']} | {f('auc')} | {f('gauc')} | {f('logloss')} | {imp('auc')} | {imp('gauc')} "
            f"| {imp('logloss')} | {e['seeds']} |"
        )
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------
# Plots. ``periods.png`` shows what a reader compares: the raw metric per served period (with the
# oracle where the data has one), the paired difference to the baseline per period with its band over
# seeds, and the table's imp% per run with its spread over seeds.

#: A qualitative palette (matplotlib's tab10); the baseline is drawn in black.
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")
#: Seven markers: seven is coprime with the ten colours, so (colour, marker) repeats only after 70 runs.
MARKERS = ("o", "s", "^", "D", "v", "P", "X")
#: Changes every ten runs, which keeps (colour, marker, line style) distinct for 280 runs.
LINESTYLES = ("-", "--", "-.", ":")
BASELINE_COLOR = "#000000"
BANDS = ("std", "minmax")


@dataclass(frozen=True)
class RunStyle:
    """How one run is drawn in every panel (the same run looks the same everywhere)."""

    color: str
    marker: str
    linestyle: str
    linewidth: float = 1.3

    def line_kwargs(self) -> dict[str, Any]:
        return {
            "color": self.color,
            "marker": self.marker,
            "linestyle": self.linestyle,
            "linewidth": self.linewidth,
            "markersize": 4,
        }


def run_styles(runs: Sequence[str], baseline: str | None = "IU") -> dict[str, RunStyle]:
    """A distinct style per run: the baseline black and solid, run j of the others colour j mod 10,
    marker j mod 7 and line style ⌊j / 10⌋ mod 4, so no two runs of up to 280 share all three (and
    none of up to 70 share colour and marker)."""
    styles: dict[str, RunStyle] = {}
    j = 0
    for run in dict.fromkeys(runs):
        if run == baseline:
            styles[run] = RunStyle(BASELINE_COLOR, "o", "-", 2.0)
            continue
        styles[run] = RunStyle(
            PALETTE[j % len(PALETTE)], MARKERS[j % len(MARKERS)], LINESTYLES[(j // len(PALETTE)) % len(LINESTYLES)]
        )
        j += 1
    return styles


def _sign(metric: str) -> int:
    return -1 if metric == "logloss" else 1


def _by_seed_period(rows: list[dict[str, Any]], run: str, metric: str) -> dict[tuple[int, int], float]:
    return {(r["seed"], r["period"]): float(r[metric]) for r in rows if r["run"] == run and r["phase"] != "pretrain"}


@dataclass(frozen=True)
class PeriodDifference:
    """imp% of one run vs the baseline per served period: the mean over seeds and its band."""

    periods: np.ndarray
    mean: np.ndarray
    low: np.ndarray
    high: np.ndarray
    seeds: int


def period_differences(
    rows: list[dict[str, Any]], metric: str = "auc", baseline: str = "IU", band: str = "std"
) -> dict[str, PeriodDifference]:
    """Per run (the baseline included, at 0) and served period, the paired imp% vs the baseline.

    For each seed s and period p: d = sign · (m_run − m_base) / m_base · 100 (sign −1 for LogLoss, so
    positive is better, as in ``summarize``); then the mean over seeds and the band, ``std``: mean ± std
    over seeds (ddof = 1; no width with one seed) or ``minmax``: the lowest and highest seed. Runs
    share Θ0 per seed, so pairing by seed removes the period-to-period swing every run shares. Only
    (seed, period) pairs both runs have count. Empty when the baseline is not among the rows.
    """
    if band not in BANDS:
        raise ValueError(f"band: expected one of {BANDS}, got {band!r}")
    base = _by_seed_period(rows, baseline, metric)
    if not base:
        return {}
    out: dict[str, PeriodDifference] = {}
    for run in dict.fromkeys(r["run"] for r in rows):
        mine = _by_seed_period(rows, run, metric)
        per_period: dict[int, list[float]] = {}
        for (seed, period), value in sorted(mine.items(), key=lambda kv: (kv[0][1], kv[0][0])):
            ref = base.get((seed, period))
            if ref is None or math.isnan(ref) or math.isnan(value) or ref == 0:
                continue
            per_period.setdefault(period, []).append(_sign(metric) * (value - ref) / ref * 100.0)
        if not per_period:
            continue
        periods = np.asarray(sorted(per_period), dtype=np.int64)
        values = [np.asarray(per_period[p]) for p in periods]
        mean = np.asarray([v.mean() for v in values])
        if band == "std":
            spread = np.asarray([v.std(ddof=1) if len(v) > 1 else 0.0 for v in values])
            low, high = mean - spread, mean + spread
        else:
            low, high = np.asarray([v.min() for v in values]), np.asarray([v.max() for v in values])
        out[run] = PeriodDifference(periods, mean, low, high, max(len(v) for v in values))
    return out


def seed_improvements(
    rows: list[dict[str, Any]], metric: str = "auc", baseline: str = "IU", phase: str = "test"
) -> dict[str, np.ndarray]:
    """Per run, one imp% per seed: sign · (m̄_run,s − m̄_base,s) / m̄_base,s · 100 with m̄ the seed's mean
    over the ``phase`` periods (paired by seed). Their spread is the whisker of the summary chart."""

    def seed_means(run: str) -> dict[int, float]:
        by: dict[int, list[float]] = {}
        for r in rows:
            if r["run"] == run and r["phase"] == phase and not math.isnan(r[metric]):
                by.setdefault(r["seed"], []).append(float(r[metric]))
        return {s: float(np.mean(v)) for s, v in by.items()}

    base = seed_means(baseline)
    out = {}
    for run in dict.fromkeys(r["run"] for r in rows):
        mine = seed_means(run)
        vals = [_sign(metric) * (mine[s] - base[s]) / base[s] * 100.0 for s in sorted(mine) if base.get(s)]
        if vals:
            out[run] = np.asarray(vals)
    return out


def integer_period_axis(ax: Any, periods: Sequence[int]) -> None:
    """Period ticks on integers only (never 12.5), and the axis limited to the periods shown."""
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True, steps=[1, 2, 5, 10]))
    if len(periods):
        ax.set_xlim(min(periods) - 0.6, max(periods) + 0.6)


def _shade_phases(ax: Any, rows: list[dict[str, Any]]) -> None:
    for phase, shade, label in (("valid", "0.96", "validation periods"), ("test", "0.90", "test periods")):
        ps = sorted({r["period"] for r in rows if r["phase"] == phase})
        if ps:
            ax.axvspan(ps[0] - 0.5, ps[-1] + 0.5, color=shade, zorder=0, label=label)


def _metric_label(metric: str) -> str:
    return "LogLoss" if metric == "logloss" else metric.upper().replace("GAUC", "gAUC")


def draw_raw(
    ax: Any,
    rows: list[dict[str, Any]],
    styles: dict[str, RunStyle],
    metric: str = "auc",
    oracle: dict[int, float] | None = None,
) -> None:
    """The metric per served period, mean over seeds, one line per run; the oracle dashed when given."""
    _shade_phases(ax, rows)
    served = sorted({r["period"] for r in rows if r["phase"] != "pretrain"})
    for run, style in styles.items():
        periods = sorted({r["period"] for r in rows if r["run"] == run and r["phase"] != "pretrain"})
        means = [np.nanmean([r[metric] for r in rows if r["run"] == run and r["period"] == p]) for p in periods]
        ax.plot(periods, means, label=run, **style.line_kwargs())
    if oracle and served:
        ps = sorted(p for p in oracle if served[0] <= p <= served[-1])
        ax.plot(
            ps, [oracle[p] for p in ps], color="0.35", linestyle=(0, (4, 2)), linewidth=1.2, label="oracle (true p)"
        )
    integer_period_axis(ax, served)
    ax.set_ylabel(f"{_metric_label(metric)} (mean over seeds)")
    ax.grid(alpha=0.3)


def draw_differences(
    ax: Any,
    diffs: dict[str, PeriodDifference],
    styles: dict[str, RunStyle],
    rows: list[dict[str, Any]],
    metric: str = "auc",
    baseline: str = "IU",
) -> None:
    """imp% vs the baseline per served period: one line per run and its band over seeds."""
    _shade_phases(ax, rows)
    ax.axhline(0.0, color=BASELINE_COLOR, linewidth=1.6, zorder=1)
    for run, d in diffs.items():
        if run == baseline:
            continue
        style = styles[run]
        ax.plot(d.periods, d.mean, label=run, **style.line_kwargs())
        if d.seeds > 1:
            ax.fill_between(d.periods, d.low, d.high, color=style.color, alpha=0.12, linewidth=0)
    integer_period_axis(ax, sorted({int(p) for d in diffs.values() for p in d.periods}))
    ax.set_xlabel("served period")
    ax.set_ylabel(f"{_metric_label(metric)} imp% vs {baseline}")
    ax.grid(alpha=0.3)


def draw_summary(
    ax: Any,
    summary: list[dict[str, Any]],
    seed_imps: dict[str, np.ndarray],
    styles: dict[str, RunStyle],
    metric: str = "auc",
    baseline: str = "IU",
) -> None:
    """Horizontal bars: each run's imp% as in the summary table, whiskers ± std over seeds of the
    per-seed (paired) imp%; runs top to bottom in table order."""
    runs = [e["run"] for e in summary if not math.isnan(e[f"{metric}_imp_pct"])]
    values = [next(e for e in summary if e["run"] == r)[f"{metric}_imp_pct"] for r in runs]
    errs = [float(seed_imps[r].std(ddof=1)) if r in seed_imps and len(seed_imps[r]) > 1 else 0.0 for r in runs]
    y = np.arange(len(runs))
    colors = [styles[r].color if r in styles else BASELINE_COLOR for r in runs]
    ax.barh(
        y,
        values,
        xerr=errs,
        color=colors,
        alpha=0.85,
        height=0.7,
        error_kw={"ecolor": "0.2", "capsize": 3, "linewidth": 1},
    )
    for yi, run, v in zip(y, runs, values):  # the run's marker links the bar to the line panels
        style = styles.get(run, RunStyle(BASELINE_COLOR, "o", "-"))
        ax.plot(
            [v],
            [yi],
            marker=style.marker,
            color="white",
            markeredgecolor=style.color,
            markersize=6,
            linestyle="none",
            zorder=3,
        )
    span = max([abs(v) + e for v, e in zip(values, errs)] + [1e-9])
    for yi, v, e in zip(y, values, errs):
        ax.text(
            v + (e + 0.03 * span) * (1 if v >= 0 else -1),
            yi,
            f"{v:+.2f}",
            va="center",
            ha="left" if v >= 0 else "right",
            fontsize=8,
        )
    ax.set_yticks(y, runs, fontsize=8)
    ax.set_ylim(max(len(runs), 8) - 0.5, -0.5)  # top to bottom; few runs keep slim bars
    ax.axvline(0.0, color=BASELINE_COLOR, linewidth=1.0)
    ax.set_xlim(-1.3 * span, 1.3 * span)
    ax.set_xlabel(f"{_metric_label(metric)} imp% vs {baseline}, test periods")
    ax.grid(axis="x", alpha=0.3)


def plot_periods(
    rows: list[dict[str, Any]],
    path: Path,
    metric: str = "auc",
    oracle: dict[int, float] | None = None,
    title: str = "",
    baseline: str = "IU",
    band: str = "std",
) -> None:
    """Write the result figure to ``path``.

    Panels: (a) the metric per served period (mean over seeds; the oracle dashed where the data has
    one), (b) imp% vs ``baseline`` per served period, paired by seed, with the band over seeds
    (``band``: ``std`` = mean ± std, ``minmax`` = lowest to highest seed), (c) the summary table's
    imp% per run (bars) with ± std over seeds of the per-seed imp% (whiskers). Panels (b) and (c) are
    left out when the rows have no ``baseline`` run or no other run. Every run has its own colour,
    marker and line style (:func:`run_styles`); period ticks are integers.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = list(dict.fromkeys(r["run"] for r in rows))
    styles = run_styles(runs, baseline)
    diffs = period_differences(rows, metric, baseline, band)
    compare = bool(diffs) and len(runs) > 1
    seeds = len({r["seed"] for r in rows})
    if compare:
        fig = plt.figure(figsize=(14, 9), layout="constrained")
        grid = fig.add_gridspec(2, 2, width_ratios=[2.3, 1])
        ax_raw = fig.add_subplot(grid[0, 0])
        ax_diff = fig.add_subplot(grid[1, 0], sharex=ax_raw)
        ax_sum = fig.add_subplot(grid[:, 1])
    else:
        fig, ax_raw = plt.subplots(figsize=(10, 5), layout="constrained")
    draw_raw(ax_raw, rows, styles, metric, oracle)
    ax_raw.set_title(f"(a) {_metric_label(metric)} per served period", loc="left", fontsize=10)
    if compare:
        draw_differences(ax_diff, diffs, styles, rows, metric, baseline)
        band_text = {"std": "mean ± std", "minmax": "mean, min–max"}[band]
        ax_diff.set_title(
            f"(b) difference to {baseline}, paired by seed (line and band: {band_text} over "
            f"{seeds} seed{'s' if seeds != 1 else ''})",
            loc="left",
            fontsize=10,
        )
        summary = summarize(rows, baseline=baseline)
        draw_summary(ax_sum, summary, seed_improvements(rows, metric, baseline), styles, metric, baseline)
        ax_sum.set_title(
            "(c) mean over test periods, as in the table\n(whiskers: ± std over seeds)", loc="left", fontsize=10
        )
    else:
        ax_raw.set_xlabel("served period")
    handles, labels = ax_raw.get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=min(len(labels), 6), fontsize=8, frameon=False)
    fig.suptitle(title or f"{_metric_label(metric)} per period (mean over seeds)", fontsize=11)
    fig.savefig(path, dpi=110)
    plt.close(fig)
