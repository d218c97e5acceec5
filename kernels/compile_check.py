"""Compile every launched Triton kernel for real GPUs on a machine without one, and read the result.

Why: CI runs the kernels under TRITON_INTERPRET=1, which accepts code the GPU compiler rejects (a plain
Python global read inside `@triton.jit` once made every CUDA call fail while CI was green). Triton's
wheel ships `ptxas` and `cuobjdump`, and `triton.compile(ASTSource(...), target=GPUTarget(...))` needs
no driver, so the real compile chain (TTIR -> TTGIR -> LLVM -> PTX -> cubin) runs on a CPU.

How: `capture_launches()` swaps `JITFunction.run` for a recorder while the public ops run on CPU
tensors (nothing executes; outputs are garbage and ignored), and makes their Triton path selectable
on the CPU. `compile_launch()` then binds the recorded arguments with the JIT's own binder — the same
specialisation a CUDA launch gets: 16-byte pointer alignment, integers divisible by 16 or equal to 1 —
so the compiler vectorises and pipelines as it would on the GPU, and reports what ptxas built:
registers, spills, shared memory, and the instruction mix (wgmma / mma.sync, cp.async / TMA).

Must run in a process where TRITON_INTERPRET is unset (under the interpreter `triton.jit` makes
interpreter objects, not compilable functions): `python -m fusealign.kernels.compile_check`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from typing import Any, Optional

# Modules of the Hopper-grade candidates (kernels/candidates.py): imported so their launches can be captured.
_CANDIDATE_MODULES = ("linear_logps_persistent", "linear_kl_persistent", "linear_logps_hybrid")

# Shared memory per block that a kernel may use, bytes (opt-in maximum): A100 and H100.
SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}


@dataclass
class Launch:
    """One recorded kernel launch: the JIT function, its bound arguments, and the launch options."""

    fn: Any
    args: tuple
    kwargs: dict
    grid: tuple
    arch: Optional[int] = None  # compile for this architecture only (a candidate's arch-specific tiles); None: all

    @property
    def name(self) -> str:
        return self.fn.fn.__name__


@dataclass
class KernelReport:
    """What the GPU compiler built for one launch on one architecture."""

    kernel: str
    arch: int
    constexprs: dict  # name -> value of the tl.constexpr arguments (tile shapes, flags)
    dtypes: str  # pointer argument element types, e.g. "bf16,fp32,i64"
    div16: str  # the size arguments the launch specialised as divisible by 16, e.g. "N,H" (V = 50,257 is not)
    num_warps: int
    num_stages: int
    registers: int  # per thread
    spill_bytes: int  # local memory per thread (spill stores + stack): 0 wanted
    shared_bytes: int  # dynamic shared memory Triton asks for
    wgmma: int  # Hopper warpgroup MMA instructions in the SASS (HGMMA)
    mma_sync: int  # Ampere-style warp MMA instructions in the SASS (HMMA)
    cp_async: int  # asynchronous global->shared copies (LDGSTS on sm_80, cp.async in the PTX)
    tma: int  # bulk tensor copies (UTMALDG / cp.async.bulk.tensor)
    has_dot: bool  # the TTGIR holds a dot (so the checks on MMA and pipelining apply)
    bytes_per_flop: Optional[float]  # operand bytes loaded per dot FLOP, from the tile shapes
    error: Optional[str] = None  # the compiler's message when it refused the kernel
    sass: Optional[dict] = None  # sass.summary(): the main (K-) loop's instruction mix and the per-tile epilogue

    def problems(self) -> list[str]:
        """The checks every launched kernel must pass; empty when all hold."""
        if self.error:
            return [f"does not compile: {self.error}"]
        out = []
        if self.spill_bytes:
            out.append(f"spills {self.spill_bytes} bytes of local memory per thread")
        if self.shared_bytes > SMEM_LIMIT.get(self.arch, SMEM_LIMIT[80]):
            out.append(f"asks {self.shared_bytes} bytes of shared memory (limit {SMEM_LIMIT[self.arch]})")
        if self.has_dot:
            low_precision = any(t in self.dtypes for t in ("bf16", "fp16"))
            if self.arch >= 90 and low_precision and (self.wgmma == 0 or self.mma_sync > 0):
                out.append(f"sm_90 {self.dtypes} dot is not wgmma (wgmma={self.wgmma}, mma.sync={self.mma_sync})")
            if self.cp_async + self.tma == 0:
                out.append("dot operand loads are not pipelined (no cp.async / TMA)")
        return out


def _tool(name: str) -> str:
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{name} not found at {path}: the triton wheel for Linux x86-64 ships it")
    return path


@contextlib.contextmanager
def capture_launches():
    """Record every Triton launch instead of running it; the public ops take their Triton path on CPU.

    Yields the list that fills with `Launch` records. Requires TRITON_INTERPRET to be unset.
    """
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("capture_launches needs TRITON_INTERPRET unset: run it in its own process")
    from triton.runtime.jit import JITFunction

    import importlib

    # Modules by full name: the package re-exports functions named like their modules.
    common, tiles, linear_logps_triton, linear_kl_triton = (
        importlib.import_module(f"{__package__}.{m}")
        for m in ("common", "tiles", "linear_logps_triton", "linear_kl_triton"))

    launches: list[Launch] = []

    def record(self, *args, grid, warmup, **kwargs):
        launches.append(Launch(self, args, dict(kwargs), tuple(grid) if not callable(grid) else grid))
        return None

    real_resolve = common.resolve_backend  # HeadOptions.of reads it from there at every call

    def resolve_on_cpu(backend, device):
        return "triton" if backend in ("auto", "triton") else real_resolve(backend, device)

    # Every kernels module that took `interpreting` from common.py / tiles.py (the candidates too) picks GPU tiles.
    for m in _CANDIDATE_MODULES:
        importlib.import_module(f"{__package__}.{m}")
    pick = [mod for name, mod in list(sys.modules.items())
            if name.startswith(f"{__package__}.") and getattr(mod, "interpreting", None) is tiles.interpreting]
    saved = [
        (JITFunction, "run", JITFunction.run),
        (common, "resolve_backend", real_resolve),
    ] + [(mod, "interpreting", mod.interpreting) for mod in pick]
    JITFunction.run = record
    common.resolve_backend = resolve_on_cpu
    for mod in pick:
        mod.interpreting = lambda: False
    try:
        yield launches
    finally:
        for owner, attr, value in saved:
            setattr(owner, attr, value)


def _count(pattern: str, text: str) -> int:
    return len(re.findall(pattern, text))


def _resource_usage(cubin: bytes) -> tuple[int, int]:
    """(registers per thread, local-memory bytes per thread) from `cuobjdump --dump-resource-usage`."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", f.name], check=True,
                              capture_output=True, text=True).stdout
    regs = re.search(r"REG:(\d+)", text)
    local = re.search(r"LOCAL:(\d+)", text)
    stack = re.search(r"STACK:(\d+)", text)
    if regs is None or local is None:
        raise RuntimeError(f"unexpected cuobjdump output:\n{text}")
    return int(regs.group(1)), int(local.group(1)) + (int(stack.group(1)) if stack else 0)


