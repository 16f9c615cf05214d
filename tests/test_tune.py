"""The tuning loop: results, determinism, resume, methods, mixtures."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cliptune_ort.config import build_config
from cliptune_ort.tuner import prepare, score, tune

from .conftest import needs_export

pytestmark = needs_export

SMALL = dict(task="sst2", budget=120, popsize=6, eval_every=30, d=50, checkpoint_every=2, plot=False)


def _cfg(**kw):
    return build_config(**{**SMALL, **kw})


def test_clip_run_writes_everything(splade_dir, tmp_path):
    res = tune(_cfg(method="clip", k=2), tmp_path / "run", model_dir=splade_dir, progress=False)
    for f in ("config.json", "history.jsonl", "checkpoint.json", "best_z.npy", "best_prompt.npy", "result.json"):
        assert (tmp_path / "run" / f).is_file(), f
    assert res["calls"] == 120 and res["forward_passes"] == 240 and res["generations"] == 20
    assert res["test"]["n"] == 872 and 0.0 <= res["test"]["metric"] <= 1.0
    hist = [json.loads(x) for x in (tmp_path / "run" / "history.jsonl").read_text().splitlines()]
    assert [h["calls"] for h in hist] == [30, 60, 90, 120]
    assert max(h["dev_metric"] for h in hist) == res["dev"]["metric"]
    z = np.load(tmp_path / "run" / "best_z.npy", allow_pickle=False)
    assert z.shape == (50,)
    assert np.load(tmp_path / "run" / "best_prompt.npy").shape == (50, 128)


def test_runs_are_deterministic(splade_dir, tmp_path):
    a = tune(_cfg(method="bbt"), tmp_path / "a", model_dir=splade_dir, progress=False)
    b = tune(_cfg(method="bbt"), tmp_path / "b", model_dir=splade_dir, progress=False)
    assert a["best_train_fitness"] == b["best_train_fitness"]
    assert a["test"] == b["test"]
    assert np.array_equal(np.load(tmp_path / "a" / "best_z.npy"), np.load(tmp_path / "b" / "best_z.npy"))


@pytest.mark.parametrize("optimizer", ["cma", "random"])
def test_resume_matches_uninterrupted(splade_dir, tmp_path, optimizer):
    cfg = _cfg(method="clip", k=2, optimizer=optimizer)
    full = tune(cfg, tmp_path / "full", model_dir=splade_dir, progress=False)
    part = tune(cfg, tmp_path / "part", model_dir=splade_dir, progress=False, stop_after_generations=7)
    assert part["generation"] == 7
    ck = json.loads((tmp_path / "part" / "checkpoint.json").read_text())
    assert ck["generation"] == 7
    resumed = tune(cfg, tmp_path / "part", model_dir=splade_dir, progress=False, resume=True)
    assert np.array_equal(np.load(tmp_path / "full" / "best_z.npy"), np.load(tmp_path / "part" / "best_z.npy"))
    for key in ("train", "dev", "test", "calls", "forward_passes", "best_train_fitness"):
        assert resumed[key] == full[key], key
    h1 = (tmp_path / "full" / "history.jsonl").read_text()
    h2 = (tmp_path / "part" / "history.jsonl").read_text()
    assert h1 == h2


def test_resume_with_the_eigendecomposition_ahead(splade_dir, tmp_path):
    """cma_eigen=ahead (d 120, pop 10: a decomposition every 2-3 generations) resumes bit for bit; a
    resume keeps the checkpoint's schedule whatever auto resolves to; CPU runs default to sync."""
    cfg = _cfg(method="bbt", d=120, popsize=10, budget=200, eval_every=50, cma_eigen="ahead")
    full = tune(cfg, tmp_path / "full", model_dir=splade_dir, progress=False)
    assert full["cma_eigen"] == "ahead"
    tune(cfg, tmp_path / "part", model_dir=splade_dir, progress=False, stop_after_generations=7)
    assert json.loads((tmp_path / "part" / "checkpoint.json").read_text())["cma_eigen"] == "ahead"
    resumed = tune(_cfg(method="bbt", d=120, popsize=10, budget=200, eval_every=50), tmp_path / "part",
                   model_dir=splade_dir, progress=False, resume=True)  # auto: sync on the CPU, ahead kept
    assert resumed["cma_eigen"] == "ahead"
    assert np.array_equal(np.load(tmp_path / "full" / "best_z.npy"), np.load(tmp_path / "part" / "best_z.npy"))
    for key in ("train", "dev", "test", "best_train_fitness"):
        assert resumed[key] == full[key], key
    sync = tune(_cfg(method="bbt", d=120, popsize=10, budget=200, eval_every=50), tmp_path / "sync",
                model_dir=splade_dir, progress=False)
    assert sync["cma_eigen"] == "sync" and sync["best_train_fitness"] != full["best_train_fitness"]


