"""`chunk_bytes` bounds the fused ops' peak extra memory, forward + backward: measured, and by accounting.

The bound (docstrings of `linear_logps` / `linear_kl`): peak extra memory ≤ 1.25 × chunk_bytes + the
O(N·H + V·H) gradients (and fp32 ∂W accumulator) — also when the forward keeps its logit tile(s) for the
backward because they fit the budget (the last two shapes). Measured on the CPU (torch backend) in a fresh process
per shape, on the suite's one thread (tests/conftest.py; the peaks at 2 threads are the same within 3 MB), whose
peak resident set (VmHWM, reset through /proc/self/clear_refs once the inputs exist, before each op) is read
after forward + backward with an entropy gradient. N = 8,192 × V = 65,536 is 2 GiB of fp32 logits.
"""

import functools
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from fusealign.kernels import head_backward as hb
from fusealign.kernels import linear_kl_torch, linear_logps_torch

SCRIPT = textwrap.dedent(
    """
    import sys
    import torch
    import fusealign as fa

    def rss(field):
        for line in open("/proc/self/status"):
            if line.startswith(field):
                return int(line.split()[1]) * 1024

    N, H, V, chunk_bytes, softcap = *map(int, sys.argv[1:5]), sys.argv[5]
    softcap = None if softcap == "none" else float(softcap)
    torch.manual_seed(0)
    hidden = torch.randn(N, H, requires_grad=True)
    weight = (torch.randn(V, H) / 4).requires_grad_()
    ref_hidden, ref_weight = torch.randn(N, H), torch.randn(V, H) / 4
    targets = torch.randint(0, V, (N,))

    def run(op, n):
        kw = dict(backend="torch", chunk_bytes=chunk_bytes, softcap=softcap, temperature=0.7)
        if op == "logps":
            logps, entropy = fa.linear_logps(hidden[:n], weight, targets[:n], return_entropy=True, **kw)
            (logps * torch.randn(n)).sum().add(entropy.sum()).backward()
        else:
            fa.linear_kl(hidden[:n], weight, ref_hidden[:n], ref_weight, **kw).sum().backward()

    for op in ("logps", "kl"):  # one after the other, each from the resident set the other left behind
        run(op, 4)  # warm up the allocator and libraries
        hidden.grad = weight.grad = None
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak (VmHWM) to the current resident set
        before = rss("VmRSS")
        run(op, N)
        print(op, rss("VmHWM") - before)
        hidden.grad = weight.grad = None
    """
)

MiB = 2**20


SHAPES = [
    (8192, 32, 65536, 256 * MiB, "none"),  # the shape, default budget
    (1024, 16, 262144, 32 * MiB, "30"),  # small budget (32 rows a chunk), wide vocabulary, softcap
    (512, 32, 65536, 128 * MiB, "none"),  # log-probs: the whole (N, V) tile fits the budget and is kept
    (256, 32, 65536, 128 * MiB, "30"),  # both KL tiles fit and are kept (2 · N · V · 4 = budget)
]


@functools.cache
def peaks(N, H, V, chunk_bytes, softcap) -> dict:
    """{op: peak extra bytes} at one shape: one child process measures both ops in turn (a Python with torch starts
    once per shape, not once per op), each peak read from a reset VmHWM."""
    # A fixed mmap threshold: glibc otherwise raises it after each free (up to 32 MiB), and freed buffers below it
    # stay resident in per-thread heaps — noise of ±30 MiB that says nothing about the op's own buffers (and the
    # first op's freed buffers stay out of the second op's peak).
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(N), str(H), str(V), str(chunk_bytes), softcap],
                         capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stderr
    return {op: int(v) for op, v in (line.split() for line in out.stdout.splitlines()[-2:])}


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("op", ["logps", "kl"])
@pytest.mark.parametrize("N,H,V,chunk_bytes,softcap", SHAPES)
def test_peak_extra_memory_within_chunk_bytes(op, N, H, V, chunk_bytes, softcap):
    peak_extra = peaks(N, H, V, chunk_bytes, softcap)[op]
    # Returned ∂h, ∂W and the fp32 ∂W accumulator of a multi-chunk backward: O(N·H + V·H).
    grads = 4 * (N * H + 2 * V * H)
    bound = 1.25 * chunk_bytes + grads
    assert peak_extra <= bound, (f"{op}: peak extra {peak_extra / MiB:.0f} MiB > bound {bound / MiB:.0f} MiB "
                                 f"(logits would be {4 * N * V / MiB:.0f} MiB)")


def test_backward_chunk_counts_every_buffer():
    """Accounting: the rows per backward chunk make dz plus the backend's own temporaries fit the budget."""
    V, budget = 50_257, 64 * MiB
    seen = {}

    def write_dz(rows, dz):
        seen.setdefault("shape", dz.shape)
        seen.setdefault("elem", dz.element_size())
        dz.zero_()

    # The torch backends declare their temporaries as a function of the ∂r buffer's dtype (fp32 on the CPU:
    # logps forms ∂r in that buffer, 0 bytes more; KL holds the reference's tile, 4).
    for temp in (0, linear_logps_torch.BWD_BYTES_PER_LOGIT, linear_kl_torch.BWD_BYTES_PER_LOGIT,
                 linear_logps_torch.bwd_bytes_per_logit, linear_kl_torch.bwd_bytes_per_logit):
        seen.clear()
        hidden, weight = torch.randn(4096, 8), torch.randn(V, 8)
        hb.head_backward(hidden, weight, None, torch.zeros(4096, dtype=torch.bool), write_dz,
                         chunk_bytes=budget, temp_bytes_per_logit=temp)
        rows = seen["shape"][0]
        t = temp(torch.float32) if callable(temp) else temp
        assert rows * V * (seen["elem"] + t) <= budget < (rows + 1) * V * (seen["elem"] + t)
    assert (linear_logps_torch.bwd_bytes_per_logit(torch.float32), linear_kl_torch.bwd_bytes_per_logit(torch.float32)) \
        == (0, 4)
