"""fa.linear_kl against the float64 materialised reference, both directions, both backends."""

import pytest
import torch
from helpers import BACKENDS, FWD_ATOL, GRAD_RTOL, device_for, leaf64, rel_err

import fusealign as fa
from fusealign.kernels.reference import linear_kl_reference


def make(N, H, H_ref, V, dtype, device, *, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = (torch.randn(N, H, generator=g) * scale).to(dtype).to(device)
    W = (torch.randn(V, H, generator=g) / H**0.5).to(dtype).to(device)
    hr = (torch.randn(N, H_ref, generator=g) * scale).to(dtype).to(device)
    Wr = (torch.randn(V, H_ref, generator=g) / H_ref**0.5).to(dtype).to(device)
    return h, W, hr, Wr


def check(backend, h, W, hr, Wr, chunk_bytes=None, **opts):
    dtype = h.dtype
    hg, Wg = h.clone().requires_grad_(), W.clone().requires_grad_()
    extra = {} if chunk_bytes is None else dict(chunk_bytes=chunk_bytes)
    kl = fa.linear_kl(hg, Wg, hr, Wr, backend=backend, **opts, **extra)
    h64, W64 = leaf64(h), leaf64(W)
    ref = linear_kl_reference(h64, W64, hr.double(), Wr.double(), dtype=torch.float64, **opts)
    assert kl.dtype == torch.float32 and kl.shape == h.shape[:-1]
    # Absolute tolerance, plus fp32's relative resolution for large KL (near one-hot: KL ~ 100).
    err = (kl.detach().double().cpu() - ref.detach().cpu()).abs()
    assert (err <= FWD_ATOL[dtype] + 1e-5 * ref.detach().abs().cpu()).all(), err.max()
    g = torch.randn(kl.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    (kl * g.to(kl.device).float()).sum().backward()
    (ref * g.to(ref.device)).sum().backward()
    assert rel_err(hg.grad, h64.grad) <= GRAD_RTOL[dtype]
    assert rel_err(Wg.grad, W64.grad) <= GRAD_RTOL[dtype]
    return kl


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("direction", ["forward", "reverse"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("V", [2, 257, 1000])
def test_matches_reference(backend, direction, dtype, V):
    h, W, hr, Wr = make(20, 32, 32, V, dtype, device_for(backend))
    kl = check(backend, h, W, hr, Wr, direction=direction)
    assert kl.min() > -1e-5  # KL ≥ 0 up to rounding


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_wider_reference_temperature_softcap_mask(backend, direction):
    dev = device_for(backend)
    h, W, hr, Wr = make(18, 32, 64, 300, torch.float32, dev, scale=2.0)  # distillation: H_ref = 2H
    mask = torch.rand(18, generator=torch.Generator().manual_seed(1)).to(dev) > 0.3
    kl = check(backend, h, W, hr, Wr, direction=direction, mask=mask, temperature=0.7, softcap=5.0)
    assert torch.equal(kl[~mask], torch.zeros_like(kl[~mask]))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_near_one_hot(backend, direction):
    # ×30 logits: both softmaxes near one-hot, KL dominated by a few tokens' log-ratio.
    h, W, hr, Wr = make(16, 32, 32, 200, torch.float32, device_for(backend), scale=30.0)
    check(backend, h, W, hr, Wr, direction=direction)


@pytest.mark.parametrize("backend", BACKENDS)
def test_leading_shape_and_chunking(backend):
    dev = device_for(backend)
    h, W, hr, Wr = make(24, 32, 32, 150, torch.bfloat16, dev)
    check(backend, h.view(4, 6, 32), W, hr.view(4, 6, 32), Wr, chunk_bytes=5 * 150 * 4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_policy_equal_reference_gives_zero_kl_and_gradient(backend):
    dev = device_for(backend)
    h, W, _, _ = make(12, 32, 32, 100, torch.float32, dev)
    hg, Wg = h.clone().requires_grad_(), W.clone().requires_grad_()
    for direction in ("forward", "reverse"):
        kl = fa.linear_kl(hg, Wg, h, W, direction=direction, backend=backend)
        assert kl.abs().max() < 1e-5
        kl.sum().backward()
        assert hg.grad.abs().max() < 1e-5 and Wg.grad.abs().max() < 1e-5
        hg.grad = Wg.grad = None


def test_errors():
    h, W, hr, Wr = make(4, 8, 8, 10, torch.float32, "cpu")
    with pytest.raises(ValueError, match="ref_weight requires grad.*detach"):
        fa.linear_kl(h.requires_grad_(), W, hr, Wr.clone().requires_grad_())
    with pytest.raises(ValueError, match="direction must be one of"):
        fa.linear_kl(h, W, hr, Wr, direction="js")
    with pytest.raises(ValueError, match="vocabularies must match"):
        fa.linear_kl(h, W, hr, Wr[:9])
    with pytest.raises(ValueError, match="ref_hidden leading shape"):
        fa.linear_kl(h, W, hr[:3], Wr)
    with pytest.raises(ValueError, match="mask must be a tensor of shape"):
        fa.linear_kl(h, W, hr, Wr, mask=torch.ones(5, dtype=torch.bool))
    with pytest.raises(ValueError, match="hidden size mismatch: ref_hidden"):
        fa.linear_kl(h, W, hr, torch.randn(10, 7))
    with torch.no_grad():  # under no_grad a grad-requiring reference is harmless
        fa.linear_kl(h, W, hr, Wr.clone().requires_grad_())
    assert fa.LinearKL(direction="reverse")(h.detach(), W, hr, Wr).shape == (4,)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("direction", ["forward", "reverse"])
@pytest.mark.parametrize("which", ["both", "policy", "reference"])
def test_biased_heads(backend, direction, which):
    """Each head may carry a bias (Phi, GPT-J-style heads); the policy's bias gets its gradient."""
    dev = device_for(backend)
    h, W, hr, Wr = make(16, 32, 32, 301, torch.float32, dev, scale=1.5, seed=4)
    g = torch.Generator().manual_seed(5)
    b = torch.randn(301, generator=g).to(dev) if which in ("both", "policy") else None
    br = torch.randn(301, generator=g).to(dev) if which in ("both", "reference") else None
    hg, Wg = h.clone().requires_grad_(), W.clone().requires_grad_()
    bg = None if b is None else b.clone().requires_grad_()
    kl = fa.linear_kl(hg, Wg, hr, Wr, bias=bg, ref_bias=br, direction=direction, softcap=4.0, temperature=0.8,
                      backend=backend)
    h64, W64, b64 = leaf64(h), leaf64(W), leaf64(b)
    ref = linear_kl_reference(h64, W64, hr.double(), Wr.double(), bias=b64, ref_bias=None if br is None else br.double(),
                              direction=direction, softcap=4.0, temperature=0.8, dtype=torch.float64)
    assert (kl.detach().double().cpu() - ref.detach().cpu()).abs().max() < 1e-4
    w = torch.linspace(-1, 2, 16, dtype=torch.float64)
    (kl * w.to(dev).float()).sum().backward()
    (ref * w).sum().backward()
    assert rel_err(hg.grad, h64.grad) < 1e-4 and rel_err(Wg.grad, W64.grad) < 1e-4
    if b is not None:
        assert rel_err(bg.grad, b64.grad) < 1e-4
    unbiased = fa.linear_kl(h, W, hr, Wr, direction=direction, softcap=4.0, temperature=0.8, backend=backend)
    assert (unbiased - kl.detach()).abs().max() > 1e-3  # the bias changes the answer: it is not ignored
