"""Export a Hugging Face masked LM into K+1 ONNX graphs (full + thinned) sharing one weight file.

Steps (kept separate, the optimum way): load -> draw masks -> export each graph -> move the weights
into one shared external-data file -> validate every graph against the hook-based PyTorch reference
with the same mask -> write the manifest. Everything is written into a temporary folder that is
renamed into place at the very end: a failed export leaves nothing behind.

A graph is traced once per structure, not once per graph: fp32 and int8 (masks as Mul nodes) trace (and
quantise) graph 0 and one thinned graph (:class:`MaskTemplate`) and write every thinned graph from the
latter with its own masks; each graph's weights go straight into the shared file (:class:`WeightsWriter`),
the tensors the graphs share hashed once. The files are the ones tracing every graph gives, byte for byte
(tests).

fp16 (the CUDA path): masks folded into the weights, ONNX Runtime's transformer fusions (one
Attention per full-sequence layer, SkipLayerNormalization, BiasGelu), float16 weights, float32
inputs and outputs; graph 0 is traced and fused once and every graph written from it
(:class:`Fp16Template`), then validated like any other (atol 2e-2).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import os
import shutil
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from cliptune_ort import __version__
from cliptune_ort.errors import CliptuneError, ConfigError, ModelDirError
from cliptune_ort.fileio import atomic_write_json
from cliptune_ort.manifest import (DEFAULT_INT8_WEIGHTS, INT8_WEIGHTS, MANIFEST_NAME, SCHEMA_VERSION, WEIGHTS_NAME,
                                   pin_sha256, seal_manifest)

#: initializers at least this large go to the shared weight file; smaller ones (masks, biases of
#: small models) stay inside each graph
EXTERNAL_MIN_BYTES = 4096


class ExportError(CliptuneError):
    """The export failed (parity above tolerance, unsupported model, bad options)."""


@dataclass
class ExportOptions:
    """Every export default in one place."""

    k: int = 4  # number of thinned graphs (graph 0 is always the full network)
    p: float = 0.1  # dropout rate of the stationary masks; kept units are scaled by 1/(1-p)
    seed: int = 0  # mask seeds are seed + k for graph k (recorded per graph)
    n_prompt: int = 50  # L, the number of soft-prompt positions
    placeholder_offset: int = 1000  # BBT: prompt positions hold vocabulary ids offset .. offset+L-1
    opset: int = 17  # legacy exporter; keeps the attention pattern ORT's optimizer fuses
    atol: float | None = None  # parity tolerance (max abs diff) vs the masked PyTorch reference;
    # None = 1e-4 for fp32, 2e-2 for fp16; int8 is judged by relative RMS instead (int8_rel_rms)
    int8_rel_rms: float = 0.15  # int8: max RMS(ort - torch) / RMS(torch) accepted
    fold_masks: bool | None = None  # fold masks into weights (keeps ORT's fusions, no weight sharing
    # for the folded tensors); None = on for fp16 (GPU), off otherwise
    share_prefix: bool | None = None  # project the first layer's Q/K/V of [CLS] + prompt once per candidate
    # (wrapper.shared_prefix_linear, exact); None = on for fp32/int8 (CPU), off for fp16 (keeps ORT's
    # Attention fusion on CUDA)
    random_init: bool = False  # build the model from config.json with random weights (benchmarks)
    init_seed: int = 0  # torch seed for random_init
    tokenizer: str | None = None  # tokenizer folder/id when it differs from the model's
    overwrite: bool = False
    precision: str = "fp32"  # fp32 | fp16 (CUDA) | int8 (dynamic per-channel quantisation, CPU edge mode)
    int8_weights: str = DEFAULT_INT8_WEIGHTS  # int8: the weights' format (manifest.INT8_WEIGHTS: int7 | uint8 | int8)
    packed: bool | str = False  # fp16 only: ORT's packed (padding-free) attention, CUDA provider only
    # (packing.py): True / "device" = RemovePadding in the graph; "host" = the runtime feeds the packing
    # (CUDA-graph capturable); the graphs are validated against PyTorch before they are packed
    packed_kernel: str = "flash"  # packing.KERNELS: "fused" (PackedAttention) | "flash" (PackedMultiHeadAttention)
    # packing.FFNS: "matmul" (ORT's MatMul + BiasGelu) | "cublaslt" (cliptune's FusedDense op: bias and GELU
    # in the GEMM epilogue; the sessions need `cliptune build-ops --variant cuda`) | "moe" (experimental)
    packed_ffn: str = "matmul"
    # packing.FRONTS ("host" packing only): "gather" (ORT's Add over the padded sum, then Gather) | "fused"
    # (cliptune's PackAdd op: the packed first-layer input in one pass; custom-op library)
    packed_front: str = "gather"
    # the graphs' prompt_embeds type (manifest prompt_dtype): "float32", or "float16" (packed fp16 exports: a call
    # on host prompts sends half the bytes; the runtime casts them on the host; packing.prompt_input_fp16)
    prompt_dtype: str = "float32"
    # where a QKV kernel's query bias is added: "projection" (the QKV GEMM's bias epilogue) | "attention"
    # (RaggedAttention adds it; the GEMM runs without an epilogue; packing.pack_graph qbias)
    packed_q_bias: str = "projection"

    def validate(self) -> None:
        if not isinstance(self.k, int) or self.k < 0:
            raise ConfigError(f"--k must be an integer >= 0 (number of thinned graphs), got {self.k!r}")
        if not (0.0 < self.p < 1.0):
            raise ConfigError(f"--p must be in (0, 1) (dropout rate), got {self.p!r}")
        if not isinstance(self.n_prompt, int) or self.n_prompt < 1:
            raise ConfigError(f"--n-prompt must be an integer >= 1, got {self.n_prompt!r}")
        if self.precision not in ("fp32", "fp16", "int8"):
            raise ConfigError(f"--precision must be fp32, fp16 or int8, got {self.precision!r}")
        if self.int8_weights not in INT8_WEIGHTS:
            raise ConfigError(f"--int8-weights must be one of {', '.join(INT8_WEIGHTS)}, got {self.int8_weights!r}")
        if self.atol is not None and self.atol <= 0:
            raise ConfigError(f"--atol must be > 0, got {self.atol!r}")
        if self.packed not in (False, True, "", "device", "host"):
            raise ConfigError(f"--packed must be 'device' or 'host', got {self.packed!r}")
        from .packing import KERNELS

        if self.packed_kernel not in KERNELS:
            raise ConfigError(f"--packed-kernel must be one of {', '.join(KERNELS)}, got {self.packed_kernel!r}")
        from .packing import FFNS

        if self.packed_ffn not in FFNS:
            raise ConfigError(f"--packed-ffn must be one of {', '.join(FFNS)}, got {self.packed_ffn!r}")
        if self.packed_ffn != "matmul" and not self.packed:
            raise ConfigError(f"--packed-ffn {self.packed_ffn} needs --packed (it rewrites the packed layers)")
        from .packing import FRONTS

        if self.packed_front not in FRONTS:
            raise ConfigError(f"--packed-front must be one of {', '.join(FRONTS)}, got {self.packed_front!r}")
        if self.packed_front != "gather" and self.packed != "host":
            raise ConfigError(f"--packed-front {self.packed_front} needs --packed host (it reads the runtime's "
                              "packing offsets)")
        if self.packed and self.precision != "fp16":
            raise ConfigError("--packed needs --precision fp16 (ORT fuses Attention only there; packed attention "
                              "runs on the CUDA provider only)")
        from cliptune_ort.manifest import Q_BIAS_PLACES

        from .packing import PROMPT_DTYPES, QKV_KERNELS

        if self.prompt_dtype not in PROMPT_DTYPES:
            raise ConfigError(f"--prompt-dtype must be one of {', '.join(PROMPT_DTYPES)}, got {self.prompt_dtype!r}")
        if self.packed_q_bias not in Q_BIAS_PLACES:
            raise ConfigError(f"--packed-q-bias must be {' or '.join(Q_BIAS_PLACES)}, got {self.packed_q_bias!r}")
        if self.packed_q_bias == "attention" and not (self.packed and self.packed_kernel in QKV_KERNELS):
            raise ConfigError("--packed-q-bias attention needs --packed and --packed-kernel "
                              + " or ".join(QKV_KERNELS) + f", got --packed-kernel {self.packed_kernel}"
                              + ("" if self.packed else " without --packed"))
        if self.prompt_dtype == "float16" and not self.packed:
            raise ConfigError("--prompt-dtype float16 needs --packed (packed fp16 graphs run on CUDA, where host prompts "
                              "are copied to the device; unpacked graphs keep float32 prompts)")

        if self.packed and self.share_prefix and (self.packed != "host" or self.packed_kernel not in QKV_KERNELS):
            raise ConfigError("--share-prefix with --packed needs --packed host and --packed-kernel "
                              + " or ".join(QKV_KERNELS) + " (the first layer's shared rows are read through "
                              "RaggedAttention's token map), got --packed "
                              f"{'host' if self.packed == 'host' else 'device'} --packed-kernel {self.packed_kernel}")

    def resolved_atol(self) -> float:
        return self.atol if self.atol is not None else {"fp32": 1e-4, "fp16": 2e-2, "int8": float("inf")}[
            self.precision]

    def resolved_fold(self) -> bool:
        return self.fold_masks if self.fold_masks is not None else self.precision == "fp16"

    def resolved_share_prefix(self) -> bool:
        """Whether the graphs share the first layer's [CLS] + prompt rows (the manifest's shared_prefix)."""
        return self.share_prefix if self.share_prefix is not None else self.precision != "fp16"

    def traced_share_prefix(self) -> bool:
        """Whether the traced graph projects them once (:func:`wrapper.shared_prefix_linear`): not for packed
        exports, whose packing does it after ORT's fusions (which the traced form would break)."""
        return self.resolved_share_prefix() and not self.packed


