"""int8 weight formats (``--int8-weights``) on this CPU: drift, loss ranking, agreement and speed.

ONNX Runtime's dynamic quantisation multiplies uint8 activations by the weights. With full-range int8
weights its x86 kernels on a CPU without VNNI (plain AVX2 / AVX-512: vpmaddubsw adds pairs of products
in 16 bits) saturate; VNNI / AMX CPUs and ARM add in 32 bits. The formats (cliptune_ort.manifest.INT8_WEIGHTS):

- ``int8``: full-range int8 weights (the exporter's recipe before ``--int8-weights``);
- ``int7``: int8 weights in -64..63 (onnxruntime's ``reduce_range``): no pair of products can overflow;
- ``uint8``: uint8 weights (ONNX Runtime's uint8 x uint8 kernels).

For each format, on splade-tiny and SST-2 (seed 42, the BBT few-shot set):

- the export's own validation: relative RMS of each graph's logits against the masked PyTorch reference;
- the tune path (``cliptune tune --precision int8``): Spearman of 3 populations of 40 random prompts' K = 4
  mixture losses against fp32 (tests/test_int8.py's bar: >= 0.9), and the wall time of one pop-20 generation
  (K = 4 graphs, p50/p90/p99 over interleaved repeats, fp32 beside them);
- the deploy path (``cliptune deploy --int8``, MatMul and Gather quantised): a short bbt run's classifier on
  the 872 SST-2 test texts, prediction agreement and max probability difference against the fp32
  classifier, and the time of one predict over all of them.

    python benchmarks/int8_weights.py                 # ~2 min on 2 cores (exports cached)
    python benchmarks/int8_weights.py --reps 5 --no-wait
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import harness

from cliptune_ort.manifest import INT8_WEIGHTS, load_manifest
from cliptune_ort.sessions import cpu_flags, int8_saturates


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rho (no ties expected in float losses)."""
    ra = np.argsort(np.argsort(a)).astype(np.float64)
    rb = np.argsort(np.argsort(b)).astype(np.float64)
    ra -= ra.mean()
    rb -= rb.mean()
    return float((ra * rb).sum() / np.sqrt((ra * ra).sum() * (rb * rb).sum()))


