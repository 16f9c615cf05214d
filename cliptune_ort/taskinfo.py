"""`cliptune tasks`: what a task is, and what a run on it would see, before any tuning.

:func:`describe` is a task's spec as plain data. :func:`check` goes further, with a run's settings: it draws the
few-shot split, maps the verbalizer to the model's vocabulary and tokenises every split as the run would (no
session is opened, nothing is scored), so a bad task file, a multi-token verbalizer word or texts cut at the
model's length limit show up in a second rather than after a model export and a run's set-up.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .config import TuneConfig
from .data import load_fewshot
from .manifest import load_manifest
from .models import resolve_model_dir
from .tasks import TaskSpec
from .tuner import prompt_tokenizer


def describe(spec: TaskSpec) -> dict[str, Any]:
    """A task's spec as JSON-ready data (the fields a user chooses, not the hub plumbing)."""
    return {"task": spec.name, "task_file": spec.source_file, "labels": list(spec.label_names),
            "verbalizer": list(spec.verbalizer), "template": spec.template, "pair": spec.pair, "loss": spec.loss,
            "metric": spec.metric, "fewshot": spec.fewshot, "test_note": spec.test_note}


def _split_stats(enc, n_labels: int) -> dict[str, Any]:
    lengths = enc.lengths
    return {"rows": len(enc), "per_label": np.bincount(enc.labels, minlength=n_labels).tolist(),
            "tokens_mean": round(float(lengths.mean()), 1) if len(enc) else 0.0,
            "tokens_max": int(lengths.max()) if len(enc) else 0, "truncated": int(enc.n_truncated)}


def check(cfg: TuneConfig, spec: TaskSpec) -> dict[str, Any]:
    """``describe(spec)`` plus what a run with ``cfg`` would see: the few-shot split (its source and counts), the
    verbalizer's token ids, each split's rows, tokens and truncated rows, and the first train example as the
    model reads it (the prompt's positions shown as ``<P>`` x L). Raises the run's own one-line errors."""
    manifest = load_manifest(resolve_model_dir(cfg.model_dir, cfg.k, cfg.p, cfg.precision))
    fewshot = load_fewshot(spec, cfg.seed, data_dir=cfg.data_dir, per_class=cfg.per_class, source=cfg.data_source)
    ptok = prompt_tokenizer(cfg, manifest)
    verb = ptok.verbalizer_ids(spec.verbalizer, cfg.verbalizer_policy)
    use_prompt = cfg.method != "manual"
    splits = {"train": fewshot.train, "dev": fewshot.dev, "test": fewshot.test}
    stats = {name: None if exs is None else _split_stats(ptok.encode(spec.template, exs, use_prompt), spec.n_labels)
             for name, exs in splits.items()}
    ids, _, _ = ptok.render(spec.template, fewshot.train[0], use_prompt)
    n_prompt = manifest.n_prompt if use_prompt else 0  # the graphs put the prompt at positions 1..L
    shown = [ptok.tok.id_to_token(int(i)) for i in ids]
    shown[1:1 + n_prompt] = [f"<P> x {n_prompt}"] if n_prompt else []
    info = fewshot.info
    return {**describe(spec), "model": str(manifest.root), "max_len": ptok.max_len, "seed": cfg.seed,
            "per_class": cfg.per_class if info["fewshot"] == "sampled" else None, "split": info["fewshot"],
            "train_source": info.get("train_source"), "test_source": info.get("test_source"),
            "verbalizer_ids": verb.tolist(),
            "verbalizer_tokens": [ptok.tok.id_to_token(int(i)) for i in verb], **stats,
            "first_train_example": " ".join(shown)}
