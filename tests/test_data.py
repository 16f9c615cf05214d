"""Tests of the task table (cliptune_ort.tasks) and data loading / few-shot sampling (cliptune_ort.data)."""

from __future__ import annotations

import gzip
import hashlib
import json
import re
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cliptune_ort import data
from cliptune_ort.data import (
    Example,
    FewShot,
    bbt_sample,
    bbt_sample_indices,
    default_data_dir,
    load_fewshot,
    load_hub_split,
    load_split,
    read_jsonl,
)
from cliptune_ort.errors import CliptuneError, ConfigError, DataError, TaskError
from cliptune_ort.tasks import TASKS, TaskSpec, get_task

ALL_TASKS = sorted(TASKS)
SAMPLED = [n for n in ALL_TASKS if TASKS[n].fewshot == "sample"]
PREDRAWN = [n for n in ALL_TASKS if TASKS[n].fewshot == "predrawn"]

# Hugging Face hub ClassLabel names, in label-id order (the datasets' own features).
HUB_LABEL_NAMES = {
    "sst2": ("negative", "positive"),
    "yelp_polarity": ("1", "2"),
    "ag_news": ("World", "Sports", "Business", "Sci/Tech"),
    "dbpedia": (
        "Company", "EducationalInstitution", "Artist", "Athlete", "OfficeHolder", "MeanOfTransportation",
        "Building", "NaturalPlace", "Village", "Animal", "Plant", "Album", "Film", "WrittenWork",
    ),
    "mrpc": ("not_equivalent", "equivalent"),
    "rte": ("entailment", "not_entailment"),
    "snli": ("entailment", "neutral", "contradiction"),
}
# BBT's verbalizers (DESIGN.md table), in label-id order.
VERBALIZERS = {
    "sst2": ("bad", "great"),
    "yelp_polarity": ("bad", "great"),
    "ag_news": ("World", "Sports", "Business", "Tech"),
    "dbpedia": (
        "Company", "Education", "Artist", "Athlete", "Office", "Transportation", "Building", "Natural",
        "Village", "Animal", "Plant", "Album", "Film", "Written",
    ),
    "mrpc": ("No", "Yes"),
    "rte": ("Yes", "No"),
    "snli": ("Yes", "Maybe", "No"),
}
TEMPLATES = {
    "sst2": "<P> . {text} . It was [MASK] .",
    "yelp_polarity": "<P> . {text} . It was [MASK] .",
    "ag_news": "<P> . [MASK] News: {text}",
    "dbpedia": "<P> [ Category: [MASK] ] {text}",
    "mrpc": "<P> . {text} ? [MASK] , {text_b}",
    "rte": "<P> . {text} ? [MASK] , {text_b}",
    "snli": "<P> . {text} ? [MASK] , {text_b}",
}
# The label mapping as each vendored README states it (ties the table to the data's documentation).
README_MAPPING = {
    "sst2": "0 = negative, 1 = positive",
    "yelp_polarity": "0 = negative = original class 1, 1 = positive = original class 2",
    "ag_news": "0 = World, 1 = Sports, 2 = Business, 3 = Sci/Tech",
    "dbpedia": "0 Company, 1 EducationalInstitution, 2 Artist,\n3 Athlete, 4 OfficeHolder, 5 MeanOfTransportation, "
               "6 Building, 7 NaturalPlace, 8 Village, 9 Animal,\n10 Plant, 11 Album, 12 Film, 13 WrittenWork",
    "mrpc": "0 = not_equivalent, 1 = equivalent",
    "rte": "0 = entailment, 1 = not_entailment",
    "snli": "0 = entailment, 1 = neutral, 2 = contradiction",
}


def bbt_reference(labels: list[int], seed: int, k_shot: int) -> tuple[list[int], list[int]]:
    """BBT's construct_true_few_shot_data (global numpy seed + shuffle of a Python list), on indices."""
    np.random.seed(seed)
    all_indices = list(range(len(labels)))
    np.random.shuffle(all_indices)
    train_count: dict[int, int] = {}
    dev_count: dict[int, int] = {}
    train: list[int] = []
    dev: list[int] = []
    for index in all_indices:
        label = labels[index]
        train_count.setdefault(label, 0)
        dev_count.setdefault(label, 0)
        if train_count[label] < k_shot:
            train.append(index)
            train_count[label] += 1
        elif dev_count[label] < k_shot:
            dev.append(index)
            dev_count[label] += 1
    return train, dev


