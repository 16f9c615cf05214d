"""Derivative-free optimisers with ask/tell: CMA-ES (the `cma` package) and Gaussian random search.

Resuming without pickle: both optimisers are deterministic functions of their seed and the
fitness values they were told. A checkpoint stores those values (JSON, exact float repr) and a
digest of every generation's candidates; :meth:`replay` rebuilds the optimiser by asking and
telling again without running the model, and checks each digest, so a resumed run continues
bit-for-bit (and a changed `cma` version is detected instead of silently diverging).

`cma` draws its normal deviates through its ``randn`` option (numpy's *global* ``np.random.randn`` by
default); here that option is a private ``RandomState``'s, seeded as pycma would seed the global state, and
pycma's one direct draw (``np.random.randint`` in a step-size check) comes from it too, so a run neither
reads nor moves the process's global random state and draws the same numbers as pycma with ``seed``.

``eigen="ahead"`` moves pycma's O(d^3) eigendecomposition of the covariance off the critical path:
see :class:`_DecomposeAhead`.
"""

from __future__ import annotations

import hashlib
import sys
import warnings
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

from .errors import CheckpointError


def digest(z: np.ndarray) -> str:
    """Short sha256 of a candidate array (float64 bytes)."""
    return hashlib.sha256(np.ascontiguousarray(z, dtype=np.float64).tobytes()).hexdigest()[:16]


def import_cma():
    """The ``cma`` module, imported without matplotlib when nothing has loaded matplotlib yet.

    pycma imports ``matplotlib.pyplot`` at import time for its plotting helpers (optional there, and
    never used here): 0.25 of the 0.49 s its import took on the 2-core machine, paid by every run's
    start. ``matplotlib`` is hidden from that one import (pycma then skips its plotting with a warning,
    silenced here); a later ``import matplotlib`` (the convergence plot) loads it as usual. In this
    process ``cma.plot()`` is then unavailable; import matplotlib before cma to keep it.
    """
    if "cma" in sys.modules:
        return sys.modules["cma"]
    hide = "matplotlib" not in sys.modules
    if hide:
        sys.modules["matplotlib"] = None  # an import of it raises ImportError
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import cma
    finally:
        if hide and "matplotlib" in sys.modules and sys.modules["matplotlib"] is None:
            del sys.modules["matplotlib"]
    return cma


class Optimizer:
    """ask() -> Z [pop, d]; tell(Z, fitness [pop]); lower fitness is better."""

    name = "base"
    eigen: str | None = None  # CMA-ES's eigendecomposition schedule (CMAES)

    def ask(self) -> np.ndarray:
        raise NotImplementedError

    def tell(self, z: np.ndarray, fitness: np.ndarray) -> None:
        raise NotImplementedError

    def stop_reason(self) -> str | None:
        return None

    def close(self) -> None:
        """Release what the optimiser holds (a worker thread); it is not used afterwards."""

    def replay(self, fitness_history: list[list[float]], digests: list[str]) -> None:
        """Re-ask and re-tell recorded generations (no model calls); verify each generation's digest."""
        for g, (fit, want) in enumerate(zip(fitness_history, digests)):
            z = self.ask()
            got = digest(z)
            if got != want:
                raise CheckpointError(f"replaying generation {g} gave other candidates ({got} vs {want}): the "
                                      "optimiser (cma version?) differs from the run's; resume with the same "
                                      "versions or start a new run")
            self.tell(z, np.asarray(fit, dtype=np.float64))


