"""FSDP2 on 2 gloo ranks (torchrun, CPU) with one vLLM engine per rank (external_launcher, TRL's colocate setting):
the weight push gathers the full tensors on every rank, greedy output equals HF generate of the full weights before
and after an FSDP2 update, for untied and tied heads (fsdp_push.py)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.vllm


@pytest.mark.parametrize("head", ["untied", "tied"])
def test_fsdp2_push_on_two_ranks(head, tmp_path):
    script = Path(__file__).with_name("fsdp_push.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                           "--master-port", str(29600 + (head == "tied")), str(script), head],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=900)
    lines = [json.loads(x) for x in proc.stdout.splitlines() if x.startswith("{")]
    assert proc.returncode == 0 and len(lines) == 2, proc.stderr[-4000:]
    for r in lines:
        assert r["before_equal_hf"] and r["after_equal_hf"] and r["changed"], r
    print(f"\n{head}: " + "; ".join(f"rank {r['rank']} engine start {r['start_s']:.1f} s, push {r['push_s'] * 1e3:.0f} ms"
                                    for r in lines), flush=True)
