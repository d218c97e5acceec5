"""Per-batch objectives on fused heads: the backbone runs, only completion positions reach the head.

Each objective returns (loss, metrics, tokens, units): `units` is what the loss averages over (completion tokens
for SFT, pairs for RM and DPO), so that data-parallel ranks can weight their losses into the global mean
(distributed.py). Batches of preference pairs are `[chosen; rejected]`:
sequences 0…B−1 are the chosen completions, B…2B−1 the rejected ones, all in one backbone forward.
The head is assembled in one place (models.completion_inputs / score_tokens); the losses are `fusealign.losses`'
(`dpo_objective` calls `fa.linear_dpo_loss` with the run's `fa.DPOOptions`, unchanged).
"""

from __future__ import annotations

from typing import Optional

import torch

from fusealign.kernels import segment_sum
from fusealign.losses import DPOOptions, bradley_terry_loss, linear_dpo_loss
from fusealign.losses.preference import dpo_head_outputs

from .data import Batch, collate
from .distributed import InForward, run
from .models import RewardModel, completion_inputs, score_tokens


def sequence_logps(model, batch: Batch, *, average: bool = False, temperature=1.0, backend="auto"):
    """Per-sequence completion log-probs (S,) (sum, or mean over the completion's tokens)."""
    s = score_tokens(model, batch, temperature=temperature, backend=backend)
    sums = segment_sum(s.logps, s.seq_ids, batch.num_sequences)
    if average:
        counts = torch.bincount(s.seq_ids, minlength=batch.num_sequences).clamp_min(1)
        sums = sums / counts
    return sums


def dpo_sequence_logps(model, batch: Batch, *, options: DPOOptions, temperature=1.0, backend="auto"):
    """Per-sequence completion log-probs (S,) computed as `dpo_objective`'s loss computes the policy's — the same
    head path, the same fused outputs (`dpo_head_outputs`), sums or per-token means (`options.per_token_means`): on
    the same batch, a reference equal to the policy gets bitwise the policy's values (step 0's margins exactly 0)."""
    x = completion_inputs(model, batch, temperature=temperature)
    lp = x.head.logps(x.hidden, x.targets, outputs=dpo_head_outputs(options), backend=backend)[0]
    sums = segment_sum(lp, x.seq_ids, batch.num_sequences)
    if options.per_token_means:
        counts = torch.zeros(batch.num_sequences, dtype=torch.long, device=lp.device).index_add_(
            0, x.seq_ids.long(), torch.ones_like(x.seq_ids, dtype=torch.long))
        sums = sums / counts
    return sums


def sft_objective(model, examples, *, pad_id, pack, temperature=1.0, backend="auto"):
    """Token-mean NLL of the completions."""
    batch = collate([(e.prompt, e.completions[0]) for e in examples], pad_id=pad_id, pack=pack)
    batch = batch.to(next(model.parameters()).device)
    logps = score_tokens(model, batch, temperature=temperature, backend=backend).logps
    nll = -logps.mean()
    return nll, {"nll": nll.detach()}, batch.num_tokens, logps.numel()


def pair_batch(examples, *, pad_id, pack) -> Batch:
    """[chosen; rejected] for a list of pair examples."""
    seqs = [(e.prompt, e.completions[0]) for e in examples] + [(e.prompt, e.completions[1]) for e in examples]
    return collate(seqs, pad_id=pad_id, pack=pack)


def rm_objective(rm: RewardModel, examples, *, pad_id, pack, margin=0.0, center_coef=0.0):
    """Bradley-Terry on the reward model's scores of [chosen; rejected]."""
    batch = pair_batch(examples, pad_id=pad_id, pack=pack).to(next(rm.parameters()).device)
    r = rm.rewards(batch)
    B = len(examples)
    rc, rr = r[:B], r[B:]
    loss = bradley_terry_loss(rc, rr, margin=margin if margin else None, center_coef=center_coef)
    metrics = {"rewards/chosen": rc.detach().mean(), "rewards/rejected": rr.detach().mean(),
               "rewards/margins": (rc - rr).detach().mean(), "rewards/accuracies": (rc > rr).float().mean()}
    return loss, metrics, batch.num_tokens, B


def dpo_objective(policy, examples, *, pad_id, pack, options: DPOOptions, ref_logps: Optional[torch.Tensor] = None,
                  ref_model=None, temperature=1.0, backend="auto"):
    """`fa.linear_dpo_loss` (with `options`, the run's `fa.DPOOptions`) on [chosen; rejected] of the policy's
    completion hidden states. ref_logps: (B, 2) precomputed (chosen, rejected) sums/means, or ref_model scored on
    the fly (its hidden states go to the fused loss; an FSDP-sharded reference is scored inside its own forward)."""
    device = next(policy.parameters()).device
    batch = pair_batch(examples, pad_id=pad_id, pack=pack).to(device)
    B = len(examples)
    x = completion_inputs(policy, batch, temperature=temperature)
    refs = {}
    if ref_logps is not None:
        refs = dict(ref_chosen_logps=ref_logps[:, 0].to(device), ref_rejected_logps=ref_logps[:, 1].to(device))
    elif isinstance(ref_model, InForward):
        with torch.no_grad():
            seq = run(ref_model, sequence_logps, batch, average=options.per_token_means, temperature=temperature,
                      backend=backend)
        refs = dict(ref_chosen_logps=seq[:B], ref_rejected_logps=seq[B:])
    elif ref_model is not None:
        with torch.no_grad():
            r = completion_inputs(ref_model, batch, temperature=temperature)
        refs = dict(ref_hidden=r.hidden, ref_weight=r.head.weight, ref_bias=r.head.bias)
    loss, metrics = linear_dpo_loss(x.hidden, x.head.weight, x.targets, sequence_ids=x.seq_ids, num_sequences=2 * B,
                                    bias=x.head.bias, softcap=x.head.softcap, temperature=x.head.temperature,
                                    options=options, backend=backend, **refs)
    return loss, metrics, batch.num_tokens, B
