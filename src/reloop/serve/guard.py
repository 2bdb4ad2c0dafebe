"""What stands between the network and the service: bounds, the admin token, rate limits, errors.

:class:`Guard` is a plain ASGI middleware around the FastAPI app (one per app, see ``create_app``):

* **Body**: a ``Content-Length`` above ``Limits.max_body_bytes`` is refused at once (413), a body that
  grows past it while being read too (chunked uploads); a body not complete within
  ``Limits.body_timeout`` seconds (e.g. a ``Content-Length`` longer than what is sent) is answered 408
  instead of holding the connection.
* **JSON** (``/predict``, ``/feedback``): the body is parsed here whatever its ``Content-Type`` (the
  quick-start ``curl -d`` sends ``application/x-www-form-urlencoded``) and checked before any route sees
  it: no ``NaN`` / ``Infinity`` (not JSON), nesting at most ``max_depth`` levels, strings at most
  ``max_string`` characters, no lone UTF-16 surrogate (``"\\ud800"``: valid JSON, but no UTF-8
  encoding exists, so SQLite and polars fail on it). Problems are 422 naming the field
  (``records[3].user_id``), the raw body quarantined.
* **Admin** (``/admin/*``, and ``/docs``, ``/redoc``, ``/openapi.json`` when ``docs_need_token``): a
  token bucket per client address (``admin_burst`` requests at once, refilled at ``admin_per_minute``;
  429 with ``Retry-After`` beyond), then ``Authorization: Bearer <token>`` compared in constant time
  (401 when missing or wrong; 403 when the server has no token, i.e. admin routes are off).
* **Errors**: an exception no route handled becomes a 500 ``{"detail": "internal error", ...}``; it is
  logged through ``logging`` by :class:`ErrorLog` — the traceback once per kind of error, then at most
  one line per kind every minute with the count — never a traceback per request.
"""

from __future__ import annotations

import asyncio
import hmac
import itertools
import json
import logging
import re
import threading
import time
import traceback
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from reloop.serve.events import log_event

logger = logging.getLogger("reloop.serve")

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

JSON_ROUTES = frozenset({"/predict", "/feedback"})
JSON_SCOPE_KEY = "reloop.json"  # the parsed body of a JSON route, checked by the guard
DOCS_ROUTES = frozenset({"/docs", "/redoc", "/openapi.json", "/docs/oauth2-redirect"})
TOKEN_ENV = "RELOOP_ADMIN_TOKEN"
MIN_TOKEN_LENGTH = 16


@dataclass(frozen=True)
class Limits:
    """Bounds of one request (defaults: ``reloop serve``'s; docs/service.md, "Limits and security").

    ``max_batch`` (records or events per request) is a separate option of its own (``--max-batch``).
    """

    max_body_bytes: int = 8 * 2**20
    body_timeout: float = 10.0
    max_depth: int = 32
    max_string: int = 16384  # any JSON string or key
    max_id: int = 256  # one id: a categorical value, a sequence item, an impression id
    max_sequence: int = 1024  # items of one sequence value
    max_abs_number: float = 1e30  # |numeric feature|
    admin_per_minute: float = 30.0
    admin_burst: int = 10


# -- JSON checks ---------------------------------------------------------------------------------
# a surrogate escape, or a surrogate's UTF-8 bytes (``json.loads`` of bytes decodes with surrogatepass)
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]|\xed[\xa0-\xbf]")


def field_name(loc: tuple | list) -> str:
    """``("body", "records", 3, "item_id")`` -> ``records[3].item_id``."""
    out = ""
    for part in loc:
        if part == "body" and not out:
            continue
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + printable(str(part))
    return out or "body"


