"""Packed (padding-free) attention for fp16 exports: ONNX Runtime's RemovePadding / PackedAttention.

A few-shot batch is right-padded to its longest row; on the SST-2 16-shot set a third of the tokens
of one padded batch are padding (9.6 % with 4 length buckets). ONNX Runtime's CUDA provider has a
padding-free BERT path: ``RemovePadding`` packs the real tokens of a [batch, seq, hidden] tensor
into [tokens, hidden], ``PackedAttention`` attends within each row's tokens, and ``RestorePadding``
scatters them back. Every other op of a layer (MatMul, SkipLayerNormalization, BiasGelu) works on
the packed rows unchanged, so no FLOP is spent on padding and one call covers the whole set.

:func:`pack_graph` rewrites a fused fp16 graph of the graph contract: packing starts at the input
of the first ``Attention`` (after the prompt is added to the embeddings) and ends at the output of
the last full-sequence layer, which the single-query last layer (keys and values at every position,
the query at the mask) reads padded again. ORT's own converter
(``onnxruntime.transformers.convert_to_packing_mode``) restores padding after the *last* layer
norm, which here sits inside the single-query layer; hence this converter.

``kernel="flash"``: each layer's ``Attention`` becomes three projections and
``PackedMultiHeadAttention`` without a bias input, for which ORT's CUDA provider runs FlashAttention's
variable-length kernel straight on the packed [tokens, hidden] Q, K and V (``PackedAttention``, the
``"fused"`` kernel, adds the QKV bias and transposes to [batch, heads, seq, head] first, then runs
ORT's cutlass kernel on H100s). The biases are moved where they cost nothing, exactly:
the key bias adds ``q . b_k`` to every score of a query row, which softmax ignores, so it is dropped;
the value bias comes out of the attention unchanged (each row's weights sum to 1), so ``b_v @ W_o``
joins the output projection's bias (SkipLayerNormalization's bias input). Only the query bias stays,
as one Add (the runtime keeps ORT from fusing it into a Gemm: engine.disabled_optimizers). The weight
slices are Slice nodes on the fused QKV weight, which ORT folds at load. Measured on an H100
(roberta-large shape, 20 candidates x 32 SST-2 examples): attention 7.7 -> 6.5 ms and no 4.35 ms
bias-transpose pass, for 1.9 ms of query-bias Add and 1 ms more GEMM time (three projections instead of
one); 62.2 -> 59.7 ms of kernels per call. It is the default kernel.

``host_offsets=True`` (the "packed_host" layout): no RemovePadding. The graph takes the packing as
three more inputs the runtime computes once per (batch, population) from the attention mask
(:func:`cliptune_ort.engine.packing_feeds`) and keeps on the device: ``packed_token_index`` (int64
[tokens], rows of the flattened [rows * seq, hidden] tensor that are real tokens),
``packed_token_offset`` (int32 [rows, seq]) and ``packed_cu_seqlens`` (int32 [rows + 1]). Every shape
is then known before the run, nothing is read back to the host, and the graph can be captured as a
CUDA graph (RemovePadding copies its token count to the host on every run).

``ffn="moe"`` (experimental; measured slower): each packed layer's feed-forward block, MatMul ->
BiasGelu -> MatMul -> (SkipLayerNormalization's bias), becomes one ``com.microsoft.MoE`` node with a
single expert. The hope was a GEMM epilogue for the bias and the activation, so the [tokens, 4 * hidden]
intermediate would not be read and written again by BiasGelu (7.7 of 60 ms of kernels per stacked call
on an H100). One router tensor of zeros [tokens, 1] serves every layer (softmax over one expert is
exactly 1). MoE's GELU is the tanh approximation, not BERT's erf (|difference| < 5e-4 per activation,
below one fp16 step at the logit scale). Measured on an H100 with onnxruntime-gpu 1.31.1
(benchmarks/gpu.py --moe, run 5): 78.6 ms per stacked call against 62.3 ms. That ORT runs the block as
CUTLASS grouped GEMMs (about 35 ms against about 25 ms in cuBLAS), then a separate activation kernel
(8.5 ms, no epilogue), plus its routing passes over [tokens, hidden]. The weights reach MoE's
[experts, out, in] layout through Transpose + Unsqueeze nodes that ORT folds when it loads a session,
so each session holds its own folded copy of the feed-forward weights (two thirds of a layer's)
instead of sharing the export's: fine for a timing, not for a deployment of K + 1 sessions.

``ffn="cublaslt"``: each packed layer's first feed-forward projection, MatMul -> BiasGelu, becomes one
``ai.cliptune.FusedDense`` node (cliptune_ort/native: cuBLASLt's GELU_BIAS epilogue; the GELU is the tanh
approximation, as MoE's), and with the flash kernel the query projection's MatMul -> Add(bias) becomes a
FusedDense with the BIAS epilogue. The bias and the activation run inside the GEMM, so the [tokens,
4 * hidden] intermediate is written once and the query once. The sessions load the custom-op library
(``cliptune build-ops --variant cuda``); the manifest says so (``packed_ffn: cublaslt``).

``front="fused"`` (with ``host_offsets``): the first packed layer's input, ``x0 = Reshape(Add(Unsqueeze(A, 0),
Unsqueeze(P, 1)))`` (the embeddings A [batch, seq, hidden] plus the prompts at their positions P [pop, seq,
hidden], broadcast to [pop * batch, seq, hidden]) then Flatten -> Gather of its real tokens, becomes one
``ai.cliptune.PackAdd(A, P, packed_token_index)`` that writes the packed rows directly (custom-op library,
native/pack_add.cu); the padded sum and its shape arithmetic are dropped.

These ops exist on the CUDA provider only: a packed export cannot run on the CPU (the runtime
refuses it in one line), and the exporter validates the unpacked graphs against PyTorch before it
packs them. The rewrite itself is checked on the CPU by running both graphs through
``onnx.reference`` with numpy implementations of the contrib ops (tests/test_packing.py), and on
the GPU by ``benchmarks/gpu.py`` against PyTorch.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from cliptune_ort.engine import (
    PACKING_INPUTS as HOST_INPUTS,  # the extra inputs of "packed_host" graphs
)
from cliptune_ort.engine import (
    PREFIX_INPUTS,  # and those of a shared-prefix first layer
)
from cliptune_ort.manifest import (
    LIBRARY_KERNELS,
    OWN_KERNELS,
    PACKED_FRONTS,
    PACKED_KERNELS,
    PROMPT_DTYPES,
    QKV_KERNELS,
    SPLIT_KERNELS,
)
from cliptune_ort.native import DOMAIN as NATIVE_DOMAIN

MS = "com.microsoft"
#: ops allowed between RemovePadding and RestorePadding: row-wise on [tokens, hidden] or packed-aware
ROW_WISE = {"MatMul", "SkipLayerNormalization", "BiasGelu", "Gelu", "FastGelu", "Add", "Mul", "Cast",
            "PackedAttention", "Attention"}
#: the packed attention kernels: "fused" = PackedAttention (QKV projection inside the op),
#: "flash" = Q/K/V projections + PackedMultiHeadAttention without bias (FlashAttention varlen on sm80+)
#: "cudnn" = the flash layout's projections + cliptune's RaggedAttention (cuDNN's fused attention on the packed
#: rows; custom-op library built with cuDNN's headers; sm90)
#: "short" = the same with RaggedAttention's impl 1: cliptune's kernel for rows of at most 128 tokens and head
#: size 64 (native/short_attention.cu; one block per row and head, tiles rounded up to 16 tokens; sm80+; a plain
#: fallback kernel for longer rows)
#: "short_qkv" = "short" with one QKV projection (the fused weight as exported; bias [query bias, 0, 0]) that
#: RaggedAttention reads in place (qkv = 1): one GEMM instead of three per layer
#: "pipe_qkv" = "short_qkv" with RaggedAttention's impl 2: the same kernel pipelined (a block of 8 warps loops over
#: (row, head) items with two shared-memory stages, loading the next item while it computes one)
KERNELS = PACKED_KERNELS
#: RaggedAttention's impl attribute per kernel (custom-op library)
RAGGED_IMPL = {"cudnn": 0, **OWN_KERNELS}
DEFAULT_KERNEL = "flash"  # measured faster on an H100 (README, GPU section)
#: the packed layers' feed-forward block: "matmul" = MatMul -> BiasGelu -> MatMul (ORT's fusions),
#: "moe" = one single-expert com.microsoft.MoE node (experimental; 26 % slower on an H100, see above)
#: "cublaslt" = MatMul -> BiasGelu as one ai.cliptune.FusedDense (cuBLASLt epilogue; custom-op library)
#: "cublaslt_res" = "cublaslt", and each MatMul -> SkipLayerNormalization (the attention output and the second
#: feed-forward projections) as FusedDense with the bias and the residual in the epilogue -> LayerNormalization
FFNS = ("matmul", "moe", "cublaslt", "cublaslt_res")
#: the feed-forward blocks that use the custom-op library
LT_FFNS = ("cublaslt", "cublaslt_res")
LT_DOMAIN = NATIVE_DOMAIN  # the custom-op library's domain (the export needs only the name, not the library)
DEFAULT_FFN = "matmul"
#: the first packed layer's input ("packed_host" only): "gather" = Flatten -> Gather of the padded
#: [pop * batch, seq, hidden] sum of the embeddings and the prompts (made by ORT's broadcast Add), "fused" =
#: ai.cliptune.PackAdd reading the embeddings [batch, seq, hidden] and the prompts [pop, seq, hidden] and
#: writing the packed rows in one pass (custom-op library; ORT's Add took 0.23 ms and its Gathers 0.29 ms,
#: 6 launches, of a 53 ms stacked call on an H100, run 9)
FRONTS = PACKED_FRONTS
DEFAULT_FRONT = "gather"
ROUTER = "cliptune_moe_router"  # the "moe" block's router, zeros [tokens, 1]: softmax over one expert is 1


class PackingError(ValueError):
    """The graph does not have the structure packed attention needs."""


def ensure_ms_opset(model) -> None:
    """Declare the com.microsoft domain when ORT's contrib ops are used (the fp16 fusions do not)."""
    from onnx import helper

    if any(n.domain == MS for n in model.graph.node) and not any(o.domain == MS for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS, 1))


