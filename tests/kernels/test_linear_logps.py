"""fa.linear_logps against the float64 materialised reference, on both backends.

Every case feeds the reference the *same* values the fused op sees (bf16 → float64 is exact), so
the measured error is the fused op's own: fp32 logits, online log-sum-exp, chunked gradients.
"""

import pytest
import torch
from helpers import BACKENDS, FWD_ATOL, GRAD_RTOL, device_for, leaf64, max_abs, rel_err

import fusealign as fa
from fusealign.kernels.reference import linear_logps_reference

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def make_inputs(N, H, V, dtype, device, *, bias=False, scale=1.0, ignore_frac=0.2, seed=0, idx_dtype=torch.int64):
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(N, H, generator=g) * scale).to(dtype)
    weight = (torch.randn(V, H, generator=g) / H**0.5).to(dtype)
    b = (torch.randn(V, generator=g) * 0.5).to(dtype) if bias else None
    targets = torch.randint(0, V, (N,), generator=g)
    targets[torch.rand(N, generator=g) < ignore_frac] = -100
    move = lambda t: None if t is None else t.to(device)  # noqa: E731
    return move(hidden), move(weight), move(b), targets.to(idx_dtype).to(device)


def check_against_reference(backend, hidden, weight, bias, targets, *, entropy_grad=True, chunk_bytes=None, **opts):
    """Forward values and gradients (random upstream grads for both outputs) vs float64 reference."""
    dtype = hidden.dtype
    h, W = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    b = None if bias is None else bias.clone().requires_grad_(True)
    extra = {} if chunk_bytes is None else dict(chunk_bytes=chunk_bytes)
    logps, entropy = fa.linear_logps(h, W, targets, bias=b, return_entropy=True, backend=backend, **opts, **extra)
    assert logps.dtype == entropy.dtype == torch.float32
    assert logps.shape == entropy.shape == targets.shape

    h64, W64, b64 = leaf64(hidden), leaf64(weight), leaf64(bias)
    ref_logps, ref_entropy = linear_logps_reference(h64, W64, targets, bias=b64,
                                                    return_entropy=True, dtype=torch.float64, **opts)
    assert max_abs(logps, ref_logps) <= FWD_ATOL[dtype]
    assert max_abs(entropy, ref_entropy) <= FWD_ATOL[dtype]

    gen = torch.Generator().manual_seed(1)
    g_logps = torch.randn(targets.shape, generator=gen, dtype=torch.float64)
    g_ent = torch.randn(targets.shape, generator=gen, dtype=torch.float64) if entropy_grad else None
    loss = (logps * g_logps.to(logps.device).float()).sum()
    ref_loss = (ref_logps * g_logps.to(ref_logps.device)).sum()
    if entropy_grad:
        loss = loss + (entropy * g_ent.to(entropy.device).float()).sum()
        ref_loss = ref_loss + (ref_entropy * g_ent.to(ref_entropy.device)).sum()
    loss.backward()
    ref_loss.backward()
    for name, ours, ref in (("hidden", h, h64), ("weight", W, W64), ("bias", b, b64)):
        if ours is None:
            continue
        assert ours.grad.dtype == ours.dtype, name
        err = rel_err(ours.grad, ref.grad)
        assert err <= GRAD_RTOL[dtype], f"grad {name}: rel err {err:.2e}"
    return logps, entropy, h.grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("V", [1, 257, 1000])
def test_matches_reference_awkward_vocab(backend, dtype, V):
    hidden, weight, bias, targets = make_inputs(24, 48, V, dtype, device_for(backend), bias=True)
    check_against_reference(backend, hidden, weight, bias, targets)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("opts", [dict(temperature=0.7), dict(temperature=1.3), dict(softcap=3.0),
                                  dict(softcap=2.0, temperature=0.7)], ids=["T0.7", "T1.3", "softcap", "softcap+T"])
def test_temperature_and_softcap(backend, dtype, opts):
    hidden, weight, bias, targets = make_inputs(20, 32, 300, dtype, device_for(backend), bias=True, scale=3.0)
    check_against_reference(backend, hidden, weight, bias, targets, **opts)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
def test_near_one_hot_softmax(backend, dtype):
    # Logits ×50: the softmax is one-hot to within bf16 resolution; entropy ~ 0, p·log p underflows.
    hidden, weight, _, targets = make_inputs(20, 32, 200, dtype, device_for(backend), scale=50.0)
    logps, entropy, _ = check_against_reference(backend, hidden, weight, None, targets)
    assert entropy.min().item() >= 0.0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
def test_all_negative_logits(backend, dtype):
    # Every logit in about [−110, −60]: a running max initialised at 0 (a known peer bug) gives lse = 0.
    # (Not −1000: fp32 then rounds each logit by 6e-5, beyond the fp32 gradient tolerance.)
    dev = device_for(backend)
    hidden = torch.rand(16, 32).add(0.5).to(dtype).to(dev)
    weight = -torch.rand(130, 32).add(0.5).to(dtype).to(dev)
    bias = torch.full((130,), -50.0).to(dtype).to(dev)
    targets = torch.randint(0, 130, (16,)).to(dev)
    check_against_reference(backend, hidden, weight, bias, targets)


