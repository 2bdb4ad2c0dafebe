"""``reloop init DATA``: look at a CSV or Parquet click log and write a commented config ready to run.

:func:`profile_file` reads the file as ``reloop run`` will (CSV: every value as text, parsed by
:mod:`reloop.data.validate`) and finds, per column, its type, distinct values, missing share and a few
examples; then the roles:

* **delimiter** (CSV): sniffed from the first lines (``,`` ``;`` tab ``|``);
* **label**: a column named like a label (``label``, ``click``, ``clicked``, ``is_click``, ``target``,
  ``y``, ...) whose values are 0/1 (or true/false), else the only such column;
* **time**: a column named like a time (``time``, ``ts``, ``timestamp``, ``date``, ...) or holding
  datetimes, whose every value parses as unix seconds or ISO 8601; none: ``time: null`` (file order);
* **user**: a column named like a user id (``user``, ``user_id``, ``uid``, ...); none: no gAUC;
* **features**: every other column: text and integer ids are ``categorical``, floats (and integers
  with more than ``NUMERIC_MIN_DISTINCT`` distinct values that are not named like ids) ``numeric``,
  text holding ``|``-separated lists ``sequence``; constant columns and one-value-per-row ids are left
  out (listed in a comment).

:func:`render_config` sizes the protocol from the row count (31 periods of at least
``MIN_PERIOD_ROWS`` rows when the data allows, else fewer with the same proportions, at least
``MIN_PERIODS``) and picks ``protocol.serve_batch_size`` so that every served period has at least
``MIN_SERVE_BATCHES`` batches (an error memory emptied at each update can then act). The written config
is validated (:func:`reloop.config.parse_config`) and checked (:func:`reloop.checks.preflight`) before it
is written.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import polars as pl

from reloop.config import ConfigError, parse_config
from reloop.data.periods import PeriodsConfig, period_bounds
from reloop.data.sources.tabular import parquet_files, sniff_delimiter
from reloop.data.validate import DataError, parse_time
from reloop.preflight import preflight

#: Rows profiled for types and cardinalities (the row count is exact).
SAMPLE_ROWS = 200_000
#: The fewest rows a period should have; fewer rows give fewer periods.
MIN_PERIOD_ROWS = 100
#: The fewest periods of a protocol ``reloop init`` writes (pretrain 3, warm-up 3, valid 1, test 2, + 1).
MIN_PERIODS = 10
#: Each served period is served in at least this many batches (see the module docstring).
MIN_SERVE_BATCHES = 8
#: Integer columns with more distinct values than this (and not named like ids) are numeric.
NUMERIC_MIN_DISTINCT = 1000

LABEL_NAMES = ("label", "click", "clicked", "is_click", "clk", "target", "y", "converted", "conversion", "purchase")
TIME_NAMES = (
    "time",
    "ts",
    "timestamp",
    "event_time",
    "event_ts",
    "datetime",
    "date",
    "time_stamp",
    "created_at",
    "unix_time",
    "epoch",
)
USER_NAMES = (
    "user",
    "user_id",
    "userid",
    "uid",
    "customer_id",
    "customer",
    "member_id",
    "visitor_id",
    "client_id",
    "account_id",
)
_ID_LIKE = re.compile(r"(^id$|_id$|^id_|id$)", re.IGNORECASE)

Kind = Literal["categorical", "numeric", "sequence"]


class InitError(ValueError):
    """The file cannot be turned into a config; the message says what to pass (``--label`` ...)."""


@dataclass
class ColumnProfile:
    name: str
    dtype: str  # int | float | bool | text | datetime | list
    distinct: int  # in the profiled rows
    missing: float  # share of null/empty values in the profiled rows
    examples: list[str]
    kind: Kind | None = None  # the feature kind; None: not a feature
    role: str = "feature"  # label | time | user | feature | skipped
    note: str = ""  # why (shown as a comment)


@dataclass
class DataProfile:
    path: Path
    source: Literal["csv", "parquet"]
    rows: int
    profiled_rows: int
    columns: list[ColumnProfile]
    delimiter: str | None = None
    label: str = ""
    time: str | None = None
    user: str | None = None
    period_rows: list[int] = field(default_factory=list)  # filled by render_config
    notes: list[str] = field(default_factory=list)

    def column(self, name: str) -> ColumnProfile:
        return next(c for c in self.columns if c.name == name)


# --------------------------------------------------------------------------------------------------
# reading


def _read(path: Path, delimiter: str | None) -> tuple[pl.DataFrame, int, Literal["csv", "parquet"], str | None]:
    """The profiled rows (CSV: all text), the exact row count, the source and the delimiter."""
    if path.is_dir() or path.suffix.lower() in (".parquet", ".pq"):
        files = parquet_files(path)
        frame = pl.read_parquet(files[0], n_rows=SAMPLE_ROWS)
        rows = sum(pl.scan_parquet(f).select(pl.len()).collect().item() for f in files)
        return frame, rows, "parquet", None
    if not path.is_file():
        raise InitError(f"{path}: no such file")
    if delimiter in ("\\t", "tab", "TAB"):  # what a shell passes for a tab
        delimiter = "\t"
    delimiter = delimiter or sniff_delimiter(path) or ","
    try:
        frame = pl.read_csv(path, separator=delimiter, infer_schema=False, n_rows=SAMPLE_ROWS)
        rows = pl.scan_csv(path, separator=delimiter, infer_schema=False).select(pl.len()).collect().item()
    except pl.exceptions.NoDataError:
        raise InitError(f"{path}: empty file (no header row)") from None
    except pl.exceptions.PolarsError as e:
        raise InitError(
            f"{path}: cannot parse as CSV with delimiter {delimiter!r}: {e}; give the delimiter with --delimiter"
        ) from None
    return frame, rows, "csv", delimiter


def _text(s: pl.Series) -> pl.Series:
    """Values as stripped text, empty strings as null (how the loader reads a CSV field)."""
    st = s.cast(pl.String, strict=False).str.strip_chars()
    return pl.select(pl.when(st == "").then(None).otherwise(st)).to_series().alias(s.name)


def _dtype(s: pl.Series) -> str:
    if s.dtype == pl.Boolean:
        return "bool"
    if s.dtype.is_integer():
        return "int"
    if s.dtype.is_float():
        return "float"
    if isinstance(s.dtype, (pl.Datetime, pl.Date)):
        return "datetime"
    if isinstance(s.dtype, pl.List):
        return "list"
    t = _text(s).drop_nulls()
    if t.len() == 0:
        return "text"
    low = t.str.to_lowercase()
    if bool(low.is_in(["true", "false"]).all()):
        return "bool"
    as_int = t.cast(pl.Int64, strict=False)
    if as_int.null_count() == 0:
        return "int"
    as_float = t.cast(pl.Float64, strict=False)
    if as_float.null_count() == 0:
        return "float"
    return "text"


def _profile_column(s: pl.Series) -> ColumnProfile:
    n = max(s.len(), 1)
    if isinstance(s.dtype, pl.List):
        missing = float(s.is_null().sum()) / n
        distinct = int(s.explode().n_unique())
        examples = [str(v) for v in s.drop_nulls().head(3).to_list()]
    else:
        t = _text(s)
        missing = float(t.null_count()) / n
        distinct = int(t.drop_nulls().n_unique())
        examples = [str(v) for v in t.drop_nulls().unique(maintain_order=True).head(3).to_list()]
    return ColumnProfile(s.name, _dtype(s), distinct, missing, examples)


# --------------------------------------------------------------------------------------------------
# roles


_ZERO_ONE = {"0": 0, "1": 1, "0.0": 0, "1.0": 1, "false": 0, "true": 1}


def _is_binary(s: pl.Series) -> bool:
    """Values 0/1 (or true/false) of both kinds, as :func:`reloop.data.validate.parse_label` reads them."""
    if isinstance(s.dtype, (pl.List, pl.Datetime, pl.Date)):
        return False
    values = set(_text(s).drop_nulls().str.to_lowercase().unique().to_list())
    return bool(values) and values <= set(_ZERO_ONE) and {_ZERO_ONE[v] for v in values} == {0, 1}


def _parses_as_time(s: pl.Series) -> bool:
    if isinstance(s.dtype, pl.List) or s.dtype == pl.Boolean:
        return False
    try:
        _, problems = parse_time(s if s.dtype != pl.String else _text(s))
    except DataError:
        return False
    return not bool(problems["unparsable time"].any()) and not bool(problems["missing time"].all())


def _named(name: str, names: tuple[str, ...]) -> bool:
    return name.strip().lower() in names


def _pick_label(frame: pl.DataFrame, given: str | None) -> str:
    if given is not None:
        if given not in frame.columns:
            raise InitError(f"--label {given!r}: no such column; columns: {frame.columns}")
        if not _is_binary(frame[given]):
            raise InitError(f"--label {given!r}: the label must hold 0/1 (or true/false) values of both kinds")
        return given
    named = [c for c in frame.columns if _named(c, LABEL_NAMES) and _is_binary(frame[c])]
    if named:
        return named[0]
    binary = [c for c in frame.columns if _is_binary(frame[c]) and not _ID_LIKE.search(c)]
    if len(binary) == 1:
        return binary[0]
    if not binary:
        raise InitError(
            f"no column holds 0/1 labels of both kinds (columns: {frame.columns}); "
            "name the label column with --label COLUMN"
            + (" (a single column: is --delimiter right?)" if frame.width == 1 else "")
        )
    raise InitError(f"several 0/1 columns could be the label: {binary}; choose one with --label COLUMN")


def _pick_time(frame: pl.DataFrame, given: str | None, taken: set[str], notes: list[str]) -> str | None:
    if given is not None:
        if given.lower() in ("none", "null", ""):
            return None
        if given not in frame.columns:
            raise InitError(f"--time {given!r}: no such column; columns: {frame.columns}")
        if not _parses_as_time(frame[given]):
            raise InitError(f"--time {given!r}: values are neither unix seconds nor ISO 8601 date(-time)s")
        return given
    candidates = [
        c
        for c in frame.columns
        if c not in taken and (_named(c, TIME_NAMES) or isinstance(frame[c].dtype, (pl.Datetime, pl.Date)))
    ]
    for c in candidates:
        if _parses_as_time(frame[c]):
            return c
        notes.append(
            f"column {c!r} looks like a time but its values are neither unix seconds nor ISO 8601 "
            "(e.g. 2024-05-01T13:45:00); convert it and set data.time, or keep the file order"
        )
    return None


def _pick_user(frame: pl.DataFrame, given: str | None, taken: set[str]) -> str | None:
    if given is not None:
        if given.lower() in ("none", "null", ""):
            return None
        if given not in frame.columns:
            raise InitError(f"--user {given!r}: no such column; columns: {frame.columns}")
        return given
    return next((c for c in frame.columns if c not in taken and _named(c, USER_NAMES)), None)


def _feature_kind(col: ColumnProfile, s: pl.Series, rows: int) -> tuple[Kind | None, str]:
    """The kind of a feature column, or None with the reason it is left out."""
    if col.distinct <= 1:
        return None, "constant"
    if col.dtype == "datetime":
        return None, "a date-time that is not the time column"
    if col.dtype == "list":
        return "sequence", "list column"
    if col.dtype in ("int", "text") and col.distinct >= 0.999 * rows and rows > 100:
        return None, "one value per row (a row id, not a feature)"
    if col.dtype == "float":
        return "numeric", "decimal numbers"
    if col.dtype == "int" and col.distinct > NUMERIC_MIN_DISTINCT and not _ID_LIKE.search(col.name):
        return "numeric", f"integers with {col.distinct:,} distinct values"
    if col.dtype == "text":
        t = _text(s).drop_nulls()
        if t.len() and int(t.str.contains("|", literal=True).sum()) > 0.5 * t.len():
            return "sequence", "'|'-separated lists"
    return "categorical", {"int": "integer codes", "bool": "true/false", "text": "text"}.get(col.dtype, col.dtype)


def profile_file(
    path: str | Path,
    delimiter: str | None = None,
    label: str | None = None,
    time: str | None = None,
    user: str | None = None,
) -> DataProfile:
    """Profile a CSV / Parquet click log and pick its label, time, user and feature columns."""
    path = Path(path)
    frame, rows, source, delim = _read(path, delimiter)
    if frame.width == 0:
        raise InitError(f"{path}: no columns")
    if rows == 0:
        raise InitError(f"{path}: no data rows (column names only)")
    notes: list[str] = []
    label_col = _pick_label(frame, label)
    time_col = _pick_time(frame, time, {label_col}, notes)
    user_col = _pick_user(frame, user, {label_col} | ({time_col} if time_col else set()))
    columns = []
    for name in frame.columns:
        col = _profile_column(frame[name])
        if name == label_col:
            col.role, col.note = "label", "0/1"
        elif name == time_col:
            col.role, col.note = "time", "unix seconds or ISO 8601"
        else:
            col.kind, col.note = _feature_kind(col, frame[name], frame.height)
            if name == user_col:
                col.role, col.kind = "user", "categorical"
            elif col.kind is None:
                col.role = "skipped"
        if name in ("label", "time") and col.role not in ("label", "time"):
            col.role, col.kind, col.note = "skipped", None, f"the name {name!r} is reserved; rename the column"
        columns.append(col)
    if time_col is None:
        notes.append("no time column found: rows are taken in file order (time: null, periods by rows)")
    return DataProfile(path, source, rows, frame.height, columns, delim, label_col, time_col, user_col, notes=notes)


# --------------------------------------------------------------------------------------------------
# protocol sizing and the config text


@dataclass(frozen=True)
class Protocol:
    count: int
    pretrain: int
    warmup: int
    valid: int
    test: int


def size_protocol(rows: int) -> Protocol:
    """31 periods split 10 / 10 / 3 / 7 (+1) as ASMG §4.1.3 when every period gets ``MIN_PERIOD_ROWS``
    rows; otherwise fewer periods in the same proportions (at least ``MIN_PERIODS``)."""
    count = min(31, rows // MIN_PERIOD_ROWS)
    if count < MIN_PERIODS:
        raise InitError(
            f"{rows} rows are too few: the protocol needs at least {MIN_PERIODS} periods of "
            f"{MIN_PERIOD_ROWS} rows ({MIN_PERIODS * MIN_PERIOD_ROWS} rows)"
        )
    test = max(2, round(count * 7 / 31))
    valid = max(1, round(count * 3 / 31))
    pretrain = max(3, round(count * 10 / 31))
    warmup = count - 1 - pretrain - valid - test
    return Protocol(count, pretrain, warmup, valid, test)


def _period_rows(profile: DataProfile, count: int) -> tuple[list[int], str]:
    """Rows per period and ``by`` (time windows when the log has a time column without gaps)."""

    by_rows = np.diff(np.linspace(0, profile.rows, count + 1).round().astype(np.int64)).tolist()
    if profile.time is None:
        return by_rows, "rows"
    frame = (
        pl.concat(
            [pl.read_parquet(f, columns=[profile.time]) for f in parquet_files(profile.path)], how="vertical_relaxed"
        )
        if profile.source == "parquet"
        else pl.read_csv(profile.path, separator=profile.delimiter or ",", infer_schema=False, columns=[profile.time])
    )
    times, _ = parse_time(frame[profile.time] if frame[profile.time].dtype != pl.String else _text(frame[profile.time]))
    try:
        bounds = period_bounds(np.sort(times.to_numpy()), PeriodsConfig(count=count, by="time"))
    except DataError:
        return by_rows, "rows"  # gaps: some time windows would be empty
    sizes = [b - a for a, b in bounds]
    if min(sizes) < MIN_PERIOD_ROWS // 2:
        return by_rows, "rows"
    return sizes, "time"


def _yaml_str(value: str) -> str:
    import yaml

    return yaml.safe_dump(value, default_style=None).strip().removesuffix("...").strip()


def render_config(profile: DataProfile, config_path: str | Path) -> str:
    """The commented YAML config for ``profile``; ``data.path`` relative to the config's directory."""
    proto = size_protocol(profile.rows)
    sizes, by = _period_rows(profile, proto.count)
    profile.period_rows = sizes
    first_served = proto.pretrain + 1
    smallest = min(sizes[first_served - 1 :])
    serve_batch = min(1024, 2 ** int(math.log2(max(smallest // MIN_SERVE_BATCHES, 1))))
    batch = max(64, min(1024, 2 ** int(math.log2(max(smallest // 4, 1)))))
    data_path = os.path.relpath(profile.path.resolve(), Path(config_path).resolve().parent)
    if data_path.startswith(".."):  # outside the config's directory: an absolute path reads better
        data_path = str(profile.path.resolve())
    features = [c for c in profile.columns if c.role in ("feature", "user") and c.kind is not None]
    skipped = [c for c in profile.columns if c.role == "skipped"]
    if not features:
        raise InitError(f"{profile.path}: no feature columns besides the label and time; nothing to learn from")

    lines = [
        f"# reloop config written by `reloop init {profile.path}` — edit freely, then: reloop run {Path(config_path).name}",
        f"# {profile.rows:,} rows; columns profiled on the first {profile.profiled_rows:,}. Every key: docs/guide/config.md",
    ]
    lines += [f"# note: {n}" for n in profile.notes]
    lines += ["data:", f"  source: {profile.source}", f"  path: {_yaml_str(data_path)}"]
    if profile.source == "csv":
        lines.append(f"  delimiter: {json.dumps(profile.delimiter or ',')}    # sniffed from the first lines")
    lines.append(f"  label: {_yaml_str(profile.label)}    # 0/1 click")
    if profile.time is not None:
        lines.append(f"  time: {_yaml_str(profile.time)}    # unix seconds or ISO 8601; rows are sorted by it")
    else:
        lines.append("  time: null    # no time column: the file's row order is the time order")
    if profile.user is not None:
        lines.append(f"  user: {_yaml_str(profile.user)}    # per-user AUC (gAUC)")
    else:
        lines.append("  # user: <column>    # no user-id column found: gAUC is not computed")
    lines.append("  features:    # raw column: categorical | numeric | sequence")
    for c in features:
        example = ", ".join(c.examples[:3])
        comment = (
            f"{c.dtype}, {c.distinct:,} distinct"
            + (f", {c.missing:.0%} missing" if c.missing else "")
            + (f"; e.g. {example}" if example else "")
        )
        value = c.kind if c.kind != "sequence" or c.dtype == "list" else "{kind: sequence, separator: '|'}"
        lines.append(f"    {_yaml_str(c.name)}: {value}    # {comment}")
    for c in skipped:
        lines.append(f"    # {c.name}: left out ({c.note})")
    lines += [
        (
            f"  periods: {{count: {proto.count}, by: {by}}}    # "
            f"{'equal time windows' if by == 'time' else 'equal row counts'}; {min(sizes):,}-{max(sizes):,} rows each"
        ),
        "model: {name: deepfm, embedding_dim: 16, hidden_units: [64, 32]}    # `reloop models` lists the zoo",
        f"train: {{epochs: 1, pretrain_epochs: 3, batch_size: {batch}, lr: 0.005}}",
        "protocol:",
        f"  pretrain: {proto.pretrain}    # periods 1..{proto.pretrain} train Θ0",
        f"  warmup: {proto.warmup}",
        f"  valid: {proto.valid}    # tune on these",
        f"  test: {proto.test}    # report these",
        "  seeds: [0, 1, 2]",
        f"  serve_batch_size: {serve_batch}    # ≥ {MIN_SERVE_BATCHES} batches per served period, so the error memory can act",
        "runs:    # each run: update + loss + generator + memory (docs/guide/config.md#runs)",
        "  no-update: {update: none}",
        "  IU: {update: incremental}    # the baseline every imp% is relative to",
        "  ReLoop: {update: incremental, loss: {self_correction: 0.5}}    # Cai et al., SIGIR 2022",
        "  ASMG-GRU: {update: incremental, generator: {asmg_gru: {k: 3}}}    # Peng et al., RecSys 2021",
        "  ReLoop2: {update: incremental, memory: {sketch: {arrays: 64, bits: 10}, lambda: 0.3}}    # Zhu et al., KDD 2023",
    ]
    return "\n".join(lines) + "\n"


def write_config(
    data: str | Path,
    out: str | Path = "reloop.yaml",
    *,
    delimiter: str | None = None,
    label: str | None = None,
    time: str | None = None,
    user: str | None = None,
    force: bool = False,
) -> tuple[DataProfile, str]:
    """Profile ``data``, render its config, check it (:func:`reloop.config.parse_config` and
    :func:`reloop.checks.preflight`) and write it to ``out``; returns the profile and the text."""
    import yaml

    out = Path(out)
    if out.exists() and not force:
        raise InitError(f"{out} exists; pass --force to overwrite it or --out to write elsewhere")
    profile = profile_file(data, delimiter=delimiter, label=label, time=time, user=user)
    text = render_config(profile, out)
    try:
        cfg = parse_config(yaml.safe_load(text), base_dir=out.resolve().parent)
    except ConfigError as e:  # pragma: no cover - a defect of render_config
        raise InitError(f"the generated config does not validate: {e}") from None
    problems = preflight(cfg, profile.period_rows)
    if problems:  # pragma: no cover - a defect of render_config
        raise InitError("the generated config has components that cannot act: " + "; ".join(map(str, problems)))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    return profile, text
