"""The model directory's manifest: reading it, checking it, pinning every file by sha256.

A model directory (written by ``cliptune export``) holds ``manifest.json``, ``graph_0.onnx`` (the
full network) .. ``graph_K.onnx`` (thinned networks), ``weights.bin`` (the weights, shared by all
graphs as external data) and ``tokenizer.json``.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ConfigError, IntegrityError, ModelDirError
from .fileio import sha256_files_cached

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
WEIGHTS_NAME = "weights.bin"

_REQUIRED = ("schema_version", "export_id", "model", "tokenizer", "n_prompt", "placeholder_ids",
             "embedding_std", "graphs", "weights", "precision")
#: the manifest's own checksum (sha256 of the canonical JSON of every other field); written by the
#: exporter via :func:`seal_manifest`, checked by :func:`load_manifest` when present
CHECKSUM_FIELD = "manifest_sha256"
#: CLIPTUNE_VERIFY: 'cached' (default) hashes a pinned file again only when its size, times or inode changed
#: since it last hashed right (a roberta-large fp16 K = 4 export pins 1.6 GiB: ~1 s of every run's start,
#: 0.94 s for the 1.25 GiB fp32 K = 1 export here); 'full' reads and hashes every file on every load
VERIFY_MODES = ("cached", "full")


def _verify_mode() -> str:
    import os

    mode = os.environ.get("CLIPTUNE_VERIFY", "").strip().lower() or "cached"
    if mode not in VERIFY_MODES:
        raise ConfigError(f"CLIPTUNE_VERIFY={mode!r}: expected one of {', '.join(VERIFY_MODES)}; unset it for the "
                          "default (cached)")
    return mode


def _hash_cache_file() -> Path:
    from .models import cache_dir

    return cache_dir() / "verified_hashes.json"


def pin_sha256(path: str | Path) -> str:
    """sha256 of a file the exporter pins in a manifest, recorded in the verified-hash cache so that the
    first load of the new model dir does not read it again."""
    return sha256_files_cached([Path(path)], _hash_cache_file(), rehash=True)[0]


def manifest_checksum(data: dict[str, Any]) -> str:
    """sha256 of the manifest's canonical JSON (sorted keys), without its own checksum field."""
    body = {k: v for k, v in data.items() if k != CHECKSUM_FIELD}
    return hashlib.sha256(json.dumps(body, sort_keys=True, allow_nan=False).encode("utf-8")).hexdigest()


def seal_manifest(data: dict[str, Any]) -> dict[str, Any]:
    """``data`` with its checksum set (call last, just before writing manifest.json)."""
    return {**{k: v for k, v in data.items() if k != CHECKSUM_FIELD}, CHECKSUM_FIELD: manifest_checksum(data)}


