"""The stream cache's index for file-backed logs: a second ``prepare_stream`` of an unchanged CSV/Parquet
file reads neither the log nor a pickled vocabulary, and any change to the file is seen."""

from __future__ import annotations

import os

import numpy as np
import polars as pl
import pytest
import torch

import reloop.data.prepare as prep
import reloop.data.sources as sources


def _write(path, seed: int = 0, n: int = 400, fmt: str = "csv") -> None:
    rng = np.random.default_rng(seed)
    frame = pl.DataFrame(
        {
            "time": np.arange(n, dtype=np.int64),
            "label": rng.integers(0, 2, n).astype(np.int8),
            "user_id": [f"u{u:02d}" for u in rng.integers(0, 30, n)],
            "item_id": [f"i{i:03d}" for i in rng.integers(0, 200, n)],  # fixed width: rewrites keep the size
            "price": rng.integers(10, 100, n) / 10,  # 1.0 .. 9.9
        }
    )
    frame.write_parquet(path) if fmt == "parquet" else frame.write_csv(path)


def _data(path, tmp_path, fmt: str = "csv") -> dict:
    return {
        "source": fmt,
        "path": str(path),
        "user": "user_id",
        "features": {"item_id": "categorical", "user_id": "categorical", "price": "numeric"},
        "periods": {"count": 4, "by": "rows"},
        "cache": str(tmp_path / "cache"),
    }


def _loads(monkeypatch) -> list[int]:
    """Counts the times the log itself is read."""
    calls: list[int] = []
    load = sources.load_source

    def counting(cfg):
        calls.append(1)
        return load(cfg)

    monkeypatch.setattr(prep, "load_source", counting)  # the name prepare_stream calls
    return calls


def _same(a: prep.Prepared, b: prep.Prepared) -> None:
    assert a.stream.meta == b.stream.meta and a.stream.bounds == b.stream.bounds and a.report == b.report
    assert a.stream.rows.data.keys() == b.stream.rows.data.keys()
    for k, v in a.stream.rows.data.items():
        assert torch.equal(v, b.stream.rows.data[k]), k
    assert a.encoder.state_dict() == b.encoder.state_dict()


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_an_unchanged_file_is_not_read_again(tmp_path, monkeypatch, fmt):
    monkeypatch.setattr(prep, "STABLE_S", 0.0)
    path = tmp_path / f"log.{fmt}"
    _write(path, fmt=fmt)
    data = _data(path, tmp_path, fmt)
    calls = _loads(monkeypatch)
    first = prep.prepare_stream(data, 2)
    second = prep.prepare_stream(data, 2)
    assert len(calls) == 1  # the second call went from the index to the cached stream
    _same(first, second)
    assert len(list((tmp_path / "cache").glob("source-*.json"))) == 1


def test_a_rewritten_file_of_the_same_size_is_read_again(tmp_path, monkeypatch):
    monkeypatch.setattr(prep, "STABLE_S", 0.0)
    path = tmp_path / "log.csv"
    _write(path, seed=0)
    data = _data(path, tmp_path)
    calls = _loads(monkeypatch)
    first = prep.prepare_stream(data, 2)
    size = path.stat().st_size
    _write(path, seed=1)
    assert path.stat().st_size == size
    second = prep.prepare_stream(data, 2)
    assert len(calls) == 2
    assert second.stream.meta["key"] != first.stream.meta["key"]
    assert not torch.equal(second.stream.rows.data["label"], first.stream.rows.data["label"])


def test_a_copy_with_the_old_modification_time_is_read_again(tmp_path, monkeypatch):
    """``cp -p`` / ``rsync -t`` keep the modification time; the inode and change time still differ."""
    monkeypatch.setattr(prep, "STABLE_S", 0.0)
    path = tmp_path / "log.csv"
    _write(path, seed=0)
    data = _data(path, tmp_path)
    calls = _loads(monkeypatch)
    prep.prepare_stream(data, 2)
    st = path.stat()
    other = tmp_path / "other.csv"
    _write(other, seed=1)
    os.replace(other, path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    prep.prepare_stream(data, 2)
    assert len(calls) == 2


def test_a_file_changed_just_before_it_was_read_gets_no_index(tmp_path, monkeypatch):
    path = tmp_path / "log.csv"
    _write(path)
    monkeypatch.setattr(prep, "STABLE_S", 3600.0)  # the file is younger than that
    calls = _loads(monkeypatch)
    first = prep.prepare_stream(_data(path, tmp_path), 2)
    second = prep.prepare_stream(_data(path, tmp_path), 2)
    assert len(calls) == 2 and not list((tmp_path / "cache").glob("source-*.json"))
    _same(first, second)  # the content-keyed cache still serves it


def test_a_cache_written_with_plain_id_lists_still_loads(tmp_path):
    """Caches written before the ids were packed hold the plain encoder state; they load to the same encoder."""
    path = tmp_path / "log.csv"
    _write(path)
    data = _data(path, tmp_path)
    fresh = prep.prepare_stream(data, 2)
    (cache,) = (tmp_path / "cache").glob("stream-*.pt")
    blob = torch.load(cache, weights_only=True)
    assert "encoder" not in blob  # an older reloop finds no encoder here and rebuilds the cache
    blob["encoder"] = prep._unpack_encoder_state(blob.pop("encoder_packed"))
    torch.save(blob, cache)
    _same(fresh, prep.prepare_stream(data, 2))


@pytest.mark.parametrize("ids", [[], ["a"], ["", ""], ["é", "", "x" * 5, ""], ["a", "b\x00c"]])
def test_packed_ids_round_trip(ids):
    assert prep._unpack_ids(prep._pack_ids(ids)) == ids
