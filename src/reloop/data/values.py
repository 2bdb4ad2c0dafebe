"""Raw value -> canonical value, one rule per feature kind, shared by the offline loaders and the service.

The offline loaders (``reloop.data.validate.clean_frame``, behind ``load_csv`` / ``load_parquet``) parse
whole polars columns; the service (``reloop.serve.records.RecordParser``) parses one JSON record at a
time. Both go through this module, which states each rule once and gives it two entry points: a
per-value function (:func:`id_value`, :func:`number_value`, :func:`sequence_value`) and a vectorised one
(:func:`id_column`, :func:`number_column`, :func:`sequence_column`). ``tests/test_values.py`` checks
that they agree value for value, and that one raw record encodes to the same tensors offline and online.

Canonical values (what ``reloop.data.encode.FeatureEncoder`` reads):

* **id** (a categorical feature, the user column, an item of a sequence): ``str``; ``None`` = missing.

  - ``None``, NaN and the empty string are missing.
  - A string is the id verbatim: not stripped, never re-read as a number (``"3.0"`` and ``"3"`` are two
    ids, ``"007"`` is not ``"7"``).
  - A number is the id of its *value*, whatever its type: an integral number is its decimal integer
    (``3``, ``3.0`` and ``-0.0``... → ``"3"``, ``"0"``), any other float its shortest round-trip text
    (``repr``: ``2.5`` → ``"2.5"``, ``inf`` → ``"inf"``). A Parquet float column (pandas stores integer
    ids with gaps as floats) and a JSON ``3`` or ``3.0`` therefore name the same id.
  - A boolean is ``"true"`` / ``"false"`` (the text of a boolean column).
  - Anything else (a list, a mapping) is a problem: a categorical value holds one id.

* **number** (a numeric feature, ``normalize`` or ``bucketize``): ``float``; ``None`` = missing.

  - ``None``, NaN and a string that is blank after stripping ASCII whitespace are missing.
  - ``int`` / ``float`` as they are; a boolean is 1.0 / 0.0.
  - A string, stripped of ASCII whitespace (``" \\t\\n\\r\\f\\v"``), must be a decimal number
    (:data:`NUMBER`: ``[+-]`` digits, optional fraction, optional exponent; or ``inf``, ``infinity``,
    ``nan`` in any case): ``" 2.5"`` → 2.5, ``"1e3"`` → 1000.0, ``"nan"`` → missing. Anything else
    (``"cheap"``, ``"1_000"``, ``"0x10"``, non-ASCII digits) is the problem ``not a number``.
  - ±infinity (also from a string or an integer beyond the float range) is the problem ``not a number``.

* **sequence**: ``list[str]``, possibly empty; missing (``None``, NaN) is ``[]``.

  - A string is split on the feature's ``separator`` (:data:`DEFAULT_SEPARATOR` when the config sets
    none); empty items are dropped; items are ids verbatim (``"a;;b"`` → ``["a", "b"]``).
  - A list: each item by the id rule; missing items (``None``, NaN, ``""``) are dropped; an item that is
    not an id (a nested list) is a problem.
  - The encoder keeps the first ``max_len`` items (``FeatureEncoder``); parsing never truncates.

Bounds (an id's length, a sequence's items, ``|x|``) are the service's (``reloop.serve.guard.Limits``)
and are checked there, after these rules; the offline loaders have none.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any

import numpy as np
import polars as pl

#: The separator of a string-valued sequence feature whose config sets none (``FeatureConfig.split_on``).
DEFAULT_SEPARATOR = "|"

#: What a numeric string is stripped of before it is read.
WHITESPACE = " \t\n\r\f\v"

#: A numeric string (after stripping :data:`WHITESPACE`); the same regex runs in polars and in ``re``.
NUMBER = r"(?i)^[+-]?(?:(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:e[+-]?[0-9]+)?|inf(?:inity)?|nan)$"

#: The problem names (offline bad-row reasons are ``"<column>: <name>"``).
NOT_A_NUMBER = "not a number"
NOT_AN_ID = "not an id"

_NUMBER_RE = re.compile(NUMBER)


class ValueProblem(ValueError):
    """A raw value that breaks its kind's rule; ``name`` is one of the problem names above and the
    message says what was found (``expected a number, got str 'cheap'``)."""

    def __init__(self, name: str, message: str) -> None:
        super().__init__(message)
        self.name = name


class ColumnTypeError(ValueError):
    """A whole column whose type cannot hold its feature kind (a list column declared categorical)."""


def _shown(v: Any) -> str:
    return f"{type(v).__name__} {v!r}"[:120]


# -- ids -------------------------------------------------------------------------------------------
def _float_id(v: float) -> str | None:
    if math.isnan(v):
        return None
    if v.is_integer():
        return str(int(v))
    return repr(float(v))


def id_value(v: Any) -> str | None:
    """The canonical id of one raw value (module docstring); raises :class:`ValueProblem`."""
    if type(v) is str:
        return v or None
    if v is None:
        return None
    if isinstance(v, (bool, np.bool_)):
        return "true" if v else "false"
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    if isinstance(v, (float, np.floating)):
        return _float_id(float(v))
    if isinstance(v, str):  # a str subclass
        return str(v) or None
    raise ValueProblem(NOT_AN_ID, f"expected a string or integer id, got {type(v).__name__}")


def _map_distinct(s: pl.Series, rule: Callable[[Any], str | None]) -> pl.Series:
    """``rule`` applied to each distinct value of ``s`` (the per-value rule, vectorised by value)."""
    distinct = s.drop_nulls().unique()
    mapped = pl.Series([rule(v) for v in distinct.to_list()], dtype=pl.String)
    return s.replace_strict(distinct, mapped, default=None, return_dtype=pl.String)


def id_column(s: pl.Series) -> pl.Series:
    """:func:`id_value` of every value of a column, as a String column (null = missing); raises
    :class:`ColumnTypeError` for a nested column."""
    dtype = s.dtype
    if isinstance(dtype, (pl.List, pl.Array, pl.Struct)):
        raise ColumnTypeError(f"has nested type {dtype}")
    if dtype.is_float():
        out = _map_distinct(s.fill_nan(None), _float_id)
    elif dtype == pl.String or isinstance(dtype, (pl.Categorical, pl.Enum)):
        st = s.cast(pl.String)
        out = pl.select(pl.when(st == "").then(None).otherwise(st)).to_series()
    else:  # integers ("3"), booleans ("true"), null; other types as their text
        out = s.cast(pl.String)
    return out.alias(s.name)


# -- numbers ---------------------------------------------------------------------------------------
def number_value(v: Any) -> float | None:
    """The canonical number of one raw value (module docstring); raises :class:`ValueProblem`."""
    if v is None:
        return None
    if isinstance(v, (bool, np.bool_)):
        return float(v)
    if isinstance(v, (int, float, np.integer, np.floating)):
        try:
            x = float(v)
        except OverflowError:
            raise ValueProblem(
                NOT_A_NUMBER, "expected a finite number, got an integer beyond the float range"
            ) from None
    elif isinstance(v, str):
        text = v.strip(WHITESPACE)
        if not text:
            return None
        if not _NUMBER_RE.fullmatch(text):
            raise ValueProblem(NOT_A_NUMBER, f"expected a number, got {_shown(v)}")
        x = float(text)
    else:
        raise ValueProblem(NOT_A_NUMBER, f"expected a number, got {_shown(v)}")
    if math.isnan(x):
        return None
    if math.isinf(x):
        raise ValueProblem(NOT_A_NUMBER, f"expected a finite number, got {_shown(v)}")
    return x


def number_column(s: pl.Series) -> tuple[pl.Series, pl.Series]:
    """:func:`number_value` of every value: ``(Float64 column, null = missing; bad mask)``, the bad
    mask true where :func:`number_value` raises. Raises :class:`ColumnTypeError` for a column of
    another type than numbers, booleans or strings."""
    dtype = s.dtype
    if dtype == pl.String:
        text = s.str.strip_chars(WHITESPACE)
        ok = text.str.contains(NUMBER)
        val = pl.select(pl.when(ok).then(text.cast(pl.Float64, strict=False))).to_series()
        bad = ~s.is_null() & (text != "") & ~ok
    elif dtype.is_numeric() or dtype in (pl.Boolean, pl.Null):
        val = s.cast(pl.Float64)
        bad = pl.Series([False] * len(s), dtype=pl.Boolean)
    else:
        raise ColumnTypeError(f"has type {dtype}; expected numbers")
    inf = val.is_infinite().fill_null(False)
    bad = (bad.fill_null(False) | inf).alias(s.name)
    val = pl.select(pl.when(val.is_nan() | val.is_infinite()).then(None).otherwise(val)).to_series()
    return val.cast(pl.Float64).alias(s.name), bad


# -- sequences -------------------------------------------------------------------------------------
def sequence_value(v: Any, separator: str = DEFAULT_SEPARATOR) -> list[str]:
    """The canonical sequence of one raw value (module docstring); raises :class:`ValueProblem`."""
    if v is None:
        return []
    if isinstance(v, str):
        return [x for x in v.split(separator) if x]
    if isinstance(v, (list, tuple)):
        out = []
        for x in v:
            try:
                item = id_value(x)
            except ValueProblem:
                raise ValueProblem(
                    NOT_AN_ID, f"sequence item: expected a string or integer id, got {type(x).__name__}"
                ) from None
            if item is not None:
                out.append(item)
        return out
    if isinstance(v, (float, np.floating)) and math.isnan(v):
        return []
    raise ValueProblem(
        NOT_AN_ID,
        f"expected a list of string or integer ids or a {separator!r}-delimited string, got {type(v).__name__}",
    )


def sequence_column(s: pl.Series, separator: str = DEFAULT_SEPARATOR) -> pl.Series:
    """:func:`sequence_value` of every value, as a List(String) column (missing = ``[]``); raises
    :class:`ColumnTypeError` for a column that is neither strings nor lists of ids."""
    dtype = s.dtype
    if isinstance(dtype, (pl.List, pl.Array)):
        inner = dtype.inner
        if isinstance(inner, (pl.List, pl.Array, pl.Struct)):
            raise ColumnTypeError(f"has type {dtype}; expected a list of ids")
        if inner is not None and inner.is_float():
            distinct = s.explode().drop_nulls().fill_nan(None).drop_nulls().unique()
            mapped = pl.Series([_float_id(v) for v in distinct.to_list()], dtype=pl.String)
            val = s.cast(pl.List(inner)).list.eval(
                pl.element().fill_nan(None).replace_strict(distinct, mapped, default=None, return_dtype=pl.String)
            )
        else:
            val = s.cast(pl.List(pl.String))
    elif dtype == pl.String:
        val = s.str.split(separator)
    elif dtype == pl.Null:
        val = s.cast(pl.List(pl.String))
    else:
        raise ColumnTypeError(f"has type {dtype}; expected a list column or {separator!r}-delimited strings")
    val = val.list.eval(pl.element().filter(pl.element().is_not_null() & (pl.element() != "")))
    return val.fill_null(pl.Series([[]], dtype=pl.List(pl.String))).alias(s.name)
