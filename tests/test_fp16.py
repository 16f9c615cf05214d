"""fp16 export (the CUDA path), checked on the CPU: parity with fp32, fusions, no control flow.

Tolerances (stated once, used below):
- every fp16 graph vs the masked PyTorch reference (fp32): max abs diff <= 2e-2, the exporter's own
  fp16 check (measured: ~6e-3 on splade-tiny, ~3e-4 on the tiny RoBERTa);
- fp16 vs fp32 relative RMS <= 1e-2;
- the predicted label (argmax over the verbalizer logits) agrees with fp32 wherever fp32's top-2
  margin exceeds 2 x FP16_ATOL (a closer call may flip legitimately).

The fp16 exports use the mask seeds, p and L of the session's fp32 fixtures, so graph k of both
holds the same mask: fp16 (masks folded into the weights) is compared with the fp32 export (masks
as Mul nodes) and with the torch wrapper with the masks folded in fp32.
"""

from __future__ import annotations

import collections

import numpy as np
import pytest

from cliptune_ort.engine import Engine
from cliptune_ort.manifest import load_manifest

from .conftest import NAMES, SPLADE, contract_inputs, needs_export

pytestmark = needs_export

FP16_ATOL = 2e-2
FP16_REL_RMS = 1e-2


@pytest.fixture(scope="module")
def fp16_dirs(tmp_path_factory, tiny_roberta_src):
    """{name: (fp16 model dir, source)} with the seeds/p/L of conftest's fp32 fixtures, K=1."""
    from cliptune_export import ExportOptions, export_model

    out = tmp_path_factory.mktemp("exports_fp16")
    dirs = {}
    export_model(str(SPLADE), out / "splade", ExportOptions(k=1, p=0.1, seed=0, precision="fp16"))
    dirs["splade"] = (out / "splade", SPLADE)
    export_model(str(tiny_roberta_src), out / "roberta",
                 ExportOptions(k=1, p=0.2, seed=5, n_prompt=10, precision="fp16"))
    dirs["roberta"] = (out / "roberta", tiny_roberta_src)
    return dirs


def _run(model_dir, graph, feeds):
    man = load_manifest(model_dir)
    eng = Engine(man, [graph], device="cpu", cands_per_call=1)
    return eng.sessions[graph].run(["logits"], feeds)[0]


def _torch_folded(src, man, graph, feeds):
    """The export's torch wrapper, fp32, masks folded into the weights (what fp16 converts)."""
    import torch
    from cliptune_export.exporter import draw_masks
    from cliptune_export.wrapper import ARCHS, ContractModel, dropout_sites
    from transformers import AutoModelForMaskedLM

    mlm = AutoModelForMaskedLM.from_pretrained(str(src), attn_implementation="eager").eval()
    arch = ARCHS[mlm.config.model_type]
    g = man.data["graphs"][graph]
    masks = None
    if g["kind"] == "thinned":
        names = [s[0] for s in dropout_sites(mlm, arch)]
        masks = {k: torch.from_numpy(v) for k, v in draw_masks(names, man.hidden, g["p"], g["mask_seed"]).items()}
    model = ContractModel(mlm, arch, masks, fold_masks=True).eval()
    with torch.inference_mode():
        return model(*(torch.from_numpy(feeds[n]) for n in NAMES)).numpy()


def _compare(got, ref):
    diff = float(np.max(np.abs(got - ref)))
    rel = float(np.sqrt(np.mean((got - ref) ** 2)) / np.sqrt(np.mean(ref ** 2)))
    top2 = np.sort(ref, axis=-1)[..., -2:]
    clear = (top2[..., 1] - top2[..., 0]) > 2 * FP16_ATOL
    agree = np.argmax(got, -1) == np.argmax(ref, -1)
    return diff, rel, clear, agree


