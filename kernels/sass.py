"""Read the structure of a kernel's SASS (cuobjdump --dump-sass): loops, the matrix main loop, its epilogue.

What the static report (benchmarks/kernel_report.py) needs from a cubin, without a GPU:
  - `instructions(sass)`: (address, opcode with modifiers, full text) per instruction;
  - `loops(instrs)`: every loop as the address range [target, branch] of a backward branch;
  - `main_loop(instrs)`: the innermost loop holding the matrix instructions (HGMMA on sm_90, HMMA on
    sm_80) — the K-loop — and `loop_mix` counts what one pass (one K-step) issues: HGMMA by shape,
    TMA loads (UTMALDG), cp.async (LDGSTS), mbarrier waits (SYNCS.PHASECHK ... TRYWAIT), mbarrier arrives,
    CTA barriers (BAR.SYNC), warpgroup waits, and every instruction;
  - `epilogue(instrs)`: the instructions of the innermost loop that encloses the main loop, outside it:
    what runs once per output tile (the online log-sum-exp, or a bare matmul's store).
The parse relies only on cuobjdump's line format `/*addr*/ [@P] OPCODE operands ;` and on branch
targets being printed as absolute addresses, both stable across CUDA 12/13 cuobjdump.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P[T0-9]+\s+)?([A-Z][A-Za-z0-9_.]*)([^;]*);")
_TARGET = re.compile(r"\b0x([0-9a-f]+)\b")


@dataclass(frozen=True)
class Instr:
    addr: int
    op: str  # opcode with modifiers, e.g. HGMMA.64x256x16.F32.BF16
    text: str  # operands

    @property
    def base(self) -> str:
        return self.op.split(".")[0]


def instructions(sass: str) -> list[Instr]:
    out = []
    for m in _LINE.finditer(sass):
        out.append(Instr(int(m.group(1), 16), m.group(3), m.group(4).strip()))
    return out


def loops(instrs: list[Instr]) -> list[tuple[int, int]]:
    """(first address, branch address) of every loop: a BRA whose target lies at or before it."""
    out = []
    for i in instrs:
        if i.base == "BRA":
            t = _TARGET.search(i.text)
            if t and int(t.group(1), 16) <= i.addr:
                out.append((int(t.group(1), 16), i.addr))
    return out


def _inside(instrs, lo, hi):
    return [i for i in instrs if lo <= i.addr <= hi]


def is_mma(i: Instr) -> bool:
    return i.base in ("HGMMA", "HMMA")


def main_loop(instrs: list[Instr]) -> tuple[int, int] | None:
    """The innermost (shortest) loop that holds matrix instructions: the K-loop."""
    with_mma = [(lo, hi) for lo, hi in loops(instrs) if any(is_mma(i) for i in _inside(instrs, lo, hi))]
    return min(with_mma, key=lambda r: r[1] - r[0]) if with_mma else None


def loop_mix(instrs: list[Instr], rng: tuple[int, int]) -> dict:
    """What one pass of the loop [lo, hi] issues, by category (and `ops`: every opcode with its count)."""
    body = _inside(instrs, *rng)
    ops = Counter(i.op for i in body)
    mma_shapes = Counter(i.op for i in body if is_mma(i))
    return dict(
        instructions=len(body),
        mma=dict(mma_shapes),
        mma_count=sum(mma_shapes.values()),
        tma_loads=sum(1 for i in body if i.base == "UTMALDG"),
        cp_async=sum(1 for i in body if i.base == "LDGSTS"),
        mbarrier_waits=sum(1 for i in body if i.base == "SYNCS" and "TRYWAIT" in i.op),
        mbarrier_arrives=sum(1 for i in body if i.base == "SYNCS" and "ARRIVE" in i.op),
        bar_sync=sum(1 for i in body if i.base == "BAR"),
        warpgroup_waits=sum(1 for i in body if i.op.startswith("WARPGROUP.DEPBAR")),
        global_loads=sum(1 for i in body if i.base in ("LDG",)),
        ops=dict(sorted(ops.items())),
    )


def epilogue(instrs: list[Instr], main: tuple[int, int]) -> dict:
    """Per-tile work outside the main loop: the instructions of the innermost loop enclosing it, less the
    main loop (the online log-sum-exp or a bare matmul's store, plus the next tile's pipeline prologue and
    the drain); for a kernel with one tile per program (no enclosing loop), every instruction after it."""
    lo, hi = main
    outer = [(a, b) for a, b in loops(instrs) if a <= lo and b >= hi and (a, b) != (lo, hi)]
    if outer:
        a, b = min(outer, key=lambda r: r[1] - r[0])
        rest = [i for i in _inside(instrs, a, b) if not (lo <= i.addr <= hi)]
        scope = "tile loop"
    else:
        rest = [i for i in instrs if i.addr > hi]
        scope = "after the main loop"
    ops = Counter(i.base for i in rest)
    return dict(scope=scope, instructions=len(rest), mufu=ops.get("MUFU", 0),
                fp32=sum(ops.get(k, 0) for k in ("FADD", "FMUL", "FFMA", "FMNMX", "FSEL", "FSETP")),
                shuffles=ops.get("SHFL", 0), bar_sync=ops.get("BAR", 0), stores=ops.get("STG", 0) + ops.get("STS", 0),
                mma=sum(1 for i in rest if is_mma(i)))


def summary(sass: str) -> dict:
    """Main loop and epilogue of one kernel's SASS (empty dict when it has no matrix loop)."""
    ins = instructions(sass)
    main = main_loop(ins)
    if main is None:
        return {}
    return dict(main_loop=loop_mix(ins, main), epilogue=epilogue(ins, main), loops=len(loops(ins)),
                total_instructions=len(ins))
