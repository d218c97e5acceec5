"""Thin `nn.Module` wrappers over the functional ops: they hold options, never weights.

Each module's constructor takes exactly the keyword options of its function (same names, same
defaults; a loss's options bundle, `options=` or its fields as keywords) and `forward` takes the tensors;
tests/test_modules.py compares the signatures, so a new option of a function cannot be forgotten here. The head weight is an argument of `forward`, not a
parameter: the model owns it (often tied to the input embedding), the loss only reads it.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from fusealign.kernels import DEFAULT_CHUNK_BYTES, linear_kl, linear_logps
from fusealign.losses import (DPOOptions, GRPOOptions, PPOOptions, bradley_terry_loss, linear_dpo_loss,
                              linear_grpo_loss, linear_ppo_loss, resolve_options)


class _Options(nn.Module):
    """Keeps the constructor's keyword options in `self.options` and prints them."""

    def __init__(self, **options):
        super().__init__()
        self.options = options

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())


class LinearLogps(_Options):
    """`fa.linear_logps` as a module: `LinearLogps(temperature=0.7)(hidden, weight, targets, bias=None)`."""

    def __init__(self, *, temperature: float = 1.0, softcap: Optional[float] = None, ignore_index: int = -100,
                 return_entropy: bool = False, outputs: Optional[tuple] = None, backend: str = "auto",
                 chunk_bytes: int = DEFAULT_CHUNK_BYTES):
        super().__init__(temperature=temperature, softcap=softcap, ignore_index=ignore_index,
                         return_entropy=return_entropy, outputs=outputs, backend=backend, chunk_bytes=chunk_bytes)

    def forward(self, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                bias: Optional[torch.Tensor] = None, **vocab_parallel):
        """`vocab_parallel`: vocab_start=, vocab_size=, group= for an explicit vocabulary shard."""
        return linear_logps(hidden, weight, targets, bias=bias, **vocab_parallel, **self.options)


class LinearKL(_Options):
    """`fa.linear_kl` as a module: `LinearKL(direction="forward")(hidden, weight, ref_hidden, ref_weight, mask)`."""

    def __init__(self, *, temperature: float = 1.0, direction: str = "forward", softcap: Optional[float] = None,
                 backend: str = "auto", chunk_bytes: int = DEFAULT_CHUNK_BYTES):
        super().__init__(temperature=temperature, direction=direction, softcap=softcap, backend=backend,
                         chunk_bytes=chunk_bytes)

    def forward(self, hidden, weight, ref_hidden, ref_weight, mask=None, bias=None, ref_bias=None, **vocab_parallel):
        return linear_kl(hidden, weight, ref_hidden, ref_weight, mask=mask, bias=bias, ref_bias=ref_bias,
                         **vocab_parallel, **self.options)


class LinearDPOLoss(_Options):
    """`fa.linear_dpo_loss` as a module; `forward(hidden, weight, targets, **tensors)` returns (loss, metrics).

    The loss options are one `fa.DPOOptions` (`options=`) or its fields as keywords (`beta=0.1`, …), resolved
    into the bundle here, once. Per-call tensors go to `forward`: ref_chosen_logps / ref_rejected_logps or
    ref_hidden / ref_weight, sequence_ids / num_sequences (packed input), bias / ref_bias, vocab_start /
    vocab_size / group (a vocabulary shard).
    """

    def __init__(self, *, options: Optional[DPOOptions] = None, token_metrics: bool = True, ignore_index: int = -100,
                 backend: str = "auto", temperature: float = 1.0, softcap: Optional[float] = None,
                 chunk_bytes: int = DEFAULT_CHUNK_BYTES, **loss_options):
        super().__init__(options=resolve_options(DPOOptions, options, loss_options, caller="LinearDPOLoss"),
                         token_metrics=token_metrics, ignore_index=ignore_index, backend=backend,
                         temperature=temperature, softcap=softcap, chunk_bytes=chunk_bytes)

    def forward(self, hidden, weight, targets, **tensors):
        return linear_dpo_loss(hidden, weight, targets, **tensors, **self.options)


