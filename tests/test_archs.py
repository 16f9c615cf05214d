"""RoBERTa's relatives (XLM-RoBERTa, CamemBERT): the same modules under other class names, with SentencePiece
tokenizers. No such checkpoint is on this machine, so each is a tiny random model with a SentencePiece (Unigram)
tokenizer trained here on the vendored SST-2 texts; the export's own parity check (atol 1e-4 against the masked
PyTorch reference) runs on it, and a short tune reads its texts through that tokenizer."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest

from cliptune_ort.manifest import load_manifest

from .conftest import ROOT, contract_inputs, needs_export

pytestmark = needs_export

SPECIALS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]


def _sentencepiece_model(out, arch: str):
    """A tiny random ``arch`` masked LM with a Unigram tokenizer trained on SST-2's training texts."""
    import torch
    from tokenizers import SentencePieceUnigramTokenizer
    from transformers import (
        CamembertConfig,
        CamembertForMaskedLM,
        CamembertTokenizerFast,
        XLMRobertaConfig,
        XLMRobertaForMaskedLM,
        XLMRobertaTokenizerFast,
    )

    classes = {"xlm-roberta": (XLMRobertaConfig, XLMRobertaForMaskedLM, XLMRobertaTokenizerFast),
               "camembert": (CamembertConfig, CamembertForMaskedLM, CamembertTokenizerFast)}
    config_cls, model_cls, tok_cls = classes[arch]
    with gzip.open(ROOT / "cliptune_ort" / "assets" / "data" / "sst2" / "train.jsonl.gz", "rt") as f:
        texts = [json.loads(line)["text"] for line in f][:4000]
    sp = SentencePieceUnigramTokenizer()
    sp.train_from_iterator(texts, vocab_size=2000, special_tokens=SPECIALS, unk_token="<unk>", show_progress=False)
    tok = tok_cls(tokenizer_object=sp, bos_token="<s>", eos_token="</s>", cls_token="<s>", sep_token="</s>",
                  pad_token="<pad>", unk_token="<unk>", mask_token="<mask>")
    tok.save_pretrained(out)
    cfg = config_cls(vocab_size=len(tok), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=128, max_position_embeddings=130, pad_token_id=tok.pad_token_id,
                     bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, type_vocab_size=1)
    torch.manual_seed(0)
    model_cls(cfg).save_pretrained(out)
    return out


@pytest.fixture(scope="module", params=["xlm-roberta", "camembert"])
def sp_export(request, tmp_path_factory):
    from cliptune_export import ExportOptions, export_model

    src = _sentencepiece_model(tmp_path_factory.mktemp(request.param), request.param)
    out = tmp_path_factory.mktemp("export") / request.param
    man = export_model(str(src), out, ExportOptions(k=1, p=0.2, seed=3, n_prompt=10))
    return request.param, src, out, man


def test_export_matches_the_masked_reference(sp_export):
    arch, _, _, man = sp_export
    assert man["model"]["model_type"] == arch
    assert man["model"]["max_positions"] == 130 - 2  # RoBERTa's positions start after the padding id (1)
    assert all(g["max_abs_diff"] <= 1e-4 for g in man["graphs"]), [g["max_abs_diff"] for g in man["graphs"]]
    assert man["tokenizer"]["cls_id"] == 0 and man["tokenizer"]["mask_id"] == 4 and man["tokenizer"]["pad_id"] == 1


def test_graphs_against_the_wrapper_in_torch(sp_export):
    """Graph 0 on fresh contract inputs against the export's torch wrapper (a second shape, a second seed)."""
    import torch
    from cliptune_export.wrapper import ARCHS, ContractModel
    from transformers import AutoModelForMaskedLM

    from cliptune_ort.engine import Engine

    arch, src, out, _ = sp_export
    man = load_manifest(out)
    feeds = contract_inputs(man, seed=11)
    vocab = man.data["model"]["vocab"]  # 2,000: the helper draws text ids up to 20,000
    ids = feeds["input_ids"]
    ids[ids >= vocab] = len(SPECIALS) + ids[ids >= vocab] % (vocab - len(SPECIALS))
    feeds["verbalizer_ids"] = np.array([7, 900, vocab - 1], dtype=np.int64)
    got = Engine(man, [0], device="cpu", cands_per_call=1).sessions[0].run(["logits"], feeds)[0]
    mlm = AutoModelForMaskedLM.from_pretrained(str(src), attn_implementation="eager").eval()
    with torch.inference_mode():
        ref = ContractModel(mlm, ARCHS[arch], None).eval()(*(torch.from_numpy(feeds[n]) for n in (
            "input_ids", "attention_mask", "mask_pos", "prompt_embeds", "verbalizer_ids"))).numpy()
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)


def test_a_tune_reads_texts_through_the_sentencepiece_tokenizer(sp_export, tmp_path):
    """The SST-2 template and verbalizer through the SentencePiece tokenizer: the rendered rows hold the
    tokenizer's own ids for the text, and a short bbt run tunes and evaluates."""
    from tokenizers import Tokenizer

    from cliptune_ort.config import build_config
    from cliptune_ort.tuner import tune

    _, _, out, _ = sp_export
    from cliptune_ort.data import Example
    from cliptune_ort.encoding import PromptTokenizer

    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    assert tok.encode("great", add_special_tokens=False).tokens == ["\u2581great"]
    man = load_manifest(out).data
    pt = PromptTokenizer(out / "tokenizer.json", man["tokenizer"], 10, man["placeholder_ids"], 128)
    ids, mask_pos, _ = pt.render("<P> {text} it was [MASK] .", Example("a great film", 1))
    enc = [tok.encode(t, add_special_tokens=False).ids for t in (" a great film", "it was", ".")]
    assert ids == [0, *man["placeholder_ids"], *enc[0], *enc[1], 4, *enc[2], 2]  # <s> ... <mask> . </s>
    assert ids[mask_pos] == 4 and 3 not in ids, [tok.id_to_token(i) for i in ids]  # no <unk>
    cfg = build_config(task="sst2", method="bbt", budget=16, popsize=4, d=10, eval_every=8, plot=False)
    res = tune(cfg, tmp_path / "run", model_dir=out, progress=False)
    assert res["calls"] == 16 and 0.0 <= res["test"]["metric"] <= 1.0
    assert res["model_dir"] == str(out.resolve())
    rows = json.loads((tmp_path / "run" / "config.json").read_text())["resolved_model_dir"]
    assert rows == str(out.resolve())


def test_deployed_classifier_reads_the_sentencepiece_vocabulary(sp_export, tmp_path):
    """A tuned run deployed as a standalone classifier: its probabilities equal the run's own predictions
    (graph 0 with the prompt input) on SST-2 test sentences, through the SentencePiece tokenizer."""
    from cliptune_export.deploy import deploy_run

    from cliptune_ort.config import build_config
    from cliptune_ort.deploy import DeployedClassifier
    from cliptune_ort.predict import predict
    from cliptune_ort.tuner import tune

    _, _, out, _ = sp_export
    run = tmp_path / "run"
    tune(build_config(task="sst2", method="bbt", budget=8, popsize=4, d=10, eval_every=4, plot=False), run,
         model_dir=out, progress=False)
    deploy_run(run, tmp_path / "clf.onnx")
    texts = ["a gripping , beautiful film", "dull and far too long", "it was neither good nor bad"]
    got = DeployedClassifier(tmp_path / "clf.onnx").predict_proba(texts)
    ref = np.array([list(r["probs"].values()) for r in predict(run, texts)])  # label-id order, 6 decimals
    np.testing.assert_allclose(got, ref, atol=1e-5, rtol=0)

