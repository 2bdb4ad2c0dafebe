"""What the routes of the service do, without HTTP: predict, feedback, reload, retrain, views.

:class:`Service` composes the parts of a running server — the model host (``reloop.serve.host``:
versions, hot swap, compensation, the live encoder), the durable log (``reloop.serve.log``), the record
parser (``reloop.serve.records``: the offline loaders' value rules), the retrain scheduler
(``reloop.serve.retrain.RetrainScheduler``) and the metrics (``reloop.serve.metrics``). It raises domain
exceptions (:class:`BatchTooLarge`, :class:`InvalidRecords`, :class:`NonFinitePrediction`,
``log.UnknownImpressions``, ``registry.VersionError``, :class:`RetrainBusy`); ``reloop.serve.app``
maps them to status codes.

Predict: the records are parsed (a bad value: every problem named ``records[i].field``, the records
quarantined with the reason), encoded (new ids get indices, logged with the impressions), scored by one
version (prediction and memory key from one forward call), compensated by the error memory when the run
has one, and logged — id, encoded features, key ``h``, base and served prediction, model version — in
one durable commit before the answer. Feedback is all-or-nothing (an unknown id raises), idempotent (a
second label for an impression is reported as a duplicate and ignored) and writes ``(h, y, ŷ_base)`` to
the memory.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

import numpy as np
import torch
from anyio.to_thread import run_sync as run_in_threadpool

from reloop.data.encode import FeatureEncoder
from reloop.data.schema import FeatureSchema
from reloop.device import resolve_device
from reloop.memory.compensate import Compensator
from reloop.serve.ensemble import Ensemble
from reloop.serve.guard import ErrorLog, Limits
from reloop.serve.host import ModelHost, Scored, Serving
from reloop.serve.log import FeedbackResult, RowCodec, ServeLog
from reloop.serve.metrics import ServiceMetrics
from reloop.serve.online import OnlineEncoder
from reloop.serve.records import Columns, FieldError, RecordParser, sequence_separators
from reloop.serve.registry import ModelDir, RegistryError, VersionError, composition
from reloop.serve.retrain import RetrainOptions, RetrainResult, RetrainScheduler

MAX_ERRORS_SHOWN = 20
T = TypeVar("T")
R = TypeVar("R")
#: Requests of at most this many rows are worked on the event loop (no threadpool hop: ~0.1 ms of a
#: ~1 ms request at batch 1); larger ones in the threadpool, so a batch of thousands never stalls
#: the loop that reads and answers the other requests.
INLINE_ROWS = 64


class ServiceError(Exception):
    """A request the service refuses; ``field`` names what it is about (``records[3].price``)."""

    field: str = "request"


class BatchTooLarge(ServiceError):
    def __init__(self, field: str, size: int, limit: int) -> None:
        super().__init__(f"{field}: batch of {size} exceeds --max-batch {limit}")
        self.field, self.size, self.limit = field, size, limit


class InvalidRecords(ServiceError):
    """Values that break their feature's rule or a bound: ``errors`` are ``(record, field, problem)``."""

    def __init__(self, errors: list[FieldError], quarantined: int) -> None:
        i, f, m = errors[0]
        super().__init__(f"records[{i}].{f}: {m}")
        self.errors, self.quarantined = errors, quarantined
        self.field = f"records[{i}].{f}"


class NonFinitePrediction(ServiceError):
    MESSAGE = "the model gave a non-finite prediction for this record (extreme numeric values?)"

    def __init__(self, rows: list[int]) -> None:
        super().__init__(self.MESSAGE)
        self.rows = rows
        self.field = f"records[{rows[0]}]"


class RetrainBusy(ServiceError):
    field = "retrain"

    def __init__(self) -> None:
        super().__init__("a retrain is running")


class Coalescer(Generic[T, R]):
    """Runs ``fn`` once for the items of every request that reached :meth:`run` in the same turn of
    its event loop (concurrent requests' reads are handled together), in arrival order, and hands
    each request its own result: ``fn(items) -> results``, one result per item. Work with a large
    fixed cost per call (a forward pass, a memory write) is then paid once per turn, not per request.
    One queue per event loop: each loop's requests are flushed and resumed on that loop (several loops
    in several threads — e.g. ``TestClient`` used from threads — never hand each other results)."""

    def __init__(self, fn: Callable[[list[T]], list[R]]) -> None:
        self.fn = fn
        self._queues: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, list[tuple[T, asyncio.Future[R]]]] = (
            weakref.WeakKeyDictionary()
        )
        self._lock = threading.Lock()

    async def run(self, item: T) -> R:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[R] = loop.create_future()
        with self._lock:
            queue = self._queues.setdefault(loop, [])
            queue.append((item, future))
            first = len(queue) == 1
        if first:
            loop.call_soon(self._flush, loop)  # after the requests already ready in this turn
        return await future

    def _flush(self, loop: asyncio.AbstractEventLoop) -> None:
        with self._lock:
            queue = self._queues.pop(loop, [])
        try:
            results = self.fn([item for item, _ in queue])
        except Exception as e:  # noqa: BLE001 - every request of the turn gets the error
            for _, future in queue:
                if not future.done():
                    future.set_exception(e)
            return
        for (_, future), result in zip(queue, results):
            if not future.done():  # a request whose client went away was cancelled
                future.set_result(result)


