"""FSDP2 under torchrun, on CPU with gloo: every recipe against its single-process run.

Each rank reads its slice of the same global batch and losses are token-weighted across ranks, so N processes
must follow the single-process curve up to float reassociation (measured: ≤ 6e-7 for SFT, ≤ 4e-7 for DPO; the
bound here is the issue's 1e-4). Runs on 2 ranks are real `torchrun` launches of the CLI (`python -m
torch.distributed.run`), four steps on the built-in task; the one-process runs they are compared with call
`cli.main` in the test process (the same code from argument parsing on; a fresh Python with torch and transformers
costs about 4 s of the 2-core machine), except `--fsdp`, which joins a process group and so runs in its own.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fusealign.engine.checkpoint import latest_checkpoint

COMMON = ["--device", "cpu", "--threads", "1"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
STEPS = ["--max-steps", "4", "--save-every", "2", "--batch-size", "8"]


def launch(nproc: int, *args, cwd: Path, timeout: int = 240) -> subprocess.CompletedProcess:
    """`fusealign ARGS` on `nproc` ranks under torchrun (nproc 1: one plain process), in `cwd`."""
    cmd = [sys.executable, "-m", "fusealign", *args, *COMMON] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
         "-m", "fusealign", *args, *COMMON]
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=ENV)
    if r.returncode != 0:  # torchrun's own report buries the rank's error: show the traceback lines
        why = [ln for ln in r.stderr.splitlines() if "Loading weights" not in ln and "Warning" not in ln]
        pytest.fail(f"{' '.join(args)} (rc {r.returncode}):\n" + "\n".join(why[-80:]))
    return r


def run_here(*args, cwd: Path) -> None:
    """`fusealign ARGS` in this process, in `cwd` (what `launch(1, ...)` runs, without starting a Python)."""
    from fusealign import cli

    before = os.getcwd()
    os.chdir(cwd)
    try:
        assert cli.main([*args, *COMMON]) == 0, args
    finally:
        os.chdir(before)


def rows(run_dir: Path) -> list:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def assert_same_curve(a: list, b: list, keys, tol: float):
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, len(a) + 1))
    for ra, rb in zip(a, b):
        for k in keys:
            assert abs(ra[k] - rb[k]) <= tol * max(1.0, abs(ra[k])), (k, ra["step"], ra[k], rb[k])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("dist")
    run_here("sft", *STEPS, "--output-dir", "sft1", cwd=d)
    launch(2, "sft", *STEPS, "--output-dir", "sft2", cwd=d)
    launch(1, "sft", *STEPS, "--output-dir", "sft1-fsdp", "--fsdp", cwd=d)
    sft = str(latest_checkpoint(d / "sft1"))
    run_here("dpo", *STEPS, "--sft-model", sft, "--eval-samples", "8", "--output-dir", "dpo1", cwd=d)
    launch(2, "dpo", *STEPS, "--sft-model", sft, "--eval-samples", "8", "--output-dir", "dpo2", cwd=d)
    return d, sft


def test_sft_two_ranks_follow_the_single_process_curve(runs):
    d, _ = runs
    one, two = rows(d / "sft1"), rows(d / "sft2")
    assert len(one) == 4 and {r["world_size"] for r in one} == {1} and {r["world_size"] for r in two} == {2}
    assert_same_curve(one, two, ["loss", "grad_norm", "lr"], 1e-4)
    # --fsdp in one process: a 1-rank group through every sharded path (what one GPU checks in bf16)
    assert_same_curve(one, rows(d / "sft1-fsdp"), ["loss", "grad_norm"], 1e-5)
    assert (latest_checkpoint(d / "sft1-fsdp") / "dcp").is_dir()
    # The consolidated export of the FSDP run loads with from_pretrained and computes what one process computes.
    from transformers import AutoModelForCausalLM

    m1 = AutoModelForCausalLM.from_pretrained(latest_checkpoint(d / "sft1")).eval()
    m2 = AutoModelForCausalLM.from_pretrained(latest_checkpoint(d / "sft2")).eval()
    ids = torch.randint(0, m1.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(m1(ids).logits, m2(ids).logits, atol=1e-4)
    assert not any(p.is_meta for p in m2.parameters())


def test_dpo_two_ranks_follow_the_single_process_curve(runs):
    d, _ = runs
    one, two = rows(d / "dpo1"), rows(d / "dpo2")
    assert {r["world_size"] for r in two} == {2}
    assert_same_curve(one, two, ["loss", "grad_norm", "rewards/margins", "rewards/accuracies"], 1e-4)
    f1 = json.loads((d / "dpo1" / "final_metrics.json").read_text())
    f2 = json.loads((d / "dpo2" / "final_metrics.json").read_text())
    assert f2["world_size"] == 2 and f2["step"] == f1["step"] == 4


def test_fewer_examples_than_ranks(runs):
    """--batch-size 1 on 2 ranks: rank 1's slice is empty every step; it runs a zero-weighted example so that
    FSDP's collectives still meet, and the curve is the one-process curve."""
    d, _ = runs
    args = ["sft", "--max-steps", "2", "--batch-size", "1", "--save-every", "2"]
    run_here(*args, "--output-dir", "sft-b1-1", cwd=d)
    launch(2, *args, "--output-dir", "sft-b1-2", cwd=d)
    assert_same_curve(rows(d / "sft-b1-1"), rows(d / "sft-b1-2"), ["loss", "grad_norm"], 1e-4)


