# Sourced (from the repository root) by gpu_run.sh and gpu_cells.sh: the import paths and environment of
# a run on the lent GPU machine. $SITE (default /tmp/site, where gpu_run.sh installs onnxruntime-gpu) comes
# first so onnxruntime-gpu shadows the CPU build the machine has; /tmp/shim/cliptune_export -> ./export
# (the package is not pip-installed there).
SITE=${SITE:-/tmp/site}
mkdir -p /tmp/shim
ln -sfn "$PWD/export" /tmp/shim/cliptune_export
export PYTHONPATH="$SITE:/tmp/shim:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TRANSFORMERS_VERBOSITY=error TOKENIZERS_PARALLELISM=false
export CLIPTUNE_CACHE=${CLIPTUNE_CACHE:-/tmp/cliptune_cache}
# the custom-op library built on the CPU machine (`cliptune build-ops --variant cuda --out .ops`), carried in
# the device call's `carry` (.ops is ignored by git): FusedDense for --packed-ffn cublaslt graphs
if [ -d "$PWD/.ops" ]; then export CLIPTUNE_OPS_DIR="$PWD/.ops"; fi
