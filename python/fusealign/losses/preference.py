"""Preference losses on the fused core: the DPO family, fused DPO from hidden states, Bradley-Terry.

Each loss is the fused log-prob core plus an elementwise epilogue on (B,) sequence log-probs, so no
(N, V) tensor exists and gradients reach `hidden`/`weight` only through linear_logps's backward.
Metrics are returned as detached 0-d tensors (no `.item()`, no host sync); log them when you like.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from fusealign.kernels import DEFAULT_CHUNK_BYTES, linear_logps, segment_sum
from fusealign.kernels.checks import check_positive, device_assert


# --- per-pair losses: Δ is the (policy − reference) chosen-vs-rejected log-ratio margin --------------
def _sigmoid(delta, beta, eps, gamma):
    """DPO, Eq. 7 of Rafailov et al. 2023, with conservative label smoothing ε (cDPO, as TRL):
    −(1−ε) log σ(βΔ) − ε log σ(−βΔ)."""
    return -(1 - eps) * F.logsigmoid(beta * delta) - eps * F.logsigmoid(-beta * delta)


def _robust(delta, beta, eps, gamma):
    """Robust DPO (Chowdhury et al. 2024, Eq. 9): [−(1−ε) log σ(βΔ) + ε log σ(−βΔ)] / (1 − 2ε),
    unbiased under preference-label flips with probability ε."""
    return (-(1 - eps) * F.logsigmoid(beta * delta) + eps * F.logsigmoid(-beta * delta)) / (1 - 2 * eps)


def _hinge(delta, beta, eps, gamma):
    """SLiC hinge (Zhao et al. 2023): max(0, 1 − βΔ)."""
    return torch.relu(1 - beta * delta)


def _ipo(delta, beta, eps, gamma):
    """IPO (Azar et al. 2023, Eq. 17): (Δ − 1/(2β))², β playing the role of τ."""
    return (delta - 1 / (2 * beta)) ** 2


def _simpo(delta, beta, eps, gamma):
    """SimPO (Meng et al. 2024, Eq. 6): −log σ(βΔ − γ), Δ = difference of the caller's length-normalised
    policy log-probs (no reference); label smoothing as in `sigmoid`."""
    return -(1 - eps) * F.logsigmoid(beta * delta - gamma) - eps * F.logsigmoid(gamma - beta * delta)


PAIR_LOSSES = {"sigmoid": _sigmoid, "robust": _robust, "hinge": _hinge, "ipo": _ipo, "simpo": _simpo}
REFERENCE_FREE = {"simpo"}


def _check_dpo_options(beta, loss_type, label_smoothing, gamma):
    if loss_type not in PAIR_LOSSES:
        raise ValueError(f"loss_type must be one of {sorted(PAIR_LOSSES)}, got {loss_type!r}")
    check_positive("beta", beta)
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must lie in [0, 0.5), got {label_smoothing}")
    if gamma != 0.0 and loss_type != "simpo":
        raise ValueError(f"gamma (the SimPO target margin) is only used by loss_type='simpo', got loss_type={loss_type!r}")


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: Optional[torch.Tensor],
    ref_rejected_logps: Optional[torch.Tensor],
    *,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    gamma: float = 0.0,
):
    """DPO-family loss per pair, drop-in for TRL's (≤ 0.19) `DPOTrainer.dpo_loss`.

    All log-probs: (B,) sequence log-probs (sums, or means for IPO/SimPO as the caller chooses).
    Returns (losses (B,), chosen_rewards (B,), rejected_rewards (B,)); rewards are β·(policy − ref)
    log-ratios (β·policy for the reference-free `simpo`), detached.
    Δ = (π_c − π_r) − (ref_c − ref_r); loss types in PAIR_LOSSES.
    """
    _check_dpo_options(beta, loss_type, label_smoothing, gamma)
    shape = policy_chosen_logps.shape
    if policy_rejected_logps.shape != shape:
        raise ValueError(f"policy_rejected_logps shape {tuple(policy_rejected_logps.shape)} differs from "
                         f"policy_chosen_logps shape {tuple(shape)}: chosen and rejected must pair up (same B)")
    if loss_type in REFERENCE_FREE:
        delta = policy_chosen_logps - policy_rejected_logps
        chosen_rewards = beta * policy_chosen_logps.detach()
        rejected_rewards = beta * policy_rejected_logps.detach()
    else:
        if ref_chosen_logps is None or ref_rejected_logps is None:
            raise ValueError(f"loss_type={loss_type!r} needs ref_chosen_logps and ref_rejected_logps")
        for name, t in (("ref_chosen_logps", ref_chosen_logps), ("ref_rejected_logps", ref_rejected_logps)):
            if t.shape != shape:
                raise ValueError(f"{name} shape {tuple(t.shape)} differs from policy_chosen_logps {tuple(shape)}")
        ref_chosen_logps, ref_rejected_logps = ref_chosen_logps.detach(), ref_rejected_logps.detach()
        delta = (policy_chosen_logps - policy_rejected_logps) - (ref_chosen_logps - ref_rejected_logps)
        chosen_rewards = beta * (policy_chosen_logps.detach() - ref_chosen_logps)
        rejected_rewards = beta * (policy_rejected_logps.detach() - ref_rejected_logps)
    losses = PAIR_LOSSES[loss_type](delta, beta, label_smoothing, gamma)
    return losses, chosen_rewards, rejected_rewards


def _sequence_sums(token_values, targets, sequence_ids, num_sequences, ignore_index):
    """(per-sequence sums of token_values, completion-token counts), both (2B,) — padded or packed."""
    valid = targets != ignore_index
    if sequence_ids is None:  # padded: (2B, T)
        return token_values.sum(-1), valid.sum(-1)
    ids = sequence_ids.long()
    sums = segment_sum(token_values, ids, num_sequences)  # fixed order: no float atomics on CUDA
    counts = torch.zeros(num_sequences, dtype=torch.long, device=ids.device).index_add_(0, ids, valid.long())
    return sums, counts


def _check_every_sequence_has_completion(counts: torch.Tensor, ignore_index: int):
    if counts.is_cuda:  # device-side assert: no host sync
        device_assert((counts > 0).all(), "a sequence has no completion token (all targets ignore_index)")
        return
    empty = (counts == 0).nonzero().flatten()
    if empty.numel():
        raise ValueError(f"sequence {int(empty[0])} has no completion token (all its targets are "
                         f"ignore_index={ignore_index}); its log-prob would be an empty sum — drop the pair or fix "
                         f"its labels")


def linear_dpo_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    ref_chosen_logps: Optional[torch.Tensor] = None,
    ref_rejected_logps: Optional[torch.Tensor] = None,
    ref_hidden: Optional[torch.Tensor] = None,
    ref_weight: Optional[torch.Tensor] = None,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    average_logps: bool = False,
    nll_coef: float = 0.0,
    ignore_index: int = -100,
    backend: str = "auto",
    sequence_ids: Optional[torch.Tensor] = None,
    num_sequences: Optional[int] = None,
    gamma: float = 0.0,
    temperature: float = 1.0,
    softcap: Optional[float] = None,
    bias: Optional[torch.Tensor] = None,
    ref_bias: Optional[torch.Tensor] = None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
):
    """Fused DPO from hidden states: `[chosen; rejected]` in one call, no (N, V) logits.

    Padded: hidden (2B, T, H), targets (2B, T), rows 0…B−1 chosen, B…2B−1 rejected, prompt and padding
    targets = ignore_index. Packed (padding-free): hidden (N, H), targets (N,), sequence_ids (N,) in
    [0, 2B) with chosen sequences first; pass `num_sequences=2B` to avoid a host sync reading it.
    Reference log-probs: precomputed `ref_chosen_logps`/`ref_rejected_logps` (B,), or `ref_hidden`
    (same layout, any H_ref) with `ref_weight` (V, H_ref), scored under no_grad with the fused path.
    `average_logps` divides each sequence sum by its completion-token count (IPO, SimPO);
    `nll_coef` adds the token-mean NLL of the chosen completions (RPO).
    Returns (loss: 0-d, metrics: dict of detached 0-d tensors with TRL's names).
    """
    _check_dpo_options(beta, loss_type, label_smoothing, gamma)
    if nll_coef < 0:
        raise ValueError(f"nll_coef must be >= 0, got {nll_coef}")
    if sequence_ids is None:
        if hidden.dim() != 3 or targets.dim() != 2:
            raise ValueError(f"padded layout needs hidden (2B, T, H) and targets (2B, T), got "
                             f"{tuple(hidden.shape)} and {tuple(targets.shape)}; for packed input pass sequence_ids")
        n_seq = hidden.shape[0]
        if n_seq % 2:
            raise ValueError(f"hidden's first dimension must be even ([chosen; rejected]), got {n_seq}")
    else:
        if hidden.dim() != 2 or targets.dim() != 1 or tuple(sequence_ids.shape) != tuple(targets.shape):
            raise ValueError(f"packed layout needs hidden (N, H), targets (N,), sequence_ids (N,), got "
                             f"{tuple(hidden.shape)}, {tuple(targets.shape)}, {tuple(sequence_ids.shape)}")
        if sequence_ids.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"sequence_ids must be int64 or int32, got {sequence_ids.dtype}")
        if num_sequences is None:
            num_sequences = (2 * ref_chosen_logps.shape[0] if ref_chosen_logps is not None
                             else int(sequence_ids.max()) + 1)  # host sync: pass num_sequences to avoid it
        n_seq = num_sequences
        if n_seq % 2:
            raise ValueError(f"num_sequences must be even ([chosen; rejected]), got {n_seq}")
        bad = (sequence_ids < 0) | (sequence_ids >= n_seq)
        if sequence_ids.is_cuda:
            device_assert(~bad.any(), "sequence_ids out of [0, num_sequences)")
        elif bool(bad.any()):
            raise ValueError(f"sequence_ids must lie in [0, {n_seq}) (2B sequences), found {int(sequence_ids[bad][0])}")
    B = n_seq // 2

    precomputed = ref_chosen_logps is not None or ref_rejected_logps is not None
    on_the_fly = ref_hidden is not None or ref_weight is not None
    needs_ref = loss_type not in REFERENCE_FREE
    if precomputed and on_the_fly:
        raise ValueError("reference given twice: pass either ref_chosen_logps/ref_rejected_logps or "
                         "ref_hidden/ref_weight, not both")
    if needs_ref and not (precomputed or on_the_fly):
        raise ValueError(f"loss_type={loss_type!r} needs a reference: pass ref_chosen_logps and ref_rejected_logps "
                         f"(B,), or ref_hidden and ref_weight")
    if not needs_ref and (precomputed or on_the_fly):
        raise ValueError(f"loss_type={loss_type!r} is reference-free; do not pass reference log-probs or states")
    if precomputed and (ref_chosen_logps is None or ref_rejected_logps is None):
        raise ValueError("pass both ref_chosen_logps and ref_rejected_logps")
    if on_the_fly and (ref_hidden is None or ref_weight is None):
        raise ValueError("pass both ref_hidden and ref_weight")
    if precomputed:
        for name, t in (("ref_chosen_logps", ref_chosen_logps), ("ref_rejected_logps", ref_rejected_logps)):
            if tuple(t.shape) != (B,):
                raise ValueError(f"{name} must have shape (B,) = ({B},), got {tuple(t.shape)}")

    head = dict(temperature=temperature, softcap=softcap, ignore_index=ignore_index, backend=backend,
                chunk_bytes=chunk_bytes)
    token_logps = linear_logps(hidden, weight, targets, bias=bias, **head)  # (2B, T) or (N,)
    seq_logps, counts = _sequence_sums(token_logps, targets, sequence_ids, n_seq, ignore_index)
    _check_every_sequence_has_completion(counts, ignore_index)
    if average_logps:
        seq_logps = seq_logps / counts
    if on_the_fly:
        if tuple(ref_hidden.shape[:-1]) != tuple(hidden.shape[:-1]):
            raise ValueError(f"ref_hidden leading shape {tuple(ref_hidden.shape[:-1])} must equal hidden's "
                             f"{tuple(hidden.shape[:-1])}")
        with torch.no_grad():  # the fused no-grad path: nothing saved
            ref_tokens = linear_logps(ref_hidden, ref_weight, targets, bias=ref_bias, **head)
            ref_seq, _ = _sequence_sums(ref_tokens, targets, sequence_ids, n_seq, ignore_index)
            if average_logps:
                ref_seq = ref_seq / counts
        ref_chosen_logps, ref_rejected_logps = ref_seq[:B], ref_seq[B:]

    chosen_logps, rejected_logps = seq_logps[:B], seq_logps[B:]
    losses, chosen_rewards, rejected_rewards = dpo_loss(
        chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps,
        beta=beta, loss_type=loss_type, label_smoothing=label_smoothing, gamma=gamma)
    # RPO's NLL term: token mean over the chosen completions (Pang et al. 2024).
    if sequence_ids is None:
        chosen_sum, chosen_count = token_logps[:B].sum(), counts[:B].sum()
    else:
        in_chosen = sequence_ids < B
        chosen_sum, chosen_count = torch.where(in_chosen, token_logps, 0.0).sum(), counts[:B].sum()
    nll = -chosen_sum / chosen_count.clamp_min(1)
    loss = losses.mean()
    if nll_coef:
        loss = loss + nll_coef * nll
    metrics = {
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
        "logps/chosen": chosen_logps.detach().mean(),
        "logps/rejected": rejected_logps.detach().mean(),
        "nll": nll.detach(),
    }
    return loss, metrics


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
