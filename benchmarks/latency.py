"""Latency of one train-set pass (one candidate prompt x the real 32-example few-shot set), per engine.

Engines, on the same graph (thinned graph 1: its stationary masks), the same inputs and the same prompt:

- ``pytorch_eager_padded``: the BBT way, the reference. The export's own wrapper
  (``cliptune_export.wrapper.ContractModel``, same masks via ``draw_masks``, same random init) in
  ``torch.inference_mode()``, the whole batch padded to its longest example, torch's default threads.
- ``pytorch_eager_buckets``: the same module on the same length buckets ORT gets (to show how much of
  the gain is the buckets and how much is ORT).
- ``ort_fp32_padded``: the package's Engine on one padded batch (one run using every core).
- ``ort_fp32_buckets``: the package's Engine as a tune run uses it: ``n_buckets`` length buckets,
  one single-threaded run per bucket, ``workers`` (= cores) runs in parallel.
- ``ort_int8_padded`` / ``ort_int8_buckets``: the same on the ``--precision int8`` export
  (per-channel dynamic quantisation).
- ``ort_int8_buckets_noshare``: int8 without weight sharing (prepacked weights, one copy per session).
- ``ort_cuda_fp16_iobinding``: the fp16 export on the CUDA provider, inputs bound on the device once
  (IOBinding), output copied back every call. Only where a CUDA provider is present.

Each (shape, task, engine) cell runs in a fresh process (so peak RSS is that engine's, and no
thread pool of one engine spins while another is timed); inputs are prepared once, only the call is
timed. Logits of every cell are compared with the PyTorch padded cell (max abs diff; int8: relative
RMS) so "same graph, same masks, same inputs" is checked, not assumed.

    python benchmarks/latency.py                      # everything (~15 min on 2 cores)
    python benchmarks/latency.py --shapes splade-tiny --tasks sst2 --scale 0.2   # a quick look
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

ENGINES = {
    "pytorch_eager_padded": dict(engine="torch", precision="fp32", n_buckets=1),
    "pytorch_eager_buckets": dict(engine="torch", precision="fp32", n_buckets=4),
    "ort_fp32_padded": dict(engine="ort", precision="fp32", n_buckets=1, workers=1, threads=0),
    "ort_fp32_buckets": dict(engine="ort", precision="fp32", n_buckets=4),
    "ort_int8_padded": dict(engine="ort", precision="int8", n_buckets=1, workers=1, threads=0),
    "ort_int8_buckets": dict(engine="ort", precision="int8", n_buckets=4),
    "ort_int8_buckets_noshare": dict(engine="ort", precision="int8", n_buckets=4, share_weights=False),
    # "int8fix": an int8 export made with harness.convert_int8_recipe (MatMul only, the at-mask tail kept fp32;
    # the exporter's recipe since 2026-11-26; "int8" cells measured before then are the first recipe; see README)
    "ort_int8fix_buckets": dict(engine="ort", precision="int8fix", n_buckets=4),
    "ort_int8fix_buckets_noshare": dict(engine="ort", precision="int8fix", n_buckets=4, share_weights=False),
    "ort_cuda_fp16_iobinding": dict(engine="ort_cuda", precision="fp16", n_buckets=4),
}
REFERENCE = "pytorch_eager_padded"
DEFAULT_ENGINES = ["pytorch_eager_padded", "pytorch_eager_buckets", "ort_fp32_padded", "ort_fp32_buckets",
                   "ort_int8_padded", "ort_int8_buckets", "ort_cuda_fp16_iobinding"]
#: engines per shape for ``--engines auto`` (roberta-large: the essentials, its PyTorch calls take 10-30 s)
AUTO_ENGINES = {
    "splade-tiny": DEFAULT_ENGINES,
    "roberta-base": DEFAULT_ENGINES + ["ort_int8_buckets_noshare"],
    "roberta-large": ["pytorch_eager_padded", "ort_fp32_buckets", "ort_int8_buckets", "ort_cuda_fp16_iobinding"],
}

#: iteration plan per shape: (warm-up calls, min timed, max timed, seconds of timed calls per cell)
PLAN = {
    "splade-tiny": (5, 30, 300, 3.0),
    "roberta-base": (1, 3, 30, 15.0),
    "roberta-large": (1, 2, 10, 20.0),
}


# ---------------------------------------------------------------- one cell (child process)


def _torch_runner(cell: dict, model_dir: Path, enc, verb, prompt: np.ndarray):
    import torch

    from cliptune_export.exporter import ExportOptions, _load, draw_masks
    from cliptune_export.wrapper import ContractModel, dropout_sites
    from cliptune_ort.encoding import buckets
    from cliptune_ort.manifest import load_manifest

    manifest = load_manifest(model_dir)
    model, extra = harness.model_source(cell["shape"])
    mlm, _tok, arch = _load(model, ExportOptions(**extra))  # the export's own loader: same random init
    g = manifest.data["graphs"][cell["graph"]]
    masks = None
    if g["kind"] == "thinned":
        names = [s[0] for s in dropout_sites(mlm, arch)]
        masks = {k: torch.from_numpy(v) for k, v in draw_masks(names, manifest.hidden, g["p"], g["mask_seed"]).items()}
    wrapped = ContractModel(mlm, arch, masks, fold_masks=bool(manifest.data.get("masks_folded"))).eval()
    parts = []
    for idx, sub in buckets(enc, cell["n_buckets"]):
        parts.append((idx, tuple(torch.from_numpy(np.ascontiguousarray(a))
                                 for a in (sub.ids, sub.attention_mask, sub.mask_pos))))
    p_t = torch.from_numpy(prompt)
    v_t = torch.from_numpy(verb)
    out = np.empty((prompt.shape[0], len(enc), len(verb)), dtype=np.float32)

    def call():
        with torch.inference_mode():
            for idx, (ids, am, mp) in parts:
                out[:, idx] = wrapped(ids, am, mp, p_t, v_t).numpy()
        return out

    info = {"provider": "pytorch-eager-cpu", "torch_threads": torch.get_num_threads(),
            "torch_interop_threads": torch.get_num_interop_threads()}
    return call, info


def _ort_runner(cell: dict, model_dir: Path, enc, verb, prompt: np.ndarray):
    from cliptune_ort.engine import Engine
    from cliptune_ort.manifest import load_manifest

    manifest = load_manifest(model_dir)
    eng = Engine(manifest, [cell["graph"]], device="cpu", threads=cell.get("threads", 0),
                 workers=cell.get("workers", 0), share_weights=cell.get("share_weights", True))
    batch = eng.prepare(enc, cell["n_buckets"])
    g = cell["graph"]

    def call():
        return eng.logits(g, prompt, batch, verb)

    info = {"provider": eng.provider, "workers": eng.workers,
            "threads_per_run": eng.sessions[g].get_session_options().intra_op_num_threads,
            "share_weights": cell.get("share_weights", True), "padded_fraction": round(batch.padded_fraction, 4)}
    return call, info


def _cuda_runner(cell: dict, model_dir: Path, enc, verb, prompt: np.ndarray):
    """fp16 graph on the CUDA provider; every input bound on the device once, the output copied back."""
    import onnxruntime as ort

    from cliptune_ort.encoding import buckets
    from cliptune_ort.manifest import load_manifest
    from cliptune_ort.sessions import SessionSpec, SharedWeights, make_session

    manifest = load_manifest(model_dir)
    sess = make_session(manifest.graph_path(cell["graph"]), SessionSpec(device="cuda"), SharedWeights(manifest))
    pe = next(i for i in sess.get_inputs() if i.name == "prompt_embeds")
    p_dtype = np.float16 if pe.type == "tensor(float16)" else np.float32
    binds = []
    for idx, sub in buckets(enc, cell["n_buckets"]):
        b = sess.io_binding()
        feeds = {"input_ids": sub.ids, "attention_mask": sub.attention_mask, "mask_pos": sub.mask_pos,
                 "prompt_embeds": prompt.astype(p_dtype), "verbalizer_ids": verb}
        vals = {k: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(v), "cuda", 0) for k, v in feeds.items()}
        for k, v in vals.items():
            b.bind_ortvalue_input(k, v)
        b.bind_output("logits", "cuda", 0)
        binds.append((idx, b, vals))
    out = np.empty((prompt.shape[0], len(enc), len(verb)), dtype=np.float32)

    def call():
        for idx, b, _vals in binds:
            sess.run_with_iobinding(b)
            out[:, idx] = b.copy_outputs_to_cpu()[0]
        return out

    return call, {"provider": sess.get_providers()[0], "iobinding": True}


def run_cell(cell: dict) -> dict:
    """Build the engine for one cell, time it, return the summary (and save its logits)."""
    t0 = time.perf_counter()
    from cliptune_ort.encoding import Encoded
    from cliptune_ort.manifest import load_manifest

    model_dir = Path(cell["model_dir"])
    manifest = load_manifest(model_dir)
    data = np.load(cell["inputs"])  # tokenised by the parent: no dataset is loaded in the timed process
    enc = Encoded(data["ids"], data["attention_mask"], data["mask_pos"], data["labels"], data["lengths"], 0)
    enc.min_seq = int(data["min_seq"])
    verb = data["verbalizer_ids"]
    rng = np.random.default_rng(0)
    prompt = (rng.standard_normal((cell["pop"], manifest.n_prompt, manifest.hidden)) * manifest.embedding_std
              ).astype(np.float32)
    make = {"torch": _torch_runner, "ort": _ort_runner, "ort_cuda": _cuda_runner}[cell["engine"]]
    rss0 = harness.rss_mb()
    call, info = make(cell, model_dir, enc, verb, prompt)
    setup_s = time.perf_counter() - t0
    samples = harness.time_calls(call, warmup=cell["warmup"], min_iters=cell["min_iters"],
                                 max_iters=cell["max_iters"], max_seconds=cell["max_seconds"])
    logits = np.array(call(), copy=True)
    if cell.get("save_logits"):
        np.save(cell["save_logits"], logits)
    res = {**{k: cell[k] for k in ("shape", "task", "engine_name", "precision", "n_buckets")},
           **info, **harness.summarize(samples, items_per_call=len(enc) * cell["pop"]),
           "samples_ms": [round(s * 1e3, 3) for s in samples], "setup_s": round(setup_s, 2),
           "rss_before_engine_mb": rss0, "rss_mb": harness.rss_mb(), "peak_rss_mb": harness.peak_rss_mb(),
           "load_average_end": harness.load_average()}
    return res


# ---------------------------------------------------------------- the driver


def export_k(shape: str, precision: str) -> int:
    """Thinned graphs per export: K=4 where memory.py / tune_time.py reuse the export, else 1 (graph 1 is timed)."""
    return 4 if shape == "splade-tiny" or (shape == "roberta-base" and precision == "fp32") else 1


def padded_fractions(model_dir: Path, task: str, seed: int, save: Path) -> dict:
    """Padding statistics of the task's few-shot train set; its tokenised arrays are saved to ``save``."""
    from cliptune_ort.encoding import buckets, padded_fraction

    enc, verb, _ = harness.fewshot_batch(model_dir, task, seed)
    np.savez(save, ids=enc.ids, attention_mask=enc.attention_mask, mask_pos=enc.mask_pos, labels=enc.labels,
             lengths=enc.lengths, min_seq=enc.min_seq, verbalizer_ids=verb)
    out = harness.length_stats(enc)
    for nb in (1, 2, 4, 8):
        out[f"padded_fraction_b{nb}"] = round(padded_fraction(buckets(enc, nb)), 4)
    # computed token positions per pass (what the GEMMs see), padded vs 4 buckets
    out["positions_b1"] = int(sum(s.ids.size for _, s in buckets(enc, 1)))
    out["positions_b4"] = int(sum(s.ids.size for _, s in buckets(enc, 4)))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default=",".join(harness.SHAPES))
    ap.add_argument("--tasks", default="sst2,rte")
    ap.add_argument("--engines", default="auto",
                    help=f"comma-separated, from {', '.join(ENGINES)}; auto = a set per shape (AUTO_ENGINES)")
    ap.add_argument("--extra-engines", default="", help="added to every shape's set (e.g. ort_int8fix_buckets)")
    ap.add_argument("--seed", type=int, default=42, help="few-shot sample seed (BBT protocol)")
    ap.add_argument("--pop", type=int, default=1, help="candidates per call (1: the CPU engine's default)")
    ap.add_argument("--scale", type=float, default=1.0, help="multiply the iteration plan (0.2 = a quick look)")
    ap.add_argument("--out", default="latency", help="results/<out>.json and .md")
    ap.add_argument("--max-load", type=float, default=1.5, help="wait for the 1-min load average to drop below this")
    ap.add_argument("--no-wait", action="store_true")
    ap.add_argument("--dirs", default="{}", help='JSON {"shape/precision": model dir} to time other exports '
                    '(e.g. an int8 export made with other quantisation settings)')
    ap.add_argument("--cell", help=argparse.SUPPRESS)  # internal: run one cell (JSON) and print its result
    a = ap.parse_args(argv)
    if a.cell:
        print(json.dumps(run_cell(json.loads(a.cell))))
        return 0

    import onnxruntime as ort

    shapes = [s for s in a.shapes.split(",") if s]
    tasks = [t for t in a.tasks.split(",") if t]
    extra = [e for e in a.extra_engines.split(",") if e]
    per_shape = {sh: list(AUTO_ENGINES[sh]) if a.engines == "auto" else [e for e in a.engines.split(",") if e]
                 for sh in shapes}
    have_cuda = "CUDAExecutionProvider" in ort.get_available_providers()
    skipped = []
    for sh in shapes:
        per_shape[sh] += [e for e in extra if e not in per_shape[sh]]
        for e in per_shape[sh]:
            if e not in ENGINES:
                ap.error(f"unknown engine {e!r}: expected one of {', '.join(ENGINES)}")
        if not have_cuda and "ort_cuda_fp16_iobinding" in per_shape[sh]:
            per_shape[sh].remove("ort_cuda_fp16_iobinding")
            msg = ("ort_cuda_fp16_iobinding: no CUDAExecutionProvider in this onnxruntime "
                   f"({', '.join(ort.get_available_providers())})")
            if msg not in skipped:
                skipped.append(msg)
    # exports first (cached), so no export runs while anything is timed
    dirs = {tuple(k.split("/")): Path(v) for k, v in json.loads(a.dirs).items()}
    for shape in shapes:
        for prec in ["fp32"] + sorted({ENGINES[e]["precision"] for e in per_shape[shape]} - {"fp32"}):
            if (shape, prec) not in dirs:
                dirs[(shape, prec)] = harness.export_dir(shape, k=export_k(shape, prec), precision=prec)
    quiet = harness.wait_for_quiet(a.max_load, enabled=not a.no_wait)
    payload = {"benchmark": "latency", "machine": harness.machine_info(), "versions": harness.versions(torch=True),
               "wait": quiet, "seed": a.seed, "pop": a.pop, "graph": 1,
               "what": "one call = one candidate prompt on the task's whole few-shot train set (32 examples)",
               "skipped": skipped, "model_dirs": {f"{k[0]}/{k[1]}": str(v) for k, v in dirs.items()},
               "padding": {}, "cells": []}
    tmp = Path(tempfile.mkdtemp(prefix="cliptune_latency_"))
    t_start = time.perf_counter()
    for shape in shapes:
        warmup, min_it, max_it, max_s = PLAN[shape]
        for task in tasks:
            inputs = tmp / f"{shape}_{task}_inputs.npz"
            payload["padding"][f"{shape}/{task}"] = padded_fractions(dirs[(shape, "fp32")], task, a.seed, inputs)
            ref_logits = None
            for e in per_shape[shape]:
                spec = ENGINES[e]
                cell = {**spec, "engine_name": e, "shape": shape, "task": task, "seed": a.seed, "pop": a.pop,
                        "graph": 1, "model_dir": str(dirs[(shape, spec["precision"])]), "inputs": str(inputs),
                        "warmup": warmup, "min_iters": max(2, round(min_it * min(1.0, a.scale))),
                        "max_iters": max(2, round(max_it * a.scale)), "max_seconds": max_s * a.scale,
                        "save_logits": str(tmp / f"{shape}_{task}_{e}.npy")}
                print(f"[latency] {shape} {task} {e} ...", file=sys.stderr, flush=True)
                try:
                    res = harness.run_json_subprocess([__file__, "--cell", json.dumps(cell)])
                except RuntimeError as err:
                    print(f"[latency]   failed: {err}", file=sys.stderr, flush=True)
                    payload["cells"].append({"shape": shape, "task": task, "engine_name": e, "error": str(err)[-500:]})
                    continue
                logits = np.load(cell["save_logits"])
                if e == REFERENCE:
                    ref_logits = logits
                if ref_logits is not None:
                    d = logits - ref_logits
                    res["max_abs_diff_vs_pytorch"] = float(np.max(np.abs(d)))
                    res["rel_rms_diff_vs_pytorch"] = float(np.sqrt(np.mean(d ** 2)) / max(np.sqrt(np.mean(ref_logits ** 2)), 1e-12))
                payload["cells"].append(res)
                print(f"[latency]   p50 {res['p50_ms']:.1f} ms p99 {res['p99_ms']:.1f} ms (n={res['n']}) "
                      f"{res['provider']} peak RSS {res['peak_rss_mb']:.0f} MB", file=sys.stderr, flush=True)
    payload["total_seconds"] = round(time.perf_counter() - t_start, 1)
    payload["load_end"] = harness.load_average()
    add_ratios(payload)
    write(payload, a.out)
    return 0