#: when the running export started (its log lines carry the seconds since, so a slow phase shows)
_T0 = time.perf_counter()


def _log(msg: str) -> None:
    print(f"[export] {time.perf_counter() - _T0:6.1f} s  {msg}", file=sys.stderr, flush=True)


def draw_masks(site_names: list[str], hidden: int, p: float, mask_seed: int) -> dict[str, np.ndarray]:
    """One mask [hidden] per site, values in {0, 1/(1-p)}, drawn in site order from ``mask_seed``."""
    rng = np.random.default_rng(mask_seed)
    scale = np.float32(1.0 / (1.0 - p))
    return {
        name: ((rng.random(hidden) >= p).astype(np.float32) * scale).astype(np.float32) for name in site_names
    }


def _load(model: str, opts: ExportOptions):
    """Load (mlm, tokenizer, arch) from a local folder or a hub id."""
    import torch
    from transformers import AutoConfig, AutoModelForMaskedLM, AutoTokenizer

    from .wrapper import ARCHS

    local = Path(model)
    if local.exists() and not local.is_dir():
        raise ModelDirError(f"model {model!r} is a file: expected a Hugging Face model folder or hub id")
    if local.is_dir() and not (local / "config.json").is_file():
        raise ModelDirError(
            f"model folder {model} has no config.json: expected a Hugging Face masked-LM folder "
            "(config.json, weights, tokenizer files)"
        )
    try:
        config = AutoConfig.from_pretrained(model)
    except (OSError, ValueError) as e:
        raise ModelDirError(
            f"cannot read a model config from {model!r} ({str(e).splitlines()[0]}): pass a local model "
            "folder or a hub id reachable from this machine"
        ) from None
    if config.model_type not in ARCHS:
        raise ModelDirError(
            f"model_type {config.model_type!r} is not supported: expected one of {sorted(ARCHS)} "
            "(a BERT- or RoBERTa-style masked LM)"
        )
    config._attn_implementation = "eager"
    try:
        if opts.random_init:
            torch.manual_seed(opts.init_seed)
            mlm = AutoModelForMaskedLM.from_config(config, attn_implementation="eager")
        else:
            mlm, info = AutoModelForMaskedLM.from_pretrained(model, attn_implementation="eager",
                                                             output_loading_info=True)
            head = [k for k in info.get("missing_keys", []) if k.startswith(("cls.", "lm_head."))
                    and not k.endswith("decoder.weight")]  # the decoder weight is tied to the embeddings
            if head:
                raise ModelDirError(f"{model} has no trained MLM head (missing {', '.join(sorted(head)[:3])}): "
                                    "expected a *ForMaskedLM checkpoint; export a model that has its MLM head")
    except (OSError, ValueError) as e:
        raise ModelDirError(
            f"cannot load masked-LM weights from {model!r} ({str(e).splitlines()[0]}): the folder needs "
            "model.safetensors or pytorch_model.bin of a *ForMaskedLM model (or pass --random-init)"
        ) from None
    mlm.eval()
    tok_src = opts.tokenizer or model
    try:
        tok = AutoTokenizer.from_pretrained(tok_src)
    except (OSError, ValueError) as e:
        raise ModelDirError(
            f"cannot load a tokenizer from {tok_src!r} ({str(e).splitlines()[0]}): add tokenizer files "
            "to the model folder or pass --tokenizer"
        ) from None
    if len(tok) > config.vocab_size or len(tok) < config.vocab_size // 2:
        raise ModelDirError(f"the tokenizer of {tok_src!r} has {len(tok)} tokens, the model's vocabulary "
                            f"{config.vocab_size}: the tokenizer belongs to another model; pass --tokenizer")
    if not getattr(tok, "is_fast", False):
        raise ModelDirError(f"tokenizer of {tok_src!r} is not a fast tokenizer: a tokenizer.json is needed")
    if tok.mask_token_id is None:
        raise ModelDirError(f"tokenizer of {tok_src!r} has no mask token: expected a masked-LM tokenizer")
    return mlm, tok, ARCHS[config.model_type]


