"""Prompts made on the engine's device (Engine.project): the shipped projection graphs, the shared
prompt buffer the bound graphs read, and runs that use it (checked on the CPU provider)."""

from __future__ import annotations

import gc
import json
import weakref

import numpy as np
import onnxruntime as ort
import pytest

from cliptune_ort.config import build_config
from cliptune_ort.engine import PROJECTION_DIR, DevicePrompts, Engine
from cliptune_ort.errors import ConfigError
from cliptune_ort.tuner import prepare, score, tune

from .conftest import needs_export

D = 40


def test_shipped_graphs_are_what_the_exporter_builds():
    pytest.importorskip("onnx")
    from cliptune_export.projection import DTYPES, asset_path, projection_model

    for dtype in DTYPES:
        shipped = asset_path(dtype).read_bytes()
        assert asset_path(dtype).parent == PROJECTION_DIR
        assert shipped == projection_model(dtype), (f"{asset_path(dtype)} is stale: rebuild it with "
                                                    "python -m cliptune_export.projection")


def test_shipped_cast_graph_is_what_the_exporter_builds():
    pytest.importorskip("onnx")
    from cliptune_export.projection import CAST_NAME, cast_model

    from cliptune_ort.engine import CAST_PATH

    assert CAST_PATH == PROJECTION_DIR / CAST_NAME
    assert CAST_PATH.read_bytes() == cast_model(), f"{CAST_PATH} is stale: python -m cliptune_export.projection"


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")  # numpy's, on the edge values
def test_host_cast_is_numpy_s_cast_bit_for_bit(tmp_path, monkeypatch):
    """engine.host_cast (ONNX Runtime's CPU Cast for float32 -> float16 arrays of CAST_MIN elements or more) gives
    numpy's bits: rounding to nearest even, the subnormals, 65504 and the overflow band to inf, -0, inf, NaN;
    on a non-contiguous view too. Small arrays and other types take numpy's cast; a cast graph that does not
    load falls back to numpy with one warning."""
    import cliptune_ort.engine as engine_mod

    monkeypatch.setattr(engine_mod, "_cast", {"session": None, "failed": False})
    rng = np.random.default_rng(12)
    a = (rng.standard_normal((20, 50, 64)) * 10.0 ** rng.integers(-9, 7, (20, 50, 64))).astype(np.float32)
    edge = np.array([0.0, -0.0, 1e-9, -1e-9, 2.98e-8, 2.99e-8, 5.96e-8, 8.9e-8, 6.1e-5, 6.104e-5, 1 / 3, 0.1,
                     2049.0, 2051.0, 65504.0, 65519.99, 65520.0, 1e6, -1e6, 3.4e38, np.inf, -np.inf, 1e-40],
                    np.float32)
    a.flat[:len(edge)] = edge
    a.flat[len(edge)] = np.nan
    got = engine_mod.host_cast(a, np.float16)
    assert engine_mod._cast["session"] is not None  # ONNX Runtime's path ran
    want = a.astype(np.float16)
    assert got.dtype == np.float16 and got.shape == a.shape and got.flags.c_contiguous
    fin = ~np.isnan(want)
    np.testing.assert_array_equal(got[fin].view(np.uint16), want[fin].view(np.uint16))
    assert np.array_equal(np.isnan(got), np.isnan(want))
    view = a[:, ::3]
    np.testing.assert_array_equal(engine_mod.host_cast(view, np.float16)[~np.isnan(view)].view(np.uint16),
                                  view.astype(np.float16)[~np.isnan(view)].view(np.uint16))
    for small in (a[0, :2], a.astype(np.float64)):  # numpy's path: the same values
        out = engine_mod.host_cast(small, np.float16)
        assert out.dtype == np.float16 and np.array_equal(out, small.astype(np.float16), equal_nan=True)
    assert engine_mod.host_cast(a, np.float32) is a  # no cast, no copy (numpy's ascontiguousarray)
    monkeypatch.setattr(engine_mod, "_cast", {"session": None, "failed": False})
    monkeypatch.setattr(engine_mod, "CAST_PATH", tmp_path / "missing.onnx")
    with pytest.warns(RuntimeWarning, match="host cast graph did not load"):
        out = engine_mod.host_cast(a, np.float16)
    assert np.array_equal(out, want, equal_nan=True) and engine_mod._cast["failed"]


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_projection_graph_is_z_times_at(dtype):
    rng = np.random.default_rng(0)
    z = rng.standard_normal((3, 7)).astype(np.float32)
    at = rng.standard_normal((7, 4 * 5)).astype(np.float32)
    sess = ort.InferenceSession(str(PROJECTION_DIR / f"projection_{dtype}.onnx"), providers=["CPUExecutionProvider"])
    out = sess.run(None, {"z": z, "at": at, "shape": np.array([3, 4, 5], dtype=np.int64)})[0]
    want = (z @ at).reshape(3, 4, 5)
    if dtype == "fp16":
        assert out.dtype == np.float16
        np.testing.assert_array_equal(out, want.astype(np.float16))  # one rounding, as the host path's cast
    else:
        assert out.dtype == np.float32
        np.testing.assert_allclose(out, want, rtol=1e-6, atol=1e-6)


