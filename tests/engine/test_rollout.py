"""`--rollout hf|vllm` without vLLM installed (the main test run): the flags and their checks, the one-line error of a
missing vLLM, compare handing the engine to the stages that sample, and the trainer's wiring of the sampler's
log-probs into TRL's importance-sampling correction (a stand-in engine whose log-probs are off by a known amount).
The vLLM engine itself is tested in tests/vllm_rollout (the CI's vLLM step)."""

from dataclasses import replace

import pytest
import torch

import fusealign as fa
from fusealign.cli import build_config, build_parser, main
from fusealign.engine import ppo as ppo_module
from fusealign.engine.config import DPOConfig, PPOConfig
from fusealign.engine.errors import UserError
from fusealign.engine.models import model_from_config
from fusealign.engine.ppo import PPOTrainer
from fusealign.engine.rollout import check_rollout_device, rollout_engine, vllm_installed
from fusealign.engine.sampling import Completion, HFGenerate
from fusealign.engine.study import task
from fusealign.engine.study.compare import policy_stages
from fusealign.engine.study.config import CompareConfig
from fusealign.engine.study.presets import PRESETS

TOK = task.tokenizer()
HAVE_VLLM = vllm_installed()


def test_rollout_flags_and_their_checks():
    assert PPOConfig().rollout == DPOConfig().rollout == CompareConfig().rollout == "hf"
    with pytest.raises(ValueError, match="--rollout must be hf or vllm, got 'sglang'"):
        PPOConfig(rollout="sglang")
    with pytest.raises(ValueError, match=r"--vllm-gpu-memory-utilization must lie in \(0, 1\]"):
        PPOConfig(rollout="vllm", vllm_gpu_memory_utilization=1.5)
    with pytest.raises(ValueError, match="--vllm-dtype must be one of auto, float32, bfloat16, float16"):
        PPOConfig(rollout="vllm", vllm_dtype="fp8")
    with pytest.raises(ValueError, match="--vllm-max-model-len must be >= 0"):
        PPOConfig(rollout="vllm", vllm_max_model_len=-1)
    # a vLLM option with the HF engine would do nothing: named, with the fix
    with pytest.raises(ValueError, match="--vllm-enable-sleep-mode, --vllm-kv-cache-gib: apply with --rollout vllm"):
        PPOConfig(vllm_kv_cache_gib=1.0, vllm_enable_sleep_mode=True)
    with pytest.raises(ValueError, match="--vllm-importance-sampling-mode: apply with --rollout vllm"):
        PPOConfig(loss=fa.PPOOptions(vllm_importance_sampling_mode="token_truncate"))
    with pytest.raises(ValueError, match="--rollout vllm samples on-policy pairs: it applies with --data onpolicy"):
        DPOConfig(rollout="vllm")
    DPOConfig(rollout="vllm", data="onpolicy", reward_model="rm")


def test_sleep_mode_on_cpu_is_refused_before_the_run_starts():
    """Device-dependent rollout options: checked once the device is resolved, before the resolved
    hyper-parameters are printed (so the error is the run's one line) — sleep mode exists on GPU only."""
    cfg = PPOConfig(rollout="vllm", vllm_enable_sleep_mode=True)
    with pytest.raises(UserError, match="^--vllm-enable-sleep-mode: vLLM has no sleep mode on CPU; drop the flag$"):
        check_rollout_device(cfg, torch.device("cpu"))
    check_rollout_device(cfg, torch.device("cuda"))  # a GPU run keeps it
    check_rollout_device(PPOConfig(rollout="vllm"), torch.device("cpu"))
    check_rollout_device(PPOConfig(), torch.device("cpu"))


def test_importance_sampling_flags_set_both_loss_bundles():
    """TRL's four --vllm-importance-sampling-* flags: one flag each, setting PPO's and GRPO's options alike."""
    args = ["ppo", "--rollout", "vllm", "--vllm-importance-sampling-mode", "token_truncate",
            "--vllm-importance-sampling-clip-max", "2.5", "--vllm-importance-sampling-clip-min", "0.5",
            "--no-vllm-importance-sampling-correction"]
    ns = vars(build_parser().parse_args(args))
    ns.pop("command")
    ns.pop("debug", None)
    cfg = build_config(PPOConfig, ns)
    for bundle in (cfg.loss, cfg.grpo):
        assert bundle.vllm_importance_sampling_mode == "token_truncate"
        assert bundle.vllm_importance_sampling_clip_max == 2.5 and bundle.vllm_importance_sampling_clip_min == 0.5
        assert bundle.vllm_importance_sampling_correction is False
    assert PPOConfig(rollout="vllm").loss.vllm_importance_sampling_mode == "sequence_mask"  # TRL 1.16's default
    assert PPOConfig(rollout="vllm").loss.vllm_importance_sampling_clip_max == 3.0


