"""What the GPU compiler builds from each Triton kernel, on a machine without a GPU: the offline half of tuning.

    python benchmarks/kernel_report.py --out benchmarks/results/kernel_report   # sm_90 + sm_80, every dtype
    python benchmarks/kernel_report.py --arch 90 --dtype bfloat16

Every launch of the public ops (and of the launchers at H ∈ {2048, 4096, 8192} × V ∈ {32000, 128256,
151936, 262144}; the Hopper-grade candidates of kernels/candidates.py per architecture) is compiled with
Triton's compiler and the triton wheel's ptxas, with the launch-time argument specialisation
(fusealign/kernels/compile_check.py). Three parts:

1. One row per distinct binary: registers per thread, spilled bytes, shared memory, pipeline stages,
   Hopper wgmma vs. warp mma.sync instructions, cp.async / TMA copies, and the tile's operand traffic
       bytes/FLOP = (BLOCK_N + BLOCK_V)·e / (2·BLOCK_N·BLOCK_V)      (e = 2 for bf16/fp16, 4 for fp32)
   (column `L2 TB/s @800T`: the L2 → SM stream a tile needs at the H100's ~800 TFLOP/s).
2. Side by side on sm_90, bf16, H = 4,096, V = 128,256: the bare Triton matmul with the persistent
   candidate's tiling (kernels/bare_matmul.py) and every forward / backward kernel — the main loop per
   K-step as read from the SASS (kernels/sass.py: HGMMA shape and count, TMA / cp.async loads, mbarrier
   waits and arrives, CTA barriers, all instructions), the per-tile epilogue's instruction count,
   registers, spills, shared memory, CTAs per SM — and whether each main loop is the bare kernel's.
3. The predicted time ratio to cuBLAS from these counts and public figures (labelled a prediction).
It must run with TRITON_INTERPRET unset; it needs no GPU.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.pop("TRITON_INTERPRET", None)

from fusealign.kernels.compile_check import check_all  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
MATRIX_RATE = 800e12  # bf16 FLOP/s measured on an H200 of this workplace (KINDS.md: 769–798 TFLOP/s, 8192³)
# H100 / H200 SXM: 132 SMs; dense bf16 989 TFLOP/s at the 1.83 GHz boost clock = 4,096 FLOP per clock per SM.
SMS, FLOP_PER_CLK_SM, CLOCK = 132, 4096, 1.83e9
REGS_PER_SM, SMEM_PER_SM, THREADS_PER_SM, SMSP = 65536, 228 * 1024, 2048, 4
# Public figures the prediction rests on (cited in benchmarks/NOTES.md):
TRITON_TMA_PERSISTENT_TFLOPS = (666.0, 689.0)  # H100, bf16, (8192, 8192, 4096..16384): tritonbench PR #894
CUBLAS_TFLOPS = (769.0, 798.0)  # H200 here (same SMs and clocks as the H100 SXM), bf16 8192³: KINDS.md


def _flags(constexprs: dict) -> str:
    on = [k for k, v in constexprs.items() if v is True and k != "INTERPRET"]
    return ",".join(on) or "-"


def _tile(c: dict) -> str:
    return "x".join(str(c[k]) for k in ("BLOCK_N", "BLOCK_V", "BLOCK_K") if k in c) or str(c.get("BLOCK", "-"))


def candidate_of(kernel: str) -> str:
    if "persistent" in kernel:
        return "persistent"
    if "hybrid" in kernel:
        return "hybrid"
    if "bare" in kernel:
        return "bare"
    return "fused"


def ctas_per_sm(regs: int, threads: int, smem: int) -> int:
    """Resident CTAs per SM from registers (allocated per warp in units of 256), shared memory and threads."""
    warps = threads // 32
    regs_per_warp = -(-regs * 32 // 256) * 256
    by_regs = REGS_PER_SM // max(1, regs_per_warp * warps)
    by_smem = SMEM_PER_SM // max(1, smem + 1024) if smem else 32
    return max(0, min(by_regs, by_smem, THREADS_PER_SM // threads, 32))


def rows(reports) -> list[dict]:
    out = []
    for r in reports:
        c = r.constexprs
        main = (r.sass or {}).get("main_loop") or {}
        epi = (r.sass or {}).get("epilogue") or {}
        out.append(dict(
            kernel=r.kernel, candidate=candidate_of(r.kernel), arch=f"sm_{r.arch}", dtype=r.dtypes.split(",")[0],
            flags=_flags(c), div16=r.div16 or "-", tile=_tile(c),
            warps=r.num_warps, stages=r.num_stages, regs=r.registers, spill=r.spill_bytes,
            smem_kib=round(r.shared_bytes / 1024, 1), ctas_per_sm=ctas_per_sm(r.registers, 32 * r.num_warps,
                                                                            r.shared_bytes),
            wgmma=r.wgmma, mma_sync=r.mma_sync, cp_async=r.cp_async, tma=r.tma,
            kstep_mma=",".join(f"{k.split('.')[1] if '.' in k else k}x{v}" for k, v in (main.get("mma") or {}).items()),
            kstep_tma=main.get("tma_loads"), kstep_cp_async=main.get("cp_async"),
            kstep_mbar_wait=main.get("mbarrier_waits"), kstep_bar_sync=main.get("bar_sync"),
            kstep_instr=main.get("instructions"), epi_instr=epi.get("instructions"), epi_mufu=epi.get("mufu"),
            bytes_per_flop=None if r.bytes_per_flop is None else round(r.bytes_per_flop, 5),
            l2_tbps_at_800t=None if r.bytes_per_flop is None else round(r.bytes_per_flop * MATRIX_RATE / 1e12, 1),
            problems="; ".join(r.problems()) or "",
            sass=r.sass, constexprs={k: v for k, v in c.items() if k != "INTERPRET"},
        ))
    out.sort(key=lambda d: (d["kernel"], d["arch"], d["dtype"], d["flags"], d["div16"]))
    return out


TABLE_COLS = ["kernel", "arch", "dtype", "flags", "div16", "tile", "warps", "stages", "regs", "spill", "smem_kib",
              "ctas_per_sm", "wgmma", "mma_sync", "cp_async", "tma", "kstep_mma", "kstep_instr", "epi_instr",
              "bytes_per_flop", "l2_tbps_at_800t", "problems"]


def table(records: list[dict], cols=TABLE_COLS) -> str:
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    seen = set()
    for r in records:
        cells = tuple("" if r.get(c) is None else str(r[c]) for c in cols)
        if cells in seen:  # same binary figures reached through two specialisations
            continue
        seen.add(cells)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# The side-by-side columns: (label, kernel, flags wanted) on sm_90 / bf16 at a shape-class launch (V divisible by 16).
SIDE = [
    ("bare matmul 128x256", "_bare_matmul_kernel", "-"),
    ("persistent logps", "_logps_fwd_persistent_kernel", "-"),
    ("persistent logps, bias+softcap", "_logps_fwd_persistent_kernel", "HAS_BIAS,SOFTCAP"),
    ("persistent logps, extra stats", "_logps_fwd_persistent_kernel", "EXTRA"),
    ("persistent KL", "_kl_fwd_persistent_kernel", "-"),
    ("fused logps (current)", "_logps_fwd_kernel", "-"),
    ("fused KL (current)", "_kl_fwd_kernel", "-"),
    ("dz backward (logps)", "_logps_bwd_dz_kernel", "-"),
    ("hybrid reduce", "_hybrid_reduce_kernel", "-"),
]


def pick(records, kernel, flags, arch="sm_90", dtype="bf16"):
    """The record of `kernel` with exactly `flags`, preferring the shape-class launches (N, V, H divisible by 16)."""
    hits = [r for r in records if r["kernel"] == kernel and r["arch"] == arch and r["dtype"] == dtype
            and r["flags"] == flags and not r["problems"].startswith("does not compile")]
    hits.sort(key=lambda r: "V" not in r["div16"].split(","))
    return hits[0] if hits else None


def same_main_loop(a: dict, b: dict) -> dict:
    """Whether two kernels' K-loops issue the same matrix, copy and barrier instructions (and how many in all)."""
    ma, mb = (a["sass"] or {}).get("main_loop") or {}, (b["sass"] or {}).get("main_loop") or {}
    keys = ("mma", "tma_loads", "cp_async", "mbarrier_waits", "mbarrier_arrives", "bar_sync", "warpgroup_waits")
    diff = {k: (ma.get(k), mb.get(k)) for k in keys if ma.get(k) != mb.get(k)}
    return dict(same=not diff and bool(ma), differs=diff, instructions=(ma.get("instructions"), mb.get("instructions")))


