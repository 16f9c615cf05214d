"""The accuracy sweep's Clip-Tuning vs BBT comparison: best K on dev only, paired by seed, fair seed sets."""

import json
import os
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
accuracy = pytest.importorskip("accuracy")

from .conftest import needs_export  # noqa: E402


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


def test_cells_scored_on_cuda_are_named_in_the_table():
    rows = [dict(_row("bbt", s, 0.7, 0.6), provider="CPUExecutionProvider") for s in (13, 42)]
    rows += [dict(_row("clip_k8", s, 0.7, 0.6, "dbpedia"), provider="CUDAExecutionProvider") for s in (42, 13)]
    md = accuracy.table(rows, ["bbt", "clip_k8"], ["sst2", "dbpedia"])
    (note,) = [ln for ln in md.splitlines() if "CUDA provider" in ln]
    assert note.endswith(": dbpedia clip_k8 seeds 13, 42") and "sst2" not in note
    assert "CUDA" not in accuracy.table(rows[:2], ["bbt"], ["sst2"])  # all on the CPU: no note


def test_run_cell_passes_the_device_to_the_run(tmp_path, monkeypatch):
    from cliptune_ort import tuner

    seen = []
    monkeypatch.setattr(tuner, "tune", lambda cfg, d, **kw: seen.append((cfg.device, cfg.method, cfg.k, cfg.task)) or {})
    accuracy.run_cell(tmp_path, "dbpedia", "clip_k8", 13, None, "cuda")
    accuracy.run_cell(tmp_path, "sst2", "bbt", 13, None)
    assert seen == [("cuda", "clip", 8, "dbpedia"), ("auto", "bbt", 4, "sst2")]
    with pytest.raises(SystemExit):  # argparse: one line naming the choices
        accuracy.main(["--device", "gpu", "--out", str(tmp_path)])


