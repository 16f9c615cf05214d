#!/usr/bin/env python3
"""The GPU benchmark: PyTorch vs ONNX Runtime CUDA on the roberta-large shape, and measured tune runs.

One run on one machine (the lent H100/H200; see benchmarks/gpu_run.sh for the device call):

1. export  random-weight roberta-large-shaped graphs (24 layers, hidden 1024, 16 heads, FFN 4096,
           vocab 30522 with splade-tiny's WordPiece tokenizer, so the vendored SST-2 texts give real
           lengths): fp16 with K=4 (masks folded, ORT transformer fusions; the tune runs use it) and
           fp32 with K=0 (graph 0 only, for the fp32 cells). Both run in child processes on the
           cores the timing process does not use; their fusion statistics are recorded.
2. torch   PyTorch fp32 eager and fp16 + SDPA (``attn_implementation="sdpa"``, ``.half()``), the
           same contract wrapper (``ContractModel(hf_layers=True)``: the HF layers' own attention),
           the same weights as the export (same init seed), prompts copied from the host every call,
           logits copied back (``torch.cuda.synchronize`` by the copy).
3. ort     ORT CUDA fp16 and fp32 through the package's ``Engine`` (plain ``run``, IOBinding with the
           fixed inputs resident on the device, CUDA graphs), graph 0; and ``packed``: a copy of the
           fp16 export with packed (padding-free) attention (export/packing.py), the whole set in one
           call with no padded token computed, IOBinding; ``packed_host`` (offsets fed by the runtime,
           CUDA-graph capturable) and the ``_flash`` copies of both (PackedMultiHeadAttention without
           biases, which ORT runs with FlashAttention's varlen kernel); with ``--moe`` also
           ``packed_host_flash_moe``: the last with every packed feed-forward block as one
           single-expert ``MoE`` node (slower on an H100: ORT 1.31.1 runs its GELU as a kernel of its
           own, after CUTLASS grouped GEMMs); ``packed_host_flash_lt``: packed_host_flash with
           cliptune's FusedDense op (cuBLASLt bias + GELU epilogue, tanh GELU; the query bias too), which
           needs the CUDA build of the custom-op library (``cliptune build-ops``; $CLIPTUNE_OPS_DIR);
           ``packed_host_flash_ltres``: the last with each output projection's bias and residual in the
           FusedDense epilogue and LayerNormalization for SkipLayerNormalization; ``packed_host_cudnn_ltres``
           (cuDNN's attention on the packed rows, RaggedAttention impl 0) and ``packed_host_short_lt`` (the _lt
           layout with cliptune's own attention kernel for rows of up to 128 tokens, RaggedAttention impl 1,
           native/short_attention.cu) and ``packed_host_shortqkv_lt`` (the same kernel reading one QKV
           projection in place: one GEMM per layer instead of three) and ``packed_host_shortqkv_ltpa`` (the
           last with the first packed layer's input made by cliptune's PackAdd in one pass instead of ORT's
           Add over the padded sum and a Gather), all smoke-tested in a child process first.
           ONNX Runtime's
           memory-efficient attention kernel is timed against FlashAttention on the _lt layout (a child
           process; ``--skip attention``). ``--layouts`` picks the packed layouts, ``--padded-modes`` the padded fp16 graph's modes.
           Every cell: population 1 and 20 (20 candidates stacked in one call per length bucket) x
           {1 bucket (padded to the longest), 4 length buckets}, on the real SST-2 16-shot train
           set of seed 13 (32 examples); median/p90 of >= 15 calls after warm-up. One "call" scores
           the candidates on all 32 examples (one session run per bucket).
4. profile where ORT placed the fp16 graph's nodes (CPU vs CUDA), Memcpy nodes, and a logits
           parity check ORT fp16 / torch fp16 vs torch fp32 on the GPU.
5. cma     CMA-ES ask/tell per generation (d = 500, population 20) with numpy's BLAS on 1, 2, 4
           and 8 threads on this host: a CUDA run's CPU time between its GPU calls. The tune runs
           use the fastest count when it beats one thread by more than 10 % (else one, the
           package's default, which the CPU path needs).
6. tune    measured runs through the package API: ``tuner.tune`` on SST-2 with the fp16 export,
           method bbt and clip (K=4), the full default budget (8,000 calls); wall_seconds from
           result.json. They use the fastest fp16 variant at pop 20 (padded with IOBinding or CUDA
           graphs, the packed layouts with IOBinding or CUDA graphs), timed as a tune calls it (from
           candidates z, the ``+z`` cells, where timed), whose logits matched PyTorch fp32 as well as
           the padded graph's (``--tune-variant`` forces one).

Results: ``<out>/gpu_<device>.json`` and ``.md`` (device name, providers that ran, versions, every
number, ratios to PyTorch fp16 + SDPA from the same run, the issue's targets), rewritten after
every section so a timeout still leaves data. Exports and run dirs go to ``--work`` (never to
``--out``: only small files travel back).

``--quick``: fewer timed calls and a 1,000-call tune budget. ``--cpu-dry-run``: a tiny random
RoBERTa, the CPU provider and torch on the CPU, 2 timed calls, a 100-call tune budget: catches
bugs before the device run.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import platform
import random
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path

T0 = time.perf_counter()
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402
from cuda_run import load_cuda_libraries

SPLADE = ROOT / "cliptune_ort" / "assets" / "models" / "splade-tiny"


def time_iters(fn, warmup: int, iters: int) -> list[float]:
    """``warmup`` untimed calls, then ``iters`` timed calls (the shared harness loop, no time cap)."""
    return harness.time_calls(fn, warmup=warmup, min_iters=min(3, iters), max_iters=iters, max_seconds=math.inf)

#: the roberta-large shape (random weights; speed is a property of the shape)
LARGE = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
             max_position_embeddings=514)
#: the dry run's shape
TINY = dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, intermediate_size=128,
            max_position_embeddings=514)
TASK, FEWSHOT_SEED = "sst2", 13
#: candidates' dimension of the from-z cells (the tunes' default d) and those cells' mode suffix: the call as a tune
#: makes it, z [pop, d] on the host projected to the prompts on the device, where the other cells start from
#: host float32 prompts [pop, L, hidden] (an fp16 Engine casts those on the host, PyTorch on the device)
D_Z, FROM_Z = 500, "+z"


def log(msg: str) -> None:
    print(f"[gpu {time.perf_counter() - T0:6.1f}s] {msg}", flush=True)


def elapsed() -> float:
    return time.perf_counter() - T0


# ---------------------------------------------------------------- results


class Results:
    """The JSON document, rewritten (atomically) with its markdown page after every section."""

    def __init__(self, out: Path, slug: str):
        self.out = out
        self.slug = slug
        self.data: dict = {"benchmark": "gpu", "status": "running", "sections_done": [], "errors": [],
                           "cells": [], "tune": {}}

    def error(self, section: str, exc: BaseException) -> None:
        tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        self.data["errors"].append({"section": section, "error": f"{type(exc).__name__}: {exc}"[:2000],
                                    "traceback_tail": tb[-3000:]})
        log(f"ERROR in {section}: {type(exc).__name__}: {exc}")

    def save(self) -> None:
        self.data["elapsed_s"] = round(elapsed(), 1)
        self.out.mkdir(parents=True, exist_ok=True)
        path = self.out / f"gpu_{self.slug}.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str) + "\n", encoding="utf-8")
        os.replace(tmp, path)
        try:
            md = markdown(self.data)
            tmp = path.with_suffix(".md.tmp")
            tmp.write_text(md, encoding="utf-8")
            os.replace(tmp, path.with_suffix(".md"))
        except Exception as e:  # the JSON is what counts; a page bug must not lose it
            log(f"markdown failed: {e}")


def summarize(samples: list[float]) -> dict:
    import numpy as np

    s = np.asarray(samples, dtype=np.float64) * 1e3
    return {"n": int(s.size), "p50_ms": round(float(np.median(s)), 3), "p90_ms": round(float(np.percentile(s, 90)), 3),
            "p99_ms": round(float(np.percentile(s, 99)), 3), "mean_ms": round(float(s.mean()), 3),
            "min_ms": round(float(s.min()), 3),
            "max_ms": round(float(s.max()), 3)}


# ---------------------------------------------------------------- environment


def device_info(cpu: bool) -> dict:
    info: dict = {"cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()}
    try:
        info["cpu_model"] = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                                 if line.startswith("model name"))
    except Exception:
        pass
    if cpu:
        info["name"] = "cpu-dry-run"
        return info
    try:
        import torch

        info["name"] = torch.cuda.get_device_name(0)
        props = torch.cuda.get_device_properties(0)
        info["memory_gib"] = round(props.total_memory / 2**30, 1)
        info["capability"] = f"{props.major}.{props.minor}"
        info["multiprocessors"] = props.multi_processor_count
    except Exception as e:
        info["torch_cuda_error"] = str(e)
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version,clocks.max.sm,power.limit",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
        info["nvidia_smi"] = smi.stdout.strip()
        info.setdefault("name", smi.stdout.split(",")[0].strip() or "unknown-gpu")
    except Exception as e:
        info["nvidia_smi_error"] = str(e)
    info.setdefault("name", "unknown-gpu")
    return info


def versions() -> dict:
    out = {}
    for mod in ("numpy", "torch", "transformers", "onnx", "onnxruntime", "cma", "tokenizers"):
        try:
            m = __import__(mod)
            out[mod] = getattr(m, "__version__", "?")
        except Exception as e:
            out[mod] = f"missing ({type(e).__name__})"
    try:
        import torch

        out["torch_cuda"] = str(torch.version.cuda)
        out["cudnn"] = str(torch.backends.cudnn.version())
        out["torch_tf32_matmul"] = bool(torch.backends.cuda.matmul.allow_tf32)
    except Exception:
        pass
    try:
        import onnxruntime as ort

        out["ort_file"] = ort.__file__
        out["ort_device"] = ort.get_device()
        out["ort_available_providers"] = ort.get_available_providers()
    except Exception:
        pass
    try:
        import cliptune_ort

        out["cliptune_ort"] = cliptune_ort.__version__
    except Exception:
        pass
    return out


def slugify(name: str) -> str:
    s = "".join(c.lower() if c.isalnum() else "-" for c in name)
    while "--" in s:
        s = s.replace("--", "-")
    return s.strip("-") or "unknown"


# ---------------------------------------------------------------- exports


EXPORT_CODE = r"""
import json, os, sys, time
a = json.loads(sys.argv[1])
import torch  # before onnxruntime: ORT reuses the CUDA libraries torch ships
torch.set_num_threads(max(1, len(os.sched_getaffinity(0))))
from cliptune_export import ExportOptions, export_model
t = time.perf_counter()
man = export_model(a["model"], a["out"], ExportOptions(**a["opts"]))
print(json.dumps({"seconds": round(time.perf_counter() - t, 2), "export_seconds": man["export_seconds"]}))
"""


def make_src(work: Path, shape: dict) -> Path:
    """A model folder: RobertaConfig of ``shape`` (weights drawn at export) + splade-tiny's tokenizer."""
    src = work / ("src_" + "_".join(str(v) for v in shape.values()))
    if (src / "config.json").is_file():
        return src
    src.mkdir(parents=True, exist_ok=True)
    harness.roberta_config(shape).save_pretrained(src)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(SPLADE / f, src / f)
    return src


def start_export(src: Path, out: Path, logf: Path, cores: set[int] | None, **opts) -> subprocess.Popen:
    args = {"model": str(src), "out": str(out),
            "opts": {"random_init": True, "init_seed": 0, "overwrite": True, **opts}}
    env = dict(os.environ)
    if cores:
        env["OMP_NUM_THREADS"] = str(len(cores))
    with open(logf, "w") as f:
        p = subprocess.Popen([sys.executable, "-c", EXPORT_CODE, json.dumps(args)], stdout=f, stderr=subprocess.STDOUT,
                             env=env, cwd=str(ROOT))
    if cores:  # pinned from here (no preexec_fn in a threaded parent); the child reads it after importing torch
        os.sched_setaffinity(p.pid, cores)
    return p


def graph_stats(model_dir: Path) -> dict:
    """Op counts of graph_0 (the fusions that fired), and the manifest's parity numbers."""
    import collections

    import onnx

    man = json.loads((model_dir / "manifest.json").read_text())
    m = onnx.load(str(model_dir / "graph_0.onnx"), load_external_data=False)
    ops = collections.Counter(n.op_type for n in m.graph.node)
    keys = ("Attention", "MultiHeadAttention", "SkipLayerNormalization", "LayerNormalization", "BiasGelu", "Gelu",
            "FastGelu", "MatMul", "Softmax", "If", "Cast")
    return {"layers": man["model"]["layers"], "fused_ops_graph_0": {k: ops.get(k, 0) for k in keys},
            "nodes_graph_0": sum(ops.values()), "precision": man["precision"], "k": man["k"],
            "masks_folded": man.get("masks_folded"), "export_seconds": man.get("export_seconds"),
            "parity_max_abs_diff": [g["max_abs_diff"] for g in man["graphs"]],
            "parity_rel_rms": [g.get("rel_rms_diff") for g in man["graphs"]],
            "weights_mib": round((model_dir / "weights.bin").stat().st_size / 2**20, 1)}


