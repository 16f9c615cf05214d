#!/usr/bin/env python3
"""Where a run's start goes: verifying the model dir and opening its ONNX Runtime sessions.

Run 7's `bbt` tune on an H100 spent 3.1 s before its first generation, and each engine of the benchmark
took about 1.9 s to open graph 0 while `clip`'s four thinned graphs took about 0.3 s each after it. This
times, in one process, on one model dir:

- ``load_manifest`` hashing every pinned file (``CLIPTUNE_VERIFY=full``) and through the
  verified-hash cache;
- mapping ``weights.bin`` (``SharedWeights``);
- opening graph 0, then graph 0 again and each other graph asked for with the same shared weights
  (first session against the rest), then graph 0 with freshly mapped weights (what a second Engine
  pays);
- graph 0 at each ORT optimisation level (``all``, the runtime's, then ``basic`` and ``disable``), so
  the graph optimisers' share shows;
- ONNX Runtime's own split of the first open (its profiler's ``model_loading_uri`` and
  ``session_initialization`` events);
- a clip K = 2 workspace made with the shared tensors as host OrtValues (the default) and as device
  OrtValues (``CLIPTUNE_DEVICE_WEIGHTS=1``): session time, GPU memory, and whether the losses agree.

    python benchmarks/session_open.py --model-dir DIR [--device cuda] [--graphs 0,1] [--out DIR]

Writes ``DIR/session_open_<device>[_<tag>].json``. ``benchmarks/gpu.py`` runs the same measurement on its
tune export (section ``session_open``). Single opens, not percentiles: a session opens once per run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from harness import env_var, machine_info


def _spec(manifest, device: str, optimization: str, profile_prefix: str | None = None):
    from cliptune_ort.engine import disabled_optimizers
    from cliptune_ort.sessions import SessionSpec

    return SessionSpec(device=device, threads=1 if device == "cpu" else 0, n_live=2, optimization=optimization,
                       disabled_optimizers=disabled_optimizers(manifest),
                       ops_library=("cuda" if device == "cuda" else "cpu") if manifest.needs_ops_library else None,
                       profile_prefix=profile_prefix)


def _ort_init_events(path: str) -> dict[str, float]:
    """Milliseconds of the session-level events in an ORT profile (model load, initialisation)."""
    events = json.loads(Path(path).read_text())
    out: dict[str, float] = {}
    for e in events:
        if e.get("cat") == "Session" and e.get("name") in ("model_loading_uri", "session_initialization"):
            out[e["name"]] = round(out.get(e["name"], 0.0) + e.get("dur", 0) / 1e3, 2)
    return out


def measure(model_dir: str | os.PathLike, device: str = "cpu", graphs: list[int] | None = None) -> dict:
    """The timings above for ``model_dir`` on ``device`` ('cpu' | 'cuda'); seconds unless named _ms."""
    from cliptune_ort.errors import ModelDirError, ProviderError
    from cliptune_ort.manifest import load_manifest
    from cliptune_ort.sessions import SharedWeights, make_session

    out: dict = {"model_dir": str(model_dir), "device": device}
    for mode in ("full", "cached"):
        with env_var("CLIPTUNE_VERIFY", mode):
            t = time.perf_counter()
            man = load_manifest(model_dir)
            out[f"verify_{mode}_s"] = round(time.perf_counter() - t, 4)
    out["pinned_bytes"] = sum((Path(model_dir) / g["file"]).stat().st_size for g in man.data["graphs"]) + \
        man.weights_path.stat().st_size
    graphs = sorted(set(graphs if graphs is not None else [0, min(1, man.k)]))

    t = time.perf_counter()
    shared = SharedWeights(man)
    out["map_weights_s"] = round(time.perf_counter() - t, 4)
    opens = []
    with tempfile.TemporaryDirectory() as prof_dir:
        sessions = []
        for i, g in enumerate([0, *graphs]):  # graph 0 first (profiled), then again, then the others
            prefix = os.path.join(prof_dir, "open") if i == 0 else None
            t = time.perf_counter()
            sess = make_session(man.graph_path(g), _spec(man, device, "all", prefix), shared)
            opens.append({"graph": g, "nth": i + 1, "s": round(time.perf_counter() - t, 4)})
            if prefix:
                out["ort_first_open_ms"] = _ort_init_events(sess.end_profiling())
            sessions.append(sess)
        provider = sessions[0].get_providers()[0]
        del sessions
    out["opens_shared_weights"] = opens
    t = time.perf_counter()
    fresh = SharedWeights(man)
    sess = make_session(man.graph_path(0), _spec(man, device, "all"), fresh)
    out["graph0_fresh_weights_s"] = round(time.perf_counter() - t, 4)
    del sess, fresh
    levels = {}
    for level in ("all", "basic", "disable"):
        t = time.perf_counter()
        try:
            sess = make_session(man.graph_path(0), _spec(man, device, level), shared)
            levels[level] = round(time.perf_counter() - t, 4)
            del sess
        except (ModelDirError, ProviderError) as e:  # a layout may need the optimiser's fusions for kernels
            levels[level] = f"failed: {str(e)[:160]}"
    out["graph0_by_optimization_s"] = levels
    out["provider"] = provider
    out["device_weights"] = compare_device_weights(model_dir, device)
    return out


def _gpu_memory_used_mib() -> float | None:
    import subprocess

    try:
        r = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                           capture_output=True, text=True, timeout=20, check=False)
        return float(r.stdout.strip().splitlines()[0])
    except (OSError, ValueError, IndexError, subprocess.SubprocessError):
        return None


def compare_device_weights(model_dir, device: str, k: int = 2, pop: int = 4) -> dict:
    """A clip run's workspace (graph 0 + ``k`` thinned graphs) made with the shared tensors handed to the
    sessions from host memory (the default) and as device OrtValues (``CLIPTUNE_DEVICE_WEIGHTS=1``; on
    the CPU provider both are the host path): session time, GPU memory after scoring one population,
    and the largest difference of its losses (0 expected: same weights, same kernels)."""
    import numpy as np

    from cliptune_ort.config import build_config
    from cliptune_ort.manifest import load_manifest
    from cliptune_ort.tuner import prepare, score

    k = min(k, load_manifest(model_dir).k)
    cfg = build_config(task="sst2", method="clip", k=k, device=device, plot=False)
    z = np.random.default_rng(0).standard_normal((pop, cfg.d))
    runs: dict = {}
    losses = {}
    for flag in ("0", "1"):
        before = _gpu_memory_used_mib() if device == "cuda" else None
        with env_var("CLIPTUNE_DEVICE_WEIGHTS", flag):
            ws = prepare(cfg, Path(model_dir))
        try:
            losses[flag] = score(ws, ws.prompts(z))
            after = _gpu_memory_used_mib() if device == "cuda" else None
            runs["on" if flag == "1" else "off"] = {
                "sessions_s": ws.engine.open_wall_seconds, "session_open_s": ws.engine.open_seconds,
                "gpu_memory_mib": None if before is None or after is None else round(after - before, 1),
                "device_values": sum(1 for v in (ws.engine.shared.values.values() if ws.engine.shared else [])
                                     if v.device_name().lower() != "cpu")}
        finally:
            ws.engine.close()
    runs["graphs"] = k + 1
    runs["max_abs_loss_diff"] = float(np.max(np.abs(losses["0"] - losses["1"])))
    return runs


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--graphs", default="", help="graphs to open after graph 0 (default 0 and 1)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--tag", default="")
    a = ap.parse_args(argv)
    graphs = [int(x) for x in a.graphs.split(",") if x.strip()] or None
    res = measure(a.model_dir, a.device, graphs)
    import onnxruntime

    res.update({"benchmark": "session_open", "onnxruntime": onnxruntime.__version__, "machine": machine_info()})
    os.makedirs(a.out, exist_ok=True)
    path = Path(a.out) / f"session_open_{a.device}{'_' + a.tag if a.tag else ''}.json"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(res, indent=1))
    os.replace(tmp, path)
    print(json.dumps({k: v for k, v in res.items() if k != "machine"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
