"""The model host: which version serves, hot swap, the error memory's compensation, the live encoder.

:class:`ModelHost` holds everything a running service keeps about its models and nothing about HTTP:
problems are domain exceptions (``registry.VersionError`` / ``IncompatibleVersion``), which
``reloop.serve.app`` turns into status codes.

* **Versions.** At start the version ``CURRENT`` names is loaded completely and checked (model name and
  options, tensor shapes, feature map, memory key and width: ``registry.model_fingerprint``); when it
  cannot be served, the newest earlier version that can serves (logged). :meth:`ModelHost.serving`
  stats ``CURRENT`` at most every ``poll_interval`` seconds; when it changed a background thread loads
  and checks the new version, and only then swaps one reference, so no request waits for or fails on a
  swap. A refused version is logged once and kept in ``refused``; the old one keeps serving.
* **Compensation.** :meth:`ModelHost.score` gives the base prediction and the memory key ``h`` from one
  ``forward_key`` call, then the served prediction through the error memory; :meth:`ModelHost.remember`
  writes labelled ``(h, y, ŷ_base)`` into it. The memory is emptied on a swap when the run's
  ``memory.reset_on_update`` says so (feedback for an older version then no longer reaches it), and
  rebuilt from the log at start.
* **Vocabularies.** The encoder snapshot plus every id assigned since (the log's ``vocab`` table) is
  restored at start; :meth:`ModelHost.encode` grows it (``reloop.serve.online``) and keeps the new
  entries pending until the caller commits them with the impressions (:meth:`take_pending` /
  :meth:`committed`); a swap writes a fresh snapshot.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from reloop.components import build_memory, memory_key, memory_resets_on_update
from reloop.config import Config, expert_spec
from reloop.models.base import CTRModel
from reloop.serve.events import log_event
from reloop.serve.guard import ErrorLog
from reloop.serve.log import USERS_TABLE, ServeLog
from reloop.serve.metrics import ServiceMetrics
from reloop.serve.online import OnlineEncoder
from reloop.serve.records import Columns
from reloop.serve.registry import (
    IncompatibleVersion,
    ModelDir,
    RegistryError,
    VersionError,
    fingerprint_diff,
    model_fingerprint,
)

logger = logging.getLogger("reloop.serve.host")

MEMORY_CHUNK = 4096  # rows per write when the memory is rebuilt from the log


@dataclass
class Serving:
    version: int
    model: CTRModel
    meta: dict[str, Any]


@dataclass
class Scored:
    """One batch scored by one version: the memory key and both predictions (CPU tensors)."""

    version: int
    h: torch.Tensor
    p_base: torch.Tensor
    p_served: torch.Tensor


class ModelHost:
    """The serving model, its error memory and the live encoder of one model directory."""

    def __init__(
        self,
        md: ModelDir,
        cfg: Config,
        run: str,
        log: ServeLog,
        device: torch.device,
        poll_interval: float = 0.5,
        metrics: ServiceMetrics | None = None,
        errors: ErrorLog | None = None,
    ) -> None:
        self.md = md
        self.cfg = cfg
        self.spec = expert_spec(cfg, run)[0]
        self.log = log
        self.device = device
        self.poll_interval = poll_interval
        self.metrics = metrics or ServiceMetrics()
        self.errors = errors or ErrorLog()
        self._enc_lock = threading.Lock()  # encoder and pending vocabulary
        self._mem_lock = threading.Lock()  # error memory and the swap of the serving reference
        self._reload_lock = threading.Lock()
        self._poll_lock = threading.Lock()

        self.encoder = md.encoder()
        self._restore_vocab()
        schema = self.encoder.schema
        self.online = (
            OnlineEncoder(self.encoder, *md.user_capacity()) if schema.user else OnlineEncoder(self.encoder, 0, 0)
        )
        self._pending_vocab: dict[tuple[str, str], int] = {}

        self.key = memory_key(self.spec.memory)
        self.fingerprint: dict[str, Any] | None = None
        self.refused: dict[str, Any] | None = None  # the last version CURRENT named that was refused
        self._stamp = md.current_stamp()
        self.state = self._startup_version()
        self._next_poll = time.monotonic() + poll_interval
        self._loading = False
        # combine runs (reloop.serve.ensemble): loads a new version's experts before it is swapped in
        self.before_swap: Callable[[Serving], None] | None = None
        self.compensator = build_memory(
            self.spec.memory, dim=self.state.model.key_dim(self.key), seed=int(md.info().get("seed", 0)), device=device
        )
        self.reset_on_update = memory_resets_on_update(self.spec.memory)
        self._rebuild_memory()
        self.metrics.version.set(self.state.version)

    # -- versions ------------------------------------------------------------------------------
    def _load_version(self, version: int) -> Serving:
        """A version, fully loaded and checked against the service (``VersionError`` /
        ``IncompatibleVersion`` with a one-line reason otherwise); nothing in its files is executed."""
        model = self.md.load_serving(version, expect_config=self.cfg.model)
        meta = self.md.meta(version)
        fp = model_fingerprint(model, self.key)
        if self.fingerprint is not None and fp != self.fingerprint:
            raise IncompatibleVersion(
                version,
                f"version {version}: another model than the one serving ({fingerprint_diff(fp, self.fingerprint)})",
            )
        memory = (meta.get("composition") or {}).get("memory", self.spec.memory)
        if memory != self.spec.memory:
            raise IncompatibleVersion(
                version, f"version {version}: made for memory {memory!r}, the service runs {self.spec.memory!r}"
            )
        if self.fingerprint is None:
            self.fingerprint = fp
        return Serving(version, model.to(self.device).eval(), meta)

    def _startup_version(self) -> Serving:
        """The version ``CURRENT`` names; when it cannot be served, the newest earlier one that can."""
        wanted: int | None = None
        try:
            wanted = self.md.current_version()
            return self._load_version(wanted)
        except RegistryError as e:  # VersionError, or CURRENT itself is unreadable
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
            log_event(
                logger,
                logging.WARNING,
                "current_unservable",
                current=wanted,
                serving=version,
                action=f"serving version {version}, the newest earlier version that loads "
                "(fix the version or publish a new one)",
                reason=problem,
            )
            return state
        raise RegistryError(
            f"{self.md.path}: no version can be served: {problem}"
            + (f"; earlier versions: {'; '.join(tried[:2])}" if tried else "")[:1000]
        )

    def serving(self) -> Serving:
        """The model to use for this request (also the cheap, rate-limited poll of ``CURRENT``).

        Callers read the reference once and use that version throughout a request."""
        now = time.monotonic()
        if now >= self._next_poll:
            with self._poll_lock:
                if now >= self._next_poll and not self._loading:
                    self._next_poll = now + self.poll_interval
                    if self.md.current_stamp() != self._stamp:
                        self._loading = True
                        threading.Thread(target=self._reload_background, daemon=True, name="reloop-reload").start()
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
            log_event(
                logger, logging.WARNING, "version_refused", version=version, serving=self.state.version, reason=reason
            )
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
                if self.before_swap is not None:
                    self.before_swap(fresh)
            except VersionError as e:
                self._refuse(stamp, version, str(e))
                raise
            previous = self.state.version
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
            log_event(
                logger,
                logging.INFO,
                "version_swapped",
                version=version,
                previous=previous,
                memory_reset=self.compensator is not None and self.reset_on_update,
            )
            return True, version

    # -- vocabularies --------------------------------------------------------------------------
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

    def encode(self, data: Columns, n: int) -> dict[str, torch.Tensor]:
        """Encoded tensors of canonical columns (``OnlineEncoder``: cost independent of the number of
        known ids), under the encoder lock; new vocabulary entries wait in the pending set for the
        next durable commit of impressions."""
        with self._enc_lock:
            cols, new = self.online.encode(data, n)
            for tbl, ident, idx in new:
                self._pending_vocab[(tbl, ident)] = idx
            return cols

    def take_pending(self) -> list[tuple[str, str, int]]:
        """The vocabulary entries not yet committed to the log (``(table, id, index)``)."""
        with self._enc_lock:
            return [(t, i, idx) for (t, i), idx in self._pending_vocab.items()]

    def committed(self, entries: list[tuple[str, str, int]]) -> None:
        """``entries`` are in the log now."""
        if entries:
            with self._enc_lock:
                for t, i, _ in entries:
                    self._pending_vocab.pop((t, i), None)

    # -- scoring and the error memory ----------------------------------------------------------
    def score(self, cols: dict[str, torch.Tensor], state: Serving | None = None) -> Scored:
        """Base prediction, memory key (one ``forward_key`` call: the key of exactly these records)
        and the served prediction after the error memory, by ``state`` (default: the serving one)."""
        state = state or self.serving()
        with torch.inference_mode():  # no autograd bookkeeping at all (cheaper than no_grad per op)
            batch = cols if self.device.type == "cpu" else {k: v.to(self.device) for k, v in cols.items()}
            logits, h = state.model.forward_key(batch, self.key)
            p_base = torch.sigmoid(logits.float())
            h = h.float()
            if self.compensator is not None:
                with self._mem_lock:
                    p_served = self.compensator.predict(h, p_base)
            else:
                p_served = p_base
            return Scored(state.version, h.cpu(), p_base.cpu(), p_served.cpu())  # one copy back per request

    def remember(self, rows: list[tuple[bytes, int, float, int]]) -> int:
        """Write labelled impressions ``(h bytes, label, p_base, model version)`` into the error memory;
        with ``reset_on_update`` only those of the serving version. Returns how many were written."""
        return self.remember_groups([rows])[0]

    def remember_groups(self, groups: Sequence[list[tuple[bytes, int, float, int]]]) -> list[int]:
        """:meth:`remember` for several requests at once, in order, as one memory write (its fixed
        cost, ~0.25 ms, paid once); how many rows of each group were written."""
        if self.compensator is None:
            return [0] * len(groups)
        with self._mem_lock:
            current = self.state.version
            keeps = [[r for r in rows if not self.reset_on_update or r[3] == current] for rows in groups]
            every = [r for keep in keeps for r in keep]
            if every:
                self._write_memory(every, self.state.model.key_dim(self.key))
            return [len(keep) for keep in keeps]

    def _write_memory(self, rows: Sequence[tuple[Any, ...]], d: int) -> None:
        assert self.compensator is not None
        h = torch.from_numpy(np.frombuffer(b"".join(r[0] for r in rows), dtype=np.float32).reshape(-1, d).copy())
        y = torch.tensor([float(r[1]) for r in rows])
        p = torch.tensor([float(r[2]) for r in rows])
        self.compensator.feedback(h, y, p)

    def _rebuild_memory(self) -> None:
        """Re-write the memory from the log (feedback of the serving version, in arrival order)."""
        if self.compensator is None:
            return
        rows = self.log.feedback_for_version(self.state.version if self.reset_on_update else None, limit=1_000_000)
        d = self.state.model.key_dim(self.key)
        for i in range(0, len(rows), MEMORY_CHUNK):
            self._write_memory(rows[i : i + MEMORY_CHUNK], d)

    def memory_info(self) -> dict[str, Any] | None:
        if self.compensator is None:
            return None
        return {
            "n_written": self.compensator.memory.n_written,
            "nbytes": self.compensator.memory.nbytes,
            "reset_on_update": self.reset_on_update,
        }
