"""Losses on verbalizer logits and the dev/test metrics, in numpy (float64 internally).

Shapes: logits [..., n, labels], labels [n]; every loss returns [...] (mean over the n examples).
"""

from __future__ import annotations

import numpy as np

LOSSES = ("ce", "hinge")
METRICS = ("acc", "f1")


def _correct(x: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Logit of the correct label: [..., n, labels] -> [..., n]."""
    return np.take_along_axis(x, np.broadcast_to(labels.reshape((1,) * (x.ndim - 2) + (-1, 1)),
                                                 x.shape[:-1] + (1,)), axis=-1)[..., 0]


def cross_entropy(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Mean cross-entropy over examples: [..., n, labels] -> [...]."""
    x = logits.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    lse = np.log(np.exp(x - m).sum(axis=-1)) + m[..., 0]
    return (lse - _correct(x, labels)).mean(axis=-1)


def hinge(logits: np.ndarray, labels: np.ndarray, margin: float = 2.0) -> np.ndarray:
    """Multi-class margin loss (torch.nn.MultiMarginLoss): mean_n sum_{j != y} max(0, m - s_y + s_j) / labels."""
    x = logits.astype(np.float64)
    c = _correct(x, labels)[..., None]
    terms = np.maximum(0.0, margin - c + x)
    onehot = np.arange(x.shape[-1]) == labels[:, None]
    terms = np.where(onehot, 0.0, terms)
    return (terms.sum(axis=-1) / x.shape[-1]).mean(axis=-1)


def loss_fn(name: str, logits: np.ndarray, labels: np.ndarray, margin: float = 2.0) -> np.ndarray:
    if name == "ce":
        return cross_entropy(logits, labels)
    if name == "hinge":
        return hinge(logits, labels, margin)
    raise ValueError(f"unknown loss {name!r}")


def accuracy(pred: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(pred == labels)) if len(labels) else float("nan")


def f1_binary(pred: np.ndarray, labels: np.ndarray, positive: int = 1) -> float:
    """F1 of the positive class (MRPC: 1 = equivalent)."""
    tp = int(np.sum((pred == positive) & (labels == positive)))
    fp = int(np.sum((pred == positive) & (labels != positive)))
    fn = int(np.sum((pred != positive) & (labels == positive)))
    return 2 * tp / (2 * tp + fp + fn) if tp else 0.0


def metric_fn(name: str, logits: np.ndarray, labels: np.ndarray) -> float:
    """Metric of logits [n, labels] against labels [n]."""
    pred = np.argmax(logits, axis=-1)
    if name == "acc":
        return accuracy(pred, labels)
    if name == "f1":
        return f1_binary(pred, labels)
    raise ValueError(f"unknown metric {name!r}")