#: packed feed-forward blocks whose graphs use cliptune's custom-op library (export/packing.py LT_FFNS)
LIBRARY_FFNS = ("cublaslt", "cublaslt_res")
#: packed attention kernels (export/packing.py KERNELS); those run by the custom-op library's RaggedAttention
PACKED_KERNELS = ("fused", "flash", "cudnn", "short", "short_qkv", "pipe_qkv")
LIBRARY_KERNELS = ("cudnn", "short", "short_qkv", "pipe_qkv")
#: cliptune's own attention kernels (native/short_attention.cu) -> RaggedAttention's impl attribute, and those of
#: them that read one QKV projection in place
OWN_KERNELS = {"short": 1, "short_qkv": 1, "pipe_qkv": 2}
QKV_KERNELS = ("short_qkv", "pipe_qkv")
#: the graphs' prompt_embeds type: float32 (every export's default), or float16 (fp16 packed exports; the runtime
#: casts host prompts itself, export/packing.py prompt_input_fp16)
PROMPT_DTYPES = ("float32", "float16")
#: where a QKV kernel's query bias is added (manifest packed_q_bias): in the QKV projection's GEMM epilogue, or by
#: RaggedAttention (the projection then a plain MatMul; export/packing.py pack_graph qbias)
Q_BIAS_PLACES = ("projection", "attention")
#: how a packed_host graph makes its first layer's input: "gather" (Add over the padded sum, then Gather) or
#: "fused" (cliptune's PackAdd: one pass; custom-op library)
PACKED_FRONTS = ("gather", "fused")
#: the kernels that project Q, K and V apart from the attention op (the key bias dropped, the value bias folded
#: into the output bias; their query projection keeps its bias as MatMul + Add or FusedDense)
SPLIT_KERNELS = ("flash", *LIBRARY_KERNELS)
#: an int8 export's weight format (manifest int8_weights; ``--int8-weights``). Activations are uint8 (dynamic
#: quantisation). ONNX Runtime's x86 kernels for uint8 x int8 on a CPU without VNNI (plain AVX2 / AVX-512) add
#: pairs of products in 16 bits, which full-range int8 weights overflow: "int7" (onnxruntime's reduce_range) keeps
#: them in -64..63 and cannot saturate on any CPU; "uint8" runs ONNX Runtime's uint8 x uint8 kernels (no
#: saturation); "int8" is exact only with VNNI (AVX512-VNNI, AVX-VNNI, AMX) or on ARM
INT8_WEIGHTS = ("int7", "uint8", "int8")
DEFAULT_INT8_WEIGHTS = "int7"


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
    def int8_weights(self) -> str | None:
        """An int8 export's weight format (INT8_WEIGHTS; int8 exports before it was recorded: "int8"), else None."""
        if self.precision != "int8":
            return None
        return str(self.data.get("int8_weights", "int8"))

    @property
    def prompt_dtype(self) -> str:
        """The graphs' prompt_embeds type: "float32" or "float16" (exports before it was added: float32)."""
        return str(self.data.get("prompt_dtype", "float32"))

    @property
    def shared_prefix(self) -> int:
        """Leading positions every row of a batch must share (0: none; exports before it was added)."""
        return int(self.data.get("shared_prefix", 0))

    @property
    def packed(self) -> bool:
        """Graphs with ORT's packed (padding-free) attention: CUDA provider only."""
        return self.data.get("attention", "padded") in ("packed", "packed_host")

    @property
    def packed_kernel(self) -> str | None:
        """The packed graphs' attention kernel ('fused' | 'flash'; packed exports before it was recorded:
        'fused'); None for padded graphs."""
        return self.data.get("packed_kernel", "fused") if self.packed else None

    @property
    def packed_ffn(self) -> str | None:
        """The packed graphs' feed-forward block ('matmul' | 'moe' | 'cublaslt' | 'cublaslt_res', the last two
        needing the custom-op library, cliptune_ort.native; packed exports before it was recorded:
        'matmul'); None for padded graphs."""
        return self.data.get("packed_ffn", "matmul") if self.packed else None

    @property
    def packed_front(self) -> str | None:
        """How the packed graphs make their first layer's input: 'gather' (the padded prompt + embeddings sum,
        then a Gather of its real tokens; packed exports before it was recorded) or 'fused' (cliptune's PackAdd,
        one pass; custom-op library); None for padded graphs."""
        return self.data.get("packed_front", "gather") if self.packed else None

    @property
    def needs_ops_library(self) -> bool:
        """Whether the graphs use cliptune's custom-op library (FusedDense, RaggedAttention, PackAdd)."""
        return (self.packed_ffn in LIBRARY_FFNS or self.packed_kernel in LIBRARY_KERNELS
                or self.packed_front == "fused")

    @property
    def host_packing(self) -> bool:
        """Packed graphs that take the packing offsets as inputs (engine.packing_feeds): capturable."""
        return self.data.get("attention", "padded") == "packed_host"

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