def topo_sort(graph) -> None:
    """Order ``graph.node`` so every node follows the producers of its inputs (the fp16 converter
    appends its input Casts at the end; ORT sorts at load, a single pass over the list cannot)."""
    known = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        rest = []
        for n in pending:
            if all(i in known for i in n.input):
                ordered.append(n)
                known.update(n.output)
            else:
                rest.append(n)
        if len(rest) == len(pending):
            raise PackingError(f"the graph has a cycle or a dangling input at node {rest[0].name}")
        pending = rest
    del graph.node[:]
    graph.node.extend(ordered)


def pack_graph(model, host_offsets: bool = False, kernel: str = DEFAULT_KERNEL,
               base_dir: str | os.PathLike | None = None, ffn: str = DEFAULT_FFN, front: str = DEFAULT_FRONT,
               prefix: bool = False, prompt_fp16: bool = False, qbias: bool = False) -> int:
    """Rewrite ``model`` (onnx.ModelProto, fused fp16 graph of the contract) in place for packed
    attention (``host_offsets``: the packing comes in as graph inputs; ``kernel``: see :data:`KERNELS`;
    ``base_dir``: where external weights live, which the "flash" kernel reads to fold the value bias;
    ``ffn``: the packed layers' feed-forward block, see :data:`FFNS`; ``front``: how the first packed layer's
    input is made, see :data:`FRONTS`; ``prefix``: the first layer's QKV projection runs once per candidate on
    the positions its examples share, see :func:`_prefix_nodes`; ``prompt_fp16``: the graph takes its prompts as
    float16, see :func:`prompt_input_fp16`; ``qbias``: the one QKV projection runs as a plain MatMul and
    RaggedAttention adds the query bias to Q itself, where cuBLASLt's bias epilogue cost about 7 % of that GEMM on an
    H100 (run 10: 655 against about 700 TFLOP/s); QKV kernels only);
    returns the number of Attention nodes converted. Raises :class:`PackingError` with the
    reason when the graph does not have the expected structure (then only the node order may have changed:
    a topological sort, same graph)."""
    from onnx import helper

    if kernel not in KERNELS:
        raise PackingError(f"packed attention kernel must be one of {', '.join(KERNELS)}, got {kernel!r}")
    if ffn not in FFNS:
        raise PackingError(f"packed feed-forward block must be one of {', '.join(FFNS)}, got {ffn!r}")
    if front not in FRONTS:
        raise PackingError(f"packed front must be one of {', '.join(FRONTS)}, got {front!r}")
    if front == "fused" and not host_offsets:
        raise PackingError("the fused front (PackAdd) reads the host's packed_token_index: pack with host offsets "
                           "(packed_host)")
    if qbias and kernel not in QKV_KERNELS:
        raise PackingError(f"the query bias in the attention op needs a QKV kernel ({', '.join(QKV_KERNELS)}), "
                           f"got kernel {kernel!r}")
    if prefix and not (host_offsets and kernel in QKV_KERNELS):
        raise PackingError("a shared-prefix first layer needs host offsets (packed_host) and a kernel that reads one "
                           f"QKV projection ({', '.join(QKV_KERNELS)}), got kernel {kernel!r}"
                           + ("" if host_offsets else " without host offsets"))

    g = model.graph
    topo_sort(g)
    nodes = list(g.node)
    atts = [n for n in nodes if n.op_type == "Attention" and n.domain == MS]
    if not atts:
        raise PackingError("no fused Attention node: pack only fp16 exports (ORT's fusions make Attention)")
    masks = {n.input[3] if len(n.input) > 3 else "" for n in atts}
    if len(masks) != 1 or "" in masks:
        raise PackingError("the Attention nodes do not share one mask_index input")
    mask = masks.pop()
    for n in atts:
        if len(n.input) > 4 and any(n.input[4:]):
            raise PackingError(f"{n.name} has past/bias inputs beyond mask_index: not a BERT encoder layer")
        for a in n.attribute:
            if a.name == "unidirectional" and helper.get_attribute_value(a):
                raise PackingError(f"{n.name} is unidirectional")

    consumers: dict[str, list] = {}
    for n in nodes:
        for i in n.input:
            consumers.setdefault(i, []).append(n)

    def only(tensor: str, op: str):
        cs = [c for c in consumers.get(tensor, []) if c.op_type == op]
        if len(cs) != 1:
            raise PackingError(f"expected one {op} reading {tensor}, found {len(cs)}")
        return cs[0]

    # the last full-sequence layer: Attention -> MatMul -> SkipLN (s1) -> ... -> SkipLN (s2, skip = s1)
    last = atts[-1]
    s1 = only(only(last.output[0], "MatMul").output[0], "SkipLayerNormalization")
    s2s = [c for c in consumers.get(s1.output[0], []) if c.op_type == "SkipLayerNormalization"]
    if len(s2s) != 1:
        raise PackingError("the last Attention layer does not end in two SkipLayerNormalization nodes")
    s2 = s2s[0]
    x0, t_last = atts[0].input[0], s2.output[0]

    # the region: every node downstream of x0 up to (and including) s2; nothing outside may read it
    region, region_out = [], {x0}
    for n in nodes:
        if any(i in region_out for i in n.input) and not any(i == t_last for i in n.input):
            region.append(n)
            region_out.update(o for o in n.output if o)
        if n is s2:
            break
    else:
        raise PackingError("the last layer's SkipLayerNormalization was not reached from the first Attention")
    ids = {id(n) for n in region}
    if not all(id(a) in ids for a in atts):
        raise PackingError("an Attention node lies outside the packed region")
    const_dims = {t.name: list(t.dims) for t in g.initializer}
    for n in nodes:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":
                    const_dims[n.output[0]] = list(a.t.dims)
    for n in region:
        if n.op_type not in ROW_WISE:
            raise PackingError(f"{n.op_type} node {n.name} inside the packed region: only row-wise ops can "
                               "run on packed tokens")
        if n.op_type in ("Attention", "PackedAttention"):
            continue
        if n.op_type == "MatMul" and n.input[1] in region_out:
            raise PackingError(f"MatMul node {n.name} multiplies two token tensors: not row-wise")
        for k, i in enumerate(n.input):
            if not i or i in region_out:
                continue
            dims = const_dims.get(i)
            # a weight [in, out] of MatMul (input 1), else a per-hidden-unit vector (bias, gamma, mask)
            row_wise = dims is not None and (len(dims) == 2 if (n.op_type == "MatMul" and k == 1)
                                             else all(d == 1 for d in dims[:-1]))
            if not row_wise:
                raise PackingError(f"{n.op_type} node {n.name} reads {i} ({dims}), which is not a per-row weight: "
                                   "it cannot run on packed tokens")
        for o in n.output:
            if o and o != t_last:
                outside = [c.name for c in consumers.get(o, []) if id(c) not in ids]
                if outside:
                    raise PackingError(f"{o} (inside the packed region) is read outside it by {outside[0]}")
    outside_x0 = [c.name for c in consumers.get(x0, []) if id(c) not in ids]
    if outside_x0:
        raise PackingError(f"the first Attention's input is also read by {outside_x0[0]} (outside the layers)")
    if any(o.name == t_last for o in g.output):
        raise PackingError("the last full layer's output is a graph output")

    flash = _plan_flash(g, atts, only, base_dir) if kernel in SPLIT_KERNELS else {}
    moe = _plan_moe(g, region, consumers) if ffn == "moe" else {}
    if ffn == "moe" and len(moe) != len(atts):
        raise PackingError(f"found {len(moe)} MatMul -> BiasGelu -> MatMul -> SkipLayerNormalization feed-forward "
                           f"blocks in the {len(atts)} packed layers: the moe block needs one per layer")
    pack_add = _plan_front(g, x0, consumers) if front == "fused" else None
    lt = _plan_lt(g, region, consumers) if ffn in LT_FFNS else {}
    if ffn in LT_FFNS and len(lt) != len(atts):
        raise PackingError(f"found {len(lt)} MatMul -> BiasGelu feed-forward projections in the {len(atts)} packed "
                           "layers: the cublaslt block needs one per layer")

    # rewrite
    x_packed, offset, cum, max_len = (x0 + "__packed", x0 + "__token_offset", x0 + "__cu_seqlens",
                                      x0 + "__max_len")
    if host_offsets:
        from onnx import TensorProto

        index, offset, cum = HOST_INPUTS
        x_flat = x0 + "__flat"
        g.input.extend([helper.make_tensor_value_info(index, TensorProto.INT64, ["packed_tokens"]),
                        helper.make_tensor_value_info(offset, TensorProto.INT32, ["packed_rows", "packed_seq"]),
                        helper.make_tensor_value_info(cum, TensorProto.INT32, ["packed_rows_plus_1"])])
    t_packed = t_last + "__packed"
    for n in region:
        for k, i in enumerate(n.input):
            if i == x0:
                n.input[k] = x_packed
    s2.output[0] = t_packed
    new_nodes = []
    folded = {id(b[part]) for b in moe.values() for part in ("gelu", "fc2")}  # inside the MoE nodes
    folded |= {id(gelu) for gelu in lt.values()}  # inside the FusedDense nodes
    res = _plan_res(g, region, consumers) if ffn == "cublaslt_res" else {}
    if ffn == "cublaslt_res" and len(res) != 2 * len(atts):
        raise PackingError(f"found {len(res)} MatMul -> SkipLayerNormalization projections in the {len(atts)} packed "
                           "layers: the cublaslt_res block needs two per layer")
    folded |= {id(mm) for mm, _ in res.values()}  # inside the FusedDense nodes (emitted at their SkipLN)
    if pack_add is not None:
        folded |= {id(n) for n in pack_add[2]}  # the padded sum: PackAdd makes the packed rows itself
    res_bias = {id(p["sln"]): f"{name}__b_out" for name, p in flash.items()}  # the value bias folded in
    for n in nodes:
        if n is atts[0] and pack_add is not None:
            new_nodes.append(helper.make_node("PackAdd", [pack_add[0], pack_add[1], index], [x_packed],
                                              name="cliptune_PackAdd", domain=LT_DOMAIN))
        elif n is atts[0] and host_offsets:
            new_nodes.append(helper.make_node("Flatten", [x0], [x_flat], name="cliptune_PackFlatten", axis=2))
            new_nodes.append(helper.make_node("Gather", [x_flat, index], [x_packed], name="cliptune_PackGather",
                                              axis=0))
        elif n is atts[0]:
            new_nodes.append(helper.make_node("RemovePadding", [x0, mask], [x_packed, offset, cum, max_len],
                                              name="cliptune_RemovePadding", domain=MS))
        if moe and n is atts[0]:  # one router for every layer: all read the same packed tokens
            new_nodes.extend(_moe_router(x_packed, _moe_dtype(g, moe)))
        if id(n) in moe:
            new_nodes.extend(_moe_nodes(moe[id(n)]))
        elif id(n) in lt:
            gelu = lt[id(n)]
            new_nodes.append(helper.make_node("FusedDense", [n.input[0], n.input[1], gelu.input[1]], list(gelu.output),
                                              name=n.name + "_fused_gelu", domain=LT_DOMAIN, activation="gelu_tanh"))
        elif id(n) in folded:
            continue
        elif id(n) in res:
            new_nodes.extend(_res_nodes(g, n, *res[id(n)], res_bias.get(id(n))))
        elif n.op_type == "Attention" and n.domain == MS and kernel in SPLIT_KERNELS:
            if kernel in RAGGED_IMPL and n is atts[0]:
                new_nodes.extend(_ragged_index_nodes(cum, flash[n.name]["hid"]))
            layer = _flash_nodes(n, flash[n.name], offset, cum, epilogue=ffn in LT_FFNS,
                                 ragged=RAGGED_IMPL.get(kernel), qkv=kernel in QKV_KERNELS, qbias=qbias)
            if prefix and n is atts[0]:
                layer = _prefix_nodes(g, layer)
            new_nodes.extend(layer)
        elif n.op_type == "Attention" and n.domain == MS:
            keep = [a for a in n.attribute if a.name in ("num_heads", "qkv_hidden_sizes", "scale")]
            p = helper.make_node("PackedAttention", [n.input[0], n.input[1], n.input[2], offset, cum], list(n.output),
                                 name=n.name + "_packed", domain=MS)
            p.attribute.extend(keep)
            new_nodes.append(p)
        else:
            new_nodes.append(n)
        if n is s2:
            new_nodes.append(helper.make_node("RestorePadding", [t_packed, offset], [t_last],
                                              name="cliptune_RestorePadding", domain=MS))
    if flash:  # before the node list is rebuilt: extend() copies the nodes
        _apply_flash(g, flash, qkv=kernel in QKV_KERNELS, qbias=qbias)
    if moe:
        _apply_moe(g, moe)
    if pack_add is not None:  # the padded sum's Unsqueezes and shape arithmetic are left unread
        new_nodes = _drop_unread_producers(g, new_nodes, pack_add[2])
    del g.node[:]
    g.node.extend(new_nodes)
    # shapes recorded for the padded tensors no longer hold inside the region
    stale = region_out | {t_packed}
    keep_vi = [v for v in g.value_info if v.name not in stale]
    del g.value_info[:]
    g.value_info.extend(keep_vi)
    ensure_ms_opset(model)
    if ((ffn in LT_FFNS or kernel in LIBRARY_KERNELS or pack_add is not None)
            and not any(o.domain == LT_DOMAIN for o in model.opset_import)):
        model.opset_import.append(helper.make_opsetid(LT_DOMAIN, 1))
    if prompt_fp16:
        prompt_input_fp16(model)
    return len(atts)


