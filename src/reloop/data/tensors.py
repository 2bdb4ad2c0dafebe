"""Encoded periods as contiguous tensors; batches are slices (no per-row Python on hot paths).

A ``Batch`` is a ``dict[str, Tensor]``: one entry per feature (``[B]`` long for categorical, ``[B]``
float for numeric, ``[B, L]`` long for sequences, 0 = padding), plus ``label`` (``[B]`` float) and,
when the log has one, ``user`` (``[B]`` long, for gAUC). Strategies may attach per-row columns
(``y_last``: the served prediction, ``teacher``: the previous model's logit) before training.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from reloop.data.schema import FeatureMap

Batch = dict[str, Tensor]


@dataclass
class PeriodTensors:
    """Rows of one or more periods, column-wise. All columns share the first dimension."""

    data: dict[str, Tensor]

    def __post_init__(self) -> None:
        sizes = {k: v.shape[0] for k, v in self.data.items()}
        if len(set(sizes.values())) > 1:
            raise ValueError(f"columns disagree on row count: {sizes}")

    def __len__(self) -> int:
        return next(iter(self.data.values())).shape[0] if self.data else 0

    @property
    def device(self) -> torch.device:
        """Where the columns live (the first column's device; the CPU when there are none)."""
        return next(iter(self.data.values())).device if self.data else torch.device("cpu")

    def to(self, device: torch.device | str) -> PeriodTensors:
        """The rows on ``device``: ``self`` when every column is already there, else one copy per column."""
        device = torch.device(device)
        if all(v.device == device for v in self.data.values()):
            return self
        return PeriodTensors({k: v.to(device) for k, v in self.data.items()})

    def slice(self, start: int, end: int) -> PeriodTensors:
        return PeriodTensors({k: v[start:end] for k, v in self.data.items()})

    def take(self, index: Tensor) -> PeriodTensors:
        return PeriodTensors({k: v[index] for k, v in self.data.items()})

    def with_columns(self, **columns: Tensor) -> PeriodTensors:
        """A new view with extra per-row columns (the originals are not mutated)."""
        for name, col in columns.items():
            if col.shape[0] != len(self):
                raise ValueError(f"column {name!r} has {col.shape[0]} rows, expected {len(self)}")
        return PeriodTensors({**self.data, **columns})

    def batches(
        self, batch_size: int, shuffle: bool = False, generator: torch.Generator | None = None
    ) -> Iterator[Batch]:
        n = len(self)
        if shuffle:
            # Drawn on the CPU (same order on every device), moved once per pass, not once per batch.
            order = torch.randperm(n, generator=generator)
            if self.data and self.device.type != "cpu":
                order = order.to(self.device)
            for i in range(0, n, batch_size):
                idx = order[i : i + batch_size]
                yield {k: v[idx] for k, v in self.data.items()}
        else:
            for i in range(0, n, batch_size):
                yield {k: v[i : i + batch_size] for k, v in self.data.items()}

    @staticmethod
    def concat(parts: Sequence[PeriodTensors]) -> PeriodTensors:
        parts = [p for p in parts if len(p)]
        if not parts:
            raise ValueError("nothing to concatenate")
        if len(parts) == 1:
            return parts[0]
        keys = set(parts[0].data)
        for p in parts[1:]:
            keys &= set(p.data)
        return PeriodTensors({k: torch.cat([p.data[k] for p in parts]) for k in sorted(keys)})


@dataclass
class Stream:
    """The whole encoded log, time-ordered, with period ``i`` (1-based) at rows ``bounds[i-1]``."""

    feature_map: FeatureMap
    rows: PeriodTensors
    bounds: list[tuple[int, int]]
    truth: Tensor | None = None  # true click probability per row (synthetic data), else None
    meta: dict = field(default_factory=dict)

    @property
    def n_periods(self) -> int:
        return len(self.bounds)

    @property
    def device(self) -> torch.device:
        return self.rows.device

    def to(self, device: torch.device | str) -> Stream:
        """The stream with its rows on ``device`` (one copy of every column; ``self`` when already there).

        ``truth`` (synthetic data's click probabilities, used for the oracle metrics only) stays put.
        """
        rows = self.rows.to(device)
        if rows is self.rows:
            return self
        return Stream(self.feature_map, rows, self.bounds, self.truth, self.meta)

    def period(self, i: int) -> PeriodTensors:
        if not 1 <= i <= self.n_periods:
            raise IndexError(f"period {i} outside 1..{self.n_periods}")
        start, end = self.bounds[i - 1]
        return self.rows.slice(start, end)

    def periods(self, first: int, last: int) -> PeriodTensors:
        """Periods ``first..last`` inclusive (contiguous rows, so still a slice)."""
        first = max(first, 1)
        return self.rows.slice(self.bounds[first - 1][0], self.bounds[last - 1][1])

    def truth_of(self, i: int) -> Tensor | None:
        if self.truth is None:
            return None
        start, end = self.bounds[i - 1]
        return self.truth[start:end]


class History:
    """What a strategy may read at period ``t``: periods 1..t and nothing later.

    Look-ahead is a structural error here, not a convention: reading period t+1 raises.
    """

    def __init__(self, stream: Stream, upto: int) -> None:
        self._stream = stream
        self.upto = upto

    @property
    def feature_map(self) -> FeatureMap:
        return self._stream.feature_map

    def period(self, i: int) -> PeriodTensors:
        if i > self.upto:
            raise LookAheadError(f"period {i} is in the future (data known up to period {self.upto})")
        return self._stream.period(i)

    def periods(self, first: int, last: int) -> PeriodTensors:
        if last > self.upto:
            raise LookAheadError(f"period {last} is in the future (data known up to period {self.upto})")
        return self._stream.periods(first, last)


class LookAheadError(RuntimeError):
    """A strategy asked for data from a period it must not have seen yet."""