class LinearPPOLoss(_Options):
    """`fa.linear_ppo_loss` as a module; `forward(hidden, weight, targets, old_logps, advantages, ref_logps=None,
    bias=None, sampling_logps=None, **vocab_parallel)` returns (loss, metrics) (vocab_parallel: vocab_start=, vocab_size=, group=).
    The loss options are one `fa.PPOOptions` (`options=`) or its fields as keywords."""

    def __init__(self, *, options: Optional[PPOOptions] = None, temperature: float = 1.0, ignore_index: int = -100,
                 backend: str = "auto", softcap: Optional[float] = None, chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                 **loss_options):
        super().__init__(options=resolve_options(PPOOptions, options, loss_options, caller="LinearPPOLoss"),
                         temperature=temperature, ignore_index=ignore_index, backend=backend, softcap=softcap,
                         chunk_bytes=chunk_bytes)

    def forward(self, hidden, weight, targets, old_logps, advantages, ref_logps=None, bias=None, sampling_logps=None,
                **vocab_parallel):
        return linear_ppo_loss(hidden, weight, targets, old_logps, advantages, ref_logps=ref_logps, bias=bias,
                               sampling_logps=sampling_logps, **vocab_parallel, **self.options)


class LinearGRPOLoss(_Options):
    """`fa.linear_grpo_loss` as a module: `LinearGRPOLoss(loss_type="grpo", beta=0.04)(hidden, weight, targets,
    old_logps, advantages, ref_logps=…, sampling_logps=…, num_items_in_batch=…, bias=None, **vocab_parallel)`
    returns (loss, metrics). The loss options (a `GRPOOptions`, and/or its fields as keywords) are validated once,
    here."""

    def __init__(self, *, options: Optional[GRPOOptions] = None, temperature: float = 1.0, ignore_index: int = -100,
                 backend: str = "auto", softcap: Optional[float] = None, chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                 **overrides):
        super().__init__(options=resolve_options(GRPOOptions, options, overrides, caller="LinearGRPOLoss"),
                         temperature=temperature, ignore_index=ignore_index, backend=backend, softcap=softcap,
                         chunk_bytes=chunk_bytes)

    def forward(self, hidden, weight, targets, old_logps, advantages, ref_logps=None, sampling_logps=None,
                num_items_in_batch=None, bias=None, **vocab_parallel):
        return linear_grpo_loss(hidden, weight, targets, old_logps, advantages, ref_logps=ref_logps,
                                sampling_logps=sampling_logps, num_items_in_batch=num_items_in_batch, bias=bias,
                                **vocab_parallel, **self.options)


class BradleyTerryLoss(_Options):
    """`fa.bradley_terry_loss` as a module: `BradleyTerryLoss(center_coef=0.01)(chosen_rewards, rejected_rewards)`."""

    def __init__(self, *, center_coef: float = 0.0):
        super().__init__(center_coef=center_coef)

    def forward(self, chosen_rewards, rejected_rewards, margin=None):
        return bradley_terry_loss(chosen_rewards, rejected_rewards, margin=margin, **self.options)


# module -> (function, the function's keyword arguments that are per-call tensors, passed to forward)
FUNCTIONS = {
    LinearLogps: (linear_logps, {"bias", "vocab_start", "vocab_size", "group"}),
    LinearKL: (linear_kl, {"mask", "bias", "ref_bias", "vocab_start", "vocab_size", "group"}),
    LinearDPOLoss: (linear_dpo_loss, {"ref_chosen_logps", "ref_rejected_logps", "ref_hidden", "ref_weight",
                                      "sequence_ids", "num_sequences", "bias", "ref_bias", "vocab_start",
                                      "vocab_size", "group"}),
    LinearPPOLoss: (linear_ppo_loss, {"ref_logps", "sampling_logps", "bias", "vocab_start", "vocab_size", "group"}),
    LinearGRPOLoss: (linear_grpo_loss, {"ref_logps", "sampling_logps", "num_items_in_batch", "bias", "vocab_start",
                                        "vocab_size", "group"}),
    BradleyTerryLoss: (bradley_terry_loss, {"margin"}),
}
