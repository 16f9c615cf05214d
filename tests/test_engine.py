"""The engine's execution paths agree: plain runs, IOBinding (CPU provider), stacking, workers."""

from __future__ import annotations

import numpy as np
import pytest

from cliptune_ort.config import build_config
from cliptune_ort.engine import Engine
from cliptune_ort.errors import ConfigError, ProviderError
from cliptune_ort.tuner import prepare, score

from .conftest import needs_export

pytestmark = needs_export


@pytest.fixture(scope="module")
def ws(splade_dir):
    return prepare(build_config(task="sst2", method="clip", k=2, d=40, popsize=5), splade_dir)


@pytest.mark.parametrize("iobinding,cpc,workers", [(False, 1, 1), (True, 1, 2), (True, 5, 1), (False, 3, 2),
                                                   (True, 2, 2)])
def test_paths_agree(ws, iobinding, cpc, workers):
    p = ws.prompts(np.random.default_rng(4).standard_normal((5, 40)))
    ref = score(ws, p)
    eng = Engine(ws.manifest, [0, 1, 2], device="cpu", iobinding=iobinding, cands_per_call=cpc, workers=workers)
    old, ws.engine = ws.engine, eng
    try:
        for _ in range(2):  # second call reuses the bindings / buffers
            np.testing.assert_allclose(score(ws, p), ref, atol=1e-6, rtol=0)
        p2 = p[::-1].copy()  # new values through the same persistent buffers
        np.testing.assert_allclose(score(ws, p2), ref[::-1], atol=1e-6, rtol=0)
        # a fresh batch object never reuses another batch's resident inputs
        dev = eng.logits(0, p[:1], ws.dev, ws.verbalizer_ids)
        dev2 = eng.logits(0, p[:1], eng.prepare(ws.dev.enc, 1), ws.verbalizer_ids)
        np.testing.assert_allclose(dev, dev2, atol=1e-5)
    finally:
        ws.engine = old
        eng.close()


def test_cuda_requests_fail_loudly_without_cuda(splade_dir):
    from cliptune_ort.manifest import load_manifest
    from cliptune_ort.sessions import available_providers

    if "CUDAExecutionProvider" in available_providers():
        pytest.skip("CUDA present")
    man = load_manifest(splade_dir, verify=False)
    with pytest.raises(ProviderError, match="no CUDAExecutionProvider"):
        Engine(man, [0], device="cuda")
    with pytest.raises(ConfigError, match="cuda_graph needs --device cuda"):
        Engine(man, [0], device="cpu", cuda_graph=True)
    assert Engine(man, [0], device="auto").device == "cpu"


