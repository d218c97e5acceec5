"""PPO (with GRPO / RLOO advantages) on fused heads: the reward-based RL stage of the seed pipeline.

One iteration, as in TRL's PPO trainer and Huang et al. 2024 ("The N implementation details of RLHF
with PPO"):
  rollout      sample k completions per prompt with a KV cache (temperature, top-p, stop on EOS)
  score        old-policy and reference log-probs (fused, no grad), values (critic), scores (RM or a
               Python reward function; a completion without EOS can be penalised)
  rewards      per-token −β·k1 KL to the reference, plus the score on the last token   (kl_mode="reward")
               or the score alone, KL entering the loss as k3 (GRPO style)               (kl_mode="loss")
  advantages   GAE(γ, λ) with whitening; or GRPO (group-normalised) / RLOO (leave-one-out), no critic
  update       num_ppo_epochs × minibatches of fa.linear_ppo_loss + vf_coef · fa.value_loss
Because minibatches of the first epoch are scored exactly as they are trained (same sequences, same
packing, same kernels) the ratio is exactly 1 at the first minibatch.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, List, Optional

import torch
from torch import nn
from tqdm.auto import tqdm

from fusealign.kernels.linear_logps import linear_logps
from fusealign.kernels.policy import linear_ppo_loss, value_loss

from . import task
from .checkpoint import check_fresh_start, latest_checkpoint, load_trainer_state, rng_state, save_checkpoint, \
    set_rng_state, truncate_metrics
from .config import TrainConfig, opt
from .data import collate, load_prompts
from .models import RewardModel, disable_dropout, head_of, hidden_states, load_causal_lm, select_completion
from .objectives import _head_inputs, rewards_of
from .sampling import sample
from .trainer import autocast, resolve_device


@dataclass
class PPOConfig(TrainConfig):
    """PPO with a learned reward model (or a Python reward function); GRPO and RLOO advantages."""

    max_steps: int = opt(60, "PPO iterations (rollout + update)")
    batch_size: int = opt(32, "prompts per rollout")
    lr: float = opt(3e-4, "peak learning rate (AdamW) of policy and critic")
    warmup_steps: int = opt(0, "linear warm-up iterations")
    schedule: str = opt("constant", "decay after warm-up: cosine, linear or constant")
    save_every: int = opt(20, "checkpoint every N iterations (and at the end)")
    reward_model: str = opt("", "reward model directory (fusealign rm); builtin: train one from the SFT policy")
    reward_fn: str = opt("", "use a Python reward instead of a model: 'builtin' = the task's ground truth")
    sft_model: str = opt("", "with --model builtin: the SFT run to start from (default: train one)")
    advantage: str = opt("gae", "gae (critic), grpo (group-normalised) or rloo (leave-one-out)")
    num_generations: int = opt(1, "samples per prompt (≥ 2 for grpo / rloo)")
    critic: str = opt("separate", "separate (backbone + value head, from the RM) or policy_head (shared backbone)")
    num_ppo_epochs: int = opt(2, "optimisation epochs per rollout")
    num_minibatches: int = opt(2, "minibatches per epoch")
    max_new_tokens: int = opt(16, "tokens sampled per completion")
    top_p: float = opt(1.0, "nucleus sampling threshold")
    missing_eos_penalty: float = opt(1.0, "subtracted from a reward model's score of a completion without EOS (0: off)")
    gamma: float = opt(1.0, "discount γ")
    lam: float = opt(0.95, "GAE λ")
    kl_coef: float = opt(0.05, "β of the KL penalty")
    kl_mode: str = opt("reward", "reward (per-token k1 in the reward) or loss (k3 term in the loss)")
    target_kl: float = opt(0.0, "adaptive KL control: target per-sequence KL (0: fixed β)")
    kl_horizon: int = opt(10000, "adaptive KL horizon (Ziegler et al. 2019)")
    clip_eps: float = opt(0.2, "policy ratio clip ε")
    clip_eps_high: Optional[float] = opt(None, "upper clip (default: ε)")
    dual_clip: Optional[float] = opt(None, "dual-clip constant c > 1 for negative advantages")
    vf_coef: float = opt(0.1, "value-loss weight")
    cliprange_value: float = opt(0.2, "value clip")
    entropy_coef: float = opt(0.0, "entropy bonus")
    early_stop_kl: float = opt(0.0, "stop an iteration's epochs once approx-KL exceeds this (0: off)")

    def __post_init__(self):
        super().__post_init__()
        if self.advantage not in ("gae", "grpo", "rloo"):
            raise ValueError(f"--advantage must be gae, grpo or rloo, got {self.advantage!r}")
        if self.advantage != "gae" and self.num_generations < 2:
            raise ValueError(f"--advantage {self.advantage} needs --num-generations >= 2")
        if self.critic not in ("separate", "policy_head"):
            raise ValueError(f"--critic must be separate or policy_head, got {self.critic!r}")
        if self.kl_mode not in ("reward", "loss"):
            raise ValueError(f"--kl-mode must be reward or loss, got {self.kl_mode!r}")
        if self.reward_fn not in ("", "builtin"):
            raise ValueError(f"--reward-fn must be empty or 'builtin', got {self.reward_fn!r}")
        if self.num_ppo_epochs < 1 or self.num_minibatches < 1:
            raise ValueError("--num-ppo-epochs and --num-minibatches must be >= 1")
        if self.grad_accum != 1:
            raise ValueError("--grad-accum is not used by ppo: use --num-minibatches to size the update")
        if (self.batch_size * self.num_generations) % self.num_minibatches:
            raise ValueError("--batch-size × --num-generations must be divisible by --num-minibatches")
        if not 0 <= self.lam <= 1 or not 0 <= self.gamma <= 1 or self.kl_coef < 0:
            raise ValueError("--lam and --gamma must lie in [0, 1] and --kl-coef must be >= 0")


# --- advantages ----------------------------------------------------------------------------------------
def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """(x − mean) / std over the masked entries (unbiased variance, as TRL); padding stays 0."""
    n = mask.sum()
    mean = (x * mask).sum() / n
    var = (((x - mean) * mask) ** 2).sum() / (n - 1).clamp_min(1)
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        out = out + mean
    return out * mask


def gae(rewards, values, mask, gamma: float, lam: float):
    """Generalised advantage estimation over completion tokens (Schulman et al. 2016, Eq. 16).

    rewards, values, mask: (S, T), right-padded. With V(s_T) = 0 after the last token:
        δ_t = r_t + γ V_{t+1} − V_t,    A_t = δ_t + γ λ A_{t+1},    returns = A + V.
    """
    S, T = rewards.shape
    adv = torch.zeros_like(rewards)
    last = torch.zeros(S, dtype=rewards.dtype, device=rewards.device)
    for t in reversed(range(T)):
        next_v = values[:, t + 1] * mask[:, t + 1] if t + 1 < T else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_v - values[:, t]
        last = (delta + gamma * lam * last) * mask[:, t]
        adv[:, t] = last
    return adv, (adv + values) * mask


def grpo_advantages(scores: torch.Tensor, k: int, eps: float = 1e-4) -> torch.Tensor:
    """(S,) scores in groups of k consecutive samples of one prompt -> (s − mean_g) / (std_g + eps)."""
    g = scores.view(-1, k)
    return ((g - g.mean(1, keepdim=True)) / (g.std(1, keepdim=True) + eps)).view(-1)


def rloo_advantages(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Leave-one-out baseline (Kool et al. 2019; Ahmadian et al. 2024): s_i − mean_{j≠i} s_j."""
    g = scores.view(-1, k)
    return (g - (g.sum(1, keepdim=True) - g) / (k - 1)).view(-1)


