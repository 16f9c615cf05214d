"""Deployed classifiers (`cliptune deploy`): parity with the tuning runtime, int8, the consumer path.

Parity is measured on all 872 SST-2 test examples against the run's graph_0.onnx with the prompt
input, fed by the tuning runtime itself (tuner.prepare -> Engine.logits), on identical tokenisations.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from cliptune_ort.config import build_config
from cliptune_ort.errors import ConfigError, DataError, IntegrityError
from cliptune_ort.tuner import prepare, tune

from .conftest import ROOT, needs_export

pytestmark = needs_export

EXAMPLE = ROOT / "examples" / "classify.py"


@pytest.fixture(scope="module")
def run_dir(splade_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("deploy") / "run"
    tune(build_config(task="sst2", method="bbt", budget=40, popsize=4, d=20, eval_every=20, plot=False), out,
         model_dir=splade_dir, progress=False)
    return out


@pytest.fixture(scope="module")
def deployed(run_dir):
    from cliptune_export.deploy import DeployOptions, deploy_run

    out = run_dir.parent / "clf.onnx"
    meta = deploy_run(run_dir, out, DeployOptions(check_split="test"))
    return out, meta


@pytest.fixture(scope="module")
def deployed_int8(run_dir):
    from cliptune_export.deploy import DeployOptions, deploy_run

    out = run_dir.parent / "clf_int8.onnx"
    meta = deploy_run(run_dir, out, DeployOptions(int8=True, check_split="dev"))
    return out, meta


@pytest.fixture(scope="module")
def runtime(run_dir, splade_dir):
    """The tuning runtime on the run: (workspace, probs [872, labels] of graph_0 + prompt on test)."""
    cfg = build_config(**{k: v for k, v in json.loads((run_dir / "config.json").read_text()).items()
                          if k not in ("resolved_model_dir", "loss_used")})
    ws = prepare(cfg, splade_dir)
    prompt = np.load(run_dir / "best_prompt.npy")[None].astype(np.float32)
    logits = ws.engine.logits(0, prompt, ws.test, ws.verbalizer_ids)[0]
    e = np.exp(logits - logits.max(-1, keepdims=True))
    yield ws, e / e.sum(-1, keepdims=True)
    ws.engine.close()


def _test_texts(ws):
    return [ex.text for ex in ws.fewshot.test]


def test_graph_contract_and_sidecar(deployed):
    import onnxruntime as ort

    out, meta = deployed
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["input_ids", "attention_mask"]
    assert [o.name for o in sess.get_outputs()] == ["probs", "logits"]
    assert not list(out.parent.glob(out.name + ".data")), "weights must be inlined"
    side = json.loads(out.with_suffix(".json").read_text())
    assert side == meta
    assert side["task"] == "sst2" and side["label_names"] == ["negative", "positive"]
    assert side["template"] == "<P> . {text} . It was [MASK] ."
    assert side["plain_template"] == ". {text} . It was [MASK] ."
    assert side["mask_select"] == "last" and side["n_prompt"] == 50 and side["max_input_tokens"] == 462
    assert side["onnx"]["sha256"] and side["onnx"]["bytes"] == out.stat().st_size
    # only the verbalizer head is left: no vocabulary-sized decoder bias, the word embeddings once
    import onnx

    m = onnx.load(str(out))
    sizes = sorted((int(np.prod(t.dims)) for t in m.graph.initializer), reverse=True)
    assert sizes.count(30522 * 128) == 1 and 30522 not in sizes and sizes[1] < 30522 * 128
    assert 17e6 < out.stat().st_size < 19e6


def test_parity_on_sst2_test_split(deployed, runtime):
    """Same predictions and probabilities (atol 1e-5) as graph_0 + prompt input, all 872 test rows."""
    from cliptune_ort.deploy import DeployedClassifier

    out, meta = deployed
    ws, ref = runtime
    clf = DeployedClassifier(out)
    texts = _test_texts(ws)
    assert len(texts) == 872
    # identical tokenisation: the runtime's rows minus the L placeholder columns
    L = ws.manifest.n_prompt
    enc = ws.test.enc
    for i, t in enumerate(texts):
        row = enc.ids[i, : enc.lengths[i]].tolist()
        assert row[1:L + 1] == ws.manifest.data["placeholder_ids"]
        assert clf.render(t) == row[:1] + row[L + 1:], i
    for bs in (1, 64, 872):  # batch composition and padding do not matter
        got = clf.predict_proba(texts, batch_size=bs)
        assert np.max(np.abs(got - ref)) <= 1e-5
        assert np.array_equal(got.argmax(1), ref.argmax(1))
    assert meta["check"]["split"] == "test" and meta["check"]["n"] == 872
    assert meta["check"]["max_abs_prob_diff"] <= 1e-5 and meta["check"]["prediction_agreement"] == 1.0
    # the accuracy the run reports is the deployed classifier's too
    acc = float(np.mean(got.argmax(1) == ws.test.labels))
    res = json.loads((out.parent / "run" / "result.json").read_text())
    assert acc == pytest.approx(res["test"]["metric"], abs=1e-12)


def test_whole_string_tokenisation_matches_runtime_on_sst2(deployed, runtime):
    """The README example tokenises the whole rendered string: same ids on every SST-2 test row."""
    from tokenizers import Tokenizer

    from cliptune_ort.deploy import DeployedClassifier

    out, meta = deployed
    ws, _ = runtime
    clf = DeployedClassifier(out)
    tok = Tokenizer.from_str(meta["tokenizer_json"])
    texts = _test_texts(ws)
    whole = [e.ids for e in tok.encode_batch([meta["plain_template"].replace("{text}", t.strip()) for t in texts])]
    for i, t in enumerate(texts):
        row = clf.render(t)
        assert whole[i][: len(row)] == row and not any(whole[i][len(row):]), i


def test_example_script_runs_and_agrees(deployed):
    from cliptune_ort.deploy import predict_deployed

    out, _ = deployed
    texts = ["a gripping, beautiful film", "dull and tedious", "it is neither good nor bad"]
    r = subprocess.run([sys.executable, str(EXAMPLE), str(out), *texts], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    lines = [x.split("\t") for x in r.stdout.strip().splitlines()]
    want = predict_deployed(out, texts)
    assert [x[0] for x in lines] == [w["label_name"] for w in want]
    assert [x[2] for x in lines] == texts
    for x, w in zip(lines, want):
        assert float(x[1]) == pytest.approx(max(w["probs"].values()), abs=1e-3)
    body = [x for x in EXAMPLE.read_text().splitlines() if x.strip()]
    assert len(body) < 15
    assert EXAMPLE.read_text() in (ROOT / "README.md").read_text(), "README's example must be examples/classify.py"


GUARD = textwrap.dedent("""
    import runpy, sys
    class _Block:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("torch", "transformers", "onnx", "cliptune_export"):
                raise ImportError("blocked at run time: " + name)
            return None
    sys.meta_path.insert(0, _Block())
    if sys.argv[1] == "--script":
        sys.argv = sys.argv[2:]
        runpy.run_path(sys.argv[0], run_name="__main__")
        rc = 0
    else:
        from cliptune_ort.cli import main
        rc = main(sys.argv[1:])
    assert not {"torch", "transformers", "onnx", "cliptune_export"} & set(sys.modules), sys.modules.keys()
    sys.exit(rc)
