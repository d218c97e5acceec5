"""`linear_logps`: per-token log-probs and entropy straight from hidden states and the head weight.

Math (token t, target y_t, final logits z_t = softcap(h_t Wᵀ + b) / T):
    logp_t = z_t[y_t] − lse_t,            entropy_t = −Σ_v p_tv log p_tv
    ∂L/∂z_tv = g_t (1[v = y_t] − p_tv) − e_t p_tv (log p_tv + entropy_t)   (g, e: upstream grads)
    ∂h_t = Σ_v ∂r_tv W_v,   ∂W_v = Σ_t ∂r_tv h_t,   ∂b_v = Σ_t ∂r_tv     (r: raw logits)

Saved for backward: the inputs (no copies) and per-token `lse` and `entropy`, fp32 — O(N).
Recomputed in backward: logits, one bounded token chunk at a time. No (N, V) tensor exists at any
point. Memory bound: every (chunk, V) buffer alive at once — the backward's gradient tile and, on the
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
from .head_backward import head_backward

DEFAULT_CHUNK_BYTES = 256 * 2**20
BACKENDS = ("auto", "triton", "torch")


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


def logps_forward(hidden, weight, bias, targets, opts: HeadOptions):
    """hidden: (N, H), targets: (N,) -> logps, entropy, lse: (N,) fp32. No autograd."""
    N = hidden.shape[0]
    if N == 0:
        empty = hidden.new_zeros((0,), dtype=torch.float32)
        return empty, empty.clone(), empty.clone()
    return _impl(opts).logps_fwd(hidden, weight, bias, targets, temperature=opts.temperature, softcap=opts.softcap,
                                 ignore_index=opts.ignore_index, chunk_bytes=opts.chunk_bytes)


def logps_backward(hidden, weight, bias, targets, lse, entropy, g_logps, g_entropy, opts: HeadOptions,
                   needs=(True, True, True)):
    """Gradients (dh (N, H), dW (V, H), db (V,)) for upstream g_logps / g_entropy: (N,) fp32 or None."""
    N = hidden.shape[0]
    if g_logps is None and g_entropy is None:
        needs = (False, False, False)
    g_logps = hidden.new_zeros(N, dtype=torch.float32) if g_logps is None else g_logps.reshape(N).float().contiguous()
    if g_entropy is not None:
        g_entropy = g_entropy.reshape(N).float().contiguous()
    impl = _impl(opts)

    def write_dz(rows, dz):
        impl.logps_bwd_dz(
            hidden[rows], weight, bias, targets[rows], lse[rows],
            None if g_entropy is None else entropy[rows],
            g_logps[rows], None if g_entropy is None else g_entropy[rows], dz,
            temperature=opts.temperature, softcap=opts.softcap, ignore_index=opts.ignore_index,
        )

    return head_backward(hidden, weight, bias, targets == opts.ignore_index, write_dz,
                         chunk_bytes=opts.chunk_bytes, temp_bytes_per_logit=impl.BWD_BYTES_PER_LOGIT, needs=needs)


class LinearLogpsFunction(torch.autograd.Function):
    """Autograd over flattened inputs: hidden (N, H), weight (V, H), bias (V,)|None, targets (N,)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, opts: HeadOptions):
        logps, entropy, lse = logps_forward(hidden, weight, bias, targets, opts)
        ctx.save_for_backward(hidden, weight, bias, targets, lse, entropy)
        ctx.opts = opts
        ctx.set_materialize_grads(False)
        return logps, entropy

    @staticmethod
    @torch.autograd.function.once_differentiable  # double backward would silently miss the softmax terms
    def backward(ctx, g_logps, g_entropy):
        hidden, weight, bias, targets, lse, entropy = ctx.saved_tensors
        dh, dW, db = logps_backward(hidden, weight, bias, targets, lse, entropy, g_logps, g_entropy,
                                    ctx.opts, needs=ctx.needs_input_grad[:3])
        return dh, dW, db, None, None


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
    backend: str = "auto",
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
):
    """Per-token log-probs (and entropy) of `targets` under the head `softcap(hidden Wᵀ + b) / T`.

    hidden: (…, H) fp32/bf16/fp16, weight: (V, H) same dtype, bias: (V,) or None,
    targets: (…) int64/int32, the leading shape of `hidden`.
    Returns logps: (…) float32, and with `return_entropy=True` also entropy: (…) float32;
    both exactly 0 where `targets == ignore_index`.

    Equivalent to `fusealign.kernels.reference.linear_logps_reference` without materialising the
    (N, V) logits: logits are formed and reduced in fp32 whatever the input dtype; gradients flow to
    `hidden`, `weight` and `bias` through both outputs; ∂W accumulates in fp32 and is returned in
    the weight's dtype. Under `torch.no_grad()` nothing is saved.
    Memory: peak extra memory of forward + backward ≤ 1.25 × `chunk_bytes` + O(N·H + V·H) on both
    backends: every (chunk, V) buffer (the backward's ∂logits tile, the torch backend's fp32 logit
    temporaries) fits `chunk_bytes` together; the rest is the gradients themselves.
    """
    H, V = check_linear_head(hidden, weight, targets, bias, temperature, softcap)
    check_chunk_bytes(chunk_bytes)
    opts = HeadOptions(float(temperature), None if softcap is None else float(softcap), int(ignore_index),
                       resolve_backend(backend, hidden.device), chunk_bytes)
    check_target_range(targets, V, ignore_index)
    shape = targets.shape
    if bias is not None:
        bias = bias.contiguous()  # the kernels index the bias with unit stride
    h2 = hidden.reshape(-1, H)  # (N, H)
    y = targets.reshape(-1).contiguous()  # (N,)
    needs_grad = torch.is_grad_enabled() and (
        hidden.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
    )
    if needs_grad:
        logps, entropy = LinearLogpsFunction.apply(h2, weight, bias, y, opts)
    else:  # no-grad fast path: nothing saved
        logps, entropy, _ = logps_forward(h2, weight, bias, y, opts)
    logps = logps.view(shape)
    if return_entropy:
        return logps, entropy.view(shape)
    return logps
