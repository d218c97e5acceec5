"""The low-precision multi-chunk backward without a (V, H) fp32 ∂W buffer: vocabulary-sliced GEMMs.

For raw logits r = h Wᵀ + b and ∂r written by a backend for any (rows, columns) block:
    ∂W[cols] = ∂r[:, cols]ᵀ h              one cuBLAS GEMM per vocabulary slice, K = all N tokens,
                                            fp32 accumulation inside cuBLAS, written once in W's dtype
    ∂h       = Σ_slices ∂r[:, cols] W[cols] fp32 (N, H) accumulator, one rounding at the end
    ∂b[cols] = Σ_rows ∂r[:, cols]
The token-chunked loop (head_backward.py) needs ∂W summed over token chunks: in bf16/fp16 that was an fp32
(V, H) accumulator (2.1 GB at V = 128,256, H = 4,096) plus, per chunk, a fresh (V, H) fp32 product from
`mm_f32` (another 2.1 GB; 8 GiB at V = 262,144, H = 8,192 — issue 30). Slicing the vocabulary instead
swaps what is accumulated: ∂h, (N, H) — 8× smaller at N = 16,384, V = 128,256 — and lets cuBLAS
accumulate each ∂W slice over all tokens in one GEMM. ∂r is written once per block in the input dtype and
read once by each GEMM (and the bias sum).
Block shape (`slice_shape`): all N rows × the widest slice (a multiple of 256 columns) whose ∂r block and
the backend's temporaries fit `chunk_bytes`; when even SLICE_MIN = 1,024 columns × N rows do not fit
(N > chunk_bytes / (1,024 · bytes per logit): 131,072 tokens at 256 MiB, bf16), token chunks within each
slice, with a (cols, H) fp32 accumulator for that slice only (32 MiB at H = 8,192).
Extra memory: the ∂r block (≤ chunk_bytes with the backend's temporaries), the (N, H) fp32 ∂h accumulator,
the masked hidden states (N, H) in the work dtype, [the slice's (cols, H) fp32 accumulator], and
`addmm_f32_`'s fallback temporary (≤ chunk_bytes) when cuBLAS cannot accumulate in place — no (V, H)
buffer besides the returned gradient. Measured: tests/kernels/test_blocked_backward.py (every tensor the
path allocates, recorded on the CPU); GPU peak-memory check in benchmarks/gpu_suite.sh stage (a).
"""

from __future__ import annotations

import inspect
from typing import Callable, Optional

import torch

from .chunked import HAS_MM_OUT_DTYPE, mm_f32

SLICE_ALIGN = 256  # slice widths are multiples of the widest vocabulary tile
SLICE_MIN = 1024  # below this many columns per slice, chunk the tokens instead

# torch.addmm(acc_fp32, a_bf16, b_bf16, out_dtype=fp32, out=acc): cuBLAS adds into the fp32 accumulator, no
# temporary. Needs a PyTorch whose `addmm.dtype_out` accepts an fp32 `self` with bf16/fp16 operands (older
# ones require `self` in the operands' dtype); the first refusal switches to the blocked fallback for good.
_ADDMM_INPLACE: list = [HAS_MM_OUT_DTYPE]


