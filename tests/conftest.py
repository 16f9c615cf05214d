"""Shared fixtures: one export of splade-tiny and of a tiny random RoBERTa per test session.

The export cache (CLIPTUNE_CACHE) points into the session's temp dir so tests never touch the
user's cache, and the embedded default is exported there at most once.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SPLADE = ROOT / "cliptune_ort" / "assets" / "models" / "splade-tiny"
#: the graph contract's inputs, in the order the torch wrapper takes them
NAMES = ("input_ids", "attention_mask", "mask_pos", "prompt_embeds", "verbalizer_ids")


def _has_torch() -> bool:
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True


needs_export = pytest.mark.skipif(not _has_torch(), reason="needs the export extra (torch, transformers)")


@pytest.fixture(scope="session", autouse=True)
def _cache(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cliptune_cache")
    old = os.environ.get("CLIPTUNE_CACHE")
    os.environ["CLIPTUNE_CACHE"] = str(cache)
    yield cache
    if old is None:
        os.environ.pop("CLIPTUNE_CACHE", None)
    else:
        os.environ["CLIPTUNE_CACHE"] = old


@pytest.fixture(scope="session")
def splade_dir(tmp_path_factory):
    """splade-tiny exported with K=4, p=0.1 (the embedded default's settings)."""
    if not _has_torch():
        pytest.skip("needs the export extra")
    from cliptune_export import ExportOptions, export_model

    out = tmp_path_factory.mktemp("exports") / "splade"
    export_model(str(SPLADE), out, ExportOptions(k=4, p=0.1, seed=0))
    return out


@pytest.fixture(scope="session")
def tiny_roberta_src(tmp_path_factory):
    """A tiny random RoBERTa masked LM folder (config + weights) using splade's tokenizer files."""
    if not _has_torch():
        pytest.skip("needs the export extra")
    import shutil

    import torch
    from transformers import RobertaConfig, RobertaForMaskedLM

    src = tmp_path_factory.mktemp("tiny_roberta")
    cfg = RobertaConfig(vocab_size=30522, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                        intermediate_size=128, max_position_embeddings=160, pad_token_id=0,
                        bos_token_id=101, eos_token_id=102, type_vocab_size=1)
    torch.manual_seed(0)
    RobertaForMaskedLM(cfg).save_pretrained(src)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(SPLADE / f, src / f)
    return src


@pytest.fixture(scope="session")
def roberta_dir(tiny_roberta_src, tmp_path_factory):
    from cliptune_export import ExportOptions, export_model

    out = tmp_path_factory.mktemp("exports") / "roberta"
    export_model(str(tiny_roberta_src), out, ExportOptions(k=3, p=0.2, seed=5, n_prompt=10))
    return out


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def contract_inputs(man, pop=4, batch=7, extra=29, seed=21):
    """Random feeds of the graph contract for ``man``: [CLS] + placeholders, right-padded rows."""
    rng = np.random.default_rng(seed)
    L, H = man.n_prompt, man.hidden
    seq = L + extra
    ids = rng.integers(1000, 20000, size=(batch, seq)).astype(np.int64)
    ids[:, 0] = man.data["tokenizer"]["cls_id"]  # the contract: [CLS] + placeholders in every row
    ids[:, 1:L + 1] = man.data["placeholder_ids"]
    lengths = rng.integers(L + 5, seq + 1, size=batch)
    lengths[0] = seq
    am = (np.arange(seq)[None] < lengths[:, None]).astype(np.int64)
    ids[am == 0] = man.data["tokenizer"]["pad_id"]
    mask_pos = np.array([rng.integers(L + 1, n) for n in lengths], dtype=np.int64)
    prompts = (rng.standard_normal((pop, L, H)) * man.embedding_std).astype(np.float32)
    verb = np.array([2307, 6659, 1045], dtype=np.int64)
    return dict(zip(NAMES, (ids, am, mask_pos, prompts, verb)))


@pytest.fixture(scope="session")
def packed_pair(tmp_path_factory, tiny_roberta_src):
    """(fp16 export with K=1, its packed copy, its packed_host copy); the flash-kernel copies are beside
    them (packed_flash, packed_host_flash). Read-only: tests/test_packing.py and tests/test_native.py share it."""
    from cliptune_export import ExportOptions, export_model
    from cliptune_export.packing import pack_export

    out = tmp_path_factory.mktemp("packing")
    export_model(str(tiny_roberta_src), out / "fp16", ExportOptions(k=1, p=0.2, seed=5, n_prompt=10,
                                                                    precision="fp16"))
    pack_export(out / "fp16", out / "packed", kernel="fused")
    pack_export(out / "fp16", out / "packed_host", host_offsets=True, kernel="fused")
    pack_export(out / "fp16", out / "packed_flash")  # the default kernel
    pack_export(out / "fp16", out / "packed_host_flash", host_offsets=True, kernel="flash")
    return out / "fp16", out / "packed", out / "packed_host"