def write_lines(path: Path, lines: list[str] | bytes) -> Path:
    payload = lines if isinstance(lines, bytes) else "".join(line + "\n" for line in lines).encode("utf-8")
    path.write_bytes(payload)
    return path


# ---------------------------------------------------------------------------------------------------------
# Task table


def test_task_table_has_the_seven_tasks() -> None:
    assert ALL_TASKS == ["ag_news", "dbpedia", "mrpc", "rte", "snli", "sst2", "yelp_polarity"]
    assert SAMPLED == ["mrpc", "rte", "snli", "sst2"]
    assert PREDRAWN == ["ag_news", "dbpedia", "yelp_polarity"]


@pytest.mark.parametrize("name", ALL_TASKS)
def test_task_spec_values(name: str) -> None:
    spec = get_task(name)
    assert isinstance(spec, TaskSpec) and spec.name == name
    assert spec.label_names == HUB_LABEL_NAMES[name]
    assert spec.verbalizer == VERBALIZERS[name]
    assert spec.template == TEMPLATES[name]
    assert len(spec.verbalizer) == len(spec.label_names) == spec.n_labels
    assert spec.loss == ("hinge" if name in ("mrpc", "snli", "rte") else "ce")
    assert spec.metric == ("f1" if name == "mrpc" else "acc")
    assert spec.pair == (name in ("mrpc", "rte", "snli"))
    assert ("{text_b}" in spec.template) == spec.pair
    with pytest.raises(AttributeError):
        spec.name = "other"  # type: ignore[misc]  # frozen


def test_hub_fields() -> None:
    got = {n: (s.hub_path, s.hub_config, s.hub_text, s.hub_text_b, s.hub_test_split) for n, s in TASKS.items()}
    assert got == {
        "sst2": ("glue", "sst2", "sentence", None, "validation"),
        "yelp_polarity": ("yelp_polarity", None, "text", None, "test"),
        "ag_news": ("ag_news", None, "text", None, "test"),
        "dbpedia": ("dbpedia_14", None, "content", None, "test"),
        "mrpc": ("glue", "mrpc", "sentence1", "sentence2", "validation"),
        "rte": ("glue", "rte", "sentence1", "sentence2", "validation"),
        "snli": ("snli", None, "premise", "hypothesis", "test"),
    }


def test_local_files_fields() -> None:
    got = {n: (s.local_dir, s.local_train, s.local_test) for n, s in TASKS.items()}
    assert got == {
        "sst2": ("sst2", "train.jsonl.gz", "validation.jsonl"),
        "yelp_polarity": ("yelp_polarity", None, None),
        "ag_news": ("ag_news", None, "test.jsonl"),
        "dbpedia": ("dbpedia", None, "test.jsonl"),
        "mrpc": ("mrpc", "train.jsonl", "validation.jsonl"),
        "rte": ("rte", "train.jsonl", "validation.jsonl"),
        "snli": ("snli", "train_first100k.jsonl.gz", "test.jsonl"),
    }
    assert "7,600" in TASKS["dbpedia"].test_note and "sample" in TASKS["dbpedia"].test_note
    assert "no test split offline" in TASKS["yelp_polarity"].test_note
    assert "100,000" in TASKS["snli"].train_note
    assert TASKS["snli"].drop_labels == (-1,)


@pytest.mark.parametrize("name", ALL_TASKS)
def test_label_mapping_matches_the_vendored_readme(name: str) -> None:
    readme = (default_data_dir() / TASKS[name].local_dir / "README.md").read_text(encoding="utf-8")
    assert README_MAPPING[name] in readme


def test_unknown_task_raises_task_error() -> None:
    with pytest.raises(TaskError) as exc:
        get_task("foo")
    msg = str(exc.value)
    assert "\n" not in msg
    assert msg == ("unknown task 'foo': expected one of ag_news, dbpedia, mrpc, rte, snli, sst2, "
                   "yelp_polarity, or the path of a task file (*.json, see the README's 'Your own task'); pass "
                   "--task with one of these")
    with pytest.raises(TaskError):
        load_fewshot("sst-2", seed=13)
    assert isinstance(exc.value, CliptuneError)


# ---------------------------------------------------------------------------------------------------------
# Vendored data