class AdaptiveKL:
    """β ← β · (1 + clip(KL/target − 1, ±0.2) · n/horizon)  (Ziegler et al. 2019)."""

    def __init__(self, beta: float, target: float, horizon: int):
        self.beta, self.target, self.horizon = beta, target, horizon

    def update(self, kl: float, n: int) -> None:
        if self.target > 0:
            err = max(-0.2, min(0.2, kl / self.target - 1))
            self.beta *= 1 + err * n / self.horizon


# --- models ----------------------------------------------------------------------------------------------
class ValueHead(nn.Module):
    """A scalar head on the policy's own hidden states (critic="policy_head")."""

    def __init__(self, H: int):
        super().__init__()
        self.value_head = nn.Linear(H, 1)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)


def token_values(critic, h_c):
    return (h_c.float() @ critic.value_head.weight.reshape(-1).float()) + critic.value_head.bias.float()


@dataclass
class Rollout:
    seqs: List[tuple]  # (prompt_ids, completion_ids) per sample; completion ends with EOS when it ended
    ended: torch.Tensor  # (S,) bool
    texts: List[str]


def to_padded(flat: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    out = torch.zeros(mask.shape, dtype=flat.dtype, device=flat.device)
    out[mask] = flat
    return out


class PPOTrainer:
    """Holds the four roles and runs iterations; `train()` loops with logging and checkpoints."""

    def __init__(self, cfg: PPOConfig, policy, ref, tok, *, critic=None, reward_model=None,
                 reward_fn: Optional[Callable[[str, bool], float]] = None, prompts: Optional[List[List[int]]] = None):
        self.cfg, self.policy, self.ref, self.tok = cfg, policy, ref, tok
        for m in (policy, ref, critic, reward_model):
            if m is not None:
                disable_dropout(m)
        self.device = next(policy.parameters()).device
        self.ref.requires_grad_(False).eval()
        H = (getattr(policy.config, "text_config", None) or policy.config).hidden_size
        self.critic = critic if critic is not None else (ValueHead(H).to(self.device) if cfg.advantage == "gae" else None)
        self.reward_model, self.reward_fn = reward_model, reward_fn
        if reward_model is not None:
            reward_model.requires_grad_(False).eval()
        params = list(policy.parameters()) + (list(self.critic.parameters()) if self.critic is not None else [])
        self.params = [p for p in dict.fromkeys(params) if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        from .trainer import lr_lambda

        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(cfg))
        self.kl_ctl = AdaptiveKL(cfg.kl_coef, cfg.target_kl, cfg.kl_horizon)
        self.prompts = prompts or load_prompts("builtin", tok, max_prompt_tokens=cfg.max_length, seed=cfg.seed)
        if cfg.gradient_checkpointing:
            (getattr(policy, "activation_checkpointing_enable", None) or policy.gradient_checkpointing_enable)()
        self.step = 0

    # rollout -> score -> advantages -> update
    def rollout(self, prompt_ids: List[List[int]]) -> Rollout:
        cfg, tok = self.cfg, self.tok
        prompts = [p for p in prompt_ids for _ in range(cfg.num_generations)]  # groups of k consecutive samples
        outs = sample(self.policy, tok, prompts, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                      top_p=cfg.top_p, seed=cfg.seed * 100_003 + self.step)
        seqs = [(p, ids + ([tok.eos_token_id] if ended else [])) for p, (ids, ended) in zip(prompts, outs)]
        return Rollout(seqs, torch.tensor([e for _, e in outs]), [tok.decode(ids) for ids, _ in outs])

    def _forward(self, model, batch, *, critic=None, with_grad: bool):
        """Fused per-token logps/entropy of completion tokens (N_c,), values (N_c,) or None, hidden."""
        head = head_of(model, self.cfg.temperature)
        ctx = torch.enable_grad() if with_grad else torch.no_grad()
        with ctx:
            h = hidden_states(model, batch.input_ids, batch.attention_mask, batch.position_ids)
            h_c, y_c, _ = select_completion(h, batch.targets, batch.seq_ids)
            hh, W, b = _head_inputs(h_c, head)
            logps, entropy = linear_logps(hh, W, y_c, bias=b, softcap=head.softcap, temperature=head.temperature,
                                          return_entropy=True, backend=self.cfg.backend)
            values = None
            if critic is not None:
                if isinstance(critic, ValueHead):
                    values = token_values(critic, h_c)
                else:  # separate critic: its own backbone
                    hc = hidden_states(critic.lm, batch.input_ids, batch.attention_mask, batch.position_ids)
                    values = token_values(critic, select_completion(hc, batch.targets, batch.seq_ids)[0])
        return logps, entropy, values, h_c, y_c

    def _minibatches(self, S: int, epoch: int) -> List[List[int]]:
        size = S // self.cfg.num_minibatches
        order = list(range(S)) if epoch == 0 else torch.randperm(
            S, generator=torch.Generator().manual_seed(self.cfg.seed * 7919 + self.step * 31 + epoch)).tolist()
        return [order[i:i + size] for i in range(0, S, size)]

    def _batch(self, ro: Rollout, idx: List[int]):
        return collate([ro.seqs[i] for i in idx], pad_id=self.tok.pad_token_id, pack=self.cfg.pack).to(self.device)

    def _scores(self, ro: Rollout, idx, batch) -> torch.Tensor:
        # A Python reward function sees `ended` and judges it itself; the penalty is for reward-model scores.
        if self.reward_fn is not None:
            return torch.tensor([self.reward_fn(ro.texts[i], bool(ro.ended[i])) for i in idx], device=self.device)
        with torch.no_grad():
            s = rewards_of(self.reward_model, batch)
        return s - self.cfg.missing_eos_penalty * (~ro.ended[idx]).float().to(self.device)

    def score(self, ro: Rollout):
        """Per-sample tensors, padded to (S, T) completion tokens, scored in first-epoch minibatches."""
        S = len(ro.seqs)
        T = max(len(c) for _, c in ro.seqs)
        mask = torch.zeros(S, T, dtype=torch.bool, device=self.device)
        for i, (_, c) in enumerate(ro.seqs):
            mask[i, :len(c)] = True
        fields = {k: torch.zeros(S, T, device=self.device) for k in ("old_logps", "ref_logps", "values", "entropy")}
        scores = torch.zeros(S, device=self.device)
        for idx in self._minibatches(S, 0):
            batch = self._batch(ro, idx)
            lp, ent, v, _, _ = self._forward(self.policy, batch, critic=self.critic, with_grad=False)
            rlp = self._forward(self.ref, batch, with_grad=False)[0]
            m = mask[idx]
            fields["old_logps"][idx] = to_padded(lp, m)
            fields["entropy"][idx] = to_padded(ent, m)
            fields["ref_logps"][idx] = to_padded(rlp, m)
            if v is not None:
                fields["values"][idx] = to_padded(v, m)
            scores[idx] = self._scores(ro, idx, batch).float()
        return mask, fields, scores

    def advantages(self, mask, f, scores):
        cfg, beta = self.cfg, self.kl_ctl.beta
        m = mask.float()
        kl = (f["old_logps"] - f["ref_logps"]) * m  # k1 per token
        last = mask.sum(1) - 1
        if cfg.advantage == "gae":
            rewards = -beta * kl if cfg.kl_mode == "reward" else torch.zeros_like(kl)
            rewards[torch.arange(len(scores)), last] += scores
            adv, returns = gae(rewards, f["values"], m, cfg.gamma, cfg.lam)
            adv = masked_whiten(adv, m)
        else:
            seq_score = scores - (beta * kl.sum(1) if cfg.kl_mode == "reward" else 0.0)
            fn = grpo_advantages if cfg.advantage == "grpo" else rloo_advantages
            adv = fn(seq_score, cfg.num_generations)[:, None] * m
            returns = torch.zeros_like(adv)
            rewards = -beta * kl if cfg.kl_mode == "reward" else torch.zeros_like(kl)
        return adv, returns, rewards, kl

    def update(self, ro, mask, f, adv, returns) -> dict:
        cfg, stats = self.cfg, []
        for epoch in range(cfg.num_ppo_epochs):
            for idx in self._minibatches(len(ro.seqs), epoch):
                batch = self._batch(ro, idx)
                m = mask[idx]
                head = head_of(self.policy, cfg.temperature)
                h = hidden_states(self.policy, batch.input_ids, batch.attention_mask, batch.position_ids)
                h_c, y_c, s_c = select_completion(h, batch.targets, batch.seq_ids)
                hh, W, b = _head_inputs(h_c, head)
                kl_loss = cfg.kl_mode == "loss" and self.kl_ctl.beta > 0
                loss, pm = linear_ppo_loss(
                    hh, W, y_c, f["old_logps"][idx][m], adv[idx][m],
                    ref_logps=f["ref_logps"][idx][m], clip_eps=cfg.clip_eps, clip_eps_high=cfg.clip_eps_high,
                    dual_clip=cfg.dual_clip, kl_coef=self.kl_ctl.beta if kl_loss else 0.0, kl_estimator="k3",
                    entropy_coef=cfg.entropy_coef, temperature=head.temperature, softcap=head.softcap, bias=b,
                    backend=cfg.backend)
                if self.critic is not None:
                    if isinstance(self.critic, ValueHead):
                        v = token_values(self.critic, h_c)
                    else:
                        hc = hidden_states(self.critic.lm, batch.input_ids, batch.attention_mask, batch.position_ids)
                        v = token_values(self.critic, select_completion(hc, batch.targets, batch.seq_ids)[0])
                    vloss, vm = value_loss(v, f["values"][idx][m], returns[idx][m], clip_eps=cfg.cliprange_value)
                    loss = loss + cfg.vf_coef * vloss
                    pm = {**pm, "loss/value": vm["loss/value"], "val/clipfrac": vm["val/clipfrac"]}
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(self.params, cfg.max_grad_norm if cfg.max_grad_norm > 0 else math.inf)
                self.optimizer.step()
                stats.append({k: float(v) for k, v in pm.items()})
            if cfg.early_stop_kl and sum(s["policy/approxkl"] for s in stats) / len(stats) > cfg.early_stop_kl:
                break
        return {k: sum(s[k] for s in stats) / len(stats) for k in stats[0]} | {"first/ratio_mean":
                                                                               stats[0]["policy/ratio_mean"],
                                                                               "first/clipfrac":
                                                                               stats[0]["policy/clipfrac"]}

    def iteration(self, prompt_ids: List[List[int]]) -> dict:
        t0 = time.perf_counter()
        ro = self.rollout(prompt_ids)
        t_roll = time.perf_counter() - t0
        with autocast(self.cfg, self.device):  # bf16 on CUDA for scoring and update alike
            mask, f, scores = self.score(ro)
            adv, returns, rewards, kl = self.advantages(mask, f, scores)
            t_score = time.perf_counter() - t0 - t_roll
            self.policy.train()
            upd = self.update(ro, mask, f, adv, returns)
        t_update = time.perf_counter() - t0 - t_roll - t_score
        m = mask.float()
        n_tok = int(m.sum())
        seq_kl = kl.sum(1)
        non_score = (-self.kl_ctl.beta * kl).sum(1)
        out = {
            "objective/kl": seq_kl.mean().item(),
            "objective/entropy": (f["entropy"] * m).sum(1).mean().item(),
            "objective/non_score_reward": non_score.mean().item(),
            "objective/rlhf_reward": (scores + non_score).mean().item(),
            "objective/scores": scores.mean().item(),
            "policy/approxkl_avg": upd["policy/approxkl"],
            "policy/clipfrac_avg": upd["policy/clipfrac"],
            "loss/policy_avg": upd["loss/policy"],
            "loss/value_avg": upd.get("loss/value", 0.0),
            "val/clipfrac_avg": upd.get("val/clipfrac", 0.0),
            "val/ratio": upd["policy/ratio_mean"],
            "first/ratio_mean": upd["first/ratio_mean"],
            "first/clipfrac": upd["first/clipfrac"],
            "kl_coef": self.kl_ctl.beta,
            "eos_rate": ro.ended.float().mean().item(),
            "rollout_tokens_per_s": n_tok / max(t_roll, 1e-9),
            "train_tokens_per_s": n_tok * self.cfg.num_ppo_epochs / max(t_update, 1e-9),
            "time/rollout_s": t_roll, "time/score_s": t_score, "time/update_s": t_update,
        }
        self.kl_ctl.update(out["objective/kl"], len(ro.seqs))
        return out

    def state_dict(self) -> dict:
        return {"step": self.step, "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "kl_coef": self.kl_ctl.beta, "rng": rng_state(), "config": asdict(self.cfg),
                "critic": None if not isinstance(self.critic, ValueHead) else self.critic.state_dict()}

    def load_state_dict(self, s: dict) -> None:
        self.step = s["step"]
        self.optimizer.load_state_dict(s["optimizer"])
        self.scheduler.load_state_dict(s["scheduler"])
        self.kl_ctl.beta = s["kl_coef"]
        if s.get("critic") is not None:
            self.critic.load_state_dict(s["critic"])
        set_rng_state(s["rng"])

    def train(self) -> dict:
        cfg = self.cfg
        run_dir = Path(cfg.output_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        metrics_path = run_dir / "metrics.jsonl"
        ckpt = latest_checkpoint(run_dir) if cfg.resume else None
        if ckpt is not None:
            self.load_state_dict(load_trainer_state(ckpt))
            truncate_metrics(metrics_path, self.step)
        else:
            check_fresh_start(run_dir)
            if metrics_path.exists():
                metrics_path.unlink()
        last = {}
        bar = tqdm(total=cfg.max_steps, initial=self.step, desc="ppo", dynamic_ncols=True, mininterval=0.5)
        with open(metrics_path, "a") as log:
            while self.step < cfg.max_steps:
                start = (self.step * cfg.batch_size) % len(self.prompts)
                batch = [self.prompts[(start + i) % len(self.prompts)] for i in range(cfg.batch_size)]
                if self.device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(self.device)
                out = self.iteration(batch)
                if not math.isfinite(out["loss/policy_avg"]):
                    raise FloatingPointError(f"non-finite PPO loss at iteration {self.step + 1}; last good "
                                             f"checkpoint: {latest_checkpoint(run_dir)}")
                out["lr"] = self.scheduler.get_last_lr()[0]
                self.scheduler.step()
                self.step += 1
                out["peak_mem_bytes"] = torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda" \
                    else None
                last = {"step": self.step, **out}
                log.write(json.dumps(last) + "\n")
                log.flush()
                bar.update(1)
                bar.set_postfix(score=f"{out['objective/scores']:.3f}", kl=f"{out['objective/kl']:.3f}")
                if self.step % cfg.save_every == 0 or self.step == cfg.max_steps:
                    separate = self.critic is not None and not isinstance(self.critic, ValueHead)
                    save_checkpoint(run_dir, self.step, self.policy, self.tok, self.state_dict(),
                                    keep=cfg.save_total_limit,
                                    extra=(lambda d: self.critic.save_pretrained(d / "critic")) if separate else None)
        bar.close()
        return last


def run_ppo(cfg: PPOConfig) -> dict:
    """`fusealign ppo`: defaults to the built-in task, its SFT policy and the reward model trained on it."""
    from .config import RMConfig
    from .recipes import _finish, _tokenizer, builtin_sft_path, gt_reward, load_policy, run_rm

    cfg = replace(cfg, output_dir=cfg.output_dir or "runs/ppo")
    device = resolve_device(cfg.device)
    init = builtin_sft_path(cfg) if cfg.model == "builtin" else cfg.model
    policy, tok = load_policy(cfg, init=init)
    ref, _ = load_policy(replace(cfg, resume=False), init=init)
    reward_model, reward_fn = None, None
    if cfg.reward_fn == "builtin":
        reward_fn = task.reward
    else:
        rm_path = cfg.reward_model
        if not rm_path:
            rm_dir = Path(cfg.output_dir) / "rm"
            if latest_checkpoint(rm_dir) is None:
                run_rm(RMConfig(output_dir=str(rm_dir), sft_model=init, seed=cfg.seed, device=cfg.device,
                                backend=cfg.backend, center_coef=0.01))
            rm_path = str(latest_checkpoint(rm_dir))
        reward_model = RewardModel.from_pretrained(rm_path).to(device)
    critic = None
    if cfg.advantage == "gae" and cfg.critic == "separate":
        ckpt = latest_checkpoint(Path(cfg.output_dir)) if cfg.resume else None
        if ckpt is not None:
            if not (ckpt / "critic").is_dir():
                raise FileNotFoundError(f"{ckpt} has no critic/ to resume the separate critic from")
            critic = RewardModel.from_pretrained(str(ckpt / "critic"))
        elif reward_model is not None:  # initialise the critic from the reward model (Huang et al. 2024)
            critic = RewardModel.from_pretrained(rm_path)
        else:
            torch.manual_seed(cfg.seed)
            critic = RewardModel(load_causal_lm(init) if init != "builtin" else load_policy(
                replace(cfg, resume=False), init=init)[0])
        critic = critic.to(device)
    prompts = load_prompts(cfg.data, tok, max_prompt_tokens=cfg.max_length - cfg.max_new_tokens, seed=cfg.seed)
    trainer = PPOTrainer(cfg, policy, ref, tok, critic=critic, reward_model=reward_model, reward_fn=reward_fn,
                         prompts=prompts)
    before = gt_reward(policy, tok, seed=cfg.seed) if cfg.data.startswith("builtin") else None
    last = trainer.train()
    summary = dict(last)
    if before is not None:
        summary["eval/gt_reward_init"] = before
        summary["eval/gt_reward"] = gt_reward(policy, tok, seed=cfg.seed)
    return _finish(cfg, summary)
