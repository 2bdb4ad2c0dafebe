"""Serving a ``combine:`` run: every expert's model, the Hedge mixture, durable weights.

A ``combine:`` run (``reloop.protocol.combined``) trains its own composition (usually the stack of every
remedy) and serves the Hedge mixture (``reloop.combine.Hedge``) of its own prediction and its experts'
(other runs of the same config). The service hosts it as ``K`` chains of versions in one model directory:

    DIR/                      the combine run itself (the stack): a normal single-run model directory;
                              each top-level version's meta names the expert versions it serves with
                              (``meta["experts"] = {name: version}``): one version number = one set
    DIR/experts/<name>/       versions/ and CURRENT of expert ``name`` (config, encoder, pretraining rows
                              and feature map are the parent's: :class:`ExpertDir`)
    DIR/combine.sqlite3       :class:`CombineLog`: what every expert predicted for every impression, the
                              served mixture, the labels the weights have consumed and the Hedge state

``POST /predict`` scores the encoded batch with every model of the set that the top-level version names
(read once per request: a request sees one consistent set), mixes the experts' served predictions
(after each one's error memory, as offline) with the current weights, and logs every expert's
prediction in ``combine.sqlite3`` *before* the impressions enter the main log (an impression the main
log acknowledges always has them; a crash in between leaves unreferenced rows only). The main log's
``p_served`` is the mixture (what was served; the rolling metrics read it); ``p_base`` and ``h`` are the
stack's, so the stack's error memory works unchanged.

``POST /feedback`` (after the main log accepted the labels): each expert is scored on exactly what it
served for those impressions (``CombineLog.preds``), ``Hedge.update`` moves the weights — one update per
feedback request, so labels only reach predictions made after they arrived — and the labels and the
new Hedge state are committed together. At start the state is loaded as committed (exact resume); labels
the main log holds but this log lacks (a crash between the two commits) are applied then, in log order.

Retraining (``reloop.serve.retrain``) trains every chain with the one step engine and publishes the
experts first, the top-level version naming them last (one ``CURRENT`` replace: the atomic switch).
"""

from __future__ import annotations

import json
import logging
import math
import sqlite3
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from reloop.combine import Hedge
from reloop.config import Config
from reloop.serve.guard import ErrorLog
from reloop.serve.host import ModelHost, Scored, Serving
from reloop.serve.registry import (
    ExpertDir,
    ModelDir,
    RegistryError,
    VersionError,
    combine_names,
    expert_pins,
)

logger = logging.getLogger("reloop.serve.ensemble")

COMBINE_DB = "combine.sqlite3"

SCHEMA = """
CREATE TABLE IF NOT EXISTS info(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS preds(id TEXT NOT NULL, k INTEGER NOT NULL, version INTEGER NOT NULL,
    h BLOB, p_base REAL NOT NULL, p_served REAL NOT NULL, PRIMARY KEY(id, k)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS mix(id TEXT PRIMARY KEY, p REAL NOT NULL, updates INTEGER NOT NULL, ts REAL NOT NULL);
CREATE TABLE IF NOT EXISTS labels(seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE,
    label INTEGER NOT NULL, batch INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS hedge(id INTEGER PRIMARY KEY CHECK (id = 1), state TEXT NOT NULL);
"""


