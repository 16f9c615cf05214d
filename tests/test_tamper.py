"""Tampering with a model dir: every file the manifest pins, and the manifest's own fields.

Each file the manifest lists (every graph, weights.bin, tokenizer.json) is flipped, truncated, extended,
emptied and swapped for another file; loading must refuse each with an IntegrityError naming the file,
and the CLI must answer with one line and exit 2. Manifest fields: a sealed manifest (``manifest_sha256``)
refuses any edit; without the seal, every field the runtime cannot afford to trust is still checked
against the files (sha256s, graph metadata, the graph contract, the tokenizer).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from cliptune_ort.cli import main
from cliptune_ort.errors import IntegrityError, ModelDirError
from cliptune_ort.manifest import CHECKSUM_FIELD, load_manifest, manifest_checksum, seal_manifest

from .conftest import needs_export

pytestmark = needs_export

K = 4  # the splade_dir fixture's export
FILES = [f"graph_{i}.onnx" for i in range(K + 1)] + ["weights.bin", "tokenizer.json"]
MODES = ["flip_byte", "truncate", "append", "empty", "swap"]


@pytest.fixture
def copy(splade_dir, tmp_path) -> Path:
    d = tmp_path / "model"
    shutil.copytree(splade_dir, d)
    return d


def _tamper(d: Path, name: str, mode: str) -> None:
    path = d / name
    data = path.read_bytes()
    if mode == "flip_byte":
        i = len(data) // 2
        data = data[:i] + bytes([data[i] ^ 0x01]) + data[i + 1:]
    elif mode == "truncate":
        data = data[: len(data) - max(1, len(data) // 10)]
    elif mode == "append":
        data = data + b"\0"
    elif mode == "empty":
        data = b""
    elif mode == "swap":  # another file of the folder under this name (graphs: the next graph)
        other = FILES[(FILES.index(name) + 1) % len(FILES)]
        data = (d / other).read_bytes()
    path.write_bytes(data)


def test_the_manifest_pins_every_file(splade_dir):
    man = json.loads((splade_dir / "manifest.json").read_text())
    listed = [g["file"] for g in man["graphs"]] + [man["weights"]["file"], man["tokenizer"]["file"]]
    assert listed == FILES
    on_disk = sorted(p.name for p in splade_dir.iterdir() if p.name != "manifest.json")
    assert on_disk == sorted(FILES), "a file in the model dir is not pinned by the manifest"


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", FILES)
def test_tampered_file_is_refused(copy, name, mode):
    load_manifest(copy)  # the pristine copy loads
    _tamper(copy, name, mode)
    with pytest.raises(IntegrityError) as exc:
        load_manifest(copy)
    msg = str(exc.value)
    assert f"{copy / name} has sha256" in msg and "the manifest pins" in msg and "re-export" in msg


@pytest.mark.parametrize("name", FILES)
def test_tampered_file_through_the_cli(copy, name, tmp_path, capsys):
    _tamper(copy, name, "flip_byte")
    rc = main(["tune", "--model-dir", str(copy), "--out", str(tmp_path / "run"), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err and err.startswith(f"cliptune: error: {copy / name} has sha256"), err
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------ manifest fields


def _edit(d: Path, change, seal: bool) -> None:
    man = json.loads((d / "manifest.json").read_text())
    if seal:
        man = seal_manifest(man)
    change(man)
    (d / "manifest.json").write_text(json.dumps(man, indent=1))


def _set(path: str, value):
    def change(man):
        obj = man
        parts = path.split(".")
        for p in parts[:-1]:
            obj = obj[int(p)] if isinstance(obj, list) else obj[p]
        last = parts[-1]
        if isinstance(obj, list):
            obj[int(last)] = value(obj[int(last)]) if callable(value) else value
        else:
            obj[last] = value(obj[last]) if callable(value) else value
    return change


FIELD_EDITS = {
    "export_id": _set("export_id", "0" * 32),
    "embedding_std": _set("embedding_std", lambda v: v * 1.5),
    "n_prompt": _set("n_prompt", 49),
    "placeholder_ids": _set("placeholder_ids", lambda v: [i + 1 for i in v]),
    "model.hidden": _set("model.hidden", 64),
    "model.vocab": _set("model.vocab", 1000),
    "model.max_positions": _set("model.max_positions", 1024),
    "tokenizer.mask_id": _set("tokenizer.mask_id", 2307),
    "tokenizer.cls_id": _set("tokenizer.cls_id", 2000),
    "graphs.1.sha256": _set("graphs.1.sha256", "0" * 64),
    "graphs.1.file": _set("graphs.1.file", "graph_2.onnx"),
    "graphs.1.p": _set("graphs.1.p", 0.5),
    "graphs.1.mask_seed": _set("graphs.1.mask_seed", 99),
    "weights.sha256": _set("weights.sha256", "0" * 64),
    "weights.tensors.0.offset": _set("weights.tensors.0.offset", lambda v: v + 4),
    "tokenizer.sha256": _set("tokenizer.sha256", "0" * 64),
    "precision": _set("precision", "int8"),
    "p": _set("p", 0.3),
}


@pytest.mark.parametrize("field", sorted(FIELD_EDITS))
def test_sealed_manifest_refuses_any_edit(copy, field):
    _edit(copy, lambda man: None, seal=True)
    load_manifest(copy)  # sealed and untouched: loads
    _edit(copy, FIELD_EDITS[field], seal=True)
    with pytest.raises(IntegrityError, match="was edited after export"):
        load_manifest(copy)


def _load_and_open(d: Path):
    """load_manifest, then open every graph (sessions check graph metadata and the contract)."""
    from cliptune_ort.engine import Engine

    man = load_manifest(d)
    Engine(man, list(range(man.k + 1)), device="cpu", workers=1, threads=1)


# edits an unsealed manifest (what the exporter writes today) cannot hide: each is caught by a check
# against the files themselves
CAUGHT_WITHOUT_SEAL = {
    "export_id": (IntegrityError, "comes from export"),
    "n_prompt": (ModelDirError, "field placeholder_ids is"),
    "model.hidden": (ModelDirError, "takes prompt_embeds of hidden size 128, the manifest says 64"),
    "model.vocab": (ModelDirError, "expected 50 (n_prompt) token ids below the vocabulary size 1000"),
    "tokenizer.mask_id": (IntegrityError, "the manifest's mask_id 2307 is 'great' in this tokenizer"),
    "tokenizer.cls_id": (IntegrityError, "the manifest's cls_id 2000 is"),
    "graphs.1.sha256": (IntegrityError, "graph_1.onnx has sha256"),
    "graphs.1.file": (IntegrityError, "graph_2.onnx has sha256"),
    "weights.sha256": (IntegrityError, "weights.bin has sha256"),
    "tokenizer.sha256": (IntegrityError, "tokenizer.json has sha256"),
}


@pytest.mark.parametrize("field", sorted(CAUGHT_WITHOUT_SEAL))
def test_unsealed_manifest_edits_that_are_still_caught(copy, field):
    man = json.loads((copy / "manifest.json").read_text())
    man.pop(CHECKSUM_FIELD, None)
    (copy / "manifest.json").write_text(json.dumps(man))
    _edit(copy, FIELD_EDITS[field], seal=False)
    err, text = CAUGHT_WITHOUT_SEAL[field]
    with pytest.raises(err) as exc:
        _load_and_open(copy)
    assert text in str(exc.value)


def test_seal_is_canonical(splade_dir):
    man = json.loads((splade_dir / "manifest.json").read_text())
    sealed = seal_manifest(man)
    assert sealed[CHECKSUM_FIELD] == manifest_checksum(sealed) == manifest_checksum(man)
    reordered = dict(reversed(list(sealed.items())))  # key order does not matter
    assert manifest_checksum(reordered) == sealed[CHECKSUM_FIELD]


def test_fresh_export_is_sealed(splade_dir):
    man = json.loads((splade_dir / "manifest.json").read_text())
    if CHECKSUM_FIELD not in man:
        pytest.xfail("the exporter does not seal manifest.json yet: export/exporter.py should write "
                     "seal_manifest(manifest) (cliptune_ort.manifest)")
    assert man[CHECKSUM_FIELD] == manifest_checksum(man)