def test_vendored_data_matches_sha256sums() -> None:
    root = default_data_dir()
    listed = {}
    for line in (root / "SHA256SUMS").read_text(encoding="utf-8").splitlines():
        digest, rel = line.split(maxsplit=1)
        listed[rel] = digest
    on_disk = {f.relative_to(root).as_posix() for f in root.rglob("*.jsonl*")}
    assert set(listed) == on_disk and len(on_disk) == 41
    for rel, digest in listed.items():
        assert hashlib.sha256((root / rel).read_bytes()).hexdigest() == digest, rel
    assert (root / "README.md").is_file() and (root / "PROVENANCE.md").is_file()
    for name in ALL_TASKS:
        assert (root / TASKS[name].local_dir / "README.md").is_file()


def test_import_is_light() -> None:
    code = ("import sys, cliptune_ort.data, cliptune_ort.tasks; "
            "print(sorted(m for m in ('torch', 'datasets', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# ---------------------------------------------------------------------------------------------------------
# Few-shot splits from the vendored data


def _key(e: Example) -> tuple[str, str | None]:
    return (e.text, e.text_b)


@pytest.mark.parametrize("seed", [13, 42])
@pytest.mark.parametrize("name", ALL_TASKS)
def test_fewshot_split_has_16_per_class_and_disjoint(name: str, seed: int) -> None:
    spec = TASKS[name]
    fs = load_fewshot(name, seed)
    assert isinstance(fs, FewShot)
    n = spec.n_labels
    for part in (fs.train, fs.dev):
        assert len(part) == 16 * n
        assert Counter(e.label for e in part) == {c: 16 for c in range(n)}
        assert all((e.text_b is not None) == spec.pair for e in part)
        assert all(isinstance(e.text, str) and e.text for e in part)
    assert fs.info["train_counts"] == fs.info["dev_counts"] == [16] * n
    assert fs.info["task"] == name and fs.info["seed"] == seed and fs.info["source"] == "local"
    assert json.loads(json.dumps(fs.info)) == fs.info  # the record can go into a run dir as is
    if spec.fewshot == "sample":
        assert fs.info["fewshot"] == "sampled"
        tr, dv = fs.info["train_indices"], fs.info["dev_indices"]
        assert len(set(tr)) == len(tr) == 16 * n and len(set(dv)) == len(dv) == 16 * n
        assert not set(tr) & set(dv)
        pool = load_split(name, "train")
        assert fs.info["pool_size"] == len(pool)
        assert fs.train == [pool[i] for i in tr] and fs.dev == [pool[i] for i in dv]
    else:
        assert fs.info["fewshot"] == "predrawn"
        assert fs.info["train_source"] == f"{spec.local_dir}/fewshot_rlprompt/16-{seed}"
        assert "RLPrompt" in fs.info["train_note"]
        assert not {_key(e) for e in fs.train} & {_key(e) for e in fs.dev}
    # test split
    if spec.local_test is None:
        assert fs.test is None and fs.info["test_counts"] is None
        assert "no test split offline" in fs.info["test_note"]
    else:
        assert fs.test is not None
        assert all(0 <= e.label < n for e in fs.test)
        assert sum(fs.info["test_counts"]) == len(fs.test)


def test_test_split_sizes_and_counts() -> None:
    expected = {
        "sst2": [428, 444],
        "mrpc": [129, 279],
        "rte": [146, 131],
        "snli": [3368, 3219, 3237],
        "ag_news": [1900] * 4,
        "dbpedia": [538, 519, 557, 560, 532, 543, 519, 537, 558, 534, 567, 506, 547, 583],
    }
    for name, counts in expected.items():
        test = load_split(name, "test")
        assert np.bincount([e.label for e in test], minlength=TASKS[name].n_labels).tolist() == counts, name


def test_snli_drops_rows_without_gold_label() -> None:
    fs = load_fewshot("snli", 13)
    assert fs.info["dropped_rows"] == 110
    assert fs.info["pool_size"] == 100_000 - 110
    assert fs.info["train_source"] == "snli/train_first100k.jsonl.gz"
    assert "100,000" in fs.info["train_note"]


def test_sampled_split_is_bbt_sampler_on_the_train_file() -> None:
    pool = load_split("mrpc", "train")
    fs = load_fewshot("mrpc", 21)
    ref_train, ref_dev = bbt_reference([e.label for e in pool], 21, 16)
    assert fs.train == [pool[i] for i in ref_train]
    assert fs.dev == [pool[i] for i in ref_dev]


def test_fewshot_is_deterministic_and_seed_dependent() -> None:
    for name in ("sst2", "rte"):
        a, b, c = load_fewshot(name, 13), load_fewshot(name, 13), load_fewshot(name, 42)
        assert a.train == b.train and a.dev == b.dev and a.info == b.info
        assert a.train != c.train and a.dev != c.dev
        assert set(map(_key, a.train)) != set(map(_key, c.train))
    a, c = load_fewshot("ag_news", 13), load_fewshot("ag_news", 42)
    assert set(map(_key, a.train)) != set(map(_key, c.train))


def test_per_class_other_than_16() -> None:
    fs = load_fewshot("rte", 13, per_class=4)
    assert Counter(e.label for e in fs.train) == Counter(e.label for e in fs.dev) == {0: 4, 1: 4}
    with pytest.raises(DataError, match=r"no predrawn 8-shot splits .*; available: 16-shot; pass --per-class"):
        load_fewshot("ag_news", 13, per_class=8)  # no split of that size at all: the size is what to change
    with pytest.raises(DataError, match=r"no predrawn 16-shot split for seed 1 .*available seeds: 13, 21, 42, 87, 100"):
        load_fewshot("ag_news", 1)


def test_sst2_train_loads_fast() -> None:
    path = default_data_dir() / "sst2" / "train.jsonl.gz"
    best = float("inf")
    for _ in range(2):
        t0 = time.perf_counter()
        rows = read_jsonl(path, n_labels=2)
        best = min(best, time.perf_counter() - t0)
    assert len(rows) == 67_349
    assert Counter(r["label"] for r in rows) == {0: 29_780, 1: 37_569}
    assert rows[0]["idx"] == 0  # every field of a row is kept
    assert best < 1.0, f"SST-2 train took {best:.2f} s to load"


def test_load_split_by_file_name() -> None:
    assert load_split("sst2", "validation") == load_split("sst2", "test")
    dev13 = load_split("ag_news", "fewshot_rlprompt/16-13/dev")
    assert dev13 == load_fewshot("ag_news", 13).dev
    mrpc_test = load_split("mrpc", "test")  # BBT's MRPC test split is GLUE validation ...
    assert mrpc_test == load_split("mrpc", "validation") and len(mrpc_test) == 408
    assert len(load_split("mrpc", "test.jsonl")) == 1725  # ... the labelled MSR test file is reachable by name
    assert load_split("sst2", "train.jsonl.gz") == load_split("sst2", "train")
    with pytest.raises(DataError, match=r"available: train, test, .*validation"):
        load_split("rte", "dev")
    for bad in ("../sst2/validation", "/etc/passwd", "a//b", ""):
        with pytest.raises(DataError, match="expected 'train', 'test' or a file under"):
            load_split("rte", bad)
    with pytest.raises(DataError, match="available: "):
        load_split("rte", "README.md")
    with pytest.raises(DataError, match="no full train split offline"):
        load_split("ag_news", "train")
    with pytest.raises(DataError, match="no test split offline"):
        load_split("yelp_polarity", "test")


# ---------------------------------------------------------------------------------------------------------
# read_jsonl errors and edge cases


def _one_line(exc: pytest.ExceptionInfo[BaseException]) -> str:
    msg = str(exc.value)
    assert "\n" not in msg
    return msg


def test_read_jsonl_plain_and_gzip(tmp_path: Path) -> None:
    lines = ['{"text": "a\u2028b", "label": 1, "idx": 7}', "", '{"text": "c", "label": 0}']
    plain = write_lines(tmp_path / "x.jsonl", lines)
    gz = tmp_path / "x.jsonl.gz"
    gz.write_bytes(gzip.compress(plain.read_bytes()))
    expected = [{"text": "a\u2028b", "label": 1, "idx": 7}, {"text": "c", "label": 0}]
    assert read_jsonl(plain) == read_jsonl(gz) == expected
    assert read_jsonl(plain, drop_labels=(1,)) == [{"text": "c", "label": 0}]


def test_empty_file(tmp_path: Path) -> None:
    for payload in (b"", b"\n\n  \n"):
        path = write_lines(tmp_path / "empty.jsonl", payload)
        with pytest.raises(DataError) as exc:
            read_jsonl(path)
        assert "empty file" in _one_line(exc) and str(path) in str(exc.value)


def test_non_utf8_bytes(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "latin1.jsonl", b'{"text": "ok", "label": 0}\n{"text": "caf\xe9", "label": 1}\n')
    with pytest.raises(DataError) as exc:
        read_jsonl(path)
    assert f"{path}:2: expected UTF-8 text" in _one_line(exc)


def test_bad_json_line(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "bad.jsonl", ['{"text": "a", "label": 0}', '{"text": "b", "label": 1'])
    with pytest.raises(DataError) as exc:
        read_jsonl(path)
    assert f"{path}:2: expected one JSON object per line, found invalid JSON" in _one_line(exc)
    path = write_lines(tmp_path / "list.jsonl", ['["a", 0]'])
    with pytest.raises(DataError, match=r":1: expected a JSON object per line, found a JSON list"):
        read_jsonl(path)


_JSON_LINES = ['{"text": "a", "label": 0}', '  {"text": "a", "label": 0} \t\r', '{}', '{} {}', '{}x', '{"a": 1},',
               '\ufeff{"a": 1}', '\u00a0{"a": 1}', '{"a": 1}\u00a0', '{"a": NaN, "b": -Infinity}', '{"a": "\\u2028"}',
               '{"a": "x\ty"}', '{"a": [1, {"b": [2]}]}', '[1, 2]', '"text"', '3', 'null', '{"a": 1', '{"a": 1}}',
               '{"a": 1}\u2028', '{"a": "\u2028"}', '{"a" 1}', '{"a": 01}', '{"a": 1e400}', '\t']


@pytest.mark.parametrize("line", _JSON_LINES)
def test_line_parser_reads_what_json_loads_reads(line: str) -> None:
    """The scanner's fast path parses a line exactly when ``json.loads`` does, to the same value; a line
    json.loads rejects is named with its message."""
    try:
        want = json.loads(line)
    except json.JSONDecodeError as e:
        with pytest.raises(DataError, match=rf"f\.jsonl:7: expected one JSON object per line, found invalid JSON \({re.escape(e.msg)}"):
            data._parse_line(Path("f.jsonl"), 7, line)
        return
    got = data._parse_line(Path("f.jsonl"), 7, line)
    assert got == want or (json.dumps(got) == json.dumps(want))  # NaN != NaN
    assert type(got) is type(want)


@given(st.recursive(st.none() | st.booleans() | st.floats(allow_nan=False) | st.integers() | st.text(),
                    lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=5), kids, max_size=3),
                    max_leaves=8), st.sampled_from(["", " ", "\t", "x", ",", "}", " {}"]))
