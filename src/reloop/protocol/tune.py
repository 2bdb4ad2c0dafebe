"""Choose each run's hyper-parameters on the ``valid`` periods only, then report the test periods once.

``reloop tune CONFIG`` (METHODS.md "The protocol": 10 warm-up, 3 valid, 7 test periods):

1. **Base training first** (issue: every gain is measured against IU, so IU must not be under-trained):
   ``train.search_space`` (``TrainConfig``) is searched with the plain IU run; Θ0 is retrained for
   each candidate, because the base training settings shape it too.
2. **Then every run**, on the chosen base settings: each component of the run declares its own search
   space in its ``Options`` (``search_space``, keyed by option; ``MemoryConfig`` for the shared memory
   keys), read through the run's typed choices, so a newly registered component is tuned too; the search
   is one pass of coordinate descent — each key in turn takes the candidate value with the best
   validation score, the others held at their best so far — starting from the run as written.
3. A trial runs the protocol up to the last ``valid`` period (``run_one(stop_after=…)``): it never
   trains on, nor serves, a test period. The score is the mean over seeds of the mean AUC over the
   ``valid`` periods (ties: lower LogLoss).

The chosen config is then run once in full; ``tune.csv`` lists every trial with its validation score
and ``tuned.yaml`` is the config to copy.
"""

from __future__ import annotations

import copy
import csv
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console

from reloop.config import Config, RunSpec, dump_config
from reloop.data.encode import EncoderConfig
from reloop.data.prepare import prepare_stream
from reloop.data.tensors import Stream
from reloop.memory.config import MemoryConfig
from reloop.preflight import check_before_run
from reloop.protocol.experiment import ExperimentResult, run_experiment
from reloop.protocol.runner import pretrain, run_one
from reloop.registry import Choice
from reloop.threads import apply_threads, current_setting
from reloop.update.trainer import TrainConfig

Report = Callable[[str], None]


@dataclass
class Trial:
    """One evaluated setting of one run."""

    run: str
    setting: dict[str, Any]  # dotted key (within the run, or ``train.*``) -> value tried
    valid_auc: float
    valid_logloss: float
    chosen: bool = False

    def score(self) -> tuple[float, float]:
        """Higher is better: AUC first, then −LogLoss (NaN counts as the worst)."""
        auc = self.valid_auc if math.isfinite(self.valid_auc) else -math.inf
        ll = self.valid_logloss if math.isfinite(self.valid_logloss) else math.inf
        return auc, -ll


@dataclass
class TuneResult:
    config: Config  # the chosen settings
    trials: list[Trial] = field(default_factory=list)


# --- search spaces: read from the components -------------------------------------------------------


def _choice_space(slot: str, choice: Choice[Any]) -> list[tuple[str, list[Any]]]:
    """The search space of one choice, keyed as written in YAML: the shorthand option is the name's
    value (``update.batch``, ``loss.self_correction``), a flat kind's options sit beside the name
    (``loss.temperature``), others under it (``update.replay.ratio``, ``generator.sml.lr``)."""
    options = choice.options
    out = []
    for key, values in type(options).search_space.items():
        if key == options.shorthand:
            path = f"{slot}.{choice.name}"
        elif choice.registry.flat:
            path = f"{slot}.{key}"
        else:
            path = f"{slot}.{choice.name}.{key}"
        out.append((path, list(values)))
    return out


def run_search_space(spec: RunSpec) -> list[tuple[str, list[Any]]]:
    """``(dotted key within the run spec, candidate values)`` for every component of ``spec``.

    The candidates come from each component's ``Options.search_space`` (declared beside its options);
    keys are written so that :func:`apply_setting` can place the value in the run's YAML shape.
    """
    space = _choice_space("update", spec.update) + _choice_space("loss", spec.loss)
    space += _choice_space("generator", spec.generator)
    if spec.memory is not None:
        space += [(f"memory.{k}", list(v)) for k, v in MemoryConfig.search_space.items()]
        space += _choice_space("memory", spec.memory.store)
    return space


