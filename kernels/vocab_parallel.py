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

from . import linear_kl_torch as _kl_torch
from . import linear_logps_torch as _torch_impl
from .checks import check_linear_head
from .chunked import head_weight
from .head_backward import head_backward
from .linear_logps import DEFAULT_CHUNK_BYTES, HeadOptions, keeps_tile, resolve_backend

combine_stats = _torch_impl.combine_stats


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
    if not 0 <= vocab_start <= vocab_size - size:
        raise ValueError(f"vocab_start={vocab_start} with a shard of {size} rows does not fit vocab_size={vocab_size}")
    return VocabShard(int(vocab_start), size, int(vocab_size), group)


# --- statistics ---------------------------------------------------------------------------------------------
def merge_partials(stats: torch.Tensor) -> torch.Tensor:
    """(P, R, N) per-split statistics (R = 4 or 7: m, s, a, zy[, q, zs, mb]) -> (1, R, N), in a fixed order."""
    M = stats[:, 0].amax(0)
    scale = (stats[:, 0] - M).exp()  # (P, N)
    rows = [M, (stats[:, 1] * scale).sum(0), (scale * (stats[:, 2] + (stats[:, 0] - M) * stats[:, 1])).sum(0),
            stats[:, 3].sum(0)]
    if stats.shape[1] == 7:
        rows += [(scale * scale * stats[:, 4]).sum(0), stats[:, 5].sum(0), stats[:, 6].amax(0)]
    return torch.stack(rows).unsqueeze(0)


def merge_kl_partials(stats: torch.Tensor) -> torch.Tensor:
    """(P, 5, N) KL statistics (m_a, s_a, m_b, s_b, c) -> (1, 5, N), in a fixed order."""
    M_a, M_b = stats[:, 0].amax(0), stats[:, 2].amax(0)
    sa = (stats[:, 0] - M_a).exp()
    rows = [M_a, (sa * stats[:, 1]).sum(0), M_b, ((stats[:, 2] - M_b).exp() * stats[:, 3]).sum(0),
            (sa * stats[:, 4]).sum(0)]
    return torch.stack(rows).unsqueeze(0)


def gather_ranks(row: torch.Tensor, group) -> torch.Tensor:
    """(1, R, N) on each rank -> (world, R, N) in rank order."""
    parts = [torch.empty_like(row) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, row.contiguous(), group=group)
    return torch.cat(parts)


def _impl(backend: str):
    if backend == "triton":
        from . import linear_logps_triton

        return linear_logps_triton
    return _torch_impl


def _kl_impl(backend: str):
    if backend == "triton":
        from . import linear_kl_triton

        return linear_kl_triton
    return _kl_torch


def shard_stats(hidden, weight_shard, targets, *, vocab_start: int, bias_shard=None, temperature: float = 1.0,
                softcap: Optional[float] = None, backend: str = "auto", chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                extra: bool = False) -> torch.Tensor:
    """hidden: (N, H), weight_shard: (V_p, H) rows [vocab_start, vocab_start + V_p) of the head,
    targets: (N,) global ids  ->  (P, 4, N) fp32 statistics (P ≥ 1 vocabulary splits), (P, 7, N) with
    `extra`. No autograd, no communication."""
    check_linear_head(hidden, weight_shard, targets, bias_shard, temperature, softcap,
                      names=("hidden", "weight_shard", "targets", "bias_shard"))
    # Local ids, left unclamped: a target outside [0, V_p) has no logit here (zy = 0), and its sign says
    # whether every column of this shard lies before it (mb) or none does.
    local = (targets.reshape(-1) - vocab_start).contiguous()
    h2 = hidden.reshape(-1, hidden.shape[-1])
    bias_shard = None if bias_shard is None else bias_shard.contiguous()
    with torch.no_grad():
        return _impl(resolve_backend(backend, hidden.device)).partial_stats(
            h2, weight_shard, bias_shard, local, temperature=temperature, softcap=softcap, chunk_bytes=chunk_bytes,
            extra=extra)