@settings(max_examples=200, deadline=None)
def test_line_parser_on_generated_values(value, suffix: str) -> None:
    line = json.dumps(value, ensure_ascii=False) + suffix
    try:
        want = json.loads(line)
    except json.JSONDecodeError:
        with pytest.raises(DataError):
            data._parse_line(Path("f.jsonl"), 1, line)
        return
    assert data._parse_line(Path("f.jsonl"), 1, line) == want


@pytest.mark.parametrize(
    ("line", "kwargs", "expected"),
    [
        ('{"label": 0}', {}, "expected a string 'text' field, found no 'text' field"),
        ('{"text": 3, "label": 0}', {}, "expected a string 'text' field, found int 3"),
        ('{"text": "a"}', {}, "expected an int 'label' field, found no 'label' field"),
        ('{"text": "a", "label": "1"}', {}, "expected an int 'label' field, found label '1'"),
        ('{"text": "a", "label": 1.0}', {}, "expected an int 'label' field, found label 1.0"),
        ('{"text": "a", "label": true}', {}, "expected an int 'label' field, found label True"),
        ('{"text": "a", "label": 0}', {"pair": True}, "expected a string 'text_b' field"),
        ('{"text": "a", "label": 2}', {"n_labels": 2}, "expected a label in 0..1, found 2"),
        ('{"text": "a", "label": -1}', {"n_labels": 3}, "expected a label in 0..2, found -1"),
    ],
)
def test_bad_rows(tmp_path: Path, line: str, kwargs: dict, expected: str) -> None:
    path = write_lines(tmp_path / "rows.jsonl", ['{"text": "ok", "text_b": "ok", "label": 0}', line])
    with pytest.raises(DataError) as exc:
        read_jsonl(path, **kwargs)
    assert f"{path}:2: {expected}" in _one_line(exc)


