"""``reloop bench paper``: the three papers' comparisons (and combinations no paper tried) in one report.

Each *section* is a set of runs on one base model; every section of one dataset and model shares
Θ0 per seed (``pretrain_dir``), so all comparisons are paired. The report is one Markdown file with a
table per section and the per-period plots.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from reloop.config import parse_config
from reloop.protocol.experiment import run_experiment

ML100K_DEFAULT = Path("../shared/data/movielens-100k")

SKETCH = {"sketch": {"arrays": 64, "bits": 8}}
EXACT = {"exact": {"size": 5000, "top_k": 64}}


def datasets(ml_path: Path) -> dict[str, dict[str, Any]]:
    return {
        "movielens100k": {"source": "movielens", "path": str(ml_path), "label": {"rating_at_least": 4},
                          "periods": {"count": 31, "by": "rows"}},
        "movielens100k-implicit": {"source": "movielens", "path": str(ml_path), "label": {"rating_at_least": 4},
                                   "implicit": {"negatives": 1, "history": 30}, "periods": {"count": 31, "by": "rows"}},
        "synthetic": {"source": "synthetic", "synthetic": {"seed": 0}, "periods": {"count": 31, "by": "rows"}},
    }


def _gru(variant: str = "multi", k: int = 3, hidden: int = 4) -> dict[str, Any]:
    return {"asmg_gru": {"k": k, "hidden": hidden, "variant": variant}}


def asmg_runs() -> dict[str, dict[str, Any]]:
    """ASMG Table 1 rows and its ablations (Peng et al. 2021, §4.2–4.3)."""
    return {
        "IU": {"update": "incremental"},
        "BU-3": {"update": {"batch": 3}}, "BU-5": {"update": {"batch": 5}}, "BU-7": {"update": {"batch": 7}},
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
    runs: dict[str, dict[str, Any]] = {"IU": {"update": "incremental"},
                                       "IU+KD": {"update": "incremental", "loss": {"distill": 0.3}}}
    for a in alphas:
        runs[f"IU+SC α={a}"] = {"update": "incremental", "loss": {"self_correction": a}}
    runs["IU+SC α=0.5 normalized"] = {"update": "incremental", "loss": {"self_correction": 0.5, "scale": "normalized"}}
    return runs


def reloop2_runs() -> dict[str, dict[str, Any]]:
    """ReLoop2 (Zhu et al. 2023) Table 2 shape, with IU and IncCTR as slow learners, and its sweeps."""
    mem = lambda m, **kw: {**m, "lambda": 0.5, "temperature": 0.1, **kw}  # noqa: E731
    runs: dict[str, dict[str, Any]] = {
        "IU": {"update": "incremental"},
        "IU+exact": {"update": "incremental", "memory": mem(EXACT)},
        "IU+sketch": {"update": "incremental", "memory": mem(SKETCH)},
        "IncCTR": {"update": "incremental", "loss": {"distill": 0.3}},
        "IncCTR+sketch": {"update": "incremental", "loss": {"distill": 0.3}, "memory": mem(SKETCH)},
        "no-update": {"update": "none"},
        "no-update+sketch": {"update": "none", "memory": mem(SKETCH)},
    }
    for lam in (0.1, 0.3, 0.7, 0.9):
        runs[f"sketch λ={lam}"] = {"update": "incremental", "memory": mem(SKETCH, **{"lambda": lam})}
    for k, bits in ((16, 6), (180, 8), (64, 12)):
        runs[f"sketch K={k} L={bits}"] = {"update": "incremental",
                                           "memory": mem({"sketch": {"arrays": k, "bits": bits}})}
    for tau in (0.01, 1.0):
        runs[f"sketch τ={tau}"] = {"update": "incremental", "memory": mem(SKETCH, temperature=tau)}
    runs["sketch write=errors"] = {"update": "incremental", "memory": mem(SKETCH, write="errors", error_threshold=0.3)}
    return runs


def combo_runs() -> dict[str, dict[str, Any]]:
    """Combinations no paper tried: slow loop (ASMG, SC loss) × fast loop (sketch memory)."""
    sc = {"self_correction": 0.5}
    mem = {**SKETCH, "lambda": 0.5, "temperature": 0.1}
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


EMB_MLP = {"name": "emb_mlp", "embedding_dim": 8, "hidden_units": [40, 20, 10]}
DEEPFM = {"name": "deepfm", "embedding_dim": 16, "hidden_units": [128, 64]}
DCN = {"name": "dcn", "embedding_dim": 16, "hidden_units": [128, 64]}

SECTIONS = [
    Section("asmg", "ASMG comparison (Table 1 rows and ablations), Embedding&MLP", EMB_MLP, asmg_runs),
    Section("asmg-sensitivity", "ASMG-GRU sensitivity to k and hidden size d", EMB_MLP, asmg_sensitivity_runs),
    Section("reloop-deepfm", "ReLoop self-correction vs KD, DeepFM", DEEPFM, reloop_runs),
    Section("reloop-dcn", "ReLoop self-correction vs KD, DCN", DCN, reloop_runs),
    Section("reloop2-deepfm", "ReLoop2 error memory, DeepFM", DEEPFM, reloop2_runs),
    Section("reloop2-dcn", "ReLoop2 error memory, DCN", DCN, reloop2_runs),
    Section("combos", "Combinations no paper tried, Embedding&MLP", EMB_MLP, combo_runs),
]


def run_paper(data: str, out: Path, seeds: list[int], sections: list[str] | None = None,
              ml_path: Path = ML100K_DEFAULT, show_progress: bool = True, overrides: dict[str, Any] | None = None,
              console: Console | None = None) -> Path:
    """Run the chosen sections on one dataset and write ``out/report.md``."""
    console = console or Console(stderr=True)
    data_cfg = datasets(ml_path)[data]
    chosen = [s for s in SECTIONS if sections is None or s.name in sections]
    parts = [f"# reloop paper benchmark — {data}, seeds {seeds}\n",
             "Each table: mean ± std over seeds of the mean over the 7 test periods; imp% vs IU. "
             "Runs of one model share Θ0 per seed.\n"]
    for section in chosen:
        raw = {"data": data_cfg, "model": section.model,
               "train": {"epochs": 1, "pretrain_epochs": 5, "batch_size": 256 if data.startswith("movielens") else 1024,
                         "lr": 1e-3},
               "protocol": {"pretrain": 10, "warmup": 10, "valid": 3, "test": 7, "seeds": seeds},
               "runs": section.runs()}
        for key, value in (overrides or {}).items():
            from reloop.config import set_dotted

            set_dotted(raw, key, value)
        cfg = parse_config(raw)
        started = time.time()
        sec_out = out / section.name
        result = run_experiment(cfg, sec_out, resume=True, show_progress=show_progress, console=console,
                                pretrain_dir=out / f"pretrain-{section.model['name']}")
        minutes = (time.time() - started) / 60
        parts.append(f"## {section.title}\n\n{result.markdown}\n![]({section.name}/periods.png)\n\n"
                     f"_{len(cfg.runs)} runs × {len(seeds)} seeds in {minutes:.1f} min._\n")
    report = out / "report.md"
    report.write_text("\n".join(parts))
    return report
