"""The service's encoder: the offline vocabularies, grown one request at a time at a cost that does not
depend on how many ids are already known.

Every online vocabulary follows the offline encoder's policy (``reloop.data.encode``): ids get indices in
arrival order (by row, then field in schema order, then list position) up to the table's fixed
capacity; past it an id falls into one of the table's ``overflow`` hashed buckets, computed by
``TableVocab.encode`` itself. The user index (gAUC groups; unbounded offline, where the data are
finite) gets the same treatment online: a capacity sized like a table's from the pretraining users
(``registry.capacity_for``) and hashed overflow buckets after it.

Cost: a batch whose ids are all known is ``FeatureEncoder.encode_known`` (dict look-ups). A batch with
unseen ids costs one dict look-up per value plus one small polars hash of the overflow ids only —
never a pass over the known ids (``FeatureEncoder.transform`` rebuilds lookup series of the whole
vocabulary and of every user whenever one grew: 185 ms per request at 500k known users).
``tests/test_serve_bounds.py`` checks that the result equals ``transform(grow=True)`` while the
tables have room and overflow alike, and that the cost stays flat as the vocabularies fill.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import polars as pl
import torch

from reloop.data.encode import FeatureEncoder, TableVocab
from reloop.data.schema import N_RESERVED
from reloop.serve.log import (
    USERS_TABLE as USERS,  # the user index's name in the log's vocab table
)


def overflow_buckets(capacity: int, overflow: int, ids: Sequence[str]) -> list[int]:
    """The hashed overflow bucket of each id of a table of this capacity (``TableVocab.encode`` of
    ids it does not know, ``grow=True``): ``N_RESERVED + capacity + hash(id) mod overflow``."""
    if not ids:
        return []
    return TableVocab(capacity, overflow).encode(pl.Series(list(ids), dtype=pl.String), grow=True).tolist()


class OnlineEncoder:
    """``encode(columns, n)``: encoded tensors and the vocabulary entries this batch created.

    Not thread-safe: the service calls it under its encoder lock.
    """

    def __init__(self, encoder: FeatureEncoder, user_capacity: int, user_overflow: int) -> None:
        self.encoder = encoder
        self.user_capacity = user_capacity
        self.user_overflow = user_overflow
        schema = encoder.schema
        self.fields = [
            (s.name, s.kind == "sequence", s.vocab or s.name, s.max_len) for s in schema.features if s.kind != "numeric"
        ]
        self.user = schema.user

    def encode(self, columns: dict[str, list], n: int) -> tuple[dict[str, torch.Tensor], list[tuple[str, str, int]]]:
        """Validated columns (ids as str, sequences as lists of str, None = missing) -> tensors, new entries."""
        cols = self.encoder.encode_known(columns, n)
        if cols is not None:
            return cols, []
        new, overflow = self._resolve(columns, n)
        with self._visible(overflow):
            cols = self.encoder.encode_known(columns, n)
        if cols is None:  # the parser hands over str ids only, so every id is now resolvable
            raise RuntimeError("online encoder: a value could not be encoded after resolving its ids")
        return cols, new

    def _resolve(
        self, columns: dict[str, list], n: int
    ) -> tuple[list[tuple[str, str, int]], dict[str, dict[str, int]]]:
        """Give unseen ids the next indices (arrival order, up to capacity); the others their bucket."""
        vocabs = self.encoder.vocabs
        new: list[tuple[str, str, int]] = []
        late: dict[str, dict[str, None]] = {}  # table -> unseen ids past capacity, in arrival order
        for r in range(n):
            for name, is_seq, table, max_len in self.fields:
                value = columns[name][r]
                if value is None:
                    continue
                vocab = vocabs[table]
                index = vocab.index
                for v in value[:max_len] if is_seq else (value,):
                    if v in index:
                        continue
                    if len(index) < vocab.capacity:
                        index[v] = N_RESERVED + len(index)
                        new.append((table, v, index[v]))
                    else:
                        late.setdefault(table, {})[v] = None
        overflow = {
            t: dict(zip(ids, overflow_buckets(vocabs[t].capacity, vocabs[t].overflow, list(ids))))
            for t, ids in late.items()
        }
        if self.user:
            users = self.encoder.users
            late_users: dict[str, None] = {}
            for v in columns[self.user]:
                if v is None or v in users:
                    continue
                if len(users) < self.user_capacity:
                    users[v] = len(users)
                    new.append((USERS, v, users[v]))
                else:
                    late_users[v] = None
            if late_users:
                ids = list(late_users)
                buckets = overflow_buckets(self.user_capacity, self.user_overflow, ids)
                overflow[USERS] = {u: b - N_RESERVED for u, b in zip(ids, buckets)}  # users count from 0
        return new, overflow

    @contextlib.contextmanager
    def _visible(self, overflow: dict[str, dict[str, Any]]) -> Iterator[None]:
        """Overflow ids present in their tables for one ``encode_known`` call, removed again after.

        Removing the last-inserted keys leaves every dict (and so the arrival order ``state_dict``
        relies on) exactly as before; ``TableVocab``'s cached lookup series is keyed on the dict's
        size, which is restored too.
        """
        added: list[tuple[dict[str, int], str]] = []
        try:
            for table, buckets in overflow.items():
                index = self.encoder.users if table == USERS else self.encoder.vocabs[table].index
                for v, b in buckets.items():
                    index[v] = b
                    added.append((index, v))
            yield
        finally:
            for index, v in reversed(added):
                del index[v]
