#!/usr/bin/env python3
"""cliptune's FusedDense op against ONNX Runtime's own ops, one projection of one stacked call.

The packed fp16 graphs of the roberta-large shape run, per layer, the feed-forward up-projection as
``MatMul -> BiasGelu`` and the flash kernel's query projection as ``MatMul -> Add``; ``--packed-ffn
cublaslt`` runs each as one ``ai.cliptune.FusedDense`` (cuBLASLt's GELU_BIAS / BIAS epilogue). This
times both forms on the tokens of one stacked call (X [45,400, 1024] fp16: 20 candidates x the 32 SST-2
examples, packed), with IOBinding (input and output on the device) and with CUDA graphs, and checks the
fused output against ORT's (max |difference|; the GELUs differ by < 5e-4 before fp16 rounding) and
against a float64 numpy reference on a slice of rows.

    python benchmarks/cuda_run.py benchmarks/fused_dense.py --out DIR     (GPU; CLIPTUNE_OPS_DIR set)
    python benchmarks/fused_dense.py --cpu-dry-run --out DIR               (CPU build, float32, small)

Writes ``DIR/fused_dense_<device>[_<tag>].json`` (p50/p90/p99 per case, the providers that ran, parity).
Cases: the feed-forward up-projection (bias + GELU), the query projection (bias) and the feed-forward
down-projection (no bias), each as ORT's ops, as FusedDense, and as FusedDense timing up to 16 of cuBLASLt's
candidate algorithms on its first call ("tuned"; $CLIPTUNE_FUSED_DENSE_ALGOS). Also the one QKV projection of the
``short_qkv`` layouts ([hidden, 3 hidden]) with its bias [query bias, 0, 0] and without one (``qkv_plain``):
``qkv_bias_cost_ms_p50`` is what the bias epilogue costs there over ORT's plain MatMul, the most that adding
the query bias inside the attention kernel could save. ``--cases`` picks projections.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def graph(kind: str, k: int, n: int, w, b, fp16: bool):
    """kind: ort_gelu (MatMul -> BiasGelu), lt_gelu (FusedDense gelu_tanh), ort_bias (MatMul -> Add),
    lt_bias (FusedDense none), ort_plain (MatMul alone; ``b`` unused), lt_plain (FusedDense none: pass zeros)."""
    from onnx import TensorProto, helper, numpy_helper

    et = TensorProto.FLOAT16 if fp16 else TensorProto.FLOAT
    if kind == "ort_gelu":
        nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]),
                 helper.make_node("BiasGelu", ["h", "b"], ["y"], domain="com.microsoft")]
    elif kind == "ort_bias":
        nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Add", ["h", "b"], ["y"])]
    elif kind == "ort_plain":
        nodes = [helper.make_node("MatMul", ["x", "w"], ["y"])]
    else:
        nodes = [helper.make_node("FusedDense", ["x", "w", "b"], ["y"], domain="ai.cliptune",
                                  activation="gelu_tanh" if kind == "lt_gelu" else "none")]
    g = helper.make_graph(nodes, kind, [helper.make_tensor_value_info("x", et, ["tokens", k])],
                          [helper.make_tensor_value_info("y", et, ["tokens", n])],
                          [numpy_helper.from_array(w, "w")] + ([numpy_helper.from_array(b, "b")] if kind != "ort_plain" else []))
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1),
                                            helper.make_opsetid("ai.cliptune", 1)])
    m.ir_version = 9  # newer onnx writes IR versions older runtimes refuse
    return m


def session(model, device: str, cuda_graph: bool):
    import onnxruntime as ort

    from cliptune_ort import native

    so = ort.SessionOptions()
    so.log_severity_level = 3
    if "FusedDense" in {n.op_type for n in model.graph.node}:
        native.register(so, "cuda" if device == "cuda" else "cpu")
    if device == "cuda":
        opts = {"device_id": 0, **({"enable_cuda_graph": "1"} if cuda_graph else {})}
        providers = [("CUDAExecutionProvider", opts), "CPUExecutionProvider"]
    else:
        providers = ["CPUExecutionProvider"]
    s = ort.InferenceSession(model.SerializeToString(), so, providers=providers)
    want = "CUDAExecutionProvider" if device == "cuda" else "CPUExecutionProvider"
    if s.get_providers()[0] != want:
        raise SystemExit(f"asked for {want}, ONNX Runtime runs {s.get_providers()[0]}")
    return s


def time_case(sess, x, n: int, device: str, iters: int, warmup: int):
    """p50/p90/p99 ms of run_with_iobinding (output bound on the device: no copy back), and the output."""
    import onnxruntime as ort

    dev = "cuda" if device == "cuda" else "cpu"
    xv = ort.OrtValue.ortvalue_from_numpy(x, dev, 0)
    yv = ort.OrtValue.ortvalue_from_shape_and_type((x.shape[0], n), x.dtype, dev, 0)
    bind = sess.io_binding()
    bind.bind_ortvalue_input("x", xv)
    bind.bind_ortvalue_output("y", yv)
    for _ in range(warmup):
        sess.run_with_iobinding(bind)  # synchronises the provider's stream at the end
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        sess.run_with_iobinding(bind)
        times.append((time.perf_counter() - t) * 1e3)
    q = np.percentile(times, [50, 90, 99])
    return {"p50_ms": round(float(q[0]), 3), "p90_ms": round(float(q[1]), 3), "p99_ms": round(float(q[2]), 3),
            "n": iters}, yv.numpy()


def reference(x, w, b, gelu: bool):
    y = x.astype(np.float64) @ w.astype(np.float64) + b.astype(np.float64)
    if gelu:
        y = 0.5 * y * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (y + 0.044715 * y ** 3)))
    return y


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="results folder")
    ap.add_argument("--cpu-dry-run", action="store_true", help="CPU build of the op, float32, small sizes")
    ap.add_argument("--tokens", type=int, default=0, help="rows of X (default 45,400; dry run 300)")
    ap.add_argument("--iters", type=int, default=0, help="timed runs per case (default 50; dry run 3)")
    ap.add_argument("--tag", default="", help="suffix of the result file (fused_dense_<device>_<tag>.json)")
    ap.add_argument("--cases", default="", help=f"comma list of projections (default: all of {', '.join(PROJECTIONS)})")
    a = ap.parse_args(argv)
    cpu = a.cpu_dry_run
    picked = [c.strip() for c in a.cases.split(",") if c.strip()] or list(PROJECTIONS)
    if set(picked) - set(PROJECTIONS):
        raise SystemExit(f"--cases: unknown {sorted(set(picked) - set(PROJECTIONS))}; known: {', '.join(PROJECTIONS)}")
    name = "cpu-dry-run"
    if not cpu:
        try:
            import torch

            name = torch.cuda.get_device_name(0)
        except Exception:  # noqa: BLE001 - the name is informational
            name = "cuda"
    out = measure(picked, "cpu" if cpu else "cuda", a.tokens, a.iters, name)
    os.makedirs(a.out, exist_ok=True)
    slug = "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")
    path = Path(a.out) / (f"fused_dense_{slug}" + (f"_{a.tag}" if a.tag else "") + ".json")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(out, indent=1))
    os.replace(tmp, path)
    print(f"[fused_dense] wrote {path}: {json.dumps({k: v for k, v in out.items() if k.endswith('_ms_p50')})}",
          flush=True)
    return 1 if out["errors"] else 0


#: the projections of a packed layer, by name: (input width, output width, kind) in units of (hidden, ffn):
#: feed-forward up (bias + GELU), query (bias), feed-forward down (no bias: SkipLayerNormalization adds it;
#: FusedDense gets zeros), the one QKV projection of the short_qkv layouts (bias [query bias, 0, 0]) and the
#: same without a bias (ORT's MatMul alone; FusedDense with zeros)
PROJECTIONS = {"ffn_up": ("hidden", "ffn", "gelu"), "query": ("hidden", "hidden", "bias"),
               "ffn_down": ("ffn", "hidden", "plain"), "qkv": ("hidden", "3hidden", "bias"),
               "qkv_plain": ("hidden", "3hidden", "plain")}


def measure(projections, device: str, tokens: int = 0, iters: int = 0, name: str = "") -> dict:
    """Every case of ``projections`` (names of :data:`PROJECTIONS`) on ``device`` ("cuda": fp16, 45,400 x 1024 by
    default; "cpu": the CPU build, float32, small): timings, providers, parity, and the savings."""
    import onnxruntime as ort

    cpu = device != "cuda"
    tokens = tokens or (300 if cpu else 45_400)
    hidden, ffn = (64, 256) if cpu else (1024, 4096)
    iters, warmup = (iters or (3 if cpu else 50)), (1 if cpu else 5)
    dtype = np.float32 if cpu else np.float16
    rng = np.random.default_rng(0)
    x = rng.standard_normal((tokens, hidden)).astype(dtype)  # a LayerNorm output: unit scale
    width = {"hidden": hidden, "ffn": ffn, "3hidden": 3 * hidden}
    out = {"device": name or device, "onnxruntime": ort.__version__, "tokens": tokens, "hidden": hidden, "ffn": ffn,
           "dtype": np.dtype(dtype).name, "iters": iters, "warmup": warmup, "cases": {}, "parity": {}, "errors": []}
    ref_rows = 256
    # "lt_tuned" times up to 16 of cuBLASLt's candidate algorithms on the first call ($CLIPTUNE_FUSED_DENSE_ALGOS)
    # instead of taking the first
    for proj in projections:
        kk, nn, kind = PROJECTIONS[proj]
        k, n = width[kk], width[nn]
        w = (rng.standard_normal((k, n)) / math.sqrt(k)).astype(dtype)
        b = (rng.standard_normal(n) * 0.5).astype(dtype) if kind != "plain" else np.zeros(n, dtype)
        xk = x if k == hidden else rng.standard_normal((tokens, k)).astype(dtype)
        ys = {}
        for engine, cg, algos in (("ort", False, 1), ("ort", True, 1), ("lt", False, 1), ("lt", True, 1),
                                  ("lt", True, 16)):
            if cg and cpu:
                continue
            label = f"{proj}_{engine}_{kind}" + ("_tuned" if algos > 1 else "") + ("_cg" if cg else "")
            os.environ["CLIPTUNE_FUSED_DENSE_ALGOS"] = str(algos)
            try:
                sess = session(graph(f"{engine}_{kind}", k, n, w, b, not cpu), device, cg)
                stats, y = time_case(sess, xk, n, device, iters, warmup)
                out["cases"][label] = {**stats, "provider": sess.get_providers()[0]}
                ys[label] = y
                print(f"[fused_dense] {label}: p50 {stats['p50_ms']} ms", flush=True)
            except Exception as e:  # noqa: BLE001 - recorded, the other cases go on
                out["errors"].append({"case": label, "error": f"{type(e).__name__}: {str(e)[:500]}"})
                print(f"[fused_dense] {label}: ERROR {e}", flush=True)
            finally:
                os.environ.pop("CLIPTUNE_FUSED_DENSE_ALGOS", None)
        want = reference(xk[:ref_rows], w, b, kind == "gelu")
        for label, y in ys.items():
            out["parity"][label] = {"max_abs_vs_float64_first_rows": round(float(np.abs(y[:ref_rows] - want).max()), 5),
                                    "rows": ref_rows}
        ort_key, lt_key = f"{proj}_ort_{kind}", f"{proj}_lt_{kind}"
        if ort_key in ys and lt_key in ys:
            out["parity"][f"{proj}_lt_vs_ort_max_abs"] = round(float(np.abs(ys[lt_key].astype(np.float32)
                                                                              - ys[ort_key].astype(np.float32)).max()), 5)
            if f"{lt_key}_cg" in ys:  # the captured graph replays the same computation
                out["parity"][f"{proj}_lt_cg_equals_lt"] = bool(np.array_equal(ys[f"{lt_key}_cg"], ys[lt_key]))
        best = "_cg" if not cpu else ""
        o, f, t = (out["cases"].get(ort_key + best), out["cases"].get(lt_key + best),
                   out["cases"].get(f"{lt_key}_tuned{best}"))
        if o and f:
            out[f"{proj}_saved_ms_p50"] = round(o["p50_ms"] - f["p50_ms"], 3)
        if o and t:
            out[f"{proj}_tuned_saved_ms_p50"] = round(o["p50_ms"] - t["p50_ms"], 3)
    best = "_cg" if not cpu else ""
    biased, plain = out["cases"].get("qkv_lt_bias" + best), out["cases"].get("qkv_plain_ort_plain" + best)
    if biased and plain:  # what short_qkv's biased projection costs over ORT's plain MatMul of the same shape
        out["qkv_bias_cost_ms_p50"] = round(biased["p50_ms"] - plain["p50_ms"], 3)
    return out


if __name__ == "__main__":
    sys.exit(main())
