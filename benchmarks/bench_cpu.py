"""CPU benchmark of the fused head (torch backend) beside the bare matmul, the naive reference and the peers.

    python benchmarks/bench_cpu.py                       # the issue-23 grid, 2 threads, JSON under results/cpu/
    python benchmarks/bench_cpu.py --shapes 512x512x32000 --reps 3 --impls matmul,fusealign
    python benchmarks/bench_cpu.py --smoke --out /tmp/r.json

Per shape (N tokens, H hidden, V vocabulary; fp32): forward under no_grad and forward + backward with a
non-uniform upstream gradient (random per-token weights on log-probs and on entropy), log-probs alone and
log-probs + entropy, and `linear_kl` against the naive two-head KL. Every implementation is timed in
interleaved repeats (rep 1 of every implementation, then rep 2, …: load from other processes on a shared
machine hits them alike), medians and the spread (min, max) reported, each divided by the bare matmul's
median of the same run:
  matmul      bare head GEMMs: forward h Wᵀ; forward + backward also ∂h = G W and ∂W = Gᵀ h, with an (N, V)
              upstream gradient G prepared outside the timed region (3 GEMMs; KL: 2 forward, 4 in all)
  naive       fusealign.kernels.reference in fp32 (materialised logits, autograd)
  fusealign   fa.linear_logps / fa.linear_kl, backend="torch", default chunk_bytes (256 MiB): the forward keeps
              its logit tile(s) for the backward when they fit, else the backward recomputes them
  fusealign_recompute   the same with chunk_bytes = half the tile(s): two chunks, the backward recomputes
  cce         Cut Cross-Entropy linear_cross_entropy(impl="torch_compile", reduction="none")  (−log p)
  trl         TRL 1.16 trl.kernels.ChunkedLogProbFunction (chunk_size 32768, as TRL's trainers call it)
  torch_lce   torch.nn.functional.linear_cross_entropy(reduction="none"), defaults (if this torch has it)
Correctness beside every time: max |error| against float64 (the same reference in float64, by row chunks)
of log-probs, entropy, KL and of ∂h, ∂W. Peak memory: each implementation in its own fresh process
(forward + backward once to warm up, then the peak resident-set growth, VmHWM after /proc/self/clear_refs,
of one more forward + backward), with glibc's mmap threshold fixed at 1 MiB so freed tiles leave the process.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, header  # noqa: E402

SHAPES = ((512, 512, 32000), (2048, 1024, 32000), (1024, 1024, 128256))
KL_SHAPES = ((512, 512, 32000), (2048, 1024, 32000))
# Peak memory: the shape (2 GiB of logits: fusealign's tile does not fit chunk_bytes, it recomputes) and
# the smallest timing shape (the tile fits and is kept: fusealign then holds it, up to chunk_bytes).
MEM_SHAPES = ((8192, 256, 65536), (512, 512, 32000))
MEM_IMPLS = ("matmul", "naive", "fusealign", "cce", "trl")
SMOKE = dict(shapes=((64, 32, 1000),), kl_shapes=((64, 32, 1000),), mem_shapes=((64, 32, 1000),), reps=2)
LOGPS_IMPLS = ("matmul", "naive", "fusealign", "fusealign_recompute", "cce", "trl", "torch_lce")
KL_IMPLS = ("matmul", "naive", "fusealign", "fusealign_recompute")
ENTROPY_IMPLS = ("naive", "fusealign", "fusealign_recompute", "trl")  # the others return log-probs only
# torch_lce (defaults) is ~13x the matmul: timed only where one call is short.
SLOW_IMPL_MAX_NHV = 2**33
OUT = RESULTS / "cpu" / "cpu.json"


def shape_arg(text):
    return tuple(tuple(int(x) for x in s.split("x")) for s in text.split(",") if s)


# --- implementations: fn(h, W, y, entropy) -> per-token tensors (logps[, entropy]) ----------------------------
def logps_impls():
    import fusealign as fa
    from fusealign.kernels.reference import linear_logps_reference

    def matmul(h, W, y, entropy):
        return (h @ W.T,)

    def naive(h, W, y, entropy):
        out = linear_logps_reference(h, W, y, return_entropy=entropy)
        return out if entropy else (out,)

    def fusealign(h, W, y, entropy):
        out = fa.linear_logps(h, W, y, return_entropy=entropy, backend="torch")
        return out if entropy else (out,)

    def fusealign_recompute(h, W, y, entropy):
        half = 4 * W.shape[0] * -(-h.shape[0] // 2)  # two chunks of the (N, V) fp32 tile: not kept
        out = fa.linear_logps(h, W, y, return_entropy=entropy, backend="torch", chunk_bytes=half)
        return out if entropy else (out,)

    def cce(h, W, y, entropy):
        from cut_cross_entropy import linear_cross_entropy

        return (-linear_cross_entropy(h, W, y, reduction="none", impl="torch_compile"),)

    def trl(h, W, y, entropy):
        from trl.kernels import ChunkedLogProbFunction

        out = ChunkedLogProbFunction.apply(h, W, None, y, 1.0, 32768, None, 1.0, ("entropy",) if entropy else ())
        return (out[0], out[1]) if entropy else (out[0],)

    def torch_lce(h, W, y, entropy):
        return (-torch.nn.functional.linear_cross_entropy(h, W, y, reduction="none"),)

    impls = dict(matmul=matmul, naive=naive, fusealign=fusealign, fusealign_recompute=fusealign_recompute, cce=cce,
                 trl=trl)
    if hasattr(torch.nn.functional, "linear_cross_entropy"):
        impls["torch_lce"] = torch_lce
    return impls


def kl_impls():
    import fusealign as fa
    from fusealign.kernels.reference import linear_kl_reference

    def matmul(h, W, hr, Wr):
        return (h @ W.T, hr @ Wr.T)

    def naive(h, W, hr, Wr):
        return (linear_kl_reference(h, W, hr, Wr),)

    def fusealign(h, W, hr, Wr):
        return (fa.linear_kl(h, W, hr, Wr, backend="torch"),)

    def fusealign_recompute(h, W, hr, Wr):
        half = 8 * W.shape[0] * -(-h.shape[0] // 2)  # two chunks of both heads' tiles: not kept
        return (fa.linear_kl(h, W, hr, Wr, backend="torch", chunk_bytes=half),)

    return dict(matmul=matmul, naive=naive, fusealign=fusealign, fusealign_recompute=fusealign_recompute)


def inputs(N, H, V, kl=False):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(N, H, generator=g)
    W = torch.randn(V, H, generator=g) / H**0.5
    y = torch.randint(0, V, (N,), generator=g)
    w_lp, w_ent = torch.rand(N, generator=g), torch.rand(N, generator=g)  # non-uniform upstream gradients
    out = dict(h=h, W=W, y=y, w_lp=w_lp, w_ent=w_ent)
    if kl:
        out.update(hr=torch.randn(N, H, generator=g), Wr=torch.randn(V, H, generator=g) / H**0.5)
    return out


def loss_of(outs, d, op):
    if op == "kl":
        return (outs[0] * d["w_lp"]).sum()
    loss = (outs[0] * d["w_lp"]).sum()
    return loss + (outs[1] * d["w_ent"]).sum() if len(outs) > 1 else loss


def call(name, fn, mode, d, op, entropy, G):
    """One call of `fn` as the benchmark times it -> (per-token outputs, (∂h, ∂W) or None)."""
    args = (d["h"], d["W"], d["hr"], d["Wr"]) if op == "kl" else (d["h"], d["W"], d["y"], entropy)
    if mode == "fwd":
        with torch.no_grad():
            return fn(*args), None
    h, W = d["h"].detach().requires_grad_(), d["W"].detach().requires_grad_()
    args = (h, W) + args[2:]
    outs = fn(*args)
    if name == "matmul":  # the bare GEMMs: upstream gradient G per logit
        grads = torch.autograd.grad(outs[0], [h, W], G)
        return None, grads
    return outs, torch.autograd.grad(loss_of(outs, d, op), [h, W])


# --- float64 references, by row chunks (memory: one (chunk, V) float64 tile) --------------------------------------
def reference64(d, op, rows=256):
    from fusealign.kernels.reference import linear_kl_reference, linear_logps_reference

    W = d["W"].double().requires_grad_()
    Wr = d["Wr"].double() if op == "kl" else None
    N = d["h"].shape[0]
    per_token, dh = [], torch.zeros(d["h"].shape, dtype=torch.float64)
    dW = torch.zeros(W.shape, dtype=torch.float64)
    for s in range(0, N, rows):
        sl = slice(s, min(N, s + rows))
        h = d["h"][sl].double().requires_grad_()
        if op == "kl":
            outs = (linear_kl_reference(h, W, d["hr"][sl].double(), Wr, dtype=torch.float64),)
            loss = (outs[0] * d["w_lp"][sl].double()).sum()
        else:
            outs = linear_logps_reference(h, W, d["y"][sl], return_entropy=True, dtype=torch.float64)
            loss = (outs[0] * d["w_lp"][sl].double()).sum() + (outs[1] * d["w_ent"][sl].double()).sum()
        gh, gW = torch.autograd.grad(loss, [h, W])
        dh[sl], dW = gh, dW + gW
        per_token.append(torch.stack([o.detach() for o in outs]))
    # log-probs-only gradients differ from the entropy-weighted ones: a second pass without the entropy term.
    out = dict(per_token=torch.cat(per_token, 1), dh=dh, dW=dW)
    if op == "logps":
        dh1, dW1 = torch.zeros_like(dh), torch.zeros_like(dW)
        for s in range(0, N, rows):
            sl = slice(s, min(N, s + rows))
            h = d["h"][sl].double().requires_grad_()
            lp = linear_logps_reference(h, W, d["y"][sl], dtype=torch.float64)
            gh, gW = torch.autograd.grad((lp * d["w_lp"][sl].double()).sum(), [h, W])
            dh1[sl], dW1 = gh, dW1 + gW
        out.update(dh_lp=dh1, dW_lp=dW1)
    return out


def errors(outs, grads, ref, op, entropy):
    e = {}
    if outs is not None:
        names = ("kl",) if op == "kl" else ("logps", "entropy")
        for i, (name, o) in enumerate(zip(names, outs)):
            e[name] = (o.detach().double() - ref["per_token"][i]).abs().max().item()
    if grads is not None:
        key = "" if (op == "kl" or entropy) else "_lp"
        for name, g in zip(("dh", "dW"), grads):
            e[name] = (g.double() - ref[name + key]).abs().max().item()
    return e


# --- peak memory in a fresh process -----------------------------------------------------------------------------
MEM_SCRIPT = """
import sys, torch
sys.path.insert(0, {bench!r})
import bench_cpu as b
torch.set_num_threads({threads})
op, name, mode, entropy, (N, H, V) = {op!r}, {name!r}, {mode!r}, {entropy!r}, {shape!r}
fns = b.kl_impls() if op == "kl" else b.logps_impls()
d = b.inputs(N, H, V, kl=op == "kl")
G = torch.rand(N, V) if name == "matmul" and mode == "fwd_bwd" else None
def rss(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
b.call(name, fns[name], mode, d, op, entropy, G)  # warm up: libraries, compilation, allocator
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # the peak (VmHWM) restarts from the current resident set
before = rss("VmRSS")
out = b.call(name, fns[name], mode, d, op, entropy, G)
print("PEAK", rss("VmHWM") - before)
"""


def peak_memory(op, name, mode, entropy, shape, threads):
    script = MEM_SCRIPT.format(bench=str(Path(__file__).resolve().parent), threads=threads, op=op, name=name,
                               mode=mode, entropy=entropy, shape=tuple(shape))
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
    try:
        out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=3600, env=env)
    except subprocess.TimeoutExpired:
        return None, "timeout"
    for line in out.stdout.splitlines():
        if line.startswith("PEAK "):
            return int(line.split()[1]), None
    return None, (out.stderr.strip().splitlines() or ["no output"])[-1][:300]


# --- timing -----------------------------------------------------------------------------------------------------
def write(path: Path, head: dict, records: list, memory: list) -> None:
    """{"header", "records" (timings), "memory" (peak resident-set growth, one process each)}."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"header": head, "records": records, "memory": memory}, indent=1))
    tmp.replace(path)


def machine(threads):
    model = None
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    versions = {"python": platform.python_version()}
    for mod in ("trl", "cut_cross_entropy", "transformers"):
        try:
            m = __import__(mod)
            versions[mod] = getattr(m, "__version__", None)
        except Exception as e:  # a missing peer is recorded, not fatal
            versions[mod] = f"unavailable: {type(e).__name__}"
    if versions.get("cut_cross_entropy") is None:
        try:
            from importlib.metadata import version

            versions["cut_cross_entropy"] = version("cut-cross-entropy")
        except Exception:
            pass
    env = {k: os.environ[k] for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
           if k in os.environ}
    return dict(cpu_model=model, cores=os.cpu_count(), threads=threads, versions=versions, env=env,
                mkl=torch.backends.mkl.is_available(), cpu_capability=torch.backends.cpu.get_cpu_capability())


def run_case(op, shape, mode, entropy, names, fns, d, ref, reps, G):
    """Interleaved repeats of every implementation of one case -> records."""
    recs = {}
    for name in names:  # warm-up (compilation) and correctness, outside the timed region
        rec = dict(op=op, impl=name, mode=mode, entropy=entropy, N=shape[0], H=shape[1], V=shape[2],
                   dtype="float32", times_ms=[], errors={})
        try:
            outs, grads = call(name, fns[name], mode, d, op, entropy, G)
            if name != "matmul" and ref is not None:
                rec["errors"] = errors(outs, grads, ref, op, entropy)
            del outs, grads
        except Exception as e:  # a missing or failing peer is recorded, not fatal
            rec["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
        recs[name] = rec
        gc.collect()
    live = [n for n in names if "error" not in recs[n]]
    for _ in range(reps):
        for name in live:
            gc.collect()
            t0 = time.perf_counter()
            call(name, fns[name], mode, d, op, entropy, G)
            recs[name]["times_ms"].append((time.perf_counter() - t0) * 1e3)
    base = statistics.median(recs["matmul"]["times_ms"]) if "matmul" in live else None
    for name, rec in recs.items():
        t = rec["times_ms"]
        if t:
            q = statistics.quantiles(t, n=5) if len(t) >= 2 else [t[0]] * 4
            rec.update(median_ms=statistics.median(t), min_ms=min(t), max_ms=max(t), p20_ms=q[0], p80_ms=q[3],
                       ratio=None if base is None else statistics.median(t) / base,
                       ratio_min=None if base is None else min(t) / base,
                       ratio_max=None if base is None else max(t) / base)
        else:
            rec.update(median_ms=None, min_ms=None, max_ms=None, p20_ms=None, p80_ms=None, ratio=None,
                       ratio_min=None, ratio_max=None)
        rec["peak_mem_bytes"] = None
        err = " ".join(f"{k}={v:.1e}" for k, v in rec["errors"].items())
        print(f"{op:5} {name:10} {mode:7} ent={entropy!s:5} {shape}: "
              + (f"{rec['median_ms']:9.1f} ms  x{rec['ratio']:.2f} [{rec['ratio_min']:.2f}-{rec['ratio_max']:.2f}]"
                 if rec["median_ms"] and rec["ratio"] else rec.get("error", "-")) + f"  {err}", flush=True)
    return list(recs.values())


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", type=shape_arg, default=SHAPES, help="NxHxV,… for log-probs")
    p.add_argument("--kl-shapes", type=shape_arg, default=KL_SHAPES)
    p.add_argument("--mem-shapes", type=shape_arg, default=MEM_SHAPES, help="peak memory, forward + backward")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--impls", default=",".join(LOGPS_IMPLS))
    p.add_argument("--modes", default="fwd,fwd_bwd")
    p.add_argument("--mem-impls", default=",".join(MEM_IMPLS), help="implementations measured for peak memory")
    p.add_argument("--no-mem", action="store_true", help="skip the per-process peak-memory runs")
    p.add_argument("--no-ref", action="store_true", help="skip the float64 references (no errors reported)")
    p.add_argument("--smoke", action="store_true", help="tiny shapes, two repeats (the test suite's check)")
    p.add_argument("--device", default="cpu", help="cpu only (accepted for the other drivers' command line)")
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args(argv)
    if args.device != "cpu":
        raise SystemExit("bench_cpu.py measures the CPU; use bench_logps.py on CUDA")
    if args.smoke:  # seconds, not minutes: no peer (compiling, or importing transformers), fusealign's memory only
        args.shapes, args.kl_shapes, args.mem_shapes, args.reps = (SMOKE[k] for k in
                                                                  ("shapes", "kl_shapes", "mem_shapes", "reps"))
        args.impls = ",".join(n for n in args.impls.split(",") if n not in ("cce", "torch_lce", "trl"))
        args.mem_impls = "fusealign"
    torch.set_num_threads(args.threads)
    wanted = args.impls.split(",")
    head = header("benchmarks/bench_cpu.py", "cpu")
    head.update(machine(args.threads), load_before=os.getloadavg(), reps=args.reps,
                command=" ".join(["bench_cpu.py", *(sys.argv[1:] if argv is None else argv)]))
    records, memory = [], []
    for op, shapes in (("logps", args.shapes), ("kl", args.kl_shapes)):
        fns = logps_impls() if op == "logps" else kl_impls()
        for shape in shapes:
            N, H, V = shape
            d = inputs(N, H, V, kl=op == "kl")
            if not args.no_ref:
                print(f"float64 reference {op} {shape} …", flush=True)
            ref = None if args.no_ref else reference64(d, op)
            G = None
            for mode in args.modes.split(","):
                for entropy in ((False, True) if op == "logps" else (False,)):
                    names = [n for n in fns if n in wanted and (not entropy or n in ENTROPY_IMPLS or op == "kl")]
                    if entropy and "matmul" in wanted:
                        names = ["matmul"] + [n for n in names if n != "matmul"]
                    names = [n for n in names if n != "torch_lce" or N * H * V <= SLOW_IMPL_MAX_NHV]
                    if mode == "fwd":  # under no_grad nothing is kept: its forward is fusealign's in two chunks
                        names = [n for n in names if n != "fusealign_recompute"]
                    if mode == "fwd_bwd" and G is None:
                        G = torch.rand(N, V, generator=torch.Generator().manual_seed(1))
                    records += run_case(op, shape, mode, entropy, names, fns, d, ref, args.reps, G)
                    write(args.out, head, records, memory)  # a killed run keeps what it measured
            del d, ref, G
            gc.collect()
    if not args.no_mem:
        for op, shapes in (("logps", args.mem_shapes), ("kl", args.mem_shapes)):
            names = [n for n in (LOGPS_IMPLS if op == "logps" else KL_IMPLS) if n in args.mem_impls.split(",")]
            for shape in shapes:
                for entropy in ((False, True) if op == "logps" else (False,)):
                    for name in names:
                        if entropy and name not in ENTROPY_IMPLS:
                            continue
                        peak, err = peak_memory(op, name, "fwd_bwd", entropy, shape, args.threads)
                        rec = dict(op=op, impl=name, mode="fwd_bwd", entropy=entropy, N=shape[0], H=shape[1],
                                   V=shape[2], dtype="float32", peak_mem_bytes=peak)
                        if err:
                            rec["error"] = err
                        memory.append(rec)
                        print(f"memory {op:5} {name:10} ent={entropy!s:5} {shape}: "
                              + (f"{peak / 2**20:.0f} MiB" if peak is not None else err), flush=True)
                        write(args.out, head, records, memory)
    head["load_after"] = os.getloadavg()
    write(args.out, head, records, memory)
    print(f"\nraw results: {args.out}")
    from cpu_table import cpu_table

    print(cpu_table(json.loads(args.out.read_text())))


if __name__ == "__main__":
    # Every timed call is preceded by gc.collect(). Objects alive before the benchmark starts (torch's and the
    # other libraries'; in the test suite, pytest's too) are frozen out of those collections, so each walks only
    # the benchmark's own objects: a collection over them took 0.13 s, 8 of the 20 s of the smoke run (cProfile).
    gc.collect()
    gc.freeze()
    try:
        main()
    finally:
        gc.unfreeze()
