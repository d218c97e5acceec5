"""fusealign.integrations.verl against verl 0.9.1's own code, on CPU.

`import verl` does not work here (its package __init__ pulls ray, tensordict and transformers<5.11), so verl is
installed without dependencies (requirements-nodeps.txt) and its torch-only modules are loaded from the installed
files with the packages above them stubbed (`verl_modules`), which runs verl's real code:
1. values and gradients of our `linear_cross_entropy` vs verl's torch backend `FusedLinearForPPOFunction`
   (what `impl_backend=torch` runs); verl's Triton `linear_cross_entropy` needs CUDA, so `reduction="sum"/"mean"`
   are checked against a float64 reference written from its documented semantics (kernels.py's epilogue);
2. `enable()` on verl's real `verl.utils.kernel.linear_cross_entropy` module, then verl's own patched forward
   (`dense_common.forward_with_triton_backend`) on a tiny Qwen2 runs ours: log-probs, entropy and gradients equal
   the float64 materialised-logits computation.
"""

import importlib
import importlib.util
import os
import sys
import types

import pytest
import torch
from helpers import rel_err

from fusealign.integrations import verl as fa_verl
from fusealign.kernels.reference import linear_logps_reference

SPEC = importlib.util.find_spec("verl")
pytestmark = pytest.mark.skipif(SPEC is None, reason="verl not installed (requirements-nodeps.txt)")


@pytest.fixture
def verl_modules(monkeypatch):
    """verl's leaf modules, imported for real under stub parent packages (their __init__ is not run)."""
    root = SPEC.submodule_search_locations[0]
    before = {k for k in sys.modules if k == "verl" or k.startswith("verl.")}
    for name in ("verl", "verl.utils", "verl.utils.kernel", "verl.utils.experimental", "verl.models",
                 "verl.models.transformers"):
        pkg = types.ModuleType(name)
        pkg.__path__ = [os.path.join(root, *name.split(".")[1:])]
        monkeypatch.setitem(sys.modules, name, pkg)
    yield types.SimpleNamespace(
        torch_functional=importlib.import_module("verl.utils.experimental.torch_functional"),
        kernel=importlib.import_module("verl.utils.kernel.linear_cross_entropy"),
        dense_common=importlib.import_module("verl.models.transformers.dense_common"))
    fa_verl.disable()
    for k in [k for k in sys.modules if (k == "verl" or k.startswith("verl.")) and k not in before]:
        del sys.modules[k]


def inputs(N=40, H=32, V=301, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(N, H, generator=g), torch.randn(V, H, generator=g) / H ** 0.5,
            torch.randint(0, V, (N,), generator=g))


def value_and_grads(fn, h, W, y, T):
    h, W = h.clone().requires_grad_(True), W.clone().requires_grad_(True)
    logps, entropy = fn(h, W, y, T)
    g = torch.linspace(-1, 1, logps.numel())
    ((logps.reshape(-1) * g).sum() + (entropy.reshape(-1).float() * g.flip(0)).sum()).backward()
    return logps.reshape(-1), entropy.reshape(-1), h.grad, W.grad


@pytest.mark.parametrize("T", [1.0, 0.7])
@pytest.mark.parametrize("shape", ["flat", "batched"])
def test_matches_verl_torch_backend(verl_modules, T, shape):
    h, W, y = inputs()
    if shape == "batched":  # verl's models pass (B, T, H) hidden states with (B, T) labels
        h, y = h.view(4, 10, -1), y.view(4, 10)
    verl_fn = lambda h, W, y, T: verl_modules.torch_functional.FusedLinearForPPOFunction.apply(h, W, y, T, 16)  # noqa: E731
    ours = value_and_grads(fa_verl.linear_cross_entropy, h, W, y, T)
    theirs = value_and_grads(verl_fn, h, W, y, T)
    for name, a, e in zip(("log_probs", "entropy"), ours[:2], theirs[:2]):
        assert a.dtype == torch.float32 and a.shape == e.shape and (a - e).abs().max() < 2e-5, name
    for name, a, e in zip(("hidden", "weight"), ours[2:], theirs[2:]):
        assert a.shape == e.shape and rel_err(a, e) < 1e-5, name


