"""The module that is exported: a Hugging Face masked LM cut to the graph contract.

Graph contract (DESIGN.md), shapes in the project's vocabulary:

inputs
    input_ids       int64 [batch, seq]   right-padded token ids; positions 0..L ([CLS] and the L
                                         placeholders) hold the same ids in every row
    attention_mask  int64 [batch, seq]   1 for real tokens, 0 for padding
    mask_pos        int64 [batch]        index of the [MASK] token in each row
    prompt_embeds   float [pop, L, hidden]  added to the embedding-layer output at positions 1..L
    verbalizer_ids  int64 [labels]       vocabulary rows of the verbalizer words
output
    logits          float [pop, batch, labels]  MLM logits at the mask position, verbalizer columns

Every candidate prompt of the population shares the same token batch: the encoder runs on
``pop * batch`` rows. The hidden state is gathered at the mask position *before* the LM head, and
only the verbalizer rows of the decoder are computed.

Thinning: every module the model uses for hidden dropout (embedding output, attention-output
projection, FFN-output projection) is replaced by :class:`MaskMul`, a multiplication with a fixed
per-hidden-unit mask in {0, 1/(1-p)}. The full network (graph 0) uses :class:`torch.nn.Identity`.
Following BBT, the prompt is added *after* the embedding layer including its dropout site.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

#: the additive attention bias for padded keys (the classic BERT value; ORT's fusions recognise it)
MASK_BIAS = -10000.0


@dataclass(frozen=True)
class Arch:
    """Where an architecture keeps the parts the wrapper needs."""

    model_type: str
    base_attr: str  # attribute of the *ForMaskedLM holding the encoder model
    family: str  # "bert" (BERT's modules and MLM head) or "roberta" (RoBERTa's: position ids after the padding id)


ARCHS = {
    "bert": Arch("bert", "bert", "bert"),
    "roberta": Arch("roberta", "roberta", "roberta"),
    # RoBERTa's modules under other names and vocabularies (multilingual, French): the same export
    "xlm-roberta": Arch("xlm-roberta", "roberta", "roberta"),
    "camembert": Arch("camembert", "roberta", "roberta"),
}


def dropout_sites(mlm: nn.Module, arch: Arch) -> list[tuple[str, nn.Module, str]]:
    """The hidden-dropout sites in execution order: (site name, parent module, attribute name).

    Order: embedding output, then per layer attention-output and FFN-output (1 + 2 * layers sites).
    """
    base = getattr(mlm, arch.base_attr)
    sites = [("embeddings", base.embeddings, "dropout")]
    for i, layer in enumerate(base.encoder.layer):
        sites.append((f"layer{i}.attention_output", layer.attention.output, "dropout"))
        sites.append((f"layer{i}.ffn_output", layer.output, "dropout"))
    return sites


class MaskMul(nn.Module):
    """A stationary dropout mask: ``x * mask`` with mask [hidden] in {0, 1/(1-p)}."""

    def __init__(self, mask: torch.Tensor):
        super().__init__()
        self.register_buffer("mask", mask.clone().float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.mask.to(x.dtype)


def shared_prefix_linear(lin: nn.Module, h: torch.Tensor, shared: int, pop: int) -> torch.Tensor:
    """``lin(h)`` where the first ``shared`` positions of ``h`` are equal in all rows of a candidate.

    The rows are ``pop`` candidates x ``batch`` examples. Positions 0..L ([CLS] and the L prompt
    positions) enter the first layer with the same token ids, positions, token type and prompt in
    every example of a candidate (the graph contract), so their projection is computed from the
    candidate's first row and broadcast: for splade-tiny on SST-2 (L = 50, ~70 tokens per row) that
    is ~3/4 of the first layer's Q/K/V work. Exact when the contract holds; the runtime checks that
    every row of a fixed batch carries the same first L+1 ids.
    h [rows, seq, hidden]; returns [rows, seq, out].
    """
    rows, seq, hidden = h.shape
    batch = rows // pop
    head = lin(h.reshape(pop, batch, seq, hidden)[:, 0, :shared])  # [pop, shared, out]
    out = head.shape[-1]
    head = head.unsqueeze(1).expand(pop, batch, shared, out).reshape(rows, shared, out)
    return torch.cat([head, lin(h[:, shared:])], dim=1)


def full_layer(layer: nn.Module, h: torch.Tensor, bias: torch.Tensor, shared: int = 0, pop: int = 1) -> torch.Tensor:
    """One encoder layer at every position, written out in the classic BERT pattern.

    Why not the HF layer's own forward: with it (and the bias built from the pop-expanded mask
    reshaped to 4-D), ``onnxruntime.transformers``' optimizer fused SkipLayerNormalization and
    BiasGelu but no Attention (measured, onnxruntime 1.32, transformers 5.24), for two reasons:
    transformers 5 scales the scores with a Mul (``QK^T * scaling``) and FusionAttention takes the
    *first* Mul parent of the score Add as the mask's Mul, so it never reached the mask; and the
    mask path was Cast <- Reshape <- Expand instead of Cast <- Unsqueeze <- Unsqueeze from a 2-D
    mask. Written out here (same modules, same weights: the masked-reference parity still checks
    it), the trace is exactly what the fusion matches, whatever the transformers release:

        q/k/v: MatMul -> Add -> Reshape [rows, seq, heads, dh] -> Transpose (k straight to [.., dh, seq])
        scores: MatMul(q, k) -> Div(sqrt(dh)) -> Add(bias) -> Softmax -> MatMul(., v)
        ctx: Transpose -> Reshape [rows, seq, hidden] -> dense (MatMul, Add) -> (mask) -> Add(residual)
             -> LayerNorm

    ``bias`` must be built as in :meth:`ContractModel.forward` (Unsqueeze, Unsqueeze, Cast, Sub, Mul)
    from the 2-D mask of *every* row: that is the mask path FusionAttention recognises, and it then
    feeds the Attention op a right-padding mask index [rows] (no 4-D bias tensor).
    ``shared`` > 0 (the first layer only, CPU exports): the first ``shared`` positions of ``h`` are
    the same in every row of a candidate (see :func:`shared_prefix_linear`), so their Q/K/V are
    projected once per candidate. That breaks the pattern above, so fp16/CUDA exports leave it off.
    h [rows, seq, hidden], bias [rows, 1, 1, seq]; returns [rows, seq, hidden].
    """
    att = layer.attention.self
    rows, seq, hidden = h.shape
    heads, dh = att.num_attention_heads, att.attention_head_size

    def proj(lin):
        return shared_prefix_linear(lin, h, shared, pop) if shared else lin(h)

    q = proj(att.query).reshape(rows, seq, heads, dh).transpose(1, 2)  # [rows, heads, seq, dh]
    k = proj(att.key).reshape(rows, seq, heads, dh).permute(0, 2, 3, 1)  # [rows, heads, dh, seq]
    v = proj(att.value).reshape(rows, seq, heads, dh).transpose(1, 2)  # [rows, heads, seq, dh]
    # Div, not Mul: the fusion finds the bias as the *first* Mul parent of the Add, so a scaling Mul
    # next to it would hide the mask path
    scores = torch.matmul(q, k) / math.sqrt(dh) + bias  # [rows, heads, seq, seq]
    ctx = torch.matmul(torch.softmax(scores, dim=-1), v)  # [rows, heads, seq, dh]
    ctx = ctx.transpose(1, 2).reshape(rows, seq, hidden)
    a = layer.attention.output(ctx, h)  # dense -> (mask) -> LayerNorm(x + h)
    return layer.output(layer.intermediate(a), a)  # FFN -> (mask) -> LayerNorm


def last_layer_at_mask(layer: nn.Module, h: torch.Tensor, hm: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """The last encoder layer evaluated only where the head reads it, without projecting keys or values.

    The query, the attention output, the FFN and both LayerNorms are needed at the mask position
    only. With one query per row, the keys and values need not be projected at every position
    either (single-query attention, exact): per head, with ``k_j = Wk h_j + bk`` and
    ``v_j = Wv h_j + bv``,

        q . k_j = (Wk^T q) . h_j + q . bk      (q . bk is the same for every j: softmax drops it)
        sum_j p_j v_j = Wv (sum_j p_j h_j) + bv  (the p_j sum to 1)

    so the last layer costs O(hidden^2 + heads * seq * hidden) per row instead of
    O(seq * hidden^2): ~1/12 of a full layer's work at seq ~70, hidden 128 (the K/V projections at
    every position were ~13% of a whole splade-tiny call). Not an approximation: the masked-reference
    parity checks it like every other part.

    h [rows, seq, hidden] (input of the last layer), hm [rows, 1, hidden] (h at the mask),
    bias [rows, 1, 1, seq]; returns [rows, 1, hidden].
    """
    att = layer.attention.self
    rows, _, hidden = h.shape
    heads, dh = att.num_attention_heads, att.attention_head_size
    q = att.query(hm).reshape(rows, heads, dh).transpose(0, 1)  # [heads, rows, dh]
    wk = att.key.weight.reshape(heads, dh, hidden).to(h.dtype)  # rows of W are output units
    wv = att.value.weight.reshape(heads, dh, hidden).to(h.dtype)
    bv = att.value.bias.reshape(heads, 1, dh).to(h.dtype)
    qk = torch.matmul(q, wk).transpose(0, 1)  # [rows, heads, hidden] = Wk_h^T q_h
    # [rows, heads, seq]; the bias [rows, 1, 1, seq] reshaped, not squeezed (no If node for a dynamic dim)
    scores = torch.matmul(qk, h.transpose(1, 2)) / math.sqrt(dh) + bias.reshape(rows, 1, -1)
    # sum_j p_j h_j for all heads of a row in one [heads, seq] x [seq, hidden] product: h is read once per row.
    # (One [1, seq] x [seq, hidden] product per head and row, with h broadcast over the heads, ran as cuBLAS
    # gemv reading h once per head: about 0.7 ms of a stacked roberta-large call on an H100, run 7.)
    u = torch.matmul(torch.softmax(scores, dim=-1), h)  # [rows, heads, hidden]
    ctx = torch.matmul(u.transpose(0, 1), wv.transpose(1, 2)) + bv  # [heads, rows, dh]
    ctx = ctx.transpose(0, 1).reshape(rows, 1, hidden)
    a = layer.attention.output(ctx, hm)  # dense -> (mask) -> LayerNorm(x + hm)
    return layer.output(layer.intermediate(a), a)  # FFN -> (mask) -> LayerNorm


@torch.no_grad()
def fold_mask(parent: nn.Module, mask: torch.Tensor) -> None:
    """Fold a per-unit mask into the weights that produce the masked output (exact).

    Attention-output / FFN-output sites: ``dropout(dense(x))`` -> rows of dense scaled by the mask.
    Embedding site: ``dropout(LayerNorm(x))`` -> LayerNorm's gamma and beta scaled by the mask.
    No Mul node remains, so ORT's Attention/SkipLayerNorm fusions still match.
    """
    m = mask.to(torch.float32)
    if hasattr(parent, "dense"):
        parent.dense.weight.mul_(m[:, None])
        parent.dense.bias.mul_(m)
    else:  # embeddings
        parent.LayerNorm.weight.mul_(m)
        parent.LayerNorm.bias.mul_(m)


def lm_head_parts(mlm: nn.Module, arch: Arch):
    """(transform, decoder weight [vocab, hidden], decoder bias [vocab]) of the MLM head."""
    if arch.family == "bert":
        pred = mlm.cls.predictions
        bias = pred.decoder.bias if pred.decoder.bias is not None else pred.bias
        return pred.transform, pred.decoder.weight, bias
    head = mlm.lm_head

    def transform(x):
        x = head.dense(x)
        x = torch.nn.functional.gelu(x)
        return head.layer_norm(x)

    bias = head.decoder.bias if head.decoder.bias is not None else head.bias
    return transform, head.decoder.weight, bias


class ContractModel(nn.Module):
    """A masked LM (with fixed masks baked in, or none) exposing the graph contract.

    ``masks`` maps site name -> tensor [hidden]; None means the full network.
    The wrapped model is modified in place (its dropout modules are replaced): pass a copy.
    It also runs as a plain PyTorch module on any device and dtype (the GPU benchmark's baseline).

    Export notes (what the trace must look like for ONNX Runtime on CUDA):
    - attention: every full layer fuses into one ``Attention`` op (see :func:`full_layer`); the
      last layer, evaluated at the mask position only, stays as plain MatMul/Softmax (by design).
    - no control flow: the gather at the mask keeps its axis (no ``squeeze``: with a dynamic
      dimension the exporter emits an ``If`` checking that the axis is 1), so CUDA graphs are not
      refused for control-flow nodes.
    - shape arithmetic (Shape/Gather/Concat/Where feeding Reshape/Expand/ConstantOfShape shape
      inputs) is traced from the dynamic input shapes; ORT's CUDA provider places it on the CPU, which
      CUDA-graph capture allows as long as no Memcpy node is needed (no CPU node consumes a device
      tensor and no device node consumes a CPU node's data output). The benchmark checks the
      optimised CUDA graph for Memcpy nodes.
    """

    def __init__(self, mlm: nn.Module, arch: Arch, masks: dict[str, torch.Tensor] | None,
                 last_layer_at_mask: bool = True, fold_masks: bool = False, hf_layers: bool = False,
                 share_prefix: bool = False):
        super().__init__()
        self.last_layer_at_mask = last_layer_at_mask
        # share_prefix: project Q/K/V of [CLS] + prompt once per candidate in the first layer
        # (:func:`shared_prefix_linear`; CPU exports). Off for PyTorch baselines and fp16/CUDA exports.
        self.share_prefix = share_prefix
        # hf_layers: run the full layers through the HF modules' own forward (their attention
        # implementation, e.g. SDPA) instead of :func:`full_layer`. For PyTorch baselines only: the
        # export keeps full_layer, whose trace ORT's Attention fusion matches.
        self.hf_layers = hf_layers
        self.mlm = mlm
        self.arch = arch
        for name, parent, attr in dropout_sites(mlm, arch):
            if masks is not None and fold_masks:
                fold_mask(parent, masks[name])
                setattr(parent, attr, nn.Identity())
            else:
                setattr(parent, attr, MaskMul(masks[name]) if masks is not None else nn.Identity())
        base = getattr(mlm, arch.base_attr)
        self.embeddings = base.embeddings
        self.layers = base.encoder.layer
        self.transform, self.decoder_weight, self.decoder_bias = lm_head_parts(mlm, arch)

    def forward(self, input_ids, attention_mask, mask_pos, prompt_embeds, verbalizer_ids):
        batch, seq = input_ids.shape
        pop, n_prompt, hidden = prompt_embeds.shape
        h = self.embeddings(input_ids=input_ids)  # [batch, seq, hidden] (site 0 mask applied)
        dtype = h.dtype
        prompt = prompt_embeds.to(dtype)
        pre = torch.zeros(pop, 1, hidden, dtype=dtype, device=h.device)
        post = torch.zeros(pop, seq - n_prompt - 1, hidden, dtype=dtype, device=h.device)
        ext = torch.cat([pre, prompt, post], dim=1)  # [pop, seq, hidden]
        h = (h.unsqueeze(0) + ext.unsqueeze(1)).reshape(pop * batch, seq, hidden)
        # The attention bias in the classic BERT form, from the 2-D mask of every row (the mask is
        # expanded over pop *before* the bias is built): Unsqueeze, Unsqueeze, Cast, Sub, Mul is the
        # pattern ORT's FusionAttention turns into one Attention op with a mask index [rows].
        am = attention_mask.unsqueeze(0).expand(pop, batch, seq).reshape(pop * batch, seq)
        bias = (1.0 - am.unsqueeze(1).unsqueeze(2).to(dtype)) * MASK_BIAS  # [pop*batch, 1, 1, seq]
        n_full = len(self.layers) - 1 if self.last_layer_at_mask else len(self.layers)
        for i, layer in enumerate(self.layers[:n_full]):
            if self.hf_layers:
                out = layer(h, bias)
                h = out[0] if isinstance(out, tuple) else out
            else:
                shared = n_prompt + 1 if self.share_prefix and i == 0 else 0
                h = full_layer(layer, h, bias, shared=shared, pop=pop)
        idx = mask_pos.reshape(1, batch, 1, 1).expand(pop, batch, 1, hidden).reshape(pop * batch, 1, hidden)
        hm = torch.gather(h, 1, idx)  # [pop*batch, 1, hidden]; no squeeze: no If node
        if self.last_layer_at_mask:
            hm = last_layer_at_mask(self.layers[-1], h, hm, bias)
        t = self.transform(hm.reshape(pop, batch, hidden))
        w = self.decoder_weight[verbalizer_ids]  # [labels, hidden]
        b = self.decoder_bias[verbalizer_ids]  # [labels]
        return torch.matmul(t, w.t()) + b  # [pop, batch, labels]