def bare_for(records: list[dict], r: dict):
    """The bare Triton matmul compiled with r's tiling (tile, warps, stages, arch, dtype), if any."""
    hits = [b for b in records if b["kernel"] == "_bare_matmul_kernel" and b["arch"] == r["arch"]
            and b["dtype"] == r["dtype"] and b["tile"] == r["tile"] and b["warps"] == r["warps"]
            and b["stages"] == r["stages"]]
    return hits[0] if hits else None


def side_by_side(records: list[dict]) -> tuple[str, dict]:
    chosen = [(label, pick(records, k, f)) for label, k, f in SIDE]
    chosen = [(label, r) for label, r in chosen if r is not None]

    def main(r, key):
        return ((r["sass"] or {}).get("main_loop") or {}).get(key)

    def epi(r, key):
        return ((r["sass"] or {}).get("epilogue") or {}).get(key)

    def mma(r):
        shapes = main(r, "mma") or {}
        return ", ".join(f"{k.split('.')[1]} × {v}" for k, v in shapes.items()) or "-"

    def loop_is_bare(r):
        if r["sass"] is None or not main(r, "mma"):
            return "-"
        bare = bare_for(records, r)
        if bare is None:
            return f"no bare kernel with tile {r['tile']} (cp.async kernel)" if not r["tma"] else "-"
        if bare is r:
            return "(the bare kernel)"
        s = same_main_loop(bare, r)
        return "yes" if s["same"] else "no: " + ", ".join(f"{k} {x}→{y}" for k, (x, y) in s["differs"].items())

    fields = [
        ("tile (N × V × K)", lambda r: r["tile"]), ("warps / stages", lambda r: f"{r['warps']} / {r['stages']}"),
        ("TMA descriptors", lambda r: "yes" if r["tma"] else "no"),
        ("registers / thread", lambda r: r["regs"]), ("spilled bytes", lambda r: r["spill"]),
        ("shared memory KiB", lambda r: r["smem_kib"]), ("CTAs per SM", lambda r: r["ctas_per_sm"]),
        ("K-step: HGMMA shape × count", mma), ("K-step: TMA loads (UTMALDG)", lambda r: main(r, "tma_loads")),
        ("K-step: cp.async (LDGSTS)", lambda r: main(r, "cp_async")),
        ("K-step: mbarrier waits", lambda r: main(r, "mbarrier_waits")),
        ("K-step: mbarrier arrives", lambda r: main(r, "mbarrier_arrives")),
        ("K-step: CTA barriers (BAR.SYNC)", lambda r: main(r, "bar_sync")),
        ("K-step: warpgroup waits", lambda r: main(r, "warpgroup_waits")),
        ("K-step: instructions", lambda r: main(r, "instructions")),
        ("per tile outside the K-loop: instructions", lambda r: epi(r, "instructions")),
        ("  of which MUFU (exp, rcp)", lambda r: epi(r, "mufu")),
        ("  of which fp32 ALU", lambda r: epi(r, "fp32")),
        ("operand bytes / FLOP", lambda r: r["bytes_per_flop"]), ("L2 TB/s at 800 TFLOP/s", lambda r: r["l2_tbps_at_800t"]),
        ("main loop = the bare matmul's of the same tiling", loop_is_bare),
    ]
    head = "| | " + " | ".join(label for label, _ in chosen) + " |"
    lines = [head, "|" + "---|" * (len(chosen) + 1)]
    for name, fn in fields:
        lines.append(f"| {name} | " + " | ".join("" if fn(r) is None else str(fn(r)) for _, r in chosen) + " |")
    facts = {label: dict(kernel=r["kernel"], flags=r["flags"], tile=r["tile"], regs=r["regs"], spill=r["spill"],
                         smem_kib=r["smem_kib"], ctas_per_sm=r["ctas_per_sm"], main_loop=main(r, "mma"),
                         kstep_instructions=main(r, "instructions"), epilogue_instructions=epi(r, "instructions"),
                         epilogue_mufu=epi(r, "mufu"), main_loop_is_bare=loop_is_bare(r))
             for label, r in chosen}
    return "\n".join(lines), facts


