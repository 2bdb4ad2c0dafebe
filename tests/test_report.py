"""The result figure (periods.png): styles, integer period ticks, the paired differences, files written.

Not pixel tests: the figure is captured before it is saved and its axes, lines and bars are read.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from matplotlib.figure import Figure

from reloop.data.periods import phase_of
from reloop.protocol.report import (
    BASELINE_COLOR,
    period_differences,
    plot_periods,
    run_styles,
    seed_improvements,
    summarize,
)

ASMG_RUNS = [
    "IU",
    "BU-3",
    "BU-5",
    "BU-7",
    "SPMF",
    "IncCTR",
    "SML",
    "ASMG-Linear",
    "ASMG-GRU-single",
    "ASMG-GRU-multi",
    "ASMG-GRU-full",
    "ASMG-GRU-zero",
    "ASMG-GRU-unif",
]


def fake_rows(
    runs: list[str],
    seeds: int = 3,
    first: int = 12,
    last: int = 31,
    seed: int = 0,
    effects: dict[str, float] | None = None,
) -> list[dict[str, Any]]:
    """Rows as the runner writes them: a per-period swing shared by all runs, a per-seed offset, and a
    per-run effect."""
    rng = np.random.default_rng(seed)
    swing = 0.70 + 0.04 * np.sin(np.arange(last + 1))
    effects = effects if effects is not None else {r: float(rng.normal(0, 0.005)) for r in runs}
    rows = []
    for run in runs:
        for s in range(seeds):
            for p in range(first - 1, last + 1):
                value = swing[p] + 0.002 * s + (0.0 if run == "IU" else effects[run])
                rows.append(
                    {
                        "run": run,
                        "seed": s,
                        "period": p,
                        "phase": phase_of(p, 10, 10, 3),
                        "auc": value,
                        "gauc": value - 0.01,
                        "logloss": 0.62 - (value - 0.7),
                        "rows": 100,
                    }
                )
    return rows


@pytest.fixture
def captured(monkeypatch: pytest.MonkeyPatch) -> list[Figure]:
    """Every figure saved while the test runs (still open; the file is written as usual)."""
    figures: list[Figure] = []
    original = Figure.savefig

    def savefig(self: Figure, *args: Any, **kwargs: Any) -> None:
        figures.append(self)
        original(self, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", savefig)
    return figures


# ---------------------------------------------------------------------------------------------- styles


def test_twenty_runs_get_distinct_colour_and_marker() -> None:
    runs = ["IU"] + [f"run {i}" for i in range(19)]
    styles = run_styles(runs)
    assert list(styles) == runs
    pairs = [(s.color, s.marker) for s in styles.values()]
    assert len(set(pairs)) == len(runs)
    assert styles["IU"].color == BASELINE_COLOR
    assert all(s.color != BASELINE_COLOR for r, s in styles.items() if r != "IU")


def test_the_asmg_section_has_no_repeated_colour_in_its_first_ten_runs() -> None:
    """The issue: IU and ASMG-GRU-full shared a blue; BU-3 and ASMG-GRU-zero an orange."""
    styles = run_styles(ASMG_RUNS)
    assert styles["IU"].color != styles["ASMG-GRU-full"].color
    assert (styles["BU-3"].color, styles["BU-3"].marker) != (
        styles["ASMG-GRU-zero"].color,
        styles["ASMG-GRU-zero"].marker,
    )
    assert len({(s.color, s.marker, s.linestyle) for s in styles.values()}) == len(ASMG_RUNS)


@settings(max_examples=30, deadline=None)
@given(st.integers(min_value=1, max_value=280), st.booleans())
def test_styles_never_repeat(n: int, with_baseline: bool) -> None:
    runs = (["IU"] if with_baseline else []) + [f"r{i}" for i in range(n)]
    styles = run_styles(runs)
    assert len({(s.color, s.marker, s.linestyle) for s in styles.values()}) == len(runs)
    if n <= 70:
        assert len({(s.color, s.marker) for s in styles.values()}) == len(runs)


# ------------------------------------------------------------------------------------ the differences


def test_period_differences_are_paired_by_seed() -> None:
    """A run = IU + a constant: the per-seed offsets and the shared swing cancel, so the band is flat."""
    rows = fake_rows(["IU", "A"], seeds=4, effects={"A": 0.01})
    diffs = period_differences(rows, "auc", "IU")
    np.testing.assert_allclose(diffs["IU"].mean, 0.0, atol=1e-12)
    a = diffs["A"]
    assert list(a.periods) == list(range(12, 32))  # served periods only (11 is the pretrain phase)
    base = {(r["seed"], r["period"]): r["auc"] for r in rows if r["run"] == "IU"}
    expected = [np.mean([0.01 / base[(s, p)] * 100 for s in range(4)]) for p in a.periods]
    np.testing.assert_allclose(a.mean, expected, rtol=1e-9)
    np.testing.assert_allclose(a.high - a.low, 0.0, atol=0.02)  # unpaired: ≈ 0.35 (the seed offsets)
    assert a.seeds == 4


def test_logloss_differences_are_positive_when_better() -> None:
    rows = fake_rows(["IU", "A"], effects={"A": 0.01})  # higher AUC, lower LogLoss
    assert (period_differences(rows, "logloss")["A"].mean > 0).all()


@settings(max_examples=25, deadline=None)
@given(
    st.integers(min_value=1, max_value=5),
    st.integers(min_value=0, max_value=10_000),
    st.sampled_from(["std", "minmax"]),
)
def test_band_contains_the_mean(seeds: int, seed: int, band: str) -> None:
    rng = np.random.default_rng(seed)
    rows = fake_rows(["IU", "A", "B"], seeds=seeds, seed=seed)
    for r in rows:
        r["auc"] += float(rng.normal(0, 0.003))
    for d in period_differences(rows, "auc", "IU", band).values():
        assert (d.low <= d.mean + 1e-12).all() and (d.mean <= d.high + 1e-12).all()
        if seeds == 1:
            np.testing.assert_allclose(d.low, d.high)


def test_no_baseline_no_differences() -> None:
    assert period_differences(fake_rows(["A", "B"], effects={"A": 0.0, "B": 0.0})) == {}
    with pytest.raises(ValueError, match="band"):
        period_differences(fake_rows(["IU"]), band="iqr")


def test_seed_improvements_match_the_table() -> None:
    rows = fake_rows(ASMG_RUNS, seeds=5)
    table = {e["run"]: e["auc_imp_pct"] for e in summarize(rows)}
    per_seed = seed_improvements(rows)
    assert set(per_seed) == set(ASMG_RUNS) and all(len(v) == 5 for v in per_seed.values())
    for run, values in per_seed.items():  # mean of ratios vs ratio of means: equal to a few 1e-4 %
        assert math.isclose(values.mean(), table[run], abs_tol=5e-3)


# ------------------------------------------------------------------------------------------- figure


def _served_axes(fig: Figure) -> list[Any]:
    return [ax for ax in fig.axes if ax.get_title(loc="left").startswith(("(a)", "(b)"))]


def test_figure_has_integer_period_ticks_and_is_written(tmp_path: Path, captured: list[Figure]) -> None:
    rows = fake_rows(ASMG_RUNS, seeds=5)
    path = tmp_path / "periods.png"
    plot_periods(rows, path, "auc", title="t")
    assert path.stat().st_size > 10_000 and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    fig = captured[-1]
    axes = _served_axes(fig)
    assert len(axes) == 2
    for ax in axes:
        lo, hi = ax.get_xlim()
        ticks = [t for t in ax.get_xticks() if lo <= t <= hi]
        assert ticks and all(float(t).is_integer() for t in ticks), ticks


def test_figure_draws_every_run_once_with_its_style(tmp_path: Path, captured: list[Figure]) -> None:
    rows = fake_rows(ASMG_RUNS, seeds=3)
    plot_periods(rows, tmp_path / "p.png", oracle={p: 0.8 for p in range(1, 32)})
    fig = captured[-1]
    raw, diff = _served_axes(fig)
    styles = run_styles(ASMG_RUNS)
    raw_lines = {ln.get_label(): ln for ln in raw.get_lines()}
    assert set(ASMG_RUNS) | {"oracle (true p)"} <= set(raw_lines)
    for run, style in styles.items():
        assert (raw_lines[run].get_color(), raw_lines[run].get_marker()) == (style.color, style.marker)
    diff_runs = [ln.get_label() for ln in diff.get_lines() if not ln.get_label().startswith("_")]
    assert sorted(diff_runs) == sorted(r for r in ASMG_RUNS if r != "IU")
    assert len(diff.collections) == len(ASMG_RUNS) - 1  # a seed band per run


def test_summary_bars_are_the_table_values(tmp_path: Path, captured: list[Figure]) -> None:
    rows = fake_rows(ASMG_RUNS, seeds=4)
    plot_periods(rows, tmp_path / "p.png")
    summary_ax = next(ax for ax in captured[-1].axes if ax.get_title(loc="left").startswith("(c)"))
    widths = [bar.get_width() for bar in summary_ax.patches]
    table = [e["auc_imp_pct"] for e in summarize(rows)]
    np.testing.assert_allclose(widths, table, atol=1e-9)
    assert [t.get_text() for t in summary_ax.get_yticklabels()] == ASMG_RUNS


def test_single_run_or_no_baseline_draws_the_raw_panel_only(tmp_path: Path, captured: list[Figure]) -> None:
    plot_periods(fake_rows(["IU"], seeds=1), tmp_path / "one.png", oracle={12: 0.8, 13: 0.81})
    plot_periods(fake_rows(["A", "B"], effects={"A": 0.0, "B": 0.01}), tmp_path / "two.png", metric="logloss")
    for fig in captured:
        assert len(fig.axes) == 1
    assert (tmp_path / "one.png").exists() and (tmp_path / "two.png").exists()


def test_summary_without_users_gives_nan_gauc_without_a_numpy_warning():
    """A log without a user column has gAUC NaN in every period: the summary says NaN, silently."""
    import warnings

    from reloop.protocol.report import summarize

    rows = [
        {
            "run": "IU",
            "seed": 0,
            "period": p,
            "phase": "test",
            "auc": 0.6,
            "gauc": float("nan"),
            "logloss": 0.6,
            "rows": 10,
        }
        for p in (1, 2)
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        (entry,) = summarize(rows)
    assert entry["auc_mean"] == 0.6 and entry["gauc_mean"] != entry["gauc_mean"]
