"""CSV and Parquet click logs, plus the shared last-positives ``history`` builder.

CSV is read with every column as a string so that each value is parsed (and, if bad, reported with
its row number) by :mod:`reloop.data.validate`; Parquet columns keep their types and are converted.
``time: null`` orders rows as the file does (their row number serves as the time; ``periods.by: rows``).
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa

from reloop.data.schema import FeatureSchema
from reloop.data.sources.config import LABEL, SOURCES, TIME, CsvSourceConfig, ParquetSourceConfig
from reloop.data.validate import (
    DataError,
    LoadedLog,
    clean_frame,
    require_columns,
    sort_by_time,
)

#: The raw column that holds the row number when ``time: null`` (the file order is the time order).
ROW_ORDER = "__reloop_row_order__"

#: Delimiters :func:`sniff_delimiter` considers, most common first.
DELIMITERS = (",", ";", "\t", "|")


def sniff_delimiter(path: str | Path, sample_bytes: int = 64 * 1024) -> str | None:
    """The delimiter of a CSV file guessed from its first lines (``csv.Sniffer`` over ``DELIMITERS``, then
    the one the header holds most of); None when the file is empty or holds none of them."""
    with open(path, newline="", encoding="utf-8", errors="replace") as fh:
        sample = fh.read(sample_bytes)
    if not sample.strip():
        return None
    if "\n" in sample[:-1]:
        sample = sample[: sample.rfind("\n") + 1]  # whole lines only
    try:
        return csv.Sniffer().sniff(sample, delimiters="".join(DELIMITERS)).delimiter
    except csv.Error:
        header = sample.splitlines()[0]
        counts = {d: header.count(d) for d in DELIMITERS}
        best = max(counts, key=lambda d: counts[d])
        return best if counts[best] > 0 else None


def _describe(delimiter: str) -> str:
    return {"\t": "'\\t' (tab)", ",": "','", ";": "';'", "|": "'|'"}.get(delimiter, repr(delimiter))


def _delimiter_hint(path: Path, header: list[str], delimiter: str) -> str:
    """When the header reads as one column, what delimiter the file seems to use (else '')."""
    if len(header) != 1:
        return ""
    found = sniff_delimiter(path)
    if found is None or found == delimiter:
        return ""
    return (
        f"; the header reads as one column {header[0]!r} with data.delimiter {_describe(delimiter)}, "
        f"but the file looks {_describe(found)}-delimited: set data.delimiter: {_describe(found)}"
    )


def _needed_columns(cfg: CsvSourceConfig | ParquetSourceConfig) -> list[tuple[str, str]]:
    need = [(cfg.label, "label")]
    if cfg.time is not None:
        need.append((cfg.time, "time"))
    if cfg.user is not None:
        need.append((cfg.user, "user"))
    need += [(name, f"{f.kind} feature") for name, f in cfg.features.items() if name != cfg.user]
    return need


def _schema(cfg: CsvSourceConfig | ParquetSourceConfig) -> FeatureSchema:
    return FeatureSchema(
        features=[f.to_spec(name) for name, f in cfg.features.items()], label=LABEL, time=TIME, user=cfg.user
    )


def _finish(raw: pl.DataFrame, cfg: CsvSourceConfig | ParquetSourceConfig, where: str) -> LoadedLog:
    if raw.height == 0:
        raise DataError(f"{where}: no data rows (the file holds column names only)")
    if cfg.time is None:  # the file order is the time order: the row number is the time
        raw = raw.with_columns(pl.int_range(0, raw.height, dtype=pl.Int64).alias(ROW_ORDER))
    frame, report = clean_frame(
        raw,
        time=cfg.time if cfg.time is not None else ROW_ORDER,
        label=cfg.label,
        user=cfg.user,
        features=cfg.features,
        max_bad_share=cfg.max_bad_share,
        source=where,
    )
    return LoadedLog(frame=sort_by_time(frame), schema=_schema(cfg), report=report)


def read_csv_raw(cfg: CsvSourceConfig) -> pl.DataFrame:
    """The needed columns of the CSV, all as String (empty fields are null)."""
    path = Path(cfg.path)
    if not path.is_file():
        raise FileNotFoundError(f"CSV file not found: {path} (data.path)")
    try:
        header = pl.read_csv(path, n_rows=0, separator=cfg.delimiter, infer_schema=False).columns
    except pl.exceptions.NoDataError as e:
        raise DataError(f"{path}: empty CSV file (no header row)") from e
    need = _needed_columns(cfg)
    try:
        require_columns(header, need, str(path))
    except DataError as e:
        raise DataError(f"{e}{_delimiter_hint(path, header, cfg.delimiter)}") from None
    try:
        return pl.read_csv(
            path, columns=list(dict.fromkeys(c for c, _ in need)), separator=cfg.delimiter, infer_schema=False
        )
    except pl.exceptions.PolarsError as e:
        raise DataError(f"{path}: cannot parse as CSV: {e}") from e


def parquet_files(path: str | Path) -> list[Path]:
    """A Parquet file, or the ``*.parquet`` files of a directory in name order."""
    p = Path(path)
    if p.is_file():
        return [p]
    if p.is_dir():
        files = sorted(f for f in p.glob("*.parquet") if f.is_file())
        if not files:
            raise FileNotFoundError(f"no *.parquet files in directory {p} (data.path)")
        return files
    raise FileNotFoundError(f"Parquet path not found: {p} (data.path; a file or a directory of *.parquet shards)")


def read_parquet_raw(cfg: ParquetSourceConfig) -> pl.DataFrame:
    """The needed columns of every shard, concatenated in file-name order."""
    need = _needed_columns(cfg)
    columns = list(dict.fromkeys(c for c, _ in need))
    parts = []
    for f in parquet_files(cfg.path):
        try:
            present = list(pl.read_parquet_schema(f).keys())
        except Exception as e:  # pragma: no cover - depends on the corruption
            raise DataError(f"{f}: cannot read as Parquet: {e}") from e
        require_columns(present, need, str(f))
        parts.append(pl.read_parquet(f, columns=columns))
    try:
        return pl.concat(parts, how="vertical_relaxed")
    except pl.exceptions.PolarsError as e:
        raise DataError(f"{cfg.path}: Parquet shards have incompatible column types: {e}") from e


def load_csv(cfg: CsvSourceConfig) -> LoadedLog:
    return _finish(read_csv_raw(cfg), cfg, str(cfg.path))


def load_parquet(cfg: ParquetSourceConfig) -> LoadedLog:
    return _finish(read_parquet_raw(cfg), cfg, str(cfg.path))


# --------------------------------------------------------------------------------------------------
# history: the user's last N positive items strictly before each event, most recent first


def history_column(
    pos_users: np.ndarray,
    pos_times: np.ndarray,
    pos_items: pl.Series,
    event_users: np.ndarray,
    event_times: np.ndarray,
    max_len: int,
    name: str = "history",
) -> pl.Series:
    """For each event, the items of the same user's positives with time strictly before the event's,
    most recent first, at most ``max_len`` (List(String)).

    ``pos_*`` describe the positives in log order (ties at equal times: later in the log = more
    recent); users are integer codes shared by positives and events. Vectorised: one sort and two
    ``searchsorted`` calls; no per-row Python.
    """
    pos_users = np.asarray(pos_users, dtype=np.int64)
    pos_times = np.asarray(pos_times, dtype=np.int64)
    event_users = np.asarray(event_users, dtype=np.int64)
    event_times = np.asarray(event_times, dtype=np.int64)
    # dense time ranks keep the composite key small whatever the time span
    all_times, inverse = np.unique(np.concatenate([pos_times, event_times]), return_inverse=True)
    span = np.int64(len(all_times) + 1)
    pos_rank, event_rank = inverse[: len(pos_times)], inverse[len(pos_times) :]
    order = np.lexsort((np.arange(len(pos_users)), pos_rank, pos_users))  # by user, time, log order
    pos_key = pos_users[order] * span + pos_rank[order]
    end = np.searchsorted(pos_key, event_users * span + event_rank, side="left")
    start_user = np.searchsorted(pos_key, event_users * span, side="left")
    begin = np.maximum(start_user, end - max_len)
    lengths = (end - begin).astype(np.int64)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    total = int(offsets[-1])
    # positions inside the sorted positives, most recent first: end-1, end-2, ..., begin
    within = np.arange(total, dtype=np.int64) - np.repeat(offsets[:-1], lengths)
    flat = order[np.repeat(end - 1, lengths) - within]
    values = pos_items.cast(pl.String).gather(flat).to_arrow()
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    arr = pa.LargeListArray.from_arrays(pa.array(offsets, pa.int64()), values)
    return pl.Series(name, pl.from_arrow(arr)).cast(pl.List(pl.String))


@SOURCES.register("csv")
class CsvSource:
    """``source: csv``: a CSV file with a header row."""

    Options = CsvSourceConfig
    load = staticmethod(load_csv)


@SOURCES.register("parquet")
class ParquetSource:
    """``source: parquet``: a Parquet file or a directory of shards."""

    Options = ParquetSourceConfig
    load = staticmethod(load_parquet)
