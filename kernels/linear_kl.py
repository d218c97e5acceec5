"""`linear_kl`: exact per-token KL over the whole vocabulary between a policy head and a reference head.

Math (token t; z = policy logits, z_ref = reference logits, both softcap(h Wᵀ)/T; p, q their softmaxes):
    direction="forward":  KL(π‖π_ref) = Σ_v p_v (log p_v − log q_v)
    direction="reverse":  KL(π_ref‖π) = Σ_v q_v (log q_v − log p_v)
    ∂KL_fwd/∂z_v = p_v (log p_v − log q_v − KL),   ∂KL_rev/∂z_v = p_v − q_v
Gradients flow to the policy side only (`hidden`, `weight`); the reference is a constant.
Saved for backward: inputs (no copies) and per-token lse, lse_ref, KL — O(N). Both logit tiles are
recomputed in backward; no (N, V) tensor exists (see linear_kl_triton.py / linear_kl_torch.py) — except
on the torch backend when both heads' fp32 logits for the whole batch fit `chunk_bytes` (2·N·V·4 bytes,
one forward chunk; with `shard`, this rank's rows): the Function keeps the two tiles and the backward forms
∂r from them in place (no logit GEMM; consumed by the first backward, a second one under
`retain_graph=True` recomputes; nothing is kept under `torch.no_grad()`).
The reference head may be wider (distillation): ref_weight is (V, H_ref) with H_ref ≠ H allowed. Each
head may carry a bias; gradients reach the policy's bias too.
Vocabulary-parallel heads (`shard`, see vocab_parallel.py): the same Function; each rank's split statistics are
merged, all-gathered (5·N floats) and combined in rank order, and ∂h is all-reduced in backward.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from . import vocab_parallel as vp
from .checks import check_linear_head
from .chunked import head_weight
from .common import DEFAULT_CHUNK_BYTES, KL_ROWS, HeadOptions, backend_impl, launched_on_device, needs_grad
from .head_backward import head_backward, keeps_tile
from .linear_kl_torch import kl_combine_stats

DIRECTIONS = ("forward", "reverse")


@launched_on_device
def _forward(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, valid, reverse, opts: HeadOptions,
             shard: Optional[vp.VocabShard] = None, keep: bool = False):
    """-> kl, lse (policy), lse_ref: (N,) fp32 (with `shard`: the whole vocabulary's, from this rank's rows).
    With `keep` (torch backend only, see `keeps_tile`) a 4th element: the kept (policy, reference) final-logit
    tiles of these rows when both fitted one chunk, else None."""
    if hidden.shape[0] == 0 and shard is None:
        e = hidden.new_zeros((0,), dtype=torch.float32)
        return (e, e.clone(), e.clone()) + ((None,) if keep else ())
    kw = dict(temperature=opts.temperature, softcap=opts.softcap, chunk_bytes=opts.chunk_bytes)
    if keep:
        kw["keep"] = True
    impl = backend_impl("kl", opts.backend, hidden, weight)
    # KL(A‖B): forward KL(π‖π_ref) has A = policy, B = reference; reverse KL(π_ref‖π) the other way round.
    a, b = ((ref_hidden, ref_weight, ref_bias), (hidden, weight, bias)) if reverse else \
        ((hidden, weight, bias), (ref_hidden, ref_weight, ref_bias))
    tiles = None
    if shard is None:
        out = impl.kl_fwd(a[0], a[1], b[0], b[1], valid, bias_a=a[2], bias_b=b[2], **kw)
        (kl, lse_a, lse_b), tiles = out[:3], (out[3] if keep else None)
    else:
        if shard.size == 0:  # an empty shard: neutral statistics, and still the gather (vocab_parallel.empty_stats)
            stats = vp.empty_stats(KL_ROWS, hidden.shape[0], hidden.device)
        else:
            stats = impl.kl_partial_stats(a[0], a[1], b[0], b[1], bias_a=a[2], bias_b=b[2], **kw)
            if keep:
                stats, tiles = stats
        kl, lse_a, lse_b = kl_combine_stats(vp.gather_ranks(vp.merge_kl_partials(stats), shard.group), valid)
    lse, lse_ref = (lse_b, lse_a) if reverse else (lse_a, lse_b)
    if tiles is not None and reverse:
        tiles = tiles[::-1]  # (policy, reference)
    return (kl, lse, lse_ref) + ((tiles,) if keep else ())


class LinearKLFunction(torch.autograd.Function):
    """Autograd over flattened inputs: hidden (N, H), weight (V, H) — or this rank's rows with `shard` (the same rows
    of both heads) —, bias (V,)|None, ref_hidden (N, H_ref), ref_weight (V, H_ref), ref_bias (V,)|None,
    valid (N,) uint8. Gradients to the policy side only."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, ref_hidden, ref_weight, ref_bias, valid, reverse: bool, opts: HeadOptions,
                shard: Optional[vp.VocabShard] = None):
        keep = keeps_tile(hidden, opts) and any(ctx.needs_input_grad[:3])  # see LinearLogpsFunction
        out = _forward(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, valid, reverse, opts, shard, keep)
        kl, lse, lse_ref = out[:3]
        ctx.save_for_backward(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, valid, lse, lse_ref, kl)
        ctx.kept = out[3] if keep else None  # (policy, reference) tiles: intermediates, plain attributes
        ctx.reverse, ctx.opts, ctx.shard = reverse, opts, shard
        ctx.set_materialize_grads(False)
        return kl

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        hidden, weight, bias, ref_hidden, ref_weight, ref_bias, valid, lse, lse_ref, kl = ctx.saved_tensors
        if g is None:
            return (None,) * 10
        needs, shard = ctx.needs_input_grad[:3], ctx.shard
        g = g.reshape(-1).float().contiguous()
        kept, ctx.kept = ctx.kept, None  # ∂r overwrites the policy's kept tile: a second backward recomputes
        want_h = needs[0] or shard is not None  # the all-reduce below needs every rank's part
        dh, dW, db = kl_backward(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, valid, lse, lse_ref, kl, g,
                                 ctx.reverse, ctx.opts, (want_h, needs[1], needs[2]), kept)
        if shard is not None:
            dist.all_reduce(dh, group=shard.group)  # ∂h sums over the whole vocabulary
        return (dh if needs[0] else None), dW, db, None, None, None, None, None, None, None


