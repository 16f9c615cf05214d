"""Finding a model directory: a user's export, or the embedded splade-tiny exported on demand.

The export needs torch, which a tune process must never import: the embedded default is exported
by a *subprocess* (``python -m cliptune_export``) into a cache folder, once per (K, p, seed).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from .errors import ConfigError, ModelDirError
from .manifest import DEFAULT_INT8_WEIGHTS, MANIFEST_NAME

EMBEDDED_MODEL = Path(__file__).resolve().parent / "assets" / "models" / "splade-tiny"


def cache_dir() -> Path:
    """``$CLIPTUNE_CACHE`` or ``~/.cache/cliptune``."""
    env = os.environ.get("CLIPTUNE_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "cliptune"


#: version of the exporter's graphs in the cache tag: a newer package re-exports the embedded model once
#: instead of reusing an older cached export (2: single-query last layer, shared-prefix first layer; 3: the last
#: layer's attention-weighted sum as one product per row)
EXPORT_FORMAT = 3


def embedded_export_dir(k: int, p: float, seed: int = 0, precision: str = "fp32") -> Path:
    kind = "" if precision == "fp32" else f"_{precision}"
    if precision == "int8":  # the weights' format: an export cached with full-range int8 weights is not reused
        kind += f"-{DEFAULT_INT8_WEIGHTS}"
    tag = f"splade-tiny_k{k}_p{p:g}_s{seed}{kind}_f{EXPORT_FORMAT}"
    return cache_dir() / "exports" / tag


def export_subprocess(model: str | Path, out: Path, k: int, p: float, seed: int = 0,
                      extra: list[str] | None = None) -> None:
    """Run the export in a child process (the parent never imports torch)."""
    cmd = [sys.executable, "-m", "cliptune_export", str(model), "--out", str(out), "--k", str(k),
           "--p", repr(p), "--seed", str(seed), *(extra or [])]
    print(f"[cliptune] exporting {model} -> {out} (K={k}, p={p:g}); this happens once", file=sys.stderr, flush=True)
    try:  # the child's progress goes straight to our stderr where it is a file ...
        sys.stderr.fileno()
        target = sys.stderr
    except (AttributeError, OSError, ValueError):  # ... not in Jupyter or under captured streams: relay it after
        target = subprocess.PIPE
    res = subprocess.run(cmd, stdout=target, stderr=subprocess.PIPE, text=True)
    if target is subprocess.PIPE and res.stdout:
        sys.stderr.write(res.stdout)
    if res.returncode != 0:
        tail = (res.stderr or "").strip().splitlines()
        last = tail[-1] if tail else f"exit {res.returncode}"
        if "No module named 'torch'" in (res.stderr or "") or "No module named 'transformers'" in (res.stderr or ""):
            raise ModelDirError("exporting the embedded model needs the export extra (torch, transformers, onnx): "
                                "pip install torch==2.13.0 && pip install -e '.[export]', or pass --model-dir")
        raise ModelDirError(f"export of {model} failed: {last}")


def resolve_model_dir(model_dir: str | None, k: int, p: float, precision: str = "fp32") -> Path:
    """The model dir to use: the given one, or the embedded export (made now if missing)."""
    if model_dir is not None:
        path = Path(model_dir)
        if not path.exists():
            raise ModelDirError(f"model dir {path} does not exist: run `cliptune export MODEL --out {path}` first")
        return path
    k_export = max(4, k)
    out = embedded_export_dir(k_export, p, precision=precision)
    if not (out / MANIFEST_NAME).is_file():
        if not EMBEDDED_MODEL.is_dir():
            raise ModelDirError(f"the embedded model is missing at {EMBEDDED_MODEL}: reinstall cliptune-ort")
        extra = [] if precision == "fp32" else ["--precision", precision]
        out.parent.mkdir(parents=True, exist_ok=True)
        export_subprocess(EMBEDDED_MODEL, out, k_export, p, extra=extra)
        if not (out / MANIFEST_NAME).is_file():
            raise ConfigError(f"export finished but {out / MANIFEST_NAME} is missing")
    return out