def test_missing_file_and_corrupt_gzip(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="data file not found"):
        read_jsonl(tmp_path / "nope.jsonl")
    bad = write_lines(tmp_path / "bad.jsonl.gz", gzip.compress(b'{"text": "a", "label": 0}\n')[:-6])
    with pytest.raises(DataError, match="corrupt or truncated gzip"):
        read_jsonl(bad)


def _fake_data_dir(tmp_path: Path, task: str, files: dict[str, list[str]]) -> Path:
    root = tmp_path / "data"
    for rel, lines in files.items():
        path = root / task / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        write_lines(path, lines)
    return root


def test_missing_data_dir(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-dir"
    with pytest.raises(DataError) as exc:
        load_fewshot("sst2", 13, data_dir=missing)
    assert f"data directory {missing} not found" in _one_line(exc) and "--data-dir" in str(exc.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"task folder .*empty/rte not found.*--data-dir"):
        load_split("rte", "test", data_dir=tmp_path / "empty")
    root = _fake_data_dir(tmp_path, "rte", {"validation.jsonl": ['{"text": "a", "text_b": "b", "label": 0}']})
    with pytest.raises(DataError, match=r"rte/train.jsonl: data file not found"):
        load_fewshot("rte", 13, data_dir=root)


def test_unknown_predrawn_seed() -> None:
    with pytest.raises(DataError) as exc:
        load_fewshot("dbpedia", 7)
    msg = _one_line(exc)
    assert "no predrawn 16-shot split for seed 7" in msg
    assert "available seeds: 13, 21, 42, 87, 100" in msg and "--seed" in msg


def test_empty_split_in_data_dir(tmp_path: Path) -> None:
    root = _fake_data_dir(tmp_path, "snli", {"train_first100k.jsonl.gz": [], "test.jsonl": []})
    (root / "snli" / "train_first100k.jsonl.gz").write_bytes(gzip.compress(b""))
    with pytest.raises(DataError, match="empty file"):
        load_fewshot("snli", 13, data_dir=root)
    # a split with rows but none labelled
    (root / "snli" / "train_first100k.jsonl.gz").write_bytes(
        gzip.compress(b'{"text": "a", "text_b": "b", "label": -1}\n')
    )
    with pytest.raises(DataError, match="expected at least one labelled example, found none"):
        load_fewshot("snli", 13, data_dir=root)


def test_too_few_examples_for_sampling(tmp_path: Path) -> None:
    rows = [json.dumps({"text": f"t{i}", "text_b": "h", "label": i % 2}) for i in range(40)]
    root = _fake_data_dir(tmp_path, "rte", {"train.jsonl": rows, "validation.jsonl": rows[:3]})
    with pytest.raises(DataError) as exc:
        load_fewshot("rte", 13, data_dir=root)
    assert "expected at least 32 examples of every label" in _one_line(exc) and "{0: 20, 1: 20}" in str(exc.value)
    fs = load_fewshot("rte", 13, data_dir=root, per_class=10)
    assert len(fs.train) == len(fs.dev) == 20 and len(fs.test or []) == 3
    assert fs.info["data_dir"] == str(root)


def test_predrawn_split_with_wrong_counts(tmp_path: Path) -> None:
    rows = [json.dumps({"text": f"t{i}", "label": i % 2}) for i in range(30)]
    root = _fake_data_dir(tmp_path, "yelp_polarity", {"fewshot_rlprompt/16-5/train.jsonl": rows,
                                                      "fewshot_rlprompt/16-5/dev.jsonl": rows})
    with pytest.raises(DataError, match=r"expected 16 examples of every label, found \[15, 15\]"):
        load_fewshot("yelp_polarity", 5, data_dir=root)
    with pytest.raises(DataError, match="available seeds: 5;"):
        load_fewshot("yelp_polarity", 6, data_dir=root)


def test_bad_config_values() -> None:
    for seed in (-1, 2**32, 1.5, True, "13"):
        with pytest.raises(ConfigError, match="expected an int in 0..2\\*\\*32-1"):
            load_fewshot("rte", seed)  # type: ignore[arg-type]
    for per_class in (0, -3, 2.0):
        with pytest.raises(ConfigError, match="expected a positive int"):
            bbt_sample_indices([0, 1] * 10, 2, 13, per_class)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="n_labels 0: expected a positive int"):
        bbt_sample_indices([], 0, 13)
    with pytest.raises(ConfigError, match="source 'web'"):
        load_fewshot("rte", 13, source="web")


