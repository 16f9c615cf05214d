"""Bad input gets a one-line error (exit status 2) that says what was expected and how to fix it."""

from __future__ import annotations

import json
import shutil

import pytest

from cliptune_ort.cli import main

from .conftest import needs_export

pytestmark = needs_export


def _copy_model(src, dst):
    shutil.copytree(src, dst)
    return dst


def _cli(args, capsys):
    rc = main(args)
    err = capsys.readouterr().err.strip()
    return rc, err


def case_unknown_task(tmp_path, model):
    return ["tune", "--task", "sst5", "--model-dir", str(model)], "unknown task 'sst5'"


def case_missing_model_dir(tmp_path, model):
    return ["tune", "--model-dir", str(tmp_path / "nope")], "does not exist"


def case_incomplete_model_dir(tmp_path, model):
    d = _copy_model(model, tmp_path / "m")
    (d / "graph_2.onnx").unlink()
    return ["tune", "--model-dir", str(d)], "incomplete: graph 2 file graph_2.onnx is missing"


def case_no_manifest(tmp_path, model):
    d = _copy_model(model, tmp_path / "m")
    (d / "manifest.json").unlink()
    return ["tune", "--model-dir", str(d)], "has no manifest.json"


def case_graph_sha_mismatch(tmp_path, model):
    d = _copy_model(model, tmp_path / "m")
    with open(d / "graph_1.onnx", "ab") as f:
        f.write(b"\0")
    return ["tune", "--model-dir", str(d)], "graph_1.onnx has sha256"


def case_newer_schema(tmp_path, model):
    d = _copy_model(model, tmp_path / "m")
    man = json.loads((d / "manifest.json").read_text())
    man["schema_version"] = 99
    (d / "manifest.json").write_text(json.dumps(man))
    return ["tune", "--model-dir", str(d)], "schema_version 99, newer than this cliptune-ort reads"


def case_empty_split(tmp_path, model):
    data = tmp_path / "data" / "sst2"
    data.mkdir(parents=True)
    (data / "validation.jsonl").write_text("")
    import gzip

    with gzip.open(data / "train.jsonl.gz", "wt") as f:
        f.write("")
    return ["tune", "--model-dir", str(model), "--data-dir", str(tmp_path / "data")], "empty"


def case_multi_token_verbalizer(tmp_path, model):
    return (["tune", "--model-dir", str(model), "--verbalizer", "bad,unbelievableness"],
            "verbalizer word 'unbelievableness' is")


def case_bad_budget(tmp_path, model):
    return ["tune", "--model-dir", str(model), "--budget", "-5"], "budget must be > 0"


def case_bad_mixture_in_config_file(tmp_path, model):
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"mixture": "median"}))
    return ["tune", "--model-dir", str(model), "--config", str(cfg)], "mixture must be one of"


def case_unknown_config_key(tmp_path, model):
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"popsze": 20}))
    return ["tune", "--config", str(cfg)], "unknown setting(s) popsze"


def case_k_above_export(tmp_path, model):
    return ["tune", "--model-dir", str(model), "--k", "9"], "re-export with --k 9"


CASES = [v for k, v in sorted(globals().items()) if k.startswith("case_")]


@pytest.mark.parametrize("case", CASES, ids=[c.__name__[5:] for c in CASES])
def test_one_line_error(case, splade_dir, tmp_path, capsys):
    args, expected = case(tmp_path, splade_dir)
    rc, err = _cli([*args, "--out", str(tmp_path / "run")] if args[0] == "tune" else args, capsys)
    assert rc == 2
    assert len(err.splitlines()) == 1, err
    assert err.startswith("cliptune: error: ")
    assert expected in err, err
    assert not (tmp_path / "run" / "result.json").exists()
