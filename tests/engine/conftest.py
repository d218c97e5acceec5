"""Fixtures shared by the engine's test files.

`trained_sft`: the built-in task's 150-step SFT run, which both the trainer tests (RM, DPO, on-policy DPO on top
of it) and the PPO tests start from. Trained once per test session — and once across pytest-xdist workers: the
first worker to need it trains it under a file lock in the session's shared temporary root, the others wait and
reuse it (read-only: tests copy it before writing into a run directory).
"""

import json
import os

import pytest
from filelock import FileLock  # a transformers dependency


@pytest.fixture(scope="session")
def trained_sft(tmp_path_factory):
    """-> (run directory, summary dict) of `run_sft(SFTConfig(max_steps=150, device="cpu"))`."""
    from fusealign.engine.config import SFTConfig
    from fusealign.engine.recipes import run_sft

    base = tmp_path_factory.getbasetemp()
    root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base  # shared by the workers of one run
    out = root / "shared-sft-150"
    done = root / "shared-sft-150.json"
    with FileLock(str(root / "shared-sft-150.lock")):
        if not done.exists():
            summary = run_sft(SFTConfig(output_dir=str(out), max_steps=150, device="cpu"))
            done.write_text(json.dumps(summary, default=str))
    return out, json.loads(done.read_text())
