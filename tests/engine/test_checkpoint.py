"""Checkpoints: a SIGKILL in the middle of a write leaves the previous one loadable; resuming never runs code
from a checkpoint (issue 18); resume is exact for DPO (SFT and PPO: test_trainers.py, test_ppo.py, test_cli.py)."""

import json
import os
import pickle
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from fusealign.engine.checkpoint import TRAINER_STATE, latest_checkpoint, load_trainer_state, rng_state, \
    save_checkpoint, set_rng_state
from fusealign.engine.config import DPOConfig, SFTConfig
from fusealign.engine.errors import CheckpointError
from fusealign.engine.recipes import run_dpo, run_sft

WRITER = textwrap.dedent(
    """
    import os, sys, torch
    torch.set_num_threads(1)  # no OpenMP pool: the process forks below
    from fusealign.engine.study import task
    from fusealign.engine.checkpoint import latest_checkpoint, load_trainer_state, rng_state, save_checkpoint
    from fusealign.engine.models import model_from_config

    run_dir = sys.argv[1]
    model, tok = model_from_config(task.model_config(), seed=0), task.tokenizer()
    opt = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 4, dtype=torch.long)).logits.sum().backward()
    opt.step()
    while sys.stdin.readline():  # one line per attempt: a forked writer, which the test kills
        pid = os.fork()
        if pid == 0:
            try:  # the writer never returns into the parent's loop: it is killed, or exits on an error
                last = latest_checkpoint(run_dir)
                step = load_trainer_state(last)["step"] if last else 0
                print("ready", os.getpid(), flush=True)
                while True:  # save forever: a kill lands somewhere inside a write
                    step += 1
                    save_checkpoint(run_dir, step, model, tok, {"step": step, "optimizer": opt.state_dict(),
                                                                "rng": rng_state()}, keep=2)
            finally:
                os._exit(1)
        os.waitpid(pid, 0)
        print("dead", flush=True)
    """
)


def test_sigkill_during_checkpoint_writes_leaves_the_last_one_loadable(tmp_path):
    """Six writers SIGKILLed at a random moment of their endless saves; after each, the latest checkpoint loads.
    Each writer is a fork of one Python that imported torch and built the model once (a fresh Python per attempt
    cost about 4 s of the 2-core machine each); the kill and what it leaves on disk are the same."""
    from transformers import AutoModelForCausalLM

    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    run_dir = tmp_path / "run"
    rng = random.Random(0)
    steps = []
    p = subprocess.Popen([sys.executable, str(script), str(run_dir)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         text=True)
    pid = None
    try:
        for attempt in range(6):
            p.stdin.write("go\n")
            p.stdin.flush()
            word, pid = p.stdout.readline().split()
            assert word == "ready"
            deadline = time.monotonic() + 120
            while latest_checkpoint(run_dir) is None or (steps and load_trainer_state(latest_checkpoint(run_dir))
                                                         ["step"] <= steps[-1]):
                time.sleep(0.01)  # at least one new save in this attempt
                os.kill(int(pid), 0)  # ProcessLookupError: the writer died before saving
                assert time.monotonic() < deadline, "the writer saved nothing in 120 s"
            time.sleep(rng.uniform(0.0, 0.3))
            os.kill(int(pid), signal.SIGKILL)
            assert p.stdout.readline().strip() == "dead"
            pid = None
            ckpt = latest_checkpoint(run_dir)
            state = load_trainer_state(ckpt)
            AutoModelForCausalLM.from_pretrained(str(ckpt))  # weights complete
            assert state["step"] == int(ckpt.name.split("-")[1])
            steps.append(state["step"])
    finally:
        if pid is not None:  # a failed assertion must not leave a writer saving forever
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass
        p.stdin.close()
        try:
            p.wait(timeout=60)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    assert steps == sorted(steps) and len(set(steps)) == len(steps)


class _Exploit:
    """Unpickling this object runs `open(marker, "w")`: what a malicious trainer_state.pt could do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("sft")
    run_sft(SFTConfig(output_dir=str(out), max_steps=4, save_every=2, batch_size=8, device="cpu"))
    return out


def test_a_trainer_state_that_runs_code_is_refused_on_resume(sft_run, tmp_path):
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(sft_run, run_dir)
    marker = tmp_path / "PWNED"
    ckpt = latest_checkpoint(run_dir)
    with open(ckpt / TRAINER_STATE, "wb") as f:
        pickle.dump({"step": 4, "payload": _Exploit(str(marker))}, f)
    r = subprocess.run([sys.executable, "-m", "fusealign", "sft", "--resume", "--max-steps", "6", "--output-dir",
                        str(run_dir), "--device", "cpu"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "refusing to load this trainer state" in r.stderr and "--trust-checkpoint" in r.stderr
    assert not marker.exists()  # nothing from the checkpoint ran


def test_old_format_states_are_refused_unless_trusted(sft_run, tmp_path):
    """A state pickled with NumPy objects (the format before this one) needs weights_only=False."""
    import numpy as np

    ckpt = tmp_path / "checkpoint-000001"
    ckpt.mkdir()
    state = {"step": 1, "rng": {"numpy": np.random.get_state()}}
    torch.save(state, ckpt / TRAINER_STATE)
    with pytest.raises(CheckpointError, match="--trust-checkpoint"):
        load_trainer_state(ckpt)
    assert load_trainer_state(ckpt, trust=True)["step"] == 1


def test_rng_state_round_trips_through_the_safe_format(tmp_path):
    s = rng_state()
    torch.save({"rng": s}, tmp_path / "x.pt")
    loaded = torch.load(tmp_path / "x.pt", weights_only=True)["rng"]  # no allow-list needed
    a = (random.random(), float(torch.rand(1)), __import__("numpy").random.rand())
    set_rng_state(loaded)
    assert (random.random(), float(torch.rand(1)), __import__("numpy").random.rand()) == a


def test_reference_cache_is_safetensors_and_every_torch_load_is_safe():
    root = Path(__file__).resolve().parents[2]
    sources = [p for d in ("kernels", "engine", "python") for p in (root / d).rglob("*.py")]
    for p in sources:
        text = p.read_text()
        for line in text.splitlines():
            if "torch.load(" in line and "weights_only=False" in line:
                # The single exception: the explicit --trust-checkpoint path.
                assert p.name == "checkpoint.py" and "trust" in text, (p, line)
            elif "torch.load(" in line and not line.lstrip().startswith("#"):
                assert "weights_only=True" in line, (p, line)


def test_dpo_resume_reproduces_the_uninterrupted_run(sft_run, tmp_path):
    sft = str(latest_checkpoint(sft_run))
    kw = dict(sft_model=sft, max_steps=6, save_every=3, batch_size=8, device="cpu", eval_samples=4)
    run_dpo(DPOConfig(output_dir=str(tmp_path / "full"), **kw))
    part = tmp_path / "part"
    run_dpo(DPOConfig(output_dir=str(part), **kw))
    import shutil

    from fusealign.engine.checkpoint import write_text_atomic

    shutil.rmtree(part / "checkpoint-000006")
    write_text_atomic(part / "latest", "checkpoint-000003")
    run_dpo(DPOConfig(output_dir=str(part), resume=True, **kw))
    a = [json.loads(x) for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(x) for x in (part / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in b] == list(range(1, 7))
    for ra, rb in zip(a, b):
        assert ra["loss"] == pytest.approx(rb["loss"], abs=1e-6), ra["step"]
        assert ra["rewards/margins"] == pytest.approx(rb["rewards/margins"], abs=1e-6)