def _sass(cubin: bytes) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([_tool("cuobjdump"), "--dump-sass", f.name], check=True, capture_output=True,
                              text=True).stdout


_SIZE_ARGS = ("N", "V", "H", "H_A", "H_B", "H_R")


def _bytes_per_flop(constexprs: dict, operand_dtype: str) -> Optional[float]:
    """Operand bytes a (BLOCK_N × BLOCK_V) tile loads per dot FLOP: (BN + BV)·BK·e / (2·BN·BV·BK)."""
    bn, bv = constexprs.get("BLOCK_N"), constexprs.get("BLOCK_V")
    if not (bn and bv):
        return None
    elem = 4 if operand_dtype == "fp32" else 2
    return (bn + bv) * elem / (2 * bn * bv)


def compile_launch(launch: Launch, arch: int) -> KernelReport:
    """Compile one recorded launch for sm_<arch> with its launch-time specialisation; inspect the cubin."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    fn = launch.fn
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    kwargs = dict(launch.kwargs)
    kwargs.setdefault("debug", False)
    bound, specialization, options = binder(*launch.args, **kwargs)
    opts, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=opts.__dict__)
    cubin, ptx, ttgir = compiled.asm["cubin"], compiled.asm["ptx"], compiled.asm["ttgir"]
    registers, spill = _resource_usage(cubin)
    sass = _sass(cubin)
    has_dot = ("tt.dot" in ttgir) or ("ttng.warp_group_dot" in ttgir)
    names = {p.num: p.name for p in fn.params}
    const_named = {names[k[0]]: v for k, v in constexprs.items() if len(k) == 1}
    pointers = [v[1:] for v in signature.values() if isinstance(v, str) and v.startswith("*")]
    dtypes = ",".join(sorted(set(pointers)))
    return KernelReport(
        kernel=launch.name,
        arch=arch,
        constexprs={k: v for k, v in const_named.items() if isinstance(v, (int, float, bool, str))},
        dtypes=dtypes,
        div16=",".join(p.name for p, sp in zip(fn.params, specialization)
                       if p.name in _SIZE_ARGS and sp[0] == "i32" and sp[1] == "D"),
        num_warps=opts.num_warps,
        num_stages=opts.num_stages,
        registers=registers,
        spill_bytes=spill,
        shared_bytes=int(compiled.metadata.shared),
        wgmma=_count(r"\bHGMMA\b", sass),
        mma_sync=_count(r"\bHMMA\b", sass),
        cp_async=_count(r"\bLDGSTS\b", sass) + _count(r"cp\.async\.(ca|cg)", ptx),
        tma=_count(r"\bUTMALDG\b", sass) + _count(r"cp\.async\.bulk\.tensor", ptx),
        has_dot=has_dot,
        sass=sass_summary(sass) or None,
        # first operand: h; only for kernels with a dot (an elementwise pass has tiles but no operand stream)
        bytes_per_flop=_bytes_per_flop(const_named, pointers[0] if pointers else "") if has_dot else None,
    )


def sass_summary(sass: str) -> dict:
    from .sass import summary

    return summary(sass)


def compile_key(launch: Launch) -> tuple:
    """Launches that compile to the same binary share a key (function, specialisation, options)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    backend = make_backend(GPUTarget("cuda", 90, 32))
    binder = create_function_from_signature(launch.fn.signature, launch.fn.params, backend)
    _, specialization, options = binder(*launch.args, **dict(launch.kwargs, debug=False))
    return (launch.name, repr(specialization), repr(sorted(options.items())), launch.arch)  # [:3]: arch-free


