"""Encoders: raw log columns -> contiguous id / value tensors, never using the future.

* Ids get indices in order of first arrival (row order, fields in schema order), so the index of an id
  depends only on what came before it.
* Each table has a fixed capacity (from the schema, or the pretraining periods' distinct count times a
  head-room factor). Past capacity, ids fall into ``overflow`` hashed buckets; fixed shapes let ASMG
  align parameters across models. Index 0 is padding / missing, 1 is the out-of-vocabulary row used
  when the encoder is frozen (``grow=False``, e.g. a served model that cannot learn new ids).
* Numeric columns are z-scored (or quantile-bucketised) with statistics of the pretraining periods.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import polars as pl
import torch

from reloop.data.schema import N_RESERVED, OOV, PAD, EncodedField, FeatureMap, FeatureSchema

HASH_SEED = 0x5EED
SMALL_BATCH = 256  # up to this many rows, ``transform`` tries the dict fast path first


def _id_key(v: Any) -> str:
    """An id as the vocabulary stores it (``transform`` casts to polars String). Booleans and floats
    cast differently in polars and Python, so they raise KeyError and take the polars path."""
    if isinstance(v, str):
        return v
    if isinstance(v, (bool, float, np.floating)):
        raise KeyError(v)
    return str(v)


@dataclass
class TableVocab:
    """Arrival-ordered vocabulary of one embedding table."""

    capacity: int
    overflow: int
    index: dict[str, int] = field(default_factory=dict)
    # The vocabulary as polars Series, rebuilt only when it grows: encoding used to rebuild them per
    # call and per field, a fixed cost on the service's per-request path.
    # Keyed on the dict's identity and size: ids are only ever added, and a replaced dict is rebuilt.
    _lookup: tuple[tuple[int, int], pl.Series, pl.Series] | None = field(default=None, repr=False, compare=False)

    def lookup(self) -> tuple[pl.Series, pl.Series]:
        key = (id(self.index), len(self.index))
        if self._lookup is None or self._lookup[0] != key:
            self._lookup = (
                key,
                pl.Series(list(self.index), dtype=pl.String),
                pl.Series(list(self.index.values()), dtype=pl.Int64),
            )
        return self._lookup[1], self._lookup[2]

    @property
    def size(self) -> int:
        return N_RESERVED + self.capacity + self.overflow

    def grow(self, arrivals: pl.Series) -> None:
        """Give unseen ids of ``arrivals`` (already in arrival order) the next free indices."""
        fresh = arrivals.cast(pl.String).drop_nulls().unique(maintain_order=True)
        fresh = fresh.filter(~fresh.is_in(self.lookup()[0].implode()))
        room = self.capacity - len(self.index)
        start = N_RESERVED + len(self.index)
        for offset, v in enumerate(fresh.head(max(room, 0)).to_list()):
            self.index[v] = start + offset

    def encode(self, values: pl.Series, grow: bool) -> np.ndarray:
        """Ids for ``values`` (nulls -> PAD); unknown ids -> hashed overflow (``grow``) or OOV."""
        values = values.cast(pl.String)
        known, ids = self.lookup()
        mapped = values.replace_strict(known, ids, default=None, return_dtype=pl.Int64)
        if grow:
            # Past capacity: hashed overflow bucket (stable for a given polars version and seed).
            hashed = (values.hash(seed=HASH_SEED) % max(self.overflow, 1)).cast(pl.Int64) + N_RESERVED + self.capacity
            fallback = hashed if self.overflow > 0 else pl.Series([OOV] * len(values), dtype=pl.Int64)
        else:
            fallback = pl.Series([OOV] * len(values), dtype=pl.Int64)
        out = mapped.to_numpy(allow_copy=True)
        missing_id = np.isnan(out) if out.dtype.kind == "f" else np.zeros(len(out), bool)
        out = np.where(missing_id, fallback.to_numpy(), out).astype(np.int64)
        out[values.is_null().to_numpy()] = PAD
        return out


@dataclass
class EncoderConfig:
    headroom: float = 2.0
    min_capacity: int = 16
    overflow_share: float = 0.125


class FeatureEncoder:
    """Schema-driven encoder with arrival-ordered vocabularies (see module docstring)."""

    def __init__(self, schema: FeatureSchema, config: EncoderConfig | None = None) -> None:
        self.schema = schema
        self.config = config or EncoderConfig()
        self.vocabs: dict[str, TableVocab] = {}
        self.numeric_stats: dict[str, tuple[float, float]] = {}
        self.bucket_edges: dict[str, np.ndarray] = {}
        self.users: dict[str, int] = {}

    # -- fitting sizes on the pretraining rows only -------------------------------------------
    def table_of(self, name: str) -> str:
        spec = self.schema.feature(name)
        return spec.vocab or spec.name

    def fit_capacities(self, pretrain: pl.DataFrame) -> None:
        """Fix table capacities and numeric statistics from the pretraining periods (no future)."""
        distinct: dict[str, set] = {}
        explicit: dict[str, int] = {}
        for spec in self.schema.features:
            if spec.kind == "numeric":
                col = pretrain[spec.name].cast(pl.Float64)
                if spec.numeric == "normalize":
                    mean = col.mean() or 0.0
                    std = col.std() or 1.0
                    self.numeric_stats[spec.name] = (float(mean), float(std) if std > 0 else 1.0)
                else:
                    qs = np.linspace(0, 1, spec.buckets + 1)[1:-1]
                    vals = col.drop_nulls().to_numpy()
                    edges = np.unique(np.quantile(vals, qs)) if len(vals) else np.array([0.0])
                    self.bucket_edges[spec.name] = edges
                continue
            table = spec.vocab or spec.name
            col = pretrain[spec.name]
            values = col.explode() if spec.kind == "sequence" else col
            distinct.setdefault(table, set()).update(values.drop_nulls().cast(pl.String).unique().to_list())
            if spec.capacity:
                explicit[table] = max(explicit.get(table, 0), spec.capacity)
        cfg = self.config
        for table, seen in distinct.items():
            cap = explicit.get(table) or max(cfg.min_capacity, math.ceil(len(seen) * cfg.headroom))
            self.vocabs[table] = TableVocab(capacity=cap, overflow=max(8, math.ceil(cap * cfg.overflow_share)))

    def feature_map(self) -> FeatureMap:
        fields = []
        for spec in self.schema.features:
            if spec.kind == "numeric" and spec.numeric == "normalize":
                fields.append(EncodedField(name=spec.name, kind="numeric", table=spec.name, size=0))
            elif spec.kind == "numeric":
                size = N_RESERVED + len(self.bucket_edges[spec.name]) + 1
                fields.append(EncodedField(name=spec.name, kind="categorical", table=spec.name, size=size))
            else:
                table = spec.vocab or spec.name
                fields.append(
                    EncodedField(
                        name=spec.name,
                        kind=spec.kind,
                        table=table,
                        size=self.vocabs[table].size,
                        max_len=spec.max_len if spec.kind == "sequence" else 1,
                    )
                )
        return FeatureMap(fields=fields, user_field=self.schema.user)

    # -- encoding ------------------------------------------------------------------------------
    def transform(self, frame: pl.DataFrame, grow: bool = True) -> dict[str, torch.Tensor]:
        """Encode rows in order; with ``grow`` unseen ids get new indices (arrival order)."""
        if not self.vocabs and any(s.kind != "numeric" for s in self.schema.features):
            raise RuntimeError("fit_capacities() must run before transform()")
        if 0 < len(frame) <= SMALL_BATCH:
            fast = self.encode_known(frame.to_dict(as_series=False), len(frame))
            if fast is not None:
                return fast
        out: dict[str, torch.Tensor] = {}
        if grow:
            self._grow_tables(frame)
        for spec in self.schema.features:
            col = frame[spec.name]
            if spec.kind == "numeric":
                x = col.cast(pl.Float64)
                if spec.numeric == "normalize":
                    mean, std = self.numeric_stats[spec.name]
                    arr = ((x - mean) / std).fill_null(0.0).to_numpy()
                    out[spec.name] = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))
                else:
                    vals = x.to_numpy()
                    ids = np.searchsorted(self.bucket_edges[spec.name], vals, side="right") + N_RESERVED
                    ids[np.isnan(vals)] = PAD
                    out[spec.name] = torch.from_numpy(ids.astype(np.int64))
            elif spec.kind == "categorical":
                out[spec.name] = torch.from_numpy(self.vocabs[spec.vocab or spec.name].encode(col, grow))
            else:
                out[spec.name] = self._encode_sequence(spec.name, col, spec.max_len, grow)
        out["label"] = torch.from_numpy(frame[self.schema.label].cast(pl.Float32).to_numpy().copy())
        if self.schema.user:
            out["user"] = torch.from_numpy(self._encode_users(frame[self.schema.user]))
        return out

    def encode_known(self, columns: Mapping[str, Sequence[Any]], n: int) -> dict[str, torch.Tensor] | None:
        """``transform(grow=True)`` of a small batch given as Python columns, or None.

        The fast path for one request or a few rows: when every categorical and sequence id is
        already in its vocabulary (and every user, when the schema has one), the result equals
        ``transform`` and nothing grows, so dict look-ups replace the polars pass and its fixed
        per-call cost (milliseconds, whatever the batch). Returns None as soon as any id is unseen or a
        sequence holds a null element; the caller then takes ``transform``. ``label`` is read from
        ``columns`` when present, else zeros (a request to score has no label yet).
        """
        if not self.vocabs and any(s.kind != "numeric" for s in self.schema.features):
            raise RuntimeError("fit_capacities() must run before encode_known()")
        out: dict[str, torch.Tensor] = {}
        try:
            for spec in self.schema.features:
                col = columns[spec.name]
                if spec.kind == "categorical":
                    index = self.vocabs[spec.vocab or spec.name].index
                    out[spec.name] = torch.tensor(
                        list(map(index.__getitem__, col))  # all strings (the service's records): C loop
                        if set(map(type, col)) == {str}
                        else [PAD if v is None else index[_id_key(v)] for v in col],
                        dtype=torch.int64,
                    )
                elif spec.kind == "sequence":
                    index = self.vocabs[spec.vocab or spec.name].index
                    ids = torch.zeros((n, spec.max_len), dtype=torch.int64)
                    for r, items in enumerate(col):
                        if items:
                            row = [index[_id_key(v)] for v in list(items)[: spec.max_len]]  # None -> KeyError
                            ids[r, : len(row)] = torch.tensor(row, dtype=torch.int64)
                    out[spec.name] = ids
                elif spec.numeric == "normalize":
                    mean, std = self.numeric_stats[spec.name]
                    out[spec.name] = torch.tensor(
                        [0.0 if v is None else (float(v) - mean) / std for v in col], dtype=torch.float32
                    )
                else:
                    vals = np.array([np.nan if v is None else float(v) for v in col], dtype=np.float64)
                    ids = np.searchsorted(self.bucket_edges[spec.name], vals, side="right") + N_RESERVED
                    ids[np.isnan(vals)] = PAD
                    out[spec.name] = torch.from_numpy(ids.astype(np.int64))
            label = columns.get(self.schema.label)
            out["label"] = (
                torch.tensor([float(v) for v in label], dtype=torch.float32)
                if label is not None
                else torch.zeros(n, dtype=torch.float32)
            )
            if self.schema.user:
                users = self.users
                ucol = columns[self.schema.user]
                out["user"] = torch.tensor(
                    list(map(users.__getitem__, ucol))
                    if set(map(type, ucol)) == {str}
                    else [-1 if v is None else users[_id_key(v)] for v in ucol],
                    dtype=torch.int64,
                )
        except (KeyError, TypeError, ValueError):  # unseen id, or a value only the polars path can judge
            return None
        return out

    def _grow_tables(self, frame: pl.DataFrame) -> None:
        """Assign new ids per table in true arrival order: by row, then field, then list position.

        Fields sharing a table (an item and a history of items) must interleave by row, or a later
        row's id could take a slot an earlier row's history id would have had (seeing the future).
        """
        by_table: dict[str, list[pl.DataFrame]] = {}
        for order, spec in enumerate(self.schema.features):
            if spec.kind == "numeric":
                continue
            col = frame[spec.name].cast(pl.List(pl.String) if spec.kind == "sequence" else pl.String)
            part = pl.DataFrame({"row": pl.int_range(len(frame), eager=True), "v": col})
            if spec.kind == "sequence":
                part = part.with_columns(pl.col("v").list.head(spec.max_len)).explode(
                    "v", empty_as_null=False, keep_nulls=False
                )
                part = part.with_columns(pos=pl.int_range(pl.len()).over("row"))
            else:
                part = part.with_columns(pos=pl.lit(0, dtype=pl.Int64))
            part = part.with_columns(field=pl.lit(order, dtype=pl.Int64)).select(
                "row", "field", pl.col("pos").cast(pl.Int64), pl.col("v").cast(pl.String)
            )
            by_table.setdefault(spec.vocab or spec.name, []).append(part)
        for table, parts in by_table.items():
            arrivals = pl.concat(parts).sort(["row", "field", "pos"], maintain_order=True)["v"]
            self.vocabs[table].grow(arrivals)

    def _encode_sequence(self, name: str, col: pl.Series, max_len: int, grow: bool) -> torch.Tensor:
        vocab = self.vocabs[self.table_of(name)]
        trimmed = col.list.head(max_len)
        lengths = trimmed.list.len().fill_null(0).to_numpy().astype(np.int64)
        flat = trimmed.explode(empty_as_null=False, keep_nulls=False)
        ids = vocab.encode(flat, grow)
        out = np.zeros((len(col), max_len), dtype=np.int64)
        rows = np.repeat(np.arange(len(col)), lengths)
        pos = np.arange(len(rows)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        out[rows, pos] = ids
        return torch.from_numpy(out)

    def _encode_users(self, col: pl.Series) -> np.ndarray:
        col = col.cast(pl.String)
        for v in col.drop_nulls().unique(maintain_order=True).to_list():
            self.users.setdefault(v, len(self.users))
        mapped = col.replace_strict(
            pl.Series(list(self.users), dtype=pl.String),
            pl.Series(list(self.users.values()), dtype=pl.Int64),
            default=-1,
            return_dtype=pl.Int64,
        )
        return mapped.fill_null(-1).to_numpy().astype(np.int64)

    # -- persistence (the service reloads the exact encoder) -----------------------------------
    def state_dict(self) -> dict:
        return {
            "schema": self.schema.model_dump(),
            "config": self.config.__dict__,
            "vocabs": {
                t: {"capacity": v.capacity, "overflow": v.overflow, "ids": list(v.index)}
                for t, v in self.vocabs.items()
            },
            "numeric_stats": self.numeric_stats,
            "bucket_edges": {k: v.tolist() for k, v in self.bucket_edges.items()},
            "users": list(self.users),
        }

    @classmethod
    def from_state(cls, state: dict) -> FeatureEncoder:
        enc = cls(FeatureSchema(**state["schema"]), EncoderConfig(**state["config"]))
        for t, v in state["vocabs"].items():
            enc.vocabs[t] = TableVocab(
                v["capacity"], v["overflow"], {s: N_RESERVED + i for i, s in enumerate(v["ids"])}
            )
        enc.numeric_stats = {k: tuple(v) for k, v in state["numeric_stats"].items()}
        enc.bucket_edges = {k: np.asarray(v) for k, v in state["bucket_edges"].items()}
        enc.users = {u: i for i, u in enumerate(state["users"])}
        return enc