def _dummy_inputs(rng: np.random.Generator, pop: int, batch: int, seq: int, n_prompt: int, hidden: int,
                  vocab: int, pad_id: int, scale: float, n_labels: int):
    """Random contract inputs with right padding of varied length, as numpy arrays."""
    ids = rng.integers(1000, min(vocab, 30000), size=(batch, seq)).astype(np.int64)
    ids[:, :n_prompt + 1] = ids[0, :n_prompt + 1]  # the contract: [CLS] + placeholders equal in every row
    lengths = rng.integers(n_prompt + 3, seq + 1, size=batch)
    lengths[0] = seq
    am = (np.arange(seq)[None, :] < lengths[:, None]).astype(np.int64)
    ids[am == 0] = pad_id
    mask_pos = np.array([rng.integers(n_prompt + 1, n) for n in lengths], dtype=np.int64)
    prompt = (rng.standard_normal((pop, n_prompt, hidden)) * scale).astype(np.float32)
    verb = rng.choice(np.arange(1000, min(vocab, 30000)), size=n_labels, replace=False).astype(np.int64)
    return {"input_ids": ids, "attention_mask": am, "mask_pos": mask_pos, "prompt_embeds": prompt,
            "verbalizer_ids": verb}


class WeightsWriter:
    """The content-addressed ``weights.bin``, written as tensors come (a tensor is in memory only while it is
    added): every tensor gets the name ``w_<sha256 prefix>`` of its dtype, shape and bytes, so identical tensors
    in any graph share one name and one copy, at a 64-byte aligned offset, in order of first appearance."""

    def __init__(self, path: Path):
        self._f = open(path, "wb")  # noqa: SIM115 (closed by close(), after the last graph)
        self.table: dict[str, dict] = {}
        self.offset = 0

    def add(self, arr: np.ndarray) -> str:
        """Store ``arr`` unless a tensor of the same content is stored; returns its name."""
        arr = np.ascontiguousarray(arr)
        key = hashlib.sha256(str(arr.dtype).encode() + str(arr.shape).encode() + arr.data).hexdigest()
        name = f"w_{key[:24]}"
        if name not in self.table:
            pad = (-self.offset) % 64  # 64-byte alignment for every tensor
            if pad:
                self._f.write(b"\0" * pad)
                self.offset += pad
            self.table[name] = {"name": name, "dtype": str(arr.dtype), "shape": list(arr.shape),
                                "offset": self.offset, "length": arr.nbytes}
            self._f.write(arr.data)
            self.offset += arr.nbytes
        return name

    def external(self, name: str, data_type: int):
        """A TensorProto that points at stored tensor ``name``."""
        import onnx

        ext = onnx.TensorProto()
        ext.name = name
        ext.data_type = data_type
        ext.dims.extend(self.table[name]["shape"])
        ext.data_location = onnx.TensorProto.EXTERNAL
        for k, v in (("location", WEIGHTS_NAME), ("offset", str(self.table[name]["offset"])),
                     ("length", str(self.table[name]["length"]))):
            e = ext.external_data.add()
            e.key, e.value = k, v
        return ext

    def close(self) -> list[dict]:
        """Flush and fsync the file; returns the table of stored tensors: name, dtype, shape, offset, length."""
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        return list(self.table.values())


def _externalised(inits, writer: WeightsWriter, names: dict | None = None) -> tuple[list, dict[str, str]]:
    """Initializers ``inits`` with every one of at least EXTERNAL_MIN_BYTES moved into ``writer``: returns (the
    initializers to keep, small ones and external references named by content, in order; {old name: content
    name}). A tensor twice in one graph (tied weights) is kept once. ``names`` maps an initializer's index to
    its content name where the caller knows it already (it is stored then; the template's unchanged tensors)."""
    from onnx import numpy_helper

    rename: dict[str, str] = {}
    keep = []
    seen_here: set[str] = set()
    for i, init in enumerate(inits):
        name = (names or {}).get(i)
        if name is None:
            arr = numpy_helper.to_array(init)
            if arr.nbytes < EXTERNAL_MIN_BYTES:
                keep.append(init)
                continue
            name = writer.add(arr)
        rename[init.name] = name
        if name in seen_here:
            continue
        seen_here.add(name)
        keep.append(writer.external(name, init.data_type))
    return keep, rename


def _set_initializers(m, keep: list, rename: dict[str, str]) -> None:
    """Give graph ``m`` the initializers ``keep`` and point its nodes' inputs at the new names."""
    del m.graph.initializer[:]
    m.graph.initializer.extend(keep)
    for node in m.graph.node:
        for j, inp in enumerate(node.input):
            if inp in rename:
                node.input[j] = rename[inp]


def _without_initializers(m):
    """A copy of ModelProto ``m`` without its graph's initializers (field by field: the weights are not copied)."""
    import onnx

    out = onnx.ModelProto()
    for field, value in m.ListFields():
        if field.name != "graph":
            _copy_field(out, field, value)
    for field, value in m.graph.ListFields():
        if field.name != "initializer":
            _copy_field(out.graph, field, value)
    return out


def _share_weights(tmp: Path, graph_files: list[str]) -> list[dict]:
    """Move every large initializer of every graph into one content-addressed ``weights.bin``
    (:class:`WeightsWriter`), one graph at a time.

    Identical tensors get identical names (``w_<sha256 prefix>``) in every graph, so the runtime can
    hand each tensor to all sessions once (``SessionOptions.add_initializer``). Returns the table of
    shared tensors: name, dtype, shape, offset, length.
    """
    writer = WeightsWriter(tmp / WEIGHTS_NAME)
    try:
        for gf in graph_files:
            _externalise_file(tmp, gf, writer)
    finally:
        table = writer.close()
    for leftover in tmp.glob("*.onnx.data"):
        leftover.unlink()
    return table


def _externalise_file(tmp: Path, gf: str, writer: WeightsWriter) -> None:
    """Rewrite graph file ``gf`` with its large initializers in ``writer``'s shared file (its own external data
    files removed)."""
    import onnx

    m = onnx.load(str(tmp / gf), load_external_data=True)
    for old in tmp.glob(gf + "*.data"):
        old.unlink()
    _write_externalised(m, tmp / gf, writer)


