"""Hugging Face causal LMs on the fused head: `patch_model`.

    fa.patch_model(model, outputs=("logps", "entropy"))
    out = model(input_ids, attention_mask=mask, labels=labels, fused_head=True)
    out.loss, out.logps, out.entropy          # mean NLL, (B, T-1) per-token log-probs and entropy

The head itself (weight, bias, softcap, logit scale folded into the temperature) is read by `fusealign.head`,
which the engine shares; `patch_model` adds only the backbone call, the label shift and the scatter back to
(B, T-1). Nothing here builds the (tokens × V) logits, and nothing imports transformers.
"""

from __future__ import annotations

import functools
import types
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from fusealign.head import backbone, score_hidden
from fusealign.kernels.common import check_outputs


# --- patch_model: `model(..., labels=..., fused_head=True)` ---------------------------------------------------
@dataclass
class FusedHeadOutput:
    """What a patched model returns with `fused_head=True`. Per-token fields are (B, T-1) (or the shape of
    `shift_labels`), zero where the label is -100; those not asked for in `outputs` are None."""

    loss: torch.Tensor  # mean NLL over the tokens whose label is not -100 (0 if there are none)
    logps: Optional[torch.Tensor] = None
    entropy: Optional[torch.Tensor] = None
    log_sum_sq_probs: Optional[torch.Tensor] = None
    mean_logits: Optional[torch.Tensor] = None
    is_top1: Optional[torch.Tensor] = None
    label_mask: Optional[torch.Tensor] = None  # labels != -100

    def __getitem__(self, key):  # out["loss"], as a transformers ModelOutput allows
        return getattr(self, key)


def patch_model(model: nn.Module, *, temperature: float = 1.0, outputs: tuple = ("logps",),
                backend: str = "auto") -> nn.Module:
    """Give `model` a fused LM head: afterwards `model(input_ids, …, labels=labels, fused_head=True)` runs the
    backbone, projects only the positions whose next-token label is not -100 through the fused op, and
    returns a `FusedHeadOutput` (mean NLL `loss`, per-token `logps`, and the other `outputs` of
    `fa.linear_logps`: "entropy", "log_sum_sq_probs", "mean_logits", "is_top1") — never the logits.
    `labels` are aligned with `input_ids` and shifted here; pre-shifted `shift_labels=` are used as they are.

    Without `fused_head=True` the forward (and so `generate`) is the original one. Softcap, logit scale, bias,
    tied embeddings and nested (vision-language) text configs are read from the model (`head_of`); a PEFT
    model is patched through its base model, whose forward PEFT calls. Patching again replaces the options.
    Returns `model`.
    """
    names = check_outputs(outputs, False)
    names = names if "logps" in names else ("logps",) + names  # the loss needs them
    target = model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT
    original = getattr(target, "_fusealign_original_forward", target.forward)

    @functools.wraps(type(target).forward)  # keeps the signature: `generate` validates its kwargs against it
    def forward(self, *args, fused_head=False, labels=None, shift_labels=None, **kwargs):
        if not fused_head:
            if labels is not None:
                kwargs["labels"] = labels
            if shift_labels is not None:
                kwargs["shift_labels"] = shift_labels
            return original(*args, **kwargs)
        if labels is None and shift_labels is None:
            raise ValueError("fused_head=True needs labels= (or shift_labels=)")
        kwargs.pop("num_items_in_batch", None)
        kwargs["use_cache"] = False
        out = backbone(self)(*args, **kwargs)
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]  # (B, T, H)
        if shift_labels is None:
            hidden, y = hidden[:, :-1], labels[:, 1:]  # position t predicts token t + 1
        else:
            y = shift_labels
        y = y.to(hidden.device)
        mask = y != -100  # (B, T-1)
        per_token = score_hidden(self, hidden[mask], y[mask], temperature=temperature, outputs=names,
                                 backend=backend)
        # masked_scatter keeps the outputs connected to the model even when no label is valid.
        full = {n: x.new_zeros(mask.shape).masked_scatter(mask, x) for n, x in zip(names, per_token)}
        loss = -full["logps"].sum() / mask.sum().clamp(min=1)
        return FusedHeadOutput(loss=loss, label_mask=mask, **{n: full[n] for n in outputs})

    target._fusealign_original_forward = original
    target.forward = types.MethodType(forward, target)
    return model