def _backward_targets(targets, shard: VocabShard, ignore_index: int):
    """Targets for this shard's ∂z kernel: local ids where owned, ignore_index where ignored, and an id no
    column has (−1, or −2 when ignore_index is −1) where another rank owns the target: valid, no one-hot."""
    other = -2 if ignore_index == -1 else -1
    local = targets - shard.start
    owned = (local >= 0) & (local < shard.size)
    return torch.where(targets == ignore_index, ignore_index, torch.where(owned, local, other)).contiguous()


# --- log-probs -------------------------------------------------------------------------------------------------
class VocabParallelLogpsFunction(torch.autograd.Function):
    """hidden (N, H) replicated over the group, weight shard (V_p, H), bias shard (V_p,)|None, global
    targets (N,) -> logps, entropy (differentiable) and, with `extra`, TRL's three statistics."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, shard: VocabShard, opts: HeadOptions, extra: bool,
                entropy: bool = True):
        local = (targets - shard.start).contiguous()
        kw = dict(temperature=opts.temperature, softcap=opts.softcap, chunk_bytes=opts.chunk_bytes, extra=extra)
        kept = None
        if opts.backend == "torch":  # only the statistics asked for; this shard's logit tile kept when it fits
            # Under no_grad the ctx (and a kept tile) is dropped as soon as apply returns.
            keep = keeps_tile(hidden, opts)
            out = _torch_impl.partial_stats(hidden, weight, bias, local, entropy=entropy, keep=keep, **kw)
            stats, kept = out if keep else (out, None)
        else:
            stats = _impl(opts.backend).partial_stats(hidden, weight, bias, local, **kw)
        merged = gather_ranks(merge_partials(stats), shard.group)
        logps, ent, lse, extras = combine_stats(merged, targets, opts.ignore_index, shard.vocab_size)
        entropy = ent if entropy else None
        ctx.save_for_backward(hidden, weight, bias, targets, lse, entropy)
        ctx.kept = kept  # consumed by the first backward (see LinearLogpsFunction)
        ctx.shard, ctx.opts = shard, opts
        ctx.set_materialize_grads(False)
        if extras is None:
            return logps, entropy, None, None, None
        ctx.mark_non_differentiable(*extras)
        return (logps, entropy) + tuple(extras)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_logps, g_entropy, *_stats):
        hidden, weight, bias, targets, lse, entropy = ctx.saved_tensors
        opts, shard = ctx.opts, ctx.shard
        N = hidden.shape[0]
        needs = ctx.needs_input_grad[:3]
        if g_logps is None and g_entropy is None:
            return None, None, None, None, None, None, None, None
        kept, ctx.kept = ctx.kept, None  # ∂r overwrites it: a second backward (retain_graph) recomputes
        g_logps = hidden.new_zeros(N, dtype=torch.float32) if g_logps is None else g_logps.float().contiguous()
        g_entropy = None if g_entropy is None else g_entropy.float().contiguous()
        y = _backward_targets(targets, shard, opts.ignore_index)
        impl = _impl(opts.backend)
        on_torch = opts.backend == "torch"
        w_dz = head_weight(weight) if on_torch else weight  # one upcast per call, shared with the ∂h GEMM
        extra_kw = dict(logits_in_dz=kept is not None) if on_torch else {}
        shift = None if kept is None else kept.shift  # set when the kept tile holds exp(z − shift)

        def write_dz(rows, dz):
            impl.logps_bwd_dz(hidden[rows], w_dz, bias, y[rows], lse[rows],
                              None if g_entropy is None else entropy[rows], g_logps[rows],
                              None if g_entropy is None else g_entropy[rows], dz,
                              temperature=opts.temperature, softcap=opts.softcap, ignore_index=opts.ignore_index,
                              **extra_kw, **({} if shift is None else dict(exp_shift=shift[rows])))

        # ∂h of every rank is needed: the all-reduce below is a collective.
        dh, dW, db = head_backward(hidden, weight, bias, targets == opts.ignore_index, write_dz,
                                   chunk_bytes=opts.chunk_bytes,
                                   temp_bytes_per_logit=impl.bwd_bytes_per_logit if on_torch else impl.BWD_BYTES_PER_LOGIT,
                                   needs=(True, needs[1], needs[2]), weight_work=w_dz if on_torch else None,
                                   dz_buffer=None if kept is None else kept.tile)
        dist.all_reduce(dh, group=shard.group)  # ∂h sums over the whole vocabulary: every shard's part
        return (dh if needs[0] else None), dW, db, None, None, None, None, None


def vocab_parallel_logps(h2, weight, bias, y, shard: VocabShard, opts: HeadOptions, extra: bool,
                         entropy: bool = True):
    """Flattened inputs -> the 5-tuple of per-token outputs (as LinearLogpsFunction)."""
    if torch.is_grad_enabled() and (h2.requires_grad or weight.requires_grad
                                    or (bias is not None and bias.requires_grad)):
        return VocabParallelLogpsFunction.apply(h2, weight, bias, y, shard, opts, extra, entropy)
    with torch.no_grad():
        return VocabParallelLogpsFunction.apply(h2, weight, bias, y, shard, opts, extra, entropy)


# --- KL ------------------------------------------------------------------------------------------------------
class VocabParallelKLFunction(torch.autograd.Function):
    """Exact KL between two vocabulary-sharded heads (same shard on both sides); gradients to the policy side."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, ref_hidden, ref_weight, ref_bias, valid, reverse: bool,
                shard: VocabShard, opts: HeadOptions):
        impl = _kl_impl(opts.backend)
        kw = dict(temperature=opts.temperature, softcap=opts.softcap, chunk_bytes=opts.chunk_bytes)
        keep = keeps_tile(hidden, opts)  # torch backend: this shard's two tiles kept when they fit one chunk
        if keep:
            kw["keep"] = True
        if reverse:  # KL(Q‖P): A = reference, B = policy
            out = impl.kl_partial_stats(ref_hidden, ref_weight, hidden, weight, bias_a=ref_bias, bias_b=bias, **kw)
        else:
            out = impl.kl_partial_stats(hidden, weight, ref_hidden, ref_weight, bias_a=bias, bias_b=ref_bias, **kw)
        stats, tiles = out if keep else (out, None)
        if tiles is not None and reverse:
            tiles = tiles[::-1]  # (policy, reference)
        merged = gather_ranks(merge_kl_partials(stats), shard.group)
        kl, lse_a, lse_b = _kl_torch.kl_combine_stats(merged, valid)
        lse, lse_ref = (lse_b, lse_a) if reverse else (lse_a, lse_b)
        ctx.save_for_backward(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, valid, lse, lse_ref, kl)
        ctx.kept = tiles
        ctx.reverse, ctx.shard, ctx.opts = reverse, shard, opts
        ctx.set_materialize_grads(False)
        return kl

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        hidden, weight, bias, ref_hidden, ref_weight, ref_bias, valid, lse, lse_ref, kl = ctx.saved_tensors
        if g is None:
            return (None,) * 10
        from .linear_kl import kl_backward

        opts, impl = ctx.opts, _kl_impl(ctx.opts.backend)
        g = g.reshape(-1).float().contiguous()
        needs = ctx.needs_input_grad[:3]
        kept, ctx.kept = ctx.kept, None  # consumed: a second backward (retain_graph) recomputes
        dh, dW, db = kl_backward(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, valid, lse, lse_ref, kl, g,
                                 ctx.reverse, opts, impl, (True, needs[1], needs[2]), kept)
        dist.all_reduce(dh, group=ctx.shard.group)
        return (dh if needs[0] else None), dW, db, None, None, None, None, None, None, None