class _DecomposeAhead:
    """pycma's eigendecomposition of C on a worker thread, one generation behind.

    pycma samples from B, D (C = B D^2 B^T) and re-decomposes C lazily: in the ask where
    ``count_tell - last_update`` reaches ``lazy_update_gap`` (about 5 generations at d = 500, pop 20),
    on the optimiser's critical path: numpy's eigh of a 500 x 500 matrix takes about 24 ms on the 2-core
    machine, 79 times in a 400-generation run, most of the run's 3.3 s of ask + tell. Here the tell after
    which it falls due copies C and hands it to a worker thread; the next ask still samples from the old
    B, D while the model scores that generation (LAPACK releases the GIL), and the result is installed
    at the first model update after that tell (``count_tell`` one further), with ``last_update`` set to
    the copy's tell, so decompositions keep pycma's cadence and each B, D is one generation staler than
    pycma's. With a 50 ms scoring stand-in, ask + tell went from 4.2 to 2.1 s a run
    (benchmarks/results/cma_eigen.json).

    Deterministic: where the result is installed depends on ``count_tell`` only, never on timing, so a
    resume's replay rebuilds the same optimiser. A forced update (``update_now(-1)``) and a covariance
    that is not positive definite run pycma's own code on the current C, as without this class.
    Installs itself only on pycma's full-covariance sampler with a gap of more than one generation
    (else ``active`` is False and pycma runs unchanged).
    """

    def __init__(self, sm, pool: ThreadPoolExecutor):
        need = ("update_now", "_decompose_C", "_updateC", "eigenmethod", "count_tell", "last_update",
                "lazy_update_gap", "C", "B", "D")
        self.sm = sm
        self.active = (type(sm).__name__ == "GaussFullSampler" and all(hasattr(sm, a) for a in need)
                       and sm.lazy_update_gap > 1)
        self.pool = pool
        self.pending: tuple[Future, int, np.ndarray] | None = None  # (eigh running, its tell count, its C)
        self.launched = 0
        self.installed = 0
        if self.active:
            self._own_update_now = sm.update_now
            sm.update_now = self.update_now

    def due(self) -> bool:
        sm = self.sm
        return sm.count_tell - sm.last_update >= sm.lazy_update_gap

    def after_tell(self) -> None:
        """Start the decomposition that falls due with this tell (called at the end of each tell)."""
        if not self.active or self.pending is not None or not self.due():
            return
        c = (self.sm.C + self.sm.C.T) / 2  # pycma's _decompose_C symmetrises the same way
        self.pending = (self.pool.submit(self.sm.eigenmethod, c), self.sm.count_tell, c)
        self.launched += 1

    def update_now(self, lazy_update_gap=None):
        sm = self.sm
        if self.pending is not None:
            if lazy_update_gap is not None and lazy_update_gap < 0:  # forced: pycma's own, on the current C
                self.pending[0].result()
                self.pending = None
                return self._own_update_now(lazy_update_gap)
            if sm.count_tell == self.pending[1]:  # the generation being scored now: keep sampling from B, D
                return None
            return self._install()
        return self._own_update_now(lazy_update_gap)

    def _install(self):
        sm = self.sm
        fut, count, c = self.pending
        self.pending = None
        eig = fut.result()
        if not (np.all(np.isfinite(eig[0])) and np.all(eig[0] > 0)):
            return self._own_update_now(-1)  # pycma's recovery (diagonal loading) on the current C
        current = (sm.C + sm.C.T) / 2
        own = sm.eigenmethod
        handed = [eig]
        sm.eigenmethod = lambda m: handed.pop() if handed else own(m)
        sm.C = c
        try:
            sm._updateC()
            sm._decompose_C()  # B, D (sorted, condition-limited) from the copy's eigenpairs
        finally:
            sm.eigenmethod = own
            sm.C = current
        sm.last_update = count
        self.installed += 1
        return None


def _sequential_norm(sm) -> None:
    """pycma's Mahalanobis norm, ``sum((B^T x / D)**2)**0.5``, sums with Python's ``sum`` over a numpy
    vector: one float64 object per element, 40 us at d = 500, called 13 times a generation. The same
    left-to-right float64 sum as ``np.add.accumulate`` gives the same bits (tests/test_cma_eigen.py
    compares whole runs' candidates) for a tenth of the time. Installed on the full-covariance sampler only."""
    if type(sm).__name__ != "GaussFullSampler" or not all(hasattr(sm, a) for a in ("B", "D", "norm")):
        return

    def norm(x):
        v = (np.dot(sm.B.T, x) / sm.D) ** 2
        return np.add.accumulate(v)[-1] ** 0.5 if v.ndim == 1 and v.size else sum(v) ** 0.5

    sm.norm = norm


