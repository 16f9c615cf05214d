"""A small shared benchmark harness: timing, percentiles, memory, machine info, model folders, writers.

Every benchmark script in this folder uses it so their JSON results look alike::

    {"benchmark": ..., "machine": machine_info(), "versions": versions(), "load": ..., "cells": [...]}

Timing (:func:`time_calls`): ``warmup`` untimed calls, then at least ``min_iters`` and at most
``max_iters`` timed calls, stopping early once ``max_seconds`` of timed calls have been spent; every
sample is kept. :func:`summarize` turns samples into n, p50/p90/p99/mean/min/max (ms) and a
throughput. Peak RSS is ``ru_maxrss`` of the (fresh) process that ran the cell.

Model folders are built on the fly in ``$CLIPTUNE_CACHE/bench`` (default ``~/.cache/cliptune/bench``):
the embedded splade-tiny, and random-weight RoBERTa base/large *shapes* (speed is a property of the
shape, not of the weights) with splade's WordPiece tokenizer, so real few-shot texts give real
lengths.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from cliptune_ort import bench

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
SPLADE = ROOT / "cliptune_ort" / "assets" / "models" / "splade-tiny"

#: RoBERTa shapes with random weights; vocab 30522 / pad 0 so splade's WordPiece files tokenise real text
ROBERTA_SHAPES = {
    "roberta-base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
    "roberta-large": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096),
}
SHAPES = ("splade-tiny", *ROBERTA_SHAPES)


# ---------------------------------------------------------------- machine, versions, load


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_flags() -> list[str]:
    """The SIMD features that decide which kernels ORT/PyTorch pick (AVX2, AVX-512, VNNI, BF16, AMX)."""
    from cliptune_ort.sessions import cpu_flags as read_flags

    flags = read_flags() or set()
    keep = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_int8")
    return [f for f in keep if f in flags]


def machine_info() -> dict[str, Any]:
    cores = os.cpu_count() or 1
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = cores
    mem_gb = None
    try:
        import psutil

        mem_gb = round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:
        pass
    return {"cpu_model": cpu_model(), "cpu_flags": cpu_flags(), "logical_cores": cores, "usable_cores": usable,
            "memory_gb": mem_gb, "platform": platform.platform(), "machine": platform.machine(),
            "load_average": load_average(), "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def versions(torch: bool = False) -> dict[str, str]:
    """Versions of what ran. torch/transformers are only imported when ``torch`` is asked for."""
    import onnxruntime as ort

    import cliptune_ort

    out = {"python": platform.python_version(), "numpy": np.__version__, "onnxruntime": ort.__version__,
           "cliptune_ort": cliptune_ort.__version__, "ort_providers": ",".join(ort.get_available_providers())}
    try:
        import cma

        out["cma"] = cma.__version__
    except ImportError:
        pass
    if torch:
        import torch as _t
        import transformers

        out["torch"] = _t.__version__
        out["torch_threads"] = str(_t.get_num_threads())
        out["transformers"] = transformers.__version__
    return out


def wait_for_quiet(max_load: float = 1.5, timeout_s: float = 900.0, poll_s: float = 15.0,
                   enabled: bool = True) -> dict[str, Any]:
    """Wait until the 1-minute load average is <= ``max_load`` (others share the machine).

    Returns what happened (load before/after, seconds waited); never raises: the load is recorded in
    the results either way, so a noisy run is visible as one.
    """
    t0 = time.monotonic()
    before = load_average()
    while enabled and os.getloadavg()[0] > max_load and time.monotonic() - t0 < timeout_s:
        time.sleep(poll_s)
    return {"load_before_wait": before, "load_after_wait": load_average(),
            "waited_s": round(time.monotonic() - t0, 1), "max_load": max_load,
            "quiet": os.getloadavg()[0] <= max_load}


# ---------------------------------------------------------------- timing and memory


def time_calls(fn: Callable[[], Any], warmup: int = 1, min_iters: int = 3, max_iters: int = 50,
               max_seconds: float = 30.0) -> list[float]:
    """Seconds per call of ``fn``: warm-up calls untimed, then timed calls (see module docstring); the
    package's own timer (``cliptune bench`` uses it too)."""
    return bench.time_calls(fn, warmup=warmup, min_calls=min_iters, max_calls=max_iters, seconds=max_seconds)