#: the prompt input of the graph contract
PROMPT = "prompt_embeds"


def prompt_input_fp16(model) -> None:
    """``model`` (onnx.ModelProto, an fp16 graph of the contract) takes ``prompt_embeds`` as float16, in place.

    ONNX Runtime's float16 conversion keeps the graph's inputs float32 (``keep_io_types``) and casts the prompts
    to float16 first thing, on the device. A call on host prompts then copies 4 MB host -> device for 20
    candidates of roberta-large's shape (20 x 50 x 1024 float32); taking float16, 2 MB, which the runtime casts on
    the host with the same rounding (``cliptune_ort.engine.host_cast``; float32 -> float16 -> the graph is the
    graph's own cast, bit for bit). The input's type becomes float16 and the Casts to float16 that read it go, their
    readers reading the input. Raises :class:`PackingError` where something else reads the prompts."""
    from onnx import TensorProto, helper

    g = model.graph
    inp = next((i for i in g.input if i.name == PROMPT), None)
    if inp is None:
        raise PackingError(f"the graph has no {PROMPT} input: not a graph of the contract")
    if inp.type.tensor_type.elem_type == TensorProto.FLOAT16:
        return
    nodes = list(g.node)
    readers = [n for n in nodes if PROMPT in n.input]
    casts = [n for n in readers if n.op_type == "Cast"
             and any(a.name == "to" and helper.get_attribute_value(a) == TensorProto.FLOAT16 for a in n.attribute)]
    if not casts or len(casts) != len(readers):
        raise PackingError(f"{PROMPT} is read by {sorted({n.op_type for n in readers})}: float16 prompts need it read by "
                           "Casts to float16 only (ORT's float16 conversion with keep_io_types)")
    gone = {c.output[0] for c in casts}
    if any(o.name in gone for o in g.output):
        raise PackingError(f"a cast of {PROMPT} is a graph output")
    cast_ids = {id(c) for c in casts}
    keep = [n for n in nodes if id(n) not in cast_ids]
    for n in keep:
        for k, i in enumerate(n.input):
            if i in gone:
                n.input[k] = PROMPT
    del g.node[:]
    g.node.extend(keep)
    vi = [v for v in g.value_info if v.name not in gone]
    del g.value_info[:]
    g.value_info.extend(vi)
    inp.type.tensor_type.elem_type = TensorProto.FLOAT16