@pytest.mark.parametrize("which", ["splade", "roberta"])
def test_fp16_graphs_match_fp32(which, fp16_dirs, splade_dir, roberta_dir):
    fp16_dir, src = fp16_dirs[which]
    fp32_dir = splade_dir if which == "splade" else roberta_dir
    man16, man32 = load_manifest(fp16_dir), load_manifest(fp32_dir)
    assert man16.data["precision"] == "fp16" and man16.data["masks_folded"] is True
    feeds = contract_inputs(man16)
    for g in range(man16.k + 1):
        rec = man16.data["graphs"][g]
        assert rec["max_abs_diff"] <= FP16_ATOL and rec["atol"] == FP16_ATOL  # the exporter's own check
        assert rec["mask_seed"] == man32.data["graphs"][g]["mask_seed"] and rec["p"] == man32.data["graphs"][g]["p"]
        got = _run(fp16_dir, g, feeds)
        assert got.dtype == np.float32 and got.shape == (4, 7, 3)  # float32 I/O kept
        for ref in (_run(fp32_dir, g, feeds), _torch_folded(src, man16, g, feeds)):
            diff, rel, clear, agree = _compare(got, ref)
            assert diff <= FP16_ATOL, f"graph {g}: max |fp16 - fp32| = {diff:.2e}"
            assert rel <= FP16_REL_RMS, f"graph {g}: relative RMS {rel:.2e}"
            assert clear.mean() > 0.5  # the argmax check below is not vacuous
            assert agree[clear].all(), f"graph {g}: predicted labels differ where fp32 is clear"


@pytest.mark.parametrize("which", ["splade", "roberta"])
def test_fp16_graphs_are_fused_without_control_flow(which, fp16_dirs):
    """Every full-sequence layer is one Attention op (the last layer runs at the mask only, unfused),
    every residual LayerNorm a SkipLayerNormalization, every FFN GELU a BiasGelu; no If nodes."""
    import onnx

    model_dir, _ = fp16_dirs[which]
    man = load_manifest(model_dir)
    layers = man.data["model"]["layers"]
    for g in man.data["graphs"]:
        m = onnx.load(str(model_dir / g["file"]), load_external_data=False)
        ops = collections.Counter(n.op_type for n in m.graph.node)
        assert ops["Attention"] == layers - 1, dict(ops)
        assert ops["SkipLayerNormalization"] >= 2 * (layers - 1)
        assert ops["BiasGelu"] >= layers - 1
        assert ops["If"] == 0 and ops["Loop"] == 0
        types = {i.name: i.type.tensor_type.elem_type for i in list(m.graph.input) + list(m.graph.output)}
        assert types["prompt_embeds"] == onnx.TensorProto.FLOAT and types["logits"] == onnx.TensorProto.FLOAT
        big = [i for i in m.graph.initializer if i.data_type == onnx.TensorProto.FLOAT
               and int(np.prod(i.dims)) >= man.hidden * man.hidden]
        assert not big, f"fp32 weights left in {g['file']}: {[i.name for i in big][:3]}"


def test_fp32_export_is_not_fused_by_the_exporter(splade_dir):
    """fp32 (CPU) graphs stay plain ONNX ops: ORT's own CPU optimisations apply at load time."""
    import onnx

    m = onnx.load(str(splade_dir / "graph_0.onnx"), load_external_data=False)
    ops = {n.op_type for n in m.graph.node}
    assert "Attention" not in ops and "If" not in ops


def test_shared_trace_equals_tracing_every_graph(fp16_dirs, tiny_roberta_src, tmp_path, monkeypatch):
    """The fp16 export traces and fuses graph 0 once and writes every graph from it (Fp16Template):
    the result must be what tracing and fusing each graph would give (bit-identical logits)."""
    import cliptune_export.exporter as ex
    from cliptune_export import ExportOptions, export_model

    monkeypatch.setattr(ex.Fp16Template, "build", classmethod(lambda cls, *a, **k: None))
    traced = tmp_path / "traced"
    export_model(str(tiny_roberta_src), traced, ExportOptions(k=1, p=0.2, seed=5, n_prompt=10, precision="fp16"))
    shared, _ = fp16_dirs["roberta"]
    feeds = contract_inputs(load_manifest(shared), seed=4)
    for g in (0, 1):
        np.testing.assert_allclose(_run(shared, g, feeds), _run(traced, g, feeds), atol=1e-6, rtol=0)