def _write_externalised(model, path: Path, writer: WeightsWriter) -> None:
    """Write ``model`` (data inline) to ``path`` with its large initializers in ``writer``'s shared file."""
    _set_initializers(model, *_externalised(model.graph.initializer, writer))
    path.write_bytes(model.SerializeToString())


def export_model(model: str, out: str | os.PathLike, opts: ExportOptions | None = None) -> dict:
    """Export ``model`` (local folder or hub id) into ``out``; returns the manifest dict."""
    import torch

    from .reference import reference_logits
    from .wrapper import ContractModel, dropout_sites

    global _T0
    opts = opts or ExportOptions()
    opts.validate()
    _T0 = time.perf_counter()
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        if not opts.overwrite:
            raise ConfigError(f"output folder {out} exists and is not empty: pass --overwrite or another --out")
    t0 = time.perf_counter()
    _log(f"loading {model}")
    mlm, tok, arch = _load(model, opts)
    cfg = mlm.config
    hidden, vocab = cfg.hidden_size, cfg.vocab_size
    max_pos = cfg.max_position_embeddings - (cfg.pad_token_id + 1 if arch.family == "roberta" else 0)
    if opts.placeholder_offset + opts.n_prompt > vocab:
        raise ConfigError(f"placeholder ids {opts.placeholder_offset}..{opts.placeholder_offset + opts.n_prompt - 1} "
                          f"exceed the vocabulary ({vocab}): lower --n-prompt")
    if opts.n_prompt + 8 > max_pos:
        raise ConfigError(f"--n-prompt {opts.n_prompt} leaves no room for text in {max_pos} positions")
    word_emb = getattr(mlm, arch.base_attr).embeddings.word_embeddings.weight.detach()
    emb_std = float(word_emb.float().std())
    site_names = [s[0] for s in dropout_sites(mlm, arch)]
    export_id = uuid.uuid4().hex

    graphs = [{"index": 0, "kind": "full", "mask_seed": None, "p": 0.0}]
    for k in range(1, opts.k + 1):
        graphs.append({"index": k, "kind": "thinned", "mask_seed": opts.seed + k, "p": opts.p})

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=str(out.parent)))
    os.chmod(tmp, 0o755)
    try:
        rng = np.random.default_rng(1234)
        example = _dummy_inputs(rng, 2, 2, opts.n_prompt + 8, opts.n_prompt, hidden, vocab,
                                tok.pad_token_id, emb_std, 2)
        masks_np = {}
        args = tuple(torch.from_numpy(example[n]) for n in
                     ("input_ids", "attention_mask", "mask_pos", "prompt_embeds", "verbalizer_ids"))
        # fp16 with folded masks: every graph has graph 0's structure, so trace and fuse once and
        # write each graph with its own folded tensors (None: not applicable, trace every graph)
        template = Fp16Template.build(mlm, arch, tmp, args, opts) if (
            opts.precision == "fp16" and opts.resolved_fold()) else None
        # fp32 or int8, masks as Mul nodes: graph 0 traced, every thinned graph written from one traced thinned
        # graph (int8: quantised once)
        thinned = MaskTemplate.build(mlm, arch, tmp, args, opts, site_names, hidden) if (
            opts.precision in ("fp32", "int8") and not opts.resolved_fold() and opts.k >= 2) else None
        writer = WeightsWriter(tmp / WEIGHTS_NAME) if template is not None or thinned is not None else None
        for g in graphs:
            gf = f"graph_{g['index']}.onnx"
            masks = None
            if g["kind"] == "thinned":
                masks_np[g["index"]] = draw_masks(site_names, hidden, opts.p, g["mask_seed"])
                masks = {k: torch.from_numpy(v) for k, v in masks_np[g["index"]].items()}
            g["file"] = gf
            if template is not None:
                _log(f"writing {gf} ({g['kind']}): the fused fp16 graph with this graph's folded tensors, "
                     "its weights into the shared file")
                template.write_shared(tmp / gf, masks_np.get(g["index"]), writer)
                continue
            if thinned is not None and g["kind"] == "thinned":
                _log(f"writing {gf} (thinned): the traced thinned graph with this graph's masks, its weights into "
                     "the shared file")
                thinned.write_shared(tmp / gf, masks_np[g["index"]], writer)
                continue
            wrapped = ContractModel(copy.deepcopy(mlm), arch, masks, fold_masks=opts.resolved_fold(),
                                    share_prefix=opts.traced_share_prefix()).eval()
            _log(f"exporting {gf} ({g['kind']})")
            trace_graph(wrapped, args, tmp / gf, opts.opset)
            del wrapped
            if thinned is not None:  # graph 0, converted in memory: its weights first into the shared file
                model_0 = _Template.converted(tmp / gf, opts.precision, cfg.num_attention_heads, hidden, gf,
                                              opts.int8_weights)
                _write_externalised(model_0, tmp / gf, writer)
                del model_0
            elif opts.precision != "fp32":
                _log(f"converting {gf} to {opts.precision}")
                convert_precision(tmp / gf, opts.precision, cfg.num_attention_heads, hidden,
                                  int8_weights=opts.int8_weights)
        del template, thinned
        if writer is not None:
            weights = writer.close()
        else:
            _log("sharing weights across graphs")
            weights = _share_weights(tmp, [g["file"] for g in graphs])
        _stamp_metadata(tmp, graphs, export_id)
        # tokenizer
        tok.backend_tokenizer.save(str(tmp / "tokenizer.json"))
        # parity on shapes other than the export shapes (traced at pop 2, batch 2, L + 8): pop 3, batch 3,
        # L + 13, rows right-padded to varied lengths. Its cost is the two forward passes per graph (ORT and
        # PyTorch): 9 rows instead of the 15 (pop 3, batch 5, L + 21) of earlier exporters, which spent most of
        # a roberta-large export's validation there
        _log("validating every graph against the masked PyTorch reference")
        check = _dummy_inputs(np.random.default_rng(99), 3, 3, opts.n_prompt + 13, opts.n_prompt, hidden,
                              vocab, tok.pad_token_id, emb_std, 3)
        import onnxruntime as ort

        outputs = []
        for g in graphs:
            masks = None
            if g["kind"] == "thinned":
                masks = {k: torch.from_numpy(v) for k, v in masks_np[g["index"]].items()}
            ref = reference_logits(mlm, arch, masks, *(torch.from_numpy(check[n]) for n in
                                   ("input_ids", "attention_mask", "mask_pos", "prompt_embeds",
                                    "verbalizer_ids"))).numpy()
            so = ort.SessionOptions()
            so.log_severity_level = 3
            sess = ort.InferenceSession(str(tmp / g["file"]), so, providers=["CPUExecutionProvider"])
            got = sess.run(["logits"], check)[0].astype(np.float32)
            diff = float(np.max(np.abs(got - ref)))
            rel = float(np.sqrt(np.mean((got - ref) ** 2)) / max(np.sqrt(np.mean(ref ** 2)), 1e-12))
            atol = opts.resolved_atol()
            g["max_abs_diff"] = diff
            g["rel_rms_diff"] = rel
            g["atol"] = atol if np.isfinite(atol) else None
            outputs.append(got)
            _log(f"  {g['file']}: max |ort - torch| = {diff:.2e}, relative RMS {rel:.2e}")
            if not np.isfinite(diff) or diff > atol:
                raise ExportError(f"{g['file']} differs from the masked PyTorch reference by {diff:.3e} "
                                  f"(> atol {atol}): the export is wrong; please report it")
            if opts.precision == "int8" and rel > opts.int8_rel_rms:
                raise ExportError(f"{g['file']} (int8) drifts {rel:.3f} relative RMS from the reference "
                                  f"(> {opts.int8_rel_rms}): use --precision fp32 for this model"
                                  + ("" if opts.int8_weights == "int7" else ", or --int8-weights int7"))
            del sess
        for i in range(len(graphs)):
            for j in range(i + 1, len(graphs)):
                if np.array_equal(outputs[i], outputs[j]):
                    raise ExportError(f"graphs {i} and {j} give identical logits: masks were not applied")
        if opts.packed:
            from .packing import pack_graph_file

            _log(f"packing attention ({opts.packed_kernel} kernel, {opts.packed_ffn} feed-forward, {opts.packed_front} "
                 "front; CUDA provider only)")
            for g in graphs:
                g["packed_attention_nodes"] = pack_graph_file(tmp / g["file"], host_offsets=opts.packed == "host",
                                                              kernel=opts.packed_kernel, ffn=opts.packed_ffn,
                                                              front=opts.packed_front,
                                                              prefix=opts.resolved_share_prefix(),
                                                              prompt_fp16=opts.prompt_dtype == "float16",
                                                              qbias=opts.packed_q_bias == "attention")
        for g in graphs:
            g["sha256"] = pin_sha256(tmp / g["file"])
        manifest = {
            "schema_version": SCHEMA_VERSION,
            "created_by": f"cliptune-ort {__version__}",
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "export_id": export_id,
            "model": {
                "source": str(model),
                "architecture": type(mlm).__name__,
                "model_type": arch.model_type,
                "hidden": hidden,
                "layers": cfg.num_hidden_layers,
                "heads": cfg.num_attention_heads,
                "vocab": vocab,
                "max_positions": max_pos,
                "random_init": opts.random_init,
                "parameters": int(sum(p.numel() for p in mlm.parameters())),
            },
            "tokenizer": {
                "file": "tokenizer.json",
                "sha256": pin_sha256(tmp / "tokenizer.json"),
                "cls_id": tok.cls_token_id, "sep_id": tok.sep_token_id,
                "mask_id": tok.mask_token_id, "pad_id": tok.pad_token_id,
                "lowercase": bool(getattr(tok, "do_lower_case", False)),
            },
            "n_prompt": opts.n_prompt,
            "placeholder_ids": list(range(opts.placeholder_offset, opts.placeholder_offset + opts.n_prompt)),
            "embedding_std": emb_std,
            "opset": opts.opset,
            "dtype": "float32",  # of the prompt_embeds input and logits output (all precisions)
            "precision": opts.precision,
            **({"int8_weights": opts.int8_weights} if opts.precision == "int8" else {}),
            "masks_folded": opts.resolved_fold(),
            "attention": ("packed_host" if opts.packed == "host" else "packed") if opts.packed else "padded",
            **({"packed_kernel": opts.packed_kernel, "packed_ffn": opts.packed_ffn,
                "packed_front": opts.packed_front} if opts.packed else {}),
            "prompt_dtype": opts.prompt_dtype,
            **({"packed_q_bias": opts.packed_q_bias} if opts.packed else {}),
            # positions 0..L projected once per candidate in the first layer: every row of a batch must
            # hold the same ids there (the runtime checks); 0 = no such requirement
            "shared_prefix": opts.n_prompt + 1 if opts.resolved_share_prefix() else 0,
            "k": opts.k,
            "p": opts.p,
            "seed": opts.seed,
            "mask_sites": site_names,
            "weights": {"file": WEIGHTS_NAME, "sha256": pin_sha256(tmp / WEIGHTS_NAME), "tensors": weights},
            "graphs": graphs,
            "export_options": asdict(opts),
            "export_seconds": round(time.perf_counter() - t0, 2),
        }
        atomic_write_json(tmp / MANIFEST_NAME, seal_manifest(manifest))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _log(f"wrote {out} ({len(graphs)} graphs) in {time.perf_counter() - t0:.1f} s")
    return manifest


