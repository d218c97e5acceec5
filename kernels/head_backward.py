"""Chunked backward of a linear head, shared by every fused op: given ∂L/∂r per chunk, do the GEMMs.

For raw logits r = h Wᵀ + b and any loss whose logit gradient ∂r a backend can write for a token
chunk (recomputing the logits it needs), the parameter gradients are
    ∂h[chunk] = ∂r W,    ∂W = Σ_chunks ∂rᵀ h[chunk],    ∂b = Σ_chunks Σ_rows ∂r.
Memory: the (chunk, V) ∂r buffer and the backend's own (chunk, V) temporaries together stay within
`chunk_bytes` (the chunk's rows are chosen so); besides that, O(N·H + V·H): the returned gradients.
On CUDA ∂r is kept in the input dtype so both GEMMs run on tensor cores (fp32 accumulation inside each
GEMM); on the CPU everything is fp32. A low-precision backward that needs more than one chunk slices the
vocabulary instead of the tokens when the backend's writer takes a column slice (blocked.py: no (V, H)
fp32 buffer, an (N, H) fp32 ∂h accumulator); without one, ∂W accumulates in an fp32 (V, H) buffer,
added to in blocks that bound the temporary by `chunk_bytes`.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from .blocked import addmm_f32_, takes_cols, vocab_sliced_backward
from .chunked import autocast_off, chunk_rows


@autocast_off
def head_backward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    row_ignored: torch.Tensor,
    write_dz: Callable[[slice, torch.Tensor], None],
    *,
    chunk_bytes: int,
    temp_bytes_per_logit: int = 0,
    needs=(True, True, True),
    sliced: Optional[bool] = None,
):
    """hidden: (N, H), weight: (V, H), bias: (V,)|None, row_ignored: (N,) bool.

    `write_dz(rows, dz)` fills `dz: (n, V)` with ∂L/∂r for `hidden[rows]` (zeros on ignored rows),
    holding `temp_bytes_per_logit` bytes of its own (n, V) temporaries while it runs; a writer with a
    `cols` parameter, `write_dz(rows, dz, cols)`, fills `dz: (n, cols)` for a vocabulary slice.
    `sliced`: take the vocabulary-sliced path (blocked.py) — None: for a low-precision multi-chunk ∂W
    with a slice-capable writer; True/False force it (tests run it on the CPU in fp32).
    Returns (dh (N, H) | None, dW (V, H) | None, db (V,) | None) per `needs`.
    """
    N, H = hidden.shape
    V = weight.shape[0]
    want_h, want_w, want_b = needs[0], needs[1], needs[2] and bias is not None
    dh = torch.zeros_like(hidden) if want_h else None
    dW = torch.zeros_like(weight) if want_w else None
    db = torch.zeros_like(bias) if want_b else None
    if N == 0 or not (want_h or want_w or want_b):
        return dh, dW, db
    dev = hidden.device
    work_dtype = hidden.dtype if hidden.is_cuda else torch.float32
    W_work = weight if weight.dtype == work_dtype else weight.to(work_dtype)  # (V, H), CPU only
    dz_bytes = torch.empty((), dtype=work_dtype).element_size()
    step = chunk_rows(N, V, chunk_bytes, dz_bytes + temp_bytes_per_logit)
    single = step >= N
    if sliced is None:
        sliced = want_w and not single and work_dtype != torch.float32 and takes_cols(write_dz)
    if sliced:
        return vocab_sliced_backward(hidden, weight, bias, row_ignored, write_dz, dh, dW, db, chunk_bytes=chunk_bytes,
                                     temp_bytes_per_logit=temp_bytes_per_logit, work_dtype=work_dtype)
    dz = torch.empty((step, V), device=dev, dtype=work_dtype)
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
            dh[rows] = dz_c @ W_work
        if want_w:
            # Ignored rows have ∂r = 0, but 0 · NaN = NaN: zero their (possibly garbage) hidden states
            # so they contribute exactly nothing. (chunk, H) extra traffic, negligible next to the GEMM.
            h_work = h_c.masked_fill(row_ignored[rows].unsqueeze(1), 0).to(work_dtype)
            if single:
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
