"""The prequential, period-by-period protocol (ASMG §4.1.3; METHODS.md "The protocol").

Per seed, Θ0 is pretrained once on periods 1..P and shared by every run (paired comparisons). For
each run and t = P+1 .. P+warmup+valid+test:
  1. base update with D_t (the run's strategy and loss)      -> Θ_t
  2. the run's generator forms the model to serve           -> Θ*_t
  3. serve D_{t+1} batch by batch (error memory in between) -> metrics of period t+1, served ŷ
  4. the generator may now learn from D_{t+1}.
The row of served period t+1 also carries the wall seconds of these steps: ``update_s`` (1),
``generate_s`` (2: observe + serving model), ``serve_s`` (3, without the metrics) and ``generator_fit_s``
(4); they are not written to periods.csv (ASMG Table 3 reports the generator's training time).
Finished periods are checkpointed (model, optimizer, strategy, generator, memory, served
predictions, RNG states; the last period always, earlier ones as often as keeps writing under ~5% of
the run: :class:`_Checkpoints`), so ``resume`` continues from the last checkpoint of a killed run and
gives the same metrics as an uninterrupted run.
"""

from __future__ import annotations

import copy
import json
import os
import time
import warnings
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from reloop.components import memory_key
from reloop.config import Config, RunSpec, expert_spec, experts_of
from reloop.data.periods import phase_of
from reloop.data.tensors import Stream
from reloop.device import clock, to_cpu
from reloop.distributed import runtime_device
from reloop.engine import RunEngine
from reloop.errors import ConfigError
from reloop.memory.compensate import Compensator
from reloop.models.base import CTRModel, build_model
from reloop.protocol.combined import combine_served
from reloop.protocol.metrics import period_metrics
from reloop.protocol.serving import Served, serve_period
from reloop.update.losses import CrossEntropy
from reloop.update.trainer import make_optimizer, train_rows

Progress = Callable[[str, int], None]