def printable(text: str) -> str:
    """``text`` with anything UTF-8 cannot encode (lone surrogates) as backslash escapes."""
    if text.isascii():
        return text
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def utf8_ok(text: str) -> bool:
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def check_json(value: Any, body: bytes, limits: Limits) -> tuple[tuple, str] | None:
    """``(location, problem)`` of the first value of a parsed body breaking a bound, else None.

    Walks the document only when a cheap look at the raw bytes says it could break one (deeper than
    allowed, a string longer than allowed, a surrogate escape).
    """
    if not may_break_bounds(value, body, limits):
        return None
    stack: list[tuple[Any, tuple, int]] = [(value, (), 0)]
    while stack:
        v, loc, depth = stack.pop()
        if isinstance(v, str):
            problem = _string_problem(v, limits.max_string)
            if problem:
                return loc, problem
        elif isinstance(v, (dict, list)):
            if depth >= limits.max_depth:
                return loc, f"nested deeper than {limits.max_depth} levels"
            if isinstance(v, dict):
                items = list(v.items())
                for k, _ in items:
                    problem = _string_problem(k, limits.max_string)
                    if problem:
                        return loc + (k,), f"key: {problem}"
            else:
                items = list(enumerate(v))
            stack.extend((x, loc + (k,), depth + 1) for k, x in reversed(items))
    return None


def may_break_bounds(value: Any, body: bytes, limits: Limits) -> bool:
    """False when a cheap look shows that no value of a parsed JSON body breaks a bound: no surrogate
    (escaped or raw) in the bytes, no string token longer than ``max_string`` bytes, at most
    ``max_depth`` levels of containers. Loops in C (``bytes.split``, ``map``, ``itertools``): walking
    every value of a batch of 256 records cost ~3 ms."""
    return bool(
        _SURROGATE_ESCAPE.search(body)
        or not _strings_within(body, limits.max_string)
        or (body.count(b"[") + body.count(b"{") > limits.max_depth and _depth(value) > limits.max_depth)
    )


_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
_CONTAINERS = frozenset({dict, list})


def _strings_within(body: bytes, max_len: int) -> bool:
    """No string or key of a JSON body is longer than ``max_len`` characters: no string token is
    longer than ``max_len`` bytes (every character takes at least one byte). Without an escaped quote
    the tokens are the runs between quotes."""
    if len(body) <= max_len:
        return True
    if b'\\"' not in body:
        return max(map(len, body.split(b'"'))) <= max_len
    return max(map(len, _JSON_STRING.findall(body)), default=0) <= max_len


def _depth(value: Any) -> int:
    """Levels of containers (objects, arrays) of a parsed JSON value, one level at a time."""
    depth, level = 0, [value] if type(value) in _CONTAINERS else []
    while level:
        depth += 1
        children = list(
            itertools.chain(
                itertools.chain.from_iterable(map(dict.values, [x for x in level if type(x) is dict])),
                itertools.chain.from_iterable(x for x in level if type(x) is list),
            )
        )
        level = list(itertools.compress(children, map(_CONTAINERS.__contains__, map(type, children))))
    return depth


def _string_problem(text: str, max_len: int) -> str | None:
    if len(text) > max_len:
        return f"string of {len(text):,} characters (at most {max_len:,})"
    if not utf8_ok(text):
        return "invalid unicode (a lone UTF-16 surrogate)"
    return None


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON value (a missing value is null)")


def parse_json(body: bytes, limits: Limits) -> tuple[Any, dict[str, Any] | None]:
    """The parsed body, or a 422 body naming the field.

    ``NaN`` and ``±Infinity`` (which Python's ``json`` accepts) are refused: they are not JSON, and a
    NaN would otherwise read as a missing value (``reloop.data.values``)."""
    try:
        value = json.loads(body, parse_constant=_no_constant)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, bad UTF-8, >4300-digit ints, nesting
        msg = "JSON nested too deeply" if isinstance(e, RecursionError) else f"invalid JSON: {str(e)[:200]}"
        return None, problem_body(("body",), msg, "json_invalid")
    bad = check_json(value, body, limits)
    if bad is not None:
        loc, msg = bad
        return None, problem_body(("body", *loc), msg, "value_error")
    return value, None


def problem_body(loc: tuple, msg: str, kind: str) -> dict[str, Any]:
    loc = tuple(part if isinstance(part, int) else printable(str(part)) for part in loc)
    return {"detail": [{"loc": list(loc), "msg": msg, "type": kind}], "field": field_name(loc)}