def test_shared_tensors_per_graph_and_the_device_weights_switch(splade_dir, packed_pair, monkeypatch):
    import json

    from cliptune_ort.manifest import load_manifest
    from cliptune_ort.sessions import SharedWeights, env_flag, graph_weight_names

    man = load_manifest(splade_dir, verify=False)
    table = {t["name"] for t in man.data["weights"]["tensors"]}
    per_graph = [graph_weight_names(man, [g]) for g in range(man.k + 1)]
    assert set().union(*per_graph) == table  # every shared tensor is some graph's
    assert all(per_graph) and all(p <= table for p in per_graph)
    assert not man.data["masks_folded"] and all(p == per_graph[0] for p in per_graph)  # masks stay in-graph
    fp16 = load_manifest(packed_pair[0], verify=False)  # fp16: masks folded into a thinned graph's weights
    f0, f1 = graph_weight_names(fp16, [0]), graph_weight_names(fp16, [1])
    assert fp16.data["masks_folded"] and f0 & f1 and f0 != f1
    assert graph_weight_names(load_manifest(packed_pair[2], verify=False), [1]) == f1  # packing keeps the names
    # a graph names each of its external initializers: the same set as the protobuf's own list
    onnx = pytest.importorskip("onnx")
    m = onnx.load(str(man.graph_path(1)), load_external_data=False)
    assert per_graph[1] == {i.name for i in m.graph.initializer if i.data_location == onnx.TensorProto.EXTERNAL}
    sw = SharedWeights(man, graphs=[1])  # host values for graph 1's tensors only; every array mapped
    assert set(sw.values) == per_graph[1] and set(sw.arrays) == table
    assert set(SharedWeights(man).values) == table

    monkeypatch.delenv("CLIPTUNE_DEVICE_WEIGHTS", raising=False)
    assert env_flag("CLIPTUNE_DEVICE_WEIGHTS") is False and env_flag("CLIPTUNE_DEVICE_WEIGHTS", True) is True
    monkeypatch.setenv("CLIPTUNE_DEVICE_WEIGHTS", "1")
    assert env_flag("CLIPTUNE_DEVICE_WEIGHTS") is True and env_flag("CLIPTUNE_DEVICE_WEIGHTS", False) is False
    eng = Engine(man, [0, 1], device="cpu")  # CPU provider: host tensors whatever the switch says
    assert eng.device_weights is True and set(eng.shared.values) == table
    assert all(v.device_name().lower() == "cpu" for v in eng.shared.values.values())
    eng.close()
    # a runtime that refuses a device tensor as an initializer (onnxruntime 1.31.1 on a card, run 8): one line
    from cliptune_ort import sessions

    class Refusing(sessions.ort.SessionOptions):
        def add_initializer(self, name, value):
            raise RuntimeError("pybind_state.cc:2810 [ONNXRuntimeError] : 2 : INVALID_ARGUMENT : Buffer containing "
                               "the initializer must be owned by the user.\n")

    class OnDevice:  # what SharedWeights(device="cuda") holds: OrtValues on the GPU
        def device_name(self):
            return "Cuda"

    shared = SharedWeights(man, graphs=[0])
    shared.values = {n: OnDevice() for n in shared.values}
    monkeypatch.setattr(sessions.ort, "SessionOptions", Refusing)
    spec = sessions.SessionSpec(device="cpu")
    with pytest.raises(ConfigError, match=r"CLIPTUNE_DEVICE_WEIGHTS=1: this onnxruntime .* does not take weights in "
                                          r"device memory as initializers \(Buffer containing the initializer must be "
                                          r"owned by the user.\); unset CLIPTUNE_DEVICE_WEIGHTS"):
        sessions.make_session(man.graph_path(0), spec, shared)
    shared.values = {n: sessions.ort.OrtValue.ortvalue_from_numpy(a) for n, a in shared.arrays.items()}
    with pytest.raises(RuntimeError, match="owned by the user"):  # host tensors: the runtime's own error
        sessions.make_session(man.graph_path(0), spec, shared)
    monkeypatch.undo()
    monkeypatch.setenv("CLIPTUNE_DEVICE_WEIGHTS", "yes")
    with pytest.raises(ConfigError, match="CLIPTUNE_DEVICE_WEIGHTS='yes': expected 1 .on. or 0 .off."):
        Engine(man, [0], device="cpu")
    assert json.dumps(sorted(per_graph[0]))  # names are plain strings (manifest-safe)


@pytest.mark.parametrize("iobinding,cpc", [(True, 5), (False, 2)])
def test_concurrent_graphs_give_the_same_losses(ws, iobinding, cpc):
    # clip's K thinned graphs each on their own thread (CLIPTUNE_CONCURRENT_GRAPHS): the first
    # WARM_RUNS calls of a shape take turns (ORT's CUDA-graph capture must run alone), later ones overlap
    p = ws.prompts(np.random.default_rng(5).standard_normal((5, 40)))
    seq = Engine(ws.manifest, [0, 1, 2], device="cpu", iobinding=iobinding, cands_per_call=cpc, workers=1, threads=1)
    con = Engine(ws.manifest, [0, 1, 2], device="cpu", iobinding=iobinding, cands_per_call=cpc, workers=1, threads=1,
                 concurrent_graphs=True)
    old = ws.engine
    try:
        ws.engine = seq
        ref = score(ws, p)
        ws.engine = con
        threads = set()
        real = con._run_bound if iobinding else None
        if real is not None:
            def spy(graph, *a, **kw):
                import threading

                threads.add((graph, threading.current_thread().name))
                return real(graph, *a, **kw)

            con._run_bound = spy
        for i in range(Engine.WARM_RUNS + 2):
            assert np.array_equal(score(ws, p), ref), i  # bit for bit, in turns and overlapped
        # runs per binding: chunks of one shape share one (3 chunks of 2, 2, 1 candidates with cpc 2)
        n = Engine.WARM_RUNS + 2
        assert sorted(set(con._graph_runs.values())) == ([n] if cpc == 5 else [n, 2 * n])
        if iobinding:  # each graph always on its own thread
            assert threads == {(1, "cliptune-graph1_0"), (2, "cliptune-graph2_0")}
        assert con.logits(0, p[:1], ws.dev, ws.verbalizer_ids).shape == (1, ws.dev.n, 2)  # one graph: this thread
    finally:
        ws.engine = old
        seq.close()
        con.close()
    assert con._graph_threads is None


