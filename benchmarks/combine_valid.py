"""How the ``combined`` run's Hedge (η, fixed share, prior on IU) was chosen: on ``valid`` periods only.

Two steps, so the experts are trained once and the Hedge settings are compared on the same predictions:

1. ``--collect``: for every regime of ``benchmarks/robustness.py`` and every seed, each run of
   ``configs/recommended.yaml`` (IU, ReLoop, ReLoop2, ASMG and the ``combined`` stack's own prediction)
   is served up to the last ``valid`` period (``stop_after``: no test period is trained on or served)
   and its served probabilities are saved to ``OUT/<regime>/seed<k>.npz`` (with ``protocol.guard_periods
   = 0``; ``--guard-periods N ...`` re-serves the runs with a generator, ASMG and combined, with each N;
   ``N:auc`` also sets ``protocol.guard_metric: auc``).
2. ``--sweep``: every Hedge setting of the grid mixes those predictions with
   :func:`reloop.protocol.combined.combine_served` (the function ``reloop run`` uses), stopped at the last
   valid period, and is scored by its valid AUC imp% vs IU, paired per seed.

The rule, fixed before any figure was read: per setting, take the mean over seeds of the imp% on each
regime; choose the setting with the best **worst regime**, ties (within 0.02) broken by the best mean.
First ``protocol.guard_periods`` (0 = the out-of-sample check off), by the ASMG run alone; then the
Hedge's η, share and IU prior, over the experts served with that guard.

    python benchmarks/combine_valid.py --collect --jobs 2
    python benchmarks/combine_valid.py --sweep
"""

from __future__ import annotations

import argparse
import itertools
import json
import multiprocessing as mp
import os
from typing import Any

import numpy as np
from robustness import ML100K, REGIMES, ROOT, recommended_runs, regime_config

OUT = ROOT / "runs" / "combine-valid"
ETAS = [0.001, 0.003, 0.01, 0.03, 0.1]
SHARES = [0.0, 0.01]
IU_PRIOR = [1.0, 2.0, 4.0, 8.0]  # IU's prior weight relative to each other expert's 1 (1 = uniform)


def _config(regime: str, seeds: list[int], guard: str | None = None) -> Any:
    """``guard``: ``N`` (``protocol.guard_periods = N``) or ``N:auc`` (and ``guard_metric: auc``)."""
    from reloop.config import parse_config

    raw = regime_config(regime, recommended_runs(), seeds, OUT / regime)
    if guard is not None:
        periods, _, metric = guard.partition(":")
        raw["protocol"]["guard_periods"] = int(periods)
        raw["protocol"]["guard_metric"] = metric or "logloss"
    return parse_config(raw)


def _stream(cfg: Any) -> Any:
    from reloop.data.encode import EncoderConfig
    from reloop.data.prepare import prepare_stream

    return prepare_stream(cfg.data, cfg.protocol.pretrain, EncoderConfig(**cfg.encoder.model_dump())).stream


def _collect(job: tuple[str, int, str | None, list[str] | None, str | None]) -> str:
    regime, seed, guard_periods, only, label = job
    import torch

    torch.set_num_threads(1)
    from reloop.protocol.runner import pretrain, run_one
    from reloop.protocol.tune import last_valid_step

    cfg = _config(regime, [seed], "0" if guard_periods is None else guard_periods)
    stream = _stream(cfg)
    theta0, optim0 = pretrain(cfg, stream, seed, out=OUT / regime / "pretrain")
    served: dict[str, np.ndarray] = {}
    for name, spec in cfg.runs.items():
        if only is not None and name not in only:
            continue
        got: dict[str, torch.Tensor] = {}
        rows = run_one(cfg, stream, name, spec, seed, theta0, optim0, stop_after=last_valid_step(cfg), served_out=got)
        assert not any(r["phase"] == "test" for r in rows), "a test period was served"
        served[name] = got["final"].float().numpy()
    np.savez_compressed(OUT / regime / _file(seed, guard_periods, label), **served)
    return f"{regime} seed {seed} guard_periods {guard_periods} {label or ''}".rstrip()


def _file(seed: int, guard: str | None, label: str | None = None) -> str:
    name = f"seed{seed}" if guard is None else f"seed{seed}-g{guard.replace(':', '-')}"
    return f"{name}-{label}.npz" if label else f"{name}.npz"