# ---------------------------------------------------------------- data


def fewshot(model_dir: Path):
    """(Encoded train set of SST-2 seed 13 [n, seq], verbalizer ids [labels]) with an export's tokenizer."""
    from cliptune_ort.manifest import load_manifest

    man = load_manifest(model_dir)
    return _encode(man.tokenizer_path, man.data["tokenizer"], man.n_prompt, man.data["placeholder_ids"],
                   int(man.data["model"]["max_positions"]))


def fewshot_from_src(src: Path, work: Path, n_prompt: int = 50, offset: int = 1000):
    """The same batch before any export exists: the tokenizer, ids and limits the exporter would record."""
    from transformers import AutoConfig, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(src))
    path = work / "tokenizer.json"
    tok.backend_tokenizer.save(str(path))
    info = {"cls_id": tok.cls_token_id, "sep_id": tok.sep_token_id, "mask_id": tok.mask_token_id,
            "pad_id": tok.pad_token_id}
    cfg = AutoConfig.from_pretrained(str(src))
    max_pos = cfg.max_position_embeddings - (cfg.pad_token_id + 1)  # RoBERTa positions, as the exporter
    return _encode(path, info, n_prompt, list(range(offset, offset + n_prompt)), max_pos)


def _encode(tokenizer_path, info, n_prompt, placeholder_ids, max_len):
    from cliptune_ort.data import load_fewshot
    from cliptune_ort.encoding import PromptTokenizer
    from cliptune_ort.tasks import get_task

    task = get_task(TASK)
    few = load_fewshot(task, FEWSHOT_SEED)
    ptok = PromptTokenizer(tokenizer_path, info, n_prompt, placeholder_ids, max_len)
    return ptok.encode(task.template, few.train), ptok.verbalizer_ids(task.verbalizer)


def data_info(enc) -> dict:
    from cliptune_ort.encoding import buckets, padded_fraction

    out = {"task": TASK, "fewshot_seed": FEWSHOT_SEED, "n": len(enc), "len_mean": round(float(enc.lengths.mean()), 1),
           "len_min": int(enc.lengths.min()), "len_max": int(enc.lengths.max()), "real_tokens": int(enc.lengths.sum())}
    for nb in (1, 2, 4):
        split = buckets(enc, nb)
        out[f"buckets_{nb}"] = {"seq": [int(s.ids.shape[1]) for _, s in split], "rows": [len(s) for _, s in split],
                                "padded_fraction": round(padded_fraction(split), 4)}
    return out


# ---------------------------------------------------------------- torch


def build_torch(src: Path, device: str):
    """(fp32 eager model, fp16 SDPA model) wrapped in the contract, the export's weights (same seed)."""
    import torch
    from transformers import AutoConfig, AutoModelForMaskedLM

    from cliptune_export.wrapper import ARCHS, ContractModel

    cfg = AutoConfig.from_pretrained(str(src))
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)  # = ExportOptions.init_seed: the same random weights as the export
    mlm = AutoModelForMaskedLM.from_config(cfg, attn_implementation="eager").eval()
    arch = ARCHS[cfg.model_type]
    half = copy.deepcopy(mlm)
    try:
        half.set_attn_implementation("sdpa")
    except Exception:
        half.config._attn_implementation = "sdpa"
    impl = half.config._attn_implementation
    fp16_dtype = torch.float16 if device == "cuda" else torch.bfloat16  # CPU dry run: bf16 kernels exist there
    m32 = ContractModel(mlm, arch, None, hf_layers=True).eval().to(device)
    m16 = ContractModel(half, arch, None, hf_layers=True).eval().to(device=device, dtype=fp16_dtype)
    return m32, m16, impl


class TorchCall:
    """One call = the candidates [pop, L, hidden] (host, float32) on every bucket -> logits [pop, n, labels]."""

    def __init__(self, model, enc, verb, n_buckets: int, device: str):
        import torch

        from cliptune_ort.encoding import buckets

        self.model, self.device = model, device
        self.parts = []
        for idx, sub in buckets(enc, n_buckets):
            self.parts.append((idx, torch.from_numpy(sub.ids).to(device), torch.from_numpy(sub.attention_mask).to(device),
                               torch.from_numpy(sub.mask_pos).to(device)))
        self.verb = torch.from_numpy(verb).to(device)
        self.n = len(enc)
        self.hidden = model.embeddings.word_embeddings.weight.shape[1]  # the prompts' hidden size

    def __call__(self, prompts):
        import torch

        with torch.inference_mode():
            return self._run(torch.from_numpy(prompts).to(self.device, non_blocking=False))

    def from_z(self, z, at):
        """A generation as a tune makes it: candidates ``z`` [pop, d] (host) times the projection ``at`` [d, L *
        hidden] (a float32 tensor on the device, BBT's A), then the call."""
        import torch

        with torch.inference_mode():
            zt = torch.from_numpy(z).to(self.device, non_blocking=False)
            return self._run((zt @ at).view(z.shape[0], -1, self.hidden))

    def _run(self, p):
        import numpy as np

        res = np.empty((p.shape[0], self.n, len(self.verb)), dtype=np.float32)
        for idx, ids, am, mp in self.parts:
            res[:, idx] = self.model(ids, am, mp, p, self.verb).float().cpu().numpy()
        return res


# ---------------------------------------------------------------- ORT


def make_engine(model_dir: Path, device: str, mode: str):
    """The package's Engine over graph 0 in ``mode``: run (numpy feeds) | iobinding | cuda_graph."""
    from cliptune_ort.engine import Engine
    from cliptune_ort.manifest import load_manifest

    man = load_manifest(model_dir)
    if mode.startswith("packed"):  # packed[_host][_flash][_cg]: the layout is the export's
        kw = {"iobinding": True, "cuda_graph": mode.endswith("_cg")}
    else:
        kw = {"run": {"iobinding": False}, "iobinding": {"iobinding": True},
              "cuda_graph": {"iobinding": True, "cuda_graph": True}}[mode]
    return Engine(man, [0], device=device, **kw)


#: the packed copies of the fp16 export: name -> (host offsets, attention kernel, feed-forward block of
#: export/packing.py)
PACKED_LAYOUTS = {"packed": (False, "fused", "matmul"), "packed_host": (True, "fused", "matmul"),
                  "packed_flash": (False, "flash", "matmul"), "packed_host_flash": (True, "flash", "matmul"),
                  "packed_host_flash_moe": (True, "flash", "moe"),
                  "packed_host_flash_lt": (True, "flash", "cublaslt"),
                  "packed_host_flash_ltres": (True, "flash", "cublaslt_res"),
                  "packed_host_cudnn_ltres": (True, "cudnn", "cublaslt_res"),
                  "packed_host_short_lt": (True, "short", "cublaslt"),
                  "packed_host_shortqkv_lt": (True, "short_qkv", "cublaslt"),
                  "packed_host_shortqkv_ltpa": (True, "short_qkv", "cublaslt"),
                  "packed_host_pipeqkv_ltpa": (True, "pipe_qkv", "cublaslt"),
                  "packed_host_shortqkv_ltpa_spqb": (True, "short_qkv", "cublaslt"),
                  "packed_host_pipeqkv_ltpa_spqb16": (True, "pipe_qkv", "cublaslt")}
#: pack_export's further options per layout (the others: its defaults): front "fused" = the first packed layer's
#: input made by cliptune's PackAdd (packing.FRONTS; default "gather"); prefix = the first layer's Q, K and V of the
#: rows' shared [CLS] + prompt positions projected once per candidate (a Gather before the projection,
#: RaggedAttention's token map); qbias = the QKV projection a plain MatMul, RaggedAttention adding the query bias;
#: prompt_dtype "float16" = the graphs take float16 prompts (cast on the host, engine.host_cast, half the bytes sent)
_SPQB = {"front": "fused", "prefix": True, "qbias": True}
LAYOUT_OPTIONS = {"packed_host_shortqkv_ltpa": {"front": "fused"}, "packed_host_pipeqkv_ltpa": {"front": "fused"},
                  "packed_host_shortqkv_ltpa_spqb": _SPQB,
                  "packed_host_pipeqkv_ltpa_spqb16": {**_SPQB, "prompt_dtype": "float16"}}
#: tune variants: name -> (packed layout or None for the padded export, CUDA graphs): each layout as it is, and
#: the host-packed ones also under CUDA graphs ("<layout>_cg")
TUNE_VARIANTS = {"padded": (None, False), "padded_cg": (None, True),
                 **{v: (name, v != name) for name, (host, _, _) in PACKED_LAYOUTS.items()
                    for v in ((name, name + "_cg") if host else (name,))}}


def layout_usable(kernel: str, parity_sound: bool, device: str, ragged_check: dict | None) -> bool:
    """Whether a packed layout may score the tune runs: its logits as close to PyTorch fp32 as the padded
    graph's (on the 32 train rows), and, for cliptune's own attention kernels (RaggedAttention impl 1, 2) on
    CUDA, a passed check of the kernel's impl on rows of edge lengths (``ragged_kernel_check``; the test set has
    lengths the train rows do not). A check that did not run or crashed counts as failed there."""
    if not parity_sound:
        return False
    from cliptune_ort.manifest import OWN_KERNELS

    if device == "cuda" and kernel in OWN_KERNELS:
        return bool(ragged_check and ragged_check.get("ok_impl", {}).get(str(OWN_KERNELS[kernel])))
    return True