def test_a_cell_that_cannot_run_stops_the_sweep_in_one_line(tmp_path, monkeypatch, capsys):
    from cliptune_ort import tuner
    from cliptune_ort.errors import ProviderError

    def no_cuda(cfg, d, **kw):
        raise ProviderError("device 'cuda' asked for, but this onnxruntime has no CUDAExecutionProvider")

    monkeypatch.setattr(tuner, "tune", no_cuda)
    rc = accuracy.main(["--device", "cuda", "--tasks", "sst2", "--methods", "bbt", "--seeds", "13", "--out", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and err == ("accuracy.py: sst2 bbt seed 13: device 'cuda' asked for, but this onnxruntime has no "
                               "CUDAExecutionProvider")
    assert (tmp_path / "results.json").is_file()  # the report of what did finish is still written


def test_cells_runs_exactly_the_listed_cells_in_order(tmp_path, monkeypatch, capsys):
    seen = []

    def fake_cell(out, task, method, seed, budget, device=None):
        seen.append((task, method, seed, device))
        return {"dev": {"metric": 0.5}, "test": None}

    monkeypatch.setattr(accuracy, "run_cell", fake_cell)
    done = accuracy.cell_dir(tmp_path, "dbpedia", "clip_k4_p0.2", 13)
    done.mkdir(parents=True)
    (done / "result.json").write_text("{}")  # finished: skipped, as in the product sweep
    monkeypatch.setattr(accuracy, "collect", lambda out: [])
    rc = accuracy.main(["--cells", "dbpedia/clip_k8/21,dbpedia/clip_k4_p0.2/13,sst2/bbt/100", "--device", "cuda",
                        "--out", str(tmp_path)])
    assert rc == 0
    assert seen == [("dbpedia", "clip_k8", 21, "cuda"), ("sst2", "bbt", 100, "cuda")]
    capsys.readouterr()
    assert accuracy.main(["--cells", "dbpedia/clip_k8", "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == ("accuracy.py: --cells: 'dbpedia/clip_k8': expected TASK/METHOD/SEED, "
                                               "e.g. dbpedia/clip_k8/13")
    assert accuracy.main(["--cells", "dbpedia/clip_k16/13", "--out", str(tmp_path)]) == 2
    assert "unknown task/method ['clip_k16']" in capsys.readouterr().err
    assert len(seen) == 2


def test_max_minutes_starts_no_cell_that_would_end_after_it(tmp_path, monkeypatch, capsys):
    clock = [0.0]
    seen = []

    def fake_cell(out, task, method, seed, budget, device=None):
        seen.append(seed)
        clock[0] += {13: 100.0, 21: 250.0}.get(seed, 10.0)  # seconds each cell takes
        return {"dev": {"metric": 0.5}, "test": None}

    monkeypatch.setattr(accuracy, "run_cell", fake_cell)
    monkeypatch.setattr(accuracy, "collect", lambda out: [])
    monkeypatch.setattr(accuracy.time, "perf_counter", lambda: clock[0])
    rc = accuracy.main(["--cells", "sst2/bbt/13,sst2/bbt/21,sst2/bbt/42,sst2/bbt/87", "--max-minutes", "10",
                        "--out", str(tmp_path)])
    # 13 ends at 100 s; 21 (started at 100 s + slowest 100 s <= 600 s) ends at 350 s; 42 would end after
    # 350 + 250 = 600 s at the slowest pace: not past the bound, so it runs; 87: 360 + 250 > 600: stop
    assert rc == 0 and seen == [13, 21, 42]
    assert "--max-minutes 10: the next cell would end after it (slowest cell so far 250 s); stopping with 1 cells left" \
        in capsys.readouterr().out


def test_cuda_run_launches_a_script_with_its_arguments(tmp_path):
    import subprocess

    root = Path(__file__).resolve().parents[1]
    launch = [sys.executable, str(root / "benchmarks" / "cuda_run.py")]
    p = subprocess.run([*launch, str(root / "benchmarks" / "accuracy.py"), "--report-only", "--out", str(tmp_path),
                        "--tasks", "sst2"], capture_output=True, text=True, timeout=120, check=False)
    assert p.returncode == 0, p.stderr[-1000:]
    assert "[cuda_run] onnxruntime" in p.stdout and (tmp_path / "table.md").is_file()
    p = subprocess.run(launch, capture_output=True, text=True, timeout=60, check=False)
    assert p.returncode == 1 and "expected the script to run first" in p.stderr


def test_p_rates_pair_the_rates_by_seed_and_count_wins_over_p01():
    rows = [_row("clip_k4", 13, 0.6, 0.50), _row("clip_k4", 42, 0.6, 0.60), _row("clip_k4", 100, 0.6, 0.70),
            _row("clip_k4_p0.05", 13, 0.6, 0.55), _row("clip_k4_p0.05", 42, 0.6, 0.58),
            _row("clip_k4_p0.2", 13, 0.6, 0.40), _row("clip_k4_p0.2", 42, 0.6, 0.65), _row("clip_k4_p0.2", 100, 0.6, 0.9),
            _row("bbt", 13, 0.7, None, "yelp_polarity"), _row("clip_k4", 13, 0.62, None, "yelp_polarity"),
            _row("clip_k4_p0.2", 13, 0.64, None, "yelp_polarity"),
            _row("clip_k4", 13, 0.6, 0.5, "rte")]  # no other rate ran: no record
    sst2, yelp = accuracy.p_rates(rows, ["sst2", "yelp_polarity", "rte"])
    assert sst2["on"] == "test" and sst2["full_seeds"] == [13, 42]  # seed 100 lacks p = 0.05
    assert sst2["per_seed"][100] == [None, 0.70, 0.9]
    assert sst2["means"] == pytest.approx([0.565, 0.55, 0.525])
    assert sst2["above_p0.1"] == {"0.05": 1, "0.2": 1}
    assert yelp["on"] == "dev" and yelp["per_seed"][13] == [None, 0.62, 0.64] and "means" not in yelp
    md = accuracy.p_rate_table([sst2, yelp])
    assert md.splitlines()[0] == "| p = 0.05 / 0.1 / 0.2 | sst2 | yelp_polarity (dev) |"
    assert "| seed 100 | - / 70.0 / 90.0 | - |" in md
    assert "| mean (seeds with all three) | 56.5 / 55.0 / 52.5 (n=2) | - |" in md


def _cell(runs, task, method, seed, finished=True, test=0.6):
    d = runs / task / method / f"seed{seed}"
    d.mkdir(parents=True)
    (d / "checkpoint.json").write_text("{}")
    if finished:
        (d / "result.json").write_text(json.dumps({"task": task, "seed": seed, "test": test, "wall_seconds": 60.0}))
    return d


def test_pack_out_packs_what_the_device_would_not_bring_back(tmp_path):
    pack_out = pytest.importorskip("pack_out")
    out = tmp_path / "out"
    _cell(out / "runs", "dbpedia", "clip_k8", 13)
    _cell(out / "runs", "dbpedia", "clip_k4_p0.2", 13, finished=False)
    (out / "shallow").mkdir()
    (out / "shallow" / "a.json").write_text("{}")  # one folder down: comes back as it is
    (out / "results.json").write_text("{}")
    assert [p.name for p in pack_out.pack(out)] == ["runs.tar.gz"]
    assert sorted(p.name for p in out.iterdir()) == ["results.json", "runs.tar.gz", "shallow"]
    with tarfile.open(out / "runs.tar.gz") as tar:
        names = set(tar.getnames())
    assert {"runs/dbpedia/clip_k8/seed13/result.json", "runs/dbpedia/clip_k4_p0.2/seed13/checkpoint.json"} <= names
    for i in range(9):  # more than 8 files: the shallow folder is packed too
        (out / "shallow" / f"f{i}.txt").write_text("x")
    assert [p.name for p in pack_out.pack(out)] == ["shallow.tar.gz"]
    assert pack_out.pack(out) == []  # nothing left to pack
    with pytest.raises(ValueError, match="inside the repository"):  # it deletes what it packs
        pack_out.pack(Path(__file__).resolve().parents[1] / "benchmarks" / "results")


def test_import_cells_takes_finished_cells_from_folders_and_device_archives(tmp_path, capsys):
    pack_out = pytest.importorskip("pack_out")
    here, cpu, dev = tmp_path / "here", tmp_path / "cpu", tmp_path / "dev"
    _cell(here / "runs", "dbpedia", "bbt", 13, test=0.7)
    _cell(here / "runs", "dbpedia", "clip_k8", 21, finished=False)  # superseded by a finished copy
    _cell(cpu / "runs", "dbpedia", "bbt", 13, test=0.1)  # finished here already: kept
    _cell(cpu / "runs", "dbpedia", "random", 100)
    _cell(cpu / "runs", "dbpedia", "clip_k4_p0.05", 13, finished=False)  # unfinished: left out
    _cell(dev / "runs", "dbpedia", "clip_k8", 21)
    pack_out.pack(dev)
    got, wall = accuracy.import_cells(here, [cpu, dev / "runs.tar.gz"])
    assert got == ["dbpedia random seed100", "dbpedia clip_k8 seed21"] and wall == 120.0  # each cell's wall
    assert "1 already finished here, 1 unfinished left out" in capsys.readouterr().out
    runs = here / "runs" / "dbpedia"
    assert json.loads((runs / "bbt" / "seed13" / "result.json").read_text())["test"] == 0.7
    assert (runs / "clip_k8" / "seed21" / "result.json").is_file() and not (runs / "clip_k4_p0.05").exists()
    assert sorted(p.name for p in runs.glob("*/.*")) == []  # no temporary copies left
    assert accuracy.import_cells(here, [cpu, dev / "runs.tar.gz"]) == ([], 0.0)  # again: nothing new, no wall
    _cell(tmp_path / "bad" / "runs", "dbpedia", "clip_k3", 13)
    rc = accuracy.main(["--import-cells", str(tmp_path / "bad"), "--out", str(here)])
    assert rc == 2 and "not a cell of this sweep" in capsys.readouterr().err
    rc = accuracy.main(["--import-cells", str(tmp_path / "nothing"), "--out", str(here)])
    assert rc == 2 and "expected an accuracy.py --out folder" in capsys.readouterr().err


def test_readme_tables_come_from_the_report_and_replace_only_the_marked_blocks(tmp_path):
    rows = [_row("bbt", 13, 0.70, 0.60), _row("bbt", 42, 0.72, 0.62),
            _row("clip_k4", 13, 0.75, 0.58), _row("clip_k4", 42, 0.74, 0.57),
            _row("clip_k4_p0.2", 13, 0.7, 0.50), _row("clip_k4_p0.05", 13, 0.7, 0.66),
            _row("bbt", 13, 0.5, None, "yelp_polarity"), _row("bbt", 42, 0.7, None, "yelp_polarity")]
    tasks = ["sst2", "yelp_polarity"]
    blocks = accuracy.readme_blocks(rows, accuracy.comparison(rows, tasks), accuracy.p_rates(rows, tasks))
    table = blocks["all-tasks"].splitlines()
    assert table[0] == "| method | SST-2 | Yelp P. (dev ¹) |"
    assert table[2] == "| bbt | 61.0 ± 1.4 (n=2) | 60.0 ± 14.1 (n=2) |"  # Yelp: dev, it has no test split
    assert table[3] == "| clip K = 4 | 57.5 ± 0.7 (n=2) | - |" and len(table) == 6  # README order, ran methods only
    (best,) = blocks["best-k"].splitlines()[2:]
    assert best == "| SST-2 | 13, 42 | 4 (4) | 57.5 | 61.0 | -3.5 | 2.1 | -2.3 | 1.4 | yes: clip worse |"
    assert blocks["p-rates"].splitlines()[2] == "| seed 13 | 66.0 / 58.0 / 50.0 |"
    readme = tmp_path / "README.md"
    marked = "".join(f"<!-- accuracy:{n} -->\nold {n}\n<!-- /accuracy:{n} -->\n" for n in blocks)
    readme.write_text("# intro\n" + marked + "outro\n")
    accuracy.update_readme(readme, blocks)
    once = readme.read_text()
    assert once.startswith("# intro\n<!-- accuracy:all-tasks -->\n\n| method |") and once.endswith("outro\n")
    assert "old " not in once and f"\n\n{blocks['best-k']}\n<!-- /accuracy:best-k -->" in once
    accuracy.update_readme(readme, blocks)
    assert readme.read_text() == once  # idempotent
    readme.write_text("# no markers\n")
    with pytest.raises(accuracy.CliptuneError, match="no '<!-- accuracy:all-tasks -->'"):
        accuracy.update_readme(readme, blocks)
    assert readme.read_text() == "# no markers\n"


@pytest.mark.slow
@needs_export
def test_gpu_cells_runs_one_process_per_cell_and_packs_them(tmp_path):
    # the device route's loop (benchmarks/gpu_cells.sh), dry-run on the CPU with a tiny budget
    import subprocess

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OUT": str(tmp_path / "out"), "ACC": str(tmp_path / "acc"), "PY": sys.executable,
           "DEVICE": "cpu", "CLIPTUNE_CACHE": os.environ.get("CLIPTUNE_CACHE", str(tmp_path / "cache"))}
    script = [str(root / "benchmarks" / "gpu_cells.sh")]
    usage = subprocess.run(["bash", *script, "soon", "sst2/bbt/13"], env=env, capture_output=True, text=True)
    assert usage.returncode == 2 and usage.stderr.startswith("usage: bash benchmarks/gpu_cells.sh SECONDS CELL")
    cells = ["sst2/manual/13", "sst2/bbt/13", "sst2/clip_k3/13", "sst2/bbt/21"]
    run = subprocess.run(["bash", *script, "600", *cells, "--", "--budget", "40"], env=env, capture_output=True,
                         text=True, timeout=600)
    lines = [ln for ln in run.stdout.splitlines() if ln.startswith("[gpu_cells]")]
    # the unknown method stops the loop with accuracy.py's one-line error; what finished comes back
    assert run.returncode == 2 and len(lines) == 3, run.stdout + run.stderr
    assert lines[1].startswith("[gpu_cells] sst2/bbt/13 exit status 0 at ") and "sst2 bbt seed 13: dev" in lines[1]
    assert "accuracy.py: unknown task/method ['clip_k3']" in lines[2]
    with tarfile.open(tmp_path / "out" / "runs.tar.gz") as tar:
        names = set(tar.getnames())
    assert {"runs/sst2/manual/seed13/result.json", "runs/sst2/bbt/seed13/result.json"} <= names
    assert not any("seed21" in n for n in names)
    assert json.loads((tmp_path / "acc" / "runs" / "sst2" / "bbt" / "seed13" / "result.json").read_text())["calls"] == 40
