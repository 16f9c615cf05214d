"""Losses and metrics against torch's reference implementations and hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest

from cliptune_ort.losses import accuracy, cross_entropy, f1_binary, hinge, loss_fn, metric_fn


def test_cross_entropy_known_value():
    logits = np.array([[2.0, 0.0], [0.0, 0.0]])
    labels = np.array([0, 1])
    want = (np.log(1 + np.exp(-2.0)) + np.log(2.0)) / 2
    assert cross_entropy(logits, labels) == pytest.approx(want, abs=1e-12)


def test_hinge_known_value():
    logits = np.array([[3.0, 0.0, 2.5], [0.0, 1.0, 0.0]])
    labels = np.array([0, 1])
    # row 0: max(0, 2-3+0) + max(0, 2-3+2.5) = 0 + 1.5 ; row 1: 1 + 1 = 2 ; / 3 labels
    assert hinge(logits, labels, 2.0) == pytest.approx((1.5 / 3 + 2 / 3) / 2)


def test_losses_match_torch_with_population_axes():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((4, 3, 32, 5)).astype(np.float32) * 3
    labels = rng.integers(0, 5, 32)
    ce = loss_fn("ce", logits, labels)
    hg = loss_fn("hinge", logits, labels, 2.0)
    assert ce.shape == hg.shape == (4, 3)
    for i in range(4):
        for j in range(3):
            x, y = torch.from_numpy(logits[i, j]).double(), torch.from_numpy(labels)
            assert ce[i, j] == pytest.approx(float(torch.nn.functional.cross_entropy(x, y)), abs=1e-9)
            assert hg[i, j] == pytest.approx(float(torch.nn.functional.multi_margin_loss(x, y, margin=2.0)),
                                             abs=1e-9)


def test_metrics():
    labels = np.array([1, 1, 0, 0, 1])
    pred = np.array([1, 0, 0, 1, 1])
    assert accuracy(pred, labels) == pytest.approx(3 / 5)
    assert f1_binary(pred, labels) == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))
    logits = np.eye(2)[pred]
    assert metric_fn("acc", logits, labels) == pytest.approx(0.6)
    assert metric_fn("f1", logits, labels) == pytest.approx(2 / 3)
