"""The CUDA-only code paths that CPU runs never take, exercised on the CPU wherever PyTorch allows.

What cannot run here is listed in benchmarks/NOTES.md ("First things to check on a GPU") with the
command that checks it; the GPU-marked tests at the end run there.
"""

import pytest
import torch
from helpers import HAS_CUDA, rel_err

from fusealign.kernels.checks import check_target_range, device_assert
from fusealign.kernels.chunked import HAS_MM_OUT_DTYPE, mm_f32
from fusealign.kernels.segments import segment_sum


# ---- torch.mm(..., out_dtype=torch.float32): the torch backend's and the backward's CUDA matmul

def test_mm_out_dtype_overload_exists_and_returns_fp32():
    """`aten::mm.dtype` has CUDA kernels only; its schema and meta kernel are checkable here."""
    assert HAS_MM_OUT_DTYPE, "torch.mm(..., out_dtype=) missing: mm_f32 would upcast (W copied in fp32) on CUDA"
    a = torch.empty(8, 16, dtype=torch.bfloat16, device="meta")
    b = torch.empty(16, 4, dtype=torch.bfloat16, device="meta")
    out = torch.mm(a, b, out_dtype=torch.float32)
    assert out.dtype == torch.float32 and out.shape == (8, 4)


def test_mm_f32_cpu_fallback_is_fp32_accumulated():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(64, 512, generator=g).bfloat16(), torch.randn(512, 32, generator=g).bfloat16()
    ref = a.double() @ b.double()
    out = mm_f32(a, b)
    assert out.dtype == torch.float32 and rel_err(out, ref) < 1e-6


# ---- device-side asserts (no host sync on CUDA): the call form, run on the CPU

def test_device_assert_raises_with_its_message_on_cpu():
    device_assert(torch.tensor(True), "never")
    with pytest.raises(RuntimeError, match="targets out of range"):
        device_assert(torch.tensor(False), "targets out of range")


def test_target_range_message_names_the_fix():
    with pytest.raises(ValueError, match=r"\[0, V=10\) or equal ignore_index=-100"):
        check_target_range(torch.tensor([1, 10]), 10, -100)


# ---- per-sequence sums: index_add's float atomics on CUDA replaced by a fixed-order segment sum

def test_segment_sum_matches_float64_and_is_differentiable():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 7, (500,), generator=g)
    ids[ids == 3] = 4  # segment 3 empty
    v = torch.randn(500, generator=g, requires_grad=True)
    out = segment_sum(v, ids, 7)
    ref = torch.zeros(7, dtype=torch.float64).index_add(0, ids, v.double())
    assert out.dtype == torch.float32 and rel_err(out, ref) < 1e-6 and out[3] == 0
    w = torch.randn(7, generator=g)
    (out * w).sum().backward()
    assert torch.equal(v.grad, w[ids])


def test_segment_sum_of_a_sequence_does_not_depend_on_the_others():
    """Fixed order: a sequence's sum is bitwise the same whatever other sequences are interleaved with it."""
    g = torch.Generator().manual_seed(2)
    mine = torch.randn(300, generator=g)
    alone = segment_sum(mine, torch.zeros(300, dtype=torch.long), 1)
    for seed in range(3):
        others = torch.randn(700, generator=torch.Generator().manual_seed(seed))
        values = torch.cat([mine, others])
        ids = torch.cat([torch.zeros(300, dtype=torch.long), torch.randint(1, 5, (700,))])
        perm = torch.randperm(1000, generator=torch.Generator().manual_seed(10 + seed))
        # Interleave, keeping the order of `mine` (positions of segment 0 sorted).
        pos0 = torch.sort(perm[:300]).values
        shuffled_v, shuffled_i = torch.empty(1000), torch.empty(1000, dtype=torch.long)
        shuffled_v[pos0], shuffled_i[pos0] = mine, 0
        rest = torch.sort(perm[300:]).values
        shuffled_v[rest], shuffled_i[rest] = others, ids[300:]
        assert torch.equal(segment_sum(shuffled_v, shuffled_i, 5)[0], alone[0])
        assert torch.equal(segment_sum(values, ids, 5)[0], alone[0])


# ---- bf16 autocast in the engine: the head path casts hidden states and head to the autocast dtype

def test_engine_head_path_under_bf16_autocast_matches_fp32():
    """On CUDA the engine trains under bf16 autocast; CPU autocast takes the same head-casting path."""
    from fusealign.engine.study import task
    from fusealign.engine.data import load_examples
    from fusealign.engine.models import model_from_config
    from fusealign.engine.objectives import dpo_objective
    from fusealign.losses import DPOOptions

    tok = task.tokenizer()
    pairs, _ = load_examples("builtin:pairs", "pairs", tok, max_length=48)
    model = model_from_config(task.model_config(), seed=0)
    ref_logps = torch.randn(8, 2, generator=torch.Generator().manual_seed(0)) - 20

    def run():
        model.zero_grad()
        loss, metrics, *_ = dpo_objective(model, pairs[:8], pad_id=tok.pad_token_id, pack=True,
                                         options=DPOOptions(beta=0.5), ref_logps=ref_logps)
        loss.backward()
        return loss.detach().float(), metrics, {n: p.grad.clone() for n, p in model.named_parameters()}

    l32, m32, g32 = run()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        l16, m16, g16 = run()
    assert abs(l16 - l32) < 2e-2 * max(1.0, abs(l32))
    assert abs(m16["logps/chosen"] - m32["logps/chosen"]) < 1e-2 * abs(m32["logps/chosen"])
    assert rel_err(g16["lm_head.weight"], g32["lm_head.weight"]) < 5e-2


# ---- on a GPU (skipped on CPU: run by benchmarks/gpu_suite.sh)

@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_mm_f32_on_cuda_uses_fp32_output():
    a = torch.randn(256, 4096, device="cuda").bfloat16()
    b = torch.randn(4096, 512, device="cuda").bfloat16()
    out = mm_f32(a, b)
    assert out.dtype == torch.float32 and rel_err(out, a.double() @ b.double()) < 1e-5


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_segment_sum_bitwise_reproducible_on_cuda():
    g = torch.Generator(device="cuda").manual_seed(0)
    v = torch.randn(1 << 20, device="cuda", generator=g)
    ids = torch.sort(torch.randint(0, 64, (1 << 20,), device="cuda", generator=g)).values
    first = segment_sum(v, ids, 64)
    assert all(torch.equal(first, segment_sum(v, ids, 64)) for _ in range(5))
    assert rel_err(first, torch.zeros(64, dtype=torch.float64, device="cuda").index_add(0, ids, v.double())) < 1e-6


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_out_of_range_target_trips_the_device_assert_on_cuda():
    """A device-side assert ends the process's CUDA context, so it is checked in a child process."""
    import subprocess
    import sys

    code = ("import torch, fusealign as fa\n"
            "h = torch.randn(8, 64, device='cuda'); w = torch.randn(100, 64, device='cuda')\n"
            "y = torch.full((8,), 100, device='cuda')\n"
            "fa.linear_logps(h, w, y)\n"
            "torch.cuda.synchronize()\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode != 0 and "out of range" in out.stderr, out.stderr[-2000:]
