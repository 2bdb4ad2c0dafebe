"""Bad input: parse raw columns into canonical types, count and remove bad rows, fail loudly.

A row is *bad* when its label is missing or not 0/1, its time is missing or unparsable, or a
numeric feature holds something that is not a number. Bad rows are counted per reason
(``"<raw column>: <problem>"``) with the first 5 row numbers, removed, and reported in a
:class:`LoadReport`. Row numbers are 1-based positions among the *data* rows (the header is not
counted: in a CSV with a header, file line = row + 1; across Parquet shards, rows are numbered in
file-name order). If the bad share exceeds ``max_bad_share`` the load raises :class:`DataError`.
A missing required column raises :class:`DataError` naming it and listing the columns present.

Canonical types: label Int8 (0/1), time Int64 (unix seconds), categorical String (null = missing),
numeric Float64 (null = missing; NaN becomes null), sequence List(String) (null becomes []); feature
values follow the rules of :mod:`reloop.data.values`, which the service applies too.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import polars as pl

from reloop.data import values
from reloop.data.schema import FeatureSchema

N_EXAMPLES = 5


class DataError(ValueError):
    """The raw log cannot be loaded as configured (missing column, too many bad rows, bad file)."""


@dataclass
class LoadReport:
    """What a load read, kept and removed.

    ``rows_read`` counts raw data rows; ``rows_kept = rows_read - (rows with at least one bad
    reason)``. The loaded frame can have another height where a source adds rows (MovieLens
    implicit mode adds sampled negatives); ``notes`` says so.
    """

    rows_read: int
    rows_kept: int
    bad: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[int]] = field(default_factory=dict)
    source: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def rows_bad(self) -> int:
        return self.rows_read - self.rows_kept

    def summary(self) -> str:
        head = f"{self.source}: " if self.source else ""
        lines = [f"{head}read {self.rows_read:,} rows, kept {self.rows_kept:,}, removed {self.rows_bad:,} bad"]
        for reason, count in self.bad.items():
            rows = ", ".join(str(r) for r in self.examples.get(reason, []))
            lines.append(f"  {reason}: {count:,} rows (first: {rows})")
        lines.extend(f"  note: {n}" for n in self.notes)
        return "\n".join(lines)


@dataclass
class LoadedLog:
    """A canonical, time-sorted click log.

    ``frame`` holds ``label`` (Int8), ``time`` (Int64 unix seconds), the user column and the
    features of ``schema``, sorted by time ascending with ties in file order; ``truth`` names a
    column with the true click probability (synthetic streams only) that is *not* a feature.
    """

    frame: pl.DataFrame
    schema: FeatureSchema
    report: LoadReport
    truth: str | None = None


# --------------------------------------------------------------------------------------------------
# bad-row accounting


class RowChecker:
    """Collects per-reason bad-row masks over ``n_rows`` raw rows and enforces ``max_bad_share``."""

    def __init__(self, n_rows: int, source: str = "") -> None:
        self.n_rows = n_rows
        self.source = source
        self.bad_mask = np.zeros(n_rows, dtype=bool)
        self.bad: dict[str, int] = {}
        self.examples: dict[str, list[int]] = {}
        self.notes: list[str] = []

    def flag(self, column: str, problem: str, mask: pl.Series | np.ndarray) -> None:
        """Mark rows where ``mask`` is true as bad for reason ``"<column>: <problem>"``."""
        m = _as_bool_array(mask)
        if len(m) != self.n_rows:
            raise ValueError(f"mask of length {len(m)} for {self.n_rows} rows")
        count = int(m.sum())
        if count == 0:
            return
        reason = f"{column}: {problem}"
        self.bad[reason] = self.bad.get(reason, 0) + count
        rows = (np.flatnonzero(m)[:N_EXAMPLES] + 1).tolist()
        self.examples[reason] = sorted(set(self.examples.get(reason, [])) | set(rows))[:N_EXAMPLES]
        self.bad_mask |= m

    def report(self) -> LoadReport:
        kept = self.n_rows - int(self.bad_mask.sum())
        return LoadReport(
            rows_read=self.n_rows,
            rows_kept=kept,
            bad=dict(self.bad),
            examples={k: list(v) for k, v in self.examples.items()},
            source=self.source,
            notes=list(self.notes),
        )

    def enforce(self, max_bad_share: float) -> LoadReport:
        """Return the report, or raise :class:`DataError` if bad rows exceed ``max_bad_share``."""
        report = self.report()
        n_bad = report.rows_bad
        if self.n_rows and n_bad / self.n_rows > max_bad_share:
            problems = "; ".join(
                f"column {reason.split(': ', 1)[0]!r}: {count:,} rows {reason.split(': ', 1)[1]} "
                f"(first rows: {', '.join(map(str, report.examples[reason]))})"
                for reason, count in sorted(report.bad.items(), key=lambda kv: -kv[1])
            )
            where = f" in {self.source}" if self.source else ""
            raise DataError(
                f"{n_bad:,} of {self.n_rows:,} rows ({n_bad / self.n_rows:.2%}){where} are bad, more than "
                f"max_bad_share={max_bad_share:g}: {problems}. Rows are 1-based data rows (header not "
                f"counted). Fix the data or raise max_bad_share."
            )
        return report

    @property
    def keep(self) -> np.ndarray:
        return ~self.bad_mask


def _as_bool_array(mask: pl.Series | np.ndarray) -> np.ndarray:
    if isinstance(mask, pl.Series):
        return mask.fill_null(False).cast(pl.Boolean).to_numpy()
    return np.asarray(mask, dtype=bool)


def require_columns(present: Sequence[str], required: Iterable[tuple[str, str]], where: str) -> None:
    """Raise :class:`DataError` for the first ``(column, role)`` in ``required`` not in ``present``."""
    have = set(present)
    missing = [(c, role) for c, role in required if c not in have]
    if missing:
        names = ", ".join(f"{c!r} ({role})" for c, role in missing)
        raise DataError(f"{where}: missing required column(s) {names}; columns present: {list(present)}")


# --------------------------------------------------------------------------------------------------
# column parsers: each returns the canonical series and {problem: mask}

_NUMERIC_DTYPES = (pl.Float32, pl.Float64)


def _is_int(dtype: pl.DataType) -> bool:
    return dtype.is_integer()


def _strip(s: pl.Series) -> pl.Series:
    return s.str.strip_chars()


def parse_label(s: pl.Series) -> tuple[pl.Series, dict[str, pl.Series]]:
    """0/1 labels from ints, floats (0.0/1.0), booleans or strings of those."""
    dtype = s.dtype
    if dtype == pl.Boolean:
        val = s.cast(pl.Float64)
    elif dtype == pl.String:
        st = _strip(s)
        low = st.str.to_lowercase()
        num = st.cast(pl.Float64, strict=False)
        val = pl.select(pl.when(low == "true").then(1.0).when(low == "false").then(0.0).otherwise(num)).to_series()
    elif dtype.is_numeric():
        val = s.cast(pl.Float64)
    else:
        raise DataError(f"label column {s.name!r} has type {dtype}; expected 0/1 integers, booleans or strings")
    missing = s.is_null()
    bad = ~missing & ~(val.is_in([0.0, 1.0]).fill_null(False))
    out = val.fill_null(0.0).cast(pl.Int8).alias(s.name)
    return out, {"missing label": missing, "label not 0/1": bad}


_ISO_FORMATS = (
    ("%Y-%m-%d", None),
    ("%Y-%m-%dT%H:%M:%S%.f", None),
    ("%Y-%m-%dT%H:%M", None),
    ("%Y-%m-%dT%H:%M:%S%.f%#z", "UTC"),
    ("%Y-%m-%dT%H:%M%#z", "UTC"),
)


def _parse_time_strings(s: pl.Series) -> pl.Series:
    """Unix seconds (int or float) or ISO 8601 (date, date-time, optional fraction, Z or offset).
    Naive date-times are taken as UTC."""
    st = pl.col("t").str.strip_chars()
    num = st.cast(pl.Float64, strict=False)
    num = pl.when(num.is_finite()).then(num.floor().cast(pl.Int64, strict=False))
    norm = st.str.replace(r"^(\d{4}-\d{2}-\d{2})[ T]", "${1}T").str.replace(r"[Zz]$", "+00:00")
    iso = [
        norm.str.to_datetime(fmt, strict=False, time_zone=tz, time_unit="us").dt.epoch("s") for fmt, tz in _ISO_FORMATS
    ]
    return pl.DataFrame({"t": s}).select(pl.coalesce([num, *iso])).to_series()


def parse_time(s: pl.Series) -> tuple[pl.Series, dict[str, pl.Series]]:
    """Unix seconds as Int64 from ints, floats (floored), datetimes, dates or strings."""
    dtype = s.dtype
    if isinstance(dtype, pl.Datetime):
        val = s.dt.epoch("s")
    elif dtype == pl.Date:
        val = s.cast(pl.Datetime("us")).dt.epoch("s")
    elif _is_int(dtype):
        val = s.cast(pl.Int64)
    elif dtype in _NUMERIC_DTYPES:
        f = s.cast(pl.Float64)
        val = pl.select(pl.when(f.is_finite()).then(f.floor().cast(pl.Int64, strict=False))).to_series()
    elif dtype == pl.String:
        val = _parse_time_strings(s)
    else:
        raise DataError(f"time column {s.name!r} has type {dtype}; expected unix seconds or ISO 8601 strings")
    missing = s.is_null()
    bad = ~missing & val.is_null()
    return val.fill_null(0).cast(pl.Int64).alias(s.name), {"missing time": missing, "unparsable time": bad}


def parse_numeric(s: pl.Series) -> tuple[pl.Series, dict[str, pl.Series]]:
    """Float64 by the number rule of :mod:`reloop.data.values` (numbers, booleans, numeric strings;
    null, blank and NaN = missing; other text or ±inf = bad)."""
    try:
        val, bad = values.number_column(s)
    except values.ColumnTypeError as e:
        raise DataError(f"numeric feature {s.name!r} {e}") from None
    return val, {values.NOT_A_NUMBER: bad}


def parse_categorical(s: pl.Series) -> pl.Series:
    """String ids by the id rule of :mod:`reloop.data.values` (null, NaN and "" = missing)."""
    try:
        return values.id_column(s)
    except values.ColumnTypeError as e:
        raise DataError(f"categorical feature {s.name!r} {e}; declare it as a sequence") from None


def parse_sequence(s: pl.Series, separator: str) -> pl.Series:
    """List(String) by the sequence rule of :mod:`reloop.data.values` (a list column, or strings split
    on ``separator``; null -> [], empty items dropped)."""
    try:
        return values.sequence_column(s, separator)
    except values.ColumnTypeError as e:
        raise DataError(f"sequence feature {s.name!r} {e}") from None


def sort_by_time(frame: pl.DataFrame, time: str = "time") -> pl.DataFrame:
    """Sort ascending by time, ties in their current order (stable)."""
    return frame.sort(time, maintain_order=True)


# --------------------------------------------------------------------------------------------------


def clean_frame(
    raw: pl.DataFrame,
    *,
    time: str,
    label: str,
    user: str | None,
    features: Mapping[str, object],
    max_bad_share: float,
    source: str = "",
) -> tuple[pl.DataFrame, LoadReport]:
    """Turn raw columns into the canonical frame (unsorted) and its report; see the module docstring.

    ``features`` maps raw column names to :class:`~reloop.data.sources.config.FeatureConfig`.
    Output columns: ``label``, ``time``, the user column (if not also a feature), then the features.
    """
    from reloop.data.sources.config import LABEL, TIME  # local: config imports nothing from here

    required = [(label, "label"), (time, "time")]
    if user is not None:
        required.append((user, "user"))
    required += [(name, f"{getattr(cfg, 'kind', 'feature')} feature") for name, cfg in features.items()]
    require_columns(raw.columns, required, source or "raw log")

    checker = RowChecker(raw.height, source)
    lab, problems = parse_label(raw[label])
    for problem, mask in problems.items():
        checker.flag(label, problem, mask)
    tim, problems = parse_time(raw[time])
    for problem, mask in problems.items():
        checker.flag(time, problem, mask)

    cols: dict[str, pl.Series] = {LABEL: lab.alias(LABEL), TIME: tim.alias(TIME)}
    if user is not None and user not in features:
        cols[user] = parse_categorical(raw[user])
    for name, cfg in features.items():
        kind = cfg.kind
        if kind == "numeric":
            val, problems = parse_numeric(raw[name])
            for problem, mask in problems.items():
                checker.flag(name, problem, mask)
        elif kind == "sequence":
            val = parse_sequence(raw[name], cfg.split_on)  # type: ignore[attr-defined]
        else:
            val = parse_categorical(raw[name])
        cols[name] = val

    report = checker.enforce(max_bad_share)
    frame = pl.DataFrame(list(cols.values()))
    if report.rows_bad:
        frame = frame.filter(pl.Series(checker.keep))
    return frame, report
