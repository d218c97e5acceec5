"""PPO pieces by hand (GAE, whitening, GRPO, RLOO, KL in the reward), step-0 identities, a short run, resume;
GRPO / RLOO with TRL's GRPO loss (--loss-type and its options)."""

import json
import types
from pathlib import Path

import pytest
import torch

from fusealign.engine.checkpoint import latest_checkpoint, write_text_atomic
from fusealign.engine.config import PPOConfig
from fusealign.engine.distributed import DistInfo
from fusealign.engine.models import TokenScores
from fusealign.engine.ppo import (AdaptiveKL, PPOTrainer, RolloutBatch, epoch_should_stop, explained_variance, gae,
                                  grpo_advantages, masked_whiten, rloo_advantages)
from fusealign.engine.recipes import run_ppo
from fusealign.kernels.reference import grpo_loss_reference
from fusealign.losses import GRPOOptions, PPOOptions

T = torch.tensor


def test_gae_by_hand():
    """Row 1: r = (0, 0, 1), V = (0.5, 0.5, 0.5), γ = 1, λ = 0.5:
         t=2: δ = 1 + 0 − 0.5 = 0.5, A = 0.5;  t=1: δ = 0 + 0.5 − 0.5 = 0, A = 0.5·0.5 = 0.25;
         t=0: δ = 0, A = 0.5·0.25 = 0.125;  returns = A + V = (0.625, 0.75, 1.0).
    Row 2 (last position is padding): r = (0, 2), V = (1, 1), γ = 0.9, λ = 1:
         t=1: δ = 2 + 0 − 1 = 1, A = 1;  t=0: δ = 0 + 0.9·1 − 1 = −0.1, A = −0.1 + 0.9·1 = 0.8;
         returns = (1.8, 2.0, 0)."""
    adv, ret = gae(T([[0.0, 0, 1]]), T([[0.5, 0.5, 0.5]]), T([[1.0, 1, 1]]), gamma=1.0, lam=0.5)
    assert torch.allclose(adv, T([[0.125, 0.25, 0.5]])) and torch.allclose(ret, T([[0.625, 0.75, 1.0]]))
    adv, ret = gae(T([[0.0, 2, 0]]), T([[1.0, 1, 9]]), T([[1.0, 1, 0]]), gamma=0.9, lam=1.0)
    assert torch.allclose(adv, T([[0.8, 1.0, 0.0]])) and torch.allclose(ret, T([[1.8, 2.0, 0.0]]))


def test_whitening_by_hand():
    """x = (1, 2, 3, pad): mean 2, unbiased variance (1 + 0 + 1)/2 = 1 → (−1, 0, 1, 0)."""
    out = masked_whiten(T([1.0, 2, 3, 100]), T([1.0, 1, 1, 0]))
    assert torch.allclose(out, T([-1.0, 0, 1, 0]), atol=1e-6)


def test_grpo_and_rloo_by_hand():
    """GRPO, groups of 3: (1, 2, 3) has mean 2 and std 1 → (−1, 0, 1)/(1 + 1e−4); (5, 5, 5) → 0.
    RLOO: (1, 2, 3) → 1 − (2+3)/2 = −1.5, 2 − (1+3)/2 = 0, 3 − (1+2)/2 = 1.5."""
    g = grpo_advantages(T([1.0, 2, 3, 5, 5, 5]), 3)
    assert torch.allclose(g, T([-1.0, 0, 1, 0, 0, 0]) / (1 + 1e-4))
    assert torch.allclose(rloo_advantages(T([1.0, 2, 3]), 3), T([-1.5, 0, 1.5]))


def _scored(mask, old, ref, scores):
    S = len(scores)
    return RolloutBatch(seqs=[None] * S, ended=torch.ones(S, dtype=torch.bool), texts=[""] * S, mask=mask,
                        old_logps=old, ref_logps=ref, values=torch.zeros(mask.shape), scores=scores)


