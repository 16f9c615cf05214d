"""CMA-ES's eigendecomposition off the critical path (optim._DecomposeAhead, cma_eigen) and pycma's
Mahalanobis norm with numpy's sequential sum (optim._sequential_norm): what each changes, and what not."""

from __future__ import annotations

import time
import warnings

import numpy as np
import pytest

from cliptune_ort import optim
from cliptune_ort.config import build_config
from cliptune_ort.errors import ConfigError
from cliptune_ort.optim import CMAES, digest
from cliptune_ort.tuner import eigen_mode


def _ellipsoid(z: np.ndarray) -> np.ndarray:
    w = 10.0 ** (3 * np.arange(z.shape[1]) / (z.shape[1] - 1))
    return ((z - 1.0) ** 2 * w).sum(1)


def _run(eigen: str, gens: int, d: int = 120, pop: int = 10, seed: int = 5, pause: float = 0.0, hook=None):
    opt = CMAES(d, pop, 1.0, seed, eigen)
    out, best = [], np.inf
    try:
        for g in range(gens):
            z = opt.ask()
            f = _ellipsoid(z)
            if pause:
                time.sleep(pause)  # the model scoring: the worker thread's decomposition runs meanwhile
            opt.tell(z, f)
            out.append(digest(z))
            best = min(best, float(f.min()))
            if hook is not None:
                hook(opt, g)
    finally:
        opt.close()
    return opt, out, best


def test_sequential_norm_is_bit_identical_to_pycmas():
    opt = CMAES(150, 8, 1.0, 3)
    sm = opt.es.sm
    assert sm.norm.__name__ == "norm" and "sequential" not in type(sm).__dict__  # installed on the instance
    for _ in range(12):  # a few decompositions: B, D away from the identity
        z = opt.ask()
        opt.tell(z, _ellipsoid(z))
    x = np.random.default_rng(0).standard_normal((20, 150)) * np.logspace(-3, 3, 150)
    own = type(sm).norm
    for v in x:
        assert sm.norm(v) == own(sm, v)  # the very same float64, not just close
    opt.close()


def test_sequential_norm_leaves_whole_runs_unchanged(monkeypatch):
    _, patched, _ = _run("sync", 40)
    monkeypatch.setattr(optim, "_sequential_norm", lambda sm: None)
    _, plain, _ = _run("sync", 40)
    assert patched == plain


def test_ahead_installs_each_decomposition_one_generation_late():
    """Same cadence as pycma's (the same number of decompositions), each of the C copied at the tell
    where it fell due; candidates equal to sync's until the first decomposition; then they differ."""
    launches = {}  # tell count at the copy -> (the copied C, generation of that tell)

    def hook(opt, g):
        p = opt._ahead.pending
        if p is not None and p[1] not in launches:
            launches[p[1]] = (p[2].copy(), g)

    ahead, za, _ = _run("ahead", 30, hook=hook)
    sync, zs, _ = _run("sync", 30)
    assert ahead.eigen == "ahead" and sync.eigen == "sync"
    a = ahead._ahead
    assert a.launched == len(launches) >= 8 and a.installed == a.launched - (a.pending is not None)
    assert ahead.es.sm.count_eigen == sync.es.sm.count_eigen
    first = min(g for _, g in launches.values())  # the generation whose tell made the first one due
    assert za[:first + 1] == zs[:first + 1]
    assert za[first + 1] != zs[first + 1]  # sync decomposes in this ask; ahead samples from the old B, D
    # the installed B, D are pycma's decomposition of the copied C (same eigh, same input: same bits)
    count = sorted(launches)[-2]
    c = launches[count][0]
    opt = CMAES(120, 10, 1.0, 5, "ahead")
    try:
        for _ in range(count + 1):  # the copy's tell and one more: installed at the next model update
            z = opt.ask()
            opt.tell(z, _ellipsoid(z))
        opt.es.sm.update_now()
        assert opt._ahead.pending is None and opt.es.sm.last_update == count
        np.testing.assert_array_equal(opt.es.sm.D, np.sqrt(np.linalg.eigh(c)[0]))
    finally:
        opt.close()


