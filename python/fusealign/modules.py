"""Thin `nn.Module` wrappers over the functional ops: they hold options, never weights."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from fusealign.kernels.linear_kl import linear_kl
from fusealign.kernels.linear_logps import DEFAULT_CHUNK_BYTES, linear_logps
from fusealign.kernels.policy import linear_ppo_loss
from fusealign.kernels.preference import bradley_terry_loss, linear_dpo_loss


class LinearLogps(nn.Module):
    """`fa.linear_logps` as a module: `LinearLogps(temperature=0.7)(hidden, weight, targets)`.

    The head weight is an argument of `forward`, not a parameter: the model owns it (often tied to
    the input embedding), the loss only reads it.
    """

    def __init__(self, *, temperature: float = 1.0, softcap: Optional[float] = None, ignore_index: int = -100,
                 return_entropy: bool = False, backend: str = "auto", chunk_bytes: int = DEFAULT_CHUNK_BYTES):
        super().__init__()
        self.temperature = temperature
        self.softcap = softcap
        self.ignore_index = ignore_index
        self.return_entropy = return_entropy
        self.backend = backend
        self.chunk_bytes = chunk_bytes

    def forward(self, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                bias: Optional[torch.Tensor] = None):
        return linear_logps(hidden, weight, targets, bias=bias, temperature=self.temperature, softcap=self.softcap,
                            ignore_index=self.ignore_index, return_entropy=self.return_entropy,
                            backend=self.backend, chunk_bytes=self.chunk_bytes)

    def extra_repr(self) -> str:
        return (f"temperature={self.temperature}, softcap={self.softcap}, ignore_index={self.ignore_index}, "
                f"return_entropy={self.return_entropy}, backend={self.backend!r}")


class LinearKL(nn.Module):
    """`fa.linear_kl` as a module: `LinearKL(direction="forward")(hidden, weight, ref_hidden, ref_weight, mask)`."""

    def __init__(self, *, temperature: float = 1.0, direction: str = "forward", softcap: Optional[float] = None,
                 backend: str = "auto"):
        super().__init__()
        self.kw = dict(temperature=temperature, direction=direction, softcap=softcap, backend=backend)

    def forward(self, hidden, weight, ref_hidden, ref_weight, mask=None):
        return linear_kl(hidden, weight, ref_hidden, ref_weight, mask=mask, **self.kw)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.kw.items())


class LinearDPOLoss(nn.Module):
    """`fa.linear_dpo_loss` as a module; `forward(hidden, weight, targets, **refs)` returns (loss, metrics)."""

    def __init__(self, *, beta: float = 0.1, loss_type: str = "sigmoid", label_smoothing: float = 0.0,
                 average_logps: bool = False, nll_coef: float = 0.0, gamma: float = 0.0, ignore_index: int = -100,
                 temperature: float = 1.0, backend: str = "auto"):
        super().__init__()
        self.kw = dict(beta=beta, loss_type=loss_type, label_smoothing=label_smoothing, average_logps=average_logps,
                       nll_coef=nll_coef, gamma=gamma, ignore_index=ignore_index, temperature=temperature,
                       backend=backend)

    def forward(self, hidden, weight, targets, **refs):
        return linear_dpo_loss(hidden, weight, targets, **refs, **self.kw)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.kw.items())


class LinearPPOLoss(nn.Module):
    """`fa.linear_ppo_loss` as a module; `forward(hidden, weight, targets, old_logps, advantages, ref_logps=None)`."""

    def __init__(self, *, clip_eps: float = 0.2, clip_eps_high: Optional[float] = None,
                 dual_clip: Optional[float] = None, kl_coef: float = 0.0, kl_estimator: str = "k3",
                 entropy_coef: float = 0.0, loss_agg: str = "token-mean", temperature: float = 1.0,
                 ignore_index: int = -100, backend: str = "auto"):
        super().__init__()
        self.kw = dict(clip_eps=clip_eps, clip_eps_high=clip_eps_high, dual_clip=dual_clip, kl_coef=kl_coef,
                       kl_estimator=kl_estimator, entropy_coef=entropy_coef, loss_agg=loss_agg,
                       temperature=temperature, ignore_index=ignore_index, backend=backend)

    def forward(self, hidden, weight, targets, old_logps, advantages, ref_logps=None):
        return linear_ppo_loss(hidden, weight, targets, old_logps, advantages, ref_logps=ref_logps, **self.kw)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.kw.items())


class BradleyTerryLoss(nn.Module):
    """`fa.bradley_terry_loss` as a module: `BradleyTerryLoss(center_coef=0.01)(chosen_rewards, rejected_rewards)`."""

    def __init__(self, *, center_coef: float = 0.0):
        super().__init__()
        self.center_coef = center_coef

    def forward(self, chosen_rewards, rejected_rewards, margin=None):
        return bradley_terry_loss(chosen_rewards, rejected_rewards, margin=margin, center_coef=self.center_coef)

    def extra_repr(self) -> str:
        return f"center_coef={self.center_coef}"
