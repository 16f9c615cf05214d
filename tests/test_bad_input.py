"""Bad input, everywhere it enters, gets one line on stderr and exit status 2, and leaves nothing behind.

One table: CLI arguments, config files, data files, model dirs (manifest, graphs, weights, tokenizer),
export sources, run dirs and checkpoints, a NaN loss. Every case runs ``cliptune`` in-process and checks:

- the exit status (2; 130 is never a bad-input answer),
- stderr: exactly one ``cliptune: error: ...`` line that contains the expected text (export progress
  lines ``[export] ...`` may precede it; nothing else may: no traceback, no warning),
- no partial output: a run dir / export dir that did not exist is not created, and one that existed is
  left byte for byte as it was (the NaN case keeps its run dir on purpose: the candidate is saved there).

``CLIPTUNE_BAD_INPUT_REPORT=path.jsonl`` appends every case's id and message to a file (for release notes).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

from cliptune_ort.cli import main
from cliptune_ort.fileio import sha256_file

from .conftest import SPLADE, needs_export

pytestmark = needs_export

SMALL = ["--budget", "20", "--popsize", "10", "--d", "20", "--k", "2", "--eval-every", "10", "--quiet"]


@dataclass
class Ctx:
    tmp: Path
    model: Path  # the pristine splade export (never modified)
    monkeypatch: pytest.MonkeyPatch
    out: Path = field(init=False)  # the run dir / export dir the command is given

    def __post_init__(self):
        self.out = self.tmp / "out"

    def tune(self, *args: str, model: Path | None = None) -> list[str]:
        return ["tune", "--model-dir", str(model or self.model), "--out", str(self.out), *SMALL, *args]

    def model_copy(self) -> Path:
        d = self.tmp / "model"
        if not d.exists():
            shutil.copytree(self.model, d)
        return d

    def manifest(self, d: Path) -> dict:
        return json.loads((d / "manifest.json").read_text())

    def write_manifest(self, d: Path, man: dict) -> None:
        """Write a hand-edited manifest without its seal (an unsealed manifest still loads, so the deeper
        check under test is the one that must fire; sealed edits are covered in test_tamper.py)."""
        from cliptune_ort.manifest import CHECKSUM_FIELD

        man = {k: v for k, v in man.items() if k != CHECKSUM_FIELD}
        (d / "manifest.json").write_text(json.dumps(man, indent=1))

    def repin(self, d: Path, entry: str) -> None:
        """Re-pin one file's sha256 in the manifest (``graph_1.onnx``, ``weights.bin``, ``tokenizer.json``):
        what a user does who edits the manifest by hand to make a changed file load."""
        man = self.manifest(d)
        sha = sha256_file(d / entry)
        if entry == "weights.bin":
            man["weights"]["sha256"] = sha
        elif entry == "tokenizer.json":
            man["tokenizer"]["sha256"] = sha
        else:
            next(g for g in man["graphs"] if g["file"] == entry)["sha256"] = sha
        self.write_manifest(d, man)

    def data(self, train: list | bytes | None = None, test: list | bytes | None = None) -> Path:
        """A data dir with an sst2 folder: train.jsonl.gz (rows or raw bytes) and validation.jsonl."""
        root = self.tmp / "data"
        (root / "sst2").mkdir(parents=True, exist_ok=True)
        good = [{"text": f"a {'fine' if i % 2 else 'dull'} film number {i}", "label": i % 2} for i in range(80)]
        train = good if train is None else train
        test = good[:10] if test is None else test
        raw = train if isinstance(train, bytes) else "".join(json.dumps(r) + "\n" for r in train).encode()
        (root / "sst2" / "train.jsonl.gz").write_bytes(gzip.compress(raw))
        traw = test if isinstance(test, bytes) else "".join(json.dumps(r) + "\n" for r in test).encode()
        (root / "sst2" / "validation.jsonl").write_bytes(traw)
        return root

    def config_file(self, content: str | bytes) -> Path:
        p = self.tmp / "settings.json"
        p.write_bytes(content.encode() if isinstance(content, str) else content)
        return p


CASES: dict[str, Callable[[Ctx], tuple[list[str], str]]] = {}
KEEPS_OUTPUT = {"nan_loss"}  # cases that write their evidence into the run dir on purpose


def case(fn):
    CASES[fn.__name__] = fn
    return fn


# ------------------------------------------------------------------ CLI arguments


@case
def unknown_task(c):
    return c.tune("--task", "sst5"), "unknown task 'sst5': expected one of ag_news, dbpedia, mrpc, rte, snli, sst2"


@case
def budget_negative(c):
    return c.tune("--budget", "-5"), "budget must be > 0 and finite, got -5"


@case
def budget_not_a_number(c):
    return c.tune("--budget", "abc"), "argument --budget: invalid int value: 'abc'"


@case
def method_not_a_choice(c):
    return c.tune("--method", "lora"), "argument --method: invalid choice: 'lora'"


@case
def no_command(c):
    return [], "the following arguments are required: cmd"


@case
def popsize_one(c):
    return c.tune("--popsize", "1", "--budget", "20"), "popsize must be >= 2 (CMA-ES needs a population), got 1"


@case
def popsize_two_at_d_500(c):  # pycma's two-point step-size adaptation (d >= 300) failed in tell with a traceback
    return c.tune("--popsize", "2", "--d", "500"), "popsize 2 is too small for CMA-ES at d = 500"


@case
def p_out_of_range(c):
    return c.tune("--p", "1.5"), "p must be in (0, 1), got 1.5"


@case
def sigma0_nan(c):
    return c.tune("--sigma0", "nan"), "sigma0 must be > 0 and finite, got nan"


@case
def seed_negative(c):
    return c.tune("--seed", "-1"), "seed must be >= 0 and finite, got -1"


@case
def budget_below_one_generation(c):
    return c.tune("--budget", "5"), "budget (5) must be at least one generation (popsize 10)"


@case
def k_zero(c):
    return c.tune("--k", "0"), "k must be > 0 and finite, got 0"


@case
def k_above_export(c):
    return c.tune("--k", "9"), "k=9 thinned networks asked for, but"


@case
def resume_and_overwrite(c):
    return c.tune("--resume", "--overwrite"), "--resume and --overwrite contradict each other"


@case
def out_is_a_file(c):
    c.out.write_text("not a folder")
    return c.tune(), f"run dir {c.out} is a file, expected a folder: pass another --out"


@case
def template_without_mask(c):
    return c.tune("--template", "<P> {text} ."), "[MASK]"


@case
def verbalizer_word_count(c):
    return c.tune("--verbalizer", "bad,good,great"), "verbalizer 'bad,good,great' has 3 words, task sst2 has 2 labels"


@case
def verbalizer_multi_token(c):
    return c.tune("--verbalizer", "bad,unbelievableness"), "verbalizer word 'unbelievableness' is"


@case
def max_len_too_small(c):
    return c.tune("--max-len", "20"), "more than max_len 20: shorten the template or lower --n-prompt"


@case
def max_len_above_model(c):
    return c.tune("--max-len", "100000"), "max_len 100000 is more than the model's 512 positions: pass --max-len 512"


# ------------------------------------------------------------------ config files


@case
def config_missing(c):
    return c.tune("--config", str(c.tmp / "nope.json")), "does not exist: pass an existing JSON file to --config"


@case
def config_not_json(c):
    return c.tune("--config", str(c.config_file("{budget: 20"))), "is not valid JSON"


@case
def config_not_utf8(c):
    return c.tune("--config", str(c.config_file(b'{"task": "sst2\xff"}'))), "is not UTF-8 text"


@case
def config_is_a_list(c):
    return c.tune("--config", str(c.config_file("[1, 2]"))), "must hold a JSON object of settings, got list"


@case
def config_is_a_folder(c):
    (c.tmp / "cfgdir").mkdir()
    return c.tune("--config", str(c.tmp / "cfgdir")), "is a folder: pass a JSON file to --config"


@case
def config_unknown_key(c):
    return c.tune("--config", str(c.config_file('{"popsze": 20}'))), "unknown setting(s) popsze"


@case
def config_bad_choice(c):
    return c.tune("--config", str(c.config_file('{"mixture": "median"}'))), \
        "mixture must be one of mean_loss, mean_logits, assign, got 'median'"


@case
def config_wrong_type(c):
    return c.tune("--config", str(c.config_file('{"n_buckets": "ten"}'))), "n_buckets must be an integer, got 'ten'"


@case
def config_null_value(c):
    return c.tune("--config", str(c.config_file('{"task": null}'))), "task must be a string, got None"


@case
def config_fractional_int(c):
    return c.tune("--config", str(c.config_file('{"eval_chunk": 2.5}'))), "eval_chunk must be an integer, got 2.5"


# ------------------------------------------------------------------ data files


@case
def data_dir_missing(c):
    return c.tune("--data-dir", str(c.tmp / "nodata")), "not found; expected a folder with one sub-folder per task"


@case
def data_task_folder_missing(c):
    (c.tmp / "data").mkdir()
    return c.tune("--data-dir", str(c.tmp / "data")), "expected the sst2 data in <data-dir>/sst2/"


@case
def data_empty_train_split(c):
    return c.tune("--data-dir", str(c.data(train=b""))), "expected JSON Lines rows, found an empty file"


@case
def data_empty_test_split(c):
    return c.tune("--data-dir", str(c.data(test=b""))), \
        "validation.jsonl: expected JSON Lines rows, found an empty file"


@case
def data_missing_text_field(c):
    rows = [{"label": i % 2} for i in range(80)]
    return c.tune("--data-dir", str(c.data(train=rows))), \
        "train.jsonl.gz:1: expected a string 'text' field, found no 'text' field"


@case
def data_label_out_of_range(c):
    rows = [{"text": "x", "label": 5}]
    return c.tune("--data-dir", str(c.data(test=rows))), "validation.jsonl:1: expected a label in 0..1, found 5"


@case
def data_label_not_an_int(c):
    rows = [{"text": "x", "label": 1.0}]  # a label name is taken (its id), a float is not
    return c.tune("--data-dir", str(c.data(test=rows))), ("expected an int 'label' field, found label 1.0; labels "
                                                          "must be integer class ids or one of the label names "
                                                          "['negative', 'positive']")


@case
def data_label_not_a_label_name(c):
    rows = [{"text": "x", "label": "pos"}]
    return c.tune("--data-dir", str(c.data(test=rows))), ("validation.jsonl:1: expected a label id or one of the label "
                                                          "names ['negative', 'positive'], found 'pos'")


@case
def task_file_without_a_verbalizer(c):
    f = c.tmp / "mine.json"
    f.write_text('{"template": "<P> {text} [MASK]", "train": "t.jsonl"}', encoding="utf-8")
    return c.tune("--task", str(f)), "mine.json: missing key(s) ['verbalizer']; a task file needs a template"


@case
def data_not_utf8(c):
    return c.tune("--data-dir", str(c.data(test=b'{"text": "caf\xe9", "label": 1}\n'))), \
        "validation.jsonl:1: expected UTF-8 text, found invalid byte(s) b'\\xe9'; re-encode the file as UTF-8"


@case
def data_invalid_json_line(c):
    return c.tune("--data-dir", str(c.data(test=b'{"text": "a", "label": 1}\n{"text": \n'))), \
        "validation.jsonl:2: expected one JSON object per line, found invalid JSON"


@case
def data_row_not_an_object(c):
    return c.tune("--data-dir", str(c.data(test=b'["a", 1]\n'))), "expected a JSON object per line, found a JSON list"


@case
def data_too_few_per_label(c):
    rows = [{"text": f"t{i}", "label": 0 if i < 70 else 1} for i in range(80)]
    return c.tune("--data-dir", str(c.data(train=rows))), \
        "expected at least 32 examples of every label (16 train + 16 dev), found {1: 10}"


@case
def data_corrupt_gzip(c):
    root = c.data()
    gz = root / "sst2" / "train.jsonl.gz"
    gz.write_bytes(gz.read_bytes()[:40])
    return c.tune("--data-dir", str(root)), "expected a gzip-compressed JSON Lines file, found a corrupt or truncated"


@case
def data_hub_offline(c):
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "HTTPS_PROXY", "https_proxy",
                "ALL_PROXY", "all_proxy"):
        c.monkeypatch.delenv(var, raising=False)
    c.monkeypatch.setenv("HF_ENDPOINT", "https://hub.nonexistent.invalid")  # .invalid never resolves
    return c.tune("--data-source", "hub"), "--data-source hub: the Hugging Face hub is not reachable (cannot resolve"


# ------------------------------------------------------------------ model dirs (tune side)


@case
def model_dir_missing(c):
    return c.tune(model=c.tmp / "nope"), "does not exist: run `cliptune export MODEL --out"


@case
def model_dir_is_a_file(c):
    (c.tmp / "m.onnx").write_bytes(b"\0")
    return c.tune(model=c.tmp / "m.onnx"), "is a file: expected the folder written by `cliptune export"


@case
def model_dir_no_manifest(c):
    d = c.model_copy()
    (d / "manifest.json").unlink()
    return c.tune(model=d), "has no manifest.json: expected a folder written by `cliptune export`"


@case
def manifest_not_json(c):
    d = c.model_copy()
    (d / "manifest.json").write_text('{"schema_version": 1,')
    return c.tune(model=d), "manifest.json is not valid JSON"


@case
def manifest_newer_schema(c):
    d = c.model_copy()
    c.write_manifest(d, {**c.manifest(d), "schema_version": 99})
    return c.tune(model=d), "has schema_version 99, newer than this cliptune-ort reads (1): upgrade cliptune-ort"


@case
def manifest_unknown_schema(c):
    d = c.model_copy()
    c.write_manifest(d, {**c.manifest(d), "schema_version": 0})
    return c.tune(model=d), "has unknown schema_version 0, expected 1..1"


@case
def manifest_schema_not_int(c):
    d = c.model_copy()
    c.write_manifest(d, {**c.manifest(d), "schema_version": "1"})
    return c.tune(model=d), "has schema_version '1', expected an integer"


@case
def manifest_incomplete(c):
    d = c.model_copy()
    man = c.manifest(d)
    del man["embedding_std"], man["placeholder_ids"]
    c.write_manifest(d, man)
    return c.tune(model=d), "lacks placeholder_ids, embedding_std: the manifest is incomplete"


@case
def manifest_wrong_field_type(c):
    d = c.model_copy()
    man = c.manifest(d)
    man["model"]["hidden"] = "128"
    c.write_manifest(d, man)
    return c.tune(model=d), "field model.hidden is '128', expected a positive integer"


@case
def manifest_shared_prefix_out_of_range(c):
    d = c.model_copy()
    man = c.manifest(d)
    man["shared_prefix"] = man["n_prompt"] + 2
    c.write_manifest(d, man)
    return c.tune(model=d), "field shared_prefix is 52, expected an integer in 0..51 (n_prompt + 1)"


@case
def manifest_path_outside_dir(c):
    d = c.model_copy()
    man = c.manifest(d)
    man["graphs"][1]["file"] = "../graph_1.onnx"
    c.write_manifest(d, man)
    return c.tune(model=d), "the graph 1 file name '../graph_1.onnx' is not a plain file name inside the model dir"


@case
def manifest_edited_after_export(c):
    from cliptune_ort.manifest import seal_manifest

    d = c.model_copy()
    man = seal_manifest(c.manifest(d))
    man["embedding_std"] *= 2
    (d / "manifest.json").write_text(json.dumps(man, indent=1))  # sealed, then edited by hand
    return c.tune(model=d), "was edited after export (its manifest_sha256 does not match its content)"


@case
def graph_file_missing(c):
    d = c.model_copy()
    (d / "graph_2.onnx").unlink()
    return c.tune(model=d), "is incomplete: graph 2 file graph_2.onnx is missing; copy the whole folder or re-export"


@case
def graph_truncated(c):
    d = c.model_copy()
    g = d / "graph_1.onnx"
    g.write_bytes(g.read_bytes()[: g.stat().st_size // 2])
    return c.tune(model=d), "graph_1.onnx has sha256"


@case
def graph_truncated_and_repinned(c):
    d = c.model_copy()
    g = d / "graph_1.onnx"
    g.write_bytes(g.read_bytes()[: g.stat().st_size // 2])
    c.repin(d, "graph_1.onnx")
    return c.tune(model=d), "ONNX Runtime cannot load"


@case
def graph_wrong_inputs(c):
    import onnx
    from onnx import TensorProto, helper

    d = c.model_copy()
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [x], [y])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(d / "graph_1.onnx"))
    c.repin(d, "graph_1.onnx")
    return c.tune(model=d), ("graph_1.onnx has inputs ['x'] and outputs ['y']; expected inputs ['attention_mask', "
                             "'input_ids', 'mask_pos', 'prompt_embeds', 'verbalizer_ids'] and output ['logits']")


@case
def graph_from_another_export(c):
    import onnx

    d = c.model_copy()
    m = onnx.load(str(d / "graph_1.onnx"), load_external_data=False)
    for p in m.metadata_props:
        if p.key == "cliptune.export_id":
            p.value = "0" * 32
    (d / "graph_1.onnx").write_bytes(m.SerializeToString())
    c.repin(d, "graph_1.onnx")
    return c.tune(model=d), f"graph_1.onnx comes from export {'0' * 32} as graph 1, the manifest expects export"


@case
def weights_truncated(c):
    d = c.model_copy()
    w = d / "weights.bin"
    w.write_bytes(w.read_bytes()[:1000])
    return c.tune(model=d), "weights.bin has sha256"


@case
def tokenizer_changed(c):
    d = c.model_copy()
    tok = json.loads((d / "tokenizer.json").read_text())
    tok["model"]["vocab"]["great"], tok["model"]["vocab"]["bad"] = tok["model"]["vocab"]["bad"], \
        tok["model"]["vocab"]["great"]
    (d / "tokenizer.json").write_text(json.dumps(tok))
    return c.tune(model=d), "tokenizer.json has sha256"


def _word_level_tokenizer(path: Path, n: int) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])}
    vocab.update({f"w{i}": i + 5 for i in range(n - 5)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
    tok.save(str(path))


@case
def tokenizer_of_another_model(c):
    d = c.model_copy()
    _word_level_tokenizer(d / "tokenizer.json", 30522)  # as many tokens, special tokens at ids 0..4, not 101..103
    c.repin(d, "tokenizer.json")
    return c.tune(model=d), "the manifest's cls_id 101 is 'w96' in this tokenizer, expected one of its special tokens"


@case
def tokenizer_empty_default(c):
    d = c.model_copy()
    _word_level_tokenizer(d / "tokenizer.json", 5)  # what transformers makes for a folder without tokenizer files
    c.repin(d, "tokenizer.json")
    return c.tune(model=d), "tokenizer.json has 5 tokens, the model's vocabulary has 30522: the tokenizer belongs"


@case
def tokenizer_larger_than_model(c):
    d = c.model_copy()
    _word_level_tokenizer(d / "tokenizer.json", 40000)
    c.repin(d, "tokenizer.json")
    return c.tune(model=d), "tokenizer.json has 40000 tokens, the model's vocabulary has 30522"


# ------------------------------------------------------------------ run dirs and checkpoints


def _settings_of(c: Ctx, *args: str):
    from cliptune_ort.config import build_config

    settings = dict(task="sst2", budget=20, popsize=10, d=20, k=2, eval_every=10, model_dir=str(c.model))
    return build_config(**{**settings, **dict(zip(args[::2], args[1::2]))})


@case
def run_dir_holds_a_run(c):
    c.out.mkdir()
    (c.out / "config.json").write_text(json.dumps(_settings_of(c).to_dict()))
    return c.tune(), "already holds a run: pass --resume to continue it, --overwrite to start over, or another --out"


@case
def resume_other_settings(c):
    c.out.mkdir()
    (c.out / "config.json").write_text(json.dumps(_settings_of(c, "budget", 30).to_dict()))
    return c.tune("--resume"), "was started with other settings (budget 30, now 20) per its config.json"


def _checkpoint(c: Ctx, **changes):
    from cliptune_ort.manifest import load_manifest
    from cliptune_ort.tuner import CKPT_FORMAT, CKPT_VERSION, save_checkpoint

    cfg = _settings_of(c)
    state = {"format": CKPT_FORMAT, "version": CKPT_VERSION, "run_key": cfg.run_key(),
             "model": load_manifest(c.model, verify=False).fingerprint(), "generation": 0, "calls": 0,
             "forward_passes": 0, "elapsed": 0.0, "fitness": [], "digests": [], "best_fit": None, "best_z": None,
             "best_dev": None, "best_dev_z": None, "best_dev_calls": None, "evals": [], "next_eval": 10, **changes}
    c.out.mkdir(exist_ok=True)
    (c.out / "config.json").write_text(json.dumps(cfg.to_dict()))
    save_checkpoint(c.out, state)


@case
def resume_other_model(c):
    _checkpoint(c, model={"export_id": "f" * 32, "weights_sha256": "0" * 64, "graphs": []})
    return c.tune("--resume"), f"was started on another model export (export {'f' * 32}, now"


@case
def resume_corrupt_checkpoints(c):
    _checkpoint(c)
    (c.out / "checkpoint.json").write_text('{"format": "cliptune-checkpoint", "gener')
    return c.tune("--resume"), "checkpoint.json is corrupt or truncated (checksum or JSON check failed) and no valid"


@case
def resume_newer_checkpoint(c):
    _checkpoint(c, version=2)
    return c.tune("--resume"), "has checkpoint version 2, this cliptune-ort reads version 1"


@case
def nan_loss(c):
    import cliptune_ort.tuner as tuner

    real = tuner.score
    calls = {"n": 0}

    def score(ws, prompts):
        fit = real(ws, prompts)
        calls["n"] += 1
        if calls["n"] == 2:  # the second generation goes bad
            fit[3] = np.nan
        return fit

    c.monkeypatch.setattr(tuner, "score", score)
    return c.tune(), "expected a finite loss, found nan for candidate 3 of generation 1"


@case
def eval_not_a_run_dir(c):
    c.out.mkdir()
    return ["eval", str(c.out)], "has no config.json: expected a run dir written by `cliptune tune`"


@case
def eval_unfinished_run(c):
    c.out.mkdir()
    (c.out / "config.json").write_text(json.dumps(_settings_of(c).to_dict()))
    return ["eval", str(c.out)], "has no best_prompt.npy: the run has not finished; resume it first"


# ------------------------------------------------------------------ export sources (cliptune export)


def _export(c: Ctx, model: str | Path, *args: str) -> list[str]:
    return ["export", str(model), "--out", str(c.out), *args]


@case
def export_path_missing(c):
    return _export(c, c.tmp / "no" / "such-model"), "does not exist: expected a local Hugging Face masked-LM folder"


@case
def export_model_is_a_file(c):
    (c.tmp / "model.bin").write_bytes(b"\0")
    return _export(c, c.tmp / "model.bin"), "is a file: expected a Hugging Face model folder or hub id"


@case
def export_folder_without_config(c):
    (c.tmp / "src").mkdir()
    return _export(c, c.tmp / "src"), "has no config.json: expected a Hugging Face masked-LM folder"


@case
def export_config_not_json(c):
    (c.tmp / "src").mkdir()
    (c.tmp / "src" / "config.json").write_text("{")
    return _export(c, c.tmp / "src"), "config.json is not readable JSON"


@case
def export_causal_lm(c):
    (c.tmp / "src").mkdir()
    (c.tmp / "src" / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    return _export(c, c.tmp / "src"), \
        "holds a GPT2LMHeadModel (config.json architectures), expected a masked language model"


@case
def export_unsupported_model_type(c):
    (c.tmp / "src").mkdir()
    (c.tmp / "src" / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    shutil.copy(SPLADE / "tokenizer.json", c.tmp / "src")
    return _export(c, c.tmp / "src"), "model_type 'gpt2' is not supported: expected one of ['bert', 'camembert', 'roberta', 'xlm-roberta']"


@case
def export_encoder_without_mlm_head(c):
    from transformers import BertConfig, BertModel

    src = c.tmp / "src"
    BertModel(BertConfig(vocab_size=200, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32)).save_pretrained(src)
    return _export(c, src), \
        "holds a BertModel (config.json architectures), expected a masked language model with its MLM head"


@case
def export_missing_weights(c):
    src = c.tmp / "src"
    src.mkdir()
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(SPLADE / f, src)
    return _export(c, src), "cannot load masked-LM weights from"


@case
def export_missing_tokenizer(c):
    src = c.tmp / "src"
    src.mkdir()
    for f in ("config.json", "model.safetensors"):
        shutil.copy(SPLADE / f, src)
    return _export(c, src), "has no tokenizer files (tokenizer.json, or vocab.txt / vocab.json + merges.txt)"


@case
def export_out_is_a_file(c):
    c.out.write_text("x")
    return _export(c, SPLADE), "is a file, expected a folder for the model dir"


@case
def export_out_not_empty(c):
    c.out.mkdir()
    (c.out / "keep.txt").write_text("mine")
    return _export(c, SPLADE), "exists and is not empty: pass --overwrite or another --out"


@case
def export_k_negative(c):
    return _export(c, SPLADE, "--k", "-1"), "--k must be an integer >= 0"


@case
def export_p_out_of_range(c):
    return _export(c, SPLADE, "--p", "1.5"), "--p must be in (0, 1) (dropout rate), got 1.5"


@case
def export_n_prompt_zero(c):
    return _export(c, SPLADE, "--n-prompt", "0"), "--n-prompt must be an integer >= 1"


# ------------------------------------------------------------------ the table


def _snapshot(path: Path) -> dict[str, str] | None:
    if not path.exists():
        return None
    if path.is_file():
        return {"": hashlib.sha256(path.read_bytes()).hexdigest()}
    return {str(p.relative_to(path)): (hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir")
            for p in sorted(path.rglob("*"))}


def _is_progress(line: str) -> bool:
    return line.startswith("[export]") or "Loading weights" in line


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input(name, splade_dir, tmp_path, capsys, monkeypatch):
    c = Ctx(tmp_path, splade_dir, monkeypatch)
    args, expected = CASES[name](c)
    before = _snapshot(c.out)
    model_before = _snapshot(splade_dir) if name.startswith(("model", "manifest")) else None
    capsys.readouterr()
    try:
        rc = main(args)
    except SystemExit as e:  # argparse's errors (what the console script does with main's return value too)
        rc = e.code
    err = capsys.readouterr().err
    lines = [ln for ln in err.replace("\r", "\n").splitlines() if ln.strip() and not _is_progress(ln)]
    report = os.environ.get("CLIPTUNE_BAD_INPUT_REPORT")
    if report:
        with open(report, "a", encoding="utf-8") as f:
            f.write(json.dumps({"case": name, "args": args[:1], "rc": rc, "message": lines}) + "\n")
    assert rc == 2, err
    assert len(lines) == 1, err
    assert lines[0].startswith("cliptune: error: "), err
    assert expected in lines[0], lines[0]
    assert "Traceback" not in err
    if name in KEEPS_OUTPUT:
        return
    assert _snapshot(c.out) == before, f"{c.out} changed: partial output left behind"
    if model_before is not None:
        assert _snapshot(splade_dir) == model_before


def test_at_least_thirty_cases():
    assert len(CASES) >= 30


def test_nan_candidate_is_saved(splade_dir, tmp_path, capsys, monkeypatch):
    """NaN stops the run before CMA-ES sees it; the candidate is saved and the last checkpoint kept."""
    c = Ctx(tmp_path, splade_dir, monkeypatch)
    args, _ = nan_loss(c)
    assert main([*args, "--checkpoint-every", "1"]) == 2
    saved = json.loads((c.out / "nan_candidate.json").read_text())
    assert saved["generation"] == 1 and saved["index"] == 3 and saved["fitness"] == "nan"
    assert len(saved["z"]) == 20 and all(np.isfinite(saved["z"]))
    assert saved["all_fitness"][3] == "nan" and sum(f == "nan" for f in saved["all_fitness"]) == 1
    ck = json.loads((c.out / "checkpoint.json").read_text())
    assert ck["generation"] == 1 and all(np.isfinite(ck["fitness"][0]))  # generation 0 only, no NaN told
    assert not (c.out / "result.json").exists()


def test_overwrite_with_bad_input_keeps_the_old_run(splade_dir, tmp_path, capsys):
    """--overwrite deletes the old run only once the new run's inputs have been checked."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text("{}")
    (out / "checkpoint.json").write_text("{}")
    (out / "notes.txt").write_text("mine")
    before = _snapshot(out)
    rc = main(["tune", "--model-dir", str(tmp_path / "missing"), "--out", str(out), "--overwrite", *SMALL])
    assert rc == 2 and _snapshot(out) == before
    rc = main(["tune", "--model-dir", str(splade_dir), "--out", str(out), "--overwrite", *SMALL, "--method",
               "manual"])
    assert rc == 0
    assert (out / "notes.txt").read_text() == "mine"  # --overwrite deletes run files only
    assert not (out / "checkpoint.json").exists() and (out / "result.json").is_file()