def test_ahead_does_not_depend_on_timing():
    """The result is installed by tell count, never by when the worker finished: a slow and a fast
    scorer give the same candidates."""
    _, fast, _ = _run("ahead", 25)
    _, slow, _ = _run("ahead", 25, pause=0.01)
    assert fast == slow


def test_ahead_converges_like_sync_and_stale_forever_does_not(monkeypatch):
    """On a 1e3-conditioned ellipsoid after 150 generations (d 120) the one-generation-stale schedule
    gets as far as pycma's and samples from as elongated a distribution; with its decompositions
    never installed (the bug this guards against) the sampling stays round though C has learnt."""
    s_opt, _, sync = _run("sync", 150)
    a_opt, _, ahead = _run("ahead", 150)
    assert ahead < 1.25 * sync and sync < 1.25 * ahead
    assert s_opt.es.sm.condition_number > 1.3
    assert abs(np.log(a_opt.es.sm.condition_number / s_opt.es.sm.condition_number)) < np.log(1.2)
    monkeypatch.setattr(optim._DecomposeAhead, "_install", lambda self: None)
    st_opt, _, stale = _run("ahead", 150)
    assert st_opt.es.sm.condition_number < 1.01 and np.linalg.cond(st_opt.es.sm.C) > 1.3
    assert stale > 1.4 * max(sync, ahead)


def test_forced_update_and_bad_decomposition_run_pycmas_own_code():
    opt = CMAES(120, 10, 1.0, 5, "ahead")
    try:
        a = opt._ahead
        while a.pending is None:
            z = opt.ask()
            opt.tell(z, _ellipsoid(z))
        opt.es.sm.update_now(-1)  # forced (pycma does this when C is replaced): now, on the current C
        assert a.pending is None and opt.es.sm.last_update == opt.es.sm.count_tell
        np.testing.assert_array_equal(opt.es.sm.D, np.sqrt(np.sort(np.linalg.eigh(
            (opt.es.sm.C + opt.es.sm.C.T) / 2)[0])))
        own = opt.es.sm.eigenmethod
        opt.es.sm.eigenmethod = lambda m: (np.r_[-1.0, own(m)[0][1:]], own(m)[1])  # "not positive definite"
        while a.pending is None:
            z = opt.ask()
            opt.tell(z, _ellipsoid(z))
        opt.es.sm.eigenmethod = own  # the worker has the bad one
        z = opt.ask()  # sampling from the old B, D
        opt.tell(z, _ellipsoid(z))
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            opt.es.sm.update_now()  # not installed: pycma decomposes the current C itself
        assert opt.es.sm.last_update == opt.es.sm.count_tell and np.all(opt.es.sm.D > 0)
        assert a.installed == 0
    finally:
        opt.close()
    assert opt._pool is None


def test_small_problems_keep_pycmas_schedule():
    """A gap of one generation or less (d 50, pop 10: about 0.98) leaves no generation to hide the
    decomposition in: pycma runs unchanged and the optimiser says so."""
    opt = CMAES(50, 10, 1.0, 1, "ahead")
    assert opt.eigen == "sync" and opt._ahead is None and opt._pool is None
    with pytest.raises(ValueError, match="sync or ahead"):
        CMAES(50, 10, 1.0, 1, "auto")