def test_vocab_over_65536_torch_backend():
    hidden, weight, _, targets = make_inputs(6, 16, 70_001, torch.float32, "cpu", ignore_frac=0.0)
    check_against_reference("torch", hidden, weight, None, targets)


@pytest.mark.parametrize("backend,V", [("torch", 50_257), ("triton", 5_027)])
def test_gpt2_sized_vocab(backend, V):
    # GPT-2's 50,257 (prime, not a tile multiple); scaled down ×10 under the Triton interpreter.
    hidden, weight, _, targets = make_inputs(8, 32, V, torch.bfloat16, device_for(backend))
    check_against_reference(backend, hidden, weight, None, targets)


@pytest.mark.parametrize("backend", BACKENDS)
def test_int32_targets_and_leading_shape(backend):
    dev = device_for(backend)
    hidden, weight, _, targets = make_inputs(24, 32, 100, torch.float32, dev, idx_dtype=torch.int32)
    logps, entropy, _ = check_against_reference(backend, hidden.view(4, 6, 32), weight, None, targets.view(4, 6))
    assert logps.shape == (4, 6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ignored_rows_are_exactly_zero_and_get_no_gradient(backend):
    dev = device_for(backend)
    hidden, weight, _, targets = make_inputs(12, 32, 90, torch.float32, dev, ignore_frac=0.0)
    targets[::3] = -100
    hidden[0] = float("nan")  # an ignored row holding NaN must not leak anywhere
    h, W = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    logps, entropy = fa.linear_logps(h, W, targets, return_entropy=True, backend=backend)
    ignored = targets == -100
    assert torch.equal(logps[ignored], torch.zeros_like(logps[ignored]))
    assert torch.equal(entropy[ignored], torch.zeros_like(entropy[ignored]))
    (logps.sum() + entropy.sum()).backward()
    assert torch.equal(h.grad[ignored], torch.zeros_like(h.grad[ignored]))
    assert torch.isfinite(W.grad).all()
    # Same gradients as a call without the ignored rows at all.
    keep = ~ignored
    h2, W2 = hidden[keep].clone().requires_grad_(), weight.clone().requires_grad_()
    l2, e2 = fa.linear_logps(h2, W2, targets[keep], return_entropy=True, backend=backend)
    (l2.sum() + e2.sum()).backward()
    assert rel_err(W.grad, W2.grad) < 1e-5
    assert rel_err(h.grad[keep], h2.grad) < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_rows_ignored(backend):
    dev = device_for(backend)
    hidden, weight, _, _ = make_inputs(8, 32, 50, torch.bfloat16, dev)
    targets = torch.full((8,), -1, device=dev)
    h, W = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    logps, entropy = fa.linear_logps(h, W, targets, ignore_index=-1, return_entropy=True, backend=backend)
    assert torch.count_nonzero(logps) == 0 and torch.count_nonzero(entropy) == 0
    (logps.sum() + entropy.sum()).backward()
    assert torch.count_nonzero(h.grad) == 0 and torch.count_nonzero(W.grad) == 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("N", [0, 1])
def test_tiny_batches(backend, N):
    dev = device_for(backend)
    hidden, weight, bias, targets = make_inputs(N, 32, 70, torch.float32, dev, bias=True, ignore_frac=0.0)
    if N == 0:
        h, W = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        logps, entropy = fa.linear_logps(h, W, targets, return_entropy=True, backend=backend)
        assert logps.shape == entropy.shape == (0,)
        (logps.sum() + entropy.sum()).backward()
        assert W.grad.shape == W.shape and torch.count_nonzero(W.grad) == 0
    else:
        check_against_reference(backend, hidden, weight, bias, targets)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("which", ["logps", "entropy"])
def test_gradient_through_one_output_only(backend, which):
    dev = device_for(backend)
    hidden, weight, _, targets = make_inputs(16, 32, 120, torch.float32, dev)
    h, W = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    logps, entropy = fa.linear_logps(h, W, targets, return_entropy=True, backend=backend)
    (logps if which == "logps" else entropy).mul(torch.linspace(-1, 2, 16, device=dev)).sum().backward()
    h64, W64 = leaf64(hidden), leaf64(weight)
    rl, re = linear_logps_reference(h64, W64, targets, return_entropy=True, dtype=torch.float64)
    (rl if which == "logps" else re).mul(torch.linspace(-1, 2, 16, dtype=torch.float64, device=dev)).sum().backward()
    assert rel_err(h.grad, h64.grad) < 1e-4 and rel_err(W.grad, W64.grad) < 1e-4


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
def test_chunked_backward_matches_single_chunk(backend, dtype):
    # A budget of a few rows forces the multi-chunk path (fp32 ∂W accumulator across chunks).
    hidden, weight, bias, targets = make_inputs(40, 32, 200, dtype, device_for(backend), bias=True)
    tiny = 3 * 200 * 4  # three rows of fp32 logits per chunk
    check_against_reference(backend, hidden, weight, bias, targets, chunk_bytes=tiny)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_hidden(backend):
    dev = device_for(backend)
    base = torch.randn(32, 20, device=dev)
    hidden = base.T  # (20, 32) with strides (1, 20)
    weight = torch.randn(64, 32, device=dev) / 6
    targets = torch.randint(0, 64, (20,), device=dev)
    check_against_reference(backend, hidden, weight, None, targets)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_and_inf_propagate_per_token(backend):
    dev = device_for(backend)
    hidden, weight, _, targets = make_inputs(6, 16, 40, torch.float32, dev, ignore_frac=0.0)
    hidden[1, 3] = float("nan")
    hidden[4, 0] = float("inf")
    logps, entropy = fa.linear_logps(hidden, weight, targets, return_entropy=True, backend=backend)
    bad = torch.tensor([False, True, False, False, True, False], device=dev)
    assert torch.isnan(logps[bad]).all() and torch.isnan(entropy[bad]).all()
    ref = linear_logps_reference(hidden[~bad].double(), weight.double(), targets[~bad], dtype=torch.float64)
    assert max_abs(logps[~bad], ref) < 1e-4


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_grad_saves_nothing(backend):
    dev = device_for(backend)
    hidden, weight, _, targets = make_inputs(8, 16, 40, torch.float32, dev)
    h, W = hidden.requires_grad_(), weight.requires_grad_()
    with torch.no_grad():
        logps, entropy = fa.linear_logps(h, W, targets, return_entropy=True, backend=backend)
    assert logps.grad_fn is None and entropy.grad_fn is None and not logps.requires_grad
    with_grad = fa.linear_logps(h, W, targets, backend=backend)
    assert torch.equal(with_grad.detach(), logps)


def test_backends_agree():
    hidden, weight, bias, targets = make_inputs(30, 32, 333, torch.bfloat16, device_for("triton"), bias=True)
    a = fa.linear_logps(hidden, weight, targets, bias=bias, return_entropy=True, backend="torch")
    b = fa.linear_logps(hidden, weight, targets, bias=bias, return_entropy=True, backend="triton")
    assert max_abs(a[0], b[0]) < 1e-4 and max_abs(a[1], b[1]) < 1e-4


def test_module_wrapper():
    hidden, weight, _, targets = make_inputs(10, 16, 50, torch.float32, "cpu")
    mod = fa.LinearLogps(temperature=0.9, return_entropy=True, backend="torch")
    logps, entropy = mod(hidden, weight, targets)
    ref_l, ref_e = linear_logps_reference(hidden.double(), weight.double(), targets, temperature=0.9,
                                          return_entropy=True, dtype=torch.float64)
    assert max_abs(logps, ref_l) < 1e-5 and max_abs(entropy, ref_e) < 1e-5
    assert "temperature=0.9" in repr(mod)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_bias(backend):
    dev = device_for(backend)
    hidden, weight, _, targets = make_inputs(16, 32, 90, torch.float32, dev)
    bias = torch.randn(90, 3, device=dev)[:, 1]  # stride 3
    check_against_reference(backend, hidden, weight, bias, targets)


@pytest.mark.parametrize("backend", BACKENDS)
def test_minus_inf_logits_count_as_probability_zero(backend):
    # Vocabulary padding masked with a −inf bias: p = 0 there and 0·log 0 = 0, not NaN.
    dev = device_for(backend)
    hidden, weight, _, targets = make_inputs(12, 32, 100, torch.float32, dev, ignore_frac=0.0)
    targets = targets % 90
    bias = torch.zeros(100, device=dev)
    bias[90:] = float("-inf")
    h, W = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    logps, entropy = fa.linear_logps(h, W, targets, bias=bias, return_entropy=True, backend=backend)
    ref_l, ref_e = linear_logps_reference(hidden[:, :].double(), weight[:90].double(), targets, return_entropy=True,
                                          dtype=torch.float64)
    assert max_abs(logps, ref_l) < 1e-4 and max_abs(entropy, ref_e) < 1e-4
    (logps.sum() + entropy.sum()).backward()
    assert torch.isfinite(h.grad).all() and torch.isfinite(W.grad).all()
    assert torch.count_nonzero(W.grad[90:]) == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_in_place_edit_of_outputs_and_double_backward(backend):
    dev = device_for(backend)
    hidden, weight, _, targets = make_inputs(8, 16, 40, torch.float32, dev)
    h = hidden.clone().requires_grad_()
    logps, entropy = fa.linear_logps(h, weight, targets, return_entropy=True, backend=backend)
    logps.mul_(2)  # outputs are independent tensors: editing one leaves what backward saved intact
    logps.sum().backward()
    h2 = hidden.clone().requires_grad_()
    (g,) = torch.autograd.grad(fa.linear_logps(h2, weight, targets, backend=backend).sum(), h2)
    assert torch.allclose(h.grad, 2 * g, atol=1e-6)
    lp = fa.linear_logps(h2, weight, targets, backend=backend)
    (g,) = torch.autograd.grad(lp.sum(), h2, create_graph=True)
    with pytest.raises(RuntimeError, match="does not require grad|differentiable"):  # refused, not wrong
        g.sum().backward()
