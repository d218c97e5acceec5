"""`linear_kl`: exact per-token KL over the whole vocabulary between a policy head and a reference head.

Math (token t; z = policy logits, z_ref = reference logits, both softcap(h Wᵀ)/T; p, q their softmaxes):
    direction="forward":  KL(π‖π_ref) = Σ_v p_v (log p_v − log q_v)
    direction="reverse":  KL(π_ref‖π) = Σ_v q_v (log q_v − log p_v)
    ∂KL_fwd/∂z_v = p_v (log p_v − log q_v − KL),   ∂KL_rev/∂z_v = p_v − q_v
Gradients flow to the policy side only (`hidden`, `weight`); the reference is a constant.
Saved for backward: inputs (no copies) and per-token lse, lse_ref, KL — O(N). Both logit tiles are
recomputed in backward; no (N, V) tensor exists (see linear_kl_triton.py / linear_kl_torch.py) — except
on the torch backend when both heads' fp32 logits for the whole batch fit `chunk_bytes` (2·N·V·4 bytes,
one forward chunk): the forward keeps the two tiles and the backward forms ∂r from them in place (no
logit GEMM; consumed by the first backward, a second one under `retain_graph=True` recomputes).
The reference head may be wider (distillation): ref_weight is (V, H_ref) with H_ref ≠ H allowed. Each
head may carry a bias; gradients reach the policy's bias too.
"""

from __future__ import annotations

from typing import Optional

import torch

from . import linear_kl_torch as _torch_impl
from .checks import check_chunk_bytes, check_linear_head
from .chunked import head_weight
from .head_backward import head_backward
from .linear_logps import DEFAULT_CHUNK_BYTES, HeadOptions, keeps_tile, resolve_backend

DIRECTIONS = ("forward", "reverse")


def _impl(backend: str):
    if backend == "triton":
        from . import linear_kl_triton

        return linear_kl_triton
    return _torch_impl


def _forward(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, valid, reverse, opts: HeadOptions,
             keep: bool = False):
    """-> kl, lse (policy), lse_ref: (N,) fp32; with `keep` (torch backend) a 4th element, the kept
    (policy, reference) final-logit tiles when both fitted one chunk, else None."""
    if hidden.shape[0] == 0:
        e = hidden.new_zeros((0,), dtype=torch.float32)
        return (e, e.clone(), e.clone()) + ((None,) if keep else ())
    kw = dict(temperature=opts.temperature, softcap=opts.softcap, chunk_bytes=opts.chunk_bytes)
    impl = _impl(opts.backend)
    if keep:
        kw["keep"] = True
    if reverse:  # KL(Q‖P): A = reference, B = policy
        out = impl.kl_fwd(ref_hidden, ref_weight, hidden, weight, valid, bias_a=ref_bias, bias_b=bias, **kw)
        kl, lse_ref, lse = out[:3]
        tiles = out[3][::-1] if keep and out[3] is not None else None
    else:
        out = impl.kl_fwd(hidden, weight, ref_hidden, ref_weight, valid, bias_a=bias, bias_b=ref_bias, **kw)
        kl, lse, lse_ref = out[:3]
        tiles = out[3] if keep else None
    return (kl, lse, lse_ref) + ((tiles,) if keep else ())


