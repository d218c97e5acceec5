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
one forward chunk): the forward keeps that tile and the backward turns it into ∂r in place (3 GEMMs
instead of 4; consumed by the first backward, so a second one, under `retain_graph=True`, recomputes). Memory bound: every (chunk, V) buffer alive at once — the backward's gradient tile and, on the
torch backend, its logit temporaries — fits `chunk_bytes` together; peak extra memory of forward +
backward is ≤ 1.25 × chunk_bytes (allocator slack) + O(N·H + V·H) (the gradients, and an fp32 ∂W
accumulator for low-precision weights when the backward needs more than one chunk).
Tested in tests/kernels/test_linear_logps_memory.py.

Backends: "triton" (fused kernels, linear_logps_triton.py), "torch" (chunked PyTorch,
linear_logps_torch.py), "auto" (triton for CUDA tensors, torch otherwise). Both share the backward
driver in head_backward.py: the backend writes ∂r for a chunk, cuBLAS/BLAS does the two matmuls.

No host synchronisation: nothing reads a tensor value on the host (chunking depends on shapes only;
the target-range check is a device-side assert on CUDA).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from . import linear_logps_torch as _torch_impl
from .checks import check_chunk_bytes, check_linear_head, check_target_range
from .chunked import head_weight
from .head_backward import dz_dtype, head_backward