def _explicit(choice: Choice[Any]) -> Any:
    """A bare name whose shorthand option has a default, spelt with that value (``loss: self_correction``
    -> ``{self_correction: 0.5}``): the value a tuning pass starts from is then visible in ``tuned.yaml``."""
    shorthand = choice.options.shorthand
    if isinstance(choice.raw, str) and shorthand is not None:
        return {choice.name: getattr(choice.options, shorthand)}
    return choice.raw


def apply_setting(spec: RunSpec, key: str, value: Any) -> RunSpec:
    """``spec`` with the dotted ``key`` set to ``value`` (a bare name becomes a one-key mapping).

    Raises:
        ValueError: the new value is not a valid setting (e.g. ``top_k`` above ``size``).
    """
    raw = spec.model_dump(mode="json", by_alias=True, exclude_none=True)
    slot, _, rest = key.partition(".")
    current = raw.get(slot)
    if isinstance(current, str):
        current = {current: None}
    current = copy.deepcopy(current) if current is not None else {}
    parts = rest.split(".") if rest else []
    node = current
    for p in parts[:-1]:
        if not isinstance(node.get(p), dict):
            node[p] = {}
        node = node[p]
    if parts:
        node[parts[-1]] = value
    raw[slot] = current
    return RunSpec(**raw)


def _setting_label(setting: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in setting.items()) or "(as written)"


# --- trials -----------------------------------------------------------------------------------------


def valid_score(rows: Iterable[dict[str, Any]]) -> tuple[float, float]:
    """Mean over seeds of the mean AUC and LogLoss over the ``valid`` periods."""
    by_seed: dict[int, list[dict[str, Any]]] = {}
    for r in rows:
        if r["phase"] == "valid":
            by_seed.setdefault(r["seed"], []).append(r)
    if not by_seed:
        return float("nan"), float("nan")
    aucs = [float(np.nanmean([r["auc"] for r in rs])) for rs in by_seed.values()]
    lls = [float(np.nanmean([r["logloss"] for r in rs])) for rs in by_seed.values()]
    return float(np.mean(aucs)), float(np.mean(lls))


def last_valid_step(cfg: Config) -> int:
    """The last period a validation trial trains on: it then serves the last ``valid`` period."""
    p = cfg.protocol
    return p.pretrain + p.warmup + p.valid - 1


def _check_valid_periods(cfg: Config) -> None:
    if cfg.protocol.valid < 1:
        raise ValueError("protocol.valid: tuning needs at least one valid period (it never reads test periods)")


def evaluate(
    cfg: Config,
    stream: Stream,
    name: str,
    spec: RunSpec,
    theta0s: dict[int, tuple[Any, dict]],
) -> tuple[float, float]:
    """Run ``spec`` under every seed up to the last ``valid`` period; its validation score."""
    rows: list[dict[str, Any]] = []
    for seed in cfg.protocol.seeds:
        theta0, optim0 = theta0s[seed]
        rows += run_one(cfg, stream, name, spec, seed, theta0, optim0, stop_after=last_valid_step(cfg))
    assert not any(r["phase"] == "test" for r in rows), "a validation trial served a test period"
    return valid_score(rows)


