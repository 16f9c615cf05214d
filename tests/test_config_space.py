"""Any valid setting runs: short tunes over settings spread across the whole space (every task, method,
optimiser, mixture, loss, budget unit, eigen schedule; populations and d on both sides of pycma's limits;
buckets, workers, candidates per call) end with a result, never a traceback.

pop 2 at d = 500 crashed inside pycma's tell before the config refused it (session 21): a setting the config
accepts is a promise that the run works, and this test holds the config to it. Each case is a whole ``tune``
(sessions, data, CMA-ES or random search, dev and test evaluation) of two generations on the splade-tiny
export. The cases are drawn once from a fixed seed, every category in turn, so the same 14 run every time.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from cliptune_ort.config import (
    BUDGET_UNITS,
    CMA_EIGEN,
    CMA_TPA_DIMENSION,
    MIXTURES,
    OPTIMIZERS,
    build_config,
)
from cliptune_ort.errors import ConfigError
from cliptune_ort.tuner import tune

from .conftest import needs_export

pytestmark = [needs_export, pytest.mark.slow]  # about a minute: 14 whole (short) runs

TASKS = ("sst2", "yelp_polarity", "ag_news", "dbpedia", "mrpc", "rte", "snli")
#: the vendored copies of these hold RLPrompt's 16-shot splits of five seeds only
PREDRAWN, PREDRAWN_SEEDS = ("yelp_polarity", "ag_news", "dbpedia"), (13, 21, 42, 87, 100)
METHODS = ("clip", "bbt", "clip", "manual", "clip", "bbt", "clip")  # clip most: it has the most settings
DS = (1, 17, 299, CMA_TPA_DIMENSION, 500)


def cases(n: int = 14, seed: int = 21) -> list[dict]:
    """n settings, each category cycled (so all appear) and the rest drawn from ``seed``."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        task, method, d = TASKS[i % len(TASKS)], METHODS[i % len(METHODS)], DS[i % len(DS)]
        optimizer = OPTIMIZERS[(i // 2) % len(OPTIMIZERS)]
        low = 3 if optimizer == "cma" and d >= CMA_TPA_DIMENSION else 2  # pycma's two-point adaptation (config)
        pop = int(rng.integers(low, 8))
        if task in PREDRAWN:
            seed_i, per_class = int(rng.choice(PREDRAWN_SEEDS)), 16
        else:
            seed_i, per_class = int(rng.integers(0, 2**31 - 1)), int(rng.integers(1, 5))
        s = {"task": task, "method": method, "optimizer": optimizer, "d": d, "popsize": pop,
             "cma_eigen": CMA_EIGEN[i % len(CMA_EIGEN)], "seed": seed_i, "per_class": per_class,
             "k": int(rng.integers(1, 5)), "mixture": MIXTURES[i % len(MIXTURES)],
             "loss": (None, "ce", "hinge")[i % 3], "sigma0": float(rng.choice([1e-3, 0.3, 1.0, 5.0])),
             "budget_unit": BUDGET_UNITS[(i // 3) % len(BUDGET_UNITS)], "eval_every": int(rng.integers(1, 13)),
             "checkpoint_every": int(rng.integers(1, 4)), "n_buckets": int(rng.integers(1, 10)),
             "cands_per_call": int(rng.integers(0, 4)), "workers": int(rng.integers(0, 3)),
             "threads": int(rng.integers(0, 3)), "max_len": int(rng.choice([0, 60, 512])), "device": "cpu",
             "plot": False, "patience": (0, 1, 2)[i % 3]}  # cycled, not drawn: the drawn cases stay as they were
        per_gen = pop * (s["k"] if method == "clip" and s["mixture"] != "assign" and s["budget_unit"] == "forward"
                         else 1)
        s["budget"] = 2 * per_gen  # two generations
        out.append(s)
    return out


CASES = cases()


def test_the_cases_cover_the_space():
    seen = {name: {str(c[name]) for c in CASES} for name in ("task", "method", "optimizer", "mixture", "budget_unit",
                                                                "cma_eigen", "d")}
    assert seen["task"] == set(TASKS) and seen["method"] == {"clip", "bbt", "manual"}
    assert seen["optimizer"] == set(OPTIMIZERS) and seen["mixture"] == set(MIXTURES)
    assert seen["budget_unit"] == set(BUDGET_UNITS) and seen["cma_eigen"] == set(CMA_EIGEN)
    assert seen["d"] == {str(d) for d in DS}
    # CMA-ES above pycma's TPA dimension (pop >= 3 there), and pop 2 somewhere
    assert any(c["optimizer"] == "cma" and c["d"] >= CMA_TPA_DIMENSION and c["method"] != "manual" for c in CASES)
    assert any(c["popsize"] == 2 for c in CASES)
    assert any(c["method"] == "clip" and c["mixture"] == "assign" for c in CASES)
    with pytest.raises(ConfigError, match="popsize 2 is too small"):
        build_config(None, optimizer="cma", d=CMA_TPA_DIMENSION, popsize=2, budget=4)


@pytest.mark.parametrize("s", CASES, ids=[f"{c['task']}-{c['method']}-{c['optimizer']}-d{c['d']}-pop{c['popsize']}"
                                          for c in CASES])
def test_valid_settings_tune_to_a_result(splade_dir, tmp_path, s):
    cfg = build_config(None, model_dir=str(splade_dir), **s)  # every case is valid: the config must accept it
    res = tune(cfg, tmp_path / "run", progress=False)
    assert (res["calls"] == 0) == (s["method"] == "manual") and res["provider"] == "CPUExecutionProvider"
    assert res["calls"] <= s["budget"]
    for split in ("train", "dev"):
        assert math.isfinite(res[split]["metric"]) and 0.0 <= res[split]["metric"] <= 1.0
    on_disk = json.loads((tmp_path / "run" / "result.json").read_text())
    assert on_disk["calls"] == res["calls"] and on_disk["seed"] == s["seed"]
    if s["method"] != "manual":
        z = np.load(tmp_path / "run" / "best_z.npy")
        assert z.shape == (s["d"],) and np.all(np.isfinite(z))