def _atomic_save(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # One temporary name per process: two processes sharing one would write into each other's file.
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    torch.save(to_cpu(obj), tmp)  # CPU tensors: a checkpoint made on a GPU resumes anywhere
    os.replace(tmp, path)


#: A run's checkpoint is written after a period once the wall time since the previous write is at least
#: this many times what that write cost (and always after the run's last period and where it stops).
CHECKPOINT_WORK_RATIO = 20.0


class _Checkpoints:
    """When and how ``run_one`` writes its checkpoint.

    Writing costs a fixed time per period (model, optimizer state, generator and memory state, the served
    predictions: ~240 MB for DeepFM on 2M Criteo-shaped rows) while periods can be short, so a write is
    skipped until the work done since the last one is ``CHECKPOINT_WORK_RATIO`` times the last write's
    cost: writing then takes at most 1 / (1 + ratio) ≈ 5% of a run, and a killed run redoes at most about
    ratio × one write's time of work. The first period after a (re)start is always written (its cost is
    not known yet), and so are the last and the one ``stop_after`` names. Any checkpoint resumes exactly
    (model, optimizer, generator, memory, served predictions and RNG states are all in it), so which
    periods were written changes no result.
    """

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.cost = 0.0
        self.since = time.perf_counter()

    def due(self, final: bool) -> bool:
        if self.path is None:
            return False
        return final or time.perf_counter() - self.since >= CHECKPOINT_WORK_RATIO * self.cost

    def write(self, make: Callable[[], dict[str, Any]]) -> None:
        """Write ``make()`` (built only now: some generators' states are deep copies) atomically."""
        assert self.path is not None
        start = time.perf_counter()
        _atomic_save(make(), self.path)
        self.since = time.perf_counter()
        self.cost = self.since - start


def fresh_model(cfg: Config, stream: Stream, seed: int, device: torch.device | str = "cpu") -> CTRModel:
    """A new model, initialised on the CPU (the same weights for a seed on every device), on ``device``.

    A model the data cannot feed (``din`` without a behaviour sequence) raises a ``ConfigError``.
    """
    torch.manual_seed(seed)
    try:
        model = build_model(cfg.model, stream.feature_map)
    except ValueError as e:  # the options were checked with the config; this is the model against the data
        raise ConfigError(str(e)) from None
    return model.to(device)


def _device(cfg: Config, device: torch.device | str | None) -> torch.device:
    return runtime_device(cfg.device) if device is None else torch.device(device)


def pretrain(
    cfg: Config,
    stream: Stream,
    seed: int,
    out: Path | None = None,
    on_batch: Callable[[int], None] | None = None,
    device: torch.device | str | None = None,
) -> tuple[CTRModel, dict]:
    """Θ0: ``train.pretrain_epochs`` passes over periods 1..P (cached per seed under ``out``).

    Trained on ``device`` (default: the config's ``device``, resolved); Θ0 is returned there.
    """
    device = _device(cfg, device)
    path = out / "pretrain" / f"seed{seed}.pt" if out is not None else None
    # Θ0 is reused only for the same data, model, training settings and pretraining span.
    fields = {
        "data": stream.meta.get("key"),
        "model": cfg.model,
        "train": cfg.train.model_dump(),
        "pretrain": cfg.protocol.pretrain,
        "seed": seed,
    }
    if device.type != "cpu":  # a GPU's Θ0 differs in the last bits; CPU caches keep their old key
        fields["device"] = device.type
    key = json.dumps(fields, sort_keys=True, default=str)
    # Parallel report workers share Θ0: the first trains it, the others wait and load it.
    with _exclusive(path):
        blob = torch.load(path, map_location="cpu", weights_only=True) if path is not None and path.exists() else None
        if blob is not None and blob.get("key") == key:
            model = build_model(cfg.model, stream.feature_map)
            model.load_state_dict(blob["model"])
            model.to(device).eval()
            return model, blob["optimizer"]
        return _pretrain_fresh(cfg, stream, seed, path, key, on_batch, device)


@contextmanager
def _exclusive(path: Path | None):
    """An advisory lock on ``path``'s ``.lock`` sibling (POSIX ``flock``; a no-op elsewhere or without a path)."""
    if path is None:
        yield
        return
    try:
        import fcntl
    except ImportError:  # not POSIX: no cross-process lock, the per-process temp names still keep files whole
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _pretrain_fresh(
    cfg: Config,
    stream: Stream,
    seed: int,
    path: Path | None,
    key: str,
    on_batch: Callable[[int], None] | None,
    device: torch.device,
) -> tuple[CTRModel, dict]:
    model = fresh_model(cfg, stream, seed, device)
    optimizer = make_optimizer(model, cfg.train)
    gen = torch.Generator().manual_seed(seed)
    rows = stream.periods(1, cfg.protocol.pretrain)
    train_rows(
        model, optimizer, rows, CrossEntropy(), cfg.train, gen, epochs=cfg.train.pretrain_epochs, on_batch=on_batch
    )
    _warn_if_constant(model, rows, seed)
    if path is not None:
        _atomic_save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "key": key}, path)
    return model, optimizer.state_dict()


def _warn_if_constant(model: CTRModel, rows, seed: int, sample: int = 4096) -> None:
    """A Θ0 that gives every row the same score (dead ReLUs, a diverged step) makes every run of this
    seed meaningless (AUC 0.5): say so instead of letting it pass as a result."""
    from reloop.update.trainer import predict_rows

    logits, _ = predict_rows(model, rows.slice(0, min(len(rows), sample)), hidden=False)
    if len(logits) > 1 and (not bool(torch.isfinite(logits).all()) or float(logits.std()) < 1e-6):
        warnings.warn(
            f"seed {seed}: the pretrained model gives every row the same score (or a non-finite "
            "one); results of this seed are not meaningful — check train.lr, model.init_std, "
            "model.hidden_units",
            RuntimeWarning,
            stacklevel=2,
        )


@dataclass
class RunState:
    t: int  # the last period trained on (P before the first update)
    model: CTRModel
    optim_state: dict | None
    served_base: torch.Tensor
    served_final: torch.Tensor
    rows: list[dict[str, Any]]


def _checkpoint_path(out: Path, run: str, seed: int) -> Path:
    return out / "checkpoints" / run / f"seed{seed}.pt"