def profile_placement(model_dir: Path, device: str, enc, verb, work: Path, n_buckets: int = 4,
                      calls: int = 5) -> dict:
    """Where ORT ran each node of graph 0 (from its profiler), the Memcpy nodes, and where the time of
    a stacked call (pop 20, ``n_buckets``) goes: kernel milliseconds per call by op type, the mean
    over ``calls`` profiled calls after 2 warm-up calls (the profiler's own timing, no CUDA graph)."""
    import collections

    import numpy as np
    import onnx
    import onnxruntime as ort

    from cliptune_ort.encoding import buckets
    from cliptune_ort.manifest import load_manifest
    from cliptune_ort.sessions import SharedWeights

    man = load_manifest(model_dir)
    shared = SharedWeights(man)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.enable_profiling = True
    so.profile_file_prefix = str(work / "ort_profile")
    opt_path = work / "graph_0.optimized.onnx"
    so.optimized_model_filepath = str(opt_path)
    so.add_session_config_entry("session.optimized_model_external_initializers_file_name", "graph_0.optimized.data")
    so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    so.add_session_config_entry("session.disable_prepacking", "1")
    for name, value in shared.values.items():
        so.add_initializer(name, value)
    providers = [("CUDAExecutionProvider", {"device_id": 0}), "CPUExecutionProvider"] if device == "cuda" else \
        ["CPUExecutionProvider"]
    sess = ort.InferenceSession(str(man.graph_path(0)), so, providers=providers)
    rng = np.random.default_rng(5)
    prompts = (rng.standard_normal((20, man.n_prompt, man.hidden)) * man.embedding_std).astype(np.float32)
    parts = buckets(enc, 1 if man.packed else n_buckets)
    t_calls = []
    for i in range(2 + calls):
        t = time.perf_counter()
        for _, sub in parts:
            sess.run(["logits"], {"input_ids": sub.ids, "attention_mask": sub.attention_mask, "mask_pos": sub.mask_pos,
                                  "prompt_embeds": prompts, "verbalizer_ids": verb})
        t_calls.append(time.perf_counter() - t)
    prof = sess.end_profiling()
    events = json.loads(Path(prof).read_text())
    by_provider: dict = collections.defaultdict(collections.Counter)
    seen = set()
    runs = [e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"]
    timed_from = runs[2 * len(parts)]["ts"] if len(runs) > 2 * len(parts) else 0  # skip the warm-up calls
    op_us: collections.Counter = collections.Counter()
    for e in events:
        a = e.get("args", {})
        if e.get("cat") == "Node" and "provider" in a and e.get("name", "").endswith("_kernel_time"):
            node = e["name"][: -len("_kernel_time")]
            if e.get("ts", 0) >= timed_from:
                op_us[a.get("op_name", "?")] += float(e.get("dur", 0))
            if node in seen:
                continue
            seen.add(node)
            by_provider[a["provider"]][a.get("op_name", "?")] += 1
    m = onnx.load(str(opt_path), load_external_data=False)
    ops = collections.Counter(n.op_type for n in m.graph.node)
    Path(prof).unlink(missing_ok=True)
    for f in work.glob("graph_0.optimized.*"):
        f.unlink()
    total = sum(op_us.values())
    return {"providers": sess.get_providers(),
            "nodes_by_provider": {k: dict(v) for k, v in by_provider.items()},
            "memcpy_nodes": {k: v for k, v in ops.items() if k.startswith("Memcpy")},
            "optimized_ops": dict(ops.most_common()),
            "op_time": {"pop": 20, "n_buckets": len(parts), "packed": man.packed, "calls": calls,
                        "wall_ms_per_call_profiled": round(1e3 * float(np.median(t_calls[2:])), 2),
                        "kernel_ms_per_call": round(total / 1e3 / calls, 2),
                        "ms_per_call_by_op": {k: round(v / 1e3 / calls, 3) for k, v in op_us.most_common()},
                        "share_by_op": {k: round(v / total, 4) for k, v in op_us.most_common()} if total else {}}}


#: names of GEMM kernels (cuBLAS, cuBLASLt, CUTLASS)
GEMM_KEYS = ("gemm", "gemv", "xmma", "nvjet", "cutlass", "cublas", "sm90", "sm80", "matmul")
KERNEL_CLASSES = (("qkv_bias_transpose", ("addbiastranspose",)),  # before gemm: its name holds "Cutlass"
                  # the MoE feed-forward block (packed_ffn "moe"): its grouped GEMMs (ORT 1.31.1 on an H100: CUTLASS
                  # GemmUniversal<GroupProblemShape>), its activation (a kernel of its own there, not an epilogue),
                  # then its routing passes (gating softmax, sort, row permutation), before "softmax" means attention
                  ("moe_gemm", ("moefcgemm", "moe_gemm", "moegemm", "grouped", "groupproblemshape")),
                  ("moe_activation", ("doactivationkernel",)),
                  ("moe_routing", ("moe", "expandinputrows", "finalize", "topk", "gating", "permut", "radix")),
                  ("attention", ("fmha", "flash", "attention", "attn", "softmax")),
                  ("packing", ("padding", "tokenoffset", "token_offset", "packadd")),
                  ("layer_norm", ("layernorm", "layer_norm", "skipln")),
                  ("gelu", ("gelu",)),
                  ("gemm", GEMM_KEYS),
                  ("copy", ("memcpy", "copy")))


def kernel_class(name: str) -> str:
    """The class of a kernel (or CPU op) name: the first of :data:`KERNEL_CLASSES` with a key in it."""
    low = name.lower()
    if "gelu" in low and any(k in low for k in GEMM_KEYS):  # a GEMM with the GELU in its epilogue (FusedDense)
        return "gemm_gelu_epilogue"
    return next((c for c, keys in KERNEL_CLASSES if any(k in low for k in keys)), "other")


def kernel_split(fn, calls: int, cuda: bool) -> dict:
    """GPU time of ``calls`` calls of ``fn`` by kernel (torch.profiler / CUPTI sees every kernel of the
    process, ORT's included), summed into classes by kernel name; CPU dry run: CPU ops instead."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    fn()  # warm
    if cuda:
        torch.cuda.synchronize()
    t = time.perf_counter()
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        for _ in range(calls):
            fn()
        if cuda:
            torch.cuda.synchronize()
    wall = time.perf_counter() - t
    rows = []
    for e in prof.key_averages():
        us = (getattr(e, "device_time_total", 0) or getattr(e, "cuda_time_total", 0)) if cuda else e.self_cpu_time_total
        if us and us > 0:
            rows.append((e.key, float(us), int(e.count)))
    rows.sort(key=lambda r: -r[1])
    classes: dict = {}
    for name, us, _ in rows:
        cls = kernel_class(name)
        classes[cls] = classes.get(cls, 0.0) + us
    total = sum(r[1] for r in rows)
    return {"calls": calls, "wall_ms_per_call_profiled": round(1e3 * wall / calls, 2),
            "gpu_ms_per_call": round(total / 1e3 / calls, 2),
            "ms_per_call_by_class": {k: round(v / 1e3 / calls, 2) for k, v in sorted(classes.items(), key=lambda kv: -kv[1])},
            "top_kernels": [{"name": n[:120], "ms_per_call": round(us / 1e3 / calls, 3), "launches_per_call": c / calls}
                            for n, us, c in rows[:40]]}


# ---------------------------------------------------------------- markdown


def _fmt(v, d=1):
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.{d}f}"
    return str(v)


def markdown(data: dict) -> str:
    dev = data.get("device", {})
    v = data.get("versions", {})
    lines = [f"# GPU benchmark: {dev.get('name', '?')}", "",
             f"Status: {data.get('status')}; {data.get('elapsed_s')} s; sections: {', '.join(data.get('sections_done', []))}.",
             f"Versions: onnxruntime {v.get('onnxruntime')} ({v.get('ort_device')}), torch {v.get('torch')} "
             f"(CUDA {v.get('torch_cuda')}), transformers {v.get('transformers')}, onnx {v.get('onnx')}; "
             f"providers available: {', '.join(v.get('ort_available_providers', []) or [])}.", ""]
    if data.get("model"):
        lines += [f"Model: {data['model']}", ""]
    if data.get("data"):
        d = data["data"]
        lines += [f"Data: {d['task']} 16-shot train, seed {d['fewshot_seed']}: {d['n']} examples, {d['len_mean']} tokens "
                  f"on average (with the prompt positions), {d['len_min']}..{d['len_max']}; padded fraction "
                  f"1 bucket {d['buckets_1']['padded_fraction']}, 4 buckets {d['buckets_4']['padded_fraction']}.", ""]
    for name, ex in (data.get("export") or {}).items():
        if isinstance(ex, dict) and "fused_ops_graph_0" in ex:
            lines.append(f"Export {name}: {ex.get('wall_seconds')} s; graph_0 fused ops {ex['fused_ops_graph_0']}; "
                         f"parity max |ort - torch| {[f'{x:.1e}' for x in ex['parity_max_abs_diff']]}.")
    lines.append("")
    cells = data.get("cells", [])
    if cells:
        lines += ["| engine | precision | mode | pop | buckets | p50 ms | p90 ms | p99 ms | n | vs torch fp16+SDPA |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for c in cells:  # files of the first H100/H200 runs have no p99 (max_ms instead)
            lines.append(f"| {c['engine']} | {c['precision']} | {c['mode']} | {c['pop']} | {c['n_buckets']} | "
                         f"{_fmt(c['p50_ms'], 2)} | {_fmt(c['p90_ms'], 2)} | {_fmt(c.get('p99_ms'), 2)} | {c['n']} | "
                         f"{_fmt(c.get('speedup_vs_torch_fp16_sdpa'), 2)}x |")
        lines.append("")
    if data.get("prompt_upload_pop20"):
        up = data["prompt_upload_pop20"]
        lines += [(f"Copy of 20 candidates' float32 prompts ({up['bytes']} bytes, host -> {up['device']}: what the "
                   f"Engine does before a bound call on host prompts): p50 {up['p50_ms']} ms."), ""]
        if data.get("prompt_upload_pop20_fp16"):
            h = data["prompt_upload_pop20_fp16"]
            lines += [(f"The same for graphs that take float16 prompts (host cast, then {h['bytes']} bytes): p50 "
                       f"{h['p50_ms']} ms; the cast alone (engine.host_cast) p50 {data['host_cast_pop20']['p50_ms']} ms."),
                      ""]
    elif data.get("host_fp16_cast_pop20"):  # run 11 and before timed a cast the Engine does not do (float32 graphs)
        cast = data["host_fp16_cast_pop20"]["p50_ms"]
        lines += [(f"Host float32 -> float16 cast of 20 candidates' prompts: p50 {cast} ms (not a step of the Engine: "
                   "its graphs take float32 prompts)."), ""]
    if data.get("ratios"):
        head = ("Best ORT fp16 vs best PyTorch fp16 + SDPA (each over modes and bucketings; `_from_z`: from candidates z "
                "projected on the device, as a tune runs):")
        lines += [head, ""]
        for k, r in data["ratios"].items():
            lines.append(f"- {k}: {r}")
        lines.append("")
    if data.get("tune"):
        cols = ("tune run", "calls", "wall s", "setup s", "ask/tell s", "projection s", "scoring s", "session-run s",
                "checkpoint s", "test acc", "dev acc", "provider", "cuda graph", "prompts on device", "blas threads",
                "cma eigen", "variant")
        lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        for name, r in data["tune"].items():
            if not isinstance(r, dict) or "wall_seconds" not in r:
                continue
            t = r.get("timing_seconds") or {}
            cols = [_fmt(r.get("wall_seconds"))] + [_fmt(t.get(k)) for k in (
                "setup", "ask_tell", "projection", "scoring", "session_run_seconds", "checkpoint")]
            lines.append(f"| {name} | {r.get('calls')} | {' | '.join(cols)} | "
                         f"{_fmt((r.get('test') or {}).get('metric'), 3)} | {_fmt((r.get('dev') or {}).get('metric'), 3)} | "
                         f"{r.get('provider')} | {r.get('cuda_graph')} | {r.get('projection_on_device', '-')} | "
                         f"{r.get('blas_threads', '-')} | {r.get('cma_eigen', '-')} | "
                         f"{r.get('variant', 'packed' if r.get('packed') else '-')} |")
        lines.append("")
        for name, r in data["tune"].items():
            if isinstance(r, dict) and r.get("setup_seconds"):
                t = r.get("timing_seconds") or {}
                lines.append(f"- {name} set-up by phase (s): {r['setup_seconds']}; sessions by graph (s): "
                             f"{r.get('session_open_seconds')}; checkpoints written on the "
                             f"background thread: {_fmt(t.get('checkpoint_background'))} s; dev evaluations "
                             f"{_fmt(t.get('eval'))} s; final evaluation {_fmt(t.get('final_eval'))} s")
        lines.append("")
    if data.get("attention_kernels"):
        ak = data["attention_kernels"]
        rows = [f"{kern}: pop 1 {row['pop1']['p50_ms']} ms, pop 20 {row['pop20']['p50_ms']} ms"
                + (f", attention {row['kernel_split']['ms_per_call_by_class'].get('attention')} ms of "
                   f"{row['kernel_split']['gpu_ms_per_call']} ms GPU time" if row.get("kernel_split") else "")
                + f", logits differ from the first by {row.get('max_abs_diff_vs_first', float('nan')):.3g}"
                for kern, row in ak["kernels"].items()]
        lines += [f"ONNX Runtime's attention kernels on {ak['mode']} (p50; `CLIPTUNE_ATTENTION`): " + "; ".join(rows)
                  + f". The tunes used: {ak.get('used_for_tunes', 'auto')}.", ""]
    if data.get("concurrent_graphs", {}).get("measured") is False:
        cc = data["concurrent_graphs"]
        how = "at once" if cc["used_for_clip"] else "in turn"
        lines += [f"clip's K graph calls: {how}, as asked (--concurrent-graphs {cc['asked']}; not measured here).", ""]
    elif data.get("concurrent_graphs"):
        cc = data["concurrent_graphs"]
        lines += [f"One clip generation (K = {cc['k']} graphs x {cc['pop']} candidates, scored): graphs in turn "
                  f"p50 {cc['sequential']['p50_ms']} ms, at once (a thread each) p50 {cc['concurrent']['p50_ms']} ms "
                  f"(x{cc['speedup']}); losses differ by at most {cc['max_abs_loss_diff']:.3g}; the clip tune ran them "
                  f"{'at once' if cc.get('used_for_clip') else 'in turn'}.", ""]
    if data.get("session_open"):
        so = data["session_open"]
        lines += [f"Opening the tune export ({so['pinned_bytes'] / 2**30:.2f} GiB pinned): sha256 of every file "
                  f"{so['verify_full_s']} s, through the verified-hash cache {so['verify_cached_s']} s; sessions "
                  f"(graph, s) {[(o['graph'], o['s']) for o in so['opens_shared_weights']]} (graph 0 first, then again, "
                  f"same mapped weights); graph 0 with freshly mapped weights {so['graph0_fresh_weights_s']} s; by ORT "
                  f"optimisation level {so['graph0_by_optimization_s']}; ORT's profile of the first open (ms) "
                  f"{so.get('ort_first_open_ms')}.", ""]
        dw = so.get("device_weights")
        if dw:
            lines += [f"Shared tensors as device OrtValues (CLIPTUNE_DEVICE_WEIGHTS=1) against host ones, clip with "
                      f"{dw['graphs']} graphs: sessions {dw['on']['sessions_s']} s against {dw['off']['sessions_s']} s, "
                      f"GPU memory {dw['on']['gpu_memory_mib']} MiB against {dw['off']['gpu_memory_mib']} MiB, "
                      f"{dw['on']['device_values']} tensors on the device; losses differ by at most "
                      f"{dw['max_abs_loss_diff']:.3g}.", ""]
    if data.get("cma_blas"):
        c = data["cma_blas"]
        lines += [f"CMA-ES ask/tell on this host (d {c['d']}, population {c['popsize']}, {c['generations']} "
                  f"generations, {c['cores']} cores): ms per generation by BLAS threads {c['ms_per_gen']}; "
                  f"the tune runs used {c['chosen_threads']}.", ""]
    if data.get("targets"):
        lines += ["Targets (issue):", ""]
        for k, t in data["targets"].items():
            lines.append(f"- {k}: {t}")
        lines.append("")
    if data.get("profile"):
        p = data["profile"]
        lines += [f"ORT placement (fp16 graph 0): {p.get('nodes_by_provider')}; Memcpy nodes {p.get('memcpy_nodes')}.", ""]
    for key in ("profile", "profile_packed"):
        ot = (data.get(key) or {}).get("op_time")
        if ot:
            lines += [f"Kernel time per stacked call ({'packed' if ot['packed'] else str(ot['n_buckets']) + ' buckets'}, "
                      f"pop {ot['pop']}, ORT profiler, mean of {ot['calls']} calls): {ot['kernel_ms_per_call']} ms of "
                      f"kernels in {ot['wall_ms_per_call_profiled']} ms wall (profiled); by op: "
                      + ", ".join(f"{k} {v} ms" for k, v in list(ot["ms_per_call_by_op"].items())[:8]) + ".", ""]
    for label, ks in (data.get("kernel_split") or {}).items():
        lines += [f"GPU time of one stacked call (pop 20), {label}: {ks['gpu_ms_per_call']} ms of kernels in "
                  f"{ks['wall_ms_per_call_profiled']} ms wall (profiled); by class {ks['ms_per_call_by_class']}.", ""]
    if data.get("parity"):
        lines += [f"GPU parity (pop 20, 4 buckets; packed: 1 call, vs torch fp32): {data['parity']}", ""]
    for e in data.get("errors", []):
        lines.append(f"- ERROR {e['section']}: {e['error'][:300]}")
    return "\n".join(lines) + "\n"


def attention_kernels_cell(model_dir: Path, device: str, mode: str, kernels=("auto", "efficient"),
                           prompts_path: str | None = None, iters: int = 20, warmup: int = 3,
                           split: bool = True) -> dict:
    """One export's calls (1 and 20 candidates x the SST-2 set, ``mode`` as in :func:`make_engine`) with each
    of ONNX Runtime's attention kernels (``CLIPTUNE_ATTENTION``, the CUDA provider's ``sdpa_kernel``; the CPU
    provider has one kernel): p50/p90/p99, the kernels' GPU time by class (``split``), the logits on the
    parity prompts (``prompts_path``, .npy) and their largest difference from the first kernel's."""
    import numpy as np

    from cliptune_ort.manifest import load_manifest

    model_dir = Path(model_dir)
    man = load_manifest(model_dir)
    enc, verb = fewshot(model_dir)
    parity = np.load(prompts_path) if prompts_path else None
    rng = np.random.default_rng(0)
    timed = {pop: (rng.standard_normal((pop, man.n_prompt, man.hidden)) * man.embedding_std).astype(np.float32)
             for pop in (1, 20)}
    out: dict = {"mode": mode, "model_dir": model_dir.name, "kernels": {}}
    first = None
    for kern in kernels:
        with harness.env_var("CLIPTUNE_ATTENTION", kern):
            eng = make_engine(model_dir, device, mode)
        try:
            fb = eng.prepare(enc, 1 if man.packed else 4)
            row: dict = {"provider": eng.provider, "attention": eng.attention}
            for pop, pr in timed.items():
                row[f"pop{pop}"] = summarize(time_iters(lambda pr=pr, eng=eng, fb=fb: eng.logits(0, pr, fb, verb),
                                                        warmup, iters))
            if split and device == "cuda":
                row["kernel_split"] = kernel_split(lambda eng=eng, fb=fb: eng.logits(0, timed[20], fb, verb), 5, True)
            if parity is not None:
                logits = eng.logits(0, parity, fb, verb).copy()
                first = logits if first is None else first
                row["max_abs_diff_vs_first"] = float(np.max(np.abs(logits - first)))
                row["logits"] = logits.tolist()
            out["kernels"][kern] = row
        finally:
            eng.close()
    return out


