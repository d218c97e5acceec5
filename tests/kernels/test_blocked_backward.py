"""The vocabulary-sliced low-precision backward (kernels/blocked.py): no (V, H) fp32 buffer, same gradients.

The sliced path runs on CUDA for bf16/fp16 backwards that need more than one chunk; the CPU's head_backward
works in fp32 and never takes it. So the path is run directly here — in bf16 on the CPU (work_dtype=bf16:
∂r stored in bf16, GEMMs through mm_f32's fp32 accumulation) and forced (sliced=True) through the public ops
in fp32 — against float64 references, and every tensor it allocates is recorded (a TorchDispatchMode): no
fp32 tensor of V·H elements, temporaries bounded by chunk_bytes. The peak-memory check with two or more
chunks on a GPU is `test_peak_memory_multi_chunk_cuda` (benchmarks/gpu_suite.sh runs it first).
"""

import functools
import importlib

import pytest
import torch
from helpers import HAS_CUDA, device_for, rel_err
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import fusealign as fa
from fusealign.kernels.blocked import addmm_f32_, slice_shape, slice_targets, vocab_sliced_backward
from fusealign.kernels.reference import linear_kl_reference, linear_logps_reference

# Modules by full name: the package re-exports functions named like their modules.
blocked, hb_mod, linear_kl, linear_logps = (importlib.import_module(f"fusealign.kernels.{m}")
                                            for m in ("blocked", "head_backward", "linear_kl", "linear_logps"))


