"""Export: parity with the hook-based masked torch reference, distinct masks, shared weights."""

from __future__ import annotations

import numpy as np
import pytest

from cliptune_ort.engine import Engine
from cliptune_ort.manifest import load_manifest

from .conftest import needs_export, read_json

pytestmark = needs_export


def _inputs(man, pop=2, batch=6, extra=33, seed=3):
    rng = np.random.default_rng(seed)
    L, H = man.n_prompt, man.hidden
    seq = L + extra
    ids = rng.integers(1000, 20000, size=(batch, seq)).astype(np.int64)
    # the contract: [CLS] then the L placeholders in every row
    ids[:, 0] = man.data["tokenizer"]["cls_id"]
    ids[:, 1:L + 1] = man.data["placeholder_ids"]
    lengths = rng.integers(L + 5, seq + 1, size=batch)
    am = (np.arange(seq)[None] < lengths[:, None]).astype(np.int64)
    ids[am == 0] = man.data["tokenizer"]["pad_id"]
    mask_pos = np.array([rng.integers(L + 1, n) for n in lengths], dtype=np.int64)
    prompts = (rng.standard_normal((pop, L, H)) * man.embedding_std).astype(np.float32)
    verb = np.array([2307, 6659, 1045], dtype=np.int64)
    return ids, am, mask_pos, prompts, verb


def _reference(src, man, graph, ids, am, mask_pos, prompts, verb):
    import torch
    from transformers import AutoModelForMaskedLM

    from cliptune_export.exporter import draw_masks
    from cliptune_export.reference import reference_logits
    from cliptune_export.wrapper import ARCHS, dropout_sites

    mlm = AutoModelForMaskedLM.from_pretrained(str(src), attn_implementation="eager").eval()
    arch = ARCHS[mlm.config.model_type]
    g = man.data["graphs"][graph]
    masks = None
    if g["kind"] == "thinned":
        names = [s[0] for s in dropout_sites(mlm, arch)]
        masks = {k: torch.from_numpy(v) for k, v in draw_masks(names, man.hidden, g["p"], g["mask_seed"]).items()}
    t = [torch.from_numpy(x) for x in (ids, am, mask_pos, prompts, verb)]
    return reference_logits(mlm, arch, masks, *t).numpy()


def _ort_logits(man, graph, ids, am, mask_pos, prompts, verb):
    eng = Engine(man, [graph], device="cpu", cands_per_call=1)
    sess = eng.sessions[graph]
    return sess.run(["logits"], {"input_ids": ids, "attention_mask": am, "mask_pos": mask_pos,
                                 "prompt_embeds": prompts, "verbalizer_ids": verb})[0]


@pytest.mark.parametrize("which", ["splade", "roberta"])
def test_every_graph_matches_masked_reference(which, splade_dir, roberta_dir, tiny_roberta_src):
    from .conftest import SPLADE

    model_dir, src = (splade_dir, SPLADE) if which == "splade" else (roberta_dir, tiny_roberta_src)
    man = load_manifest(model_dir)
    inputs = _inputs(man)
    outs = []
    for g in range(man.k + 1):
        assert man.data["graphs"][g]["max_abs_diff"] <= 1e-4  # the export's own check
        got = _ort_logits(man, g, *inputs)  # shapes differ from export and export-check shapes
        ref = _reference(src, man, g, *inputs)
        assert got.shape == (2, 6, 3)
        np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)
        outs.append(got)
    for i in range(len(outs)):
        for j in range(i + 1, len(outs)):
            assert np.max(np.abs(outs[i] - outs[j])) > 1e-3, f"graphs {i} and {j} do not differ"


def test_repeated_calls_are_bit_identical(splade_dir):
    man = load_manifest(splade_dir)
    inputs = _inputs(man, seed=11)
    eng = Engine(man, [0, 1], device="cpu")
    sess = eng.sessions[1]
    feeds = dict(zip(["input_ids", "attention_mask", "mask_pos", "prompt_embeds", "verbalizer_ids"], inputs))
    first = sess.run(["logits"], feeds)[0]
    for _ in range(3):
        assert np.array_equal(sess.run(["logits"], feeds)[0], first)


def test_candidates_are_independent_of_stacking(splade_dir):
    """A candidate's logits do not depend on which other candidates share the call."""
    man = load_manifest(splade_dir)
    ids, am, mp, prompts, verb = _inputs(man, pop=3, seed=5)
    eng = Engine(man, [2], device="cpu")
    s = eng.sessions[2]
    both = s.run(["logits"], {"input_ids": ids, "attention_mask": am, "mask_pos": mp, "prompt_embeds": prompts,
                              "verbalizer_ids": verb})[0]
    one = s.run(["logits"], {"input_ids": ids, "attention_mask": am, "mask_pos": mp, "prompt_embeds": prompts[1:2],
                             "verbalizer_ids": verb})[0]
    np.testing.assert_allclose(both[1], one[0], atol=1e-5)


