#!/usr/bin/env bash
# Build the CUDA custom-op library for a lent card on this (GPU-less) machine, into .ops/ (git-ignored; the
# device call carries it, and gpu_env.sh points CLIPTUNE_OPS_DIR at it):
#   bash benchmarks/build_card_ops.sh [OUT_DIR]
# The card has no compiler headers; the library needs the cuBLAS and CUDA runtime headers and libraries and,
# for RaggedAttention (--packed-kernel cudnn), cuDNN's and cudnn-frontend's headers (cuDNN is opened at run
# time, not linked). They come from NVIDIA's pip wheels, downloaded once into $DL (about 1.2 GB; a wheel
# already there is not fetched again); crt/host_defines.h from a local CUDA toolkit, else the nvcc wheel.
# The library links libcublasLt.so.13 and libcudart.so.13 by name: PyTorch's copies on the card. nvcc (a local
# CUDA toolkit: $NVCC, PATH or $CUDA_HOME) compiles RaggedAttention's short-row kernel (--packed-kernel short).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-.ops}
DL=${DL:-/tmp/cliptune_card_ops}
PY=${PY:-python3}
mkdir -p "$DL/x"

wheels=("nvidia-cublas==13.*" "nvidia-cuda-runtime==13.0.*" "nvidia-cudnn-cu13==9.*"
        "nvidia-cudnn-frontend==1.14.1")  # frontend 1.14 needs no NVRTC headers (later ones do)
crt=$(ls -d /usr/local/cuda*/include 2>/dev/null | while read -r d; do
  [ -f "$d/crt/host_defines.h" ] && echo "$d" && break; done || true)
if [ -z "$crt" ]; then wheels+=("nvidia-cuda-nvcc==13.0.*"); fi
"$PY" -m pip download -q --no-deps -d "$DL" "${wheels[@]}"
for w in "$DL"/*.whl; do
  d="$DL/x/$(basename "$w" .whl)"
  [ -d "$d" ] || "$PY" -c "import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])" "$w" "$d"
done

args=()
for h in cublasLt.h cuda_runtime_api.h cudnn.h cudnn_frontend.h crt/host_defines.h; do
  f=$(find "$DL/x" -path "*/include/$h" -print -quit)
  if [ -n "$f" ]; then args+=(--include "${f%/"$h"}"); fi
done
[ -n "$crt" ] && args+=(--include "$crt")
for l in libcublasLt.so.13 libcudart.so.13; do
  f=$(find "$DL/x" -name "$l" -print -quit)
  if [ -z "$f" ]; then echo "[build_card_ops] $l not found under $DL/x" >&2; exit 1; fi
  args+=(--lib "$(dirname "$f")")
done
"$PY" -m cliptune_ort.native --variant cuda --out "$OUT_DIR" "${args[@]}"
lib="$OUT_DIR/libcliptune_ops_cuda.so"
ops=$(grep -ao 'FusedDense RaggedAttention\[[a-z,]*\]\( PackAdd\)\?' "$lib" || echo FusedDense)
echo "[build_card_ops] $lib holds: $ops"
case "$ops" in *cudnn*) ;; *) echo "[build_card_ops] WARNING: no cuDNN attention (cuDNN's or cudnn-frontend's headers not found)" >&2;; esac
case "$ops" in *short*) ;; *) echo "[build_card_ops] WARNING: no short-row attention kernel (nvcc not found)" >&2;; esac
case "$ops" in *PackAdd*) ;; *) echo "[build_card_ops] WARNING: no PackAdd kernel (nvcc not found)" >&2;; esac
