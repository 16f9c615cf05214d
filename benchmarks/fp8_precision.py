#!/usr/bin/env python3
"""Would FP8 GEMMs keep Clip-Tuning's loss ranking? A CPU simulation on splade-tiny (the one real model).

FP8 (E4M3) GEMMs are the one lever left for issue 7's GPU targets (README, "What the open targets need"):
on an H100 they run at about twice the fp16 rate, and the GEMMs are 40.7 of the 53.1 ms of a stacked call.
What they cost is precision: 3 mantissa bits. CMA-ES only uses the *ranking* of a generation's losses, so
the question is whether FP8 networks rank a population of prompts as the fp32 networks do, as the int8
edge mode was judged (tests/test_int8.py: Spearman >= 0.9 for the K = 4 mixture).

The simulation (PyTorch, CPU): the contract wrapper of export/wrapper.py at full length (every layer at
every position, so every Linear runs as a module), each encoder Linear replaced by a fake-quantised one:
input and weight rounded to ``torch.float8_e4m3fn`` with one static scale per tensor (amax / 448; the
activation amax calibrated on one population of random prompts over the train set, per graph, as an
export-time calibration would), products summed in fp32, the bias added after (a cuBLASLt FP8 GEMM
with a bias epilogue does the same). Variants:

- ``fp16``: every encoder Linear's input and weight rounded to float16 (the fp16 graphs' GEMM inputs):
  the noise floor the GPU path already has;
- ``fp8_ffn``: the two feed-forward Linears of every layer in E4M3 (two thirds of the GEMM FLOPs);
- ``fp8_all``: every encoder Linear (Q, K, V, attention output, both feed-forward) in E4M3;
- ``fp8_ffn_rowwise`` / ``fp8_all_rowwise``: the same Linears in E4M3 with finer scales: one per
  token of the input, computed at run time, and one per output channel of the weight (cuBLASLt's
  outer-vector scaling). Finer scales only help values far from their tensor's maximum; the 3-bit
  mantissa's rounding (up to 1/16 relative) stays, so this tells which of the two the ranking loses to;
- ``int8_ort``: for perspective, the shipped int8 edge mode itself (``--precision int8`` graphs, ONNX
  Runtime, per-channel dynamic quantisation of the encoder MatMuls), same masks and populations.

Populations (SST-2, the default clip K = 4 set-up, seed 13): three of 40 random prompts (CMA-ES's first
generation, z ~ N(0, I)) and three of 40 around the best z of the committed accuracy cell
``sst2/clip_k4/seed13`` (z* + sigma N(0, I), sigma 0.3, 0.1, 0.03: late-run populations, where the losses
are close and the ranking is hardest). For each: Spearman of the K = 4 mixture losses (what `clip` ranks)
and of graph 0's loss (what `bbt` ranks) against fp32, and the largest loss difference.

    python benchmarks/fp8_precision.py [--out benchmarks/results] [--pop 40]

Writes ``fp8_precision.json`` and ``.md``. Caveat: splade-tiny has 2 layers of width 128; roberta-large
(24 layers, width 1024, activation outliers in a few channels) may quantise worse or better. This
decides whether an FP8 FusedDense is worth building and measuring on the card, not that it is sound.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
E4M3_MAX = 448.0
VARIANTS = ("fp16", "fp8_ffn", "fp8_all", "fp8_ffn_rowwise", "fp8_all_rowwise", "int8_ort")


def fake_quant(x, scale: float, fmt: str):
    """x rounded to ``fmt`` ('fp16' | 'e4m3', the latter saturating at +-448 after dividing by ``scale``)."""
    import torch

    if fmt == "fp16":
        return x.to(torch.float16).to(x.dtype)
    return (x / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).to(x.dtype) * scale


def fake_quant_rows(x):
    """x rounded to E4M3 with one scale per row (amax of the last axis / 448): per token for activations,
    per output channel for a weight [out, in] (what cuBLASLt's outer-vector scaling takes)."""
    import torch

    scale = (x.abs().amax(dim=-1, keepdim=True) / E4M3_MAX).clamp_min(torch.finfo(torch.float32).tiny)
    return (x / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).to(x.dtype) * scale


def quant_linear_class():
    import torch
    from torch import nn

    class QuantLinear(nn.Module):
        """A Linear whose input and weight are rounded to ``fmt`` with static per-tensor scales; while
        ``calibrating`` it runs in fp32 and records the input's absolute maximum."""

        def __init__(self, lin: nn.Linear, fmt: str):
            super().__init__()
            self.lin, self.fmt, self.amax = lin, fmt, 0.0
            self.calibrating = fmt == "e4m3"  # e4m3_rows: dynamic per-token scales, nothing to calibrate
            w = lin.weight.detach()
            if fmt == "e4m3_rows":
                self.wq = fake_quant_rows(w)
            else:
                self.wq = fake_quant(w, float(w.abs().max()) / E4M3_MAX, "e4m3" if fmt == "e4m3" else "fp16")

        def forward(self, x):
            if self.fmt == "e4m3_rows":
                return torch.nn.functional.linear(fake_quant_rows(x), self.wq, self.lin.bias)
            if self.calibrating:
                self.amax = max(self.amax, float(x.detach().abs().max()))
                return self.lin(x)
            scale = self.amax / E4M3_MAX if self.amax > 0 else 1.0
            return torch.nn.functional.linear(fake_quant(x, scale, "e4m3" if self.fmt == "e4m3" else "fp16"), self.wq,
                                              self.lin.bias)

    return QuantLinear


def linear_sites(layer, which: str) -> list[tuple[object, str]]:
    """(parent module, attribute) of the encoder layer's Linears: 'ffn' or 'all'."""
    ffn = [(layer.intermediate, "dense"), (layer.output, "dense")]
    if which == "ffn":
        return ffn
    att = layer.attention
    return [(att.self, "query"), (att.self, "key"), (att.self, "value"), (att.output, "dense"), *ffn]


def build_models(ws, variant: str | None):
    """One torch model per graph of ``ws`` (graph 0 and the thinned ones), the export's masks; ``variant`` None
    = fp32."""
    import torch
    from cliptune_export.exporter import draw_masks
    from cliptune_export.wrapper import ARCHS, ContractModel, dropout_sites
    from transformers import AutoModelForMaskedLM

    from cliptune_ort.models import EMBEDDED_MODEL

    mlm = AutoModelForMaskedLM.from_pretrained(str(EMBEDDED_MODEL), attn_implementation="eager").eval()
    arch = ARCHS[mlm.config.model_type]
    sites = [s[0] for s in dropout_sites(mlm, arch)]
    hidden = ws.manifest.hidden
    QuantLinear = quant_linear_class()
    models = {}
    for g in sorted(set(ws.graphs_train) | {0}):
        info = ws.manifest.data["graphs"][g]
        masks = None
        if info["kind"] == "thinned":
            masks = {k: torch.from_numpy(v) for k, v in draw_masks(sites, hidden, info["p"], info["mask_seed"]).items()}
        m = ContractModel(copy.deepcopy(mlm), arch, masks, last_layer_at_mask=False).eval()
        if variant is not None:
            fmt = "fp16" if variant == "fp16" else "e4m3_rows" if variant.endswith("_rowwise") else "e4m3"
            which = "ffn" if variant.startswith("fp8_ffn") else "all"
            for layer in m.layers:
                for parent, attr in linear_sites(layer, which):
                    setattr(parent, attr, QuantLinear(getattr(parent, attr), fmt))
        models[g] = m
    return models


def logits(model, ws, prompts: np.ndarray) -> np.ndarray:
    """[pop, n, labels] over the train set's length buckets."""
    import torch

    out = np.empty((len(prompts), ws.train.n, len(ws.verbalizer_ids)), dtype=np.float32)
    p = torch.from_numpy(prompts.astype(np.float32))
    verb = torch.from_numpy(np.asarray(ws.verbalizer_ids, dtype=np.int64))
    with torch.inference_mode():
        for idx, feeds in ws.train.parts:
            args = [torch.from_numpy(np.asarray(feeds[k])) for k in ("input_ids", "attention_mask", "mask_pos")]
            out[:, idx] = model(*args, p, verb).numpy()
    return out


def losses(models, ws, prompts) -> tuple[np.ndarray, np.ndarray]:
    """(the K-graph mixture's mean loss [pop], graph 0's loss [pop])."""
    from cliptune_ort.losses import loss_fn

    def loss(lg):
        return loss_fn(ws.loss, lg, ws.train.labels, ws.cfg.margin)

    mix = np.mean([loss(logits(models[g], ws, prompts)) for g in ws.graphs_train], axis=0)
    return mix, loss(logits(models[0], ws, prompts))


def ort_graph0_loss(ws, prompts) -> np.ndarray:
    """Graph 0's loss [pop] through the workspace's ONNX Runtime engine."""
    from cliptune_ort.losses import loss_fn

    return loss_fn(ws.loss, ws.engine.logits(0, prompts, ws.train, ws.verbalizer_ids), ws.train.labels, ws.cfg.margin)


def ort_losses(ws, prompts) -> tuple[np.ndarray, np.ndarray]:
    """losses() through the workspace's ONNX Runtime engine (the int8 graphs)."""
    from cliptune_ort.tuner import score

    return score(ws, prompts), ort_graph0_loss(ws, prompts)


def calibrate(models, ws, prompts) -> None:
    for m in models.values():
        logits(m, ws, prompts)  # the QuantLinears record their input's amax
        for mod in m.modules():
            if hasattr(mod, "calibrating"):
                mod.calibrating = False


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--pop", type=int, default=40, help="prompts per population")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--best-z", default=str(ROOT / "benchmarks/results/accuracy/runs/sst2/clip_k4/seed13/best_z.npy"))
    a = ap.parse_args(argv)
    import torch

    from cliptune_ort.config import build_config
    from cliptune_ort.tuner import prepare
    from tests.test_int8 import spearman

    torch.set_num_threads(max(1, (os.cpu_count() or 1)))
    t0 = time.perf_counter()
    cfg = build_config(task="sst2", method="clip", k=4, seed=13, plot=False, device="cpu")
    ws = prepare(cfg)
    try:
        z_star = np.load(a.best_z).reshape(-1)
        if z_star.shape != (cfg.d,):
            raise SystemExit(f"{a.best_z} holds z of size {z_star.size}, expected d = {cfg.d}")
        pops = {}
        for s in (7, 8, 9):
            pops[f"random_{s}"] = np.random.default_rng(s).standard_normal((a.pop, cfg.d))
        for s, sigma in ((10, 0.3), (11, 0.1), (12, 0.03)):
            pops[f"near_best_sigma{sigma:g}"] = z_star + sigma * np.random.default_rng(s).standard_normal((a.pop, cfg.d))
        prompts = {k: ws.prompts(z, host=True) for k, z in pops.items()}
        calib = ws.prompts(np.random.default_rng(99).standard_normal((a.pop, cfg.d)), host=True)
        ref_models = build_models(ws, None)
        ref = {k: losses(ref_models, ws, p) for k, p in prompts.items()}
        # the fp32 torch path is the export's: graph 0's loss equals the ONNX Runtime engine's
        ort_l0 = ort_graph0_loss(ws, prompts["random_7"])
        result = {"model": "splade-tiny (embedded)", "task": "sst2", "method": "clip K=4 (mean of the K losses)",
                  "seed": 13, "pop": a.pop, "best_z": os.path.relpath(a.best_z, ROOT),
                  "torch_vs_onnxruntime_fp32_max_abs_loss": float(np.max(np.abs(ort_l0 - ref["random_7"][1]))),
                  "torch": torch.__version__, "variants": {}}
        for variant in [v for v in a.variants.split(",") if v]:
            if variant == "int8_ort":
                ws8 = prepare(build_config(task="sst2", method="clip", k=4, seed=13, plot=False, device="cpu",
                                           precision="int8"))
            else:
                models = build_models(ws, variant)
                if variant in ("fp8_ffn", "fp8_all"):  # static per-tensor scales
                    calibrate(models, ws, calib)
            rows = {}
            for k, p in prompts.items():
                mix, g0 = ort_losses(ws8, p) if variant == "int8_ort" else losses(models, ws, p)
                rows[k] = {"spearman_mixture": round(spearman(ref[k][0], mix), 4),
                           "spearman_graph0": round(spearman(ref[k][1], g0), 4),
                           "max_abs_loss_diff_mixture": round(float(np.max(np.abs(mix - ref[k][0]))), 5),
                           "loss_spread_fp32_mixture": round(float(np.ptp(ref[k][0])), 5),
                           "top1_same_mixture": bool(np.argmin(mix) == np.argmin(ref[k][0]))}
            result["variants"][variant] = rows
            if variant == "int8_ort":
                ws8.engine.close()
            print(f"[fp8] {variant}: " + ", ".join(f"{k} {r['spearman_mixture']}/{r['spearman_graph0']}"
                                                    for k, r in rows.items()), flush=True)
        result["wall_seconds"] = round(time.perf_counter() - t0, 1)
    finally:
        ws.engine.close()
    os.makedirs(a.out, exist_ok=True)
    path = Path(a.out) / "fp8_precision.json"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    os.replace(tmp, path)
    md = ["# FP8 precision (simulated on the CPU, splade-tiny, SST-2 clip K = 4, seed 13)", "",
          ("Spearman of the losses against fp32 (mixture of the K = 4 graphs / graph 0 alone), the largest mixture "
           "loss difference, the fp32 mixture losses' spread, and whether the best prompt is the same."), "",
          "| variant | population | Spearman mixture | Spearman graph 0 | max abs diff | fp32 spread | same best |",
          "|---|---|---|---|---|---|---|"]
    for v, rows in result["variants"].items():
        for k, r in rows.items():
            md.append(f"| {v} | {k} | {r['spearman_mixture']} | {r['spearman_graph0']} | "
                      f"{r['max_abs_loss_diff_mixture']} | {r['loss_spread_fp32_mixture']} | {r['top1_same_mixture']} |")
    md += ["", (f"torch fp32 vs ONNX Runtime fp32 (graph 0 loss, random_7): max abs "
                f"{result['torch_vs_onnxruntime_fp32_max_abs_loss']:.2e}; {result['wall_seconds']} s.")]
    (Path(a.out) / "fp8_precision.md").write_text("\n".join(md) + "\n")
    print(f"[fp8] wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
