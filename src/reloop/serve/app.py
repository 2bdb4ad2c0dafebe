"""The online service: a FastAPI app around a model directory (``registry``) and its durable log.

``create_app(model_dir)`` serves the version ``CURRENT`` points at::

    POST /predict   {"records": [{feature: value, ...}, ...]}
                 -> {"predictions": [{"impression_id": str, "p": float}], "model_version": int}
    POST /feedback  {"events": [{"impression_id": str, "label": 0|1}]}
                 -> {"accepted": int, "duplicates": [str], "memory_written": int}
    GET  /healthz   -> {"status": "ok", "model_version": int}
    GET  /model     -> version, trained-through / update periods, serving period, run composition, ...
    GET  /metrics   -> Prometheus text (``reloop.serve.metrics``)
    POST /admin/reload            load the version CURRENT names now (the server also polls CURRENT)
    POST /admin/retrain[?wait=1]  run ``reloop.serve.retrain`` in the background (or wait for it)
    GET  /admin/retrain           the last in-process retrain result

Predict: records are raw feature values (the config's schema, user column included; other keys are
ignored). They are validated (a missing feature, a mistyped value, an id over ``Limits.max_id``
characters → 422 naming ``records[i].field``; the records go to the ``quarantine`` table with the
reason), encoded by ``reloop.serve.online`` under a lock (unseen ids get new indices up to each
table's fixed capacity, then hashed overflow buckets — the offline encoder's policy, users included;
the new vocabulary entries are logged with the impressions), scored by the serving model
(``forward_key``: the prediction and the memory's key from one forward call, safe under any
concurrency), compensated by the error memory when the run has one, and logged — id, encoded
features, key ``h``, base and served prediction, model version — in one durable commit *before* the
response. Feedback is all-or-nothing (an unknown id → 404 naming it), idempotent (a second label for
an impression is reported in ``duplicates`` and ignored) and writes ``(h, y, ŷ_base)`` to the memory.

Hot swap: at most every ``poll_interval`` seconds a request stats ``CURRENT``; when it changed a
background thread loads the new version completely, checks its fingerprint (model name and options,
tensor shapes, feature map, memory key and width: ``registry.model_fingerprint``) against the serving
one and only then swaps one reference, so no request ever waits for or fails on a swap. A version
that cannot be read or does not fit is refused (logged once; ``POST /admin/reload`` answers 422 or
409 with the reason; ``/model`` shows it under ``refused``) and the old one keeps serving. At start,
a ``CURRENT`` that cannot be served falls back to the newest earlier version that can (logged). Requests read the reference once and use that model throughout.
The error memory is emptied on a swap when the run's ``memory.reset_on_update`` (default) says so;
feedback for impressions of an older version then no longer reaches it.

Bounds, the admin token, rate limits and error handling live in ``reloop.serve.guard`` (an ASGI
middleware in front of every route); docs/service.md, "Limits and security", lists them.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import polars as pl
import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictInt, StrictStr
from starlette.exceptions import HTTPException as StarletteHTTPException

from reloop.components import build_memory, memory_key, memory_resets_on_update
from reloop.data.schema import FeatureSchema
from reloop.device import resolve_device
from reloop.models.base import CTRModel
from reloop.serve.guard import (
    TOKEN_ENV,
    ErrorLog,
    Guard,
    Limits,
    check_token,
    field_name,
    printable,
    utf8_ok,
)
from reloop.serve.log import USERS_TABLE, RowCodec, ServeLog, UnknownImpressions
from reloop.serve.metrics import CONTENT_TYPE, ServiceMetrics
from reloop.serve.online import OnlineEncoder
from reloop.serve.registry import (
    IncompatibleVersion,
    ModelDir,
    RegistryError,
    VersionError,
    composition,
    fingerprint_diff,
    model_fingerprint,
)
from reloop.serve.retrain import RetrainOptions, RetrainResult, retrain

logger = logging.getLogger("reloop.serve")

ENDPOINTS = {"/predict", "/feedback", "/healthz", "/model", "/metrics", "/admin/reload", "/admin/retrain"}
MAX_IMPRESSION_ID = 128  # characters (ours are 32 hex digits)


# -- request bodies ----------------------------------------------------------------------------
class PredictRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    records: list[dict[str, Any]]


def _integral(value: Any) -> Any:
    """``1.0`` is the integer 1 in JSON Schema (what the OpenAPI document promises); ``true`` is not."""
    return int(value) if type(value) is float and value.is_integer() else value


class FeedbackEvent(BaseModel):
    model_config = ConfigDict(extra="forbid")
    impression_id: Annotated[StrictStr, Field(min_length=1, max_length=MAX_IMPRESSION_ID)]
    label: Annotated[StrictInt, BeforeValidator(_integral), Field(ge=0, le=1)]


class FeedbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    events: list[FeedbackEvent]


class SafeJSONResponse(JSONResponse):
    """JSON with non-ASCII escaped: a name echoed back from a request can never fail to encode."""

    def render(self, content: Any) -> bytes:
        import json

        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode()


class HTTPProblem(Exception):
    def __init__(self, status: int, body: dict[str, Any]) -> None:
        super().__init__(body)
        self.status, self.body = status, body


# -- record validation -------------------------------------------------------------------------
_MISSING = object()


class RecordParser:
    """Raw JSON records -> a typed polars frame in the schema's columns, or per-field errors.

    Ids are at most ``limits.max_id`` characters (an integer id counts its digits), sequences at most
    ``limits.max_sequence`` items, numbers finite with ``|x| <= limits.max_abs_number``.
    """

    def __init__(self, schema: FeatureSchema, limits: Limits | None = None) -> None:
        self.schema = schema
        self.limits = limits or Limits()
        self.columns: list[tuple[str, str]] = [(f.name, f.kind) for f in schema.features]
        if schema.user and schema.user not in {f.name for f in schema.features}:
            self.columns.append((schema.user, "categorical"))

    def parse(self, records: list[dict[str, Any]]) -> tuple[dict[str, list] | None, list[tuple[int, str, str]]]:
        """Validated columns (plain lists: ids as str, numbers as float, sequences as lists of str)
        or the ``(record index, field, problem)`` of every bad value."""
        errors: list[tuple[int, str, str]] = []
        data: dict[str, list] = {}
        max_id, max_abs = self.limits.max_id, self.limits.max_abs_number
        for name, kind in self.columns:
            col = [r.get(name, _MISSING) for r in records]
            if kind == "categorical":
                if not all(type(v) is str and len(v) <= max_id and v.isascii() for v in col):
                    col = self._fix(col, name, errors, self._categorical)
            elif kind == "numeric":
                if not all(type(v) is float and math.isfinite(v) and abs(v) <= max_abs for v in col):
                    col = self._fix(col, name, errors, self._numeric)
            else:
                col = self._fix(col, name, errors, self._sequence)
            data[name] = col
        if errors:
            errors.sort()
            return None, errors
        return data, errors

    def frame(self, data: dict[str, list]) -> pl.DataFrame:
        """The columns as the typed polars frame ``FeatureEncoder.transform`` reads."""
        dtypes = {"categorical": pl.String, "numeric": pl.Float64, "sequence": pl.List(pl.String)}
        out = {name: pl.Series(name, data[name], dtype=dtypes[kind]) for name, kind in self.columns}
        n = len(next(iter(data.values()))) if data else 0
        out[self.schema.label] = pl.Series(self.schema.label, [0] * n, dtype=pl.Int8)
        return pl.DataFrame(out)

    @staticmethod
    def _fix(col: list, name: str, errors: list, check) -> list:
        out: list = []
        for i, v in enumerate(col):
            if v is _MISSING:
                errors.append((i, name, "field required"))
                out.append(None)
                continue
            value, problem = check(v)
            if problem:
                errors.append((i, name, problem))
            out.append(value)
        return out

    def _id(self, v: Any) -> tuple[str | None, str | None]:
        if type(v) is int:
            v = str(v)
        elif type(v) is not str:
            return None, f"expected a string or integer id, got {type(v).__name__}"
        if len(v) > self.limits.max_id:
            return None, f"id of {len(v):,} characters (at most {self.limits.max_id})"
        if not utf8_ok(v):
            return None, "invalid unicode (a lone UTF-16 surrogate)"
        return v, None

    def _categorical(self, v: Any) -> tuple[Any, str | None]:
        if v is None:
            return None, None
        return self._id(v)

    def _numeric(self, v: Any) -> tuple[Any, str | None]:
        if v is None:
            return None, None
        if type(v) in (int, float):
            if not math.isfinite(v) or abs(v) > self.limits.max_abs_number:
                return None, f"expected a finite number with |x| <= {self.limits.max_abs_number:g}"
            return float(v), None
        return None, f"expected a number, got {type(v).__name__} {printable(repr(v))}"[:200]

    def _sequence(self, v: Any) -> tuple[Any, str | None]:
        if v is None:
            return None, None
        if isinstance(v, str):
            v = [s for s in v.split("|") if s]
        elif not isinstance(v, list) or not all(type(x) in (str, int) for x in v):
            return None, "expected a list of string or integer ids"
        if len(v) > self.limits.max_sequence:
            return None, f"sequence of {len(v):,} ids (at most {self.limits.max_sequence})"
        out = []
        for x in v:
            item, problem = self._id(x)
            if problem:
                return None, f"sequence item: {problem}"
            out.append(item)
        return out, None


@dataclass
class Serving:
    version: int
    model: CTRModel
    meta: dict[str, Any]


class Service:
    """Everything a running server holds; the FastAPI routes are thin wrappers around it."""

    def __init__(self, model_dir: str | Path, max_batch: int = 4096, retrain_every: int = 0,
                 retrain_options: RetrainOptions | None = None, poll_interval: float = 0.5,
                 metrics_window: int = 10000, limits: Limits | None = None) -> None:
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
        self.spec = self.cfg.runs[self.run]
        self.max_batch = max_batch
        self.limits = limits or Limits()
        self.retrain_every = retrain_every
        self.retrain_options = retrain_options or RetrainOptions()
        self.poll_interval = poll_interval
        self.metrics = ServiceMetrics(metrics_window)
        self.errors = ErrorLog()
        self.log = ServeLog(self.md.log_path)
        if self.log.current_period() is None:
            raise RegistryError(f"{self.md.log_path}: no open period")

        self._enc_lock = threading.Lock()
        self._mem_lock = threading.Lock()
        self._reload_lock = threading.Lock()
        self._poll_lock = threading.Lock()
        self._retrain_lock = threading.Lock()
        self.encoder = self.md.encoder()
        self._restore_vocab()
        self.schema = self.encoder.schema
        self.online = OnlineEncoder(self.encoder, *self.md.user_capacity()) if self.schema.user else \
            OnlineEncoder(self.encoder, 0, 0)
        self.parser = RecordParser(self.schema, self.limits)
        self.feature_map = self.md.feature_map()
        self.codec = RowCodec(self.feature_map, with_user=self.schema.user is not None)
        self._pending_vocab: dict[tuple[str, str], int] = {}

        self._key = memory_key(self.spec.memory)
        self.fingerprint: dict[str, Any] | None = None
        self.refused: dict[str, Any] | None = None  # the last version CURRENT named that was refused
        self._stamp = self.md.current_stamp()
        self.state = self._startup_version()
        self._next_poll = time.monotonic() + poll_interval
        self._loading = False
        self.compensator = build_memory(self.spec.memory, dim=self.state.model.key_dim(self._key),
                                        seed=int(self.info.get("seed", 0)), device=self.device)
        self.reset_on_update = memory_resets_on_update(self.spec.memory)
        self._rebuild_memory()
        recent = self.log.recent_feedback(metrics_window)
        if recent:
            self.metrics.window.add([r[0] for r in recent], [r[1] for r in recent])
        self.metrics.version.set(self.state.version)
        self._since_retrain = 0
        self._retrain_thread: threading.Thread | None = None
        self.last_retrain: dict[str, Any] | None = None
        self.started = time.time()

    # -- startup -------------------------------------------------------------------------------
    def _load_version(self, version: int) -> Serving:
        """A version, fully loaded and checked against the service (``VersionError`` /
        ``IncompatibleVersion`` with a one-line reason otherwise); nothing in its files is executed."""
        model = self.md.load_serving(version, expect_config=self.cfg.model)
        meta = self.md.meta(version)
        fp = model_fingerprint(model, self._key)
        if self.fingerprint is not None and fp != self.fingerprint:
            raise IncompatibleVersion(version, f"version {version}: another model than the one serving "
                                               f"({fingerprint_diff(fp, self.fingerprint)})")
        memory = (meta.get("composition") or {}).get("memory", self.spec.memory)
        if memory != self.spec.memory:
            raise IncompatibleVersion(version, f"version {version}: made for memory {memory!r}, the service runs "
                                               f"{self.spec.memory!r}")
        if self.fingerprint is None:
            self.fingerprint = fp
        return Serving(version, model.to(self.device).eval(), meta)

    def _startup_version(self) -> Serving:
        """The version ``CURRENT`` names; when it cannot be served, the newest earlier one that can."""
        wanted: int | None = None
        try:
            wanted = self.md.current_version()
            return self._load_version(wanted)
        except VersionError as e:
            problem = str(e)
        except RegistryError as e:  # CURRENT itself is unreadable
            problem = str(e)
        tried = []
        for version in reversed(self.md.list_versions()):
            if wanted is not None and version >= wanted:
                continue
            try:
                state = self._load_version(version)
            except RegistryError as e:
                tried.append(str(e))
                continue
            self.refused = {"version": wanted, "reason": problem}
            self.metrics.refused.inc()
            logger.warning("CURRENT cannot be served (%s); serving version %d, the newest earlier version that "
                           "loads (fix the version or publish a new one)", problem, version)
            return state
        raise RegistryError(f"{self.md.path}: no version can be served: {problem}"
                            + (f"; earlier versions: {'; '.join(tried[:2])}" if tried else "")[:1000])

    def _restore_vocab(self) -> None:
        """Snapshot + every id assigned since (the log's ``vocab`` table), in arrival order."""
        for tbl, ident, idx in self.log.vocab():
            if tbl == USERS_TABLE:
                self.encoder.users.setdefault(ident, idx)
            elif tbl in self.encoder.vocabs:
                self.encoder.vocabs[tbl].index.setdefault(ident, idx)
        for tbl, vocab in self.encoder.vocabs.items():
            values = sorted(vocab.index.values())
            if values and values[-1] != values[0] + len(values) - 1:
                raise RegistryError(f"encoder table {tbl!r}: restored ids are not contiguous")
            vocab.index = dict(sorted(vocab.index.items(), key=lambda kv: kv[1]))
        self.encoder.users = dict(sorted(self.encoder.users.items(), key=lambda kv: kv[1]))

    def _rebuild_memory(self) -> None:
        """Re-write the memory from the log (feedback of the serving version, in arrival order)."""
        if self.compensator is None:
            return
        rows = self.log.feedback_for_version(self.state.version if self.reset_on_update else None, limit=1_000_000)
        d = self.state.model.key_dim(self._key)
        for i in range(0, len(rows), 4096):
            chunk = rows[i:i + 4096]
            h = torch.from_numpy(np.frombuffer(b"".join(r[0] for r in chunk), dtype=np.float32).reshape(-1, d).copy())
            y = torch.tensor([float(r[1]) for r in chunk])
            p = torch.tensor([float(r[2]) for r in chunk])
            self.compensator.feedback(h, y, p)

    # -- hot swap ------------------------------------------------------------------------------
    def serving(self) -> Serving:
        """The model to use for this request (also the cheap, rate-limited poll of ``CURRENT``)."""
        now = time.monotonic()
        if now >= self._next_poll:
            with self._poll_lock:
                if now >= self._next_poll and not self._loading:
                    self._next_poll = now + self.poll_interval
                    if self.md.current_stamp() != self._stamp:
                        self._loading = True
                        threading.Thread(target=self._reload_background, daemon=True,
                                         name="reloop-reload").start()
        return self.state

    def _reload_background(self) -> None:
        try:
            self.reload()
        except VersionError:
            pass  # logged by _refuse; the old version keeps serving until CURRENT changes again
        except Exception as e:  # noqa: BLE001 - a broken version must never take the server down
            self.errors.report("background reload", e)
            self._stamp = self.md.current_stamp()
        finally:
            self._loading = False

    def _refuse(self, stamp: Any, version: int | None, reason: str) -> None:
        self._stamp = stamp  # retried when CURRENT changes again (or on POST /admin/reload)
        refused = {"version": version, "reason": reason}
        if refused != self.refused:
            logger.warning("refused the version CURRENT names: %s; version %d keeps serving", reason,
                           self.state.version)
            self.metrics.refused.inc()
        self.refused = refused

    def reload(self) -> tuple[bool, int]:
        """Load the version ``CURRENT`` names (fully), check it, then swap the reference.

        Returns ``(swapped, version)``; raises ``VersionError`` (``IncompatibleVersion``) with the
        reason when the version is refused — the serving one stays.
        """
        with self._reload_lock:
            stamp = self.md.current_stamp()
            try:
                version = self.md.current_version()
            except RegistryError as e:
                self._refuse(stamp, None, str(e))
                raise VersionError(None, str(e)) from None
            if version == self.state.version:
                self._stamp = stamp
                self.refused = None
                return False, version
            try:
                fresh = self._load_version(version)
            except VersionError as e:
                self._refuse(stamp, version, str(e))
                raise
            with self._mem_lock:
                self.state = fresh
                if self.compensator is not None and self.reset_on_update:
                    self.compensator.memory.reset()
            self._stamp = stamp
            self.refused = None
            self.metrics.version.set(version)
            self.metrics.swaps.inc()
            with self._enc_lock:
                snapshot = self.encoder.state_dict()
            self.md.save_encoder_state(snapshot)
            return True, version

    # -- predict -------------------------------------------------------------------------------
    def encode(self, data: dict[str, list], n: int) -> dict[str, torch.Tensor]:
        """Encoded tensors of validated columns (``OnlineEncoder``: cost independent of the number of
        known ids), under the encoder lock; new vocabulary entries wait in ``_pending_vocab`` for the
        next durable commit of impressions."""
        with self._enc_lock:
            cols, new = self.online.encode(data, n)
            for tbl, ident, idx in new:
                self._pending_vocab[(tbl, ident)] = idx
            return cols

    def _quarantine_records(self, records: list[dict[str, Any]], reasons: dict[int, str]) -> None:
        self.log.quarantine_many("/predict", [(records[i], reasons[i]) for i in sorted(reasons)])
        self.metrics.quarantined.labels("/predict").inc(len(reasons))

    def predict(self, records: list[dict[str, Any]]) -> dict[str, Any]:
        if len(records) > self.max_batch:
            raise HTTPProblem(413, {"detail": f"records: batch of {len(records)} exceeds --max-batch {self.max_batch}",
                                    "field": "records"})
        data, errors = self.parser.parse(records)
        if errors:
            bad = sorted({i for i, _, _ in errors})
            self._quarantine_records(records, {i: "; ".join(f"{f}: {m}" for j, f, m in errors if j == i) for i in bad})
            detail = [{"loc": ["body", "records", i, f], "msg": m, "type": "value_error"} for i, f, m in errors]
            raise HTTPProblem(422, {"detail": detail, "field": f"records[{errors[0][0]}].{errors[0][1]}",
                                    "quarantined": len(bad)})
        state = self.serving()
        if not records or data is None:
            return {"predictions": [], "model_version": state.version}
        cols = self.encode(data, len(records))
        with torch.no_grad():
            batch = cols if self.device.type == "cpu" else {k: v.to(self.device) for k, v in cols.items()}
            # One call gives the prediction and the memory key of exactly these records.
            logits, h = state.model.forward_key(batch, self._key)
            p_base = torch.sigmoid(logits.float())
            h = h.float()
            if self.compensator is not None:
                with self._mem_lock:
                    p_served = self.compensator.predict(h, p_base)
            else:
                p_served = p_base
            h, p_base, p_served = h.cpu(), p_base.cpu(), p_served.cpu()  # one copy back per request
        finite = torch.isfinite(p_served) & torch.isfinite(p_base) & torch.isfinite(h).all(dim=1)
        if not bool(finite.all()):
            bad = [int(i) for i in torch.nonzero(~finite).flatten()]
            msg = "the model gave a non-finite prediction for this record (extreme numeric values?)"
            self._quarantine_records(records, {i: msg for i in bad})
            raise HTTPProblem(422, {"detail": [{"loc": ["body", "records", i], "msg": msg, "type": "value_error"}
                                               for i in bad[:20]], "field": f"records[{bad[0]}]"})
        n = len(records)
        ids = [uuid.uuid4().hex for _ in range(n)]
        features = self.codec.encode(cols)
        h_np = np.ascontiguousarray(h.numpy(), dtype=np.float32)
        row_bytes = h_np.shape[1] * 4
        raw = h_np.tobytes()
        h_blobs = [raw[i * row_bytes:(i + 1) * row_bytes] for i in range(n)]
        pb, ps = p_base.tolist(), p_served.tolist()
        with self._enc_lock:
            pending = dict(self._pending_vocab)
        self.log.write_impressions(ids, state.version, features, h_blobs, pb, ps,
                                   [(t, i, idx) for (t, i), idx in pending.items()])
        if pending:
            with self._enc_lock:
                for key in pending:
                    self._pending_vocab.pop(key, None)
        self.metrics.impressions.inc(n)
        return {"predictions": [{"impression_id": i, "p": p} for i, p in zip(ids, ps)],
                "model_version": state.version}

    # -- feedback ------------------------------------------------------------------------------
    def feedback(self, events: list[FeedbackEvent]) -> dict[str, Any]:
        if len(events) > self.max_batch:
            raise HTTPProblem(413, {"detail": f"events: batch of {len(events)} exceeds --max-batch {self.max_batch}",
                                    "field": "events"})
        try:
            result = self.log.write_feedback([(e.impression_id, e.label) for e in events])
        except UnknownImpressions as e:
            shown = [printable(i) for i in e.ids[:20]]
            raise HTTPProblem(404, {"detail": f"unknown impression id(s): {', '.join(shown)}"
                                              + (f" (+{len(e.ids) - 20} more)" if len(e.ids) > 20 else ""),
                                    "impression_ids": e.ids, "field": "events.impression_id"}) from None
        accepted = result.accepted
        written = 0
        if accepted:
            self.metrics.window.add([y for _, y in accepted], [r.p_served for r, _ in accepted])
            self.metrics.feedback.inc(len(accepted))
            if self.compensator is not None:
                with self._mem_lock:
                    current = self.state.version
                    rows = [(r, y) for r, y in accepted if not self.reset_on_update or r.model_version == current]
                    if rows:
                        d = self.state.model.key_dim(self._key)
                        h = torch.from_numpy(np.frombuffer(b"".join(r.h for r, _ in rows),
                                                           dtype=np.float32).reshape(-1, d).copy())
                        y = torch.tensor([float(yy) for _, yy in rows])
                        p = torch.tensor([r.p_base for r, _ in rows])
                        self.compensator.feedback(h, y, p)
                        written = len(rows)
        if result.duplicates:
            self.metrics.duplicates.inc(len(result.duplicates))
        self._maybe_retrain(len(accepted))
        return {"accepted": len(accepted), "duplicates": result.duplicates, "memory_written": written}

    # -- retraining ----------------------------------------------------------------------------
    def _maybe_retrain(self, n: int) -> None:
        if not self.retrain_every or not n:
            return
        with self._retrain_lock:
            self._since_retrain += n
            if self._since_retrain < self.retrain_every:
                return
        if self.start_retrain():
            with self._retrain_lock:
                self._since_retrain = 0

    def start_retrain(self) -> bool:
        with self._retrain_lock:
            if self._retrain_thread is not None and self._retrain_thread.is_alive():
                return False
            self._retrain_thread = threading.Thread(target=self.run_retrain, daemon=True, name="reloop-retrain")
            self._retrain_thread.start()
            return True

    def run_retrain(self) -> RetrainResult:
        try:
            result = retrain(self.md.path, self.retrain_options)
        except RegistryError as e:  # e.g. CURRENT names a broken version: one line, never a crash
            logger.warning("retrain failed: %s", e)
            result = RetrainResult("failed", None, self.state.version, str(e))
        except Exception as e:  # noqa: BLE001 - report, never crash the server
            self.errors.report("retrain", e)
            result = RetrainResult("failed", None, self.state.version, f"{type(e).__name__}: {e}"[:500])
        self.metrics.retrains.labels(result.outcome).inc()
        self.last_retrain = result.to_dict()
        if result.outcome == "published":
            try:
                self.reload()
            except VersionError:
                pass  # logged by _refuse
        return result

    # -- read-only views -----------------------------------------------------------------------
    def model_info(self) -> dict[str, Any]:
        state = self.state
        meta = state.meta
        return {"model_version": state.version,
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
                "memory": None if self.compensator is None else {
                    "n_written": self.compensator.memory.n_written, "nbytes": self.compensator.memory.nbytes,
                    "reset_on_update": self.reset_on_update},
                "schema": {"features": [f.name for f in self.schema.features], "user": self.schema.user}}

    def render_metrics(self) -> bytes:
        return self.metrics.render(self.compensator.memory if self.compensator is not None else None)

    def close(self) -> None:
        self.log.close()


def admin_token_from_env() -> str | None:
    """``RELOOP_ADMIN_TOKEN`` (empty or unset: no token)."""
    return os.environ.get(TOKEN_ENV) or None


def create_app(model_dir: str | Path, max_batch: int = 4096, retrain_every: int = 0,
               retrain_options: RetrainOptions | None = None, poll_interval: float = 0.5,
               metrics_window: int = 10000, limits: Limits | None = None,
               admin_token: str | None = None, docs_need_token: bool = False) -> FastAPI:
    """The FastAPI app serving ``model_dir`` (see the module docstring).

    ``admin_token``: the bearer token ``/admin/*`` requires (None: ``RELOOP_ADMIN_TOKEN``; empty or
    unset: admin routes answer 403). ``docs_need_token``: ``/docs``, ``/redoc`` and ``/openapi.json`` need it
    too (``reloop serve`` sets it on a non-loopback bind).
    """
    token = check_token((admin_token if admin_token is not None else admin_token_from_env()) or None)
    service = Service(model_dir, max_batch=max_batch, retrain_every=retrain_every,
                      retrain_options=retrain_options, poll_interval=poll_interval, metrics_window=metrics_window,
                      limits=limits)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI):
        yield
        service.close()

    app = FastAPI(title="reloop", description="CTR prediction with feedback, durable log and hot-swapped models",
                  lifespan=lifespan, default_response_class=SafeJSONResponse)
    app.state.service = service
    metrics = service.metrics

    def observe(path: str, status: int, seconds: float) -> None:
        endpoint = path if path in ENDPOINTS else "other"
        metrics.latency.labels(endpoint).observe(seconds)
        metrics.requests.labels(endpoint, str(status)).inc()
        if status >= 500:
            metrics.internal_errors.labels(endpoint).inc()

    def quarantine(path: str, payload: str, reason: str) -> None:
        service.log.quarantine(path, payload, reason)
        metrics.quarantined.labels(path if path in ENDPOINTS else "other").inc()

    app.add_middleware(Guard, limits=service.limits, admin_token=token, docs_need_token=docs_need_token,
                       quarantine=quarantine, observe=observe, errors=service.errors)

    @app.exception_handler(HTTPProblem)
    async def _problem(request: Request, exc: HTTPProblem):
        return SafeJSONResponse(exc.body, status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        field = {404: "path", 405: "method"}.get(exc.status_code, "request")
        return SafeJSONResponse({"detail": exc.detail, "field": field}, status_code=exc.status_code,
                                headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        errors = [{"loc": [p if isinstance(p, int) else printable(str(p)) for p in e.get("loc", ())],
                   "msg": printable(str(e.get("msg", ""))), "type": e.get("type", "")} for e in exc.errors()]
        field = "body" if not errors or errors[0]["type"] == "json_invalid" else field_name(errors[0]["loc"])
        reason = "; ".join(f"{field_name(e['loc'])}: {e['msg']}" for e in errors[:20])
        body = exc.body
        if isinstance(body, (bytes, bytearray)):
            body = body.decode("utf-8", "replace")
        try:
            quarantine(request.url.path, body, reason)
        except sqlite3.Error:
            pass
        return SafeJSONResponse({"detail": errors, "field": field}, status_code=422)

    @app.exception_handler(sqlite3.OperationalError)
    async def _busy(request: Request, exc: sqlite3.OperationalError):
        return SafeJSONResponse({"detail": f"log unavailable: {exc}", "field": None}, status_code=503)

    @app.post("/predict")
    def predict(body: PredictRequest) -> dict[str, Any]:
        return service.predict(body.records)

    @app.post("/feedback")
    def feedback(body: FeedbackRequest) -> dict[str, Any]:
        return service.feedback(body.events)

    @app.get("/healthz")
    def healthz() -> dict[str, Any]:
        return {"status": "ok", "model_version": service.serving().version}

    @app.get("/model")
    def model() -> dict[str, Any]:
        service.serving()
        return service.model_info()

    @app.get("/metrics")
    def prometheus() -> Response:
        return Response(service.render_metrics(), media_type=CONTENT_TYPE)

    @app.post("/admin/reload")
    def reload() -> JSONResponse:
        try:
            swapped, version = service.reload()
        except VersionError as e:
            status = 409 if isinstance(e, IncompatibleVersion) else 422
            return SafeJSONResponse({"detail": str(e), "field": "CURRENT", "refused_version": e.version,
                                     "model_version": service.state.version}, status_code=status)
        return SafeJSONResponse({"swapped": swapped, "model_version": version})

    @app.post("/admin/retrain")
    def admin_retrain(wait: bool = False) -> JSONResponse:
        if wait:
            with service._retrain_lock:
                busy = service._retrain_thread is not None and service._retrain_thread.is_alive()
            if busy:
                return SafeJSONResponse({"started": False, "detail": "a retrain is running", "field": "retrain"},
                                        status_code=409)
            result = service.run_retrain()
            return SafeJSONResponse({**result.to_dict(), "model_version": service.state.version})
        started = service.start_retrain()
        return SafeJSONResponse({"started": started} if started else
                                {"started": False, "detail": "a retrain is running", "field": "retrain"},
                                status_code=202 if started else 409)

    @app.get("/admin/retrain")
    def admin_retrain_status() -> dict[str, Any]:
        running = service._retrain_thread is not None and service._retrain_thread.is_alive()
        return {"running": running, "last": service.last_retrain}

    return app
