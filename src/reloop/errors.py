"""The package's exceptions and their one error formatter (the leaf of the import graph: imports nothing
of reloop's).

Every configuration problem is a :class:`ConfigError` whose message starts with the offending key's
dotted path (``runs.IU.update.batch: expected ...``), so a user can find it in the YAML.
"""

from __future__ import annotations

from pydantic import ValidationError


class ConfigError(ValueError):
    """A configuration problem, always naming the offending key."""


def problems_of(err: ValidationError) -> list[tuple[str, str]]:
    """``(dotted key, message)`` per problem of a pydantic error.

    A component slot (``reloop.registry.Registry.slot``) reports its problems in the error's context
    (``problems``: paths inside the slot), so ``runs.IU.update`` + ``replay.ratio`` is one dotted key.
    """
    out: list[tuple[str, str]] = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"] if not str(p).startswith("function-"))
        inner = (e.get("ctx") or {}).get("problems")
        if inner:
            out += [(".".join(p for p in (loc, path) if p), msg) for path, msg in inner]
        else:
            out.append((loc, e["msg"].removeprefix("Value error, ")))
    return out


def format_errors(err: ValidationError, prefix: str = "") -> str:
    """One ``<prefix><dotted.key>: <message>`` per pydantic error, joined by ``; ``.

    ``prefix`` roots the paths (``"model."``, ``"memory."``); an error without a location is reported
    against the prefix itself (or ``config``).
    """
    lines = []
    for loc, msg in problems_of(err):
        lines.append(f"{prefix}{loc}: {msg}" if loc else f"{prefix.rstrip('.') or 'config'}: {msg}")
    return "; ".join(lines)