def add_ratios(payload: dict) -> None:
    """speedup_vs_pytorch = p50(PyTorch eager padded) / p50(engine), same shape and task, same run."""
    ref = {(c["shape"], c["task"]): c for c in payload["cells"] if c.get("engine_name") == REFERENCE and "p50_ms" in c}
    for c in payload["cells"]:
        r = ref.get((c.get("shape"), c.get("task")))
        if r is not None and "p50_ms" in c:
            c["speedup_vs_pytorch_p50"] = round(r["p50_ms"] / c["p50_ms"], 3)
            c["speedup_vs_pytorch_mean"] = round(r["mean_ms"] / c["mean_ms"], 3)


TARGETS = [
    ("roberta-base", "sst2", "ort_fp32_buckets", 1.4, "SST-2 pass, roberta-base: ORT fp32 + buckets >= 1.4x PyTorch eager padded"),
    ("roberta-base", "sst2", "ort_int8_buckets", 4.0, "SST-2 pass, roberta-base: ORT int8 + buckets >= 4x PyTorch eager padded"),
    ("splade-tiny", "sst2", "ort_fp32_buckets", 1.5, "splade-tiny call >= 1.5x faster than PyTorch eager"),
    ("roberta-base", "sst2", "ort_int8fix_buckets", 4.0, "(current int8 recipe) roberta-base SST-2: int8 + buckets >= 4x"),
    ("roberta-base", "sst2", "ort_int8fix_buckets_noshare", 4.0,
     "(current int8 recipe, prepacked weights) roberta-base SST-2: int8 + buckets >= 4x"),
]