def _const_ints(g, name: str) -> list[int] | None:
    """The integer values of a constant (initializer or Constant node), or None."""
    from onnx import numpy_helper

    for t in g.initializer:
        if t.name == name:
            return [int(v) for v in numpy_helper.to_array(t).reshape(-1)]
    for n in g.node:
        if n.op_type == "Constant" and n.output[0] == name:
            for a in n.attribute:
                if a.name == "value":
                    return [int(v) for v in numpy_helper.to_array(a.t).reshape(-1)]
    return None


def _plan_front(g, x0: str, consumers) -> tuple[str, str, list]:
    """The padded sum the first packed layer reads, ``x0 = Reshape(Add(Unsqueeze(A, [0]), Unsqueeze(P, [1])))``
    (the contract wrapper's ``(h.unsqueeze(0) + ext.unsqueeze(1)).reshape(pop * batch, seq, hidden)``): (A, the
    embeddings [batch, seq, hidden]; P, the prompts at their positions [pop, seq, hidden]; the Reshape and
    the Add, which PackAdd replaces). Raises :class:`PackingError` where the graph makes x0 otherwise."""
    producer = {o: n for n in g.node for o in n.output}
    reshape = producer.get(x0)
    add = producer.get(reshape.input[0]) if reshape is not None and reshape.op_type == "Reshape" else None
    outputs = {o.name for o in g.output}
    if (add is None or add.op_type != "Add" or len(consumers.get(add.output[0], [])) != 1
            or {add.output[0], x0} & outputs):
        raise PackingError("the fused front needs the first layer's input as Reshape(Add(...)) of the embeddings "
                           "and the prompts, read by nothing else; pack with front='gather'")
    side = {}
    for t in add.input:
        u = producer.get(t)
        if u is None or u.op_type != "Unsqueeze":
            continue
        axes = _const_ints(g, u.input[1]) if len(u.input) > 1 else None
        if axes is None:  # opset < 13: axes as an attribute
            axes = next((list(a.ints) for a in u.attribute if a.name == "axes"), None)
        if axes in ([0], [1]) and len(consumers.get(t, [])) == 1 and t not in outputs:
            side[axes[0]] = u.input[0]
    if set(side) != {0, 1}:
        raise PackingError("the fused front needs Add(Unsqueeze(embeddings, [0]), Unsqueeze(prompts, [1])) before "
                           "the first layer; pack with front='gather'")
    return side[0], side[1], [reshape, add]