def trace_graph(wrapped, args: tuple, path: Path, opset: int) -> None:
    """``torch.onnx.export`` of a :class:`ContractModel` with the contract's names and dynamic axes."""
    import torch

    with torch.inference_mode(), _quiet_export():
        torch.onnx.export(
            wrapped, args, str(path),
            input_names=["input_ids", "attention_mask", "mask_pos", "prompt_embeds", "verbalizer_ids"],
            output_names=["logits"],
            dynamic_axes={"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"},
                          "mask_pos": {0: "batch"}, "prompt_embeds": {0: "pop", 1: "L"},
                          "verbalizer_ids": {0: "labels"}, "logits": {0: "pop", 1: "batch", 2: "labels"}},
            opset_version=opset, do_constant_folding=True, dynamo=False,
            external_data=True,
        )


class _Template:
    """A traced graph held in memory (weights inline) that several graphs of an export are written from: each
    differs from it only in the initializers ``where`` names, which :meth:`_fold` sets for that graph."""

    model: object  # the ModelProto
    where: dict  # key -> initializer proto in self.model
    _names: dict[int, str] | None  # initializer index -> content name, for the ones no graph changes (once known)

    def _fold(self, masks: dict[str, np.ndarray] | None) -> None:
        raise NotImplementedError

    @staticmethod
    def converted(path: Path, precision: str, heads: int, hidden: int, what: str,
                  int8_weights: str = DEFAULT_INT8_WEIGHTS):
        """The traced graph at ``path`` converted to ``precision`` (unless fp32) and loaded with its data inline;
        its files removed."""
        import onnx

        if precision != "fp32":
            _log(f"converting {what} to {precision}")
            return convert_precision(path, precision, heads, hidden, keep=False, int8_weights=int8_weights)
        model = onnx.load(str(path), load_external_data=True)
        path.unlink()
        for leftover in path.parent.glob(path.name + "*.data"):
            leftover.unlink()
        return model

    def write_shared(self, path: Path, masks: dict[str, np.ndarray] | None, writer: WeightsWriter) -> None:
        """One graph with its weights in ``writer``'s shared file: what writing the graph whole and then
        :func:`_share_weights` on it gives, byte for byte, without serialising the whole model and reading it
        back: the tensors every graph shares are named (hashed) once, and only the graph's own tensors go to
        ``writer`` (tests/test_fp16.py and tests/test_export.py compare the two ways)."""
        self._fold(masks)
        inits = self.model.graph.initializer
        keep, rename = _externalised(inits, writer, self._names)
        if self._names is None:  # content names of the tensors no graph changes, for the next graphs
            own = {init.name for init in self.where.values()}
            self._names = {i: rename[init.name] for i, init in enumerate(inits)
                           if init.name in rename and init.name not in own}
        out = _without_initializers(self.model)
        _set_initializers(out, keep, rename)
        path.write_bytes(out.SerializeToString())


