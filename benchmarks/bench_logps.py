"""Benchmark `fa.linear_logps` against the bare head matmul and the peers, in one run.

    python benchmarks/bench_logps.py                 # GPU: the full grid; CPU: a smoke shape
    python benchmarks/bench_logps.py --N 16384 --V 128256 --impls fusealign,matmul,liger,cce

FLOPs: the head costs 2·N·H·V forward and 6·N·H·V forward+backward (8·N·H·V when logits are
recomputed in backward, as ours are). `matmul` is that bare cuBLAS work — forward `h Wᵀ`,
forward+backward also `dh = g W` and `dW = gᵀ h` — the roofline every time is divided by.
Memory: the materialised fp32 logits are 4·N·V bytes (8 GiB at N = 16,384, V = 128,256).

Implementations (`impl` in the records):
  fusealign      fa.linear_logps (backend auto: Triton on CUDA)
  matmul         bare head matmul(s), no softmax
  naive          fusealign.kernels.reference (materialised fp32 logits, autograd)
  torch_compile  chunked log-softmax, each chunk torch.compile'd and checkpointed
  liger          Liger-Kernel fused-linear cross-entropy, reduction="none"  (−logp per token)
  cce            Apple Cut Cross-Entropy linear_cross_entropy, reduction="none"
Peers are optional imports; a missing one, an OOM or an error becomes a record with an `error`.
Forward+backward uses a non-uniform upstream gradient (random per-token weights).
"""

from __future__ import annotations

import argparse
import gc
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, header, measure, ratio_table, write  # noqa: E402

import fusealign as fa  # noqa: E402
from fusealign.kernels.reference import linear_logps_reference  # noqa: E402

GPU_GRID = dict(N=(4096, 16384, 65536), H=(4096,), V=(32000, 128256, 151936, 262144))
CPU_SMOKE = dict(N=(256,), H=(64,), V=(4096,))
ALL_IMPLS = ("fusealign", "matmul", "naive", "torch_compile", "liger", "cce")


def make_impls(entropy: bool):
    """name -> fn(h, W, y) returning the per-token tensors that carry gradient."""

    def ours(h, W, y):
        out = fa.linear_logps(h, W, y, return_entropy=entropy)
        return out if entropy else (out,)

    def matmul(h, W, y):
        return (h @ W.T,)

    def naive(h, W, y):
        out = linear_logps_reference(h, W, y, return_entropy=entropy)
        return out if entropy else (out,)

    compiled = {}

    def torch_compile(h, W, y, chunk=1024):
        from torch.utils.checkpoint import checkpoint

        if "fn" not in compiled:
            def chunk_fn(hc, W, yc):
                z = (hc @ W.T).float()
                logp = torch.log_softmax(z, dim=-1)
                lp = logp.gather(1, yc.clamp_min(0).unsqueeze(1)).squeeze(1)
                ent = -(logp.exp() * logp).sum(-1)
                return lp, ent
            compiled["fn"] = torch.compile(chunk_fn, dynamic=False)
        outs = [checkpoint(compiled["fn"], h[i:i + chunk], W, y[i:i + chunk], use_reentrant=False)
                for i in range(0, h.shape[0], chunk)]
        lp = torch.cat([o[0] for o in outs])
        return (lp, torch.cat([o[1] for o in outs])) if entropy else (lp,)

    def liger(h, W, y):
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        loss = LigerFusedLinearCrossEntropyLoss(reduction="none")(W, h, y)
        loss = loss[0] if isinstance(loss, tuple) else loss
        return (-loss,)

    def cce(h, W, y):
        from cut_cross_entropy import linear_cross_entropy

        return (-linear_cross_entropy(h, W, y, reduction="none"),)

    impls = dict(fusealign=ours, matmul=matmul, naive=naive, torch_compile=torch_compile, liger=liger, cce=cce)
    if entropy:  # peers that cannot return entropy are compared on log-probs only
        for name in ("matmul", "liger", "cce"):
            impls.pop(name)
    return impls


