"""The FP8 precision study's fake quantisation (benchmarks/fp8_precision.py) rounds as E4M3 does."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from .conftest import needs_export

pytestmark = needs_export
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


def test_fake_quant_rounds_to_e4m3_and_saturates():
    import torch

    fp8 = pytest.importorskip("fp8_precision")
    x = torch.tensor([0.1, 1.0, 1.05, 300.0, 500.0, -1000.0])
    got = fp8.fake_quant(x, 1.0, "e4m3").tolist()
    # E4M3: 3 mantissa bits (steps of 0.125 in [1, 2): 1.05 -> 1.0; 0.1 -> 0.1015625; 300 -> 288), max 448
    assert got == [0.1015625, 1.0, 1.0, 288.0, 448.0, -448.0]
    assert fp8.fake_quant(x, 0.5, "e4m3").tolist()[3] == 224.0  # saturation is relative to the scale: 448 x 0.5
    assert fp8.fake_quant(torch.tensor([1.0009765625, 1.0004]), 1.0, "fp16").tolist() == [1.0009765625, 1.0]


def test_quant_linear_calibrates_then_quantises():
    import torch

    fp8 = pytest.importorskip("fp8_precision")
    torch.manual_seed(0)
    lin = torch.nn.Linear(16, 8).requires_grad_(False)
    q = fp8.quant_linear_class()(lin, "e4m3")
    x = torch.randn(5, 16) * 3
    assert torch.equal(q(x), lin(x)) and q.amax == pytest.approx(float(x.abs().max()))  # calibrating: fp32
    q.calibrating = False
    y = q(x)
    scale = q.amax / fp8.E4M3_MAX
    want = torch.nn.functional.linear(fp8.fake_quant(x, scale, "e4m3"), q.wq, lin.bias)
    assert torch.equal(y, want)
    rel = float((y - lin(x)).norm() / lin(x).norm())
    assert 1e-3 < rel < 0.1  # E4M3 moves the output by a few percent, not more
    assert np.isfinite(y.numpy()).all()


def test_rowwise_scales_follow_each_row():
    import torch

    fp8 = pytest.importorskip("fp8_precision")
    x = torch.tensor([[0.001, 0.002, -0.003], [100.0, 50.0, 1.05], [0.0, 0.0, 0.0]])
    got = fp8.fake_quant_rows(x)
    # each row's largest value lands exactly on 448 * scale: exact; small rows keep their precision
    assert got[0, 2].item() == pytest.approx(-0.003, rel=1e-6) and got[1, 0].item() == pytest.approx(100.0, rel=1e-6)
    assert torch.equal(got[2], x[2])  # zeros stay zeros

    def rel(y):
        return float(((y[0] - x[0]) / x[0]).abs().max())

    assert rel(got) <= 1 / 16  # within E4M3's mantissa step
    assert rel(fp8.fake_quant(x, 100.0 / fp8.E4M3_MAX, "e4m3")) > 0.08  # one scale for all: subnormal, coarser
    lin = torch.nn.Linear(3, 2).requires_grad_(False)
    q = fp8.quant_linear_class()(lin, "e4m3_rows")
    assert not q.calibrating
    want = torch.nn.functional.linear(fp8.fake_quant_rows(x), fp8.fake_quant_rows(lin.weight), lin.bias)
    assert torch.equal(q(x), want)