DEFAULT_CHUNK_BYTES = 256 * 2**20
BACKENDS = ("auto", "triton", "torch")
# Per-token outputs `linear_logps(outputs=...)` can return; the last three are forward-only statistics.
OUTPUTS = ("logps", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
STAT_OUTPUTS = OUTPUTS[2:]


@dataclass(frozen=True)
class HeadOptions:
    """Everything about a fused-head call that is not a tensor."""

    temperature: float = 1.0
    softcap: Optional[float] = None
    ignore_index: int = -100
    backend: str = "torch"  # resolved: "triton" or "torch"
    chunk_bytes: int = DEFAULT_CHUNK_BYTES


def resolve_backend(backend: str, device: torch.device) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if device.type == "cuda" else "torch"
    if backend == "triton" and device.type != "cuda":
        from .linear_logps_triton import interpreting

        if not interpreting():
            raise ValueError(
                "backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 for the CPU interpreter); "
                "use backend='torch' or 'auto' for CPU tensors"
            )
    return backend


def _impl(opts: HeadOptions):
    if opts.backend == "triton":
        from . import linear_logps_triton

        return linear_logps_triton
    return _torch_impl


def logps_forward(hidden, weight, bias, targets, opts: HeadOptions, extra: bool = False, entropy: bool = True,
                  keep: bool = False):
    """hidden: (N, H), targets: (N,) -> (logps, entropy, lse, extras): (N,) fp32 each, and with `extra`
    extras = (log_sum_sq_probs, mean_logits: (N,) fp32, is_top1: (N,) bool), else None. No autograd.
    `entropy=False`: entropy is None (the torch backend then skips its reductions). `keep=True` adds a 5th
    element: the torch backend's (N, V) fp32 final-logit tile when it fitted one chunk, else None."""
    N = hidden.shape[0]
    if N == 0:
        empty = lambda dtype=torch.float32: hidden.new_zeros((0,), dtype=dtype)  # noqa: E731
        out = (empty(), empty() if entropy else None, empty(), ((empty(), empty(), empty(torch.bool)) if extra else None))
        return out + (None,) if keep else out
    kw = dict(temperature=opts.temperature, softcap=opts.softcap, ignore_index=opts.ignore_index,
              chunk_bytes=opts.chunk_bytes, extra=extra)
    if opts.backend == "torch":
        return _torch_impl.logps_fwd(hidden, weight, bias, targets, entropy=entropy, keep=keep, **kw)
    logps, ent, lse, extras = _impl(opts).logps_fwd(hidden, weight, bias, targets, **kw)
    out = (logps, ent if entropy else None, lse, extras)
    return out + (None,) if keep else out


def logps_backward(hidden, weight, bias, targets, lse, entropy, g_logps, g_entropy, opts: HeadOptions,
                   needs=(True, True, True), kept=None):
    """Gradients (dh (N, H), dW (V, H), db (V,)) for upstream g_logps / g_entropy: (N,) fp32 or None.
    `kept`: the torch backend's Kept tile from the forward (the (N, V) fp32 final logits, or their exponentials
    for log-probs without softcap), turned into ∂r in place (consumed)."""
    N = hidden.shape[0]
    if g_logps is None and g_entropy is None:
        needs = (False, False, False)
    g_logps = hidden.new_zeros(N, dtype=torch.float32) if g_logps is None else g_logps.reshape(N).float().contiguous()
    if g_entropy is not None:
        g_entropy = g_entropy.reshape(N).float().contiguous()
    impl = _impl(opts)
    on_torch = opts.backend == "torch"
    # The torch backend's chunk matmuls and the ∂h GEMM share one fp32 weight (one upcast per call on the CPU).
    w_dz = head_weight(weight) if on_torch else weight
    extra_kw = dict(logits_in_dz=kept is not None) if on_torch else {}
    shift = None if kept is None else kept.shift  # set when the kept tile holds exp(z − shift)

    def write_dz(rows, dz):
        impl.logps_bwd_dz(
            hidden[rows], w_dz, bias, targets[rows], lse[rows],
            None if g_entropy is None else entropy[rows],
            g_logps[rows], None if g_entropy is None else g_entropy[rows], dz,
            temperature=opts.temperature, softcap=opts.softcap, ignore_index=opts.ignore_index, **extra_kw,
            **({} if shift is None else dict(exp_shift=shift[rows])),
        )

    temp = impl.bwd_bytes_per_logit if on_torch else impl.BWD_BYTES_PER_LOGIT
    return head_backward(hidden, weight, bias, targets == opts.ignore_index, write_dz,
                         chunk_bytes=opts.chunk_bytes, temp_bytes_per_logit=temp, needs=needs,
                         weight_work=w_dz if on_torch else None, dz_buffer=None if kept is None else kept.tile)


def keeps_tile(hidden, opts: HeadOptions) -> bool:
    """Whether a forward may keep its logit tile for the backward: the torch backend with an fp32 ∂r buffer
    (the tile becomes that buffer); partial_stats then keeps it only if all rows fitted one chunk."""
    return opts.backend == "torch" and dz_dtype(hidden) == torch.float32


class LinearLogpsFunction(torch.autograd.Function):
    """Autograd over flattened inputs: hidden (N, H), weight (V, H), bias (V,)|None, targets (N,).

    Returns logps, entropy (differentiable; None with `entropy=False`) and, with `extra`, log_sum_sq_probs,
    mean_logits, is_top1 (non-differentiable), else three None. On the torch backend the forward's logit tile
    is kept for the backward when it fits `chunk_bytes` (`ctx.kept`, see logps_backward)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, opts: HeadOptions, extra: bool = False, entropy: bool = True):
        keep = keeps_tile(hidden, opts)
        out = logps_forward(hidden, weight, bias, targets, opts, extra, entropy, keep=keep)
        (logps, entropy, lse, extras), kept = out[:4], (out[4] if keep else None)
        ctx.save_for_backward(hidden, weight, bias, targets, lse, entropy)
        ctx.kept = kept  # an intermediate, not an input or output: a plain attribute
        ctx.opts = opts
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
                                    ctx.opts, needs=ctx.needs_input_grad[:3], kept=kept)
        return dh, dW, db, None, None, None, None


def check_outputs(outputs, return_entropy: bool) -> tuple:
    """The requested outputs as a tuple of names from OUTPUTS (no duplicates)."""
    if outputs is None:
        return ("logps", "entropy") if return_entropy else ("logps",)
    if return_entropy:
        raise ValueError("give either return_entropy=True or outputs=(…, 'entropy'), not both")
    if isinstance(outputs, str):
        raise TypeError(f"outputs must be a tuple of names from {OUTPUTS}, got the string {outputs!r}")
    outputs = tuple(outputs)
    unknown = [o for o in outputs if o not in OUTPUTS]
    if unknown or not outputs or len(set(outputs)) != len(outputs):
        raise ValueError(f"outputs must be distinct names from {OUTPUTS}, got {outputs!r}")
    return outputs


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
    vp = None
    from .vocab_parallel import explicit_shard, is_dtensor, local_bias, shard_from_dtensor

    if is_dtensor(weight):
        weight, vp = shard_from_dtensor(weight)
        bias = local_bias(bias, vp)
    elif group is not None or vocab_start is not None:
        vp = explicit_shard(weight, vocab_start, vocab_size, group)
        bias = local_bias(bias, vp)
    H, V = check_linear_head(hidden, weight, targets, bias, temperature, softcap)
    check_chunk_bytes(chunk_bytes)
    names = check_outputs(outputs, return_entropy)
    extra = any(n in STAT_OUTPUTS for n in names)
    want_entropy = "entropy" in names  # otherwise the torch backend skips the entropy reductions
    opts = HeadOptions(float(temperature), None if softcap is None else float(softcap), int(ignore_index),
                       resolve_backend(backend, hidden.device), chunk_bytes)
    check_target_range(targets, V if vp is None else vp.vocab_size, ignore_index)
    shape = targets.shape
    if bias is not None:
        bias = bias.contiguous()  # the kernels index the bias with unit stride
    h2 = hidden.reshape(-1, H)  # (N, H)
    y = targets.reshape(-1).contiguous()  # (N,)
    needs_grad = torch.is_grad_enabled() and (
        hidden.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
    )
    if vp is not None:
        from .vocab_parallel import vocab_parallel_logps

        per_token = vocab_parallel_logps(h2, weight, bias, y, vp, opts, extra, want_entropy)
    elif needs_grad:
        per_token = LinearLogpsFunction.apply(h2, weight, bias, y, opts, extra, want_entropy)
    else:  # no-grad fast path: nothing saved
        logps, entropy, _, extras = logps_forward(h2, weight, bias, y, opts, extra, want_entropy)
        per_token = (logps, entropy) + (extras or (None, None, None))
    by_name = dict(zip(OUTPUTS, per_token))
    result = tuple(by_name[n].view(shape) for n in names)
    if outputs is None and not return_entropy:
        return result[0]
    return result
