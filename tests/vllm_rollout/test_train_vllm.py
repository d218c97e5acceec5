"""`--rollout vllm` end to end on the built-in task: PPO and GRPO raise the ground-truth reward as with `hf`, the
first minibatch's ratio is exactly 1 (scoring stays ours), the train–inference mismatch metrics are present and ~0
in fp32 (every rollout sampled from the weights just trained: a stale engine would show as a mismatch of nats),
`--resume` continues the same run, on-policy DPO samples its pairs through vLLM, and the CLI's one-line errors.
Run in .venv-vllm (scripts/venv-vllm.sh); the main test run skips them."""

import json
import shutil

import pytest

from fusealign.engine.checkpoint import latest_checkpoint, write_text_atomic
from fusealign.engine.config import DPOConfig, PPOConfig, RMConfig, SFTConfig
from fusealign.engine.recipes import run_dpo, run_ppo, run_rm, run_sft

pytestmark = pytest.mark.vllm

KV = dict(vllm_kv_cache_gib=1 / 16)  # the tiny model needs a few MiB of KV cache, not the CPU default


@pytest.fixture(scope="module")
def sft_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("sft")
    run_sft(SFTConfig(output_dir=str(out), max_steps=150, device="cpu"))
    return str(latest_checkpoint(out))


def rows(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def check_rollout_metrics(run_dir, rollout: str):
    """Every iteration: ratio exactly 1 on the first minibatch; with vLLM, TRL's mismatch metrics present and ~0."""
    for r in rows(run_dir):
        assert r["first/ratio_mean"] == 1.0, r
        assert r["sampling/sampling_logp_difference/max"] < 1e-4, r
        if rollout == "vllm":
            for k in ("sampling/importance_sampling_ratio/min", "sampling/importance_sampling_ratio/mean",
                      "sampling/importance_sampling_ratio/max"):
                assert abs(r[k] - 1.0) < 1e-3, (k, r[k])
            assert r["time/weight_sync_s"] > 0
        else:
            assert "sampling/importance_sampling_ratio/mean" not in r


@pytest.mark.parametrize("advantage", ["gae", "grpo"])
def test_rl_raises_the_ground_truth_reward_as_with_hf(sft_dir, tmp_path, advantage):
    """The same PPO (critic on the policy) / GRPO run with each engine: both raise the held-out ground-truth reward
    (128 samples, s.e. of a mean ≈ 0.04) by more than 0.15; the mismatch metrics stay ~0 with vLLM."""
    kw = dict(sft_model=sft_dir, reward_fn="builtin", max_steps=20, batch_size=16, lr=3e-3, device="cpu",
              critic="policy_head", advantage=advantage, num_generations=1 if advantage == "gae" else 4)
    if advantage == "grpo":
        kw["batch_size"] = 8
    out = {}
    for rollout in ("hf", "vllm"):
        run = tmp_path / rollout
        extra = KV if rollout == "vllm" else {}
        m = run_ppo(PPOConfig(output_dir=str(run), rollout=rollout, **extra, **kw))
        check_rollout_metrics(run, rollout)
        out[rollout] = (m["eval/gt_reward_init"], m["eval/gt_reward"])
    print(f"\n{advantage}: ground-truth reward init → final: hf {out['hf'][0]:.3f} → {out['hf'][1]:.3f}, "
          f"vllm {out['vllm'][0]:.3f} → {out['vllm'][1]:.3f}", flush=True)
    assert out["hf"][0] == out["vllm"][0]  # the same SFT policy, the same (HF) evaluation
    for rollout, (before, after) in out.items():
        assert after > before + 0.15, (rollout, before, after)


def test_resume_continues_the_same_vllm_run(sft_dir, tmp_path):
    """4 iterations at once, or 2 then --resume for 2 more in a new engine: the same rollouts (seeded per iteration)
    and the same losses."""
    kw = dict(sft_model=sft_dir, reward_fn="builtin", max_steps=4, save_every=2, batch_size=8, device="cpu",
              rollout="vllm", **KV)
    run_ppo(PPOConfig(output_dir=str(tmp_path / "full"), **kw))
    part = tmp_path / "part"
    run_ppo(PPOConfig(output_dir=str(part), **kw))
    shutil.rmtree(part / "checkpoint-000004")
    write_text_atomic(part / "latest", "checkpoint-000002")
    run_ppo(PPOConfig(output_dir=str(part), resume=True, **kw))
    a, b = rows(tmp_path / "full"), rows(part)
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for ra, rb in zip(a, b):
        assert ra["objective/scores"] == pytest.approx(rb["objective/scores"], abs=1e-6)
        assert ra["loss/policy_avg"] == pytest.approx(rb["loss/policy_avg"], abs=1e-6)
        assert ra["sampling/sampling_logp_difference/max"] < 1e-4


def test_onpolicy_dpo_samples_its_pairs_through_vllm(sft_dir, tmp_path):
    """Iterative DPO (pairs re-sampled every 2 steps) with --rollout vllm: it trains on each round's pairs."""
    rm = tmp_path / "rm"
    run_rm(RMConfig(output_dir=str(rm), sft_model=sft_dir, max_steps=20, device="cpu"))
    m = run_dpo(DPOConfig(output_dir=str(tmp_path / "dpo"), sft_model=sft_dir, data="onpolicy",
                          reward_model=str(latest_checkpoint(rm)), onpolicy_prompts=32, resample_every=2,
                          max_steps=4, batch_size=8, eval_samples=16, device="cpu", rollout="vllm", **KV))
    assert m["data/rounds"] == 2 and m["data/pairs"] > 8, m
    assert "eval/gt_reward" in m


def test_cli_one_line_errors(sft_dir, tmp_path, capsys):
    from fusealign.cli import main

    code = main(["ppo", "--sft-model", sft_dir, "--reward-fn", "builtin", "--device", "cpu", "--output-dir",
                 str(tmp_path / "a"), "--rollout", "vllm", "--vllm-enable-sleep-mode", "--max-steps", "1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err == ["fusealign ppo: error: --vllm-enable-sleep-mode: vLLM has no sleep mode on CPU; "
                                 "drop the flag"], err
    code = main(["ppo", "--sft-model", sft_dir, "--output-dir", str(tmp_path / "b"), "--vllm-dtype", "float32"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--vllm-dtype: apply with --rollout vllm only" in err[0], err
