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


def test_export_time_script_tiny_against_a_second_checkout(tmp_path):
    """benchmarks/export_time.py times a whole export by phase; run here against this checkout named twice, it
    must run each one's own exporter, parse the phases and find the same weights."""
    out = tmp_path / "et"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CLIPTUNE_CACHE": str(tmp_path / "cache")}
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "export_time.py"), "--shape", "tiny", "--k", "1",
                        "--checkout", f"again={ROOT}", "--no-wait", "--out", str(out)],
                       check=False, capture_output=True, text=True, timeout=600, env=env, cwd=str(ROOT))
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    data = json.loads(out.with_suffix(".json").read_text())
    assert data["same_weights"] is True
    assert [r["checkout"] for r in data["runs"]] == ["this", "again"]
    for r in data["runs"]:
        assert {"load", "trace", "convert", "write graphs", "validate"} <= set(r), r
        assert 0 < sum(r[k] for k in ("load", "trace", "convert", "write graphs", "validate")) <= r["seconds"] + 0.5
        assert r["parity_max"] < 2e-2 and len(r["weights_sha256"]) == 64


def test_export_time_phases_parse_the_log():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from export_time import phases

    lines = ["[export]    0.0 s  loading x", "noise", "[export]    2.0 s  exporting graph_0.onnx (full)",
             "[export]    5.0 s  exporting graph_1.onnx (thinned)", "[export]    9.0 s  sharing weights across graphs",
             "[export]   10.5 s  validating every graph", "[export]   12.0 s    graph_0.onnx: max |ort - torch|",
             "[export]   13.0 s  wrote out (2 graphs) in 13.0 s"]
    log = "\n".join(lines)
    assert phases(log) == {"load": 2.0, "trace": 7.0, "share weights": 1.5, "validate": 2.5}
