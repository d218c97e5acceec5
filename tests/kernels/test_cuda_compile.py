"""Every Triton kernel the public ops launch compiles for sm_90 and sm_80 — no GPU, no interpreter.

The interpreter (TRITON_INTERPRET=1, which the rest of the CPU suite uses) accepts code the GPU compiler
rejects; this test runs Triton's real compiler and the `ptxas` shipped in the triton wheel in a child
process without the interpreter (see fusealign/kernels/compile_check.py), over the launches of
linear_logps / linear_kl / linear_dpo_loss / linear_ppo_loss (forward and backward, with and without
entropy gradient, bias, softcap, temperature ≠ 1, both KL directions) and over the shape classes
H ∈ {2048, 4096, 8192} × V ∈ {32000, 128256, 151936, 262144}, in bf16, fp16 and fp32. It checks:
no register spills, wgmma (not mma.sync) for bf16/fp16 dots on sm_90, pipelined operand loads
(cp.async or TMA) in every kernel with a dot, and shared memory within the target's limit.
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
DOT_KERNELS = {"_logps_fwd_kernel", "_logps_bwd_dz_kernel", "_kl_fwd_kernel", "_kl_bwd_dz_kernel"}

pytestmark = pytest.mark.skipif(
    not (sys.platform.startswith("linux") and platform.machine() in ("x86_64", "AMD64")),
    reason="the triton wheel ships ptxas/cuobjdump for Linux x86-64 only",
)


def _child_env(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")  # compile for real, never from a cache
    return env


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("compile")
    out = subprocess.run([sys.executable, "-m", "fusealign.kernels.compile_check", "--json"],
                         capture_output=True, text=True, env=_child_env(tmp), timeout=600)
    lines = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert lines, f"no report (exit {out.returncode}):\n{out.stderr[-4000:]}"
    return lines, out


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