def test_hf_layers_path_equals_the_exported_layers(tiny_roberta_src, roberta_dir):
    """ContractModel(hf_layers=True) (the GPU benchmark's PyTorch baselines: the HF layers' own
    attention) computes what the exported full_layer computes."""
    import torch
    from cliptune_export.wrapper import ARCHS, ContractModel
    from transformers import AutoModelForMaskedLM

    feeds = contract_inputs(load_manifest(roberta_dir), seed=8)
    outs = []
    for hf in (False, True):
        mlm = AutoModelForMaskedLM.from_pretrained(str(tiny_roberta_src), attn_implementation="eager").eval()
        model = ContractModel(mlm, ARCHS["roberta"], None, hf_layers=hf).eval()
        with torch.inference_mode():
            outs.append(model(*(torch.from_numpy(feeds[n]) for n in NAMES)).numpy())
    np.testing.assert_allclose(outs[0], outs[1], atol=1e-5, rtol=0)


def test_faster_fp16_conversion_gives_the_same_fused_graph(tiny_roberta_src, tmp_path, monkeypatch):
    """convert_precision hands ORT's symbolic shape inference the model with its large float initializers'
    data lifted out (37 of the 65.7 s of roberta-large's fp16 conversion were copies of the whole model): the fused
    fp16 graph must be byte for byte what ORT's own path gives, and the original model must get its data back.
    Every float initializer of rank >= 2 is lifted here (threshold 0), so a value inference used would show."""
    import contextlib

    import cliptune_export.exporter as ex
    import onnx
    from cliptune_export.wrapper import ARCHS, ContractModel
    from transformers import AutoModelForMaskedLM

    mlm = AutoModelForMaskedLM.from_pretrained(str(tiny_roberta_src), attn_implementation="eager").eval()
    man_like = contract_inputs_for(mlm)
    traced = tmp_path / "fp32.onnx"
    ex.trace_graph(ContractModel(mlm, ARCHS["roberta"], None).eval(), man_like, traced, 17)
    heads, hidden = mlm.config.num_attention_heads, mlm.config.hidden_size

    calls = {"lifted": 0}
    real = ex._faster_fp16_conversion

    @contextlib.contextmanager
    def counting():
        with real():
            import shape_infer_helper

            helper_cls = shape_infer_helper.SymbolicShapeInferenceHelper
            patched = helper_cls._preprocess  # the context's, on the class that defines it

            def wrapped(self, in_mp):
                before = {t.name for t in in_mp.graph.initializer if t.HasField("raw_data")}
                patched(self, in_mp)
                lifted = {t.name for t in self.out_mp_.graph.initializer if not t.HasField("raw_data")}
                calls["lifted"] += len(lifted & before)
                # the model handed in keeps every tensor's data
                assert {t.name for t in in_mp.graph.initializer if t.HasField("raw_data")} == before

            helper_cls._preprocess = wrapped  # shadows the inherited one for the fusions' helper
            try:
                yield
            finally:
                del helper_cls._preprocess

    outs = {}
    for name, ctx in (("ort", contextlib.nullcontext), ("lifted", counting)):
        path = tmp_path / name / "graph.onnx"
        path.parent.mkdir()
        path.write_bytes(traced.read_bytes())
        for data in tmp_path.glob("fp32.onnx*.data"):
            (path.parent / data.name).write_bytes(data.read_bytes())
        monkeypatch.setattr(ex, "_SHAPE_INFER_MAX_DATA", 0)
        monkeypatch.setattr(ex, "_faster_fp16_conversion", ctx)
        ex.convert_precision(path, "fp16", heads, hidden)
        outs[name] = onnx.load(str(path))
    assert calls["lifted"] > 0
    ops = collections.Counter(n.op_type for n in outs["ort"].graph.node)
    assert ops["Attention"] and ops["SkipLayerNormalization"]  # the fusions ran
    assert outs["lifted"].SerializeToString() == outs["ort"].SerializeToString()