@pytest.mark.parametrize("nproc", [2, 1], ids=["same-world-size", "2-to-1-ranks"])
def test_resume_reproduces_the_uninterrupted_run(runs, nproc):
    """Cut the 2-rank DPO run back to its step-2 checkpoint and resume it on `nproc` ranks: DCP reshards the
    optimizer, and steps 3-4 repeat the uninterrupted run."""
    d, sft = runs
    cut = d / f"dpo2-resume{nproc}"
    shutil.copytree(d / "dpo2", cut)
    shutil.rmtree(cut / "checkpoint-000004")
    (cut / "latest").write_text("checkpoint-000002")
    args = ["dpo", *STEPS, "--sft-model", sft, "--eval-samples", "8", "--output-dir", cut.name, "--resume"]
    if nproc > 1:
        launch(nproc, *args, cwd=d)
    else:
        run_here(*args, cwd=d)
    full, resumed = rows(d / "dpo2"), rows(cut)
    assert [r["world_size"] for r in resumed] == [2, 2, nproc, nproc]
    assert_same_curve(full, resumed, ["loss", "grad_norm", "rewards/margins"], 1e-6 if nproc == 2 else 1e-4)


def test_reward_model_and_ppo_iteration_on_two_ranks(runs):
    """RM under FSDP2: its exported checkpoint, reloaded in one process, scores the held-out pairs exactly as
    rank 0's sharded model did at the end of training. Then a PPO iteration (rollouts per rank, policy, critic,
    reference and reward model sharded) runs to its checkpoint."""
    d, sft = runs
    launch(2, "rm", "--max-steps", "2", "--batch-size", "8", "--sft-model", sft, "--output-dir", "rm2", cwd=d)
    summary = json.loads((d / "rm2" / "final_metrics.json").read_text())
    from fusealign.engine.study import task
    from fusealign.engine.data import load_examples
    from fusealign.engine.models import RewardModel
    from fusealign.engine.objectives import pair_batch

    rm = RewardModel.from_pretrained(str(latest_checkpoint(d / "rm2"))).eval()
    tok = task.tokenizer()
    held, _ = load_examples("builtin:pairs", "pairs", tok, max_length=48, held_out=True)
    with torch.no_grad():
        r = torch.cat([rm.rewards(pair_batch(held[i:i + 64], pad_id=tok.pad_token_id, pack=True))
                       .view(2, -1).T for i in range(0, len(held), 64)])
    margin = r[:, 0] - r[:, 1]
    assert margin.mean().item() == pytest.approx(summary["eval/margin"], abs=1e-5)
    assert (margin > 0).float().mean().item() == pytest.approx(summary["eval/accuracy"], abs=1e-9)

    # adaptive KL and early stopping: decided on every rank's statistics together (a per-rank decision
    # deadlocked, one rank in an FSDP forward and the other in a metrics all-reduce)
    launch(2, "ppo", "--max-steps", "1", "--batch-size", "4", "--max-new-tokens", "6", "--sft-model", sft,
           "--reward-model", str(latest_checkpoint(d / "rm2")), "--output-dir", "ppo2", "--target-kl", "0.01",
           "--early-stop-kl", "1e-4", "--num-ppo-epochs", "3", cwd=d)
    (row,) = rows(d / "ppo2")
    assert row["world_size"] == 2 and all(v == v for v in row.values() if isinstance(v, float))
    assert (latest_checkpoint(d / "ppo2") / "model.safetensors").is_file()
    # … and continues in one process (the value head's optimizer state is keyed as one process keys it).
    run_here("ppo", "--max-steps", "2", "--batch-size", "4", "--max-new-tokens", "6", "--sft-model", sft,
           "--reward-model", str(latest_checkpoint(d / "rm2")), "--output-dir", "ppo2", "--target-kl", "0.01",
           "--early-stop-kl", "1e-4", "--num-ppo-epochs", "3", "--resume", cwd=d)
    assert [r["world_size"] for r in rows(d / "ppo2")] == [2, 1]


