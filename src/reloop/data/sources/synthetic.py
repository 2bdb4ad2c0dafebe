"""A seeded, drifting click stream with known click probabilities.

Users and items have latent vectors (``dim``, unit scale); items belong to ``categories`` whose
centres their vectors scatter around. For an impression of item ``i`` to user ``u`` at hour ``h`` of
period ``t``::

    logit = bias + b_u + b_i + interaction_scale * <u_u(t), v_i>
            + novelty * exp(-age_i(t) / item_lifetime)
            + context_amplitude * sin(2 pi h / 24 + phi_cat(i) + 2 pi t / context_cycle)
    p_true = sigmoid(logit);  label ~ Bernoulli(p_true)

Drift, all on by default (see :class:`SyntheticConfig`): user vectors take an AR(1) random-walk step
each period (gradual), a share of users draws a new vector each period (abrupt), items arrive over
time while old items lose exposure and appeal (life cycles), and the hour x category effect
oscillates over periods (recurring context).

Traffic: each period has ``rows_per_period`` impressions at uniform random seconds of the period
(``period_seconds``, one day by default, periods starting at midnight UTC), users drawn by a fixed
log-normal activity, items drawn among the items already arrived with weight
``exp(popularity_i - age_i / item_lifetime)``. The world (vectors, biases, arrivals) and the traffic
use separate seeded streams, so the same ``seed`` gives the same users and items whatever the
traffic volume.

Columns: ``label``, ``time``, ``user_id`` (``u<k>``), ``item_id`` (``i<k>``, numbered in arrival
order), ``item_cat`` (``c<k>``), ``hour`` (``"0"``..``"23"``), ``p_true`` (Float64, the truth; not a
feature), and optionally ``history`` (last positives of the user, off by default).

Oracle: ``roc_auc_score(label, p_true)`` per period is the best AUC any model can reach on that
period; callers compute it per period (the period of row ``r`` is ``r // rows_per_period``, which
is also what ``periods: {count: <periods>, by: rows}`` or ``by: time`` gives).

Example::

    >>> from reloop.data.sources.synthetic import SyntheticConfig, generate
    >>> log = generate(SyntheticConfig(users=50, items=40, rows_per_period=100, periods=3))
    >>> log.frame.height, log.truth
    (300, 'p_true')
"""

from __future__ import annotations

import numpy as np
import polars as pl

from reloop.data.schema import FeatureSchema, FeatureSpec
from reloop.data.sources.config import LABEL, SOURCES, TIME, SyntheticConfig, SyntheticSourceConfig
from reloop.data.sources.tabular import history_column
from reloop.data.validate import LoadedLog, LoadReport

__all__ = ["SyntheticConfig", "SyntheticWorld", "generate", "load_synthetic", "TRUTH"]

TRUTH = "p_true"


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