def test_config_and_resolution():
    assert build_config().cma_eigen == "auto"
    with pytest.raises(ConfigError, match="cma_eigen must be one of auto, sync, ahead"):
        build_config(cma_eigen="later")
    cfg = build_config()
    assert "cma_eigen" not in cfg.run_key()  # a resume keeps the checkpoint's (below)
    assert eigen_mode(cfg, "CUDAExecutionProvider", None) == "ahead"
    assert eigen_mode(cfg, "CPUExecutionProvider", None) == "sync"
    assert eigen_mode(build_config(cma_eigen="ahead"), "CPUExecutionProvider", None) == "ahead"
    assert eigen_mode(cfg, "CUDAExecutionProvider", {"generation": 3}) == "sync"  # checkpoints from before
    assert eigen_mode(cfg, "CPUExecutionProvider", {"cma_eigen": "ahead"}) == "ahead"
    with pytest.warns(RuntimeWarning, match="continues with ahead"):
        assert eigen_mode(build_config(cma_eigen="sync"), "CPUExecutionProvider", {"cma_eigen": "ahead"}) == "ahead"


def _pycma_on_the_global_state(d: int, pop: int, seed: int, gens: int) -> list[str]:
    """pycma as documented: seeds numpy's global state with ``seed`` and draws from it (restored after)."""
    cma = optim.import_cma()
    saved = np.random.get_state()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            es = cma.CMAEvolutionStrategy(np.zeros(d), 1.0, {"seed": seed, "popsize": pop, "verbose": -9,
                                                             "verb_disp": 0, "verb_log": 0})
            out = []
            for _ in range(gens):
                z = np.asarray(es.ask(), dtype=np.float64)
                es.tell(list(z), [float(f) for f in _ellipsoid(z)])
                out.append(digest(z))
    finally:
        np.random.set_state(saved)
    return out


@pytest.mark.parametrize("seed", [5, 0])
def test_private_stream_draws_what_pycma_seeded_globally_draws(seed):
    """CMAES hands pycma a private RandomState's randn and points pycma's direct ``np.random.randint``
    draws (its step-size check, from the 4th tell on) at the same stream: the candidates are pycma's own,
    bit for bit, past several decompositions; seed 0 is pycma's 2**32 - 1 (pycma reads 0 as the clock).
    d 320: pycma adapts the step size by TPA from d 300 on (the runs' d is 500), whose check draws."""
    own = _pycma_on_the_global_state(320, 10, seed or 2**32 - 1, 40)
    ours = _run("sync", 40, d=320, seed=seed)[1]
    assert ours == own
    assert _run("sync", 40, d=320, seed=seed)[1] == ours


@pytest.mark.parametrize("eigen", ["sync", "ahead"])
def test_runs_leave_numpys_global_random_state_alone(eigen):
    np.random.seed(1234)
    before = np.random.get_state()
    opt = _run(eigen, 30, d=320)[0]
    assert type(opt.es.adapt_sigma).__name__ == "CMAAdaptSigmaTPA"  # the step-size rule whose check draws
    after = np.random.get_state()
    assert before[2:] == after[2:] and np.array_equal(before[1], after[1])
    assert np.random.randint.__self__ is np.random.mtrand._rand  # the check's swap is undone


@pytest.mark.parametrize("d, pop, ok", [(299, 2, True), (300, 2, False), (500, 3, True)])
def test_smallest_population_the_config_allows_runs(d, pop, ok):
    """The config's pop-2 refusal follows pycma: two-point step-size adaptation from d = 300 on spends two
    candidates a generation (its tell fails at pop 2); below that, and at pop 3 above it, CMA-ES runs."""
    if not ok:
        with pytest.raises(ConfigError, match="popsize 2 is too small for CMA-ES"):
            build_config(None, popsize=pop, d=d, budget=40)
        with pytest.raises(ValueError, match="unused injected direction"):  # what the refusal spares a user
            _run_generations(CMAES(d, pop, 1.0, 3), 3)
        return
    build_config(None, popsize=pop, d=d, budget=40)
    opt = CMAES(d, pop, 1.0, 3)
    fit = _run_generations(opt, 6)
    assert np.all(np.isfinite(fit)) and opt.es.countiter == 6


def _run_generations(opt, n):
    fit = None
    for _ in range(n):
        z = opt.ask()
        fit = np.sum(z ** 2, axis=1)
        opt.tell(z, fit)
    return fit
