"""PPO (with GRPO / RLOO advantages) on fused heads: the reward-based RL stage of the seed pipeline.

One iteration, as in TRL's PPO trainer and Huang et al. 2024 ("The N implementation details of RLHF
with PPO"), reading top to bottom in `PPOTrainer.iteration`:
  rollout      sample k completions per prompt with a KV cache (temperature, top-k, top-p, stop on EOS; nothing
               of the checkpoint's generation config), keeping the sampler's own log-probs (sampling.py)
  score        old-policy and reference log-probs (fused, no grad), values (critic), scores (RM or a
               Python reward function; a completion without EOS can be penalised)
  rewards      per-token −β·k1 KL to the reference, plus the score on the last token   (kl_mode="reward")
               or the score alone, KL entering the loss as k3 (GRPO style)               (kl_mode="loss")
  advantages   GAE(γ, λ) with whitening; or GRPO (group-normalised) / RLOO (leave-one-out), no critic
  update       num_ppo_epochs × minibatches of fa.ppo_policy_loss + vf_coef · fa.value_loss (gae), or of
               fa.grpo_loss — TRL 1.16's GRPOTrainer loss, --loss-type and its options — (grpo, rloo)
Scoring and update run the same forward (`_forward`: `score_tokens` plus the critic), the first
epoch's minibatches are scored exactly as they are trained (same sequences, same packing, same
kernels), and dropout is off wherever each role hides it (`models.disable_dropout`), so the ratio is
exactly 1 at the first minibatch. `sampling/sampling_logp_difference` (TRL's) checks that the rollouts
came from the distribution scored as `old_logps`.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, replace
from typing import Callable, List, Optional

import torch
import torch.distributed as dist

from fusealign.losses import grpo_loss, ppo_policy_loss, value_loss
from fusealign.losses.grpo import vllm_importance_ratio

from .config import PPOConfig
from .data import collate, load_prompts
from .distributed import DistInfo, all_reduce_max, all_reduce_mean, all_reduce_sum, rank_slice, run, shard
from .errors import UserError
from .loop import check_finite, run_loop
from .models import RewardModel, TokenScores, ValueHead, critic_values, disable_dropout, score_tokens
from .rollout import rollout_engine
from .runtime import autocast, bf16_enabled, enable_gradient_checkpointing
from .sampling import SamplingParams, sampling_logp_difference, truncation_notice
from .state import TrainState, load_modules


# --- advantages ----------------------------------------------------------------------------------------
def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True,
                  info: DistInfo = DistInfo()) -> torch.Tensor:
    """(x − mean) / std over the masked entries (unbiased variance, as TRL); padding stays 0.

    Under several ranks the statistics are those of every rank's entries together (sums all-reduced), so each
    rank whitens its share of the rollout exactly as one process whitens the whole."""
    n, total = mask.sum(), (x * mask).sum()
    if info.active:
        t = torch.stack([total, n]).double()
        dist.all_reduce(t)
        total, n = t[0].to(x.dtype), t[1].to(x.dtype)
    mean = total / n
    sq = (((x - mean) * mask) ** 2).sum()
    if info.active:
        sq = sq.double()
        dist.all_reduce(sq)
        sq = sq.to(x.dtype)
    var = sq / (n - 1).clamp_min(1)
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


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """1 − Var[returns − values] / Var[returns] over the masked tokens (1: perfect critic, ≤ 0: useless)."""
    m = mask.bool()
    r, v = returns[m].float(), values[m].float()
    var_r = r.var(unbiased=False)
    return float("nan") if var_r == 0 else float(1 - (r - v).var(unbiased=False) / var_r)


class AdaptiveKL:
    """β ← β · (1 + clip(KL/target − 1, ±0.2) · n/horizon)  (Ziegler et al. 2019)."""

    def __init__(self, beta: float, target: float, horizon: int):
        self.beta, self.target, self.horizon = beta, target, horizon

    def update(self, kl: float, n: int) -> None:
        if self.target > 0:
            err = max(-0.2, min(0.2, kl / self.target - 1))
            self.beta *= 1 + err * n / self.horizon

    def state_dict(self) -> dict:
        return {"beta": self.beta}

    def load_state_dict(self, s: dict) -> None:
        self.beta = s["beta"]


def epoch_should_stop(epoch_approx_kl: list, threshold: float) -> bool:
    """--early-stop-kl: leave an iteration's remaining epochs once the epoch just finished has a mean approx-KL
    (over its minibatches) above `threshold` (0: never) — the latest epoch's, as cleanrl's `target_kl` reads the
    latest estimate, not a running mean over every epoch so far (which a first epoch near 0 would hold down)."""
    return threshold > 0 and sum(epoch_approx_kl) / len(epoch_approx_kl) > threshold


# --- the critic: V(s_t) for GAE (GRPO / RLOO have none) -----------------------------------------------------------
class SharedCritic:
    """critic="policy_head": a zero-initialised value head on the policy's own hidden states, evaluated inside the
    policy's forward (score_tokens(value_head=…)); under FSDP2 it lives in the policy's root."""

    def __init__(self, head: ValueHead):
        self.head = head
        self.value_head = head.value_head  # the nn.Linear(H, 1) the policy's forward applies

    def values(self, batch):
        return None  # computed by the policy's forward

    def modules(self, sharded: bool) -> dict:
        return {} if sharded else {"value_head": self.head}  # sharded: inside the policy's root (its extras)


class SeparateCritic:
    """critic="separate": its own backbone and value head (a RewardModel, initialised from the reward model)."""

    value_head = None

    def __init__(self, model):
        self.model = model  # the RewardModel, or its FSDP root

    def values(self, batch) -> torch.Tensor:
        return run(self.model, critic_values, batch)

    def modules(self, sharded: bool) -> dict:
        return {"critic": self.model}


# --- the rollout buffer -----------------------------------------------------------------------------------
@dataclass
class RolloutBatch:
    """One rollout: S sampled sequences; per-token tensors are (S, T) over completion tokens, right-padded."""

    seqs: List[tuple]  # (prompt_ids, completion_ids) per sample; the completion ends with EOS when it ended
    ended: torch.Tensor  # (S,) bool: the sample stopped on EOS
    texts: List[str]  # decoded completions (for a Python reward function)
    mask: Optional[torch.Tensor] = None  # (S, T) bool: a completion token
    old_logps: Optional[torch.Tensor] = None  # (S, T) log π_old(y_t)
    ref_logps: Optional[torch.Tensor] = None  # (S, T) log π_ref(y_t)
    values: Optional[torch.Tensor] = None  # (S, T) critic values V(s_t) (0 without a critic)
    entropy: Optional[torch.Tensor] = None  # (S, T) policy entropy at each position
    scores: Optional[torch.Tensor] = None  # (S,) reward-model or reward-function score
    kl: Optional[torch.Tensor] = None  # (S, T) k1 = log π_old − log π_ref
    rewards: Optional[torch.Tensor] = None  # (S, T) per-token rewards (KL penalty + score on the last token)
    advantages: Optional[torch.Tensor] = None  # (S, T)
    seq_advantages: Optional[torch.Tensor] = None  # (S,) one advantage per sequence (GRPO / RLOO)
    returns: Optional[torch.Tensor] = None  # (S, T) value targets (GAE)
    sampler_logps: Optional[torch.Tensor] = None  # (S, T) the sampler's log-probs of the distribution it drew from

    def __len__(self) -> int:
        return len(self.seqs)


def _padded(flat: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(N_c,) in batch order -> (S_mb, T); masked_scatter: differentiable, no host sync."""
    return torch.zeros(mask.shape, dtype=flat.dtype, device=flat.device).masked_scatter(mask, flat)


