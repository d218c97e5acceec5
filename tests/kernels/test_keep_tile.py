"""Keep-when-it-fits (issue 23): the torch backend's forward keeps its fp32 logit tile(s) when the whole batch
fits `chunk_bytes`, and the backward forms ∂logits from them without recomputing the logits (3 GEMMs, not 4).

Checked against the float64 reference and against the recomputing path (a `chunk_bytes` one byte too small
to keep): with and without an entropy gradient, softcap / temperature / bias, bf16 inputs, `requires_grad` on
only some inputs, `retain_graph=True` and a second backward (the first consumes the tile; the second
recomputes — with a different upstream gradient, so a stale tile would show), `torch.no_grad()` (nothing
kept), `linear_kl` in both directions, and vocabulary shards on 2 gloo ranks. The logit matmuls are counted
by wrapping the backend's `mm_into`.
"""

import os
import tempfile

import pytest
import torch

import fusealign as fa
from fusealign.kernels import linear_kl_torch as klt
from fusealign.kernels import linear_logps_torch as lt
from fusealign.kernels.reference import linear_kl_reference, linear_logps_reference

N, H, V = 40, 16, 300
KEEP = 4 * N * V  # the tile's bytes: kept at exactly this budget, not one byte below


@pytest.fixture
def mm_calls(monkeypatch):
    calls = []
    orig = lt.mm_into

    def counting(out, *args):
        calls.append(tuple(out.shape))
        return orig(out, *args)

    monkeypatch.setattr(lt, "mm_into", counting)
    monkeypatch.setattr(klt, "mm_into", counting)
    return calls


def data(dtype=torch.float32, seed=0, bias=False):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, H, generator=g).to(dtype)
    W = (torch.randn(V, H, generator=g) / H**0.5).to(dtype)
    b = (torch.randn(V, generator=g) * 0.3).to(dtype) if bias else None
    y = torch.randint(0, V, (N,), generator=g)
    y[[3, 17]] = -100
    w_lp, w_ent = torch.randn(N, generator=g), torch.randn(N, generator=g)
    return h, W, b, y, w_lp, w_ent


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def grads(h, W, b, y, w_lp, w_ent, *, entropy, chunk_bytes, wanted=(True, True, True), **opts):
    leaves = [t.clone().requires_grad_(w) if t is not None else None for t, w in zip((h, W, b), wanted)]
    out = fa.linear_logps(leaves[0], leaves[1], y, bias=leaves[2], return_entropy=entropy, backend="torch",
                          chunk_bytes=chunk_bytes, **opts)
    loss = (out[0] * w_lp).sum() + (out[1] * w_ent).sum() if entropy else (out * w_lp).sum()
    loss.backward()
    return [None if t is None or not t.requires_grad else t.grad for t in leaves]


def reference_grads(h, W, b, y, w_lp, w_ent, *, entropy, **opts):
    leaves = [None if t is None else t.double().requires_grad_() for t in (h, W, b)]
    out = linear_logps_reference(leaves[0], leaves[1], y, bias=leaves[2], return_entropy=True, dtype=torch.float64,
                                 **opts)
    loss = (out[0] * w_lp.double()).sum() + ((out[1] * w_ent.double()).sum() if entropy else 0)
    loss.backward()
    return [None if t is None else t.grad for t in leaves]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("entropy", [False, True])
@pytest.mark.parametrize("opts", [{}, dict(softcap=5.0, temperature=0.7)], ids=["plain", "softcap-T"])
def test_kept_tile_backward_equals_recompute_and_reference(mm_calls, dtype, entropy, opts):
    h, W, b, y, w_lp, w_ent = data(dtype, bias=True)
    kept = grads(h, W, b, y, w_lp, w_ent, entropy=entropy, chunk_bytes=KEEP, **opts)
    assert mm_calls == [(N, V)]  # one forward GEMM, none in backward: the tile was kept
    mm_calls.clear()
    recomputed = grads(h, W, b, y, w_lp, w_ent, entropy=entropy, chunk_bytes=KEEP - 1, **opts)
    assert len(mm_calls) >= 3 and all(s[0] < N for s in mm_calls)  # chunked forward, and backward recomputes
    ref = reference_grads(h, W, b, y, w_lp, w_ent, entropy=entropy, **opts)
    tol = 1e-5 if dtype == torch.float32 else 1e-2  # bf16: the returned gradients are rounded to bf16
    for name, k, r, f in zip(("dh", "dW", "db"), kept, recomputed, ref):
        assert rel(k, f) < tol and rel(r, f) < tol, (name, rel(k, f), rel(r, f))
        if dtype == torch.float32:
            assert rel(k, r) < 1e-6, name


