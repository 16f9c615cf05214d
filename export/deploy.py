"""Deploy a tuned prompt: one standalone ONNX classifier graph built from the run's full graph.

``cliptune deploy RUN_DIR --out classifier.onnx [--int8]`` (:func:`deploy_run`) does graph surgery
with ``onnx`` on the run's ``graph_0.onnx`` (the full network):

- ``prompt_embeds`` becomes a constant [1, L, hidden]: the run's ``best_prompt.npy``;
- ``verbalizer_ids`` becomes a constant, and the Gathers of the decoder weight/bias rows it feeds
  are folded into [labels, hidden] / [labels] constants (only the verbalizer head is left; the
  vocabulary-sized decoder bias disappears, the word embeddings stay for the input lookup);
- new inputs ``input_ids`` / ``attention_mask`` [batch, seq] hold the raw rendering
  ``[CLS] <template without <P>> [SEP]``; the graph inserts the L placeholder ids after position 0,
  extends the attention mask with ones, and computes ``mask_pos`` = position of the mask id + L;
- the output ``logits`` [1, batch, labels] is squeezed to [batch, labels] and a Softmax gives
  ``probs`` [batch, labels]. A row whose mask cannot be located gets NaN probabilities.

Where the mask id is looked for: the template's [MASK] comes after every text slot (sst2: "last"
occurrence), before every text slot (ag_news, dbpedia: "first"), or between two texts (pair tasks:
"only", NaN when a text itself holds the mask token). The runtime knows the position from the
template; this keeps the deployed graph exact wherever it can be.

All weights are inlined (one self-contained file; external data only above 2 GB). ``--int8`` runs
``onnxruntime.quantization.quantize_dynamic`` (per-channel QInt8 weights, MatMul and Gather) on the
fp32 classifier; its agreement with the fp32 classifier is measured and recorded, not claimed.

The sidecar ``classifier.json`` (see :mod:`cliptune_ort.deploy`) holds what a consumer needs. After
writing, the classifier is checked against the run's full graph with the prompt input on a split
(default dev; ``--check-split test`` for the full test split) and the result goes into the sidecar.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cliptune_ort import __version__
from cliptune_ort.deploy import (DEPLOY_FORMAT, DEPLOY_VERSION, META_DEPLOY_ID, DeployedClassifier,
                                 sidecar_path)
from cliptune_ort.errors import ConfigError
from cliptune_ort.fileio import atomic_write_bytes, atomic_write_json, sha256_file
from cliptune_ort.manifest import DEFAULT_INT8_WEIGHTS

from .exporter import ExportError, int8_weight_args
from .packing import ensure_ms_opset, topo_sort

#: above this the graph cannot be one protobuf: weights go to ``<out>.data`` next to it
PROTO_LIMIT = 2 * 1024**3 - 64 * 1024**2
_PREFIX = "deploy/"  # names of every node/tensor the surgery adds


@dataclass
class DeployOptions:
    """Every deploy default in one place."""

    int8: bool = False  # dynamic per-channel int8 weights (quantize_dynamic) instead of fp32
    int8_weights: str = DEFAULT_INT8_WEIGHTS  # their format (manifest.INT8_WEIGHTS; exporter.int8_weight_args)
    check_split: str | None = "dev"  # split the deployed graph is checked on against the full graph; None = skip
    atol: float = 1e-5  # fp32: max |probs_deployed - probs_runtime| accepted by the check
    batch_size: int = 64  # rows per session run in the check
    overwrite: bool = False  # replace an existing classifier (and its sidecar)
    model_dir: str | None = None  # build from this export instead of the run's (same weights; needed when the
    # run's export has packed attention, which runs on CUDA only)


def mask_select(template: str) -> str:
    """'first' | 'last' | 'only': which mask-id occurrence is the template's [MASK] (see module doc)."""
    from cliptune_ort.encoding import _SLOT

    parts = [p for p in _SLOT.split(template) if p]
    m = parts.index("[MASK]")
    texts = [i for i, p in enumerate(parts) if p in ("{text}", "{text_b}")]
    if all(i > m for i in texts):
        return "first"
    if all(i < m for i in texts):
        return "last"
    return "only"


