"""The Hopper-grade candidates (kernels/candidates.py) against float64 references, and their selection.

Each candidate runs through the public ops (`force_candidate`), so the same checks as the default kernels
apply: forward values and gradients vs the float64 materialised reference, batch invariance (a token's
log-prob alone = in a batch, bitwise), ignored rows, −inf logits. On the CPU the interpreter runs them:
the persistent kernels through tensor descriptors (the interpreter emulates `tl.make_tensor_descriptor`
as masked loads with zero padding, TMA's semantics) and, for operands TMA cannot read (a row stride that
is not a multiple of 16 bytes), through the same kernels' pointer loads; the hybrid's cuBLAS GEMM is a CPU
matmul. GPU-only checks (`@pytest.mark.gpu`) rerun them on CUDA at a real shape, and check that cuBLAS keeps
the hybrid batch-invariant.
"""

import importlib
import json

import pytest
import torch
from helpers import FWD_ATOL, GRAD_RTOL, HAS_CUDA, TRITON_DEVICE, leaf64, max_abs, rel_err
from test_linear_logps import check_against_reference, make_inputs

import fusealign as fa
from fusealign.kernels.candidates import (DEFAULT, MODULES, force_candidate, select_candidate, table_key,
                                          vclass)
from fusealign.kernels.reference import linear_kl_reference, linear_logps_reference

candidates = importlib.import_module("fusealign.kernels.candidates")
CANDIDATES = [c for c in MODULES if c != DEFAULT]
DTYPES = (torch.float32, torch.bfloat16)


