"""Raw source -> encoded, period-split ``Stream``, cached on disk by a hash of data + schema.

The encoded stream is written once as a ``.pt`` file keyed by the content hash of the loaded log,
its schema, the period split, the encoder settings and the pretraining length; a second run with the
same inputs skips loading and encoding entirely.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from reloop.data.encode import EncoderConfig, FeatureEncoder
from reloop.data.periods import PeriodsConfig, period_bounds
from reloop.data.schema import FeatureMap
from reloop.data.tensors import PeriodTensors, Stream

CACHE_VERSION = 2
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
    from reloop.data.sources import load_source, parse_source_config

    source = parse_source_config(data)
    periods = PeriodsConfig(**data.get("periods", {}))
    log = load_source(source)
    frame = log.frame
    encoder = encoder or EncoderConfig()
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
    cache_root = Path(data.get("cache") or cache_dir or default_cache_dir())
    cache_file = cache_root / f"stream-{key}.pt"
    report = log.report.summary()
    if use_cache and cache_file.exists():
        try:
            # weights_only: plain containers and tensors; a pickle that would call anything is refused
            blob = torch.load(cache_file, map_location="cpu", weights_only=True)
            return Prepared(_stream_from_blob(blob), FeatureEncoder.from_state(blob["encoder"]), report)
        except Exception as e:  # noqa: BLE001 - truncated, foreign or refused: rebuild it
            logger.warning(
                "stream cache %s cannot be used (%s: %s); rebuilding it",
                cache_file,
                type(e).__name__,
                str(e).strip().splitlines()[0][:200] if str(e).strip() else "",
            )

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
                    "encoder": enc.state_dict(),
                    "meta": stream.meta,
                },
                tmp,
            )
            os.replace(tmp, cache_file)  # atomic: a killed run never leaves half a cache file
        finally:
            tmp.unlink(missing_ok=True)
    return Prepared(stream, enc, report)


def _stream_from_blob(blob: dict[str, Any]) -> Stream:
    return Stream(
        feature_map=FeatureMap(**blob["feature_map"]),
        rows=PeriodTensors(blob["columns"]),
        bounds=[tuple(b) for b in blob["bounds"]],
        truth=blob["truth"],
        meta=blob["meta"],
    )