class MaskTemplate(_Template):
    """One traced thinned graph that every thinned graph of an fp32 or int8 export (masks not folded: a Mul by a
    [hidden] mask at every site) is written from. Tracing a large model costs about 16 s a graph (roberta-large,
    2 cores), and int8's quantisation more, for the same graph each time: so one thinned network is traced (and
    quantised) with unique random *tag* masks, each tag is found again among its initializers (exactly once, or
    :meth:`build` returns None and every graph is traced), and each thinned graph is that graph with its own
    masks in their place. Graph 0 (no Mul nodes) is traced on its own. Every graph is still validated against
    the masked PyTorch reference."""

    def __init__(self, model, where: dict):
        self.model = model  # the traced ModelProto (all data inline)
        self.where = where  # site -> initializer proto (float32 [hidden]) in self.model
        self._names = None

    @classmethod
    def build(cls, mlm, arch, tmp: Path, args: tuple, opts: ExportOptions, site_names: list[str],
              hidden: int) -> MaskTemplate | None:
        import onnx
        import torch
        from onnx import numpy_helper

        from .wrapper import ContractModel

        rng = np.random.default_rng(20240612)
        # |tag| in [0.5, 1.5) with random signs: never a mask value (0 or 1/(1-p) > 0 for every site at once)
        tags = {name: (rng.uniform(0.5, 1.5, hidden) * rng.choice([-1.0, 1.0], hidden)).astype(np.float32)
                for name in site_names}
        wrapped = ContractModel(copy.deepcopy(mlm), arch, {k: torch.from_numpy(v) for k, v in tags.items()},
                                fold_masks=False, share_prefix=opts.traced_share_prefix()).eval()
        path = tmp / "mask_template.onnx"
        _log("exporting the thinned-graph template (masks as tags: traced once for every thinned graph)")
        trace_graph(wrapped, args, path, opts.opset)
        del wrapped
        # int8: the MatMul weights quantised once; the masks stay float Mul inputs
        model = _Template.converted(path, opts.precision, mlm.config.num_attention_heads, hidden,
                                    "the thinned-graph template", opts.int8_weights)
        by_bytes: dict[bytes, list] = {}
        for init in model.graph.initializer:
            if init.data_type == onnx.TensorProto.FLOAT and list(init.dims) == [hidden]:
                by_bytes.setdefault(numpy_helper.to_array(init).tobytes(), []).append(init)
        where = {}
        for name, tag in tags.items():
            found = by_bytes.get(tag.tobytes(), [])
            if len(found) != 1:
                _log(f"template: the mask of {name} found {len(found)} times in the traced graph (expected once); "
                     "tracing every graph instead")
                return None
            where[name] = found[0]
        return cls(model, where)

    def _fold(self, masks: dict[str, np.ndarray] | None) -> None:
        """Set every site's mask initializer to this graph's mask."""
        for site, init in self.where.items():
            init.raw_data = np.ascontiguousarray(masks[site], dtype=np.float32).tobytes()
            del init.float_data[:]


