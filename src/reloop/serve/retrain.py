"""Close the open period, train on what the log says happened in it, validate, publish.

``retrain(model_dir)`` (CLI: ``reloop retrain --model-dir DIR``; or scheduled by the service every N
feedback events) is the online version of one step of the offline protocol
(:func:`reloop.protocol.runner.run_one`): both drive the same step engine, :class:`reloop.engine.RunEngine`:

1. Period t is the log's open period. Its training set is its impressions (logged up to now) with
   their labels; an impression without feedback counts as a negative once older than
   ``label_timeout`` seconds, and is left out before that (``label_timeout=None``: never a negative).
2. The last ``holdout`` share of those rows (log order, i.e. by time) is held out for validation.
3. A ``Stream`` is rebuilt: the pretraining periods (``pretrain.pt``), the earlier closed periods
   (their training rows, from the log) and period t's training rows, each row carrying its global
   ``row`` id, fixed at close time so the replay reservoir's ids stay valid. ``served`` holds the
   logged predictions aligned by ``row`` (NaN for pretraining rows) so the ReLoop self-correction
   loss reads ŷ_last exactly as logged: ``loss.y_last: served`` → the serving model's logged base
   prediction ``p_base`` (as offline, where ``served`` is the serving model's output), ``compensated``
   → the logged ``p_served`` (after the error memory), ``previous_model`` → recomputed.
4. The generator first learns from D_t (it was served by Θ*_{t−1}) when it observed Θ_{t−1}, then
   the base update turns Θ_{t−1} into Θ_t, the generator observes it and forms Θ*_t.
5. Θ*_t is compared with the serving model on the held-out rows; it is *rejected* when its AUC is
   lower by more than ``max_auc_drop``. Otherwise it is published atomically (``registry.publish``)
   with the optimizer, strategy, generator and RNG states; the running server hot-swaps it.
6. Period t is closed in one transaction (published or not): impressions logged after step 1 move
   to period t+1, the training rows get their ``row`` ids and labels, period t+1 opens.

A crash before step 6 leaves period t open and the previous version serving: nothing is lost.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import math
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from reloop.components import build_loss
from reloop.config import Config, expert_spec
from reloop.data.tensors import PeriodTensors, Stream
from reloop.device import resolve_device
from reloop.engine import RunEngine
from reloop.protocol.metrics import auc
from reloop.serve.events import log_event
from reloop.serve.guard import ErrorLog
from reloop.serve.log import RowCodec, ServeLog
from reloop.serve.registry import ExpertDir, ModelDir, RegistryError, combine_names, composition, expert_pins
from reloop.update.strategies import NoUpdate
from reloop.update.trainer import predict_rows

if TYPE_CHECKING:  # prometheus_client loads only in a running server
    from reloop.serve.metrics import ServiceMetrics

logger = logging.getLogger("reloop.serve.retrain")


@dataclass
class RetrainOptions:
    max_auc_drop: float = 0.01
    holdout: float = 0.1
    label_timeout: float | None = 3600.0
    min_rows: int = 1


@dataclass
class RetrainResult:
    outcome: str  # published | rejected | skipped | busy
    period: int | None
    version: int | None  # the version serving after this call
    reason: str = ""
    n_train: int = 0
    n_holdout: int = 0
    auc_candidate: float | None = None
    auc_serving: float | None = None
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for k in ("auc_candidate", "auc_serving"):
            if out[k] is not None and not math.isfinite(out[k]):
                out[k] = None
        return out


@contextlib.contextmanager
def _exclusive(path: Path) -> Iterator[bool]:
    fh = open(path, "a+")  # noqa: SIM115 - held across the yield
    try:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
    finally:
        fh.close()


def _update_periods(strategy: Any, t: int) -> list[int]:
    name = getattr(strategy, "name", "")
    if name == "incremental":
        return [t]
    if name == "batch":
        return list(range(max(1, t - strategy.window + 1), t + 1))
    if name == "full":
        return list(range(1, t + 1))
    if name == "none":
        return []
    return list(range(1, t + 1))  # replay and others: D_t plus samples of earlier periods


def build_history(
    md: ModelDir, slog: ServeLog, codec: RowCodec, new: dict[str, torch.Tensor] | None, y_last: str
) -> tuple[Stream, torch.Tensor]:
    """The stream of pretraining + closed periods (+ ``new``, the open period's rows) and the logged
    ``served`` prediction per global row (NaN where none was logged)."""
    pre, pre_bounds, fmap = md.pretrain_rows()
    parts = [pre.data]
    bounds = list(pre_bounds)
    n_pre = len(pre)
    served_parts = [torch.full((n_pre,), float("nan"))]
    closed = slog.closed_rows()
    if closed:
        row_ids = np.fromiter((r[0] for r in closed), dtype=np.int64, count=len(closed))
        if not np.array_equal(row_ids, np.arange(n_pre, n_pre + len(closed))):
            raise RuntimeError("log: the row ids of closed periods are not contiguous")
        cols = codec.decode([r[2] for r in closed])
        cols["label"] = torch.tensor([float(r[3]) for r in closed], dtype=torch.float32)
        cols["row"] = torch.from_numpy(row_ids)
        parts.append(cols)
        served_parts.append(
            torch.tensor([r[4] if y_last != "compensated" else r[5] for r in closed], dtype=torch.float32)
        )
        periods = np.fromiter((r[1] for r in closed), dtype=np.int64, count=len(closed))
        change = np.flatnonzero(np.diff(periods)) + 1
        starts = np.r_[0, change]
        ends = np.r_[change, len(periods)]
        expected = len(bounds) + 1
        for s, e in zip(starts, ends):
            if int(periods[s]) != expected:
                raise RuntimeError(f"log: closed periods are not consecutive (expected {expected}, got {periods[s]})")
            bounds.append((n_pre + int(s), n_pre + int(e)))
            expected += 1
    if new is not None:
        n0 = sum(len(next(iter(p.values()))) for p in parts)
        n_new = len(new["label"])
        parts.append({k: v for k, v in new.items() if k != "served"})
        served_parts.append(new["served"])
        bounds.append((n0, n0 + n_new))
    keys = set(parts[0])
    for p in parts[1:]:
        keys &= set(p)
    data = {k: torch.cat([p[k] for p in parts]) for k in sorted(keys)}
    stream = Stream(feature_map=fmap, rows=PeriodTensors(data), bounds=bounds)
    return stream, torch.cat(served_parts)


def retrain(
    model_dir: str | Path,
    options: RetrainOptions | None = None,
    now: float | None = None,
    log: Callable[[str], Any] | None = None,
) -> RetrainResult:
    """One retrain step (see the module docstring). Never raises for "nothing to do": returns a
    result whose ``outcome`` says what happened."""
    options = options or RetrainOptions()
    md = ModelDir(model_dir)
    md.check()
    start_time = time.perf_counter()
    say = log or (lambda *_: None)
    with _exclusive(md.path / "retrain.lock") as got:
        if not got:
            return RetrainResult("busy", None, None, "another retrain holds retrain.lock")
        slog = ServeLog(md.log_path)
        try:
            result = _retrain_locked(md, slog, options, now if now is not None else time.time(), say)
        finally:
            slog.close()
    result.seconds = round(time.perf_counter() - start_time, 3)
    return result


#: A labelled impression of the open period: (impression id, encoded features, label, ŷ base, ŷ served).
_Labelled = tuple[str, bytes, int, float, float]


def _retrain_locked(md: ModelDir, slog: ServeLog, options: RetrainOptions, now: float, say) -> RetrainResult:
    """One retrain step under the lock: the open period's labelled rows (:func:`_labelled_rows`), the
    history rebuilt with them (:func:`_rebuild_period`), then the run's step on its chain, validated and
    published or recorded (:func:`_step_and_publish`; a combine run steps every chain, :func:`_retrain_combine`)."""
    cfg, info = md.config(), md.info()  # read first: a corrupt directory fails even with nothing to train
    run = info["run"]
    version = md.current_version()
    meta_now = md.meta(version)
    t = slog.current_period()
    if t is None:
        return RetrainResult("skipped", None, version, "the log has no open period")
    upto = slog.max_rowid()
    if max(int(meta_now["trained_through"]), int(meta_now.get("set_through", 0))) >= t:
        # A crash between publishing and closing the period: finish the close, train next time.
        slog.close_period(t, upto, [], "repaired", {"reason": f"version {version} already trained on period {t}"}, None)
        return RetrainResult("skipped", t, version, f"period {t} was already trained on (closed it)")

    labelled, waiting = _labelled_rows(slog.period_rows(t, upto), options, now)
    if len(labelled) < max(options.min_rows, 1):
        reason = f"period {t}: {len(labelled)} labelled impressions (< {max(options.min_rows, 1)}), {waiting} awaiting labels"
        slog.record_retrain(t, "skipped", {"reason": reason})
        return RetrainResult("skipped", t, version, reason)

    period, served, first_row = _rebuild_period(md, slog, cfg, info, t, labelled, options, say)
    n_train, n_hold = len(period.train_stream.period(t)), len(period.hold)
    say(
        f"period {t}: {len(labelled)} labelled impressions ({n_train} train, {n_hold} held out), {waiting} awaiting labels"
    )
    rows_ids = [(r[0], first_row + i, r[2]) for i, r in enumerate(labelled)]
    detail: dict[str, Any] = {"n_train": n_train, "n_holdout": n_hold, "waiting": waiting, "parent": version}
    if cfg.runs[run].combine is not None:
        return _retrain_combine(
            md, slog, period, run, version, meta_now, [r[0] for r in labelled], upto, rows_ids, detail
        )
    return _step_and_publish(md, slog, period, run, version, served, upto, rows_ids, detail)


def _labelled_rows(
    rows: list[tuple[str, float, bytes, float, float, int | None, float | None]], options: RetrainOptions, now: float
) -> tuple[list[_Labelled], int]:
    """The open period's impressions that train: labelled ones, and unlabelled ones older than
    ``label_timeout`` (as negatives); and how many still await their label."""
    labelled: list[_Labelled] = []
    waiting = 0
    for imp_id, ts, feats, p_base, p_served, label, _ in rows:
        if label is not None:
            labelled.append((imp_id, feats, int(label), p_base, p_served))
        elif options.label_timeout is not None and now - ts >= options.label_timeout:
            labelled.append((imp_id, feats, 0, p_base, p_served))
        else:
            waiting += 1
    return labelled, waiting


def _rebuild_period(
    md: ModelDir,
    slog: ServeLog,
    cfg: Config,
    info: dict[str, Any],
    t: int,
    labelled: list[_Labelled],
    options: RetrainOptions,
    say: Callable[[str], Any],
) -> tuple[_Period, torch.Tensor, int]:
    """The history of periods 1..t with the open period's ``labelled`` rows appended (the last
    ``holdout`` share held out for validation), on the run's device; ``served`` (the y_last of every row,
    on the CPU) and the global row id of the period's first row."""
    n = len(labelled)
    n_hold = min(int(math.floor(n * options.holdout)) if options.holdout > 0 else 0, n - 1)
    n_train = n - n_hold
    codec = RowCodec(md.feature_map(), with_user=info.get("user") is not None)
    y_last = build_loss(cfg.runs[info["run"]].loss).y_last
    first_row = slog.next_row_id(int(info["pretrain_rows"]))
    new = codec.decode([r[1] for r in labelled])
    new["label"] = torch.tensor([float(r[2]) for r in labelled], dtype=torch.float32)
    new["row"] = torch.arange(first_row, first_row + n, dtype=torch.int64)
    new["served"] = torch.tensor([r[3] if y_last != "compensated" else r[4] for r in labelled], dtype=torch.float32)
    full, served = build_history(md, slog, codec, new, y_last)
    device = resolve_device(cfg.device)
    full = full.to(device)  # one copy of the rebuilt log; ``served`` (y_last per row) stays on the CPU
    if full.n_periods != t:
        raise RuntimeError(f"log: rebuilt {full.n_periods} periods but the open period is {t}")
    if first_row != full.bounds[t - 1][0]:
        raise RuntimeError("log: row ids of the open period do not follow the closed ones")
    train_bounds = full.bounds[:-1] + [(full.bounds[t - 1][0], full.bounds[t - 1][0] + n_train)]
    train_stream = Stream(full.feature_map, full.rows.slice(0, train_bounds[-1][1]), train_bounds)
    hold = full.rows.slice(train_bounds[-1][1], full.bounds[t - 1][1])
    seed, P = int(info.get("seed", 0)), int(info["pretrain_periods"])
    return _Period(cfg, seed, P, t, full, train_stream, hold, options, device, say), served, first_row


