"""cliptune's custom-op library (cliptune_ort/native) and the packed "cublaslt" feed-forward rewrite.

The op's CUDA build runs on a GPU only (benchmarks/gpu.py checks its logits against PyTorch there). Here:
- the CPU build of the same source runs in ONNX Runtime and gives the numpy FusedDense of
  tests/test_packing.py, which the rewrite tests use: that ties the numpy op to the library's semantics
  (tanh GELU, bias, any leading dimensions) and tests the library's ONNX Runtime glue;
- the rewrite (export/packing.py, ffn="cublaslt") keeps the unpacked graph's logits through onnx.reference,
  with random biases so that a lost bias shows;
- a missing or unloadable library is a one-line error naming `cliptune build-ops`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from cliptune_ort.manifest import load_manifest

from .conftest import needs_export
from .test_packing import (
    _ffn_case,
    _randomize,
    _reference_ops,
    _skip_ln_biases,
)


@pytest.fixture(scope="module")
def cpu_ops(tmp_path_factory):
    """The CPU build of the library (skips where ONNX Runtime's headers cannot be had: no download and no
    CLIPTUNE_ORT_INCLUDE)."""
    import shutil

    from cliptune_ort import native

    if shutil.which("g++") is None:
        pytest.skip("no g++ on this machine")
    try:
        native.ort_include()
    except native.NativeOpsError as e:
        pytest.skip(f"ONNX Runtime headers unavailable: {e}")
    return native.build("cpu", tmp_path_factory.mktemp("ops"))


def _dense_model(k: int, n: int, w, b, activation: str, x_shape=None, residual: bool = False):
    from onnx import TensorProto, helper, numpy_helper

    node = helper.make_node("FusedDense", ["x", "w", "b", *(["r"] if residual else [])], ["y"], domain="ai.cliptune",
                            activation=activation)
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape or ["a", "b", k])]
    if residual:
        inputs.append(helper.make_tensor_value_info("r", TensorProto.FLOAT, ["a", "b", n]))
    g = helper.make_graph([node], "dense", inputs,
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                          [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ai.cliptune", 1)])


def _session(model, lib):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.register_custom_ops_library(str(lib))
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _dense_case(seed: int, k: int, n: int, lead: tuple):
    """(the numpy FusedDense, W [k, n], B [n], X [*lead, k]): random, scaled so the GELU's curve shows."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((k, n)) * 0.4).astype(np.float32)
    b = (rng.standard_normal(n) * 0.4).astype(np.float32)
    x = rng.standard_normal((*lead, k)).astype(np.float32)
    return next(op for op in _reference_ops() if op.__name__ == "FusedDense"), w, b, x


def test_library_op_is_the_numpy_op(cpu_ops):
    """ORT running the library's FusedDense = the numpy op the rewrite tests use, for both activations and
    3-D inputs; the tanh GELU is told apart from BERT's erf GELU at this tolerance."""
    k, n = 24, 40
    dense, w, b, x = _dense_case(0, k, n, (2, 7))
    for act in ("none", "gelu_tanh"):
        got = _session(_dense_model(k, n, w, b, act), cpu_ops).run(None, {"x": x})[0]
        want = dense._run(None, x, w, b, activation=act)[0]
        assert got.shape == (2, 7, n)
        np.testing.assert_allclose(got, want, atol=2e-5)
    pre = x @ w + b
    erf_gelu = 0.5 * pre * (1 + np.vectorize(math.erf)(pre / math.sqrt(2.0)))
    assert float(np.abs(erf_gelu - got).max()) > 10 * 2e-5
    assert float(np.abs(pre - got).max()) > 0.1  # the activation was applied


def test_library_residual_input(cpu_ops):
    """The optional 4th input R is added before the activation: act(X @ W + B + R), the numpy op's semantics
    (cuBLASLt's beta * C on the GPU); R of another shape is a one-line error."""
    k, n = 16, 24
    dense, w, b, x = _dense_case(3, k, n, (3, 5))
    r = np.random.default_rng(4).standard_normal((3, 5, n)).astype(np.float32)
    for act in ("none", "gelu_tanh"):
        sess = _session(_dense_model(k, n, w, b, act, residual=True), cpu_ops)
        got = sess.run(None, {"x": x, "r": r})[0]
        np.testing.assert_allclose(got, dense._run(None, x, w, b, r, activation=act)[0], atol=2e-5)
        without = _session(_dense_model(k, n, w, b, act), cpu_ops).run(None, {"x": x})[0]
        assert float(np.abs(got - without).max()) > 0.5  # the residual was added
    plain = _session(_dense_model(k, n, w, b, "none", residual=True), cpu_ops).run(None, {"x": x, "r": r})[0]
    np.testing.assert_allclose(plain, x @ w + b + r, atol=2e-5)
    with pytest.raises(Exception, match=r"residual R must have the output's shape"):
        sess.run(None, {"x": x, "r": r[:, :4]})


def test_library_errors_are_one_line(cpu_ops):
    rng = np.random.default_rng(1)
    w, b = rng.standard_normal((8, 4)).astype(np.float32), rng.standard_normal(4).astype(np.float32)
    with pytest.raises(Exception, match="activation must be 'none' or 'gelu_tanh', got 'relu'"):
        _session(_dense_model(8, 4, w, b, "relu"), cpu_ops)
    sess = _session(_dense_model(8, 4, w, b, "none", x_shape=["a", "k"]), cpu_ops)
    with pytest.raises(Exception, match=r"expected X \[\.\.\., K\], W \[K, N\], B \[N\]; got X \[3, 9\], W \[8, 4\]"):
        sess.run(None, {"x": np.zeros((3, 9), np.float32)})