#: linear-interpolated percentile; n, p50/p90/p99/mean/min/max/std in ms and throughput (the package's own)
percentile = bench.percentile
summarize = bench.summarize


def peak_rss_mb() -> float:
    """Peak resident set size of this process image (VmHWM).

    Not ``ru_maxrss``: Linux keeps that across ``execve``, so a child started from a big parent would
    report the parent's peak. VmHWM belongs to the new address space. Falls back to ru_maxrss.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(kb / 1024 if sys.platform != "darwin" else kb / 2**20, 1)


def rss_mb() -> float:
    """Current resident set size (psutil when present, else /proc/self/statm)."""
    try:
        import psutil

        return round(psutil.Process().memory_info().rss / 2**20, 1)
    except ImportError:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return round(pages * os.sysconf("SC_PAGE_SIZE") / 2**20, 1)


def run_json_subprocess(args: list[str], timeout_s: float | None = None, env: dict | None = None) -> dict:
    """Run ``python args...`` in a fresh process; its last stdout line is the JSON result."""
    cmd = [sys.executable, *args]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env)
    if res.returncode != 0:
        tail = "\n".join(res.stderr.strip().splitlines()[-15:])
        raise RuntimeError(f"{' '.join(cmd)} failed (exit {res.returncode}):\n{tail}")
    lines = [x for x in res.stdout.strip().splitlines() if x.strip()]
    return json.loads(lines[-1])


# ---------------------------------------------------------------- writers


def results_path(name: str) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    return RESULTS / name


def write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1, sort_keys=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def fmt(v: Any, digits: int = 1) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        return f"{v:,.{digits}f}"
    return str(v)


def markdown_table(rows: list[dict], columns: list[tuple]) -> str:
    """rows -> a GitHub table; columns are (key, header) or (key, header, decimals)."""
    head = "| " + " | ".join(c[1] for c in columns) + " |"
    sep = "|" + "|".join("---" for _ in columns) + "|"

    def cell(r, c):
        v = r.get(c[0])
        return v if isinstance(v, str) else fmt(v, c[2] if len(c) > 2 else 1)

    body = ["| " + " | ".join(cell(r, c) for c in columns) + " |" for r in rows]
    return "\n".join([head, sep, *body])


def machine_line(payload: dict) -> str:
    m, v = payload["machine"], payload["versions"]
    vers = ", ".join(f"{k} {v[k]}" for k in ("onnxruntime", "torch", "transformers", "numpy", "python") if k in v)
    return (f"Machine: {m['cpu_model']} ({m['usable_cores']} cores, {m.get('memory_gb')} GB; "
            f"{', '.join(m['cpu_flags'])}); {vers}. Load average at start {m['load_average']}"
            + (f", at end {payload['load_end']}" if "load_end" in payload else "") + f"; {m['time_utc']}.")


def write_markdown(path: Path, title: str, payload: dict, sections: list[tuple[str, str]]) -> None:
    """A results page: title, machine line, then (heading, body) sections."""
    parts = [f"# {title}", "", machine_line(payload), ""]
    for head, body in sections:
        if head:
            parts += [f"## {head}", ""]
        parts += [body, ""]
    path.write_text("\n".join(parts), encoding="utf-8")


# ---------------------------------------------------------------- model folders


@contextlib.contextmanager
def env_var(name: str, value: str):
    """The environment variable ``name`` set to ``value`` inside the block, restored (or removed) after."""
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def bench_cache() -> Path:
    from cliptune_ort.models import cache_dir

    path = cache_dir() / "bench"
    path.mkdir(parents=True, exist_ok=True)
    return path


def roberta_config(shape: dict):
    """A RobertaConfig of ``shape`` (hidden_size, layers, heads, ...) with splade's WordPiece vocabulary size and
    special ids, so its tokenizer files tokenise real text for it."""
    from transformers import RobertaConfig

    return RobertaConfig(**{"vocab_size": 30522, "max_position_embeddings": 514, "pad_token_id": 0,
                            "bos_token_id": 101, "eos_token_id": 102, "type_vocab_size": 1, **shape})


def roberta_src(shape: str) -> Path:
    """A folder with the config of a RoBERTa shape (random weights are drawn at export) + splade's tokenizer."""
    out = bench_cache() / "src" / shape
    if (out / "config.json").is_file():
        return out
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    roberta_config(ROBERTA_SHAPES[shape]).save_pretrained(tmp)
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        if (SPLADE / f).is_file():
            shutil.copy(SPLADE / f, tmp / f)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