def test_mixtures_and_budget_units(splade_dir):
    ws = prepare(_cfg(method="clip", k=3), splade_dir)
    z = np.random.default_rng(1).standard_normal((6, 50))
    p = ws.prompts(z)
    per_net = [ws.engine.logits(g, p, ws.train, ws.verbalizer_ids) for g in (1, 2, 3)]
    from cliptune_ort.losses import loss_fn

    want = np.mean([loss_fn("ce", x, ws.train.labels) for x in per_net], axis=0)
    np.testing.assert_allclose(score(ws, p), want, rtol=1e-12)
    ws.cfg.mixture = "mean_logits"
    np.testing.assert_allclose(score(ws, p), loss_fn("ce", np.mean(per_net, axis=0), ws.train.labels), rtol=1e-12)
    ws.cfg.mixture = "assign"
    fit = score(ws, p)
    for i in range(6):
        assert fit[i] == pytest.approx(loss_fn("ce", per_net[i % 3][i:i + 1], ws.train.labels)[0], abs=1e-9)


def test_budget_in_forward_passes(splade_dir, tmp_path):
    res = tune(_cfg(method="clip", k=2, budget_unit="forward", budget=120), tmp_path / "fw", model_dir=splade_dir,
               progress=False)
    assert res["forward_passes"] == 120 and res["calls"] == 60


def test_bucketed_losses_equal_padded(splade_dir):
    a = prepare(_cfg(method="clip", k=2, n_buckets=1), splade_dir)
    b = prepare(_cfg(method="clip", k=2, n_buckets=4), splade_dir)
    assert b.train.padded_fraction < a.train.padded_fraction
    p = a.prompts(np.random.default_rng(2).standard_normal((6, 50)))
    np.testing.assert_allclose(score(a, p), score(b, p), atol=1e-5, rtol=0)


def test_manual_method_has_no_calls(splade_dir, tmp_path):
    res = tune(_cfg(method="manual"), tmp_path / "m", model_dir=splade_dir, progress=False)
    assert res["calls"] == 0 and res["test"]["n"] == 872
    assert not (tmp_path / "m" / "best_z.npy").exists()


def test_default_model_dir_is_exported_once(tmp_path):
    """--model-dir omitted: the embedded model is exported (in a subprocess) into the cache."""
    from cliptune_ort.models import embedded_export_dir, resolve_model_dir

    out = resolve_model_dir(None, 2, 0.1)
    assert out == embedded_export_dir(4, 0.1) and (out / "manifest.json").is_file()
    mtime = (out / "manifest.json").stat().st_mtime
    assert resolve_model_dir(None, 4, 0.1) == out and (out / "manifest.json").stat().st_mtime == mtime


