"""Property-based tests of the core ops: random shapes, dtypes and options on both backends vs float64 references.

Hypothesis draws N, H, V (V from 1 to 70,000, odd sizes), dtype, temperature, softcap, bias, ignore patterns,
NaN rows (ignored ones must give exactly 0 and no NaN gradient), scaled logits (near one-hot) and upstream
gradients. The example budget is bounded (derandomized: the same examples on every CI run) so the suite stays
within its time; on failure Hypothesis prints the falsifying example.
"""

import math

import pytest
import torch
from helpers import FWD_ATOL, GRAD_RTOL, device_for, leaf64, rel_err
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fusealign as fa
from fusealign.kernels.reference import linear_dpo_loss_reference, linear_kl_reference, linear_logps_reference

SETTINGS = settings(max_examples=20, deadline=None, derandomize=True, database=None, print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@st.composite
def head_case(draw):
    """Shapes: mostly small; sometimes a wide vocabulary (up to 70,000) with few, narrow tokens (interpreter cost)."""
    wide = draw(st.booleans()) and draw(st.booleans())  # ~1 in 4
    V = draw(st.integers(20_000, 70_000)) if wide else draw(st.integers(1, 600))
    N = draw(st.integers(1, 3 if wide else 12))
    H = draw(st.integers(1, 8 if wide else 40))
    return dict(
        N=N, H=H, V=V,
        dtype=draw(st.sampled_from(sorted(DTYPES))),
        temperature=draw(st.sampled_from([1.0, 0.5, 0.7, 1.7])),
        softcap=draw(st.sampled_from([None, None, 3.0, 30.0])),
        bias=draw(st.booleans()),
        scale=draw(st.sampled_from([1.0, 1.0, 8.0, 40.0])),  # 40: near one-hot softmax
        ignore=draw(st.lists(st.booleans(), min_size=N, max_size=N)),
        nan_in_ignored=draw(st.booleans()),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def _tensors(c, device):
    g = torch.Generator().manual_seed(c["seed"])
    dtype = DTYPES[c["dtype"]]
    h = (torch.randn(c["N"], c["H"], generator=g) * c["scale"]).to(dtype)
    W = (torch.randn(c["V"], c["H"], generator=g) / math.sqrt(c["H"])).to(dtype)
    b = (torch.randn(c["V"], generator=g) * 0.5).to(dtype) if c["bias"] else None
    y = torch.randint(0, c["V"], (c["N"],), generator=g)
    ignored = torch.tensor(c["ignore"])
    y[ignored] = -100
    if c["nan_in_ignored"] and ignored.any():
        h[ignored.nonzero()[0, 0]] = float("nan")  # garbage in an ignored row must not leak anywhere
    mv = lambda t: None if t is None else t.to(device)  # noqa: E731
    return mv(h), mv(W), mv(b), y.to(device), g


def _close(actual, expected, dtype):
    """|a − e| ≤ atol + 1e-5·|e|: fp32 logits; large logits (scale 40) keep fp32's relative resolution."""
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    if a.numel() == 0:
        return True, 0.0
    return bool(((a - e).abs() <= FWD_ATOL[dtype] + 1e-5 * e.abs()).all()), (a - e).abs().max().item()


def _grad_close(ours, ref, dtype) -> bool:
    """‖a − e‖ ≤ rtol·‖e‖ + 1e-6·√n: relative, except for vanishing gradients (a saturated softmax gives ~1e-9,
    where fp32 cancellation in p·(log p − …) dominates any relative measure)."""
    diff = (ours.detach().double().cpu() - ref.detach().double().cpu()).norm().item()
    return diff <= GRAD_RTOL[dtype] * 2 * ref.detach().double().norm().item() + 1e-6 * ours.numel() ** 0.5


@pytest.mark.parametrize("backend", ["torch", "triton"])
@SETTINGS
@given(c=head_case())
def test_linear_logps_property(backend, c):
    dev = device_for(backend)
    h, W, b, y, g = _tensors(c, dev)
    dtype = h.dtype
    opts = dict(temperature=c["temperature"], softcap=c["softcap"])
    hg, Wg = h.clone().requires_grad_(), W.clone().requires_grad_()
    bg = None if b is None else b.clone().requires_grad_()
    logps, entropy = fa.linear_logps(hg, Wg, y, bias=bg, return_entropy=True, backend=backend, **opts)
    # The reference sees only the rows that count: ignored rows must contribute nothing at all (even NaN ones).
    keep = y != -100
    h64, W64, b64 = leaf64(h[keep]), leaf64(W), leaf64(b)
    r_logps, r_entropy = linear_logps_reference(h64, W64, y[keep], bias=b64, return_entropy=True,
                                                dtype=torch.float64, **opts)
    assert torch.equal(logps[~keep], torch.zeros_like(logps[~keep]))  # exactly 0, even for a NaN row
    assert torch.equal(entropy[~keep], torch.zeros_like(entropy[~keep]))
    ok, err = _close(logps[keep], r_logps, dtype)
    assert ok, f"logps max error {err}"
    ok, err = _close(entropy[keep], r_entropy, dtype)
    assert ok, f"entropy max error {err}"
    gl = torch.randn(c["N"], generator=g, dtype=torch.float64)  # non-uniform upstream gradients
    ge = torch.randn(c["N"], generator=g, dtype=torch.float64)
    (logps * gl.to(dev).float() + entropy * ge.to(dev).float()).sum().backward()
    if keep.any():
        (r_logps * gl[keep.cpu()] + r_entropy * ge[keep.cpu()]).sum().backward()
    assert torch.equal(hg.grad[~keep], torch.zeros_like(hg.grad[~keep]))
    pairs = [(hg.grad[keep], h64.grad, "hidden"), (Wg.grad, W64.grad, "weight")]
    if bg is not None:
        pairs.append((bg.grad, b64.grad, "bias"))
    for ours, ref, name in pairs:
        ref = torch.zeros_like(ours, dtype=torch.float64) if ref is None else ref  # no counted row: no gradient
        assert torch.isfinite(ours).all(), f"{name} gradient not finite"
        assert _grad_close(ours, ref, dtype), f"{name} gradient rel err {rel_err(ours, ref)}"


@st.composite
def kl_case(draw):
    c = draw(head_case())
    c["H_ref"] = draw(st.sampled_from([c["H"], 2 * c["H"]]))  # distillation: a wider reference
    c["direction"] = draw(st.sampled_from(["forward", "reverse"]))
    c["ref_bias"] = draw(st.booleans())
    c["nan_in_ignored"] = False  # KL's mask semantics: masked rows are 0; NaN rows are covered above
    return c


@pytest.mark.parametrize("backend", ["torch", "triton"])
@SETTINGS
@given(c=kl_case())
def test_linear_kl_property(backend, c):
    dev = device_for(backend)
    h, W, b, y, g = _tensors(c, dev)
    dtype = h.dtype
    hr = (torch.randn(c["N"], c["H_ref"], generator=g) * c["scale"]).to(dtype).to(dev)
    Wr = (torch.randn(c["V"], c["H_ref"], generator=g) / math.sqrt(c["H_ref"])).to(dtype).to(dev)
    br = (torch.randn(c["V"], generator=g) * 0.5).to(dtype).to(dev) if c["ref_bias"] else None
    mask = y != -100
    opts = dict(temperature=c["temperature"], softcap=c["softcap"], direction=c["direction"])
    hg, Wg = h.clone().requires_grad_(), W.clone().requires_grad_()
    kl = fa.linear_kl(hg, Wg, hr, Wr, bias=b, ref_bias=br, mask=mask, backend=backend, **opts)
    h64, W64 = leaf64(h), leaf64(W)
    ref = linear_kl_reference(h64, W64, hr.double(), Wr.double(), bias=None if b is None else b.double(),
                              ref_bias=None if br is None else br.double(), mask=mask, dtype=torch.float64, **opts)
    ok, err = _close(kl, ref, dtype)
    assert ok, f"KL max error {err}"
    w = torch.randn(c["N"], generator=g, dtype=torch.float64)
    (kl * w.to(dev).float()).sum().backward()
    (ref * w).sum().backward()
    assert _grad_close(hg.grad, h64.grad, dtype), rel_err(hg.grad, h64.grad)
    assert _grad_close(Wg.grad, W64.grad, dtype), rel_err(Wg.grad, W64.grad)


@st.composite
def dpo_case(draw):
    B, T = draw(st.integers(1, 3)), draw(st.integers(2, 7))
    # Each sequence keeps at least one completion token (a prompt prefix of random length is ignored).
    prompt_lens = draw(st.lists(st.integers(0, T - 1), min_size=2 * B, max_size=2 * B))
    loss_type = draw(st.sampled_from(["sigmoid", "cdpo", "robust", "hinge", "ipo", "ipo_sum", "apo_zero", "aot"]))
    return dict(B=B, T=T, H=draw(st.integers(2, 24)), V=draw(st.integers(2, 400)), prompt_lens=prompt_lens,
                loss_type=loss_type, beta=draw(st.sampled_from([0.1, 0.5, 2.0])),
                label_smoothing=draw(st.sampled_from([0.0, 0.2])) if loss_type in ("cdpo", "robust", "aot") else 0.0,
                average_logps=draw(st.booleans()) and loss_type != "ipo",  # ipo normalises by itself
                use_weighting=draw(st.booleans()) and loss_type != "aot", nll_coef=draw(st.sampled_from([0.0, 0.3])),
                dtype=draw(st.sampled_from(["fp32", "bf16"])), seed=draw(st.integers(0, 2**31 - 1)))


@pytest.mark.parametrize("backend", ["torch", "triton"])
@SETTINGS
@given(c=dpo_case())
def test_linear_dpo_loss_property(backend, c):
    dev = device_for(backend)
    g = torch.Generator().manual_seed(c["seed"])
    dtype, S = DTYPES[c["dtype"]], 2 * c["B"]
    h = torch.randn(S, c["T"], c["H"], generator=g).to(dtype).to(dev)
    W = (torch.randn(c["V"], c["H"], generator=g) / math.sqrt(c["H"])).to(dtype).to(dev)
    y = torch.randint(0, c["V"], (S, c["T"]), generator=g)
    for i, p in enumerate(c["prompt_lens"]):
        y[i, :p] = -100
    y = y.to(dev)
    rc, rr = -torch.rand(c["B"], generator=g) * 10, -torch.rand(c["B"], generator=g) * 10
    opts = dict(beta=c["beta"], loss_type=c["loss_type"], label_smoothing=c["label_smoothing"],
                average_logps=c["average_logps"], nll_coef=c["nll_coef"], use_weighting=c["use_weighting"])
    hg, Wg = h.clone().requires_grad_(), W.clone().requires_grad_()
    loss, _ = fa.linear_dpo_loss(hg, Wg, y, ref_chosen_logps=rc.to(dev), ref_rejected_logps=rr.to(dev),
                                 backend=backend, **opts)
    h64, W64 = leaf64(h), leaf64(W)
    ref = linear_dpo_loss_reference(h64, W64, y, ref_chosen_logps=rc.double(), ref_rejected_logps=rr.double(),
                                    **opts)
    assert abs(loss.item() - ref.item()) <= 1e-4 + 1e-5 * abs(ref.item()), (loss.item(), ref.item())
    loss.backward()
    ref.backward()
    assert _grad_close(hg.grad, h64.grad, dtype), rel_err(hg.grad, h64.grad)
    assert _grad_close(Wg.grad, W64.grad, dtype), rel_err(Wg.grad, W64.grad)