def qkv_projection_cell(device: str, iters: int = 30) -> dict:
    """The short_qkv layouts' one QKV projection ([45,400, 1024] x [1024, 3072] fp16 on CUDA) as FusedDense with its
    bias epilogue, against ORT's plain MatMul of the same shape (benchmarks/fused_dense.py's cases "qkv" and
    "qkv_plain", CUDA graphs): ``qkv_bias_cost_ms_p50`` per layer is the most that adding the query bias inside
    the attention kernel could save (run 10's kernel split: the biased projection ran at about 655 TFLOP/s, the
    plain output projections at about 700)."""
    import fused_dense

    return fused_dense.measure(["qkv", "qkv_plain"], device, iters=iters)


def cell_in_child(func: str, kwargs: dict, device: str, timeout_s: float) -> dict:
    """``gpu.<func>(**kwargs)`` in a fresh process (CUDA libraries loaded first on a GPU): new native code or
    an experimental mode that breaks the CUDA context must not end the run. Returns its JSON result."""
    code = ("import json, sys; sys.path.insert(0, sys.argv[2]); import gpu; "
            "gpu.load_cuda_libraries() if sys.argv[3] == 'cuda' else None; "
            f"print(json.dumps(gpu.{func}(**json.loads(sys.argv[1]))))")
    return harness.run_json_subprocess(["-c", code, json.dumps(kwargs), str(Path(__file__).resolve().parent), device],
                                       timeout_s=timeout_s)


def attention_section(model_dir: Path, mode: str, device: str, parity_prompts, work: Path, iters: int, warmup: int,
                      timeout_s: float, kernels=("auto", "efficient")):
    """:func:`attention_kernels_cell` in a child process (a kernel that broke the CUDA context must not end the
    run): (its result without the logits, the cells it adds (mode ``<mode>+<kernel>``), the logits on the
    parity prompts by parity key ``ort_fp16_<mode>+<kernel>``)."""
    import numpy as np

    np.save(work / "parity_prompts.npy", parity_prompts)
    cell_args = {"model_dir": str(model_dir), "device": device, "mode": mode, "kernels": list(kernels),
                 "prompts_path": str(work / "parity_prompts.npy"), "iters": iters, "warmup": warmup}
    ak = cell_in_child("attention_kernels_cell", cell_args, device, timeout_s)
    new_cells, logits = [], {}
    for kern, row in ak["kernels"].items():
        name = f"{ak['mode']}+{kern}"
        logits[f"ort_fp16_{name}"] = np.asarray(row.pop("logits"), dtype=np.float32)
        for pop in (1, 20):
            new_cells.append({"engine": "ort", "precision": "fp16", "mode": name, "pop": pop, "n_buckets": 1,
                              "provider": row["provider"], "attention_kernel": kern, "padded_fraction": 0.0,
                              "concurrent_export": False, **row[f"pop{pop}"]})
    return ak, new_cells, logits


def smoke_cell(model_dir, device: str, mode: str, eval_sets: bool = True) -> dict:
    """One call of 20 and one of 1 candidate through a fresh engine (``mode`` as in :func:`make_engine`): the
    layout loads and runs, and its logits are finite; ``eval_sets``: then the dev and test sets once, as a
    tune's evaluations run them (their metrics with no prompt)."""
    import numpy as np

    from cliptune_ort.manifest import load_manifest

    man = load_manifest(model_dir)
    enc, verb = fewshot(Path(model_dir))
    eng = make_engine(Path(model_dir), device, mode)
    try:
        fb = eng.prepare(enc, 1 if man.packed else 4)
        out = {}
        for pop in (20, 1):
            pr = (np.random.default_rng(pop).standard_normal((pop, man.n_prompt, man.hidden))
                  * man.embedding_std).astype(np.float32)
            t = time.perf_counter()
            lg = eng.logits(0, pr, fb, verb)
            out[f"pop{pop}_first_call_s"] = round(time.perf_counter() - t, 3)
            out[f"pop{pop}_finite"] = bool(np.isfinite(lg).all())
    finally:
        eng.close()
    if eval_sets:  # the shapes a tune's dev and final evaluations run (the SST-2 dev and test sets, chunked)
        from cliptune_ort.config import build_config
        from cliptune_ort.tuner import evaluate, prepare

        kw = {"task": TASK, "method": "bbt", "device": device, "plot": False}
        if mode.endswith("_cg"):
            kw["cuda_graph"] = True
        ws = prepare(build_config(**kw), Path(model_dir))
        try:
            t = time.perf_counter()
            for name, batch in (("dev", ws.dev), ("test", ws.test)):
                out[f"{name}_metric"] = evaluate(ws, None, batch)["metric"] if batch is not None else None
            out["eval_sets_s"] = round(time.perf_counter() - t, 3)
        finally:
            ws.engine.close()
    return out


#: row lengths for ragged_kernel_check: the short-row kernel's tile edges (16 / 17, 64 / 65), SST-2's longest
#: row and the 128 maximum in one call; then a call with rows over 128 tokens (the long-row kernel); then 700
#: rows of 1 to 128 tokens (drawn, seed 5), more (row, head) items than the pipelined kernel's blocks (impl 2:
#: 2 per multiprocessor), so that each block's loop runs several items of different lengths through both stages
RAGGED_CHECK_LENS = ((1, 15, 16, 17, 63, 64, 65, 106, 112, 127, 128), (150, 3, 129),
                     tuple(random.Random(5).choices(range(1, 129), k=700)))


def attention_by_row(q, k, v, lens, heads: int, head: int, scale: float):
    """numpy attention within each packed row (row r: tokens cu[r] .. cu[r] + lens[r]) and head, float32."""
    import numpy as np

    cu = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
    out = np.empty((int(cu[-1]), heads * head), np.float32)
    for r, n in enumerate(lens):
        rows = slice(cu[r], cu[r] + n)
        for h in range(heads):
            cols = slice(h * head, (h + 1) * head)
            qs, ks, vs = (x[rows, cols].astype(np.float32) for x in (q, k, v))
            sc = qs @ ks.T * scale
            p = np.exp(sc - sc.max(axis=1, keepdims=True))
            out[rows, cols] = (p / p.sum(axis=1, keepdims=True)) @ vs
    return out


