"""Benchmark the exact two-head KL (`fa.linear_kl`) forward+backward against a materialised KL and
Liger's fused-linear JSD (its β = 0 end is KL), in one run.

    python benchmarks/bench_kl.py           # GPU: N ∈ {4k, 16k, 32k}, H = 4096, V = 128,256, bf16; CPU: smoke

`matmul` is the bare policy-head forward+backward; the reference head is constant in every impl.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, header, ratio_table, record, write  # noqa: E402

import fusealign as fa  # noqa: E402


def impls():
    def ours(h, W, hr, Wr):
        return fa.linear_kl(h, W, hr, Wr).mean()

    def naive(h, W, hr, Wr):
        logp = torch.log_softmax((h @ W.T).float(), -1)
        with torch.no_grad():
            logq = torch.log_softmax((hr @ Wr.T).float(), -1)
        return (logp.exp() * (logp - logq)).sum(-1).mean()

    def matmul(h, W, hr, Wr):
        return (h @ W.T).float().mean()

    def liger(h, W, hr, Wr):
        from liger_kernel.transformers import LigerFusedLinearJSD

        # Liger's JSD at β = 0 is the forward KL of student (policy) from teacher; no label mask.
        return LigerFusedLinearJSD(jsd_beta=0.0)(h, W, hr, Wr, None)  # (…, shift_labels=None): no mask

    return dict(fusealign=ours, matmul=matmul, naive=naive, liger=liger)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--N", type=int, nargs="*")
    p.add_argument("--H", type=int, default=None)
    p.add_argument("--V", type=int, default=None)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    gpu = args.device == "cuda"
    Ns, H, V = args.N or ([4096, 16384, 32768] if gpu else [256]), args.H or (4096 if gpu else 64), \
        args.V or (128256 if gpu else 1024)
    dtype = getattr(torch, args.dtype)
    out = args.out or RESULTS / ("kl-" + ("cuda" if gpu else "cpu-smoke") + ".json")
    head, records = header("benchmarks/bench_kl.py", args.device), []
    for N in Ns:
        g = torch.Generator().manual_seed(0)
        h = torch.randn(N, H, generator=g).to(dtype).to(args.device)
        W = (torch.randn(V, H, generator=g) / H**0.5).to(dtype).to(args.device)
        hr = torch.randn(N, H, generator=g).to(dtype).to(args.device)
        Wr = (torch.randn(V, H, generator=g) / H**0.5).to(dtype).to(args.device)
        for name, fn in impls().items():
            if name == "liger" and not gpu:
                continue
            hg, Wg = h.detach().requires_grad_(), W.detach().requires_grad_()

            def step():
                torch.autograd.grad(fn(hg, Wg, hr, Wr), [hg, Wg])
            records.append(record(step, args.device, f"{name:10} N={N} H={H} V={V}", op="kl", impl=name,
                                  mode="fwd_bwd", N=N, H=H, V=V, dtype=args.dtype))
        write(out, head, records)
    print(f"\nraw results: {out}\n")
    print(ratio_table(records))


if __name__ == "__main__":
    main()