@launched_on_device
def kl_backward(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, valid, lse, lse_ref, kl, g, reverse,
                opts: HeadOptions, needs, kept=None):
    """(dh, dW, db) of Σ g·KL through head_backward (this rank's rows; no collective).
    `kept`: the torch backend's (policy, reference) tiles from the forward (the policy's becomes the ∂r buffer).
    On the torch backend both weights are upcast once per call and the reference's logits of every chunk go to
    one workspace (or are the kept tile)."""
    impl = backend_impl("kl", opts.backend, hidden, weight)
    on_torch = opts.backend == "torch"
    w, w_ref = (head_weight(weight), head_weight(ref_weight)) if on_torch else (weight, ref_weight)
    ref_ws = [None]  # the torch backend's reference-logit workspace, allocated by the first (largest) block

    def write_dz(rows, dz, cols=slice(None)):
        # cols: a vocabulary slice (head_backward's sliced path, never with kept tiles): both heads' rows of W, b.
        sl = lambda t: None if t is None else t[cols]  # noqa: E731
        kw = {}
        if on_torch:
            if kept is not None:
                ref = kept[1]
            else:
                if ref_ws[0] is None:
                    ref_ws[0] = torch.empty(dz.numel(), device=dz.device, dtype=torch.float32)
                ref = ref_ws[0][: dz.numel()].view(dz.shape)
            kw = dict(logits_in_dz=kept is not None, ref_logits=ref)
        impl.kl_bwd_dz(hidden[rows], w[cols], sl(bias), ref_hidden[rows], w_ref[cols], sl(ref_bias),
                       valid[rows], lse[rows], lse_ref[rows], kl[rows], g[rows], dz, reverse=reverse,
                       temperature=opts.temperature, softcap=opts.softcap, **kw)

    return head_backward(hidden, weight, bias, valid == 0, write_dz, chunk_bytes=opts.chunk_bytes,
                         temp_bytes_per_logit=impl.bwd_bytes_per_logit if on_torch else impl.BWD_BYTES_PER_LOGIT,
                         needs=needs, weight_work=w if on_torch else None,
                         dz_buffer=None if kept is None else kept[0])


