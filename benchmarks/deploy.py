"""Benchmark a deployed classifier against the full tuning runtime, on the CPU.

    python benchmarks/deploy.py --run-dir runs/sst2_clip_seed42          # a finished sst2 run
    python benchmarks/deploy.py                                          # tunes a small bbt run first

Writes benchmarks/results/deploy_cpu.json and deploy_cpu.md:

- parity on the task's test split: deployed fp32 vs the run's graph_0.onnx with the prompt input
  (max abs probability difference, prediction agreement), int8 vs fp32 (agreement, max diff);
- latency p50/p90/p99 and throughput at batch 1 and batch 32 on the test sentences, end to end
  (text -> probabilities, tokenisation included) and session only (pre-tokenised ids), for the
  deployed classifier (fp32, int8; 1 thread and ORT's default threads) and for the full tuning
  runtime (PromptTokenizer -> Engine with graph_0 and the prompt input, the path `cliptune predict
  RUN_DIR` takes, with its workspace loaded once);
- artefact sizes; peak and current RSS and cold start (imports + load + first prediction), each
  measured in a fresh process; versions, machine, the ORT provider that actually ran.

Timings come from this script's own small helper (:func:`timed_interleaved`): perf_counter around
each call after warm-up calls, the systems taking turns item by item.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


def timed_interleaved(fns: dict, items, warmup: int, repeat: int = 1) -> dict:
    """Call every ``fns[name](item)`` for every item (``repeat`` passes) after ``warmup`` calls each, the
    systems taking turns per item so that drifting machine load hits all alike. ``items``: one list
    for all, or a dict name -> list. Returns per name: latency percentiles (ms), calls/s."""
    per = {k: (items[k] if isinstance(items, dict) else items) for k in fns}
    n = len(next(iter(per.values())))
    for k, fn in fns.items():
        for i in range(warmup):
            fn(per[k][i % n])
    secs = {k: [] for k in fns}
    for _ in range(repeat):
        for i in range(n):
            for k, fn in fns.items():
                t0 = time.perf_counter()
                fn(per[k][i])
                secs[k].append(time.perf_counter() - t0)
    out = {}
    for k, v in secs.items():
        ms = np.asarray(v) * 1e3
        out[k] = {"calls": len(ms), "p50_ms": float(np.percentile(ms, 50)), "p90_ms": float(np.percentile(ms, 90)),
                  "p99_ms": float(np.percentile(ms, 99)), "mean_ms": float(ms.mean()),
                  "calls_per_s": float(len(ms) / (ms.sum() / 1e3))}
    return out


def _chunks(xs: list, n: int) -> list[list]:
    return [xs[i:i + n] for i in range(0, len(xs) - n + 1, n)]


def machine() -> dict:
    info = {"platform": platform.platform(), "processor": platform.processor(), "cpu_count": os.cpu_count(),
            "python": platform.python_version()}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
        info["mem_total_gb"] = round(int(next(x for x in Path("/proc/meminfo").read_text().splitlines()
                                              if x.startswith("MemTotal")).split()[1]) / 1024**2, 1)
    except (OSError, StopIteration):
        pass
    return info


def versions() -> dict:
    import importlib.metadata as md

    out = {}
    for pkg in ("cliptune-ort", "numpy", "onnxruntime", "onnx", "tokenizers"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


# -------------------------------------------------------------- memory, each in a fresh process

_MEM_SCRIPT = r"""
import json, sys, time
t0 = time.perf_counter()
mode, path, texts = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
if mode == "deployed":
    from cliptune_ort.deploy import DeployedClassifier
    clf = DeployedClassifier(path, threads=1)
    probs = clf.predict_proba(texts, batch_size=32)
else:  # exactly `cliptune predict RUN_DIR`
    from cliptune_ort.predict import predict
    rows = predict(path, texts, device="cpu")
first = time.perf_counter() - t0
status = {x.split(":")[0]: int(x.split()[1]) for x in open("/proc/self/status") if x.startswith(("VmRSS", "VmHWM"))}
mods = sorted(m for m in ("torch", "onnx", "cma", "datasets", "matplotlib", "tokenizers", "onnxruntime")
              if m in sys.modules)
print(json.dumps({"peak_rss_mb": status["VmHWM"] / 1024, "rss_mb": status["VmRSS"] / 1024,
                  "cold_start_s": first, "heavy_modules_loaded": mods}))