def test_extremely_long_texts_are_truncated(splade_dir, tmp_path, capsys, monkeypatch):
    """A 62,000-character text (~8,000 tokens) is cut to the model's limit (only the text: prompt, template and
    mask stay)."""
    c = Ctx(tmp_path, splade_dir, monkeypatch)
    long = "an extraordinarily long review " * 2000
    train = [{"text": long if i % 7 == 0 else f"a {'fine' if i % 2 else 'dull'} film {i}", "label": i % 2}
             for i in range(80)]
    root = c.data(train=train, test=[{"text": long, "label": 1}, {"text": "ok", "label": 0}])
    rc = main(c.tune("--data-dir", str(root), "--budget", "20", "--eval-every", "20"))
    assert rc == 0, capsys.readouterr().err
    res = json.loads((c.out / "result.json").read_text())
    assert res["calls"] == 20 and res["test"]["n"] == 2 and np.isfinite(res["train"]["loss"])


def test_hub_errors_of_any_type_become_data_errors(monkeypatch):
    """datasets/httpx raise types that are not OSError; each is one DataError line."""
    datasets = pytest.importorskip("datasets")
    from cliptune_ort.data import load_hub_split
    from cliptune_ort.errors import DataError

    class ConnectError(Exception):  # like httpx.ConnectError: not an OSError
        pass

    def offline(*a, **k):
        raise ConnectError("[Errno -2] Name or service not known")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError, match="could not be loaded \\(ConnectError: \\[Errno -2\\]"):
        load_hub_split("sst2", "train")