@pytest.mark.parametrize("args, fragment", [
    (["compare"], "launch it without torchrun"),
    (["sft", "--no-fsdp"], "--no-fsdp with WORLD_SIZE=2"),
    (["dpo", "--loss-type", "sigmoid", "aot", "--nll-coef", "0.5"], "dpo with aot, --nll-coef runs in one process"),
], ids=["compare", "no-fsdp", "batch-wide-dpo-losses"])
def test_what_cannot_run_on_two_ranks_says_so(runs, args, fragment, monkeypatch, capsys):
    d, _ = runs
    if args == ["sft", "--no-fsdp"]:  # refused from torchrun's environment before any process group: one rank's view
        from fusealign import cli

        for k, v in {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}.items():  # rank 0: the one that would log
            monkeypatch.setenv(k, v)
        monkeypatch.chdir(d)
        code = cli.main([*args, *COMMON, "--output-dir", "refused"])
        r = subprocess.CompletedProcess(args, code, "", capsys.readouterr().err)
    else:
        r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                            "-m", "fusealign", *args, *COMMON, "--output-dir", "refused"], cwd=d, capture_output=True,
                           text=True, timeout=120, env=ENV)
    # each rank's own one-line error (under torchrun, which then adds its ChildFailedError report)
    assert r.returncode != 0 and any(ln.startswith(f"fusealign {args[0]}: error: ") and fragment in ln
                                     for ln in r.stderr.splitlines()), r.stderr[-2000:]
    assert not (d / "refused" / "metrics.jsonl").exists()


def _whiten_worker(rank, world, store_path):
    import torch.distributed as dist

    from fusealign.engine.distributed import DistInfo
    from fusealign.engine.ppo import masked_whiten

    dist.init_process_group("gloo", store=dist.FileStore(store_path, world), rank=rank, world_size=world)
    try:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(6, 5, generator=g) * 3 + 1
        mask = (torch.rand(6, 5, generator=g) > 0.3).float()
        whole = masked_whiten(x, mask)
        rows = slice(rank, None, world)  # this rank's sequences of the rollout
        mine = masked_whiten(x[rows], mask[rows], info=DistInfo(rank, world))
        torch.testing.assert_close(mine, whole[rows], rtol=1e-6, atol=1e-6)
    finally:
        dist.destroy_process_group()


def test_ppo_whitening_takes_every_ranks_tokens(tmp_path):
    """GAE advantages are whitened with the statistics of the whole rollout, not of one rank's share."""
    import torch.multiprocessing as mp

    mp.start_processes(_whiten_worker, args=(2, str(tmp_path / "store")), nprocs=2, start_method="spawn")
