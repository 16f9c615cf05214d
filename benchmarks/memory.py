"""Resident memory of the engine: the full graph alone vs the full graph + K=4 thinned sessions.

Each configuration runs in a fresh process that imports the runtime, loads the fixed inputs (the
real SST-2 few-shot train set, prepared by the parent into an .npz so the child never loads a
dataset), creates the sessions, runs one train-set pass through every graph (so weights are paged
in and activations allocated, as in a tune run) and reports:

- ``rss_base_mb``: RSS before any session exists (Python + numpy + onnxruntime imported, inputs loaded),
- ``rss_loaded_mb``: after the sessions are created,
- ``rss_after_calls_mb``: after one pass through every graph (the number the target is about),
- ``peak_rss_mb``: ``ru_maxrss`` of the process.

Configurations (random-weight roberta-base shape, fp32, K=4):

- ``engine_g0``: Engine(graphs=[0]) — the full network alone,
- ``engine_g0_k4``: Engine(graphs=[0..4]) — what a Clip-Tuning run holds (weights shared),
- ``engine_g0_noshare`` / ``engine_g0_k4_noshare``: the same with ``share_weights=False``,
- ``plain_ort_g0`` / ``plain_ort_g0_k4``: bare ``onnxruntime.InferenceSession`` per graph with default
  options (what a user gets without the package's session options).

Target: rss_after_calls(engine_g0_k4) <= 1.3 x rss_after_calls(engine_g0).

    python benchmarks/memory.py [--shape roberta-base] [--out memory]
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

CONFIGS = {
    "engine_g0": dict(kind="engine", graphs=[0], share=True),
    "engine_g0_k4": dict(kind="engine", graphs=[0, 1, 2, 3, 4], share=True),
    "engine_g0_noshare": dict(kind="engine", graphs=[0], share=False),
    "engine_g0_k4_noshare": dict(kind="engine", graphs=[0, 1, 2, 3, 4], share=False),
    "plain_ort_g0": dict(kind="plain", graphs=[0]),
    "plain_ort_g0_k4": dict(kind="plain", graphs=[0, 1, 2, 3, 4]),
    # int8 (the current recipe, "int8fix" export with K=1 in the bench cache): what keeping prepacking (no sharing) costs
    "int8_g0": dict(kind="engine", graphs=[0], share=True, precision="int8fix", k=1),
    "int8_g0_g1": dict(kind="engine", graphs=[0, 1], share=True, precision="int8fix", k=1),
    "int8_g0_g1_noshare": dict(kind="engine", graphs=[0, 1], share=False, precision="int8fix", k=1),
}
DEFAULT_CONFIGS = [c for c in CONFIGS if not c.startswith("int8")]


def run_config(spec: dict) -> dict:
    """Child process: sessions for ``spec``, one pass per graph, RSS at each step."""
    import onnxruntime as ort

    from cliptune_ort.encoding import Encoded
    from cliptune_ort.manifest import load_manifest

    data = np.load(spec["inputs"])
    enc = Encoded(data["ids"], data["attention_mask"], data["mask_pos"], data["labels"], data["lengths"], 0)
    enc.min_seq = int(data["min_seq"])
    verb = data["verbalizer_ids"]
    manifest = load_manifest(spec["model_dir"])
    prompt = (np.random.default_rng(0).standard_normal((1, manifest.n_prompt, manifest.hidden))
              * manifest.embedding_std).astype(np.float32)
    gc.collect()
    out = {"rss_base_mb": harness.rss_mb()}
    t0 = time.perf_counter()
    if spec["kind"] == "engine":
        from cliptune_ort.engine import Engine

        eng = Engine(manifest, spec["graphs"], device="cpu", share_weights=spec["share"])
        batch = eng.prepare(enc, 4)
        out["provider"] = eng.provider
        out["load_s"] = round(time.perf_counter() - t0, 2)
        out["rss_loaded_mb"] = harness.rss_mb()
        t1 = time.perf_counter()
        for g in spec["graphs"]:
            eng.logits(g, prompt, batch, verb)
    else:
        so = ort.SessionOptions()
        so.log_severity_level = 3
        sessions = {g: ort.InferenceSession(str(manifest.graph_path(g)), so, providers=["CPUExecutionProvider"])
                    for g in spec["graphs"]}
        out["provider"] = next(iter(sessions.values())).get_providers()[0]
        out["load_s"] = round(time.perf_counter() - t0, 2)
        out["rss_loaded_mb"] = harness.rss_mb()
        t1 = time.perf_counter()
        feeds = {"input_ids": enc.ids, "attention_mask": enc.attention_mask, "mask_pos": enc.mask_pos,
                 "prompt_embeds": prompt, "verbalizer_ids": verb}
        for g, s in sessions.items():
            s.run(["logits"], feeds)
    out["calls_s"] = round(time.perf_counter() - t1, 2)
    out["rss_after_calls_mb"] = harness.rss_mb()
    out["peak_rss_mb"] = harness.peak_rss_mb()
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="roberta-base")
    ap.add_argument("--task", default="sst2")
    ap.add_argument("--configs", default=",".join(DEFAULT_CONFIGS), help=f"from {', '.join(CONFIGS)}")
    ap.add_argument("--out", default="memory")
    ap.add_argument("--max-load", type=float, default=1.5)
    ap.add_argument("--no-wait", action="store_true")
    ap.add_argument("--config", help=argparse.SUPPRESS)  # internal: one configuration (JSON)
    a = ap.parse_args(argv)
    if a.config:
        print(json.dumps(run_config(json.loads(a.config))))
        return 0
    model_dir = harness.export_dir(a.shape, k=4, precision="fp32")
    enc, verb, manifest = harness.fewshot_batch(model_dir, a.task)
    tmp = Path(tempfile.mkdtemp(prefix="cliptune_memory_"))
    inputs = tmp / "inputs.npz"
    np.savez(inputs, ids=enc.ids, attention_mask=enc.attention_mask, mask_pos=enc.mask_pos, labels=enc.labels,
             lengths=enc.lengths, min_seq=enc.min_seq, verbalizer_ids=verb)
    quiet = harness.wait_for_quiet(a.max_load, enabled=not a.no_wait)
    weights_mb = round((model_dir / "weights.bin").stat().st_size / 2**20, 1)
    payload = {"benchmark": "memory", "machine": harness.machine_info(), "versions": harness.versions(),
               "wait": quiet, "shape": a.shape, "task": a.task, "model_dir": str(model_dir),
               "weights_bin_mb": weights_mb, "inputs": harness.length_stats(enc), "configs": {}}
    for name in [c for c in a.configs.split(",") if c]:
        cdir = model_dir
        if "precision" in CONFIGS[name]:
            cdir = harness.export_dir(a.shape, k=CONFIGS[name]["k"], precision=CONFIGS[name]["precision"])
        spec = {**CONFIGS[name], "model_dir": str(cdir), "inputs": str(inputs)}
        print(f"[memory] {name} ...", file=sys.stderr, flush=True)
        res = harness.run_json_subprocess([__file__, "--config", json.dumps(spec)])
        res["engine_mb"] = round(res["rss_after_calls_mb"] - res["rss_base_mb"], 1)
        payload["configs"][name] = {**CONFIGS[name], **res}
        print(f"[memory]   RSS after calls {res['rss_after_calls_mb']:.0f} MB (base {res['rss_base_mb']:.0f}, "
              f"peak {res['peak_rss_mb']:.0f})", file=sys.stderr, flush=True)
    c = payload["configs"]
    ratios = {}
    if "engine_g0" in c and "engine_g0_k4" in c:
        ratios["k4_over_g0_rss"] = round(c["engine_g0_k4"]["rss_after_calls_mb"] / c["engine_g0"]["rss_after_calls_mb"], 3)
        ratios["k4_over_g0_peak"] = round(c["engine_g0_k4"]["peak_rss_mb"] / c["engine_g0"]["peak_rss_mb"], 3)
        ratios["k4_over_g0_engine_only"] = round(c["engine_g0_k4"]["engine_mb"] / c["engine_g0"]["engine_mb"], 3)
        payload["target"] = {"target": "RSS with K=4 thinned + full <= 1.3x the full one alone", "want": 1.3,
                             "got": ratios["k4_over_g0_rss"], "met": ratios["k4_over_g0_rss"] <= 1.3}
    if "engine_g0_k4_noshare" in c and "engine_g0_k4" in c:
        ratios["sharing_saves_mb"] = round(c["engine_g0_k4_noshare"]["rss_after_calls_mb"]
                                           - c["engine_g0_k4"]["rss_after_calls_mb"], 1)
        ratios["noshare_k4_over_g0"] = round(c["engine_g0_k4_noshare"]["rss_after_calls_mb"]
                                             / c["engine_g0_noshare"]["rss_after_calls_mb"], 3) if "engine_g0_noshare" in c else None
    if "int8_g0_g1" in c and "int8_g0_g1_noshare" in c:
        ratios["int8_prepack_noshare_extra_mb_2_graphs"] = round(c["int8_g0_g1_noshare"]["rss_after_calls_mb"]
                                                                 - c["int8_g0_g1"]["rss_after_calls_mb"], 1)
    payload["ratios"] = ratios
    payload["load_end"] = harness.load_average()
    harness.write_json(harness.results_path(f"{a.out}.json"), payload)
    rows = [{"config": k, **v, "graphs": ",".join(map(str, v["graphs"]))} for k, v in c.items()]
    table = harness.markdown_table(rows, [
        ("config", "configuration"), ("graphs", "graphs"), ("provider", "provider that ran"),
        ("rss_base_mb", "RSS before sessions MB"), ("rss_loaded_mb", "after load MB"),
        ("rss_after_calls_mb", "after 1 pass/graph MB"), ("peak_rss_mb", "peak MB"), ("engine_mb", "engine MB"),
        ("load_s", "load s")])
    t = payload.get("target")
    lines = [f"- {k}: {v}" for k, v in ratios.items()]
    if t:
        lines.insert(0, f"- {'MET' if t['met'] else 'NOT MET'}: {t['target']} (measured {t['got']}x)")
    notes = (f"{a.shape} shape (random weights), fp32, weights.bin {weights_mb} MB; inputs: the real {a.task} "
             f"few-shot train set ({payload['inputs']['n']} examples, 4 length buckets), one candidate. Every "
             "configuration ran in a fresh process; 'engine MB' = RSS after one pass per graph minus RSS before "
             "any session.")
    harness.write_markdown(harness.results_path(f"{a.out}.md"), "Memory: full graph vs full + K=4 thinned",
                           payload, [("", notes), ("Results", table), ("Ratios", "\n".join(lines))])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
