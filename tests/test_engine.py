"""The engine's execution paths agree: plain runs, IOBinding (CPU provider), stacking, workers."""

from __future__ import annotations

import numpy as np
import pytest

from cliptune_ort.config import build_config
from cliptune_ort.engine import Engine
from cliptune_ort.errors import ConfigError, ProviderError
from cliptune_ort.tuner import prepare, score

from .conftest import needs_export

pytestmark = needs_export


@pytest.fixture(scope="module")
def ws(splade_dir):
    return prepare(build_config(task="sst2", method="clip", k=2, d=40, popsize=5), splade_dir)


@pytest.mark.parametrize("iobinding,cpc,workers", [(False, 1, 1), (True, 1, 2), (True, 5, 1), (False, 3, 2),
                                                   (True, 2, 2)])
def test_paths_agree(ws, iobinding, cpc, workers):
    p = ws.prompts(np.random.default_rng(4).standard_normal((5, 40)))
    ref = score(ws, p)
    eng = Engine(ws.manifest, [0, 1, 2], device="cpu", iobinding=iobinding, cands_per_call=cpc, workers=workers)
    old, ws.engine = ws.engine, eng
    try:
        for _ in range(2):  # second call reuses the bindings / buffers
            np.testing.assert_allclose(score(ws, p), ref, atol=1e-6, rtol=0)
        p2 = p[::-1].copy()  # new values through the same persistent buffers
        np.testing.assert_allclose(score(ws, p2), ref[::-1], atol=1e-6, rtol=0)
        # a fresh batch object never reuses another batch's resident inputs
        dev = eng.logits(0, p[:1], ws.dev, ws.verbalizer_ids)
        dev2 = eng.logits(0, p[:1], eng.prepare(ws.dev.enc, 1), ws.verbalizer_ids)
        np.testing.assert_allclose(dev, dev2, atol=1e-5)
    finally:
        ws.engine = old
        eng.close()


def test_cuda_requests_fail_loudly_without_cuda(splade_dir):
    from cliptune_ort.manifest import load_manifest
    from cliptune_ort.sessions import available_providers

    if "CUDAExecutionProvider" in available_providers():
        pytest.skip("CUDA present")
    man = load_manifest(splade_dir, verify=False)
    with pytest.raises(ProviderError, match="no CUDAExecutionProvider"):
        Engine(man, [0], device="cuda")
    with pytest.raises(ConfigError, match="cuda_graph needs --device cuda"):
        Engine(man, [0], device="cpu", cuda_graph=True)
    assert Engine(man, [0], device="auto").device == "cpu"