def test_manifest_and_shared_weights(splade_dir):
    import onnx

    data = read_json(splade_dir / "manifest.json")
    assert data["schema_version"] == 1 and data["k"] == 4 and data["n_prompt"] == 50
    assert data["model"]["model_type"] == "bert" and data["model"]["hidden"] == 128
    assert [g["mask_seed"] for g in data["graphs"]] == [None, 1, 2, 3, 4]
    assert data["placeholder_ids"][0] == 1000 and len(data["placeholder_ids"]) == 50
    assert 0.01 < data["embedding_std"] < 1.0
    names = None
    for g in data["graphs"]:
        m = onnx.load(str(splade_dir / g["file"]), load_external_data=False)
        ext = {i.name for i in m.graph.initializer if i.data_location == onnx.TensorProto.EXTERNAL}
        assert all(e.value == "weights.bin" for i in m.graph.initializer
                   if i.data_location == onnx.TensorProto.EXTERNAL for e in i.external_data if e.key == "location")
        names = ext if names is None else names
        assert ext == names  # every graph references the same shared tensors
        ops = {n.op_type for n in m.graph.node}
        assert "If" not in ops  # no control flow (CUDA graphs refuse it)
    # one copy of the weights: weights.bin is about the model's parameter bytes, not (K+1) times
    size = (splade_dir / "weights.bin").stat().st_size
    assert size < 1.05 * data["model"]["parameters"] * 4
    graph_bytes = sum((splade_dir / g["file"]).stat().st_size for g in data["graphs"])
    assert graph_bytes < 0.1 * size


def test_thinned_masks_have_rate_p(splade_dir):
    from cliptune_export.exporter import draw_masks

    masks = draw_masks([f"s{i}" for i in range(5)], 4096, 0.1, 7)
    vals = np.concatenate(list(masks.values()))
    assert set(np.unique(vals).tolist()) == {0.0, np.float32(1 / 0.9)}
    assert abs(np.mean(vals == 0) - 0.1) < 0.01
    again = draw_masks([f"s{i}" for i in range(5)], 4096, 0.1, 7)
    assert all(np.array_equal(masks[k], again[k]) for k in masks)


def test_shared_prefix_graph_equals_the_unshared_one(splade_dir, tmp_path):
    """The first layer's [CLS] + prompt Q/K/V projected once per candidate (the CPU default) gives the
    same logits as projecting every row, for every candidate of a stacked population."""
    from cliptune_export import ExportOptions, export_model

    from .conftest import SPLADE

    man = load_manifest(splade_dir)
    assert man.shared_prefix == man.n_prompt + 1
    plain_dir = tmp_path / "plain"
    export_model(str(SPLADE), plain_dir, ExportOptions(k=1, p=0.1, seed=0, share_prefix=False))
    plain = load_manifest(plain_dir)
    assert plain.shared_prefix == 0
    inputs = _inputs(plain, pop=3, batch=5, seed=8)
    for g in (0, 1):
        a, b = _ort_logits(man, g, *inputs), _ort_logits(plain, g, *inputs)
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)
        assert len({a[c].tobytes() for c in range(3)}) == 3  # the candidates do differ


def test_rows_with_another_prefix_are_run_apart(splade_dir, tmp_path):
    """Rows that break the shared prefix (a manual run has no placeholders) still get exact logits:
    the engine runs each group of equal prefixes on its own."""
    from cliptune_export import ExportOptions, export_model

    from cliptune_ort.encoding import Encoded

    from .conftest import SPLADE

    man = load_manifest(splade_dir)
    plain_dir = tmp_path / "plain"
    export_model(str(SPLADE), plain_dir, ExportOptions(k=1, p=0.1, seed=0, share_prefix=False))
    plain = load_manifest(plain_dir)
    ids, am, mask_pos, prompts, verb = _inputs(man, pop=2, batch=7, seed=5)
    ids[2, 7] += 1  # row 2: one placeholder differs
    ids[4:6, 3] = 1999  # rows 4 and 5: another shared prefix
    enc = Encoded(ids=ids, attention_mask=am, mask_pos=mask_pos, labels=np.zeros(7, np.int64),
                  lengths=am.sum(1), n_truncated=0)
    enc.min_seq = man.n_prompt + 1
    got, want = (Engine(m, [0], device="cpu") for m in (man, plain))
    fb = got.prepare(enc, n_buckets=2)
    assert sorted(np.concatenate([idx for idx, _ in fb.parts]).tolist()) == list(range(7))
    assert len(fb.parts) == 2 + 1 + 2  # groups {0, 1, 3, 6}, {2}, {4, 5}: 2 buckets, 1, 2
    a = got.logits(0, prompts, fb, verb)
    b = want.logits(0, prompts, want.prepare(enc, n_buckets=2), verb)
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)


@pytest.mark.parametrize(("source", "external_min", "precision"), [
    ("roberta", 4096, "fp32"), ("roberta", 256, "fp32"), ("splade", 512, "fp32"), ("splade", 4096, "int8"),
    ("roberta", 256, "int8")])