def linear_kl(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    ref_hidden: torch.Tensor,
    ref_weight: torch.Tensor,
    *,
    mask: Optional[torch.Tensor] = None,
    temperature: float = 1.0,
    direction: str = "forward",
    softcap: Optional[float] = None,
    bias: Optional[torch.Tensor] = None,
    ref_bias: Optional[torch.Tensor] = None,
    backend: str = "auto",
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    vocab_start: Optional[int] = None,
    vocab_size: Optional[int] = None,
    group=None,
) -> torch.Tensor:
    """Exact per-token KL between the policy head and the reference head, over the whole vocabulary.

    hidden: (…, H), weight: (V, H), bias: (V,) or None; ref_hidden: (…, H_ref), ref_weight: (V, H_ref),
    ref_bias: (V,) or None (same V; H_ref may differ); mask: (…) bool or None.
    Returns (…) float32, 0 where `mask` is False.
    Equivalent to `fusealign.kernels.reference.linear_kl_reference`; never materialises (N, V).
    The reference side is a constant: it must not require grad (pass `.detach()`).
    `temperature` (and `softcap`) apply to both heads, as they do to two checkpoints of one model.
    Memory: peak extra memory of forward + backward ≤ 1.25 × `chunk_bytes` + O(N·H + V·H), as for
    `linear_logps` (both heads' logit tiles count against `chunk_bytes`).
    Vocabulary-parallel heads (see `linear_logps` and vocab_parallel.py): both weights DTensors with the same
    Shard(0) split, or this rank's rows of both with `vocab_start=`, `group=` (and `vocab_size=`).
    """
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    if vp.is_dtensor(weight) != vp.is_dtensor(ref_weight):
        raise ValueError("weight and ref_weight must both be vocabulary-sharded DTensors, or neither")
    weight, bias, shard = vp.shard_of(weight, bias, vocab_start, vocab_size, group)
    if shard is not None:
        ref_weight, ref_bias, ref_shard = vp.shard_of(ref_weight, ref_bias, vocab_start, shard.vocab_size, group,
                                                      name="ref_weight")
        if (ref_shard.start, ref_shard.size) != (shard.start, shard.size):
            raise ValueError("weight and ref_weight must be sharded over the vocabulary the same way")
    H, V = check_linear_head(hidden, weight, None, bias, temperature, softcap, allow_empty=shard is not None)
    check_linear_head(ref_hidden, ref_weight, None, ref_bias, temperature, softcap,
                      names=("ref_hidden", "ref_weight", "", "ref_bias"), allow_empty=shard is not None)
    if ref_weight.shape[0] != V:
        raise ValueError(f"ref_weight has V={ref_weight.shape[0]} but weight has V={V}; the vocabularies must match")
    if tuple(ref_hidden.shape[:-1]) != tuple(hidden.shape[:-1]):
        raise ValueError(f"ref_hidden leading shape {tuple(ref_hidden.shape[:-1])} must equal hidden's "
                         f"{tuple(hidden.shape[:-1])}")
    if ref_hidden.device != hidden.device:
        raise ValueError(f"ref_hidden is on {ref_hidden.device} but hidden is on {hidden.device}")
    if torch.is_grad_enabled():
        for name, t in (("ref_hidden", ref_hidden), ("ref_weight", ref_weight), ("ref_bias", ref_bias)):
            if t is not None and t.requires_grad:
                raise ValueError(f"{name} requires grad, but the reference side of linear_kl is a constant; "
                                 f"pass {name}.detach() (or compute it under torch.no_grad())")
    lead = tuple(hidden.shape[:-1])
    if mask is None:
        valid = torch.ones(lead, device=hidden.device, dtype=torch.uint8)
    else:
        if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != lead:
            raise ValueError(f"mask must be a tensor of shape {lead} (hidden's leading shape), got "
                             f"{tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__}")
        valid = (mask != 0).to(torch.uint8)
    opts = HeadOptions.of(temperature=temperature, softcap=softcap, ignore_index=-100, backend=backend,
                          chunk_bytes=chunk_bytes, device=hidden.device)
    h2, hr2 = hidden.reshape(-1, H), ref_hidden.reshape(-1, ref_hidden.shape[-1])
    bias = None if bias is None else bias.contiguous()
    ref_bias = None if ref_bias is None else ref_bias.contiguous()
    valid = valid.reshape(-1).contiguous()
    reverse = direction == "reverse"
    args = (h2, weight, bias, hr2, ref_weight, ref_bias, valid, reverse, opts, shard)
    if needs_grad(hidden, weight, bias):
        kl = LinearKLFunction.apply(*args)
    else:  # nothing saved
        kl = _forward(*args)[0]
    return kl.view(lead)
