"""The service's durable log: one SQLite file in WAL mode, written by one writer thread.

Every write the service acknowledges (an impression, a feedback event, a quarantined record, a new
vocabulary entry) is committed *before* the HTTP response leaves, so it survives ``kill -9``. Writes
are group-committed: a writer thread takes everything queued, runs each request's work in its own
SAVEPOINT and commits once; each caller gets a future that completes after the commit holding its
rows. Feedback, quarantined records and every administrative write are *durable* commits
(``synchronous=FULL``: the write-ahead log is fsync-ed before the commit returns, so they also survive a
power cut); a group holding only impressions commits with ``synchronous=NORMAL`` (no fsync: the WAL
frames are in the OS's page cache, which ``kill -9`` does not lose). The WAL is one sequential file,
so the fsync of any later durable commit — e.g. the feedback that names an impression — makes every
earlier impression durable too: a labelled impression is always on disk before its label is
acknowledged.

Tables::

    impressions(id PK, ts, model_version, period, features BLOB, h BLOB, p_base, p_served,
                row_id, label_used)      -- row_id/label_used: set when the period is closed
    feedback(impression_id PK, label, ts)
    quarantine(ts, endpoint, payload, reason)
    published(version PK, ts, period, meta)
    periods(period PK, opened, closed, outcome)   -- the open period is the one with closed NULL
    retrains(ts, period, outcome, detail)
    vocab(tbl, id, idx, PK(tbl, id))    -- ids the live encoder assigned (arrival order = idx)

``features`` holds one row of the encoded tensors as a numpy structured record (see
:class:`RowCodec`), ``h`` the float32 hidden representation the error memory keys on.

Example::

    >>> import tempfile, pathlib
    >>> log = ServeLog(pathlib.Path(tempfile.mkdtemp()) / "log.sqlite3")
    >>> log.open_period(4)
    >>> log.current_period()
    4
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from reloop.data.schema import FeatureMap
from reloop.serve.guard import printable

SCHEMA = """
CREATE TABLE IF NOT EXISTS impressions(
    id TEXT PRIMARY KEY, ts REAL NOT NULL, model_version INTEGER NOT NULL, period INTEGER NOT NULL,
    features BLOB NOT NULL, h BLOB NOT NULL, p_base REAL NOT NULL, p_served REAL NOT NULL,
    row_id INTEGER, label_used INTEGER);