# -- admin ---------------------------------------------------------------------------------------
class RateLimiter:
    """A token bucket per client: ``burst`` requests at once, refilled at ``per_minute`` / 60 per second.

    At most ``max_clients`` buckets are kept (least recently used evicted), so memory is bounded.
    """

    def __init__(self, per_minute: float, burst: int, max_clients: int = 4096) -> None:
        self.rate = per_minute / 60.0
        self.burst = max(1, burst)
        self.max_clients = max_clients
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()
        self._lock = threading.Lock()

    def take(self, client: str, now: float | None = None) -> float:
        """0 when a request may go ahead (and counts it), else the seconds until one may."""
        now = time.monotonic() if now is None else now
        with self._lock:
            tokens, last = self._buckets.pop(client, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + (now - last) * self.rate)
            wait = 0.0
            if tokens >= 1.0:
                tokens -= 1.0
            else:
                wait = (1.0 - tokens) / self.rate if self.rate > 0 else float("inf")
            self._buckets[client] = (tokens, now)
            while len(self._buckets) > self.max_clients:
                self._buckets.popitem(last=False)
            return wait


def check_token(token: str | None) -> str | None:
    if token is not None and len(token) < MIN_TOKEN_LENGTH:
        raise ValueError(f"admin token: at least {MIN_TOKEN_LENGTH} characters, got {len(token)}")
    return token


# -- errors --------------------------------------------------------------------------------------
class ErrorLog:
    """Bounded logging of unexpected exceptions (see the module docstring)."""

    def __init__(self, interval: float = 60.0, max_kinds: int = 128) -> None:
        self.interval = interval
        self.max_kinds = max_kinds
        self._kinds: dict[tuple, list[float]] = {}  # kind -> [count since last line, time of last line]
        self._lock = threading.Lock()

    def report(self, where: str, exc: BaseException) -> None:
        frames = traceback.extract_tb(exc.__traceback__)
        kind: tuple = (type(exc).__name__, frames[-1].filename, frames[-1].lineno) if frames else (type(exc).__name__,)
        message = printable(str(exc).strip().splitlines()[0] if str(exc).strip() else "")[:300]
        now = time.monotonic()
        with self._lock:
            entry = self._kinds.get(kind)
            if entry is None and len(self._kinds) >= self.max_kinds:
                kind = ("other",)
                entry = self._kinds.get(kind)
            if entry is None:
                self._kinds[kind] = [0.0, now]
                first, count = True, 0
            else:
                entry[0] += 1
                first = False
                if now - entry[1] < self.interval:
                    return
                count, entry[0], entry[1] = int(entry[0]), 0.0, now
        if first:
            log_event(
                logger,
                logging.ERROR,
                "internal_error",
                where=where,
                error=type(exc).__name__,
                message=message,
                traceback="below, once for this kind",
                exc_info=(type(exc), exc, exc.__traceback__),
            )
        else:
            log_event(
                logger,
                logging.ERROR,
                "internal_error",
                where=where,
                error=type(exc).__name__,
                message=message,
                count=count,
                seconds=round(self.interval),
            )


