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
ignored). They are validated (a missing feature, a mistyped value → 422 naming ``records[i].field``;
the records go to the ``quarantine`` table with the reason), encoded with the persisted encoder
(``grow=True`` under a lock: unseen ids get new indices, past capacity hashed overflow buckets; the
new vocabulary entries are logged with the impressions), scored by the serving model
(``forward_key``: the memory's key), compensated by the error memory when the run has one, and logged — id, encoded
features, ``h``, base and served prediction, model version — in one durable commit *before* the
response. Feedback is all-or-nothing (an unknown id → 404 naming it), idempotent (a second label for
an impression is reported in ``duplicates`` and ignored) and writes ``(h, y, ŷ_base)`` to the memory.

Hot swap: at most every ``poll_interval`` seconds a request stats ``CURRENT``; when it changed a
background thread loads the new version completely and then swaps one reference, so no request ever
waits for or fails on a swap. Requests read the reference once and use that model throughout.
The error memory is emptied on a swap when the run's ``memory.reset_on_update`` (default) says so;
feedback for impressions of an older version then no longer reaches it.
"""
from __future__ import annotations

import contextlib
import math
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
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr

from reloop.components import build_memory, memory_key, memory_resets_on_update
from reloop.data.schema import PAD, FeatureSchema
from reloop.device import resolve_device
from reloop.models.base import CTRModel
from reloop.serve.log import USERS_TABLE, RowCodec, ServeLog, UnknownImpressions
from reloop.serve.metrics import CONTENT_TYPE, ServiceMetrics
from reloop.serve.registry import ModelDir, RegistryError, composition
from reloop.serve.retrain import RetrainOptions, RetrainResult, retrain

ENDPOINTS = {"/predict", "/feedback", "/healthz", "/model", "/metrics", "/admin/reload", "/admin/retrain"}


# -- request bodies ----------------------------------------------------------------------------
class PredictRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    records: list[dict[str, Any]]


class FeedbackEvent(BaseModel):
    model_config = ConfigDict(extra="forbid")
    impression_id: StrictStr
    label: Annotated[StrictInt, Field(ge=0, le=1)]


class FeedbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    events: list[FeedbackEvent]


class HTTPProblem(Exception):
    def __init__(self, status: int, body: dict[str, Any]) -> None:
        super().__init__(body)
        self.status, self.body = status, body


def _field_name(loc: tuple | list) -> str:
    """``("body", "records", 3, "item_id")`` -> ``records[3].item_id``."""
    out = ""
    for part in loc:
        if part == "body" and not out:
            continue
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "body"


# -- record validation -------------------------------------------------------------------------
_MISSING = object()


class RecordParser:
    """Raw JSON records -> a typed polars frame in the schema's columns, or per-field errors."""

    def __init__(self, schema: FeatureSchema) -> None:
        self.schema = schema
        self.columns: list[tuple[str, str]] = [(f.name, f.kind) for f in schema.features]
        if schema.user and schema.user not in {f.name for f in schema.features}:
            self.columns.append((schema.user, "categorical"))

    def parse(self, records: list[dict[str, Any]]) -> tuple[dict[str, list] | None, list[tuple[int, str, str]]]:
        """Validated columns (plain lists: ids as str, numbers as float, sequences as lists of str)
        or the ``(record index, field, problem)`` of every bad value."""
        errors: list[tuple[int, str, str]] = []
        data: dict[str, list] = {}
        for name, kind in self.columns:
            col = [r.get(name, _MISSING) for r in records]
            if kind == "categorical":
                if not all(type(v) is str for v in col):
                    col = self._fix(col, name, errors, self._categorical)
            elif kind == "numeric":
                if not all(type(v) is float and math.isfinite(v) for v in col):
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
        out = []
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

    @staticmethod
    def _categorical(v: Any) -> tuple[Any, str | None]:
        if v is None or type(v) is str:
            return v, None
        if type(v) is int:
            return str(v), None
        return None, f"expected a string or integer id, got {type(v).__name__}"

    @staticmethod
    def _numeric(v: Any) -> tuple[Any, str | None]:
        if v is None:
            return None, None
        if type(v) in (int, float):
            if not math.isfinite(v):
                return None, "expected a finite number"
            return float(v), None
        return None, f"expected a number, got {type(v).__name__} {v!r}"[:200]

    @staticmethod
    def _sequence(v: Any) -> tuple[Any, str | None]:
        if v is None:
            return None, None
        if isinstance(v, str):
            return [s for s in v.split("|") if s], None
        if isinstance(v, list) and all(type(x) in (str, int) for x in v):
            return [str(x) for x in v], None
        return None, "expected a list of string or integer ids"


@dataclass
class Serving:
    version: int
    model: CTRModel
    meta: dict[str, Any]


class Service:
    """Everything a running server holds; the FastAPI routes are thin wrappers around it."""

    def __init__(self, model_dir: str | Path, max_batch: int = 4096, retrain_every: int = 0,
                 retrain_options: RetrainOptions | None = None, poll_interval: float = 0.5,
                 metrics_window: int = 10000) -> None:
        self.md = ModelDir(model_dir)
        self.md.check()
        self.cfg = self.md.config()
        # The model and the error memory live on the config's device (ConfigError naming `device`
        # when it asks for a missing GPU); requests are encoded on the CPU and moved there once.
        self.device = resolve_device(self.cfg.device)
        self.info = self.md.info()
        self.run = self.info["run"]
        self.spec = self.cfg.runs[self.run]
        self.max_batch = max_batch
        self.retrain_every = retrain_every
        self.retrain_options = retrain_options or RetrainOptions()
        self.poll_interval = poll_interval
        self.metrics = ServiceMetrics(metrics_window)
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
        self.parser = RecordParser(self.schema)
        self.feature_map = self.md.feature_map()
        self.codec = RowCodec(self.feature_map, with_user=self.schema.user is not None)
        self._pending_vocab: dict[tuple[str, str], int] = {}

        version = self.md.current_version()
        self.state = Serving(version, self._load_serving(version), self.md.meta(version))
        self._stamp = self.md.current_stamp()
        self._next_poll = time.monotonic() + poll_interval
        self._loading = False
        self._key = memory_key(self.spec.memory)
        self.compensator = build_memory(self.spec.memory, dim=self.state.model.key_dim(self._key),
                                        seed=int(self.info.get("seed", 0)), device=self.device)
        self.reset_on_update = memory_resets_on_update(self.spec.memory)
        self._rebuild_memory()
        recent = self.log.recent_feedback(metrics_window)
        if recent:
            self.metrics.window.add([r[0] for r in recent], [r[1] for r in recent])
        self.metrics.version.set(version)
        self._since_retrain = 0
        self._retrain_thread: threading.Thread | None = None
        self.last_retrain: dict[str, Any] | None = None
        self.started = time.time()

    # -- startup -------------------------------------------------------------------------------
    def _load_serving(self, version: int) -> CTRModel:
        return self.md.load_serving(version).to(self.device).eval()

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
        stamp = self.md.current_stamp()
        try:
            self.reload()
        except Exception as e:  # a broken version must never take the server down
            print(f"reloop serve: could not load the new version: {e}", flush=True)
            self._stamp = stamp  # keep serving the old one; retry when CURRENT changes again
        finally:
            self._loading = False

    def reload(self) -> tuple[bool, int]:
        """Load the version ``CURRENT`` names (fully), then swap the reference. Returns (swapped, version)."""
        with self._reload_lock:
            stamp = self.md.current_stamp()
            version = self.md.current_version()
            if version == self.state.version:
                self._stamp = stamp
                return False, version
            model = self._load_serving(version)
            meta = self.md.meta(version)
            fresh = Serving(version, model, meta)
            with self._mem_lock:
                self.state = fresh
                if self.compensator is not None and self.reset_on_update:
                    self.compensator.memory.reset()
            self._stamp = stamp
            self.metrics.version.set(version)
            self.metrics.swaps.inc()
            with self._enc_lock:
                snapshot = self.encoder.state_dict()
            self.md.save_encoder_state(snapshot)
            return True, version

    # -- predict -------------------------------------------------------------------------------
    def _new_vocab(self, before: dict[str, int], users_before: int) -> None:
        for tbl, n in before.items():
            index = self.encoder.vocabs[tbl].index
            if len(index) > n:
                for ident, idx in list(index.items())[n:]:
                    self._pending_vocab[(tbl, ident)] = idx
        if len(self.encoder.users) > users_before:
            for ident, idx in list(self.encoder.users.items())[users_before:]:
                self._pending_vocab[(USERS_TABLE, ident)] = idx

    def encode(self, data: dict[str, list], n: int) -> dict[str, torch.Tensor]:
        """Encoded tensors of validated columns: ``FeatureEncoder.transform(grow=True)``, under the lock.

        Fast path: when every id of the batch is already in the vocabularies (the common case once
        warm), ``FeatureEncoder.encode_known`` reads the indices with dict look-ups — the same result
        as ``transform`` (tested), without its fixed per-call cost; the offline path uses the same
        function for small batches. Any unseen id takes ``transform`` itself (new ids, overflow).
        """
        with self._enc_lock:
            cols = self.encoder.encode_known(data, n)
            if cols is not None:
                return cols
            before = {t: len(v.index) for t, v in self.encoder.vocabs.items()}
            users_before = len(self.encoder.users)
            cols = self.encoder.transform(self.parser.frame(data), grow=True)
            self._new_vocab(before, users_before)
            return cols

    def predict(self, records: list[dict[str, Any]]) -> dict[str, Any]:
        if len(records) > self.max_batch:
            raise HTTPProblem(413, {"detail": f"records: batch of {len(records)} exceeds --max-batch {self.max_batch}",
                                    "field": "records"})
        data, errors = self.parser.parse(records)
        if errors:
            bad = sorted({i for i, _, _ in errors})
            reasons = {i: "; ".join(f"{f}: {m}" for j, f, m in errors if j == i) for i in bad}
            self.log.quarantine_many("/predict", [(records[i], reasons[i]) for i in bad])
            self.metrics.quarantined.labels("/predict").inc(len(bad))
            detail = [{"loc": ["body", "records", i, f], "msg": m, "type": "value_error"} for i, f, m in errors]
            raise HTTPProblem(422, {"detail": detail, "field": f"records[{errors[0][0]}].{errors[0][1]}",
                                    "quarantined": len(bad)})
        state = self.serving()
        if not records:
            return {"predictions": [], "model_version": state.version}
        cols = self.encode(data, len(records))
        with torch.no_grad():
            batch = cols if self.device.type == "cpu" else {k: v.to(self.device) for k, v in cols.items()}
            logits, h = state.model.forward_key(batch, self._key)
            p_base = torch.sigmoid(logits.float())
            h = h.float()
            if self.compensator is not None:
                with self._mem_lock:
                    p_served = self.compensator.predict(h, p_base)
            else:
                p_served = p_base
            h, p_base, p_served = h.cpu(), p_base.cpu(), p_served.cpu()  # one copy back per request
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
            shown = e.ids[:20]
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
        except Exception as e:  # report, never crash the server
            result = RetrainResult("failed", None, self.state.version, f"{type(e).__name__}: {e}")
        self.metrics.retrains.labels(result.outcome).inc()
        self.last_retrain = result.to_dict()
        if result.outcome == "published":
            try:
                self.reload()
            except Exception as e:
                print(f"reloop serve: could not load version {result.version}: {e}", flush=True)
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
                "model": self.cfg.model,
                "device": str(self.device),
                "memory": None if self.compensator is None else {
                    "n_written": self.compensator.memory.n_written, "nbytes": self.compensator.memory.nbytes,
                    "reset_on_update": self.reset_on_update},
                "schema": {"features": [f.name for f in self.schema.features], "user": self.schema.user}}

    def render_metrics(self) -> bytes:
        return self.metrics.render(self.compensator.memory if self.compensator is not None else None)

    def close(self) -> None:
        self.log.close()


