"""ReLoop self-correction and IncCTR distillation against hand-computed values."""

import math

import pytest
import torch
import torch.nn.functional as F

from reloop.update.losses import CrossEntropy, Distill, SelfCorrection, self_correction_term


def _batch(y, y_last=None, teacher=None):
    b = {"label": torch.tensor(y, dtype=torch.float32)}
    if y_last is not None:
        b["y_last"] = torch.tensor(y_last)
    if teacher is not None:
        b["teacher"] = torch.tensor(teacher)
    return b


def test_alpha_zero_is_exactly_cross_entropy():
    logits = torch.randn(64)
    b = _batch((torch.rand(64) > 0.5).float().tolist(), torch.rand(64).tolist())
    assert torch.equal(SelfCorrection(0.0)(logits, b), CrossEntropy()(logits, b))


def test_self_correction_hand_values():
    # p = sigmoid(0) = 0.5 for every sample
    logits = torch.zeros(4)
    b = _batch([1, 1, 0, 0], [0.8, 0.3, 0.7, 0.2])
    # positives: max(0.8-0.5,0)=0.3, max(0.3-0.5,0)=0 ; negatives: max(0.5-0.7,0)=0, max(0.5-0.2,0)=0.3
    term = self_correction_term(torch.sigmoid(logits), b["y_last"], b["label"])
    assert torch.allclose(term, torch.tensor([0.3, 0.0, 0.0, 0.3]))
    alpha = 0.4
    want = alpha * 0.15 + (1 - alpha) * math.log(2)
    assert SelfCorrection(alpha)(logits, b).item() == pytest.approx(want, rel=1e-6)


def test_sc_and_its_gradient_vanish_where_new_model_already_beats_old():
    logits = torch.tensor([2.0, -2.0], requires_grad=True)  # p ≈ 0.88 (pos), 0.12 (neg)
    b = _batch([1, 0], [0.6, 0.4])  # old model was worse on both
    term = self_correction_term(torch.sigmoid(logits), b["y_last"], b["label"]).sum()
    term.backward()
    assert term.item() == 0.0
    assert torch.equal(logits.grad, torch.zeros(2))


def test_no_gradient_flows_into_y_last():
    y_last = torch.tensor([0.9, 0.1], requires_grad=True)
    logits = torch.zeros(2, requires_grad=True)
    b = {"label": torch.tensor([1.0, 0.0]), "y_last": y_last}
    SelfCorrection(0.5)(logits, b).backward()
    assert y_last.grad is None
    assert logits.grad is not None and logits.grad.abs().sum() > 0


def test_normalized_scale_divides_by_mean_old_error():
    logits = torch.zeros(2)
    b = _batch([1, 0], [0.8, 0.4])  # |y - y_last| = 0.2, 0.4 -> mean 0.3
    plain = self_correction_term(torch.sigmoid(logits), b["y_last"], b["label"]).mean()
    got = SelfCorrection(1.0, scale="normalized")(logits, b)
    assert got.item() == pytest.approx(plain.item() / 0.3, rel=1e-5)


def test_distill_hand_value_and_beta_zero_is_ce():
    logits = torch.tensor([0.5, -1.0])
    b = _batch([1, 0], teacher=[1.0, 1.0])
    ce = F.binary_cross_entropy_with_logits(logits, b["label"])
    soft = torch.sigmoid(torch.tensor([1.0, 1.0]))
    kd = -(soft * F.logsigmoid(logits) + (1 - soft) * F.logsigmoid(-logits)).mean()
    assert Distill(0.3)(logits, b).item() == pytest.approx((0.7 * ce + 0.3 * kd).item(), rel=1e-6)
    assert torch.allclose(Distill(0.0)(logits, b), CrossEntropy()(logits, b))


@pytest.mark.parametrize("bad", [-0.1, 1.5])
def test_weights_outside_unit_interval_are_rejected(bad):
    with pytest.raises(ValueError, match="self_correction"):
        SelfCorrection(bad)
    with pytest.raises(ValueError, match="distill"):
        Distill(bad)