"""


def memory(mode: str, path: Path, texts: list[str]) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-c", _MEM_SCRIPT, mode, str(path), json.dumps(texts)],
                       capture_output=True, text=True, env=env, timeout=600)
    if r.returncode != 0:
        raise RuntimeError(f"memory probe {mode} failed: {r.stderr.strip()[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


# -------------------------------------------------------------- the benchmark


def ensure_run(run_dir: str | None, work: Path) -> Path:
    if run_dir:
        return Path(run_dir)
    from cliptune_ort.config import build_config
    from cliptune_ort.tuner import tune

    out = work / "run"
    print("[bench] no --run-dir: tuning a small sst2 bbt run on the embedded model", file=sys.stderr)
    tune(build_config(task="sst2", method="bbt", budget=200, popsize=10, eval_every=100, plot=False), out,
         progress=False)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run-dir", help="finished sst2 run (default: tune a small bbt run)")
    ap.add_argument("--out", default=str(RESULTS / "deploy_cpu.json"))
    ap.add_argument("--warmup", type=int, default=30)
    ap.add_argument("--repeat32", type=int, default=3, help="passes over the test split at batch 32")
    ap.add_argument("--limit", type=int, default=0, help="use only the first N test sentences (0 = all)")
    a = ap.parse_args(argv)

    from cliptune_export.deploy import DeployOptions, _load_run, compare, deploy_run, runtime_probs

    from cliptune_ort.data import Example
    from cliptune_ort.deploy import DeployedClassifier

    load_start = os.getloadavg()
    work = Path(tempfile.mkdtemp(prefix="cliptune_deploy_bench."))
    run_dir = ensure_run(a.run_dir, work)
    f32, i8 = work / "classifier.onnx", work / "classifier_int8.onnx"
    t0 = time.perf_counter()
    meta32 = deploy_run(run_dir, f32, DeployOptions(check_split="test"))
    deploy_s = time.perf_counter() - t0
    meta8 = deploy_run(run_dir, i8, DeployOptions(int8=True, check_split="test"))
    if meta32["task"] != "sst2":
        print(f"[bench] note: task is {meta32['task']}, not sst2", file=sys.stderr)

    # the full tuning runtime, loaded once (as `cliptune predict RUN_DIR` loads it per call)
    cfg, ws, prompt = _load_run(run_dir)
    prompt1 = prompt[None].astype(np.float32)
    ref, exs = runtime_probs(ws, prompt, "test")
    texts = [e.text for e in exs][: a.limit or None]
    labels = np.asarray([e.label for e in exs])[: len(texts)]
    ref = ref[: len(texts)]

    def runtime_predict(batch_texts: list[str]) -> np.ndarray:
        enc = ws.ptok.encode(ws.task.template, [Example(t, 0) for t in batch_texts])
        lg = ws.engine.logits(0, prompt1, ws.engine.prepare(enc, 1), ws.verbalizer_ids)[0]
        z = np.exp(lg - lg.max(-1, keepdims=True))
        return z / z.sum(-1, keepdims=True)

    clfs = {("fp32", 1): DeployedClassifier(f32, threads=1), ("fp32", 0): DeployedClassifier(f32),
            ("int8", 1): DeployedClassifier(i8, threads=1), ("int8", 0): DeployedClassifier(i8)}
    p32 = clfs[("fp32", 1)].predict_proba(texts)
    p8 = clfs[("int8", 1)].predict_proba(texts)
    parity = {
        "split": "test", "n": len(texts),
        "fp32_vs_runtime": compare(p32, ref),
        "int8_vs_fp32": compare(p8, p32),
        "int8_vs_runtime": compare(p8, ref),
        "accuracy": {"runtime": float(np.mean(ref.argmax(1) == labels)),
                     "deployed_fp32": float(np.mean(p32.argmax(1) == labels)),
                     "deployed_int8": float(np.mean(p8.argmax(1) == labels))},
        "deploy_time_check": {"fp32": meta32["check"], "int8": meta8["check"]},
    }

    single = [[t] for t in texts]
    b32 = _chunks(texts, 32)
    # systems: name -> (threads, provider, end-to-end fn(texts), session fn(prepared), prepare fn(texts))
    systems = {}
    for (prec, thr), clf in clfs.items():
        systems[f"deployed {prec}|{thr or 'ort default'}"] = (
            thr or "ort default", clf.provider, lambda b, c=clf: c.predict_proba(b, batch_size=len(b)),
            lambda x, c=clf: c.run(*x), lambda b, c=clf: c.encode(b))
    # runtime: its own defaults (CPU: one single-threaded session run per unit, workers = cores)
    systems["runtime fp32 (graph_0 + prompt input)|1"] = (
        1, ws.engine.provider, runtime_predict,
        lambda fb: ws.engine.logits(0, prompt1, fb, ws.verbalizer_ids),
        lambda b: ws.engine.prepare(ws.ptok.encode(ws.task.template, [Example(t, 0) for t in b]), 1))
    rows = []
    # two groups, each interleaved: single-threaded systems, and ORT's default thread pool (whose threads
    # spin after a run and would slow whichever system runs next)
    groups = [{k: v for k, v in systems.items() if v[0] == 1}, {k: v for k, v in systems.items() if v[0] != 1}]
    for bs, items, rep in ((1, single, 1), (32, b32, a.repeat32)):
        e2e, sess = {}, {}
        for group in groups:
            e2e.update(timed_interleaved({k: v[2] for k, v in group.items()}, items, a.warmup, rep))
            prepared = {k: [v[4](b) for b in items] for k, v in group.items()}
            sess.update(timed_interleaved({k: v[3] for k, v in group.items()}, prepared, a.warmup, rep))
        for k, v in systems.items():
            name, _ = k.split("|")
            rows.append({"system": name, "threads": v[0], "batch": bs, "provider": v[1], "end_to_end": e2e[k],
                         "session_only": sess[k]})
            print(f"[bench] {k} batch {bs}: p50 {e2e[k]['p50_ms']:.2f} ms", file=sys.stderr)
    ws.engine.close()

    man = ws.manifest
    model_dir_files = {p.name: p.stat().st_size for p in sorted(man.root.iterdir()) if p.is_file()}
    sizes = {
        "deployed_fp32_onnx": f32.stat().st_size, "deployed_int8_onnx": i8.stat().st_size,
        "sidecar_json": f32.with_suffix(".json").stat().st_size,
        "sidecar_without_tokenizer": len(json.dumps({k: v for k, v in meta32.items() if k != "tokenizer_json"},
                                                    indent=2)),
        "runtime_needed_graph0_weights_tokenizer_manifest": sum(model_dir_files.get(f, 0) for f in (
            man.graph_path(0).name, man.weights_path.name, man.tokenizer_path.name, "manifest.json")),
        "runtime_model_dir_total": sum(model_dir_files.values()),
        "model_dir_files": model_dir_files,
        "run_best_prompt_npy": (run_dir / "best_prompt.npy").stat().st_size,
    }
    probe = texts[:32]
    mem = {"deployed_fp32": memory("deployed", f32, probe), "deployed_int8": memory("deployed", i8, probe),
           "runtime": memory("runtime", run_dir, probe)}

    import onnxruntime as ort

    result = {
        "benchmark": "deploy_cpu",
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "run": {"run_dir": str(run_dir), "task": meta32["task"], "method": cfg.method, "seed": cfg.seed,
                "model": man.data["model"]["source"], "L": man.n_prompt, "hidden": man.hidden,
                "layers": man.data["model"]["layers"], "k_sessions_loaded_by_runtime": len(ws.engine.sessions)},
        "parity": parity,
        "latency": rows,
        "sizes_bytes": sizes,
        "memory": mem,
        "deploy_seconds_fp32_with_test_check": round(deploy_s, 2),
        "providers_available": ort.get_available_providers(),
        "versions": versions(),
        "machine": {**machine(), "loadavg_1_5_15_at_start": [round(x, 2) for x in load_start],
                    "loadavg_1_5_15_at_end": [round(x, 2) for x in os.getloadavg()]},
        "notes": [
            "CPU only, shared 2-core machine with other jobs running: timings are noisy (expect +-20% and "
            "long p99 tails); compare rows of this file with each other, not with other machines.",
            "batch 1: each SST-2 test sentence once, in file order; batch 32: consecutive chunks of 32 test "
            "sentences (27 per pass), repeat32 passes. calls_per_s x batch = sentences/s. The systems are timed "
            "round-robin per item (timed_interleaved), so load drift on the shared machine hits all rows alike; "
            "the single-threaded rows (deployed threads=1, runtime) form one group, the ORT-default-threads rows "
            "another (their spinning pool would slow the next system).",
            "end_to_end = text -> probabilities (rendering + tokenisation + session run + softmax); session_only "
            "= the ONNX Runtime call on pre-tokenised ids.",
            "runtime = the tuning runtime's own path (PromptTokenizer -> Engine.logits on graph_0 with the "
            "prompt_embeds input), workspace loaded once; `cliptune predict RUN_DIR` also loads the workspace "
            "(and every session of a clip run) on each call, see memory.runtime.cold_start_s.",
            "memory: each in a fresh process that imports, loads and classifies 32 sentences; peak_rss_mb = "
            "VmHWM, rss_mb = VmRSS after the prediction (/proc/self/status; ru_maxrss is not used: Linux carries the "
            "parent's peak across fork+exec). The runtime process loads the run's whole workspace (few-shot data, all graphs of the "
            "run's method), as `cliptune predict RUN_DIR` does.",
            "int8 = onnxruntime.quantization.quantize_dynamic(per_channel=True, QInt8, DefaultTensorType=FLOAT) "
            "of the fp32 classifier (MatMul and the embedding Gather); its agreement is measured, not claimed.",
        ],
    }
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))
    return 0


def markdown(r: dict) -> str:
    p = r["parity"]
    f, i8, i8r = p["fp32_vs_runtime"], p["int8_vs_fp32"], p["int8_vs_runtime"]
    s = r["sizes_bytes"]
    m = r["memory"]
    lines = [
        f"# Deployed classifier vs the tuning runtime (CPU, {r['run']['model']}, task {r['run']['task']})",
        "",
        f"Run: {r['run']['method']} seed {r['run']['seed']}; {r['created_at']}; "
        f"{r['machine'].get('cpu', r['machine']['processor'])}, {r['machine']['cpu_count']} cores; "
        f"onnxruntime {r['versions']['onnxruntime']}. Noisy shared machine: see notes in deploy_cpu.json.",
        "",
        f"## Parity on the test split ({p['n']} sentences)",
        "",
        "| comparison | max abs prob diff | prediction agreement |",
        "|---|---|---|",
        f"| deployed fp32 vs runtime (graph_0 + prompt input) | {f['max_abs_prob_diff']:.2e} | "
        f"{f['prediction_agreement'] * 100:.2f}% |",
        f"| deployed int8 vs deployed fp32 | {i8['max_abs_prob_diff']:.2e} | {i8['prediction_agreement'] * 100:.2f}% |",
        f"| deployed int8 vs runtime | {i8r['max_abs_prob_diff']:.2e} | {i8r['prediction_agreement'] * 100:.2f}% |",
        "",
        f"Test accuracy: runtime {p['accuracy']['runtime']:.4f}, deployed fp32 {p['accuracy']['deployed_fp32']:.4f}, "
        f"deployed int8 {p['accuracy']['deployed_int8']:.4f}.",
        "",
        "## Latency and throughput (end to end: text -> probabilities; session only in the last columns)",
        "",
        "| system | threads | batch | p50 ms | p90 ms | p99 ms | sentences/s | session p50 ms | session p99 ms |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in r["latency"]:
        e, g = row["end_to_end"], row["session_only"]
        lines.append(f"| {row['system']} | {row['threads']} | {row['batch']} | {e['p50_ms']:.2f} | {e['p90_ms']:.2f} | "
                     f"{e['p99_ms']:.2f} | {e['calls_per_s'] * row['batch']:.0f} | {g['p50_ms']:.2f} | "
                     f"{g['p99_ms']:.2f} |")
    mb = 1024**2
    lines += [
        "",
        "## Artefacts and memory",
        "",
        "| what | size |",
        "|---|---|",
        f"| deployed fp32 classifier.onnx (self-contained) | {s['deployed_fp32_onnx'] / mb:.2f} MiB |",
        f"| deployed int8 classifier.onnx | {s['deployed_int8_onnx'] / mb:.2f} MiB |",
        f"| sidecar classifier.json (with the embedded tokenizer) | {s['sidecar_json'] / mb:.2f} MiB |",
        f"| runtime: graph_0 + weights.bin + tokenizer + manifest | "
        f"{s['runtime_needed_graph0_weights_tokenizer_manifest'] / mb:.2f} MiB |",
        f"| runtime: whole model dir (K+1 graphs) | {s['runtime_model_dir_total'] / mb:.2f} MiB |",
        "",
        "| process (fresh; imports, loads, classifies 32 sentences) | peak RSS MiB | RSS MiB | cold start s | "
        "heavy modules |",
        "|---|---|---|---|---|",
    ]
    for k, v in m.items():
        lines.append(f"| {k} | {v['peak_rss_mb']:.0f} | {v['rss_mb']:.0f} | {v['cold_start_s']:.2f} | "
                     f"{', '.join(v['heavy_modules_loaded'])} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
