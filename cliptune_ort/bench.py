"""``cliptune bench``: how fast a tune runs on this machine, model and task, before you start one.

A tune repeats one generation ``budget / popsize`` times (8,000 calls at pop 20: 400 generations). This
times that generation's parts as the tune makes them, on the same workspace (``tuner.prepare``: the same
sessions, length buckets, device bindings, CUDA graphs and projection):

- ``generation``, per population size P in ``pops``: candidates z [P, d] -> prompts [P, L, hidden]
  (projected on the device where the runs are bound) -> the run's graphs (K thinned networks for
  ``clip``, the full one for ``bbt``) on the few-shot train set -> the mixture of rewards [P];
- ``optimizer``: the optimiser's ask + tell at the run's popsize and d (pycma's eigendecomposition
  falls due every few generations, so its p99 is far above its p50);
- ``dev_eval``: one candidate on the dev set with the full network (the tune does this every
  ``eval_every`` calls while the best candidate changes).

Each part: ``warmup`` untimed calls (the first also opens the bindings and captures CUDA graphs: its
time is ``first_call_ms``), then at least ``min_calls`` timed calls, more until ``seconds`` of them
were spent, at most ``max_calls``. The percentiles are over every timed call. ``projected_tune_s``
adds the parts' means up for the run's settings (set-up + generations x (generation + ask/tell) + at
most one dev evaluation per ``eval_every`` calls + the final test pass): an estimate, not a
measurement, as good as the machine is steady (README: within -9 to +24 % of the run on a noisy VM).

``losses`` holds the first call's losses per population (the same z are drawn from ``seed`` every
time, so two benches of one export on one provider agree; tests compare them with ``tuner.score``).
"""

from __future__ import annotations

import math
import os
import platform
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from .config import TuneConfig
from .errors import ConfigError, NumericError

#: what one bench times by default
DEFAULT_POPS = (1, 20)
DEFAULT_SECONDS = 3.0
DEFAULT_MIN_CALLS = 10
DEFAULT_MAX_CALLS = 1000
DEFAULT_WARMUP = 2


def time_calls(fn: Callable[[], Any], warmup: int = 1, min_calls: int = 3, max_calls: int = 50,
               seconds: float = 30.0) -> list[float]:
    """Seconds per call of ``fn``: ``warmup`` untimed calls, then at least ``min_calls`` timed calls, more
    until ``seconds`` of timed calls were spent, at most ``max_calls``."""
    for _ in range(warmup):
        fn()
    samples: list[float] = []
    spent = 0.0
    while len(samples) < max_calls and (len(samples) < min_calls or spent < seconds):
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        samples.append(dt)
        spent += dt
    return samples


def percentile(samples: list[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default), q in [0, 100]."""
    return float(np.percentile(np.asarray(samples, dtype=np.float64), q))


def summarize(samples: list[float], items_per_call: float | None = None, item: str = "examples") -> dict[str, Any]:
    """n, p50/p90/p99/mean/min/max/std in ms, and throughput (calls, and ``item`` per second at the p50)."""
    s = np.asarray(samples, dtype=np.float64)
    out: dict[str, Any] = {"n": int(s.size)}
    for name, v in (("p50", percentile(samples, 50)), ("p90", percentile(samples, 90)),
                    ("p99", percentile(samples, 99)), ("mean", float(s.mean())), ("min", float(s.min())),
                    ("max", float(s.max())), ("std", float(s.std()))):
        out[f"{name}_ms"] = round(v * 1e3, 3)
    out["calls_per_s"] = round(1.0 / float(np.median(s)), 3)
    if items_per_call:
        out[f"{item}_per_s"] = round(items_per_call / float(np.median(s)), 2)
    return out


def parse_pops(text: str) -> list[int]:
    """``"1,20"`` -> [1, 20]; one-line error for anything else."""
    try:
        pops = [int(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        pops = []
    if not pops or any(p < 1 for p in pops):
        raise ConfigError(f"--pops {text!r}: expected comma-separated population sizes of at least 1, e.g. 1,20")
    return sorted(set(pops))


def _check(cfg: TuneConfig, seconds: float, min_calls: int, max_calls: int, warmup: int) -> None:
    if cfg.method == "manual":
        raise ConfigError("cliptune bench times prompt candidates: method manual has none; pass --method clip or bbt")
    if not (seconds >= 0 and math.isfinite(seconds)):
        raise ConfigError(f"--seconds {seconds}: expected a finite number of seconds >= 0, e.g. 3")
    if min_calls < 1 or max_calls < min_calls:
        raise ConfigError(f"--min-calls {min_calls} / --max-calls {max_calls}: expected 1 <= min-calls <= max-calls")
    if warmup < 1:
        raise ConfigError(f"--warmup {warmup}: expected at least 1 (the first call opens bindings and CUDA graphs)")


def run_bench(cfg: TuneConfig, pops: list[int] | tuple[int, ...] = DEFAULT_POPS, seconds: float = DEFAULT_SECONDS,
              min_calls: int = DEFAULT_MIN_CALLS, max_calls: int = DEFAULT_MAX_CALLS, warmup: int = DEFAULT_WARMUP,
              log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Time a tune's parts for ``cfg`` (module docstring); returns the result dict ``cliptune bench`` writes."""
    from . import __version__
    from .optim import make_optimizer
    from .tuner import eigen_mode, evaluate, prepare, score, versions

    _check(cfg, seconds, min_calls, max_calls, warmup)
    pops = sorted({int(p) for p in pops})
    say = log or (lambda _msg: None)
    plan = {"warmup": warmup, "min_calls": min_calls, "max_calls": max_calls, "seconds": seconds}
    t_start = time.perf_counter()
    ws = prepare(cfg)
    setup_s = time.perf_counter() - t_start
    eng, man = ws.engine, ws.manifest
    try:
        tokens = int(ws.train.enc.lengths.sum())
        say(f"bench: {ws.task.name} {cfg.method} on {eng.provider} ({man.precision}, {eng.device}); set-up "
            f"{setup_s:.2f} s; {ws.train.n} train rows, {tokens} tokens")
        graphs = 1  # forward passes per candidate, as the engine counts them in the first call
        out: dict[str, Any] = {
            "benchmark": "cliptune bench", "cliptune_ort": __version__, "task": ws.task.name, "method": cfg.method,
            "k": cfg.k if cfg.method == "clip" else 0, "mixture": cfg.mixture if cfg.method == "clip" else None,
            "seed": cfg.seed, "d": cfg.d, "popsize": cfg.popsize, "budget": cfg.budget,
            "budget_unit": cfg.budget_unit, "model_dir": str(man.root), "precision": man.precision,
            "packed": bool(man.packed), "device": eng.device, "provider": eng.provider,
            "cuda_graph": bool(eng.cuda_graph), "train_rows": ws.train.n, "train_tokens": tokens,
            "padded_fraction": round(float(ws.train.padded_fraction), 4),
            "plan": plan, "setup_s": round(setup_s, 4), "setup_by_phase_s": ws.setup_seconds,
            "session_open_s": eng.open_wall_seconds,
            "machine": {"cpu_count": os.cpu_count(), "processor": platform.processor() or platform.machine()},
            "versions": versions(), "generation": {}, "losses": {}}
        for pop in pops:
            # the candidates CMA-ES's first generation would draw (x0 = 0, sigma0), the same every bench
            z = np.random.default_rng([cfg.seed, pop]).standard_normal((pop, cfg.d)) * cfg.sigma0

            def generation(z=z):
                return score(ws, ws.prompts(z))

            t0, passes0 = time.perf_counter(), eng.forward_passes
            first = generation()
            first_ms = (time.perf_counter() - t0) * 1e3
            graphs = (eng.forward_passes - passes0) // pop
            if not np.all(np.isfinite(first)):
                raise NumericError(f"expected finite losses, found {first[~np.isfinite(first)][:4]} at pop {pop}: lower "
                                   "--sigma0 or check the model dir")
            samples = time_calls(generation, warmup - 1, min_calls, max_calls, seconds)
            st = summarize(samples, pop, "candidates")
            st["forward_passes_per_s"] = round(pop * graphs / (st["p50_ms"] / 1e3), 1)
            st["ms_per_candidate_p50"] = round(st["p50_ms"] / pop, 4)
            st["first_call_ms"] = round(first_ms, 3)
            out["generation"][str(pop)] = st
            out["losses"][str(pop)] = [float(f) for f in first]
            say(f"bench: pop {pop}: p50 {st['p50_ms']:.3f} ms, p90 {st['p90_ms']:.3f}, p99 {st['p99_ms']:.3f} "
                f"({st['n']} calls; {st['candidates_per_s']:.1f} candidates/s)")
        out["graphs_per_candidate"] = graphs
        eigen = eigen_mode(cfg, eng.provider, None) if cfg.optimizer == "cma" else None
        opt = make_optimizer(cfg.optimizer, cfg.d, cfg.popsize, cfg.sigma0, cfg.seed, eigen or "sync")
        rng = np.random.default_rng([cfg.seed, 1])
        try:
            def ask_tell():
                zz = opt.ask()
                opt.tell(zz, rng.standard_normal(len(zz)))

            st = summarize(time_calls(ask_tell, warmup, min_calls, max_calls, seconds))
        finally:
            opt.close()
        st.update(name=cfg.optimizer, eigen=eigen)
        out["optimizer"] = st
        say(f"bench: {cfg.optimizer} ask+tell (d {cfg.d}, pop {cfg.popsize}): p50 {st['p50_ms']:.3f} ms, "
            f"p99 {st['p99_ms']:.3f}")
        z1 = np.random.default_rng([cfg.seed, 0]).standard_normal((1, cfg.d)) * cfg.sigma0
        st = summarize(time_calls(lambda: evaluate(ws, ws.prompts(z1), ws.dev), warmup, min_calls, max_calls,
                                  seconds), ws.dev.n)
        out["dev_eval"] = st
        say(f"bench: one dev evaluation ({ws.dev.n} rows): p50 {st['p50_ms']:.3f} ms")
        out["projected_tune_s"] = _project(cfg, out, graphs, ws.test.n if ws.test is not None else 0, ws.dev.n)
    finally:
        eng.close()
    out["wall_s"] = round(time.perf_counter() - t_start, 3)
    return out


def _project(cfg: TuneConfig, res: dict, graphs: int, test_rows: int, dev_rows: int) -> dict[str, Any] | None:
    """The run's whole time from the parts (an estimate): None where its popsize was not timed."""
    gen = res["generation"].get(str(cfg.popsize))
    if gen is None:
        return None
    per_call = graphs if cfg.budget_unit != "calls" else 1
    calls = math.ceil(cfg.budget / per_call)
    gens = math.ceil(calls / cfg.popsize)
    evals = math.ceil(gens * cfg.popsize / cfg.eval_every)
    dev_ms = res["dev_eval"]["mean_ms"]  # a run's time is a sum: the means (p50 below them where calls vary)
    parts = {"setup": res["setup_s"], "generations": gens * gen["mean_ms"] / 1e3,
             "optimizer": gens * res["optimizer"]["mean_ms"] / 1e3, "dev_evals_at_most": evals * dev_ms / 1e3,
             "final_test": dev_ms / 1e3 * test_rows / max(dev_rows, 1)}
    return {"total": round(sum(parts.values()), 2), "generations": gens, "dev_evals_at_most": evals,
            "parts_s": {k: round(v, 3) for k, v in parts.items()}}


def markdown(res: dict) -> str:
    """A short table of ``run_bench``'s result."""
    lines = [f"# cliptune bench: {res['task']} {res['method']} on {res['provider']}", "",
             (f"{res['model_dir']} ({res['precision']}{', packed' if res['packed'] else ''}); "
              f"{res['train_rows']} train rows, {res['train_tokens']} tokens; {res['graphs_per_candidate']} "
              f"graph(s) per candidate; set-up {res['setup_s']} s."), "",
             "| part | n | p50 ms | p90 ms | p99 ms | throughput |", "|---|---|---|---|---|---|"]
    for pop, st in res["generation"].items():
        lines.append(f"| generation, pop {pop} | {st['n']} | {st['p50_ms']} | {st['p90_ms']} | {st['p99_ms']} | "
                     f"{st['candidates_per_s']} candidates/s |")
    o, d = res["optimizer"], res["dev_eval"]
    lines.append(f"| {o['name']} ask+tell (pop {res['popsize']}) | {o['n']} | {o['p50_ms']} | {o['p90_ms']} | "
                 f"{o['p99_ms']} | |")
    lines.append(f"| dev evaluation | {d['n']} | {d['p50_ms']} | {d['p90_ms']} | {d['p99_ms']} | "
                 f"{d['examples_per_s']} examples/s |")
    p = res.get("projected_tune_s")
    if p:
        lines += ["", (f"Projected tune ({res['budget']} {res['budget_unit']}, pop {res['popsize']}): about "
                       f"{p['total']} s ({p['parts_s']}).")]
    return "\n".join(lines) + "\n"
