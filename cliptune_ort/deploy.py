"""Running a deployed classifier: ``classifier.onnx`` + ``classifier.json``, no model dir, no run dir.

``cliptune deploy RUN_DIR --out classifier.onnx`` (builder: :mod:`cliptune_export.deploy`) writes
one self-contained ONNX graph with the tuned prompt baked in, and a JSON sidecar next to it. This
module is the consumer side: it needs onnxruntime, tokenizers and numpy only (never torch).

Graph contract of a deployed classifier (DESIGN.md's vocabulary):

inputs
    input_ids       int64 [batch, seq]  ids of ``[CLS] <template without <P>, text filled in> [SEP]``,
                                        right-padded (the sidecar's ``plain_template``)
    attention_mask  int64 [batch, seq]  1 for real tokens, 0 for padding
outputs
    probs           float [batch, labels]  softmax over the verbalizer logits (label-id order);
                                           NaN for a row whose [MASK] cannot be located
    logits          float [batch, labels]  the verbalizer logits at [MASK]

The graph inserts the L placeholder ids after position 0, extends the attention mask, finds the
[MASK] position itself, adds the baked prompt and computes only the verbalizer rows of the head.

Sidecar (``classifier.json``): format/version, ``deploy_id`` (also stamped in the graph's metadata
and checked here), task, label names, verbalizer, ``columns`` (the task's field names for text, text_b
and label, which ``cliptune predict --input`` reads), ``template`` (the run's, with ``<P>``) and
``plain_template`` (without it), special token ids, ``max_len`` (tokens incl. the prompt; the graph
accepts at most ``max_input_tokens`` = max_len - L), the parity check done at deploy time, and the
run's ``tokenizer.json`` as a string (``tokenizer_json``).

:class:`DeployedClassifier` renders texts exactly like the tuning runtime
(:class:`cliptune_ort.encoding.PromptTokenizer`: template pieces and texts tokenised separately,
only the texts truncated when too long), so its inputs are the runtime's minus the prompt columns.
Tokenising the whole rendered string instead (the README's 15-line example) gives the same ids for
BERT-style WordPiece tokenizers on texts that fit; see the README.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np

from .errors import ConfigError, DataError, IntegrityError, ModelDirError

DEPLOY_FORMAT = "cliptune-deployed-classifier"
DEPLOY_VERSION = 1
#: model metadata key holding the deploy id (the sidecar holds the same id)
META_DEPLOY_ID = "cliptune.deploy_id"
INPUTS = ("input_ids", "attention_mask")
OUTPUTS = ("probs", "logits")


def sidecar_path(onnx_path: str | Path) -> Path:
    """``classifier.onnx`` -> ``classifier.json``."""
    return Path(onnx_path).with_suffix(".json")


def load_sidecar(onnx_path: str | Path) -> dict:
    """Read and check the sidecar JSON of a deployed classifier."""
    path = Path(onnx_path)
    if not path.is_file():
        raise ConfigError(f"deployed classifier {path} does not exist: expected a file written by "
                          "`cliptune deploy RUN_DIR --out FILE.onnx`")
    side = sidecar_path(path)
    if not side.is_file():
        raise ConfigError(f"{path} has no sidecar {side.name} next to it: `cliptune deploy` writes both files; "
                          "copy them together")
    try:
        meta = json.loads(side.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{side} is not valid JSON ({e}): redeploy with `cliptune deploy`") from None
    if not isinstance(meta, dict) or meta.get("format") != DEPLOY_FORMAT:
        raise ConfigError(f"{side} is not a cliptune deploy sidecar (format {meta.get('format') if isinstance(meta, dict) else None!r}, "
                          f"expected {DEPLOY_FORMAT!r}): redeploy with `cliptune deploy`")
    ver = meta.get("version")
    if not isinstance(ver, int) or ver > DEPLOY_VERSION or ver < 1:
        raise ConfigError(f"{side} has version {ver!r}, this cliptune-ort reads version {DEPLOY_VERSION}: "
                          "upgrade cliptune-ort or redeploy with this version")
    return meta


class DeployedClassifier:
    """A deployed classifier loaded once: tokenizer, one ONNX Runtime session on the CPU.

    ``threads``: ORT intra-op threads (0 = ORT's default, the physical cores).
    """

    def __init__(self, path: str | Path, threads: int = 0):
        import onnxruntime as ort

        from .encoding import PromptTokenizer

        self.path = Path(path)
        self.meta = meta = load_sidecar(self.path)
        so = ort.SessionOptions()
        so.log_severity_level = 3
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.enable_cpu_mem_arena = False  # varying batch shapes: the arena would keep every peak (as sessions.py)
        if threads:
            so.intra_op_num_threads = int(threads)
        try:
            self.session = ort.InferenceSession(str(self.path), so, providers=["CPUExecutionProvider"])
        except Exception as e:  # ORT raises its own exception types
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ModelDirError(f"ONNX Runtime cannot load {self.path} ({msg[:300]}): the file is damaged; "
                                "redeploy with `cliptune deploy`") from None
        self.provider = self.session.get_providers()[0]
        onnx_meta = meta.get("onnx") or {}
        if onnx_meta.get("precision") == "int8":  # deploys before int8_weights was recorded: full-range int8
            from .sessions import int8_saturation_warning

            int8_saturation_warning(onnx_meta.get("int8_weights", "int8"), str(self.path))
        got_id = self.session.get_modelmeta().custom_metadata_map.get(META_DEPLOY_ID)
        if got_id != meta.get("deploy_id"):
            raise IntegrityError(f"{self.path} has deploy id {got_id}, its sidecar {sidecar_path(self.path).name} "
                                 f"says {meta.get('deploy_id')}: the two files come from different deploys; "
                                 "copy the pair written by one `cliptune deploy`")
        ins = [i.name for i in self.session.get_inputs()]
        outs = [o.name for o in self.session.get_outputs()]
        if sorted(ins) != sorted(INPUTS) or sorted(outs) != sorted(OUTPUTS):
            raise ModelDirError(f"{self.path} has inputs {ins} and outputs {outs}; expected inputs {list(INPUTS)} "
                                f"and outputs {list(OUTPUTS)}: not a deployed cliptune classifier")
        self.label_names = list(meta["label_names"])
        self.verbalizer = list(meta["verbalizer"])
        self.template = meta["template"]
        self.pair = bool(meta["pair"])
        # the runtime's renderer without the prompt: same pieces, same text-only truncation
        # (max_len - L leaves the runtime's room for the text); tokenizers reads the file once
        with tempfile.TemporaryDirectory() as d:
            tok_file = Path(d) / "tokenizer.json"
            tok_file.write_text(meta["tokenizer_json"], encoding="utf-8")
            self.ptok = PromptTokenizer(tok_file, meta["special_ids"], 0, [], int(meta["max_input_tokens"]))
        self.pad_id = int(meta["special_ids"]["pad_id"])

    @property
    def n_labels(self) -> int:
        return len(self.label_names)

    def render(self, text: str, text_b: str | None = None) -> list[int]:
        """Token ids of one example as the graph takes them: [CLS] template-with-text [SEP], no prompt."""
        from .data import Example

        ids, _, _ = self.ptok.render(self.template, Example(text, 0, text_b), use_prompt=False)
        return ids

    def encode(self, texts: list[str], texts_b: list[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """input_ids [n, seq] and attention_mask [n, seq] (int64, right-padded) for ``texts``."""
        self._check(texts, texts_b)
        rows = [self.render(t, texts_b[i] if texts_b else None) for i, t in enumerate(texts)]
        seq = max(len(r) for r in rows)
        ids = np.full((len(rows), seq), self.pad_id, dtype=np.int64)
        am = np.zeros((len(rows), seq), dtype=np.int64)
        for i, r in enumerate(rows):
            ids[i, :len(r)] = r
            am[i, :len(r)] = 1
        return ids, am

    def run(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """One session run: (probs [batch, labels], logits [batch, labels])."""
        probs, logits = self.session.run(list(OUTPUTS), {"input_ids": input_ids, "attention_mask": attention_mask})
        return probs, logits

    def predict_proba(self, texts: list[str], texts_b: list[str] | None = None, batch_size: int = 64) -> np.ndarray:
        """Class probabilities [n, labels]; rows are run in length-sorted chunks of ``batch_size``."""
        self._check(texts, texts_b)
        rows = [self.render(t, texts_b[i] if texts_b else None) for i, t in enumerate(texts)]
        out = np.empty((len(rows), self.n_labels), dtype=np.float32)
        order = np.argsort([len(r) for r in rows], kind="stable")
        for c0 in range(0, len(order), max(1, int(batch_size))):
            idx = order[c0:c0 + batch_size]
            seq = max(len(rows[i]) for i in idx)
            ids = np.full((len(idx), seq), self.pad_id, dtype=np.int64)
            am = np.zeros((len(idx), seq), dtype=np.int64)
            for j, i in enumerate(idx):
                ids[j, :len(rows[i])] = rows[i]
                am[j, :len(rows[i])] = 1
            out[idx] = self.run(ids, am)[0]
        bad = np.flatnonzero(~np.all(np.isfinite(out), axis=1))
        if len(bad):
            i = int(bad[0])
            raise DataError(f"text {i} ({texts[i][:60]!r}) contains the mask token itself, so the deployed graph "
                            "cannot tell it from the template's [MASK]: remove it from the text")
        return out

    def predict(self, texts: list[str], texts_b: list[str] | None = None) -> list[dict]:
        """One dict per text, as :func:`cliptune_ort.predict.predict` returns."""
        probs = self.predict_proba(texts, texts_b)
        out = []
        for i, t in enumerate(texts):
            j = int(np.argmax(probs[i]))
            out.append({"text": t, "label": j, "label_name": self.label_names[j], "verbalizer": self.verbalizer[j],
                        "probs": {self.label_names[c]: round(float(probs[i, c]), 6) for c in range(self.n_labels)}})
        return out

    def _check(self, texts, texts_b) -> None:
        if not texts:
            raise ConfigError("no text to classify: pass at least one --text")
        if self.pair and (not texts_b or len(texts_b) != len(texts)):
            raise ConfigError(f"task {self.meta['task']} classifies text pairs: pass one --text-b per --text")
        if not self.pair and texts_b:
            raise ConfigError(f"task {self.meta['task']} classifies single texts: drop --text-b")


def predict_deployed(path: str | Path, texts: list[str], texts_b: list[str] | None = None) -> list[dict]:
    """Classify ``texts`` (pair tasks: with ``texts_b``) with a deployed classifier file."""
    return DeployedClassifier(path).predict(list(texts), list(texts_b) if texts_b else None)