@pytest.fixture(scope="module")
def ws(splade_dir):
    return prepare(build_config(task="sst2", method="clip", k=2, d=D, popsize=5), splade_dir)


def _bound_engine(ws, **kw):
    eng = Engine(ws.manifest, [0, 1, 2], device="cpu", iobinding=True, **{"cands_per_call": 100, "workers": 1, **kw})
    eng.enable_projection(ws.at)
    return eng


@needs_export
@pytest.mark.parametrize("workers,n_buckets", [(1, 1), (2, 3)])
def test_device_prompts_give_the_host_scores(ws, workers, n_buckets):
    z = np.random.default_rng(4).standard_normal((5, D))
    host = ws.prompts(z)
    assert isinstance(host, np.ndarray)  # the CPU engine of prepare() runs one candidate per call
    ref = score(ws, host)
    eng = _bound_engine(ws, workers=workers)
    old, ws.engine = ws.engine, eng
    try:
        if n_buckets > 1:  # several length buckets: every bucket's binding reads the one buffer
            old_train, ws.train = ws.train, eng.prepare(ws.train.enc, n_buckets)
        dp = ws.prompts(z)
        assert isinstance(dp, DevicePrompts) and dp.shape == (5, ws.manifest.n_prompt, ws.manifest.hidden)
        buf = eng._projections[5].prompt.numpy()
        np.testing.assert_allclose(buf, host, rtol=1e-5, atol=1e-6)
        for _ in range(2):  # the second call reuses the bindings
            np.testing.assert_allclose(score(ws, dp), ref, atol=1e-6, rtol=0)
        # another set overwrites the shared buffer; the first is projected again when used
        dp2 = ws.prompts(z[::-1].copy())
        np.testing.assert_allclose(score(ws, dp2), ref[::-1], atol=1e-6, rtol=0)
        np.testing.assert_allclose(score(ws, dp), ref, atol=1e-6, rtol=0)
        # anything but this engine's stacked runs sees the host projection
        np.testing.assert_allclose(np.asarray(dp), host, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(dp[1], host[1], rtol=1e-6, atol=1e-7)
        mixture, ws.cfg.mixture = ws.cfg.mixture, "assign"
        try:
            np.testing.assert_allclose(score(ws, dp), score(ws, host), atol=1e-6, rtol=0)
        finally:
            ws.cfg.mixture = mixture
        if n_buckets > 1:
            ws.train = old_train
    finally:
        ws.engine = old
        eng.close()
    np.testing.assert_allclose(score(ws, dp), ref, atol=1e-6, rtol=0)  # on an engine that did not make it


@needs_export
def test_projection_only_where_runs_are_bound_and_stacked(ws):
    z = np.random.default_rng(5).standard_normal((5, D))
    for kw in ({"cands_per_call": 1, "workers": 2}, {"cands_per_call": 4}):
        eng = _bound_engine(ws, **kw)
        assert not eng.projects_on_device(5)
        assert isinstance(eng.project(z), np.ndarray)
        eng.close()
    eng = Engine(ws.manifest, [0], device="cpu", iobinding=False, cands_per_call=100)
    with pytest.raises(ConfigError, match="enable_projection"):
        eng.project(z)
    eng.enable_projection(ws.at)
    assert isinstance(eng.project(z), np.ndarray)
    eng.enable_projection(ws.at)  # the same array again: fine
    with pytest.raises(ConfigError, match="one per engine"):
        eng.enable_projection(ws.at.copy())
    with pytest.raises(ConfigError, match="float32"):
        Engine(ws.manifest, [0], device="cpu").enable_projection(ws.at.astype(np.float64))
    eng.close()


def _live_after(make_and_drop):
    """Which weak references ``make_and_drop()`` returns are still alive with the cycle collector off."""
    gc.collect()
    gc.disable()
    try:
        return [r for r in make_and_drop() if r() is not None]
    finally:
        gc.enable()


@needs_export
def test_an_engine_and_its_device_prompts_free_their_sessions_by_refcount(ws):
    # a DevicePrompts refers to its engine, so the engine must refer to it weakly: a cycle would keep
    # every session (on CUDA: its arena and bound device buffers) until the collector happens to run
    def run():
        eng = _bound_engine(ws)
        dp = eng.project(np.random.default_rng(6).standard_normal((5, D)))
        assert isinstance(dp, DevicePrompts)
        assert eng.logits(1, dp, ws.train, ws.verbalizer_ids).shape == (5, len(ws.train.labels), 2)
        return [weakref.ref(s) for s in eng.sessions.values()] + [weakref.ref(eng), weakref.ref(dp)]

    assert _live_after(run) == []


@needs_export
def test_close_releases_the_sessions_while_the_engine_is_still_referenced(ws):
    kept = []

    def run():
        eng = _bound_engine(ws)
        dp = eng.project(np.random.default_rng(7).standard_normal((5, D)))
        eng.logits(2, dp, ws.train, ws.verbalizer_ids)
        refs = [weakref.ref(s) for s in eng.sessions.values()] + [weakref.ref(eng._projector)]
        kept.append(eng)  # someone still holds the engine (a traceback, a benchmark's variable)
        eng.close()
        return refs

    assert _live_after(run) == []
    host = kept[0].host_projection(np.ones((1, D)))  # the host projection still works after close
    assert host.shape == (1, ws.manifest.n_prompt, ws.manifest.hidden)


@needs_export
def test_bound_stacked_tune_run_matches_the_host_path(splade_dir, tmp_path):
    """A whole run with the projection on the (CPU) device: the first generation's losses are the host
    path's; the run finishes and records where it projected."""
    small = {"task": "sst2", "method": "clip", "k": 2, "budget": 60, "popsize": 6, "eval_every": 30, "d": 50,
             "plot": False}
    a = tune(build_config(**small), tmp_path / "host", model_dir=splade_dir, progress=False)
    b = tune(build_config(**small, iobinding="on", cands_per_call=6), tmp_path / "dev", model_dir=splade_dir,
             progress=False)
    assert a["projection_on_device"] is False and b["projection_on_device"] is True
    fa = json.loads((tmp_path / "host" / "checkpoint.json").read_text())["fitness"]
    fb = json.loads((tmp_path / "dev" / "checkpoint.json").read_text())["fitness"]
    assert len(fa) == len(fb) == 10
    np.testing.assert_allclose(fb[0], fa[0], atol=1e-6, rtol=0)
    assert b["calls"] == 60 and b["timing_seconds"]["projection"] > 0


@needs_export
def test_a_projection_graph_that_does_not_load_falls_back_to_the_host(ws, tmp_path, monkeypatch):
    import cliptune_ort.engine as engine_mod

    monkeypatch.setattr(engine_mod, "PROJECTION_DIR", tmp_path)  # no graph there
    eng = _bound_engine(ws)
    z = np.random.default_rng(6).standard_normal((5, D))
    with pytest.warns(RuntimeWarning, match="projection graph did not load"):
        p = eng.project(z)
    assert isinstance(p, np.ndarray) and not eng.projects_on_device(5)
    np.testing.assert_allclose(p, ws.prompts(z, host=True), rtol=0, atol=0)
    eng.close()


@needs_export
def test_dev_evaluations_use_the_device_projection(splade_dir, monkeypatch):
    """A bound run's dev evaluation projects the best candidate on the device (no 100 MB host z @ A on a
    roberta-large run) and gets the host path's numbers; an unbound run keeps the host projection."""
    from cliptune_ort.tuner import _dev_eval, evaluate

    host_calls = []
    real = Engine.host_projection

    def spy(self, z):
        host_calls.append(np.asarray(z).shape)
        return real(self, z)

    monkeypatch.setattr(Engine, "host_projection", spy)
    z = list(np.random.default_rng(3).standard_normal(D))
    for bound, want_host in ((True, []), (False, [(1, D)])):
        cfg = build_config(task="sst2", method="bbt", d=D, popsize=5, **({"iobinding": "on", "cands_per_call": 5}
                                                                          if bound else {}))
        wsb = prepare(cfg, splade_dir)
        try:
            state = {"best_z": z, "best_dev": None, "calls": 5, "forward_passes": 5, "generation": 1,
                     "best_fit": 0.5, "evals": []}

            class Writer:
                def history(self, entry):
                    pass

            host_calls.clear()
            _dev_eval(wsb, state, Writer(), {})
            assert host_calls == want_host
            r = state["evals"][0]
            ref = evaluate(wsb, real(wsb.engine, np.asarray(z))[0], wsb.dev)
            assert r["dev_metric"] == ref["metric"]
            np.testing.assert_allclose(r["dev_loss"], ref["loss"], atol=1e-5, rtol=0)
        finally:
            wsb.engine.close()


@needs_export
def test_projection_is_drawn_beside_the_data(splade_dir, monkeypatch):
    """prepare() draws the projection on a set-up thread while it reads the data (run 9: 0.38 s after
    0.85 s); the draw is the same; a manual run draws none."""
    import threading

    import cliptune_ort.tuner as tuner_mod

    seen = []
    real = tuner_mod.projection

    def spy(*a):
        seen.append(threading.current_thread().name)
        return real(*a)

    monkeypatch.setattr(tuner_mod, "projection", spy)
    cfg = build_config(task="sst2", method="bbt", d=D, popsize=5)
    wsp = prepare(cfg, splade_dir)
    try:
        assert len(seen) == 1 and seen[0].startswith("cliptune-setup")
        np.testing.assert_array_equal(wsp.at, real(cfg.seed, D, wsp.manifest.n_prompt, wsp.manifest.hidden,
                                                   wsp.manifest.embedding_std, cfg.sigma0))
        assert "projection" in wsp.setup_seconds
    finally:
        wsp.engine.close()
    wsm = prepare(build_config(task="sst2", method="manual"), splade_dir)
    wsm.engine.close()
    assert len(seen) == 1 and wsm.at is None


@needs_export
def test_final_evaluation_projects_as_the_dev_evaluations(splade_dir, tmp_path, monkeypatch):
    """The final train/dev/test evaluation of the best-dev candidate runs on the prompt the dev evaluations
    used (DevicePrompts in a bound run: the dev binding serves again), an unbound run on the host prompt as
    before; both give best_prompt.npy's numbers (the saved prompt is the host projection)."""
    from cliptune_ort import tuner

    seen = []
    real = tuner.evaluate

    def spy(ws, prompt, batch):
        seen.append(type(prompt).__name__)
        return real(ws, prompt, batch)

    monkeypatch.setattr(tuner, "evaluate", spy)
    for bound in (True, False):
        cfg = build_config(task="sst2", method="bbt", d=D, popsize=5, budget=20, eval_every=10, plot=False,
                           **({"iobinding": "on", "cands_per_call": 5} if bound else {}))
        seen.clear()
        run = tmp_path / f"bound_{bound}"
        res = tune(cfg, run, progress=False, model_dir=splade_dir)
        assert seen[-3:] == (["DevicePrompts"] * 3 if bound else ["ndarray"] * 3)  # train, dev, test
        ws = prepare(cfg, splade_dir)
        try:
            for split, batch in (("dev", ws.dev), ("test", ws.test)):
                ref = real(ws, np.load(run / "best_prompt.npy"), batch)
                assert res[split]["metric"] == ref["metric"]
                np.testing.assert_allclose(res[split]["loss"], ref["loss"], atol=1e-5, rtol=0)
        finally:
            ws.engine.close()