def _plain_name(mpath: Path, what: str, name: Any) -> str:
    """A file name the manifest lists must be a plain name inside the model dir (no folders, no '..')."""
    if not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name \
            or "\0" in name:
        raise ModelDirError(f"{mpath}: the {what} file name {name!r} is not a plain file name inside the model "
                            "dir: the manifest is damaged; re-export")
    return name


def _check_structure(mpath: Path, data: dict[str, Any]) -> None:
    """Types and ranges of the fields the runtime reads: one ModelDirError instead of a KeyError later."""

    def bad(field: str, want: str) -> ModelDirError:
        got = data
        for part in field.split("."):
            got = got.get(part) if isinstance(got, dict) else None
        return ModelDirError(f"{mpath}: field {field} is {got!r:.60}, expected {want}: the manifest is damaged; "
                             "re-export the model dir")

    def is_int(v: Any, lo: int = 0) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= lo

    for sub in ("model", "tokenizer", "weights"):
        if not isinstance(data[sub], dict):
            raise bad(sub, "a JSON object")
    model, tok, weights = data["model"], data["tokenizer"], data["weights"]
    for key in ("hidden", "max_positions", "vocab"):
        if not is_int(model.get(key), 1):
            raise bad(f"model.{key}", "a positive integer")
    if not is_int(data["n_prompt"], 1):
        raise bad("n_prompt", "a positive integer")
    ph = data["placeholder_ids"]
    if not (isinstance(ph, list) and len(ph) == data["n_prompt"] and all(is_int(i) for i in ph)
            and max(ph) < model["vocab"]):
        raise bad("placeholder_ids", f"{data['n_prompt']} (n_prompt) token ids below the vocabulary size "
                                     f"{model['vocab']}")
    if data.get("attention", "padded") not in ("padded", "packed", "packed_host"):
        raise bad("attention", "'padded', 'packed' or 'packed_host'")
    if data.get("packed_kernel", "fused") not in PACKED_KERNELS:
        raise bad("packed_kernel", "one of " + ", ".join(f"'{k}'" for k in PACKED_KERNELS))
    if data.get("packed_ffn", "matmul") not in ("matmul", "moe", *LIBRARY_FFNS):
        raise bad("packed_ffn", "'matmul', 'moe', 'cublaslt' or 'cublaslt_res'")
    if data.get("packed_front", "gather") not in PACKED_FRONTS:
        raise bad("packed_front", "'gather' or 'fused'")
    if data.get("packed_q_bias", "projection") not in Q_BIAS_PLACES or (
            data.get("packed_q_bias") == "attention" and data.get("packed_kernel") not in QKV_KERNELS):
        raise bad("packed_q_bias", "'projection', or 'attention' with a QKV kernel (" + ", ".join(QKV_KERNELS) + ")")
    if data.get("int8_weights", "int8") not in INT8_WEIGHTS or ("int8_weights" in data and data["precision"] != "int8"):
        raise bad("int8_weights", "one of " + ", ".join(f"'{w}'" for w in INT8_WEIGHTS) + " in an int8 export only")
    pdt = data.get("prompt_dtype", "float32")
    if pdt not in PROMPT_DTYPES or (pdt == "float16" and data["precision"] != "fp16"):
        raise bad("prompt_dtype", "'float32', or 'float16' for an fp16 export")
    sp = data.get("shared_prefix", 0)
    if not is_int(sp) or sp > data["n_prompt"] + 1:
        raise bad("shared_prefix", f"an integer in 0..{data['n_prompt'] + 1} (n_prompt + 1)")
    if sp and data.get("attention", "padded") != "padded" and (data.get("attention") != "packed_host"
                                                              or data.get("packed_kernel") not in QKV_KERNELS):
        raise bad("shared_prefix", "0 for a packed export other than packed_host with a QKV kernel ("
                  + ", ".join(QKV_KERNELS) + ")")
    std = data["embedding_std"]
    if isinstance(std, bool) or not isinstance(std, (int, float)) or not math.isfinite(std) or std <= 0:
        raise bad("embedding_std", "a positive finite number")
    for key in ("cls_id", "sep_id", "mask_id", "pad_id"):
        if not is_int(tok.get(key)) or tok[key] >= model["vocab"]:
            raise bad(f"tokenizer.{key}", f"a token id below the vocabulary size {model['vocab']}")
    if len({tok["cls_id"], tok["sep_id"], tok["mask_id"], tok["pad_id"]}) != 4:
        raise bad("tokenizer", "four distinct ids cls_id, sep_id, mask_id, pad_id")
    _plain_name(mpath, "tokenizer", tok.get("file"))
    _plain_name(mpath, "weights", weights.get("file"))
    if not isinstance(weights.get("tensors"), list):
        raise bad("weights.tensors", "a list of tensors")
    graphs = data["graphs"]
    if not isinstance(graphs, list) or not graphs:
        raise ModelDirError(f"{mpath} lists no graphs: re-export the model dir")
    for i, g in enumerate(graphs):
        if not isinstance(g, dict):
            raise ModelDirError(f"{mpath}: graph entry {i} is {g!r:.60}, expected a JSON object: re-export")
        if g.get("index") != i:
            raise ModelDirError(f"{mpath}: graph entry {i} has index {g.get('index')!r}, expected {i}: the "
                                "manifest is damaged; re-export")
        _plain_name(mpath, f"graph {i}", g.get("file"))
    for what, entry in [("tokenizer", tok), ("weights", weights)] + [(f"graph {i}", g) for i, g in enumerate(graphs)]:
        sha = entry.get("sha256")
        if not (isinstance(sha, str) and len(sha) == 64 and all(c in "0123456789abcdef" for c in sha)):
            raise ModelDirError(f"{mpath}: the {what} entry has sha256 {sha!r:.70}, expected 64 hex digits: the "
                                "manifest is damaged; re-export")