def ragged_kernel_check(device: str, work: str, heads: int = 4, lens_sets=RAGGED_CHECK_LENS) -> dict:
    """RaggedAttention with impl 1 (cliptune's short-row kernel, its long-row one past 128 tokens) and impl 2 (the
    short-row kernel pipelined) on rows of edge lengths, with separate Q, K, V and with one QKV tensor (qkv = 1;
    also read through token_rows, its rows shuffled, with a query bias), against numpy attention per row and
    head. CUDA: fp16 through the custom-op library (``CLIPTUNE_OPS_DIR``); CPU: the library's fp32 loop (which
    ignores impl). ``ok_impl``: passed, per impl."""
    import numpy as np
    from cliptune_export.projection import IR_VERSION
    from onnx import TensorProto, helper, save

    from cliptune_ort.sessions import SessionSpec, make_session

    dt, et = (np.float16, TensorProto.FLOAT16) if device == "cuda" else (np.float32, TensorProto.FLOAT)
    head = 64
    hidden = heads * head
    scale = 1.0 / np.sqrt(head)
    rng = np.random.default_rng(11)
    out: dict = {"device": device, "heads": heads, "cases": []}
    for lens in lens_sets:
        lens_a = np.asarray(lens, np.int32)
        tokens = int(lens_a.sum())
        cu = np.concatenate([[0], np.cumsum(lens_a)]).astype(np.int32)
        for qkv in (0, 1):
            packed = rng.standard_normal((tokens, 3 * hidden)).astype(dt)
            q, k, v = packed[:, :hidden], packed[:, hidden:2 * hidden], packed[:, 2 * hidden:]
            want = attention_by_row(q, k, v, lens, heads, head, scale)
            names = ["qkv"] * 3 if qkv else ["q", "k", "v"]
            base = {"len": lens_a, "rag": cu * hidden, "off": np.zeros((len(lens), max(lens)), np.int32)}
            base.update({"qkv": packed} if qkv else {"q": np.ascontiguousarray(q), "k": np.ascontiguousarray(k),
                                                     "v": np.ascontiguousarray(v)})
            # one QKV tensor also through token_rows (the shared-prefix first layer), its rows shuffled, token t
            # reading row perm[t], and with a query bias added first (q_bias): attention of (Q + b, K, V), the sum
            # rounded to the tensors' type as the kernels round it
            for mapped in (False, True) if qkv else (False,):
                feeds, want_case = dict(base), want
                if mapped:
                    perm = rng.permutation(tokens).astype(np.int32)
                    shuffled = np.empty_like(packed)
                    shuffled[perm] = packed
                    qb = (rng.standard_normal(hidden) * 0.5).astype(dt)
                    feeds.update(qkv=shuffled, rows=perm, qb=qb)
                    want_case = attention_by_row((q.astype(np.float32) + qb.astype(np.float32)).astype(dt), k, v,
                                                 lens, heads, head, scale)
                for impl in (1, 2):
                    node = helper.make_node("RaggedAttention",
                                            [*names, "len", "rag", "off", *(["rows", "qb"] if mapped else [])],
                                            ["o"], domain="ai.cliptune", num_heads=heads, scale=float(scale),
                                            impl=impl, qkv=qkv)
                    width = 3 * hidden if qkv else hidden
                    ins = [helper.make_tensor_value_info(n, et, ["tokens", width]) for n in dict.fromkeys(names)]
                    ins += [helper.make_tensor_value_info("len", TensorProto.INT32, ["rows"]),
                            helper.make_tensor_value_info("rag", TensorProto.INT32, ["rows_plus_1"]),
                            helper.make_tensor_value_info("off", TensorProto.INT32, ["rows", "seq"])]
                    if mapped:
                        ins += [helper.make_tensor_value_info("rows", TensorProto.INT32, ["tokens"]),
                                helper.make_tensor_value_info("qb", et, [hidden])]
                    graph = helper.make_graph([node], "ragged_check", ins, [helper.make_tensor_value_info("o", et, None)])
                    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                                     helper.make_opsetid("ai.cliptune", 1)])
                    model.ir_version = IR_VERSION  # onnx's default (its newest IR) is more than the card's ORT 1.31 reads
                    path = Path(work) / f"ragged_check_{len(lens)}_{qkv}_{int(mapped)}_{impl}.onnx"
                    save(model, str(path))
                    sess = make_session(path, SessionSpec(device=device, threads=1, ops_library=device))
                    got = sess.run(None, feeds)[0].astype(np.float32)
                    err = float(np.abs(got - want_case).max()) if np.isfinite(got).all() else float("inf")
                    out["cases"].append({"impl": impl, "qkv": qkv, "token_rows": mapped, "q_bias": mapped,
                                         "provider": sess.get_providers()[0],
                                         "lens": list(lens) if len(lens) <= 16
                                         else f"{len(lens)} rows of {min(lens)} to {max(lens)} tokens",
                                         "max_abs_err": err})
                    del sess
    out["max_abs_err"] = max(c["max_abs_err"] for c in out["cases"])
    out["tolerance"] = 4e-3 if device == "cuda" else 1e-4
    out["ok_impl"] = {str(i): all(c["max_abs_err"] <= out["tolerance"] for c in out["cases"] if c["impl"] == i)
                      for i in (1, 2)}
    out["ok"] = all(out["ok_impl"].values())
    return out


def smoke_in_child(model_dir, device: str, mode: str, timeout_s: float) -> dict:
    """:func:`smoke_cell` in a child process; raises where the child fails or the logits are not finite."""
    out = cell_in_child("smoke_cell", {"model_dir": str(model_dir), "device": device, "mode": mode}, device,
                        timeout_s)
    if not (out.get("pop20_finite") and out.get("pop1_finite")):
        raise RuntimeError(f"{mode} gave non-finite logits: {out}")
    return out


# ---------------------------------------------------------------- CMA-ES on the host


def concurrent_graphs_cell(model_dir: Path, device: str, cuda_graph: bool, k: int = 4, iters: int = 20,
                           workers: int = 0) -> dict:
    """One clip generation (the K thinned graphs x 20 candidates x the SST-2 set, scored) with the K graph
    calls in turn and at once (``CLIPTUNE_CONCURRENT_GRAPHS``: one thread per graph, overlapping on the
    card's streams): p50/p90/p99 of each, and the largest loss difference (0 expected)."""
    import numpy as np

    from cliptune_ort.config import build_config
    from cliptune_ort.engine import Engine
    from cliptune_ort.tuner import prepare, score

    out: dict = {"k": k, "pop": 20, "cuda_graph": cuda_graph}
    losses = {}
    kw = dict(task=TASK, method="clip", k=k, device=device, plot=False, workers=workers)
    if cuda_graph:
        kw["cuda_graph"] = True
    cfg = build_config(**kw)
    for flag in ("0", "1"):
        with harness.env_var("CLIPTUNE_CONCURRENT_GRAPHS", flag):
            ws = prepare(cfg, Path(model_dir))
        try:
            p = ws.prompts(np.random.default_rng(3).standard_normal((20, cfg.d)))
            for _ in range(Engine.WARM_RUNS):  # new shapes run (and are captured) in turn first
                score(ws, p)
            out["concurrent" if flag == "1" else "sequential"] = summarize(
                time_iters(lambda ws=ws, p=p: score(ws, p), warmup=1, iters=iters))
            losses[flag] = score(ws, p)
        finally:
            ws.engine.close()
    out["max_abs_loss_diff"] = float(np.max(np.abs(losses["0"] - losses["1"])))
    out["speedup"] = round(out["sequential"]["p50_ms"] / out["concurrent"]["p50_ms"], 3)
    return out


def cma_blas_threads(gens: int = 100, d: int = 500, pop: int = 20, counts=(1, 2, 4, 8)) -> dict:
    """ms per CMA-ES generation (ask + tell, the package's optimiser, toy fitness) with numpy's BLAS
    limited to each thread count (up to this process's cores); pycma's eigendecomposition of the
    d x d covariance is most of it. The count for the tune runs: the fastest, if > 10 % faster than 1."""
    import numpy as np
    from threadpoolctl import threadpool_limits

    from cliptune_ort.optim import make_optimizer

    cores = len(os.sched_getaffinity(0))
    out: dict = {"d": d, "popsize": pop, "generations": gens, "cores": cores, "ms_per_gen": {}}
    for n in [c for c in counts if c <= cores]:
        with threadpool_limits(limits=n, user_api="blas"):
            opt = make_optimizer("cma", d, pop, 1.0, 42)
            rng = np.random.default_rng(0)
            for g in range(10 + gens):  # 10 warm-up generations: BLAS threads started, first decompositions
                if g == 10:
                    t = time.perf_counter()
                z = opt.ask()
                opt.tell(z, rng.standard_normal(pop))
            out["ms_per_gen"][n] = round((time.perf_counter() - t) / gens * 1e3, 3)
    ms = out["ms_per_gen"]
    best = min(ms, key=ms.get)
    out["chosen_threads"] = best if ms[best] < 0.9 * ms[1] else 1
    return out


@contextlib.contextmanager
def blas_threads_for_tune(n: int):
    """numpy's BLAS on ``n`` threads during a tune run. The package keeps one thread unless the user set
    OPENBLAS_NUM_THREADS (tuner.blas_threads), so set that for the run, limit, and restore both."""
    if n <= 1:
        yield
        return
    from threadpoolctl import threadpool_limits

    with harness.env_var("OPENBLAS_NUM_THREADS", str(n)), threadpool_limits(limits=n, user_api="blas"):
        yield