def create_app(model_dir: str | Path, max_batch: int = 4096, retrain_every: int = 0,
               retrain_options: RetrainOptions | None = None, poll_interval: float = 0.5,
               metrics_window: int = 10000) -> FastAPI:
    """The FastAPI app serving ``model_dir`` (see the module docstring)."""
    service = Service(model_dir, max_batch=max_batch, retrain_every=retrain_every,
                      retrain_options=retrain_options, poll_interval=poll_interval, metrics_window=metrics_window)
    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI):
        yield
        service.close()

    app = FastAPI(title="reloop", description="CTR prediction with feedback, durable log and hot-swapped models",
                  lifespan=lifespan)
    app.state.service = service
    metrics = service.metrics

    @app.middleware("http")
    async def _observe(request: Request, call_next):
        start = time.perf_counter()
        endpoint = request.url.path if request.url.path in ENDPOINTS else "other"
        status = 500
        try:
            response = await call_next(request)
            status = response.status_code
            return response
        finally:
            metrics.latency.labels(endpoint).observe(time.perf_counter() - start)
            metrics.requests.labels(endpoint, str(status)).inc()

    @app.exception_handler(HTTPProblem)
    async def _problem(request: Request, exc: HTTPProblem):
        return JSONResponse(exc.body, status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        errors = [{"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
                  for e in exc.errors()]
        field = "body" if not errors or errors[0]["type"] == "json_invalid" else _field_name(errors[0]["loc"])
        reason = "; ".join(f"{_field_name(e['loc'])}: {e['msg']}" for e in errors[:20])
        body = exc.body
        if isinstance(body, (bytes, bytearray)):
            body = body.decode("utf-8", "replace")
        try:
            service.log.quarantine(request.url.path, body, reason)
            metrics.quarantined.labels(request.url.path if request.url.path in ENDPOINTS else "other").inc()
        except sqlite3.Error:
            pass
        return JSONResponse({"detail": errors, "field": field}, status_code=422)

    @app.exception_handler(sqlite3.OperationalError)
    async def _busy(request: Request, exc: sqlite3.OperationalError):
        return JSONResponse({"detail": f"log unavailable: {exc}"}, status_code=503)

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
    def reload() -> dict[str, Any]:
        swapped, version = service.reload()
        return {"swapped": swapped, "model_version": version}

    @app.post("/admin/retrain")
    def admin_retrain(wait: bool = False) -> JSONResponse:
        if wait:
            with service._retrain_lock:
                busy = service._retrain_thread is not None and service._retrain_thread.is_alive()
            if busy:
                return JSONResponse({"started": False, "detail": "a retrain is running"}, status_code=409)
            result = service.run_retrain()
            return JSONResponse({**result.to_dict(), "model_version": service.state.version})
        started = service.start_retrain()
        return JSONResponse({"started": started}, status_code=202 if started else 409)

    @app.get("/admin/retrain")
    def admin_retrain_status() -> dict[str, Any]:
        running = service._retrain_thread is not None and service._retrain_thread.is_alive()
        return {"running": running, "last": service.last_retrain}

    return app
