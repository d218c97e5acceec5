"""Chunked backward of a linear head, shared by every fused op: given ∂L/∂r per chunk, do the GEMMs.

For raw logits r = h Wᵀ + b and any loss whose logit gradient ∂r a backend can write for a token
chunk (recomputing the logits it needs), the parameter gradients are
    ∂h[chunk] = ∂r W,    ∂W = Σ_chunks ∂rᵀ h[chunk],    ∂b = Σ_chunks Σ_rows ∂r.
Memory: the (chunk, V) ∂r buffer and the backend's own (chunk, V) temporaries together stay within
`chunk_bytes` (the chunk's rows are chosen so); besides that, O(N·H + V·H): the returned gradients.
On CUDA ∂r is kept in the input dtype so both GEMMs run on tensor cores (fp32 accumulation inside each
GEMM) — bf16 for fp16 inputs, whose range would flush small gradients to 0 (`dz_dtype_of`); on the CPU
everything is fp32. A low-precision backward that needs more than one chunk slices the
vocabulary instead of the tokens when the backend's writer takes a column slice (blocked.py: no (V, H)
fp32 buffer, an (N, H) fp32 ∂h accumulator); without one, ∂W accumulates in an fp32 (V, H) buffer,
added to in blocks that bound the temporary by `chunk_bytes`.

The ∂r buffer is the backend's workspace (issue 23): the torch backend forms its logits in it and turns
them into ∂r in place (its temporaries: `temp_bytes_per_logit` of the buffer's dtype, 0 for fp32), so the
buffer is allocated once per call and nothing is copied into it. A caller that kept the forward's logit
tile passes it as `dz_buffer` (the whole batch, one chunk): the backend turns it into ∂r in place and the
backward does 2 GEMMs, not 3.

Precision switches (issue 30), decided per GEMM:
  * ∂h = ∂r W reduces over the vocabulary (K = V): always fp32 reductions (an fp32 output, blocked.mm_vocab_to),
    whatever `allow_bf16/fp16_reduced_precision_reduction` say — that error would grow with V.
  * ∂W = ∂rᵀ h reduces over one chunk's tokens: it follows PyTorch's global switches, as every other GEMM of
    the model does; forcing an fp32 output there would cost a (V, H) fp32 write and read per chunk.
  * fp32 inputs: both GEMMs follow `torch.backends.cuda.matmul.allow_tf32` / `set_float32_matmul_precision`:
    a model that asks for TF32 gets TF32 gradients here too (inputs rounded to 10 bits, fp32 accumulation).
    The forward's log-probs do not depend on it: the Triton kernels' fp32 dots are IEEE (tiles.dot_precision).
  The GPU suite's first stage measures ∂h and ∂W against float64 with each switch on and off
  (tests/kernels/test_gpu_hazards.py).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from .blocked import addmm_f32_, mm_vocab_to, takes_cols, vocab_sliced_backward
from .chunked import autocast_off, chunk_rows


def dz_dtype_of(dtype: torch.dtype, device_type: str) -> torch.dtype:
    """The dtype of ∂r and of the backward GEMMs' operands for inputs of `dtype` on `device_type`.

    CUDA: the input's, so both GEMMs run on tensor cores — except fp16, whose range ends at 6e-8 (subnormal):
    a token-mean loss over 64k tokens (g ≈ 1.5e-5) would flush g·p to 0 for every p below ~4e-3 and lose
    the precision of far more (issue 30). bf16 keeps fp32's exponent range at the same speed, for one bf16 copy
    of the fp16 weight (V·H·2 bytes, inside the O(V·H) term of the bound). CPU: fp32 (its BLAS is fp32)."""
    if device_type != "cuda":
        return torch.float32
    return torch.bfloat16 if dtype == torch.float16 else dtype


def dz_dtype(hidden: torch.Tensor) -> torch.dtype:
    """The ∂r buffer's dtype for these inputs (`dz_dtype_of`)."""
    return dz_dtype_of(hidden.dtype, hidden.device.type)


def keeps_tile(hidden: torch.Tensor, opts) -> bool:
    """Whether an op's forward may keep its logit tile(s) for the backward (`opts`: a HeadOptions): the torch
    backend with an fp32 ∂r buffer (the kept tile becomes that buffer); the backend then keeps it only if all
    rows fitted one chunk."""
    return opts.backend == "torch" and dz_dtype(hidden) == torch.float32