# ---------------------------------------------------------------- main


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"), help="results folder (small files only)")
    ap.add_argument("--work", default="/tmp/cliptune_gpu_work", help="exports and run dirs (large; never --out)")
    ap.add_argument("--quick", action="store_true", help="5 timed calls per cell, 1,000-call tune runs")
    ap.add_argument("--cpu-dry-run", action="store_true", help="tiny random RoBERTa, CPU provider, 2 timed calls")
    ap.add_argument("--skip", default="",
                    help="comma list: export,torch,ort,fp32,packed,flash,moe,attention,kernels,profile,cma,concurrent,bbt,"
                         "clip,session_open,from_z,qkv")
    ap.add_argument("--layouts", default="",
                    help="comma list of packed layouts to copy and time (default: all but the moe one; "
                         f"{', '.join(PACKED_LAYOUTS)})")
    ap.add_argument("--padded-modes", default="run,iobinding,cuda_graph",
                    help="modes timed on the padded fp16 graph (iobinding is needed for the packed layouts' "
                         "parity check)")
    ap.add_argument("--moe", action="store_true",
                    help="also time the packed_host_flash_moe layout (78.6 ms against 62.3 ms for packed_host_flash_cg "
                         "at pop 20 on an H100, run 5)")
    ap.add_argument("--iters", type=int, default=0, help="timed calls per cell (default 15; quick 5; dry run 2)")
    ap.add_argument("--budget", type=int, default=0, help="tune budget in calls (default 8000; quick 1000; dry 100)")
    ap.add_argument("--tune-seed", type=int, default=42, help="seed of the tune runs (few-shot sample, A, CMA-ES)")
    ap.add_argument("--cma-eigen", default="auto", choices=("auto", "sync", "ahead"),
                    help="CMA-ES's eigendecomposition schedule of the tune runs (TuneConfig.cma_eigen; auto: ahead "
                         "on CUDA)")
    ap.add_argument("--eigen-ab", action="store_true",
                    help="after the tunes, the bbt tune again with cma_eigen sync (tune 'bbt_sync'): both schedules "
                         "on the same host")
    ap.add_argument("--tune-variant", default="auto", choices=("auto", *TUNE_VARIANTS),
                    help="fp16 variant of the tune runs; auto: the fastest at pop 20 whose parity was sound")
    ap.add_argument("--concurrent-graphs", default="measure", choices=("measure", "on", "off"),
                    help="clip's K graph calls at once (on) or in turn (off) without the 20 s concurrent cell; "
                         "measure: that cell decides (x1.018 and x1.021 at once on an H100, runs 8 and 10, losses "
                         "exact)")
    ap.add_argument("--deadline", type=float, default=345.0,
                    help="seconds for the whole script; a tune run that would not fit gets a smaller budget (flagged)")
    ap.add_argument("--no-overlap", action="store_true", help="do not time PyTorch fp32 while the exports run")
    ap.add_argument("--fp16-dir", help="use this fp16 export (K>=4) instead of exporting")
    ap.add_argument("--fp16-k", type=int, default=4, help="thinned graphs of the fp16 export (clip tune needs 4)")
    ap.add_argument("--tag", default="", help="suffix of the result files (gpu_<device>_<tag>.json)")
    ap.add_argument("--fp32-dir", help="use this fp32 export instead of exporting")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    cpu = args.cpu_dry_run
    skip = {s.strip() for s in args.skip.split(",") if s.strip()} | (set() if args.moe else {"moe"})
    layouts = {s.strip() for s in args.layouts.split(",") if s.strip()}
    if layouts - set(PACKED_LAYOUTS):
        raise SystemExit(f"--layouts: unknown {sorted(layouts - set(PACKED_LAYOUTS))}; known: {', '.join(PACKED_LAYOUTS)}")
    padded_modes = {s.strip() for s in args.padded_modes.split(",") if s.strip()}
    iters = args.iters or (2 if cpu else 5 if args.quick else 15)
    warmup = 1 if cpu else 3
    budget = args.budget or (100 if cpu else 1000 if args.quick else 8000)
    device = "cpu" if cpu else "cuda"
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)

    import numpy as np
    import torch  # before onnxruntime (ORT's CUDA provider reuses torch's CUDA/cuDNN libraries)

    import onnxruntime as ort

    if cpu:
        torch.set_num_threads(1)  # the dry run's 2 shared cores: fewer threads, less noise
    if not cpu and (problem := load_cuda_libraries()):
        log(problem)
    dev = device_info(cpu)
    res = Results(Path(args.out), slugify(dev["name"]) + (f"_{slugify(args.tag)}" if args.tag else ""))
    res.data.update({"device": dev, "versions": versions(), "device_kind": device,
                     "args": vars(args), "iters": iters, "warmup": warmup, "budget": budget,
                     # FusedDense's algorithm choice (cliptune_ort/native/fused_dense.cc): 1 = cuBLASLt's first
                     "fused_dense_algos": int(os.environ.get("CLIPTUNE_FUSED_DENSE_ALGOS") or 1),
                     "model": "random-weight RoBERTa, " + ", ".join(f"{k}={v}" for k, v in (TINY if cpu else LARGE).items())
                     + ", vocab 30522 (splade-tiny's WordPiece tokenizer), L=50",
                     "definitions": {
                         "call": "one candidate set (pop 1 or 20 prompts, stacked) scored on the 32 SST-2 train "
                                 "examples: one session run (ORT) or forward (torch) per length bucket; prompts "
                                 "copied from the host every call, logits copied back",
                         "n_buckets": "1 = one batch padded to the longest example; 4 = length-sorted buckets, "
                                      "each padded to its own longest",
                         "ort modes": "run = session.run with numpy feeds; iobinding = token inputs resident on "
                                      "the device, prompts copied into a bound buffer; cuda_graph = iobinding + "
                                      "one captured CUDA graph per (bucket, pop) shape (the package's Engine); "
                                      "packed = the fp16 export with packed attention (RemovePadding / "
                                      "PackedAttention / RestorePadding, export/packing.py): iobinding, the whole "
                                      "set in one call, no padded token computed up to the last layer; "
                                      "packed_host(_cg) = the same with the packing offsets fed by the host "
                                      "(no RemovePadding; IOBinding, or CUDA graphs); *_flash = the same layouts "
                                      "with the flash kernel (Q/K/V projections + PackedMultiHeadAttention "
                                      "without biases: FlashAttention varlen; export --packed-kernel flash); "
                                      "*_moe = the same with each packed layer's feed-forward block as one "
                                      "single-expert com.microsoft.MoE node (tanh GELU; ORT 1.31.1 runs CUTLASS grouped "
                                      "GEMMs and a separate activation kernel; pack_export(ffn='moe'); --moe); "
                                      "*_lt = the same with cliptune's FusedDense op for the feed-forward bias + "
                                      "GELU and the query bias (cuBLASLt epilogues, tanh GELU; export --packed-ffn "
                                      "cublaslt; the CUDA build of the custom-op library); *_ltres = *_lt with "
                                      "each output projection's bias and residual in the FusedDense epilogue, then "
                                      "LayerNormalization in place of SkipLayerNormalization (--packed-ffn "
                                      "cublaslt_res); *_cudnn_* / *_short_* = cliptune's RaggedAttention in place "
                                      "of PackedMultiHeadAttention, with cuDNN's fused attention (impl 0) or "
                                      "cliptune's kernel for rows of up to 128 tokens (impl 1; --packed-kernel "
                                      "short); *_shortqkv_* the same on one QKV projection; *_pipeqkv_* that "
                                      "kernel pipelined (impl 2; --packed-kernel pipe_qkv); *_ltpa = *_lt with "
                                      "cliptune's PackAdd making the first packed layer's input; *_ltpa_spqb = "
                                      "*_ltpa with the first layer's QKV projection run once per candidate on the "
                                      "[CLS] + prompt positions its examples share (export --share-prefix) and every "
                                      "QKV projection a plain MatMul, RaggedAttention adding the query bias "
                                      "(pack_export(qbias=True)); *_spqb16 = the same also taking float16 prompts "
                                      "(export --prompt-dtype float16)",
                         "torch": "ContractModel(hf_layers=True): the HF layers' own attention (eager or SDPA), "
                                  "the same gather-at-mask head and last layer at the mask as the export; "
                                  "torch.backends.cuda.matmul.allow_tf32 left at its default (see versions)",
                         "speedup_vs_torch_fp16_sdpa": "torch fp16+SDPA p50 / this cell's p50, same pop and "
                                                       "bucketing, same run"}})
    if not cpu and "CUDAExecutionProvider" not in ort.get_available_providers():
        # no silent CPU fallback: the ORT sections are skipped, the exports and PyTorch still measured
        res.data["errors"].append({"section": "onnxruntime", "error": "no CUDAExecutionProvider in "
                                   f"{ort.get_available_providers()} ({ort.__file__}): install onnxruntime-gpu into "
                                   "PYTHONPATH; ORT cells and tune runs skipped"})
        skip |= {"ort", "profile", "bbt", "clip"}
        log(res.data["errors"][-1]["error"])
    res.save()
    log(f"device {dev['name']}; ORT {ort.__version__} {ort.get_available_providers()}; torch {torch.__version__}")

    # ------------------------------------------------ 1. exports (children), torch fp32 meanwhile
    shape = TINY if cpu else LARGE
    src = make_src(work, shape)
    fp16_dir = Path(args.fp16_dir) if args.fp16_dir else work / f"export_fp16_k{args.fp16_k}"
    fp32_dir = Path(args.fp32_dir) if args.fp32_dir else work / "export_fp32_k0"
    all_cores = set(os.sched_getaffinity(0))
    overlap = (not cpu) and (not args.no_overlap) and len(all_cores) >= 8 and "export" not in skip \
        and "torch" not in skip
    main_cores = set(sorted(all_cores)[:2]) if overlap else None
    export_cores = set(sorted(all_cores)[2:]) if overlap else None
    procs: dict = {}
    res.data["export"] = {"overlapped_with_torch_fp32": overlap}

    def finish_exports():
        for name, (p, t0, out) in list(procs.items()):
            rc = p.wait()
            info = {"wall_seconds": round(time.perf_counter() - t0, 1), "returncode": rc,
                    "cores": len(export_cores) if export_cores else len(all_cores)}
            logf = work / f"export_{name}.log"
            shutil.copy(logf, Path(args.out) / f"gpu_export_{name}.log")
            if rc == 0:
                try:
                    info.update(graph_stats(out))
                except Exception as e:
                    res.error(f"export {name} stats", e)
            else:
                res.data["errors"].append({"section": f"export {name}",
                                           "error": logf.read_text(errors="replace")[-3000:]})
            res.data["export"][name] = info
            log(f"export {name}: rc {rc}, {info['wall_seconds']} s, {info.get('fused_ops_graph_0')}")
            del procs[name]
        res.save()

    if "export" not in skip:
        jobs = []
        if not args.fp16_dir:
            jobs.append(("fp16", fp16_dir, dict(k=args.fp16_k, precision="fp16")))
        if not args.fp32_dir and "fp32" not in skip:
            jobs.append(("fp32", fp32_dir, dict(k=0, precision="fp32")))
        for name, out, opts in jobs:
            log(f"export {name} -> {out} (child process, {len(export_cores or all_cores)} cores)")
            procs[name] = (start_export(src, out, work / f"export_{name}.log", export_cores, **opts),
                           time.perf_counter(), out)
            if not overlap:  # one at a time, in the foreground
                finish_exports()

    # the batch every cell scores: SST-2 16-shot train of seed 13, tokenised as the export will be
    enc, verb = fewshot_from_src(src, work)
    res.data["data"] = data_info(enc)
    res.save()
    cells = res.data["cells"]
    rng = np.random.default_rng(0)

    def prompts_for(pop, hidden, std):
        return (rng.standard_normal((pop, 50, hidden)) * std).astype(np.float32)

    # a generation as a tune makes it: candidates z [pop, 500] and BBT's random projection A [500, 50 * hidden]
    # (prompts of about the embeddings' spread), projected on the device by each engine (FROM_Z)
    z_rng = np.random.default_rng(7)
    projections: dict = {}

    def z_for(pop):
        return z_rng.standard_normal((pop, D_Z)).astype(np.float32)

    def at_for(hidden, std):  # one array per hidden size: an Engine takes one projection, by reference
        if hidden not in projections:
            projections[hidden] = (np.random.default_rng(8).standard_normal((D_Z, 50 * hidden))
                                   * (std / np.sqrt(D_Z))).astype(np.float32)
        return projections[hidden]

    def exporting() -> bool:
        return any(p.poll() is None for p, _, _ in procs.values())

    # ------------------------------------------------ 2. torch
    m32 = m16 = None
    emb_std = None
    tcalls: dict = {}
    hidden = shape["hidden_size"]
    if "torch" not in skip:
        try:
            threads0 = torch.get_num_threads()
            if main_cores:
                os.sched_setaffinity(0, main_cores)
                torch.set_num_threads(len(main_cores))
            log("torch: building the models (the export's random weights: init seed 0)")
            m32, m16, impl = build_torch(src, device)
            res.data["torch_attention_fp16"] = impl
            emb_std = float(m32.embeddings.word_embeddings.weight.detach().float().std())
            for nb in (1, 4):
                tc = TorchCall(m32, enc, verb, nb, device)
                for pop in (1, 20):
                    pr = prompts_for(pop, hidden, emb_std)
                    busy = exporting()
                    s = time_iters(lambda: tc(pr), warmup, iters)
                    cells.append({"engine": "torch", "precision": "fp32", "mode": "eager", "attention": "eager",
                                  "pop": pop, "n_buckets": nb, "concurrent_export": busy or exporting(),
                                  **summarize(s)})
                    log(f"torch fp32 eager pop {pop} buckets {nb}: p50 {cells[-1]['p50_ms']} ms")
                    res.save()
            tcalls["fp32_4"] = TorchCall(m32, enc, verb, 4, device)
            res.data["sections_done"].append("torch_fp32")
        except Exception as e:
            res.error("torch fp32", e)
        finally:
            if main_cores:
                os.sched_setaffinity(0, all_cores)
                torch.set_num_threads(threads0)
    finish_exports()
    for d in (fp16_dir, fp32_dir):  # the export's own tokenisation must be the batch timed above
        if (d / "manifest.json").is_file():
            e2, v2 = fewshot(d)
            same = e2.ids.shape == enc.ids.shape and bool((e2.ids == enc.ids).all()) and bool((v2 == verb).all())
            res.data["data"]["same_as_export_tokenisation"] = same
            if not same:
                enc, verb = e2, v2
                res.data["data"] = {**data_info(enc), "same_as_export_tokenisation": False}
            break

    # the packed copy of the fp16 export (graph rewrite only; runs on the CUDA provider only)
    packed_dirs = {name: work / f"{fp16_dir.name}_{name}" for name in PACKED_LAYOUTS}
    packed_dir = packed_dirs["packed"]
    for name, (host, kernel, ffn) in PACKED_LAYOUTS.items():
        pdir = packed_dirs[name]
        if "packed" in skip or not (fp16_dir / "manifest.json").is_file():
            break
        if (kernel == "flash" and "flash" in skip) or (ffn == "moe" and "moe" in skip):
            continue
        if layouts and name not in layouts:
            continue
        try:
            from cliptune_export.packing import pack_export

            t = time.perf_counter()
            pman = pack_export(fp16_dir, pdir, overwrite=True, host_offsets=host, kernel=kernel, ffn=ffn,
                               **LAYOUT_OPTIONS.get(name, {}))
            res.data["export"][name] = {"wall_seconds": round(time.perf_counter() - t, 1), "kernel": kernel, "ffn": ffn,
                                        "front": pman["packed_front"], "shared_prefix": pman["shared_prefix"],
                                        "prompt_dtype": pman["prompt_dtype"], "q_bias": pman["packed_q_bias"],
                                        "packed_attention_nodes": [g["packed_attention_nodes"] for g in pman["graphs"]]}
            log(f"{name} copy of the fp16 export in {res.data['export'][name]['wall_seconds']} s")
        except Exception as e:
            res.error(f"pack {name}", e)

    # torch fp16 + SDPA, timed with the machine to itself (the ratios' baseline)
    if "torch" not in skip and m16 is not None:
        try:
            at_dev = None if "from_z" in skip else torch.from_numpy(at_for(hidden, emb_std)).to(device)
            for nb in (1, 4):
                tc = TorchCall(m16, enc, verb, nb, device)
                for pop in (1, 20):
                    pr = prompts_for(pop, hidden, emb_std)
                    s = time_iters(lambda: tc(pr), warmup, iters)
                    cells.append({"engine": "torch", "precision": "fp16" if not cpu else "bf16", "mode": "sdpa",
                                  "attention": res.data.get("torch_attention_fp16"), "pop": pop, "n_buckets": nb,
                                  "concurrent_export": False, **summarize(s)})
                    log(f"torch fp16 sdpa pop {pop} buckets {nb}: p50 {cells[-1]['p50_ms']} ms")
                    if at_dev is not None:
                        z = z_for(pop)
                        s = time_iters(lambda tc=tc, z=z: tc.from_z(z, at_dev), warmup, iters)
                        cells.append({**cells[-1], "mode": "sdpa" + FROM_Z, "from_z": True, **summarize(s)})
                        log(f"torch fp16 sdpa{FROM_Z} pop {pop} buckets {nb}: p50 {cells[-1]['p50_ms']} ms")
                    res.save()
            tcalls["fp16_4"] = TorchCall(m16, enc, verb, 4, device)
            del at_dev
            res.data["sections_done"].append("torch_fp16")
        except Exception as e:
            res.error("torch fp16", e)

    # ------------------------------------------------ 3. ORT through the package's Engine
    from cliptune_ort.manifest import LIBRARY_KERNELS, OWN_KERNELS, load_manifest

    engine_ok: dict = {}
    parity_prompts = None
    parity_out: dict = {}
    # what the Engine does before a bound call on host prompts: copy them, float32 [20, 50, hidden] (the graphs take
    # float32 and cast on the device), into the bound device buffer; the from-z cells send z [20, 500] instead
    pr20 = np.random.default_rng(9).standard_normal((20, 50, hidden)).astype(np.float32)
    up20 = ort.OrtValue.ortvalue_from_numpy(np.zeros_like(pr20), "cuda" if device == "cuda" else "cpu", 0)
    res.data["prompt_upload_pop20"] = {"bytes": pr20.nbytes, "device": device,
                                       **summarize(time_iters(lambda: up20.update_inplace(pr20), warmup, iters))}
    # the same for graphs that take float16 prompts (*_ltpasp16): the host cast (engine.host_cast), then 2 MB
    from cliptune_ort.engine import host_cast

    up16 = ort.OrtValue.ortvalue_from_numpy(np.zeros(pr20.shape, np.float16), "cuda" if device == "cuda" else "cpu", 0)
    res.data["prompt_upload_pop20_fp16"] = {
        "bytes": pr20.nbytes // 2, "device": device,
        **summarize(time_iters(lambda: up16.update_inplace(host_cast(pr20, np.float16)), warmup, iters))}
    res.data["host_cast_pop20"] = summarize(time_iters(lambda: host_cast(pr20, np.float16), warmup, iters))
    up20 = up16 = None  # their 6 MB on the device
    # cliptune's attention kernels on rows of edge lengths against numpy, before any layout uses them (a child
    # process: new native code must not end the run)
    if device == "cuda" and any(load_manifest(d).packed_kernel in OWN_KERNELS for d in packed_dirs.values()
                                if (d / "manifest.json").is_file()):
        try:
            rk = cell_in_child("ragged_kernel_check", {"device": device, "work": str(work)}, device, 120)
            res.data["ragged_kernel_check"] = rk
            log(f"RaggedAttention impl 1, 2 on edge row lengths: max abs error {rk['max_abs_err']:.3g} "
                f"(tolerance {rk['tolerance']}): " + ", ".join(f"impl {i} {'ok' if ok else 'WRONG'}"
                                                               for i, ok in rk["ok_impl"].items()))
            if not rk["ok"]:
                res.error("ragged kernel check", RuntimeError(f"max abs error {rk['max_abs_err']} over "
                                                             f"{rk['tolerance']}: {rk['cases']}"))
        except Exception as e:  # noqa: BLE001 - recorded; the layouts' own smoke tests still run
            res.error("ragged kernel check", e)
        res.save()
    for precision, mdir in (("fp16", fp16_dir), ("fp32", fp32_dir), *(("fp16", d) for d in packed_dirs.values())):
        if "ort" in skip or (precision == "fp32" and "fp32" in skip) or not (mdir / "manifest.json").is_file():
            continue
        man = load_manifest(mdir)
        std = man.embedding_std
        if parity_prompts is None:
            parity_prompts = prompts_for(20, man.hidden, std)
        modes = [m for m in ("run", "iobinding", "cuda_graph") if m in padded_modes
                 and (m != "cuda_graph" or device == "cuda")]
        if precision == "fp32":
            modes = ["iobinding"]
        if man.packed:
            if device != "cuda":  # RemovePadding / PackedAttention exist on the CUDA provider only
                res.data["packed_note"] = "packed-attention cells need the CUDA provider: not run on the CPU"
                continue
            layout = next(n for n, d in packed_dirs.items() if d == mdir)
            modes = [layout, layout + "_cg"] if man.host_packing else [layout]
            if man.packed_kernel in LIBRARY_KERNELS or man.packed_front == "fused":  # new native code: a crash
                # must not end the run
                try:
                    smoke = smoke_in_child(mdir, device, modes[-1], timeout_s=120)
                    res.data.setdefault("smoke", {})[layout] = smoke
                    log(f"{layout}: smoke test in a child process {smoke}")
                except Exception as e:
                    res.error(f"smoke {layout}", e)
                    continue
        for mode in modes:
            try:
                t = time.perf_counter()
                eng = make_engine(mdir, device, mode)
                setup = round(time.perf_counter() - t, 2)
                log(f"ORT {precision} {mode}: engine on {eng.provider} in {setup} s")
                for nb in ((1,) if man.packed else (1, 4)):
                    fb = eng.prepare(enc, nb)
                    for pop in (1, 20):
                        pr = prompts_for(pop, man.hidden, std)
                        s = time_iters(lambda: eng.logits(0, pr, fb, verb), warmup, iters)
                        cells.append({"engine": "ort", "precision": precision, "mode": mode, "pop": pop, "n_buckets": nb,
                                      "provider": eng.provider, "session_setup_s": setup,
                                      "padded_fraction": 0.0 if man.packed else round(fb.padded_fraction, 4),
                                      "concurrent_export": False, **summarize(s)})
                        log(f"ORT {precision} {mode} pop {pop} buckets {nb}: p50 {cells[-1]['p50_ms']} ms")
                        if "from_z" not in skip and eng.iobinding and precision == "fp16":
                            eng.enable_projection(at_for(man.hidden, std))  # the same array: a no-op again
                            z = z_for(pop)
                            s = time_iters(lambda eng=eng, z=z, fb=fb: eng.logits(0, eng.project(z), fb, verb), warmup, iters)
                            cells.append({**cells[-1], "mode": mode + FROM_Z, "from_z": True,
                                          "prompts_on_device": eng.projects_on_device(pop), **summarize(s)})
                            log(f"ORT {precision} {mode}{FROM_Z} pop {pop} buckets {nb}: p50 {cells[-1]['p50_ms']} ms "
                                f"(prompts made on the device: {cells[-1]['prompts_on_device']})")
                        res.save()
                    if (nb == 4 and mode in ("iobinding", "run")) or mode.startswith("packed"):
                        parity_out[f"ort_{precision}_{mode}"] = eng.logits(0, parity_prompts, fb, verb).copy()
                engine_ok[(precision, mode)] = True
                eng.close()
                del eng
            except Exception as e:
                engine_ok[(precision, mode)] = False
                res.error(f"ort {precision} {mode}", e)
        res.data["sections_done"].append(f"ort_{precision}" + (f"_{mdir.name}" if man.packed else ""))
        res.save()
    # ONNX Runtime's other attention kernel on the fastest packed flash layout (CUDA graphs, pop 20, as timed
    # above): its memory-efficient (CUTLASS) kernel in place of FlashAttention (run 7: the flash kernel took
    # 6.9 of the 53 ms of a stacked call)
    flash_cg = {name: c["p50_ms"] for c in cells for name, (host, kernel, ffn) in PACKED_LAYOUTS.items()
                if host and kernel == "flash" and ffn != "moe" and c["engine"] == "ort" and c["pop"] == 20
                and c["mode"] == name + "_cg"}
    attention_layout = min(flash_cg, key=flash_cg.get) if flash_cg else None
    if "attention" not in skip and device == "cuda" and attention_layout and parity_prompts is not None:
        try:
            ak, new_cells, logits = attention_section(packed_dirs[attention_layout], attention_layout + "_cg", device,
                                                      parity_prompts, work, iters, warmup,
                                                      timeout_s=max(60.0, args.deadline - elapsed() - 200))
            cells.extend(new_cells)
            parity_out.update(logits)
            for kern, row in ak["kernels"].items():
                log(f"ORT fp16 {ak['mode']}+{kern}: pop 1 {row['pop1']['p50_ms']} ms, pop 20 {row['pop20']['p50_ms']} "
                    f"ms, logits vs {next(iter(ak['kernels']))} {row.get('max_abs_diff_vs_first', float('nan')):.3g}"
                    + (f", kernels {row['kernel_split']['ms_per_call_by_class']}" if "kernel_split" in row else ""))
            res.data["attention_kernels"] = ak
            res.data["sections_done"].append("attention")
        except Exception as e:
            res.error("attention", e)
        res.save()
    res.data["providers_that_ran"] = sorted({c["provider"] for c in cells if c.get("provider")})

    # where the GPU time of one stacked call (pop 20) goes, by kernel class
    if "kernels" not in skip:
        splits = res.data.setdefault("kernel_split", {})
        pr20 = None
        # the padded graph in 4 buckets, then every packed layout (host-packed ones under CUDA graphs)
        split_cells = [("ort_fp16_iobinding_4buckets", fp16_dir, "iobinding", 4)]
        for name, (host, _, _) in PACKED_LAYOUTS.items():
            mode = name + "_cg" if host else name
            split_cells.append((f"ort_fp16_{mode}", packed_dirs[name], mode, 1))
        for label, mdir, mode, nb in split_cells:
            if "ort" in skip or not (mdir / "manifest.json").is_file():
                continue
            man = load_manifest(mdir)
            if man.packed and device != "cuda":
                continue
            try:
                pr20 = prompts_for(20, man.hidden, man.embedding_std) if pr20 is None else pr20
                eng = make_engine(mdir, device, mode)
                fb = eng.prepare(enc, nb)
                splits[label] = kernel_split(lambda: eng.logits(0, pr20, fb, verb), 5, device == "cuda")
                log(f"kernels {label}: {splits[label]['gpu_ms_per_call']} ms/call {splits[label]['ms_per_call_by_class']}")
                eng.close()
                del eng
            except Exception as e:
                res.error(f"kernels {label}", e)
        if device == "cuda" and "qkv" not in skip:  # the QKV projection with and without its bias epilogue
            try:
                qp = cell_in_child("qkv_projection_cell", {"device": device}, device, 180)
                res.data["qkv_projection"] = qp
                log(f"QKV projection: FusedDense + bias {qp['cases'].get('qkv_lt_bias_cg', {}).get('p50_ms')} ms, "
                    f"ORT MatMul {qp['cases'].get('qkv_plain_ort_plain_cg', {}).get('p50_ms')} ms a layer; bias cost "
                    f"{qp.get('qkv_bias_cost_ms_p50')} ms")
            except Exception as e:  # noqa: BLE001 - recorded
                res.error("qkv projection", e)
        if m16 is not None and pr20 is not None:
            try:
                tc = TorchCall(m16, enc, verb, 4, device)
                splits["torch_fp16_sdpa_4buckets"] = kernel_split(lambda: tc(pr20), 5, device == "cuda")
                log(f"kernels torch: {splits['torch_fp16_sdpa_4buckets']['ms_per_call_by_class']}")
            except Exception as e:
                res.error("kernels torch", e)
        res.save()

    # parity on the device: ORT / torch fp16 vs torch fp32 (same weights, same prompts)
    try:
        if parity_prompts is not None and "fp32_4" in tcalls:
            ref = tcalls["fp32_4"](parity_prompts)
            if "fp16_4" in tcalls:
                parity_out["torch_fp16_sdpa"] = tcalls["fp16_4"](parity_prompts)
            par = {}
            for k, v in parity_out.items():
                par[k] = {"max_abs_diff": round(float(np.max(np.abs(v - ref))), 5),
                          "argmax_agreement": round(float(np.mean(np.argmax(v, -1) == np.argmax(ref, -1))), 4)}
            res.data["parity"] = par
            res.save()
    except Exception as e:
        res.error("parity", e)
    # free the torch models before the tune runs
    tcalls.clear()
    m16 = m32 = tc = None  # noqa: F841
    if device == "cuda":
        torch.cuda.empty_cache()

    # ratios
    def best(engine, precision, pop, modes=None, from_z=False):
        cs = [c for c in cells if c["engine"] == engine and c["precision"] == precision and c["pop"] == pop
              and (modes is None or c["mode"] in modes) and bool(c.get("from_z")) == from_z]
        return min(cs, key=lambda c: c["p50_ms"]) if cs else None

    fp16_name = "fp16" if not cpu else "bf16"
    for c in cells:
        ref = [x for x in cells if x["engine"] == "torch" and x["precision"] == fp16_name and x["pop"] == c["pop"]
               and x["n_buckets"] == c["n_buckets"] and bool(x.get("from_z")) == bool(c.get("from_z"))]
        if ref:
            c["speedup_vs_torch_fp16_sdpa"] = round(ref[0]["p50_ms"] / c["p50_ms"], 3)
    ratios = {}
    for from_z in (False, True):
        for pop in (1, 20):
            t, o = best("torch", fp16_name, pop, from_z=from_z), best("ort", "fp16", pop, from_z=from_z)
            if t and o:
                ratios[f"pop{pop}" + ("_from_z" if from_z else "")] = {
                    "torch_fp16_sdpa_ms": t["p50_ms"], "torch_buckets": t["n_buckets"], "ort_fp16_ms": o["p50_ms"],
                    "ort_mode": o["mode"], "ort_buckets": o["n_buckets"], "speedup": round(t["p50_ms"] / o["p50_ms"], 3)}
    res.data["ratios"] = ratios
    res.save()

    # ------------------------------------------------ 4. placement profile
    if "profile" not in skip and (fp16_dir / "manifest.json").is_file():
        try:
            res.data["profile"] = profile_placement(fp16_dir, device, enc, verb, work)
            res.data["sections_done"].append("profile")
            log(f"profile: {res.data['profile']['nodes_by_provider']} memcpy {res.data['profile']['memcpy_nodes']}")
            log(f"profile op time (pop 20, 4 buckets): {res.data['profile']['op_time']}")
        except Exception as e:
            res.error("profile", e)
        res.save()
        if device == "cuda" and (packed_dir / "manifest.json").is_file():
            try:
                res.data["profile_packed"] = profile_placement(packed_dir, device, enc, verb, work)
                log(f"profile op time (packed, pop 20): {res.data['profile_packed']['op_time']}")
            except Exception as e:
                res.error("profile packed", e)
            res.save()

    # ------------------------------------------------ 5. CMA-ES ask/tell vs BLAS threads
    blas = 1
    if "cma" not in skip:
        try:
            res.data["cma_blas"] = cma_blas_threads(gens=10 if cpu else 100)
            blas = res.data["cma_blas"]["chosen_threads"]
            log(f"cma ask/tell ms per generation by BLAS threads: {res.data['cma_blas']['ms_per_gen']}; "
                f"tune runs use {blas}")
            res.data["sections_done"].append("cma")
        except Exception as e:
            res.error("cma", e)
        res.save()

    # ------------------------------------------------ 6. tune runs (package API, full budget)
    from cliptune_ort.config import build_config
    from cliptune_ort.tuner import tune

    # the fastest sound fp16 variant at pop 20 scores the tune runs (or --tune-variant), timed as a tune calls it:
    # the generation from candidates z projected on the device (the +z cell), else on host prompts (--skip from_z)
    def p50_of(mode, nb):
        def cell(m):
            return next((c["p50_ms"] for c in cells if c["engine"] == "ort" and c["precision"] == "fp16"
                         and c["mode"] == m and c["pop"] == 20 and c["n_buckets"] == nb), None)

        z = cell(mode + FROM_Z)
        return z if z is not None else cell(mode)

    par = res.data.get("parity") or {}

    def sound(key):  # a packed layout's logits as close to PyTorch fp32 as the padded fp16 graph's
        pk, io = par.get(key), par.get("ort_fp16_iobinding")
        return bool(pk and io and pk["argmax_agreement"] >= io["argmax_agreement"]
                    and pk["max_abs_diff"] <= 2 * io["max_abs_diff"] + 1e-3)

    variants = {  # name: (model dir, cuda_graph, pop-20 p50 ms, usable)
        "padded": (fp16_dir, False, p50_of("iobinding", 4), True),
        "padded_cg": (fp16_dir, True, p50_of("cuda_graph", 4), bool(engine_ok.get(("fp16", "cuda_graph")))),
        **{name: (packed_dirs[layout], cg, p50_of(name, 1),
                  layout_usable(PACKED_LAYOUTS[layout][1], sound(f"ort_fp16_{name}"), device,
                                res.data.get("ragged_kernel_check")))
           for name, (layout, cg) in TUNE_VARIANTS.items() if layout},
    }
    if args.tune_variant != "auto":
        chosen = args.tune_variant
    elif device != "cuda":
        chosen = "padded"
    else:
        ok = {k: v[2] for k, v in variants.items() if v[3] and v[2] is not None}
        chosen = min(ok, key=ok.get) if ok else "padded"
    tune_dir, use_cg, per_gen, _ = variants[chosen]
    per_gen = per_gen or variants["padded"][2]  # ms per graph and generation
    use_packed = chosen.startswith("packed")
    res.data["tune_variant"] = {"asked": args.tune_variant, "used": chosen,
                                "basis": "pop 20 from z where timed (as the tunes call), else host prompts",
                                "candidates": {k: {"pop20_ms": v[2], "usable": v[3]} for k, v in variants.items()}}
    # ONNX Runtime's attention kernel for the tunes: the measured one that is at least 2% faster at pop 20 on
    # the chosen variant and as close to PyTorch fp32 as the padded graph (else ORT's own choice)
    attention = "auto"
    ak = res.data.get("attention_kernels")
    if ak and ak["mode"] == chosen and "auto" in ak["kernels"]:
        base = ak["kernels"]["auto"]["pop20"]["p50_ms"]
        fast = {kern: row["pop20"]["p50_ms"] for kern, row in ak["kernels"].items()
                if kern != "auto" and row["pop20"]["p50_ms"] <= 0.98 * base and sound(f"ort_fp16_{chosen}+{kern}")}
        attention = min(fast, key=fast.get) if fast else "auto"
        ak["used_for_tunes"] = attention
    res.data["tune_variant"]["attention"] = attention
    # clip's K graph calls in turn or at once (measured here; the clip tune takes the faster if exact)
    use_concurrent = False
    if args.concurrent_graphs != "measure":  # decided by an earlier run's cell (its speed-up and exact losses)
        use_concurrent = device == "cuda" and args.concurrent_graphs == "on"
        res.data["concurrent_graphs"] = {"asked": args.concurrent_graphs, "used_for_clip": use_concurrent,
                                         "measured": False}
    elif "concurrent" not in skip and "clip" not in skip and (tune_dir / "manifest.json").is_file() \
            and load_manifest(tune_dir).k >= 2:
        try:
            # in a child process: an experimental threading mode that broke the CUDA context must not take
            # the tune runs down with it
            cell_args = {"model_dir": str(tune_dir), "device": device, "cuda_graph": use_cg,
                         "k": min(4, load_manifest(tune_dir).k), "iters": 3 if cpu else 20, "workers": 1 if cpu else 0}
            with harness.env_var("CLIPTUNE_ATTENTION", attention):
                cc = cell_in_child("concurrent_graphs_cell", cell_args, device,
                                   max(60.0, args.deadline - elapsed() - 120))
            use_concurrent = device == "cuda" and cc["max_abs_loss_diff"] == 0.0 and cc["speedup"] >= 1.02
            cc["used_for_clip"] = use_concurrent
            res.data["concurrent_graphs"] = cc
            log(f"clip generation, K={cc['k']} graphs in turn {cc['sequential']['p50_ms']} ms, at once "
                f"{cc['concurrent']['p50_ms']} ms (x{cc['speedup']}, loss diff {cc['max_abs_loss_diff']:.3g}); "
                f"clip tune {'at once' if use_concurrent else 'in turn'}")
            res.data["sections_done"].append("concurrent")
        except Exception as e:
            res.error("concurrent", e)
        res.save()
    runs = [("bbt", "bbt", args.cma_eigen), ("clip", "clip", args.cma_eigen)]
    if args.eigen_ab:  # the same bbt run with pycma's own schedule, for the comparison on this host
        runs.append(("bbt_sync", "bbt", "sync"))
    for name, method, eigen in runs:
        if method in skip or not (tune_dir / "manifest.json").is_file():
            continue
        nets = 4 if method == "clip" else 1
        if load_manifest(tune_dir).k < nets:
            res.data["tune"][name] = {"skipped": f"the fp16 export has K={load_manifest(tune_dir).k} < {nets}"}
            continue
        b = budget
        note = None
        if per_gen and not cpu:
            gens = budget / 20
            # set-up (sessions of graph 0 and the K thinned graphs, data) + generations + final evaluation
            # (run 10, H100: bbt 25.1 s and clip 90.2 s measured, 2.9 s of set-up and final evaluation, ask/tell 6
            # ms a generation; the old estimate, 8 + 3 s per session and 20 ms, said 40.4 and 116.7 s)
            fixed = 4.0 + 1.5 * (nets + (1 if method == "clip" else 0))
            est = fixed + gens * (nets * per_gen / 1e3 + 0.01)
            left = args.deadline - elapsed()
            res.data["tune"].setdefault("estimates_s", {})[name] = round(est, 1)
            if est > left:
                b = max(400, int(max(0.0, left - fixed) / (nets * per_gen / 1e3 + 0.02)) * 20)
                note = f"budget cut from {budget} to {b} calls to fit --deadline {args.deadline} s (estimate {est:.0f} s)"
                log(note)
        run_dir = work / f"run_{name}"
        try:
            kw = dict(task=TASK, method=method, device=device, seed=args.tune_seed, budget=b, plot=False,
                      cma_eigen=eigen)
            if method == "clip":
                kw["k"] = 4
            if use_cg:
                kw["cuda_graph"] = True
            cfg = build_config(**kw)
            concurrent = use_concurrent and method == "clip"
            log(f"tune {name}: budget {b} calls, variant {chosen} (cuda_graph {use_cg}, graphs at once {concurrent}, "
                f"attention kernel {attention}, cma_eigen {eigen})")
            with harness.env_var("CLIPTUNE_CONCURRENT_GRAPHS", "1" if concurrent else "0"), \
                    harness.env_var("CLIPTUNE_ATTENTION", attention), blas_threads_for_tune(blas):
                out = tune(cfg, run_dir, overwrite=True, progress=True, model_dir=tune_dir)
            keep = {k: out.get(k) for k in ("calls", "forward_passes", "generations", "wall_seconds", "timing_seconds",
                                            "provider", "cands_per_call", "train_padded_fraction", "n_buckets", "k",
                                            "train", "dev", "test", "stop_reason", "budget", "projection_on_device",
                                            "blas_threads", "cma_eigen", "setup_seconds", "session_open_seconds",
                                            "session_open_wall_seconds")}
            keep["cuda_graph"] = use_cg
            keep["concurrent_graphs"] = concurrent
            keep["attention_kernel"] = attention
            keep["packed"] = use_packed
            keep["variant"] = chosen
            keep["budget_note"] = note
            keep["seed"] = args.tune_seed
            res.data["tune"][name] = keep
            shutil.copy(run_dir / "result.json", Path(args.out) / f"gpu_tune_{name}_result.json")
            log(f"tune {name}: {out['wall_seconds']} s wall, {out['calls']} calls, test {out.get('test')}")
            res.data["sections_done"].append(f"tune_{name}")
        except Exception as e:
            res.error(f"tune {name}", e)
        res.save()

    # ------------------------------------------------ targets
    tg = {}
    for method, limit in (("bbt", 25.0), ("clip", 90.0)):
        r = res.data["tune"].get(method)
        if isinstance(r, dict) and r.get("wall_seconds") is not None:
            full = r.get("calls", 0) >= 8000
            tg[f"{method} 8,000-call run <= {limit:g} s"] = (
                f"{'PASS' if full and r['wall_seconds'] <= limit else 'FAIL'}: {r['wall_seconds']} s"
                + ("" if full else f" (only {r.get('calls')} calls)"))
    from_z_label = "stacked generation from candidates z, projected on the device (pop 20)"
    for key, want, label in (("pop20", 1.6, "stacked generation (pop 20)"), ("pop1", 2.0, "single candidate (pop 1)"),
                             ("pop20_from_z", 1.6, from_z_label)):
        r = ratios.get(key)
        if r:
            tg[f"{label} >= {want}x PyTorch fp16+SDPA"] = f"{'PASS' if r['speedup'] >= want else 'FAIL'}: {r['speedup']}x"
    res.data["targets"] = tg
    res.save()

    # ------------------------------------------------ 7. where a run's start goes (after the tunes, so
    # they see the same state as before, and after the targets are saved; benchmarks/session_open.py)
    if "session_open" not in skip and (tune_dir / "manifest.json").is_file():
        if args.deadline - elapsed() < 40:
            log("session_open skipped: too close to --deadline")
        else:
            try:
                from session_open import measure as measure_open

                so = measure_open(tune_dir, device, [0, 1])
                res.data["session_open"] = so
                log(f"session open ({chosen}): verify full {so['verify_full_s']} s / cached {so['verify_cached_s']} s, "
                    f"opens {[o['s'] for o in so['opens_shared_weights']]}, fresh weights "
                    f"{so['graph0_fresh_weights_s']}, by level {so['graph0_by_optimization_s']}, ORT "
                    f"{so.get('ort_first_open_ms')}")
                res.data["sections_done"].append("session_open")
            except Exception as e:
                res.error("session_open", e)
            res.save()

    res.data["status"] = "done" if not res.data["errors"] else "done with errors"
    res.save()
    log(f"done: {json.dumps(tg)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