def _names_read(nodes) -> set:
    """Every tensor name the nodes read, including those their subgraphs (If, Loop, Scan) read from outside."""
    read = set()
    for n in nodes:
        read.update(n.input)
        for a in n.attribute:
            for sub in [a.g, *a.graphs] if a.HasField("g") else a.graphs:
                read |= _names_read(sub.node)
    return read


def _drop_unread_producers(g, nodes: list, removed: list) -> list:
    """``nodes`` less the producers of what the ``removed`` nodes read that nothing reads any more, then their
    producers in turn; the value_info of every removed tensor and the initializers only removed nodes read
    go too."""
    graph_outputs = {o.name for o in g.output}
    dropped: list = list(removed)
    seeds = {i for n in removed for i in n.input if i}
    while True:
        read = graph_outputs | _names_read(nodes)
        dead = [n for n in nodes if any(o in seeds for o in n.output) and not any(o and o in read for o in n.output)]
        if not dead:
            break
        ids = {id(n) for n in dead}
        nodes = [n for n in nodes if id(n) not in ids]
        dropped += dead
        seeds = {i for n in dead for i in n.input if i}
    read = graph_outputs | _names_read(nodes)
    gone = {o for n in dropped for o in n.output}
    keep_vi = [v for v in g.value_info if v.name not in gone]
    del g.value_info[:]
    g.value_info.extend(keep_vi)
    unread = {i for n in dropped for i in n.input} - read
    keep_init = [t for t in g.initializer if t.name not in unread]
    del g.initializer[:]
    g.initializer.extend(keep_init)
    return nodes


def _plan_flash(g, atts, only, base_dir) -> dict:
    """Per Attention node of the "flash" kernel: the folded biases (numpy fp16) and the SkipLayerNorm whose
    bias takes the value bias. Reads only; raises PackingError when a layer is not Attention -> MatMul ->
    SkipLayerNormalization or a weight is not an initializer."""
    import numpy as np
    from onnx import helper, numpy_helper

    inits = {t.name: t for t in g.initializer}

    def value(name: str):
        if name not in inits:
            raise PackingError(f"{name} is not an initializer: the flash kernel folds the value bias at export")
        try:
            return numpy_helper.to_array(inits[name], base_dir=str(base_dir) if base_dir else "")
        except Exception as e:  # external data not found
            raise PackingError(f"cannot read {name} ({e}): pass base_dir, the folder of the graph's weights") from e

    plan = {}
    for a in atts:
        attrs = {x.name: helper.get_attribute_value(x) for x in a.attribute}
        sizes = list(attrs.get("qkv_hidden_sizes") or [])
        if sizes and len(set(sizes)) != 1:
            raise PackingError(f"{a.name} has unequal qkv_hidden_sizes {sizes}: not supported by the flash kernel")
        bias = value(a.input[2])
        hid = bias.shape[-1] // 3
        proj = only(a.output[0], "MatMul")
        sln = only(proj.output[0], "SkipLayerNormalization")
        w_o = value(proj.input[1])
        b_o = value(sln.input[4]) if len(sln.input) > 4 and sln.input[4] else np.zeros(hid, np.float32)
        if w_o.shape != (hid, hid) or b_o.shape != (hid,):
            raise PackingError(f"{proj.name} / {sln.name}: output projection {w_o.shape} and bias {b_o.shape} "
                               f"do not fit hidden size {hid}")
        b_out = b_o.astype(np.float32) + bias[2 * hid:].astype(np.float32) @ w_o.astype(np.float32)
        plan[a.name] = {"hid": hid, "b_q": bias[:hid].astype(bias.dtype), "b_out": b_out.astype(bias.dtype),
                        "sln": sln, "num_heads": attrs["num_heads"], "scale": attrs.get("scale")}
    return plan


#: RaggedAttention's row lengths and element offsets, made once per graph from the packing's cu_seqlens
RAGGED_LEN, RAGGED_OFFSET = "cliptune_ragged_seq_len", "cliptune_ragged_offset"