@autocast_off
def head_backward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    row_ignored: torch.Tensor,
    write_dz: Callable[[slice, torch.Tensor], None],
    *,
    chunk_bytes: int,
    temp_bytes_per_logit=0,
    needs=(True, True, True),
    sliced: Optional[bool] = None,
    weight_work: Optional[torch.Tensor] = None,
    dz_buffer: Optional[torch.Tensor] = None,
    work_dtype: Optional[torch.dtype] = None,
):
    """hidden: (N, H), weight: (V, H), bias: (V,)|None, row_ignored: (N,) bool.

    `write_dz(rows, dz)` fills `dz: (n, V)` with ∂L/∂r for `hidden[rows]` (zeros on ignored rows),
    holding `temp_bytes_per_logit` bytes of its own (n, V) temporaries while it runs (an int, or a
    function of the ∂r buffer's dtype); a writer with a `cols` parameter, `write_dz(rows, dz, cols)`,
    fills `dz: (n, cols)` for a vocabulary slice.
    `sliced`: take the vocabulary-sliced path (blocked.py) — None: for a low-precision multi-chunk ∂W
    with a slice-capable writer; True/False force it (tests run it on the CPU in fp32).
    `weight_work`: the weight already in the work dtype (fp32 on the CPU) when the caller has it, so that it
    is not upcast twice. `dz_buffer`: an (N, V) buffer of the work dtype to use as the one chunk's ∂r buffer
    (the forward's kept logits: `write_dz` knows what it holds); it is one chunk, so never sliced.
    `work_dtype`: the dtype of ∂r and the GEMM operands, default `dz_dtype` (tests pass CUDA's on the CPU).
    Returns (dh (N, H) | None, dW (V, H) | None, db (V,) | None) per `needs`.
    """
    N, H = hidden.shape
    V = weight.shape[0]
    want_h, want_w, want_b = needs[0], needs[1], needs[2] and bias is not None
    db = torch.zeros_like(bias) if want_b else None
    if N == 0 or V == 0 or not (want_h or want_w or want_b):  # V = 0: an empty vocabulary shard
        return (torch.zeros_like(hidden) if want_h else None), (torch.zeros_like(weight) if want_w else None), db
    dev = hidden.device
    work_dtype = work_dtype or dz_dtype(hidden)
    dz_bytes = torch.empty((), dtype=work_dtype).element_size()
    temp = temp_bytes_per_logit(work_dtype) if callable(temp_bytes_per_logit) else temp_bytes_per_logit
    if dz_buffer is not None and (tuple(dz_buffer.shape) != (N, V) or dz_buffer.dtype != work_dtype):
        raise ValueError(f"dz_buffer must be ({N}, {V}) {work_dtype}, got {tuple(dz_buffer.shape)} {dz_buffer.dtype}")
    step = N if dz_buffer is not None else chunk_rows(N, V, chunk_bytes, dz_bytes + temp)
    single = step >= N
    if sliced is None:
        sliced = want_w and not single and work_dtype != torch.float32 and takes_cols(write_dz)
    if sliced and dz_buffer is None:
        dh = torch.zeros_like(hidden) if want_h else None
        dW = torch.zeros_like(weight) if want_w else None
        return vocab_sliced_backward(hidden, weight, bias, row_ignored, write_dz, dh, dW, db, chunk_bytes=chunk_bytes,
                                     temp_bytes_per_logit=temp, work_dtype=work_dtype)
    if weight_work is not None and weight_work.dtype == work_dtype:
        W_work = weight_work
    else:
        W_work = weight if weight.dtype == work_dtype else weight.to(work_dtype)  # (V, H), CPU only
    # Every row of ∂h is written below, and ∂W too when one chunk covers N: no zero-fill pass (a (V, H) fill
    # costs as much as a slab epilogue on the CPU).
    dh = torch.empty_like(hidden) if want_h else None
    dW = (torch.empty_like(weight) if single else torch.zeros_like(weight)) if want_w else None
    dz = dz_buffer if dz_buffer is not None else torch.empty((min(step, N), V), device=dev, dtype=work_dtype)
    # ∂W sums over every token: one GEMM when a single chunk covers N; else accumulate in fp32 —
    # in dW itself when the weight is fp32, else in an fp32 (V, H) buffer.
    dW32 = None
    if want_w and not single:
        dW32 = dW if dW.dtype == torch.float32 else torch.zeros((V, H), device=dev, dtype=torch.float32)
    db32 = torch.zeros(V, device=dev, dtype=torch.float32) if want_b else None
    for start in range(0, N, step):
        rows = slice(start, min(N, start + step))
        h_c = hidden[rows]
        dz_c = dz[: h_c.shape[0]]
        write_dz(rows, dz_c)
        if want_h:
            # fp32: straight into ∂h, no (chunk, H) temporary; low precision: fp32 reductions over K = V
            mm_vocab_to(dh[rows], dz_c, W_work)
        if want_w:
            # Ignored rows have ∂r = 0, but 0 · NaN = NaN: zero their (possibly garbage) hidden states
            # so they contribute exactly nothing. (chunk, H) extra traffic, negligible next to the GEMM.
            h_work = h_c.masked_fill(row_ignored[rows].unsqueeze(1), 0).to(work_dtype)
            if single and dW.dtype == work_dtype:
                torch.mm(dz_c.T, h_work, out=dW)
            elif single:
                dW.copy_(dz_c.T @ h_work)
            elif dW32.dtype == work_dtype:
                dW32.addmm_(dz_c.T, h_work)
            else:  # no (V, H) fp32 temporary per chunk: blocks of ≤ chunk_bytes (issue 30)
                addmm_f32_(dW32, dz_c.T, h_work, chunk_bytes)
        if want_b:
            db32 += dz_c.sum(0, dtype=torch.float32)
    if dW32 is not None and dW32 is not dW:
        dW.copy_(dW32)
    if want_b:
        db.copy_(db32)
    return dh, dW, db