@pytest.mark.skipif(HAVE_VLLM, reason="vLLM is installed here")
def test_missing_vllm_is_one_line_naming_the_install_command(tmp_path, capsys):
    code = main(["ppo", "--rollout", "vllm", "--output-dir", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("fusealign ppo: error: --rollout vllm: vLLM is not installed")
    assert "pip install 'fusealign[vllm]'" in err[0] and "scripts/venv-vllm.sh" in err[0]
    assert not (tmp_path / "sft").exists()  # refused before any model was trained
    assert main(["dpo", "--data", "onpolicy", "--rollout", "vllm", "--output-dir", str(tmp_path)]) == 2
    assert "vLLM is not installed" in capsys.readouterr().err
    assert main(["compare", "--rollout", "vllm", "--output-dir", str(tmp_path / "c")]) == 2
    assert "vLLM is not installed" in capsys.readouterr().err


def test_hf_is_the_default_engine():
    m = model_from_config(task.model_config())
    assert isinstance(rollout_engine(PPOConfig(), m, TOK), HFGenerate)


def test_compare_hands_the_engine_to_the_stages_that_sample():
    cfg = CompareConfig(rollout="vllm", vllm_kv_cache_gib=0.5)
    stages = policy_stages(cfg, PRESETS["smoke"], 0, {"sft": "s", "rm-in": "r", "rm-ood": "r"})
    sampling = [s for s in stages if s.method in ("PPO", "GRPO", "DPO-onpolicy", "DPO-iterative")]
    assert {s.method for s in sampling} == {"PPO", "GRPO", "DPO-onpolicy", "DPO-iterative"}
    assert all(s.cfg.rollout == "vllm" and s.cfg.vllm_kv_cache_gib == 0.5 for s in sampling)
    assert all(s.cfg.rollout == "hf" for s in stages if s.method == "DPO")  # offline pairs: nothing sampled


class OffSampler:
    """A stand-in for a vLLM engine: HF generate's samples, their log-probs reported `shift` nats too low (the
    sampler 'thought' each token less likely than the scorer does)."""

    def __init__(self, inner: HFGenerate, shift: float):
        self.inner, self.shift = inner, shift

    def sample(self, prompts, params):
        return [Completion(c.ids, c.ended, c.logps - self.shift) for c in self.inner.sample(prompts, params)]

    def close(self):
        pass


def trainer(tmp_path, **kw):
    policy = model_from_config(task.model_config(), seed=0)
    ref = model_from_config(task.model_config(), seed=0)
    cfg = PPOConfig(output_dir=str(tmp_path), reward_fn="builtin", batch_size=4, max_new_tokens=8, device="cpu",
                    critic="policy_head", num_ppo_epochs=1, **kw)
    t = PPOTrainer(cfg, policy, ref, TOK, reward_fn=task.reward)
    t.rollout_engine = OffSampler(HFGenerate(t.policy, TOK), 0.5)  # as `--rollout vllm` would hold a vLLM engine
    t.sampler_correction = True
    return t


@pytest.mark.parametrize("advantage", ["gae", "grpo"])
def test_the_losses_get_the_samplers_logps_and_the_ratio_is_logged(tmp_path, monkeypatch, advantage):
    """With a sampler 0.5 nats per token below the scorer, TRL's ratio π_old/π_sampler is e^0.5 ≈ 1.65 per token:
    --vllm-importance-sampling-mode token_truncate with C_max 1.2 clamps every one to 1.2 (logged min = mean = max
    = 1.2), and the loss (PPO's or GRPO's) receives the sampler's log-probs of exactly the minibatch's rows."""
    opts = dict(vllm_importance_sampling_mode="token_truncate", vllm_importance_sampling_clip_max=1.2)
    kw = dict(advantage=advantage, num_generations=1 if advantage == "gae" else 2, rollout="hf")
    t = trainer(tmp_path, **kw)
    t.cfg = replace(t.cfg, rollout="vllm", loss=fa.PPOOptions(**opts), grpo=fa.GRPOOptions(**opts))
    if t.grpo_options is not None:
        t.grpo_options = t.cfg.grpo_options()
    seen = []
    name = "ppo_policy_loss" if advantage == "gae" else "grpo_loss"
    real = getattr(ppo_module, name)
    monkeypatch.setattr(ppo_module, name, lambda *a, **k: seen.append(k["sampling_logps"]) or real(*a, **k))
    original = ppo_module.PPOTrainer.rollout
    rollouts = []
    monkeypatch.setattr(ppo_module.PPOTrainer, "rollout", lambda self, p: rollouts.append(original(self, p)) or
                        rollouts[-1])
    out = t.iteration(t.prompts[:4])
    ro = rollouts[0]
    assert len(seen) == t.cfg.num_minibatches and all(s is not None for s in seen)
    assert torch.equal(torch.cat(seen), torch.cat([ro.sampler_logps[idx] for idx in t._minibatches(len(ro), 0)]))
    for k in ("min", "mean", "max"):
        assert out[f"sampling/importance_sampling_ratio/{k}"] == pytest.approx(1.2, abs=1e-6), k
    assert out["sampling/sampling_logp_difference/mean"] == pytest.approx(0.5, abs=1e-4)
    # without the correction (--rollout hf) the losses get none and no ratio is logged
    t2 = trainer(tmp_path / "plain", **kw)
    t2.sampler_correction = False
    seen.clear()
    out2 = t2.iteration(t2.prompts[:4])
    assert seen and all(s is None for s in seen)
    assert "sampling/importance_sampling_ratio/mean" not in out2
