"""Using a finished run: re-evaluate its best prompt on a split, classify new text."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from .config import build_config
from .data import DEFAULT_COLUMNS, Example, load_labelled, read_texts
from .errors import ConfigError, TaskError
from .tasks import is_task_file, task_file_sha256
from .tuner import eval_batch, evaluate, prepare


def read_run_config(run_dir: str | Path, keep_model_dir: bool = False, check_task_file: bool = True) -> dict:
    """The settings a run dir was started with (config.json), as build_config keywords. A run on a task file
    is refused (``check_task_file``) where the file has changed since: its prompt was tuned for the old one."""
    run_dir = Path(run_dir)
    cfg_path = run_dir / "config.json"
    if not cfg_path.is_file():
        raise ConfigError(f"{run_dir} has no config.json: expected a run dir written by `cliptune tune`")
    try:
        raw = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{cfg_path} is not readable JSON ({e}): restore it from the run or start a new run") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{cfg_path} holds a {type(raw).__name__}, expected the JSON object `cliptune tune` writes")
    model_dir = raw.pop("resolved_model_dir", None)
    raw.pop("loss_used", None)
    digest = raw.pop("task_file_sha256", None)  # a task file's digest when the run started
    if check_task_file and digest is not None and is_task_file(raw.get("task")):
        try:
            now = task_file_sha256(raw["task"])
        except TaskError as e:
            raise ConfigError(f"{e}; the run {run_dir} was tuned on it: restore the file there") from None
        if now != digest:
            raise ConfigError(f"task file {raw['task']} has changed since run {run_dir} was tuned on it (sha256 "
                              f"{digest[:12]}..., now {now[:12]}...): restore that file, or tune again")
    if keep_model_dir:
        raw["resolved_model_dir"] = model_dir
    return raw


def _load_run(run_dir: str | Path, device: str | None, splits: bool = True):
    run_dir = Path(run_dir)
    raw = read_run_config(run_dir, keep_model_dir=True)
    model_dir = raw.pop("resolved_model_dir", None)
    if device is not None:
        raw["device"] = device
    cfg = build_config(**raw)
    if cfg.method != "manual" and not (run_dir / "best_prompt.npy").is_file():
        raise ConfigError(f"{run_dir} has no best_prompt.npy: the run has not finished; resume it first")
    prompt = None
    if cfg.method != "manual":
        try:
            prompt = np.load(run_dir / "best_prompt.npy", allow_pickle=False)
        except (OSError, ValueError) as e:
            raise ConfigError(f"{run_dir / 'best_prompt.npy'} is unreadable ({e}): resume or re-run the tuning") from None
    # the full network (graph 0) is all a tuned prompt is used with: a clip run's K thinned graphs are not opened
    ws = prepare(dataclasses.replace(cfg, method="bbt") if cfg.method == "clip" else cfg,
                 Path(model_dir) if model_dir else None, splits=splits, draw=False)  # the prompt is given
    want = (ws.manifest.n_prompt, ws.manifest.hidden)
    if prompt is not None and (prompt.shape != want or prompt.dtype.kind != "f" or not np.all(np.isfinite(prompt))):
        raise ConfigError(f"{run_dir / 'best_prompt.npy'} holds {prompt.dtype} {prompt.shape}, expected finite floats "
                          f"of shape {want} for this model: the run dir is damaged or from another model")
    return cfg, ws, prompt


def evaluate_run(run_dir: str | Path, split: str = "test", device: str | None = None,
                 input_path: str | Path | None = None) -> dict:
    """Metric and loss of the run's best prompt on ``split`` with the full network, or on the labelled examples
    of ``input_path`` (a data file in the task's format: JSON Lines, CSV or TSV rows with text and label)."""
    cfg, ws, prompt = _load_run(run_dir, device)
    if input_path is not None:
        examples = load_labelled(ws.task, input_path)
        enc = ws.ptok.encode(ws.task.template, examples, use_prompt=cfg.method != "manual")
        batch = eval_batch(ws.engine, enc, cfg.eval_chunk)
        return {"run_dir": str(run_dir), "input": str(input_path), "metric_name": ws.task.metric,
                **evaluate(ws, prompt, batch)}
    batch = {"train": ws.train, "dev": ws.dev, "test": ws.test}[split]
    if batch is None:
        raise ConfigError(f"task {ws.task.name} has no {split} split offline: pick another --split, or pass "
                          "--input FILE")
    return {"run_dir": str(run_dir), "split": split, "metric_name": ws.task.metric, **evaluate(ws, prompt, batch)}


def _deployed(path: str | Path, device: str | None):
    from .deploy import DeployedClassifier

    if device == "cuda":
        raise ConfigError("a deployed classifier runs on the CPU provider: drop --device cuda, or predict "
                          "from the run dir to use the CUDA runtime")
    return DeployedClassifier(path)


def predict(run_dir: str | Path, texts: list[str], texts_b: list[str] | None = None,
            device: str | None = None) -> list[dict]:
    """Class probabilities for each text (pair tasks take ``texts_b``), from a run dir or a deployed .onnx."""
    if str(run_dir).endswith(".onnx"):
        return _deployed(run_dir, device).predict(list(texts), list(texts_b) if texts_b else None)
    if not texts:
        raise ConfigError("no text to classify: pass at least one --text, or --input FILE")
    return _classify(*_load_run(run_dir, device, splits=False), texts, texts_b)  # new text only: no split read


def predict_file(target: str | Path, input_path: str | Path, device: str | None = None) -> list[dict]:
    """:func:`predict` on every text of ``input_path`` (:func:`cliptune_ort.data.read_texts`: .txt lines, or
    JSON Lines / CSV / TSV rows under the task's own field names: a run's task, or a deployed sidecar's)."""
    if str(target).endswith(".onnx"):
        clf = _deployed(target, device)  # sidecars before the "columns" key read the default names
        texts, texts_b = read_texts(input_path, clf.pair, tuple(clf.meta.get("columns") or DEFAULT_COLUMNS))
        return clf.predict(texts, texts_b)
    cfg, ws, prompt = _load_run(target, device, splits=False)
    texts, texts_b = read_texts(input_path, ws.task.pair, ws.task.columns)
    return _classify(cfg, ws, prompt, texts, texts_b)


def _classify(cfg, ws, prompt, texts: list[str], texts_b: list[str] | None) -> list[dict]:
    """One dict per text: the label, its name and verbalizer word, and every label's probability."""
    if ws.task.pair and (not texts_b or len(texts_b) != len(texts)):
        raise ConfigError(f"task {ws.task.name} classifies text pairs: pass one --text-b per --text")
    exs = [Example(t, 0, texts_b[i] if texts_b else None) for i, t in enumerate(texts)]
    enc = ws.ptok.encode(ws.task.template, exs, use_prompt=cfg.method != "manual")
    batch = eval_batch(ws.engine, enc, cfg.eval_chunk)  # length-sorted chunks: bounded memory for a large input
    p = ws.zero_prompt() if prompt is None else prompt[None].astype(np.float32)
    logits = ws.engine.logits(0, p, batch, ws.verbalizer_ids)[0]
    z = logits - logits.max(axis=-1, keepdims=True)
    probs = np.exp(z) / np.exp(z).sum(axis=-1, keepdims=True)
    out = []
    for i, t in enumerate(texts):
        j = int(np.argmax(probs[i]))
        out.append({"text": t, "label": j, "label_name": ws.task.label_names[j],
                    "verbalizer": ws.task.verbalizer[j],
                    "probs": {ws.task.label_names[c]: round(float(probs[i, c]), 6) for c in range(probs.shape[1])}})
    return out
