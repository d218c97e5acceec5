"""Reward-model pieces: the Bradley-Terry loss on scalar rewards and the reward read at each sequence's last token.

Metrics-free plain functions on tensors; the engine's reward model (a backbone + value head) calls both.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from fusealign.kernels.checks import device_assert


def bradley_terry_loss(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    *,
    margin: Optional[torch.Tensor] = None,
    center_coef: float = 0.0,
) -> torch.Tensor:
    """Reward-model loss: mean(−log σ(r_c − r_r − margin)) + center_coef · mean((r_c + r_r)²).

    Bradley & Terry 1952 as used by Ouyang et al. 2022 (Eq. 1); `margin` (B,) or scalar as in
    Llama 2 (Touvron et al. 2023, Eq. 2); the centring term keeps rewards near zero (Eisenstein et
    al. 2023). chosen_rewards, rejected_rewards: (B,).
    """
    if chosen_rewards.shape != rejected_rewards.shape:
        raise ValueError(f"chosen_rewards shape {tuple(chosen_rewards.shape)} differs from rejected_rewards "
                         f"{tuple(rejected_rewards.shape)}: they must pair up (same B)")
    if center_coef < 0:
        raise ValueError(f"center_coef must be >= 0, got {center_coef}")
    diff = chosen_rewards - rejected_rewards
    if margin is not None:
        diff = diff - margin
    loss = -F.logsigmoid(diff).mean()
    if center_coef:
        loss = loss + center_coef * ((chosen_rewards + rejected_rewards) ** 2).mean()
    return loss


def sequence_rewards(
    hidden: torch.Tensor,
    value_weight: torch.Tensor,
    attention_mask_or_lengths: torch.Tensor,
    value_bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Scalar reward per sequence from the hidden state of its last non-padding token.

    hidden: (B, T, H); value_weight: (H,) or (1, H); attention_mask_or_lengths: (B, T) 0/1 mask
    (left or right padding: the last position holding 1 is read) or (B,) lengths (right padding);
    value_bias: () or (1,). Returns (B,) in hidden's dtype promoted with the weight's.
    """
    if hidden.dim() != 3:
        raise ValueError(f"hidden must be (B, T, H), got {tuple(hidden.shape)}")
    B, T, H = hidden.shape
    w = value_weight.reshape(-1)
    if w.shape[0] != H:
        raise ValueError(f"value_weight must have H={H} elements ((H,) or (1, H)), got {tuple(value_weight.shape)}")
    m = attention_mask_or_lengths
    if m.dim() == 2:
        if tuple(m.shape) != (B, T):
            raise ValueError(f"attention mask must be (B, T) = ({B}, {T}), got {tuple(m.shape)}")
        present = m != 0
        # Position of the last 1: argmax of position·mask (ties impossible: positions are distinct).
        last = (torch.arange(T, device=m.device) * present).argmax(-1)
        has_token = present.any(-1)
    elif m.dim() == 1:
        if m.shape[0] != B:
            raise ValueError(f"lengths must be (B,) = ({B},), got {tuple(m.shape)}")
        if m.dtype.is_floating_point:
            raise TypeError(f"lengths must be integers, got {m.dtype}")
        last = (m.long() - 1).clamp(0, T - 1)
        has_token = (m > 0) & (m <= T)
    else:
        raise ValueError("attention_mask_or_lengths must be a (B, T) mask or (B,) lengths")
    if has_token.is_cuda:
        device_assert(has_token.all(), "a sequence has no tokens (empty mask or length 0 / > T)")
    elif not bool(has_token.all()):
        bad = int((~has_token).nonzero()[0])
        raise ValueError(f"sequence {bad} has no tokens (all-zero mask, or length 0 or > T={T})")
    dtype = torch.promote_types(hidden.dtype, value_weight.dtype)
    h_last = hidden[torch.arange(B, device=hidden.device), last].to(dtype)  # (B, H)
    r = h_last @ w.to(dtype)
    if value_bias is not None:
        r = r + value_bias.reshape(()).to(dtype)
    return r