def tune_path(dirs: dict[str, Path], reps: int) -> dict[str, dict]:
    """Ranking against fp32 and pop-20 generation time, per model dir (fp32 first)."""
    from cliptune_ort.config import build_config
    from cliptune_ort.tuner import prepare, score

    cfg = build_config(task="sst2", method="clip", k=4, seed=42, plot=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the int8 format's saturation warning: measured here
        wss = {name: prepare(cfg, d) for name, d in dirs.items()}
    out: dict[str, dict] = {name: {} for name in dirs}
    try:
        pops = [np.random.default_rng(s).standard_normal((40, cfg.d)) for s in (7, 8, 9)]
        ref = [score(wss["fp32"], wss["fp32"].prompts(z)) for z in pops]
        for name, ws in wss.items():
            got = [score(ws, ws.prompts(z)) for z in pops]
            out[name]["spearman_vs_fp32"] = [round(spearman(r, g), 4) for r, g in zip(ref, got)]
            out[name]["max_abs_loss_diff"] = round(max(float(np.max(np.abs(r - g))) for r, g in zip(ref, got)), 5)
        z20 = np.random.default_rng(0).standard_normal((20, cfg.d))
        prompts = {name: ws.prompts(z20) for name, ws in wss.items()}
        times: dict[str, list[float]] = {name: [] for name in wss}
        for name, ws in wss.items():  # warm-up
            score(ws, prompts[name])
        for _ in range(reps):  # interleaved: a slow spell of the machine hits every format alike
            for name, ws in wss.items():
                t0 = time.perf_counter()
                score(ws, prompts[name])
                times[name].append(time.perf_counter() - t0)
        for name in wss:
            out[name]["pop20_generation"] = harness.summarize(times[name])
    finally:
        for ws in wss.values():
            ws.engine.close()
    return out


def deploy_path(fp32_dir: Path, formats: list[str], reps: int, work: Path) -> dict[str, dict]:
    """A short bbt run deployed as fp32 and as int8 in each format; agreement and predict time on SST-2 test."""
    from cliptune_export.deploy import DeployOptions, deploy_run

    from cliptune_ort.config import build_config
    from cliptune_ort.deploy import DeployedClassifier
    from cliptune_ort.tuner import prepare, tune

    run = work / "run"
    tune(build_config(task="sst2", method="bbt", budget=40, popsize=4, d=20, eval_every=20, plot=False), run,
         model_dir=fp32_dir, progress=False)
    ws = prepare(build_config(task="sst2", method="bbt", plot=False), fp32_dir, draw=False)
    texts = [ex.text for ex in ws.fewshot.test]
    ws.engine.close()
    files = {"fp32": work / "clf.onnx"}
    deploy_run(run, files["fp32"], DeployOptions(check_split=None))
    for w in formats:
        files[w] = work / f"clf_{w}.onnx"
        deploy_run(run, files[w], DeployOptions(int8=True, int8_weights=w, check_split=None))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        clfs = {name: DeployedClassifier(f) for name, f in files.items()}
    probs = {name: clf.predict_proba(texts) for name, clf in clfs.items()}
    times: dict[str, list[float]] = {name: [] for name in clfs}
    for _ in range(reps):
        for name, clf in clfs.items():
            t0 = time.perf_counter()
            clf.predict_proba(texts)
            times[name].append(time.perf_counter() - t0)
    out = {}
    for name in clfs:
        p32, p = probs["fp32"], probs[name]
        out[name] = {"texts": len(texts), "bytes": files[name].stat().st_size,
                     "agreement_vs_fp32": round(float(np.mean(p32.argmax(1) == p.argmax(1))), 4),
                     "max_abs_prob_diff": round(float(np.max(np.abs(p32 - p))), 4),
                     "predict_all": harness.summarize(times[name], items_per_call=len(texts), item="texts")}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--formats", default=",".join(INT8_WEIGHTS), help="int8 weight formats to compare")
    ap.add_argument("--reps", type=int, default=15, help="timed repeats per format (interleaved)")
    ap.add_argument("--out", default=str(harness.results_path("int8_weights")), help="results path without suffix")
    ap.add_argument("--max-load", type=float, default=1.5)
    ap.add_argument("--no-wait", action="store_true")
    a = ap.parse_args()
    formats = [f for f in a.formats.split(",") if f]
    bad = [f for f in formats if f not in INT8_WEIGHTS]
    if bad:
        ap.error(f"--formats: {bad} not in {', '.join(INT8_WEIGHTS)}")
    wait = harness.wait_for_quiet(a.max_load, enabled=not a.no_wait)
    payload = {"benchmark": "int8_weights", "machine": harness.machine_info(), "versions": harness.versions(),
               "wait": wait, "cpu_saturates_full_range_int8": int8_saturates("int8", cpu_flags())}
    dirs = {"fp32": harness.export_dir("splade-tiny", k=4, precision="fp32")}
    for w in formats:
        dirs[w] = harness.export_dir("splade-tiny", k=4, precision="int8", int8_weights=w)
    drift = {w: [round(float(g["rel_rms_diff"]), 5) for g in load_manifest(dirs[w]).data["graphs"]] for w in formats}
    tune_res = tune_path(dirs, a.reps)
    with tempfile.TemporaryDirectory(prefix="int8_weights_") as d:
        dep = deploy_path(dirs["fp32"], formats, a.reps, Path(d))
    rows = []
    for name in ["fp32", *formats]:
        t, dp = tune_res[name], dep[name]
        rows.append({"format": name, "export_rel_rms_max": max(drift[name]) if name in drift else 0.0,
                     "spearman_min": min(t["spearman_vs_fp32"]), "max_abs_loss_diff": t["max_abs_loss_diff"],
                     "pop20_p50_ms": t["pop20_generation"]["p50_ms"], "pop20_p90_ms": t["pop20_generation"]["p90_ms"],
                     "pop20_p99_ms": t["pop20_generation"]["p99_ms"],
                     "deploy_agreement": dp["agreement_vs_fp32"], "deploy_max_prob_diff": dp["max_abs_prob_diff"],
                     "deploy_p50_ms": dp["predict_all"]["p50_ms"], "deploy_mb": dp["bytes"] / 1e6})
    payload.update({"export_rel_rms_per_graph": drift, "tune": tune_res, "deploy": dep, "rows": rows,
                    "providers": ["CPUExecutionProvider"], "load_end": harness.load_average()})
    out = Path(a.out)
    harness.write_json(out.with_suffix(".json"), payload)
    table = harness.markdown_table(rows, [
        ("format", "weights"), ("export_rel_rms_max", "export drift (rel RMS, worst graph)", 4),
        ("spearman_min", "tune ranking vs fp32 (min Spearman)", 3), ("max_abs_loss_diff", "max abs loss diff", 4),
        ("pop20_p50_ms", "pop-20 K=4 p50 ms"), ("pop20_p90_ms", "p90 ms"), ("pop20_p99_ms", "p99 ms"),
        ("deploy_agreement", "deploy agreement vs fp32", 4), ("deploy_max_prob_diff", "max prob diff", 3),
        ("deploy_p50_ms", "deploy 872 texts p50 ms"), ("deploy_mb", "deploy MB", 1)])
    verdict = ("saturates full-range int8 weights (x86, no VNNI)" if payload["cpu_saturates_full_range_int8"]
               else "does not saturate full-range int8 weights (VNNI / AMX, ARM, or unknown)")
    harness.write_markdown(out.with_suffix(".md"), "int8 weight formats (`--int8-weights`)", payload, [
        ("", f"This CPU {verdict}. splade-tiny, SST-2 seed 42, K = 4; timings over {a.reps} interleaved repeats "
             "(CPUExecutionProvider)."),
        ("", table)])
    print(out.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