class Allocations(TorchDispatchMode):
    """Every storage an op creates inside the block: (dtype, numel) (views and in-place results excluded)."""

    def __init__(self):
        super().__init__()
        self.made = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        before = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        out = func(*args, **kwargs)
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in before and t.numel():
                self.made.append((t.dtype, t.untyped_storage().nbytes() // t.element_size()))
        return out

    def largest(self, dtype):
        return max((n for d, n in self.made if d == dtype), default=0)


def test_slice_shape_arithmetic():
    # 2 bytes per logit, 256 MiB: all 16,384 rows × 8,192 columns (a multiple of 256) fit exactly.
    assert slice_shape(16384, 128256, 256 * 2**20, 2) == (16384, 8192)
    # Columns round down to 256: 1000 rows → 134,217 columns → 134,144; capped at V.
    assert slice_shape(1000, 100000, 256 * 2**20, 2) == (1000, 100000)
    assert slice_shape(1000, 200000, 256 * 2**20, 2) == (1000, 134144)
    # Fewer than 1,024 columns for all rows: token chunks of 1,024 columns instead.
    assert slice_shape(1 << 20, 128256, 256 * 2**20, 2) == (131072, 1024)
    # A vocabulary narrower than SLICE_MIN is one slice.
    assert slice_shape(10, 300, 1000, 2) == (1, 300)
    rows, cols = slice_shape(37, 1000, 3000, 6)
    assert rows * cols * 6 <= 3000 or (rows, cols) == (1, 1000)


def test_slice_targets():
    y = torch.tensor([0, 5, 9, -100, 12, 7])
    assert slice_targets(y, slice(5, 10), -100).tolist() == [-1, 0, 4, -100, -1, 2]
    # ignore_index = −1 must not collide with "not in this slice".
    y = torch.tensor([3, -1, 8])
    assert slice_targets(y, slice(0, 4), -1).tolist() == [3, -1, -2]


def _reference_dr(h, W, b, y, ignore_index=-100):
    """float64 ∂L/∂r of L = Σ g·logp for a fixed random g (materialised logits): the backward's input."""
    h64, W64 = h.double(), W.double()
    z = h64 @ W64.T + (0 if b is None else b.double())
    g = torch.randn(h.shape[0], generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    valid = y != ignore_index
    g = torch.where(valid, g, 0.0)
    p = torch.softmax(z, -1)
    dr = -g[:, None] * p
    dr[valid, y[valid]] += g[valid]
    return dr


@pytest.mark.parametrize("work_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("N,V,chunk_bytes", [(50, 3000, 50 * 2 * 1536), (300, 2500, 40_000), (7, 5, 10)],
                         ids=["two-slices", "token-chunks", "tiny"])
def test_sliced_gradients_match_float64(work_dtype, N, V, chunk_bytes):
    """Every block of ∂r is handed out once; ∂h, ∂W, ∂b equal the float64 products (one bf16 rounding of ∂r)."""
    H = 24
    g = torch.Generator().manual_seed(0)
    h = torch.randn(N, H, generator=g).to(work_dtype)
    W = torch.randn(V, H, generator=g).to(work_dtype)
    b = torch.randn(V, generator=g).to(work_dtype)
    y = torch.randint(0, V, (N,), generator=g)
    y[::3] = -100
    dr64 = _reference_dr(h, W, b, y)
    seen = torch.zeros(N, V, dtype=torch.int64)

    def write_dz(rows, dz, cols):
        seen[rows, cols] += 1
        dz.copy_(dr64[rows, cols])

    dh, dW, db = torch.zeros_like(h), torch.zeros_like(W), torch.zeros_like(b)
    vocab_sliced_backward(h, W, b, y == -100, write_dz, dh, dW, db, chunk_bytes=chunk_bytes, work_dtype=work_dtype)
    assert (seen == 1).all()
    dr_in = dr64.to(work_dtype).double()  # what the GEMMs see
    tol = 1e-6 if work_dtype == torch.float32 else 1e-2
    assert rel_err(dh, dr_in @ W.double()) <= tol
    assert rel_err(dW, dr_in.T @ h.double().masked_fill((y == -100)[:, None], 0)) <= tol
    assert rel_err(db, dr_in.sum(0)) <= tol


def test_sliced_path_allocates_no_vocab_by_hidden_fp32():
    """bf16 backward over 4 slices: nothing fp32 of V·H elements; the ∂r block stays within chunk_bytes."""
    N, H, V = 64, 32, 4096
    chunk_bytes = N * 1024 * 2  # 1,024 columns of bf16 ∂r: 4 slices
    h, W = torch.randn(N, H).bfloat16(), torch.randn(V, H).bfloat16()
    y = torch.randint(0, V, (N,))
    dr = _reference_dr(h, W, None, y)
    dh, dW = torch.zeros_like(h), torch.zeros_like(W)
    with Allocations() as rec:
        vocab_sliced_backward(h, W, None, y == -100, lambda rows, dz, cols: dz.copy_(dr[rows, cols]), dh, dW, None,
                              chunk_bytes=chunk_bytes, work_dtype=torch.bfloat16)
    assert rec.largest(torch.float32) < V * H, rec.made
    assert rec.largest(torch.bfloat16) <= max(chunk_bytes // 2, N * H), rec.made
    assert rel_err(dW, dr.bfloat16().double().T @ h.double()) <= 1e-2


def test_addmm_f32_bounds_its_temporary():
    """The fallback of addmm_f32_ (CPU, or PyTorch without an in-place fp32 addmm) works in row blocks."""
    M, K, Nc = 300, 16, 40
    a, b = torch.randn(M, K).bfloat16(), torch.randn(K, Nc).bfloat16()
    acc = torch.randn(M, Nc)
    expect = acc.double() + a.double() @ b.double()
    block = 50 * Nc * 4
    with Allocations() as rec:
        addmm_f32_(acc, a, b, block)
    assert rel_err(acc, expect) <= 1e-6
    assert rec.largest(torch.float32) <= 50 * Nc, rec.made


def _force_sliced(monkeypatch):
    forced = functools.partial(hb_mod.head_backward, sliced=True)
    monkeypatch.setattr(linear_logps, "head_backward", forced)
    monkeypatch.setattr(linear_kl, "head_backward", forced)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_public_logps_through_sliced_path(backend, monkeypatch):
    """linear_logps' own ∂r writer with a vocabulary slice (targets made local, bias sliced), vs float64."""
    _force_sliced(monkeypatch)
    dev = device_for(backend)
    N, H, V = 20, 16, 700
    g = torch.Generator().manual_seed(1)
    h = torch.randn(N, H, generator=g, dtype=torch.float64).float().to(dev).requires_grad_()
    W = (torch.randn(V, H, generator=g, dtype=torch.float64) / 4).float().to(dev).requires_grad_()
    b = torch.randn(V, generator=g, dtype=torch.float64).float().to(dev).requires_grad_()
    y = torch.randint(0, V, (N,), generator=g).to(dev)
    y[::4] = -100
    # 256 columns of fp32 ∂r for all rows (+ the torch backend's 12 bytes of temporaries): 3 slices.
    per = 4 + (12 if backend == "torch" else 0)
    lp, ent = fa.linear_logps(h, W, y, bias=b, return_entropy=True, softcap=5.0, temperature=0.8, backend=backend,
                              chunk_bytes=N * 256 * per)
    (lp * torch.arange(N, device=dev) + ent).sum().backward()
    h64, W64, b64 = (t.detach().double().cpu().requires_grad_() for t in (h, W, b))
    rl, re = linear_logps_reference(h64, W64, y.cpu(), bias=b64, return_entropy=True, softcap=5.0, temperature=0.8,
                                    dtype=torch.float64)
    (rl * torch.arange(N) + re).sum().backward()
    for ours, ref in ((h, h64), (W, W64), (b, b64)):
        assert rel_err(ours.grad, ref.grad) <= 1e-4


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_public_kl_through_sliced_path(backend, direction, monkeypatch):
    _force_sliced(monkeypatch)
    dev = device_for(backend)
    N, H, V = 12, 16, 600
    g = torch.Generator().manual_seed(2)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).float().to(dev)  # noqa: E731
    h, W, hr, Wr = mk(N, H).requires_grad_(), (mk(V, H) / 4).requires_grad_(), mk(N, H), mk(V, H) / 4
    b = mk(V).requires_grad_()
    kl = fa.linear_kl(h, W, hr, Wr, bias=b, direction=direction, backend=backend, chunk_bytes=N * 256 * 16)
    kl.sum().backward()
    h64, W64, b64 = (t.detach().double().cpu().requires_grad_() for t in (h, W, b))
    ref = linear_kl_reference(h64, W64, hr.double().cpu(), Wr.double().cpu(), bias=b64, direction=direction,
                              dtype=torch.float64)
    ref.sum().backward()
    for ours, r in ((h, h64), (W, W64), (b, b64)):
        assert rel_err(ours.grad, r.grad) <= 1e-4


def test_default_path_selection():
    """The sliced path is the default only where it applies: low precision, several chunks, a slice writer."""
    taken = []
    real = blocked.vocab_sliced_backward

    def spy(*a, **k):
        taken.append(k["work_dtype"])
        return real(*a, **k)

    h, W = torch.randn(8, 4), torch.randn(50, 4)
    y = torch.zeros(8, dtype=torch.long)

    def writer(rows, dz, cols=slice(None)):
        dz.zero_()

    old = hb_mod.vocab_sliced_backward
    hb_mod.vocab_sliced_backward = spy
    try:
        hb_mod.head_backward(h, W, None, y < 0, writer, chunk_bytes=4 * 50)  # CPU: fp32, not taken
        hb_mod.head_backward(h, W, None, y < 0, writer, chunk_bytes=4 * 50, sliced=True)
        hb_mod.head_backward(h, W, None, y < 0, lambda rows, dz: dz.zero_(), chunk_bytes=4 * 50, sliced=False)
    finally:
        hb_mod.vocab_sliced_backward = old
    assert taken == [torch.float32]
    assert blocked.takes_cols(writer) and not blocked.takes_cols(lambda rows, dz: None)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_addmm_f32_cuda_matches_float64():
    """On the GPU: cuBLAS accumulates bf16 products into the fp32 buffer in place (or the blocked fallback)."""
    a = torch.randn(512, 256, device="cuda").bfloat16()
    b = torch.randn(256, 384, device="cuda").bfloat16()
    acc = torch.randn(512, 384, device="cuda")
    expect = acc.double() + a.double() @ b.double()
    addmm_f32_(acc, a, b, 64 * 384 * 4)
    assert rel_err(acc, expect) <= 1e-5
    print(f"addmm_f32_ in place through cuBLAS: {blocked._ADDMM_INPLACE[0]}")


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_peak_memory_multi_chunk_cuda():
    """bf16, a backward over several vocabulary slices: peak extra memory has no (V, H) fp32 term (issue 30)."""
    N, H, V = 4096, 2048, 65536
    chunk = 64 * 2**20  # 8,192 columns of bf16 ∂r for all rows: 8 slices
    g = torch.Generator(device="cuda").manual_seed(0)
    h = torch.randn(N, H, device="cuda", generator=g).bfloat16().requires_grad_()
    W = (torch.randn(V, H, device="cuda", generator=g) / H**0.5).bfloat16().requires_grad_()
    y = torch.randint(0, V, (N,), device="cuda", generator=g)
    lp = fa.linear_logps(h, W, y, backend="triton", chunk_bytes=chunk)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    lp.sum().backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    grads = (N * H + V * H) * 2  # the returned ∂h, ∂W (bf16)
    bound = 1.25 * chunk + N * H * (4 + 2) + grads + 2**20
    assert extra <= bound, f"peak extra {extra / 2**20:.0f} MiB > {bound / 2**20:.0f} MiB"
    assert extra < grads + V * H * 4  # the old fp32 (V, H) accumulator alone
    print(f"peak extra {extra / 2**20:.0f} MiB (bound {bound / 2**20:.0f} MiB; fp32 (V, H) = {V * H * 4 / 2**20:.0f} MiB)")