@pytest.mark.parametrize("wanted", [(False, True, False), (True, False, False), (False, False, True)],
                         ids=["weight-only", "hidden-only", "bias-only"])
def test_requires_grad_on_some_inputs(mm_calls, wanted):
    h, W, b, y, w_lp, w_ent = data(bias=True)
    got = grads(h, W, b, y, w_lp, w_ent, entropy=True, chunk_bytes=KEEP, wanted=wanted, temperature=0.9)
    assert mm_calls == [(N, V)]
    ref = reference_grads(h, W, b, y, w_lp, w_ent, entropy=True, temperature=0.9)
    for want, g, r in zip(wanted, got, ref):
        assert (g is not None) == want
        if want:
            assert rel(g, r) < 1e-5


def test_retain_graph_second_backward_recomputes(mm_calls):
    h, W, b, y, w_lp, w_ent = data()
    hg, Wg = h.clone().requires_grad_(), W.clone().requires_grad_()
    logps, ent = fa.linear_logps(hg, Wg, y, return_entropy=True, backend="torch", softcap=4.0)
    assert len(mm_calls) == 1
    first = torch.autograd.grad((logps, ent), (hg, Wg), (w_lp, w_ent), retain_graph=True)
    assert len(mm_calls) == 1  # from the kept tile
    # A different upstream gradient: a stale (already overwritten) tile would give wrong numbers here.
    second = torch.autograd.grad((logps, ent), (hg, Wg), (w_ent, -w_lp))
    assert len(mm_calls) == 2  # the tile was consumed: recomputed
    for got, (a, c) in ((first, (w_lp, w_ent)), (second, (w_ent, -w_lp))):
        ref = reference_grads(h, W, None, y, a, c, entropy=True, softcap=4.0)
        assert rel(got[0], ref[0]) < 1e-5 and rel(got[1], ref[1]) < 1e-5


def test_no_grad_keeps_nothing(monkeypatch):
    seen = []
    orig = lt.partial_stats

    def recording(*args, keep=False, **kwargs):
        seen.append(keep)
        return orig(*args, keep=keep, **kwargs)

    monkeypatch.setattr(lt, "partial_stats", recording)
    h, W, b, y, *_ = data()
    Wg = W.clone().requires_grad_()
    with torch.no_grad():
        out = fa.linear_logps(h, Wg, y, backend="torch")
    assert seen == [False] and out.grad_fn is None
    fa.linear_logps(h, W, y, backend="torch")  # grad enabled, nothing requires grad: the no-grad path too
    assert seen == [False, False]
    out = fa.linear_logps(h, Wg, y, backend="torch")
    assert seen == [False, False, True] and out.grad_fn is not None


def test_logps_only_skips_entropy_and_matches(mm_calls):
    """Without entropy the forward skips its reductions (row a is NaN in the statistics); log-probs unchanged."""
    h, W, b, y, *_ = data()
    stats = lt.partial_stats(h, W, None, y, temperature=1.0, softcap=None, chunk_bytes=KEEP, entropy=False)
    assert torch.isnan(stats[0, 2]).all() and torch.isfinite(stats[0, [0, 1, 3]]).all()
    full = lt.partial_stats(h, W, None, y, temperature=1.0, softcap=None, chunk_bytes=KEEP)
    assert torch.equal(stats[0, [0, 1, 3]], full[0, [0, 1, 3]])
    with torch.no_grad():
        alone = fa.linear_logps(h, W, y, backend="torch")
        both = fa.linear_logps(h, W, y, backend="torch", return_entropy=True)
    assert torch.equal(alone, both[0])
    # What is kept: for log-probs alone (no softcap) the exponentials e = exp(z − m), their shift m with them
    # (the backward's p = e·e^{m − lse} is one pass); with entropy or a softcap, the final logits themselves.
    kw = dict(temperature=1.0, chunk_bytes=KEEP, keep=True)
    _, kept = lt.partial_stats(h, W, None, y, softcap=None, entropy=False, **kw)
    z = h @ W.T
    assert torch.equal(kept.shift, z.amax(-1)) and torch.allclose(kept.tile, (z - kept.shift[:, None]).exp())
    for entropy, softcap in ((True, None), (False, 5.0)):
        _, kept = lt.partial_stats(h, W, None, y, softcap=softcap, entropy=entropy, **kw)
        assert kept.shift is None and torch.allclose(kept.tile, z if softcap is None else 5 * torch.tanh(z / 5), atol=1e-5)
    _, kept = lt.partial_stats(h, W, None, y, softcap=None, entropy=False, **dict(kw, chunk_bytes=KEEP - 1))
    assert kept is None


