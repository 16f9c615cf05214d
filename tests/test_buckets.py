"""No wasted tokens: the fixed train set split once into length buckets gives the padded batch's losses.

Buckets change which padded positions are computed, never a real token's value: each bucket is
padded to its own longest row, rows keep their index, and the losses of every mixture equal those of
the one padded batch (BBT's way) within 1e-5.
"""

from __future__ import annotations

import numpy as np
import pytest

from cliptune_ort.config import build_config
from cliptune_ort.encoding import buckets, padded_fraction
from cliptune_ort.tuner import prepare, score

from .conftest import needs_export

pytestmark = needs_export


@pytest.fixture(scope="module", params=["sst2", "rte"])
def ws(request, splade_dir):
    """A K=4 workspace per task (SST-2: single sentences, cross-entropy; RTE: long pairs, hinge)."""
    w = prepare(build_config(task=request.param, method="clip", k=4, d=50, seed=42, n_buckets=1, plot=False),
                splade_dir)
    yield w
    w.engine.close()


def test_buckets_are_padded_to_their_own_longest(ws):
    enc = ws.train.enc
    for nb in (1, 2, 4, 8, len(enc)):
        parts = buckets(enc, nb)
        idx = np.concatenate([i for i, _ in parts])
        assert sorted(idx.tolist()) == list(range(len(enc)))  # every row once
        for i, sub in parts:
            assert sub.ids.shape[1] == max(int(enc.lengths[i].max()), enc.min_seq)
            np.testing.assert_array_equal(sub.ids, enc.ids[i, : sub.ids.shape[1]])
            np.testing.assert_array_equal(sub.mask_pos, enc.mask_pos[i])
        real = int(enc.lengths.sum())
        computed = sum(s.ids.size for _, s in parts)
        assert padded_fraction(parts) == pytest.approx(1 - real / computed)
    fr = [padded_fraction(buckets(enc, nb)) for nb in (1, 2, 4, 8, len(enc))]
    assert all(a >= b for a, b in zip(fr, fr[1:])) and fr[-1] == 0.0 and fr[0] > 0.1


@pytest.mark.parametrize("mixture", ["mean_loss", "mean_logits", "assign"])
def test_bucketed_losses_equal_padded_every_mixture(ws, mixture):
    ws.cfg.mixture = mixture
    try:
        z = np.random.default_rng(3).standard_normal((4, ws.cfg.d))
        prompts = ws.prompts(z)
        padded = ws.train
        want = score(ws, prompts)
        for nb in (2, 8):
            ws.train = ws.engine.prepare(padded.enc, nb)
            assert ws.train.padded_fraction < padded.padded_fraction
            np.testing.assert_allclose(score(ws, prompts), want, atol=1e-5, rtol=0)
    finally:
        ws.train = padded
        ws.cfg.mixture = "mean_loss"
