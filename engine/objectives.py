"""Per-batch objectives on fused heads: the backbone runs, only completion positions reach the head.

Each loss returns (loss, metrics, tokens, units): `units` is what the loss averages over (completion tokens
for SFT, pairs for RM and DPO), so that data-parallel ranks can weight their losses into the global mean
(distributed.py). Batches of preference pairs are `[chosen; rejected]`:
sequences 0…B−1 are the chosen completions, B…2B−1 the rejected ones, all in one backbone forward.
The head is assembled in one place (models.completion_inputs / score_tokens).
"""

from __future__ import annotations

from typing import Optional

import torch

from fusealign.kernels import segment_sum
from fusealign.losses import bradley_terry_loss, linear_dpo_loss, sequence_rewards

from .data import Batch, collate
from .distributed import InForward, run
from .models import RewardModel, completion_inputs, hidden_states, score_tokens


def sequence_logps(model, batch: Batch, *, average: bool = False, temperature=1.0, backend="auto"):
    """Per-sequence completion log-probs (S,) (sum, or mean over the completion's tokens)."""
    s = score_tokens(model, batch, temperature=temperature, backend=backend)
    sums = segment_sum(s.logps, s.seq_ids, batch.num_sequences)
    if average:
        counts = torch.bincount(s.seq_ids, minlength=batch.num_sequences).clamp_min(1)
        sums = sums / counts
    return sums


def sft_loss(model, examples, *, pad_id, pack, temperature=1.0, backend="auto"):
    batch = collate([(e.prompt, e.completions[0]) for e in examples], pad_id=pad_id, pack=pack)
    batch = batch.to(next(model.parameters()).device)
    logps = score_tokens(model, batch, temperature=temperature, backend=backend).logps
    nll = -logps.mean()
    return nll, {"nll": nll.detach()}, batch.num_tokens, logps.numel()


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
    return loss, metrics, batch.num_tokens, B


def dpo_loss(policy, examples, *, pad_id, pack, beta, loss_type, ref_logps: Optional[torch.Tensor] = None,
             ref_model=None, temperature=1.0, backend="auto", **loss_options):
    """ref_logps: (B, 2) precomputed (chosen, rejected) sums/means, or ref_model scored on the fly (its hidden
    states go to the fused loss; an FSDP-sharded reference is scored inside its own forward instead);
    loss_options: `fa.linear_dpo_loss`'s (loss_weights, label_smoothing, f_divergence_type, use_weighting, …)."""
    device = next(policy.parameters()).device
    batch = pair_batch(examples, pad_id=pad_id, pack=pack).to(device)
    B = len(examples)
    x = completion_inputs(policy, batch, temperature=temperature)
    refs = {}
    if ref_logps is not None:
        refs = dict(ref_chosen_logps=ref_logps[:, 0].to(device), ref_rejected_logps=ref_logps[:, 1].to(device))
    elif isinstance(ref_model, InForward):
        with torch.no_grad():
            seq = run(ref_model, sequence_logps, batch, average=loss_options.get("average_logps", False),
                      temperature=temperature, backend=backend)
        refs = dict(ref_chosen_logps=seq[:B], ref_rejected_logps=seq[B:])
    elif ref_model is not None:
        with torch.no_grad():
            r = completion_inputs(ref_model, batch, temperature=temperature)
        refs = dict(ref_hidden=r.hidden, ref_weight=r.head.weight, ref_bias=r.head.bias)
    loss, metrics = linear_dpo_loss(x.hidden, x.head.weight, x.targets, sequence_ids=x.seq_ids, num_sequences=2 * B,
                                    beta=beta, loss_type=loss_type, backend=backend, **loss_options,
                                    **x.head.kwargs(), **refs)
    return loss, metrics, batch.num_tokens, B