def test_cli_resume_takes_the_run_settings(splade_dir, tmp_path, capsys):
    """`cliptune tune --resume --out RUN` needs no flags repeated: the run's config.json is the base."""
    from cliptune_ort.cli import main

    run = tmp_path / "r"
    args = ["tune", "--model-dir", str(splade_dir), "--budget", "40", "--popsize", "4", "--d", "20",
            "--eval-every", "20", "--method", "bbt", "--out", str(run), "--quiet"]
    assert main(args) == 0
    first = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    (run / "result.json").unlink()  # as if killed after the last checkpoint
    assert main(["tune", "--resume", "--out", str(run), "--quiet"]) == 0
    again = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert again["test_metric"] == first["test_metric"] and again["calls"] == 40
    assert main(["tune", "--resume", "--out", str(run), "--budget", "60", "--quiet"]) == 2  # a changed setting


def test_run_dir_is_locked(splade_dir, tmp_path):
    from cliptune_ort.errors import ConfigError
    from cliptune_ort.tuner import _lock_run_dir

    run = tmp_path / "locked"
    run.mkdir()
    fd = _lock_run_dir(run)
    try:
        with pytest.raises(ConfigError, match="in use by another cliptune process"):
            tune(_cfg(method="bbt"), run, model_dir=splade_dir, progress=False)
    finally:
        import os

        os.close(fd)


def test_int8_edge_mode_on_the_embedded_model(tmp_path):
    """--precision int8 exports the embedded model as int8 (once) and tunes on it, weights unshared."""
    res = tune(_cfg(method="clip", k=2, precision="int8", budget=40, popsize=4, eval_every=20), tmp_path / "i8",
               progress=False)
    assert res["calls"] == 40 and 0.0 <= res["test"]["metric"] <= 1.0
    from cliptune_ort.manifest import load_manifest
    from cliptune_ort.models import embedded_export_dir

    man = load_manifest(res["model_dir"])
    assert man.precision == "int8" and man.root == embedded_export_dir(4, 0.1, precision="int8")
    assert man.int8_weights == "int7" and man.root.name.endswith("_int8-int7_f3")  # no saturation on AVX2 CPUs


def test_a_finished_run_closes_its_sessions(splade_dir, tmp_path, monkeypatch):
    # accuracy.py runs cell after cell in one process: on an H100 the third DBpedia K = 8 run ran out of
    # GPU memory while the earlier runs' sessions sat in reference cycles (engine <-> its DevicePrompts;
    # and the first run's frames, held by a pyparsing exception cycle made while `import cma` loads
    # matplotlib) until the cycle collector ran; tune() closes its engine, so they go when it returns
    import gc
    import weakref

    from cliptune_ort import engine as engine_mod

    made, real = [], engine_mod.make_session

    def recording(*a, **kw):
        sess = real(*a, **kw)
        made.append(weakref.ref(sess))
        return sess

    monkeypatch.setattr(engine_mod, "make_session", recording)
    gc.collect()
    gc.disable()
    try:
        res = tune(_cfg(method="clip", k=2, budget=24), tmp_path / "r", model_dir=splade_dir, progress=False)
        alive = [r for r in made if r() is not None]
    finally:
        gc.enable()
    assert res["calls"] == 24 and len(made) >= 3 and alive == []


