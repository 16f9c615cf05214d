"""benchmarks/export_convert.py on a tiny RoBERTa: both conversion paths run and write the same bytes, so the
benchmark of the export's conversion step cannot rot."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from .conftest import needs_export

ROOT = Path(__file__).resolve().parents[1]

pytestmark = needs_export


def test_export_convert_script_tiny(tmp_path):
    out = tmp_path / "ec"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CLIPTUNE_CACHE": str(tmp_path / "cache")}
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "export_convert.py"), "--shape", "tiny",
                        "--repeats", "1", "--no-wait", "--out", str(out)],
                       check=False, capture_output=True, text=True, timeout=600, env=env, cwd=str(ROOT))
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    data = json.loads(out.with_suffix(".json").read_text())
    assert data["same_bytes"] is True
    rows = {r["path"]: r for r in data["rows"]}
    assert set(rows) == {"ort", "cliptune"} and all(r["n"] == 1 and r["p50_ms"] > 0 for r in rows.values())
    assert rows["ort"]["sha256"] == rows["cliptune"]["sha256"] and len(rows["ort"]["sha256"][0]) == 64