@dataclass
class _Impressions:
    """A scored batch, ready for the log."""

    ids: list[str]
    version: int
    features: list[bytes]
    h: list[bytes]
    p_base: list[float]
    p_served: list[float]
    vocab: list[tuple[str, str, int]]  # entries the live encoder assigned, committed with the rows


@dataclass
class _Refused:
    """A batch refused with ``error``; ``items`` — ``(record, reason)`` — go to the quarantine first."""

    error: ServiceError
    items: list[tuple[Any, str]]


class Service:
    """Everything a running server holds; the FastAPI routes (``reloop.serve.app``) are thin wrappers."""

    def __init__(
        self,
        model_dir: str | Path,
        max_batch: int = 4096,
        retrain_every: int = 0,
        retrain_options: RetrainOptions | None = None,
        poll_interval: float = 0.5,
        metrics_window: int = 10000,
        limits: Limits | None = None,
    ) -> None:
        self.md = ModelDir(model_dir)
        self.md.check()
        self.cfg = self.md.config()
        # The model and the error memory live on the config's device (ConfigError naming `device`
        # when it asks for a missing GPU); requests are encoded on the CPU and moved there once.
        self.device = resolve_device(self.cfg.device)
        self.info = self.md.info()
        run = self.info.get("run")
        if not isinstance(run, str) or run not in self.cfg.runs:
            raise RegistryError(f"{self.md.path / 'service.json'}: run {run!r} is not in config.yaml")
        self.run: str = run
        self.spec = self.cfg.runs[run]
        self.max_batch = max_batch
        self.limits = limits or Limits()
        self.metrics = ServiceMetrics(metrics_window)
        self.errors = ErrorLog()
        self.log = ServeLog(self.md.log_path)
        if self.log.current_period() is None:
            raise RegistryError(f"{self.md.log_path}: no open period")
        self.host = ModelHost(self.md, self.cfg, run, self.log, self.device, poll_interval, self.metrics, self.errors)
        # a combine: run serves the Hedge mixture of its experts' models (reloop.serve.ensemble)
        self.ensemble = (
            Ensemble(self.md, self.cfg, run, self.host, self.device, self.errors) if self.spec.combine else None
        )
        self.schema: FeatureSchema = self.host.encoder.schema
        self.parser = RecordParser(self.schema, self.limits, sequence_separators(self.cfg.data))
        self.feature_map = self.md.feature_map()
        self.codec = RowCodec(self.feature_map, with_user=self.schema.user is not None)
        recent = self.log.recent_feedback(metrics_window)
        if recent:
            self.metrics.window.add([r[0] for r in recent], [r[1] for r in recent])
        self.retrainer = RetrainScheduler(
            self.md.path,
            retrain_options,
            retrain_every,
            on_published=self._swap_after_retrain,
            serving_version=lambda: self.host.state.version,
            metrics=self.metrics,
            errors=self.errors,
        )
        # small requests on the event loop share one forward pass / one memory write per loop turn
        self._scoring: Coalescer[tuple[dict[str, torch.Tensor], Serving], Scored] = Coalescer(self._score)
        self._remembering: Coalescer[list[tuple[bytes, int, float, int]], int] = Coalescer(self.host.remember_groups)
        self.started = time.time()

    # -- the host's state, read through (one place holds it) -------------------------------------
    @property
    def state(self) -> Serving:
        return self.host.state

    @property
    def encoder(self) -> FeatureEncoder:
        return self.host.encoder

    @property
    def online(self) -> OnlineEncoder:
        return self.host.online

    @property
    def compensator(self) -> Compensator | None:
        return self.host.compensator

    @property
    def refused(self) -> dict[str, Any] | None:
        return self.host.refused

    @property
    def _key(self) -> str:
        return self.host.key

    @property
    def _pending_vocab(self) -> dict[tuple[str, str], int]:
        return self.host._pending_vocab

    def serving(self) -> Serving:
        return self.host.serving()

    def encode(self, data: Columns, n: int) -> dict[str, torch.Tensor]:
        return self.host.encode(data, n)

    def reload(self) -> tuple[bool, int]:
        """Swap to the version ``CURRENT`` names (``VersionError`` when it is refused)."""
        return self.host.reload()

    # -- predict -------------------------------------------------------------------------------
    def _inline(self, n: int) -> bool:
        """Work on ``n`` rows runs on the event loop itself (no threadpool hop) when it is short: up to
        :data:`INLINE_ROWS` rows and no blocking I/O besides the log's writer thread (a combine run
        commits its experts' predictions itself)."""
        return n <= INLINE_ROWS and self.ensemble is None

    async def predict(self, records: list[dict[str, Any]]) -> dict[str, Any]:
        """Score ``records`` and log them; returns after the commit holding the impressions."""
        if len(records) > self.max_batch:
            raise BatchTooLarge("records", len(records), self.max_batch)
        if self._inline(len(records)):
            out = self._encode_records(records)
            if isinstance(out, tuple):  # encoded: scored together with concurrent requests
                out = self._finish(records, out[0], await self._scoring.run(out))
        else:
            out = await run_in_threadpool(self._score_records, records)
        if isinstance(out, _Refused):
            await asyncio.wrap_future(self.log.submit_quarantine("/predict", out.items))
            self.metrics.quarantined.labels("/predict").inc(len(out.items))
            raise out.error
        if isinstance(out, dict):
            return out
        await asyncio.wrap_future(
            self.log.submit_impressions(out.ids, out.version, out.features, out.h, out.p_base, out.p_served, out.vocab)
        )
        self.host.committed(out.vocab)
        self.metrics.impressions.inc(len(out.ids))
        return {
            "predictions": [{"impression_id": i, "p": p} for i, p in zip(out.ids, out.p_served)],
            "model_version": out.version,
        }

    def _score_records(self, records: list[dict[str, Any]]) -> _Impressions | _Refused | dict[str, Any]:
        """Parse, encode and score ``records`` alone: the rows to log, the refusal (bad values,
        non-finite predictions: the records to quarantine), or the answer to an empty batch."""
        out = self._encode_records(records)
        if not isinstance(out, tuple):
            return out
        return self._finish(records, out[0], self._score([out])[0])

    def _encode_records(
        self, records: list[dict[str, Any]]
    ) -> tuple[dict[str, torch.Tensor], Serving] | _Refused | dict[str, Any]:
        """The encoded tensors and the version to score them with (read once per request), or the
        refusal of a bad value, or the answer to an empty batch."""
        data, errors = self.parser.parse(records)
        if errors:
            bad = sorted({i for i, _, _ in errors})
            reasons = {i: "; ".join(f"{f}: {m}" for j, f, m in errors if j == i) for i in bad}
            return _Refused(InvalidRecords(errors, len(bad)), [(records[i], reasons[i]) for i in bad])
        state = self.serving()
        if not records or data is None:
            return {"predictions": [], "model_version": state.version}
        return self.encode(data, len(records)), state

    def _score(self, batches: Sequence[tuple[dict[str, torch.Tensor], Serving]]) -> list[Scored]:
        """Score encoded batches, those of one version as one batch (one forward, one memory read:
        the fixed per-call cost of both paid once), and split the result back per batch. Rows do
        not interact in a forward pass, so a row's prediction and key are those it gets alone
        (``serve_load.py``'s ``wrong_keys`` checks them bit for bit)."""
        out: list[Scored | None] = [None] * len(batches)
        by_version: dict[int, list[int]] = {}
        for i, (_, state) in enumerate(batches):
            by_version.setdefault(state.version, []).append(i)
        for members in by_version.values():
            state = batches[members[0]][1]
            if len(members) == 1:
                cols = batches[members[0]][0]
            else:
                cols = {k: torch.cat([batches[i][0][k] for i in members]) for k in batches[members[0]][0]}
            scored = self.host.score(cols, state)
            if self.ensemble is not None:
                scored = self.ensemble.score(cols, state, scored)  # p_served: the mixture
            if len(members) == 1:
                out[members[0]] = scored
                continue
            start = 0
            for i in members:
                n = len(batches[i][0]["label"])
                part = slice(start, start + n)
                out[i] = Scored(scored.version, scored.h[part], scored.p_base[part], scored.p_served[part])
                start += n
        return [s for s in out if s is not None]

    def _finish(
        self, records: list[dict[str, Any]], cols: dict[str, torch.Tensor], scored: Scored
    ) -> _Impressions | _Refused:
        """The rows to log for a scored batch (or the refusal of non-finite predictions)."""
        h, p_base, p_served = scored.h, scored.p_base, scored.p_served
        finite = torch.isfinite(p_served) & torch.isfinite(p_base) & torch.isfinite(h).all(dim=1)
        if not bool(finite.all()):
            bad = [int(i) for i in torch.nonzero(~finite).flatten()]
            return _Refused(NonFinitePrediction(bad), [(records[i], NonFinitePrediction.MESSAGE) for i in bad])
        n = len(records)
        raw_ids = os.urandom(16 * n).hex()  # 128 random bits per id, as 32 hex digits
        ids = [raw_ids[i : i + 32] for i in range(0, 32 * n, 32)]
        features = self.codec.encode(cols)
        h_np = np.ascontiguousarray(h.numpy(), dtype=np.float32)
        row_bytes = h_np.shape[1] * 4
        raw = h_np.tobytes()
        h_blobs = [raw[i * row_bytes : (i + 1) * row_bytes] for i in range(n)]
        pb, ps = p_base.tolist(), p_served.tolist()
        if self.ensemble is not None:
            self.ensemble.log(ids, scored, time.time())  # every expert's prediction, before the main log
        return _Impressions(ids, scored.version, features, h_blobs, pb, ps, self.host.take_pending())

    # -- feedback ------------------------------------------------------------------------------
    async def feedback(self, events: Sequence[tuple[str, int]]) -> dict[str, Any]:
        """Log ``(impression id, label)`` events (``UnknownImpressions`` when any id is unknown: none
        is logged) and write the new ones into the error memory. Returns after the durable commit
        (fsync) holding the labels, shared with concurrent requests (``ServeLog.submit``)."""
        if len(events) > self.max_batch:
            raise BatchTooLarge("events", len(events), self.max_batch)
        result = await asyncio.wrap_future(self.log.submit_feedback(list(events)))
        accepted = result.accepted
        rows = [(r.h, y, r.p_base, r.model_version) for r, y in accepted]
        if self._inline(len(accepted)):
            written = await self._remembering.run(rows)  # one memory write with concurrent requests
        else:
            written = await run_in_threadpool(self.host.remember, rows)
        return self._learn(result, written)

    def _learn(self, result: FeedbackResult, written: int) -> dict[str, Any]:
        """Metrics (and a combine run's weights) for the labels just committed and written to the memory."""
        accepted = result.accepted
        if accepted:
            self.metrics.window.add([y for _, y in accepted], [r.p_served for r, _ in accepted])
            self.metrics.feedback.inc(len(accepted))
            if self.ensemble is not None:
                written += self.ensemble.feedback([(r.id, y) for r, y in accepted])
        if result.duplicates:
            self.metrics.duplicates.inc(len(result.duplicates))
        self.retrainer.feedback(len(accepted))
        return {"accepted": len(accepted), "duplicates": result.duplicates, "memory_written": written}

    # -- retraining ----------------------------------------------------------------------------
    def _swap_after_retrain(self) -> None:
        try:
            self.reload()
        except VersionError:
            pass  # logged by the host

    def start_retrain(self) -> bool:
        return self.retrainer.start()

    def run_retrain(self) -> RetrainResult:
        """A retrain now (``RetrainBusy`` when one is running in the background)."""
        if self.retrainer.running():
            raise RetrainBusy()
        return self.retrainer.run()

    @property
    def last_retrain(self) -> dict[str, Any] | None:
        return self.retrainer.last

    # -- read-only views -----------------------------------------------------------------------
    def model_info(self) -> dict[str, Any]:
        state = self.state
        meta = state.meta
        return {
            "model_version": state.version,
            "trained_through": meta.get("trained_through"),
            "update_periods": meta.get("update_periods"),
            "serves_period": meta.get("serves_period"),
            "open_period": self.log.current_period(),
            "created": meta.get("created"),
            "created_iso": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(meta.get("created", 0))),
            "parent": meta.get("parent"),
            "validation": meta.get("validation"),
            "composition": composition(self.cfg, self.run),
            "model": state.model.config(),  # the architecture actually serving
            "device": str(self.device),
            "refused": self.refused,
            "memory": self.host.memory_info(),
            "combine": self.ensemble.info(state) if self.ensemble is not None else None,
            "schema": {"features": [f.name for f in self.schema.features], "user": self.schema.user},
        }

    def render_metrics(self) -> bytes:
        return self.metrics.render(self.compensator.memory if self.compensator is not None else None)

    def close(self) -> None:
        if self.ensemble is not None:
            self.ensemble.close()
        self.log.close()