def plain_template(template: str) -> str:
    """The template a consumer renders: without ``<P>`` and outer spaces (". {text} . It was [MASK] .")."""
    return template.replace("<P>", "").strip()


# ---------------------------------------------------------------- graph surgery


def build_classifier(model, prompt: np.ndarray, verbalizer_ids: np.ndarray, placeholder_ids: list[int],
                     mask_id: int, select: str):
    """Turn a contract graph (``onnx.ModelProto`` with its weights loaded) into a classifier graph.

    prompt [L, hidden], verbalizer_ids [labels]. Returns a new ModelProto with inputs input_ids,
    attention_mask [batch, seq] and outputs probs, logits [batch, labels].
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    want = {"input_ids", "attention_mask", "mask_pos", "prompt_embeds", "verbalizer_ids"}
    got = {i.name for i in g.input}
    if got != want or [o.name for o in g.output] != ["logits"]:
        raise ExportError(f"graph has inputs {sorted(got)} and outputs {[o.name for o in g.output]}: expected the "
                          "cliptune graph contract; re-export the model dir")
    pe = next(i for i in g.input if i.name == "prompt_embeds")
    L = len(placeholder_ids)
    if prompt.ndim != 2 or prompt.shape[0] != L:
        raise ConfigError(f"prompt has shape {list(prompt.shape)}, the model dir has L = {L} prompt positions: "
                          "the run and the model dir do not belong together")
    hidden_dim = pe.type.tensor_type.shape.dim[2]
    if hidden_dim.HasField("dim_value") and hidden_dim.dim_value != prompt.shape[1]:
        raise ConfigError(f"prompt has hidden size {prompt.shape[1]}, the graph takes {hidden_dim.dim_value}: "
                          "the run and the model dir do not belong together")
    pe_dtype = helper.tensor_dtype_to_np_dtype(pe.type.tensor_type.elem_type)

    # 1. constants for the prompt and the verbalizer
    inits = {t.name: t for t in g.initializer}
    verb = np.asarray(verbalizer_ids, dtype=np.int64)
    const = {
        "prompt_embeds": numpy_helper.from_array(np.asarray(prompt, dtype=pe_dtype)[None], "prompt_embeds"),
        "verbalizer_ids": numpy_helper.from_array(verb, "verbalizer_ids"),
    }
    # fold Gather(decoder weight | bias, verbalizer_ids): only the verbalizer rows stay in the file
    folded = []
    keep_nodes = []
    for node in g.node:
        if (node.op_type == "Gather" and len(node.input) == 2 and node.input[1] == "verbalizer_ids"
                and node.input[0] in inits):
            axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
            data = numpy_helper.to_array(inits[node.input[0]])
            folded.append(numpy_helper.from_array(np.take(data, verb, axis=axis), node.output[0]))
        else:
            keep_nodes.append(node)

    # 2. the raw inputs -> the contract's inputs, inside the graph
    rename = {"input_ids": _PREFIX + "input_ids_full", "attention_mask": _PREFIX + "attention_mask_full",
              "mask_pos": _PREFIX + "mask_pos", "logits": _PREFIX + "logits_pop"}
    for node in keep_nodes:
        for i, name in enumerate(node.input):
            if name in rename:
                node.input[i] = rename[name]
        for i, name in enumerate(node.output):
            if name in rename:
                node.output[i] = rename[name]
    P = _PREFIX

    def c(name, arr):
        return numpy_helper.from_array(np.asarray(arr), P + name)

    consts = [
        c("placeholders", np.asarray(placeholder_ids, dtype=np.int64)[None]),  # [1, L]
        c("ones_L", np.ones((1, L), dtype=np.int64)),
        c("L", np.asarray(L, dtype=np.int64)),
        c("mask_id", np.asarray(mask_id, dtype=np.int64)),
        c("zero_1", np.asarray([0], dtype=np.int64)),
        c("one_1", np.asarray([1], dtype=np.int64)),
        c("end_1", np.asarray([np.iinfo(np.int64).max], dtype=np.int64)),
        c("L_1", np.asarray([L], dtype=np.int64)),
        c("axis0", np.asarray([0], dtype=np.int64)),
        c("axis1", np.asarray([1], dtype=np.int64)),
        c("n_needed", np.asarray(1, dtype=np.int64)),
        c("nan", np.asarray(np.nan, dtype=np.float32)),
    ]
    N = helper.make_node
    new_nodes = [
        N("Shape", ["input_ids"], [P + "shape"], start=0, end=1),  # [1] = batch
        N("Concat", [P + "shape", P + "L_1"], [P + "shape_bl"], axis=0),  # [batch, L]
        N("Expand", [P + "placeholders", P + "shape_bl"], [P + "ph"]),
        N("Expand", [P + "ones_L", P + "shape_bl"], [P + "ones"]),
        N("Slice", ["input_ids", P + "zero_1", P + "one_1", P + "axis1"], [P + "ids_head"]),
        N("Slice", ["input_ids", P + "one_1", P + "end_1", P + "axis1"], [P + "ids_tail"]),
        N("Concat", [P + "ids_head", P + "ph", P + "ids_tail"], [rename["input_ids"]], axis=1),
        N("Slice", ["attention_mask", P + "zero_1", P + "one_1", P + "axis1"], [P + "am_head"]),
        N("Slice", ["attention_mask", P + "one_1", P + "end_1", P + "axis1"], [P + "am_tail"]),
        N("Concat", [P + "am_head", P + "ones", P + "am_tail"], [rename["attention_mask"]], axis=1),
        # mask position in the raw row (first or last occurrence), shifted by the L inserted positions
        N("Equal", ["input_ids", P + "mask_id"], [P + "is_mask"]),
        N("Cast", [P + "is_mask"], [P + "is_mask_i32"], to=TensorProto.INT32),
        N("ArgMax", [P + "is_mask_i32"], [P + "mask_pos_raw"], axis=1, keepdims=0,
          select_last_index=int(select == "last")),
        N("Add", [P + "mask_pos_raw", P + "L"], [rename["mask_pos"]]),
        # rows with no mask id (or, for 'only', more than one) cannot be read: NaN probabilities
        N("Cast", [P + "is_mask"], [P + "is_mask_i64"], to=TensorProto.INT64),
        N("ReduceSum", [P + "is_mask_i64", P + "axis1"], [P + "n_mask"], keepdims=1),  # [batch, 1]
        N("Equal" if select == "only" else "GreaterOrEqual", [P + "n_mask", P + "n_needed"], [P + "row_ok"]),
    ]
    tail_nodes = [
        N("Squeeze", [rename["logits"], P + "axis0"], ["logits"]),  # [batch, labels]
        N("Softmax", ["logits"], [P + "softmax"], axis=-1),
        N("Where", [P + "row_ok", P + "softmax", P + "nan"], ["probs"]),
    ]
    del g.node[:]
    g.node.extend(new_nodes + keep_nodes + tail_nodes)

    # 3. inputs, outputs, initializers
    del g.input[:]
    for name in ("input_ids", "attention_mask"):
        g.input.append(helper.make_tensor_value_info(name, TensorProto.INT64, ["batch", "seq"]))
    del g.output[:]
    n_labels = len(verb)
    g.output.append(helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["batch", n_labels]))
    g.output.append(helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", n_labels]))
    all_inits = list(g.initializer) + list(const.values()) + folded + consts
    used = {x for node in g.node for x in node.input}
    del g.initializer[:]
    g.initializer.extend(t for t in all_inits if t.name in used)
    vi = [v for v in g.value_info if v.name not in rename and v.name not in rename.values()]
    del g.value_info[:]
    g.value_info.extend(vi)
    del m.metadata_props[:]
    return m


# ---------------------------------------------------------------- the deploy step


def _load_run(run_dir: Path, model_dir_override: str | None = None):
    """(cfg, workspace, prompt [L, hidden]) of a finished bbt/clip run, checked; ``model_dir_override``:
    an unpacked export with the run's weights (a run tuned on packed-attention graphs needs one)."""
    from cliptune_ort.config import build_config
    from cliptune_ort.manifest import load_manifest
    from cliptune_ort.predict import read_run_config
    from cliptune_ort.tuner import prepare

    raw = read_run_config(run_dir, keep_model_dir=True)
    model_dir = raw.pop("resolved_model_dir", None)
    raw["device"] = "cpu"
    raw["plot"] = False
    cfg = build_config(**raw)
    if cfg.method == "manual":
        raise ConfigError(f"{run_dir} is a manual (zero-shot) run: it has no tuned prompt to deploy; "
                          "deploy a --method bbt or clip run")
    if not (run_dir / "best_prompt.npy").is_file():
        raise ConfigError(f"{run_dir} has no best_prompt.npy: the run has not finished; resume it first "
                          f"(cliptune tune --resume --out {run_dir})")
    prompt = np.load(run_dir / "best_prompt.npy", allow_pickle=False)
    run_man = load_manifest(model_dir) if model_dir and Path(model_dir).is_dir() else None
    if model_dir_override:
        other = load_manifest(model_dir_override)
        if other.packed:
            raise ConfigError(f"--model-dir {model_dir_override} holds packed-attention graphs too: pass the same model "
                              "exported without --packed")
        if run_man is not None and (other.data["weights"]["sha256"] != run_man.data["weights"]["sha256"]
                                    or (other.n_prompt, other.hidden) != (run_man.n_prompt, run_man.hidden)):
            raise ConfigError(f"--model-dir {model_dir_override} holds other weights than the run's model dir "
                              f"{model_dir}: the prompt was tuned for those; pass an export of the same model")
        model_dir = str(model_dir_override)
    elif run_man is not None and run_man.packed:
        hint = run_man.data.get("packed_from") or "DIR (the same model exported without --packed)"
        raise ConfigError(f"{run_dir} was tuned on packed-attention graphs, which run on CUDA only; a deployed "
                          f"classifier is built from unpacked graphs: add --model-dir {hint}")
    ws = prepare(cfg, Path(model_dir) if model_dir else None, draw=False)  # the prompt is the run's: no projection
    return cfg, ws, prompt


