"""Wall time of whole tune runs and where it goes (splade-tiny, SST-2, default budget of 8,000 calls).

Each run is ``cliptune_ort.tuner.tune`` in a fresh process with light instrumentation (wrappers,
no change to the package) that splits the wall time into:

- ``setup``: ``prepare`` (manifest check, K+1 sessions, few-shot sampling, tokenising, buckets),
- ``optimizer``: CMA-ES ask + tell,
- ``projection``: A z -> prompts,
- ``session_runs``: ONNX Runtime ``session.run`` time, summed over the runs of a generation and
  divided by the number of parallel workers (the wall time the runs would take perfectly spread),
- ``engine_overhead``: ``Engine.logits_multi`` wall minus ``session_runs`` (feeds, thread pool,
  output scatter, load imbalance between workers),
- ``losses``: the loss and the mixture over K (``score`` minus ``logits_multi``),
- ``dev_eval`` / ``final_eval``: scoring the best candidate on dev every ``eval_every`` calls, and the
  final train/dev/test evaluation,
- ``other``: everything else (checkpoints, history, progress, the plot, the interpreter).

Also: calls/s and forward passes/s of the generation loop, CPU utilisation ((user+sys)/wall; 2.0 =
both cores busy on this machine), peak RSS, the provider that ran, and the dev/test accuracy (so a
faster setting that tunes worse is visible).

    python benchmarks/tune_time.py                          # bbt and clip K=4, defaults
    python benchmarks/tune_time.py --runs clip_k4,clip_k4_b1,clip_k4_c4 --budget 2000   # settings sweep
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

#: named runs: TuneConfig overrides, plus "precision" (which export) and "env" (process environment)
RUNS = {
    "bbt": dict(method="bbt"),
    "clip_k4": dict(method="clip", k=4),
    "clip_k4_b1": dict(method="clip", k=4, n_buckets=1),
    "clip_k4_b2": dict(method="clip", k=4, n_buckets=2),
    "clip_k4_b8": dict(method="clip", k=4, n_buckets=8),
    "clip_k4_c2": dict(method="clip", k=4, cands_per_call=2),
    "clip_k4_c4": dict(method="clip", k=4, cands_per_call=4),
    "clip_k4_c5": dict(method="clip", k=4, cands_per_call=5),
    "clip_k4_c10": dict(method="clip", k=4, cands_per_call=10),
    "clip_k4_c20": dict(method="clip", k=4, cands_per_call=20),
    "clip_k4_b1_c20": dict(method="clip", k=4, n_buckets=1, cands_per_call=20),
    "clip_k4_b2_c10": dict(method="clip", k=4, n_buckets=2, cands_per_call=10),
    "clip_k4_w1": dict(method="clip", k=4, workers=1),
    "clip_k4_w1_t1": dict(method="clip", k=4, workers=1, threads=1),
    "clip_k4_int8": dict(method="clip", k=4, precision="int8"),
    "clip_k4_blas1": dict(method="clip", k=4, env={"OPENBLAS_NUM_THREADS": "1"}),
    # int8 export made with harness.convert_int8_recipe (MatMul only, at-mask tail kept fp32: the exporter's
    # recipe since 2026-11-26; "clip_k4_int8" = whatever the exporter makes, see README)
    "clip_k4_int8fix": dict(method="clip", k=4, precision="int8fix"),
    "clip_k4_int8fix_blas1": dict(method="clip", k=4, precision="int8fix", env={"OPENBLAS_NUM_THREADS": "1"}),
    "bbt_blas1": dict(method="bbt", env={"OPENBLAS_NUM_THREADS": "1"}),
    # CMA-ES's eigendecomposition on a worker thread (the CPU default is pycma's schedule: results/cma_eigen_cpu.md)
    "bbt_ahead": {"method": "bbt", "cma_eigen": "ahead"},
    "clip_k4_ahead": {"method": "clip", "k": 4, "cma_eigen": "ahead"},
}
DEFAULT_RUNS = ["bbt", "clip_k4"]


def run_one(spec: dict) -> dict:
    """Child process: one instrumented tune run; returns the breakdown."""
    import cliptune_ort.tuner as T
    from cliptune_ort.config import build_config
    from cliptune_ort.engine import Engine

    acc = {"setup": 0.0, "score": 0.0, "logits_multi_in_score": 0.0, "session_in_score": 0.0}
    state = {"in_score": False}
    orig_prepare, orig_score, orig_lm = T.prepare, T.score, Engine.logits_multi

    def prepare(*a, **k):
        t0 = time.perf_counter()
        ws = orig_prepare(*a, **k)
        acc["setup"] += time.perf_counter() - t0
        state["ws"] = ws
        # read now: tune() closes the engine's sessions when it returns
        state["threads"] = ws.engine.sessions[next(iter(ws.engine.sessions))].get_session_options().intra_op_num_threads
        return ws

    def score(ws, prompts):
        s0 = ws.engine.session_seconds
        state["in_score"] = True
        t0 = time.perf_counter()
        try:
            return orig_score(ws, prompts)
        finally:
            acc["score"] += time.perf_counter() - t0
            acc["session_in_score"] += ws.engine.session_seconds - s0
            state["in_score"] = False

    def logits_multi(self, *a, **k):
        t0 = time.perf_counter()
        try:
            return orig_lm(self, *a, **k)
        finally:
            if state["in_score"]:
                acc["logits_multi_in_score"] += time.perf_counter() - t0

    T.prepare, T.score, Engine.logits_multi = prepare, score, logits_multi
    cfg = build_config(**spec["cfg"])
    run_dir = Path(spec["run_dir"])
    cpu0 = os.times()
    t0 = time.perf_counter()
    res = T.tune(cfg, run_dir, overwrite=True, progress=False,
                 model_dir=Path(spec["model_dir"]) if spec.get("model_dir") else None)
    wall = time.perf_counter() - t0
    cpu1 = os.times()
    ts = res["timing_seconds"]
    eng = state["ws"].engine
    workers = eng.workers if eng.device == "cpu" else 1
    session_wall = acc["session_in_score"] / workers
    parts = {
        "setup": acc["setup"],
        "optimizer": ts["ask_tell"],
        "projection": ts["projection"],
        "session_runs": session_wall,
        "engine_overhead": acc["logits_multi_in_score"] - session_wall,
        "losses": acc["score"] - acc["logits_multi_in_score"],
        "dev_eval": ts["eval"],
        "final_eval": ts["final_eval"],
    }
    parts["other"] = wall - sum(parts.values())
    loop = ts["ask_tell"] + ts["projection"] + ts["scoring"]
    out = {
        "wall_s": round(wall, 2), "result_wall_s": res["wall_seconds"],
        "parts_s": {k: round(v, 2) for k, v in parts.items()},
        "parts_share": {k: round(v / wall, 4) for k, v in parts.items()},
        "calls": res["calls"], "forward_passes": res["forward_passes"], "generations": res["generations"],
        "session_runs": eng.session_runs, "session_run_mean_ms": round(1e3 * eng.session_seconds / max(1, eng.session_runs), 4),
        "calls_per_s_loop": round(res["calls"] / loop, 1), "forward_per_s_loop": round(res["forward_passes"] / loop, 1),
        "calls_per_s_wall": round(res["calls"] / wall, 1),
        "cpu_utilisation": round(((cpu1.user - cpu0.user) + (cpu1.system - cpu0.system)) / wall, 3),
        "workers": workers, "threads": state["threads"],
        "cands_per_call": res["cands_per_call"], "n_buckets": res["n_buckets"],
        "train_padded_fraction": res["train_padded_fraction"], "provider": res["provider"],
        "precision": state["ws"].manifest.precision, "dev_metric": res["dev"]["metric"],
        "test_metric": res["test"]["metric"] if res["test"] else None, "best_train_fitness": res["best_train_fitness"],
        "cma_eigen": res.get("cma_eigen"),
        "peak_rss_mb": harness.peak_rss_mb(),
        "timing_seconds": ts, "load_average_end": harness.load_average(),
    }
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", default=",".join(DEFAULT_RUNS), help=f"comma-separated, from {', '.join(RUNS)}")
    ap.add_argument("--task", default="sst2")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--budget", type=int, default=8000, help="calls per run (default: the package default, 8000)")
    ap.add_argument("--repeat", type=int, default=1, help="runs per setting (wall times: median and all)")
    ap.add_argument("--out", default="tune_time")
    ap.add_argument("--max-load", type=float, default=1.5)
    ap.add_argument("--no-wait", action="store_true")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.one:
        print(json.dumps(run_one(json.loads(a.one))))
        return 0
    names = [r for r in a.runs.split(",") if r]
    for r in names:
        if r not in RUNS:
            ap.error(f"unknown run {r!r}: expected one of {', '.join(RUNS)}")
    dirs = {p: harness.export_dir("splade-tiny", k=4, precision=p)
            for p in {RUNS[r].get("precision", "fp32") for r in names}}
    quiet = harness.wait_for_quiet(a.max_load, enabled=not a.no_wait)
    payload = {"benchmark": "tune_time", "machine": harness.machine_info(), "versions": harness.versions(),
               "wait": quiet, "model": "splade-tiny", "task": a.task, "seed": a.seed, "budget": a.budget,
               "runs": {}}
    tmp = Path(tempfile.mkdtemp(prefix="cliptune_tune_time_"))
    for name in names:
        spec = dict(RUNS[name])
        env = {**os.environ, **spec.pop("env", {})}
        prec = spec.pop("precision", "fp32")
        cfg = {"task": a.task, "seed": a.seed, "budget": a.budget, **spec}
        reps = []
        for i in range(a.repeat):
            one = {"cfg": cfg, "run_dir": str(tmp / f"{name}_{i}"), "model_dir": str(dirs[prec])}
            print(f"[tune_time] {name} ({i + 1}/{a.repeat}) ...", file=sys.stderr, flush=True)
            r = harness.run_json_subprocess([__file__, "--one", json.dumps(one)], env=env)
            print(f"[tune_time]   {r['wall_s']} s, {r['calls_per_s_loop']} calls/s, CPU {r['cpu_utilisation']}, "
                  f"parts {r['parts_s']}", file=sys.stderr, flush=True)
            reps.append(r)
        walls = sorted(r["wall_s"] for r in reps)
        med = reps[[r["wall_s"] for r in reps].index(walls[len(walls) // 2])]
        payload["runs"][name] = {**med, "config": cfg, "export": prec, "env": RUNS[name].get("env", {}),
                                 "walls_s": [r["wall_s"] for r in reps]}
    payload["load_end"] = harness.load_average()
    if a.budget == 8000:
        payload["target"] = {name: {"target": f"tune of {a.task} on splade-tiny (8,000 calls) under 2 minutes: {name}",
                                    "want_s": 120, "got_s": r["wall_s"], "met": r["wall_s"] < 120}
                             for name, r in payload["runs"].items()}
    harness.write_json(harness.results_path(f"{a.out}.json"), payload)
    write_md(payload, a.out)
    return 0


def write_md(payload: dict, out: str) -> None:
    rows = []
    for name, r in payload["runs"].items():
        row = {"run": name, "settings": ", ".join(f"{k}={v}" for k, v in r["config"].items()
                                                  if k not in ("task", "seed", "budget"))
               + (f", {r.get('export', r['precision'])} export" if r.get("export", r["precision"]) != "fp32" else "")
               + "".join(f", {k}={v}" for k, v in r["env"].items()),
               **{k: r[k] for k in ("wall_s", "calls_per_s_loop", "forward_per_s_loop", "cpu_utilisation", "provider",
                                    "session_run_mean_ms", "dev_metric", "test_metric", "peak_rss_mb")}}
        for k, v in r["parts_s"].items():
            row[k] = f"{v:.1f} ({100 * r['parts_share'][k]:.0f}%)"
        rows.append(row)
    cols = [("run", "run"), ("settings", "settings"), ("wall_s", "wall s"), ("calls_per_s_loop", "calls/s"),
            ("forward_per_s_loop", "fwd passes/s"), ("cpu_utilisation", "CPU (cores)", 2),
            ("provider", "provider that ran")]
    table = harness.markdown_table(rows, cols)
    parts = [("run", "run")] + [(k, k) for k in next(iter(payload["runs"].values()))["parts_s"]]
    breakdown = harness.markdown_table(rows, parts)
    quality = harness.markdown_table(rows, [("run", "run"), ("session_run_mean_ms", "ms per session run", 2),
                                            ("dev_metric", "dev acc", 3), ("test_metric", "test acc", 3),
                                            ("peak_rss_mb", "peak RSS MB", 0)])
    t = payload.get("target")
    tgt = ("\n".join(f"- {'MET' if x['met'] else 'NOT MET'}: {x['target']} (measured {x['got_s']} s)" for x in t.values())
           if t else "- (the 2-minute target is about --budget 8000)")
    notes = (f"splade-tiny, task {payload['task']}, seed {payload['seed']}, budget {payload['budget']} calls "
             "(popsize 20), each run in a fresh process; wall = the whole `tune()` call including setup and the "
             "final test evaluation (872 examples). calls/s and passes/s are of the generation loop "
             "(ask/tell + projection + scoring)." + (f" Note: {payload['note']}" if payload.get("note") else ""))
    sections = [("", notes), ("Runs", table), ("Breakdown (seconds, share of wall)", breakdown),
                ("Quality and footprint", quality), ("Target", tgt)]
    if payload.get("dropped"):
        sections.append(("Dropped runs", "\n".join(f"- {k}: {v['wall_s']} s, CPU {v['cpu_utilisation']}: {v['why']}"
                                                    for k, v in payload["dropped"].items())))
    harness.write_markdown(harness.results_path(f"{out}.md"), "Tune time: where a whole run's time goes", payload,
                           sections)


if __name__ == "__main__":
    raise SystemExit(main())