# ---------------------------------------------------------------------------------------------------------
# bbt_sample


def test_bbt_sample_matches_bbt_reference_on_sst2() -> None:
    pool = load_split("sst2", "train")
    labels = [e.label for e in pool]
    for seed in (13, 42, 100):
        assert bbt_sample_indices(labels, 2, seed) == bbt_reference(labels, seed, 16)
    train, dev = bbt_sample(pool, 2, 13)
    ref_train, ref_dev = bbt_reference(labels, 13, 16)
    assert train == [pool[i] for i in ref_train] and dev == [pool[i] for i in ref_dev]


def test_bbt_sample_errors() -> None:
    with pytest.raises(DataError, match=r"expected label ids in 0..1, found 2"):
        bbt_sample_indices([0, 1, 2] * 40, 2, 13)
    with pytest.raises(DataError, match=r"expected label ids in 0..2, found -1"):
        bbt_sample_indices([0, 1, 2, -1] * 40, 3, 13)
    with pytest.raises(DataError, match=r"found \{2: 0\}"):
        bbt_sample_indices([0, 1] * 40, 3, 13)
    with pytest.raises(DataError, match=r"found \{0: 0, 1: 0\}"):
        bbt_sample([], 2, 13)


@settings(max_examples=200, deadline=None)
@given(
    n_labels=st.integers(1, 5),
    per_class=st.integers(1, 4),
    extra=st.lists(st.integers(0, 4), max_size=60),
    seed=st.integers(0, 2**32 - 1),
    order_seed=st.integers(0, 2**16),
)
def test_bbt_sample_properties(n_labels: int, per_class: int, extra: list[int], seed: int, order_seed: int) -> None:
    # every class has at least 2 * per_class examples, in a random order, plus some extra ones
    labels = [c for c in range(n_labels) for _ in range(2 * per_class)] + [x % n_labels for x in extra]
    labels = np.random.RandomState(order_seed).permutation(labels).tolist()
    examples = [Example(text=f"ex{i}", label=y) for i, y in enumerate(labels)]

    train_idx, dev_idx = bbt_sample_indices(labels, n_labels, seed, per_class)
    # counts per class
    assert Counter(labels[i] for i in train_idx) == {c: per_class for c in range(n_labels)}
    assert Counter(labels[i] for i in dev_idx) == {c: per_class for c in range(n_labels)}
    # disjoint, valid, no repeats
    assert len(set(train_idx)) == len(train_idx) and len(set(dev_idx)) == len(dev_idx)
    assert not set(train_idx) & set(dev_idx)
    assert all(0 <= i < len(labels) for i in train_idx + dev_idx)
    # the walk: in the seed's permutation, each class's train picks come first, then its dev picks
    rank = {int(i): r for r, i in enumerate(np.random.RandomState(seed).permutation(len(labels)))}
    for c in range(n_labels):
        walk = sorted((i for i in range(len(labels)) if labels[i] == c), key=rank.__getitem__)
        assert sorted(i for i in train_idx if labels[i] == c) == sorted(walk[:per_class])
        assert sorted(i for i in dev_idx if labels[i] == c) == sorted(walk[per_class:2 * per_class])
    # determinism, and agreement with BBT's own loop
    assert bbt_sample_indices(labels, n_labels, seed, per_class) == (train_idx, dev_idx)
    assert (train_idx, dev_idx) == bbt_reference(labels, seed, per_class)
    train, dev = bbt_sample(examples, n_labels, seed, per_class)
    assert train == [examples[i] for i in train_idx] and dev == [examples[i] for i in dev_idx]