def bench_one(impl_fn, mode, h, W, y, device):
    if mode == "fwd":
        def fn():
            with torch.no_grad():
                impl_fn(h, W, y)
        return measure(fn, device)
    hg, Wg = h.detach().requires_grad_(), W.detach().requires_grad_()
    gen = torch.Generator(device=h.device).manual_seed(0)
    weights = None

    def fn():
        nonlocal weights
        outs = impl_fn(hg, Wg, y)
        if weights is None:  # non-uniform upstream gradient, one per output (matmul: per logit)
            weights = [torch.rand(o.shape, generator=gen, device=o.device, dtype=o.dtype) for o in outs]
        loss = sum((o * w).sum() for o, w in zip(outs, weights))
        torch.autograd.grad(loss, [hg, Wg])
    return measure(fn, device)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--N", type=int, nargs="*")
    p.add_argument("--H", type=int, nargs="*")
    p.add_argument("--V", type=int, nargs="*")
    p.add_argument("--dtype", nargs="*", default=["bfloat16"])
    p.add_argument("--impls", default=",".join(ALL_IMPLS))
    p.add_argument("--modes", default="fwd,fwd_bwd")
    p.add_argument("--out", type=Path, help="raw JSON path (default under benchmarks/results/)")
    args = p.parse_args(argv)
    grid = GPU_GRID if args.device == "cuda" else CPU_SMOKE
    Ns, Hs, Vs = args.N or grid["N"], args.H or grid["H"], args.V or grid["V"]
    wanted = args.impls.split(",")
    if args.device != "cuda":  # peers are CUDA-only; compiling on the CPU only slows the smoke test
        wanted = [w for w in wanted if w not in ("liger", "cce", "torch_compile")]
    head = header("benchmarks/bench_logps.py", args.device)
    out = args.out or (RESULTS / ("logps-" + ("cuda" if args.device == "cuda" else "cpu-smoke") + ".json"))
    records = []
    for dtype_name in args.dtype:
        dtype = getattr(torch, dtype_name)
        for H in Hs:
            for V in Vs:
                for N in Ns:
                    g = torch.Generator().manual_seed(0)
                    h = torch.randn(N, H, generator=g).to(dtype).to(args.device)
                    W = (torch.randn(V, H, generator=g) / H**0.5).to(dtype).to(args.device)
                    y = torch.randint(0, V, (N,), generator=g).to(args.device)
                    for mode in args.modes.split(","):
                        for entropy in ((False, True) if mode == "fwd_bwd" else (False,)):
                            for name, fn in make_impls(entropy).items():
                                if name not in wanted:
                                    continue
                                rec = dict(op="logps", impl=name, mode=mode, entropy=entropy, N=N, H=H, V=V,
                                           dtype=dtype_name, median_ms=None, p20_ms=None, p80_ms=None,
                                           peak_mem_bytes=None)
                                try:
                                    med, p20, p80, peak = bench_one(fn, mode, h, W, y, args.device)
                                    rec.update(median_ms=med, p20_ms=p20, p80_ms=p80, peak_mem_bytes=peak)
                                except Exception as e:  # OOM, missing peer, unsupported shape: recorded
                                    rec["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
                                records.append(rec)
                                print(f"{name:14} {mode:8} ent={entropy!s:5} N={N} H={H} V={V} {dtype_name}: "
                                      + (f"{rec['median_ms']:.3f} ms" if rec["median_ms"] else rec["error"]),
                                      flush=True)
                                gc.collect()
                                if args.device == "cuda":
                                    torch.cuda.empty_cache()
                    write(out, head, records)  # after every shape: a killed run keeps what it measured
                    del h, W, y
    print(f"\nraw results: {out}\n")
    print(ratio_table(records))


if __name__ == "__main__":
    main()