@pytest.mark.parametrize("cand", CANDIDATES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_logps_matches_reference(cand, dtype):
    hidden, weight, bias, targets = make_inputs(37, 48, 300, dtype, TRITON_DEVICE, bias=True, scale=3.0)
    with force_candidate(cand):
        check_against_reference("triton", hidden, weight, bias, targets, softcap=5.0, temperature=0.8)


@pytest.mark.parametrize("cand", CANDIDATES)
def test_logps_plain_and_unaligned_rows(cand):
    """No bias / softcap, V not a multiple of any tile, and H = 36 (bf16 rows of 72 bytes: no TMA)."""
    from fusealign.kernels.linear_logps_persistent import use_tma

    hidden, weight, bias, targets = make_inputs(21, 36, 1000, torch.bfloat16, TRITON_DEVICE)
    assert not use_tma(hidden, weight)
    with force_candidate(cand):
        check_against_reference("triton", hidden, weight, None, targets)


@pytest.mark.parametrize("cand", CANDIDATES)
def test_forward_statistics(cand):
    """TRL's logged statistics from the candidate's forward pass, vs float64."""
    hidden, weight, _, targets = make_inputs(26, 32, 300, torch.float32, TRITON_DEVICE, scale=2.0)
    names = ("logps", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
    with force_candidate(cand):
        out = fa.linear_logps(hidden, weight, targets, outputs=names, backend="triton")
    ref = linear_logps_reference(hidden.double(), weight.double(), targets, outputs=names, dtype=torch.float64)
    for name, o, r in zip(names, out, ref):
        if name == "is_top1":
            assert torch.equal(o.cpu(), r.cpu()), name
        else:
            assert max_abs(o, r) <= 1e-4, name


@pytest.mark.parametrize("cand", CANDIDATES)
def test_batch_invariance(cand):
    """A token's forward results do not depend on the batch it is scored in (tiles never depend on N)."""
    hidden, weight, _, targets = make_inputs(40, 32, 300, torch.bfloat16, TRITON_DEVICE, ignore_frac=0.0)
    with force_candidate(cand), torch.no_grad():
        full = fa.linear_logps(hidden, weight, targets, return_entropy=True, backend="triton")
        for i in (0, 17, 39):
            one = fa.linear_logps(hidden[i:i + 1], weight, targets[i:i + 1], return_entropy=True, backend="triton")
            assert torch.equal(one[0], full[0][i:i + 1]) and torch.equal(one[1], full[1][i:i + 1]), i


@pytest.mark.parametrize("cand", CANDIDATES)
def test_minus_inf_logits(cand):
    """A vocabulary padded by a −inf bias is the unpadded vocabulary: p = 0 there, gradients finite and 0."""
    hidden, weight, _, targets = make_inputs(12, 32, 200, torch.float32, TRITON_DEVICE, ignore_frac=0.0)
    targets = targets % 150
    bias = torch.zeros(200, device=TRITON_DEVICE)
    bias[150:] = float("-inf")
    h, W = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    with force_candidate(cand):
        logps, entropy = fa.linear_logps(h, W, targets, bias=bias, return_entropy=True, backend="triton")
    h64, W64 = leaf64(hidden), leaf64(weight[:150])
    ref_l, ref_e = linear_logps_reference(h64, W64, targets, return_entropy=True, dtype=torch.float64)
    assert max_abs(logps, ref_l) < 1e-4 and max_abs(entropy, ref_e) < 1e-4
    (logps.sum() + entropy.sum()).backward()
    (ref_l.sum() + ref_e.sum()).backward()
    assert rel_err(h.grad, h64.grad) <= 1e-4 and rel_err(W.grad[:150], W64.grad) <= 1e-4
    assert torch.count_nonzero(W.grad[150:]) == 0


@pytest.mark.parametrize("direction", ["forward", "reverse"])
@pytest.mark.parametrize("dtypes", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                    (torch.bfloat16, torch.float32)], ids=["fp32", "bf16", "bf16+fp32ref"])
def test_kl_persistent_matches_reference(direction, dtypes):
    g = torch.Generator().manual_seed(0)
    N, H, Hr, V = 19, 32, 48, 300
    mk = lambda *s, dt: torch.randn(*s, generator=g).to(dt).to(TRITON_DEVICE)  # noqa: E731
    h, W = mk(N, H, dt=dtypes[0]), (mk(V, H, dt=torch.float32) / H**0.5).to(dtypes[0])
    hr, Wr = mk(N, Hr, dt=dtypes[1]), (mk(V, Hr, dt=torch.float32) / Hr**0.5).to(dtypes[1])
    b, br = mk(V, dt=dtypes[0]), mk(V, dt=dtypes[1])
    mask = torch.rand(N, generator=g) > 0.2
    hg, Wg, bg = (t.clone().requires_grad_() for t in (h, W, b))
    with force_candidate("persistent"):
        kl = fa.linear_kl(hg, Wg, hr, Wr, bias=bg, ref_bias=br, mask=mask.to(TRITON_DEVICE), softcap=4.0,
                          temperature=0.9, direction=direction, backend="triton")
    h64, W64, b64 = leaf64(h), leaf64(W), leaf64(b)
    ref = linear_kl_reference(h64, W64, hr.double(), Wr.double(), bias=b64, ref_bias=br.double(), mask=mask,
                              softcap=4.0, temperature=0.9, direction=direction, dtype=torch.float64)
    assert max_abs(kl, ref) <= FWD_ATOL[dtypes[0]]
    gk = torch.randn(N, generator=g, dtype=torch.float64)
    (kl * gk.to(kl.device).float()).sum().backward()
    (ref * gk).sum().backward()
    for name, o, r in (("hidden", hg, h64), ("weight", Wg, W64), ("bias", bg, b64)):
        assert rel_err(o.grad, r.grad) <= GRAD_RTOL[dtypes[0]], name


@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_kl_persistent_both_heads_minus_inf(direction):
    """Columns that are −inf in both heads (a padded vocabulary): e_a·(a − b) is guarded, no NaN."""
    g = torch.Generator().manual_seed(1)
    N, H, V = 9, 16, 100
    h, hr = torch.randn(N, H, generator=g), torch.randn(N, H, generator=g)
    W, Wr = torch.randn(V, H, generator=g) / 4, torch.randn(V, H, generator=g) / 4
    b = torch.zeros(V)
    b[80:] = float("-inf")
    with force_candidate("persistent"), torch.no_grad():
        kl = fa.linear_kl(h.to(TRITON_DEVICE), W.to(TRITON_DEVICE), hr.to(TRITON_DEVICE), Wr.to(TRITON_DEVICE),
                          bias=b.to(TRITON_DEVICE), ref_bias=b.to(TRITON_DEVICE), direction=direction,
                          backend="triton")
    # The padded columns have probability 0 under both heads: the KL of the unpadded vocabulary.
    ref = linear_kl_reference(h.double(), W[:80].double(), hr.double(), Wr[:80].double(), direction=direction,
                              dtype=torch.float64)
    assert torch.isfinite(kl).all() and max_abs(kl, ref) <= 1e-4


def test_bare_matmul_is_the_matmul():
    from fusealign.kernels.bare_matmul import bare_matmul

    g = torch.Generator().manual_seed(0)
    for dtype, (N, H, V) in ((torch.float32, (37, 48, 300)), (torch.bfloat16, (20, 64, 130))):
        h, W = torch.randn(N, H, generator=g).to(dtype), torch.randn(V, H, generator=g).to(dtype)
        out = bare_matmul(h.to(TRITON_DEVICE), W.to(TRITON_DEVICE))
        assert out.dtype == dtype and out.shape == (N, V)
        assert rel_err(out, h.double() @ W.double().T) <= (1e-6 if dtype == torch.float32 else 4e-3)


# ----------------------------------------------------------------------------- selection


def test_vclass_and_key():
    assert [vclass(v) for v in (1, 32000, 65536, 65537, 128256, 151936, 196608, 262144)] == \
        ["V32k", "V32k", "V32k", "V128k", "V128k", "V128k", "V128k", "V256k"]
    assert table_key(90, torch.bfloat16, 4096, 128256) == "sm_90/bfloat16/H4096/V128k"


def _fake_cuda(monkeypatch, capability=(9, 0)):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    return torch.device("cuda", 0)


def test_select_from_table(monkeypatch):
    dev = _fake_cuda(monkeypatch)
    table = {"sm_90/bfloat16/H4096/V128k": {"logps": "persistent", "kl": "fused"},
             "sm_90/bfloat16/H4096/V256k": {"logps": "hybrid"},
             "sm_90/float16/H4096/V128k": {"logps": "no-such-kernel"},
             "sm_90/bfloat16/H2048/V32k": "persistent"}
    sel = lambda *a, **k: select_candidate(*a, table=table, **k)  # noqa: E731
    assert sel(dev, torch.bfloat16, 4096, 128256) == "persistent"
    assert sel(dev, torch.bfloat16, 4096, 151936) == "persistent"  # the same V class
    assert sel(dev, torch.bfloat16, 4096, 128256, op="kl") == "fused"
    assert sel(dev, torch.bfloat16, 4096, 262144) == "hybrid"
    assert sel(dev, torch.bfloat16, 4096, 262144, op="kl") == DEFAULT  # no entry for the op
    assert sel(dev, torch.bfloat16, 8192, 128256) == DEFAULT  # no entry for the class
    assert sel(dev, torch.float16, 4096, 128256) == DEFAULT  # unknown name: the default, not an error
    assert sel(dev, torch.bfloat16, 2048, 32000) == DEFAULT  # malformed entry
    assert select_candidate(torch.device("cpu"), torch.bfloat16, 4096, 128256, table=table) == DEFAULT
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert sel(dev, torch.bfloat16, 4096, 128256) == DEFAULT  # another architecture
    with pytest.raises(ValueError, match="op must be one of"):
        sel(dev, torch.bfloat16, 4096, 128256, op="dpo")


def test_forcing_and_env(monkeypatch):
    dev = _fake_cuda(monkeypatch)
    with force_candidate("hybrid"):
        assert select_candidate(dev, torch.bfloat16, 4096, 128256, table={}) == "hybrid"
        assert select_candidate(torch.device("cpu"), torch.float32, 64, 300) == "hybrid"
    monkeypatch.setenv("FUSEALIGN_CANDIDATE", "persistent")
    assert select_candidate(dev, torch.bfloat16, 4096, 128256, table={}) == "persistent"
    monkeypatch.setenv("FUSEALIGN_CANDIDATE", "fastest")
    with pytest.raises(ValueError, match="unknown FUSEALIGN_CANDIDATE / force_candidate 'fastest'"):
        select_candidate(dev, torch.bfloat16, 4096, 128256, table={})
    with pytest.raises(ValueError, match="unknown candidate"):
        with force_candidate("nope"):
            pass


def test_table_file(tmp_path, monkeypatch):
    """tuned.json: read when present (and re-read when it changes); absent means no entries; a bad file is an error."""
    path = tmp_path / "tuned.json"
    assert candidates.load_table(path) == {}
    path.write_text(json.dumps({"version": 1, "entries": {"sm_90/bfloat16/H4096/V128k": {"logps": "hybrid"}}}))
    assert candidates.load_table(path)["sm_90/bfloat16/H4096/V128k"]["logps"] == "hybrid"
    path.write_text(json.dumps({"entries": []}))
    with pytest.raises(ValueError, match="expected"):
        candidates.load_table(path)
    committed = candidates.load_table()  # the repository's table parses
    assert isinstance(committed, dict)
    for key, entry in committed.items():
        assert all(v in MODULES for v in entry.values()), key


def test_dispatch_uses_the_selection(monkeypatch):
    """linear_logps on the Triton path asks select_candidate with the call's (device, dtype, H, V)."""
    seen = []
    real = candidates.select_candidate

    def spy(device, dtype, H, V, op="logps", table=None):
        seen.append((device.type, dtype, H, V, op))
        return real(device, dtype, H, V, op, table)

    monkeypatch.setattr(candidates, "select_candidate", spy)
    hidden, weight, _, targets = make_inputs(8, 16, 40, torch.float32, TRITON_DEVICE)
    with torch.no_grad():
        fa.linear_logps(hidden, weight, targets, backend="triton")
        fa.linear_kl(hidden, weight, hidden, weight, backend="triton")
    assert (TRITON_DEVICE, torch.float32, 16, 40, "logps") in seen
    assert (TRITON_DEVICE, torch.float32, 16, 40, "kl") in seen


# ----------------------------------------------------------------------------- GPU-only


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("cand", CANDIDATES)
def test_candidate_cuda_real_shape(cand):
    """bf16 at H = 4,096, V = 32,000 (tiles, TMA and the persistent grid as they run in production)."""
    hidden, weight, _, targets = make_inputs(1024, 4096, 32000, torch.bfloat16, "cuda")
    with force_candidate(cand):
        check_against_reference("triton", hidden, weight, None, targets, entropy_grad=True)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("cand", MODULES)
def test_batch_invariant_cuda(cand):
    """On the GPU: token i alone, in a batch of 3,000 and at another position give bitwise-equal log-probs
    (for "hybrid" this checks that cuBLAS's fp32 GEMM is position-independent at a fixed shape)."""
    hidden, weight, _, targets = make_inputs(3000, 2048, 32000, torch.bfloat16, "cuda", ignore_frac=0.0)
    with force_candidate(cand), torch.no_grad():
        full = fa.linear_logps(hidden, weight, targets, backend="triton")
        perm = torch.roll(torch.arange(3000, device="cuda"), 1234)
        rolled = fa.linear_logps(hidden[perm], weight, targets[perm], backend="triton")
        for i in (0, 1, 777, 2999):
            one = fa.linear_logps(hidden[i:i + 1], weight, targets[i:i + 1], backend="triton")
            assert torch.equal(one, full[i:i + 1]), (cand, i)
        assert torch.equal(rolled, full[perm]), cand
