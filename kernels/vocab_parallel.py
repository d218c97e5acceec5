"""Vocabulary-sharded (tensor-parallel) head: per-shard statistics that combine exactly.

With the head split by rows, W = [W_0; W_1; …], rank p owning vocabulary [start_p, start_p + V_p),
each rank runs the same fused forward on its slice and produces, per token, four fp32 numbers
    m = max z,  s = Σ e^{z−m},  a = Σ e^{z−m}(z − m),  zy = z_y if y is in the slice else 0
(and with `extra=True` three more: q = Σ e^{2(z−m)}, zs = Σ z, mb = max of z over the slice's columns
before y). Gathering those (4·N or 7·N floats per rank instead of N·V_p logits) and merging them in a
fixed order gives exactly the single-device log-probs, entropy and lse, and log Σ p², mean logit and
is_top1 (see combine_stats, which then needs the whole V). Forward only for now: the engine's
tensor-parallel path will add the backward (∂z needs only the merged lse).
"""

from __future__ import annotations

from typing import Optional

import torch

from . import linear_logps_torch as _torch_impl
from .checks import check_linear_head
from .linear_logps import DEFAULT_CHUNK_BYTES, resolve_backend

combine_stats = _torch_impl.combine_stats


def shard_stats(
    hidden: torch.Tensor,
    weight_shard: torch.Tensor,
    targets: torch.Tensor,
    *,
    vocab_start: int,
    bias_shard: Optional[torch.Tensor] = None,
    temperature: float = 1.0,
    softcap: Optional[float] = None,
    backend: str = "auto",
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    extra: bool = False,
) -> torch.Tensor:
    """hidden: (N, H), weight_shard: (V_p, H) rows [vocab_start, vocab_start + V_p) of the head,
    targets: (N,) global ids  ->  (P, 4, N) fp32 statistics (P ≥ 1 vocabulary splits), (P, 7, N) with
    `extra`. No autograd."""
    check_linear_head(hidden, weight_shard, targets, bias_shard, temperature, softcap,
                      names=("hidden", "weight_shard", "targets", "bias_shard"))
    V_p = weight_shard.shape[0]
    # Local ids, left unclamped: a target outside [0, V_p) has no logit here (zy = 0), and its sign says
    # whether every column of this shard lies before it (mb) or none does.
    local = (targets.reshape(-1) - vocab_start).contiguous()
    h2 = hidden.reshape(-1, hidden.shape[-1])
    bias_shard = None if bias_shard is None else bias_shard.contiguous()
    with torch.no_grad():
        if resolve_backend(backend, hidden.device) == "triton":
            from .linear_logps_triton import partial_stats

            return partial_stats(h2, weight_shard, bias_shard, local, temperature=temperature, softcap=softcap,
                                 chunk_bytes=chunk_bytes, extra=extra)
        return _torch_impl.partial_stats(h2, weight_shard, bias_shard, local, temperature=temperature,
                                         softcap=softcap, chunk_bytes=chunk_bytes, extra=extra)
