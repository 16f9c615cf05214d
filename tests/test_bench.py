"""``cliptune bench``: the timer's counting, the summary's percentiles, the losses it times (equal to the
tuner's own scoring of the same candidates), the projection's arithmetic, the files and the errors."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from cliptune_ort import bench
from cliptune_ort.cli import main
from cliptune_ort.config import build_config

from .conftest import needs_export


def test_time_calls_counts_warmup_min_max():
    calls = []
    s = bench.time_calls(lambda: calls.append(1), warmup=2, min_calls=3, max_calls=5, seconds=0.0)
    assert len(s) == 3 and len(calls) == 5  # 2 untimed + 3 timed: seconds=0 stops at min_calls
    calls.clear()
    s = bench.time_calls(lambda: calls.append(1), warmup=1, min_calls=1, max_calls=4, seconds=1e9)
    assert len(s) == 4 and len(calls) == 5  # max_calls bounds a long budget
    assert all(x >= 0 for x in s)


def test_summarize_percentiles_and_throughput():
    st = bench.summarize([0.001, 0.002, 0.003, 0.004], items_per_call=20, item="candidates")
    assert st["n"] == 4 and st["p50_ms"] == 2.5 and st["min_ms"] == 1.0 and st["max_ms"] == 4.0
    assert st["p90_ms"] == pytest.approx(3.7) and st["p99_ms"] == pytest.approx(3.97)
    assert st["calls_per_s"] == 400.0 and st["candidates_per_s"] == 8000.0


def test_parse_pops():
    assert bench.parse_pops("20,1, 20") == [1, 20]
    for bad in ("", "0", "1,x", "-3"):
        with pytest.raises(bench.ConfigError, match="expected comma-separated population sizes"):
            bench.parse_pops(bad)


@pytest.fixture(scope="module")
def bench_cfg(splade_dir):
    return build_config(None, task="sst2", method="clip", k=2, model_dir=str(splade_dir), popsize=3, budget=60,
                        eval_every=30, device="cpu", seed=42)


@needs_export
def test_bench_times_the_tuners_scoring(bench_cfg):
    from cliptune_ort.tuner import prepare, score

    res = bench.run_bench(bench_cfg, pops=[1, 3], seconds=0.0, min_calls=2, max_calls=2, warmup=1)
    assert res["provider"] == "CPUExecutionProvider" and res["device"] == "cpu"
    assert res["graphs_per_candidate"] == 2 and res["train_rows"] == 32 and res["k"] == 2
    assert res["train_tokens"] > 32 * 51  # [CLS] + 50 prompt positions + the text, per row
    for pop in ("1", "3"):
        g = res["generation"][pop]
        assert g["n"] == 2 and 0 < g["p50_ms"] <= g["p90_ms"] <= g["p99_ms"] and g["first_call_ms"] > 0
        # rounded to 0.1 from the same p50: at most 0.05 off (rel=1e-3 failed at 42.2 vs 42.157 on a slow CI box)
        assert g["forward_passes_per_s"] == pytest.approx(int(pop) * 2 / (g["p50_ms"] / 1e3), abs=0.0501)
    assert res["optimizer"]["name"] == "cma" and res["optimizer"]["eigen"] == "sync"  # auto on the CPU
    assert res["dev_eval"]["n"] == 2 and res["dev_eval"]["p50_ms"] > 0
    # the losses it timed are the tuner's own for the same candidates (drawn from the seed)
    ws = prepare(bench_cfg)
    try:
        for pop in (1, 3):
            z = np.random.default_rng([42, pop]).standard_normal((pop, bench_cfg.d)) * bench_cfg.sigma0
            want = score(ws, ws.prompts(z))
            np.testing.assert_allclose(res["losses"][str(pop)], want, rtol=0, atol=1e-6)
            assert 0.05 < float(np.mean(want)) < 5.0  # cross-entropy of a random prompt on two labels
    finally:
        ws.engine.close()
    # the projection is the parts' sum for the run's settings: 60 calls at pop 3 = 20 generations, dev at most 2x
    p = res["projected_tune_s"]
    assert p["generations"] == 20 and p["dev_evals_at_most"] == 2
    parts = p["parts_s"]
    assert parts["generations"] == pytest.approx(20 * res["generation"]["3"]["mean_ms"] / 1e3, abs=2e-3)
    assert parts["optimizer"] == pytest.approx(20 * res["optimizer"]["mean_ms"] / 1e3, abs=2e-3)
    assert parts["dev_evals_at_most"] == pytest.approx(2 * res["dev_eval"]["mean_ms"] / 1e3, abs=2e-3)
    assert p["total"] == pytest.approx(sum(parts.values()), abs=0.02)
    # a second bench draws the same candidates: the same losses
    again = bench.run_bench(bench_cfg, pops=[3], seconds=0.0, min_calls=1, max_calls=1, warmup=1)
    assert again["losses"]["3"] == res["losses"]["3"]
    assert again["projected_tune_s"] is not None and "1" not in again["generation"]
    md = bench.markdown(res)
    assert "| generation, pop 3 | 2 |" in md and "Projected tune (60 calls, pop 3)" in md


@needs_export
def test_bench_projection_needs_the_runs_popsize(bench_cfg):
    res = bench.run_bench(bench_cfg, pops=[2], seconds=0.0, min_calls=1, max_calls=1, warmup=1)
    assert res["projected_tune_s"] is None and "Projected" not in bench.markdown(res)


@needs_export
def test_bench_cli_writes_json_and_table(splade_dir, tmp_path, capsys):
    out = tmp_path / "b" / "bench.json"
    rc = main(["bench", "--model-dir", str(splade_dir), "--method", "bbt", "--popsize", "4", "--budget", "40",
               "--device", "cpu", "--seconds", "0", "--min-calls", "1", "--max-calls", "1", "--warmup", "1",
               "--out", str(out), "--quiet"])
    assert rc == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    res = json.loads(out.read_text())
    assert line["out"] == str(out) and line["provider"] == res["provider"] == "CPUExecutionProvider"
    assert set(res["generation"]) == {"1", "4"} and res["graphs_per_candidate"] == 1 and res["k"] == 0
    assert res["optimizer"]["name"] == "cma" and res["optimizer"]["n"] == 1
    assert line["projected_tune_s"] == res["projected_tune_s"]["total"] and res["projected_tune_s"]["generations"] == 10
    assert out.with_suffix(".md").read_text().startswith("# cliptune bench: sst2 bbt on CPUExecutionProvider")
    assert math.isfinite(res["wall_s"]) and not list(out.parent.glob("*.tmp*"))


@needs_export
def test_bench_random_search_has_no_eigen_schedule(splade_dir):
    cfg = build_config(None, task="sst2", method="bbt", optimizer="random", model_dir=str(splade_dir), popsize=4,
                       budget=8, device="cpu")
    res = bench.run_bench(cfg, pops=[4], seconds=0.0, min_calls=1, max_calls=1, warmup=1)
    assert res["optimizer"]["name"] == "random" and res["optimizer"]["eigen"] is None
    assert res["projected_tune_s"]["generations"] == 2


@pytest.mark.parametrize("args, expected", [
    (["--pops", "0"], "expected comma-separated population sizes"),
    (["--method", "manual"], "method manual has none"),
    (["--out", "bench.txt"], "expected a .json file path"),
    (["--seconds", "nan"], "expected a finite number of seconds"),
    (["--min-calls", "3", "--max-calls", "2"], "expected 1 <= min-calls <= max-calls"),
    (["--warmup", "0"], "expected at least 1"),
])
def test_bench_bad_input_is_one_line(args, expected, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CLIPTUNE_CACHE", str(tmp_path / "cache"))  # nothing may be exported for these
    rc = main(["bench", *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and expected in err[0] and err[0].startswith("cliptune: error:")
    assert not (tmp_path / "cache").exists() and not (tmp_path / "runs").exists()


@needs_export
def test_bench_script_for_the_card_writes_into_a_folder(splade_dir, tmp_path):
    """benchmarks/cliptune_bench.py (the GPU machine: gpu_run.sh puts ``--out $OUT``, a folder, first) and
    ``python -m cliptune_ort``."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    p = subprocess.run([sys.executable, str(root / "benchmarks" / "cliptune_bench.py"), "--out", str(tmp_path),
                        "--model-dir", str(splade_dir), "--method", "bbt", "--popsize", "4", "--budget", "8",
                        "--device", "cpu", "--seconds", "0", "--min-calls", "1", "--max-calls", "1", "--warmup", "1",
                        "--quiet"], capture_output=True, text=True, timeout=300, check=False)
    assert p.returncode == 0, p.stderr[-2000:]
    res = json.loads((tmp_path / "bench_sst2_bbt_cpu.json").read_text())
    assert json.loads(p.stdout.strip().splitlines()[-1])["out"] == str(tmp_path / "bench_sst2_bbt_cpu.json")
    assert res["provider"] == "CPUExecutionProvider" and (tmp_path / "bench_sst2_bbt_cpu.md").is_file()
    h = subprocess.run([sys.executable, "-m", "cliptune_ort", "bench", "--help"], capture_output=True, text=True,
                       timeout=120, check=False)
    assert h.returncode == 0 and "--pops" in h.stdout


@needs_export
def test_bench_stops_on_non_finite_losses(bench_cfg, monkeypatch):
    from cliptune_ort import tuner

    monkeypatch.setattr(tuner, "score", lambda ws, prompts: np.full(prompts.shape[0], np.nan))
    with pytest.raises(bench.NumericError, match=r"expected finite losses, found \[nan\] at pop 1"):
        bench.run_bench(bench_cfg, pops=[1], seconds=0.0, min_calls=1, max_calls=1, warmup=1)