# -- the durable side ---------------------------------------------------------------------------
class CombineLog:
    """``DIR/combine.sqlite3`` (WAL, ``synchronous=FULL``): per-expert predictions, the served mixture,
    the consumed labels and the Hedge state; one connection, one lock, every write one commit."""

    def __init__(self, path: str | Path, names: Sequence[str], timeout: float = 30.0) -> None:
        self.path = Path(path)
        self.names = list(names)
        self._lock = threading.RLock()
        self.conn = sqlite3.connect(
            str(self.path), timeout=timeout, isolation_level=None, check_same_thread=False, uri=True
        )
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute("PRAGMA synchronous=FULL")
        with self._lock:
            self.conn.executescript(SCHEMA)
            row = self.conn.execute("SELECT value FROM info WHERE key = 'names'").fetchone()
            if row is None:
                self.conn.execute("INSERT INTO info(key, value) VALUES ('names', ?)", (json.dumps(self.names),))
            elif json.loads(row[0]) != self.names:
                raise RegistryError(f"{self.path}: made for experts {json.loads(row[0])}, the config has {self.names}")

    def close(self) -> None:
        with self._lock:
            self.conn.close()

    def _write(self, sql_rows: Sequence[tuple[str, Sequence[tuple[Any, ...]]]]) -> None:
        with self._lock:
            self.conn.execute("BEGIN IMMEDIATE")
            try:
                for sql, rows in sql_rows:
                    self.conn.executemany(sql, rows)
                self.conn.execute("COMMIT")
            except BaseException:
                self.conn.execute("ROLLBACK")
                raise

    def write_predictions(self, ids: Sequence[str], mixed: Mixed, ts: float) -> None:
        """Every expert's prediction (version, memory key when it has a memory, base, served) and the
        served mixture of a batch, in one commit."""
        rows: list[tuple[Any, ...]] = []
        for k, part in enumerate(mixed.parts):
            pb, ps = part.p_base.tolist(), part.p_served.tolist()
            if mixed.keep_h[k]:
                h = np.ascontiguousarray(part.h.numpy(), dtype=np.float32)
                hs: list[bytes | None] = [h[i].tobytes() for i in range(len(ids))]
            else:
                hs = [None] * len(ids)
            rows += [(i, k, part.version, hs[j], pb[j], ps[j]) for j, i in enumerate(ids)]
        mix = [(i, p, mixed.updates, ts) for i, p in zip(ids, mixed.p_served.tolist())]
        self._write(
            [
                ("INSERT INTO preds(id, k, version, h, p_base, p_served) VALUES (?, ?, ?, ?, ?, ?)", rows),
                ("INSERT INTO mix(id, p, updates, ts) VALUES (?, ?, ?, ?)", mix),
            ]
        )

    def preds(self, ids: Sequence[str]) -> dict[str, torch.Tensor]:
        """``p_served``/``p_base`` ``[K, B]`` (float32, as served) and ``version`` ``[K, B]`` of ``ids``;
        ``h``: per expert a list of B key blobs (None without a memory). A missing row raises."""
        K, B = len(self.names), len(ids)
        ps = torch.full((K, B), float("nan"))
        pb = torch.full((K, B), float("nan"))
        ver = torch.full((K, B), -1, dtype=torch.int64)
        pos = {i: j for j, i in enumerate(ids)}
        with self._lock:
            got = []
            for a in range(0, B, 500):
                chunk = list(ids[a : a + 500])
                got += self.conn.execute(
                    f"SELECT id, k, version, p_base, p_served FROM preds WHERE id IN ({','.join('?' * len(chunk))})",
                    chunk,
                ).fetchall()
        for i, k, v, b, s in got:
            ps[k, pos[i]], pb[k, pos[i]], ver[k, pos[i]] = s, b, v
        if bool((ver < 0).any()):
            missing = [ids[j] for j in torch.nonzero((ver < 0).any(0)).flatten().tolist()]
            raise RegistryError(f"{self.path}: no expert predictions for impressions {missing[:3]}")
        return {"p_served": ps, "p_base": pb, "version": ver}

    def keys(self, ids: Sequence[str], k: int) -> list[bytes | None]:
        with self._lock:
            out: dict[str, bytes | None] = {}
            for a in range(0, len(ids), 500):
                chunk = list(ids[a : a + 500])
                out.update(
                    self.conn.execute(
                        f"SELECT id, h FROM preds WHERE k = ? AND id IN ({','.join('?' * len(chunk))})", [k, *chunk]
                    ).fetchall()
                )
        return [out.get(i) for i in ids]

    def record_feedback(self, events: Sequence[tuple[str, int]], batch: int, state: dict[str, Any]) -> None:
        """The labels one Hedge update consumed and the state after it, in one commit."""
        self._write(
            [
                ("INSERT INTO labels(id, label, batch) VALUES (?, ?, ?)", [(i, int(y), batch) for i, y in events]),
                ("INSERT OR REPLACE INTO hedge(id, state) VALUES (1, ?)", [(json.dumps(state),)]),
            ]
        )

    def hedge_state(self) -> dict[str, Any] | None:
        with self._lock:
            row = self.conn.execute("SELECT state FROM hedge WHERE id = 1").fetchone()
        return None if row is None else json.loads(row[0])

    def count_labels(self) -> int:
        with self._lock:
            return int(self.conn.execute("SELECT COUNT(*) FROM labels").fetchone()[0])

    def unconsumed(self, main_log: Path) -> list[tuple[str, int]]:
        """Labels of the main log (in its order) for impressions with expert predictions that no Hedge
        update consumed (a crash between the main log's commit and this log's)."""
        with self._lock:
            self.conn.execute("ATTACH DATABASE ? AS lg", (_read_only(main_log),))
            try:
                return self.conn.execute(
                    "SELECT f.impression_id, f.label FROM lg.feedback f JOIN mix m ON m.id = f.impression_id "
                    "WHERE f.impression_id NOT IN (SELECT id FROM labels) ORDER BY f.rowid"
                ).fetchall()
            finally:
                self.conn.execute("DETACH DATABASE lg")

    def served_rows(self, main_log: Path, k: int, ids: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Expert ``k``'s logged ``(p_base, p_served)`` for the main log's closed training rows (in
        ``row_id`` order) followed by ``ids``: the ``served`` column of its retrain history."""
        with self._lock:
            self.conn.execute("ATTACH DATABASE ? AS lg", (_read_only(main_log),))
            try:
                closed = self.conn.execute(
                    "SELECT p.p_base, p.p_served FROM lg.impressions i JOIN preds p ON p.id = i.id AND p.k = ? "
                    "WHERE i.row_id IS NOT NULL ORDER BY i.row_id",
                    (k,),
                ).fetchall()
                n_closed = self.conn.execute("SELECT COUNT(*) FROM lg.impressions WHERE row_id IS NOT NULL").fetchone()
            finally:
                self.conn.execute("DETACH DATABASE lg")
        if len(closed) != int(n_closed[0]):
            raise RegistryError(f"{self.path}: expert {self.names[k]!r} lacks predictions of closed rows")
        new = self.preds(ids)
        base = torch.tensor([r[0] for r in closed], dtype=torch.float32)
        served = torch.tensor([r[1] for r in closed], dtype=torch.float32)
        return torch.cat([base, new["p_base"][k]]), torch.cat([served, new["p_served"][k]])

    def feedback_for_version(self, k: int, version: int | None, limit: int | None) -> list[tuple[bytes, int, float]]:
        """``(h, label, p_base)`` of expert ``k``'s labelled impressions (of ``version``, or all), in
        label order: what its error memory is rebuilt from."""
        q = (
            "SELECT p.h, l.label, p.p_base FROM labels l JOIN preds p ON p.id = l.id AND p.k = ? "
            + ("WHERE p.version = ? " if version is not None else "")
            + "ORDER BY l.seq DESC"
            + (f" LIMIT {int(limit)}" if limit else "")
        )
        with self._lock:
            rows = self.conn.execute(q, (k, version) if version is not None else (k,)).fetchall()
        return rows[::-1]

    def mixture(self, ids: Sequence[str]) -> dict[str, tuple[float, int]]:
        """``{id: (served mixture, Hedge updates before it)}`` (tests, tools)."""
        with self._lock:
            out = {}
            for a in range(0, len(ids), 500):
                chunk = list(ids[a : a + 500])
                out.update(
                    {
                        i: (p, u)
                        for i, p, u in self.conn.execute(
                            f"SELECT id, p, updates FROM mix WHERE id IN ({','.join('?' * len(chunk))})", chunk
                        )
                    }
                )
        return out


def _read_only(path: Path) -> str:
    """A read-only SQLite URI of ``path`` (percent-encoded: any character of a path is safe)."""
    return Path(path).resolve().as_uri() + "?mode=ro"


class _ExpertLog:
    """What a :class:`ModelHost` reads from its log, for an expert: no vocabulary of its own (the parent's
    live encoder encodes), its memory's feedback from :class:`CombineLog`."""

    def __init__(self, store: CombineLog, k: int) -> None:
        self.store, self.k = store, k

    def vocab(self) -> list[tuple[str, str, int]]:
        return []

    def feedback_for_version(self, version: int | None, limit: int | None = None) -> list[tuple[bytes, int, float]]:
        return self.store.feedback_for_version(self.k, version, limit)


def hedge_to_json(hedge: Hedge) -> dict[str, Any]:
    """``Hedge.state_dict`` as JSON values (float64 round-trips exactly through ``repr``)."""
    return {k: (v.tolist() if isinstance(v, torch.Tensor) else v) for k, v in hedge.state_dict().items()}


def hedge_from_json(hedge: Hedge, state: dict[str, Any]) -> None:
    hedge.load_state_dict(
        {k: torch.tensor(v, dtype=torch.float64) if k in ("log_w", "loss") else v for k, v in state.items()}
    )


# -- the running side ---------------------------------------------------------------------------
@dataclass
class Mixed(Scored):
    """A batch scored by a whole set: ``p_served`` is the mixture (NaN where an expert's output or
    memory key is non-finite: the service refuses those records), ``h``/``p_base`` the stack's."""

    parts: list[Scored] = field(default_factory=list)
    keep_h: list[bool] = field(default_factory=list)
    updates: int = 0


class Ensemble:
    """The experts of a combine run beside the service's own host (the stack), and the Hedge."""

    def __init__(
        self, md: ModelDir, cfg: Config, run: str, stack: ModelHost, device: torch.device, errors: ErrorLog
    ) -> None:
        spec = cfg.runs[run]
        assert spec.combine is not None
        self.md, self.cfg, self.run, self.stack = md, cfg, run, stack
        self.names = combine_names(cfg, run)
        self.experts = self.names[1:]
        self.hedge = spec.combine.build(self.names)
        self.store = CombineLog(md.path / COMBINE_DB, self.names)
        self._lock = threading.Lock()  # the Hedge and its committed state
        self._set_lock = threading.Lock()
        self._restore_weights()
        pins = expert_pins(stack.state.meta, self.experts, stack.state.version)
        self.dirs = {e: ExpertDir(md, e) for e in self.experts}
        self.hosts: dict[str, ModelHost] = {}
        for k, e in enumerate(self.experts, start=1):
            self.dirs[e].pin = pins[e]
            self.hosts[e] = ModelHost(
                self.dirs[e],
                cfg,
                e,
                _ExpertLog(self.store, k),  # type: ignore[arg-type]  # what ModelHost reads of a log
                device,
                math.inf,
                errors=errors,
            )
        self._sets: dict[int, dict[str, Serving]] = {
            stack.state.version: {e: self.hosts[e].state for e in self.experts}
        }
        self.keep_h = [False] + [self.hosts[e].compensator is not None for e in self.experts]
        stack.before_swap = self.prepare

    # -- weights --------------------------------------------------------------------------------
    def _restore_weights(self) -> None:
        state = self.store.hedge_state()
        if state is not None:
            hedge_from_json(self.hedge, state)
        late = self.store.unconsumed(self.md.log_path)
        if late:
            logger.warning("event=combine_replay labels=%d (committed to the log, not yet to the weights)", len(late))
            self._update(late)

    def _update(self, events: Sequence[tuple[str, int]]) -> dict[str, torch.Tensor]:
        """One Hedge update on ``events`` (scored on what each expert served), committed with its labels."""
        ids = [i for i, _ in events]
        preds = self.store.preds(ids)
        y = torch.tensor([float(v) for _, v in events], dtype=torch.float64)
        with self._lock:
            before = self.hedge.state_dict()
            self.hedge.update(preds["p_served"], y)
            try:
                self.store.record_feedback(events, self.hedge.updates, hedge_to_json(self.hedge))
            except BaseException:
                self.hedge.load_state_dict(before)  # memory and disk agree: the update did not happen
                raise
        return preds

    def feedback(self, events: Sequence[tuple[str, int]]) -> int:
        """Labels the main log just accepted: move the weights, then write the experts' memories.
        Returns the memory writes of the experts."""
        if not events:
            return 0
        preds = self._update(events)
        written = 0
        for k, e in enumerate(self.experts, start=1):
            host = self.hosts[e]
            if host.compensator is None:
                continue
            keys = self.store.keys([i for i, _ in events], k)
            rows = [
                (keys[j], int(y), float(preds["p_base"][k, j]), int(preds["version"][k, j]))
                for j, (_, y) in enumerate(events)
                if keys[j] is not None
            ]
            written += host.remember(rows)  # type: ignore[arg-type]
        return written

    # -- the serving set ------------------------------------------------------------------------
    def _set_for(self, state: Serving) -> dict[str, Serving]:
        """The expert models the top-level version ``state`` serves with (loaded once, before the swap)."""
        got = self._sets.get(state.version)
        if got is not None:
            return got
        with self._set_lock:
            got = self._sets.get(state.version)
            if got is None:
                pins = expert_pins(state.meta, self.experts, state.version)
                got = {}
                for e in self.experts:
                    host = self.hosts[e]
                    self.dirs[e].pin = pins[e]
                    if host.state.version != pins[e]:
                        host.reload()  # loads and checks the pinned version; its memory resets if the run says so
                    got[e] = host.state
                self._sets = {state.version: got, **{v: s for v, s in self._sets.items() if v > state.version - 2}}
        return got

    def prepare(self, fresh: Serving) -> None:
        """``ModelHost.before_swap``: load the experts of a new top-level version before it serves (a
        version whose experts cannot be served is refused with it: ``VersionError``)."""
        try:
            self._set_for(fresh)
        except RegistryError as e:
            raise VersionError(fresh.version, f"version {fresh.version}: {e}") from None

    def score(self, cols: dict[str, torch.Tensor], state: Serving, own: Scored) -> Mixed:
        """Every expert of ``state``'s set on the batch, mixed with the current weights (read only)."""
        experts = self._set_for(state)
        parts = [own] + [self.hosts[e].score(cols, experts[e]) for e in self.experts]
        probs = torch.stack([p.p_served.float() for p in parts])  # [K, B]: each expert as served
        with self._lock:
            mix = self.hedge.predict(probs)
            updates = self.hedge.updates
        ok = torch.isfinite(probs).all(0)
        for p in parts[1:]:
            ok &= torch.isfinite(p.p_base) & torch.isfinite(p.h).all(dim=1)
        mix = mix.float().masked_fill(~ok, float("nan"))
        return Mixed(state.version, own.h, own.p_base, mix, parts, self.keep_h, updates)

    def log(self, ids: Sequence[str], mixed: Scored, ts: float) -> None:
        """Commit every expert's predictions for ``ids`` (before the main log acknowledges them)."""
        assert isinstance(mixed, Mixed)
        self.store.write_predictions(ids, mixed, ts)

    # -- views ----------------------------------------------------------------------------------
    def info(self, state: Serving) -> dict[str, Any]:
        experts = self._set_for(state)
        with self._lock:
            w = self.hedge.weights.tolist()
            losses = self.hedge.losses
            hedge = self.hedge.config() | {"updates": self.hedge.updates, "rows": self.hedge.rows}
            out: dict[str, Any] = {
                "mixture_loss": self.hedge.mixture_loss,
                "guarantee": self.hedge.guarantee() if self.hedge.updates else None,
            }
        hedge.pop("log_prior", None)
        out["hedge"] = hedge
        out["experts"] = [
            {
                "name": n,
                "weight": w[k],
                "loss": losses[n],
                "version": state.version if k == 0 else experts[n].version,
                "trained_through": (state.meta if k == 0 else experts[n].meta).get("trained_through"),
                "memory": self.stack.memory_info() if k == 0 else self.hosts[n].memory_info(),
            }
            for k, n in enumerate(self.names)
        ]
        return out

    def close(self) -> None:
        self.store.close()
