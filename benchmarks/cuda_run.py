"""Run a script with ONNX Runtime's CUDA libraries loaded first, for scripts that do not import torch
themselves (benchmarks/accuracy.py on the lent GPU machine; gpu_run.sh calls this when GPU_SCRIPT is set):

    python benchmarks/cuda_run.py benchmarks/accuracy.py --device cuda --tasks dbpedia ...

onnxruntime-gpu there reuses the CUDA and cuDNN libraries that torch's wheels ship, so torch is imported
first when it is installed, then ``onnxruntime.preload_dlls()``; then the script runs as ``__main__``
with the remaining arguments. Whether the CUDA provider really loaded is the runtime's check: a run asked
for ``--device cuda`` that gets another provider stops with a ProviderError (no silent CPU fallback).
"""

from __future__ import annotations

import runpy
import sys


def load_cuda_libraries() -> str | None:
    """torch's CUDA/cuDNN libraries (when torch is installed), then ``onnxruntime.preload_dlls()``; the
    reason preloading failed, or None. benchmarks/gpu.py calls this too."""
    try:
        import torch  # noqa: F401  (its CUDA/cuDNN libraries, for onnxruntime-gpu)
    except ImportError:
        pass
    import onnxruntime as ort

    if hasattr(ort, "preload_dlls"):
        try:
            ort.preload_dlls()
        except Exception as e:  # noqa: BLE001  (a CPU build or no CUDA libraries: the run checks its provider)
            return f"preload_dlls: {type(e).__name__}: {e}"
    return None


def main(argv: list[str]) -> None:
    if not argv or not argv[0].endswith(".py"):
        sys.exit("usage: python benchmarks/cuda_run.py SCRIPT.py [arguments...] (expected the script to run first)")
    problem = load_cuda_libraries()
    if problem:
        print(f"[cuda_run] {problem}", file=sys.stderr)
    import onnxruntime as ort

    print(f"[cuda_run] onnxruntime {ort.__version__}, providers {ort.get_available_providers()}", flush=True)
    sys.argv = list(argv)
    runpy.run_path(argv[0], run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1:])