class LinearKLFunction(torch.autograd.Function):
    """Autograd over flattened inputs: hidden (N, H), weight (V, H), bias (V,)|None, ref_hidden (N, H_ref),
    ref_weight (V, H_ref), ref_bias (V,)|None, valid (N,) uint8."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, ref_hidden, ref_weight, ref_bias, valid, reverse: bool, opts: HeadOptions):
        keep = keeps_tile(hidden, opts)
        out = _forward(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, valid, reverse, opts, keep=keep)
        kl, lse, lse_ref = out[:3]
        ctx.save_for_backward(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, valid, lse, lse_ref, kl)
        ctx.kept = out[3] if keep else None  # (policy, reference) tiles: intermediates, plain attributes
        ctx.reverse, ctx.opts = reverse, opts
        ctx.set_materialize_grads(False)
        return kl

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        hidden, weight, bias, ref_hidden, ref_weight, ref_bias, valid, lse, lse_ref, kl = ctx.saved_tensors
        needs = ctx.needs_input_grad[:3] if g is not None else (False, False, False)
        g = None if g is None else g.reshape(-1).float().contiguous()
        opts, impl = ctx.opts, _impl(ctx.opts.backend)
        kept = None
        if g is not None:  # ∂r overwrites the policy's kept tile: a second backward (retain_graph) recomputes
            kept, ctx.kept = ctx.kept, None
        dh, dW, db = kl_backward(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, valid, lse, lse_ref, kl, g,
                                 ctx.reverse, opts, impl, needs, kept)
        return dh, dW, db, None, None, None, None, None, None


def kl_backward(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, valid, lse, lse_ref, kl, g, reverse,
                opts: HeadOptions, impl, needs, kept=None):
    """(dh, dW, db) of Σ g·KL through head_backward; `kept`: the torch backend's (policy, reference) tiles."""
    if opts.backend != "torch":
        def write_dz(rows, dz):
            impl.kl_bwd_dz(hidden[rows], weight, bias, ref_hidden[rows], ref_weight, ref_bias, valid[rows],
                           lse[rows], lse_ref[rows], kl[rows], g[rows], dz, reverse=reverse,
                           temperature=opts.temperature, softcap=opts.softcap)

        return head_backward(hidden, weight, bias, valid == 0, write_dz, chunk_bytes=opts.chunk_bytes,
                             temp_bytes_per_logit=impl.BWD_BYTES_PER_LOGIT, needs=needs)
    # torch backend: both weights upcast once per call; the reference's logits in one workspace for all chunks
    # (or the kept tile); the policy's in head_backward's ∂r buffer (or the kept tile, as that buffer).
    w, w_ref = head_weight(weight), head_weight(ref_weight)
    ref_ws = [None if kept is None else kept[1]]

    def write_dz(rows, dz):
        if ref_ws[0] is None:  # the first chunk is the largest
            ref_ws[0] = torch.empty(dz.shape, device=dz.device, dtype=torch.float32)
        impl.kl_bwd_dz(hidden[rows], w, bias, ref_hidden[rows], w_ref, ref_bias, valid[rows], lse[rows],
                       lse_ref[rows], kl[rows], g[rows], dz, reverse=reverse, temperature=opts.temperature,
                       softcap=opts.softcap, logits_in_dz=kept is not None, ref_logits=ref_ws[0])

    return head_backward(hidden, weight, bias, valid == 0, write_dz, chunk_bytes=opts.chunk_bytes,
                         temp_bytes_per_logit=impl.bwd_bytes_per_logit, needs=needs, weight_work=w,
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
    from .vocab_parallel import explicit_shard, is_dtensor, local_bias, shard_from_dtensor

    vp = None
    if is_dtensor(weight) or is_dtensor(ref_weight):
        if not (is_dtensor(weight) and is_dtensor(ref_weight)):
            raise ValueError("weight and ref_weight must both be vocabulary-sharded DTensors, or neither")
        weight, vp = shard_from_dtensor(weight)
        ref_weight, ref_vp = shard_from_dtensor(ref_weight, "ref_weight")
        if (ref_vp.start, ref_vp.size) != (vp.start, vp.size):
            raise ValueError("weight and ref_weight must be sharded over the vocabulary the same way")
        bias, ref_bias = local_bias(bias, vp), local_bias(ref_bias, vp)
    elif group is not None or vocab_start is not None:
        vp = explicit_shard(weight, vocab_start, vocab_size, group)
        bias, ref_bias = local_bias(bias, vp), local_bias(ref_bias, vp)
    H, V = check_linear_head(hidden, weight, None, bias, temperature, softcap)
    check_linear_head(ref_hidden, ref_weight, None, ref_bias, temperature, softcap,
                      names=("ref_hidden", "ref_weight", "", "ref_bias"))
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
    check_chunk_bytes(chunk_bytes)
    opts = HeadOptions(float(temperature), None if softcap is None else float(softcap), -100,
                       resolve_backend(backend, hidden.device), chunk_bytes)
    h2, hr2 = hidden.reshape(-1, H), ref_hidden.reshape(-1, ref_hidden.shape[-1])
    bias = None if bias is None else bias.contiguous()
    ref_bias = None if ref_bias is None else ref_bias.contiguous()
    valid = valid.reshape(-1).contiguous()
    reverse = direction == "reverse"
    grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad
                                        or (bias is not None and bias.requires_grad))
    if vp is not None:
        from .vocab_parallel import VocabParallelKLFunction

        args = (h2, weight, bias, hr2, ref_weight, ref_bias, valid, reverse, vp, opts)
        if grad:
            kl = VocabParallelKLFunction.apply(*args)
        else:
            with torch.no_grad():
                kl = VocabParallelKLFunction.apply(*args)
    elif grad:
        kl = LinearKLFunction.apply(h2, weight, bias, hr2, ref_weight, ref_bias, valid, reverse, opts)
    else:
        kl = _forward(h2, weight, bias, hr2, ref_weight, ref_bias, valid, reverse, opts)[0]
    return kl.view(lead)
