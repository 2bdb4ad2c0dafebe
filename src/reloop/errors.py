"""The package's exceptions and their one error formatter (the leaf of the import graph: imports nothing
of reloop's).

Every configuration problem is a :class:`ConfigError` whose message starts with the offending key's
dotted path (``runs.IU.update.batch: expected ...``), so a user can find it in the YAML.
"""

from __future__ import annotations

from pydantic import ValidationError


class ConfigError(ValueError):
    """A configuration problem, always naming the offending key."""


def format_errors(err: ValidationError, prefix: str = "") -> str:
    """One ``<prefix><dotted.key>: <message>`` per pydantic error, joined by ``; ``.

    ``prefix`` roots the paths (``"model."``, ``"memory."``); an error without a location is reported
    against the prefix itself (or ``config``).
    """
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"] if not str(p).startswith("function-"))
        msg = e["msg"].removeprefix("Value error, ")
        lines.append(f"{prefix}{loc}: {msg}" if loc else f"{prefix.rstrip('.') or 'config'}: {msg}")
    return "; ".join(lines)
