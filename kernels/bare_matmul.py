"""A bare Triton matmul with exactly the persistent candidate's tiling: logits = h Wᵀ, nothing else.

Why it exists: to separate the fused forward's cost into "Triton's main loop" and "our epilogue". It runs
the same persistent grid, grouped work order (tma.grouped_item), tile shapes, warps and stages
(linear_logps_persistent.persistent_config) and calls the same main-loop function (tma.tma_logits_tile)
as `_logps_fwd_persistent_kernel`; only the per-tile epilogue differs — a bf16 store of the tile instead
of the online log-sum-exp. Offline, benchmarks/kernel_report.py compares the two kernels' SASS main loops
instruction by instruction (HGMMA shape and count, UTMALDG, mbarrier waits per K-step; tested in
tests/kernels/test_cuda_compile.py); on a GPU, benchmarks/bench_candidates.py times it beside cuBLAS's
`h @ W.T` and the fused kernel, so  fused / bare = the epilogue's share  and  bare / cuBLAS = the main loop's.

logits: (N, V) in h's dtype (fp32 accumulation). Not used by any op.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .linear_logps_persistent import num_programs, persistent_config, use_tma
from .tiles import dot_precision, interpreting
from .tma import ensure_allocator, grouped_item, operand_descriptors, target_arch, tma_logits_tile


@triton.jit(do_not_specialize=["group_n"])  # group_n orders the work only: one binary for all
def _bare_matmul_kernel(
    h_ptr, w_ptr, c_ptr,
    N, V, H, split_cols, splits,
    stride_h_n, stride_w_v, stride_c_n,
    group_n,  # token blocks per group of the work order (tma.grouped_item)
    INTERPRET: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):
    h_desc, w_desc = operand_descriptors(h_ptr, w_ptr, N, V, H, stride_h_n, stride_w_v, BLOCK_N, BLOCK_V, BLOCK_K)
    n_blocks = tl.cdiv(N, BLOCK_N)
    items = n_blocks * splits
    cols = tl.arange(0, BLOCK_V)
    for item in range(tl.program_id(0), items, tl.num_programs(0)):
        pid_n, split = grouped_item(item, n_blocks, splits, group_n)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        v_begin = split * split_cols
        v_end = tl.minimum(v_begin + split_cols, V)
        for v0 in range(v_begin, v_end, BLOCK_V):
            r = tma_logits_tile(h_desc, w_desc, pid_n * BLOCK_N, v0, H, INTERPRET, DOT_PRECISION,
                                BLOCK_N, BLOCK_V, BLOCK_K)
            out = c_ptr + offs_n.to(tl.int64)[:, None] * stride_c_n + (v0 + cols)[None, :]
            tl.store(out, r.to(c_ptr.dtype.element_ty), mask=(offs_n < N)[:, None] & (v0 + cols < V)[None, :])


def bare_matmul(hidden: torch.Tensor, weight: torch.Tensor, *, heads: int = 1, extra_stats: bool = False) -> torch.Tensor:
    """hidden: (N, H), weight: (V, H) -> hidden @ weight.T: (N, V) in hidden's dtype, with the tiling the persistent
    forward uses for (heads, extra_stats) — 128 × 256 on sm_90 by default, 128 × 128 for two heads or the extra
    statistics."""
    N, H = hidden.shape
    V = weight.shape[0]
    cfg = persistent_config(H, V, hidden.dtype, heads=heads, extra_stats=extra_stats, arch=target_arch(hidden.device))
    splits = triton.cdiv(V, cfg.split_cols)
    out = torch.empty((N, V), device=hidden.device, dtype=hidden.dtype)
    if not use_tma(hidden, weight):
        raise ValueError("bare_matmul needs operands TMA can read: unit last stride, 16-byte aligned base and rows")
    if hidden.is_cuda:
        ensure_allocator()
    items = triton.cdiv(N, cfg.BLOCK_N) * splits
    _bare_matmul_kernel[(num_programs(hidden.device, items),)](
        hidden, weight, out,
        N, V, H, cfg.split_cols, splits,
        hidden.stride(0), weight.stride(0), out.stride(0),
        group_n=cfg.group_n, INTERPRET=interpreting(), DOT_PRECISION=dot_precision(hidden.dtype),
        BLOCK_N=cfg.BLOCK_N, BLOCK_V=cfg.BLOCK_V, BLOCK_K=cfg.BLOCK_K,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out