def test_template_writes_its_weights_as_share_weights_would(tiny_roberta_src, tmp_path):
    """Fp16Template.write_shared (the export's path: each graph's external references made from the template
    in memory, the shared tensors hashed once) against writing every graph whole and then _share_weights:
    the same graph files and weights.bin, byte for byte, and the same tensor table. Graph 2 holds the same
    masks as graph 1, so its folded tensors must be found in the file, not stored again."""
    import cliptune_export.exporter as ex
    import onnx
    from cliptune_export.wrapper import ARCHS, dropout_sites
    from transformers import AutoModelForMaskedLM

    mlm = AutoModelForMaskedLM.from_pretrained(str(tiny_roberta_src), attn_implementation="eager").eval()
    opts = ex.ExportOptions(k=2, n_prompt=10, precision="fp16")
    template = ex.Fp16Template.build(mlm, ARCHS["roberta"], tmp_path, contract_inputs_for(mlm), opts)
    assert template is not None
    sites = [s[0] for s in dropout_sites(mlm, ARCHS["roberta"])]
    masks = [None, ex.draw_masks(sites, mlm.config.hidden_size, 0.2, 1), ex.draw_masks(sites, mlm.config.hidden_size,
                                                                                        0.2, 1)]
    files = [f"graph_{i}.onnx" for i in range(3)]
    shared, whole = tmp_path / "shared", tmp_path / "whole"
    shared.mkdir()
    whole.mkdir()
    writer = ex.WeightsWriter(shared / "weights.bin")
    for f, m in zip(files, masks):
        template.write_shared(shared / f, m, writer)
    table = writer.close()
    for f, m in zip(files, masks):
        template.write(whole / f, m)
    assert ex._share_weights(whole, files) == table
    for f in files + ["weights.bin"]:
        assert (shared / f).read_bytes() == (whole / f).read_bytes(), f
    assert sorted(p.name for p in shared.iterdir()) == sorted(p.name for p in whole.iterdir())
    # graph 1 added its own tensors; graph 2 (the same masks) none
    assert len({t["name"] for t in table}) == len(table)
    names = [{t.name for t in onnx.load(str(shared / f), load_external_data=False).graph.initializer} for f in files]
    assert names[1] == names[2] and names[0] != names[1]


def contract_inputs_for(mlm):
    """Example inputs (torch) of the contract for tracing ``mlm``'s ContractModel."""
    import torch
    from cliptune_export.exporter import _dummy_inputs

    ex = _dummy_inputs(np.random.default_rng(0), 2, 2, 18, 10, mlm.config.hidden_size, mlm.config.vocab_size,
                       mlm.config.pad_token_id, 0.02, 2)
    return tuple(torch.from_numpy(ex[n]) for n in NAMES)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_np_to_float16_is_ort_s_rule_bit_for_bit(dtype):
    """The export's vectorised fp16 cast against onnxruntime.transformers.float16.convert_np_to_float16 on the
    values where its rule acts: below the smallest subnormal, above 65504 (and the rounding band to 65520), 0, -0,
    inf, NaN, and random weights."""
    from cliptune_export.exporter import _np_to_float16
    from onnxruntime.transformers.float16 import convert_np_to_float16

    edge = [0.0, -0.0, 1e-9, -1e-9, 5.9e-8, -5.9e-8, 5.96e-08, 5.961e-8, 3e-8, 1e-7, 6.1e-5, 65503.0, 65504.0,
            65505.0, 65519.9, 65520.0, 1e5, -1e5, 3.4e38, np.inf, -np.inf, np.nan, 1.0, -2.5]
    rng = np.random.default_rng(3)
    spread = rng.standard_normal((64, 33)) * 10.0 ** rng.integers(-9, 6, (64, 33))
    arrays = [np.array(edge, dtype), spread.astype(dtype)]
    for arr in arrays:
        want = convert_np_to_float16(arr.copy())
        got = _np_to_float16(arr)
        assert got.dtype == np.float16 and want.dtype == np.float16
        np.testing.assert_array_equal(got.view(np.uint16), want.view(np.uint16))


def _fp16_prompt_copy(src, out):
    """A copy of the fp16 export ``src`` whose graphs take float16 prompts (packing.prompt_input_fp16), manifest
    re-sealed with prompt_dtype float16: the unpacked form of what `--packed --prompt-dtype float16` writes."""
    import json
    import shutil

    import onnx
    from cliptune_export.packing import prompt_input_fp16

    from cliptune_ort.manifest import MANIFEST_NAME, pin_sha256, seal_manifest

    shutil.copytree(src, out)
    data = json.loads((out / MANIFEST_NAME).read_text())
    for g in data["graphs"]:
        m = onnx.load(str(out / g["file"]), load_external_data=False)
        prompt_input_fp16(m)
        onnx.save(m, str(out / g["file"]))
        g["sha256"] = pin_sha256(out / g["file"])
    data["prompt_dtype"] = "float16"
    (out / MANIFEST_NAME).write_text(json.dumps(seal_manifest(data)))
    return out


