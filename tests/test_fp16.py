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
