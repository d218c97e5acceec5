"""Vocabulary-parallel (tensor-parallel) fused head: each rank holds rows [start, start + V_p) of W.

Forward, per rank p: the same fused pass over its slice gives per-token statistics that combine exactly,
    m = max z,  s = Σ e^{z−m},  a = Σ e^{z−m}(z − m),  zy = z_y if y is in the slice else 0
(plus q = Σ e^{2(z−m)}, zs = Σ z, mb = max of z before y for TRL's statistics; for KL the two heads'
m, s and c = Σ e^{a−m_a}(a − b)). A rank first merges its own splits into one row per statistic, then
all-gathers R·N floats (R = 4, 5 or 7 — never N·V_p logits) and merges the ranks in rank order: every
rank holds the exact single-device log-probs, entropy, lse (and KL), deterministically.

Backward, per rank: ∂L/∂z for its slice needs only the merged per-token lse (and entropy, or the KL and
both lse's), so each rank writes its (chunk, V_p) ∂z tile and does its own GEMMs: ∂W_p and ∂b_p stay local
(the shard's gradient), and ∂h — a sum over the whole vocabulary — is all-reduced over the group.

The autograd Functions are the ops' own (`LinearLogpsFunction`, `LinearKLFunction` take an optional `VocabShard`);
this module holds how a call becomes sharded (`shard_of`), the fixed-order merges and the gather.

Two ways in (fa.linear_logps / linear_kl and the losses on top of them):
  * a DTensor head weight sharded on the vocabulary dimension (`Shard(0)` on a 1-D mesh, as
    `ColwiseParallel` on `lm_head` makes it): torch.chunk's split, start = rank · ⌈V / world⌉;
  * explicit: the local `weight` shard with `vocab_start=`, `group=` (and `vocab_size=`, else one small
    all-reduce reads it). Shards may be uneven.
A parameter sharded by FSDP2 is also a Shard(0) DTensor, but its rows are not a vocabulary split that the
hidden states of this rank pair with: it is refused with a clear error (see `check_not_fsdp_sharded`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from .blocked import slice_targets
from .checks import check_linear_head
from .common import (DEFAULT_CHUNK_BYTES, EXTRA_STAT_ROWS, KL_ROW_C, KL_ROW_MA, KL_ROW_MB, KL_ROW_SA, KL_ROW_SB,
                     KL_ROWS, ROW_A, ROW_M, ROW_MB, ROW_Q, ROW_S, ROW_ZS, ROW_ZY, HeadOptions, backend_impl,
                     launched_on_device, stat_rows)
from .linear_logps_torch import combine_stats  # noqa: F401  (the merge of shards' statistics; re-exported)


@dataclass(frozen=True)
class VocabShard:
    """This rank's slice of the vocabulary: rows [start, start + size) of a head with `vocab_size` rows."""

    start: int
    size: int
    vocab_size: int
    group: object  # a torch.distributed ProcessGroup (None: the default group)


# --- how a call says it is vocabulary-parallel ------------------------------------------------------------
try:
    from torch.distributed.tensor import DTensor, Shard
except ImportError:  # pragma: no cover - torch built without distributed
    DTensor = Shard = None


def is_dtensor(t) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def check_not_fsdp_sharded(weight, name: str = "weight") -> None:
    """Refuse a parameter that FSDP2 holds sharded (outside its module's forward)."""
    try:
        from torch.distributed._composable_state import _module_state_mapping
    except ImportError:  # pragma: no cover
        return
    for ref in list(_module_state_mapping.values()):
        state = ref() if callable(ref) else ref
        group = getattr(state, "_fsdp_param_group", None)
        if group is not None and any(p.sharded_param is weight for p in group.fsdp_params):
            raise ValueError(
                f"{name} is a parameter sharded by FSDP2 (fully_shard), used outside the forward of the module "
                f"that owns it: each rank holds only some of its rows, which are not a vocabulary split of this "
                f"rank's tokens. Run the fused op inside that module's forward (FSDP gathers the weight there: "
                f"fusealign's engine and fa.patch_model do), or call module.unshard() first")


