"""Result files (a contract other tools read): periods.csv, summary.csv/.md, periods.png.

``summary``: per run, each seed's mean over the test periods, then mean ± std over seeds (std with
ddof=1 when there are several seeds); imp% = (m − m_IU) / m_IU · 100 (sign flipped for LogLoss so
that positive is better), as in the ASMG and ReLoop2 papers.
"""
from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

import numpy as np

PERIOD_COLUMNS = ["run", "seed", "period", "phase", "auc", "gauc", "logloss", "rows"]
SUMMARY_COLUMNS = ["run", "auc_mean", "auc_std", "gauc_mean", "gauc_std", "logloss_mean", "logloss_std",
                   "auc_imp_pct"]


def write_periods(rows: list[dict[str, Any]], path: Path) -> None:
    with path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=PERIOD_COLUMNS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{r[k]:.6f}" if isinstance(r[k], float) else r[k]) for k in PERIOD_COLUMNS})


def read_periods(path: Path) -> list[dict[str, Any]]:
    out = []
    with path.open() as fh:
        for r in csv.DictReader(fh):
            out.append({"run": r["run"], "seed": int(r["seed"]), "period": int(r["period"]), "phase": r["phase"],
                        "auc": float(r["auc"]), "gauc": float(r["gauc"]), "logloss": float(r["logloss"]),
                        "rows": int(r["rows"])})
    return out


def _mean_std(values: list[float]) -> tuple[float, float]:
    arr = np.asarray([v for v in values if not math.isnan(v)], dtype=np.float64)
    if len(arr) == 0:
        return float("nan"), float("nan")
    return float(arr.mean()), float(arr.std(ddof=1)) if len(arr) > 1 else 0.0


def summarize(rows: list[dict[str, Any]], phase: str = "test", baseline: str = "IU") -> list[dict[str, Any]]:
    runs = list(dict.fromkeys(r["run"] for r in rows))
    out = []
    for run in runs:
        sel = [r for r in rows if r["run"] == run and r["phase"] == phase]
        seeds = sorted({r["seed"] for r in sel})
        entry: dict[str, Any] = {"run": run, "seeds": len(seeds)}
        for m in ("auc", "gauc", "logloss"):
            per_seed = [float(np.nanmean([r[m] for r in sel if r["seed"] == s])) for s in seeds]
            entry[f"{m}_mean"], entry[f"{m}_std"] = _mean_std(per_seed)
        out.append(entry)
    base = next((e for e in out if e["run"] == baseline), None)
    for e in out:
        for m, sign in (("auc", 1), ("gauc", 1), ("logloss", -1)):
            e[f"{m}_imp_pct"] = (sign * (e[f"{m}_mean"] - base[f"{m}_mean"]) / base[f"{m}_mean"] * 100
                                 if base is not None else float("nan"))
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
    lines += ["| run | AUC | gAUC | LogLoss | AUC imp% | gAUC imp% | LogLoss imp% | seeds |",
              "|---|---|---|---|---|---|---|---|"]
    for e in summary:
        def f(m: str) -> str:
            return f"{e[m + '_mean']:.4f} ± {e[m + '_std']:.4f}"

        def imp(m: str) -> str:
            v = e[f"{m}_imp_pct"]
            return "" if math.isnan(v) else f"{v:+.2f}"

        lines.append(f"| {e['run']} | {f('auc')} | {f('gauc')} | {f('logloss')} | {imp('auc')} | {imp('gauc')} "
                     f"| {imp('logloss')} | {e['seeds']} |")
    return "\n".join(lines) + "\n"


def plot_periods(rows: list[dict[str, Any]], path: Path, metric: str = "auc",
                 oracle: dict[int, float] | None = None, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.8))
    runs = list(dict.fromkeys(r["run"] for r in rows))
    test_periods = sorted({r["period"] for r in rows if r["phase"] == "test"})
    if test_periods:
        ax.axvspan(test_periods[0] - 0.5, test_periods[-1] + 0.5, color="0.92", label="test span")
    for run in runs:
        periods = sorted({r["period"] for r in rows if r["run"] == run and r["phase"] != "pretrain"})
        means = [np.nanmean([r[metric] for r in rows if r["run"] == run and r["period"] == p]) for p in periods]
        ax.plot(periods, means, marker="o", ms=3, label=run)
    if oracle:
        ps = sorted(p for p in oracle if p >= min(r["period"] for r in rows if r["phase"] != "pretrain"))
        ax.plot(ps, [oracle[p] for p in ps], "k--", lw=1, label="oracle (true p)")
    ax.set_xlabel("served period")
    ax.set_ylabel(metric.upper() if metric != "logloss" else "LogLoss")
    ax.set_title(title or f"{metric.upper()} per period (mean over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