def _ragged_index_nodes(cum: str, hidden: int) -> list:
    """seq_len = cu[1:] - cu[:-1] and offset = cu * hidden (int32, on the device): RaggedAttention's inputs."""
    import numpy as np
    from onnx import helper, numpy_helper

    def const(name, value, dtype):
        return helper.make_node("Constant", [], [name], name=name + "_const",
                                value=numpy_helper.from_array(np.array(value, dtype), name))

    return [const("cliptune_ragged_one", [1], np.int64), const("cliptune_ragged_zero", [0], np.int64),
            const("cliptune_ragged_end", [2**62], np.int64), const("cliptune_ragged_last", [-1], np.int64),
            const("cliptune_ragged_hidden", [hidden], np.int32),
            helper.make_node("Slice", [cum, "cliptune_ragged_one", "cliptune_ragged_end"], ["cliptune_ragged_hi"],
                             name="cliptune_ragged_hi"),
            helper.make_node("Slice", [cum, "cliptune_ragged_zero", "cliptune_ragged_last"], ["cliptune_ragged_lo"],
                             name="cliptune_ragged_lo"),
            helper.make_node("Sub", ["cliptune_ragged_hi", "cliptune_ragged_lo"], [RAGGED_LEN], name=RAGGED_LEN),
            helper.make_node("Mul", [cum, "cliptune_ragged_hidden"], [RAGGED_OFFSET], name=RAGGED_OFFSET)]


def _flash_nodes(att, p: dict, offset: str, cum: str, epilogue: bool = False, ragged: int | None = None,
                 qkv: bool = False, qbias: bool = False) -> list:
    """Q/K/V projections (slices of the fused weight; no key or value bias) + PackedMultiHeadAttention
    (``ragged``: cliptune's RaggedAttention with that impl, :data:`RAGGED_IMPL`); ``epilogue``: the query
    projection and its bias as one FusedDense (cuBLASLt's BIAS epilogue); ``qkv``: one projection with the
    fused weight and the bias [query bias, 0, 0], read in place by RaggedAttention (qkv = 1); ``qbias`` (with
    ``qkv``): that projection without a bias (a plain MatMul) and RaggedAttention adding the query bias (its 8th
    input), see :func:`pack_graph`."""
    from onnx import helper

    x, w, name, h = att.input[0], att.input[1], att.name, p["hid"]
    out = []

    def biased(weight: str, bias: str, y: str, tag: str) -> None:  # y = x @ weight + bias
        if epilogue:
            out.append(helper.make_node("FusedDense", [x, weight, bias], [y], name=f"{name}_dense_{tag}",
                                        domain=LT_DOMAIN, activation="none"))
        else:
            out.extend([helper.make_node("MatMul", [x, weight], [y + "_nobias"], name=f"{name}_matmul_{tag}"),
                        helper.make_node("Add", [y + "_nobias", bias], [y], name=f"{name}_bias_{tag}")])

    if qkv and qbias:  # one plain projection; the query bias goes to the attention op
        out.append(helper.make_node("MatMul", [x, w], [f"{name}__qkv"], name=f"{name}_matmul_qkv"))
        ins = [f"{name}__qkv"] * 3
    elif qkv:  # one projection, read in place
        biased(w, f"{name}__b_qkv", f"{name}__qkv", "qkv")
        ins = [f"{name}__qkv"] * 3
    else:
        for i, part in enumerate("qkv"):
            out.append(helper.make_node("Slice", [w, f"cliptune_qkv_at_{i * h}", f"cliptune_qkv_at_{(i + 1) * h}",
                                                  "cliptune_qkv_axis"], [f"{name}__w{part}"],
                                        name=f"{name}_slice_{part}"))
            if part == "q":
                biased(f"{name}__wq", f"{name}__b_q", f"{name}__q", "q")
            else:
                out.append(helper.make_node("MatMul", [x, f"{name}__w{part}"], [f"{name}__{part}"],
                                            name=f"{name}_matmul_{part}"))
        ins = [f"{name}__q", f"{name}__k", f"{name}__v"]
    if ragged is not None:
        node = helper.make_node("RaggedAttention", [*ins, RAGGED_LEN, RAGGED_OFFSET, offset], list(att.output),
                                name=name + "_ragged_attention", domain=LT_DOMAIN, num_heads=p["num_heads"],
                                scale=float(p["scale"] or 0.0))
        if ragged:  # impl 0 (cuDNN) is the op's default: format-3 graphs carry no impl
            node.attribute.append(helper.make_attribute("impl", ragged))
        if qkv:
            node.attribute.append(helper.make_attribute("qkv", 1))
        if qbias:  # token_rows (7th) left empty here (_prefix_nodes fills it), the query bias 8th
            node.input.extend(["", f"{name}__b_q"])
        out.append(node)
        return out
    mha = helper.make_node("PackedMultiHeadAttention", [*ins, "", offset, cum],
                           list(att.output), name=name + "_packed_mha", domain=MS, num_heads=p["num_heads"])
    if p["scale"]:
        mha.attribute.append(helper.make_attribute("scale", p["scale"]))
    out.append(mha)
    return out


def _prefix_nodes(g, layer: list) -> list:
    """The first packed layer with its QKV projection on the rows its examples share once per candidate.

    The first layer's input at positions 0 .. L ([CLS] and the L prompt positions) is the same in every example of
    a candidate (the graph contract: same ids, positions and prompt), and so are its Q, K and V there. ``layer``
    (:func:`_flash_nodes` with one QKV projection) gets a ``Gather`` of the packed input at
    ``packed_compact_index`` (every token but those positions of a candidate's examples after its first) before
    the projection, and RaggedAttention reads token t's Q, K and V at row ``packed_token_rows[t]`` of the compact
    projection (its 7th input); the runtime makes both (:func:`cliptune_ort.engine.packing_feeds`). On the
    SST-2 16-shot set (rows of 59 to 106 tokens, 51 shared) the projection runs on about a third of the tokens:
    for 20 candidates x 32 examples, about 13,800 rows instead of 45,400. Exact: the rows it skips are equal."""
    from onnx import TensorProto, helper

    compact_index, token_rows = PREFIX_INPUTS
    att = next(n for n in layer if n.op_type == "RaggedAttention")
    proj = next(n for n in layer if att.input[0] in n.output)
    if proj.op_type == "Add":  # MatMul -> Add: the MatMul reads the input
        proj = next(n for n in layer if proj.input[0] in n.output)
    x = proj.input[0]
    gather = helper.make_node("Gather", [x, compact_index], [x + "__compact"], name=x + "_compact", axis=0)
    proj.input[0] = x + "__compact"
    if len(att.input) > 6:  # the slot left for it (a query bias follows)
        att.input[6] = token_rows
    else:
        att.input.append(token_rows)
    g.input.extend([helper.make_tensor_value_info(compact_index, TensorProto.INT64, ["packed_compact_tokens"]),
                    helper.make_tensor_value_info(token_rows, TensorProto.INT32, ["packed_tokens"])])
    return [gather, *layer]


