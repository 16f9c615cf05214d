"""Your own task: a task file (*.json) in place of a built-in task name."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from cliptune_ort.config import build_config
from cliptune_ort.data import load_fewshot, read_jsonl
from cliptune_ort.errors import ConfigError, DataError, TaskError
from cliptune_ort.tasks import get_task, load_task_file, task_file_sha256

from .conftest import ROOT, needs_export

SST2 = ROOT / "cliptune_ort" / "assets" / "data" / "sst2"
EXAMPLE = ROOT / "examples" / "support_topics" / "task.json"


def write(path: Path, obj) -> Path:
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj), encoding="utf-8")
    return path


def sst2_copy(folder: Path, **extra) -> Path:
    """A task file that is the built-in sst2, spelled out (its data files through relative paths)."""
    sst = get_task("sst2")
    rel = Path(os.path.relpath(SST2.resolve(), folder.resolve()))  # relative to the task file: ../../.../sst2
    return write(folder / "mysst.json", {"name": "mysst", "template": sst.template, "verbalizer": list(sst.verbalizer),
                                          "label_names": list(sst.label_names), "train": str(rel / sst.local_train),
                                          "test": str(SST2 / sst.local_test), **extra})


def rows(path: Path, items) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in items), encoding="utf-8")
    return path


def test_defaults_and_what_the_spec_holds(tmp_path):
    f = write(tmp_path / "reviews.json", {"template": "<P> {text} It was [MASK] .", "verbalizer": ["bad", "good"],
                                          "train": "data/train.jsonl"})
    spec = load_task_file(f)
    assert spec.name == "reviews" and spec.label_names == ("bad", "good") and spec.verbalizer == ("bad", "good")
    assert spec.loss == "ce" and spec.metric == "acc" and not spec.pair and spec.fewshot == "sample"
    assert spec.local_dir == str(tmp_path.resolve()) and spec.local_train == str(Path("data") / "train.jsonl")
    assert spec.local_test is None and "add \"test\"" in spec.test_note and spec.source_file == str(f.resolve())
    pair = write(tmp_path / "pairs.json", {"template": "<P> {text} ? [MASK] , {text_b}", "verbalizer": ["No", "Yes"],
                                           "train": "t.jsonl", "dev": "d.jsonl", "loss": "hinge", "metric": "f1"})
    ps = get_task(str(pair))  # get_task reads a *.json name as a task file
    assert ps.pair and ps.fewshot == "given" and ps.local_dev == "d.jsonl" and ps.metric == "f1"


BAD = [
    ("not json {", "invalid JSON"),
    ([1, 2], "found a JSON list"),
    ({"template": "<P> {text} [MASK]", "verbalizer": ["a", "b"]}, "missing key(s) ['train']"),
    ({"template": "<P> {text} [MASK]", "verbalizer": ["a", "b"], "train": "t", "labels": 2}, "unknown key(s) ['labels']"),
    ({"template": "<P> {text} [MASK]", "verbalizer": "a,b", "train": "t"}, "'verbalizer' must be a list"),
    ({"template": "<P> {text} [MASK]", "verbalizer": ["a", "a"], "train": "t"}, "repeated entries"),
    ({"template": "<P> {text} [MASK]", "verbalizer": ["a"], "train": "t"}, "one verbalizer word per label (>= 2)"),
    ({"template": "<P> {text} [MASK]", "verbalizer": ["a", "b"], "label_names": ["x"], "train": "t"},
     "found 2 words for 1 labels"),
    ({"template": "<P> {text}", "verbalizer": ["a", "b"], "train": "t"}, "'[MASK]' exactly once"),
    ({"template": "{text} <P> [MASK]", "verbalizer": ["a", "b"], "train": "t"}, "must start with <P>"),
    ({"template": "<P> {text} [MASK]", "verbalizer": ["a", "b", "c"], "train": "t", "metric": "f1"}, "binary F1"),
    ({"template": "<P> {text} [MASK]", "verbalizer": ["a", "b"], "train": "t", "loss": "mse"}, "'loss' must be one of"),
    ({"template": "<P> {text} [MASK]", "verbalizer": ["a", "b"], "train": "t", "name": "sst2"}, "not a built-in"),
    ({"template": "<P> {text} [MASK]", "verbalizer": ["a", "b"], "train": "t", "name": "a b"}, "name 'a b'"),
    ({"template": "<P> {text} [MASK]", "verbalizer": ["a", "b"], "train": ""}, "'train' must be a non-empty string"),
    ({"template": "<P> {text} [MASK]", "verbalizer": ["a", "b"], "train": "t", "description": 3}, "'description' must"),
    ({"template": "<P> {text} [MASK] {text_b}", "verbalizer": ["a", "b"], "train": "t", "hub_path": "glue"},
     "needs 'hub_text_b'"),
]


@pytest.mark.parametrize("content, expected", BAD)
def test_a_bad_task_file_is_one_line_naming_it(tmp_path, content, expected):
    f = write(tmp_path / "task.json", content)
    with pytest.raises(TaskError) as e:
        load_task_file(f)
    msg = str(e.value)
    assert expected in msg and str(f) in msg and "\n" not in msg and "cliptune_ort/tasks.py" not in msg
    with pytest.raises(ConfigError, match="task file"):  # through the config: the same line, as a ConfigError
        build_config(task=str(f))


def test_missing_task_file(tmp_path):
    with pytest.raises(ConfigError, match=r"task file .*nope\.json not found"):
        build_config(task=str(tmp_path / "nope.json"))
    with pytest.raises(ConfigError, match=r"or the path of a task file"):
        build_config(task="sst3")


def test_a_task_file_copy_of_sst2_gives_the_same_split(tmp_path):
    f = sst2_copy(tmp_path)
    a, b = load_fewshot("sst2", 13), load_fewshot(str(f), 13)
    assert a.train == b.train and a.dev == b.dev and a.test == b.test
    assert b.info["task"] == "mysst" and b.info["train_indices"] == a.info["train_indices"]
    assert b.info["train_source"] == str((SST2 / "train.jsonl.gz").resolve())  # whole, normalised
    with pytest.raises(ConfigError, match="data_dir does not apply"):
        build_config(task=str(f), data_dir=str(tmp_path))
    with pytest.raises(DataError, match="names no hub dataset"):
        load_fewshot(str(f), 13, source="hub")


def test_label_names_in_the_data_and_given_splits(tmp_path):
    rows(tmp_path / "train.jsonl", [{"text": "t1", "label": "pos"}, {"text": "t2", "label": 0},
                                    {"text": "t3", "label": "neg"}])
    rows(tmp_path / "dev.jsonl", [{"text": "d1", "label": "neg"}, {"text": "d2", "label": "pos"}])
    f = write(tmp_path / "t.json", {"template": "<P> {text} [MASK]", "verbalizer": ["bad", "good"],
                                    "label_names": ["neg", "pos"], "train": "train.jsonl", "dev": "dev.jsonl"})
    fs = load_fewshot(str(f), 0, per_class=16)  # given: used whole, per_class does not apply
    assert [(e.text, e.label) for e in fs.train] == [("t1", 1), ("t2", 0), ("t3", 0)]
    assert [(e.text, e.label) for e in fs.dev] == [("d1", 0), ("d2", 1)]
    assert fs.info["fewshot"] == "given" and fs.info["train_counts"] == [2, 1] and fs.test is None
    rows(tmp_path / "dev.jsonl", [{"text": "d1", "label": "neg"}])
    with pytest.raises(DataError, match=r"dev\.jsonl: expected at least one dev example of every label, found \[1, 0\]"):
        load_fewshot(str(f), 0)
    rows(tmp_path / "dev.jsonl", [{"text": "d1", "label": "neg"}, {"text": "d2", "label": "positive"}])
    with pytest.raises(DataError, match=r"dev\.jsonl:2: expected a label id or one of the label names"):
        load_fewshot(str(f), 0)
    # the built-in tasks' readers take names too, and keep refusing what is neither
    assert read_jsonl(tmp_path / "train.jsonl", n_labels=2, label_names=("neg", "pos"))[0]["label"] == 1
    with pytest.raises(DataError, match="expected an int 'label' field"):
        read_jsonl(tmp_path / "train.jsonl", n_labels=2)


def test_the_config_keeps_an_absolute_path_and_the_file_digest(tmp_path, monkeypatch):
    f = sst2_copy(tmp_path)
    monkeypatch.chdir(tmp_path)
    cfg = build_config(task="mysst.json")
    assert cfg.task == str(f.resolve())
    key = cfg.run_key()
    assert key["task_file_sha256"] == task_file_sha256(f) and "task_file_sha256" not in build_config().run_key()
    sst2_copy(tmp_path, description="changed")
    assert cfg.run_key()["task_file_sha256"] != key["task_file_sha256"]


@needs_export
def test_tune_eval_predict_deploy_on_a_task_file(splade_dir, tmp_path, capsys):
    """A task file that spells out sst2 tunes to the same prompt as sst2 itself; the run's files and commands take
    the task's name; a changed task file is refused on resume and on use."""
    from cliptune_ort.cli import main

    f = sst2_copy(tmp_path)
    common = ["--model-dir", str(splade_dir), "--budget", "40", "--popsize", "4", "--d", "20", "--eval-every", "20",
              "--method", "bbt", "--quiet"]
    own, ref = tmp_path / "own", tmp_path / "ref"
    assert main(["tune", "--task", str(f), "--out", str(own), *common]) == 0
    assert main(["tune", "--task", "sst2", "--out", str(ref), *common]) == 0
    capsys.readouterr()
    a, b = (json.loads((d / "result.json").read_text()) for d in (own, ref))
    assert a["task"] == "mysst" and a["task_file"] == str(f.resolve()) and b["task_file"] is None
    assert a["dev"] == b["dev"] and a["test"] == b["test"] and a["best_train_fitness"] == b["best_train_fitness"]
    assert np.array_equal(np.load(own / "best_prompt.npy"), np.load(ref / "best_prompt.npy"))
    assert json.loads((own / "config.json").read_text())["task_file_sha256"] == task_file_sha256(f)
    # a resume with nothing changed returns the run; eval and predict work from the run dir
    assert main(["tune", "--resume", "--out", str(own), "--quiet"]) == 0
    assert main(["eval", str(own), "--split", "dev"]) == 0
    ev = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert ev["metric"] == a["dev"]["metric"]
    assert main(["predict", str(own), "--text", "a fine film"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["label_name"] in ("negative", "positive")
    # the task file changes: the prompt was tuned for the old one
    sst2_copy(tmp_path, verbalizer=["awful", "great"])
    (own / "result.json").unlink()
    assert main(["tune", "--resume", "--out", str(own), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "task_file_sha256" in err and "--force-resume" in err
    assert main(["predict", str(own), "--text", "x"]) == 2
    assert "has changed since run" in capsys.readouterr().err
    f.unlink()
    assert main(["eval", str(own)]) == 2
    assert "not found" in capsys.readouterr().err


@needs_export
def test_the_example_task_runs(splade_dir, tmp_path, monkeypatch, capsys):
    """examples/support_topics: label names in its files, its own train and dev files, the default run dir named
    after the task."""
    from cliptune_ort.cli import main

    spec = load_task_file(EXAMPLE)
    fs = load_fewshot(spec, 42)
    assert fs.info["fewshot"] == "given" and fs.info["train_counts"] == [8, 8, 8] and fs.info["test_counts"] == [12] * 3
    monkeypatch.chdir(tmp_path)
    assert main(["tune", "--task", str(EXAMPLE), "--model-dir", str(splade_dir), "--method", "clip", "--k", "2",
                 "--budget", "24", "--popsize", "4", "--d", "20", "--eval-every", "12", "--quiet"]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    run = tmp_path / "runs" / "support_topics_clip_seed42"
    assert line["run_dir"] == str(Path("runs") / "support_topics_clip_seed42") and run.is_dir()
    res = json.loads((run / "result.json").read_text())
    assert res["calls"] == 24 and res["test"]["n"] == 36 and 0.0 <= res["test"]["metric"] <= 1.0
    assert res["fewshot"]["dev_counts"] == [8, 8, 8]


@pytest.mark.parametrize("train, expected", [
    ("", "found an empty file; fix the file"),
    ('{"text": "a", "label": 0}\n{"text": "b", "label": 1}\n',
     'add examples, lower --per-class, or give the task file a "dev" file'),
    (None, "data file not found; expected a JSON Lines file there (fix its path in the task file: paths are relative"),
])
def test_data_errors_of_a_task_file_speak_of_its_files(tmp_path, train, expected):
    """The vendored data's hints (restore from SHA256SUMS, pass --data-dir) do not fit a user's own files."""
    if train is not None:
        (tmp_path / "train.jsonl").write_text(train, encoding="utf-8")
    f = write(tmp_path / "t.json", {"template": "<P> {text} [MASK]", "verbalizer": ["bad", "good"],
                                    "train": "train.jsonl"})
    with pytest.raises(DataError) as e:
        load_fewshot(str(f), 0)
    assert expected in str(e.value) and "SHA256SUMS" not in str(e.value) and "--data-dir" not in str(e.value)


@needs_export
def test_per_class_flag_draws_that_many(splade_dir, tmp_path, capsys):
    from cliptune_ort.cli import main

    rows(tmp_path / "train.jsonl", [{"text": f"text number {i}", "label": ("neg", "pos")[i % 2]} for i in range(10)])
    f = write(tmp_path / "t.json", {"template": "<P> {text} It was [MASK] .", "verbalizer": ["bad", "great"],
                                    "label_names": ["neg", "pos"], "train": "train.jsonl"})
    run = tmp_path / "run"
    args = ["tune", "--task", str(f), "--model-dir", str(splade_dir), "--method", "bbt", "--budget", "8",
            "--popsize", "4", "--d", "10", "--eval-every", "4", "--out", str(run), "--quiet"]
    assert main([*args, "--per-class", "3"]) == 2  # 5 of each label: 3 + 3 do not fit
    assert "expected at least 6 examples of every label" in capsys.readouterr().err
    assert main([*args, "--per-class", "2"]) == 0
    fs = json.loads((run / "result.json").read_text())["fewshot"]
    assert fs["per_class"] == 2 and fs["train_counts"] == [2, 2] and fs["dev_counts"] == [2, 2]
    assert not set(fs["train_indices"]) & set(fs["dev_indices"])
    (run / "result.json").unlink()
    assert main(["tune", "--resume", "--out", str(run), "--per-class", "1", "--quiet"]) == 2  # defines the run
    assert "per_class 2, now 1" in capsys.readouterr().err


def test_tasks_lists_the_built_ins(capsys):
    from cliptune_ort.cli import main
    from cliptune_ort.tasks import TASKS

    assert main(["tasks"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.strip().splitlines()]
    assert [x["task"] for x in lines] == list(TASKS)
    for x in lines:
        spec = TASKS[x["task"]]
        assert x["labels"] == list(spec.label_names) and x["verbalizer"] == list(spec.verbalizer)
        assert x["template"] == spec.template and x["fewshot"] == spec.fewshot and x["task_file"] is None


def test_tasks_stops_quietly_when_its_reader_goes(monkeypatch, capsys):
    """`cliptune tasks | head -1`: no error line when the pipe closes."""
    import sys

    from cliptune_ort.cli import main

    class Closed:
        def write(self, _):
            raise BrokenPipeError(32, "Broken pipe")

        def flush(self):
            raise BrokenPipeError(32, "Broken pipe")

        def fileno(self):
            raise OSError("no descriptor")

    monkeypatch.setattr(sys, "stdout", Closed())
    assert main(["tasks"]) == 141
    assert capsys.readouterr().err == ""


@needs_export
def test_tasks_checks_a_task_as_the_run_sees_it(splade_dir, capsys):
    """`cliptune tasks NAME|FILE`: the split, verbalizer ids and token lengths it reports are the run's own."""
    from cliptune_ort.cli import main
    from cliptune_ort.tuner import prepare

    assert main(["tasks", str(EXAMPLE), "sst2", "--model-dir", str(splade_dir)]) == 0
    own, sst = (json.loads(x) for x in capsys.readouterr().out.strip().splitlines())
    assert own["task"] == "support_topics" and own["split"] == "given" and own["per_class"] is None
    assert own["verbalizer_tokens"] == ["delivery", "payment", "account"] and own["test"]["per_label"] == [12] * 3
    assert own["first_train_example"] == ("[CLS] <P> x 50 customer message : my parcel was supposed to arrive on "
                                          "monday and it is still not here . topic : [MASK] . [SEP]")
    assert sst["split"] == "sampled" and sst["per_class"] == 16 and sst["train_source"] == "sst2/train.jsonl.gz"
    for got, task in ((own, str(EXAMPLE)), (sst, "sst2")):
        ws = prepare(build_config(task=task, method="bbt"), splade_dir)
        try:
            assert got["verbalizer_ids"] == ws.verbalizer_ids.tolist()
            for name in ("train", "dev", "test"):
                enc = getattr(ws, name).enc
                assert got[name]["rows"] == len(enc) and got[name]["tokens_max"] == int(enc.lengths.max())
                assert got[name]["per_label"] == np.bincount(enc.labels).tolist()
                assert got[name]["tokens_mean"] == round(float(enc.lengths.mean()), 1)
        finally:
            ws.engine.close()
    assert main(["tasks", "sst2", "--verbalizer", "bad,wonderfully", "--model-dir", str(splade_dir)]) == 2
    assert "verbalizer word 'wonderfully' is 2 tokens" in capsys.readouterr().err


def test_a_task_file_can_name_a_hub_dataset(tmp_path, monkeypatch):
    """hub_* keys: the same hub loader as the built-ins (datasets.load_dataset faked: no network here)."""
    from cliptune_ort.data import load_hub_split

    from .test_data import _fake_hub

    calls = _fake_hub(monkeypatch, {
        ("me/reviews", "en", "train"): ({"review": ["fine", "awful"], "label": [1, 0]}, ("neg", "pos")),
        ("me/reviews", "en", "holdout"): ({"review": ["meh"], "label": [0]}, ("neg", "pos")),
    })
    f = write(tmp_path / "r.json", {"template": "<P> {text} It was [MASK] .", "verbalizer": ["bad", "great"],
                                    "label_names": ["neg", "pos"], "train": "train.jsonl", "hub_path": "me/reviews",
                                    "hub_config": "en", "hub_text": "review", "hub_test_split": "holdout"})
    spec = load_task_file(f)
    assert [(e.text, e.label) for e in load_hub_split(spec, "train")] == [("fine", 1), ("awful", 0)]
    assert [(e.text, e.label) for e in load_hub_split(spec, "test")] == [("meh", 0)]
    assert calls == [("me/reviews", "en", "train"), ("me/reviews", "en", "holdout")]
    wrong = write(tmp_path / "w.json", {**json.loads(f.read_text()), "label_names": ["pos", "neg"],
                                        "verbalizer": ["great", "bad"]})
    with pytest.raises(DataError, match="expected label names"):  # ids would not match the verbalizer
        load_hub_split(load_task_file(wrong), "train")


def test_csv_and_tsv_files_with_their_own_column_names(tmp_path):
    import gzip

    (tmp_path / "train.csv").write_text('review,stars,id\n"Great, really great",pos,7\nawful,neg,8\n'
                                        '"meh ""ok""",0,9\n\nfine,1,10\n', encoding="utf-8")
    (tmp_path / "dev.tsv.gz").write_bytes(gzip.compress(b"stars\treview\npos\tgood\nneg\tbad\n"))
    f = write(tmp_path / "t.json", {"template": "<P> {text} It was [MASK] .", "verbalizer": ["bad", "great"],
                                    "label_names": ["neg", "pos"], "train": "train.csv", "dev": "dev.tsv.gz",
                                    "columns": {"text": "review", "label": "stars"}})
    fs = load_fewshot(str(f), 0)
    assert [(e.text, e.label) for e in fs.train] == [("Great, really great", 1), ("awful", 0), ('meh "ok"', 0),
                                                     ("fine", 1)]
    assert [(e.text, e.label) for e in fs.dev] == [("good", 1), ("bad", 0)]
    # a pair task's second text through its own column name
    (tmp_path / "pairs.tsv").write_text("s1\ts2\tlabel\na\tb\t1\nc\td\t0\n", encoding="utf-8")
    pf = write(tmp_path / "p.json", {"template": "<P> {text} ? [MASK] , {text_b}", "verbalizer": ["No", "Yes"],
                                     "train": "pairs.tsv", "dev": "pairs.tsv",
                                     "columns": {"text": "s1", "text_b": "s2"}})
    assert [(e.text, e.text_b, e.label) for e in load_fewshot(str(pf), 0).train] == [("a", "b", 1), ("c", "d", 0)]


@pytest.mark.parametrize("body, expected", [
    ("text,label\nx,1\n", r"train\.csv:1: expected a header row naming the columns \['review', 'stars'\]"),
    ("review,stars\nx,1,extra\n", r"train\.csv:2: expected 2 fields as in the header, found 3; quote a text"),
    ("review,stars\nx\n", r"train\.csv:2: expected 2 fields as in the header, found 1"),
    ('review,stars\n"x,1\n', r"found malformed quoting after line \d+ \(unexpected end of data\)"),
    ("review,stars\nx,maybe\n", (r"train\.csv:2: expected an int 'stars' field, found label 'maybe'; labels must be "
                                 r"integer class ids or one of the label names \['neg', 'pos'\]")),
    ("review,stars\nx,2\n", (r"train\.csv:2: expected a label in 0\.\.1, found 2; use ids in label_names order, or "
                             r"the label names")),
    ("review,stars\n", r"expected CSV/TSV rows, found an empty file; fix the file"),
])
def test_bad_csv_is_one_line_naming_the_place(tmp_path, body, expected):
    (tmp_path / "train.csv").write_text(body, encoding="utf-8")
    f = write(tmp_path / "t.json", {"template": "<P> {text} [MASK]", "verbalizer": ["bad", "great"],
                                    "label_names": ["neg", "pos"], "train": "train.csv", "dev": "train.csv",
                                    "columns": {"text": "review", "label": "stars"}})
    with pytest.raises(DataError, match=expected) as e:
        load_fewshot(str(f), 0)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("columns", [["text"], {"txt": "a"}, {"text": ""}, {"label": 3}])
def test_bad_columns_key(tmp_path, columns):
    f = write(tmp_path / "t.json", {"template": "<P> {text} [MASK]", "verbalizer": ["a", "b"], "train": "t.csv",
                                    "columns": columns})
    with pytest.raises(TaskError, match=r"'columns' must map some of text, text_b, label"):
        load_task_file(f)


def test_read_texts_from_every_format(tmp_path):
    import gzip

    from cliptune_ort.data import read_texts

    (tmp_path / "a.txt").write_text("first text\r\n\nsecond, with a comma\n", encoding="utf-8")
    assert read_texts(tmp_path / "a.txt") == (["first text", "second, with a comma"], None)
    rows(tmp_path / "b.jsonl", [{"text": "x", "label": 1}, {"text": "y"}])  # a label, if any, is ignored
    assert read_texts(tmp_path / "b.jsonl") == (["x", "y"], None)
    (tmp_path / "c.csv.gz").write_bytes(gzip.compress(b'review,s2\n"a, b",c\nd,e\n'))
    assert read_texts(tmp_path / "c.csv.gz", pair=True, columns=("review", "s2", "label")) == (["a, b", "d"], ["c", "e"])
    with pytest.raises(DataError, match=r"a pair task needs two texts per example"):
        read_texts(tmp_path / "a.txt", pair=True)
    with pytest.raises(DataError, match=r"c\.csv\.gz:1: expected a header row naming the columns \['text'\]"):
        read_texts(tmp_path / "c.csv.gz")
    with pytest.raises(DataError, match=r"b\.jsonl:1: expected a string 'text_b' field, found no 'text_b' field"):
        read_texts(tmp_path / "b.jsonl", pair=True)
    (tmp_path / "e.txt").write_text("\n \n", encoding="utf-8")
    with pytest.raises(DataError, match="expected texts to classify, found none"):
        read_texts(tmp_path / "e.txt")
    with pytest.raises(DataError, match=r"data file not found; expected a file of texts there"):
        read_texts(tmp_path / "nope.csv")


@needs_export
def test_predict_a_file_in_chunks(splade_dir, tmp_path, capsys):
    """`cliptune predict --input`: the same probabilities as one text at a time, in chunks of the run's eval_chunk
    (bounded memory), to stdout or atomically to --output; a deployed classifier reads the same file."""
    from cliptune_ort.cli import main
    from cliptune_ort.predict import predict
    from cliptune_ort.tuner import tune

    cfg = build_config(task=str(EXAMPLE), method="bbt", budget=8, popsize=4, d=10, eval_every=4, eval_chunk=5,
                       plot=False)
    run = tmp_path / "run"
    tune(cfg, run, model_dir=splade_dir, progress=False)
    test = ROOT / "examples" / "support_topics" / "test.jsonl"
    assert main(["predict", str(run), "--input", str(test)]) == 0
    got = [json.loads(x) for x in capsys.readouterr().out.strip().splitlines()]
    texts = [json.loads(x)["text"] for x in test.read_text().splitlines()]
    assert [g["text"] for g in got] == texts and len(texts) == 36  # 8 chunks of at most 5 rows, in input order
    for g, t in zip(got[:6], texts[:6]):
        one = predict(run, [t])[0]
        assert one["label"] == g["label"]
        assert max(abs(one["probs"][k] - g["probs"][k]) for k in one["probs"]) < 1e-5
    out = tmp_path / "preds.jsonl"
    assert main(["predict", str(run), "--input", str(test), "--output", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["rows"] == 36 and sum(summary["per_label"].values()) == 36
    assert [json.loads(x) for x in out.read_text().splitlines()] == got
    assert main(["deploy", str(run), "--out", str(tmp_path / "c.onnx")]) == 0
    capsys.readouterr()
    assert main(["predict", str(tmp_path / "c.onnx"), "--input", str(test)]) == 0
    dep = [json.loads(x) for x in capsys.readouterr().out.strip().splitlines()]
    assert [d["label"] for d in dep] == [g["label"] for g in got]
    # a task's own column names travel in the sidecar: the deployed classifier reads the task's files
    run2 = tmp_path / "run2"
    (tmp_path / "msgs.csv").write_text("message,topic\n" + "".join(f'"{t}",x\n' for t in texts[:4]), encoding="utf-8")
    for split in ("train", "dev"):  # the example's files as CSV under other column names
        ex = [json.loads(x) for x in (EXAMPLE.parent / f"{split}.jsonl").read_text().splitlines()]
        (tmp_path / f"{split}.csv").write_text("message,topic\n" + "".join(f'"{r["text"]}",{r["label"]}\n' for r in ex),
                                               encoding="utf-8")
    own = write(tmp_path / "own.json", {**json.loads(EXAMPLE.read_text()), "train": "train.csv", "dev": "dev.csv",
                                        "test": None, "columns": {"text": "message", "label": "topic"}})
    tune(build_config(task=str(own), method="bbt", budget=8, popsize=4, d=10, eval_every=4, plot=False), run2,
         model_dir=splade_dir, progress=False)
    assert main(["deploy", str(run2), "--out", str(tmp_path / "clf.onnx"), "--check-split", "dev"]) == 0
    assert json.loads((tmp_path / "clf.json").read_text())["columns"] == ["message", "text_b", "topic"]
    capsys.readouterr()
    assert main(["predict", str(tmp_path / "clf.onnx"), "--input", str(tmp_path / "msgs.csv")]) == 0
    assert [json.loads(x)["text"] for x in capsys.readouterr().out.strip().splitlines()] == texts[:4]
    # predicting reads no split: the run dir predicts with its training files gone; evaluating needs them
    (tmp_path / "train.csv").unlink()
    assert main(["predict", str(run2), "--text", texts[0]]) == 0
    assert json.loads(capsys.readouterr().out)["text"] == texts[0]
    assert main(["eval", str(run2), "--split", "dev"]) == 2
    assert "train.csv: data file not found" in capsys.readouterr().err
    for args, msg in ((["--text", "x", "--input", str(test)], "pass --text (repeatable) or --input FILE, not both"),
                      ([], "pass --text (repeatable) or --input FILE"),
                      (["--input", str(test), "--text-b", "y"], "--text-b goes with --text"),
                      (["--input", str(test), "--output", str(tmp_path)], "expected a file path to write")):
        assert main(["predict", str(run), *args]) == 2
        assert msg in capsys.readouterr().err


@needs_export
def test_eval_on_a_labelled_file(splade_dir, tmp_path, capsys):
    """`cliptune eval RUN --input FILE`: the task's own format and label names; on the run's test file it gives
    the run's own test numbers."""
    from cliptune_ort.cli import main
    from cliptune_ort.tuner import tune

    run = tmp_path / "run"
    res = tune(build_config(task=str(EXAMPLE), method="bbt", budget=8, popsize=4, d=10, eval_every=4, plot=False),
               run, model_dir=splade_dir, progress=False)
    test = ROOT / "examples" / "support_topics" / "test.jsonl"
    assert main(["eval", str(run), "--input", str(test)]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["n"] == 36 and got["input"] == str(test)
    assert abs(got["metric"] - res["test"]["metric"]) < 1e-12 and abs(got["loss"] - res["test"]["loss"]) < 1e-6
    # a CSV of its own with label names, through the task's columns (text, label)
    lines = [json.loads(x) for x in test.read_text().splitlines()][:6]
    csv_file = tmp_path / "held.csv"
    csv_file.write_text("text,label\n" + "".join(f'"{r["text"]}",{r["label"]}\n' for r in lines), encoding="utf-8")
    assert main(["eval", str(run), "--input", str(csv_file)]) == 0
    assert json.loads(capsys.readouterr().out)["n"] == 6
    (tmp_path / "empty.jsonl").write_text("", encoding="utf-8")
    for args, msg in ((["--input", str(tmp_path / "empty.jsonl")], "found an empty file; fix the file"),
                      (["--input", str(tmp_path / "nope.csv")], "expected a file of labelled examples there"),
                      (["--input", str(csv_file), "--split", "dev"], "eval takes --split or --input FILE, not both")):
        assert main(["eval", str(run), *args]) == 2
        assert msg in capsys.readouterr().err


def test_a_large_given_train_file_warns(tmp_path, monkeypatch):
    """Train and dev files used whole are scored by every candidate: a full training set there gets a warning."""
    from cliptune_ort import data

    monkeypatch.setattr(data, "GIVEN_ROWS_WARN", 5)
    rows(tmp_path / "train.jsonl", [{"text": f"t{i}", "label": i % 2} for i in range(6)])
    rows(tmp_path / "dev.jsonl", [{"text": f"d{i}", "label": i % 2} for i in range(4)])
    f = write(tmp_path / "t.json", {"template": "<P> {text} [MASK]", "verbalizer": ["bad", "great"],
                                    "train": "train.jsonl", "dev": "dev.jsonl"})
    with pytest.warns(RuntimeWarning, match=r"train\.jsonl: 6 train examples, used whole: every candidate is scored"):
        fs = load_fewshot(str(f), 0)
    assert len(fs.train) == 6 and len(fs.dev) == 4


@needs_export
def test_the_readmes_python_example_runs(tmp_path, monkeypatch, capsys):
    """README, "From Python": the block runs as written (from a folder holding the examples)."""
    import re

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    block = re.search(r"### From Python\n.*?```python\n(.*?)```", readme, re.DOTALL).group(1)
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    monkeypatch.chdir(tmp_path)
    exec(compile(block, "README.md (From Python)", "exec"), {})  # noqa: S102 (the README's own code)
    out = capsys.readouterr().out.strip().splitlines()
    res = json.loads((tmp_path / "runs" / "topics_bbt" / "result.json").read_text())
    assert out[0] == f"{res['dev']['metric']} {res['test']['metric']}" and res["calls"] == 400
    assert out[1] in ("delivery", "payment", "account") and float(out[2]) == res["test"]["metric"]
    assert (tmp_path / "topics.onnx").is_file() and (tmp_path / "topics.json").is_file()
