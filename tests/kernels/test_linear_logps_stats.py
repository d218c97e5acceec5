"""fa.linear_logps(outputs=...): the forward-only statistics TRL logs, against the float64 reference.

log Σ p², the mean logit and is_top1 come out of the same fused pass as log-probs and entropy, merge
exactly across vocabulary splits (the interpreter's tiles give V = 257 five splits) and shards, and carry
no gradient (as TRL's `ChunkedLogProbFunction`); asking for them leaves logps, entropy and every
gradient unchanged.
"""

import pytest
import torch
from helpers import BACKENDS, FWD_ATOL, device_for, max_abs, rel_err
from test_linear_logps import make_inputs

import fusealign as fa
from fusealign.kernels.linear_logps import OUTPUTS
from fusealign.kernels.reference import head_logits, linear_logps_reference
from fusealign.kernels.vocab_parallel import combine_stats, shard_stats

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def with_top1_targets(hidden, weight, bias, targets, **opts):
    """Every other valid target set to its row's argmax, so is_top1 is True often, not by chance."""
    logits = head_logits(hidden, weight, bias, dtype=torch.float64, **opts)
    y = targets.clone()
    pick = (torch.arange(len(y), device=y.device) % 2 == 0) & (y != -100)
    y[pick] = logits.argmax(-1)[pick].to(y.dtype)
    return y, logits


def check_stats(backend, hidden, weight, bias, targets, **opts):
    y, logits = with_top1_targets(hidden, weight, bias, targets, **opts)
    out = fa.linear_logps(hidden, weight, y, bias=bias, outputs=OUTPUTS, backend=backend, **opts)
    ref = linear_logps_reference(hidden.double(), weight.double(), y, bias=None if bias is None else bias.double(),
                                 outputs=OUTPUTS, dtype=torch.float64, **opts)
    tol = FWD_ATOL[hidden.dtype]
    for name, ours, expected in zip(OUTPUTS[:4], out[:4], ref[:4]):
        assert ours.dtype == torch.float32 and ours.shape == y.shape, name
        assert max_abs(ours, expected) <= tol, (name, max_abs(ours, expected))
    top1, ref_top1 = out[4], ref[4]
    assert top1.dtype == torch.bool and top1.shape == y.shape
    # Compare where the float64 top two logits are apart by more than fp32 rounding of the logits.
    top2 = logits.topk(min(2, logits.shape[-1]), -1).values
    clear = (top2[..., 0] - top2[..., -1]) > 1e-4 * (1 + top2[..., 0].abs()) if top2.shape[-1] == 2 else top2[..., 0] == top2[..., 0]
    assert torch.equal(top1[clear], ref_top1[clear])
    assert ref_top1.any() and not top1[y == -100].any()
    for ours in out[:4]:
        assert (ours[y == -100] == 0).all()
    return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("V", [1, 257, 1000])
def test_stats_match_reference_awkward_vocab(backend, dtype, V):
    hidden, weight, bias, targets = make_inputs(24, 48, V, dtype, device_for(backend), bias=True)
    check_stats(backend, hidden, weight, bias, targets)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("opts", [dict(temperature=0.7), dict(softcap=2.0, temperature=1.3)], ids=["T0.7", "softcap+T"])
def test_stats_temperature_and_softcap(backend, opts):
    hidden, weight, bias, targets = make_inputs(20, 32, 300, torch.bfloat16, device_for(backend), bias=True, scale=3.0)
    check_stats(backend, hidden, weight, bias, targets, **opts)


@pytest.mark.parametrize("backend", BACKENDS)
def test_is_top1_breaks_ties_like_argmax(backend):
    """Two identical head rows tie exactly: only the first of them is the argmax (torch.argmax, TRL)."""
    dev = device_for(backend)
    hidden, weight, _, _ = make_inputs(6, 16, 200, torch.float32, dev)
    first = (hidden @ weight.T).argmax(-1)  # (6,)
    weight = weight.clone()
    weight[150:] = weight[:50]  # columns 150..199 duplicate 0..49
    weight[199] = weight[int(first[0])]  # row 0's argmax, duplicated after it
    z = hidden @ weight.T
    a = z.argmax(-1)
    y = torch.stack([a[0], torch.tensor(199, device=dev), a[2], a[3], a[4], a[5]])
    (top1,) = fa.linear_logps(hidden, weight, y, outputs=("is_top1",), backend=backend)
    expected = z.argmax(-1) == y
    assert torch.equal(top1, expected) and not top1[1] and top1[0]


