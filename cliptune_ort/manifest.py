"""The model directory's manifest: reading it, checking it, pinning every file by sha256.

A model directory (written by ``cliptune export``) holds ``manifest.json``, ``graph_0.onnx`` (the
full network) .. ``graph_K.onnx`` (thinned networks), ``weights.bin`` (the weights, shared by all
graphs as external data) and ``tokenizer.json``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import IntegrityError, ModelDirError
from .fileio import sha256_file

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
WEIGHTS_NAME = "weights.bin"

_REQUIRED = ("schema_version", "export_id", "model", "tokenizer", "n_prompt", "placeholder_ids",
             "embedding_std", "graphs", "weights", "precision")


@dataclass
class Manifest:
    """A checked manifest and the folder it lives in."""

    root: Path
    data: dict[str, Any]

    @property
    def hidden(self) -> int:
        return int(self.data["model"]["hidden"])

    @property
    def n_prompt(self) -> int:
        return int(self.data["n_prompt"])

    @property
    def k(self) -> int:
        return len(self.data["graphs"]) - 1

    @property
    def embedding_std(self) -> float:
        return float(self.data["embedding_std"])

    @property
    def precision(self) -> str:
        return str(self.data["precision"])

    @property
    def tokenizer_path(self) -> Path:
        return self.root / self.data["tokenizer"]["file"]

    def graph_path(self, index: int) -> Path:
        return self.root / self.data["graphs"][index]["file"]

    @property
    def weights_path(self) -> Path:
        return self.root / self.data["weights"]["file"]

    def fingerprint(self) -> dict[str, Any]:
        """What a run directory records to refuse resuming on another model."""
        return {"export_id": self.data["export_id"], "weights_sha256": self.data["weights"]["sha256"],
                "graphs": [g["sha256"] for g in self.data["graphs"]]}


def load_manifest(model_dir: str | Path, verify: bool = True) -> Manifest:
    """Read and check ``model_dir/manifest.json``; with ``verify`` hash every file it pins.

    Raises ModelDirError for a missing or incomplete folder or an unknown schema version, and
    IntegrityError for a file whose sha256 differs from the manifest.
    """
    root = Path(model_dir)
    if not root.is_dir():
        raise ModelDirError(f"model dir {root} does not exist: run `cliptune export MODEL --out {root}` first")
    mpath = root / MANIFEST_NAME
    if not mpath.is_file():
        raise ModelDirError(f"model dir {root} has no {MANIFEST_NAME}: expected a folder written by "
                            f"`cliptune export`; re-export it")
    try:
        data = json.loads(mpath.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelDirError(f"{mpath} is not valid JSON ({e}): re-export the model dir") from None
    if not isinstance(data, dict):
        raise ModelDirError(f"{mpath} holds a {type(data).__name__}, expected a JSON object: re-export")
    ver = data.get("schema_version")
    if not isinstance(ver, int):
        raise ModelDirError(f"{mpath} has no integer schema_version: re-export the model dir")
    if ver > SCHEMA_VERSION:
        raise ModelDirError(f"{mpath} has schema_version {ver}, newer than this cliptune-ort reads "
                            f"({SCHEMA_VERSION}): upgrade cliptune-ort or re-export with this version")
    if ver < 1:
        raise ModelDirError(f"{mpath} has unknown schema_version {ver}: re-export the model dir")
    missing = [k for k in _REQUIRED if k not in data]
    if missing:
        raise ModelDirError(f"{mpath} lacks {', '.join(missing)}: the manifest is incomplete; re-export")
    if not isinstance(data["graphs"], list) or not data["graphs"]:
        raise ModelDirError(f"{mpath} lists no graphs: re-export the model dir")
    man = Manifest(root, data)
    files = [(f"graph {g.get('index')}", root / str(g.get("file")), g.get("sha256")) for g in data["graphs"]]
    files.append(("weights", man.weights_path, data["weights"].get("sha256")))
    files.append(("tokenizer", man.tokenizer_path, data["tokenizer"].get("sha256")))
    for what, path, _ in files:
        if not path.is_file():
            raise ModelDirError(f"model dir {root} is incomplete: {what} file {path.name} is missing; "
                                "copy the whole folder or re-export")
    if verify:
        for what, path, want in files:
            got = sha256_file(path)
            if got != want:
                raise IntegrityError(f"{path} has sha256 {got[:16]}.., the manifest pins {str(want)[:16]}..: "
                                     f"the {what} file was changed or comes from another export; re-export")
    return man