def model_source(shape: str) -> tuple[str, dict]:
    """(model path, ExportOptions kwargs) of a benchmark shape."""
    if shape == "splade-tiny":
        return str(SPLADE), {}
    if shape in ROBERTA_SHAPES:
        return str(roberta_src(shape)), {"random_init": True, "init_seed": 0, "tokenizer": str(SPLADE)}
    raise ValueError(f"unknown shape {shape!r}: expected one of {', '.join(SHAPES)}")


def export_dir(shape: str, k: int = 4, precision: str = "fp32", p: float = 0.1, seed: int = 0,
               int8_weights: str | None = None) -> Path:
    """The model dir of ``shape`` exported with K thinned graphs at ``precision`` (made once, cached).

    ``precision`` is fp32 | fp16 | int8, or ``int8fix``: the name the committed results use for the
    current int8 recipe (MatMul only, at-mask tail fp32), which is now simply the exporter's int8.
    ``int8_weights`` (int8 only): the weights' format (manifest.INT8_WEIGHTS; None = the exporter's default),
    part of the cache name. The export runs in a child process so the caller's memory and thread pools stay clean.
    """
    from cliptune_ort.manifest import DEFAULT_INT8_WEIGHTS
    from cliptune_ort.models import (
        EXPORT_FORMAT,  # a newer exporter's graphs get a new cache entry
    )

    is_int8 = precision in ("int8", "int8fix")
    if int8_weights is not None and not is_int8:
        raise ValueError(f"int8_weights={int8_weights!r} needs an int8 precision, got {precision!r}")
    weights = (int8_weights or DEFAULT_INT8_WEIGHTS) if is_int8 else None
    kind = precision + (f"-{weights}" if weights else "")
    out = bench_cache() / "exports" / f"{shape}_k{k}_p{p:g}_s{seed}_{kind}_f{EXPORT_FORMAT}"
    if (out / "manifest.json").is_file():
        return out
    if precision not in ("fp32", "fp16", "int8", "int8fix"):
        raise ValueError(f"precision {precision!r}: expected fp32, fp16, int8 or int8fix")
    model, extra = model_source(shape)
    code = ("import sys, json; from cliptune_export import ExportOptions, export_model; "
            "a = json.loads(sys.argv[1]); export_model(a.pop('model'), a.pop('out'), ExportOptions(**a))")
    args = {"model": model, "out": str(out), "k": k, "p": p, "seed": seed, "overwrite": True,
            "precision": "int8" if precision == "int8fix" else precision, **extra,
            **({"int8_weights": weights} if weights else {})}
    print(f"[bench] exporting {shape} K={k} {kind} -> {out}", file=sys.stderr, flush=True)
    res = subprocess.run([sys.executable, "-c", code, json.dumps(args)],
                         stdout=sys.stderr, stderr=subprocess.PIPE, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"export of {shape} ({precision}) failed: {res.stderr.strip()[-2000:]}")
    return out


def fewshot_batch(model_dir: Path, task: str, seed: int = 42, split: str = "train"):
    """(Encoded [n, seq] of the real few-shot ``split`` of ``task``, verbalizer ids [labels], manifest).

    The BBT protocol of the package (16 per class, seeded), rendered with the task's template and the
    model dir's tokenizer: the exact batch a tune run scores every candidate on.
    """
    from cliptune_ort.data import load_fewshot
    from cliptune_ort.encoding import PromptTokenizer
    from cliptune_ort.manifest import load_manifest
    from cliptune_ort.tasks import get_task

    manifest = load_manifest(model_dir)
    spec = get_task(task)
    few = load_fewshot(spec, seed)
    ptok = PromptTokenizer(manifest.tokenizer_path, manifest.data["tokenizer"], manifest.n_prompt,
                           manifest.data["placeholder_ids"], int(manifest.data["model"]["max_positions"]))
    enc = ptok.encode(spec.template, getattr(few, split))
    verb = ptok.verbalizer_ids(spec.verbalizer, "first")
    return enc, verb, manifest


def length_stats(enc) -> dict[str, Any]:
    lengths = np.asarray(enc.lengths)
    return {"n": int(lengths.size), "seq_padded": int(enc.ids.shape[1]), "mean_len": round(float(lengths.mean()), 1),
            "min_len": int(lengths.min()), "max_len": int(lengths.max())}