""")


def test_consumer_needs_no_torch_and_no_onnx(deployed):
    out, _ = deployed
    r = subprocess.run([sys.executable, "-c", GUARD, "predict", str(out), "--text", "a wonderful film"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    row = json.loads(r.stdout)
    assert row["label_name"] in ("negative", "positive") and abs(sum(row["probs"].values()) - 1) < 1e-5
    r = subprocess.run([sys.executable, "-c", GUARD, "--script", str(EXAMPLE), str(out), "a wonderful film"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split("\t")[0] == row["label_name"]
    r = subprocess.run([sys.executable, "-c", GUARD.replace("from cliptune_ort.cli import main", "import onnx"),
                        "x"], capture_output=True, text=True)
    assert r.returncode != 0 and "blocked at run time" in r.stderr


def test_cli_predict_matches_run_dir(deployed, run_dir):
    from cliptune_ort.cli import main
    from cliptune_ort.predict import predict

    out, _ = deployed
    texts = ["a gripping, beautiful film", "dull and tedious", "this [MASK] of a film was great"]
    a = predict(out, texts)
    b = predict(run_dir, texts, device="cpu")
    for x, y in zip(a, b):
        assert x["label"] == y["label"]
        for k in x["probs"]:
            assert x["probs"][k] == pytest.approx(y["probs"][k], abs=2e-6)
    assert main(["predict", str(out), "--text", texts[0]]) == 0


def test_int8_agreement_and_size(deployed, deployed_int8, runtime):
    from cliptune_ort.deploy import DeployedClassifier

    (out, _meta), (out8, meta8) = deployed, deployed_int8
    ws, _ = runtime
    assert meta8["onnx"]["precision"] == "int8" and meta8["check"]["split"] == "dev"
    assert meta8["onnx"]["int8_weights"] == "int7"  # full-range int8 agreed 0.65 on an AVX2 CPU without VNNI
    assert out8.stat().st_size < 0.35 * out.stat().st_size
    texts = _test_texts(ws)
    p32 = DeployedClassifier(out).predict_proba(texts)
    p8 = DeployedClassifier(out8).predict_proba(texts)
    agree = float(np.mean(p32.argmax(1) == p8.argmax(1)))
    assert agree >= 0.9, agree  # measured 0.98 on this tiny run; quantisation is not exact
    assert 0 < np.max(np.abs(p32 - p8)) < 0.2


def test_int8_deploy_saturation_warning(deployed_int8, tmp_path, monkeypatch):
    """A classifier deployed with full-range int8 weights (or before the format was recorded) warns on a CPU
    whose ONNX Runtime kernels saturate them; the default (int7) does not."""
    import warnings

    from cliptune_ort import sessions
    from cliptune_ort.deploy import DeployedClassifier

    out8, _meta8 = deployed_int8
    old = tmp_path / "old.onnx"
    shutil.copy(out8, old)
    side = json.loads(out8.with_suffix(".json").read_text())
    del side["onnx"]["int8_weights"]
    old.with_suffix(".json").write_text(json.dumps(side))
    monkeypatch.setattr(sessions, "cpu_flags", lambda: {"avx2", "fma"})
    with pytest.warns(RuntimeWarning, match="full-range int8 weights.*--int8-weights int7"):
        DeployedClassifier(old)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        DeployedClassifier(out8)


def test_mask_location_rules(deployed, run_dir):
    """The template's [MASK] is the last mask id for sst2; a row without one gets NaN."""
    from cliptune_export.deploy import mask_select, plain_template

    from cliptune_ort.deploy import DeployedClassifier

    assert mask_select("<P> . {text} . It was [MASK] .") == "last"
    assert mask_select("<P> [ Category: [MASK] ] {text}") == "first"
    assert mask_select("<P> . {text} ? [MASK] , {text_b}") == "only"
    assert plain_template("<P> . [MASK] News: {text}") == ". [MASK] News: {text}"
    out, meta = deployed
    clf = DeployedClassifier(out)
    ids, am = clf.encode(["a fine film", "bad"])
    probs, logits = clf.run(ids, am)
    assert np.all(np.isfinite(probs)) and np.allclose(probs.sum(1), 1, atol=1e-6)
    no_mask = np.where(ids == meta["special_ids"]["mask_id"], 1012, ids)  # '.' instead of [MASK]
    probs, _ = clf.run(no_mask, am)
    assert np.all(np.isnan(probs))