def test_kl_penalty_enters_the_rewards():
    """kl_mode=reward, β = 0.1: reward_t = −β (logp_old − logp_ref); the score lands on the last real token."""
    mask = T([[True, True, True], [True, True, False]])
    old, ref = T([[-1.0, -2, -3], [-1.0, -1, 0]]), T([[-1.5, -2, -2], [-2.0, -1, 0]])
    ro = _scored(mask, old, ref, T([1.0, 2.0]))
    PPOTrainer.advantages(types.SimpleNamespace(cfg=PPOConfig(kl_coef=0.1, gamma=1.0, lam=1.0),
                                                kl_ctl=AdaptiveKL(0.1, 0.0, 1), info=DistInfo()), ro)
    assert torch.allclose(ro.kl, T([[0.5, 0, -1], [1.0, 0, 0]]))
    assert torch.allclose(ro.rewards, T([[-0.05, 0, 0.1 + 1.0], [-0.1, 2.0, 0]]))
    # γ = λ = 1, V = 0: the advantage before whitening is the reward-to-go; returns equal it.
    assert torch.allclose(ro.returns, T([[1.05, 1.1, 1.1], [1.9, 2.0, 0]]))
    ro = _scored(mask, old, ref, T([1.0, 2.0]))
    PPOTrainer.advantages(types.SimpleNamespace(cfg=PPOConfig(kl_coef=0.1, kl_mode="loss"),
                                                kl_ctl=AdaptiveKL(0.1, 0, 1), info=DistInfo()), ro)
    assert torch.allclose(ro.rewards, T([[0.0, 0, 1.0], [0.0, 2.0, 0]]))  # KL goes to the loss instead


def test_early_stop_reads_the_latest_epoch_not_a_running_mean():
    """--early-stop-kl 0.02 after epochs whose minibatches have approx-KL (0.01, 0.01) then (0.03, 0.03): the latest
    epoch's mean 0.03 > 0.02 stops; a running mean over every minibatch so far, 0.02, would not have."""
    assert not epoch_should_stop([0.01, 0.01], 0.02)
    assert epoch_should_stop([0.03, 0.03], 0.02)
    assert (0.01 + 0.01 + 0.03 + 0.03) / 4 <= 0.02  # what the old rule compared
    assert not epoch_should_stop([5.0], 0.0)  # 0: off


def test_explained_variance_by_hand():
    """returns (1, 2, 3, pad), values (1, 2, 2): residuals (0, 0, 1), Var = 2/9; Var[returns] = 2/3 → 1 − 1/3."""
    mask = T([True, True, True, False])
    assert explained_variance(T([1.0, 2, 2, 7]), T([1.0, 2, 3, 9]), mask) == pytest.approx(2 / 3)
    assert explained_variance(T([1.0, 2, 3, 0]), T([1.0, 2, 3, 9]), mask) == pytest.approx(1.0)


def test_adaptive_kl_moves_towards_target():
    c = AdaptiveKL(0.1, target=1.0, horizon=100)
    c.update(kl=3.0, n=10)  # error clipped to +0.2: β · (1 + 0.2·10/100)
    assert c.beta == pytest.approx(0.1 * 1.02)


@pytest.fixture(scope="module")
def sft_dir(tmp_path_factory):
    from fusealign.engine.config import SFTConfig
    from fusealign.engine.recipes import run_sft

    out = tmp_path_factory.mktemp("sft")
    run_sft(SFTConfig(output_dir=str(out), max_steps=150, device="cpu"))
    return str(latest_checkpoint(out))


@pytest.mark.parametrize("advantage", ["gae", "grpo"])
def test_step0_identities(sft_dir, tmp_path, advantage):
    """First iteration: policy = reference ⇒ KL = 0; every iteration's first minibatch is scored exactly as
    it is trained ⇒ ratio = 1, clipfrac = 0. The checks can fail: the policy moves within an iteration
    (approx-KL > 0 over its minibatches) and away from the reference (KL > 0 at the next iteration)."""
    k = 1 if advantage == "gae" else 4
    run_ppo(PPOConfig(output_dir=str(tmp_path), sft_model=sft_dir, reward_fn="builtin", max_steps=2, lr=3e-3,
                      batch_size=8, num_generations=k, advantage=advantage, device="cpu", critic="policy_head"))
    first, second = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert first["objective/kl"] == 0.0
    assert first["first/ratio_mean"] == 1.0 and first["first/clipfrac"] == 0.0
    assert second["first/ratio_mean"] == 1.0 and second["first/clipfrac"] == 0.0
    assert first["policy/approxkl_avg"] > 0 and first["val/ratio"] != 1.0
    assert second["objective/kl"] > 1e-4