def addmm_f32_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor, block_bytes: int) -> torch.Tensor:
    """acc (M, N) fp32 += a (M, K) @ b (K, N), accumulated in fp32; returns acc.

    fp32 operands: `addmm_` (no temporary). bf16/fp16 on CUDA: cuBLAS accumulates into acc in place where
    PyTorch allows it; otherwise (and on the CPU) `mm_f32` in row blocks whose fp32 product fits
    `block_bytes`, so the temporary never exceeds it (a whole (V, H) product per token chunk did, issue 30).
    """
    if a.dtype == torch.float32:
        return acc.addmm_(a, b)
    if a.is_cuda and _ADDMM_INPLACE[0]:
        try:
            return torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
        except RuntimeError:  # "self and mat2 must have the same dtype": an older PyTorch
            _ADDMM_INPLACE[0] = False
    M, N = acc.shape
    step = max(1, min(M, block_bytes // (4 * max(1, N))))
    for r0 in range(0, M, step):
        acc[r0:r0 + step] += mm_f32(a[r0:r0 + step], b)
    return acc


def takes_cols(write_dz: Callable) -> bool:
    """Whether a ∂r writer accepts a vocabulary slice: `write_dz(rows, dz, cols)`."""
    try:
        return "cols" in inspect.signature(write_dz).parameters
    except (TypeError, ValueError):
        return False


def slice_targets(targets: torch.Tensor, cols: slice, ignore_index: int) -> torch.Tensor:
    """Targets for a ∂r writer over columns `cols` of the vocabulary: the local column where the slice owns
    the target, `ignore_index` where ignored, and an id no column has (−1, or −2 when ignore_index is −1)
    elsewhere — valid rows with no one-hot term, as a vocabulary shard's (vocab_parallel.py)."""
    other = -2 if ignore_index == -1 else -1
    owned = (targets >= cols.start) & (targets < cols.stop)
    local = torch.where(owned, targets - cols.start, other)
    return torch.where(targets == ignore_index, ignore_index, local).contiguous()


def slice_shape(N: int, V: int, chunk_bytes: int, bytes_per_logit: int) -> tuple[int, int]:
    """(rows, cols) of one ∂r block: rows · cols · bytes_per_logit ≤ chunk_bytes (or the smallest block)."""
    cols = chunk_bytes // (bytes_per_logit * max(1, N))
    if cols >= min(V, SLICE_MIN):
        return N, min(V, max(SLICE_ALIGN, cols // SLICE_ALIGN * SLICE_ALIGN))
    cols = min(V, SLICE_MIN)
    return max(1, min(N, chunk_bytes // (bytes_per_logit * cols))), cols


def vocab_sliced_backward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    row_ignored: torch.Tensor,
    write_dz: Callable[[slice, torch.Tensor, slice], None],
    dh: Optional[torch.Tensor],
    dW: Optional[torch.Tensor],
    db: Optional[torch.Tensor],
    *,
    chunk_bytes: int,
    temp_bytes_per_logit: int = 0,
    work_dtype: Optional[torch.dtype] = None,
):
    """Fill dh (N, H), dW (V, H), db (V,) (each optional, preallocated) from ∂r blocks `write_dz(rows, dz, cols)`.

    hidden: (N, H), weight: (V, H), row_ignored: (N,) bool. `work_dtype`: the dtype of ∂r and of the GEMM
    operands (default: hidden's; the CPU tests pass bf16 explicitly to run the low-precision branch).
    Returns (dh, dW, db).
    """
    N, H = hidden.shape
    V = weight.shape[0]
    dev = hidden.device
    work_dtype = work_dtype or hidden.dtype
    elem = torch.empty((), dtype=work_dtype).element_size()
    rows_step, cols_step = slice_shape(N, V, chunk_bytes, elem + temp_bytes_per_logit)
    n_slices = -(-V // cols_step)
    W_work = weight if weight.dtype == work_dtype else weight.to(work_dtype)
    h_work = None
    if dW is not None:
        # Ignored rows have ∂r = 0, but 0 · NaN = NaN: zero their (possibly garbage) hidden states once.
        h_work = hidden.masked_fill(row_ignored.unsqueeze(1), 0).to(work_dtype)
    # ∂h sums over slices: fp32, one rounding at the end (a single slice writes it directly).
    dh32 = torch.zeros((N, H), device=dev, dtype=torch.float32) if dh is not None and n_slices > 1 else None
    db32 = torch.zeros(V, device=dev, dtype=torch.float32) if db is not None else None
    buf = torch.empty(rows_step * min(cols_step, V), device=dev, dtype=work_dtype)
    for v0 in range(0, V, cols_step):
        cols = slice(v0, min(V, v0 + cols_step))
        width = cols.stop - v0
        # ∂W[cols] over token chunks: fp32 for this slice only, when the slice needs more than one chunk.
        acc = torch.zeros((width, H), device=dev, dtype=torch.float32) if dW is not None and rows_step < N else None
        for r0 in range(0, N, rows_step):
            rows = slice(r0, min(N, r0 + rows_step))
            n = rows.stop - r0
            dz = buf[: n * width].view(n, width)
            write_dz(rows, dz, cols)
            if dh is not None:
                if dh32 is None:
                    _mm_to(dh[rows], dz, W_work[cols])
                else:
                    addmm_f32_(dh32[rows], dz, W_work[cols], chunk_bytes)
            if dW is not None:
                if acc is None:
                    _mm_to(dW[cols], dz.T, h_work[rows])
                else:
                    addmm_f32_(acc, dz.T, h_work[rows], chunk_bytes)
            if db32 is not None:
                db32[cols] += dz.sum(0, dtype=torch.float32)
        if acc is not None:
            dW[cols].copy_(acc)
            del acc
    if dh32 is not None:
        dh.copy_(dh32)
    if db is not None:
        db.copy_(db32)
    return dh, dW, db


def _mm_to(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """out = a @ b in out's dtype: one GEMM with fp32 accumulation inside (cuBLAS), written in place."""
    if out.dtype == a.dtype and out.is_contiguous():
        torch.mm(a, b, out=out)
    else:  # the CPU path: fp32 work dtype for a low-precision weight
        out.copy_(mm_f32(a, b) if a.dtype != torch.float32 else a @ b)
