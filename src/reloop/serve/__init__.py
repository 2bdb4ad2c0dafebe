"""The online service: predict, feedback, durable log, model registry, retrain and hot swap.

* :mod:`reloop.serve.app` — ``create_app(model_dir)``, the FastAPI app (``reloop serve``): HTTP only
* :mod:`reloop.serve.service` — what the routes do (predict, feedback, retrain, views; domain exceptions)
* :mod:`reloop.serve.host` — the model host: versions, hot swap, compensation, the live encoder
* :mod:`reloop.serve.records` — raw records by the offline loaders' value rules (``reloop.data.values``)
* :mod:`reloop.serve.online` — the live encoder (bounded vocabularies)
* :mod:`reloop.serve.guard` — bounds, admin token, rate limits, unexpected errors (ASGI middleware)
* :mod:`reloop.serve.events` — structured log lines (``event=... key=value``)
* :mod:`reloop.serve.log` — the durable SQLite log (WAL, ``synchronous=FULL``)
* :mod:`reloop.serve.registry` — model versions on disk, atomic publish, bootstrap
* :mod:`reloop.serve.retrain` — close a period, train, validate, publish (``reloop retrain``); the
  service's retrain scheduler
* :mod:`reloop.serve.metrics` — Prometheus metrics
* :mod:`reloop.serve.replay` — ``reloop serve --demo``: replay the synthetic stream over HTTP

Imports are lazy (``reloop.cli`` imports this package; FastAPI loads only when serving).
"""

from __future__ import annotations

from typing import Any

__all__ = ["ModelDir", "RetrainOptions", "ServeLog", "bootstrap", "create_app"]


def __getattr__(name: str) -> Any:
    if name == "create_app":
        from reloop.serve.app import create_app

        return create_app
    if name in ("bootstrap", "ModelDir"):
        from reloop.serve import registry

        return getattr(registry, name)
    if name == "RetrainOptions":
        from reloop.serve.retrain import RetrainOptions

        return RetrainOptions
    if name == "ServeLog":
        from reloop.serve.log import ServeLog

        return ServeLog
    raise AttributeError(name)