def test_short_ppo_run_raises_ground_truth_reward(sft_dir, tmp_path):
    m = run_ppo(PPOConfig(output_dir=str(tmp_path), sft_model=sft_dir, max_steps=30, device="cpu"))
    # 128 held-out samples, sd of a reward ≈ 0.45 → standard error of each mean ≈ 0.04; ask for > 3 s.e. of a gap.
    assert m["eval/gt_reward"] > m["eval/gt_reward_init"] + 0.2, m
    assert (tmp_path / "rm").is_dir()  # the default reward model was trained by `fusealign rm`
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    for key in ("objective/kl", "objective/entropy", "objective/non_score_reward", "objective/rlhf_reward",
                "objective/scores", "policy/approxkl_avg", "policy/clipfrac_avg", "loss/policy_avg",
                "loss/value_avg", "val/clipfrac_avg", "val/ratio", "rollout_tokens_per_s", "train_tokens_per_s"):
        assert key in rows[-1], key


def test_ppo_resume_reproduces(sft_dir, tmp_path):
    kw = dict(sft_model=sft_dir, reward_fn="builtin", max_steps=4, save_every=2, batch_size=8, device="cpu")
    run_ppo(PPOConfig(output_dir=str(tmp_path / "full"), **kw))
    part = tmp_path / "part"
    run_ppo(PPOConfig(output_dir=str(part), **kw))
    import shutil

    shutil.rmtree(part / "checkpoint-000004")
    write_text_atomic(part / "latest", "checkpoint-000002")
    run_ppo(PPOConfig(output_dir=str(part), resume=True, **kw))
    a = [json.loads(x) for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(x) for x in (part / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for ra, rb in zip(a, b):
        assert ra["objective/scores"] == pytest.approx(rb["objective/scores"], abs=1e-6)
        assert ra["loss/policy_avg"] == pytest.approx(rb["loss/policy_avg"], abs=1e-6)


def test_separate_critic_is_inside_the_checkpoint_and_prompts_from_jsonl(sft_dir, tmp_path):
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ("movie the", "book of a", "song")))
    run_ppo(PPOConfig(output_dir=str(tmp_path / "run"), sft_model=sft_dir, reward_fn="builtin", max_steps=1,
                      batch_size=4, device="cpu", critic="separate", data=str(data)))
    ck = latest_checkpoint(tmp_path / "run")
    assert (ck / "critic" / "value_head.safetensors").is_file() and (ck / "trainer_state.pt").is_file()
    with pytest.raises(ValueError, match="num-minibatches"):
        PPOConfig(num_minibatches=0)


def test_grpo_options_from_the_config():
    """One rollout is TRL's generation batch: --num-minibatches optimizer steps (steps_per_generation, no
    accumulation) over the ranks; dr_grpo's constant is --max-new-tokens; the flags carry TRL's names."""
    cfg = PPOConfig(advantage="grpo", num_generations=4, num_minibatches=4, max_new_tokens=12,
                    grpo=GRPOOptions(loss_type="dr_grpo", epsilon_high=0.28, beta=0.04, entropy_coef=0.01,
                                     importance_sampling_level="sequence"))
    o = cfg.grpo_options(num_processes=3)
    assert (o.loss_type, o.epsilon, o.epsilon_high, o.beta, o.importance_sampling_level, o.entropy_coef) == \
        ("dr_grpo", 0.2, 0.28, 0.04, "sequence", 0.01)
    assert (o.gradient_accumulation_steps, o.steps_per_generation, o.num_processes, o.max_completion_length) == \
        (1, 4, 3, 12)
    assert PPOConfig(advantage="rloo", num_generations=2).grpo_options().loss_type == "dapo"  # TRL's default
    for kw, match in ((dict(grpo=GRPOOptions(loss_type="grpo")),
                       "--loss-type: TRL's GRPO loss options apply to --advantage grpo"),
                      (dict(advantage="grpo", num_generations=4, loss=PPOOptions(clip_eps=0.3)),
                       "its clipping is --epsilon"),
                      (dict(advantage="grpo", num_generations=4, kl_mode="loss"), "the loss's KL is TRL's --beta")):
        with pytest.raises(ValueError, match=match):
            PPOConfig(**kw)
    # the bundle validates itself (the CLI spells its fields as flags: tests/test_cli.py)
    with pytest.raises(ValueError, match="loss_type must be one of"):
        GRPOOptions(loss_type="ppo")
    with pytest.raises(ValueError, match=r"top_entropy_quantile must lie in \[0, 1\]"):
        GRPOOptions(top_entropy_quantile=2.0)