def kstep_opcodes(records: list[dict]) -> str:
    """One K-step of the bare 128 × 256 matmul and of the persistent forward, opcode by opcode (sm_90, bf16)."""
    bare, fused = pick(records, "_bare_matmul_kernel", "-"), pick(records, "_logps_fwd_persistent_kernel", "-")
    if not (bare and fused and bare["sass"] and fused["sass"]):
        return ""
    a, b = bare["sass"]["main_loop"]["ops"], fused["sass"]["main_loop"]["ops"]
    lines = ["| opcode | bare matmul | persistent logps |", "|---|---|---|"]
    for op in sorted(set(a) | set(b)):
        lines.append(f"| `{op}` | {a.get(op, 0)} | {b.get(op, 0)} |")
    lines.append(f"| **all** | {sum(a.values())} | {sum(b.values())} |")
    return "\n".join(lines)


def predict(records: list[dict]) -> tuple[str, dict]:
    """Predicted time of the persistent forward over cuBLAS's bare head matmul, from the SASS counts."""
    bare = pick(records, "_bare_matmul_kernel", "-")
    fused = pick(records, "_logps_fwd_persistent_kernel", "-")
    if not (bare and fused and bare["sass"] and fused["sass"]):
        return "(no sm_90 bf16 persistent / bare kernels in this report)", {}
    bn, bv, _ = (int(x) for x in fused["tile"].split("x"))
    warps_per_smsp = fused["warps"] / SMSP
    out, text = {}, []
    for H, V in ((4096, 128256), (4096, 262144)):
        mma_clk = 2 * bn * bv * H / FLOP_PER_CLK_SM  # one tile's MMAs at the SM's peak rate
        # Epilogue cycles per tile: not overlapped with the MMAs (no warp specialisation); issue-bound at one
        # instruction per clock per SMSP, or MUFU-bound at 16 per clock per SM, whichever is longer.
        def epi_clk(r):
            e = r["sass"]["epilogue"]
            return max(e["instructions"] * warps_per_smsp, e["mufu"] * 32 * r["warps"] / 16)
        f_epi, b_epi = epi_clk(fused), epi_clk(bare)
        fused_over_bare = (mma_clk + f_epi) / (mma_clk + b_epi)
        lo = CUBLAS_TFLOPS[0] / TRITON_TMA_PERSISTENT_TFLOPS[1]
        hi = CUBLAS_TFLOPS[1] / TRITON_TMA_PERSISTENT_TFLOPS[0]
        N = 16384
        items = -(-N // bn) * -(-V // 2048)
        tail = (-(-items // SMS) * SMS) / items  # the last round of work items leaves programs idle
        p = dict(H=H, V=V, N=N, tile_mma_cycles=round(mma_clk), fused_epilogue_cycles=round(f_epi),
                 bare_epilogue_cycles=round(b_epi), fused_over_bare=round(fused_over_bare, 3),
                 bare_triton_over_cublas=(round(lo, 3), round(hi, 3)), tail=round(tail, 4),
                 fused_over_cublas=(round(lo * fused_over_bare * tail, 2), round(hi * fused_over_bare * tail, 2)),
                 cublas_ms=round(2 * N * H * V / (CUBLAS_TFLOPS[0] * 1e12) * 1e3, 1))
        out[f"H{H}_V{V}"] = p
        text.append(
            f"- N = {N}, H = {H}, V = {V}: one {bn} × {bv} tile's MMAs take {mma_clk:.0f} cycles at peak; its epilogue "
            f"{f_epi:.0f} (bare store: {b_epi:.0f}), not overlapped → fused / bare Triton = {fused_over_bare:.3f}; "
            f"work-item tail × {tail:.4f}; bare Triton / cuBLAS = {lo:.2f}–{hi:.2f} (public figures) → "
            f"**predicted fused forward / cuBLAS = {p['fused_over_cublas'][0]:.2f}–{p['fused_over_cublas'][1]:.2f}** "
            f"(cuBLAS ≈ {p['cublas_ms']} ms).")
    return "\n".join(text), out


def header() -> dict:
    import torch
    import triton

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = ""
    return dict(tool="kernel_report", device="none (offline compile)", torch=torch.__version__,
                triton=triton.__version__, commit=commit, date=datetime.date.today().isoformat())


PREDICTION_NOTE = """All of this is a **prediction** from offline compiles: no GPU has run these kernels. Sources: Triton's
TMA-persistent matmul on an H100, 666–689 TFLOP/s at (8192, 8192, 4096–16384) bf16 (tritonbench PR #894,
github.com/meta-pytorch/tritonbench/pull/894); cuBLAS bf16 8192³ on this workplace's H200, 769–798 TFLOP/s
(/work/.library/device/KINDS.md; same SMs and clocks as the H100 SXM); tensor descriptors: +13 % over a
plain persistent fp16 matmul on an H100 (triton-lang/triton PR #5461). Analogue for a softmax epilogue:
Triton's fused-attention tutorial reaches 0.77 of FlashAttention-3 on an H100 (477 vs 621 TFLOP/s,
pytorch/benchmark PR #2391), FA3 itself 740 TFLOP/s fp16 (75 % of peak) with warp specialisation and
ping-pong scheduling that Triton 3.6 does not do for us (see benchmarks/NOTES.md)."""


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", type=int, nargs="+", default=[90, 80])
    p.add_argument("--dtype", nargs="+", default=["bfloat16", "float16", "float32"])
    p.add_argument("--out", default=None, help="write <out>.md and <out>.json as well")
    args = p.parse_args(argv)
    records = rows(check_all(tuple(args.arch), tuple(args.dtype)))
    text = table(records)
    side, facts = side_by_side(records)
    ops = kstep_opcodes(records)
    pred, numbers = predict(records)
    print(text + "\n\n" + side + "\n\n" + ops + "\n\n" + pred)
    if args.out:
        hdr = header()
        slim = [{k: v for k, v in r.items() if k not in ("sass",)} for r in records]
        Path(args.out + ".json").write_text(json.dumps(dict(header=hdr, records=slim, side_by_side=facts,
                                                            prediction=numbers), indent=1) + "\n")
        Path(args.out + ".md").write_text(
            f"# Kernel report ({hdr['date']}, commit {hdr['commit'][:10]}, triton {hdr['triton']}, offline)\n\n"
            f"Generated by `python benchmarks/kernel_report.py --out benchmarks/results/kernel_report`.\n\n"
            f"## Side by side: sm_90, bf16, H = 4,096, V = 128,256 (shape-class launch)\n\n"
            f"Per K-step = one pass of the innermost loop holding the matrix instructions (one BLOCK_K slice); "
            f"the instruction counts are per thread (SASS lines). CTAs per SM from registers, shared memory and "
            f"threads.\n\n{side}\n\n### One K-step, opcode by opcode (sm_90, bf16, 128 × 256 × 64)\n\n"
            f"The SASS of the innermost loop (`kernels/sass.py`); only register allocation and address "
            f"bookkeeping differ, asserted by tests/kernels/test_cuda_compile.py.\n\n{ops}\n\n"
            f"## Predicted ratio to cuBLAS (prediction, not a measurement)\n\n{pred}\n\n"
            f"{PREDICTION_NOTE}\n\n## Every launched kernel\n\n" + text + "\n")
    return 1 if any(r["problems"] for r in records) else 0


if __name__ == "__main__":
    sys.exit(main())
