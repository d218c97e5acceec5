"""Benchmark fused DPO (`fa.linear_dpo_loss`) forward+backward against a TRL-style materialised DPO and
Liger's fused-linear DPO, in one run.

    python benchmarks/bench_dpo.py          # GPU: 2B·T ∈ {8k, 16k, 32k}, H = 4096, V = 128,256, bf16; CPU: smoke

Records (`op="dpo"`, `mode="fwd_bwd"`) carry `variant`: `precomputed_ref` (reference log-probs given)
or `on_the_fly_ref` (reference head scored in the same call). `matmul` is the bare policy-head
forward+backward (the roofline); `naive` materialises fp32 logits and sums log-softmax gathers, as
TRL's `concatenated_forward` does. Memory targets: ≥ 5× less peak than `naive`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, header, ratio_table, record, write  # noqa: E402

import fusealign as fa  # noqa: E402


def batch(B2, Tn, H, V, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B2, Tn, H, generator=g).to(dtype).to(device)
    W = (torch.randn(V, H, generator=g) / H**0.5).to(dtype).to(device)
    hr = (h.float().cpu() + 0.01 * torch.randn(B2, Tn, H, generator=g)).to(dtype).to(device)
    y = torch.randint(0, V, (B2, Tn), generator=g)
    y[:, : Tn // 4] = -100  # prompt
    return h, W, hr, W.detach().clone(), y.to(device)


def impls(variant):
    def ours(h, W, y, hr, Wr, rc, rr):
        refs = dict(ref_chosen_logps=rc, ref_rejected_logps=rr) if variant == "precomputed_ref" else \
            dict(ref_hidden=hr, ref_weight=Wr)
        # token_metrics=False: the peers compute no entropy / mean-logit / top-1 statistics either
        return fa.linear_dpo_loss(h, W, y, token_metrics=False, **refs)[0]

    def naive(h, W, y, hr, Wr, rc, rr):
        def seq_logps(hh, ww):
            logits = (hh @ ww.T).float()  # (2B, T, V): the materialised tensor
            lp = torch.log_softmax(logits, -1).gather(-1, y.clamp_min(0).unsqueeze(-1)).squeeze(-1)
            return (lp * (y != -100)).sum(-1)
        pol = seq_logps(h, W)
        if variant == "precomputed_ref":
            ref = torch.cat([rc, rr])
        else:
            with torch.no_grad():
                ref = seq_logps(hr, Wr)
        B = pol.shape[0] // 2
        return fa.dpo_loss(pol[:B], pol[B:], ref[:B], ref[B:])[0].mean()

    def matmul(h, W, y, hr, Wr, rc, rr):
        return (h @ W.T).float().mean()

    def liger(h, W, y, hr, Wr, rc, rr):
        from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss

        if variant == "precomputed_ref":  # Liger (0.8.5) takes no precomputed reference: its ref-free mode
            out = LigerFusedLinearDPOLoss(beta=0.1, use_ref_model=False)(W, h, y)
        else:
            out = LigerFusedLinearDPOLoss(beta=0.1, use_ref_model=True)(W, h, y, ref_input=hr, ref_weight=Wr)
        return out[0] if isinstance(out, tuple) else out

    return dict(fusealign=ours, matmul=matmul, naive=naive, liger=liger)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tokens", type=int, nargs="*", help="2B·T values")
    p.add_argument("--T", type=int, default=None)
    p.add_argument("--H", type=int, default=None)
    p.add_argument("--V", type=int, default=None)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    gpu = args.device == "cuda"
    tokens = args.tokens or ([8192, 16384, 32768] if gpu else [256])
    Tn, H, V = args.T or (1024 if gpu else 32), args.H or (4096 if gpu else 64), args.V or (128256 if gpu else 1024)
    dtype = getattr(torch, args.dtype)
    out = args.out or RESULTS / ("dpo-" + ("cuda" if gpu else "cpu-smoke") + ".json")
    head, records = header("benchmarks/bench_dpo.py", args.device), []
    for n in tokens:
        B2 = n // Tn
        h, W, hr, Wr, y = batch(B2, Tn, H, V, dtype, args.device)
        with torch.no_grad():
            ref = fa.linear_logps(hr, Wr, y).sum(-1)
        rc, rr = ref[: B2 // 2], ref[B2 // 2:]
        for variant in ("precomputed_ref", "on_the_fly_ref"):
            for name, fn in impls(variant).items():
                if name == "liger" and not gpu:
                    continue
                hg, Wg = h.detach().requires_grad_(), W.detach().requires_grad_()

                def step():
                    torch.autograd.grad(fn(hg, Wg, y, hr, Wr, rc, rr), [hg, Wg])
                records.append(record(step, args.device, f"{name:10} {variant:16} N={B2 * Tn} H={H} V={V}", op="dpo",
                                      impl=name, mode="fwd_bwd", variant=variant, N=B2 * Tn, H=H, V=V,
                                      dtype=args.dtype))
        write(out, head, records)
    print(f"\nraw results: {out}\n")
    for variant in ("precomputed_ref", "on_the_fly_ref"):
        print(variant)
        print(ratio_table([r for r in records if r["variant"] == variant]))


if __name__ == "__main__":
    main()
