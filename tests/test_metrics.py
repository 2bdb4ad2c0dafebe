import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import log_loss, roc_auc_score

from reloop.protocol.metrics import auc, gauc, logloss


@settings(max_examples=60, deadline=None)
@given(st.integers(2, 300), st.integers(0, 10_000), st.booleans())
def test_auc_matches_sklearn_including_ties(n, seed, coarse):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    s = rng.random(n)
    if coarse:
        s = np.round(s, 1)  # many ties
    if len(set(y)) < 2:
        assert np.isnan(auc(y, s))
        return
    assert auc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)


def test_gauc_is_row_weighted_mean_of_user_aucs_skipping_one_class_users():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 500)
    s = np.round(rng.random(500), 2)
    u = rng.integers(0, 40, 500)
    u[:5], y[:5] = 999, 1  # a user with one class only: skipped
    ref, w = [], []
    for k in np.unique(u):
        m = u == k
        if len(set(y[m])) == 2:
            ref.append(roc_auc_score(y[m], s[m]))
            w.append(m.sum())
    assert gauc(y, s, u) == pytest.approx(np.average(ref, weights=w), abs=1e-12)


def test_logloss_matches_sklearn_and_hand_value():
    y = np.array([1, 0, 1, 0])
    p = np.array([0.9, 0.2, 0.6, 0.5])
    assert logloss(y, p) == pytest.approx(log_loss(y, p))
    hand = -(np.log(0.9) + np.log(0.8) + np.log(0.6) + np.log(0.5)) / 4
    assert logloss(y, p) == pytest.approx(hand)
    assert np.isfinite(logloss(np.array([1, 0]), np.array([0.0, 1.0])))