def test_second_interrupt_and_os_errors_are_one_line(tmp_path, capsys, monkeypatch):
    """KeyboardInterrupt (a second Ctrl-C) exits 130 with the resume command; an OSError (disk full) exits 2."""
    import cliptune_ort.cli as cli

    def interrupted(a):
        raise KeyboardInterrupt

    def disk_full(a):
        raise OSError(28, "No space left on device", str(tmp_path / "run" / "checkpoint.json"))

    monkeypatch.setattr(cli, "cmd_tune", interrupted)
    assert main(["tune", "--out", str(tmp_path / "run")]) == 130
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"Resume with: cliptune tune --resume --out {tmp_path / 'run'}" in err
    monkeypatch.setattr(cli, "cmd_tune", disk_full)
    assert main(["tune", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("cliptune: error: No space left on device (")


def test_torn_history_line(tmp_path):
    """A kill mid-append leaves a torn last line: readers skip it, the next append cuts it off."""
    from cliptune_ort.fileio import append_line, read_jsonl_lines

    h = tmp_path / "history.jsonl"
    append_line(h, json.dumps({"calls": 10}))
    with open(h, "a") as f:
        f.write('{"calls": 2')  # torn
    assert read_jsonl_lines(h) == [{"calls": 10}]
    append_line(h, json.dumps({"calls": 20}))
    assert read_jsonl_lines(h) == [{"calls": 10}, {"calls": 20}]
    assert h.read_text() == '{"calls": 10}\n{"calls": 20}\n'
    h.write_text('{"calls": 10}\n{"calls": 2\n{"calls": 30}\n')  # a bad line in the middle is not a kill
    with pytest.raises(ValueError, match="history.jsonl:2: expected one JSON value per line"):
        read_jsonl_lines(h)
