"""benchmarks/tune_time.py end to end on a short budget, so the CPU tune-time benchmark cannot rot (it broke
once when tune() began closing its sessions on return, unnoticed until it was run again)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from .conftest import needs_export

ROOT = Path(__file__).resolve().parents[1]

pytestmark = needs_export


def test_tune_time_script_short_runs(tmp_path):
    out = tmp_path / "tt"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "tune_time.py"), "--runs", "bbt,bbt_ahead",
                        "--budget", "100", "--no-wait", "--out", str(out)],
                       check=False, capture_output=True, text=True, timeout=600, env=env, cwd=str(ROOT))
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    data = json.loads(out.with_suffix(".json").read_text())
    runs = data["runs"]
    assert set(runs) == {"bbt", "bbt_ahead"}
    for name, r in runs.items():
        assert r["calls"] == 100 and r["provider"] == "CPUExecutionProvider", name
        assert r["threads"] >= 1 and r["workers"] >= 1
        assert abs(sum(r["parts_s"].values()) - r["wall_s"]) < 0.05  # the parts add up to the wall time
    assert runs["bbt_ahead"]["cma_eigen"] == "ahead" and runs["bbt"]["cma_eigen"] == "sync"  # CPU default: sync
    assert "| bbt_ahead |" in out.with_suffix(".md").read_text()
