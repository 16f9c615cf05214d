"""CMA-ES's time on a tune's critical path, by eigendecomposition schedule (``--cma-eigen``).

A generation of a tune is ask -> score -> tell; the optimiser's share of the wall time is the ask and
the tell. pycma decomposes the d x d covariance (numpy's eigh, O(d^3)) in the ask where it falls due,
about every 5 generations at d = 500, pop 20. ``ahead`` (``cliptune_ort.optim._DecomposeAhead``)
copies C at the tell where it falls due and decomposes it on a worker thread while the generation is
scored. Here the scoring is a stand-in: ``time.sleep(score_ms)``, which releases the GIL as
``InferenceSession.run`` does (on CUDA the host's cores wait on the GPU; on the CPU provider they are
busy, and the worker competes with ONNX Runtime's threads: measure that with tune_time.py). With
``--wait spin`` the stand-in spins on the clock instead, as CUDA's default wait does with fewer contexts
than cores (the card's host): the core stays busy and warm, where after a sleep the ask finds it idle
and its caches cold. (The spin holds the GIL, which CUDA's wait does not; the worker thread still gets
it within the interpreter's 5 ms switch interval.)

Per generation it records the wall time of ask + tell (the sleep excluded) and reports p50/p90/p99,
the mean and the total over the run, with numpy's BLAS on one thread as in a tune run. It also runs
each schedule on an ellipsoid (d 120, conditioning 1e3, 150 generations, 5 seeds) and reports the
best f reached, so a faster schedule that optimises worse would show.

    python benchmarks/cma_eigen.py                     # d 500, pop 20, 400 generations, score 0 and 50 ms
    python benchmarks/cma_eigen.py --score-ms 0,20,50 --generations 200 --no-wait
    python benchmarks/cma_eigen.py --wait spin --score-ms 50 --out benchmarks/results/cma_eigen_spin
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import harness

from cliptune_ort.optim import CMAES

MODES = ("sync", "ahead")


def ellipsoid(z: np.ndarray, cond_log10: float = 3.0) -> np.ndarray:
    w = 10.0 ** (cond_log10 * np.arange(z.shape[1]) / (z.shape[1] - 1))
    return ((z - 1.0) ** 2 * w).sum(1)


def stand_in(score_ms: float, wait: str) -> None:
    """The scoring call's wait: asleep, or spinning on the clock."""
    if wait == "sleep":
        time.sleep(score_ms / 1e3)
        return
    end = time.perf_counter() + score_ms / 1e3
    while time.perf_counter() < end:
        pass


def critical_path(mode: str, d: int, pop: int, gens: int, score_ms: float, seed: int = 42,
                  wait: str = "sleep") -> dict:
    """ask + tell wall time per generation, the scoring stand-in excluded."""
    opt = CMAES(d, pop, 1.0, seed, mode)
    rng = np.random.default_rng(seed)
    per_gen = []
    try:
        for _ in range(gens):
            t0 = time.perf_counter()
            z = opt.ask()
            t1 = time.perf_counter()
            fit = rng.standard_normal(pop)  # a noise objective: the optimiser's cost does not depend on f
            if score_ms:
                stand_in(score_ms, wait)
            t2 = time.perf_counter()
            opt.tell(z, fit)
            per_gen.append(t1 - t0 + time.perf_counter() - t2)  # seconds (harness.summarize)
        decomps = int(opt.es.sm.count_eigen)
        eigen = opt.eigen
    finally:
        opt.close()
    s = harness.summarize(per_gen)
    return {"mode_asked": mode, "mode_ran": eigen, "score_ms": score_ms, "wait": wait, "decompositions": decomps,
            "total_s": round(sum(per_gen), 3), **{k: s[k] for k in ("n", "p50_ms", "p90_ms", "p99_ms",
                                                                            "mean_ms", "max_ms")}}


def quality(mode: str, seeds=(1, 2, 3, 4, 5), d: int = 120, pop: int = 10, gens: int = 150) -> dict:
    best = []
    for seed in seeds:
        opt = CMAES(d, pop, 1.0, seed, mode)
        try:
            b = np.inf
            for _ in range(gens):
                z = opt.ask()
                f = ellipsoid(z)
                opt.tell(z, f)
                b = min(b, float(f.min()))
        finally:
            opt.close()
        best.append(round(b, 2))
    return {"mode": mode, "d": d, "popsize": pop, "generations": gens, "seeds": list(seeds), "best_f": best,
            "median_best_f": float(np.median(best))}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--d", type=int, default=500)
    ap.add_argument("--popsize", type=int, default=20)
    ap.add_argument("--generations", type=int, default=400)
    ap.add_argument("--score-ms", default="0,50", help="comma-separated scoring stand-ins (ms)")
    ap.add_argument("--wait", choices=("sleep", "spin"), default="sleep",
                    help="the stand-in sleeps (default) or spins on the clock (CUDA's default wait)")
    ap.add_argument("--out", default=str(harness.results_path("cma_eigen")))
    ap.add_argument("--max-load", type=float, default=1.5)
    ap.add_argument("--no-wait", action="store_true")
    args = ap.parse_args(argv)

    from threadpoolctl import threadpool_limits

    wait = None if args.no_wait else harness.wait_for_quiet(args.max_load)
    load0 = harness.load_average()
    rows = []
    with threadpool_limits(limits=1, user_api="blas"):
        for score_ms in [float(x) for x in args.score_ms.split(",")]:
            for mode in MODES:
                row = critical_path(mode, args.d, args.popsize, args.generations, score_ms, wait=args.wait)
                rows.append(row)
                print(f"score {score_ms:g} ms, {mode}: {row['total_s']} s on the critical path "
                      f"(p50 {row['p50_ms']} ms, p99 {row['p99_ms']} ms, {row['decompositions']} decompositions)",
                      flush=True)
        qual = [quality(m) for m in MODES]
    for q in qual:
        print(f"ellipsoid, {q['mode']}: median best f {q['median_best_f']:.1f}", flush=True)
    payload = {"benchmark": "cma_eigen", "machine": harness.machine_info(), "versions": harness.versions(),
               "wait": wait, "load_average_start": load0, "load_average_end": harness.load_average(),
               "settings": {"d": args.d, "popsize": args.popsize, "generations": args.generations,
                            "blas_threads": 1, "wait": args.wait},
               "critical_path": rows, "quality": qual}
    out = Path(args.out)
    harness.write_json(out.with_suffix(".json"), payload)
    cols = [("score_ms", "scoring stand-in ms"), ("mode_ran", "schedule"), ("total_s", "ask+tell s"),
            ("p50_ms", "p50 ms"), ("p90_ms", "p90 ms"), ("p99_ms", "p99 ms"), ("max_ms", "max ms"),
            ("decompositions", "decompositions")]
    qtab = harness.markdown_table(
        [{"mode": q["mode"], "median": round(q["median_best_f"], 1), "all": ", ".join(f"{b:.0f}" for b in q["best_f"])}
         for q in qual], [("mode", "schedule"), ("median", "median best f"), ("all", "best f by seed")])
    head = (f"Critical path (d {args.d}, pop {args.popsize}, {args.generations} generations, numpy BLAS on "
            f"1 thread, the stand-in's wait: {args.wait})")
    harness.write_markdown(out.with_suffix(".md"), "CMA-ES on the critical path, by eigendecomposition schedule",
                           payload, [(head, harness.markdown_table(rows, cols)),
                                     ("Quality: ellipsoid d 120, conditioning 1e3, 150 generations", qtab)])
    print(f"wrote {out.with_suffix('.json')}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
