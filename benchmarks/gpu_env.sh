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
# a library built with cuDNN (RaggedAttention, --packed-kernel cudnn) links libcudnn.so.9 by name: the loader
# finds PyTorch's copy through this path even where nothing has loaded cuDNN yet when a session registers it
CUDNN_LIB=$("${PY:-python3}" -c "import nvidia.cudnn, os; print(os.path.join(list(nvidia.cudnn.__path__)[0], 'lib'))" \
  2>/dev/null || true)
if [ -n "$CUDNN_LIB" ] && [ -d "$CUDNN_LIB" ]; then
  export LD_LIBRARY_PATH="$CUDNN_LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi
