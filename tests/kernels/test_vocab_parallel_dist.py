"""The vocabulary-parallel fused head on 2 and 3 CPU ranks (gloo) equals the single-process op.

Each rank holds the same hidden states and targets and a (possibly uneven) slice of the head; the
single-process result is computed on every rank from the full head for comparison: values and
gradients of fa.linear_logps (with TRL's statistics), fa.linear_kl, fa.linear_dpo_loss, fa.linear_ppo_loss and
fa.linear_grpo_loss, in the explicit form (`vocab_start=`, `group=`) and as a Shard(0) DTensor; batch invariance
per rank; and the clear error for an FSDP2-sharded parameter used outside its module's forward.
"""

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fusealign as fa

TOL = 1e-5


def _close(a, b, what):
    err = (a.detach().double() - b.detach().double()).abs().max().item() if a.numel() else 0.0
    assert err <= TOL * (1 + b.detach().double().abs().max().item()), f"{what}: max error {err}"


def _data(V, H=24, N=14, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, H, generator=g)
    W = torch.randn(V, H, generator=g) / H**0.5
    b = torch.randn(V, generator=g) * 0.3
    y = torch.randint(0, V, (N,), generator=g)
    y[[2, 7]] = -100  # ignored rows
    return h, W, b, y


def _worker(rank, world, store_path, bounds, backend):
    dist.init_process_group("gloo", store=dist.FileStore(store_path, world), rank=rank, world_size=world)
    try:
        V = bounds[-1]
        lo, hi = bounds[rank], bounds[rank + 1]
        h, W, b, y = _data(V)
        opts = dict(temperature=0.8, softcap=6.0, backend=backend)
        gw = torch.linspace(-1, 1, h.shape[0])

        # -- linear_logps, explicit form, uneven shards; targets owned by other ranks; ignored rows
        hf, Wf, bf = (t.clone().requires_grad_() for t in (h, W, b))
        full = fa.linear_logps(hf, Wf, y, bias=bf, outputs=("logps", "entropy", "log_sum_sq_probs", "mean_logits",
                                                            "is_top1"), **opts)
        (full[0] * gw + full[1]).sum().backward()
        hp, Wp, bp = h.clone().requires_grad_(), W[lo:hi].clone().requires_grad_(), b[lo:hi].clone().requires_grad_()
        part = fa.linear_logps(hp, Wp, y, bias=bp, outputs=("logps", "entropy", "log_sum_sq_probs", "mean_logits",
                                                            "is_top1"), vocab_start=lo, group=dist.group.WORLD,
                               **opts)
        for name, a, c in zip(("logps", "entropy", "log_sum_sq_probs", "mean_logits"), part, full):
            _close(a, c, name)
        assert torch.equal(part[4], full[4])
        (part[0] * gw + part[1]).sum().backward()
        _close(hp.grad, hf.grad, "d hidden")
        _close(Wp.grad, Wf.grad[lo:hi], "d weight shard")
        _close(bp.grad, bf.grad[lo:hi], "d bias shard")

        # -- batch invariance per rank (the Triton path's claim): a token alone is bitwise the same as in a batch
        with torch.no_grad():
            alone = fa.linear_logps(h[3:4], W[lo:hi], y[3:4], bias=b[lo:hi], vocab_start=lo, vocab_size=V,
                                    group=dist.group.WORLD, **opts)
            batch = fa.linear_logps(h, W[lo:hi], y, bias=b[lo:hi], vocab_start=lo, vocab_size=V,
                                    group=dist.group.WORLD, **opts)
        if backend == "triton":
            assert torch.equal(alone[0], batch[3])
        else:
            _close(alone[0], batch[3], "torch backend, alone vs batch")

        # -- linear_kl, explicit form, both directions; a wider reference
        g = torch.Generator().manual_seed(1)
        hr = torch.randn(h.shape[0], 32, generator=g)
        Wr = torch.randn(V, 32, generator=g) / 32**0.5
        mask = y != -100
        for direction in ("forward", "reverse"):
            hf, Wf = h.clone().requires_grad_(), W.clone().requires_grad_()
            kl_full = fa.linear_kl(hf, Wf, hr, Wr, mask=mask, direction=direction, bias=b, **opts)
            (kl_full * gw).sum().backward()
            hp, Wp = h.clone().requires_grad_(), W[lo:hi].clone().requires_grad_()
            kl = fa.linear_kl(hp, Wp, hr, Wr[lo:hi], mask=mask, direction=direction, bias=b[lo:hi], vocab_start=lo,
                              group=dist.group.WORLD, **opts)
            _close(kl, kl_full, f"KL {direction}")
            (kl * gw).sum().backward()
            _close(hp.grad, hf.grad, f"KL {direction} d hidden")
            _close(Wp.grad, Wf.grad[lo:hi], f"KL {direction} d weight shard")

        # -- DTensor form (torch.chunk split) for linear_logps and linear_dpo_loss
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import Shard, distribute_tensor

        mesh = init_device_mesh("cpu", (world,))
        Wd = distribute_tensor(W.clone(), mesh, [Shard(0)]).requires_grad_()
        hd, hf, Wf = h.clone().requires_grad_(), h.clone().requires_grad_(), W.clone().requires_grad_()
        (fa.linear_logps(hd, Wd, y, **opts) * gw).sum().backward()
        (fa.linear_logps(hf, Wf, y, **opts) * gw).sum().backward()
        chunk = -(-V // world)
        s0, s1 = min(V, rank * chunk), min(V, (rank + 1) * chunk)
        _close(hd.grad, hf.grad, "DTensor d hidden")
        _close(Wd.grad.to_local(), Wf.grad[s0:s1], "DTensor d weight (local shard)")
        _close(Wd.grad.full_tensor(), Wf.grad, "DTensor d weight (full)")

        B, T = 2, 5
        hh = torch.randn(2 * B, T, h.shape[1], generator=g)
        yy = torch.randint(0, V, (2 * B, T), generator=g)
        yy[:, :2] = -100
        rc, rr = torch.randn(B, generator=g), torch.randn(B, generator=g)
        Wd = distribute_tensor(W.clone(), mesh, [Shard(0)]).requires_grad_()
        Wf = W.clone().requires_grad_()
        loss_d, m_d = fa.linear_dpo_loss(hh, Wd, yy, ref_chosen_logps=rc, ref_rejected_logps=rr, beta=0.3, **opts)
        loss_f, m_f = fa.linear_dpo_loss(hh, Wf, yy, ref_chosen_logps=rc, ref_rejected_logps=rr, beta=0.3, **opts)
        _close(loss_d, loss_f, "DPO loss")
        loss_d.backward()
        loss_f.backward()
        _close(Wd.grad.to_local(), Wf.grad[s0:s1], "DPO d weight (local shard)")

        # -- explicit form (uneven shards) for linear_dpo_loss (on-the-fly sharded reference, WPO weights from the
        # sharded log Σp², TRL's token metrics) and linear_ppo_loss
        shard = dict(vocab_start=lo, vocab_size=V, group=dist.group.WORLD)
        Wr2 = torch.randn(V, h.shape[1], generator=g) / h.shape[1] ** 0.5
        dpo_kw = dict(ref_hidden=hh, beta=0.3, loss_type=["sigmoid", "bco_pair"], use_weighting=True, **opts)
        hp, Wp, hf, Wf = (t.clone().requires_grad_() for t in (hh, W[lo:hi], hh, W))
        loss_p, m_p = fa.linear_dpo_loss(hp, Wp, yy, ref_weight=Wr2[lo:hi], **shard, **dpo_kw)
        loss_f, m_f = fa.linear_dpo_loss(hf, Wf, yy, ref_weight=Wr2, **dpo_kw)
        _close(loss_p, loss_f, "DPO explicit loss")
        for k in m_f:
            _close(m_p[k], m_f[k], f"DPO explicit metric {k}")
        loss_p.backward()
        loss_f.backward()
        _close(hp.grad, hf.grad, "DPO explicit d hidden")
        _close(Wp.grad, Wf.grad[lo:hi], "DPO explicit d weight shard")

        old = torch.randn(yy.shape, generator=g) - 3
        adv = torch.randn(2 * B, generator=g)
        hp, Wp, hf, Wf = (t.clone().requires_grad_() for t in (hh, W[lo:hi], hh, W))
        loss_p, _ = fa.linear_ppo_loss(hp, Wp, yy, old, adv, entropy_coef=0.01, **shard, **opts)
        loss_f, _ = fa.linear_ppo_loss(hf, Wf, yy, old, adv, entropy_coef=0.01, **opts)
        _close(loss_p, loss_f, "PPO explicit loss")
        loss_p.backward()
        loss_f.backward()
        _close(hp.grad, hf.grad, "PPO explicit d hidden")
        _close(Wp.grad, Wf.grad[lo:hi], "PPO explicit d weight shard")

        # linear_grpo_loss (TRL's GRPO family): GSPO weights, k3 KL, the entropy mask and bonus on the merged entropy
        ref = old + 0.3 * torch.randn(yy.shape, generator=g)
        grpo_kw = dict(loss_type="grpo", importance_sampling_level="sequence", beta=0.05, ref_logps=ref,
                       top_entropy_quantile=0.5, entropy_coef=0.01, **opts)
        hp, Wp, hf, Wf = (t.clone().requires_grad_() for t in (hh, W[lo:hi], hh, W))
        loss_p, m_p = fa.linear_grpo_loss(hp, Wp, yy, old, adv, **shard, **grpo_kw)
        loss_f, m_f = fa.linear_grpo_loss(hf, Wf, yy, old, adv, **grpo_kw)
        _close(loss_p, loss_f, "GRPO explicit loss")
        for k in m_f:
            _close(m_p[k], m_f[k], f"GRPO explicit metric {k}")
        loss_p.backward()
        loss_f.backward()
        _close(hp.grad, hf.grad, "GRPO explicit d hidden")
        _close(Wp.grad, Wf.grad[lo:hi], "GRPO explicit d weight shard")

        # -- an FSDP2-sharded parameter outside its module's forward: a clear error, not a wrong answer
        from torch.distributed.fsdp import fully_shard

        head = torch.nn.Linear(h.shape[1], V, bias=False)
        fully_shard(head, mesh=mesh)
        with pytest.raises(ValueError, match="sharded by FSDP2"):
            fa.linear_logps(h, head.weight, y, backend=backend)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("bounds", [[0, 40, 97], [0, 1, 60, 97]], ids=["2-ranks", "3-ranks-one-row"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_vocab_parallel_equals_single_process(bounds, backend):
    world = len(bounds) - 1
    with tempfile.TemporaryDirectory() as d:
        mp.start_processes(_worker, args=(world, os.path.join(d, "store"), bounds, backend), nprocs=world,
                           join=True, start_method="fork")
