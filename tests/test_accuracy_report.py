"""The accuracy sweep's Clip-Tuning vs BBT comparison: best K on dev only, paired by seed, fair seed sets."""

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
accuracy = pytest.importorskip("accuracy")


def _row(method, seed, dev, test, task="sst2"):
    return {"task": task, "method": method, "seed": seed, "dev": dev, "test": test}


def test_best_k_is_chosen_on_dev_and_paired_by_seed():
    rows = [_row("bbt", 13, 0.70, 0.60), _row("bbt", 42, 0.72, 0.62), _row("bbt", 100, 0.71, 0.58),
            # K=2: best dev, worse test; K=4: worse dev, much better test -> K=2 must win (dev decides)
            _row("clip_k2", 13, 0.80, 0.59), _row("clip_k2", 42, 0.81, 0.60), _row("clip_k2", 100, 0.79, 0.55),
            _row("clip_k4", 13, 0.60, 0.90), _row("clip_k4", 42, 0.61, 0.91), _row("clip_k4", 100, 0.62, 0.92)]
    (c,) = accuracy.comparison(rows, ["sst2"])
    assert c["clip"] == "clip_k2" and c["compared"] == ["clip_k2", "clip_k4"] and c["partial"] == []
    diffs = np.array([0.59 - 0.60, 0.60 - 0.62, 0.55 - 0.58])
    assert c["seeds"] == [13, 42, 100] and c["on"] == "test"
    assert c["mean_diff"] == pytest.approx(diffs.mean())
    assert c["diff_std"] == pytest.approx(diffs.std(ddof=1))
    assert c["paired_t"] == pytest.approx(diffs.mean() / (diffs.std(ddof=1) / np.sqrt(3)))
    assert c["bbt_seed_std"] == pytest.approx(np.std([0.60, 0.62, 0.58], ddof=1))


def test_a_k_with_fewer_seeds_does_not_compete():
    rows = [_row("bbt", s, 0.7, 0.6) for s in (13, 42, 100)]
    rows += [_row("clip_k4", s, 0.7, 0.55) for s in (13, 42, 100)]
    rows.append(_row("clip_k8", 13, 0.99, 0.99))  # one lucky seed must not be called the best K
    (c,) = accuracy.comparison(rows, ["sst2"])
    assert c["clip"] == "clip_k4" and c["partial"] == ["clip_k8"]
    assert c["mean_diff"] == pytest.approx(-0.05)


def test_no_test_split_compares_on_dev_and_table_says_so():
    rows = [_row("bbt", 13, 0.70, None, "yelp_polarity"), _row("clip_k4", 13, 0.65, None, "yelp_polarity")]
    (c,) = accuracy.comparison(rows, ["yelp_polarity"])
    assert c["on"] == "dev" and c["mean_diff"] == pytest.approx(-0.05) and c["diff_std"] is None
    md = accuracy.table(rows, ["bbt", "clip_k4"], ["yelp_polarity"])
    assert "no test split offline; dev 70.0" in md and "no test split offline; dev 65.0" in md


def test_the_common_average_uses_only_tasks_every_broad_method_ran():
    rows = [_row("bbt", 13, 0.7, 0.60, "sst2"), _row("bbt", 13, 0.7, 0.40, "rte"), _row("bbt", 13, 0.7, 0.90, "snli"),
            _row("clip_k4", 13, 0.7, 0.50, "sst2"), _row("clip_k4", 13, 0.7, 0.30, "rte"),
            _row("clip_k8", 13, 0.7, 0.99, "sst2")]  # one task only: not "broad", no common average
    md = accuracy.table(rows, ["bbt", "clip_k4", "clip_k8"], ["sst2", "rte", "snli"])
    lines = {ln.split(" | ")[0].strip("| "): ln for ln in md.splitlines() if ln.startswith("| ")}
    assert "average on sst2/rte |" in lines["method"]
    assert lines["bbt"].endswith("| 63.3 (3) | 50.0 |")
    assert lines["clip_k4"].endswith("| 40.0 (2) | 40.0 |")
    assert lines["clip_k8"].endswith("| 99.0 (1) | - |")