CREATE INDEX IF NOT EXISTS impressions_period ON impressions(period);
CREATE TABLE IF NOT EXISTS feedback(impression_id TEXT PRIMARY KEY, label INTEGER NOT NULL, ts REAL NOT NULL);
CREATE TABLE IF NOT EXISTS quarantine(ts REAL NOT NULL, endpoint TEXT NOT NULL, payload TEXT, reason TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS published(version INTEGER PRIMARY KEY, ts REAL NOT NULL, period INTEGER, meta TEXT);
CREATE TABLE IF NOT EXISTS periods(period INTEGER PRIMARY KEY, opened REAL NOT NULL, closed REAL, outcome TEXT);
CREATE TABLE IF NOT EXISTS retrains(ts REAL NOT NULL, period INTEGER, outcome TEXT NOT NULL, detail TEXT);
CREATE TABLE IF NOT EXISTS vocab(tbl TEXT NOT NULL, id TEXT NOT NULL, idx INTEGER NOT NULL, PRIMARY KEY(tbl, id));
"""

USERS_TABLE = "__users__"  # vocab rows of the encoder's user index (for gAUC), not an embedding table
MAX_PAYLOAD = 65536  # characters of a quarantined payload kept


class UnknownImpressions(KeyError):
    """Feedback named impression ids the log has never acknowledged."""

    def __init__(self, ids: list[str]) -> None:
        super().__init__(ids)
        self.ids = ids


class RowCodec:
    """Encoded tensors of a batch <-> one fixed-width bytes record per row (numpy structured dtype)."""

    def __init__(self, feature_map: FeatureMap, with_user: bool) -> None:
        fields: list[tuple] = []
        for f in feature_map.fields:
            if f.kind == "numeric":
                fields.append((f.name, "<f4"))
            elif f.kind == "sequence":
                fields.append((f.name, "<i8", (f.max_len,)))
            else:
                fields.append((f.name, "<i8"))
        if with_user:
            fields.append(("user", "<i8"))
        self.dtype = np.dtype(fields)
        self.names = [f[0] for f in fields]

    def encode(self, columns: dict[str, torch.Tensor]) -> list[bytes]:
        n = next(iter(columns.values())).shape[0]
        rec = np.empty(n, dtype=self.dtype)
        for name in self.names:
            rec[name] = columns[name].numpy()
        raw = rec.tobytes()
        size = self.dtype.itemsize
        return [raw[i * size : (i + 1) * size] for i in range(n)]

    def decode(self, blobs: Sequence[bytes]) -> dict[str, torch.Tensor]:
        rec = np.frombuffer(b"".join(blobs), dtype=self.dtype)
        return {name: torch.from_numpy(np.array(rec[name], copy=True)) for name in self.names}


@dataclass
class ImpressionRow:
    id: str
    h: bytes
    p_base: float
    p_served: float
    model_version: int


@dataclass
class FeedbackResult:
    accepted: list[tuple[ImpressionRow, int]]  # newly logged (impression, label), in request order
    duplicates: list[str]


class ServeLog:
    """Thread-safe handle on the log: one connection, one lock, one writer thread for the group commits
    (started on the first write). Reads and the administrative transactions (:meth:`close_period` ...)
    run on the caller's thread under the lock."""

    def __init__(self, path: str | Path, timeout: float = 30.0) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._qcond = threading.Condition(threading.Lock())
        self._queue: list[_Pending] = []
        self._writer: threading.Thread | None = None
        self._closing = False
        self.conn = sqlite3.connect(str(self.path), timeout=timeout, isolation_level=None, check_same_thread=False)
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute("PRAGMA synchronous=FULL")
        self._full = True  # the connection's synchronous setting (FULL or NORMAL)
        self.conn.execute(f"PRAGMA busy_timeout={int(timeout * 1000)}")
        with self._lock:
            self.conn.executescript(SCHEMA)

    def close(self) -> None:
        """Commit what is queued, stop the writer thread, close the connection."""
        with self._qcond:
            self._closing = True
            self._qcond.notify_all()
            writer = self._writer
        if writer is not None and writer is not threading.current_thread():
            writer.join()
        with self._lock:
            self.conn.close()

    # -- transactions --------------------------------------------------------------------------
    def _tx(self):
        return _Transaction(self)

    def _synchronous(self, full: bool) -> None:
        """Set the connection's ``synchronous`` (under the lock, outside a transaction)."""
        if full != self._full:
            self.conn.execute(f"PRAGMA synchronous={'FULL' if full else 'NORMAL'}")
            self._full = full

    def submit(self, work: Callable[[sqlite3.Connection], Any], durable: bool = True) -> Future:
        """Queue ``work(conn)`` for the writer thread's next group commit; the future completes with its
        result (or its exception) once the COMMIT holding its writes has returned — with an fsync when
        ``durable`` or when any other item of the group is durable (see the module docstring)."""
        item = _Pending(work, durable)
        with self._qcond:
            if self._closing:
                raise sqlite3.ProgrammingError("the log is closed")
            self._queue.append(item)
            if self._writer is None:
                self._writer = threading.Thread(target=self._write_loop, daemon=True, name="reloop-log-writer")
                self._writer.start()
            self._qcond.notify()
        return item.future

    def _write_loop(self) -> None:
        """The writer thread: everything queued since the last commit is one group (one transaction,
        each item in its own SAVEPOINT so one failing item — e.g. feedback naming an unknown id — is
        rolled back alone, one COMMIT)."""
        while True:
            with self._qcond:
                while not self._queue and not self._closing:
                    self._qcond.wait()
                if not self._queue:
                    return
                batch, self._queue = self._queue, []
            with self._lock:
                self._run_batch(batch)
            for it in batch:
                if it.error is not None:
                    it.future.set_exception(it.error)
                else:
                    it.future.set_result(it.result)

    def _run_batch(self, batch: list[_Pending]) -> None:
        conn = self.conn
        try:
            self._synchronous(any(it.durable for it in batch))
            conn.execute("BEGIN IMMEDIATE")
        except BaseException as e:  # noqa: BLE001 - every waiter of the batch gets the error
            for it in batch:
                it.error = e
            return
        try:
            for it in batch:
                conn.execute("SAVEPOINT item")
                try:
                    it.result = it.work(conn)
                    conn.execute("RELEASE item")
                except Exception as e:  # noqa: BLE001 - handed back to that item's caller
                    conn.execute("ROLLBACK TO item")
                    conn.execute("RELEASE item")
                    it.error = e
            conn.execute("COMMIT")
        except BaseException as e:  # noqa: BLE001 - rolled back, handed to every waiter
            try:
                conn.execute("ROLLBACK")
            except sqlite3.Error:
                pass
            for it in batch:
                if it.error is None:
                    it.error, it.result = e, None

    # -- periods -------------------------------------------------------------------------------
    def current_period(self) -> int | None:
        with self._lock:
            row = self.conn.execute("SELECT MAX(period) FROM periods WHERE closed IS NULL").fetchone()
        return None if row[0] is None else int(row[0])

    def open_period(self, period: int) -> None:
        with self._tx() as c:
            c.execute("INSERT OR IGNORE INTO periods(period, opened) VALUES (?, ?)", (period, time.time()))

    def periods(self) -> list[dict[str, Any]]:
        with self._lock:
            rows = self.conn.execute("SELECT period, opened, closed, outcome FROM periods ORDER BY period").fetchall()
        return [{"period": p, "opened": o, "closed": c, "outcome": out} for p, o, c, out in rows]

    # -- impressions ---------------------------------------------------------------------------
    def submit_impressions(
        self,
        ids: Sequence[str],
        model_version: int,
        features: Sequence[bytes],
        h: Sequence[bytes],
        p_base: Sequence[float],
        p_served: Sequence[float],
        vocab: Iterable[tuple[str, str, int]] = (),
    ) -> Future:
        """Log a predicted batch (and the vocabulary entries it relies on) in the next group commit.

        The future's result is the period the impressions were logged into (the open one at commit
        time). Not a durable commit by itself (see the module docstring): committed, so it survives
        ``kill -9``; on disk at the next fsync, at the latest with the first label that names it.
        """
        ts = time.time()
        vocab = list(vocab)

        def work(c: sqlite3.Connection) -> int:
            row = c.execute("SELECT MAX(period) FROM periods WHERE closed IS NULL").fetchone()
            if row[0] is None:
                raise RuntimeError("the log has no open period (was the model directory bootstrapped?)")
            period = int(row[0])
            if vocab:
                c.executemany("INSERT OR IGNORE INTO vocab(tbl, id, idx) VALUES (?, ?, ?)", vocab)
            c.executemany(
                "INSERT INTO impressions(id, ts, model_version, period, features, h, p_base, p_served) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (i, ts, model_version, period, f, hh, float(pb), float(ps))
                    for i, f, hh, pb, ps in zip(ids, features, h, p_base, p_served)
                ],
            )
            return period

        return self.submit(work, durable=False)

    def count(self, table: str) -> int:
        if table not in ("impressions", "feedback", "quarantine", "published", "retrains", "vocab"):
            raise ValueError(table)
        with self._lock:
            return int(self.conn.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0])

    def impressions(self, ids: Sequence[str] | None = None) -> list[dict[str, Any]]:
        """Rows of ``impressions`` (all, or the given ids) as dicts, in log order (tests, tools)."""
        q = "SELECT id, ts, model_version, period, p_base, p_served, row_id, label_used FROM impressions"
        with self._lock:
            if ids is None:
                rows = self.conn.execute(q + " ORDER BY rowid").fetchall()
            else:
                rows = []
                for chunk in _chunks(list(ids), 500):
                    rows += self.conn.execute(q + f" WHERE id IN ({','.join('?' * len(chunk))})", chunk).fetchall()
        keys = ("id", "ts", "model_version", "period", "p_base", "p_served", "row_id", "label_used")
        return [dict(zip(keys, r)) for r in rows]

    # -- feedback ------------------------------------------------------------------------------
    def write_feedback(self, events: Sequence[tuple[str, int]]) -> FeedbackResult:
        """:meth:`submit_feedback`, waited for."""
        return self.submit_feedback(events).result()

    def submit_feedback(self, events: Sequence[tuple[str, int]]) -> Future:
        """Log labels in the next durable group commit (fsync-ed before the future completes).

        All-or-nothing: an unknown id fails the future with :class:`UnknownImpressions`, nothing of the
        request is written. A second label for an impression (in this or an earlier request) is a
        duplicate: ignored. The future's result is a :class:`FeedbackResult`.
        """
        ids = list(dict.fromkeys(i for i, _ in events))
        ts = time.time()

        def work(c: sqlite3.Connection) -> FeedbackResult:
            found: dict[str, ImpressionRow] = {}
            seen: set[str] = set()
            for chunk in _chunks(ids, 500):
                marks = ",".join("?" * len(chunk))
                for i, h, pb, ps, v in c.execute(
                    f"SELECT id, h, p_base, p_served, model_version FROM impressions WHERE id IN ({marks})", chunk
                ):
                    found[i] = ImpressionRow(i, h, pb, ps, v)
                seen.update(
                    r[0]
                    for r in c.execute(f"SELECT impression_id FROM feedback WHERE impression_id IN ({marks})", chunk)
                )
            unknown = [i for i in ids if i not in found]
            if unknown:
                raise UnknownImpressions(unknown)  # nothing of this request is written
            accepted: list[tuple[ImpressionRow, int]] = []
            duplicates: list[str] = []
            for i, label in events:
                if i in seen:
                    duplicates.append(i)
                    continue
                seen.add(i)
                accepted.append((found[i], int(label)))
            if accepted:
                c.executemany(
                    "INSERT INTO feedback(impression_id, label, ts) VALUES (?, ?, ?)",
                    [(r.id, y, ts) for r, y in accepted],
                )
            return FeedbackResult(accepted, duplicates)

        return self.submit(work, durable=True)

    def feedback_for_version(self, version: int | None, limit: int | None = None) -> list[tuple[bytes, int, float]]:
        """``(h, label, p_base)`` of labelled impressions (of ``version``, or all), in feedback order."""
        q = (
            "SELECT i.h, f.label, i.p_base FROM feedback f JOIN impressions i ON i.id = f.impression_id "
            + ("WHERE i.model_version = ? " if version is not None else "")
            + "ORDER BY f.rowid DESC"
            + (f" LIMIT {int(limit)}" if limit else "")
        )
        with self._lock:
            rows = self.conn.execute(q, (version,) if version is not None else ()).fetchall()
        return rows[::-1]

    def recent_feedback(self, limit: int) -> list[tuple[int, float]]:
        """``(label, p_served)`` of the last ``limit`` feedback events (rolling metrics after a restart)."""
        with self._lock:
            rows = self.conn.execute(
                "SELECT f.label, i.p_served FROM feedback f JOIN impressions i ON i.id = f.impression_id "
                "ORDER BY f.rowid DESC LIMIT ?",
                (int(limit),),
            ).fetchall()
        return rows[::-1]

    # -- quarantine ----------------------------------------------------------------------------
    def quarantine(self, endpoint: str, payload: Any, reason: str) -> None:
        """Store one refused payload (a durable commit, waited for)."""
        self.submit_quarantine(endpoint, [(payload, reason)]).result()

    def submit_quarantine(self, endpoint: str, items: Sequence[tuple[Any, str]]) -> Future:
        """Store refused payloads with their reasons (a durable commit; the future completes after it)."""
        ts = time.time()
        # printable: a lone UTF-16 surrogate (valid JSON, no UTF-8 form) would make SQLite fail
        rows = [
            (
                ts,
                printable(endpoint),
                printable((p if isinstance(p, str) else _json_or_repr(p))[:MAX_PAYLOAD]),
                printable(r),
            )
            for p, r in items
        ]

        def work(c: sqlite3.Connection) -> None:
            c.executemany("INSERT INTO quarantine(ts, endpoint, payload, reason) VALUES (?, ?, ?, ?)", rows)

        return self.submit(work, durable=True)

    def quarantined(self) -> list[dict[str, Any]]:
        with self._lock:
            rows = self.conn.execute("SELECT ts, endpoint, payload, reason FROM quarantine ORDER BY rowid").fetchall()
        return [{"ts": t, "endpoint": e, "payload": p, "reason": r} for t, e, p, r in rows]

    # -- vocabulary ----------------------------------------------------------------------------
    def vocab(self) -> list[tuple[str, str, int]]:
        with self._lock:
            return self.conn.execute("SELECT tbl, id, idx FROM vocab ORDER BY tbl, idx").fetchall()

    # -- retraining ----------------------------------------------------------------------------
    def max_rowid(self) -> int:
        with self._lock:
            return int(self.conn.execute("SELECT COALESCE(MAX(rowid), 0) FROM impressions").fetchone()[0])

    def period_rows(
        self, period: int, upto_rowid: int
    ) -> list[tuple[str, float, bytes, float, float, int | None, float | None]]:
        """Impressions of ``period`` (rowid ≤ ``upto_rowid``) in log order, with their label if any:
        ``(id, ts, features, p_base, p_served, label, feedback_ts)``."""
        with self._lock:
            return self.conn.execute(
                "SELECT i.id, i.ts, i.features, i.p_base, i.p_served, f.label, f.ts FROM impressions i "
                "LEFT JOIN feedback f ON f.impression_id = i.id WHERE i.period = ? AND i.rowid <= ? "
                "ORDER BY i.rowid",
                (period, upto_rowid),
            ).fetchall()

    def closed_rows(self) -> list[tuple[int, int, bytes, int, float, float]]:
        """Rows of closed periods that entered training: ``(row_id, period, features, label, p_base, p_served)``."""
        with self._lock:
            return self.conn.execute(
                "SELECT row_id, period, features, label_used, p_base, p_served FROM impressions "
                "WHERE row_id IS NOT NULL ORDER BY row_id"
            ).fetchall()

    def next_row_id(self, first: int) -> int:
        with self._lock:
            row = self.conn.execute("SELECT MAX(row_id) FROM impressions").fetchone()
        return first if row[0] is None else max(first, int(row[0]) + 1)

    def close_period(
        self,
        period: int,
        upto_rowid: int,
        rows: Sequence[tuple[str, int, int]],
        outcome: str,
        detail: dict[str, Any],
        published: tuple[int, dict[str, Any]] | None,
    ) -> None:
        """Close ``period`` in one transaction: impressions logged after ``upto_rowid`` move to the
        next period, training rows get their ``row_id``/``label_used``, the next period opens."""
        now = time.time()
        with self._tx() as c:
            c.execute(
                "UPDATE impressions SET period = ? WHERE period = ? AND rowid > ?", (period + 1, period, upto_rowid)
            )
            c.executemany(
                "UPDATE impressions SET row_id = ?, label_used = ? WHERE id = ?", [(r, y, i) for i, r, y in rows]
            )
            c.execute("UPDATE periods SET closed = ?, outcome = ? WHERE period = ?", (now, outcome, period))
            c.execute("INSERT OR IGNORE INTO periods(period, opened) VALUES (?, ?)", (period + 1, now))
            c.execute(
                "INSERT INTO retrains(ts, period, outcome, detail) VALUES (?, ?, ?, ?)",
                (now, period, outcome, json.dumps(detail, default=str)),
            )
            if published is not None:
                version, meta = published
                c.execute(
                    "INSERT OR REPLACE INTO published(version, ts, period, meta) VALUES (?, ?, ?, ?)",
                    (version, now, period, json.dumps(meta, default=str)),
                )

    def record_retrain(self, period: int | None, outcome: str, detail: dict[str, Any]) -> None:
        with self._tx() as c:
            c.execute(
                "INSERT INTO retrains(ts, period, outcome, detail) VALUES (?, ?, ?, ?)",
                (time.time(), period, outcome, json.dumps(detail, default=str)),
            )

    def record_published(self, version: int, period: int | None, meta: dict[str, Any]) -> None:
        with self._tx() as c:
            c.execute(
                "INSERT OR REPLACE INTO published(version, ts, period, meta) VALUES (?, ?, ?, ?)",
                (version, time.time(), period, json.dumps(meta, default=str)),
            )

    def retrains(self) -> list[dict[str, Any]]:
        with self._lock:
            rows = self.conn.execute("SELECT ts, period, outcome, detail FROM retrains ORDER BY rowid").fetchall()
        return [{"ts": t, "period": p, "outcome": o, "detail": json.loads(d or "{}")} for t, p, o, d in rows]


class _Pending:
    __slots__ = ("durable", "error", "future", "result", "work")

    def __init__(self, work: Callable[[sqlite3.Connection], Any], durable: bool) -> None:
        self.work = work
        self.durable = durable
        self.future: Future = Future()
        self.result: Any = None
        self.error: BaseException | None = None


class _Transaction:
    """``BEGIN IMMEDIATE`` … ``COMMIT`` (durable; rolled back on error) under the log's lock."""

    def __init__(self, log: ServeLog) -> None:
        self.log = log

    def __enter__(self) -> sqlite3.Connection:
        self.log._lock.acquire()
        try:
            self.log._synchronous(True)
            self.log.conn.execute("BEGIN IMMEDIATE")
        except BaseException:
            self.log._lock.release()
            raise
        return self.log.conn

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self.log.conn.execute("COMMIT")
            else:
                self.log.conn.execute("ROLLBACK")
        finally:
            self.log._lock.release()


def _chunks(items: list, size: int):
    for i in range(0, len(items), size):
        yield items[i : i + size]


def _json_or_repr(value: Any) -> str:
    try:
        return json.dumps(value, default=str)
    except (TypeError, ValueError):
        return repr(value)
