"""Data sources: raw click logs into one canonical, time-sorted polars DataFrame.

``load_source(cfg)`` returns a :class:`LoadedLog`: ``frame`` (``label`` Int8 0/1, ``time`` Int64
unix seconds, the user column as String, categorical features String, numeric Float64, sequence
List(String); sorted by time, ties in file order), ``schema`` (a :class:`FeatureSchema`),
``report`` (a :class:`LoadReport`: rows read/kept, bad rows per reason with their first row
numbers) and ``truth`` (the true-probability column of synthetic streams, else None).

Example::

    >>> from reloop.data.sources import load_source, parse_source_config
    >>> cfg = parse_source_config({"source": "synthetic", "synthetic": {"users": 20, "items": 10,
    ...                            "rows_per_period": 50, "periods": 2}})
    >>> log = load_source(cfg)
    >>> log.frame.columns[:3], log.frame.height
    (['label', 'time', 'user_id'], 100)
"""

from __future__ import annotations

from typing import Any

from reloop.data.sources.config import (
    LABEL,
    SOURCE_CONFIG_ADAPTER,
    SOURCES,
    TIME,
    CsvSourceConfig,
    FeatureConfig,
    ImplicitConfig,
    MovieLensLabel,
    MovieLensSourceConfig,
    ParquetSourceConfig,
    SourceConfig,
    SyntheticConfig,
    SyntheticSourceConfig,
    parse_source_config,
)
from reloop.data.sources.movielens import load_movielens
from reloop.data.sources.synthetic import SyntheticWorld, generate, load_synthetic
from reloop.data.sources.tabular import history_column, load_csv, load_parquet
from reloop.data.validate import DataError, LoadedLog, LoadReport

__all__ = [
    "LABEL",
    "TIME",
    "SOURCE_CONFIG_ADAPTER",
    "SOURCES",
    "CsvSourceConfig",
    "DataError",
    "FeatureConfig",
    "ImplicitConfig",
    "LoadReport",
    "LoadedLog",
    "MovieLensLabel",
    "MovieLensSourceConfig",
    "ParquetSourceConfig",
    "SourceConfig",
    "SyntheticConfig",
    "SyntheticSourceConfig",
    "SyntheticWorld",
    "generate",
    "history_column",
    "load_csv",
    "load_movielens",
    "load_parquet",
    "load_source",
    "load_synthetic",
    "parse_source_config",
]


def load_source(cfg: SourceConfig | dict[str, Any]) -> LoadedLog:
    """Load the log a ``data:`` config describes (a validated config or a plain dict), with the loader
    its ``source`` is registered under (``SOURCES``)."""
    parsed = parse_source_config(cfg)
    loaded: LoadedLog = SOURCES[parsed.source].load(parsed)
    return loaded
