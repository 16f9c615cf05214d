#!/usr/bin/env bash
# The GPU benchmark's device call (one run on the lent H100/H200). From the repository root:
#
#   OUT="$OUT" bash benchmarks/gpu_run.sh [benchmarks/gpu.py arguments...]
#
# 1. installs every wheel in .whl/ and .whl/extra/ (small pure-Python ones such as cma) into
#    /tmp/site, and onnxruntime-gpu from the chunks ../shared/tools/gpu-wheel made (copied to /tmp/w
#    by earlier calls, or carried in .whl/; cat + sha256 check) when /tmp/site has no CUDA build yet;
# 2. PYTHONPATH=/tmp/site:/tmp/shim:$PWD: /tmp/site first so onnxruntime-gpu shadows the CPU build
#    the machine has, /tmp/shim/cliptune_export -> ./export (the package is not pip-installed there);
# 3. prints the environment (GPU, ORT providers after torch is imported, versions of what the runtime
#    imports), then runs benchmarks/gpu.py --out "$OUT" under `timeout` (GPU_TIMEOUT, default 420 s;
#    the script itself aims to finish within its --deadline, default 345 s) and keeps its log there;
# 4. with OUT set (the device tool's), packs each folder of $OUT that holds files too deep to come back
#    into <folder>.tar.gz (benchmarks/pack_out.py: accuracy.py's runs/ folder).
# Env: OUT (results folder, default benchmarks/results), GPU_TIMEOUT, PY (python, default python3),
# GPU_SCRIPT (default benchmarks/gpu.py; another script runs through benchmarks/cuda_run.py).
set -uo pipefail
cd "$(dirname "$0")/.."
PACK=${OUT:+1}  # the device tool's $OUT: pack what would not come back (benchmarks/pack_out.py)
OUT=${OUT:-benchmarks/results}
LIMIT=${GPU_TIMEOUT:-420}
PY=${PY:-python3}
SITE=/tmp/site
ORT_WHL=onnxruntime_gpu-1.31.1-cp312-cp312-manylinux_2_28_x86_64.whl
mkdir -p "$OUT" "$SITE"
shopt -s nullglob

# (a) wheels: small ones from .whl/ and .whl/extra/ (cma), each once
for w in .whl/*.whl .whl/extra/*.whl; do
  name=$(basename "$w" | cut -d- -f1)
  have=("$SITE/$name"-*.dist-info)
  if [ ${#have[@]} -gt 0 ]; then continue; fi
  echo "[gpu_run] installing $w into $SITE"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" "$w" \
    || echo "[gpu_run] WARNING: pip install of $w failed"
done
# onnxruntime-gpu from the chunks of ../shared/tools/gpu-wheel (in /tmp/w, or carried in .whl/), once
cuda_libs=("$SITE"/onnxruntime/capi/libonnxruntime_providers_cuda*.so)
for dir in /tmp/w .whl; do
  parts=("$dir"/part_*)
  if [ ${#cuda_libs[@]} -gt 0 ] || [ ${#parts[@]} -eq 0 ]; then continue; fi
  echo "[gpu_run] assembling onnxruntime-gpu from ${#parts[@]} chunks in $dir"
  mkdir -p /tmp/w
  cat "${parts[@]}" > "/tmp/w/$ORT_WHL"
  if [ -f "$dir/whl.sha" ] && echo "$(cat "$dir/whl.sha")  /tmp/w/$ORT_WHL" | sha256sum -c --quiet; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" "/tmp/w/$ORT_WHL" \
      || echo "[gpu_run] WARNING: pip install of onnxruntime-gpu failed"
  else
    echo "[gpu_run] WARNING: the chunks in $dir do not match $dir/whl.sha: not installed"
  fi
  cuda_libs=("$SITE"/onnxruntime/capi/libonnxruntime_providers_cuda*.so)
done

# (b) import paths: onnxruntime-gpu first, cliptune_export = ./export
. benchmarks/gpu_env.sh

# (c) environment
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "[gpu_run] no nvidia-smi"
"$PY" -c 'import torch, onnxruntime as o; print("[gpu_run] providers:", o.get_available_providers())'
"$PY" - <<'EOF'
import importlib
import torch  # first: ORT's CUDA provider reuses the CUDA/cuDNN libraries torch ships
import onnxruntime as o
try:
    o.preload_dlls()
except Exception as e:  # older builds have no preload_dlls
    print("[gpu_run] preload_dlls:", e)
print("[gpu_run] onnxruntime", o.__version__, o.get_device(), o.__file__)
print("[gpu_run] torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "-")
for m in ("numpy", "transformers", "onnx", "cma", "tokenizers", "cliptune_ort", "cliptune_export"):
    try:
        mod = importlib.import_module(m)
        print("[gpu_run]", m, getattr(mod, "__version__", "?"))
    except Exception as e:
        print("[gpu_run]", m, "MISSING:", type(e).__name__, e)
EOF

# (d) the benchmark
# GPU_SCRIPT: another script to run the same way (e.g. benchmarks/accuracy.py --device cuda), through
# benchmarks/cuda_run.py, which loads the CUDA libraries first as gpu.py does itself
SCRIPT=${GPU_SCRIPT:-benchmarks/gpu.py}
LAUNCH=()
if [ "$SCRIPT" != benchmarks/gpu.py ]; then LAUNCH=(benchmarks/cuda_run.py); fi
echo "[gpu_run] $SCRIPT --out $OUT $* (timeout ${LIMIT} s)"
timeout -k 15 "$LIMIT" "$PY" -u "${LAUNCH[@]}" "$SCRIPT" --out "$OUT" "$@" 2>&1 | tee "$OUT/gpu_log.txt"
rc=${PIPESTATUS[0]}
echo "[gpu_run] $SCRIPT exit status $rc"
if [ -n "$PACK" ]; then "$PY" benchmarks/pack_out.py "$OUT"; fi
ls -la "$OUT"
exit "$rc"