def test_make_session_registers_the_library(cpu_ops, monkeypatch, tmp_path):
    """SessionSpec.ops_library: make_session registers the built library (found by CLIPTUNE_OPS_DIR); without
    it the graph does not load; a missing build is one line naming `cliptune build-ops`."""
    import shutil

    from cliptune_ort import native
    from cliptune_ort.errors import ModelDirError
    from cliptune_ort.sessions import SessionSpec, make_session

    rng = np.random.default_rng(2)
    w, b = rng.standard_normal((8, 4)).astype(np.float32), rng.standard_normal(4).astype(np.float32)
    path = tmp_path / "dense.onnx"
    path.write_bytes(_dense_model(8, 4, w, b, "gelu_tanh").SerializeToString())
    monkeypatch.setenv("CLIPTUNE_OPS_DIR", str(tmp_path / "ops"))
    with pytest.raises(native.NativeOpsError, match="cliptune build-ops --variant cpu"):
        make_session(path, SessionSpec(device="cpu", ops_library="cpu"))
    with pytest.raises(native.NativeOpsError, match="cliptune build-ops --variant cuda"):
        native.library_path("cuda")
    (tmp_path / "ops").mkdir()
    shutil.copy(cpu_ops, tmp_path / "ops" / native.lib_name("cpu"))
    x = rng.standard_normal((1, 2, 8)).astype(np.float32)
    got = make_session(path, SessionSpec(device="cpu", ops_library="cpu")).run(None, {"x": x})[0]
    dense = next(op for op in _reference_ops() if op.__name__ == "FusedDense")
    np.testing.assert_allclose(got, dense._run(None, x, w, b, activation="gelu_tanh")[0], atol=2e-5)
    with pytest.raises(ModelDirError, match="cannot load"):
        make_session(path, SessionSpec(device="cpu"))
    # an op this build lacks (a library built before the op existed): one line naming the rebuild
    newer = _dense_model(8, 4, w, b, "gelu_tanh")
    newer.graph.node[0].op_type = "FusedDenseNext"
    path.write_bytes(newer.SerializeToString())
    from cliptune_ort.errors import ProviderError

    with pytest.raises(ProviderError, match=r"has no FusedDenseNext op .* `cliptune build-ops --variant cpu`"):
        make_session(path, SessionSpec(device="cpu", ops_library="cpu"))
    monkeypatch.setenv("CLIPTUNE_OPS_LIB", str(tmp_path / "elsewhere.so"))  # an explicit file wins
    with pytest.raises(native.NativeOpsError, match="elsewhere.so missing"):
        native.library_path("cpu")


def _biased_case(src, seed: int, bias_seed: int):
    """:func:`_ffn_case` with random biases (random-init biases are zero: a lost bias would not show) in the
    BiasGelu, Attention and SkipLayerNormalization nodes: (layers, feeds, host feeds, numpy ops, graph 0,
    its logits through onnx.reference)."""
    from onnx.reference import ReferenceEvaluator

    _, layers, feeds, host, ops, m = _ffn_case(src, seed=seed)
    gelus = [n for n in m.graph.node if n.op_type == "BiasGelu"]
    atts = [n for n in m.graph.node if n.op_type == "Attention"]
    _randomize(m, {n.input[1] for n in gelus} | {n.input[2] for n in atts} | _skip_ln_biases(m),
               np.random.default_rng(bias_seed))
    return layers, feeds, host, ops, m, ReferenceEvaluator(m, new_ops=ops).run(None, feeds)[0]