def _apply_flash(g, plan: dict, qkv: bool = False, qbias: bool = False) -> None:
    """The new initializers (query biases, output biases with the value bias folded in, slice bounds; ``qkv``:
    the one projection's bias [query bias, 0, 0] in place of the query bias, or with ``qbias`` the query bias
    alone, which RaggedAttention adds)."""
    import numpy as np
    from onnx import numpy_helper

    have = {t.name for t in g.initializer}
    bounds = {0}
    for name, p in plan.items():
        h = p["hid"]
        if qkv and qbias:
            g.initializer.append(numpy_helper.from_array(p["b_q"], f"{name}__b_q"))
        elif qkv:
            b = np.concatenate([p["b_q"], np.zeros(2 * h, p["b_q"].dtype)])
            g.initializer.append(numpy_helper.from_array(b, f"{name}__b_qkv"))
        else:
            bounds |= {h, 2 * h, 3 * h}
            g.initializer.append(numpy_helper.from_array(p["b_q"], f"{name}__b_q"))
        g.initializer.append(numpy_helper.from_array(p["b_out"], f"{name}__b_out"))
        sln = p["sln"]
        while len(sln.input) < 5:
            sln.input.append("")
        sln.input[4] = f"{name}__b_out"
    for b in sorted(bounds):
        if f"cliptune_qkv_at_{b}" not in have:
            g.initializer.append(numpy_helper.from_array(np.array([b], np.int64), f"cliptune_qkv_at_{b}"))
    if "cliptune_qkv_axis" not in have:
        g.initializer.append(numpy_helper.from_array(np.array([1], np.int64), "cliptune_qkv_axis"))


def _plan_moe(g, region, consumers) -> dict:
    """The feed-forward blocks of the packed region: id(first MatMul) -> {fc1, gelu, fc2, sln}. A block is
    MatMul (weight initializer) -> BiasGelu -> MatMul (weight initializer) -> SkipLayerNormalization
    (input 0), each the only reader of the one before."""
    inits = {t.name for t in g.initializer}

    def sole(tensor: str, op: str):
        cs = consumers.get(tensor, [])
        return cs[0] if len(cs) == 1 and cs[0].op_type == op else None

    blocks = {}
    for n in region:
        if n.op_type != "MatMul" or n.input[1] not in inits:
            continue
        gelu = sole(n.output[0], "BiasGelu")
        fc2 = sole(gelu.output[0], "MatMul") if gelu is not None else None
        sln = sole(fc2.output[0], "SkipLayerNormalization") if fc2 is not None else None
        if sln is None or fc2.input[1] not in inits or gelu.input[1] not in inits or sln.input[0] != fc2.output[0]:
            continue
        blocks[id(n)] = {"fc1": n, "gelu": gelu, "fc2": fc2, "sln": sln}
    return blocks


def _plan_lt(g, region, consumers) -> dict:
    """The packed layers' first feed-forward projections: id(MatMul) -> its BiasGelu, where the MatMul reads a
    weight initializer and its only reader is a BiasGelu with an initializer bias."""
    inits = {t.name for t in g.initializer}
    found = {}
    for n in region:
        if n.op_type != "MatMul" or n.input[1] not in inits:
            continue
        cs = consumers.get(n.output[0], [])
        if len(cs) == 1 and cs[0].op_type == "BiasGelu" and cs[0].input[0] == n.output[0] and cs[0].input[1] in inits:
            found[id(n)] = cs[0]
    return found


def _plan_res(g, region, consumers) -> dict:
    """The packed layers' projections that end in a residual: id(SkipLayerNormalization) -> (its MatMul, the
    index of the MatMul's output among the SkipLN's first two inputs), where the MatMul reads a weight
    initializer, the SkipLN is its only reader, and nothing reads the SkipLN's other outputs."""
    inits = {t.name for t in g.initializer}
    found = {}
    for n in region:
        if n.op_type != "SkipLayerNormalization":
            continue
        if any(o and consumers.get(o) for o in n.output[1:]):
            continue
        for k in (0, 1):
            mm = next((m for m in region if m.op_type == "MatMul" and m.output[0] == n.input[k]), None)
            if mm is not None and mm.input[1] in inits and len(consumers.get(mm.output[0], [])) == 1:
                found[id(n)] = (mm, k)
                break
    return found


def _res_nodes(g, sln, mm, k: int, folded_bias: str | None) -> list:
    """MatMul -> SkipLayerNormalization(input, skip, gamma, beta, bias) as FusedDense(x, W, bias, residual) ->
    LayerNormalization(gamma, beta): the sum x @ W + bias + residual is made in the GEMM's epilogue (float32,
    rounded once to the graph's type) and the normalisation reads one tensor instead of two."""
    import numpy as np
    from onnx import helper, numpy_helper

    bias = folded_bias or (sln.input[4] if len(sln.input) > 4 else "")
    if not bias:  # no bias anywhere: zeros of the weight's type and width
        w = next(t for t in g.initializer if t.name == mm.input[1])
        bias = f"cliptune_zero_bias_{w.dims[1]}_{w.data_type}"
        if not any(t.name == bias for t in g.initializer):
            dtype = helper.tensor_dtype_to_np_dtype(w.data_type)
            g.initializer.append(numpy_helper.from_array(np.zeros(w.dims[1], dtype), bias))
    eps = next((helper.get_attribute_value(a) for a in sln.attribute if a.name == "epsilon"), 1e-12)
    summed = sln.name + "__residual_sum"
    return [helper.make_node("FusedDense", [mm.input[0], mm.input[1], bias, sln.input[1 - k]], [summed],
                             name=sln.name + "_dense_residual", domain=LT_DOMAIN, activation="none"),
            helper.make_node("LayerNormalization", [summed, sln.input[2], sln.input[3]], [sln.output[0]],
                             name=sln.name + "_layer_norm", axis=-1, epsilon=float(eps))]


def _moe_dtype(g, moe: dict) -> int:
    """The element type (TensorProto enum) of the feed-forward weights: MoE's router must match it."""
    w = next(iter(moe.values()))["fc1"].input[1]
    return next(t.data_type for t in g.initializer if t.name == w)