def test_blas_on_one_thread_during_a_run(splade_dir, tmp_path, monkeypatch):
    """API runs get the CLI's one BLAS thread (CMA-ES's eigendecomposition against ORT's spinning workers
    cost a bbt run 228 s instead of 2.6 s); a thread count the user set in the environment wins, and the
    process gets its own setting back afterwards."""
    from threadpoolctl import threadpool_limits

    from cliptune_ort.tuner import blas_thread_count

    monkeypatch.delenv("OPENBLAS_NUM_THREADS", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    with threadpool_limits(limits=2, user_api="blas"):
        assert blas_thread_count() == 2
        res = tune(_cfg(method="bbt", budget=24), tmp_path / "a", model_dir=splade_dir, progress=False)
        assert res["blas_threads"] == 1
        assert json.loads((tmp_path / "a" / "result.json").read_text())["blas_threads"] == 1
        assert blas_thread_count() == 2
        monkeypatch.setenv("OPENBLAS_NUM_THREADS", "2")
        res = tune(_cfg(method="bbt", budget=24), tmp_path / "b", model_dir=splade_dir, progress=False)
        assert res["blas_threads"] == 2


def test_dev_evaluations_of_an_unchanged_best_are_reused_exactly(splade_dir, tmp_path, monkeypatch):
    from cliptune_ort import tuner

    cfg = _cfg(method="bbt", eval_every=6, budget=96)  # one evaluation a generation: the best often stays
    calls = []
    real_eval = tuner.evaluate

    def counting(ws, prompt, batch):
        calls.append(batch is ws.dev)
        return real_eval(ws, prompt, batch)

    monkeypatch.setattr(tuner, "evaluate", counting)
    reused = tune(cfg, tmp_path / "reused", model_dir=splade_dir, progress=False)
    n_reused = sum(calls)
    real_dev_eval = tuner._dev_eval
    monkeypatch.setattr(tuner, "_dev_eval", lambda ws, state, writer, memo: real_dev_eval(ws, state, writer, {}))
    calls.clear()
    fresh = tune(cfg, tmp_path / "fresh", model_dir=splade_dir, progress=False)
    n_fresh = sum(calls)
    hist = [json.loads(x) for x in (tmp_path / "reused" / "history.jsonl").read_text().splitlines()]
    distinct = 1 + sum(1 for a, b in zip(hist, hist[1:]) if a["best_train_fitness"] != b["best_train_fitness"])
    assert n_fresh == len(hist) + 1  # every evaluation, plus the final one on dev
    assert n_reused == distinct + 1 < n_fresh
    assert (tmp_path / "reused" / "history.jsonl").read_text() == (tmp_path / "fresh" / "history.jsonl").read_text()
    assert reused["dev"] == fresh["dev"] and reused["test"] == fresh["test"]


def test_the_next_ask_runs_ahead_without_changing_the_run(splade_dir, tmp_path, monkeypatch):
    """The next generation's ask runs on its own thread while the dev evaluation runs (pycma's
    eigendecomposition falls due on those generations): the run is the same, bit for bit, as with every
    ask in turn, and result.json says how long the asks ran ahead."""
    import threading

    from cliptune_ort import tuner
    from cliptune_ort.optim import CMAES

    threads = []
    real_ask = CMAES.ask

    def ask(self):
        threads.append(threading.current_thread().name)
        return real_ask(self)

    monkeypatch.setattr(CMAES, "ask", ask)
    cfg = _cfg(method="bbt", budget=72, eval_every=12)  # 12 generations, an evaluation every other one
    ahead = tune(cfg, tmp_path / "ahead", model_dir=splade_dir, progress=False)
    assert threads[0] == "MainThread" and all(t.startswith("cliptune-ask") for t in threads[1:])
    assert len(threads) == 12 and ahead["timing_seconds"]["ask_background"] > 0
    monkeypatch.setattr(tuner, "ASK_AHEAD", False)
    threads.clear()
    in_turn = tune(cfg, tmp_path / "in_turn", model_dir=splade_dir, progress=False)
    assert threads == ["MainThread"] * 12 and in_turn["timing_seconds"]["ask_background"] == 0
    for f in ("history.jsonl", "best_z.npy", "best_prompt.npy"):
        assert (tmp_path / "ahead" / f).read_bytes() == (tmp_path / "in_turn" / f).read_bytes(), f
    ck = [json.loads((tmp_path / r / "checkpoint.json").read_text()) for r in ("ahead", "in_turn")]
    assert ck[0]["digests"] == ck[1]["digests"] and ck[0]["fitness"] == ck[1]["fitness"]


def test_the_embedded_export_relays_its_output_where_stderr_has_no_descriptor(monkeypatch, tmp_path):
    """In Jupyter (or under captured streams) sys.stderr is no file: the export child's progress is relayed
    after it ends, instead of subprocess failing with io.UnsupportedOperation (found by the README's Python
    example under pytest's capture)."""
    import io
    import subprocess
    import sys

    from cliptune_ort import models

    seen = {}

    def run(cmd, stdout=None, stderr=None, text=None):
        seen["stdout"] = stdout
        return subprocess.CompletedProcess(cmd, 0, stdout="[export] progress line\n", stderr="")

    monkeypatch.setattr(subprocess, "run", run)
    notebook = io.StringIO()  # like ipykernel's OutStream: fileno() raises io.UnsupportedOperation
    monkeypatch.setattr(sys, "stderr", notebook)
    models.export_subprocess("model", tmp_path / "out", 4, 0.1)
    assert seen["stdout"] is subprocess.PIPE and "[export] progress line" in notebook.getvalue()


def test_patience_stops_early_and_a_resume_stays_stopped(splade_dir, tmp_path):
    """--patience N ends the run once N dev evaluations in a row found no better dev metric; the run up to there
    is the run a budget ending there makes, and a resume of it (result.json lost) adds no generation."""
    cfg = _cfg(method="bbt", budget=600, popsize=4, d=20, eval_every=8, patience=4)
    res = tune(cfg, tmp_path / "p", model_dir=splade_dir, progress=False)
    assert res["stop_reason"].startswith("patience: no better dev metric in 4 evaluations") and res["calls"] < 600
    evals = [json.loads(x) for x in (tmp_path / "p" / "history.jsonl").read_text().splitlines()]
    assert [e["improved"] for e in evals[-4:]] == [False] * 4 and any(e["improved"] for e in evals)
    cut = tune(_cfg(method="bbt", budget=res["calls"], popsize=4, d=20, eval_every=8), tmp_path / "b",
               model_dir=splade_dir, progress=False)
    assert cut["stop_reason"] is None and cut["dev"] == res["dev"] and cut["test"] == res["test"]
    assert np.array_equal(np.load(tmp_path / "p" / "best_prompt.npy"), np.load(tmp_path / "b" / "best_prompt.npy"))
    (tmp_path / "p" / "result.json").unlink()
    again = tune(cfg, tmp_path / "p", model_dir=splade_dir, progress=False, resume=True)
    assert again["calls"] == res["calls"] and again["stop_reason"] == res["stop_reason"]
    assert again["test"] == res["test"]
    from cliptune_ort.errors import CheckpointError, ConfigError

    (tmp_path / "p" / "result.json").unlink()
    with pytest.raises(CheckpointError, match="patience 4, now 8"):  # patience defines the run
        tune(_cfg(method="bbt", budget=600, popsize=4, d=20, eval_every=8, patience=8), tmp_path / "p",
             model_dir=splade_dir, progress=False, resume=True)
    with pytest.raises(ConfigError, match="patience must be >= 0"):
        _cfg(patience=-1)


def test_using_a_clip_run_opens_the_full_network_only(splade_dir, tmp_path):
    """eval/predict need graph 0 alone: a clip run's K thinned graphs stay closed (start-up and memory)."""
    from cliptune_ort.predict import _load_run, evaluate_run

    run = tmp_path / "c"
    res = tune(_cfg(method="clip", k=2, budget=24, popsize=4, d=10, eval_every=12), run, model_dir=splade_dir,
               progress=False)
    cfg, ws, _ = _load_run(run, None)
    try:
        assert cfg.method == "clip" and sorted(ws.engine.sessions) == [0]
        assert ws.at is None and ws.dev is not None  # no projection drawn (the prompt is the run's); eval's data read
    finally:
        ws.engine.close()
    cfg, ws, _ = _load_run(run, None, splits=False)  # predict: new text only
    try:
        assert ws.fewshot is None and ws.train is None and ws.test is None and ws.at is None
    finally:
        ws.engine.close()
    assert evaluate_run(run, "test")["metric"] == res["test"]["metric"]
