"""Packed attention (export/packing.py), checked on the CPU.

RemovePadding, PackedAttention and RestorePadding exist on ORT's CUDA provider only, so the rewrite
is checked by running graphs through ``onnx.reference`` with numpy implementations of ORT's contrib
ops (written from their schemas in onnxruntime's operator registry):

- the numpy Attention / SkipLayerNormalization / BiasGelu reproduce ORT's CPU run of the unpacked
  fp16 graph (atol 2e-3: both compute in fp16 with different accumulation order);
- the packed graph gives the unpacked graph's logits through the same evaluator (atol 1e-3: the only
  difference is that padded positions are never computed);
- the runtime refuses a packed export on the CPU, and a packed export's manifest loads and verifies.

(Whether ORT's CUDA kernels then run it fast is benchmarks/gpu.py's job, on a GPU.)
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from cliptune_ort.errors import ConfigError
from cliptune_ort.manifest import load_manifest

from .conftest import contract_inputs, needs_export

pytestmark = needs_export



def _reference_ops():
    from onnx.reference.op_run import OpRun

    def attend(q, k, v, heads, scale, valid):
        """q [n, H], k/v [m, H] of one row; valid [m] keys that count."""
        d = q.shape[1] // heads
        out = np.empty_like(q, dtype=np.float32)
        for h in range(heads):
            s = slice(h * d, (h + 1) * d)
            sc = (q[:, s].astype(np.float32) @ k[:, s].astype(np.float32).T) * scale
            sc = np.where(valid[None, :], sc, sc - 10000.0)
            sc = np.exp(sc - sc.max(-1, keepdims=True))
            out[:, s] = (sc / sc.sum(-1, keepdims=True)) @ v[:, s].astype(np.float32)
        return out

    def attend_packed(q, k, v, cu, heads, scale):
        """Packed [tokens, hidden] Q/K/V; row i's tokens are cu[i]:cu[i + 1] and attend only each other."""
        sc = scale or 1.0 / math.sqrt(q.shape[-1] // heads)
        out = np.empty_like(q)
        for i in range(len(cu) - 1):
            r = slice(int(cu[i]), int(cu[i + 1]))
            out[r] = attend(q[r], k[r], v[r], heads, sc, np.ones(r.stop - r.start, bool)).astype(q.dtype)
        return out

    def qkv(x, w, b):
        y = x.astype(np.float32) @ w.astype(np.float32) + b.astype(np.float32)
        return np.split(y.astype(x.dtype), 3, axis=-1)

    class Attention(OpRun):
        op_domain = "com.microsoft"

        def _run(self, x, w, b, mask_index, num_heads=None, scale=None, **_):
            q, k, v = qkv(x, w, b)
            sc = scale or 1.0 / math.sqrt(q.shape[-1] // num_heads)
            out = np.stack([attend(q[i], k[i], v[i], num_heads, sc, np.arange(x.shape[1]) < mask_index[i])
                            for i in range(x.shape[0])])
            return (out.astype(x.dtype),)

    class PackedAttention(OpRun):
        op_domain = "com.microsoft"

        def _run(self, x, w, b, token_offset, cu, num_heads=None, scale=None, **_):
            return (attend_packed(*qkv(x, w, b), cu, num_heads, scale),)

    class PackedMultiHeadAttention(OpRun):  # separate Q, K, V [tokens, hidden]; no bias (the flash kernel)
        op_domain = "com.microsoft"

        def _run(self, q, k, v, bias, token_offset, cu, *_, num_heads=None, scale=None, **__):
            assert bias is None and q.ndim == 2 and k.shape == q.shape == v.shape
            return (attend_packed(q, k, v, cu, num_heads, scale),)

    class SkipLayerNormalization(OpRun):
        op_domain = "com.microsoft"

        def _run(self, x, skip, gamma, beta=None, bias=None, epsilon=1e-12, **_):
            s = x.astype(np.float32) + skip.astype(np.float32)
            if bias is not None:
                s = s + bias.astype(np.float32)
            mu = s.mean(-1, keepdims=True)
            var = ((s - mu) ** 2).mean(-1, keepdims=True)
            y = (s - mu) / np.sqrt(var + epsilon) * gamma.astype(np.float32)
            if beta is not None:
                y = y + beta.astype(np.float32)
            return (y.astype(x.dtype),)

    class BiasGelu(OpRun):
        op_domain = "com.microsoft"

        def _run(self, x, bias):
            s = x.astype(np.float64) + bias.astype(np.float64)
            erf = np.vectorize(math.erf)(s / math.sqrt(2.0))
            return ((0.5 * s * (1.0 + erf)).astype(x.dtype),)

    class MoE(OpRun):  # one expert (the "moe" feed-forward block): fc2(gelu_tanh(fc1(x)))
        op_domain = "com.microsoft"

        def _run(self, x, router, w1, b1=None, w2=None, b2=None, *_, k=1, activation_type="relu", **__):
            assert w1.shape[0] == 1 and router.shape == (len(x), 1) and k == 1 and activation_type == "gelu"
            h = x.astype(np.float32) @ w1[0].astype(np.float32).T
            h = h + (b1[0].astype(np.float32) if b1 is not None else 0.0)
            h = (0.5 * h * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (h + 0.044715 * h ** 3)))).astype(x.dtype)
            y = h.astype(np.float32) @ w2[0].astype(np.float32).T
            return ((y + (b2[0].astype(np.float32) if b2 is not None else 0.0)).astype(x.dtype),)

    class FusedDense(OpRun):  # cliptune's custom op (cliptune_ort/native): act(x @ w + b [+ r]), fp32 accumulation
        op_domain = "ai.cliptune"

        def _run(self, x, w, b, r=None, activation=None):
            y = x.astype(np.float32) @ w.astype(np.float32) + b.astype(np.float32)
            if r is not None:  # the residual, added in the epilogue before the activation
                assert r.shape == y.shape, (r.shape, y.shape)
                y = y + r.astype(np.float32)
            if activation == "gelu_tanh":
                y = 0.5 * y * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (y + 0.044715 * y ** 3)))
            else:
                assert activation == "none", activation
            return (y.astype(x.dtype),)

    class RaggedAttention(OpRun):  # cliptune's custom op: attention within packed rows (cuDNN or its own kernel)
        op_domain = "ai.cliptune"

        def _run(self, q, k, v, seq_len, ragged, token_offset, token_rows=None, q_bias=None, num_heads=None,
                 scale=None, impl=None, qkv=None):
            assert impl in (None, 0, 1, 2) and qkv in (None, 0, 1) and (not qkv or impl in (1, 2)), (impl, qkv)
            assert (token_rows is None and q_bias is None) or impl in (1, 2), impl  # cliptune's kernels only
            assert len(ragged) == len(seq_len) + 1 == token_offset.shape[0] + 1
            if qkv:  # one [tokens, 3 * hidden] tensor read in place
                assert q is k is v or (np.array_equal(q, k) and np.array_equal(q, v))
                q, k, v = np.split(q, 3, axis=1)
            if token_rows is not None:  # token t reads row token_rows[t] of Q, K and V
                assert token_rows.dtype == np.int32 and token_rows.ndim == 1
                assert token_rows.min() >= 0 and token_rows.max() < len(q)
                q, k, v = q[token_rows], k[token_rows], v[token_rows]
            if q_bias is not None:  # added to Q first, the sum rounded to Q's type once
                assert q_bias.shape == (q.shape[1],) and q_bias.dtype == q.dtype
                q = (q.astype(np.float32) + q_bias.astype(np.float32)).astype(q.dtype)
            hidden = q.shape[1]
            assert np.array_equal(ragged[:-1] // hidden + seq_len, ragged[1:] // hidden)  # rows back to back
            cu = (ragged // hidden).astype(np.int64)
            return (attend_packed(q, k, v, cu, num_heads, scale or None),)

    class RemovePadding(OpRun):
        op_domain = "com.microsoft"

        def _run(self, x, counts):
            b, s = x.shape[:2]
            real = [i * s + j for i in range(b) for j in range(int(counts[i]))]
            pad = [i * s + j for i in range(b) for j in range(int(counts[i]), s)]
            off = np.asarray(real + pad, dtype=np.int32).reshape(b, s)
            cu = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
            return (x.reshape(b * s, -1)[real], off, cu, np.asarray([int(counts.max())], np.int32))

    class RestorePadding(OpRun):
        op_domain = "com.microsoft"

        def _run(self, x, token_offset):
            b, s = token_offset.shape
            out = np.zeros((b * s, x.shape[1]), x.dtype)
            out[token_offset.reshape(-1)[: x.shape[0]]] = x
            return (out.reshape(b, s, -1),)

    class PackAdd(OpRun):  # cliptune's custom op: the packed first-layer input, Y[t] = A[b, s] + P[p, s]
        op_domain = "ai.cliptune"

        def _run(self, a, p, index):
            batch, seq, hidden = a.shape
            assert p.shape[1:] == (seq, hidden) and index.ndim == 1
            assert np.all((index >= 0) & (index < p.shape[0] * batch * seq))
            s, r = index % seq, index // seq
            return ((a[r % batch, s] + p[r // batch, s]).astype(a.dtype),)

    class GatherElements(OpRun):  # onnx.reference's own mishandles [batch, seq] index tensors
        op_domain = ""

        def _run(self, data, indices, axis=0):
            return (np.take_along_axis(data, indices.astype(np.int64), axis=axis),)

    return [GatherElements, Attention, PackedAttention, PackedMultiHeadAttention, SkipLayerNormalization, BiasGelu,
            MoE, FusedDense, RaggedAttention, PackAdd, RemovePadding, RestorePadding]


def _with_weights(path):
    """The graph file with its external weights (weights.bin) loaded into the initializers."""
    import onnx
    from cliptune_export.packing import ensure_ms_opset, topo_sort

    m = onnx.load(str(path), load_external_data=True)
    topo_sort(m.graph)
    ensure_ms_opset(m)
    return m


def _skip_ln_biases(m) -> set:
    """The bias inputs of the graph's SkipLayerNormalization nodes."""
    return {n.input[4] for n in m.graph.node if n.op_type == "SkipLayerNormalization" and len(n.input) > 4
            and n.input[4]}


def _randomize(m, names: set, rng) -> None:
    """Give the initializers ``names`` random values (random-init biases are zero: a wrong bias move would
    not show)."""
    from onnx import numpy_helper

    for t in m.graph.initializer:
        if t.name in names:
            v = numpy_helper.to_array(t)
            t.CopyFrom(numpy_helper.from_array((rng.standard_normal(v.shape) * 0.5).astype(v.dtype), t.name))


def _ffn_case(src, seed: int):
    """(manifest, layers, contract feeds, the same + host packing feeds, numpy ops, graph 0 with weights) of the
    fp16 export ``src``: the set-up of the feed-forward rewrite tests."""
    from cliptune_ort.engine import packing_feeds

    man = load_manifest(src)
    feeds = contract_inputs(man, pop=2, batch=4, extra=9, seed=seed)
    host = {**feeds, **packing_feeds(feeds["attention_mask"], 2)}
    return man, man.data["model"]["layers"], feeds, host, _reference_ops(), _with_weights(man.graph_path(0))


def _attention_bias_case(src, seed: int, bias_seed: int):
    """:func:`_ffn_case` with random Attention (QKV) and SkipLayerNormalization biases (random-init biases are
    zero): (manifest, layers, contract feeds, numpy ops, graph 0, its logits through onnx.reference)."""
    from onnx.reference import ReferenceEvaluator

    man, layers, feeds, _host, ops, m = _ffn_case(src, seed=seed)
    _randomize(m, {n.input[2] for n in m.graph.node if n.op_type == "Attention"} | _skip_ln_biases(m),
               np.random.default_rng(bias_seed))
    return man, layers, feeds, ops, m, ReferenceEvaluator(m, new_ops=ops).run(None, feeds)[0]


def test_packed_graph_matches_unpacked(packed_pair):
    import collections

    import onnx
    from onnx.reference import ReferenceEvaluator

    from cliptune_ort.engine import Engine, packing_feeds

    src, packed, packed_host = packed_pair
    man, pman, hman = load_manifest(src), load_manifest(packed), load_manifest(packed_host)
    assert pman.packed and hman.packed and hman.host_packing and not man.packed and not pman.host_packing
    feeds = contract_inputs(man, pop=2, batch=5, extra=17, seed=3)
    host_feeds = {**feeds, **packing_feeds(feeds["attention_mask"], len(feeds["prompt_embeds"]))}
    ops = _reference_ops()
    layers = man.data["model"]["layers"]
    for g in range(man.k + 1):
        ort_cpu = Engine(man, [g], device="cpu", cands_per_call=1).sessions[g].run(["logits"], feeds)[0]
        ref_padded = ReferenceEvaluator(_with_weights(man.graph_path(g)), new_ops=ops).run(None, feeds)[0]
        assert ref_padded.shape == ort_cpu.shape == (2, 5, 3)
        np.testing.assert_allclose(ref_padded, ort_cpu, atol=2e-3)  # the numpy ops are ORT's ops
        for m, f, removes in ((pman, feeds, 1), (hman, host_feeds, 0)):
            ops_count = collections.Counter(n.op_type for n in onnx.load(str(m.graph_path(g)),
                                                                         load_external_data=False).graph.node)
            assert ops_count["PackedAttention"] == layers - 1 and ops_count["Attention"] == 0
            assert ops_count["RemovePadding"] == removes and ops_count["RestorePadding"] == 1
            ref_packed = ReferenceEvaluator(_with_weights(m.graph_path(g)), new_ops=ops).run(None, f)[0]
            assert ref_packed.shape == (2, 5, 3)
            np.testing.assert_allclose(ref_packed, ref_padded, atol=1e-3)  # packing changes nothing real
            assert float(np.abs(ref_packed).max()) > 0.05  # not a trivially zero output


def test_flash_kernel_matches_unpacked(packed_pair):
    """The flash kernel's graph (Q/K/V projections, the key bias dropped, the value bias folded into the
    output projection's bias, PackedMultiHeadAttention) gives the unpacked graph's logits."""
    import collections

    import onnx
    from onnx.reference import ReferenceEvaluator

    from cliptune_ort.engine import packing_feeds

    src = packed_pair[0]
    man = load_manifest(src)
    feeds = contract_inputs(man, pop=2, batch=5, extra=17, seed=4)
    host_feeds = {**feeds, **packing_feeds(feeds["attention_mask"], len(feeds["prompt_embeds"]))}
    ops = _reference_ops()
    layers = man.data["model"]["layers"]
    for name, f, host in (("packed_flash", feeds, False), ("packed_host_flash", host_feeds, True)):
        m = load_manifest(src.parent / name)
        assert m.packed and m.host_packing == host and m.data["packed_kernel"] == "flash"
        for g in range(man.k + 1):
            graph = onnx.load(str(m.graph_path(g)), load_external_data=False).graph
            ops_count = collections.Counter(n.op_type for n in graph.node)
            assert ops_count["PackedMultiHeadAttention"] == layers - 1
            assert ops_count["PackedAttention"] == ops_count["Attention"] == 0
            assert ops_count["Slice"] == 3 * (layers - 1)
            ref_padded = ReferenceEvaluator(_with_weights(man.graph_path(g)), new_ops=ops).run(None, feeds)[0]
            ref_flash = ReferenceEvaluator(_with_weights(m.graph_path(g)), new_ops=ops).run(None, f)[0]
            assert ref_flash.shape == (2, 5, 3)
            np.testing.assert_allclose(ref_flash, ref_padded, atol=2e-3)  # moved biases: fp16 rounding only
            assert float(np.abs(ref_flash).max()) > 0.05


def test_flash_kernel_exact_with_nonzero_biases(packed_pair):
    """Random-init models have zero biases, which would hide a wrong bias move: give every Q/K/V and output
    bias random values, then the flash graph (key bias dropped, value bias folded into the output bias)
    must still give the unpacked graph's logits, and dropping the value bias instead of folding it must not."""
    import copy

    from cliptune_export.packing import PackingError, pack_graph
    from onnx.reference import ReferenceEvaluator

    man = load_manifest(packed_pair[0])
    feeds = contract_inputs(man, pop=2, batch=4, extra=9, seed=5)
    ops = _reference_ops()
    m = _with_weights(man.graph_path(0))
    rng = np.random.default_rng(0)
    atts = [n for n in m.graph.node if n.op_type == "Attention"]
    biases = {n.input[2] for n in atts} | _skip_ln_biases(m)
    assert len(biases) >= 2 * len(atts)  # each layer's QKV bias and output bias
    _randomize(m, biases, rng)
    ref = ReferenceEvaluator(m, new_ops=ops).run(None, feeds)[0]
    flash = copy.deepcopy(m)
    before = {n.name: n.input[4] for n in flash.graph.node if n.op_type == "SkipLayerNormalization"
              and len(n.input) > 4}
    assert pack_graph(flash, kernel="flash") == len(atts)
    got = ReferenceEvaluator(flash, new_ops=ops).run(None, feeds)[0]
    np.testing.assert_allclose(got, ref, atol=3e-3)
    fused = copy.deepcopy(m)
    pack_graph(fused, kernel="fused")
    np.testing.assert_allclose(ReferenceEvaluator(fused, new_ops=ops).run(None, feeds)[0], ref, atol=3e-3)
    dropped = copy.deepcopy(flash)  # the value bias dropped instead of folded: the logits must move
    moved = 0
    for n in dropped.graph.node:
        if n.op_type == "SkipLayerNormalization" and n.input[4].endswith("__b_out"):
            n.input[4] = before.get(n.name) or ""
            moved += 1
    assert moved == len(atts)
    wrong = ReferenceEvaluator(dropped, new_ops=ops).run(None, feeds)[0]
    assert float(np.abs(wrong - ref).max()) > 10 * 3e-3
    with pytest.raises(PackingError, match="kernel must be one of fused, flash"):
        pack_graph(copy.deepcopy(m), kernel="cutlass")


def test_flash_kernel_on_real_weights(tmp_path):
    """splade-tiny's trained weights (non-zero biases everywhere): the flash graph, and the flash graph with
    MoE feed-forward blocks, give the unpacked fp16 graph's logits to fp16 rounding (logits up to ~6,
    where one fp16 step is 3.9e-3)."""
    from cliptune_export import ExportOptions, export_model
    from cliptune_export.packing import pack_export
    from onnx.reference import ReferenceEvaluator

    from cliptune_ort.engine import packing_feeds

    from .conftest import SPLADE

    export_model(str(SPLADE), tmp_path / "fp16", ExportOptions(k=1, p=0.1, seed=3, n_prompt=10, precision="fp16"))
    pack_export(tmp_path / "fp16", tmp_path / "flash", host_offsets=True)
    pack_export(tmp_path / "fp16", tmp_path / "moe", host_offsets=True, ffn="moe")  # + the tanh-GELU MoE block
    man, fm, mm = load_manifest(tmp_path / "fp16"), load_manifest(tmp_path / "flash"), load_manifest(tmp_path / "moe")
    assert fm.data["packed_kernel"] == mm.data["packed_kernel"] == "flash" and mm.packed_ffn == "moe"
    feeds = contract_inputs(man, pop=2, batch=5, extra=17, seed=3)
    host = {**feeds, **packing_feeds(feeds["attention_mask"], 2)}
    ops = _reference_ops()
    for g in range(man.k + 1):
        ref = ReferenceEvaluator(_with_weights(man.graph_path(g)), new_ops=ops).run(None, feeds)[0]
        assert float(np.abs(ref).max()) > 1.0
        for d in (fm, mm):
            got = ReferenceEvaluator(_with_weights(d.graph_path(g)), new_ops=ops).run(None, host)[0]
            np.testing.assert_allclose(got, ref, atol=2e-2)


def test_numpy_moe_is_onnxruntimes_moe():
    """The numpy MoE above is ORT's: ORT's CPU provider runs a single-expert com.microsoft.MoE (weights
    [experts, out, in], tanh GELU) and gives the numpy op's output; erf GELU would not match."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    moe = next(op for op in _reference_ops() if op.__name__ == "MoE")
    rng = np.random.default_rng(0)
    t, h, f = 9, 16, 64
    w1, b1 = rng.standard_normal((1, f, h)) * 0.3, rng.standard_normal((1, f)) * 0.3
    w2, b2 = rng.standard_normal((1, h, f)) * 0.3, rng.standard_normal((1, h)) * 0.3
    arrays = [a.astype(np.float32) for a in (w1, b1, w2, b2)]
    node = helper.make_node("MoE", ["x", "r", "w1", "b1", "w2", "b2"], ["y"], domain="com.microsoft", k=1,
                            activation_type="gelu")
    g = helper.make_graph([node], "moe", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [t, h]),
                                          helper.make_tensor_value_info("r", TensorProto.FLOAT, [t, 1])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [t, h])],
                          [numpy_helper.from_array(a, n) for a, n in zip(arrays, ("w1", "b1", "w2", "b2"))])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    x, r = rng.standard_normal((t, h)).astype(np.float32), np.zeros((t, 1), np.float32)
    got = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x, "r": r})[0]
    want = moe._run(None, x, r, *arrays, k=1, activation_type="gelu")[0]
    np.testing.assert_allclose(got, want, atol=2e-5)
    erf = np.vectorize(math.erf)
    pre = x @ arrays[0][0].T + arrays[1][0]
    erf_gelu = (0.5 * pre * (1 + erf(pre / math.sqrt(2.0)))) @ arrays[2][0].T + arrays[3][0]
    assert float(np.abs(erf_gelu - got).max()) > 10 * 2e-5  # the test can tell the two GELUs apart


def test_moe_ffn_matches_unpacked(packed_pair, tmp_path):
    """ffn="moe": every packed layer's MatMul -> BiasGelu -> MatMul becomes one single-expert MoE node whose
    biases are the BiasGelu's and the SkipLayerNormalization's (random here: random-init biases are zero),
    and the logits are the unpacked graph's up to the tanh-vs-erf GELU; dropping fc2's bias must show."""
    import collections
    import copy
    import json

    from cliptune_export.packing import PackingError, pack_export, pack_graph
    from onnx.reference import ReferenceEvaluator

    src = packed_pair[0]
    man, layers, feeds, host, ops, m = _ffn_case(src, seed=6)
    rng = np.random.default_rng(1)
    gelus = [n for n in m.graph.node if n.op_type == "BiasGelu"]
    biases = {n.input[1] for n in gelus} | _skip_ln_biases(m)
    assert len(gelus) == layers + 1 and len(biases) >= 3 * layers - 1  # + the LM head's dense -> GELU
    _randomize(m, biases, rng)
    ref = ReferenceEvaluator(m, new_ops=ops).run(None, feeds)[0]
    for host_offsets, kernel in ((True, "flash"), (False, "fused")):
        moe = copy.deepcopy(m)
        assert pack_graph(moe, host_offsets=host_offsets, kernel=kernel, ffn="moe") == layers - 1
        count = collections.Counter(n.op_type for n in moe.graph.node)
        assert count["MoE"] == layers - 1 and count["BiasGelu"] == 2  # the single-query last layer's, the LM head's
        assert sum(n.op_type == "ConstantOfShape" and "moe" in n.name for n in moe.graph.node) == 1  # one router
        got = ReferenceEvaluator(moe, new_ops=ops).run(None, host if host_offsets else feeds)[0]
        assert float(np.abs(ref).max()) > 0.05
        np.testing.assert_allclose(got, ref, atol=1e-3)  # fp16 rounding and the tanh GELU (2.4e-4 seen)
    no_bias = copy.deepcopy(moe)  # fc2's bias dropped instead of moved into MoE: the logits must move
    for n in no_bias.graph.node:
        if n.op_type == "MoE":
            n.input[5] = ""
    wrong = ReferenceEvaluator(no_bias, new_ops=ops).run(None, feeds)[0]
    assert float(np.abs(wrong - ref).max()) > 10 * 1e-3
    with pytest.raises(PackingError, match="feed-forward block must be one of matmul, moe"):
        pack_graph(copy.deepcopy(m), ffn="cutlass")
    broken = copy.deepcopy(m)  # a layer whose FFN is not MatMul -> BiasGelu -> MatMul -> SkipLN
    gelu = next(n for n in broken.graph.node if n.op_type == "BiasGelu")
    gelu.op_type = "Add"
    gelu.domain = ""
    with pytest.raises(PackingError, match=f"found {layers - 2} MatMul -> BiasGelu"):
        pack_graph(broken, ffn="moe")
    pman = pack_export(src, tmp_path / "moe", host_offsets=True, ffn="moe")
    assert pman["packed_ffn"] == "moe" and load_manifest(tmp_path / "moe").packed_ffn == "moe"
    assert load_manifest(src.parent / "packed_flash").packed_ffn == "matmul" and man.packed_ffn is None
    from cliptune_ort.errors import ModelDirError
    from cliptune_ort.manifest import seal_manifest

    data = json.loads((tmp_path / "moe" / "manifest.json").read_text())
    (tmp_path / "moe" / "manifest.json").write_text(json.dumps(seal_manifest({**data, "packed_ffn": "gemm"})))
    with pytest.raises(ModelDirError, match="packed_ffn.*'matmul', 'moe', 'cublaslt' or 'cublaslt_res'"):
        load_manifest(tmp_path / "moe")


def test_flash_sessions_skip_matmul_add_fusion(packed_pair, monkeypatch, tmp_path):
    """Flash exports' sessions are made without MatMulAddFusion (their query bias Add would become a Gemm
    with a slow bias broadcast on CUDA); other layouts keep every optimizer. make_session hands the list
    to ORT, which then leaves a MatMul + Add unfused."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from cliptune_ort import sessions
    from cliptune_ort.engine import disabled_optimizers

    src = packed_pair[0]
    assert disabled_optimizers(load_manifest(src.parent / "packed_flash")) == ("MatMulAddFusion",)
    assert disabled_optimizers(load_manifest(src.parent / "packed_host_flash")) == ("MatMulAddFusion",)
    for d in (src, src.parent / "packed", src.parent / "packed_host"):
        assert disabled_optimizers(load_manifest(d)) == ()
    rng = np.random.default_rng(0)
    w, b = rng.standard_normal((4, 3)).astype(np.float32), rng.standard_normal(3).astype(np.float32)
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y0"]), helper.make_node("Add", ["y0", "b"], ["y"])],
                          "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
                          [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / "mm.onnx"))
    seen, real = [], ort.InferenceSession

    def spy(path, so, **kw):
        seen.append(kw.get("disabled_optimizers"))
        so.optimized_model_filepath = str(tmp_path / f"opt{len(seen)}.onnx")
        return real(path, so, **kw)

    monkeypatch.setattr(sessions.ort, "InferenceSession", spy)
    x = rng.standard_normal((2, 4)).astype(np.float32)
    for k, off in enumerate(((), ("MatMulAddFusion",)), 1):
        sess = sessions.make_session(tmp_path / "mm.onnx", sessions.SessionSpec(disabled_optimizers=off))
        np.testing.assert_allclose(sess.run(None, {"x": x})[0], x @ w + b, rtol=1e-5, atol=1e-6)
        ops = [n.op_type for n in onnx.load(str(tmp_path / f"opt{k}.onnx")).graph.node]
        assert ops == (["Gemm"] if not off else ["MatMul", "Add"])
    assert seen == [None, ["MatMulAddFusion"]]


def test_packing_feeds_equal_remove_padding():
    from cliptune_ort.engine import packing_feeds

    remove = next(op for op in _reference_ops() if op.__name__ == "RemovePadding")
    am = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], np.int64)
    pop, hidden = 3, 4
    x = np.random.default_rng(0).standard_normal((pop * 3, 5, hidden)).astype(np.float32)
    counts = np.tile(am.sum(1), pop).astype(np.int32)
    packed, offset, cu, _ = remove._run(None, x, counts)
    f = packing_feeds(am, pop)
    np.testing.assert_array_equal(f["packed_token_offset"], offset)
    np.testing.assert_array_equal(f["packed_cu_seqlens"], cu)
    np.testing.assert_array_equal(x.reshape(-1, hidden)[f["packed_token_index"]], packed)
    assert f["packed_token_index"].dtype == np.int64 and f["packed_token_offset"].dtype == np.int32
    assert len(f["packed_token_index"]) == pop * am.sum() == cu[-1]
    with pytest.raises(ConfigError, match="right-padded"):
        packing_feeds(np.array([[0, 1, 1]]), 2)


def test_packed_export_refused_on_cpu(packed_pair):
    from cliptune_ort.engine import Engine

    for d in packed_pair[1:]:
        with pytest.raises(ConfigError, match="CUDA provider only"):
            Engine(load_manifest(d), [0], device="cpu")


def test_pack_refuses_wrong_input(packed_pair, roberta_dir, tmp_path):
    import onnx
    from cliptune_export.packing import PackingError, pack_export, pack_graph

    _, packed, packed_host = packed_pair
    with pytest.raises(ConfigError, match="needs --precision fp16"):
        pack_export(roberta_dir, tmp_path / "x")  # an fp32 export: no fused Attention
    for d in (packed, packed_host):
        with pytest.raises(ConfigError, match="already packed"):
            pack_export(d, tmp_path / "y")
    with pytest.raises(PackingError, match="no fused Attention"):
        pack_graph(onnx.load(str(load_manifest(roberta_dir).graph_path(0)), load_external_data=False))
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_export_option_packed(tiny_roberta_src, tmp_path):
    import collections

    import onnx
    from cliptune_export import ExportOptions, export_model

    with pytest.raises(ConfigError, match="--packed needs --precision fp16"):
        export_model(str(tiny_roberta_src), tmp_path / "bad", ExportOptions(k=1, packed=True))
    assert not (tmp_path / "bad").exists()
    with pytest.raises(ConfigError, match="must be 'device' or 'host'"):
        export_model(str(tiny_roberta_src), tmp_path / "bad", ExportOptions(k=1, precision="fp16", packed="gpu"))
    with pytest.raises(ConfigError, match="--packed-kernel must be one of fused, flash, cudnn"):
        export_model(str(tiny_roberta_src), tmp_path / "bad", ExportOptions(k=1, precision="fp16", packed="host",
                                                                            packed_kernel="cutlass"))
    man_d = export_model(str(tiny_roberta_src), tmp_path / "p",  # the default kernel: flash
                         ExportOptions(k=1, p=0.2, seed=5, n_prompt=10, precision="fp16", packed="host"))
    man = load_manifest(tmp_path / "p")  # sha256 of the packed graphs verified
    assert man.packed and man.host_packing and man_d["attention"] == "packed_host"
    assert man_d["packed_kernel"] == "flash"
    for g in man.data["graphs"]:
        ops = collections.Counter(n.op_type for n in onnx.load(str(man.graph_path(g["index"])),
                                                               load_external_data=False).graph.node)
        assert ops["PackedMultiHeadAttention"] == g["packed_attention_nodes"] == man.data["model"]["layers"] - 1
        assert ops["PackedAttention"] == 0
    assert man.packed_front == "gather" and man_d["packed_front"] == "gather"
    with pytest.raises(ConfigError, match="--packed-front fused needs --packed host"):
        export_model(str(tiny_roberta_src), tmp_path / "bad", ExportOptions(k=1, precision="fp16", packed="device",
                                                                            packed_front="fused"))
    with pytest.raises(ConfigError, match="--packed-front must be one of gather, fused"):
        export_model(str(tiny_roberta_src), tmp_path / "bad", ExportOptions(k=1, precision="fp16", packed="host",
                                                                            packed_front="scatter"))
    assert not (tmp_path / "bad").exists()


def test_pack_refuses_position_dependent_ops(packed_pair):
    """An op inside the layers that mixes positions (here: a per-position scale) must stop the packing."""
    import onnx
    from cliptune_export.packing import PackingError, pack_graph
    from onnx import helper, numpy_helper

    src = packed_pair[0]
    m = onnx.load(str(load_manifest(src).graph_path(0)), load_external_data=False)
    gelu = next(n for n in m.graph.node if n.op_type == "BiasGelu")
    out = gelu.output[0]
    for n in m.graph.node:
        for k, i in enumerate(n.input):
            if i == out:
                n.input[k] = "scaled"
    m.graph.initializer.append(numpy_helper.from_array(np.ones((7, 1), np.float16), "per_position"))
    m.graph.node.append(helper.make_node("Mul", [out, "per_position"], ["scaled"], name="per_position_mul"))
    before = len(m.graph.node)
    with pytest.raises(PackingError, match="not a per-row weight"):
        pack_graph(m)
    assert len(m.graph.node) == before and not any(n.op_type == "PackedAttention" for n in m.graph.node)


def test_deploy_of_a_run_on_packed_graphs(packed_pair, roberta_dir, tmp_path):
    """A run tuned on packed graphs (CUDA) deploys from the unpacked export of the same weights."""
    import json
    import shutil

    from cliptune_export.deploy import DeployOptions, deploy_run

    from cliptune_ort.config import build_config
    from cliptune_ort.tuner import tune

    src, packed, packed_host = packed_pair
    run = tmp_path / "run"
    tune(build_config(task="sst2", method="bbt", budget=40, popsize=4, d=20, eval_every=20, plot=False,
                      device="cpu"), run, model_dir=src)
    # the same run as if tuned on the packed copy (same weights, same export id): only the model dir differs
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["resolved_model_dir"] == str(src.resolve())
    for d, name in ((packed, "run_packed"), (packed_host, "run_packed_host")):
        r = tmp_path / name
        shutil.copytree(run, r)
        (r / "config.json").write_text(json.dumps({**cfg, "resolved_model_dir": str(d.resolve())}))
        with pytest.raises(ConfigError, match=f"tuned on packed-attention graphs.*--model-dir {src}"):
            deploy_run(r, tmp_path / "x.onnx")
        with pytest.raises(ConfigError, match="packed-attention graphs too"):
            deploy_run(r, tmp_path / "x.onnx", DeployOptions(model_dir=str(d)))
        with pytest.raises(ConfigError, match="holds other weights"):
            deploy_run(r, tmp_path / "x.onnx", DeployOptions(model_dir=str(roberta_dir)))
        assert not (tmp_path / "x.onnx").exists()
        meta = deploy_run(r, tmp_path / f"{name}.onnx", DeployOptions(model_dir=str(src), check_split="dev"))
        assert meta["check"]["prediction_agreement"] == 1.0
    # the classifier is the one the unpacked run itself deploys
    direct = deploy_run(run, tmp_path / "direct.onnx", DeployOptions(check_split="dev"))
    assert direct["check"]["max_abs_prob_diff"] == pytest.approx(meta["check"]["max_abs_prob_diff"], abs=1e-6)


def test_packed_graphs_evaluate_in_chunks_as_large_as_the_train_call(packed_pair):
    """Dev/test chunks: cfg.eval_chunk rows for padded graphs (padding and memory bounded); for packed graphs
    at least popsize x the train rows (the stacked train call's memory), so fewer shapes run only once."""
    from cliptune_ort.config import build_config
    from cliptune_ort.tuner import eval_chunk_rows

    padded, packed = load_manifest(packed_pair[0]), load_manifest(packed_pair[2])
    cfg = build_config(task="sst2", popsize=20)
    assert eval_chunk_rows(cfg, padded, 32) == cfg.eval_chunk == 256
    assert eval_chunk_rows(cfg, packed, 32) == 640  # SST-2's 872 test rows: 2 chunks, not 4
    assert eval_chunk_rows(build_config(task="sst2", popsize=4), packed, 32) == 256  # never below eval_chunk
    assert eval_chunk_rows(build_config(task="sst2", popsize=20, eval_chunk=1000), packed, 32) == 1000


def test_packing_feeds_shared_prefix_by_brute_force():
    """shared_prefix = P: the compact index holds every packed token but positions 0 .. P - 1 of each candidate's
    examples after its first, in order; token_rows points each token at its own compact row, or at its
    candidate's first example's at the same position. Rows shorter than P are refused in one line."""
    from cliptune_ort.engine import packing_feeds

    am = np.array([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], np.int64)
    pop, batch, P = 2, 3, 2
    f = packing_feeds(am, pop, shared_prefix=P)
    np.testing.assert_array_equal(f["packed_token_index"], packing_feeds(am, pop)["packed_token_index"])
    tokens = [(c, b, j) for c in range(pop) for b in range(batch) for j in range(int(am[b].sum()))]
    kept = [i for i, (c, b, j) in enumerate(tokens) if not (b > 0 and j < P)]
    np.testing.assert_array_equal(f["packed_compact_index"], kept)
    for t, (c, b, j) in enumerate(tokens):
        src = tokens.index((c, 0, j)) if b > 0 and j < P else t
        assert f["packed_token_rows"][t] == kept.index(src), (t, c, b, j)
    assert f["packed_compact_index"].dtype == np.int64 and f["packed_token_rows"].dtype == np.int32
    assert len(f["packed_compact_index"]) == len(tokens) - pop * (batch - 1) * P
    assert "packed_token_rows" not in packing_feeds(am, pop)  # no prefix: the three inputs only
    with pytest.raises(ConfigError, match="shares the first 4 positions of every row; a row holds 3 tokens"):
        packing_feeds(am, pop, shared_prefix=4)


@pytest.mark.parametrize(("kernel", "ffn", "front"), [("pipe_qkv", "cublaslt", "fused"),
                                                      ("short_qkv", "matmul", "gather")])
def test_shared_prefix_first_layer_matches_unpacked(packed_pair, tmp_path, kernel, ffn, front):
    """prefix=True: the first packed layer projects Q, K and V on the compact rows (a Gather at
    packed_compact_index before its projection) and its RaggedAttention reads them through packed_token_rows (7th
    input); the other layers are unchanged. The logits are the unpacked graph's; the manifest records
    shared_prefix = n_prompt + 1; other layouts are refused."""
    import collections
    import copy

    from cliptune_export.packing import PackingError, pack_export, pack_graph
    from onnx.reference import ReferenceEvaluator

    from cliptune_ort.engine import PREFIX_INPUTS, packing_feeds

    src = packed_pair[0]
    man, layers, feeds, ops, m, ref = _attention_bias_case(src, seed=29, bias_seed=4)
    g = copy.deepcopy(m)
    assert pack_graph(g, host_offsets=True, kernel=kernel, ffn=ffn, front=front, prefix=True) == layers - 1
    gathers = [n for n in g.graph.node if n.op_type == "Gather" and PREFIX_INPUTS[0] in n.input]
    atts = [n for n in g.graph.node if n.op_type == "RaggedAttention"]
    assert len(gathers) == 1 and [len(n.input) for n in atts] == [7] + [6] * (layers - 2)
    assert atts[0].input[6] == PREFIX_INPUTS[1]
    proj = [n for n in g.graph.node if gathers[0].output[0] in n.input]
    assert len(proj) == 1 and proj[0].op_type == ("FusedDense" if ffn != "matmul" else "MatMul")
    assert set(PREFIX_INPUTS) <= {i.name for i in g.graph.input}
    P = man.n_prompt + 1
    host = {**feeds, **packing_feeds(feeds["attention_mask"], 2, shared_prefix=P)}
    assert len(host["packed_compact_index"]) < len(host["packed_token_index"])  # the projection's rows shrink
    got = ReferenceEvaluator(g, new_ops=ops).run(None, host)[0]
    err = float(np.abs(got - ref).max())
    assert err < 1e-3, err
    # the first layer's attention output, against the same packing without the shared prefix: equal, and another
    # map (every token reading the first row) is far off (this tiny random model's logits move little, so the
    # check is on the layer itself)
    from onnx import TensorProto, helper

    plain = copy.deepcopy(m)
    pack_graph(plain, host_offsets=True, kernel=kernel, ffn=ffn, front=front)
    first = atts[0].output[0]
    for model in (g, plain):
        model.graph.output.append(helper.make_tensor_value_info(first, TensorProto.FLOAT16, None))
    want = ReferenceEvaluator(plain, new_ops=ops).run([first], {**feeds, **packing_feeds(feeds["attention_mask"], 2)})[0]
    mine = ReferenceEvaluator(g, new_ops=ops).run([first], host)[0]
    np.testing.assert_allclose(mine.astype(np.float32), want.astype(np.float32), atol=2e-3)
    wrong = dict(host, packed_token_rows=np.zeros_like(host["packed_token_rows"]))
    off = ReferenceEvaluator(g, new_ops=ops).run([first], wrong)[0]
    assert float(np.abs(off.astype(np.float32) - want).max()) > 0.1
    assert collections.Counter(n.op_type for n in g.graph.node)["RaggedAttention"] == layers - 1
    for bad in ({"kernel": "flash"}, {"kernel": "short"}, {"kernel": kernel, "host_offsets": False}):
        with pytest.raises(PackingError, match="shared-prefix first layer needs host offsets"):
            pack_graph(copy.deepcopy(m), **{"host_offsets": True, "ffn": ffn, **bad}, prefix=True)
    pman = pack_export(src, tmp_path / "sp", host_offsets=True, kernel=kernel, ffn=ffn, front=front, prefix=True)
    loaded = load_manifest(tmp_path / "sp")
    assert pman["shared_prefix"] == P and loaded.shared_prefix == P and loaded.host_packing
    # the inputs the Engine's contract check expects are the packed graphs' own (it opens them on CUDA only)
    import onnx

    from cliptune_ort.engine import layout_inputs

    contract = {"input_ids", "attention_mask", "mask_pos", "prompt_embeds", "verbalizer_ids"}
    for d in (tmp_path / "sp", packed_pair[2], src):
        man_d = load_manifest(d)
        names = {i.name for i in onnx.load(str(man_d.graph_path(0)), load_external_data=False).graph.input}
        assert names == contract | set(layout_inputs(man_d)), d


def test_export_option_share_prefix_with_packed(tiny_roberta_src, tmp_path):
    """`--share-prefix` with `--packed host --packed-kernel pipe_qkv`: the traced graph keeps ORT's fusions (no
    shared projection in it), the packing shares the first layer's rows (a Gather before its projection), and
    the manifest asks the runtime for it (shared_prefix = n_prompt + 1); with another layout it is refused in one
    line."""
    import onnx
    from cliptune_export import ExportOptions, export_model

    from cliptune_ort.engine import PREFIX_INPUTS

    for packed, kernel in (("host", "flash"), ("host", "short"), (True, "pipe_qkv")):
        with pytest.raises(ConfigError, match="--share-prefix with --packed needs --packed host and --packed-kernel "
                                              "short_qkv or pipe_qkv"):
            export_model(str(tiny_roberta_src), tmp_path / "bad",
                         ExportOptions(k=1, precision="fp16", packed=packed, packed_kernel=kernel, share_prefix=True))
    assert not (tmp_path / "bad").exists()
    with pytest.raises(ConfigError, match="--packed-q-bias attention needs --packed and --packed-kernel short_qkv or "
                                          "pipe_qkv, got --packed-kernel flash"):
        export_model(str(tiny_roberta_src), tmp_path / "bad", ExportOptions(k=1, precision="fp16", packed="host",
                                                                            packed_q_bias="attention"))
    with pytest.raises(ConfigError, match="--prompt-dtype float16 needs --packed"):
        export_model(str(tiny_roberta_src), tmp_path / "bad", ExportOptions(k=1, precision="fp16",
                                                                            prompt_dtype="float16"))
    man_d = export_model(str(tiny_roberta_src), tmp_path / "sp",
                         ExportOptions(k=1, p=0.2, seed=5, n_prompt=10, precision="fp16", packed="host",
                                       packed_kernel="pipe_qkv", packed_ffn="cublaslt", packed_front="fused",
                                       share_prefix=True, prompt_dtype="float16", packed_q_bias="attention"))
    man = load_manifest(tmp_path / "sp")
    assert man_d["shared_prefix"] == 11 and man.shared_prefix == 11 and man.packed_kernel == "pipe_qkv"
    assert man.prompt_dtype == "float16" and man.data["packed_q_bias"] == "attention"
    for g in man.data["graphs"]:
        m = onnx.load(str(tmp_path / "sp" / g["file"]), load_external_data=False)
        assert set(PREFIX_INPUTS) <= {i.name for i in m.graph.input}
        pe = next(i for i in m.graph.input if i.name == "prompt_embeds")
        assert pe.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
        assert sum(n.op_type == "Attention" for n in m.graph.node) == 0  # every full layer packed (fusions held)
        assert [n for n in m.graph.node if n.op_type == "Gather" and PREFIX_INPUTS[0] in n.input]


def test_packed_float16_prompts_match_unpacked(packed_pair, tmp_path):
    """prompt_fp16=True on a packed graph (the shared-prefix pipelined layout): the prompts come in as float16, no
    Cast reads them, and the logits on the same prompts, rounded to float16, are the unpacked graph's; pack_export
    records prompt_dtype and refuses an unknown one."""
    import copy

    from cliptune_export.packing import pack_export, pack_graph
    from onnx import TensorProto
    from onnx.reference import ReferenceEvaluator

    from cliptune_ort.engine import packing_feeds

    src = packed_pair[0]
    man, _layers, feeds, _host, ops, m = _ffn_case(src, seed=31)
    ref = ReferenceEvaluator(m, new_ops=ops).run(None, feeds)[0]
    g = copy.deepcopy(m)
    pack_graph(g, host_offsets=True, kernel="pipe_qkv", ffn="cublaslt", front="fused", prefix=True, prompt_fp16=True)
    pe = next(i for i in g.graph.input if i.name == "prompt_embeds")
    assert pe.type.tensor_type.elem_type == TensorProto.FLOAT16
    assert all(n.op_type != "Cast" for n in g.graph.node if "prompt_embeds" in n.input)
    host = {**feeds, **packing_feeds(feeds["attention_mask"], 2, shared_prefix=man.n_prompt + 1),
            "prompt_embeds": feeds["prompt_embeds"].astype(np.float16)}
    got = ReferenceEvaluator(g, new_ops=ops).run(None, host)[0]
    np.testing.assert_allclose(got, ref, atol=1e-3)
    pman = pack_export(src, tmp_path / "h", host_offsets=True, kernel="pipe_qkv", ffn="cublaslt", front="fused",
                       prefix=True, prompt_dtype="float16")
    assert pman["prompt_dtype"] == "float16" and load_manifest(tmp_path / "h").prompt_dtype == "float16"
    with pytest.raises(ConfigError, match="prompt_dtype must be one of float32, float16, got 'bfloat16'"):
        pack_export(src, tmp_path / "x", host_offsets=True, kernel="pipe_qkv", prompt_dtype="bfloat16")
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("prefix", [False, True])
def test_query_bias_in_the_attention_op_matches_unpacked(packed_pair, tmp_path, prefix):
    """qbias=True: each packed layer's one QKV projection is a plain MatMul and RaggedAttention adds the query bias
    (its 8th input; the 7th, token_rows, empty or the shared-prefix map). The logits are the unpacked graph's with
    random biases; the manifest records packed_q_bias; other kernels are refused."""
    import copy

    from cliptune_export.packing import PackingError, pack_export, pack_graph
    from onnx.reference import ReferenceEvaluator

    from cliptune_ort.engine import PREFIX_INPUTS, packing_feeds

    src = packed_pair[0]
    man, layers, feeds, ops, m, ref = _attention_bias_case(src, seed=37, bias_seed=8)
    g = copy.deepcopy(m)
    pack_graph(g, host_offsets=True, kernel="pipe_qkv", ffn="cublaslt", front="fused", prefix=prefix, qbias=True)
    atts = [n for n in g.graph.node if n.op_type == "RaggedAttention"]
    assert len(atts) == layers - 1 and all(len(n.input) == 8 and n.input[7].endswith("__b_q") for n in atts)
    assert [n.input[6] for n in atts] == [PREFIX_INPUTS[1] if prefix else ""] + [""] * (layers - 2)
    producers = {o: n for n in g.graph.node for o in n.output}
    assert all(producers[n.input[0]].op_type == "MatMul" for n in atts)  # no bias epilogue before them
    assert not any(t.name.endswith("__b_qkv") for t in g.graph.initializer)
    host = {**feeds, **packing_feeds(feeds["attention_mask"], 2, shared_prefix=man.n_prompt + 1 if prefix else 0)}
    got = ReferenceEvaluator(g, new_ops=ops).run(None, host)[0]
    np.testing.assert_allclose(got, ref, atol=1e-3)
    # the layers themselves (this tiny random model's logits move little): every attention output equals that of
    # the packing with the biased projection
    from onnx import TensorProto, helper, numpy_helper

    plain = copy.deepcopy(m)
    pack_graph(plain, host_offsets=True, kernel="pipe_qkv", ffn="cublaslt", front="fused", prefix=prefix)
    outs = [n.output[0] for n in atts]
    for model in (g, plain):
        model.graph.output.extend(helper.make_tensor_value_info(o, TensorProto.FLOAT16, None) for o in outs)
    want = ReferenceEvaluator(plain, new_ops=ops).run(outs, host)
    mine = ReferenceEvaluator(g, new_ops=ops).run(outs, host)
    for w_, m_ in zip(want, mine):
        np.testing.assert_allclose(m_.astype(np.float32), w_.astype(np.float32), atol=2e-3)
    # each layer's op adds that layer's query bias: the first third of its fused Attention's QKV bias (the
    # numbers above move little on this model's near-uniform attention, so the wiring is checked exactly)
    inits = {t.name: numpy_helper.to_array(t) for t in g.graph.initializer}
    orig = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    fused = [n for n in m.graph.node if n.op_type == "Attention"]
    assert len(fused) == len(atts)
    for a_node, f_node in zip(atts, fused):
        assert a_node.input[7] == f"{f_node.name}__b_q"
        qkv_bias = orig[f_node.input[2]]
        np.testing.assert_array_equal(inits[a_node.input[7]], qkv_bias[:len(qkv_bias) // 3])
    if not prefix:
        with pytest.raises(PackingError, match="the query bias in the attention op needs a QKV kernel"):
            pack_graph(copy.deepcopy(m), host_offsets=True, kernel="short", qbias=True)
        pman = pack_export(src, tmp_path / "qb", host_offsets=True, kernel="short_qkv", ffn="cublaslt", qbias=True)
        assert pman["packed_q_bias"] == "attention" and load_manifest(tmp_path / "qb").data["packed_q_bias"] == "attention"
