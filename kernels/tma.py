"""Shared Triton pieces of the Hopper-grade candidates: tensor descriptors, the main loop, the grouped order.

The main loop (`tma_logits_tile`) forms one fp32 logit tile r = h Wᵀ for BLOCK_N tokens × BLOCK_V
vocabulary columns from (BLOCK_N, BLOCK_K) tiles of h and (BLOCK_V, BLOCK_K) tiles of W. The tiles
come through device-side tensor descriptors (`tl.make_tensor_descriptor`): on sm_90 Triton
3.6 lowers them to the bulk tensor copy engine (`UTMALDG`, completing on an mbarrier); on sm_80 its
compiler rewrites them to ordinary pointer loads, pipelined with cp.async (pass
`rewrite_tensor_descriptor_to_pointer`); the interpreter emulates them as masked loads with zero padding
past the tensor's shape, as TMA does — so the CPU tests run the same kernel source. Operands TMA cannot
read (base or row stride not 16-byte aligned, last stride not 1: `tma_ok`) go to the default kernels
instead: a pointer-load variant of these kernels, compiled at such a stride (4,098 bf16 columns), was
not pipelined (no cp.async: no 4-byte vectors) and spilled 712 bytes on sm_90. The bare matmul
(bare_matmul.py) calls the same main-loop function: the fused kernels' main loop is the bare kernel's by
construction, and benchmarks/kernel_report.py checks it in the SASS.

Work order (`grouped_item`): a persistent program walks work items (token block, vocabulary split) in
groups of `group_n` token blocks, the token block fastest within a group, so the ~132 items in flight at
once cover `group_n` token blocks (their h tiles stay in L2) and a few vocabulary splits (each W tile is
read by `group_n` programs at about the same time). The order changes which program computes an item,
never what an item computes: results are independent of it.

Device-side descriptors need a global scratch buffer per program (128 bytes each) that Triton takes
from the allocator set with `triton.set_allocator`; `ensure_allocator()` sets one backed by PyTorch's
caching allocator if none is set (the allocator is a ContextVar: set per thread, e.g. again in an
autograd worker thread).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def _torch_alloc(size: int, alignment: int, stream):
    return torch.empty(size, dtype=torch.int8, device="cuda")


def ensure_allocator() -> None:
    """Set a PyTorch-backed scratch allocator for device-side tensor descriptors unless one is set."""
    from triton.runtime import _allocation

    if isinstance(_allocation._allocator.get(), _allocation.NullAllocator):
        triton.set_allocator(_torch_alloc)


# The target the offline compile check (compile_check.py) builds candidates for when no GPU is present: their
# tile shapes depend on the architecture (the 128 × 256 tile fits Hopper's wgmma registers, not sm_80's mma.sync).
OFFLINE_ARCH = 90


def target_arch(device: torch.device) -> int:
    """Compute capability as 10·major + minor: the device's, or OFFLINE_ARCH for CPU tensors."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return 10 * major + minor
    return OFFLINE_ARCH


def tma_ok(t: torch.Tensor) -> bool:
    """A 2-D operand TMA can read: unit last stride, 16-byte aligned base and row stride."""
    e = t.element_size()
    return t.dim() == 2 and t.stride(1) == 1 and (t.stride(0) * e) % 16 == 0 and t.data_ptr() % 16 == 0 \
        and t.shape[0] > 0