def test_grpo_minibatch_loss_is_trls_with_truncated_completions_masked():
    """The engine's minibatch loss against the float64 reference on the same padded tensors: completions without
    EOS left out (--mask-truncated-completions) of the loss and of num_items_in_batch, which counts the whole
    rollout; their log-probs get no gradient."""
    cfg = PPOConfig(advantage="grpo", num_generations=2, num_minibatches=2,
                    grpo=GRPOOptions(loss_type="dapo", beta=0.05), mask_truncated_completions=True)
    trainer = PPOTrainer.__new__(PPOTrainer)  # only the loss step: the config and its GRPO options
    trainer.cfg, trainer.grpo_options = cfg, cfg.grpo_options()
    g = torch.Generator().manual_seed(0)
    mask = T([[True, True, True], [True, True, False], [True, False, False], [True, True, True]])
    ro = RolloutBatch(seqs=[None] * 4, ended=T([True, False, True, True]), texts=[""] * 4, mask=mask)
    ro.old_logps = (-torch.rand(4, 3, generator=g)).masked_fill(~mask, 0)
    ro.ref_logps = (ro.old_logps + 0.3 * torch.randn(4, 3, generator=g)).masked_fill(~mask, 0)
    ro.seq_advantages = T([0.7, -0.7, 1.0, -1.0])
    idx = [0, 1]
    m = mask[idx]
    cur = (ro.old_logps[idx] + 0.2 * torch.randn(2, 3, generator=g)).masked_fill(~m, 0)
    flat = cur[m].clone().requires_grad_()
    new = TokenScores(logps=flat, entropy=torch.rand(int(m.sum()), generator=g), values=None, seq_ids=None)
    n_items = float((mask & ro.ended[:, None]).sum())  # 3 + 1 + 3 = 7 loss tokens in the rollout
    assert n_items == 7
    loss, metrics = trainer._grpo_loss(new, ro, idx, n_items)
    loss.backward()
    cur64 = cur.double().requires_grad_()
    ref_loss, _ = grpo_loss_reference(cur64, ro.old_logps[idx].double(), ro.seq_advantages[idx].double(),
                                      m & ro.ended[idx][:, None], ref_logps=ro.ref_logps[idx].double(), beta=0.05,
                                      num_items_in_batch=n_items, steps_per_generation=2)
    ref_loss.backward()
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-6)
    assert torch.allclose(flat.grad, cur64.grad[m].float(), atol=1e-7)
    assert (flat.grad[3:] == 0).all() and (flat.grad[:3] != 0).all()  # sequence 1 was truncated
    assert {"clip_ratio/low_mean", "clip_ratio/region_mean", "kl", "entropy", "policy/approxkl"} <= set(metrics)


def test_rloo_with_a_trl_loss_logs_trls_names(sft_dir, tmp_path):
    """A short RLOO run with GSPO's sequence-level weights, the grpo loss, k3 KL and truncated completions masked:
    it trains (finite, the policy moves) and logs TRL's GRPOTrainer metric names, not PPO's critic ones."""
    run_ppo(PPOConfig(output_dir=str(tmp_path), sft_model=sft_dir, reward_fn="builtin", max_steps=2, lr=3e-3,
                      batch_size=4, num_generations=2, advantage="rloo",
                      grpo=GRPOOptions(loss_type="grpo", importance_sampling_level="sequence", beta=0.04,
                                       epsilon_high=0.28),
                      mask_truncated_completions=True, device="cpu", max_new_tokens=8))
    first, second = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    for key in ("clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean", "clip_ratio/low_min",
                "clip_ratio/high_max", "entropy", "kl", "policy_loss", "reward", "reward_std", "frac_reward_zero_std",
                "completions/mean_length", "completions/clipped_ratio", "loss/policy_avg", "objective/kl"):
        assert key in first, key
    assert "policy/clipfrac_avg" not in first and "val/explained_variance" not in first
    assert first["first/ratio_mean"] == 1.0 and first["policy/approxkl_avg"] > 0
    assert second["kl"] > 0 and all(v == v for v in second.values() if isinstance(v, float))
