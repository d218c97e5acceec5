"""Hugging Face causal LMs on fused heads: backbone hidden states + head weight, never full logits.

The head itself (weight, bias, softcap, logit scale folded into the temperature, the compute dtype) is
read in one place, `fusealign.head` (`head_of`, `head_inputs`), which `fa.patch_model` uses too. This module
adds the engine's batches: packed or padded rows, and only the positions whose next token is a completion
token are projected (see `select_completion`).

The one completion-head path: `completion_inputs(model, batch)` (backbone → completion positions →
head, in one dtype), and `score_tokens` = `completion_inputs` + `fa.linear_logps` (+ a value head on the same
hidden states), are what every trainer, PPO's scoring and update, `compare` and the benchmarks call; nothing
else assembles a head for the fused ops. Reward models are read in one place too, `RewardModel.rewards`.
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

from fusealign.head import Head, backbone, head_inputs
from fusealign.losses import sequence_rewards

from .errors import ModelPathError


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
    hidden, head = head_inputs(model, h_c, temperature=temperature)
    return CompletionInputs(hidden, y_c, s_c, head)


@dataclass
class TokenScores:
    """Per completion token, in batch order: log-probs (N_c,) fp32, entropy (N_c,) fp32 (None unless asked for),
    values (N_c,) fp32 or None, sequence ids (N_c,)."""

    logps: torch.Tensor
    entropy: Optional[torch.Tensor]
    values: Optional[torch.Tensor]
    seq_ids: torch.Tensor


def score_tokens(model: nn.Module, batch, *, temperature: float = 1.0, backend: str = "auto",
                 entropy: bool = False, value_head: Optional[nn.Linear] = None) -> TokenScores:
    """`completion_inputs` + `fa.linear_logps`: fused per-token log-probs (and, with `entropy`, the entropy; with a
    value head, its values on the same hidden states) of a batch's completion tokens; the full logits are never
    formed. Gradients flow when grad is enabled."""
    x = completion_inputs(model, batch, temperature=temperature)
    per_token = x.head.logps(x.hidden, x.targets, outputs=("logps", "entropy") if entropy else ("logps",),
                             backend=backend)
    values = None if value_head is None else linear_values(x.hidden, value_head)
    return TokenScores(per_token[0], per_token[1] if entropy else None, values, x.seq_ids)


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
        # The LM head is never used here: frozen (no optimizer state), unless tied to the input embedding.
        out, inp = lm.get_output_embeddings(), lm.get_input_embeddings()
        if out is not None and inp is not None and out.weight is not inp.weight:
            out.weight.requires_grad_(False)

    @property
    def config(self):
        return self.lm.config

    def rewards(self, batch) -> torch.Tensor:
        """One scalar per sequence of a batch, read at its last token: (S,) fp32. Padded batches through
        `fa.sequence_rewards`; packed ones (one row) at `batch.last_index`."""
        h = hidden_states(self.lm, batch.input_ids, batch.attention_mask, batch.position_ids)  # (R, L, H)
        w, b = self.value_head.weight, self.value_head.bias
        if batch.attention_mask is not None:
            return sequence_rewards(h, w.to(h.dtype), batch.attention_mask, value_bias=b.to(h.dtype)).float()
        h_last = h[batch.last_index[:, 0], batch.last_index[:, 1]]  # (S, H)
        return (h_last @ w.reshape(-1).to(h_last.dtype) + b.to(h_last.dtype)).float()

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


def _is_dropout_name(name: str) -> bool:
    """A dropout-like probability by its name: *dropout* (attention_dropout, hidden_dropout_prob, …), *pdrop
    (resid_pdrop, embd_pdrop, attn_pdrop), *layerdrop (LayerDrop skips whole layers), drop_path* / droppath /
    drop_connect* (stochastic depth) — the names transformers' configs use (configuration_*.py)."""
    n = name.lower()
    return ("dropout" in n or n.endswith("pdrop") or n.endswith("layerdrop") or n.startswith("drop_path")
            or "droppath" in n or n.startswith("drop_connect"))


def _zero_dropout_fields(obj, seen: set) -> None:
    """p = 0 in every numeric dropout-like attribute of `obj` (a config or a module), and in nested configs."""
    if id(obj) in seen:
        return
    seen.add(id(obj))
    for name, value in list(vars(obj).items()):
        if name.startswith("_"):
            continue
        if isinstance(value, (int, float)) and not isinstance(value, bool) and _is_dropout_name(name):
            setattr(obj, name, type(value)(0))
        elif _is_config(value):  # text_config, vision_config, …
            _zero_dropout_fields(value, seen)


def _is_config(x) -> bool:
    from transformers import PretrainedConfig

    return isinstance(x, PretrainedConfig)


def disable_dropout(model: nn.Module) -> nn.Module:
    """Dropout off wherever it hides: RL and DPO compare log-probs of the same tokens across passes, and any
    dropout makes policy and reference (or scoring and training) differ at step 0.

    Three places, because models read dropout in three ways: `nn.Dropout` modules (p = 0, as TRL does);
    config fields read at run time (Llama/Qwen/Mistral apply `config.attention_dropout` functionally, OPT
    `config.dropout`: every numeric field named like a dropout, in the config and its nested text/vision
    configs); and copies cached on modules at init (`self.attention_dropout` on Llama's attention,
    `self.dropout`, `self.layerdrop` on OPT's layers and decoder). Returns `model`."""
    seen: set = set()
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
        _zero_dropout_fields(m, seen)
        config = getattr(m, "config", None)  # RewardModel.config is a property (the LM's config)
        if _is_config(config):
            _zero_dropout_fields(config, seen)
    return model


def fingerprint(model: nn.Module, extra: str = "") -> str:
    """A short key for a model's weights (used to key cached reference log-probs)."""
    h = hashlib.sha256(extra.encode())
    h.update(json.dumps(model.config.to_dict(), sort_keys=True, default=str).encode())
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]