class Fp16Template(_Template):
    """One traced, fused fp16 graph that every graph of an fp16 export (masks folded) is written from.

    With the masks folded into the weights, the K+1 graphs differ only in the tensors the mask sites
    scale (the attention-output and FFN-output dense weight and bias of every layer, the embedding
    LayerNorm's gamma and beta): tracing and fusing each of them again costs ~1 minute per graph for
    a large model, for the same graph. So the full network is traced once with those tensors set to
    unique random *tags*, fused and converted to fp16 (:func:`convert_precision`), and every tag is
    found again among the converted graph's initializers (its name, dtype and layout); each graph
    is then that graph with the tags replaced by its own folded tensors, converted the way
    ``float16`` converts them. Nothing is trusted: every graph is still validated against the masked
    PyTorch reference afterwards. Where a tag is not found exactly once (another fusion or
    converter release changed the layout), :meth:`build` returns None and every graph is traced.
    """

    ROLES = {"dense.weight": True, "dense.bias": False, "LayerNorm.weight": False, "LayerNorm.bias": False}

    def __init__(self, model, where: dict, originals: dict):
        self.model = model  # the converted ModelProto (all data inline)
        self.where = where  # (site, role) -> initializer proto in self.model
        self.originals = originals  # (site, role) -> float32 array in torch layout
        self._names: dict[int, str] | None = None  # initializer index -> content name, for the unchanged ones

    @staticmethod
    def _site_tensors(parent) -> list[tuple[str, "object"]]:
        if hasattr(parent, "dense"):
            return [("dense.weight", parent.dense.weight), ("dense.bias", parent.dense.bias)]
        return [("LayerNorm.weight", parent.LayerNorm.weight), ("LayerNorm.bias", parent.LayerNorm.bias)]

    @staticmethod
    def _layout(role: str, arr: np.ndarray) -> np.ndarray:
        """torch layout -> the initializer's layout (a Linear weight [out, in] is MatMul's [in, out])."""
        return np.ascontiguousarray(arr.T) if Fp16Template.ROLES[role] else arr

    @staticmethod
    def _to(dtype: int, arr: np.ndarray) -> np.ndarray:
        """``arr`` as the converter stores it: float16 with its clamping rule, or float32."""
        import onnx

        arr = np.asarray(arr, dtype=np.float32)
        return _np_to_float16(arr) if dtype == onnx.TensorProto.FLOAT16 else arr

    @classmethod
    def build(cls, mlm, arch, tmp: Path, args: tuple, opts: ExportOptions) -> "Fp16Template | None":
        import onnx
        import torch
        from onnx import numpy_helper

        from .wrapper import ContractModel, dropout_sites

        tagged = copy.deepcopy(mlm)
        rng = np.random.default_rng(20240611)
        tags, originals = {}, {}
        with torch.no_grad():
            for (name, parent, _), (_, orig_parent, _) in zip(dropout_sites(tagged, arch), dropout_sites(mlm, arch)):
                for (role, t), (_, o) in zip(cls._site_tensors(parent), cls._site_tensors(orig_parent)):
                    # |tag| in [0.5, 1.5): exact in the fp16 conversion, no clamping, never equal to a weight
                    tag = (rng.uniform(0.5, 1.5, tuple(t.shape)) * rng.choice([-1.0, 1.0], tuple(t.shape)))
                    t.copy_(torch.from_numpy(tag.astype(np.float32)))
                    tags[(name, role)] = tag.astype(np.float32)
                    originals[(name, role)] = o.detach().float().cpu().numpy().copy()
        wrapped = ContractModel(tagged, arch, None, fold_masks=True).eval()
        path = tmp / "template.onnx"
        _log("exporting the graph template (fp16, masks folded: traced and fused once for every graph)")
        trace_graph(wrapped, args, path, opts.opset)
        del wrapped, tagged
        model = _Template.converted(path, "fp16", mlm.config.num_attention_heads, mlm.config.hidden_size,
                                    "the template")
        by_bytes: dict[tuple, list] = {}
        for init in model.graph.initializer:
            if init.data_type in (onnx.TensorProto.FLOAT16, onnx.TensorProto.FLOAT):
                arr = numpy_helper.to_array(init)
                by_bytes.setdefault((init.data_type, arr.shape, arr.tobytes()), []).append(init)
        where = {}
        for key, tag in tags.items():
            found = []
            for dtype in (onnx.TensorProto.FLOAT16, onnx.TensorProto.FLOAT):
                arr = cls._to(dtype, cls._layout(key[1], tag))
                found += by_bytes.get((dtype, arr.shape, arr.tobytes()), [])
            if len(found) != 1:
                _log(f"template: {key[0]} {key[1]} found {len(found)} times in the fused graph (expected once); "
                     "tracing every graph instead")
                return None
            where[key] = found[0]
        return cls(model, where, originals)

    def _fold(self, masks: dict[str, np.ndarray] | None) -> None:
        """Set the site tensors to this graph's: folded with ``masks`` (None: graph 0's originals)."""
        for (site, role), init in self.where.items():
            arr = self.originals[(site, role)]
            if masks is not None:
                m = masks[site].astype(np.float32)
                arr = arr * (m[:, None] if self.ROLES[role] else m)  # exactly wrapper.fold_mask's product
            init.raw_data = self._to(init.data_type, self._layout(role, arr)).tobytes()
            del init.float_data[:]
            del init.int32_data[:]

    def write(self, path: Path, masks: dict[str, np.ndarray] | None) -> None:
        """Write one graph with all its tensors inline (the reference :meth:`write_shared` is tested against)."""
        self._fold(masks)
        path.write_bytes(self.model.SerializeToString())  # < 2 GB, as convert_precision's onnx.save


def at_mask_matmuls(path: Path) -> list[str]:
    """Names of the MatMul nodes that only see rows gathered at the mask position (the last layer's
    query, attention output and FFN, and the LM head; its keys and values read every position)."""
    import onnx

    nodes = onnx.load(str(path), load_external_data=False).graph.node
    depends_on_mask = {"mask_pos"}
    gathered: set[str] = set()
    for n in nodes:  # ONNX graphs are topologically sorted
        if any(i in depends_on_mask for i in n.input):
            depends_on_mask.update(n.output)
        if n.op_type == "GatherElements" and len(n.input) > 1 and n.input[1] in depends_on_mask:
            gathered.update(n.output)
    downstream = set(gathered)
    out = []
    for n in nodes:
        if any(i in downstream for i in n.input):
            downstream.update(n.output)
            if n.op_type == "MatMul" and n.input[0] in downstream:
                out.append(n.name)
    return out


def _np_to_float16(np_array, min_positive_val: float = 5.96e-08, max_finite_val: float = 65504.0) -> np.ndarray:
    """``onnxruntime.transformers.float16.convert_np_to_float16``'s rule, bit for bit, in one cast and two masked
    fixes instead of its four passes of ``np.where`` and its min/max scans (~30x faster on a weight matrix):
    0 < |x| < min_positive_val -> +-min_positive_val, finite |x| > max_finite_val -> +-max_finite_val, the fill
    values in the input's dtype before the cast (as its ``np.where`` leaves them); NaN, 0 and inf unchanged."""
    arr = np.asarray(np_array)
    with np.errstate(over="ignore"):  # > 65504 becomes inf here, clamped below
        out = arr.astype(np.float16)
    mag = np.abs(arr)
    for mask, value in (((mag > 0) & (mag < min_positive_val), min_positive_val),
                        ((mag > max_finite_val) & np.isfinite(mag), max_finite_val)):
        if mask.any():
            fill = np.asarray([value, -value], dtype=arr.dtype).astype(np.float16)
            out[mask] = np.where(arr[mask] > 0, fill[0], fill[1])
    return out


#: initializers of rank >= 2 with more elements than this go to ORT's shape inference without their data
_SHAPE_INFER_MAX_DATA = 1 << 16