@settings(max_examples=50, deadline=None)
@given(n_labels=st.integers(2, 4), per_class=st.integers(1, 4), seed=st.integers(0, 1000))
def test_bbt_sample_rejects_a_short_class(n_labels: int, per_class: int, seed: int) -> None:
    labels = [c for c in range(n_labels) for _ in range(2 * per_class)]
    labels.remove(n_labels - 1)  # the last class is one short
    with pytest.raises(DataError, match=rf"found \{{{n_labels - 1}: {2 * per_class - 1}\}}"):
        bbt_sample_indices(labels, n_labels, seed, per_class)


# ---------------------------------------------------------------------------------------------------------
# Hub loading (no network here: datasets.load_dataset is monkeypatched)


def _fake_hub(monkeypatch: pytest.MonkeyPatch, tables: dict[tuple[str, str | None, str], dict]) -> list:
    datasets = pytest.importorskip("datasets")
    calls: list[tuple[str, str | None, str]] = []

    def load_dataset(path: str, name: str | None = None, split: str | None = None, **_: object):
        calls.append((path, name, split))
        columns, label_names = tables[(path, name, split)]
        features = datasets.Features(
            {k: (datasets.ClassLabel(names=list(label_names)) if k == "label" else datasets.Value("string"))
             for k in columns}
        )
        return datasets.Dataset.from_dict(columns, features=features)

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return calls