# -- the middleware -------------------------------------------------------------------------------
def _json_bytes(body: dict[str, Any]) -> bytes:
    return json.dumps(body, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode()


async def respond(send: Send, status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> None:
    data = _json_bytes(body)
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    raw += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": data})


class Guard:
    """The ASGI middleware of the module docstring.

    ``quarantine(path, payload, reason)`` stores a refused body (called in a worker thread);
    ``observe(path, status, seconds)`` records metrics; ``errors`` is the app's :class:`ErrorLog`.
    """

    def __init__(
        self,
        app: Callable,
        limits: Limits,
        admin_token: str | None,
        docs_need_token: bool,
        quarantine: Callable[[str, str, str], None],
        observe: Callable[[str, int, float], None],
        errors: ErrorLog,
    ) -> None:
        self.app = app
        self.limits = limits
        self.token = admin_token
        self.docs_need_token = docs_need_token
        self.quarantine = quarantine
        self.observe = observe
        self.errors = errors
        self.admin_limiter = RateLimiter(limits.admin_per_minute, limits.admin_burst)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        start = time.perf_counter()
        status = [500]
        started = [False]

        async def send_observed(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                started[0] = True
            await send(message)

        try:
            await self._handle(scope, receive, send_observed, path)
        except Exception as e:  # noqa: BLE001 - every unexpected error ends here: logged once, bounded
            self.errors.report(f"{scope.get('method', '?')} {printable(path)[:100]}", e)
            if not started[0]:
                await respond(send_observed, 500, {"detail": "internal error (logged by the server)", "field": None})
        finally:
            self.observe(path, status[0], time.perf_counter() - start)

    async def _handle(self, scope: Scope, receive: Receive, send: Send, path: str) -> None:
        guarded = path.startswith("/admin") or (self.docs_need_token and path in DOCS_ROUTES)
        if guarded and not await self._admitted(scope, send):
            return
        if scope.get("method") not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        body = await self._read_body(scope, receive, send)
        if body is None:
            return
        if path in JSON_ROUTES:
            value, problem = parse_json(body, self.limits)
            if problem is not None:
                await self._quarantine(path, body, problem)
                await respond(send, 422, problem)
                return
            # JSON whatever the client said it sent (curl -d says x-www-form-urlencoded); the parsed
            # value travels in the scope (JSON_SCOPE_KEY), so the route does not parse it again
            headers = [(k, v) for k, v in scope.get("headers", []) if k.lower() != b"content-type"]
            scope = {**scope, "headers": [*headers, (b"content-type", b"application/json")], JSON_SCOPE_KEY: value}
        replayed = [False]

        async def replay() -> Message:
            if not replayed[0]:
                replayed[0] = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _admitted(self, scope: Scope, send: Send) -> bool:
        client = scope.get("client") or ("unknown", 0)
        wait = self.admin_limiter.take(str(client[0]))
        if wait > 0:
            lim = self.limits
            await respond(
                send,
                429,
                {
                    "detail": f"admin rate limit: {lim.admin_per_minute:g} requests per minute "
                    f"per client (bursts of {lim.admin_burst}); retry in {wait:.1f} s",
                    "field": "admin",
                },
                {"retry-after": str(max(1, round(wait)))},
            )
            return False
        if self.token is None:
            await respond(
                send,
                403,
                {
                    "detail": f"admin routes are off: start the server with {TOKEN_ENV} set or --admin-token-file",
                    "field": "authorization",
                },
            )
            return False
        given = ""
        for k, v in scope.get("headers", []):
            if k.lower() == b"authorization":
                given = v.decode("latin-1")
                break
        scheme, _, value = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            value.strip().encode("utf-8", "replace"), self.token.encode("utf-8")
        ):
            await respond(
                send,
                401,
                {
                    "detail": "admin routes need 'Authorization: Bearer <token>' with the server's admin token",
                    "field": "authorization",
                },
                {"www-authenticate": "Bearer"},
            )
            return False
        return True

    async def _read_body(self, scope: Scope, receive: Receive, send: Send) -> bytes | None:
        """The whole body, or None after answering 413/408/400 (or when the client went away)."""
        limit = self.limits.max_body_bytes
        declared = None
        for k, v in scope.get("headers", []):
            if k.lower() == b"content-length":
                try:
                    declared = int(v)
                except ValueError:
                    await respond(send, 400, {"detail": "Content-Length is not a number", "field": "content-length"})
                    return None
        if declared is not None and declared > limit:
            await respond(send, 413, {"detail": f"body of {declared:,} bytes (at most {limit:,})", "field": "body"})
            return None
        chunks: list[bytes] = []
        size = 0
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.limits.body_timeout
        while True:
            try:
                message = await asyncio.wait_for(receive(), max(deadline - loop.time(), 0.0))
            except TimeoutError:
                await respond(
                    send,
                    408,
                    {
                        "detail": f"body not complete after {self.limits.body_timeout:g} s "
                        f"({size:,} of {declared if declared is not None else '?'} "
                        "bytes)",
                        "field": "body",
                    },
                )
                return None
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                await respond(send, 413, {"detail": f"body over {limit:,} bytes", "field": "body"})
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    async def _quarantine(self, path: str, body: bytes, problem: dict[str, Any]) -> None:
        from starlette.concurrency import run_in_threadpool

        reason = "; ".join(f"{field_name(d['loc'])}: {d['msg']}" for d in problem["detail"])
        try:
            await run_in_threadpool(self.quarantine, path, body.decode("utf-8", "replace"), reason)
        except Exception as e:  # noqa: BLE001 - a full disk must not turn a 422 into a 500
            self.errors.report(f"quarantine {path}", e)
