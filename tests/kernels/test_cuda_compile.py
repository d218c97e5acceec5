"""Every Triton kernel the public ops launch compiles for sm_90 and sm_80 — no GPU, no interpreter.

The interpreter (TRITON_INTERPRET=1, which the rest of the CPU suite uses) accepts code the GPU compiler
rejects; this test runs Triton's real compiler and the `ptxas` shipped in the triton wheel in a child
process without the interpreter (see fusealign/kernels/compile_check.py), over the launches of
linear_logps / linear_kl / linear_dpo_loss / linear_ppo_loss (forward and backward, with and without
entropy gradient, bias, softcap, temperature ≠ 1, both KL directions) and over the shape classes
H ∈ {2048, 4096, 8192} × V ∈ {32000, 128256, 151936, 262144}, in bf16, fp16 and fp32. It checks:
no register spills, wgmma (not mma.sync) for bf16/fp16 dots on sm_90, pipelined operand loads
(cp.async or TMA) in every kernel with a dot, and shared memory within the target's limit. The candidates
(kernels/candidates.py) are compiled in a second run with their per-architecture tiles: the same checks,
TMA (UTMALDG) on sm_90 and cp.async on sm_80 for the persistent kernels, and the persistent forward's main
loop read from the SASS equal to the bare Triton matmul's with the same tiling (kernels/bare_matmul.py).
"""

import json
import os
import platform
import subprocess
import sys
import textwrap

import pytest

KERNELS = {"_logps_fwd_kernel", "_merge_kernel", "_logps_bwd_dz_kernel", "_kl_fwd_kernel", "_kl_merge_kernel",
           "_kl_bwd_dz_kernel"}
CANDIDATE_KERNELS = {"_logps_fwd_persistent_kernel", "_kl_fwd_persistent_kernel", "_bare_matmul_kernel",
                     "_hybrid_reduce_kernel", "_hybrid_dz_kernel"}
PERSISTENT = {"_logps_fwd_persistent_kernel", "_kl_fwd_persistent_kernel", "_bare_matmul_kernel"}
DOT_KERNELS = {"_logps_fwd_kernel", "_logps_bwd_dz_kernel", "_kl_fwd_kernel", "_kl_bwd_dz_kernel"}

pytestmark = pytest.mark.skipif(
    not (sys.platform.startswith("linux") and platform.machine() in ("x86_64", "AMD64")),
    reason="the triton wheel ships ptxas/cuobjdump for Linux x86-64 only",
)


def _child_env(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")  # compile for real, never from a cache
    return env


def _compile(tmp_path_factory, scope):
    tmp = tmp_path_factory.mktemp(f"compile-{scope}")
    out = subprocess.run([sys.executable, "-m", "fusealign.kernels.compile_check", "--json", "--scope", scope],
                         capture_output=True, text=True, env=_child_env(tmp), timeout=1500)
    lines = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert lines, f"no report (exit {out.returncode}):\n{out.stderr[-4000:]}"
    return lines, out


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    return _compile(tmp_path_factory, "default")


@pytest.fixture(scope="module")
def candidate_reports(tmp_path_factory):
    """The Hopper-grade candidates (kernels/candidates.py), compiled with their per-architecture tiles."""
    return _compile(tmp_path_factory, "candidates")


def test_every_kernel_compiles_for_sm90_and_sm80(reports):
    lines, out = reports
    for arch in (90, 80):
        for dtype in ("bf16", "fp16", "fp32"):
            built = {r["kernel"] for r in lines if r["arch"] == arch and not r["error"]
                     and (dtype in r["dtypes"].split(",") or r["kernel"].endswith("merge_kernel"))}
            assert built == KERNELS, f"sm_{arch} {dtype}: missing {KERNELS - built}"
    refused = [f"sm_{r['arch']} {r['kernel']}: {r['error']}" for r in lines if r["error"]]
    assert not refused, "\n".join(refused)
    assert out.returncode == 0 or any(r["problems"] for r in lines), out.stderr[-4000:]


def test_no_spills_wgmma_pipelined_smem(reports):
    lines, _ = reports
    bad = [f"sm_{r['arch']} {r['kernel']} {r['dtypes']} {r['constexprs']}: {'; '.join(r['problems'])}"
           for r in lines if r["problems"]]
    assert not bad, "\n".join(bad)
    # The checks behind `problems` are live: the reports carry what they test.
    hopper_dots = [r for r in lines if r["arch"] == 90 and r["kernel"] in DOT_KERNELS and "bf16" in r["dtypes"]]
    assert hopper_dots and all(r["wgmma"] > 0 and r["mma_sync"] == 0 for r in hopper_dots)
    ampere_dots = [r for r in lines if r["arch"] == 80 and r["kernel"] in DOT_KERNELS and "bf16" in r["dtypes"]]
    assert ampere_dots and all(r["mma_sync"] > 0 and r["cp_async"] > 0 for r in ampere_dots)
    assert all(r["spill_bytes"] == 0 for r in lines)


def test_tile_configs_do_not_depend_on_N(reports):
    """Batch invariance: one tile configuration per (kernel, dtype, flags) whatever the token count."""
    lines, _ = reports
    configs = {}
    for r in lines:
        c = r["constexprs"]
        key = (r["arch"], r["kernel"], r["dtypes"], tuple(sorted((k, v) for k, v in c.items() if not k.startswith("BLOCK"))))
        blocks = tuple(sorted((k, v) for k, v in c.items() if k.startswith("BLOCK")))
        configs.setdefault(key, set()).add((blocks, r["num_warps"], r["num_stages"]))
    assert all(len(v) == 1 for v in configs.values()), {k: v for k, v in configs.items() if len(v) > 1}


BROKEN = textwrap.dedent(
    '''
    import torch, triton, triton.language as tl
    from fusealign.kernels.compile_check import Launch, compile_launch

    _PLAIN = -1.0e30  # a plain Python global: the interpreter reads it, the GPU compiler must refuse it

    @triton.jit
    def k(x_ptr, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        tl.store(x_ptr + offs, tl.full((BLOCK,), _PLAIN, tl.float32))

    try:
        compile_launch(Launch(k, (torch.empty(16),), dict(BLOCK=16, num_warps=1), (1,)), 90)
    except Exception as e:
        print("REFUSED", type(e).__name__, str(e).replace("\\n", " ")[:300])
    else:
        print("COMPILED")
    '''
)


def test_a_plain_global_inside_jit_is_caught(tmp_path):
    """The class of bug that broke every CUDA call while the interpreter passed (issue 9)."""
    script = tmp_path / "broken_kernel.py"  # triton.jit reads the source: a file, not `-c`
    script.write_text(BROKEN)
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=_child_env(tmp_path),
                         timeout=300)
    assert "REFUSED" in out.stdout and "_PLAIN" in out.stdout, out.stdout + out.stderr[-2000:]