@needs_export
def test_cublaslt_ffn_matches_unpacked(packed_pair, tmp_path):
    """ffn="cublaslt": every packed layer's MatMul -> BiasGelu and (flash kernel) the query projection's MatMul
    -> Add become FusedDense nodes with the same weights and biases (random here: random-init biases are
    zero); the logits are the unpacked graph's up to the tanh-vs-erf GELU, and shifting the fused biases
    moves them."""
    import collections
    import copy

    from cliptune_export.packing import PackingError, pack_export, pack_graph
    from onnx import numpy_helper
    from onnx.reference import ReferenceEvaluator

    src = packed_pair[0]
    layers, feeds, host, ops, m, ref = _biased_case(src, seed=7, bias_seed=3)
    atts = [n for n in m.graph.node if n.op_type == "Attention"]
    assert float(np.abs(ref).max()) > 0.05
    for host_offsets, kernel, dense in ((True, "flash", 2), (False, "fused", 1)):
        lt = copy.deepcopy(m)
        assert pack_graph(lt, host_offsets=host_offsets, kernel=kernel, ffn="cublaslt") == layers - 1
        count = collections.Counter(n.op_type for n in lt.graph.node)
        assert count["FusedDense"] == dense * (layers - 1)
        assert count["BiasGelu"] == 2  # the single-query last layer's and the LM head's stay ORT's
        assert not any(n.name.endswith("_bias_q") for n in lt.graph.node)
        assert any(o.domain == "ai.cliptune" for o in lt.opset_import)
        got = ReferenceEvaluator(lt, new_ops=ops).run(None, host if host_offsets else feeds)[0]
        np.testing.assert_allclose(got, ref, atol=1e-3)  # fp16 rounding and the tanh GELU
    # the GELU projections' biases are read: shift them and the logits move
    shifted, rng = copy.deepcopy(lt), np.random.default_rng(4)
    inits = {t.name: t for t in shifted.graph.initializer}
    fc1 = [n for n in shifted.graph.node if n.op_type == "FusedDense"]
    assert len(fc1) == layers - 1 and all(n.attribute[0].s == b"gelu_tanh" for n in fc1)
    for n in fc1:
        v = numpy_helper.to_array(inits[n.input[2]])
        inits[n.input[2]].CopyFrom(numpy_helper.from_array((v + rng.standard_normal(v.shape)).astype(v.dtype),
                                                           n.input[2]))
    wrong = ReferenceEvaluator(shifted, new_ops=ops).run(None, feeds)[0]
    assert float(np.abs(wrong - ref).max()) > 10 * 1e-3
    # the query projections' bias is the first third of the layer's QKV bias (its effect on a random-init
    # model's logits is below fp16 rounding, so it is checked by value)
    flash = _packed_flash(m)
    inits = {t.name: numpy_helper.to_array(t) for t in flash.graph.initializer}
    qkv_bias = {n.name: numpy_helper.to_array(next(t for t in m.graph.initializer if t.name == n.input[2]))
                for n in atts}
    queries = [n for n in flash.graph.node if n.op_type == "FusedDense" and n.attribute[0].s == b"none"]
    assert len(queries) == layers - 1
    for n in queries:
        b = qkv_bias[n.name.removesuffix("_dense_q")]
        assert float(np.abs(b).max()) > 0.1 and np.array_equal(inits[n.input[2]], b[: len(b) // 3])
    broken = copy.deepcopy(m)  # a layer whose first projection is not MatMul -> BiasGelu
    gelu = next(n for n in broken.graph.node if n.op_type == "BiasGelu")
    gelu.op_type, gelu.domain = "Add", ""
    with pytest.raises(PackingError, match=f"found {layers - 2} MatMul -> BiasGelu feed-forward projections"):
        pack_graph(broken, ffn="cublaslt")
    pman = pack_export(src, tmp_path / "lt", host_offsets=True, ffn="cublaslt")
    assert pman["packed_ffn"] == "cublaslt" and load_manifest(tmp_path / "lt").packed_ffn == "cublaslt"


@needs_export
def test_cublaslt_res_matches_unpacked(packed_pair, tmp_path):
    """ffn="cublaslt_res": on top of "cublaslt", each packed layer's two MatMul -> SkipLayerNormalization
    (attention output, second feed-forward projection) become FusedDense with the bias and the residual in the
    epilogue -> LayerNormalization, with the same weights, biases (the flash kernel's folded value bias
    included), gamma, beta and epsilon; the logits are the unpacked graph's, and a lost residual or bias shows."""
    import collections
    import copy

    from cliptune_export.packing import pack_export, pack_graph
    from onnx import numpy_helper
    from onnx.reference import ReferenceEvaluator

    src = packed_pair[0]
    layers, feeds, host, ops, m, ref = _biased_case(src, seed=11, bias_seed=5)
    n_ln = collections.Counter(n.op_type for n in m.graph.node)["LayerNormalization"]
    for host_offsets, kernel in ((True, "flash"), (False, "fused")):
        res = copy.deepcopy(m)
        assert pack_graph(res, host_offsets=host_offsets, kernel=kernel, ffn="cublaslt_res") == layers - 1
        count = collections.Counter(n.op_type for n in res.graph.node)
        dense = [n for n in res.graph.node if n.op_type == "FusedDense"]
        assert sum(len(n.input) == 4 for n in dense) == 2 * (layers - 1)  # two residual GEMMs a packed layer
        assert count["FusedDense"] == (4 if kernel == "flash" else 3) * (layers - 1)
        assert count["SkipLayerNormalization"] == 2  # the single-query last layer's stay ORT's
        assert count["LayerNormalization"] == n_ln + 2 * (layers - 1)
        got = ReferenceEvaluator(res, new_ops=ops).run(None, host if host_offsets else feeds)[0]
        np.testing.assert_allclose(got, ref, atol=1e-3)  # fp16 rounding and the tanh GELU
    # the residual and the (folded) bias are read: drop one residual, or shift the biases, and the logits move
    for what in ("residual", "bias"):
        broken, rng = copy.deepcopy(res), np.random.default_rng(6)
        inits = {t.name: t for t in broken.graph.initializer}
        for n in [n for n in broken.graph.node if n.op_type == "FusedDense" and len(n.input) == 4]:
            if what == "residual":
                del n.input[3]
                break
            v = numpy_helper.to_array(inits[n.input[2]])
            inits[n.input[2]].CopyFrom(numpy_helper.from_array((v + rng.standard_normal(v.shape)).astype(v.dtype),
                                                               n.input[2]))
        wrong = ReferenceEvaluator(broken, new_ops=ops).run(None, feeds)[0]
        assert float(np.abs(wrong - ref).max()) > 10 * 1e-3, what
    pman = pack_export(src, tmp_path / "res", host_offsets=True, ffn="cublaslt_res")
    man = load_manifest(tmp_path / "res")
    assert pman["packed_ffn"] == "cublaslt_res" and man.packed_ffn == "cublaslt_res" and man.needs_ops_library


def test_library_ragged_attention_is_the_numpy_op(cpu_ops):
    """The CPU build's RaggedAttention = the numpy op of the rewrite tests (attention within each packed row,
    rows located by their element offsets), with and without an explicit scale."""
    from onnx import TensorProto, helper

    op = next(o for o in _reference_ops() if o.__name__ == "RaggedAttention")
    rng = np.random.default_rng(8)
    lens = np.array([3, 7, 1, 5], np.int32)
    heads, hidden = 2, 8
    tokens = int(lens.sum())
    cu = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
    q, k, v = (rng.standard_normal((tokens, hidden)).astype(np.float32) for _ in range(3))
    feeds = {"q": q, "k": k, "v": v, "len": lens, "rag": cu * hidden, "off": np.zeros((4, 7), np.int32)}
    for scale in (0.0, 0.3):
        node = helper.make_node("RaggedAttention", ["q", "k", "v", "len", "rag", "off"], ["o"], domain="ai.cliptune",
                                num_heads=heads, scale=scale)
        ins = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["tokens", hidden]) for n in "qkv"]
        ins += [helper.make_tensor_value_info("len", TensorProto.INT32, ["rows"]),
                helper.make_tensor_value_info("rag", TensorProto.INT32, ["rows_plus_1"]),
                helper.make_tensor_value_info("off", TensorProto.INT32, ["rows", "seq"])]
        g = helper.make_graph([node], "attn", ins, [helper.make_tensor_value_info("o", TensorProto.FLOAT, None)])
        model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ai.cliptune", 1)])
        got = _session(model, cpu_ops).run(None, feeds)[0]
        want = op._run(None, q, k, v, lens, cu * hidden, feeds["off"], num_heads=heads, scale=scale)[0]
        np.testing.assert_allclose(got, want, atol=1e-5)
        # row 2 (one token) attends only to itself: its output is its own value
        np.testing.assert_allclose(got[cu[2]], v[cu[2]], atol=1e-6)
    with pytest.raises(Exception, match="RaggedAttention: expected Q, K, V"):
        _session(model, cpu_ops).run(None, {**feeds, "rag": feeds["rag"][:4]})
    # qkv = 1: one [tokens, 3 * hidden] tensor, Q, K and V read in place (impl 1 only)
    qkv = np.concatenate([q, k, v], axis=1)
    node3 = helper.make_node("RaggedAttention", ["qkv", "qkv", "qkv", "len", "rag", "off"], ["o"],
                             domain="ai.cliptune", num_heads=heads, scale=0.3, impl=1, qkv=1)
    ins3 = [helper.make_tensor_value_info("qkv", TensorProto.FLOAT, ["tokens", 3 * hidden]), *ins[3:]]
    g3 = helper.make_graph([node3], "attn3", ins3, [helper.make_tensor_value_info("o", TensorProto.FLOAT, None)])
    m3 = helper.make_model(g3, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ai.cliptune", 1)])
    feeds3 = {"qkv": qkv, "len": lens, "rag": feeds["rag"], "off": feeds["off"]}
    np.testing.assert_allclose(_session(m3, cpu_ops).run(None, feeds3)[0], want, atol=1e-5)
    next(a for a in g3.node[0].attribute if a.name == "impl").i = 0  # qkv = 1 with impl 0 (cuDNN): refused
    m3 = helper.make_model(g3, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ai.cliptune", 1)])
    with pytest.raises(Exception, match="qkv must be 0 or 1, and 1 .* needs impl 1"):
        _session(m3, cpu_ops).run(None, feeds3)
    # impl (the GPU kernel: 0 cuDNN, 1 the short-row kernel, 2 the same pipelined) does not change the CPU build's
    # loop; others are refused
    for impl, ok in ((1, True), (0, True), (2, True), (3, False), (-1, False)):
        g.node[0].attribute.append(helper.make_attribute("impl", impl))
        model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ai.cliptune", 1)])
        if ok:
            np.testing.assert_allclose(_session(model, cpu_ops).run(None, feeds)[0], want, atol=1e-5)
        else:
            with pytest.raises(Exception, match=f"RaggedAttention: impl must be 0 .* got {impl}$"):
                _session(model, cpu_ops).run(None, feeds)
        del g.node[0].attribute[-1]


def test_library_ragged_attention_token_rows(cpu_ops):
    """RaggedAttention's optional 7th input, token_rows: token t reads row token_rows[t] of Q, K and V, which then
    hold fewer rows than the output (a packed first layer projects the rows' shared prefix once per candidate).
    Equal to the op on the expanded Q, K, V, and to the numpy op; a row outside Q, K and V, or a map that is not
    one-dimensional, is refused in one line."""
    from onnx import TensorProto, helper

    op = next(o for o in _reference_ops() if o.__name__ == "RaggedAttention")
    rng = np.random.default_rng(21)
    lens = np.array([6, 9, 5, 7], np.int32)
    heads, hidden, shared = 2, 8, 3  # rows 1 and 3 share their first 3 tokens with rows 0 and 2
    tokens = int(lens.sum())
    cu = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
    own = [t for r in range(4) for t in range(cu[r], cu[r + 1]) if r % 2 == 0 or t - cu[r] >= shared]
    compact = {t: i for i, t in enumerate(own)}
    rows = np.array([compact[t] if t in compact else compact[cu[r - 1] + t - cu[r]]
                     for r in range(4) for t in range(cu[r], cu[r + 1])], np.int32)
    qkv = rng.standard_normal((len(own), 3 * hidden)).astype(np.float32)
    base = {"len": lens, "rag": cu * hidden, "off": np.zeros((4, 9), np.int32)}

    def model(with_rows: bool, rows_shape=("tokens",)):
        names = ["qkv", "qkv", "qkv", "len", "rag", "off"] + (["rows"] if with_rows else [])
        node = helper.make_node("RaggedAttention", names, ["o"], domain="ai.cliptune", num_heads=heads, scale=0.0,
                                impl=2, qkv=1)
        ins = [helper.make_tensor_value_info("qkv", TensorProto.FLOAT, ["in_rows", 3 * hidden]),
               helper.make_tensor_value_info("len", TensorProto.INT32, ["rows"]),
               helper.make_tensor_value_info("rag", TensorProto.INT32, ["rows_plus_1"]),
               helper.make_tensor_value_info("off", TensorProto.INT32, ["rows", "seq"])]
        if with_rows:
            ins.append(helper.make_tensor_value_info("rows", TensorProto.INT32, list(rows_shape)))
        g = helper.make_graph([node], "attn_rows", ins, [helper.make_tensor_value_info("o", TensorProto.FLOAT, None)])
        return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ai.cliptune", 1)])

    got = _session(model(True), cpu_ops).run(None, {**base, "qkv": qkv, "rows": rows})[0]
    assert got.shape == (tokens, hidden)
    expanded = _session(model(False), cpu_ops).run(None, {**base, "qkv": qkv[rows]})[0]
    np.testing.assert_allclose(got, expanded, atol=1e-6)
    want = op._run(None, qkv, qkv, qkv, lens, cu * hidden, base["off"], rows, num_heads=heads, scale=0.0, impl=2,
                   qkv=1)[0]
    np.testing.assert_allclose(got, want, atol=1e-5)
    # the shared tokens really are shared: their outputs differ (each row attends to its own other tokens)
    assert not np.allclose(got[cu[1]], got[cu[0]], atol=1e-3)
    bad = rows.copy()
    bad[4] = len(own)
    with pytest.raises(Exception, match="RaggedAttention: token_rows holds a row outside Q, K and V"):
        _session(model(True), cpu_ops).run(None, {**base, "qkv": qkv, "rows": bad})
    with pytest.raises(Exception, match=r"RaggedAttention: expected token_rows int32 \[tokens\]"):
        _session(model(True, ("a", "b")), cpu_ops).run(None, {**base, "qkv": qkv, "rows": rows.reshape(1, -1)})
    # q_bias (8th input; here without token_rows: an empty 7th): the attention of Q + b, K, V
    qb = rng.standard_normal(hidden).astype(np.float32)
    node = helper.make_node("RaggedAttention", ["qkv", "qkv", "qkv", "len", "rag", "off", "", "qb"], ["o"],
                            domain="ai.cliptune", num_heads=heads, scale=0.0, impl=1, qkv=1)
    ins = [helper.make_tensor_value_info("qkv", TensorProto.FLOAT, ["rows_in", 3 * hidden]),
           helper.make_tensor_value_info("len", TensorProto.INT32, ["rows"]),
           helper.make_tensor_value_info("rag", TensorProto.INT32, ["rows_plus_1"]),
           helper.make_tensor_value_info("off", TensorProto.INT32, ["rows", "seq"]),
           helper.make_tensor_value_info("qb", TensorProto.FLOAT, ["qb_width"])]
    g = helper.make_graph([node], "attn_qb", ins, [helper.make_tensor_value_info("o", TensorProto.FLOAT, None)])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ai.cliptune", 1)])
    full = qkv[rows]
    got = _session(m, cpu_ops).run(None, {**base, "qkv": full, "qb": qb})[0]
    shifted = full.copy()
    shifted[:, :hidden] += qb
    np.testing.assert_allclose(got, _session(model(False), cpu_ops).run(None, {**base, "qkv": shifted})[0], atol=1e-6)
    assert not np.allclose(got, expanded, atol=1e-3)  # the bias moved it
    with pytest.raises(Exception, match=r"RaggedAttention: expected q_bias \[8\] \(8th input\)"):
        _session(m, cpu_ops).run(None, {**base, "qkv": full, "qb": qb[:4]})


def test_library_pack_add_is_the_numpy_op(cpu_ops):
    """PackAdd (the packed first-layer input: the few-shot rows' embeddings plus each candidate's prompt at the
    real tokens) on the CPU build equals the numpy op of tests/test_packing.py, which equals Add -> Flatten ->
    Gather on the padded broadcast sum; an index outside the sum and mismatched shapes are one-line errors."""
    from onnx import TensorProto, helper

    from cliptune_ort.engine import packing_feeds

    rng = np.random.default_rng(4)
    pop, batch, seq, hidden = 3, 5, 9, 12
    a = rng.standard_normal((batch, seq, hidden)).astype(np.float32)
    p = rng.standard_normal((pop, seq, hidden)).astype(np.float32)
    am = (np.arange(seq)[None] < rng.integers(2, seq + 1, size=batch)[:, None]).astype(np.int64)
    index = packing_feeds(am, pop)["packed_token_index"]
    assert index.dtype == np.int64 and len(index) == pop * int(am.sum())
    node = helper.make_node("PackAdd", ["a", "p", "i"], ["y"], domain="ai.cliptune")
    g = helper.make_graph([node], "pack", [helper.make_tensor_value_info("a", TensorProto.FLOAT, ["b", "s", "h"]),
                                           helper.make_tensor_value_info("p", TensorProto.FLOAT, ["n", "s", "h"]),
                                           helper.make_tensor_value_info("i", TensorProto.INT64, ["t"])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ai.cliptune", 1)])
    sess = _session(m, cpu_ops)
    got = sess.run(None, {"a": a, "p": p, "i": index})[0]
    want = (a[None] + p[:, None]).reshape(pop * batch * seq, hidden)[index]  # the graph's Add -> Gather
    np.testing.assert_array_equal(got, want)
    numpy_op = next(op for op in _reference_ops() if op.__name__ == "PackAdd")
    np.testing.assert_array_equal(numpy_op._run(None, a, p, index)[0], want)
    np.testing.assert_array_equal(sess.run(None, {"a": a, "p": p, "i": index[:0]})[0], np.zeros((0, hidden)))
    with pytest.raises(Exception, match=rf"PackAdd: index\[1\] = {pop * batch * seq} is not a row of the pop \* "
                                        rf"batch \* seq = {pop * batch * seq} sum"):
        sess.run(None, {"a": a, "p": p, "i": np.array([0, pop * batch * seq], np.int64)})
    with pytest.raises(Exception, match=r"PackAdd: expected A \[batch, seq, hidden\], P \[pop, seq, hidden\]"):
        sess.run(None, {"a": a, "p": p[:, 1:], "i": index})


@needs_export
@pytest.mark.parametrize("kernel", ["cudnn", "short", "short_qkv", "pipe_qkv"])
def test_ragged_kernels_match_unpacked(packed_pair, tmp_path, kernel):
    """kernel="cudnn" / "short" / "short_qkv": the flash layout's projections with cliptune's RaggedAttention in
    place of PackedMultiHeadAttention (row lengths and element offsets made once in the graph from the packing's
    cu_seqlens; impl 0 = cuDNN, left out of the node, 1 = the short-row kernel; short_qkv: one QKV projection
    read in place; pipe_qkv: the same with impl 2, the pipelined kernel); the logits are the unpacked graph's,
    with either packing and either feed-forward block."""
    import collections
    import copy

    from cliptune_export.packing import pack_export, pack_graph
    from onnx import helper
    from onnx.reference import ReferenceEvaluator

    src = packed_pair[0]
    layers, feeds, host, ops, m, ref = _biased_case(src, seed=13, bias_seed=9)
    for host_offsets, ffn in ((True, "cublaslt_res"), (False, "matmul")):
        g = copy.deepcopy(m)
        assert pack_graph(g, host_offsets=host_offsets, kernel=kernel, ffn=ffn) == layers - 1
        count = collections.Counter(n.op_type for n in g.graph.node)
        assert count["RaggedAttention"] == layers - 1 and count["PackedMultiHeadAttention"] == 0
        attrs = [{a.name: helper.get_attribute_value(a) for a in n.attribute}
                 for n in g.graph.node if n.op_type == "RaggedAttention"]
        assert {a.get("impl", 0) for a in attrs} == {{"cudnn": 0, "pipe_qkv": 2}.get(kernel, 1)}
        assert {a.get("qkv", 0) for a in attrs} == {int(kernel in ("short_qkv", "pipe_qkv"))}
        if kernel in ("short_qkv", "pipe_qkv"):  # one projection per layer (FusedDense with the LT feed-forward), no slices
            assert not [n for n in g.graph.node if n.name.endswith(("_slice_q", "_slice_k", "_slice_v"))]
            assert count["FusedDense" if ffn != "matmul" else "Add"] >= layers - 1
        assert [n.op_type for n in g.graph.node if n.name.startswith("cliptune_ragged_")].count("Slice") == 2
        assert any(o.domain == "ai.cliptune" for o in g.opset_import)
        got = ReferenceEvaluator(g, new_ops=ops).run(None, host if host_offsets else feeds)[0]
        np.testing.assert_allclose(got, ref, atol=1e-3)
    pman = pack_export(src, tmp_path / "dnn", host_offsets=True, kernel=kernel, ffn="cublaslt_res")
    man = load_manifest(tmp_path / "dnn")
    assert pman["packed_kernel"] == kernel and man.packed_kernel == kernel and man.needs_ops_library


@needs_export
@pytest.mark.parametrize(("kernel", "ffn"), [("short_qkv", "cublaslt"), ("flash", "matmul")])
def test_fused_front_matches_unpacked(packed_pair, tmp_path, kernel, ffn):
    """front="fused": the padded sum of the embeddings and the prompts (Unsqueeze, Add, Reshape and its shape
    arithmetic), Flatten and Gather give way to one PackAdd reading the embeddings and the prompts; the logits
    are the unpacked graph's and the gather front's, the manifest records it and asks for the library; a padded
    packing (no host offsets) is refused."""
    import collections
    import copy

    from cliptune_export.packing import PackingError, pack_export, pack_graph
    from onnx.reference import ReferenceEvaluator

    src = packed_pair[0]
    layers, _, host, ops, m, ref = _biased_case(src, seed=17, bias_seed=3)
    out, count, graphs = {}, {}, {}
    for front in ("gather", "fused"):
        graphs[front] = g = copy.deepcopy(m)
        assert pack_graph(g, host_offsets=True, kernel=kernel, ffn=ffn, front=front) == layers - 1
        count[front] = c = collections.Counter(n.op_type for n in g.graph.node)
        assert c["PackAdd"] == (front == "fused")
        assert c["Flatten"] == (front == "gather")
        pack = [n for n in g.graph.node if n.op_type in ("PackAdd", "Gather") and "packed_token_index" in n.input]
        assert len(pack) == 1
        out[front] = ReferenceEvaluator(g, new_ops=ops).run(None, host)[0]
    # nothing makes the padded [pop * batch, seq, hidden] sum any more: one Add, one Reshape, two Unsqueezes fewer
    for op, fewer in (("Add", 1), ("Reshape", 1), ("Unsqueeze", 2), ("Gather", 1)):
        assert count["fused"][op] <= count["gather"][op] - fewer, op
    # and only that went: every node dropped fed the padded sum (its shape arithmetic included), no value_info
    # names a tensor that is no longer made
    producer = {o: n for n in m.graph.node for o in n.output}
    cone, todo = set(), [m.graph.node[[n.op_type for n in m.graph.node].index("Attention")].input[0]]
    while todo:
        n = producer.get(todo.pop())
        if n is not None and n.name not in cone:
            cone.add(n.name)
            todo.extend(n.input)
    names = {f: {n.name for n in gr.graph.node} for f, gr in graphs.items()}
    assert names["gather"] - names["fused"] <= cone | {"cliptune_PackFlatten", "cliptune_PackGather"}
    g = graphs["fused"].graph
    made = {o for n in g.node for o in n.output} | {i.name for i in g.input} | {t.name for t in g.initializer}
    assert {v.name for v in g.value_info} <= made
    np.testing.assert_array_equal(out["fused"], out["gather"])  # the same sums, in the same dtype
    np.testing.assert_allclose(out["fused"], ref, atol=1e-3)
    with pytest.raises(PackingError, match="the fused front .* pack with host offsets"):
        pack_graph(copy.deepcopy(m), host_offsets=False, kernel=kernel, ffn=ffn, front="fused")
    with pytest.raises(PackingError, match="packed front must be one of gather, fused"):
        pack_graph(copy.deepcopy(m), host_offsets=True, front="later")
    pman = pack_export(src, tmp_path / "pf", host_offsets=True, kernel=kernel, ffn=ffn, front="fused")
    man = load_manifest(tmp_path / "pf")
    assert pman["packed_front"] == "fused" and man.packed_front == "fused" and man.needs_ops_library
    assert load_manifest(packed_pair[2]).packed_front == "gather" and load_manifest(src).packed_front is None
    from cliptune_ort.errors import ModelDirError
    from cliptune_ort.fileio import atomic_write_json
    from cliptune_ort.manifest import MANIFEST_NAME, seal_manifest

    data = json.loads((tmp_path / "pf" / MANIFEST_NAME).read_text())
    atomic_write_json(tmp_path / "pf" / MANIFEST_NAME, seal_manifest({**data, "packed_front": "scatter"}))
    with pytest.raises(ModelDirError, match="field packed_front is 'scatter', expected 'gather' or 'fused'"):
        load_manifest(tmp_path / "pf")


def _packed_flash(m):
    import copy

    from cliptune_export.packing import pack_graph

    lt = copy.deepcopy(m)
    pack_graph(lt, host_offsets=True, kernel="flash", ffn="cublaslt")
    return lt


@needs_export
def test_cublaslt_export_option_and_runtime(tiny_roberta_src, tmp_path, monkeypatch):
    """`cliptune export --packed host --packed-ffn cublaslt` records it; the option needs --packed; the engine
    asks make_session for the cuda library (and refuses packed graphs on the CPU first, as for any packed export)."""
    from cliptune_export import ExportOptions, export_model

    from cliptune_ort.cli import main
    from cliptune_ort.engine import Engine
    from cliptune_ort.errors import ConfigError

    with pytest.raises(ConfigError, match="--packed-ffn cublaslt needs --packed"):
        export_model(str(tiny_roberta_src), tmp_path / "bad", ExportOptions(k=1, precision="fp16",
                                                                            packed_ffn="cublaslt"))
    with pytest.raises(ConfigError, match="--packed-ffn must be one of matmul, moe, cublaslt"):
        export_model(str(tiny_roberta_src), tmp_path / "bad", ExportOptions(k=1, precision="fp16", packed="host",
                                                                            packed_ffn="gemm"))
    rc = main(["export", str(tiny_roberta_src), "--out", str(tmp_path / "lt"), "--k", "1", "--p", "0.2",
               "--n-prompt", "10", "--precision", "fp16", "--packed", "host", "--packed-ffn", "cublaslt"])
    assert rc == 0
    man = load_manifest(tmp_path / "lt")
    assert man.packed_ffn == "cublaslt" and man.host_packing
    with pytest.raises(ConfigError, match="run on the CUDA provider only"):
        Engine(man, [0], device="cpu")
    seen = {}

    def fake_make(path, spec, shared=None):
        seen["ops_library"] = spec.ops_library
        raise ConfigError("stop here")

    import cliptune_ort.engine as engine_mod

    monkeypatch.setattr(engine_mod, "resolve_device", lambda d: "cuda")
    monkeypatch.setattr(engine_mod, "make_session", fake_make)
    with pytest.raises(ConfigError, match="stop here"):
        Engine(man, [0], device="cuda")
    assert seen["ops_library"] == "cuda"


def test_build_ops_cli(cpu_ops, tmp_path, capsys, monkeypatch):
    """`cliptune build-ops --variant cpu --out DIR` builds the library there (atomically: no temp file left);
    `cliptune env` then lists it (and no cuda build) in that folder."""
    import json

    from cliptune_ort.cli import main

    assert main(["build-ops", "--variant", "cpu", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "libcliptune_ops_cpu.so").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["libcliptune_ops_cpu.so"]
    assert "built" in capsys.readouterr().out
    monkeypatch.setenv("CLIPTUNE_OPS_DIR", str(tmp_path))
    assert main(["env"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["ops_library"] == {"cpu": str(tmp_path / "libcliptune_ops_cpu.so"), "cuda": None}


def test_fused_dense_benchmark_dry_run(cpu_ops, tmp_path):
    """benchmarks/fused_dense.py on the CPU build: every case runs on the CPU provider, the fused outputs
    equal the float64 reference and ORT's own ops up to the tanh-vs-erf GELU."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "CLIPTUNE_OPS_DIR": str(Path(cpu_ops).parent)}
    proc = subprocess.run([sys.executable, str(root / "benchmarks" / "fused_dense.py"), "--cpu-dry-run", "--out",
                           str(tmp_path)], capture_output=True, text=True, env=env, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    data = json.loads((tmp_path / "fused_dense_cpu-dry-run.json").read_text())
    assert data["errors"] == [] and set(data["cases"]) == {"ffn_up_ort_gelu", "ffn_up_lt_gelu", "query_ort_bias",
                                                           "query_lt_bias", "ffn_down_ort_plain", "ffn_down_lt_plain",
                                                           "qkv_ort_bias", "qkv_lt_bias", "qkv_plain_ort_plain",
                                                           "qkv_plain_lt_plain"}
    assert "qkv_bias_cost_ms_p50" in data  # the biased QKV projection against ORT's plain MatMul of that shape
    assert data["parity"]["qkv_lt_bias"]["max_abs_vs_float64_first_rows"] < 1e-4
    assert {c["provider"] for c in data["cases"].values()} == {"CPUExecutionProvider"}
    par = data["parity"]
    assert par["ffn_up_lt_gelu"]["max_abs_vs_float64_first_rows"] < 1e-4
    assert par["query_lt_bias"]["max_abs_vs_float64_first_rows"] < 1e-4
    assert par["ffn_down_lt_plain"]["max_abs_vs_float64_first_rows"] < 1e-4 and par["ffn_down_lt_vs_ort_max_abs"] < 1e-4
    assert 1e-4 < par["ffn_up_lt_vs_ort_max_abs"] < 2e-3  # tanh vs erf GELU: seen, and small


def test_gpu_qkv_projection_cell_on_the_cpu_build(cpu_ops, monkeypatch):
    """benchmarks/gpu.py's QKV-projection cell (fused_dense.measure on the cases "qkv" and "qkv_plain"): both
    forms run, their outputs match a float64 reference, and the bias epilogue's cost is reported."""
    import sys

    monkeypatch.setenv("CLIPTUNE_OPS_DIR", str(cpu_ops.parent))
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    try:
        import gpu
    finally:
        sys.path.pop(0)
    out = gpu.qkv_projection_cell("cpu", iters=1)
    assert out["errors"] == [] and set(out["cases"]) == {"qkv_ort_bias", "qkv_lt_bias", "qkv_plain_ort_plain",
                                                         "qkv_plain_lt_plain"}
    assert all(p["max_abs_vs_float64_first_rows"] < 1e-4 for k, p in out["parity"].items() if isinstance(p, dict))
    assert isinstance(out["qkv_bias_cost_ms_p50"], float)


def test_gpu_ragged_kernel_check_on_the_cpu_build(cpu_ops, tmp_path, monkeypatch):
    """benchmarks/gpu.py's check of cliptune's attention kernels (edge row lengths, both Q/K/V layouts, against
    numpy per row and head) runs through the library; on the CPU build it checks the op's fp32 loop."""
    pytest.importorskip("onnx")
    import sys

    monkeypatch.setenv("CLIPTUNE_OPS_DIR", str(cpu_ops.parent))
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    try:
        import gpu
    finally:
        sys.path.pop(0)
    out = gpu.ragged_kernel_check("cpu", str(tmp_path), heads=2)
    assert [(c["qkv"], c["token_rows"], c["impl"]) for c in out["cases"]] == [
        (q, m, i) for _ in gpu.RAGGED_CHECK_LENS for q, m in ((0, False), (1, False), (1, True)) for i in (1, 2)]
    assert [c["lens"] for c in out["cases"][:6]] == [list(gpu.RAGGED_CHECK_LENS[0])] * 6
    # the pipelined kernel's case: more (row, head) items than its grid on an H100 (2 blocks x 132 SMs) at the
    # card's 16 heads and at this check's own 4, every length 1 to 128 among them
    many = gpu.RAGGED_CHECK_LENS[-1]
    assert len(many) * 4 > 4 * 264 and min(many) == 1 and max(many) == 128 and len(set(many)) > 100
    assert out["cases"][-1]["lens"] == "700 rows of 1 to 128 tokens"
    assert all(c["provider"] == "CPUExecutionProvider" for c in out["cases"])
    assert out["ok"] and out["max_abs_err"] < 1e-5 and out["ok_impl"] == {"1": True, "2": True}
    # the card's ORT 1.31.1 reads IR 13 at most; onnx 1.23's default, 14, failed this check in card run 10
    import onnx
    from cliptune_export.projection import IR_VERSION

    written = sorted(tmp_path.glob("ragged_check_*.onnx"))
    assert written and {onnx.load(str(f), load_external_data=False).ir_version for f in written} == {IR_VERSION}

    import cliptune_ort.sessions as sessions_mod

    real = sessions_mod.make_session

    class OffByOneRow:  # a kernel that writes each row's output one token late
        def __init__(self, sess):
            self.sess = sess

        def get_providers(self):
            return self.sess.get_providers()

        def run(self, names, feeds):
            o = self.sess.run(names, feeds)[0]
            return [np.roll(o, 1, axis=0)]

    monkeypatch.setattr(sessions_mod, "make_session", lambda *a, **kw: OffByOneRow(real(*a, **kw)))
    bad = gpu.ragged_kernel_check("cpu", str(tmp_path), heads=2, lens_sets=((5, 17),))
    assert not bad["ok"] and bad["max_abs_err"] > 0.1 and bad["ok_impl"] == {"1": False, "2": False}


def test_wheel_ships_the_library_sources():
    """`cliptune build-ops` compiles cliptune_ort/native/* from the installed package: every source there must
    match pyproject's package-data (a wheel held native.py but none of them before)."""
    import fnmatch

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    root = Path(__file__).resolve().parents[1]
    globs = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["cliptune_ort"]
    sources = sorted(p.relative_to(root / "cliptune_ort").as_posix() for p in (root / "cliptune_ort" / "native").iterdir())
    assert {"native/fused_dense.cc", "native/short_attention.cu", "native/pack_add.cu"} <= set(sources)
    for s in sources:
        assert any(fnmatch.fnmatch(s, g) for g in globs), f"{s} is not in the wheel's package-data {globs}"


def test_every_model_built_in_the_repo_fixes_its_ir_version():
    """onnx's ``make_model`` writes its own newest IR version, which older onnxruntimes refuse (card run 10: the
    edge-length check's graphs, IR 14, against ORT 1.31.1's 13, so the tunes fell back to FlashAttention):
    every module that builds a model with it must set ``ir_version``."""
    import re

    root = Path(__file__).resolve().parents[1]
    unfixed = []
    for d in ("cliptune_ort", "export", "benchmarks"):
        for f in sorted((root / d).rglob("*.py")):
            text = f.read_text()
            built = len(re.findall(r"\bmake_model\(", text))
            if built > len(re.findall(r"\.ir_version = ", text)):
                unfixed.append(f"{f.relative_to(root)}: {built} make_model")
    assert not unfixed, unfixed
