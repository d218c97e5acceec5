"""`linear_logps`: per-token log-probs and entropy straight from hidden states and the head weight.

Math (token t, target y_t, final logits z_t = softcap(h_t Wᵀ + b) / T):
    logp_t = z_t[y_t] − lse_t,            entropy_t = −Σ_v p_tv log p_tv
    ∂L/∂z_tv = g_t (1[v = y_t] − p_tv) − e_t p_tv (log p_tv + entropy_t)   (g, e: upstream grads)
    ∂h_t = Σ_v ∂r_tv W_v,   ∂W_v = Σ_t ∂r_tv h_t,   ∂b_v = Σ_t ∂r_tv     (r: raw logits)
Forward-only statistics on request (`outputs=`), in the same pass, with the semantics of TRL 1.16's
`ChunkedLogProbFunction` (which gives them no gradient either; TRL's trainers log them, WPO weights with
the first):
    log_sum_sq_probs_t = log Σ_v p_tv²,   mean_logits_t = (1/V) Σ_v z_tv,   is_top1_t = [y_t = argmax_v z_tv]
(argmax = the first maximum, as `torch.argmax`).

Saved for backward: the inputs (no copies) and per-token `lse` and `entropy`, fp32 — O(N).
Recomputed in backward: logits, one bounded token chunk at a time. No (N, V) tensor exists at any
point — except on the torch backend when the whole batch's fp32 logits fit `chunk_bytes` (N·V·4 bytes,
one forward chunk; with `shard`, this rank's N·V_p): the Function keeps that tile and the backward turns it
into ∂r in place (3 GEMMs instead of 4; consumed by the first backward, so a second one, under
`retain_graph=True`, recomputes; nothing is kept under `torch.no_grad()`). Memory bound: every (chunk, V) buffer alive at once — the backward's gradient tile and, on the
torch backend, its logit temporaries — fits `chunk_bytes` together; peak extra memory of forward +
backward is ≤ 1.25 × chunk_bytes (allocator slack) + O(N·H + V·H) (the gradients, and an fp32 ∂W
accumulator for low-precision weights when the backward needs more than one chunk).
Tested in tests/kernels/test_linear_logps_memory.py.

Backends: "triton" (fused kernels, linear_logps_triton.py), "torch" (chunked PyTorch,
linear_logps_torch.py), "auto" (triton for CUDA tensors, torch otherwise). Both share the backward
driver in head_backward.py: the backend writes ∂r for a chunk, cuBLAS/BLAS does the two matmuls.

Vocabulary-parallel head (`shard`, see vocab_parallel.py): the same Function, with each rank's split statistics
merged, all-gathered (R·N floats) and combined in rank order in forward, and ∂h all-reduced in backward.

No host synchronisation: nothing reads a tensor value on the host (chunking depends on shapes only;
the target-range check is a device-side assert on CUDA).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from . import vocab_parallel as vp
from .blocked import slice_targets
from .checks import check_linear_head, check_target_range
from .chunked import head_weight
from .common import (DEFAULT_CHUNK_BYTES, OUTPUTS, STAT_OUTPUTS, HeadOptions, backend_impl, check_outputs,  # noqa: F401
                     launched_on_device, needs_grad, stat_rows)
from .head_backward import head_backward, keeps_tile
from .linear_logps_torch import combine_stats


@launched_on_device
def logps_forward(hidden, weight, bias, targets, opts: HeadOptions, extra: bool = False,
                  shard: Optional[vp.VocabShard] = None, entropy: bool = True, keep: bool = False):
    """hidden: (N, H), targets: (N,) -> (logps, entropy, lse, extras): (N,) fp32 each, and with `extra`
    extras = (log_sum_sq_probs, mean_logits: (N,) fp32, is_top1: (N,) bool), else None. No autograd.
    With `shard`, `weight`/`bias` are this rank's vocabulary rows and the results are the whole head's.
    `entropy=False`: entropy is None (the torch backend then skips its reductions). `keep=True` (torch backend
    only, see `keeps_tile`) adds a 5th element: the torch backend's Kept tile of this weight's rows when all
    N rows fitted one chunk, else None."""
    N = hidden.shape[0]
    impl = backend_impl("logps", opts.backend, hidden, weight)
    # Only the torch backend computes statistics selectively and can keep its tile; Triton's are free.
    kw = dict(entropy=entropy, keep=keep) if opts.backend == "torch" else {}
    kept = None
    if shard is None:
        if N == 0:
            empty = lambda dtype=torch.float32: hidden.new_zeros((0,), dtype=dtype)  # noqa: E731
            out = (empty(), empty() if entropy else None, empty(),
                   ((empty(), empty(), empty(torch.bool)) if extra else None))
            return out + ((None,) if keep else ())
        out = impl.logps_fwd(hidden, weight, bias, targets, temperature=opts.temperature, softcap=opts.softcap,
                             ignore_index=opts.ignore_index, chunk_bytes=opts.chunk_bytes, extra=extra, **kw)
        if keep:
            out, kept = out[:4], out[4]
        logps, ent, lse, extras = out
    else:
        # Local ids, unclamped: a target owned by another rank has no logit here (zy = 0), and its sign tells mb
        # whether every column of this shard lies before it.
        if shard.size == 0:  # no rows here: neutral statistics, and still every collective (vocab_parallel.py)
            stats = vp.empty_stats(stat_rows(extra), N, hidden.device)
        else:
            stats = impl.partial_stats(hidden, weight, bias, (targets - shard.start).contiguous(),
                                       temperature=opts.temperature, softcap=opts.softcap,
                                       chunk_bytes=opts.chunk_bytes, extra=extra, **kw)
            if keep:
                stats, kept = stats
        merged = vp.gather_ranks(vp.merge_partials(stats), shard.group)  # (world, R, N), rank order
        logps, ent, lse, extras = combine_stats(merged, targets, opts.ignore_index, shard.vocab_size)
    out = (logps, ent if entropy else None, lse, extras)
    return out + ((kept,) if keep else ())


@launched_on_device
def logps_backward(hidden, weight, bias, targets, lse, entropy, g_logps, g_entropy, opts: HeadOptions,
                   needs=(True, True, True), shard: Optional[vp.VocabShard] = None, kept=None):
    """Gradients (dh (N, H), dW (V, H), db (V,)) for upstream g_logps / g_entropy: (N,) fp32 or None.
    With `shard`: this rank's dW, db, and dh summed over the group (a collective: every rank calls it).
    `kept`: the torch backend's Kept tile from the forward (the (N, V) fp32 final logits, or their exponentials
    for log-probs without softcap), turned into ∂r in place (consumed: head_backward's one-chunk ∂r buffer)."""
    N = hidden.shape[0]
    if g_logps is None and g_entropy is None:
        return None, None, None
    g_logps = hidden.new_zeros(N, dtype=torch.float32) if g_logps is None else g_logps.reshape(N).float().contiguous()
    if g_entropy is not None:
        g_entropy = g_entropy.reshape(N).float().contiguous()
    impl = backend_impl("logps", opts.backend, hidden, weight)
    y = targets if shard is None else vp.backward_targets(targets, shard, opts.ignore_index)
    on_torch = opts.backend == "torch"
    # The torch backend's chunk matmuls and the ∂h GEMM share one fp32 weight (one upcast per call on the CPU).
    w_dz = head_weight(weight) if on_torch else weight
    shift = None if kept is None else kept.shift  # set when the kept tile holds exp(z − shift)

    def write_dz(rows, dz, cols=None):
        # cols: a vocabulary slice (head_backward's sliced path, never with a kept tile): its rows of W and b,
        # targets local to it.
        w, b, yr = w_dz, bias, y[rows]
        if cols is not None:
            w, b, yr = w_dz[cols], None if bias is None else bias[cols], slice_targets(yr, cols, opts.ignore_index)
        kw = {}
        if on_torch:
            kw["logits_in_dz"] = kept is not None
            if shift is not None:
                kw["exp_shift"] = shift[rows]
        impl.logps_bwd_dz(
            hidden[rows], w, b, yr, lse[rows],
            None if g_entropy is None else entropy[rows],
            g_logps[rows], None if g_entropy is None else g_entropy[rows], dz,
            temperature=opts.temperature, softcap=opts.softcap, ignore_index=opts.ignore_index, **kw,
        )

    want_h = needs[0] or shard is not None  # every rank's ∂h part is needed by the all-reduce below
    dh, dW, db = head_backward(hidden, weight, bias, targets == opts.ignore_index, write_dz,
                               chunk_bytes=opts.chunk_bytes,
                               temp_bytes_per_logit=impl.bwd_bytes_per_logit if on_torch else impl.BWD_BYTES_PER_LOGIT,
                               needs=(want_h, needs[1], needs[2]), weight_work=w_dz if on_torch else None,
                               dz_buffer=None if kept is None else kept.tile)
    if shard is not None:
        dist.all_reduce(dh, group=shard.group)  # ∂h sums over the whole vocabulary: every shard's part
    return (dh if needs[0] else None), dW, db


class LinearLogpsFunction(torch.autograd.Function):
    """Autograd over flattened inputs: hidden (N, H), weight (V, H) — or this rank's (V_p, H) rows with `shard` —,
    bias (V,)|None, targets (N,).

    Returns logps, entropy (differentiable; None with `entropy=False`) and, with `extra`, log_sum_sq_probs,
    mean_logits, is_top1 (non-differentiable), else three None. On the torch backend the forward's logit tile
    (this rank's, with `shard`) is kept for the backward when it fits `chunk_bytes` (`ctx.kept`)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, opts: HeadOptions, extra: bool = False,
                shard: Optional[vp.VocabShard] = None, entropy: bool = True):
        # Kept only when some input needs a gradient. (Under no_grad linear_logps never gets here; an apply under
        # no_grad returns outputs without a graph, so this ctx and its tile are freed when it returns.)
        keep = keeps_tile(hidden, opts) and any(ctx.needs_input_grad[:3])
        out = logps_forward(hidden, weight, bias, targets, opts, extra, shard, entropy, keep)
        logps, entropy, lse, extras = out[:4]
        ctx.save_for_backward(hidden, weight, bias, targets, lse, entropy)
        ctx.kept = out[4] if keep else None  # an intermediate, not an input or output: a plain attribute
        ctx.opts, ctx.shard = opts, shard
        ctx.set_materialize_grads(False)
        if extras is None:
            return logps, entropy, None, None, None
        ctx.mark_non_differentiable(*extras)
        return (logps, entropy) + tuple(extras)

    @staticmethod
    @torch.autograd.function.once_differentiable  # double backward would silently miss the softmax terms
    def backward(ctx, g_logps, g_entropy, *_stats):
        hidden, weight, bias, targets, lse, entropy = ctx.saved_tensors
        kept = None
        if g_logps is not None or g_entropy is not None:
            # ∂r overwrites the kept tile: a second backward through this graph (retain_graph) recomputes.
            kept, ctx.kept = ctx.kept, None
        dh, dW, db = logps_backward(hidden, weight, bias, targets, lse, entropy, g_logps, g_entropy,
                                    ctx.opts, needs=ctx.needs_input_grad[:3], shard=ctx.shard, kept=kept)
        return dh, dW, db, None, None, None, None, None


def linear_logps(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: Optional[torch.Tensor] = None,
    temperature: float = 1.0,
    softcap: Optional[float] = None,
    ignore_index: int = -100,
    return_entropy: bool = False,
    outputs: Optional[tuple] = None,
    backend: str = "auto",
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    vocab_start: Optional[int] = None,
    vocab_size: Optional[int] = None,
    group=None,
):
    """Per-token log-probs (and entropy, and TRL's logged statistics) of `targets` under the head
    `softcap(hidden Wᵀ + b) / T`.

    hidden: (…, H) fp32/bf16/fp16, weight: (V, H) same dtype, bias: (V,) or None,
    targets: (…) int64/int32, the leading shape of `hidden`.
    Returns logps: (…) float32, and with `return_entropy=True` the pair (logps, entropy).
    `outputs=` names any of OUTPUTS = ("logps", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1") and
    returns a tuple of those, in that order, each (…): float32, is_top1 bool:
        log_sum_sq_probs = log Σ_v p_v²,  mean_logits = mean over v of the final logits z,
        is_top1 = the target is the (first) argmax of z.
    The last three are forward-only (no gradient, as in TRL) and come from the same fused pass: asking
    for any of them adds three row reductions per logit tile, nothing of size V (on CUDA that forward uses
    half-width vocabulary tiles to stay spill-free, so its logps equal a plain call's to fp32 rounding,
    not bitwise; batch invariance holds for each).
    Every output is exactly 0 (False) where `targets == ignore_index`.

    Equivalent to `fusealign.kernels.reference.linear_logps_reference` without materialising the
    (N, V) logits: logits are formed and reduced in fp32 whatever the input dtype; gradients flow to
    `hidden`, `weight` and `bias` through both outputs; ∂W accumulates in fp32 and is returned in
    the weight's dtype. Under `torch.no_grad()` nothing is saved.
    Memory: peak extra memory of forward + backward ≤ 1.25 × `chunk_bytes` + O(N·H + V·H) on both
    backends: every (chunk, V) buffer (the backward's ∂logits tile, the torch backend's fp32 logit
    temporaries) fits `chunk_bytes` together; the rest is the gradients themselves.

    Vocabulary-parallel (tensor-parallel) head, see vocab_parallel.py: `weight` a DTensor sharded on the
    vocabulary (`Shard(0)` on a 1-D mesh, as ColwiseParallel on lm_head makes it; `bias` likewise, or the full
    (V,) vector), or the explicit form — `weight` this rank's rows with `vocab_start=` and `group=` (and
    `vocab_size=`, else read with one small all-reduce). `hidden` and `targets` are the same on every rank;
    the outputs are the whole head's, on every rank; the shard gets its local gradient, ∂hidden is summed
    over the group. Each rank sends R·N floats, never N·V.
    """
    weight, bias, shard = vp.shard_of(weight, bias, vocab_start, vocab_size, group)
    H, V = check_linear_head(hidden, weight, targets, bias, temperature, softcap, allow_empty=shard is not None)
    names = check_outputs(outputs, return_entropy)
    extra = any(n in STAT_OUTPUTS for n in names)
    want_entropy = "entropy" in names  # otherwise the torch backend skips the entropy reductions
    opts = HeadOptions.of(temperature=temperature, softcap=softcap, ignore_index=ignore_index, backend=backend,
                          chunk_bytes=chunk_bytes, device=hidden.device)
    check_target_range(targets, V if shard is None else shard.vocab_size, ignore_index)
    shape = targets.shape
    if bias is not None:
        bias = bias.contiguous()  # the kernels index the bias with unit stride
    h2 = hidden.reshape(-1, H)  # (N, H)
    y = targets.reshape(-1).contiguous()  # (N,)
    if needs_grad(hidden, weight, bias):
        per_token = LinearLogpsFunction.apply(h2, weight, bias, y, opts, extra, shard, want_entropy)
    else:  # no-grad fast path: nothing saved, nothing kept
        logps, entropy, _, extras = logps_forward(h2, weight, bias, y, opts, extra, shard, want_entropy)
        per_token = (logps, entropy) + (extras or (None, None, None))
    by_name = dict(zip(OUTPUTS, per_token))
    result = tuple(by_name[n].view(shape) for n in names)
    if outputs is None and not return_entropy:
        return result[0]
    return result