@pytest.mark.parametrize("backend", BACKENDS)
def test_outputs_in_requested_order_and_no_gradient_through_stats(backend):
    dev = device_for(backend)
    hidden, weight, bias, targets = make_inputs(16, 32, 100, torch.float32, dev, bias=True)
    h1, w1 = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    h2, w2 = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    top1, entropy, lssp, logps, mean = fa.linear_logps(
        h1, w1, targets, bias=bias, backend=backend,
        outputs=("is_top1", "entropy", "log_sum_sq_probs", "logps", "mean_logits"))
    assert not (top1.requires_grad or lssp.requires_grad or mean.requires_grad)
    logps2, entropy2 = fa.linear_logps(h2, w2, targets, bias=bias, backend=backend, return_entropy=True)
    # Equal up to fp32 rounding: on a GPU the forward with statistics uses narrower vocabulary tiles (tiles.py).
    assert max_abs(logps, logps2) < 1e-5 and max_abs(entropy, entropy2) < 1e-5
    g = torch.linspace(-1, 1, len(targets), device=dev)
    (logps * g + entropy * g.flip(0)).sum().backward()
    (logps2 * g + entropy2 * g.flip(0)).sum().backward()
    assert rel_err(h1.grad, h2.grad) < 1e-5 and rel_err(w1.grad, w2.grad) < 1e-5
    (only,) = fa.linear_logps(hidden, weight, targets, outputs=("logps",), backend=backend)
    assert torch.equal(only, fa.linear_logps(hidden, weight, targets, backend=backend))
    with torch.no_grad():  # the no-grad path gives the same statistics
        again = fa.linear_logps(hidden, weight, targets, bias=bias, outputs=("log_sum_sq_probs", "is_top1"),
                                backend=backend)
    assert torch.equal(again[0], lssp) and torch.equal(again[1], top1)


def test_torch_backend_chunks_give_the_same_stats():
    hidden, weight, bias, targets = make_inputs(40, 16, 300, torch.float32, "cpu", bias=True)
    whole = fa.linear_logps(hidden, weight, targets, bias=bias, outputs=OUTPUTS, backend="torch")
    small = fa.linear_logps(hidden, weight, targets, bias=bias, outputs=OUTPUTS, backend="torch",
                            chunk_bytes=9 * 300 * 7)  # 7 rows per chunk
    for a, b in zip(whole, small):
        assert torch.equal(a, b)


def test_empty_and_bad_outputs():
    hidden, weight, _, targets = make_inputs(0, 8, 10, torch.float32, "cpu")
    out = fa.linear_logps(hidden, weight, targets, outputs=OUTPUTS, backend="torch")
    assert [o.shape for o in out] == [(0,)] * 5 and out[4].dtype == torch.bool
    hidden, weight, _, targets = make_inputs(4, 8, 10, torch.float32, "cpu")
    for bad in (("logps", "logps"), ("logits",), (), "logps"):
        with pytest.raises((ValueError, TypeError)):
            fa.linear_logps(hidden, weight, targets, outputs=bad)
    with pytest.raises(ValueError, match="not both"):
        fa.linear_logps(hidden, weight, targets, outputs=("logps",), return_entropy=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_stats_combine_across_vocabulary_shards(backend):
    dev = device_for(backend)
    hidden, weight, _, targets = make_inputs(20, 32, 301, torch.float32, dev)
    targets, _ = with_top1_targets(hidden, weight, None, targets, temperature=0.8)
    full = fa.linear_logps(hidden, weight, targets, outputs=OUTPUTS, temperature=0.8, backend=backend)
    bounds = [0, 90, 91, 250, 301]  # uneven shards, one of a single row
    stats = torch.cat([shard_stats(hidden, weight[a:b], targets, vocab_start=a, temperature=0.8, backend=backend,
                                   extra=True) for a, b in zip(bounds, bounds[1:])])
    logps, entropy, _, (lssp, mean, top1) = combine_stats(stats, targets, -100, vocab_size=301)
    for ours, whole in zip((logps, entropy, lssp, mean), full[:4]):
        assert max_abs(ours, whole) < 1e-5
    assert torch.equal(top1, full[4]) and top1.any()
