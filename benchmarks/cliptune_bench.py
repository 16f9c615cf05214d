"""``cliptune bench`` as a script, for the lent GPU machine, where the package is not installed and gpu_run.sh
runs a script through benchmarks/cuda_run.py with ``--out $OUT`` first (a folder: the result lands in it as
bench_<task>_<method>_<device>.json and .md):

    GPU_SCRIPT=benchmarks/cliptune_bench.py GPU_TIMEOUT=120 bash benchmarks/gpu_run.sh --task sst2 \\
        --model-dir /tmp/cliptune_gpu_work/export_fp16_k4_packed_host_shortqkv_ltpa --device cuda --cuda-graph
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cliptune_ort.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
