"""Periods as Parquet shards, read streaming: a period larger than memory still trains.

A period on disk is a directory of ``part-00000.parquet, part-00001.parquet, ...`` files (row order =
file-name order, then row order inside a file; row groups of ``row_group_rows``). Two kinds of rows:

* **raw** canonical rows of a loaded log (``label``, ``time``, the user column, the features), written
  by :func:`write_shards`, encoded on read by a :class:`~reloop.data.encode.FeatureEncoder`;
* **encoded** rows (the tensors of :class:`~reloop.data.tensors.PeriodTensors`: int ids, float values,
  ``[N, L]`` sequences as fixed-size lists), written by :func:`encode_to_shards` (raw frames in,
  encoded in arrival order, chunk by chunk) or :func:`write_tensors`. Reading them needs no encoder,
  so they can be split across ranks (``torchrun``) without the ranks' vocabularies diverging.

:class:`ShardedPeriod` reads either kind with ``pyarrow.dataset`` in chunks of ``read_rows`` rows and
quacks like a ``PeriodTensors`` for :func:`reloop.update.trainer.train_rows` and ``predict_rows``
(``len`` and ``batches(batch_size, shuffle, generator)``); memory holds one shuffle window, not the
period. ``shuffle`` permutes rows inside windows of ``shuffle_rows`` consecutive rows (encoding always
runs in file order, so ids are still assigned in order of first arrival).

Example::

    >>> import polars as pl, tempfile
    >>> from reloop.data.shards import ShardedPeriod, write_shards
    >>> d = tempfile.mkdtemp()
    >>> files = write_shards(pl.DataFrame({"label": [0, 1, 1], "x": [1, 2, 3]}), d, rows_per_file=2)
    >>> [f.name for f in files]
    ['part-00000.parquet', 'part-00001.parquet']
    >>> [b["x"].tolist() for b in ShardedPeriod(d).batches(2)]
    [[1, 2], [3]]
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch
from torch import Tensor

from reloop.data.schema import FeatureMap
from reloop.data.tensors import Batch, PeriodTensors, Stream

PART = "part-{:05d}.parquet"


def period_dir(root: str | Path, period: int) -> Path:
    """``root/period-0007`` for period 7 (1-based, as the protocol counts)."""
    return Path(root) / f"period-{period:04d}"


def shard_files(path: str | Path) -> list[Path]:
    """The ``*.parquet`` files of a period directory in name order (or the file itself)."""
    p = Path(path)
    if p.is_file():
        return [p]
    files = sorted(f for f in p.glob("*.parquet") if f.is_file())
    if not files:
        raise FileNotFoundError(f"no *.parquet shards in {p}")
    return files


# --------------------------------------------------------------------------------------------------
# writing


class _ShardWriter:
    """Appends tables to numbered Parquet files of at most ``rows_per_file`` rows."""

    def __init__(self, directory: str | Path, rows_per_file: int, row_group_rows: int, compression: str) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        for old in self.dir.glob("part-*.parquet"):  # rewriting a period replaces it
            old.unlink()
        self.rows_per_file = rows_per_file
        self.row_group_rows = row_group_rows
        self.compression = compression
        self.files: list[Path] = []
        self._writer: pq.ParquetWriter | None = None
        self._in_file = 0

    def write(self, table: pa.Table) -> None:
        start = 0
        while start < table.num_rows:
            if self._writer is None or self._in_file >= self.rows_per_file:
                self._open(table.schema)
            take = min(self.rows_per_file - self._in_file, table.num_rows - start)
            self._writer.write_table(table.slice(start, take), row_group_size=self.row_group_rows)
            self._in_file += take
            start += take

    def _open(self, schema: pa.Schema) -> None:
        self.close()
        path = self.dir / PART.format(len(self.files))
        self._writer = pq.ParquetWriter(path, schema, compression=self.compression)
        self.files.append(path)
        self._in_file = 0

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def _frames(frames: pl.DataFrame | Iterable[pl.DataFrame]) -> Iterator[pl.DataFrame]:
    if isinstance(frames, pl.DataFrame):
        yield frames
    else:
        yield from frames


def write_shards(
    frames: pl.DataFrame | Iterable[pl.DataFrame],
    directory: str | Path,
    *,
    rows_per_file: int = 1_000_000,
    row_group_rows: int = 65_536,
    compression: str = "zstd",
) -> list[Path]:
    """Write rows (one frame, or an iterator of frames: never all in memory) as Parquet shards.

    E.g. ``write_shards(pl.scan_csv(path).collect_batches(), dir)`` for a log larger than memory.
    Returns the files written, in order.
    """
    writer = _ShardWriter(directory, rows_per_file, row_group_rows, compression)
    try:
        for frame in _frames(frames):
            if frame.height:
                writer.write(frame.to_arrow())
    finally:
        writer.close()
    return writer.files


def write_period_shards(frame: pl.DataFrame, bounds: list[tuple[int, int]], root: str | Path, **kwargs) -> list[Path]:
    """One shard directory per period (``period_dir(root, i)``) of a time-sorted frame; returns the dirs."""
    dirs = []
    for i, (start, end) in enumerate(bounds, start=1):
        write_shards(frame.slice(start, end - start), period_dir(root, i), **kwargs)
        dirs.append(period_dir(root, i))
    return dirs


def tensors_to_arrow(columns: dict[str, Tensor]) -> pa.Table:
    """Encoded columns -> an Arrow table (``[N]`` as plain columns, ``[N, L]`` as fixed-size lists)."""
    arrays, names = [], []
    for name, t in columns.items():
        a = t.detach().cpu().contiguous().numpy()
        if a.ndim == 1:
            arrays.append(pa.array(a))
        elif a.ndim == 2:
            arrays.append(pa.FixedSizeListArray.from_arrays(pa.array(a.reshape(-1)), a.shape[1]))
        else:
            raise ValueError(f"column {name!r} has {a.ndim} dimensions; shards hold [N] or [N, L] columns")
        names.append(name)
    return pa.Table.from_arrays(arrays, names=names)


def arrow_to_tensors(table: pa.Table | pa.RecordBatch) -> dict[str, Tensor]:
    """The inverse of :func:`tensors_to_arrow` (copies into torch-owned, writable memory)."""
    out = {}
    for name, col in zip(table.schema.names, table.columns):
        if isinstance(col, pa.ChunkedArray):
            col = col.combine_chunks()
        if pa.types.is_fixed_size_list(col.type):
            width = col.type.list_size
            values = col.flatten().to_numpy(zero_copy_only=False)
            out[name] = torch.from_numpy(np.array(values.reshape(-1, width)))
        else:
            out[name] = torch.from_numpy(np.array(col.to_numpy(zero_copy_only=False)))
    return out


def write_tensors(rows: PeriodTensors | dict[str, Tensor], directory: str | Path, **kwargs) -> list[Path]:
    """Write encoded rows (already in memory) as shards; ``chunk_rows`` bounds the Arrow copy."""
    chunk = kwargs.pop("chunk_rows", 262_144)
    data = rows.data if isinstance(rows, PeriodTensors) else rows
    n = len(next(iter(data.values()))) if data else 0
    rows_per_file = kwargs.pop("rows_per_file", 1_000_000)
    writer = _ShardWriter(
        directory, rows_per_file, kwargs.pop("row_group_rows", 65_536), kwargs.pop("compression", "zstd")
    )
    try:
        for start in range(0, n, chunk):
            writer.write(tensors_to_arrow({k: v[start : start + chunk] for k, v in data.items()}))
    finally:
        writer.close()
    return writer.files


def encode_to_shards(
    frames: pl.DataFrame | Iterable[pl.DataFrame],
    encoder,
    directory: str | Path,
    *,
    grow: bool = True,
    first_row: int = 0,
    **kwargs,
) -> list[Path]:
    """Encode raw frames in arrival order, chunk by chunk, and write the encoded rows as shards.

    ``encoder`` must have its capacities fitted (``fit_capacities``); with ``grow`` new ids get indices
    exactly as one ``transform`` over all the rows would give them. A ``row`` column (global row number
    from ``first_row``) is added, as ``prepare_stream`` does.
    """
    writer = _ShardWriter(
        directory,
        kwargs.pop("rows_per_file", 1_000_000),
        kwargs.pop("row_group_rows", 65_536),
        kwargs.pop("compression", "zstd"),
    )
    row = first_row
    try:
        for frame in _frames(frames):
            if not frame.height:
                continue
            cols = encoder.transform(frame, grow=grow)
            cols["row"] = torch.arange(row, row + frame.height, dtype=torch.int64)
            row += frame.height
            writer.write(tensors_to_arrow(cols))
    finally:
        writer.close()
    return writer.files


# --------------------------------------------------------------------------------------------------
# reading


@dataclass(frozen=True)
class RowGroup:
    file: Path
    index: int
    num_rows: int


def row_groups(path: str | Path) -> list[RowGroup]:
    """Every row group of a period's shards, in row order (from the Parquet footers only)."""
    out = []
    for f in shard_files(path):
        meta = pq.ParquetFile(f).metadata
        out.extend(RowGroup(f, i, meta.row_group(i).num_rows) for i in range(meta.num_row_groups))
    return out


class ShardedPeriod:
    """One period stored as Parquet shards, read chunk by chunk (see the module docstring).

    - ``encoder``: a fitted ``FeatureEncoder`` when the shards hold raw rows (``grow`` as in
      ``transform``); None when they hold encoded rows.
    - ``rank`` / ``world``: read only this rank's share, whole row groups split in contiguous blocks
      balanced by row count (ranks of a DDP job each read their own part; needs encoded shards or a
      frozen encoder, else the ranks' vocabularies would diverge).
    - ``int32``: store id columns as int32 (half the memory; embeddings accept them).
    - ``columns``: the columns to read (default: all).
    """

    def __init__(
        self,
        path: str | Path,
        encoder=None,
        *,
        grow: bool = False,
        columns: list[str] | None = None,
        read_rows: int = 65_536,
        shuffle_rows: int = 262_144,
        rank: int = 0,
        world: int = 1,
        int32: bool = False,
    ) -> None:
        if encoder is not None and grow and world > 1:
            raise ValueError(
                "a growing encoder cannot read a rank's share: every rank must see every new id "
                "(encode once with encode_to_shards, or freeze the encoder)"
            )
        self.path = Path(path)
        self.encoder = encoder
        self.grow = grow
        self.columns = columns
        self.read_rows = read_rows
        self.shuffle_rows = max(shuffle_rows, 1)
        self.int32 = int32
        groups = row_groups(self.path)
        self.groups = _split_groups(groups, rank, world)
        self.rank, self.world = rank, world

    def __len__(self) -> int:
        return sum(g.num_rows for g in self.groups)

    # -- raw chunks ----------------------------------------------------------------------------------
    def record_batches(self) -> Iterator[pa.RecordBatch]:
        """This rank's rows as Arrow record batches of at most ``read_rows`` rows, in order."""
        by_file: dict[Path, list[int]] = {}
        for g in self.groups:
            by_file.setdefault(g.file, []).append(g.index)
        fmt, local = ds.ParquetFileFormat(), pafs.LocalFileSystem()
        for file, groups in by_file.items():
            fragment = fmt.make_fragment(str(file.resolve()), filesystem=local).subset(row_group_ids=groups)
            scanner = ds.Scanner.from_fragment(
                fragment, columns=self.columns, batch_size=self.read_rows, use_threads=False
            )
            for rb in scanner.to_batches():
                if rb.num_rows:
                    yield rb

    def frames(self) -> Iterator[pl.DataFrame]:
        """Raw rows as polars frames (raw shards)."""
        for rb in self.record_batches():
            yield pl.from_arrow(rb)  # type: ignore[misc]

    def chunks(self) -> Iterator[dict[str, Tensor]]:
        """Encoded column chunks in row order (encoded on read when an encoder is given)."""
        for rb in self.record_batches():
            if self.encoder is not None:
                cols = self.encoder.transform(pl.from_arrow(rb), grow=self.grow)  # type: ignore[arg-type]
            else:
                cols = arrow_to_tensors(rb)
            if self.int32:
                cols = {k: v.to(torch.int32) if v.dtype == torch.int64 and k != "row" else v for k, v in cols.items()}
            yield cols

    # -- the PeriodTensors protocol ------------------------------------------------------------------
    def batches(
        self, batch_size: int, shuffle: bool = False, generator: torch.Generator | None = None
    ) -> Iterator[Batch]:
        """Batches of ``batch_size`` rows (the last one shorter), in order or shuffled within windows.

        Shuffled, a window's rows are drawn through a permutation of their indices, batch by batch: the
        window is held once (not also as a permuted copy), and the rows past its last full batch are
        copied out to wait for the next window (so they do not keep the window alive).
        """
        window = max(self.shuffle_rows, batch_size) if shuffle else batch_size
        pending: list[dict[str, Tensor]] = []
        held = 0
        for cols in self.chunks():
            pending.append(cols)
            held += _rows(cols)
            if held >= window:
                buf, pending = _concat(pending), []
                usable = (held // batch_size) * batch_size
                yield from _window_batches(buf, held, usable, batch_size, shuffle, generator, pending)
                held -= usable
                del buf
        if held:
            buf, pending = _concat(pending), []
            yield from _window_batches(buf, held, held, batch_size, shuffle, generator, pending)

    @property
    def rank_local(self) -> bool:
        """True when this reader holds one rank's share (``train_rows`` then trains it locally)."""
        return self.world > 1

    def take(self, index: Tensor) -> PeriodTensors:
        raise TypeError(
            "ShardedPeriod streams its rows; sharded training (torchrun) reads a rank's share "
            "with ShardedPeriod(..., rank=r, world=w) instead of a global batch split"
        )

    def to_tensors(self) -> PeriodTensors:
        """All of this rank's rows in memory (tests, small periods)."""
        chunks = list(self.chunks())
        if not chunks:
            raise ValueError(f"{self.path}: no rows")
        return PeriodTensors(_concat(chunks))


def _window_batches(
    buf: dict[str, Tensor],
    held: int,
    usable: int,
    batch_size: int,
    shuffle: bool,
    generator: torch.Generator | None,
    rest: list[dict[str, Tensor]],
) -> Iterator[Batch]:
    """The first ``usable`` rows of a window as batches (in a random order of the window's ``held`` rows
    when ``shuffle``); its other rows are appended to ``rest``. Batch ``i`` of a shuffled window is
    ``{k: v[order[i·b:(i+1)·b]]}``: the same rows, in the same order, as slicing the permuted window."""
    order = torch.randperm(held, generator=generator) if shuffle else None
    for i in range(0, usable, batch_size):
        if order is None:
            yield {k: v[i : i + batch_size] for k, v in buf.items()}
        else:
            index = order[i : i + batch_size]  # index_select: ~4x less overhead per call than v[index]
            yield {k: v.index_select(0, index) for k, v in buf.items()}
    if held > usable:
        if order is None:
            rest.append({k: v[usable:] for k, v in buf.items()})
        else:
            tail = order[usable:]
            rest.append({k: v.index_select(0, tail) for k, v in buf.items()})


def _rows(cols: dict[str, Tensor]) -> int:
    return next(iter(cols.values())).shape[0] if cols else 0


def _concat(parts: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    if len(parts) == 1:
        return parts[0]
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def _split_groups(groups: list[RowGroup], rank: int, world: int) -> list[RowGroup]:
    """Contiguous blocks of whole row groups, one per rank, balanced by row count (deterministic)."""
    if world <= 1:
        return groups
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} outside 0..{world - 1}")
    total = sum(g.num_rows for g in groups)
    out, seen = [], 0
    lo, hi = total * rank / world, total * (rank + 1) / world
    for g in groups:
        mid = seen + g.num_rows / 2  # a group belongs to the rank whose share holds its middle row
        if lo <= mid < hi:
            out.append(g)
        seen += g.num_rows
    return out


class ShardedRows:
    """Rows of consecutive periods kept on disk as encoded Parquet shards (one directory per period,
    :func:`period_dir`), read streaming by :class:`ShardedPeriod`.

    Quacks like :class:`PeriodTensors` where the protocol only streams rows (``len``, ``batches`` for
    ``train_rows``, ``predict_rows`` and ``serve_period``); ``slice`` reads the rows asked for into
    memory (the pretraining check and the guard read a few thousand). Memory holds one chunk or one
    shuffle window (``shuffle_rows``), never the rows; a window that holds every row shuffles them as
    ``PeriodTensors.batches`` would (same permutation of the same generator).
    """

    def __init__(self, dirs: Sequence[str | Path], lengths: Sequence[int], **reader: Any) -> None:
        self.dirs = [Path(d) for d in dirs]
        self.lengths = [int(n) for n in lengths]
        self.reader = reader  # ShardedPeriod options: read_rows, shuffle_rows, int32

    def __len__(self) -> int:
        return sum(self.lengths)

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")  # read on the CPU; train_rows and serve_period move each batch

    def _period(self) -> ShardedPeriod:
        reader = ShardedPeriod(self.dirs[0], **self.reader)
        reader.groups = [g for d in self.dirs for g in row_groups(d)]  # one reader across the directories
        return reader

    def batches(
        self, batch_size: int, shuffle: bool = False, generator: torch.Generator | None = None
    ) -> Iterator[Batch]:
        return self._period().batches(batch_size, shuffle=shuffle, generator=generator)

    def slice(self, start: int, end: int) -> PeriodTensors:
        """Rows ``start..end`` in memory (read up to ``end``, keeping only those)."""
        parts: list[dict[str, Tensor]] = []
        seen = 0
        for cols in self._period().chunks():
            n = next(iter(cols.values())).shape[0]
            lo, hi = max(start - seen, 0), min(end - seen, n)
            if lo < hi:
                parts.append({k: v[lo:hi] for k, v in cols.items()})
            seen += n
            if seen >= end:
                break
        if not parts:
            raise ValueError(f"rows {start}..{end} outside the {len(self)} rows of {self.dirs[0]} ...")
        return PeriodTensors.concat([PeriodTensors(p) for p in parts])


class ShardedStream(Stream):
    """A :class:`Stream` whose periods stay on disk as encoded Parquet shards (``root/period-0001`` ...,
    written by :func:`encode_to_shards` or ``write_tensors``, with the ``row`` column).

    ``run_one`` and ``pretrain`` run on it as on an in-memory stream for runs that read rows only in
    batches: the update strategies without extra loss columns (``incremental``, ``batch``, ``full``, no
    ``distill`` / ``self_correction``) and the error memories. What a run keeps in memory is then the
    model, one shuffle window and the per-row served predictions (8 bytes a row), not the rows.
    """

    def __init__(self, root: str | Path, feature_map: FeatureMap, meta: dict | None = None, **reader: Any) -> None:
        root = Path(root)
        dirs: list[Path] = []
        while period_dir(root, len(dirs) + 1).is_dir():
            dirs.append(period_dir(root, len(dirs) + 1))
        if not dirs:
            raise FileNotFoundError(f"no period-0001 shard directory under {root}")
        lengths = [sum(g.num_rows for g in row_groups(d)) for d in dirs]
        edges = [0]
        for n in lengths:
            edges.append(edges[-1] + n)
        self.dirs, self.reader = dirs, reader
        super().__init__(
            feature_map,
            ShardedRows(dirs, lengths, **reader),  # type: ignore[arg-type]
            list(zip(edges[:-1], edges[1:])),
            None,
            meta if meta is not None else {"key": f"shards:{root.resolve()}:{edges[-1]}"},
        )

    def to(self, device: torch.device | str) -> Stream:
        return self  # the shards stay on disk; each batch is moved where it is used

    def period(self, i: int) -> PeriodTensors:
        return self.periods(i, i)

    def periods(self, first: int, last: int) -> PeriodTensors:
        first = max(first, 1)
        if not 1 <= first <= last <= self.n_periods:
            raise IndexError(f"periods {first}..{last} outside 1..{self.n_periods}")
        lengths = [b - a for a, b in self.bounds[first - 1 : last]]
        return ShardedRows(self.dirs[first - 1 : last], lengths, **self.reader)  # type: ignore[return-value]
