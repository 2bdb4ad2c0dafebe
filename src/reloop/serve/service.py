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

import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from reloop.data.encode import FeatureEncoder
from reloop.data.schema import FeatureSchema
from reloop.device import resolve_device
from reloop.memory.compensate import Compensator
from reloop.serve.guard import ErrorLog, Limits
from reloop.serve.host import ModelHost, Serving
from reloop.serve.log import RowCodec, ServeLog
from reloop.serve.metrics import ServiceMetrics
from reloop.serve.online import OnlineEncoder
from reloop.serve.records import Columns, FieldError, RecordParser, sequence_separators
from reloop.serve.registry import ModelDir, RegistryError, VersionError, composition
from reloop.serve.retrain import RetrainOptions, RetrainResult, RetrainScheduler

MAX_ERRORS_SHOWN = 20


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
    def _quarantine_records(self, records: list[dict[str, Any]], reasons: dict[int, str]) -> None:
        self.log.quarantine_many("/predict", [(records[i], reasons[i]) for i in sorted(reasons)])
        self.metrics.quarantined.labels("/predict").inc(len(reasons))

    def predict(self, records: list[dict[str, Any]]) -> dict[str, Any]:
        if len(records) > self.max_batch:
            raise BatchTooLarge("records", len(records), self.max_batch)
        data, errors = self.parser.parse(records)
        if errors:
            bad = sorted({i for i, _, _ in errors})
            self._quarantine_records(records, {i: "; ".join(f"{f}: {m}" for j, f, m in errors if j == i) for i in bad})
            raise InvalidRecords(errors, len(bad))
        state = self.serving()
        if not records or data is None:
            return {"predictions": [], "model_version": state.version}
        cols = self.encode(data, len(records))
        scored = self.host.score(cols, state)
        h, p_base, p_served = scored.h, scored.p_base, scored.p_served
        finite = torch.isfinite(p_served) & torch.isfinite(p_base) & torch.isfinite(h).all(dim=1)
        if not bool(finite.all()):
            bad = [int(i) for i in torch.nonzero(~finite).flatten()]
            self._quarantine_records(records, {i: NonFinitePrediction.MESSAGE for i in bad})
            raise NonFinitePrediction(bad)
        n = len(records)
        ids = [uuid.uuid4().hex for _ in range(n)]
        features = self.codec.encode(cols)
        h_np = np.ascontiguousarray(h.numpy(), dtype=np.float32)
        row_bytes = h_np.shape[1] * 4
        raw = h_np.tobytes()
        h_blobs = [raw[i * row_bytes : (i + 1) * row_bytes] for i in range(n)]
        pb, ps = p_base.tolist(), p_served.tolist()
        pending = self.host.take_pending()
        self.log.write_impressions(ids, scored.version, features, h_blobs, pb, ps, pending)
        self.host.committed(pending)
        self.metrics.impressions.inc(n)
        return {"predictions": [{"impression_id": i, "p": p} for i, p in zip(ids, ps)], "model_version": scored.version}

    # -- feedback ------------------------------------------------------------------------------
    def feedback(self, events: Sequence[tuple[str, int]]) -> dict[str, Any]:
        """Log ``(impression id, label)`` events (``UnknownImpressions`` when any id is unknown: none
        is logged) and write the new ones into the error memory."""
        if len(events) > self.max_batch:
            raise BatchTooLarge("events", len(events), self.max_batch)
        result = self.log.write_feedback(list(events))
        accepted = result.accepted
        written = 0
        if accepted:
            self.metrics.window.add([y for _, y in accepted], [r.p_served for r, _ in accepted])
            self.metrics.feedback.inc(len(accepted))
            written = self.host.remember([(r.h, y, r.p_base, r.model_version) for r, y in accepted])
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
            "schema": {"features": [f.name for f in self.schema.features], "user": self.schema.user},
        }

    def render_metrics(self) -> bytes:
        return self.metrics.render(self.compensator.memory if self.compensator is not None else None)

    def close(self) -> None:
        self.log.close()
