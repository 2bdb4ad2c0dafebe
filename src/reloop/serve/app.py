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

Layers: this module is the HTTP layer only — request and response schemas, status codes, exception
handlers and the routes. What the routes do lives below it: ``reloop.serve.service.Service`` (predict,
feedback, retrain, views; domain exceptions), ``reloop.serve.host.ModelHost`` (versions, hot swap,
compensation, memory rebuild, vocabulary restore), ``reloop.serve.records`` (raw values by the offline
loaders' rules, ``reloop.data.values``), ``reloop.serve.log`` (the durable log),
``reloop.serve.retrain.RetrainScheduler`` and ``reloop.serve.metrics``. Bounds, the admin token, rate
limits and unexpected errors are ``reloop.serve.guard`` (an ASGI middleware in front of every route);
docs/service.md, "Limits and security", lists them.

Status codes: a batch over ``--max-batch`` 413; a value that breaks its feature's rule or a bound 422
naming ``records[i].field`` (the records quarantined); a non-finite prediction 422; an unknown
impression id 404 (nothing of the batch logged); a refused version on ``POST /admin/reload`` 422
(unreadable) or 409 (another model); a retrain already running 409; the log busy 503.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Annotated, Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictInt, StrictStr, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from reloop.serve.guard import (
    JSON_SCOPE_KEY,
    TOKEN_ENV,
    Guard,
    Limits,
    check_token,
    field_name,
    printable,
)
from reloop.serve.log import UnknownImpressions
from reloop.serve.metrics import CONTENT_TYPE
from reloop.serve.records import RecordParser  # noqa: F401 - re-exported: the service's record parser
from reloop.serve.registry import IncompatibleVersion, VersionError
from reloop.serve.retrain import RetrainOptions
from reloop.serve.service import (
    MAX_ERRORS_SHOWN,
    BatchTooLarge,
    InvalidRecords,
    NonFinitePrediction,
    RetrainBusy,
    Service,
)

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


BODY_MODELS: tuple[type[BaseModel], ...] = (PredictRequest, FeedbackRequest)


def _body_doc(model: type[BaseModel]) -> dict[str, Any]:
    """The OpenAPI ``requestBody`` of a route that reads ``model`` itself (:func:`_body`)."""
    ref = {"$ref": f"#/components/schemas/{model.__name__}"}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": ref}}}}


def _body_schemas() -> dict[str, Any]:
    """JSON schemas of the request bodies (and the models they nest), for the OpenAPI components."""
    out: dict[str, Any] = {}
    for model in BODY_MODELS:
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        out.update(schema.pop("$defs", {}))
        out[model.__name__] = schema
    return out


def _plain_event(e: Any) -> bool:
    return (
        type(e) is dict
        and len(e) == 2
        and type(e.get("impression_id")) is str
        and 0 < len(e["impression_id"]) <= MAX_IMPRESSION_ID
        and type(e.get("label")) is int
        and e["label"] in (0, 1)
    )


def _body(request: Request, model: type[BaseModel]) -> dict[str, Any]:
    """The body the guard parsed (``JSON_SCOPE_KEY``), checked against ``model``.

    A body of the plain shape (only the model's keys, records as objects, events with a string id and
    a 0/1 integer label) passes at once; any other goes through the pydantic model, whose errors are a
    ``RequestValidationError`` located in ``body`` — the 422 FastAPI gives for a body parameter.
    """
    value = request.scope.get(JSON_SCOPE_KEY)
    if type(value) is dict:
        if model is PredictRequest:
            records = value.get("records")
            if len(value) == 1 and type(records) is list and (not records or set(map(type, records)) == {dict}):
                return value
        else:
            events = value.get("events")
            if len(value) == 1 and type(events) is list and all(_plain_event(e) for e in events):
                return value
    try:
        checked = model.model_validate(value)
    except ValidationError as e:
        errors = [{**err, "loc": ("body", *err["loc"])} for err in e.errors(include_url=False)]
        raise RequestValidationError(errors, body=value) from None
    return checked.model_dump()


class SafeJSONResponse(JSONResponse):
    """JSON with non-ASCII escaped: a name echoed back from a request can never fail to encode."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode()


def admin_token_from_env() -> str | None:
    """``RELOOP_ADMIN_TOKEN`` (empty or unset: no token)."""
    return os.environ.get(TOKEN_ENV) or None


def _unknown_ids_body(e: UnknownImpressions) -> dict[str, Any]:
    shown = [printable(i) for i in e.ids[:MAX_ERRORS_SHOWN]]
    more = f" (+{len(e.ids) - MAX_ERRORS_SHOWN} more)" if len(e.ids) > MAX_ERRORS_SHOWN else ""
    return {
        "detail": f"unknown impression id(s): {', '.join(shown)}{more}",
        "impression_ids": e.ids,
        "field": "events.impression_id",
    }


def create_app(
    model_dir: str | Path,
    max_batch: int = 4096,
    retrain_every: int = 0,
    retrain_options: RetrainOptions | None = None,
    poll_interval: float = 0.5,
    metrics_window: int = 10000,
    limits: Limits | None = None,
    admin_token: str | None = None,
    docs_need_token: bool = False,
) -> FastAPI:
    """The FastAPI app serving ``model_dir`` (see the module docstring).

    ``admin_token``: the bearer token ``/admin/*`` requires (None: ``RELOOP_ADMIN_TOKEN``; empty or
    unset: admin routes answer 403). ``docs_need_token``: ``/docs``, ``/redoc`` and ``/openapi.json`` need it
    too (``reloop serve`` sets it on a non-loopback bind).
    """
    token = check_token((admin_token if admin_token is not None else admin_token_from_env()) or None)
    service = Service(
        model_dir,
        max_batch=max_batch,
        retrain_every=retrain_every,
        retrain_options=retrain_options,
        poll_interval=poll_interval,
        metrics_window=metrics_window,
        limits=limits,
    )

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        service.close()

    app = FastAPI(
        title="reloop",
        description="CTR prediction with feedback, durable log and hot-swapped models",
        lifespan=lifespan,
        default_response_class=SafeJSONResponse,
    )
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

    app.add_middleware(
        Guard,
        limits=service.limits,
        admin_token=token,
        docs_need_token=docs_need_token,
        quarantine=quarantine,
        observe=observe,
        errors=service.errors,
    )

    # -- domain exceptions -> status codes ---------------------------------------------------------
    @app.exception_handler(BatchTooLarge)
    async def _too_large(request: Request, exc: BatchTooLarge) -> SafeJSONResponse:
        return SafeJSONResponse({"detail": str(exc), "field": exc.field}, status_code=413)

    @app.exception_handler(InvalidRecords)
    async def _invalid_records(request: Request, exc: InvalidRecords) -> SafeJSONResponse:
        detail = [{"loc": ["body", "records", i, f], "msg": m, "type": "value_error"} for i, f, m in exc.errors]
        return SafeJSONResponse({"detail": detail, "field": exc.field, "quarantined": exc.quarantined}, status_code=422)

    @app.exception_handler(NonFinitePrediction)
    async def _non_finite(request: Request, exc: NonFinitePrediction) -> SafeJSONResponse:
        detail = [
            {"loc": ["body", "records", i], "msg": str(exc), "type": "value_error"} for i in exc.rows[:MAX_ERRORS_SHOWN]
        ]
        return SafeJSONResponse({"detail": detail, "field": exc.field}, status_code=422)

    @app.exception_handler(UnknownImpressions)
    async def _unknown(request: Request, exc: UnknownImpressions) -> SafeJSONResponse:
        return SafeJSONResponse(_unknown_ids_body(exc), status_code=404)

    @app.exception_handler(VersionError)
    async def _refused(request: Request, exc: VersionError) -> SafeJSONResponse:
        status = 409 if isinstance(exc, IncompatibleVersion) else 422
        return SafeJSONResponse(
            {
                "detail": str(exc),
                "field": "CURRENT",
                "refused_version": exc.version,
                "model_version": service.state.version,
            },
            status_code=status,
        )

    @app.exception_handler(RetrainBusy)
    async def _busy_retrain(request: Request, exc: RetrainBusy) -> SafeJSONResponse:
        return SafeJSONResponse({"started": False, "detail": str(exc), "field": exc.field}, status_code=409)

    @app.exception_handler(sqlite3.OperationalError)
    async def _busy(request: Request, exc: sqlite3.OperationalError) -> SafeJSONResponse:
        return SafeJSONResponse({"detail": f"log unavailable: {exc}", "field": None}, status_code=503)

    # -- framework errors ------------------------------------------------------------------------
    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> SafeJSONResponse:
        field = {404: "path", 405: "method"}.get(exc.status_code, "request")
        return SafeJSONResponse(
            {"detail": exc.detail, "field": field}, status_code=exc.status_code, headers=getattr(exc, "headers", None)
        )

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> SafeJSONResponse:
        errors = [
            {
                "loc": [p if isinstance(p, int) else printable(str(p)) for p in e.get("loc", ())],
                "msg": printable(str(e.get("msg", ""))),
                "type": e.get("type", ""),
            }
            for e in exc.errors()
        ]
        field = "body" if not errors or errors[0]["type"] == "json_invalid" else field_name(errors[0]["loc"])
        reason = "; ".join(f"{field_name(e['loc'])}: {e['msg']}" for e in errors[:MAX_ERRORS_SHOWN])
        body = exc.body
        if isinstance(body, (bytes, bytearray)):
            body = body.decode("utf-8", "replace")
        path = request.url.path
        with contextlib.suppress(sqlite3.Error):
            await asyncio.wrap_future(service.log.submit_quarantine(path, [(body, reason)]))
            metrics.quarantined.labels(path if path in ENDPOINTS else "other").inc()
        return SafeJSONResponse({"detail": errors, "field": field}, status_code=422)

    # -- routes ----------------------------------------------------------------------------------
    # /predict and /feedback are async and read the body the guard parsed (no second parse, no
    # threadpool hop for small batches: Service runs them on the loop, the log commits in its
    # writer thread); their request schemas are added to the OpenAPI document below.
    @app.post("/predict", openapi_extra=_body_doc(PredictRequest))
    async def predict(request: Request) -> SafeJSONResponse:
        value = _body(request, PredictRequest)
        return SafeJSONResponse(await service.predict(value["records"]))

    @app.post("/feedback", openapi_extra=_body_doc(FeedbackRequest))
    async def feedback(request: Request) -> SafeJSONResponse:
        value = _body(request, FeedbackRequest)
        events = [(e["impression_id"], int(e["label"])) for e in value["events"]]
        return SafeJSONResponse(await service.feedback(events))

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
        swapped, version = service.reload()
        return SafeJSONResponse({"swapped": swapped, "model_version": version})

    @app.post("/admin/retrain")
    def admin_retrain(wait: bool = False) -> JSONResponse:
        if wait:
            result = service.run_retrain()
            return SafeJSONResponse({**result.to_dict(), "model_version": service.state.version})
        if not service.start_retrain():
            raise RetrainBusy()
        return SafeJSONResponse({"started": True}, status_code=202)

    @app.get("/admin/retrain")
    def admin_retrain_status() -> dict[str, Any]:
        return {"running": service.retrainer.running(), "last": service.last_retrain}

    default_openapi = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = default_openapi()
            schema.setdefault("components", {}).setdefault("schemas", {}).update(_body_schemas())
        return app.openapi_schema  # type: ignore[return-value]

    app.openapi = openapi  # type: ignore[method-assign]
    return app