def tune(
    cfg: Config,
    stream: Stream,
    runs: list[str] | None = None,
    tune_train: bool = True,
    report: Report | None = None,
    pretrain_dir: Path | None = None,
) -> TuneResult:
    """Choose base training settings and each run's settings on the ``valid`` periods (module docstring)."""
    _check_valid_periods(cfg)
    say = report or (lambda _msg: None)
    cfg = cfg.model_copy(deep=True)
    trials: list[Trial] = []

    def theta0s_for(c: Config) -> dict[int, tuple[Any, dict]]:
        return {s: pretrain(c, stream, s, out=pretrain_dir) for s in c.protocol.seeds}

    if tune_train:
        iu = RunSpec()
        best_train = cfg.train
        best = Trial("train", {}, *evaluate(cfg, stream, "IU", iu, theta0s_for(cfg)))
        trials.append(best)
        say(f"train (as written): valid AUC {best.valid_auc:.4f}")
        for key, values in TrainConfig.search_space.items():
            for v in values:
                if getattr(best_train, key) == v:
                    continue
                candidate_train = best_train.model_copy(update={key: v})
                c = cfg.model_copy(update={"train": candidate_train})
                setting = {f"train.{k}": getattr(candidate_train, k) for k in TrainConfig.search_space}
                trial = Trial("train", setting, *evaluate(c, stream, "IU", iu, theta0s_for(c)))
                trials.append(trial)
                say(f"train {_setting_label(setting)}: valid AUC {trial.valid_auc:.4f}")
                if trial.score() > best.score():
                    best, best_train = trial, candidate_train
        best.chosen = True
        cfg = cfg.model_copy(update={"train": best_train})

    theta0s = theta0s_for(cfg)
    for name in runs or list(cfg.runs):
        spec = cfg.runs[name]
        if spec.combine is not None:
            continue  # a mixture has no settings of its own to choose beyond its stack's
        spec = RunSpec(**{**spec.model_dump(mode="json"), "loss": _explicit(spec.loss)})  # the weight it stands for
        best_spec = spec
        best = Trial(name, {}, *evaluate(cfg, stream, name, spec, theta0s))
        trials.append(best)
        say(f"{name} (as written): valid AUC {best.valid_auc:.4f}")
        chosen: dict[str, Any] = {}
        for key, values in run_search_space(spec):
            for v in values:
                try:
                    candidate = apply_setting(best_spec, key, v)
                except ValueError:
                    continue  # e.g. top_k above size: not a valid point of the space
                if candidate == best_spec:
                    continue
                setting = {**chosen, key: v}
                trial = Trial(name, setting, *evaluate(cfg, stream, name, candidate, theta0s))
                trials.append(trial)
                say(f"{name} {_setting_label(setting)}: valid AUC {trial.valid_auc:.4f}")
                if trial.score() > best.score():
                    best, best_spec, chosen = trial, candidate, setting
        best.chosen = True
        runs_now = dict(cfg.runs)
        runs_now[name] = best_spec
        cfg = cfg.model_copy(update={"runs": runs_now})
    return TuneResult(cfg, trials)


def write_trials(trials: list[Trial], path: Path) -> None:
    """``tune.csv``: run, setting, validation AUC and LogLoss, whether it was chosen."""
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["run", "setting", "valid_auc", "valid_logloss", "chosen"])
        for t in trials:
            w.writerow(
                [t.run, _setting_label(t.setting), f"{t.valid_auc:.6f}", f"{t.valid_logloss:.6f}", int(t.chosen)]
            )


def tune_experiment(
    cfg: Config,
    out: Path,
    runs: list[str] | None = None,
    tune_train: bool = True,
    show_progress: bool = True,
    console: Console | None = None,
) -> tuple[TuneResult, ExperimentResult]:
    """``reloop tune``: choose on the valid periods (:func:`tune`), then run the chosen config once in full.

    Writes ``OUT/tune.csv`` (every trial and its validation score), ``OUT/tuned.yaml`` (the config to copy)
    and the usual result files of the chosen config (their summary is the test periods', reported once).
    """
    console = console or Console(stderr=True)
    prepared = prepare_stream(cfg.data, cfg.protocol.pretrain, EncoderConfig(**cfg.encoder.model_dump()))
    check_before_run(cfg, [end - start for start, end in prepared.stream.bounds])
    apply_threads(current_setting(), None)
    out.mkdir(parents=True, exist_ok=True)
    result = tune(
        cfg,
        prepared.stream,
        runs,
        tune_train,
        report=(lambda msg: console.print(f"[dim]tune[/] {msg}", highlight=False)) if show_progress else None,
        pretrain_dir=out / "pretrain",
    )
    write_trials(result.trials, out / "tune.csv")
    (out / "tuned.yaml").write_text(dump_config(result.config))
    for t in result.trials:
        if t.chosen:
            console.print(
                f"[bold]chosen[/] {t.run}: {_setting_label(t.setting)} (valid AUC {t.valid_auc:.4f})", highlight=False
            )
    experiment = run_experiment(
        result.config, out, show_progress=show_progress, console=console, pretrain_dir=out / "pretrain"
    )
    experiment.files += [f for f in ("tune.csv", "tuned.yaml") if (out / f).exists()]
    return result, experiment
