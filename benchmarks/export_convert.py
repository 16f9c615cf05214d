"""The fp16 export's conversion step (ORT's transformer fusions + float16 conversion), ORT's own path against
the exporter's (``cliptune_export.exporter._faster_fp16_conversion``), on one traced graph of a RoBERTa shape.

The graph is the export's fp32 trace of graph 0 (random weights: the time is a property of the shape), written
once; each repeat converts a fresh copy of it in a fresh process, alternating the two paths, and checks that
both wrote the same bytes (sha256). Results: seconds per conversion (p50/p90/p99 over the repeats), the sha256
of each path's output, and whether they match.

    python benchmarks/export_convert.py                            # roberta-large, 2 repeats each
    python benchmarks/export_convert.py --shape roberta-base --repeats 3
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import harness

PATHS = ("ort", "cliptune")
#: the benchmark's shapes, and a tiny one for the test that keeps this script from rotting
SHAPES = {**harness.ROBERTA_SHAPES,
          "tiny": {"hidden_size": 64, "num_hidden_layers": 3, "num_attention_heads": 4, "intermediate_size": 128}}

TRACE = r"""
import json, sys
import numpy as np, torch
from transformers import AutoModelForMaskedLM
import cliptune_export.exporter as ex
from cliptune_export.wrapper import ARCHS, ContractModel
a = json.loads(sys.argv[1])
sys.path.insert(0, a["benchmarks"])
import harness
torch.manual_seed(0)
cfg = harness.roberta_config(a["shape"])
mlm = AutoModelForMaskedLM.from_config(cfg, attn_implementation="eager").eval()
d = ex._dummy_inputs(np.random.default_rng(0), 2, 2, 58, 50, cfg.hidden_size, cfg.vocab_size, cfg.pad_token_id,
                     0.02, 2)
args = tuple(torch.from_numpy(d[n]) for n in ("input_ids", "attention_mask", "mask_pos", "prompt_embeds",
                                                "verbalizer_ids"))
ex.trace_graph(ContractModel(mlm, ARCHS[cfg.model_type], None).eval(), args, a["out"], 17)
print(json.dumps({"heads": cfg.num_attention_heads, "hidden": cfg.hidden_size}))
"""

CONVERT = r"""
import contextlib, json, sys, time
import cliptune_export.exporter as ex
a = json.loads(sys.argv[1])
if a["path"] == "ort":
    ex._faster_fp16_conversion = contextlib.nullcontext
t = time.perf_counter()
ex.convert_precision(__import__("pathlib").Path(a["graph"]), "fp16", a["heads"], a["hidden"])
print(json.dumps({"seconds": time.perf_counter() - t}))
"""


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="roberta-large", choices=sorted(SHAPES))
    ap.add_argument("--repeats", type=int, default=2, help="conversions per path")
    ap.add_argument("--out", default=str(harness.results_path("export_convert")))
    ap.add_argument("--max-load", type=float, default=1.5)
    ap.add_argument("--no-wait", action="store_true")
    args = ap.parse_args(argv)

    wait = None if args.no_wait else harness.wait_for_quiet(args.max_load)
    work = harness.bench_cache() / "export_convert" / args.shape
    base = work / "fp32" / "graph.onnx"
    if not (work / "fp32" / "dims.json").is_file():
        shutil.rmtree(work / "fp32", ignore_errors=True)
        base.parent.mkdir(parents=True)
        dims = harness.run_json_subprocess(["-c", TRACE, json.dumps(
            {"shape": SHAPES[args.shape], "out": str(base), "benchmarks": str(Path(__file__).resolve().parent)})])
        (work / "fp32" / "dims.json").write_text(json.dumps(dims))
    dims = json.loads((work / "fp32" / "dims.json").read_text())
    load0 = harness.load_average()
    seconds: dict[str, list[float]] = {p: [] for p in PATHS}
    digests: dict[str, set[str]] = {p: set() for p in PATHS}
    for r in range(args.repeats):
        for path in PATHS:
            d = work / path
            shutil.rmtree(d, ignore_errors=True)
            shutil.copytree(base.parent, d)
            res = harness.run_json_subprocess(["-c", CONVERT, json.dumps(
                {"path": path, "graph": str(d / "graph.onnx"), **dims})])
            seconds[path].append(res["seconds"])
            digests[path].add(sha256(d / "graph.onnx"))
            print(f"repeat {r + 1}, {path}: {res['seconds']:.1f} s", flush=True)
    rows = [{"path": p, **harness.summarize(seconds[p]), "sha256": sorted(digests[p])} for p in PATHS]
    same = len(digests["ort"]) == 1 and digests["ort"] == digests["cliptune"]
    payload = {"benchmark": "export_convert", "machine": harness.machine_info(),
               "versions": harness.versions(torch=True),
               "wait": wait, "load_average_start": load0, "load_average_end": harness.load_average(),
               "settings": {"shape": args.shape, "repeats": args.repeats, **dims}, "rows": rows,
               "same_bytes": same, "speedup_p50": round(rows[0]["p50_ms"] / rows[1]["p50_ms"], 2)}
    out = Path(args.out)
    harness.write_json(out.with_suffix(".json"), payload)
    cols = [("path", "conversion"), ("n", "n"), ("p50_ms", "p50 ms"), ("p90_ms", "p90 ms"), ("p99_ms", "p99 ms")]
    head = f"{args.shape}, graph 0 traced in fp32, converted in a fresh process per repeat; same bytes: {same}"
    harness.write_markdown(out.with_suffix(".md"), "fp16 conversion step of the export, ORT's path against cliptune's",
                           payload, [(head, harness.markdown_table(rows, cols))])
    print(f"same bytes: {same}; p50 {rows[0]['p50_ms'] / 1e3:.1f} s (ORT) against {rows[1]['p50_ms'] / 1e3:.1f} s; "
          f"wrote {out.with_suffix('.json')}", flush=True)
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