def _check_tokenizer(man: "Manifest") -> None:
    """The tokenizer file must be the one the manifest describes: its special ids, inside the vocabulary."""
    from tokenizers import Tokenizer

    path = man.tokenizer_path
    info, vocab = man.data["tokenizer"], int(man.data["model"]["vocab"])
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception on bad files
        msg = " ".join(str(e).split())[:200]
        raise ModelDirError(f"{path} is not a readable tokenizers file ({msg}): re-export the model dir") from None
    size = tok.get_vocab_size(with_added_tokens=True)
    if size > vocab or size < vocab // 2 or size <= max(man.data["placeholder_ids"]):
        # far fewer tokens than embedding rows: e.g. the empty default tokenizer transformers makes for a
        # model folder without tokenizer files; every word would become [UNK]
        raise IntegrityError(f"{path} has {size} tokens, the model's vocabulary has {vocab}: the tokenizer belongs to "
                             "another model (or is a default one made for a folder without tokenizer files); copy "
                             "the tokenizer.json of this export, or re-export with the model's tokenizer (--tokenizer)")
    try:
        special = {i: t.content for i, t in tok.get_added_tokens_decoder().items() if t.special}
    except AttributeError:  # tokenizers < 0.14: no special-token table to compare with
        return
    for key in ("cls_id", "sep_id", "mask_id", "pad_id"):
        i = int(info[key])
        if i not in special:
            found = tok.id_to_token(i)
            raise IntegrityError(f"{path}: the manifest's {key} {i} is {found!r} in this tokenizer, expected one of "
                                 f"its special tokens {sorted(special.values())}: the tokenizer does not match "
                                 "the manifest; copy the tokenizer.json of this export or re-export")
    if "mask" not in special[int(info["mask_id"])].lower():
        raise IntegrityError(f"{path}: the manifest's mask_id {info['mask_id']} is "
                             f"{special[int(info['mask_id'])]!r} in this tokenizer, expected its mask token: the "
                             "tokenizer does not match the manifest; re-export")