@contextlib.contextmanager
def _faster_fp16_conversion():
    """ORT's fp16 conversion, byte for byte, without its two slow spots (roberta-large: 59.8 -> 23.0 s on 2 cores,
    benchmarks/export_convert.py; tests/test_fp16.py checks the bytes).

    1. Its transformer optimizer runs symbolic shape inference six times for a BERT-type graph, and its float16
       converter once more; each run starts by copying the whole ModelProto, weights included (37 of 65.7 s in
       one cProfile run). Inference needs a weight's dims and type, and reads the values of an initializer of
       rank >= 2 only to drop them (``_get_int_or_float_values``: "ignore value for rank > 1"). Here it copies
       a model in which those initializers hold their name, type and dims, and gets zeros of their shape.
    2. The converter casts each tensor with ``convert_np_to_float16``: here :func:`_np_to_float16`, its rule.

    Where ORT's modules are not where this expects them, nothing is patched (only slower)."""
    import importlib

    import onnx
    import onnxruntime.transformers  # noqa: F401  (puts its folder on sys.path: its modules import each other by name)

    try:
        helper_mod = importlib.import_module("shape_infer_helper")  # the module object onnx_model.py imports
    except ImportError:
        helper_mod = None
    helper_cls = getattr(helper_mod, "SymbolicShapeInferenceHelper", None)
    # the class that defines both: the fusions' helper and the float16 converter's own inference inherit them
    cls = next((c for c in getattr(helper_cls, "__mro__", ()) if "_preprocess" in vars(c) and "_get_value" in vars(c)),
               None)
    if cls is None:
        yield
        return
    base_pre, base_get = vars(cls)["_preprocess"], vars(cls)["_get_value"]
    floats = {onnx.TensorProto.FLOAT: np.float32, onnx.TensorProto.FLOAT16: np.float16}

    def _preprocess(self, in_mp):
        # a copy of the model without those initializers' data, built field by field (the model is not touched)
        light = onnx.ModelProto()
        for field, value in in_mp.ListFields():
            if field.name != "graph":
                _copy_field(light, field, value)
        lifted = {}
        for field, value in in_mp.graph.ListFields():
            if field.name != "initializer":
                _copy_field(light.graph, field, value)
                continue
            for t in value:
                if t.data_type in floats and len(t.dims) >= 2 and int(np.prod(t.dims)) > _SHAPE_INFER_MAX_DATA:
                    stub = light.graph.initializer.add()
                    stub.name, stub.data_type = t.name, t.data_type
                    stub.dims.extend(t.dims)
                    lifted[t.name] = (tuple(t.dims), floats[t.data_type])
                else:
                    light.graph.initializer.add().CopyFrom(t)
        base_pre(self, light)
        self._cliptune_lifted = lifted

    def _get_value(self, node, idx):
        lifted = getattr(self, "_cliptune_lifted", {}).get(node.input[idx])
        if lifted is not None and node.input[idx] not in self.sympy_data_:
            return np.broadcast_to(np.zeros((), lifted[1]), lifted[0])
        return base_get(self, node, idx)

    # the float16 converter's per-tensor cast (module `float16`, imported by name like the helper)
    converters = [m for m in (sys.modules.get("float16"), sys.modules.get("onnxruntime.transformers.float16"))
                  if m is not None and hasattr(m, "convert_np_to_float16")]
    saved = [(m, m.convert_np_to_float16) for m in converters]
    cls._preprocess, cls._get_value = _preprocess, _get_value
    for m in converters:
        m.convert_np_to_float16 = _np_to_float16
    try:
        yield
    finally:
        cls._preprocess, cls._get_value = base_pre, base_get
        for m, f in saved:
            m.convert_np_to_float16 = f


def _copy_field(dst, field, value) -> None:
    """Set protobuf ``field`` of ``dst`` to ``value`` (as read from another message's ListFields)."""
    repeated = getattr(field, "is_repeated", None)  # protobuf >= 5; `label` is gone from 7
    if repeated is None:
        repeated = field.label == field.LABEL_REPEATED
    if repeated:
        getattr(dst, field.name).extend(value)
    elif field.type == field.TYPE_MESSAGE:
        getattr(dst, field.name).CopyFrom(value)
    else:
        setattr(dst, field.name, value)


def int8_weight_args(weights: str) -> dict:
    """``quantize_dynamic``'s arguments for an int8 weight format (manifest.INT8_WEIGHTS: int7 = signed weights in
    -64..63, onnxruntime's reduce_range; uint8; int8 = full range, which saturates on AVX2 CPUs without VNNI)."""
    from onnxruntime.quantization import QuantType

    if weights not in INT8_WEIGHTS:
        raise ConfigError(f"--int8-weights must be one of {', '.join(INT8_WEIGHTS)}, got {weights!r}")
    return {"weight_type": QuantType.QUInt8 if weights == "uint8" else QuantType.QInt8,
            "reduce_range": weights == "int7"}


def convert_precision(path: Path, precision: str, heads: int, hidden: int, keep: bool = True,
                      int8_weights: str = DEFAULT_INT8_WEIGHTS):
    """Rewrite one fp32 graph in place as fp16 (ORT transformer fusions, then float16 weights; inputs
    and outputs stay float32) or int8 (dynamic per-channel quantisation of the MatMul weights). Returns the
    converted ModelProto; ``keep=False`` removes the graph's files instead of writing it (a caller that holds
    the model in memory: no save and load of the whole model)."""
    import onnx

    tmp_out = path.with_suffix(".conv.onnx")
    if precision == "fp16":
        from onnxruntime.transformers import optimizer

        with _faster_fp16_conversion():
            opt = optimizer.optimize_model(str(path), model_type="bert", num_heads=heads, hidden_size=hidden,
                                           opt_level=0, use_gpu=True)
            opt.convert_float_to_float16(keep_io_types=True)
        model = opt.model
    elif precision == "int8":
        from onnxruntime.quantization import quantize_dynamic

        # MatMul weights only: quantising the embedding Gathers and the verbalizer rows buys no speed and
        # scrambles the loss ranking; the at-mask tail (pop*batch rows) stays fp32 for the same reason.
        # Measured (benchmarks/latency.py, splade-tiny SST-2): relative logit error 1.9e-2 -> 9.6e-3 at the
        # same speed; roberta-base 462 ms either way.
        quantize_dynamic(str(path), str(tmp_out), per_channel=True, **int8_weight_args(int8_weights),
                         op_types_to_quantize=["MatMul"], nodes_to_exclude=at_mask_matmuls(path),
                         extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
        model = onnx.load(str(tmp_out), load_external_data=True)
        tmp_out.unlink()
    else:
        raise ConfigError(f"unknown precision {precision!r}")
    for old in path.parent.glob(path.name + "*.data"):
        old.unlink()
    for old in path.parent.glob("*.onnx.data"):
        old.unlink()
    if keep:
        onnx.save(model, str(path))
    else:
        path.unlink()
    return model


def _stamp_metadata(tmp: Path, graphs: list[dict], export_id: str) -> None:
    """Write export_id and graph index into each graph's metadata_props (checked at load)."""
    import onnx

    for g in graphs:
        m = onnx.load(str(tmp / g["file"]), load_external_data=False)
        for k, v in (("cliptune.export_id", export_id), ("cliptune.graph_index", str(g["index"]))):
            p = m.metadata_props.add()
            p.key, p.value = k, v
        with open(tmp / g["file"], "wb") as f:
            f.write(m.SerializeToString())


class _quiet_export:
    """Silence the legacy exporter's deprecation chatter (real errors still raise)."""

    def __enter__(self):
        import warnings

        self._w = warnings.catch_warnings()
        self._w.__enter__()
        warnings.simplefilter("ignore")
        return self

    def __exit__(self, *exc):
        self._w.__exit__(*exc)
        return False
