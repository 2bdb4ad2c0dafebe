"""Split a time-ordered log into periods, and name the protocol phase of each period."""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import Field

from reloop.data.validate import DataError
from reloop.registry import Strict


class PeriodsConfig(Strict):
    """``data.periods``: ``count`` periods, of equal row counts (``by: rows``, the ASMG split of
    Sobazaar/MovieLens) or equal time windows between the first and last event (``by: time``)."""

    count: int = Field(default=31, ge=2)
    by: Literal["rows", "time"] = "rows"


def period_bounds(times: np.ndarray, config: PeriodsConfig) -> list[tuple[int, int]]:
    """Row ranges ``[start, end)`` of periods 1..count over rows sorted by time.

    Every row belongs to exactly one period (equal-count splits spread the remainder instead of
    dropping it). ``by: time`` can give empty periods when the log has gaps; that is an error. Both
    problems of the data (too few rows, empty windows) raise :class:`DataError`.
    """
    n = len(times)
    if n < config.count:
        raise DataError(f"data.periods.count: {config.count} periods need at least as many rows, got {n}")
    if np.any(np.diff(times) < 0):
        raise ValueError("rows are not sorted by time")
    if config.by == "rows":
        edges = np.linspace(0, n, config.count + 1).round().astype(np.int64)
    else:
        t0, t1 = float(times[0]), float(times[-1])
        span = max(t1 - t0, 1e-9)
        cuts = t0 + span * np.arange(1, config.count) / config.count
        edges = np.concatenate([[0], np.searchsorted(times, cuts, side="left"), [n]])
        sizes = np.diff(edges)
        if np.any(sizes == 0):
            empty = (np.flatnonzero(sizes == 0) + 1).tolist()
            raise DataError(f"data.periods: time windows {empty} hold no rows; use fewer periods or by: rows")
    return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:])]


Phase = Literal["pretrain", "warmup", "valid", "test"]


def phase_of(period: int, pretrain: int, warmup: int, valid: int) -> Phase:
    """Phase of a *served* period: the model trained through period t serves t + 1.

    Periods 1..P pretrain Θ0. The first served period is P + 2 (Θ_{P+1} serves it); served periods
    P+2..P+1+warmup are warm-up, the next ``valid`` are validation, the rest test (ASMG §4.1.3:
    with P = 10, warm-up serves 12..21, validation 22..24, test 25..31).
    """
    if period <= pretrain + 1:
        return "pretrain"
    k = period - pretrain - 1
    if k <= warmup:
        return "warmup"
    if k <= warmup + valid:
        return "valid"
    return "test"
