"""Raw JSON records -> the canonical columns the encoder reads, by the offline loaders' rules.

Every value goes through :mod:`reloop.data.values` — the rules ``load_csv`` / ``load_parquet`` apply
to whole columns — so a record encodes online exactly as the same row would offline
(``tests/test_values.py``). On top of those rules the service bounds what one request may hold
(``reloop.serve.guard.Limits``): ids of at most ``max_id`` characters (an integer id counts its digits),
sequences of at most ``max_sequence`` items, numbers with ``|x| <= max_abs_number``, no lone UTF-16
surrogate.
"""

from __future__ import annotations

import functools
import math
import operator
from collections.abc import Callable, Mapping
from typing import Any

import polars as pl

from reloop.data import values
from reloop.data.schema import FeatureSchema
from reloop.data.sources.config import parse_source_config
from reloop.serve.guard import Limits, utf8_ok

MISSING = object()  # a field the record does not hold

#: ``(record index, field, problem)``
FieldError = tuple[int, str, str]
#: Canonical columns: field -> one value per record (str / float / list[str] / None)
Columns = dict[str, list[Any]]


def sequence_separators(data: Mapping[str, Any]) -> dict[str, str]:
    """The separator of each sequence feature a run's ``data:`` section declares (CSV and Parquet
    sources; ``FeatureConfig.split_on``). Other sources declare none: their string-valued sequences
    split on :data:`reloop.data.values.DEFAULT_SEPARATOR`, as offline."""
    source = parse_source_config(dict(data))
    features = getattr(source, "features", None) or {}
    return {name: f.split_on for name, f in features.items() if f.kind == "sequence"}


class RecordParser:
    """Validated columns of a batch of raw records, or the problem of every bad value.

    ``separators``: the split string of each string-valued sequence feature (:func:`sequence_separators`;
    :data:`~reloop.data.values.DEFAULT_SEPARATOR` for the others).
    """

    def __init__(
        self, schema: FeatureSchema, limits: Limits | None = None, separators: Mapping[str, str] | None = None
    ) -> None:
        self.schema = schema
        self.limits = limits or Limits()
        self.separators = dict(separators or {})
        self.columns: list[tuple[str, str]] = [(f.name, f.kind) for f in schema.features]
        if schema.user and schema.user not in {f.name for f in schema.features}:
            self.columns.append((schema.user, "categorical"))

    def parse(self, records: list[dict[str, Any]]) -> tuple[Columns | None, list[FieldError]]:
        """Canonical columns (ids as str, numbers as float, sequences as lists of str, None = missing)
        or the sorted ``(record index, field, problem)`` of every bad value."""
        errors: list[FieldError] = []
        data: Columns = {}
        max_id, max_abs = self.limits.max_id, self.limits.max_abs_number
        for name, kind in self.columns:
            col = list(map(operator.methodcaller("get", name, MISSING), records))
            if kind == "categorical":
                # fast path (C loops): every value already canonical — a non-empty ASCII string — and
                # within the bounds
                if not (
                    set(map(type, col)) == {str}
                    and all(col)
                    and max(map(len, col)) <= max_id
                    and "".join(col).isascii()
                ):
                    col = self._each(col, name, errors, self._id)
            elif kind == "numeric":
                if not (
                    set(map(type, col)) == {float} and all(map(math.isfinite, col)) and max(map(abs, col)) <= max_abs
                ):
                    col = self._each(col, name, errors, self._number)
            else:
                sep = self.separators.get(name, values.DEFAULT_SEPARATOR)
                col = self._each(col, name, errors, functools.partial(self._sequence, separator=sep))
            data[name] = col
        if errors:
            errors.sort()
            return None, errors
        return data, errors

    def frame(self, data: Columns) -> pl.DataFrame:
        """The columns as the typed polars frame ``FeatureEncoder.transform`` reads."""
        dtypes: dict[str, pl.DataType] = {
            "categorical": pl.String(),
            "numeric": pl.Float64(),
            "sequence": pl.List(pl.String),
        }
        out = {name: pl.Series(name, data[name], dtype=dtypes[kind]) for name, kind in self.columns}
        n = len(next(iter(data.values()))) if data else 0
        out[self.schema.label] = pl.Series(self.schema.label, [0] * n, dtype=pl.Int8)
        return pl.DataFrame(out)

    @staticmethod
    def _each(col: list[Any], name: str, errors: list[FieldError], check: Callable[[Any], Any]) -> list[Any]:
        out: list[Any] = []
        for i, v in enumerate(col):
            if v is MISSING:
                errors.append((i, name, "field required"))
                out.append(None)
                continue
            try:
                out.append(check(v))
            except values.ValueProblem as e:
                errors.append((i, name, str(e)))
                out.append(None)
        return out

    def _bounded_id(self, v: str | None) -> str | None:
        if v is not None:
            if len(v) > self.limits.max_id:
                raise values.ValueProblem(
                    values.NOT_AN_ID, f"id of {len(v):,} characters (at most {self.limits.max_id})"
                )
            if not utf8_ok(v):
                raise values.ValueProblem(values.NOT_AN_ID, "invalid unicode (a lone UTF-16 surrogate)")
        return v

    def _id(self, v: Any) -> str | None:
        return self._bounded_id(values.id_value(v))

    def _number(self, v: Any) -> float | None:
        x = values.number_value(v)
        if x is not None and abs(x) > self.limits.max_abs_number:
            raise values.ValueProblem(
                values.NOT_A_NUMBER, f"expected a finite number with |x| <= {self.limits.max_abs_number:g}"
            )
        return x

    def _sequence(self, v: Any, separator: str) -> list[str]:
        items = values.sequence_value(v, separator)
        if len(items) > self.limits.max_sequence:
            raise values.ValueProblem(
                values.NOT_AN_ID, f"sequence of {len(items):,} ids (at most {self.limits.max_sequence})"
            )
        for x in items:
            try:
                self._bounded_id(x)
            except values.ValueProblem as e:
                raise values.ValueProblem(e.name, f"sequence item: {e}") from None
        return items