def _moe_router(x_packed: str, dtype: int) -> list:
    """Shape(x)[0:1] ++ [1] -> ConstantOfShape(0): one router row per packed token, made on the device."""
    from onnx import helper

    return [helper.make_node("Shape", [x_packed], [ROUTER + "__tokens"], name="cliptune_moe_tokens", start=0, end=1),
            helper.make_node("Concat", [ROUTER + "__tokens", "cliptune_moe_one"], [ROUTER + "__shape"],
                             name="cliptune_moe_shape", axis=0),
            helper.make_node("ConstantOfShape", [ROUTER + "__shape"], [ROUTER], name="cliptune_moe_zeros",
                             value=helper.make_tensor("zero", dtype, [1], [0]))]


def _moe_nodes(b: dict) -> list:
    """Weights to MoE's layout ([experts, out, in]; Transpose + Unsqueeze of the initializers, which ORT
    folds at load) and the single-expert MoE node; the SkipLayerNormalization loses its bias to fc2's."""
    from onnx import helper

    fc1, gelu, fc2, sln = b["fc1"], b["gelu"], b["fc2"], b["sln"]
    name, out = fc1.name, fc1.name + "__moe"
    nodes, args = [], [fc1.input[0], ROUTER]
    b2 = sln.input[4] if len(sln.input) > 4 else ""
    for w, bias, tag in ((fc1.input[1], gelu.input[1], "fc1"), (fc2.input[1], b2, "fc2")):
        nodes.append(helper.make_node("Transpose", [w], [f"{name}__{tag}_wt"], name=f"{name}_{tag}_wt", perm=[1, 0]))
        nodes.append(helper.make_node("Unsqueeze", [f"{name}__{tag}_wt", "cliptune_moe_axis0"], [f"{name}__{tag}_w"],
                                      name=f"{name}_{tag}_w"))
        args.append(f"{name}__{tag}_w")
        if bias:
            nodes.append(helper.make_node("Unsqueeze", [bias, "cliptune_moe_axis0"], [f"{name}__{tag}_b"],
                                          name=f"{name}_{tag}_b"))
        args.append(f"{name}__{tag}_b" if bias else "")
    nodes.append(helper.make_node("MoE", args, [out], name=name + "_moe", domain=MS, k=1, activation_type="gelu"))
    return nodes


def _apply_moe(g, moe: dict) -> None:
    """Each block's SkipLayerNormalization reads the MoE output, without a bias (fc2's bias is inside MoE);
    the constants the MoE nodes need."""
    import numpy as np
    from onnx import numpy_helper

    for b in moe.values():
        sln = b["sln"]
        sln.input[0] = b["fc1"].name + "__moe"
        del sln.input[4:]
    have = {t.name for t in g.initializer}
    for name, v in (("cliptune_moe_axis0", [0]), ("cliptune_moe_one", [1])):
        if name not in have:
            g.initializer.append(numpy_helper.from_array(np.array(v, np.int64), name))


def pack_graph_file(path: str | os.PathLike, out: str | os.PathLike | None = None, host_offsets: bool = False,
                    kernel: str = DEFAULT_KERNEL, ffn: str = DEFAULT_FFN, front: str = DEFAULT_FRONT,
                    prefix: bool = False, prompt_fp16: bool = False, qbias: bool = False) -> int:
    """:func:`pack_graph` on a graph file (weights stay where they are); writes ``out`` or in place."""
    import onnx

    path = Path(path)
    m = onnx.load(str(path), load_external_data=False)
    n = pack_graph(m, host_offsets, kernel, base_dir=path.parent, ffn=ffn, front=front, prefix=prefix,
                   prompt_fp16=prompt_fp16, qbias=qbias)
    target = Path(out) if out else path
    tmp = target.with_name(target.name + ".tmp")
    onnx.save(m, str(tmp))
    os.replace(tmp, target)
    return n


def pack_export(src: str | os.PathLike, out: str | os.PathLike, overwrite: bool = False,
                host_offsets: bool = False, kernel: str = DEFAULT_KERNEL, ffn: str = DEFAULT_FFN,
                front: str = DEFAULT_FRONT, prefix: bool = False, prompt_dtype: str = "float32",
                qbias: bool = False) -> dict:
    """A packed copy of the fp16 export ``src`` in ``out``: graphs rewritten, the weights file
    copied, the manifest re-sealed with ``attention: packed`` (``packed_host`` with
    ``host_offsets``), ``packed_kernel``, ``packed_ffn`` and ``packed_front``, and with ``prefix``
    ``shared_prefix: n_prompt + 1`` (the runtime then groups rows by their first n_prompt + 1 ids and feeds the
    shared-prefix packing), ``prompt_dtype`` (float16: :func:`prompt_input_fp16`), and with ``qbias``
    ``packed_q_bias: attention`` (:func:`pack_graph`). Returns the manifest."""
    from cliptune_ort.errors import ConfigError
    from cliptune_ort.fileio import atomic_write_json
    from cliptune_ort.manifest import (
        MANIFEST_NAME,
        load_manifest,
        pin_sha256,
        seal_manifest,
    )

    src, out = Path(src), Path(out)
    if prompt_dtype not in PROMPT_DTYPES:
        raise ConfigError(f"prompt_dtype must be one of {', '.join(PROMPT_DTYPES)}, got {prompt_dtype!r}")
    man = load_manifest(src)
    if man.precision != "fp16":
        raise ConfigError(f"{src} is a {man.precision} export: packed attention needs --precision fp16 "
                          "(ORT fuses Attention only there, and PackedAttention runs on CUDA only)")
    if man.packed:
        raise ConfigError(f"{src} is already packed")
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise ConfigError(f"output folder {out} exists and is not empty: pass overwrite=True or another folder")
        shutil.rmtree(out)
    tmp = out.with_name(f".{out.name}.packing.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        data = json.loads((src / MANIFEST_NAME).read_text())
        for f in (data["weights"]["file"], data["tokenizer"]["file"]):
            shutil.copy2(src / f, tmp / f)  # not a hard link: onnx refuses external data with several links
        for gr in data["graphs"]:
            gr["packed_attention_nodes"] = pack_graph_file(src / gr["file"], tmp / gr["file"], host_offsets, kernel,
                                                           ffn, front, prefix, prompt_dtype == "float16", qbias)
            gr["sha256"] = pin_sha256(tmp / gr["file"])
        data["attention"] = "packed_host" if host_offsets else "packed"
        data["packed_kernel"] = kernel
        data["packed_ffn"] = ffn
        data["packed_front"] = front
        data["shared_prefix"] = data["n_prompt"] + 1 if prefix else 0
        data["prompt_dtype"] = prompt_dtype
        data["packed_q_bias"] = "attention" if qbias else "projection"
        data["packed_from"] = str(src)
        atomic_write_json(tmp / MANIFEST_NAME, seal_manifest(data))
        load_manifest(tmp)  # the result must load and verify
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return json.loads((out / MANIFEST_NAME).read_text())