# ----------------------------------------------------------------------------- the launches to check

def _run_public_ops(H: int, V: int, dtype, N: int = 32):
    """Every kernel-level op's Triton path, forward and backward, with the flags that change a kernel. (The losses
    — linear_dpo_loss, linear_ppo_loss — route through these calls with these flags: `outputs=` is DPO's token
    metrics, `return_entropy` PPO's; this module imports nothing above the kernels.)"""
    import torch

    from .linear_kl import linear_kl
    from .linear_logps import linear_logps

    g = torch.Generator().manual_seed(0)

    def t(*shape, grad=True):
        x = torch.randn(*shape, generator=g).to(dtype)
        return x.requires_grad_(grad)

    y = torch.randint(0, V, (N,), generator=g)
    y[::5] = -100
    for bias, softcap, temperature in ((False, None, 1.0), (True, 30.0, 0.7)):
        h, w = t(N, H), t(V, H)
        b = t(V) if bias else None
        for entropy in (False, True):
            logps, ent = linear_logps(h, w, y, bias=b, softcap=softcap, temperature=temperature,
                                      return_entropy=True, backend="triton")
            (logps.sum() + (ent.sum() if entropy else 0)).backward()
        with torch.no_grad():
            linear_logps(h, w, y, bias=b, softcap=softcap, temperature=temperature, backend="triton")
        # The forward-only statistics (TRL's outputs) are a second specialisation of the forward and merge.
        out = linear_logps(h, w, y, bias=b, softcap=softcap, temperature=temperature, backend="triton",
                           outputs=("logps", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1"))
        (out[0].sum() + out[1].sum()).backward()
        for direction in ("forward", "reverse"):
            rh, rw = t(N, H, grad=False), t(V, H, grad=False)
            rb = t(V, grad=False) if bias else None
            linear_kl(h, w, rh, rw, bias=b, ref_bias=rb, softcap=softcap, temperature=temperature,
                      direction=direction, backend="triton").sum().backward()


# Shape classes the tile configurations cover (issue #9): every (H, V, dtype) is compiled.
SHAPE_CLASSES = [(H, V) for H in (2048, 4096, 8192) for V in (32000, 128256, 151936, 262144)]
# The quick check (the main test command): every kernel for both architectures and every dtype at one shape
# class, and the public ops' own launches (every flag variant) in the first dtype; the sweep over SHAPE_CLASSES
# and every dtype is its own CI step (.ci/run).
QUICK_SHAPE_CLASSES = [(4096, 128256)]


def _run_launchers(H: int, V: int, dtype, N: int = 256):
    """The launchers at a real (H, V): weight memory is reserved, never touched (nothing runs)."""
    import torch

    from . import linear_kl_triton as klt
    from . import linear_logps_triton as lt

    h = torch.empty((N, H), dtype=dtype)
    w = torch.empty((V, H), dtype=dtype)
    y = torch.zeros(N, dtype=torch.long)
    f = torch.empty(N, dtype=torch.float32)
    dz = torch.empty((N, V), dtype=dtype)
    lt.logps_fwd(h, w, None, y, temperature=1.0, softcap=None, ignore_index=-100)
    lt.logps_fwd(h, w, None, y, temperature=1.0, softcap=None, ignore_index=-100, extra=True)
    lt.logps_bwd_dz(h, w, None, y, f, f, f, f, dz, temperature=1.0, softcap=None, ignore_index=-100)
    valid = torch.ones(N, dtype=torch.uint8)
    klt.kl_fwd(h, w, h, w, valid, temperature=1.0, softcap=None)
    klt.kl_bwd_dz(h, w, None, h, w, None, valid, f, f, f, f, dz, reverse=False, temperature=1.0, softcap=None)
    if dtype == torch.float16:  # CUDA's backward writes fp16 inputs' ∂r in bf16 (head_backward.dz_dtype_of)
        dz16 = torch.empty((N, V), dtype=torch.bfloat16)
        lt.logps_bwd_dz(h, w, None, y, f, f, f, f, dz16, temperature=1.0, softcap=None, ignore_index=-100)
        klt.kl_bwd_dz(h, w, None, h, w, None, valid, f, f, f, f, dz16, reverse=False, temperature=1.0,
                      softcap=None)


def _run_candidate_launchers(dtypes, H: int = 4096, V: int = 128256, N: int = 256):
    """The Hopper-grade candidates' launchers (kernels/candidates.py; nothing runs): every kernel of theirs in
    bf16 with each flag set that changes the code — plain, bias + softcap, the extra statistics, and all three
    (the most live values) — fp16 and fp32 plain and all-flags, a vocabulary not divisible by 16, and the
    mixed-dtype KL heads. Subsets of a flag set hold fewer
    values at once than the set (register pressure only grows with flags), so they are not compiled again."""
    import torch

    from . import bare_matmul, tma
    from . import linear_kl_persistent as klp, linear_logps_hybrid as hy, linear_logps_persistent as lp

    y = torch.zeros(N, dtype=torch.long)
    f = torch.zeros(N, dtype=torch.float32)
    valid = torch.ones(N, dtype=torch.uint8)
    for name in dtypes:
        dt = getattr(torch, name)
        h, w, b = torch.empty((N, H), dtype=dt), torch.empty((V, H), dtype=dt), torch.empty(V, dtype=dt)
        flag_sets = [(None, None, False), (b, 30.0, True)]
        if dt == torch.bfloat16:
            flag_sets += [(b, 30.0, False), (None, None, True)]
            lp.partial_stats(h, torch.empty((V - 1, H), dtype=dt), None, y, temperature=1.0, softcap=None)
            bare_matmul.bare_matmul(h, w)
            if tma.OFFLINE_ARCH >= 90:  # the 128 x 128 tiling of the extra statistics / KL, for the report's pairs
                bare_matmul.bare_matmul(h, w, extra_stats=True)
        for bias, softcap, extra in flag_sets:
            lp.partial_stats(h, w, bias, y, temperature=0.7, softcap=softcap, extra=extra)
            if not extra:
                klp.kl_partial_stats(h, w, h, w, bias_a=bias, bias_b=bias, temperature=0.7, softcap=softcap)
        # The hybrid: its reduce and dz kernels (its GEMM runs on the CPU: small H, one 64-row chunk).
        hh, hw, hb = torch.zeros((64, 64), dtype=dt), torch.zeros((32000, 64), dtype=dt), torch.zeros(32000, dtype=dt)
        yy, ff, dz = torch.zeros(64, dtype=torch.long), torch.zeros(64), torch.empty((64, 32000), dtype=dt)
        for bias, softcap, extra in flag_sets:
            hy.partial_stats(hh, hw, hb if bias is not None else None, yy, temperature=0.7, softcap=softcap, extra=extra,
                             chunk_bytes=64 * 4 * 32000)
            hy.logps_bwd_dz(hh, hw, hb if bias is not None else None, yy, ff, ff, ff, ff if extra else None, dz,
                            temperature=0.7, softcap=softcap, ignore_index=-100)
    if "float32" in dtypes and "bfloat16" in dtypes:
        for a, r in ((torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16)):
            klp.kl_partial_stats(torch.empty((N, H), dtype=a), torch.empty((V, H), dtype=a),
                                 torch.empty((N, H), dtype=r), torch.empty((V, H), dtype=r),
                                 temperature=1.0, softcap=None)
    del f, valid


def _run_mixed_kl(dtypes, H: int = 4096, V: int = 128256, N: int = 256):
    """Every (policy, reference) dtype pair of the default KL launchers (the public API accepts mixed heads)."""
    import torch

    from . import linear_kl_triton as klt

    valid = torch.ones(N, dtype=torch.uint8)
    f = torch.empty(N, dtype=torch.float32)
    for a in dtypes:
        for r in dtypes:
            if a == r:
                continue
            ha, wa = torch.empty((N, H), dtype=getattr(torch, a)), torch.empty((V, H), dtype=getattr(torch, a))
            hr, wr = torch.empty((N, H), dtype=getattr(torch, r)), torch.empty((V, H), dtype=getattr(torch, r))
            klt.kl_fwd(ha, wa, hr, wr, valid, temperature=1.0, softcap=None)
            klt.kl_bwd_dz(ha, wa, None, hr, wr, None, valid, f, f, f, f, torch.empty((N, V), dtype=ha.dtype),
                          reverse=False, temperature=1.0, softcap=None)


def collect_launches(dtypes=("bfloat16", "float16", "float32"), shapes=None, arches=(90, 80),
                     scope: str = "all", quick: bool = False) -> list[Launch]:
    """Distinct launches (one per compile key). scope "default": the public ops and the default kernels'
    launchers over `shapes` (and every mixed-dtype KL pair; `quick`: over QUICK_SHAPE_CLASSES, the public ops in
    the first dtype only); "candidates": the candidates' launchers, captured
    once per architecture in `arches` (their tiles depend on it) and tagged with it; "all": both."""
    import torch

    from . import tma

    if scope not in ("all", "default", "candidates"):
        raise ValueError(f"scope must be 'all', 'default' or 'candidates', got {scope!r}")
    shapes = (QUICK_SHAPE_CLASSES if quick else SHAPE_CLASSES) if shapes is None else shapes
    with capture_launches() as launches:
        if scope in ("all", "default"):
            for i, name in enumerate(dtypes):
                dtype = getattr(torch, name)
                if not quick or i == 0:  # quick: the ops' flag variants in one dtype
                    _run_public_ops(64, 300, dtype)
                for H, V in shapes:
                    _run_launchers(H, V, dtype)
            _run_mixed_kl(dtypes)
        if scope in ("all", "candidates"):
            first = len(launches)
            saved_arch = tma.OFFLINE_ARCH
            try:
                for arch in arches:
                    tma.OFFLINE_ARCH = arch
                    _run_candidate_launchers(dtypes)
                    for launch in launches[first:]:
                        launch.arch = arch
                    first = len(launches)
            finally:
                tma.OFFLINE_ARCH = saved_arch
    # One compile per key; a tagged launch whose binary does not depend on the architecture it was captured
    # for (the same key under every arch, or an untagged twin) is compiled once for all of them.
    by_key: dict = {}
    for launch in launches:
        key = compile_key(launch)[:3]
        seen = by_key.get(key)
        if seen is None:
            by_key[key] = launch
        elif seen.arch != launch.arch:
            seen.arch = None
    return list(by_key.values())


_FORKED_WORK: list = []  # (launch, arch) pairs, inherited by forked workers (JIT functions do not pickle)


def compile_or_report(launch: Launch, arch: int) -> KernelReport:
    """`compile_launch`, with a compiler refusal turned into a report whose `error` says why."""
    try:
        return compile_launch(launch, arch)
    except Exception as e:  # the compiler's own errors (CompilationError, ptxas failures) are the finding
        msg = " ".join(f"{type(e).__name__}: {e}".split())
        if len(msg) > 700:  # Triton quotes the kernel's source first; the reason comes last
            msg = msg[:200] + " … " + msg[-500:]
        return KernelReport(launch.name, arch, {}, "", "", 0, 0, 0, 0, 0, 0, 0, 0, 0, False, None, error=msg)


def _compile_nth(i: int) -> KernelReport:
    launch, arch = _FORKED_WORK[i]
    return compile_or_report(launch, arch)


def check_all(arches=(90, 80), dtypes=("bfloat16", "float16", "float32"), shapes=None, quick: bool = False,
              workers: Optional[int] = None, scope: str = "all") -> list[KernelReport]:
    """Compile every distinct launch for every arch; `workers` processes (default: one per CPU)."""
    import multiprocessing

    work = [(launch, arch) for launch in collect_launches(dtypes, shapes, arches, scope, quick) for arch in arches
            if launch.arch in (None, arch)]
    workers = workers or os.cpu_count() or 1
    if workers <= 1 or "fork" not in multiprocessing.get_all_start_methods():
        return [compile_or_report(launch, arch) for launch, arch in work]
    # Compilation is single-threaded and independent per kernel: fork so the workers inherit the
    # recorded launches (no pickling of JIT functions or tensors).
    _FORKED_WORK[:] = work
    try:
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            return pool.map(_compile_nth, range(len(work)), chunksize=1)
    finally:
        _FORKED_WORK.clear()


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", type=int, nargs="+", default=[90, 80])
    p.add_argument("--dtype", nargs="+", default=["bfloat16", "float16", "float32"])
    p.add_argument("--json", action="store_true", help="print one JSON object per kernel report")
    p.add_argument("--scope", choices=("all", "default", "candidates"), default="all",
                   help="the default kernels, the candidates (kernels/candidates.py), or both")
    p.add_argument("--shapes", choices=("all", "quick"), default="all",
                   help="the default kernels' launchers at every shape class (H x V), or at one "
                        "(QUICK_SHAPE_CLASSES: every kernel and variant still compiled, per architecture and dtype)")
    args = p.parse_args(argv)
    reports = check_all(tuple(args.arch), tuple(args.dtype), scope=args.scope, quick=args.shapes == "quick")
    bad = 0
    for r in reports:
        problems = r.problems()
        bad += bool(problems)
        if args.json:
            print(json.dumps(dict(dataclasses.asdict(r), problems=problems)))
        else:
            print(f"sm_{r.arch} {r.kernel:24s} {r.dtypes:22s} regs={r.registers:3d} spill={r.spill_bytes} "
                  f"smem={r.shared_bytes} wgmma={r.wgmma} mma={r.mma_sync} cp.async={r.cp_async} tma={r.tma}"
                  + (f"  PROBLEMS: {'; '.join(problems)}" if problems else ""))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