def _step_and_publish(
    md: ModelDir,
    slog: ServeLog,
    p: _Period,
    run: str,
    version: int,
    served: torch.Tensor,
    upto: int,
    rows_ids: list[tuple[str, int, int]],
    detail: dict[str, Any],
) -> RetrainResult:
    """A plain run's step (:func:`_train_chain`); its candidate published as the next version, or the
    period closed as rejected / no-update."""
    t = p.t
    n_train, n_hold = len(p.train_stream.period(t)), len(p.hold)
    chain = _train_chain(p, md, run, version, served)
    if chain.outcome == "no-update":
        slog.close_period(t, upto, rows_ids, "no-update", detail, None)
        return RetrainResult("skipped", t, version, "the run's update is 'none'", n_train, n_hold)
    detail.update({"auc_candidate": chain.auc_c, "auc_serving": chain.auc_s, "max_auc_drop": p.options.max_auc_drop})
    if chain.outcome == "rejected":
        slog.close_period(t, upto, rows_ids, "rejected", {**detail, "reason": chain.reason}, None)
        return RetrainResult("rejected", t, version, chain.reason, n_train, n_hold, chain.auc_c, chain.auc_s)
    assert chain.model is not None and chain.candidate is not None and chain.state is not None
    published = md.publish(chain.model, chain.candidate, chain.state, chain.meta)
    slog.close_period(
        t, upto, rows_ids, "published", {**detail, "version": published.number}, (published.number, published.meta)
    )
    p.say(f"published version {published.number} (trained through period {t}){chain.note}")
    return RetrainResult(
        "published", t, published.number, chain.note.strip(" ()"), n_train, n_hold, chain.auc_c, chain.auc_s
    )


@dataclass
class _Period:
    """What every chain of one retrain shares: the rebuilt history of the closed period ``t``."""

    cfg: Any
    seed: int
    P: int
    t: int
    full: Stream
    train_stream: Stream
    hold: PeriodTensors
    options: RetrainOptions
    device: torch.device
    say: Callable[[str], Any]


@dataclass
class _Chain:
    """One chain's step: ``outcome`` published (a version to write) | rejected | no-update."""

    outcome: str
    reason: str = ""
    note: str = ""
    auc_c: float = float("nan")
    auc_s: float = float("nan")
    model: Any = None
    candidate: Any = None
    state: dict[str, Any] | None = None
    meta: dict[str, Any] = field(default_factory=dict)


def _train_chain(p: _Period, chain_md: ModelDir, run: str, version: int, served: torch.Tensor) -> _Chain:
    """One run's period step on its chain (``version`` of ``chain_md``): the generator learns from D_t,
    the engine updates and generates (:class:`RunEngine`, as offline), the candidate is validated on the
    held-out rows. Publishing is the caller's (a combine run writes its experts before its own version)."""
    cfg, t = p.cfg, p.t
    meta_now = chain_md.meta(version)
    spec, offset = expert_spec(cfg, run)  # a combine.replicas expert: the random stream of seed + k
    engine = RunEngine(cfg, spec, p.seed + offset, p.full.feature_map, key_dim=None, device=p.device)
    state = chain_md.load_state(version)
    engine.load_state_dict(state, memory=False)
    base = chain_md.load_base(version).to(p.device)
    serving_now = chain_md.load_serving(version).to(p.device)
    torch.manual_seed(engine.seed * 100003 + t)
    if isinstance(engine.strategy, NoUpdate):
        return _Chain("no-update", "the run's update is 'none'")

    if int(meta_now["trained_through"]) == t - 1 and t - 1 > p.P:
        # A restored generator has its parameters but not the model it generates for: forming
        # Θ*_{t−1} from Θ_{t−1} again (as when period t was served) gives it that template.
        engine.generator.serving_model(base)
        engine.learn(p.full, t, served, base)  # D_t was served by Θ*_{t−1}
    step = engine.step(base, state["optim"], p.train_stream, t, served)
    model, optim_state, candidate = step.model, step.optim_state, step.serving
    candidate.eval()
    if step.guard.reason:
        p.say(f"{run}: guard: {step.guard.reason}; the updated model is the candidate")

    auc_c = auc_s = float("nan")
    n_hold = len(p.hold)
    if n_hold:
        labels = p.hold.data["label"].cpu().numpy()
        batch = cfg.train.eval_batch_size
        auc_c = auc(labels, torch.sigmoid(predict_rows(candidate, p.hold, batch)[0]).numpy())
        auc_s = auc(labels, torch.sigmoid(predict_rows(serving_now, p.hold, batch)[0]).numpy())
    drop = p.options.max_auc_drop
    if math.isfinite(auc_c) and math.isfinite(auc_s) and auc_c < auc_s - drop:
        reason = f"candidate AUC {auc_c:.4f} < serving AUC {auc_s:.4f} − {drop} on {n_hold} held-out rows of period {t}"
        p.say(f"{run}: rejected: {reason}")
        return _Chain("rejected", reason, "", auc_c, auc_s)

    meta = {
        "created": time.time(),
        "trained_through": t,
        "update_periods": _update_periods(engine.strategy, t),
        "serves_period": t + 1,
        "parent": version,
        "composition": composition(cfg, run),
        "model": cfg.model,
        "validation": {
            "auc_candidate": _finite(auc_c),
            "auc_serving": _finite(auc_s),
            "n_holdout": n_hold,
            "max_auc_drop": drop,
            "guard": step.guard.reason,
        },
        "n_train": len(p.train_stream.period(t)),
        "n_holdout": n_hold,
    }
    note = "" if n_hold and math.isfinite(auc_c) else " (validation skipped: held-out rows lack both classes)"
    return _Chain("published", "", note, auc_c, auc_s, model, candidate, engine.version_state(optim_state, run), meta)