@pytest.mark.parametrize("reduction", ["sum", "mean", "MEAN"])
def test_reductions_against_float64_reference(reduction):
    h, W, y = inputs(seed=1)
    h, W = h.bfloat16(), W.bfloat16()
    logps, entropy = fa_verl.linear_cross_entropy(h, W, y, 0.8, reduction)
    ref_l, ref_e = linear_logps_reference(h.double(), W.double(), y, temperature=0.8, return_entropy=True,
                                          dtype=torch.float64)
    expected = ref_l.sum() if reduction == "sum" else ref_l.sum() / y.numel()
    assert logps.shape == () and abs(logps.item() - expected.item()) < 1e-3 * max(1.0, abs(expected.item()))
    assert entropy.shape == y.shape and (entropy - ref_e).abs().max() < 1e-3


def _tp_worker(rank, world, store_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.FileStore(store_path, world), rank=rank, world_size=world)
    try:
        h, W, y = inputs(V=300, seed=2)
        V_p = W.shape[0] // world  # verl's even split: rank r holds rows [r·V_p, (r + 1)·V_p)
        own = slice(rank * V_p, (rank + 1) * V_p)
        full = value_and_grads(fa_verl.linear_cross_entropy, h, W, y, 0.7)
        part = value_and_grads(lambda h, W, y, T: fa_verl.linear_cross_entropy(
            h, W[own], y, T, dist_process_group=dist.group.WORLD), h, W, y, 0.7)
        for name, a, e in zip(("log_probs", "entropy", "d hidden"), part[:3], full[:3]):
            assert (a - e).abs().max() < 1e-5, name
        assert rel_err(part[3][own], full[3][own]) < 1e-5
        others = torch.ones(W.shape[0], dtype=torch.bool)
        others[own] = False
        assert part[3][others].abs().max() == 0  # the shard's gradient only
    finally:
        dist.destroy_process_group()


def test_dist_process_group_is_verls_tensor_parallel_head():
    """2 gloo ranks, each with half of the head (verl's layout): the single-process values and gradients."""
    import os
    import tempfile

    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as d:
        mp.start_processes(_tp_worker, args=(2, os.path.join(d, "store")), nprocs=2, join=True, start_method="fork")


def test_errors():
    h, W, y = inputs()
    with pytest.raises(TypeError, match="float"):
        fa_verl.linear_cross_entropy(h, W, y, 1)
    with pytest.raises(ValueError, match="reduction"):
        fa_verl.linear_cross_entropy(h, W, y, 1.0, "avg")


def test_enable_runs_inside_verls_patched_forward(verl_modules):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    V = 97
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2)).eval()
    ids = torch.randint(0, V, (1, 12), generator=torch.Generator().manual_seed(3))
    forward = verl_modules.dense_common.forward_with_triton_backend.__get__(model)  # verl's monkey-patched forward

    original = verl_modules.kernel.linear_cross_entropy
    fa_verl.enable()
    assert verl_modules.kernel.linear_cross_entropy is fa_verl.linear_cross_entropy
    out = forward(input_ids=ids, temperature=0.7, return_dict=True)
    w = torch.linspace(-1, 1, out.log_probs.numel())
    ((out.log_probs * w).sum() + (out.entropy * w.flip(0)).sum()).backward()
    ours = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    fa_verl.disable()
    assert verl_modules.kernel.linear_cross_entropy is original

    model.zero_grad()
    model.double()
    logits = model(input_ids=ids).logits.reshape(12, V)  # float64, materialised
    rolled = torch.roll(ids, -1, -1).reshape(-1)  # verl's labels: input ids rolled by one
    ref_l, ref_e = linear_logps_reference(logits, torch.eye(V, dtype=torch.float64), rolled, temperature=0.7,
                                          return_entropy=True, dtype=torch.float64)
    ((ref_l * w.double()).sum() + (ref_e * w.flip(0).double()).sum()).backward()
    assert out.log_probs.shape == (12,) and (out.log_probs.double() - ref_l).abs().max() < 2e-5
    assert (out.entropy.double() - ref_e).abs().max() < 2e-5
    for n, p in model.named_parameters():
        if p.grad is not None:
            assert rel_err(ours[n], p.grad) < 1e-4, n