class SyntheticWorld:
    """The hidden state of the stream; :meth:`click_probability` gives ``p_true`` for any
    (user, item, hour, period), :meth:`generate` draws the log."""

    def __init__(self, cfg: SyntheticConfig | None = None) -> None:
        cfg = cfg or SyntheticConfig()
        self.cfg = cfg
        rng = np.random.default_rng([cfg.seed, 0])
        d, U, I, P, C = cfg.dim, cfg.users, cfg.items, cfg.periods, cfg.categories  # noqa: E741  (the paper's letters)

        centres = _unit(rng.normal(size=(C, d)))
        self.item_cat = rng.integers(0, C, size=I)
        self.item_vec = _unit(centres[self.item_cat] + cfg.category_spread * _unit(rng.normal(size=(I, d))))
        self.item_bias = rng.normal(0.0, cfg.item_bias_std, size=I)
        self.item_popularity = rng.normal(0.0, cfg.popularity_std, size=I)
        n0 = min(I, max(1, int(round(cfg.initial_item_share * I))))
        arrival = np.zeros(I, dtype=np.int64)
        if P > 1 and n0 < I:
            arrival[n0:] = 1 + (np.arange(I - n0) * (P - 1)) // (I - n0)
        self.item_arrival = arrival  # period of arrival; item ids are numbered in arrival order
        self.cat_phase = rng.uniform(0.0, 2 * np.pi, size=C)

        self.user_bias = rng.normal(0.0, cfg.user_bias_std, size=U)
        activity = np.exp(rng.normal(0.0, cfg.activity_std, size=U))
        self.user_activity = activity / activity.sum()
        vecs = np.empty((P, U, d))
        self.switched = np.zeros((P, U), dtype=bool)  # which users switched taste at the start of period t
        vecs[0] = rng.normal(0.0, 1.0 / np.sqrt(d), size=(U, d))
        keep = np.sqrt(1.0 - cfg.drift_sigma**2)
        for t in range(1, P):
            step = rng.normal(0.0, 1.0 / np.sqrt(d), size=(U, d))
            vecs[t] = keep * vecs[t - 1] + cfg.drift_sigma * step
            switch = rng.random(U) < cfg.switch_share
            vecs[t, switch] = rng.normal(0.0, 1.0 / np.sqrt(d), size=(int(switch.sum()), d))
            self.switched[t] = switch
        self.user_vec = vecs  # (periods, users, dim)
        self._traffic_seed = [cfg.seed, 1]

    # ----------------------------------------------------------------------------------------------

    def logit(self, users: np.ndarray, items: np.ndarray, hours: np.ndarray, periods: np.ndarray) -> np.ndarray:
        """Vectorised true logit; arrays broadcast together (integer indices, ``periods`` clipped
        to the simulated range; an item queried before its arrival gets age 0)."""
        cfg = self.cfg
        users, items, hours, periods = np.broadcast_arrays(
            np.asarray(users), np.asarray(items), np.asarray(hours), np.clip(np.asarray(periods), 0, cfg.periods - 1)
        )
        inter = np.einsum("...d,...d->...", self.user_vec[periods, users], self.item_vec[items])
        age = np.maximum(periods - self.item_arrival[items], 0)
        cat = self.item_cat[items]
        context = cfg.context_amplitude * np.sin(
            2 * np.pi * hours / 24.0 + self.cat_phase[cat] + 2 * np.pi * periods / cfg.context_cycle
        )
        return (
            cfg.bias
            + self.user_bias[users]
            + self.item_bias[items]
            + cfg.interaction_scale * inter
            + cfg.novelty * np.exp(-age / cfg.item_lifetime)
            + context
        )

    def click_probability(
        self, users: np.ndarray, items: np.ndarray, hours: np.ndarray, periods: np.ndarray
    ) -> np.ndarray:
        """``p_true`` for integer user/item indices, hours 0..23 and periods."""
        return _sigmoid(self.logit(users, items, hours, periods))

    def exposure(self, period: int) -> np.ndarray:
        """Item sampling distribution of a period (zero for items not yet arrived)."""
        age = period - self.item_arrival
        w = np.where(age >= 0, np.exp(self.item_popularity - np.maximum(age, 0) / self.cfg.item_lifetime), 0.0)
        return w / w.sum()

    def draw(self) -> dict[str, np.ndarray]:
        """The raw arrays of the log: user, item, hour, period, time, p_true, label (all rows)."""
        cfg = self.cfg
        rng = np.random.default_rng(self._traffic_seed)
        R, P = cfg.rows_per_period, cfg.periods
        users = np.empty((P, R), dtype=np.int64)
        items = np.empty((P, R), dtype=np.int64)
        offsets = np.empty((P, R), dtype=np.int64)
        for t in range(P):
            users[t] = rng.choice(cfg.users, size=R, p=self.user_activity)
            items[t] = rng.choice(cfg.items, size=R, p=self.exposure(t))
            offsets[t] = np.sort(rng.integers(0, cfg.period_seconds, size=R))
        periods = np.repeat(np.arange(P, dtype=np.int64), R)
        time = cfg.start + periods * cfg.period_seconds + offsets.ravel()
        hours = (time % 86_400) // 3_600
        users, items = users.ravel(), items.ravel()
        p = self.click_probability(users, items, hours, periods)
        label = (rng.random(len(p)) < p).astype(np.int8)
        if cfg.label_noise > 0:
            # Flipped labels model logging noise; p_true stays the clean probability (the oracle).
            noise_rng = np.random.default_rng([cfg.seed, 0x401])
            flip = noise_rng.random(len(label)) < cfg.label_noise
            label = np.where(flip, 1 - label, label).astype(np.int8)
        return {
            "user": users, "item": items, "hour": hours, "period": periods, "time": time, "p_true": p, "label": label,
        }  # fmt: skip

    def generate(self) -> LoadedLog:
        cfg = self.cfg
        a = self.draw()
        frame = pl.DataFrame(
            {
                LABEL: pl.Series(a["label"], dtype=pl.Int8),
                TIME: pl.Series(a["time"], dtype=pl.Int64),
                "user_id": _prefixed("u", a["user"]),
                "item_id": _prefixed("i", a["item"]),
                "item_cat": _prefixed("c", self.item_cat[a["item"]]),
                "hour": pl.Series(a["hour"]).cast(pl.String),
                TRUTH: pl.Series(a["p_true"], dtype=pl.Float64),
            }
        )
        features = [FeatureSpec(name=n) for n in ("user_id", "item_id", "item_cat", "hour")]
        if cfg.history is not None:
            pos = np.flatnonzero(a["label"] == 1)
            hist = history_column(
                a["user"][pos], a["time"][pos], frame["item_id"].gather(pos), a["user"], a["time"], cfg.history
            )
            frame = frame.with_columns(hist)
            features.append(FeatureSpec(name="history", kind="sequence", vocab="item_id", max_len=cfg.history))
        n = frame.height
        report = LoadReport(
            rows_read=n,
            rows_kept=n,
            source=f"synthetic(seed={cfg.seed})",
            notes=[
                f"synthetic: {cfg.periods} periods x {cfg.rows_per_period:,} rows, {cfg.users:,} users, "
                f"{cfg.items:,} items ({int((self.item_arrival == 0).sum()):,} at start), CTR {a['label'].mean():.3f}"
            ],
        )
        schema = FeatureSchema(features=features, label=LABEL, time=TIME, user="user_id")
        return LoadedLog(frame=frame, schema=schema, report=report, truth=TRUTH)


def _prefixed(prefix: str, ids: np.ndarray) -> pl.Series:
    return pl.select(pl.lit(prefix) + pl.Series(ids).cast(pl.String)).to_series()


def generate(cfg: SyntheticConfig | None = None) -> LoadedLog:
    """Draw the synthetic log (deterministic for a given config)."""
    return SyntheticWorld(cfg).generate()


def load_synthetic(cfg: SyntheticSourceConfig) -> LoadedLog:
    return generate(cfg.synthetic)


@SOURCES.register("synthetic")
class SyntheticSource:
    """``source: synthetic``: reloop's drifting click stream with known click probabilities."""

    Options = SyntheticSourceConfig
    load = staticmethod(load_synthetic)