def _save_onnx(model, out: Path) -> None:
    """Write ``model`` to ``out`` atomically, weights inlined (external ``<out>.data`` above 2 GB)."""
    import onnx

    if model.ByteSize() < PROTO_LIMIT:
        atomic_write_bytes(out, model.SerializeToString())
        return
    data = out.name + ".data"
    (out.parent / data).unlink(missing_ok=True)
    onnx.save_model(model, str(out), save_as_external_data=True, all_tensors_to_one_file=True, location=data)


def _quantize(model, workdir: Path, weights: str = DEFAULT_INT8_WEIGHTS):
    """Dynamic per-channel int8 weights (MatMul, Gather) in the format ``weights`` names, float activations."""
    import onnx
    from onnxruntime.quantization import quantize_dynamic

    src, dst = workdir / "fp32.onnx", workdir / "int8.onnx"
    onnx.save_model(model, str(src))
    logging.disable(logging.WARNING)  # its "consider pre-processing" hint goes to the root logger
    try:
        quantize_dynamic(str(src), str(dst), per_channel=True, **int8_weight_args(weights),
                         extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
    finally:
        logging.disable(logging.NOTSET)
    return onnx.load(str(dst), load_external_data=True)


def compare(a: np.ndarray, b: np.ndarray) -> dict:
    """Max abs probability difference and prediction agreement of probs a, b [n, labels]."""
    return {"n": int(a.shape[0]), "max_abs_prob_diff": float(np.max(np.abs(a - b))),
            "prediction_agreement": float(np.mean(np.argmax(a, 1) == np.argmax(b, 1)))}


def runtime_probs(ws, prompt: np.ndarray, split: str) -> tuple[np.ndarray, list]:
    """Probabilities [n, labels] of the run's full graph with the prompt input on ``split``,
    and the split's examples (the tuning runtime's own evaluation path)."""
    batch = {"train": ws.train, "dev": ws.dev, "test": ws.test}[split]
    exs = {"train": ws.fewshot.train, "dev": ws.fewshot.dev, "test": ws.fewshot.test}[split]
    if batch is None:
        raise ConfigError(f"task {ws.task.name} has no {split} split offline: pass --check-split dev")
    p = prompt.reshape(1, ws.manifest.n_prompt, ws.manifest.hidden).astype(np.float32)
    logits = ws.engine.logits(0, p, batch, ws.verbalizer_ids)[0]
    z = logits - logits.max(axis=-1, keepdims=True)
    return (np.exp(z) / np.exp(z).sum(axis=-1, keepdims=True)).astype(np.float32), list(exs)


def deploy_run(run_dir: str | os.PathLike, out: str | os.PathLike, opts: DeployOptions | None = None) -> dict:
    """Build ``out`` (.onnx) and its sidecar from a finished run; returns the sidecar dict."""
    import onnx

    opts = opts or DeployOptions()
    run_dir, out = Path(run_dir), Path(out)
    if out.suffix != ".onnx":
        raise ConfigError(f"--out {out} must end in .onnx (the sidecar goes to {out.with_suffix('.json').name})")
    if opts.check_split not in (None, "train", "dev", "test"):
        raise ConfigError(f"--check-split must be train, dev or test, got {opts.check_split!r}")
    side = sidecar_path(out)
    if (out.exists() or side.exists()) and not opts.overwrite:
        raise ConfigError(f"{out if out.exists() else side} exists: pass --overwrite or another --out")
    t0 = time.perf_counter()
    cfg, ws, prompt = _load_run(run_dir, opts.model_dir)
    man = ws.manifest
    if opts.int8:
        int8_weight_args(opts.int8_weights)  # a bad format fails here, before the graph surgery
    if opts.int8 and man.precision != "fp32":
        raise ConfigError(f"--int8 quantises an fp32 graph, the run's model dir is {man.precision}: deploy without "
                          "--int8, or tune on an fp32 export")
    tok_info = man.data["tokenizer"]
    select = mask_select(ws.task.template)
    src = onnx.load(str(man.graph_path(0)), load_external_data=True)
    topo_sort(src.graph)  # fp16 graphs list the converter's input Casts last; the checker wants them first
    ensure_ms_opset(src)  # ORT's fused ops (fp16 exports)
    model = build_classifier(src, prompt, ws.verbalizer_ids, man.data["placeholder_ids"], int(tok_info["mask_id"]),
                             select)
    precision = man.precision
    out.parent.mkdir(parents=True, exist_ok=True)
    if opts.int8:
        with tempfile.TemporaryDirectory(prefix=".deploy.", dir=str(out.parent)) as d:
            model = _quantize(model, Path(d), opts.int8_weights)
        precision = "int8"
    deploy_id = uuid.uuid4().hex
    for k, v in ((META_DEPLOY_ID, deploy_id), ("cliptune.task", ws.task.name),
                 ("cliptune.export_id", man.data["export_id"])):
        p = model.metadata_props.add()
        p.key, p.value = k, v
    model.producer_name, model.producer_version = "cliptune-ort deploy", __version__
    if model.ByteSize() < PROTO_LIMIT:
        onnx.checker.check_model(model)
    _save_onnx(model, out)

    max_len = cfg.max_len or int(man.data["model"]["max_positions"])
    run_result = run_dir / "result.json"
    test_metric = None
    if run_result.is_file():
        res = json.loads(run_result.read_text(encoding="utf-8"))
        test_metric = (res.get("test") or {}).get("metric")
    meta = {
        "format": DEPLOY_FORMAT,
        "version": DEPLOY_VERSION,
        "deploy_id": deploy_id,
        "created_by": f"cliptune-ort {__version__}",
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "onnx": {"file": out.name, "sha256": sha256_file(out), "bytes": out.stat().st_size, "precision": precision,
                 **({"int8_weights": opts.int8_weights} if opts.int8 else {}),
                 "opset": next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")),
                 "inputs": {"input_ids": "int64 [batch, seq]", "attention_mask": "int64 [batch, seq]"},
                 "outputs": {"probs": "float32 [batch, labels] (softmax; NaN where the [MASK] is not found)",
                             "logits": "float32 [batch, labels]"}},
        "task": ws.task.name,
        "metric": ws.task.metric,
        "pair": ws.task.pair,
        "columns": list(ws.task.columns),  # the task's field names for text, text_b, label (predict --input)
        "label_names": list(ws.task.label_names),
        "verbalizer": list(ws.task.verbalizer),
        "verbalizer_ids": [int(v) for v in ws.verbalizer_ids],
        "template": ws.task.template,
        "plain_template": plain_template(ws.task.template),
        "mask_token": "[MASK]",
        "mask_select": select,
        "special_ids": {k: int(tok_info[k]) for k in ("cls_id", "sep_id", "mask_id", "pad_id")},
        "n_prompt": man.n_prompt,
        "max_len": max_len,
        "max_input_tokens": max_len - man.n_prompt,
        "source": {"run_dir": str(run_dir.resolve()), "method": cfg.method, "seed": cfg.seed,
                   "run_test_metric": test_metric, "model_dir": str(man.root.resolve()),
                   "model": man.data["model"]["source"], "export_id": man.data["export_id"],
                   "model_precision": man.precision,
                   "best_prompt_sha256": hashlib.sha256(np.ascontiguousarray(prompt).tobytes()).hexdigest()},
        "check": None,
        "tokenizer_json": _consumer_tokenizer(man.tokenizer_path, int(tok_info["pad_id"])),
    }
    atomic_write_json(side, meta)
    try:
        if opts.check_split:
            meta["check"] = check(ws, prompt, out, opts)
        meta["deploy_seconds"] = round(time.perf_counter() - t0, 2)
        atomic_write_json(side, meta)
    except BaseException:
        out.unlink(missing_ok=True)
        side.unlink(missing_ok=True)
        raise
    finally:
        ws.engine.close()
    return meta


def _consumer_tokenizer(path: Path, pad_id: int) -> str:
    """The model dir's tokenizer.json for consumers: no truncation (it would cut the [MASK]; the
    renderer truncates only the text), padding to the batch's longest with the pad id."""
    tok = json.loads(path.read_text(encoding="utf-8"))
    tok["truncation"] = None
    pad = tok.get("padding") or {}
    tok["padding"] = {"strategy": "BatchLongest", "direction": "Right", "pad_to_multiple_of": None,
                      "pad_id": pad_id, "pad_type_id": pad.get("pad_type_id", 0),
                      "pad_token": pad.get("pad_token", "[PAD]")}
    return json.dumps(tok, ensure_ascii=False, separators=(",", ":"))


def check(ws, prompt: np.ndarray, out: Path, opts: DeployOptions) -> dict:
    """Deployed classifier vs the run's full graph with the prompt input, on ``opts.check_split``.

    fp32: raises if a probability differs by more than ``opts.atol`` or a prediction differs.
    int8: records agreement with the full graph (no threshold: quantisation is not exact).
    """
    ref, exs = runtime_probs(ws, prompt, opts.check_split)
    clf = DeployedClassifier(out)
    texts = [e.text for e in exs]
    texts_b = [e.text_b for e in exs] if ws.task.pair else None
    got = clf.predict_proba(texts, texts_b, batch_size=opts.batch_size)
    res = {"split": opts.check_split, "against": "run's graph_0.onnx with the prompt input (tuning runtime)",
           **compare(got, ref)}
    if not opts.int8:
        res["atol"] = opts.atol
        if not (res["max_abs_prob_diff"] <= opts.atol and res["prediction_agreement"] == 1.0):
            raise ExportError(f"deployed classifier differs from the run's full graph on {opts.check_split}: max "
                              f"|dprob| {res['max_abs_prob_diff']:.2e} (atol {opts.atol}), agreement "
                              f"{res['prediction_agreement']:.4f}; this is a bug, please report it")
    return res
