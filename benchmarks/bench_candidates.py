"""Stage (b) of benchmarks/gpu_suite.sh: every fused-head candidate against cuBLAS, Liger, Cut Cross-Entropy and TRL.

    python benchmarks/bench_candidates.py --N 16384 --H 4096 --V 128256 262144      # GPU (the suite's shapes)
    python benchmarks/bench_candidates.py --device cpu                               # CPU smoke (interpreter)

Per (V, mode) and implementation one record, appended to $SUITE_RECORDS (common.emit) as soon as it is
measured. `impl`:
  cublas            the bare head matmul h Wᵀ (bf16 out); fwd_bwd adds ∂h = G W and ∂W = Gᵀ h for a dense G
  triton_bare       kernels/bare_matmul.py: a bare Triton matmul with the persistent candidate's tiling (fwd)
  fa:<candidate>    fa.linear_logps with that candidate forced (kernels/candidates.py: fused, persistent, hybrid)
  liger             Liger-Kernel's fused linear cross-entropy, reduction="none" (−logp per token)
  cce               Apple's Cut Cross-Entropy, reduction="none"
  trl               TRL 1.16's ChunkedLogProbFunction (cuBLAS bf16 tiles + a Triton fold, chunk 32,768)
  fa_kl:<candidate> fa.linear_kl (two heads), fwd_bwd, with that candidate forced
Each fa:* record also says whether the candidate is right at this shape (`ok`: log-probs of 256 rows within
2e-3 of an fp32 materialised reference) and batch-invariant (`invariant`: 8 rows alone = in the batch,
bitwise); the selection (select_candidates.py) admits only candidates with both. Fields: median/p20/p80 ms,
peak_mem_bytes (above the inputs), mem_frac_fp32_logits = peak / (4·N·V), tflops (2·N·H·V forward,
6·N·H·V forward + backward: the useful work; ours recompute logits, 8·N·H·V).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit, header, measure  # noqa: E402

import fusealign as fa  # noqa: E402
from fusealign.kernels.candidates import MODULES, force_candidate  # noqa: E402

TRL_CHUNK = 32768  # trl.trainer.utils._CHUNKED_LOGPROB_CHUNK_SIZE in TRL 1.16


def logps_impls(device: str):
    """name -> fn(h, W, y) returning the per-token log-probs (or, for cublas / triton_bare, the logits)."""
    def cublas(h, W, y):
        return h @ W.T

    def triton_bare(h, W, y):
        from fusealign.kernels.bare_matmul import bare_matmul

        return bare_matmul(h, W)

    def ours(cand):
        def fn(h, W, y):
            with force_candidate(cand):
                return fa.linear_logps(h, W, y, backend="triton")
        return fn

    def liger(h, W, y):
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        loss = LigerFusedLinearCrossEntropyLoss(reduction="none")(W, h, y)
        return -(loss[0] if isinstance(loss, tuple) else loss)

    def cce(h, W, y):
        from cut_cross_entropy import linear_cross_entropy

        return -linear_cross_entropy(h, W, y, reduction="none")

    def trl(h, W, y):
        from trl.kernels import ChunkedLogProbFunction

        return ChunkedLogProbFunction.apply(h, W, None, y, 1.0, TRL_CHUNK, None, 1.0, ())[0]

    impls = dict(cublas=cublas, triton_bare=triton_bare)
    impls.update({f"fa:{c}": ours(c) for c in MODULES})
    impls.update(liger=liger, cce=cce, trl=trl)
    if device != "cuda":  # Liger and CCE need CUDA; the bare Triton matmul and TRL's torch fold run anywhere
        for name in ("liger", "cce"):
            impls.pop(name)
    return impls


def check_candidate(fn, h, W, y, rows: int = 256) -> dict:
    """`ok`: log-probs of the first rows vs an fp32 materialised reference; `invariant`: 8 rows alone = in the batch."""
    with torch.no_grad():
        n = min(rows, h.shape[0])
        ref = torch.log_softmax(h[:n].float() @ W.float().T, -1).gather(1, y[:n, None]).squeeze(1)
        full = fn(h, W, y)
        err = (full[:n].float() - ref).abs().max().item()
        alone = fn(h[:8], W, y[:8])
        return dict(ok=bool(err <= 2e-3), max_abs_err=err, invariant=bool(torch.equal(alone, full[:8])))


def bench(fn, mode, h, W, y, device, seed=0, reps=5):
    """Timing of fwd (no grad) or fwd + bwd with a non-uniform upstream gradient (dense for the matmuls)."""
    if mode == "fwd":
        def step():
            with torch.no_grad():
                fn(h, W, y)
        return measure(step, device, reps=reps)
    hg, Wg = h.detach().requires_grad_(), W.detach().requires_grad_()
    gen = torch.Generator(device=h.device).manual_seed(seed)
    weights = []

    def step():
        out = fn(hg, Wg, y)
        if not weights:
            weights.append(torch.rand(out.shape, generator=gen, device=out.device, dtype=out.dtype))
        torch.autograd.grad((out * weights[0]).sum(), [hg, Wg])
    return measure(step, device, reps=reps)


def ceilings(device: str):
    """The two ceilings METHOD.md asks for: device-to-device copy bandwidth and an 8192³ bf16 matmul rate."""
    if device != "cuda":
        return
    import triton.testing

    x = torch.empty(2**30, dtype=torch.float32, device=device).normal_()  # 4 GiB
    y = torch.empty_like(x)
    ms = triton.testing.do_bench(lambda: y.copy_(x), warmup=25, rep=100)
    emit(dict(kind="ceiling", what="copy_TBps", value=2 * x.numel() * 4 / (ms * 1e-3) / 1e12, ms=ms))
    del x, y
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    ms = triton.testing.do_bench(lambda: a @ b, warmup=25, rep=100)
    emit(dict(kind="ceiling", what="matmul_bf16_TFLOPs", value=2 * 8192**3 / (ms * 1e-3) / 1e12, ms=ms))
    print(f"ceilings: matmul {2 * 8192**3 / (ms * 1e-3) / 1e12:.0f} TFLOP/s", flush=True)
    torch.cuda.empty_cache()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--N", type=int, default=None)
    p.add_argument("--H", type=int, default=None)
    p.add_argument("--V", type=int, nargs="*")
    p.add_argument("--dtype", default=None)
    p.add_argument("--impls", default=None, help="comma-separated subset of the impl names")
    p.add_argument("--modes", default="fwd,fwd_bwd")
    p.add_argument("--kl", action="store_true", help="also the two-head KL, fwd_bwd, for each candidate")
    p.add_argument("--reps", type=int, default=5, help="timed repetitions on the CPU (the GPU uses do_bench)")
    args = p.parse_args(argv)
    gpu = args.device == "cuda"
    N, H = args.N or (16384 if gpu else 64), args.H or (4096 if gpu else 32)
    Vs = args.V or ([128256, 262144] if gpu else [300])
    dtype_name = args.dtype or ("bfloat16" if gpu else "float32")
    dtype = getattr(torch, dtype_name)
    impls = logps_impls(args.device)
    if args.impls:
        impls = {k: v for k, v in impls.items() if k in args.impls.split(",")}
    head = emit(dict(kind="header", stage="b", **header("benchmarks/bench_candidates.py", args.device)))
    print({k: head[k] for k in ("device", "torch", "triton")}, flush=True)
    if gpu:
        props = torch.cuda.get_device_properties(0)
        emit(dict(kind="device", name=props.name, sms=props.multi_processor_count, capability=f"{props.major}.{props.minor}",
                  memory_bytes=props.total_memory, l2_bytes=getattr(props, "L2_cache_size", None)))
        ceilings(args.device)
    for V in Vs:
        g = torch.Generator().manual_seed(0)
        h = torch.randn(N, H, generator=g).to(dtype).to(args.device)
        W = (torch.randn(V, H, generator=g) / H**0.5).to(dtype).to(args.device)
        y = torch.randint(0, V, (N,), generator=g).to(args.device)
        checks = {}
        for mode in args.modes.split(","):
            for name, fn in impls.items():
                if mode == "fwd_bwd" and name == "triton_bare":
                    continue
                rec = dict(kind="bench", op="logps", impl=name, mode=mode, N=N, H=H, V=V, dtype=dtype_name,
                           median_ms=None, p20_ms=None, p80_ms=None, peak_mem_bytes=None)
                try:
                    if name.startswith("fa:") and name not in checks:
                        checks[name] = check_candidate(fn, h, W, y)
                    rec.update(checks.get(name, {}))
                    med, p20, p80, peak = bench(fn, mode, h, W, y, args.device, reps=args.reps)
                    useful = (2 if mode == "fwd" else 6) * N * H * V
                    rec.update(median_ms=med, p20_ms=p20, p80_ms=p80, peak_mem_bytes=peak,
                               tflops=useful / (med * 1e-3) / 1e12,
                               mem_frac_fp32_logits=None if peak is None else peak / (4 * N * V))
                except Exception as e:  # OOM, a missing peer, a compiler refusal: a record, not a crash
                    rec["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
                emit(rec)
                print(f"{name:16} {mode:8} V={V}: " + (f"{rec['median_ms']:.3f} ms" if rec["median_ms"] else rec["error"])
                      + (f"  ok={rec.get('ok')} inv={rec.get('invariant')}" if name.startswith("fa:") else ""),
                      flush=True)
                if gpu:
                    torch.cuda.empty_cache()
        if args.kl and V == Vs[0]:
            hr = (h.float() + 0.05 * torch.randn(N, H, generator=g).to(args.device)).to(dtype)
            for cand in ("fused", "persistent"):
                rec = dict(kind="bench", op="kl", impl=f"fa_kl:{cand}", mode="fwd_bwd", N=N, H=H, V=V, dtype=dtype_name)
                try:
                    def kl(h_, W_, y_, cand=cand):
                        with force_candidate(cand):
                            return fa.linear_kl(h_, W_, hr, W, backend="triton")
                    med, p20, p80, peak = bench(kl, "fwd_bwd", h, W, y, args.device, reps=args.reps)
                    rec.update(median_ms=med, p20_ms=p20, p80_ms=p80, peak_mem_bytes=peak)
                except Exception as e:
                    rec["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
                emit(rec)
                print(f"fa_kl:{cand:10} fwd_bwd V={V}: " + (f"{rec['median_ms']:.3f} ms" if rec.get("median_ms")
                                                           else rec["error"]), flush=True)
        del h, W, y
        if gpu:
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
