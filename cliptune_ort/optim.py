"""Derivative-free optimisers with ask/tell: CMA-ES (the `cma` package) and Gaussian random search.

Resuming without pickle: both optimisers are deterministic functions of their seed and the
fitness values they were told. A checkpoint stores those values (JSON, exact float repr) and a
digest of every generation's candidates; :meth:`replay` rebuilds the optimiser by asking and
telling again without running the model, and checks each digest, so a resumed run continues
bit-for-bit (and a changed `cma` version is detected instead of silently diverging).

`cma` draws from numpy's *global* random state; each call is wrapped so that it uses a private
state, untouched by anything else in the process.
"""

from __future__ import annotations

import hashlib
import sys
import warnings

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


class _PrivateGlobalRNG:
    """Run a block with numpy's global RandomState swapped for a private one."""

    def __init__(self, seed: int):
        saved = np.random.get_state()
        np.random.seed(seed % (2**32))
        self.state = np.random.get_state()
        np.random.set_state(saved)

    def __enter__(self):
        self._saved = np.random.get_state()
        np.random.set_state(self.state)

    def __exit__(self, *exc):
        self.state = np.random.get_state()
        np.random.set_state(self._saved)
        return False


class Optimizer:
    """ask() -> Z [pop, d]; tell(Z, fitness [pop]); lower fitness is better."""

    name = "base"

    def ask(self) -> np.ndarray:
        raise NotImplementedError

    def tell(self, z: np.ndarray, fitness: np.ndarray) -> None:
        raise NotImplementedError

    def stop_reason(self) -> str | None:
        return None

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


class CMAES(Optimizer):
    """CMA-ES through ``cma.CMAEvolutionStrategy`` (x0 = 0, sigma0, popsize, seed)."""

    name = "cma"

    def __init__(self, d: int, popsize: int, sigma0: float, seed: int):
        cma = import_cma()
        self._rng = _PrivateGlobalRNG(seed)
        opts = {"seed": seed if seed > 0 else 2**32 - 1,  # cma treats 0 as "seed from the clock"
                "popsize": popsize, "verbose": -9, "maxiter": 10**9, "maxfevals": 10**12,
                "verb_disp": 0, "verb_log": 0}
        with self._rng, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.es = cma.CMAEvolutionStrategy(np.zeros(d), sigma0, opts)

    def ask(self) -> np.ndarray:
        with self._rng:
            return np.asarray(self.es.ask(), dtype=np.float64)

    def tell(self, z: np.ndarray, fitness: np.ndarray) -> None:
        with self._rng, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.es.tell(list(z), [float(f) for f in fitness])

    def stop_reason(self) -> str | None:
        stop = {k: v for k, v in self.es.stop().items() if k not in ("maxiter", "maxfevals")}
        return ", ".join(f"{k}={v}" for k, v in stop.items()) or None


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


def make_optimizer(name: str, d: int, popsize: int, sigma0: float, seed: int) -> Optimizer:
    if name == "cma":
        return CMAES(d, popsize, sigma0, seed)
    if name == "random":
        return RandomSearch(d, popsize, sigma0, seed)
    raise ValueError(f"unknown optimizer {name!r}")
