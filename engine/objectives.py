"""Per-batch objectives on fused heads: the backbone runs, only completion positions reach the head.

Each returns (loss, metrics, tokens). Batches of preference pairs are `[chosen; rejected]`: sequences
0…B−1 are the chosen completions, B…2B−1 the rejected ones, all in one backbone forward.
"""

from __future__ import annotations

from typing import Optional

import torch

from fusealign.kernels.linear_logps import linear_logps
from fusealign.kernels.preference import bradley_terry_loss, linear_dpo_loss, sequence_rewards
from fusealign.kernels.segments import segment_sum

from .data import Batch, collate
from .models import RewardModel, head_of, hidden_states, select_completion


def _head_inputs(h, head):
    """Cast hidden states and head to one dtype (autocast yields bf16 states next to an fp32 weight)."""
    device = h.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else head.weight.dtype
    return h.to(dtype), head.weight.to(dtype), None if head.bias is None else head.bias.to(dtype)


def completion_logps(model, batch: Batch, *, temperature=1.0, backend="auto"):
    """Per-token completion log-probs: (N_c,) fp32, with their sequence ids (N_c,)."""
    head = head_of(model, temperature)
    h = hidden_states(model, batch.input_ids, batch.attention_mask, batch.position_ids)  # (R, L, H)
    h_c, y_c, s_c = select_completion(h, batch.targets, batch.seq_ids)
    h_c, W, b = _head_inputs(h_c, head)
    return linear_logps(h_c, W, y_c, bias=b, softcap=head.softcap, temperature=head.temperature,
                        backend=backend), s_c


def sequence_logps(model, batch: Batch, *, average: bool = False, temperature=1.0, backend="auto"):
    """Per-sequence completion log-probs (S,) (sum, or mean over the completion's tokens)."""
    logps, s = completion_logps(model, batch, temperature=temperature, backend=backend)
    sums = segment_sum(logps, s, batch.num_sequences)
    if average:
        counts = torch.bincount(s, minlength=batch.num_sequences).clamp_min(1)
        sums = sums / counts
    return sums


def sft_loss(model, examples, *, pad_id, pack, temperature=1.0, backend="auto"):
    batch = collate([(e.prompt, e.completions[0]) for e in examples], pad_id=pad_id, pack=pack)
    batch = batch.to(next(model.parameters()).device)
    logps, _ = completion_logps(model, batch, temperature=temperature, backend=backend)
    nll = -logps.mean()
    return nll, {"nll": nll.detach()}, batch.num_tokens


def pair_batch(examples, *, pad_id, pack) -> Batch:
    """[chosen; rejected] for a list of pair examples."""
    seqs = [(e.prompt, e.completions[0]) for e in examples] + [(e.prompt, e.completions[1]) for e in examples]
    return collate(seqs, pad_id=pad_id, pack=pack)


def rewards_of(rm: RewardModel, batch: Batch) -> torch.Tensor:
    """One scalar per sequence from its last token: padded batches through `fa.sequence_rewards`."""
    h = hidden_states(rm.lm, batch.input_ids, batch.attention_mask, batch.position_ids)  # (R, L, H)
    w, b = rm.value_head.weight, rm.value_head.bias
    if batch.attention_mask is not None:
        return sequence_rewards(h, w.to(h.dtype), batch.attention_mask, value_bias=b.to(h.dtype)).float()
    h_last = h[batch.last_index[:, 0], batch.last_index[:, 1]]  # (S, H): packed, one row
    return (h_last @ w.reshape(-1).to(h_last.dtype) + b.to(h_last.dtype)).float()


def rm_loss(rm, examples, *, pad_id, pack, margin=0.0, center_coef=0.0):
    batch = pair_batch(examples, pad_id=pad_id, pack=pack).to(next(rm.parameters()).device)
    r = rewards_of(rm, batch)
    B = len(examples)
    rc, rr = r[:B], r[B:]
    loss = bradley_terry_loss(rc, rr, margin=margin if margin else None, center_coef=center_coef)
    metrics = {"rewards/chosen": rc.detach().mean(), "rewards/rejected": rr.detach().mean(),
               "rewards/margins": (rc - rr).detach().mean(), "rewards/accuracies": (rc > rr).float().mean()}
    return loss, metrics, batch.num_tokens


def dpo_loss(policy, examples, *, pad_id, pack, beta, loss_type, label_smoothing=0.0, gamma=0.0,
             average_logps=False, nll_coef=0.0, ref_logps: Optional[torch.Tensor] = None, ref_model=None,
             temperature=1.0, backend="auto"):
    """ref_logps: (B, 2) precomputed (chosen, rejected) sums/means, or ref_model scored on the fly."""
    device = next(policy.parameters()).device
    batch = pair_batch(examples, pad_id=pad_id, pack=pack).to(device)
    B = len(examples)
    head = head_of(policy, temperature)
    h = hidden_states(policy, batch.input_ids, batch.attention_mask, batch.position_ids)
    h_c, y_c, s_c = select_completion(h, batch.targets, batch.seq_ids)
    h_c, W, b = _head_inputs(h_c, head)
    refs = {}
    if loss_type != "simpo":
        if ref_logps is not None:
            refs = dict(ref_chosen_logps=ref_logps[:, 0].to(device), ref_rejected_logps=ref_logps[:, 1].to(device))
        else:
            with torch.no_grad():
                ref_head = head_of(ref_model, temperature)
                hr = hidden_states(ref_model, batch.input_ids, batch.attention_mask, batch.position_ids)
                hr_c, _, _ = select_completion(hr, batch.targets, batch.seq_ids)
                hr_c, Wr, br = _head_inputs(hr_c, ref_head)
            refs = dict(ref_hidden=hr_c, ref_weight=Wr, ref_bias=br)
    loss, metrics = linear_dpo_loss(h_c, W, y_c, sequence_ids=s_c, num_sequences=2 * B, beta=beta,
                                    loss_type=loss_type, label_smoothing=label_smoothing, gamma=gamma,
                                    average_logps=average_logps, nll_coef=nll_coef, temperature=head.temperature,
                                    softcap=head.softcap, bias=b, backend=backend, **refs)
    return loss, metrics, batch.num_tokens
