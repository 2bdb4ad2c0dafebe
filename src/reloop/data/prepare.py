"""Raw source -> encoded, period-split ``Stream``, cached on disk by a hash of data + schema.

The encoded stream is written once as a ``.pt`` file keyed by the content hash of the loaded log,
its schema, the period split, the encoder settings and the pretraining length; a second run with the
same inputs skips encoding, and reads the cached columns memory-mapped (pages come in as they are used).

For a ``csv`` or ``parquet`` source a second, cheap key also points at that file: the ``data:`` section,
the pretraining length, the encoder settings and, for every file read, its path, size, inode and
modification and change times (plus the same of reloop's ``data`` package files, so an upgraded loader
never reuses an old index). When it matches, the log is not even read: loading and validating a 2M-row
CSV costs as much as ~10% of training on it. An index is only written for files unchanged for
``STABLE_S`` seconds before they were read, so a file rewritten in place within one tick of a coarse
clock, at the same size, cannot be mistaken for the old one; a file copied with its old modification
time (``cp -p``, ``rsync -t``) still differs in inode and change time.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from reloop.data.encode import EncoderConfig, FeatureEncoder
from reloop.data.periods import PeriodsConfig, period_bounds
from reloop.data.schema import FeatureMap
from reloop.data.sources import CsvSourceConfig, ParquetSourceConfig, load_source, parse_source_config
from reloop.data.sources.tabular import parquet_files
from reloop.data.tensors import PeriodTensors, Stream

CACHE_VERSION = 2
#: Seconds a log file must have been left unchanged before it was read for its index to be written.
STABLE_S = 2.0
logger = logging.getLogger("reloop.data")


@dataclass
class Prepared:
    stream: Stream
    encoder: FeatureEncoder
    report: str


def default_cache_dir() -> Path:
    return Path(os.environ.get("RELOOP_CACHE", Path.home() / ".cache" / "reloop"))


def prepare_stream(
    data: dict[str, Any],
    pretrain: int,
    encoder: EncoderConfig | None = None,
    cache_dir: Path | None = None,
    use_cache: bool = True,
) -> Prepared:
    """Load, split and encode a log. ``data`` is the config's ``data`` section."""

    source = parse_source_config(data)
    periods = PeriodsConfig(**data.get("periods", {}))
    encoder = encoder or EncoderConfig()
    cache_root = Path(data.get("cache") or cache_dir or default_cache_dir())
    index = _index_path(data, source, pretrain, encoder, cache_root) if use_cache else None
    if index is not None and index[0].exists():
        try:
            entry = json.loads(index[0].read_text())
            cached = _load_cached(cache_root / f"stream-{entry['key']}.pt", entry["report"])
        except (OSError, ValueError, KeyError, TypeError):  # unreadable index: read the log
            cached = None
        if cached is not None:
            return cached
    log = load_source(source)
    frame = log.frame
    key_material = json.dumps(
        {
            "rows": hashlib.sha256(frame.hash_rows(seed=0).to_numpy().tobytes()).hexdigest(),
            "schema": log.schema.model_dump(),
            "periods": periods.model_dump(),
            "pretrain": pretrain,
            "encoder": encoder.__dict__,
            "version": CACHE_VERSION,
        },
        sort_keys=True,
        default=str,
    )
    key = hashlib.sha256(key_material.encode()).hexdigest()[:20]
    cache_file = cache_root / f"stream-{key}.pt"
    report = log.report.summary()
    if use_cache and cache_file.exists():
        cached = _load_cached(cache_file, report)
        if cached is not None:
            _write_index(index, key, report)
            return cached

    times = frame[log.schema.time].to_numpy()
    bounds = period_bounds(times, periods)
    enc = FeatureEncoder(log.schema, encoder)
    enc.fit_capacities(frame.slice(0, bounds[pretrain - 1][1]))
    columns = enc.transform(frame, grow=True)
    columns["row"] = torch.arange(len(frame), dtype=torch.int64)
    truth = None
    if log.truth is not None:
        truth = torch.from_numpy(frame[log.truth].to_numpy().astype(np.float32))
    stream = Stream(
        feature_map=enc.feature_map(),
        rows=PeriodTensors(columns),
        bounds=bounds,
        truth=truth,
        meta={"key": key, "source": data.get("source")},
    )
    if use_cache:
        cache_root.mkdir(parents=True, exist_ok=True)
        # A temporary name of this writer's own: parallel workers (`bench paper --jobs N`) on a cold
        # cache all write the same stream, and with one shared name a writer could find its file
        # already moved away by another's replace.
        fd, tmp_name = tempfile.mkstemp(dir=cache_root, prefix=f"{cache_file.name}.", suffix=".tmp")
        os.close(fd)
        tmp = Path(tmp_name)
        try:
            torch.save(
                {
                    "columns": columns,
                    "bounds": bounds,
                    "truth": truth,
                    "feature_map": stream.feature_map.model_dump(),
                    # not under "encoder": a reloop from before the packing finds no encoder and
                    # rebuilds the cache instead of reading the packed ids as a vocabulary
                    "encoder_packed": _pack_encoder_state(enc.state_dict()),
                    "meta": stream.meta,
                },
                tmp,
            )
            os.replace(tmp, cache_file)  # atomic: a killed run never leaves half a cache file
        finally:
            tmp.unlink(missing_ok=True)
        _write_index(index, key, report)
    return Prepared(stream, enc, report)


