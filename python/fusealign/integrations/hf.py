"""Hugging Face causal LMs on the fused head: the one place a model's LM head becomes fused-op arguments.

    fa.patch_model(model, outputs=("logps", "entropy"))
    out = model(input_ids, attention_mask=mask, labels=labels, fused_head=True)
    out.loss, out.logps, out.entropy          # mean NLL, (B, T-1) per-token log-probs and entropy

The head of any `transformers` causal LM (text or vision-language, tied or not, with or without bias) is
read as z = softcap·tanh(s·r/softcap)/T with raw logits r = h Wᵀ + b, where the family's knobs are
    Gemma 2/3  `final_logit_softcapping`  c           Cohere   `logit_scale` s (z = s·r)
    Granite    `logits_scaling` d (z = r/d, s = 1/d)  Falcon-H1 `lm_head_multiplier`, `output_multiplier` s
(the scale applies before the softcap, as in TRL's `add_fused_lm_head`). The fused ops take a softcap and
a temperature, so a positive scale is folded into both: softcap·tanh(s·r/softcap) = s·c'·tanh(r/c') with
c' = softcap/s, hence softcap' = c/s and T' = T/s. Nothing here builds the (tokens × V) logits.

`head_of` / `head_inputs` / `score_hidden` are what the engine (fusealign.engine.models: every trainer,
PPO's scoring, `compare`) and `patch_model` share; `patch_model` adds only the backbone call, the
label shift and the scatter back to (B, T-1). Imports nothing from transformers: `import fusealign`
stays light.
"""

from __future__ import annotations

import functools
import types
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from fusealign.kernels import linear_logps
from fusealign.kernels.common import check_outputs


@dataclass
class Head:
    """What the fused ops need of a model's LM head."""

    weight: torch.Tensor  # (V, H)
    bias: Optional[torch.Tensor]  # (V,) or None
    softcap: Optional[float]  # with any logit scale folded in
    temperature: float  # user temperature with any logit scale folded in

    def kwargs(self) -> dict:
        """The head's keyword arguments of every fused op (`fa.linear_logps`, `linear_kl`, the losses)."""
        return dict(bias=self.bias, softcap=self.softcap, temperature=self.temperature)

    def to(self, dtype: torch.dtype) -> "Head":
        """The head in the hidden states' dtype (autocast gives bf16 states next to an fp32 weight)."""
        cast = lambda t: t if t is None or t.dtype == dtype else t.to(dtype)  # noqa: E731
        return Head(cast(self.weight), cast(self.bias), self.softcap, self.temperature)


def text_config(model: nn.Module):
    """The language model's config (nested in vision-language models)."""
    cfg = model.config
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else (getattr(cfg, "text_config", None) or cfg)


def logit_scale(cfg) -> float:
    """The multiplier s the family applies to raw logits before any softcap (1.0 if none), as TRL reads it."""
    for name in ("logit_scale", "output_multiplier", "lm_head_multiplier"):
        if getattr(cfg, name, None) is not None:
            return float(getattr(cfg, name))
    scaling = getattr(cfg, "logits_scaling", None)
    if scaling is not None:  # Granite, MiniCPM3 divide; HyperCLOVA X multiplies
        return float(scaling) if getattr(cfg, "model_type", "") == "hyperclovax" else 1.0 / float(scaling)
    return 1.0


def fold_scale(temperature: float, softcap: Optional[float], scale: float) -> tuple:
    """(softcap', T') with softcap'·tanh(r/softcap')/T' = softcap·tanh(s·r/softcap)/T, for a scale s > 0."""
    if not scale > 0:
        raise ValueError(f"a logit scale must be > 0 to fold into the temperature, got {scale}")
    return (None if softcap is None else float(softcap) / scale), float(temperature) / scale


def output_embeddings(model: nn.Module) -> nn.Module:
    out = model.get_output_embeddings()
    if out is None or not hasattr(out, "weight"):
        raise ValueError(f"{type(model).__name__} has no output embedding (LM head); use a *ForCausalLM model")
    if hasattr(out, "base_layer"):  # a PEFT adapter on the head itself: its .weight would omit the adapter
        raise NotImplementedError("an adapter on the LM head (PEFT `target_modules` including lm_head) is not "
                                  "supported by the fused head; leave the head out of the adapter's targets")
    return out


def head_of(model: nn.Module, temperature: float = 1.0) -> Head:
    """The model's LM head as fused-op arguments (weight, bias, softcap and temperature, logit scale folded in)."""
    cfg = text_config(model)
    out = output_embeddings(model)
    weight, bias = out.weight, getattr(out, "bias", None)
    if hasattr(weight, "full_tensor"):  # FSDP2 DTensor shards: the fused op reads the whole head
        weight = weight.full_tensor()
        bias = None if bias is None else bias.full_tensor()
    softcap = getattr(cfg, "final_logit_softcapping", None)
    softcap, T = fold_scale(temperature, softcap or None, logit_scale(cfg))
    return Head(weight, bias, softcap, T)


def backbone(model: nn.Module) -> nn.Module:
    """The model without its LM head: `base_model` (which takes every input, images included), else the decoder."""
    base = getattr(model, "base_model", model)
    if base is model:
        base = model.get_decoder()
    if base is model:
        raise ValueError(f"cannot find the backbone of {type(model).__name__} (base_model / get_decoder())")
    return base


def head_inputs(model: nn.Module, hidden: torch.Tensor, *, temperature: float = 1.0) -> tuple:
    """(hidden, head) in one compute dtype: the autocast dtype under autocast, else the head weight's."""
    device = hidden.device.type
    head = head_of(model, temperature)
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else head.weight.dtype
    return hidden.to(dtype), head.to(dtype)


def score_hidden(model: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, *, temperature: float = 1.0,
                 outputs: tuple = ("logps",), backend: str = "auto") -> tuple:
    """hidden: (N, H) last hidden states predicting targets: (N,) -> the requested `outputs` of
    `fa.linear_logps` under the model's head, each (N,). Gradients flow to the model when grad is enabled."""
    hidden, head = head_inputs(model, hidden, temperature=temperature)
    return linear_logps(hidden, head.weight, targets, outputs=outputs, backend=backend, **head.kwargs())


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
