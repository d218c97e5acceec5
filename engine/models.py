"""Hugging Face causal LMs on fused heads: backbone hidden states + head weight, never full logits.

Any `transformers` causal LM works through `get_decoder()` (the backbone, final norm included) and
`get_output_embeddings()` (the head, tied or not, with or without bias). Family quirks honoured:
  Gemma 2/3  `final_logit_softcapping`  -> softcap c: z = c·tanh(r/c)
  Cohere     `logit_scale` s (z = s·r)   -> folded into the temperature: T / s
  Granite    `logits_scaling` d (z = r/d) -> folded into the temperature: T · d
Only positions whose next token is a completion token are projected (see `select_completion`).

The one completion-head path: `completion_inputs(model, batch)` (backbone → completion positions →
head, in one dtype) and `score_tokens` on top of it are what every trainer, PPO's scoring and
update, `compare` and the benchmarks call; nothing else assembles a head for the fused ops.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from fusealign.kernels import linear_logps

from .errors import ModelPathError


@dataclass
class Head:
    """What the fused losses need of a model's LM head."""

    weight: torch.Tensor  # (V, H)
    bias: Optional[torch.Tensor]  # (V,) or None
    softcap: Optional[float]
    temperature: float  # user temperature with any logit scale folded in

    def kwargs(self) -> dict:
        """The head's keyword arguments of every fused op (`fa.linear_logps`, `linear_kl`, the losses)."""
        return dict(bias=self.bias, softcap=self.softcap, temperature=self.temperature)

    def to(self, dtype: torch.dtype) -> "Head":
        """The head in the hidden states' dtype (autocast gives bf16 states next to an fp32 weight)."""
        cast = lambda t: t if t is None or t.dtype == dtype else t.to(dtype)  # noqa: E731
        return Head(cast(self.weight), cast(self.bias), self.softcap, self.temperature)


def head_of(model: nn.Module, temperature: float = 1.0) -> Head:
    cfg = getattr(model.config, "text_config", None) or model.config
    out = model.get_output_embeddings()
    if out is None or not hasattr(out, "weight"):
        raise ValueError(f"{type(model).__name__} has no output embedding (LM head); use a *ForCausalLM model")
    T = float(temperature)
    scale = getattr(cfg, "logit_scale", None)
    if scale:
        T = T / float(scale)
    scaling = getattr(cfg, "logits_scaling", None)
    if scaling:
        T = T * float(scaling)
    softcap = getattr(cfg, "final_logit_softcapping", None)
    if softcap is not None and (scale or scaling):
        raise ValueError("a head with both softcapping and a logit scale is not supported")
    return Head(out.weight, getattr(out, "bias", None), float(softcap) if softcap else None, T)


def backbone(model: nn.Module) -> nn.Module:
    dec = model.get_decoder()
    if dec is model:
        raise ValueError(f"cannot find the backbone of {type(model).__name__} through get_decoder()")
    return dec


def hidden_states(model: nn.Module, input_ids, attention_mask=None, position_ids=None) -> torch.Tensor:
    """Last hidden states (R, L, H) from the backbone alone: the LM head is never applied."""
    out = backbone(model)(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                          use_cache=False)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def select_completion(hidden, targets, seq_ids, ignore_index: int = -100):
    """Keep only positions that predict a completion token: (N_c, H), (N_c,), (N_c,).

    hidden: (R, L, H), targets: (R, L) next-token ids (ignore_index on prompt/padding), seq_ids: (R, L).
    Prompt and padding positions never reach the head (a data-dependent count: one host sync here).
    """
    keep = targets != ignore_index
    return hidden[keep], targets[keep], seq_ids[keep]


# --- the one completion-head path: every place that scores tokens goes through here -------------------
@dataclass
class CompletionInputs:
    """The fused ops' inputs for the completion tokens of a batch (N_c tokens, in batch order)."""

    hidden: torch.Tensor  # (N_c, H), in the compute dtype (the autocast dtype under autocast)
    targets: torch.Tensor  # (N_c,) next-token ids
    seq_ids: torch.Tensor  # (N_c,) sequence index of each token in the batch
    head: Head  # weight and bias in `hidden`'s dtype, softcap, temperature (logit scale folded in)


def completion_hidden(model: nn.Module, batch) -> tuple:
    """Backbone last hidden states at completion positions: (N_c, H), targets (N_c,), seq_ids (N_c,)."""
    h = hidden_states(model, batch.input_ids, batch.attention_mask, batch.position_ids)  # (R, L, H)
    return select_completion(h, batch.targets, batch.seq_ids)


def completion_inputs(model: nn.Module, batch, *, temperature: float = 1.0) -> CompletionInputs:
    """backbone → completion positions → head (weight, bias, softcap, temperature, logit scale), one dtype."""
    h_c, y_c, s_c = completion_hidden(model, batch)
    device = h_c.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else head_of(model).weight.dtype
    return CompletionInputs(h_c.to(dtype), y_c, s_c, head_of(model, temperature).to(dtype))