def test_deploy_errors(splade_dir, run_dir, deployed, tmp_path):
    from cliptune_export.deploy import DeployOptions, deploy_run

    from cliptune_ort.cli import main
    from cliptune_ort.deploy import DeployedClassifier, predict_deployed

    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    shutil.copy(run_dir / "config.json", unfinished / "config.json")
    with pytest.raises(ConfigError, match="no best_prompt.npy"):
        deploy_run(unfinished, tmp_path / "a.onnx")
    manual = tmp_path / "manual"
    tune(build_config(task="sst2", method="manual", plot=False), manual, model_dir=splade_dir, progress=False)
    with pytest.raises(ConfigError, match="manual"):
        deploy_run(manual, tmp_path / "a.onnx")
    with pytest.raises(ConfigError, match="no config.json"):
        deploy_run(tmp_path / "nowhere", tmp_path / "a.onnx")
    with pytest.raises(ConfigError, match="must end in .onnx"):
        deploy_run(run_dir, tmp_path / "a.bin")
    out, _ = deployed
    with pytest.raises(ConfigError, match="--overwrite"):
        deploy_run(run_dir, out, DeployOptions(check_split=None))
    # consumer side
    lone = tmp_path / "lone.onnx"
    shutil.copy(out, lone)
    with pytest.raises(ConfigError, match="no sidecar"):
        predict_deployed(lone, ["x"])
    side = json.loads(out.with_suffix(".json").read_text())
    side["deploy_id"] = "0" * 32
    lone.with_suffix(".json").write_text(json.dumps(side))
    with pytest.raises(IntegrityError, match="different deploys"):
        DeployedClassifier(lone)
    with pytest.raises(ConfigError, match="single texts"):
        predict_deployed(out, ["x"], ["y"])
    # CLI: one line, exit 2
    assert main(["deploy", str(manual), "--out", str(tmp_path / "m.onnx")]) == 2
    assert main(["predict", str(lone), "--text", "x"]) == 2