def test_thinned_graphs_from_one_trace_equal_tracing_each(tiny_roberta_src, tmp_path, monkeypatch, source,
                                                          external_min, precision):
    """An fp32 export traces graph 0 and one thinned graph (MaskTemplate) and writes every thinned graph from the
    latter with its own masks: the files must be those that tracing every graph gives, byte for byte (the export
    id fixed), with the masks inline (the tiny RoBERTa's hidden 64: 256 bytes) and in weights.bin (a lower
    threshold; splade-tiny, a BERT: hidden 128, 512 bytes); int8 quantises the template once."""
    import uuid

    import cliptune_export.exporter as ex
    from cliptune_export import ExportOptions, export_model

    from .conftest import SPLADE

    src = tiny_roberta_src if source == "roberta" else SPLADE
    hidden = 64 if source == "roberta" else 128

    monkeypatch.setattr(ex, "EXTERNAL_MIN_BYTES", external_min)
    monkeypatch.setattr(ex.uuid, "uuid4", lambda: uuid.UUID(int=7))
    opts = {"k": 3, "p": 0.2, "seed": 5, "n_prompt": 10, "precision": precision}
    calls = []
    real = ex.MaskTemplate.build.__func__
    monkeypatch.setattr(ex.MaskTemplate, "build", classmethod(lambda cls, *a, **k: calls.append(1) or real(cls, *a, **k)))
    export_model(str(src), tmp_path / "template", ExportOptions(**opts))
    assert calls == [1]
    monkeypatch.setattr(ex.MaskTemplate, "build", classmethod(lambda cls, *a, **k: None))
    export_model(str(src), tmp_path / "traced", ExportOptions(**opts))
    files = sorted(p.name for p in (tmp_path / "traced").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "template").iterdir())
    for f in files:
        if f != "manifest.json":
            assert (tmp_path / "template" / f).read_bytes() == (tmp_path / "traced" / f).read_bytes(), f
    a, b = (read_json(tmp_path / d / "manifest.json") for d in ("template", "traced"))
    for m in (a, b):
        for key in ("created_at", "export_seconds", "manifest_sha256"):
            m.pop(key, None)
    assert a == b
    import onnx
    from onnx import numpy_helper

    g1 = onnx.load(str(tmp_path / "template" / "graph_1.onnx"), load_external_data=False).graph.initializer

    def is_mask(t):  # a [hidden] float tensor of 0 and 1/(1-p) only
        if list(t.dims) != [hidden] or t.data_type != onnx.TensorProto.FLOAT:
            return False
        values = set(numpy_helper.to_array(t, base_dir=str(tmp_path / "template")).tolist())
        return values <= {0.0, float(np.float32(1 / 0.8))} and len(values) == 2

    masks = [t for t in g1 if is_mask(t)]
    assert len(masks) == len(a["mask_sites"])  # one per site: the embeddings, two per layer
    outside = {m.data_location == onnx.TensorProto.EXTERNAL for m in masks}
    assert outside == {external_min <= hidden * 4}


def test_a_tag_found_twice_falls_back_to_tracing_every_graph(tiny_roberta_src, tmp_path, monkeypatch, capsys):
    """Where a tag mask is not found exactly once in the traced template (here: a second copy of one added), the
    export says so and traces every graph: the same files as the plain traced path."""
    import uuid

    import cliptune_export.exporter as ex
    from cliptune_export import ExportOptions, export_model

    monkeypatch.setattr(ex.uuid, "uuid4", lambda: uuid.UUID(int=7))
    real = ex._Template.converted

    def doubled(path, *a, **k):
        model = real(path, *a, **k)
        if path.name == "mask_template.onnx":
            first = next(t for t in model.graph.initializer if list(t.dims) == [64] and t.data_type == 1
                         and len({t.raw_data[i:i + 4] for i in range(0, len(t.raw_data), 4)}) > 2)
            twin = model.graph.initializer.add()
            twin.CopyFrom(first)
            twin.name = first.name + "_twin"
        return model

    monkeypatch.setattr(ex._Template, "converted", staticmethod(doubled))
    opts = {"k": 2, "p": 0.2, "seed": 5, "n_prompt": 10}
    export_model(str(tiny_roberta_src), tmp_path / "fallback", ExportOptions(**opts))
    assert "found 2 times in the traced graph (expected once); tracing every graph instead" in capsys.readouterr().err
    monkeypatch.setattr(ex.MaskTemplate, "build", classmethod(lambda cls, *a, **k: None))
    export_model(str(tiny_roberta_src), tmp_path / "traced", ExportOptions(**opts))
    for f in ("graph_0.onnx", "graph_1.onnx", "graph_2.onnx", "weights.bin"):
        assert (tmp_path / "fallback" / f).read_bytes() == (tmp_path / "traced" / f).read_bytes(), f