def test_candidates_compile_clean(candidate_reports):
    lines, out = candidate_reports
    for arch in (90, 80):
        built = {r["kernel"] for r in lines if r["arch"] == arch and not r["error"]}
        assert built == CANDIDATE_KERNELS, f"sm_{arch}: missing {CANDIDATE_KERNELS - built}"
    bad = [f"sm_{r['arch']} {r['kernel']} {r['dtypes']} {r['constexprs']}: {'; '.join(r['problems'])}"
           for r in lines if r["problems"]]
    assert not bad, "\n".join(bad)
    low = [r for r in lines if r["kernel"] in PERSISTENT and ("bf16" in r["dtypes"] or "fp16" in r["dtypes"])]
    hopper = [r for r in low if r["arch"] == 90]
    ampere = [r for r in low if r["arch"] == 80]
    assert hopper and all(r["tma"] > 0 and r["cp_async"] == 0 and r["wgmma"] > 0 and r["mma_sync"] == 0 for r in hopper)
    assert ampere and all(r["tma"] == 0 and r["cp_async"] > 0 and r["mma_sync"] > 0 for r in ampere)
    # The wide tile where it fits: 128 x 256 for the plain single-head forward on sm_90.
    plain = [r for r in hopper if r["kernel"] == "_logps_fwd_persistent_kernel" and "bf16" in r["dtypes"]
             and not any(v is True for k, v in r["constexprs"].items() if k != "INTERPRET")]
    assert plain and all(r["constexprs"]["BLOCK_V"] == 256 and r["num_warps"] == 8 for r in plain)


def _main_loop(r):
    return (r["sass"] or {}).get("main_loop") or {}


def test_persistent_main_loop_is_the_bare_matmuls(candidate_reports):
    """sm_90 bf16: one K-step of the fused forward issues what the bare matmul's issues — the same HGMMA shape
    and count, TMA loads, mbarrier waits and arrives, CTA barriers and warpgroup waits — read from the SASS."""
    lines, _ = candidate_reports

    def pick(kernel):
        hits = [r for r in lines if r["arch"] == 90 and r["kernel"] == kernel and r["dtypes"].startswith("bf16")
                and not any(v is True for k, v in r["constexprs"].items() if k != "INTERPRET")
                and "V" in r["div16"].split(",")]
        assert hits, kernel
        return hits[0]

    bare, fused = pick("_bare_matmul_kernel"), pick("_logps_fwd_persistent_kernel")
    assert bare["constexprs"]["BLOCK_V"] == fused["constexprs"]["BLOCK_V"] and bare["num_stages"] == fused["num_stages"]
    b, f = _main_loop(bare), _main_loop(fused)
    assert b["mma"] == f["mma"] == {"HGMMA.64x256x16.F32.BF16": 4}, (b["mma"], f["mma"])
    for key in ("tma_loads", "cp_async", "mbarrier_waits", "mbarrier_arrives", "bar_sync", "warpgroup_waits"):
        assert b[key] == f[key], (key, b[key], f[key])
    assert f["tma_loads"] == 2 and f["mbarrier_waits"] == 1
    # Address and loop bookkeeping may differ by a few instructions (register allocation), not the loop's work.
    assert abs(b["instructions"] - f["instructions"]) <= 8, (b["instructions"], f["instructions"])