def _sweep_regime(job: tuple[str, list[str]]) -> dict[str, list[float]]:
    """imp% of every grid setting per seed on this regime's valid periods.

    ``seed<k>.npz`` holds every run with the out-of-sample check off (``guard_periods = 0``); ``seed<k>-g<N>.npz`` the runs with a generator
    (ASMG, combined) re-served with ``protocol.guard_periods = N``, scored as ``run ASMG g=N`` and mixed
    as ``... g=N``.
    """
    regime, guards, variant, independent = job
    import torch

    from reloop.combine import CombineOptions
    from reloop.config import experts_of
    from reloop.protocol.combined import combine_served
    from reloop.protocol.tune import last_valid_step, valid_score

    files = [  # the seeds with every guard variant collected
        f
        for f in sorted((OUT / regime).glob("seed?.npz"))
        if all((OUT / regime / _file(int(f.stem[4:]), g)).exists() for g in guards)
        and (variant is None or (OUT / regime / _file(int(f.stem[4:]), variant[1], variant[0])).exists())
    ]
    cfg = _config(regime, [0])
    stream = _stream(cfg)
    names = [n for n in experts_of(cfg, "combined") if n in cfg.runs]  # replicas: --independent-iu
    last = last_valid_step(cfg) + 1
    out: dict[str, list[float]] = {}
    for f in files:
        seed = int(f.stem[4:])
        base = {n: torch.from_numpy(v) for n, v in np.load(f).items()}
        for g in [None, *guards]:
            served = dict(base)
            if g is not None:
                served.update({n: torch.from_numpy(v) for n, v in np.load(OUT / regime / _file(seed, g)).items()})
            tag = "" if g is None else f" g={g}"
            for n in names:  # every run alone: the mixture with all weight on it is its own served AUC
                if g is not None and n in ("IU", "ReLoop", "ReLoop2"):
                    continue
                solo = {n: served[n]}
                rows, _, _ = combine_served(cfg, stream, n, solo, seed, CombineOptions(), last_period=last)
                out.setdefault(f"run {n}{tag}", []).append(valid_score(rows)[0])
            _grid(cfg, stream, served, seed, last, tag, out)
        if variant is not None:  # the runs re-served by the working tree's engine (``--variant``)
            label, g = variant
            served = dict(base)
            served.update({n: torch.from_numpy(v) for n, v in np.load(OUT / regime / _file(seed, g)).items()})
            changed = {n: torch.from_numpy(v) for n, v in np.load(OUT / regime / _file(seed, g, label)).items()}
            served.update(changed)
            tag = f" [{label}] g={g}"
            for n, v in changed.items():
                rows, _, _ = combine_served(cfg, stream, n, {n: v}, seed, CombineOptions(), last_period=last)
                out.setdefault(f"run {n}{tag}", []).append(valid_score(rows)[0])
            _grid(cfg, stream, served, seed, last, tag, out)
            if independent:  # + IU of the next seed: another Θ0 on the same stream (an ensemble member)
                nxt = files[(files.index(f) + 1) % len(files)]
                other = {**served, "IU-other-seed": torch.from_numpy(np.load(nxt)["IU"])}
                for eta in ETAS:
                    opts = CombineOptions(hedge={"eta": eta})
                    rows, _, _ = combine_served(cfg, stream, "combined", other, seed, opts, last_period=last)
                    key = f"hedge eta={eta} share=0.0 iu_prior=1.0 [{label} +IU-other-seed] g={g}"
                    out.setdefault(key, []).append(valid_score(rows)[0])
                    pair = {"IU": served["IU"], "IU-other-seed": other["IU-other-seed"]}  # the ensemble alone
                    rows, _, _ = combine_served(cfg, stream, "IU", pair, seed, opts, last_period=last)
                    out.setdefault(f"hedge eta={eta} [IU + IU-other-seed]", []).append(valid_score(rows)[0])
    base = out["run IU"]
    return {k: [(a - b) / b * 100 for a, b in zip(v, base)] for k, v in out.items()}