def write(payload: dict, out: str) -> None:
    targets = []
    run_shapes = {c.get("shape") for c in payload["cells"]}
    for shape, task, eng, want, text in TARGETS:
        if shape not in run_shapes:  # a partial run (--shapes): its targets belong to another file
            continue
        c = next((c for c in payload["cells"] if (c.get("shape"), c.get("task"), c.get("engine_name")) == (shape, task, eng)), None)
        got = c.get("speedup_vs_pytorch_p50") if c else None
        targets.append({"target": text, "want": want, "got": got, "met": bool(got is not None and got >= want)})
    payload["targets"] = targets
    harness.write_json(harness.results_path(f"{out}.json"), payload)
    rows = [c for c in payload["cells"] if "p50_ms" in c]
    for c in rows:
        c["pad"] = payload["padding"][f"{c['shape']}/{c['task']}"][f"padded_fraction_b{c['n_buckets']}"]
        c["diff"] = (f"{c['rel_rms_diff_vs_pytorch']:.1e} rel" if str(c.get("precision")).startswith("int8")
                     else f"{c['max_abs_diff_vs_pytorch']:.1e}" if "max_abs_diff_vs_pytorch" in c else "-")
    table = harness.markdown_table(rows, [
        ("shape", "shape"), ("task", "task"), ("engine_name", "engine"), ("provider", "provider that ran"),
        ("pad", "padded frac.", 3), ("n", "n"), ("p50_ms", "p50 ms"), ("p90_ms", "p90 ms"), ("p99_ms", "p99 ms"),
        ("examples_per_s", "examples/s"), ("speedup_vs_pytorch_p50", "x PyTorch (p50)"), ("peak_rss_mb", "peak RSS MB", 0),
        ("rss_before_engine_mb", "RSS before engine MB", 0), ("diff", "logits vs PyTorch")])
    pad_rows = [{"key": k, **v} for k, v in payload["padding"].items()]
    pad_table = harness.markdown_table(pad_rows, [
        ("key", "shape/task"), ("n", "examples"), ("mean_len", "mean len"), ("max_len", "max len"),
        ("padded_fraction_b1", "padded frac. 1 batch", 3), ("padded_fraction_b2", "2 buckets", 3),
        ("padded_fraction_b4", "4 buckets", 3), ("padded_fraction_b8", "8 buckets", 3),
        ("positions_b1", "positions/pass padded"), ("positions_b4", "positions/pass 4 buckets")])
    tgt = "\n".join(f"- {'MET' if t['met'] else 'NOT MET'}: {t['target']} (measured "
                    f"{str(t['got']) + 'x' if t['got'] is not None else 'nothing: cell not run'})" for t in targets)
    notes = (f"One call = one candidate prompt (pop={payload['pop']}) on the whole 32-example few-shot train "
             f"set (seed {payload['seed']}), thinned graph 1. Ratios are p50(PyTorch eager padded) / p50(engine) "
             f"from this one run. Every cell ran in a fresh process; peak RSS is that process's. "
             f"Skipped: {'; '.join(payload['skipped']) or 'none'}. Total {payload['total_seconds']} s."
             + (f" Note: {payload['note']}" if payload.get("note") else ""))
    harness.write_markdown(harness.results_path(f"{out}.md"), "Latency: one train-set pass per call", payload,
                           [("", notes), ("Results", table), ("Targets", tgt), ("Padding (no wasted tokens)", pad_table)])


if __name__ == "__main__":
    raise SystemExit(main())