def test_hub_column_mapping(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _fake_hub(monkeypatch, {
        ("glue", "sst2", "validation"): ({"sentence": ["good film", "bad film"], "label": [1, 0],
                                          "idx": ["0", "1"]}, HUB_LABEL_NAMES["sst2"]),
        ("snli", None, "test"): ({"premise": ["p1", "p2", "p3"], "hypothesis": ["h1", "h2", "h3"],
                                  "label": [2, -1, 0]}, HUB_LABEL_NAMES["snli"]),
        ("dbpedia_14", None, "train"): ({"title": ["T"], "content": [" c"], "label": [13]},
                                        HUB_LABEL_NAMES["dbpedia"]),
        ("glue", "mrpc", "train"): ({"sentence1": ["a"], "sentence2": ["b"], "label": [1]},
                                    HUB_LABEL_NAMES["mrpc"]),
    })
    assert load_hub_split("sst2", "test") == [Example("good film", 1), Example("bad film", 0)]
    assert load_hub_split("snli", "test") == [Example("p1", 2, "h1"), Example("p3", 0, "h3")]  # -1 dropped
    assert load_hub_split(TASKS["dbpedia"], "train") == [Example(" c", 13)]
    assert load_hub_split("mrpc", "train") == [Example("a", 1, "b")]
    assert calls == [("glue", "sst2", "validation"), ("snli", None, "test"), ("dbpedia_14", None, "train"),
                     ("glue", "mrpc", "train")]


def test_hub_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_hub(monkeypatch, {
        ("glue", "rte", "validation"): ({"sentence1": ["a"], "label": [0]}, HUB_LABEL_NAMES["rte"]),
        ("ag_news", None, "test"): ({"text": ["a"], "label": [0]}, ("A", "B", "C", "D")),
        ("yelp_polarity", None, "test"): ({"text": [], "label": []}, HUB_LABEL_NAMES["yelp_polarity"]),
    })
    with pytest.raises(DataError, match=r"missing \['sentence2'\]"):
        load_hub_split("rte", "test")
    with pytest.raises(DataError, match="expected label names"):
        load_hub_split("ag_news", "test")
    with pytest.raises(DataError, match="found an empty split"):
        load_hub_split("yelp_polarity", "test")


def test_hub_unreachable(monkeypatch: pytest.MonkeyPatch) -> None:
    datasets = pytest.importorskip("datasets")

    def offline(*args: object, **kwargs: object) -> None:
        raise ConnectionError("Couldn't reach 'glue' on the Hub (LocalEntryNotFoundError)\nmore")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError) as exc:
        load_hub_split("sst2", "train")
    assert "hub dataset glue/sst2 split 'train': could not be loaded (ConnectionError: Couldn't reach" in _one_line(exc)
    assert isinstance(exc.value.__cause__, ConnectionError)


def test_fewshot_from_hub(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.RandomState(0)
    labels = rng.randint(-1, 3, size=400).tolist()
    train_table = {"premise": [f"p{i}" for i in range(400)], "hypothesis": [f"h{i}" for i in range(400)],
                   "label": labels}
    test_table = {"premise": ["tp", "tq"], "hypothesis": ["th", "tr"], "label": [1, -1]}
    calls = _fake_hub(monkeypatch, {("snli", None, "train"): (train_table, HUB_LABEL_NAMES["snli"]),
                                    ("snli", None, "test"): (test_table, HUB_LABEL_NAMES["snli"])})
    fs = load_fewshot("snli", 42, source="hub")
    assert calls == [("snli", None, "train"), ("snli", None, "test")]
    assert Counter(e.label for e in fs.train) == Counter(e.label for e in fs.dev) == {0: 16, 1: 16, 2: 16}
    assert fs.test == [Example("tp", 1, "th")]
    assert fs.info["source"] == "hub" and fs.info["fewshot"] == "sampled" and fs.info["data_dir"] is None
    assert fs.info["dropped_rows"] == labels.count(-1)
    pool = [Example(f"p{i}", y, f"h{i}") for i, y in enumerate(labels) if y >= 0]
    ref_train, ref_dev = bbt_reference([e.label for e in pool], 42, 16)
    assert fs.train == [pool[i] for i in ref_train] and fs.dev == [pool[i] for i in ref_dev]


def test_module_constants() -> None:
    assert default_data_dir() == Path(data.__file__).resolve().parent / "assets" / "data"
    assert data.PREDRAWN_DIR == "fewshot_rlprompt"