def shard_from_dtensor(weight, name: str = "weight"):
    """(local weight (autograd-aware), VocabShard) of a DTensor head sharded on the vocabulary dimension."""
    check_not_fsdp_sharded(weight, name)
    mesh, placements = weight.device_mesh, weight.placements
    if mesh.ndim != 1 or len(placements) != 1 or not (isinstance(placements[0], Shard) and placements[0].dim == 0):
        raise ValueError(f"{name} is a DTensor with placements {placements} on a {mesh.ndim}-D mesh; the fused head "
                         f"takes a vocabulary-sharded head: Shard(0) on a 1-D tensor-parallel mesh (ColwiseParallel "
                         f"on lm_head), or a plain tensor")
    V, world, rank = weight.shape[0], mesh.size(), mesh.get_local_rank()
    chunk = -(-V // world)  # torch.chunk's split, as DTensor's Shard(0)
    start = min(V, rank * chunk)
    size = max(0, min(V, start + chunk) - start)
    local = weight.to_local()
    if local.shape[0] != size:
        raise ValueError(f"{name}: local shard has {local.shape[0]} rows, expected {size} for Shard(0) of V={V} "
                         f"over {world} ranks")
    return local, VocabShard(start, size, V, mesh.get_group())


def local_bias(bias, shard: VocabShard):
    """The bias rows of this shard: a Shard(0) DTensor's local part, a full (V,) tensor sliced, or a shard."""
    if bias is None:
        return None
    if is_dtensor(bias):
        return bias.to_local()
    if bias.shape[0] == shard.vocab_size and shard.size != shard.vocab_size:
        return bias[shard.start:shard.start + shard.size]
    return bias


def explicit_shard(weight, vocab_start: int, vocab_size: Optional[int], group) -> VocabShard:
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("vocab_start= / group= need torch.distributed to be initialised (init_process_group)")
    if vocab_start is None:
        raise ValueError("the explicit vocabulary-parallel form needs vocab_start= (this shard's first row)")
    size = weight.shape[0]
    if vocab_size is None:  # one tiny collective (a host sync on CUDA): pass vocab_size= to avoid it
        t = torch.tensor([size], dtype=torch.int64, device=weight.device if weight.is_cuda else "cpu")
        dist.all_reduce(t, group=group)
        vocab_size = int(t.item())
    if vocab_size <= 0:
        raise ValueError(f"vocab_size={vocab_size}: every rank's shard is empty; the head needs at least one row")
    if not 0 <= vocab_start <= vocab_size - size:
        raise ValueError(f"vocab_start={vocab_start} with a shard of {size} rows does not fit vocab_size={vocab_size}")
    return VocabShard(int(vocab_start), size, int(vocab_size), group)


def shard_of(weight, bias, vocab_start: Optional[int], vocab_size: Optional[int], group, name: str = "weight"):
    """How a call says it is vocabulary-parallel -> (local weight, local bias, VocabShard), or the inputs and None
    for a plain head. A Shard(0) DTensor head or the explicit form (`vocab_start=`, `group=`)."""
    if is_dtensor(weight):
        weight, shard = shard_from_dtensor(weight, name)
    elif group is not None or vocab_start is not None:
        shard = explicit_shard(weight, vocab_start, vocab_size, group)
    else:
        return weight, bias, None
    return weight, local_bias(bias, shard), shard


# --- statistics ---------------------------------------------------------------------------------------------
# What the kernels leave for a split with no columns: maxima at NEG_BIG (finite, so e^{m−M} = 0 and (m − M)·0 = 0
# in the merges, where −inf would give 0·(−inf) = NaN), sums 0. An empty shard (V = 5 over 4 ranks: torch.chunk
# leaves the last rank no rows) contributes these and still joins every collective — a rank that raised instead
# would leave the others waiting in the all-gather forever (issue 30).
NEG_BIG = -1.0e30


def empty_stats(rows: int, N: int, device) -> torch.Tensor:
    """(1, rows, N) fp32 statistics of an empty vocabulary slice: log-probs (rows 4 or 7) or KL (5)."""
    stats = torch.zeros((1, rows, N), device=device, dtype=torch.float32)
    maxima = (ROW_M, ROW_MB) if rows == EXTRA_STAT_ROWS else (KL_ROW_MA, KL_ROW_MB) if rows == KL_ROWS else (ROW_M,)
    stats[0, list(maxima)] = NEG_BIG
    return stats


def merge_partials(stats: torch.Tensor) -> torch.Tensor:
    """(P, R, N) per-split statistics (R = 4 or 7: m, s, a, zy[, q, zs, mb]) -> (1, R, N), in a fixed order."""
    m = stats[:, ROW_M]
    M = m.amax(0)
    scale = (m - M).exp()  # (P, N)
    rows = [M, (stats[:, ROW_S] * scale).sum(0), (scale * (stats[:, ROW_A] + (m - M) * stats[:, ROW_S])).sum(0),
            stats[:, ROW_ZY].sum(0)]
    if stats.shape[1] == EXTRA_STAT_ROWS:
        rows += [(scale * scale * stats[:, ROW_Q]).sum(0), stats[:, ROW_ZS].sum(0), stats[:, ROW_MB].amax(0)]
    return torch.stack(rows).unsqueeze(0)


def merge_kl_partials(stats: torch.Tensor) -> torch.Tensor:
    """(P, 5, N) KL statistics (m_a, s_a, m_b, s_b, c) -> (1, 5, N), in a fixed order."""
    M_a, M_b = stats[:, KL_ROW_MA].amax(0), stats[:, KL_ROW_MB].amax(0)
    sa = (stats[:, KL_ROW_MA] - M_a).exp()
    rows = [M_a, (sa * stats[:, KL_ROW_SA]).sum(0), M_b, ((stats[:, KL_ROW_MB] - M_b).exp() * stats[:, KL_ROW_SB]).sum(0),
            (sa * stats[:, KL_ROW_C]).sum(0)]
    return torch.stack(rows).unsqueeze(0)


def gather_ranks(row: torch.Tensor, group) -> torch.Tensor:
    """(1, R, N) on each rank -> (world, R, N) in rank order."""
    parts = [torch.empty_like(row) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, row.contiguous(), group=group)
    return torch.cat(parts)


@launched_on_device
def shard_stats(hidden, weight_shard, targets, *, vocab_start: int, bias_shard=None, temperature: float = 1.0,
                softcap: Optional[float] = None, backend: str = "auto", chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                extra: bool = False) -> torch.Tensor:
    """hidden: (N, H), weight_shard: (V_p, H) rows [vocab_start, vocab_start + V_p) of the head,
    targets: (N,) global ids  ->  (P, 4, N) fp32 statistics (P ≥ 1 vocabulary splits), (P, 7, N) with
    `extra`. No autograd, no communication."""
    check_linear_head(hidden, weight_shard, targets, bias_shard, temperature, softcap,
                      names=("hidden", "weight_shard", "targets", "bias_shard"), allow_empty=True)
    opts = HeadOptions.of(temperature=temperature, softcap=softcap, ignore_index=-100, backend=backend,
                          chunk_bytes=chunk_bytes, device=hidden.device)
    # Local ids, left unclamped: a target outside [0, V_p) has no logit here (zy = 0), and its sign says
    # whether every column of this shard lies before it (mb) or none does.
    local = (targets.reshape(-1) - vocab_start).contiguous()
    h2 = hidden.reshape(-1, hidden.shape[-1])
    bias_shard = None if bias_shard is None else bias_shard.contiguous()
    if weight_shard.shape[0] == 0:
        return empty_stats(stat_rows(extra), h2.shape[0], h2.device)
    with torch.no_grad():
        return backend_impl("logps", opts.backend).partial_stats(
            h2, weight_shard, bias_shard, local, temperature=opts.temperature, softcap=opts.softcap,
            chunk_bytes=opts.chunk_bytes, extra=extra)


def backward_targets(targets, shard: VocabShard, ignore_index: int):
    """Targets for this shard's ∂z kernel: local ids where owned, ignore_index where ignored, and an id no
    column has (−1, or −2 when ignore_index is −1) where another rank owns the target: valid, no one-hot —
    a shard is a vocabulary slice (blocked.slice_targets)."""
    return slice_targets(targets, slice(shard.start, shard.start + shard.size), ignore_index)