def to_padded(flat: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(N_c,) completion-token values in batch order -> (S, T) right-padded with zeros."""
    out = torch.zeros(mask.shape, dtype=flat.dtype, device=flat.device)
    out[mask] = flat
    return out


class PPOTrainer:
    """Holds the four roles (policy, reference, critic, reward) and runs iterations; `train()` loops."""

    # The losses take the sampler's log-probs (TRL's importance-sampling correction) only when a separate engine
    # samples (--rollout vllm, set in __init__); False here for a trainer built without __init__ (the loss tests).
    sampler_correction = False

    def __init__(self, cfg: PPOConfig, policy, ref, tok, *, critic=None, reward_model=None,
                 reward_fn: Optional[Callable[[str, bool], float]] = None, prompts: Optional[List[List[int]]] = None,
                 info: DistInfo = DistInfo()):
        """With several ranks (`info`) every model is FSDP2-sharded here (the policy's value head inside the
        policy's root), and each rank rolls out its own slice of every iteration's prompts."""
        self.cfg, self.tok, self.info = cfg, tok, info
        for m in (policy, ref, critic, reward_model):
            if m is not None:
                disable_dropout(m)
        self.device = next(policy.parameters()).device
        self.policy_model = policy  # the unwrapped policy (gradient checkpointing, config)
        ref.requires_grad_(False).eval()
        H = (getattr(policy.config, "text_config", None) or policy.config).hidden_size
        head = ValueHead(H).to(self.device) if critic is None and cfg.advantage == "gae" else None
        if head is not None:
            load_modules(cfg, {"value_head": head})  # resumed before FSDP2 shards it (one process alike)
        bf16 = self.device.type == "cuda" and bf16_enabled(cfg, self.device)  # FSDP2's bf16 parameters
        self.policy = shard(policy, info, bf16=bf16, **({"value_head": head} if head is not None else {}))
        self.ref = shard(ref, info, bf16=bf16)
        self.critic = SharedCritic(head) if head is not None else \
            SeparateCritic(shard(critic, info, bf16=bf16)) if critic is not None else None
        self.reward_model, self.reward_fn = reward_model, reward_fn
        if reward_model is not None:
            reward_model.requires_grad_(False).eval()
            self.reward_model = shard(reward_model, info, bf16=bf16)
        self.kl_ctl = AdaptiveKL(cfg.kl_coef, cfg.target_kl, cfg.kl_horizon)
        models = {"": self.policy, **(self.critic.modules(info.active) if self.critic is not None else {})}
        self.state = TrainState(cfg, models, info=info, tokenizer=tok, extras={"kl_ctl": self.kl_ctl})
        # TRL's GRPO loss for grpo / rloo advantages (one rollout = its generation batch, over every rank)
        self.grpo_options = None if cfg.advantage == "gae" else cfg.grpo_options(num_processes=info.world_size)
        self.prompts = prompts or load_prompts("builtin", tok, max_prompt_tokens=cfg.max_length, seed=cfg.seed)
        if cfg.gradient_checkpointing:
            enable_gradient_checkpointing(policy)
        if info.active and (cfg.batch_size % info.world_size or
                            (cfg.batch_size // info.world_size * cfg.num_generations) % cfg.num_minibatches):
            raise UserError(f"--batch-size {cfg.batch_size} must split evenly over {info.world_size} ranks, and each "
                            f"rank's samples ({cfg.batch_size} / {info.world_size} × --num-generations) over "
                            f"--num-minibatches {cfg.num_minibatches}")
        # The rollout engine (--rollout: HF generate, or a colocated vLLM engine whose weights follow the policy) and
        # what it samples with. With vLLM the losses take its own log-probs: TRL's importance-sampling correction
        # π_old/π_sampler (--vllm-importance-sampling-*), for PPO and GRPO alike.
        self.sampling = SamplingParams(temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k,
                                       max_new_tokens=cfg.max_new_tokens, n=cfg.num_generations)
        self.rollout_engine = rollout_engine(cfg, self.policy, tok, info, seed=cfg.seed)
        self.sampler_correction = cfg.rollout == "vllm"
        notice = truncation_notice(self.sampling, "ppo")
        if notice and info.rank == 0:
            print(notice, file=sys.stderr, flush=True)
        self.step = 0

    # --- the one forward: scoring (no grad) and update (grad) -------------------------------------------
    def _forward(self, model, batch, *, critic=None) -> TokenScores:
        """Fused per-token log-probs and entropy of `model` on the completion tokens, with the critic's values."""
        s = run(model, score_tokens, batch, temperature=self.cfg.temperature, backend=self.cfg.backend, entropy=True,
                value_head=getattr(critic, "value_head", None))  # inside the FSDP root's forward when sharded
        if critic is not None and s.values is None:  # a separate critic: its own backbone
            s.values = critic.values(batch)
        return s

    def _minibatches(self, S: int, epoch: int) -> List[List[int]]:
        size = S // self.cfg.num_minibatches
        order = list(range(S)) if epoch == 0 else torch.randperm(
            S, generator=torch.Generator().manual_seed(self.cfg.seed * 7919 + self.step * 31 + epoch)).tolist()
        return [order[i:i + size] for i in range(0, S, size)]

    def _batch(self, ro: RolloutBatch, idx: List[int]):
        return collate([ro.seqs[i] for i in idx], pad_id=self.tok.pad_token_id, pack=self.cfg.pack).to(self.device)

    # --- rollout → score → advantages → update ------------------------------------------------------------
    def rollout(self, prompt_ids: List[List[int]]) -> RolloutBatch:
        cfg, tok = self.cfg, self.tok
        prompts = [p for p in prompt_ids for _ in range(cfg.num_generations)]  # groups of k consecutive samples
        params = replace(self.sampling, seed=cfg.seed * 100_003 + self.step + 1_000_003 * self.info.rank)
        outs = self.rollout_engine.sample(prompt_ids, params)  # the k samples of a prompt consecutive
        seqs = [(p, o.ids + ([tok.eos_token_id] if o.ended else [])) for p, o in zip(prompts, outs)]
        sampler_logps = torch.zeros(len(outs), max(len(o.logps) for o in outs))
        for i, o in enumerate(outs):
            sampler_logps[i, :len(o.logps)] = o.logps
        return RolloutBatch(seqs, torch.tensor([o.ended for o in outs]), [tok.decode(o.ids) for o in outs],
                            sampler_logps=sampler_logps.to(self.device))

    def _scores(self, ro: RolloutBatch, idx, batch) -> torch.Tensor:
        # A Python reward function sees `ended` and judges it itself; the penalty is for reward-model scores.
        if self.reward_fn is not None:
            return torch.tensor([self.reward_fn(ro.texts[i], bool(ro.ended[i])) for i in idx], device=self.device)
        s = run(self.reward_model, RewardModel.rewards, batch)
        return s - self.cfg.missing_eos_penalty * (~ro.ended[idx]).float().to(self.device)

    @torch.no_grad()
    def score(self, ro: RolloutBatch) -> None:
        """Fill old_logps, ref_logps, values, entropy (S, T) and scores (S,), in first-epoch minibatches."""
        S, T = len(ro), max(len(c) for _, c in ro.seqs)
        ro.mask = torch.zeros(S, T, dtype=torch.bool, device=self.device)
        for i, (_, c) in enumerate(ro.seqs):
            ro.mask[i, :len(c)] = True
        ro.old_logps, ro.ref_logps, ro.values, ro.entropy = (torch.zeros(S, T, device=self.device) for _ in range(4))
        ro.scores = torch.zeros(S, device=self.device)
        for idx in self._minibatches(S, 0):
            batch, m = self._batch(ro, idx), ro.mask[idx]
            policy = self._forward(self.policy, batch, critic=self.critic)
            ro.old_logps[idx] = to_padded(policy.logps, m)
            ro.entropy[idx] = to_padded(policy.entropy, m)
            ro.ref_logps[idx] = to_padded(self._forward(self.ref, batch).logps, m)
            if policy.values is not None:
                ro.values[idx] = to_padded(policy.values, m)
            ro.scores[idx] = self._scores(ro, idx, batch).float()

    def advantages(self, ro: RolloutBatch) -> None:
        """Fill kl, rewards, advantages and returns (S, T) from the scored rollout."""
        cfg, beta, m = self.cfg, self.kl_ctl.beta, ro.mask.float()
        ro.kl = (ro.old_logps - ro.ref_logps) * m  # k1 per token
        ro.rewards = -beta * ro.kl if cfg.kl_mode == "reward" else torch.zeros_like(ro.kl)
        if cfg.advantage == "gae":
            last = ro.mask.sum(1) - 1
            ro.rewards[torch.arange(len(ro)), last] += ro.scores
            adv, ro.returns = gae(ro.rewards, ro.values, m, cfg.gamma, cfg.lam)
            ro.advantages = masked_whiten(adv, m, info=self.info)
        else:
            seq_score = ro.scores - (beta * ro.kl.sum(1) if cfg.kl_mode == "reward" else 0.0)
            per_seq = (grpo_advantages if cfg.advantage == "grpo" else rloo_advantages)(seq_score, cfg.num_generations)
            ro.seq_advantages = per_seq
            ro.advantages = per_seq[:, None] * m
            ro.returns = torch.zeros_like(ro.advantages)

    def _loss_mask(self, ro: RolloutBatch, idx) -> torch.Tensor:
        """(S_mb, T) the tokens the GRPO loss reads: completion tokens, of ended completions only with
        --mask-truncated-completions (TRL's; the truncated ones still count in the group's advantages)."""
        m = ro.mask[idx]
        return m & ro.ended[idx].to(m.device)[:, None] if self.cfg.mask_truncated_completions else m

    def _grpo_loss(self, new: TokenScores, ro: RolloutBatch, idx, num_items_in_batch: float):
        """TRL 1.16's GRPO loss (`fa.grpo_loss`) on one minibatch, padded to (S_mb, T); TRL's metric names plus
        the engine's own approx-KL and ratio mean (the first minibatch is scored as trained: ratio 1)."""
        m = ro.mask[idx]
        padded = lambda flat: _padded(flat, m)  # noqa: E731
        logps, old = padded(new.logps), ro.old_logps[idx]
        loss, metrics = grpo_loss(logps, old, ro.seq_advantages[idx], self._loss_mask(ro, idx),
                                  ref_logps=ro.ref_logps[idx], entropy=padded(new.entropy),
                                  sampling_logps=ro.sampler_logps[idx] if self.sampler_correction else None,
                                  num_items_in_batch=num_items_in_batch, options=self.grpo_options)
        with torch.no_grad():
            log_ratio = torch.where(m, logps - old, 0.0)
            n = m.sum().clamp_min(1)
            metrics["policy/approxkl"] = (0.5 * log_ratio ** 2).sum() / n
            metrics["policy/ratio_mean"] = torch.where(m, log_ratio.exp(), 0.0).sum() / n
            metrics["loss/policy"] = loss.detach()
        return loss, metrics

    def update(self, ro: RolloutBatch) -> dict:
        """num_ppo_epochs × minibatches of clipped policy loss (+ value loss), or of TRL's GRPO loss; averaged
        metrics."""
        cfg, stats = self.cfg, []
        # the loss's options as configured, with the KL term's weight β when the KL enters the loss (GRPO style)
        loss_options = replace(cfg.loss, kl_coef=self.kl_ctl.beta if cfg.kl_mode == "loss" else 0.0)
        optimizer, params = self.state.optimizer, self.state.params
        if self.grpo_options is not None:  # TRL's num_items_in_batch: the loss tokens of the whole rollout
            num_items = all_reduce_sum(float(self._loss_mask(ro, slice(None)).sum()), self.info)
        for epoch in range(cfg.num_ppo_epochs):
            epoch_kl = []
            for idx in self._minibatches(len(ro), epoch):
                batch, m = self._batch(ro, idx), ro.mask[idx]
                new = self._forward(self.policy, batch, critic=self.critic)  # (N_c,) in batch order
                if self.grpo_options is not None:
                    loss, metrics = self._grpo_loss(new, ro, idx, num_items)  # TRL's normalisers across ranks
                else:  # (S_mb, T) padded: the sequence-level sampler correction reads whole sequences
                    loss, metrics = ppo_policy_loss(
                        _padded(new.logps, m), _padded(new.entropy, m), ro.old_logps[idx], ro.advantages[idx], m,
                        ref_logps=ro.ref_logps[idx],
                        sampling_logps=ro.sampler_logps[idx] if self.sampler_correction else None,
                        options=loss_options)
                    if new.values is not None:
                        v_loss, v_metrics = value_loss(new.values, ro.values[idx][m], ro.returns[idx][m],
                                                       clip_eps=cfg.cliprange_value)
                        loss = loss + cfg.vf_coef * v_loss
                        metrics = {**metrics, **v_metrics}
                    # Token-weighted across ranks (as the supervised trainer): FSDP averages the ranks' gradients,
                    # so scale this rank's token mean by its share of the minibatch's tokens; one process: × 1.
                    n_local = float(m.sum())
                    loss = loss * (n_local * self.info.world_size / all_reduce_sum(n_local, self.info))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm if cfg.max_grad_norm > 0 else math.inf)
                optimizer.step()
                stats.append({k: float(v) for k, v in metrics.items()})
                epoch_kl.append(stats[-1]["policy/approxkl"])
            if cfg.early_stop_kl:  # decided on every rank's KL together: all ranks leave the epochs at once
                kl = all_reduce_mean({"kl": sum(epoch_kl) / len(epoch_kl)}, self.info)["kl"]
                if epoch_should_stop([kl], cfg.early_stop_kl):
                    break
        mean = {}
        for k in stats[0]:  # NaN (e.g. TRL's clip_ratio/low_min with every sequence masked) is left out
            vals = [s[k] for s in stats if s[k] == s[k]]
            mean[k] = sum(vals) / len(vals) if vals else math.nan
        first_clip = stats[0].get("policy/clipfrac", stats[0].get("clip_ratio/region_mean", 0.0))
        return {**mean, "first/ratio_mean": stats[0]["policy/ratio_mean"], "first/clipfrac": first_clip}

    def iteration(self, prompt_ids: List[List[int]]) -> dict:
        t0 = time.perf_counter()
        ro = self.rollout(prompt_ids)
        t_roll = time.perf_counter() - t0
        with autocast(self.cfg, self.device):  # bf16 on CUDA for scoring and update alike
            self.score(ro)
            self.advantages(ro)
            t_score = time.perf_counter() - t0 - t_roll
            self.policy.train()
            upd = self.update(ro)
        t_update = time.perf_counter() - t0 - t_roll - t_score
        m = ro.mask.float()
        n_tok = int(m.sum())
        seq_kl = ro.kl.sum(1)
        non_score = (-self.kl_ctl.beta * ro.kl).sum(1)
        out = {
            "objective/kl": seq_kl.mean().item(),
            # TRL's PPOTrainer: Σ_t −log π(y_t) of the sampled tokens per sequence, averaged (over completion tokens
            # only: TRL filled padding with INVALID_LOGPROB = 1, i.e. −1 a padding position). Its expectation is the
            # sequence entropy when sampling is on-policy; entropy_exact is the same quantity from the exact
            # per-position entropies (lower variance, and still the policy's under top-k / top-p sampling).
            "objective/entropy": (-ro.old_logps * m).sum(1).mean().item(),
            "objective/entropy_exact": (ro.entropy * m).sum(1).mean().item(),
            "objective/non_score_reward": non_score.mean().item(),
            "objective/rlhf_reward": (ro.scores + non_score).mean().item(),
            "objective/scores": ro.scores.mean().item(),
            "policy/approxkl_avg": upd["policy/approxkl"],
            "loss/policy_avg": upd["loss/policy"],
            "val/ratio": upd["policy/ratio_mean"],
            "first/ratio_mean": upd["first/ratio_mean"],
            "first/clipfrac": upd["first/clipfrac"],
            "kl_coef": self.kl_ctl.beta,
            "eos_rate": ro.ended.float().mean().item(),
            **sampling_logp_difference(ro.old_logps, ro.sampler_logps, ro.mask),
            "rollout_tokens_per_s": n_tok / max(t_roll, 1e-9),
            "train_tokens_per_s": n_tok * self.cfg.num_ppo_epochs / max(t_update, 1e-9),
            "time/rollout_s": t_roll, "time/score_s": t_score, "time/update_s": t_update,
        }
        if self.sampler_correction:  # TRL's generation-time ratio over the whole rollout (the losses apply it)
            _, is_metrics = vllm_importance_ratio(ro.old_logps, ro.sampler_logps, ro.mask,
                                                  self.grpo_options or self.cfg.loss)
            out.update({k: v.item() for k, v in is_metrics.items() if k.startswith("sampling/importance")})
            out["time/weight_sync_s"] = getattr(self.rollout_engine, "last_sync_s", 0.0)
        if self.grpo_options is None:  # PPO with a critic: TRL's PPOTrainer names
            out.update({"policy/clipfrac_avg": upd["policy/clipfrac"], "loss/value_avg": upd.get("loss/value", 0.0),
                        "val/clipfrac_avg": upd.get("val/clipfrac", 0.0),
                        "val/explained_variance": explained_variance(ro.values, ro.returns, ro.mask)
                        if self.critic is not None else None})
        else:  # TRL's GRPOTrainer names: the loss's metrics (means over minibatches) and the rollout's
            group_std = ro.scores.view(-1, self.cfg.num_generations).std(1)
            lengths = ro.mask.sum(1).float()
            zero_std = torch.isclose(group_std, torch.zeros_like(group_std))
            out.update({k: upd[k] for k in upd if not k.startswith(("policy/", "loss/", "first/", "sampling/"))})
            out.update({"reward": ro.scores.mean().item(), "reward_std": ro.scores.std().item(),
                        "frac_reward_zero_std": zero_std.float().mean().item(),
                        "completions/mean_length": lengths.mean().item(),
                        "completions/clipped_ratio": 1.0 - ro.ended.float().mean().item()})
        return out

    # --- the run loop ---------------------------------------------------------------------------------------
    def train(self) -> dict:
        cfg, info = self.cfg, self.info

        def step_fn(step: int) -> dict:
            self.step = step
            start = (step * cfg.batch_size) % len(self.prompts)
            prompts = [self.prompts[(start + i) % len(self.prompts)] for i in range(cfg.batch_size)]
            out = self.iteration(rank_slice(prompts, info))  # each rank: its own prompts
            # TRL: the max (min) over ranks of the maxima (minima), not their mean
            extremes = {k: (all_reduce_max(out[k], info) if sign > 0 else -all_reduce_max(-out[k], info))
                        for k, sign in (("sampling/sampling_logp_difference/max", 1),
                                        ("sampling/importance_sampling_ratio/max", 1),
                                        ("sampling/importance_sampling_ratio/min", -1)) if k in out}
            out = all_reduce_mean(out, info)  # every rank has the same number of sequences: plain means
            out.update(extremes)
            for k in ("rollout_tokens_per_s", "train_tokens_per_s"):  # the job's rate: the sum over ranks
                out[k] *= info.world_size
            # adaptive β from the whole rollout's KL (the same β on every rank)
            self.kl_ctl.update(out["objective/kl"], cfg.batch_size * cfg.num_generations)
            check_finite(out["loss/policy_avg"], "PPO loss", step + 1, self.state.run_dir)
            out["lr"] = self.state.scheduler.get_last_lr()[0]
            self.state.scheduler.step()
            self.step = step + 1
            return out

        return run_loop(cfg, self.state, step_fn, device=self.device, desc="ppo",
                        postfix=("objective/scores", "objective/kl"), info=info)

    def close(self) -> None:
        """Free the rollout engine (a vLLM engine: after the run's last collective, see rollout_vllm)."""
        self.rollout_engine.close()