def _private_direct_draws(es, randint) -> None:
    """Point pycma's one direct draw from numpy's global state onto the run's private stream.

    Besides ``randn``, pycma's tell draws twice with ``np.random.randint`` (which coordinates its step-size
    adaptation's ``check_consistency`` checks; it only ever warns). When the global state was swapped for
    the private one around each call, those draws came from the private stream, between the normal
    deviates; so they still do: for the duration of that check ``np.random.randint`` is the private
    state's (two attribute swaps, where the state swap took four get/set pairs of about 80 us a generation).
    Candidates are pycma's own bits (tests/test_cma_eigen.py); a pycma that draws elsewhere fails the test
    that the global state stays untouched. As with the state swap before, another thread drawing with
    ``np.random.randint`` during the check would draw from this stream.
    """
    sigma = getattr(es, "adapt_sigma", None)
    own = getattr(sigma, "check_consistency", None)
    if own is None:
        return

    def check_consistency(*args, **kwargs):
        saved = np.random.randint
        np.random.randint = randint
        try:
            return own(*args, **kwargs)
        finally:
            np.random.randint = saved

    sigma.check_consistency = check_consistency


class CMAES(Optimizer):
    """CMA-ES through ``cma.CMAEvolutionStrategy`` (x0 = 0, sigma0, popsize, seed); ``eigen``: "sync"
    (pycma's schedule) or "ahead" (:class:`_DecomposeAhead`). :meth:`close` stops the worker thread."""

    name = "cma"

    def __init__(self, d: int, popsize: int, sigma0: float, seed: int, eigen: str = "sync"):
        if eigen not in ("sync", "ahead"):
            raise ValueError(f"eigen must be sync or ahead, got {eigen!r}")
        cma = import_cma()
        # pycma seeds the global state with its ``seed`` option (0 meaning "from the clock", hence 2**32 - 1
        # for seed 0) and then draws with np.random.randn; a RandomState seeded the same way draws the same
        # numbers. Swapping the global state in and out around every ask and tell instead took four get/set
        # pairs of 2.5 kB state copies a generation (about 80 us each when hot) on the optimiser's critical path.
        self._rs = np.random.RandomState(seed if seed > 0 else 2**32 - 1)
        opts = {"seed": float("nan"),  # no seeding of the global state: the draws go through ``randn``
                "randn": self._rs.randn,
                "popsize": popsize, "verbose": -9, "maxiter": 10**9, "maxfevals": 10**12,
                "verb_disp": 0, "verb_log": 0}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.es = cma.CMAEvolutionStrategy(np.zeros(d), sigma0, opts)
        _private_direct_draws(self.es, self._rs.randint)
        _sequential_norm(self.es.sm)
        self._pool = None
        self._ahead = None
        if eigen == "ahead":
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="cliptune-eigh")
            self._ahead = _DecomposeAhead(self.es.sm, self._pool)
            if not self._ahead.active:
                self.close()
                self._ahead = None
        #: the schedule that runs ("ahead" only where the sampler allows it)
        self.eigen = "ahead" if self._ahead is not None else "sync"

    def ask(self) -> np.ndarray:
        return np.asarray(self.es.ask(), dtype=np.float64)

    def tell(self, z: np.ndarray, fitness: np.ndarray) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.es.tell(list(z), [float(f) for f in fitness])
        if self._ahead is not None:
            self._ahead.after_tell()

    def stop_reason(self) -> str | None:
        stop = {k: v for k, v in self.es.stop().items() if k not in ("maxiter", "maxfevals")}
        return ", ".join(f"{k}={v}" for k, v in stop.items()) or None

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None


class RandomSearch(Optimizer):
    """Gaussian local random search: candidates = centre + sigma * N(0, I); the centre moves to the
    best candidate seen so far. The baseline beside CMA-ES."""

    name = "random"

    def __init__(self, d: int, popsize: int, sigma0: float, seed: int):
        self.rng = np.random.default_rng([seed, 7])
        self.centre = np.zeros(d)
        self.best = np.inf
        self.popsize = popsize
        self.sigma = sigma0

    def ask(self) -> np.ndarray:
        return self.centre[None, :] + self.sigma * self.rng.standard_normal((self.popsize, self.centre.size))

    def tell(self, z: np.ndarray, fitness: np.ndarray) -> None:
        i = int(np.argmin(fitness))
        if fitness[i] < self.best:
            self.best = float(fitness[i])
            self.centre = np.array(z[i], dtype=np.float64)


def make_optimizer(name: str, d: int, popsize: int, sigma0: float, seed: int, eigen: str = "sync") -> Optimizer:
    if name == "cma":
        return CMAES(d, popsize, sigma0, seed, eigen)
    if name == "random":
        return RandomSearch(d, popsize, sigma0, seed)
    raise ValueError(f"unknown optimizer {name!r}")