def _load_cached(cache_file: Path, report: str) -> Prepared | None:
    """The cached stream, its columns memory-mapped; None (and a warning) when it cannot be used."""
    if not cache_file.exists():
        return None
    try:
        # weights_only: plain containers and tensors; a pickle that would call anything is refused.
        # mmap: the file's pages are the columns (copy-on-write; the cache is only ever replaced whole).
        blob = torch.load(cache_file, map_location="cpu", weights_only=True, mmap=True)
        state = _unpack_encoder_state(blob["encoder_packed"]) if "encoder_packed" in blob else blob["encoder"]
        encoder = FeatureEncoder.from_state(state)
        return Prepared(_stream_from_blob(blob), encoder, report)
    except Exception as e:  # noqa: BLE001 - truncated, foreign or refused: rebuild it
        logger.warning(
            "stream cache %s cannot be used (%s: %s); rebuilding it",
            cache_file,
            type(e).__name__,
            str(e).strip().splitlines()[0][:200] if str(e).strip() else "",
        )
        return None


def _pack_ids(ids: list[str]) -> Any:
    """A list of ids as one NUL-joined UTF-8 byte tensor: reading a million ids back from the cache
    then takes one ``split`` instead of a million objects through the (pure Python) ``weights_only``
    unpickler (~4 s for 2M Criteo-shaped rows). Kept as a list when an id holds a NUL itself."""
    joined = "\x00".join(ids)
    if len(ids) < 2 or joined.count("\x00") != len(ids) - 1:
        return ids
    return {"nul_joined": torch.frombuffer(bytearray(joined.encode("utf-8")), dtype=torch.uint8)}


def _unpack_ids(ids: Any) -> list[str]:
    if isinstance(ids, dict):
        out: list[str] = bytes(ids["nul_joined"].numpy()).decode("utf-8").split("\x00")
        return out
    return list(ids)


def _pack_encoder_state(state: dict[str, Any]) -> dict[str, Any]:
    """``FeatureEncoder.state_dict()`` with its id lists packed (:func:`_pack_ids`), stored as
    ``encoder_packed``; caches written before hold the plain state as ``encoder``."""
    vocabs = {t: {**v, "ids": _pack_ids(v["ids"])} for t, v in state["vocabs"].items()}
    return {**state, "vocabs": vocabs, "users": _pack_ids(state["users"])}


def _unpack_encoder_state(state: dict[str, Any]) -> dict[str, Any]:
    vocabs = {t: {**v, "ids": _unpack_ids(v["ids"])} for t, v in state["vocabs"].items()}
    return {**state, "vocabs": vocabs, "users": _unpack_ids(state["users"])}


def _stat(path: Path) -> list[Any]:
    st = path.stat()
    return [str(path.resolve()), st.st_size, st.st_ino, st.st_dev, st.st_mtime_ns, st.st_ctime_ns]


def _index_path(
    data: dict[str, Any], source: Any, pretrain: int, encoder: EncoderConfig, cache_root: Path
) -> tuple[Path, bool] | None:
    """The index file of a file-backed log (``csv``/``parquet``) and whether it may be written now
    (every file unchanged for ``STABLE_S`` seconds); None for other sources or a missing file."""

    seen_ns = time.time_ns()
    try:
        if isinstance(source, CsvSourceConfig):
            files = [Path(source.path)]
        elif isinstance(source, ParquetSourceConfig):
            files = parquet_files(source.path)
        else:
            return None
        stats = [_stat(f) for f in files]
        package = Path(__file__).parent  # reloop.data: the loaders and the encoder
        code = sorted(
            [str(f.relative_to(package)), f.stat().st_size, f.stat().st_mtime_ns] for f in package.rglob("*.py")
        )
    except OSError:  # a missing file: load_source says so
        return None
    material = json.dumps(
        {
            "data": data,
            "pretrain": pretrain,
            "encoder": encoder.__dict__,
            "files": stats,
            "code": code,
            "version": CACHE_VERSION,
        },
        sort_keys=True,
        default=str,
    )
    stable = all(max(s[4], s[5]) < seen_ns - STABLE_S * 1e9 for s in stats)
    return cache_root / f"source-{hashlib.sha256(material.encode()).hexdigest()[:20]}.json", stable


def _write_index(index: tuple[Path, bool] | None, key: str, report: str) -> None:
    if index is None or not index[1]:
        return
    path = index[0]
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps({"key": key, "report": report}))
        os.replace(tmp, path)
    except OSError as e:  # a read-only cache still serves the stream
        logger.warning("stream cache index %s not written (%s)", path, e)
        tmp.unlink(missing_ok=True)


def _stream_from_blob(blob: dict[str, Any]) -> Stream:
    return Stream(
        feature_map=FeatureMap(**blob["feature_map"]),
        rows=PeriodTensors(blob["columns"]),
        bounds=[tuple(b) for b in blob["bounds"]],
        truth=blob["truth"],
        meta=blob["meta"],
    )