def _grid(cfg: Any, stream: Any, served: dict[str, Any], seed: int, last: int, tag: str, out: dict) -> None:
    """Every Hedge setting of the grid over ``served``, its valid score appended under ``hedge ...{tag}``."""
    from reloop.combine import CombineOptions
    from reloop.protocol.combined import combine_served
    from reloop.protocol.tune import valid_score

    for eta, share, iu in itertools.product(ETAS, SHARES, IU_PRIOR):
        prior = {"IU": iu} if iu != 1.0 else None
        opts = CombineOptions(hedge={"eta": eta, "share": share, "prior": prior})
        rows, _, _ = combine_served(cfg, stream, "combined", served, seed, opts, last_period=last)
        out.setdefault(f"hedge eta={eta} share={share} iu_prior={iu}{tag}", []).append(valid_score(rows)[0])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--collect", action="store_true")
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--regimes", nargs="*", default=list(REGIMES))
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument(
        "--guard-periods",
        nargs="*",
        default=[],
        help="re-serve ASMG and combined with these: N (guard_periods) or N:auc (and guard_metric auc)",
    )
    ap.add_argument(
        "--independent-iu",
        action="store_true",
        help="with --variant: also mix in IU of the next seed (another Θ0 on the same stream), for reference",
    )
    ap.add_argument(
        "--variant",
        nargs="+",
        default=None,
        metavar=("LABEL GUARD", "RUN"),
        help="LABEL GUARD RUN...: re-serve these runs with the working tree's code under GUARD (N or N:auc) "
        "into seed<k>-g<GUARD>-LABEL.npz; the sweep scores them and the Hedge over them",
    )
    args = ap.parse_args()
    if not ML100K.exists():
        args.regimes = [r for r in args.regimes if not r.startswith("ml100k")]
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    variant = None if args.variant is None else (args.variant[0], args.variant[1])
    if args.collect:
        for r in args.regimes:
            (OUT / r).mkdir(parents=True, exist_ok=True)
        jobs = [
            (r, s, g, None if g is None else ["ASMG", "combined"], None)
            for g in [None, *args.guard_periods]
            for s in range(args.seeds)
            for r in args.regimes
            if not (OUT / r / _file(s, g)).exists()
        ]
        if variant is not None:
            jobs += [
                (r, s, variant[1], args.variant[2:], variant[0])
                for s in range(args.seeds)
                for r in args.regimes
                if not (OUT / r / _file(s, variant[1], variant[0])).exists()
            ]
        with mp.get_context("spawn").Pool(args.jobs) as pool:
            for done in pool.imap_unordered(_collect, jobs):
                print(json.dumps({"collected": done}), flush=True)
    if args.sweep:
        with mp.get_context("spawn").Pool(args.jobs) as pool:
            per = dict(
                zip(
                    args.regimes,
                    pool.map(
                        _sweep_regime, [(r, args.guard_periods, variant, args.independent_iu) for r in args.regimes]
                    ),
                )
            )
        table: dict[str, dict[str, float]] = {}
        for regime, by in per.items():
            for k, v in by.items():
                table.setdefault(k, {})[regime] = float(np.mean(v))
                print(json.dumps({"regime": regime, "candidate": k, "valid_imp_pct": [round(x, 3) for x in v]}))
        summary = [
            {
                "candidate": k,
                "mean": round(float(np.mean(list(v.values()))), 3),
                "worst": round(min(v.values()), 3),
                **{r: round(x, 3) for r, x in v.items()},
            }
            for k, v in table.items()
            if len(v) == len(args.regimes)
        ]
        for s in summary:
            print(json.dumps(s))
        # first guard_periods, by ASMG alone; then the Hedge over the experts served with that guard
        asmg = [s for s in summary if s["candidate"] == "run ASMG" or s["candidate"].startswith("run ASMG g=")]
        guard = _best(asmg)
        tag = guard["candidate"][len("run ASMG") :]
        hedges = [
            s
            for s in summary
            if s["candidate"].startswith("hedge")
            and (s["candidate"].endswith(tag) if tag else " g=" not in s["candidate"])
        ]
        print(json.dumps({"chosen_guard": guard}))
        print(json.dumps({"chosen_hedge": _best(hedges)}))


def _best(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The rule: the best worst regime; among those within 0.02 of it, the best mean."""
    best_worst = max(s["worst"] for s in rows)
    return max((s for s in rows if s["worst"] >= best_worst - 0.02), key=lambda s: s["mean"])


if __name__ == "__main__":
    main()