@pytest.mark.parametrize("direction", ["forward", "reverse"])
@pytest.mark.parametrize("opts", [{}, dict(softcap=5.0, temperature=0.7)], ids=["plain", "softcap-T"])
def test_kl_kept_tiles(mm_calls, direction, opts):
    h, W, b, y, w, w2 = data(bias=True)
    g = torch.Generator().manual_seed(5)
    hr, Wr = torch.randn(N, 24, generator=g), torch.randn(V, 24, generator=g) / 24**0.5
    mask = y != -100

    def run(chunk_bytes, weights):
        hg, Wg, bg = h.clone().requires_grad_(), W.clone().requires_grad_(), b.clone().requires_grad_()
        kl = fa.linear_kl(hg, Wg, hr, Wr, mask=mask, direction=direction, bias=bg, backend="torch",
                          chunk_bytes=chunk_bytes, **opts)
        out = []
        for i, u in enumerate(weights):
            out.append(torch.autograd.grad(kl, (hg, Wg, bg), u, retain_graph=i + 1 < len(weights)))
        return out

    ref = []
    for u in (w, w2):
        hd, Wd, bd = (t.double().requires_grad_() for t in (h, W, b))
        kl = linear_kl_reference(hd, Wd, hr.double(), Wr.double(), mask=mask, direction=direction, bias=bd,
                                 dtype=torch.float64, **opts)
        ref.append(torch.autograd.grad(kl, (hd, Wd, bd), u.double()))
    kept = run(2 * KEEP, (w, w2))  # two heads: 8 bytes per logit
    assert mm_calls == [(N, V), (N, V), (N, V), (N, V)]  # forward: both heads; second backward: both again
    mm_calls.clear()
    recomputed = run(2 * KEEP - 1, (w,))
    assert all(s[0] < N for s in mm_calls)
    for got, r in zip(kept + recomputed, ref + ref[:1]):
        for a, c in zip(got, r):
            assert rel(a, c) < 1e-5


def _shard_worker(rank, world, store_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.FileStore(store_path, world), rank=rank, world_size=world)
    try:
        bounds = [0, 130, V]
        lo, hi = bounds[rank], bounds[rank + 1]
        h, W, b, y, w_lp, w_ent = data(bias=True)
        opts = dict(temperature=0.8, softcap=6.0, backend="torch")
        ref = reference_grads(h, W, b, y, w_lp, w_ent, entropy=True, temperature=0.8, softcap=6.0)
        calls = []
        orig = lt.mm_into
        lt.mm_into = lambda out, *a: calls.append(out.shape[0]) or orig(out, *a)  # a forked child: no undo needed
        for chunk_bytes in (4 * N * (hi - lo), 4 * N * (hi - lo) - 1):  # this shard's tile kept, or recomputed
            calls.clear()
            hp, Wp, bp = h.clone().requires_grad_(), W[lo:hi].clone().requires_grad_(), b[lo:hi].clone().requires_grad_()
            logps, ent = fa.linear_logps(hp, Wp, y, bias=bp, return_entropy=True, vocab_start=lo, vocab_size=V,
                                         group=dist.group.WORLD, chunk_bytes=chunk_bytes, **opts)
            for rep in range(2):  # retain_graph: the second backward recomputes (kept tile consumed)
                gh, gW, gb = torch.autograd.grad((logps, ent), (hp, Wp, bp), (w_lp, w_ent), retain_graph=rep == 0)
                assert rel(gh, ref[0]) < 1e-5 and rel(gW, ref[1][lo:hi]) < 1e-5 and rel(gb, ref[2][lo:hi]) < 1e-5
                if rep == 0 and chunk_bytes == 4 * N * (hi - lo):
                    assert calls == [N]  # forward only: the first backward used the kept tile
            if chunk_bytes == 4 * N * (hi - lo):
                assert calls == [N, N]  # the second backward recomputed
            else:
                assert all(c < N for c in calls) and len(calls) >= 4
    finally:
        dist.destroy_process_group()


def test_vocabulary_shards_keep_and_recompute():
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as d:
        mp.start_processes(_shard_worker, args=(2, os.path.join(d, "store")), nprocs=2, join=True,
                           start_method="fork")