def _retrain_combine(
    md: ModelDir,
    slog: ServeLog,
    p: _Period,
    run: str,
    version: int,
    meta_now: dict[str, Any],
    ids: list[str],
    upto: int,
    rows_ids: list[tuple[str, int, int]],
    detail: dict[str, Any],
) -> RetrainResult:
    """A combine run's retrain: every chain (the run's own, then each expert's) takes its step on the same
    closed period with its own logged predictions as ŷ_last; the experts' new versions are published
    first, then one top-level version naming them (its ``CURRENT`` replace switches the whole set)."""
    from reloop.serve.ensemble import COMBINE_DB, CombineLog

    cfg, t = p.cfg, p.t
    names = combine_names(cfg, run)
    pins = expert_pins(meta_now, names[1:], version)
    store = CombineLog(md.path / COMBINE_DB, names)
    n_pre = int(md.info()["pretrain_rows"])
    chains: dict[str, _Chain] = {}
    try:
        for k, name in enumerate(names):
            base, comp = store.served_rows(md.log_path, k, ids)
            y = base if build_loss(expert_spec(cfg, name)[0].loss).y_last != "compensated" else comp
            served = torch.cat([torch.full((n_pre,), float("nan")), y])
            chain_md = md if k == 0 else ExpertDir(md, name)
            chains[name] = _train_chain(p, chain_md, name, version if k == 0 else pins[name], served)
    finally:
        store.close()
    experts: dict[str, Any] = {}
    for name in names[1:]:
        chain = chains[name]
        if chain.outcome == "published":
            assert chain.model is not None and chain.candidate is not None and chain.state is not None
            pins[name] = ExpertDir(md, name).publish(chain.model, chain.candidate, chain.state, chain.meta).number
        experts[name] = {"outcome": chain.outcome, "version": pins[name], "reason": chain.reason or None}
    own = chains[run]
    experts = {run: {"outcome": own.outcome, "reason": own.reason or None}, **experts}
    detail.update({"auc_candidate": own.auc_c, "auc_serving": own.auc_s, "max_auc_drop": p.options.max_auc_drop})
    detail["experts"] = experts
    n_train, n_hold = len(p.train_stream.period(t)), len(p.hold)
    if own.outcome == "published":
        assert own.model is not None and own.candidate is not None and own.state is not None
        model, candidate, state, meta = own.model, own.candidate, own.state, own.meta
    elif any(e["outcome"] == "published" for e in experts.values()):  # the same own models, new experts
        model, candidate, state = md.load_base(version), md.load_serving(version), md.load_state(version)
        meta = {**meta_now, "created": time.time(), "parent": version}
    else:
        rejected = any(e["outcome"] == "rejected" for e in experts.values())
        outcome = "rejected" if rejected else own.outcome
        slog.close_period(t, upto, rows_ids, outcome, {**detail, "reason": own.reason}, None)
        return RetrainResult(
            "rejected" if outcome == "rejected" else "skipped",
            t,
            version,
            own.reason or "no chain published",
            n_train,
            n_hold,
            own.auc_c,
            own.auc_s,
            extra={"experts": experts},
        )
    meta = {**meta, "experts": {n: pins[n] for n in names[1:]}, "set_through": t}
    published = md.publish(model, candidate, state, meta)
    experts[run]["version"] = published.number
    slog.close_period(
        t, upto, rows_ids, "published", {**detail, "version": published.number}, (published.number, published.meta)
    )
    p.say(f"published version {published.number} (set through period {t}: {experts})")
    return RetrainResult(
        "published", t, published.number, own.reason, n_train, n_hold, own.auc_c, own.auc_s, extra={"experts": experts}
    )


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