def test_float16_prompts_give_the_float32_graph_s_logits_bit_for_bit(fp16_dirs, tmp_path, monkeypatch):
    """prompt_input_fp16: the graph takes float16 prompts (its Cast from float32 gone). An Engine over it casts host
    prompts with engine.host_cast (ONNX Runtime's CPU Cast) and gives the float32-prompt export's logits bit for
    bit: the graph's own cast and the host's round alike. The contract check refuses a graph whose prompt type
    is not the manifest's; a graph whose prompts are read other than by a Cast to float16 is refused."""
    import onnx
    from cliptune_export.packing import PackingError, prompt_input_fp16

    import cliptune_ort.engine as engine_mod
    from cliptune_ort.encoding import Encoded
    from cliptune_ort.errors import ModelDirError

    src = fp16_dirs["roberta"][0]
    half = _fp16_prompt_copy(src, tmp_path / "half")
    m = onnx.load(str(half / "graph_0.onnx"), load_external_data=False)
    pe = next(i for i in m.graph.input if i.name == "prompt_embeds")
    assert pe.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    assert not [n for n in m.graph.node if "prompt_embeds" in n.input and n.op_type == "Cast"]
    man, man_h = load_manifest(src), load_manifest(half)
    assert man.prompt_dtype == "float32" and man_h.prompt_dtype == "float16"
    feeds = contract_inputs(man, pop=3, batch=5, extra=9, seed=4)
    enc = Encoded(ids=feeds["input_ids"], attention_mask=feeds["attention_mask"], mask_pos=feeds["mask_pos"],
                  labels=np.zeros(5, np.int64), lengths=feeds["attention_mask"].sum(1), n_truncated=0)
    enc.min_seq = man.n_prompt + 1
    prompts = feeds["prompt_embeds"].astype(np.float32)
    verb = feeds["verbalizer_ids"]
    monkeypatch.setattr(engine_mod, "CAST_MIN", 1)  # this model's prompts are small
    monkeypatch.setattr(engine_mod, "_cast", {"session": None, "failed": False})
    e32, e16 = Engine(man, [0, 1], device="cpu", cands_per_call=3), Engine(man_h, [0, 1], device="cpu", cands_per_call=3)
    assert e32.dtype == np.float32 and e16.dtype == np.float16
    for g in (0, 1):
        want = e32.logits(g, prompts, e32.prepare(enc, 2), verb)
        got = e16.logits(g, prompts, e16.prepare(enc, 2), verb)
        np.testing.assert_array_equal(got, want)
    assert engine_mod._cast["session"] is not None  # the host cast ran through ONNX Runtime
    e32.close()
    e16.close()
    # the manifest must say what the graphs take
    import json

    from cliptune_ort.manifest import MANIFEST_NAME, seal_manifest

    data = json.loads((half / MANIFEST_NAME).read_text())
    data["prompt_dtype"] = "float32"
    (half / MANIFEST_NAME).write_text(json.dumps(seal_manifest(data)))
    with pytest.raises(ModelDirError, match=r"takes prompt_embeds as tensor\(float16\), the manifest says float32"):
        Engine(load_manifest(half), [0], device="cpu")
    data["prompt_dtype"] = "float64"
    (half / MANIFEST_NAME).write_text(json.dumps(seal_manifest(data)))
    with pytest.raises(ModelDirError, match="prompt_dtype"):
        load_manifest(half)
    # prompts read by something else than a Cast to float16: refused
    m = onnx.load(str(src / "graph_0.onnx"), load_external_data=False)
    m.graph.node.append(onnx.helper.make_node("Identity", ["prompt_embeds"], ["stray"]))
    with pytest.raises(PackingError, match=r"prompt_embeds is read by \['Cast', 'Identity'\]"):
        prompt_input_fp16(m)
