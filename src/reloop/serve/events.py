"""Structured log lines of the service: one line per event, ``event=<name>`` then ``key=value`` fields.

    >>> format_event("version_refused", version=2, reason="version 2: truncated file", serving=1)
    'event=version_refused version=2 reason="version 2: truncated file" serving=1'

A value with a space, a quote, an ``=`` or a character outside printable ASCII is written as a JSON
string (so every line stays one line and splits on spaces outside quotes); None is ``-``. A value is
cut at :data:`MAX_VALUE` characters.
"""

from __future__ import annotations

import json
import logging
from typing import Any

MAX_VALUE = 500
_PLAIN = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-.:/,+[]()<>")


def _value(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.6g}"
    text = str(v)[:MAX_VALUE]
    if text and all(c in _PLAIN for c in text):
        return text
    return json.dumps(text, ensure_ascii=True)


def format_event(event: str, **fields: Any) -> str:
    """``event=<event> k=v ...`` (see the module docstring)."""
    return " ".join([f"event={event}", *(f"{k}={_value(v)}" for k, v in fields.items())])


def log_event(logger: logging.Logger, level: int, event: str, *, exc_info: Any = None, **fields: Any) -> None:
    """Log one structured line (``exc_info``: a traceback after it, for the first error of a kind only)."""
    if logger.isEnabledFor(level):
        logger.log(level, "%s", format_event(event, **fields), exc_info=exc_info)
