"""`cliptune tune --seeds`: one run per seed, and their spread."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cliptune_ort.cli import main, parse_seeds
from cliptune_ort.errors import ConfigError

from .conftest import needs_export

SMALL = ["--method", "bbt", "--budget", "24", "--popsize", "4", "--d", "16", "--eval-every", "12", "--quiet"]


@needs_export
def test_seeds_runs_each_seed_and_summarises(splade_dir, tmp_path, capsys):
    root = tmp_path / "sweep"
    args = ["tune", "--model-dir", str(splade_dir), *SMALL, "--out", str(root)]
    assert main([*args, "--seeds", "13,21"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.strip().splitlines()]
    assert [x.get("seed") for x in lines[:2]] == [13, 21] and lines[2]["seeds"] == [13, 21]
    results = [json.loads((root / f"seed{s}" / "result.json").read_text()) for s in (13, 21)]
    summary = json.loads((root / "summary.json").read_text())
    for k in ("dev", "test"):
        v = [r[k]["metric"] for r in results]
        assert summary[f"{k}_metric"]["mean"] == pytest.approx(np.mean(v), abs=1e-12)
        assert summary[f"{k}_metric"]["std"] == pytest.approx(np.std(v, ddof=1), abs=1e-12)
        assert lines[2][f"{k}_metric_mean"] == summary[f"{k}_metric"]["mean"]
    assert summary["finished"] == [13, 21] and "| 13 |" in (root / "summary.md").read_text()
    # a seed's run is the run `--seed` makes
    assert main(["tune", "--model-dir", str(splade_dir), *SMALL, "--seed", "21", "--out", str(tmp_path / "one")]) == 0
    one = json.loads((tmp_path / "one" / "result.json").read_text())
    assert one["dev"] == results[1]["dev"] and one["test"] == results[1]["test"]
    # --resume adds a seed; the finished ones are read back, not run again
    before = (root / "seed13" / "result.json").stat().st_mtime_ns
    capsys.readouterr()
    assert main([*args, "--seeds", "13,21,42", "--resume"]) == 0
    summary = json.loads((root / "summary.json").read_text())
    assert summary["finished"] == [13, 21, 42] and summary["test_metric"]["n"] == 3
    assert (root / "seed13" / "result.json").stat().st_mtime_ns == before
    assert main([*args, "--seeds", "13,21"]) == 2  # without --resume an existing run is not touched
    assert "already holds a run" in capsys.readouterr().err


@needs_export
def test_an_interrupted_sweep_says_how_to_continue(splade_dir, tmp_path, capsys, monkeypatch):
    from cliptune_ort import tuner

    real = tuner.tune
    calls = []

    def tune(cfg, out, **kw):
        calls.append(cfg.seed)
        if len(calls) == 2:
            raise tuner.RunInterrupted(f"interrupted: resume with cliptune tune --resume --out {out}")
        return real(cfg, out, **kw)

    monkeypatch.setattr(tuner, "tune", tune)
    root = tmp_path / "sweep"
    assert main(["tune", "--model-dir", str(splade_dir), *SMALL, "--out", str(root), "--seeds", "5,6,7"]) == 130
    assert f"cliptune tune --seeds 5,6,7 --out {root} --resume" in capsys.readouterr().err
    assert calls == [5, 6] and json.loads((root / "summary.json").read_text())["finished"] == [5]


@pytest.mark.parametrize("text", ["", "13,13", "a,b", "-1", "13,,x"])
def test_bad_seeds(text):
    with pytest.raises(ConfigError, match="expected distinct integers"):
        parse_seeds(text)


def test_seed_and_seeds_together(capsys):
    assert main(["tune", "--seeds", "1,2", "--seed", "3"]) == 2
    assert "pass --seed (one run) or --seeds (one run per seed), not both" in capsys.readouterr().err