@dataclass
class TokenScores:
    """Per completion token, in batch order: log-probs (N_c,) fp32, entropy (N_c,) fp32 or None,
    values (N_c,) fp32 or None, sequence ids (N_c,)."""

    logps: torch.Tensor
    entropy: Optional[torch.Tensor]
    values: Optional[torch.Tensor]
    seq_ids: torch.Tensor


def score_tokens(model: nn.Module, batch, *, temperature: float = 1.0, backend: str = "auto",
                 entropy: bool = False, value_head: Optional[nn.Linear] = None) -> TokenScores:
    """Fused per-token log-probs (and entropy, and values of a value head on the same hidden states) of a
    batch's completion tokens; the full logits are never formed. Gradients flow when grad is enabled."""
    x = completion_inputs(model, batch, temperature=temperature)
    logps, ent = linear_logps(x.hidden, x.head.weight, x.targets, return_entropy=True, backend=backend,
                              **x.head.kwargs())
    values = None if value_head is None else linear_values(x.hidden, value_head)
    return TokenScores(logps, ent if entropy else None, values, x.seq_ids)


def linear_values(hidden: torch.Tensor, value_head: nn.Linear) -> torch.Tensor:
    """hidden: (N, H) -> (N,) fp32 scalar values of a `Linear(H, 1)` head."""
    return hidden.float() @ value_head.weight.reshape(-1).float() + value_head.bias.float()


def load_causal_lm(path: str, *, dtype: torch.dtype = torch.float32, attn_implementation: Optional[str] = None):
    """A causal LM from a local directory (config + safetensors). Nothing is fetched from a hub."""
    from transformers import AutoModelForCausalLM

    p = Path(path)
    if not (p / "config.json").is_file():
        raise ModelPathError(f"--model {path!r}: no config.json there (expected a local model directory or a "
                                f"built-in preset name)")
    kw = dict(dtype=dtype, local_files_only=True)
    if attn_implementation:
        kw["attn_implementation"] = attn_implementation
    return AutoModelForCausalLM.from_pretrained(str(p), **kw)


def model_from_config(config, *, seed: int = 0, dtype: torch.dtype = torch.float32):
    """Random-weight causal LM from a config (tests, presets, benchmarks)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=dtype)


class RewardModel(nn.Module):
    """Backbone of a causal LM plus a scalar value head read at each sequence's last token.

    Saved as the causal LM (safetensors, `from_pretrained`-loadable) plus `value_head.safetensors`.
    """

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm
        H = (getattr(lm.config, "text_config", None) or lm.config).hidden_size
        self.value_head = nn.Linear(H, 1)
        nn.init.normal_(self.value_head.weight, std=1.0 / (H + 1) ** 0.5)
        nn.init.zeros_(self.value_head.bias)

    @property
    def config(self):
        return self.lm.config

    def rewards(self, input_ids, attention_mask, position_ids, last_index):
        """(R, L) batch -> one reward per sequence, read at `last_index`: (S, 2) (row, position) pairs."""
        h = hidden_states(self.lm, input_ids, attention_mask, position_ids)  # (R, L, H)
        h_last = h[last_index[:, 0], last_index[:, 1]]  # (S, H)
        return (h_last @ self.value_head.weight.reshape(-1).to(h_last.dtype)) + self.value_head.bias.to(h_last.dtype)

    def save_pretrained(self, path, **kw):
        self.lm.save_pretrained(path, **kw)
        save_file({k: v.contiguous() for k, v in self.value_head.state_dict().items()},
                  os.path.join(path, "value_head.safetensors"))

    @classmethod
    def from_pretrained(cls, path, **kw):
        rm = cls(load_causal_lm(path, **kw))
        rm.value_head.load_state_dict(load_file(os.path.join(path, "value_head.safetensors")))
        return rm


class ValueHead(nn.Module):
    """A scalar head on a policy's own hidden states (PPO's critic="policy_head"), zero-initialised."""

    def __init__(self, H: int):
        super().__init__()
        self.value_head = nn.Linear(H, 1)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)


def critic_values(critic: "RewardModel", batch) -> torch.Tensor:
    """A separate critic (its own backbone + value head) at every completion token: (N_c,) fp32."""
    return linear_values(completion_hidden(critic.lm, batch)[0], critic.value_head)


def disable_dropout(model: nn.Module) -> nn.Module:
    """p = 0 in every dropout layer: RL and DPO compare log-probs of the same tokens across passes, and
    dropout would make policy and reference (or scoring and training) differ at step 0 (TRL does the same)."""
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    return model


def fingerprint(model: nn.Module, extra: str = "") -> str:
    """A short key for a model's weights (used to key cached reference log-probs)."""
    h = hashlib.sha256(extra.encode())
    h.update(json.dumps(model.config.to_dict(), sort_keys=True, default=str).encode())
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]