def group_blocks(block_n: int, H: int, elem_bytes: int, l2_bytes: int = 16 * 2**20) -> int:
    """Token blocks per group of the work order: about `l2_bytes` of h tiles (BLOCK_N·H·e each), 4 to 64.
    Only the order depends on it, never a result."""
    return max(4, min(64, l2_bytes // max(1, block_n * H * elem_bytes)))


@triton.jit
def grouped_item(item, n_blocks, splits, group_n):
    """Work item -> (token block, vocabulary split): groups of group_n token blocks, token block fastest."""
    per_group = group_n * splits
    group = item // per_group
    first = group * group_n
    size = tl.minimum(n_blocks - first, group_n)
    local = item - group * per_group
    return first + local % size, local // size


@triton.jit
def operand_descriptors(h_ptr, w_ptr, N, V, H, stride_h_n, stride_w_v,
                        BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr):
    """Tensor descriptors of h (N, H) and W (V, H): (BLOCK_N, BLOCK_K) and (BLOCK_V, BLOCK_K) boxes, zero padding."""
    h_desc = tl.make_tensor_descriptor(h_ptr, shape=[N, H], strides=[stride_h_n, 1], block_shape=[BLOCK_N, BLOCK_K])
    w_desc = tl.make_tensor_descriptor(w_ptr, shape=[V, H], strides=[stride_w_v, 1], block_shape=[BLOCK_V, BLOCK_K])
    return h_desc, w_desc


@triton.jit
def tma_logits_tile(
    h_desc, w_desc, off_n, off_v, H,
    INTERPRET: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """r[n, v] = h[off_n + n] · W[off_v + v], (BLOCK_N, BLOCK_V) fp32; exact zeros past N, V and H (TMA pads)."""
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        h = h_desc.load([off_n, k0])  # (BLOCK_N, BLOCK_K)
        w = tl.trans(w_desc.load([off_v, k0]))  # (BLOCK_K, BLOCK_V): a transposed view of the shared-memory tile
        if INTERPRET:
            # Interpreter only: fp32 broadcast-multiply-sum (its bf16 tl.dot is wrong, triton-lang/triton#11584;
            # see tiles.py).
            acc += tl.sum(h.to(tl.float32)[:, :, None] * w.to(tl.float32)[None, :, :], axis=1)
        else:
            acc = tl.dot(h, w, acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def transform_tile(r, b_ptr, offs_v, V, inv_temp, softcap,
                   HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr):
    """Raw logits -> (z, t): z = softcap·tanh((r + b)/softcap)/T (or (r + b)/T), t = tanh((r + b)/softcap)."""
    if HAS_BIAS:
        r += tl.load(b_ptr + offs_v, mask=offs_v < V, other=0.0).to(tl.float32)[None, :]
    if SOFTCAP:
        # tanh via exp (as tiles.tanh). The divisions are the approximate `div.full.f32` (2 ulp), not IEEE
        # `div.rn.f32`, whose slow-path branches held extra registers and spilled the 128 × 256 tile.
        t = 1.0 - tl.fdiv(2.0, tl.exp(r * (2.0 / softcap)) + 1.0)
        z = softcap * t * inv_temp
    else:
        t = r
        z = r * inv_temp
    return z, t


@triton.jit
def lse_tile_update(z, cols, yl, n_cols, m, s, a, zy, q, zs, mb, EXTRA: tl.constexpr):
    """Fold one (ROWS, BLOCK_V) tile of final logits into the running per-row statistics.

    z: the tile; cols: arange(BLOCK_V); yl: (ROWS,) int32 target column relative to the tile's first
    column; n_cols: how many of the tile's columns belong to the vocabulary split (the rest are
    excluded). Statistics as linear_logps_triton.py: running max m, s = Σ e^{z−m}, a = Σ e^{z−m}(z − m),
    zy = z_y, and with EXTRA q = Σ e^{2(z−m)}, zs = Σ z, mb = max_{v<y} z. Columns past the split hold
    exact zeros in every caller (padded loads), so zy and zs need no mask.
    Target compares are int32 on the local column: with an int64 column index per element the 128 × 256
    tile spilled 472 bytes (bias + softcap, sm_90); with int32, none.
    """
    zy += tl.sum(tl.where(cols[None, :] == yl[:, None], z, 0.0), axis=1)
    if EXTRA:
        zs += tl.sum(z, axis=1)
    z = tl.where((cols < n_cols)[None, :], z, float("-inf"))
    if EXTRA:
        mb = tl.maximum(mb, tl.max(tl.where(cols[None, :] < yl[:, None], z, -1.0e30), axis=1))
    m_new = tl.maximum(m, tl.max(z, axis=1))
    d = m - m_new  # ≤ 0, finite (m starts at −1e30, not −inf)
    alpha = tl.exp(d)
    e = tl.exp(z - m_new[:, None])
    # e = 0 where z = −inf (an excluded column, or a −inf logit): e · max(z − m, −1e30) = 0, never 0·(−inf).
    a = alpha * (a + d * s) + tl.sum(e * tl.maximum(z - m_new[:, None], -1.0e30), axis=1)
    s = alpha * s + tl.sum(e, axis=1)
    if EXTRA:
        q = alpha * alpha * q + tl.sum(e * e, axis=1)
    return m_new, s, a, zy, q, zs, mb
