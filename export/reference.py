"""An independent PyTorch reference for parity checks of exported graphs.

It runs the *unmodified* Hugging Face model (eval mode, its own attention-mask handling and its full
vocabulary LM head) and applies the same stationary masks through forward hooks on the model's own
dropout modules, which are the identity in eval mode. The prompt is added by a forward hook on the
embedding module (after its dropout site, as in BBT). Candidates run one at a time, and the logits
are read at the mask position and verbalizer columns only at the very end. It shares no code path
with :mod:`cliptune_export.wrapper` except :func:`dropout_sites`, which only names the modules.
"""

from __future__ import annotations

import torch
from torch import nn

from .wrapper import Arch, dropout_sites


@torch.inference_mode()
def reference_logits(
    mlm: nn.Module,
    arch: Arch,
    masks: dict[str, torch.Tensor] | None,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    mask_pos: torch.Tensor,
    prompt_embeds: torch.Tensor,
    verbalizer_ids: torch.Tensor,
) -> torch.Tensor:
    """Logits [pop, batch, labels] of the masked model, computed the slow, obvious way."""
    mlm.eval()
    handles = []
    try:
        if masks is not None:
            for name, parent, attr in dropout_sites(mlm, arch):
                module = getattr(parent, attr)
                mask = masks[name]
                handles.append(module.register_forward_hook(lambda m, i, o, mask=mask: o * mask))
        base = getattr(mlm, arch.base_attr)
        current = {}

        def add_prompt(module, inputs, output):
            n_prompt = current["prompt"].shape[0]
            out = output.clone()
            out[:, 1 : 1 + n_prompt, :] += current["prompt"]
            return out

        handles.append(base.embeddings.register_forward_hook(add_prompt))
        rows = []
        for prompt in prompt_embeds:
            current["prompt"] = prompt
            logits = mlm(input_ids=input_ids, attention_mask=attention_mask).logits  # [batch, seq, vocab]
            at_mask = logits[torch.arange(input_ids.shape[0]), mask_pos]  # [batch, vocab]
            rows.append(at_mask[:, verbalizer_ids])
        return torch.stack(rows)
    finally:
        for h in handles:
            h.remove()