class RetrainScheduler:
    """Retrains of a running service: every ``every`` accepted feedback events (0: never) in a
    background thread, or on request; at most one at a time in this process (``retrain.lock`` keeps
    other processes out). ``on_published`` runs after a retrain published a version (the service
    swaps to it); ``serving_version`` names the version serving, for failed results."""

    def __init__(
        self,
        model_dir: str | Path,
        options: RetrainOptions | None = None,
        every: int = 0,
        on_published: Callable[[], Any] | None = None,
        serving_version: Callable[[], int | None] | None = None,
        metrics: ServiceMetrics | None = None,
        errors: ErrorLog | None = None,
    ) -> None:
        self.model_dir = Path(model_dir)
        self.options = options or RetrainOptions()
        self.every = every
        self.on_published = on_published
        self.serving_version = serving_version or (lambda: None)
        self.metrics = metrics
        self.errors = errors or ErrorLog()
        self.last: dict[str, Any] | None = None  # the last in-process result
        self._lock = threading.Lock()
        self._since = 0
        self._thread: threading.Thread | None = None

    def running(self) -> bool:
        with self._lock:
            return self._thread is not None and self._thread.is_alive()

    def feedback(self, n: int) -> None:
        """``n`` more feedback events were accepted: start a retrain when ``every`` are due."""
        if not self.every or not n:
            return
        with self._lock:
            self._since += n
            if self._since < self.every:
                return
        if self.start():
            with self._lock:
                self._since = 0

    def start(self) -> bool:
        """Run a retrain in the background; False when one is running."""
        with self._lock:
            if self._thread is not None and self._thread.is_alive():
                return False
            self._thread = threading.Thread(target=self.run, daemon=True, name="reloop-retrain")
            self._thread.start()
            return True

    def run(self) -> RetrainResult:
        """One retrain now, in this thread; never raises (a failure is a ``failed`` result, logged)."""
        try:
            result = retrain(self.model_dir, self.options)
        except RegistryError as e:  # e.g. CURRENT names a broken version: one line, never a crash
            log_event(logger, logging.WARNING, "retrain_failed", reason=str(e))
            result = RetrainResult("failed", None, self.serving_version(), str(e))
        except Exception as e:  # noqa: BLE001 - report, never crash the server
            self.errors.report("retrain", e)
            result = RetrainResult("failed", None, self.serving_version(), f"{type(e).__name__}: {e}"[:500])
        if self.metrics is not None:
            self.metrics.retrains.labels(result.outcome).inc()
        self.last = result.to_dict()
        if result.outcome != "failed":
            log_event(
                logger,
                logging.INFO,
                "retrain",
                outcome=result.outcome,
                period=result.period,
                version=result.version,
                seconds=result.seconds,
                reason=result.reason or None,
            )
        if result.outcome == "published" and self.on_published is not None:
            self.on_published()
        return result
