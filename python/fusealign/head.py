"""A Hugging Face causal LM's head as a first-class object: the one place a model's LM head becomes fused-op arguments.

    head = fa.head.head_of(model, temperature=0.7)        # Head(weight, bias, softcap, temperature)
    hidden, head = fa.head.head_inputs(model, hidden)      # both in the compute dtype
    logps, entropy = head.logps(hidden, targets, outputs=("logps", "entropy"))

The head of any `transformers` causal LM (text or vision-language, tied or not, with or without bias) is read
as z = softcap·tanh(s·r/softcap)/T with raw logits r = h Wᵀ + b, where the family's knobs are
    Gemma 2/3  `final_logit_softcapping`  c           Cohere   `logit_scale` s (z = s·r)
    Granite    `logits_scaling` d (z = r/d, s = 1/d)  Falcon-H1 `lm_head_multiplier`, `output_multiplier` s
(the scale applies before the softcap, as in TRL's `add_fused_lm_head`). The fused ops take a softcap and a
temperature, so a positive scale is folded into both: softcap·tanh(s·r/softcap) = s·c'·tanh(r/c') with
c' = softcap/s, hence softcap' = c/s and T' = T/s. A new logit-scale family is one line of `logit_scale`.

Who reads it: the engine (`fusealign.engine.models.completion_inputs`: every trainer, PPO's scoring,
`compare`) and `fa.patch_model` (integrations/hf.py). Nothing here builds the (tokens × V) logits, and nothing
imports transformers: `import fusealign` stays light.

One rule for sharded heads: the weight is passed on as it is. A vocabulary-sharded DTensor (tensor parallel,
`ColwiseParallel` on lm_head) runs the fused op's vocabulary-parallel path; a parameter FSDP2 holds sharded
(outside its module's forward) is refused by the fused op with an error naming the fix — never gathered here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from fusealign.kernels import linear_logps


@dataclass
class Head:
    """What the fused ops need of a model's LM head."""

    weight: torch.Tensor  # (V, H)
    bias: Optional[torch.Tensor]  # (V,) or None
    softcap: Optional[float]  # with any logit scale folded in
    temperature: float  # user temperature with any logit scale folded in

    def logps(self, hidden: torch.Tensor, targets: torch.Tensor, *, outputs: tuple = ("logps",),
              backend: str = "auto") -> tuple:
        """hidden: (N, H) in this head's dtype, targets: (N,) -> the requested `outputs` of `fa.linear_logps`."""
        return linear_logps(hidden, self.weight, targets, bias=self.bias, softcap=self.softcap,
                            temperature=self.temperature, outputs=outputs, backend=backend)

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
    weight, bias = out.weight, getattr(out, "bias", None)  # as they are: see "One rule for sharded heads" above
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
    return head.logps(hidden, targets, outputs=outputs, backend=backend)