def run_fingerprint(cfg: Config, stream: Stream, name: str, spec: RunSpec) -> dict[str, Any]:
    """The settings that determine a run's results, stored in each checkpoint and compared on resume.

    ``data`` is the encoded stream's key (loaded rows, schema, ``data.periods``, ``encoder``,
    ``protocol.pretrain``). Left out: ``protocol.seeds`` (one checkpoint per seed) and ``device``
    (checkpoints resume on any device).
    """
    fields = {
        "data": stream.meta.get("key"),
        "model": cfg.model,
        "train": cfg.train.model_dump(mode="json"),
        "protocol": cfg.protocol.model_dump(mode="json", exclude={"seeds"}),
        f"runs.{name}": spec.model_dump(mode="json"),
    }
    return json.loads(json.dumps(fields, default=str))  # plain JSON values: compared as written


_UNSET = object()


def _show(value: Any) -> str:
    return "<unset>" if value is _UNSET else json.dumps(value) if isinstance(value, (dict, list)) else str(value)


def _changes(old: Any, new: Any, path: str) -> list[str]:
    """``path.key=<old>, config has <new>`` for every leaf where two fingerprints differ."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [
            c
            for k in sorted(old.keys() | new.keys())
            for c in _changes(old.get(k, _UNSET), new.get(k, _UNSET), f"{path}.{k}" if path else k)
        ]
    return [] if old == new else [f"{path}={_show(old)}, config has {_show(new)}"]


def check_checkpoint(stored: dict[str, Any] | None, expected: dict[str, Any], name: str, path: Path) -> None:
    """Refuse to resume a checkpoint made with other settings, naming what changed.

    A checkpoint without a fingerprint (written before reloop stored one) resumes with a warning.
    """
    if stored is None:
        warnings.warn(
            f"resume: runs.{name}: {path} has no record of its settings (written by an older "
            "reloop); resuming without comparing it with the config",
            stacklevel=2,
        )
        return
    if stored.get("data") != expected.get("data"):
        changed = ["other data (the loaded rows, data.periods, encoder or protocol.pretrain differ)"]
    else:
        changed = _changes(stored, expected, "")
    if changed:
        raise ConfigError(
            f"resume: runs.{name}: checkpoint was made with {'; '.join(changed)}; use a new --out or drop --resume"
        )


def check_resume(cfg: Config, stream: Stream, out: Path) -> None:
    """Before any work: every checkpoint under ``out`` that ``resume`` would continue matches ``cfg``."""
    for name, spec in cfg.runs.items():
        expected = run_fingerprint(cfg, stream, name, spec)
        for seed in cfg.protocol.seeds:
            path = _checkpoint_path(out, name, seed)
            if path.exists():
                blob = load_checkpoint(path, mmap=True)
                check_checkpoint(blob.get("fingerprint"), expected, name, path)


def run_one(
    cfg: Config,
    stream: Stream,
    name: str,
    spec: RunSpec,
    seed: int,
    theta0: CTRModel,
    optim0: dict,
    out: Path | None = None,
    resume: bool = False,
    progress: Progress | None = None,
    stop_after: int | None = None,
    device: torch.device | str | None = None,
    on_period: Callable[[int], None] | None = None,
    served_out: dict[str, torch.Tensor] | None = None,
    own_theta0: bool = False,
) -> list[dict[str, Any]]:
    """One run under one seed; returns its per-period metric rows.

    ``own_theta0``: the caller gives ``theta0`` and ``optim0`` up (no other run starts from them): the run
    trains them in place instead of copies (the same results; one model and optimizer state fewer).

    ``served_out``, when given, receives ``{"base", "final"}``: the served probability per global row
    (NaN outside the served periods), for a ``combine:`` run to mix. ``progress(name, n)`` is told the
    rows of each training step; ``on_period(t)`` is called once period ``t`` is trained on, served and
    checkpointed when due (a progress bar with a known total).

    The period step itself (update, generator, guard, memory reset) is :class:`reloop.engine.RunEngine`'s,
    shared with the service's ``retrain``; this function feeds it the stream, serves each period and
    persists what it returns. ``stop_after`` ends the run after training on that period (used to test
    resuming). Everything runs on ``device`` (default: the config's ``device``, resolved): the stream is
    moved there once (a no-op when the caller already did), models and the error memory live there, and
    only each period's served predictions come back to the CPU (metrics, ``y_last``).
    """
    device = _device(cfg, device)
    stream = stream.to(device)
    P = cfg.protocol.pretrain
    last_t = P + cfg.protocol.served_periods
    engine = RunEngine(
        cfg,
        spec,
        seed,
        stream.feature_map,
        key_dim=theta0.key_dim(memory_key(spec.memory)) if spec.memory else None,
        device=device,
    )
    compensator = engine.compensator
    n_rows = len(stream.rows)
    ckpt = _checkpoint_path(out, name, seed) if out is not None else None

    fingerprint = run_fingerprint(cfg, stream, name, spec)
    if resume and ckpt is not None and ckpt.exists():
        blob = load_checkpoint(ckpt)
        check_checkpoint(blob.get("fingerprint"), fingerprint, name, ckpt)
        model = build_model(cfg.model, stream.feature_map)
        model.load_state_dict(blob["model"])
        model.to(device).eval()
        state = RunState(blob["t"], model, blob["optim"], blob["served_base"], blob["served_final"], blob["rows"])
        engine.load_state_dict(blob["engine"])
        torch.set_rng_state(blob["torch_rng"])
        if device.type == "cuda" and blob.get("cuda_rng") is not None:  # absent when saved on a CPU
            torch.cuda.set_rng_state(blob["cuda_rng"], device)
    else:
        nan = torch.full((n_rows,), float("nan"))  # served predictions per global row: on the CPU
        # The run's own Θ0 and optimizer state (a copy while Θ0 is shared by the seed's runs): each update
        # then trains the run's model in place (``release`` below), so a period holds one model, not two.
        if own_theta0:
            state = RunState(P, theta0.to(device), optim0, nan, nan.clone(), [])
        else:
            state = RunState(P, copy.deepcopy(theta0).to(device), copy.deepcopy(optim0), nan, nan.clone(), [])
        # Θ0 serves period P+1 so that its served predictions exist when training on it.
        served = _serve(cfg, state.model, stream, P + 1, compensator)
        _record(state, stream, P + 1, served, cfg, name, seed)
        torch.manual_seed(seed)

    on_batch = (lambda n: progress(name, n)) if progress else None
    checkpoints = _Checkpoints(ckpt)
    while state.t < last_t:
        t = state.t + 1
        y_last = state.served_final if engine.loss_spec.y_last == "compensated" else state.served_base
        # Θ_{t−1} and its optimizer state are given up: only Θ_t and its state are kept (and checkpointed)
        step = engine.step(state.model, state.optim_state, stream, t, y_last, on_batch, release=True)
        t_serve = clock(device)
        served = _serve(cfg, step.serving, stream, t + 1, compensator)
        t_served = clock(device)
        state.model, state.optim_state, state.t = step.model, step.optim_state, t
        _record(state, stream, t + 1, served, cfg, name, seed)
        y_last = state.served_final if engine.loss_spec.y_last == "compensated" else state.served_base
        fit_s = engine.learn(stream, t + 1, y_last, state.model, on_batch)
        state.rows[-1].update(
            update_s=step.seconds["update_s"],
            generate_s=step.seconds["generate_s"] + step.seconds["guard_s"],
            serve_s=t_served - t_serve,
            generator_fit_s=fit_s,
            fallback=step.guard.reason,
        )
        if checkpoints.due(final=t >= last_t or (stop_after is not None and t >= stop_after)):

            def checkpoint_blob(t: int = t) -> dict[str, Any]:  # built only when written (generator states are copies)
                return {
                    "fingerprint": fingerprint,
                    "t": t,
                    "model": state.model.state_dict(),
                    "optim": state.optim_state,
                    "served_base": state.served_base,
                    "served_final": state.served_final,
                    "rows": state.rows,
                    "engine": engine.state_dict(),
                    "torch_rng": torch.get_rng_state(),
                    "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
                }

            checkpoints.write(checkpoint_blob)
        if on_period is not None:
            on_period(t)
        if stop_after is not None and t >= stop_after:
            break
    if served_out is not None:
        served_out.update(base=state.served_base, final=state.served_final)
    return state.rows


def _serve(cfg: Config, model: CTRModel, stream: Stream, period: int, compensator: Compensator | None) -> Served:
    """Serve ``period`` with ``model``: in ``protocol.serve_batch_size`` batches when an error memory acts
    between them, else in ``train.eval_batch_size`` batches (the same predictions, fewer calls)."""
    p = cfg.protocol
    return serve_period(
        model, stream.period(period), compensator, p.serve_batch_size, p.feedback_delay, cfg.train.eval_batch_size
    )


def load_checkpoint(path: Path, mmap: bool = False) -> dict[str, Any]:
    """A checkpoint written by ``run_one``: plain tensors and containers only (``weights_only=True``:
    loading a file never runs code from it)."""
    return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)


def _record(state: RunState, stream: Stream, period: int, served, cfg: Config, name: str, seed: int) -> None:
    start, end = stream.bounds[period - 1]
    state.served_base[start:end] = served.base
    state.served_final[start:end] = served.final
    if served.labels is not None:  # streamed rows (a ShardedStream): serving collected them
        labels, users = served.labels, served.users
    else:  # labels and users come to the CPU once per period (metrics run there)
        rows = stream.period(period).data
        labels, users = rows["label"], rows.get("user")
    metrics = period_metrics(
        labels.cpu().numpy(), served.final.cpu().numpy(), users.cpu().numpy() if users is not None else None
    )
    p = cfg.protocol
    state.rows.append(
        {
            "run": name,
            "seed": seed,
            "period": period,
            "phase": phase_of(period, p.pretrain, p.warmup, p.valid),
            **metrics,
        }
    )


def run_seed(
    cfg: Config,
    stream: Stream,
    seed: int,
    theta0: CTRModel,
    optim0: dict,
    out: Path | None = None,
    resume: bool = False,
    device: torch.device | str | None = None,
    progress_for: Callable[[str], Progress | None] | None = None,
    on_run: Callable[[str, list[dict[str, Any]]], None] | None = None,
    own_theta0: bool = False,
    pretrain_dir: Path | None = None,
) -> list[dict[str, Any]]:
    """Every run of ``cfg`` under one seed (Θ0 shared, paired comparisons); returns their period rows.

    ``own_theta0``: the caller gives ``theta0`` and ``optim0`` up; the last run trains them in place
    (the others start from copies).

    Runs without ``combine:`` go first, in config order; then each ``combine:`` run trains its own
    composition and serves the Hedge mixture of its predictions and its experts'
    (:func:`reloop.protocol.combined.combine_served`). A ``combine.replicas`` expert (``IU.r1``) is
    trained just before the mixture, as its run under seed + k from that seed's Θ0 (``pretrain``, cached
    under ``pretrain_dir``); only its served predictions are used, its rows are not returned.
    ``progress_for(name)`` gives a run's ``progress`` callback; ``on_run(name, rows)`` is called as each
    run finishes.
    """
    order = [n for n, s in cfg.runs.items() if s.combine is None] + [
        n for n, s in cfg.runs.items() if s.combine is not None
    ]
    served: dict[str, torch.Tensor] = {}
    all_rows: list[dict[str, Any]] = []

    def train(name: str, spec: RunSpec, s: int, theta: CTRModel, optim: dict, own: bool) -> list[dict[str, Any]]:
        """``run_one`` of ``name`` under seed ``s``; keeps its served predictions in ``served``."""
        got: dict[str, torch.Tensor] = {}
        progress = progress_for(name) if progress_for else None
        rows = run_one(
            cfg,
            stream,
            name,
            spec,
            s,
            theta,
            optim,
            out=out,
            resume=resume,
            progress=progress,
            device=device,
            served_out=got,
            own_theta0=own,
        )
        served[name] = got["final"]
        return rows

    for name in order:
        spec = cfg.runs[name]
        rows = train(name, spec, seed, theta0, optim0, own_theta0 and name == order[-1])
        if spec.combine is not None:
            experts = experts_of(cfg, name)
            for replica in (e for e in experts if e not in served):
                base, k = expert_spec(cfg, replica)
                train(replica, base, seed + k, *pretrain(cfg, stream, seed + k, pretrain_dir, device=device), own=True)
            rows, _, _ = combine_served(cfg, stream, name, {e: served[e] for e in experts}, seed, spec.combine)
        all_rows.extend(rows)
        if on_run is not None:
            on_run(name, rows)
    return all_rows