def test_cli_deploy(run_dir, tmp_path, capsys):
    from cliptune_ort.cli import main

    out = tmp_path / "c.onnx"
    assert main(["deploy", str(run_dir), "--out", str(out), "--check-split", "dev"]) == 0
    line = json.loads(capsys.readouterr().out)
    assert line["check"]["n"] == 32 and line["check"]["prediction_agreement"] == 1.0
    assert line["check"]["max_abs_prob_diff"] <= 1e-5
    assert out.is_file() and out.with_suffix(".json").is_file()


def test_pair_task_deploy(splade_dir, tmp_path):
    """RTE: two texts, the mask between them ('only'); a text holding the mask token is refused."""
    from cliptune_export.deploy import DeployOptions, deploy_run

    from cliptune_ort.deploy import DeployedClassifier
    from cliptune_ort.predict import predict

    run = tmp_path / "rte"
    tune(build_config(task="rte", method="bbt", budget=8, popsize=4, d=10, eval_every=8, plot=False), run,
         model_dir=splade_dir, progress=False)
    out = tmp_path / "rte.onnx"
    meta = deploy_run(run, out, DeployOptions(check_split="test"))
    assert meta["mask_select"] == "only" and meta["pair"] and meta["check"]["n"] == 277
    assert meta["check"]["max_abs_prob_diff"] <= 1e-5 and meta["check"]["prediction_agreement"] == 1.0
    a, b = ["The cat sat on the mat.", "Paris is in France."], ["A cat sat.", "Paris is in Germany."]
    got = predict(out, a, b)
    want = predict(run, a, b, device="cpu")
    assert [g["label"] for g in got] == [w["label"] for w in want]
    clf = DeployedClassifier(out)
    with pytest.raises(ConfigError, match="text-b"):
        clf.predict(a)
    with pytest.raises(DataError, match="mask token"):
        clf.predict_proba(["one [MASK] two"], ["three"])