def load_manifest(model_dir: str | Path, verify: bool = True) -> Manifest:
    """Read and check ``model_dir/manifest.json``; with ``verify`` hash every file it pins.

    Hashes come through a stat cache (:func:`~cliptune_ort.fileio.sha256_files_cached`): a file unchanged
    since it last hashed right is not read again; ``CLIPTUNE_VERIFY=full`` re-reads every file.

    Raises ModelDirError for a missing or incomplete folder, a damaged manifest or an unknown schema
    version, and IntegrityError for a file whose sha256 differs from the manifest, a manifest edited
    after export (its own checksum, when it has one) or a tokenizer that does not match it.
    """
    root = Path(model_dir)
    if not root.is_dir():
        if root.exists():
            raise ModelDirError(f"model dir {root} is a file: expected the folder written by "
                                f"`cliptune export MODEL --out DIR`; pass that folder")
        raise ModelDirError(f"model dir {root} does not exist: run `cliptune export MODEL --out {root}` first")
    mpath = root / MANIFEST_NAME
    if not mpath.is_file():
        raise ModelDirError(f"model dir {root} has no {MANIFEST_NAME}: expected a folder written by "
                            f"`cliptune export`; re-export it")
    try:
        data = json.loads(mpath.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise ModelDirError(f"{mpath} is not valid JSON ({' '.join(str(e).split())[:120]}): re-export the "
                            "model dir") from None
    except OSError as e:
        raise ModelDirError(f"cannot read {mpath} ({e.strerror}): check the file's permissions") from None
    if not isinstance(data, dict):
        raise ModelDirError(f"{mpath} holds a {type(data).__name__}, expected a JSON object: re-export")
    ver = data.get("schema_version")
    if not isinstance(ver, int) or isinstance(ver, bool):
        raise ModelDirError(f"{mpath} has schema_version {ver!r:.40}, expected an integer: re-export the model dir")
    if ver > SCHEMA_VERSION:
        raise ModelDirError(f"{mpath} has schema_version {ver}, newer than this cliptune-ort reads "
                            f"({SCHEMA_VERSION}): upgrade cliptune-ort or re-export with this version")
    if ver < 1:
        raise ModelDirError(f"{mpath} has unknown schema_version {ver}, expected 1..{SCHEMA_VERSION}: re-export "
                            "the model dir")
    missing = [k for k in _REQUIRED if k not in data]
    if missing:
        raise ModelDirError(f"{mpath} lacks {', '.join(missing)}: the manifest is incomplete; re-export")
    if CHECKSUM_FIELD in data:
        try:
            ok = data[CHECKSUM_FIELD] == manifest_checksum(data)
        except ValueError:  # NaN/inf somewhere: never written by the exporter
            ok = False
        if not ok:
            raise IntegrityError(f"{mpath} was edited after export (its {CHECKSUM_FIELD} does not match its "
                                 "content): restore the original manifest.json or re-export")
    _check_structure(mpath, data)
    man = Manifest(root, data)
    files = [(f"graph {g['index']}", root / g["file"], g["sha256"]) for g in data["graphs"]]
    files.append(("weights", man.weights_path, data["weights"]["sha256"]))
    files.append(("tokenizer", man.tokenizer_path, data["tokenizer"]["sha256"]))
    for what, path, _ in files:
        if not path.is_file():
            raise ModelDirError(f"model dir {root} is incomplete: {what} file {path.name} is missing; "
                                "copy the whole folder or re-export")
    if verify:
        full = _verify_mode() == "full"
        shas = sha256_files_cached([path for _, path, _ in files], _hash_cache_file(), rehash=full)
        for (what, path, want), got in zip(files, shas):
            if got != want:
                raise IntegrityError(f"{path} has sha256 {got[:16]}.., the manifest pins {str(want)[:16]}..: "
                                     f"the {what} file was changed or comes from another export; re-export")
        _check_tokenizer(man)
    return man
