"""SFT, reward-model and DPO trainers on the built-in task; resume; NaN guard; CLI."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fusealign.engine.checkpoint import latest_checkpoint, write_text_atomic
from fusealign.engine.config import DPOConfig, RMConfig, SFTConfig
from fusealign.engine.data import DataStream
from fusealign.engine.recipes import run_dpo, run_rm, run_sft
from fusealign.engine.trainer import NonFiniteLoss, train


def metrics(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def sft_run(trained_sft):
    return trained_sft  # conftest.py: the 150-step SFT run, trained once per session


def test_sft_loss_falls_and_checkpoint_loads(sft_run):
    out, summary = sft_run
    m = metrics(out)
    first, last = sum(r["loss"] for r in m[:10]) / 10, sum(r["loss"] for r in m[-10:]) / 10
    assert last < first - 0.2, (first, last)  # uniform over 74 tokens is ln 74 = 4.30
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(latest_checkpoint(out)))  # plain transformers loading
    assert model.config.vocab_size == 74
    assert {"lr", "grad_norm", "tokens_per_s", "peak_mem_bytes", "nll"} <= set(m[-1])


def test_reward_model_beats_chance(sft_run, tmp_path):
    out, _ = sft_run
    summary = run_rm(RMConfig(output_dir=str(tmp_path), sft_model=str(latest_checkpoint(out)), max_steps=150,
                              lr=1e-3, device="cpu", center_coef=0.01))
    # Held-out pairs labelled by Bradley-Terry sampling (β_h = 5): the Bayes accuracy is about 0.78.
    assert summary["eval/accuracy"] > 0.65, summary
    # The checkpoint holds the trained value head: reloaded, it scores the held-out pairs exactly as evaluated.
    from fusealign.engine.study import task
    from fusealign.engine.data import load_examples
    from fusealign.engine.models import RewardModel
    from fusealign.engine.objectives import pair_batch

    rm = RewardModel.from_pretrained(str(latest_checkpoint(tmp_path))).eval()
    tok = task.tokenizer()
    held, _ = load_examples("builtin:pairs", "pairs", tok, max_length=48, held_out=True)
    with torch.no_grad():
        r = torch.cat([rm.rewards(pair_batch(held[i:i + 64], pad_id=tok.pad_token_id, pack=True))
                       .view(2, -1).T for i in range(0, len(held), 64)])  # (n, 2): chosen, rejected
    assert (r[:, 0] > r[:, 1]).float().mean().item() == pytest.approx(summary["eval/accuracy"], abs=1e-9)


def test_dpo_raises_margins_and_ground_truth_reward(sft_run, tmp_path):
    out, _ = sft_run
    summary = run_dpo(DPOConfig(output_dir=str(tmp_path), sft_model=str(latest_checkpoint(out)), device="cpu",
                                eval_samples=256))
    m = metrics(tmp_path)
    early = sum(r["rewards/margins"] for r in m[:10]) / 10
    late = sum(r["rewards/margins"] for r in m[-20:]) / 20
    assert late > early + 0.3, (early, late)
    # 256 held-out samples; rewards in [−1, 1] with sd ≈ 0.45 → standard error of a mean ≈ 0.03.
    assert summary["eval/gt_reward"] > summary["eval/gt_reward_init"] + 0.15, summary
    cached = list(Path(tmp_path).glob("ref_logps-*.safetensors"))
    assert len(cached) == 1
    stamp = cached[0].stat().st_mtime_ns
    run_dpo(DPOConfig(output_dir=str(tmp_path), sft_model=str(latest_checkpoint(out)), device="cpu", max_steps=2,
                      eval_samples=8, resume=True))
    assert cached[0].stat().st_mtime_ns == stamp  # reused, not recomputed


def test_resume_reproduces_uninterrupted_run(tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    kw = dict(max_steps=10, save_every=5, device="cpu", batch_size=8)
    run_sft(SFTConfig(output_dir=str(full), **kw))
    run_sft(SFTConfig(output_dir=str(part), **kw))
    # Simulate a crash after step 7: the step-10 checkpoint never existed, steps 6–7 were logged.
    shutil.rmtree(part / "checkpoint-000010")
    write_text_atomic(part / "latest", "checkpoint-000005")
    lines = (part / "metrics.jsonl").read_text().splitlines()
    (part / "metrics.jsonl").write_text("\n".join(lines[:7]) + "\n")
    run_sft(SFTConfig(output_dir=str(part), resume=True, **kw))
    a, b = metrics(full), metrics(part)
    assert [r["step"] for r in b] == list(range(1, 11))
    for ra, rb in zip(a, b):
        assert ra["loss"] == pytest.approx(rb["loss"], abs=1e-6), (ra["step"], ra["loss"], rb["loss"])
        assert ra["lr"] == pytest.approx(rb["lr"], rel=1e-9)


def test_non_finite_loss_stops_and_keeps_last_checkpoint(tmp_path):
    from fusealign.engine.study import task

    model = torch.nn.Linear(2, 2)
    model.save_pretrained = lambda path, **kw: torch.save(model.state_dict(), Path(path) / "w.pt")
    calls = []

    def loss_fn(batch):
        calls.append(1)
        loss = model(torch.ones(1, 2)).sum()
        return (loss * float("nan") if len(calls) == 7 else loss), {}, 1

    cfg = SFTConfig(output_dir=str(tmp_path), max_steps=10, save_every=5, device="cpu")
    with pytest.raises(NonFiniteLoss, match=r"non-finite loss \(nan\) at step 7.*checkpoint-000005"):
        train(cfg, model, loss_fn, DataStream(list(range(4)), 2, 0), tokenizer=task.tokenizer())
    assert latest_checkpoint(tmp_path).name == "checkpoint-000005"
    assert (latest_checkpoint(tmp_path) / "w.pt").is_file()


def test_cli_help_and_validation(tmp_path, capsys):
    """--help and a refused value through `cli.main` in this process (the same parsing and exit codes); the run
    itself as a real `python -m fusealign`, its summary on stdout."""
    from fusealign import cli

    with pytest.raises(SystemExit) as e:
        cli.main(["dpo", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--max-steps", "--output-dir", "--resume", "--model", "--data", "--beta", "--loss-type", "--ref-mode"):
        assert flag in out, flag
    assert cli.main(["dpo", "--beta", "-1", "--output-dir", str(tmp_path)]) == 2
    assert "--beta must be a finite number > 0" in capsys.readouterr().err
    ok = subprocess.run([sys.executable, "-m", "fusealign", "sft", "--max-steps", "2", "--output-dir",
                         str(tmp_path / "s"), "--device", "cpu"], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["step"] == 2


def test_fresh_run_refuses_an_old_runs_checkpoints_and_resume_survives_a_cut_line(tmp_path):
    run_sft(SFTConfig(output_dir=str(tmp_path), max_steps=4, save_every=2, device="cpu", batch_size=4))
    with pytest.raises(FileExistsError, match="pass --resume"):
        run_sft(SFTConfig(output_dir=str(tmp_path), max_steps=4, device="cpu", batch_size=4))
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "lo')  # a crash in the middle of a log line
    write_text_atomic(tmp_path / "latest", "checkpoint-000004")
    run_sft(SFTConfig(output_dir=str(tmp_path), max_steps=6, save_every=2, device="cpu", batch_size=4, resume=True))
    assert [r["step"] for r in metrics(tmp_path)] == [1, 2, 3, 4, 5, 6]


def test_reward_model_with_gradient_checkpointing_and_user_data(tmp_path, sft_run):
    out, _ = sft_run
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"prompt": "movie the", "chosen": " good great", "rejected": " bad awful"}) + "\n"
                            for _ in range(20)))
    s = run_rm(RMConfig(output_dir=str(tmp_path / "rm"), sft_model=str(latest_checkpoint(out)), data=str(data),
                        max_steps=3, batch_size=4, device="cpu", gradient_checkpointing=True))
    assert s["step"] == 3 and "eval/accuracy" in s


@pytest.fixture(scope="module")
def rm_run(sft_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("rm")
    run_rm(RMConfig(output_dir=str(out), sft_model=str(latest_checkpoint(sft_run[0])), max_steps=20, device="cpu"))
    return out


def test_onpolicy_pairs_are_policy_samples_ordered_by_the_reward_model(sft_run, rm_run):
    from fusealign.engine.study import task
    from fusealign.engine.data import load_prompts
    from fusealign.engine.models import RewardModel, load_causal_lm
    from fusealign.engine.objectives import pair_batch
    from fusealign.engine.onpolicy import label_pairs

    tok, policy = task.tokenizer(), load_causal_lm(str(latest_checkpoint(sft_run[0])))
    rm = RewardModel.from_pretrained(str(latest_checkpoint(rm_run))).eval()
    prompts = load_prompts("builtin", tok, max_prompt_tokens=32)[:40]
    pairs = label_pairs(policy, rm, tok, prompts, seed=3, max_new_tokens=16, missing_eos_penalty=1.0)
    assert 30 <= len(pairs) <= 40 and [e.uid for e in pairs] == list(range(len(pairs)))
    assert all(e.completions[0] != e.completions[1] for e in pairs)  # identical samples carry no preference
    with torch.no_grad():
        r = rm.rewards(pair_batch(pairs, pad_id=tok.pad_token_id, pack=True)).view(2, -1)
    ended = torch.tensor([[c[-1] == tok.eos_token_id for c in e.completions] for e in pairs]).T  # (2, n)
    score = r - 1.0 * (~ended).float()
    assert (score[0] >= score[1] - 1e-6).all()  # chosen = the reward model's (EOS-penalised) favourite
    again = label_pairs(policy, rm, tok, prompts, seed=3, max_new_tokens=16, missing_eos_penalty=1.0)
    assert [(e.prompt, e.completions) for e in again] == [(e.prompt, e.completions) for e in pairs]


def test_iterative_onpolicy_dpo_resamples_and_resumes_exactly(sft_run, rm_run, tmp_path):
    """Pairs re-drawn from the current policy every 3 steps (rounds at steps 0, 3, 6); a crash after step 4
    resumes with the round-1 pairs from the checkpoint and reproduces the uninterrupted loss curve."""
    full, part = tmp_path / "full", tmp_path / "part"
    kw = dict(sft_model=str(latest_checkpoint(sft_run[0])), reward_model=str(latest_checkpoint(rm_run)),
              data="onpolicy", resample_every=3, onpolicy_prompts=24, batch_size=8, max_steps=8, save_every=4,
              eval_samples=8, device="cpu")
    summary = run_dpo(DPOConfig(output_dir=str(full), **kw))
    assert summary["data/rounds"] == 3 and summary["data/pairs"] > 16
    run_dpo(DPOConfig(output_dir=str(part), **kw))
    shutil.rmtree(part / "checkpoint-000008")
    write_text_atomic(part / "latest", "checkpoint-000004")
    lines = (part / "metrics.jsonl").read_text().splitlines()
    (part / "metrics.jsonl").write_text("\n".join(lines[:5]) + "\n")
    run_dpo(DPOConfig(output_dir=str(part), resume=True, **kw))
    a, b = metrics(full), metrics(part)
    assert [r["step"] for r in b] == list(range(1, 9))
    for ra, rb in zip(a, b):
        assert ra["loss"] == pytest.approx(rb["loss"], abs=1e-6), (ra["step"], ra["loss"], rb["loss"])
    with pytest.raises(ValueError, match="--data onpolicy needs --reward-model"):
        DPOConfig(data="onpolicy", model="./some-llama")