def test_setup_opens_sessions_beside_the_data(splade_dir, tmp_path):
    """prepare() opens the K+1 sessions (at once) on a thread while it reads the data: the run's numbers are
    those of an engine opened alone; a data error is reported as itself, and the engine that was opening is
    closed, not left behind; a session's error is reported after the data work."""
    import threading

    from cliptune_ort.errors import DataError

    cfg = build_config(task="sst2", method="clip", k=3, d=30, popsize=4)
    ws = prepare(cfg, splade_dir)
    try:
        assert sorted(ws.engine.open_seconds) == [0, 1, 2, 3] and ws.engine.open_wall_seconds > 0
        assert {"data", "tokenizer", "encode", "projection", "sessions", "batches"} <= set(ws.setup_seconds)
        z = np.random.default_rng(1).standard_normal((4, 30))
        alone = Engine(ws.manifest, [0, 1, 2, 3], device="cpu")
        ref_engine, ws.engine = ws.engine, alone
        alone.enable_projection(ws.at)
        try:
            ref = score(ws, ws.prompts(z))
        finally:
            ws.engine = ref_engine
            alone.close()
        np.testing.assert_array_equal(score(ws, ws.prompts(z)), ref)
    finally:
        ws.engine.close()

    closed = []
    real_close = Engine.close

    def spy_close(self):
        closed.append(self)
        real_close(self)

    Engine.close = spy_close
    try:
        with pytest.raises(DataError, match="not found"):
            prepare(build_config(task="sst2", method="clip", k=2, data_dir=str(tmp_path / "nodata")), splade_dir)
    finally:
        Engine.close = real_close
    assert len(closed) == 1 and closed[0].sessions == {}  # the engine opened beside the data was closed
    assert not [t for t in threading.enumerate() if t.name.startswith(("cliptune-engine", "cliptune-open"))]

    from cliptune_ort.sessions import available_providers

    if "CUDAExecutionProvider" not in available_providers():  # the engine thread's own error reaches the caller
        with pytest.raises(ProviderError, match="no CUDAExecutionProvider"):
            prepare(build_config(task="sst2", method="clip", k=2, device="cuda"), splade_dir)


def test_attention_kernel_choice(splade_dir, monkeypatch):
    """CLIPTUNE_ATTENTION / Engine(attention=...) picks ONNX Runtime's attention kernel on CUDA (the provider's
    sdpa_kernel bit mask, with the unfused kernel as fallback); 'auto' leaves ORT's choice; a wrong name is
    a one-line error."""
    from cliptune_ort.manifest import load_manifest
    from cliptune_ort.sessions import SessionSpec, provider_list

    def cuda_opts(**kw):
        return provider_list(SessionSpec(device="cuda", **kw))[0][1]

    assert "sdpa_kernel" not in cuda_opts()
    assert cuda_opts(attention="efficient")["sdpa_kernel"] == "18"
    assert cuda_opts(attention="flash", cuda_graph=True) == {"device_id": 0, "enable_cuda_graph": "1",
                                                              "sdpa_kernel": "17"}
    assert provider_list(SessionSpec(device="cpu", attention="efficient")) == ["CPUExecutionProvider"]
    man = load_manifest(splade_dir, verify=False)
    monkeypatch.setenv("CLIPTUNE_ATTENTION", "efficient")
    eng = Engine(man, [0], device="cpu")
    assert eng.attention == "efficient"
    eng.close()
    assert Engine(man, [0], device="cpu", attention="auto").attention == "auto"  # the argument wins
    monkeypatch.setenv("CLIPTUNE_ATTENTION", "fast")
    with pytest.raises(ConfigError, match="attention kernel 'fast' .* is not one of auto, flash, efficient, cudnn"):
        Engine(man, [0], device="cpu")


def test_load_errors_name_the_cause(tmp_path):
    """A graph newer than the installed onnxruntime reads (card run 10: onnx 1.23 wrote IR 14, ORT 1.31.1 reads
    13) gets a one-line error naming both versions and the fix; other load failures keep ORT's cause, not its
    C++ signature (which used up the 300 characters of the old message)."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    from cliptune_ort.errors import ModelDirError
    from cliptune_ort.sessions import SessionSpec, make_session

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    ok = tmp_path / "ok.onnx"
    onnx.save(model, str(ok))
    np.testing.assert_array_equal(make_session(ok, SessionSpec(device="cpu")).run(None, {"x": np.array(
        [-1.0, 2.0], np.float32)})[0], [0.0, 2.0])
    model.ir_version = 99
    newer = tmp_path / "newer.onnx"
    onnx.save(model, str(newer))
    with pytest.raises(ModelDirError, match=r"newer.onnx is ONNX IR version 99; onnxruntime \S+ reads up to \d+: "
                                            r"upgrade onnxruntime") as e:
        make_session(newer, SessionSpec(device="cpu"))
    assert "\n" not in str(e.value)
    model.ir_version = 8
    model.graph.node[0].op_type = "NoSuchOp"
    bad = tmp_path / "bad.onnx"
    onnx.save(model, str(bad))
    with pytest.raises(ModelDirError, match=r"cannot load .*NoSuchOp.*re-export") as e:
        make_session(bad, SessionSpec(device="cpu"))
    assert "::" not in str(e.value) and "\n" not in str(e.value)
