"""Run configurations: dataclasses with a help string per field and validation in __post_init__.

The CLI builds its flags from these fields (`--max-steps`, `--output-dir`, …), so `--help` shows the
same text as this file. Layers, each field declared once, each only where it applies:
    RunConfig         every command: where, seed, device, kernel backend
    TrainConfig       every trainer (SFT, RM, DPO, PPO): model, data, optimiser, schedule, checkpoints
    SupervisedConfig  the trainers that step through a data set (SFT, RM, DPO): accumulation, evaluation
    FromSFT           the stages that start from an SFT policy (RM, DPO, PPO): `--sft-model`
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields
from typing import Optional

from fusealign.losses.grpo import GRPOOptions


def opt(default, help: str, **kw):
    return field(default=default, metadata={"help": help, **kw})


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


@dataclass
class RunConfig:
    """Common to every command."""

    output_dir: str = opt("", "run directory (checkpoints, metrics.jsonl); default runs/<command>")
    seed: int = opt(0, "seed for initialisation, data order and sampling")
    device: str = opt("auto", "cpu, cuda, or auto (cuda when available)")
    backend: str = opt("auto", "fused-kernel backend: auto, triton or torch")
    threads: int = opt(0, "torch intra-op CPU threads (0: torch's default, the machine's cores); results can "
                          "depend on it, so fix it to reproduce a run on another machine")

    def __post_init__(self):
        if self.threads < 0:
            raise ValueError(f"--threads must be >= 0, got {self.threads}")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"--device must be auto, cpu or cuda[:i], got {self.device!r}")
        if self.backend not in ("auto", "triton", "torch"):
            raise ValueError(f"--backend must be auto, triton or torch, got {self.backend!r}")


@dataclass
class TrainConfig(RunConfig):
    """Common to every trainer."""

    model: str = opt("builtin", "local model directory (config + safetensors), or builtin (the built-in task's model)")
    data: str = opt("builtin", "JSONL path or built-in data: builtin, builtin:sft, builtin:pairs, builtin:pairs-ood; "
                               "DPO also: onpolicy (pairs sampled from the policy, labelled by --reward-model)")
    max_steps: int = opt(200, "optimizer steps")
    batch_size: int = opt(16, "examples (SFT) or preference pairs (RM/DPO) per micro-batch")
    lr: float = opt(1e-3, "peak learning rate (AdamW)")
    weight_decay: float = opt(0.0, "AdamW weight decay")
    warmup_steps: int = opt(10, "linear warm-up steps")
    schedule: str = opt("cosine", "decay after warm-up: cosine, linear or constant")
    max_grad_norm: float = opt(1.0, "gradient clipping threshold (0 disables)")
    max_length: int = opt(48, "max tokens of prompt + completion (completions are cut on the right)")
    bf16: bool = opt(True, "bf16 autocast on CUDA (ignored on CPU)")
    gradient_checkpointing: bool = opt(False, "recompute backbone activations in backward")
    pack: bool = opt(True, "padding-free packing (position_ids); --no-pack uses padded batches")
    resume: bool = opt(False, "continue from the latest checkpoint in --output-dir")
    trust_checkpoint: bool = opt(False, "with --resume: also load a trainer state that needs arbitrary unpickling "
                                        "(older fusealign checkpoints). It can run code: only for checkpoints you "
                                        "trust")
    log_every: int = opt(0, "without a terminal: a progress line every N steps (0: about 20 lines per run)")
    save_every: int = opt(100, "checkpoint every N steps (and at the end)")
    save_total_limit: int = opt(2, "checkpoints kept")
    temperature: float = opt(1.0, "softmax temperature of the policy's log-probs")
    attn_implementation: Optional[str] = opt(None, "attention implementation (sdpa, eager, flash_attention_2)")
    fsdp: Optional[bool] = opt(None, "FSDP2 sharding (default: on exactly when torchrun starts more than one "
                                     "process); --fsdp also in one process (1-rank FSDP2, e.g. to check bf16 mixed "
                                     "precision on one GPU)")

    def __post_init__(self):
        super().__post_init__()
        for name in ("max_steps", "batch_size", "max_length", "save_every", "save_total_limit"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{_flag(name)} must be > 0, got {getattr(self, name)}")
        for name in ("lr", "temperature"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{_flag(name)} must be > 0, got {getattr(self, name)}")
        for name in ("warmup_steps", "max_grad_norm", "weight_decay", "log_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"{_flag(name)} must be >= 0, got {getattr(self, name)}")
        if self.schedule not in ("cosine", "linear", "constant"):
            raise ValueError(f"--schedule must be cosine, linear or constant, got {self.schedule!r}")


@dataclass
class SupervisedConfig(TrainConfig):
    """The trainers that step through a data set of examples (SFT, RM, DPO)."""

    grad_accum: int = opt(1, "micro-batches per optimizer step")
    eval_every: int = opt(0, "held-out evaluation every N steps (0: only at the end)")
    skip_bad_lines: bool = opt(False, "skip and count malformed data lines instead of failing")

    def __post_init__(self):
        super().__post_init__()
        if self.grad_accum <= 0:
            raise ValueError(f"--grad-accum must be > 0, got {self.grad_accum}")
        if self.eval_every < 0:
            raise ValueError(f"--eval-every must be >= 0, got {self.eval_every}")


@dataclass
class FromSFT:
    """Mixin of the stages that start from an SFT policy."""

    sft_model: str = opt("", "with --model builtin: the SFT run to start from (default: train one)")


@dataclass
class SFTConfig(SupervisedConfig):
    """Supervised fine-tuning: token-mean NLL of completion tokens."""


@dataclass
class RMConfig(SupervisedConfig, FromSFT):
    """Reward model: Bradley-Terry on a scalar value head."""

    margin: float = opt(0.0, "Bradley-Terry margin subtracted from r_chosen − r_rejected")
    center_coef: float = opt(0.0, "reward-centring coefficient: adds c·mean((r_c + r_r)²)")

    def __post_init__(self):
        super().__post_init__()
        if self.center_coef < 0:
            raise ValueError(f"--center-coef must be >= 0, got {self.center_coef}")


@dataclass
class DPOConfig(SupervisedConfig, FromSFT):
    """Direct preference optimisation and its family: every TRL 1.16 DPO loss type, f-divergences, WPO, SimPO.

    Defaults suit the built-in task (sequence log-ratios of ~10 tokens); TRL's usual β is 0.1.
    """

    beta: float = opt(0.5, "β: strength of the implicit KL to the reference (τ of IPO)")
    loss_type: list[str] = field(default_factory=lambda: ["sigmoid"], metadata={"help": (
        "one or more DPO losses, summed with --loss-weights (TRL 1.16's names): sigmoid, hinge, ipo (length-"
        "normalised), exo_pair, nca_pair, robust, bco_pair, sppo_hard, aot, aot_unpaired, apo_zero, apo_down, "
        "discopop, sft, sigmoid_norm; and cdpo (conservative DPO), ipo_sum (IPO on sums), simpo")})
    loss_weights: Optional[list[float]] = opt(None, "one weight per --loss-type (default 1 each), e.g. MPO: "
                                                    "--loss-type sigmoid bco_pair sft --loss-weights 0.8 0.2 1.0")
    label_smoothing: float = opt(0.0, "ε in [0, 0.5): flip probability of robust; cdpo, exo_pair, aot, "
                                      "aot_unpaired and simpo smoothing")
    f_divergence_type: str = opt("reverse_kl", "reverse_kl, forward_kl, js_divergence or alpha_divergence "
                                               "(f-DPO; for the losses on the chosen−rejected score difference)")
    f_alpha_divergence_coef: float = opt(0.5, "α of alpha_divergence (TRL's parametrisation; 1 = reverse KL)")
    discopop_tau: float = opt(0.05, "τ of the discopop loss")
    use_weighting: bool = opt(False, "WPO: weight each pair by the policy's length-normalised probabilities "
                                     "(from the fused pass's log Σp², no logits)")
    gamma: float = opt(0.0, "SimPO target margin γ")
    average_logps: Optional[bool] = opt(None, "length-normalise log-probs before the loss (default: on for simpo "
                                              "alone; ipo and sigmoid_norm normalise by themselves)")
    nll_coef: float = opt(0.0, "RPO: weight of the chosen-completion NLL (= adding sft with this weight)")
    ref_mode: str = opt("precompute", "precompute (one pass, cached on disk) or online (frozen reference model)")
    eval_samples: int = opt(128, "held-out prompts sampled at the end to score the ground-truth reward")
    reward_model: str = opt("", "with --data onpolicy: the reward model that labels the sampled pairs (fusealign rm); "
                                "with --model builtin and none given, one is trained from the SFT policy")
    onpolicy_prompts: int = opt(512, "with --data onpolicy: prompts (one pair each) sampled per round")
    resample_every: int = opt(0, "with --data onpolicy: re-sample the pairs from the current policy every K steps "
                                 "(iterative DPO); 0 samples them once, from the initial policy")
    prompts: str = opt("builtin", "with --data onpolicy: where prompts come from (builtin, or JSONL with 'prompt')")
    max_new_tokens: int = opt(16, "with --data onpolicy: tokens sampled per completion")
    missing_eos_penalty: float = opt(1.0, "with --data onpolicy: subtracted from the reward model's score of a "
                                          "sampled completion without EOS (as PPO does)")

    def __post_init__(self):
        super().__post_init__()
        from fusealign.losses import LOSS_TYPES, check_dpo_options

        if self.onpolicy_prompts <= 0 or self.resample_every < 0:
            raise ValueError("--onpolicy-prompts must be > 0 and --resample-every >= 0")
        if self.max_new_tokens <= 0 or self.max_new_tokens >= self.max_length:
            raise ValueError(f"--max-new-tokens must lie in [1, --max-length={self.max_length}), "
                             f"got {self.max_new_tokens}")
        if self.data == "onpolicy" and not self.reward_model and self.model != "builtin":
            raise ValueError("--data onpolicy needs --reward-model (the model that labels the sampled pairs)")

        if isinstance(self.loss_type, str):  # as TRL: one name is a list of one
            self.loss_type = [self.loss_type]
        self.loss_type = list(self.loss_type)
        for t in self.loss_type:
            if t not in LOSS_TYPES:
                raise ValueError(f"--loss-type must be among {sorted(LOSS_TYPES)}, got {t!r}")
        if not self.beta > 0:
            raise ValueError(f"--beta must be > 0, got {self.beta}")
        if self.ref_mode not in ("precompute", "online"):
            raise ValueError(f"--ref-mode must be precompute or online, got {self.ref_mode!r}")
        if self.average_logps is None:
            self.average_logps = self.loss_type == ["simpo"]
        if self.nll_coef < 0:
            raise ValueError(f"--nll-coef must be >= 0, got {self.nll_coef}")
        try:
            check_dpo_options(beta=self.beta, loss_type=self.loss_type, loss_weights=self.loss_weights,
                              label_smoothing=self.label_smoothing, gamma=self.gamma,
                              f_divergence_type=self.f_divergence_type,
                              f_alpha_divergence_coef=self.f_alpha_divergence_coef, discopop_tau=self.discopop_tau,
                              use_weighting=self.use_weighting, average_logps=self.average_logps)
        except (ValueError, TypeError) as e:  # the same message, in flag spelling
            msg = str(e)
            for name in ("loss_weights", "label_smoothing", "f_divergence_type", "f_alpha_divergence_coef",
                         "discopop_tau", "use_weighting", "average_logps", "loss_type", "gamma", "beta"):
                msg = msg.replace(name, "--" + name.replace("_", "-"))
            raise ValueError(msg) from None

    @property
    def needs_reference(self) -> bool:
        from fusealign.losses import REFERENCE_FREE

        return not set(self.loss_type) <= REFERENCE_FREE


def _grpo(name: str):
    """A PPOConfig field for one of TRL 1.16's GRPO loss options: GRPOOptions' default and help text."""
    f = GRPOOptions.__dataclass_fields__[name]
    return opt(f.default, f"with --advantage grpo/rloo: {f.metadata['help']}")


# The GRPO-loss fields of PPOConfig (TRL 1.16's names; entropy_coef is shared with PPO and means the same).
GRPO_FIELDS = ("loss_type", "epsilon", "epsilon_high", "delta", "importance_sampling_level", "beta",
               "use_bias_correction_kl", "sapo_temperature_neg", "sapo_temperature_pos", "vespo_k_pos",
               "vespo_lambda_pos", "vespo_k_neg", "vespo_lambda_neg", "top_entropy_quantile",
               "off_policy_mask_threshold", "mask_truncated_completions")


@dataclass
class PPOConfig(TrainConfig, FromSFT):
    """PPO with a learned reward model (or a Python reward function); GRPO and RLOO advantages.

    With --advantage gae (a critic) the loss is PPO's clipped surrogate (--clip-eps, --dual-clip, --kl-mode);
    with --advantage grpo or rloo it is TRL 1.16's GRPOTrainer loss (`fa.grpo_loss`: --loss-type and its options,
    TRL's names and defaults). --kl-coef is the reward-side KL penalty for all three.
    """

    max_steps: int = opt(60, "PPO iterations (rollout + update)")
    batch_size: int = opt(32, "prompts per rollout")
    lr: float = opt(3e-4, "peak learning rate (AdamW) of policy and critic")
    warmup_steps: int = opt(0, "linear warm-up iterations")
    schedule: str = opt("constant", "decay after warm-up: cosine, linear or constant")
    save_every: int = opt(20, "checkpoint every N iterations (and at the end)")
    reward_model: str = opt("", "reward model directory (fusealign rm); builtin: train one from the SFT policy")
    reward_fn: str = opt("", "use a Python reward instead of a model: 'builtin' = the task's ground truth")
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
    loss_type: str = _grpo("loss_type")
    epsilon: float = _grpo("epsilon")
    epsilon_high: Optional[float] = _grpo("epsilon_high")
    delta: Optional[float] = _grpo("delta")
    importance_sampling_level: str = _grpo("importance_sampling_level")
    beta: float = _grpo("beta")
    use_bias_correction_kl: bool = _grpo("use_bias_correction_kl")
    sapo_temperature_neg: float = _grpo("sapo_temperature_neg")
    sapo_temperature_pos: float = _grpo("sapo_temperature_pos")
    vespo_k_pos: float = _grpo("vespo_k_pos")
    vespo_lambda_pos: float = _grpo("vespo_lambda_pos")
    vespo_k_neg: float = _grpo("vespo_k_neg")
    vespo_lambda_neg: float = _grpo("vespo_lambda_neg")
    top_entropy_quantile: float = _grpo("top_entropy_quantile")
    off_policy_mask_threshold: Optional[float] = _grpo("off_policy_mask_threshold")
    mask_truncated_completions: bool = opt(False, "with --advantage grpo/rloo: leave completions that did not "
                                                  "end in EOS out of the loss (DAPO; TRL's default off)")

    def grpo_options(self, num_processes: int = 1) -> GRPOOptions:
        """The GRPO loss options of this run: one rollout is TRL's generation batch, split into --num-minibatches
        optimizer steps (steps_per_generation; no accumulation), over `num_processes` ranks; dr_grpo's constant is
        --max-new-tokens (the longest completion, EOS included)."""
        return GRPOOptions(**{k: getattr(self, k) for k in GRPO_FIELDS if k != "mask_truncated_completions"},
                           entropy_coef=self.entropy_coef, max_completion_length=self.max_new_tokens,
                           gradient_accumulation_steps=1, steps_per_generation=self.num_minibatches,
                           num_processes=num_processes)

    def _check_loss_options(self):
        defaults = {f.name: f.default for f in fields(PPOConfig)}
        if self.advantage == "gae":
            changed = [_flag(k) for k in GRPO_FIELDS if getattr(self, k) != defaults[k]]
            if changed:
                raise ValueError(f"{', '.join(changed)}: TRL's GRPO loss options apply to --advantage grpo or rloo; "
                                 f"PPO with a critic (gae) uses --clip-eps, --clip-eps-high, --dual-clip, --kl-mode")
            return
        changed = [_flag(k) for k in ("clip_eps", "clip_eps_high", "dual_clip") if getattr(self, k) != defaults[k]]
        if changed:
            raise ValueError(f"{', '.join(changed)}: with --advantage {self.advantage} the loss is TRL's GRPO loss; "
                             f"its clipping is --epsilon, --epsilon-high and --delta")
        if self.kl_mode == "loss":
            raise ValueError(f"--kl-mode loss is PPO's k3 term; with --advantage {self.advantage} the loss's KL is "
                             f"TRL's --beta (--kl-coef stays the reward-side penalty)")
        try:
            self.grpo_options()
        except ValueError as e:  # the same message, in flag spelling
            msg = str(e)
            for name in GRPO_FIELDS:
                msg = re.sub(rf"(?<![\w-]){name}\b", _flag(name), msg)
            raise ValueError(msg) from None

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
        if (self.batch_size * self.num_generations) % self.num_minibatches:
            raise ValueError("--batch-size × --num-generations must be divisible by --num-minibatches")
        if not 0 <= self.lam <= 1 or not 0 <= self.gamma <= 1 or self.kl_coef < 0:
            raise ValueError("--lam and --gamma must lie in [0, 1] and --kl-coef must be >= 0")
        if self.max_new_tokens <= 0 or self.max_new_tokens >= self.max_length:
            raise ValueError(f"--max-new-tokens must lie in [1, --max-length={self.max_length}), "
                             f"got {self.max_new_tokens}")
        self._check_loss_options()


@dataclass
class CompareConfig(RunConfig):
    """Reward-based PPO and GRPO versus reward-free DPO (offline and on-policy pairs) on the built-in task, over
    several seeds (table with 95 % intervals, compare.json, frontier plot, report.md)."""

    output_dir: str = opt("runs/compare", "where every stage and the report go")
    seed: int = opt(0, "unused by compare: --seeds lists the seeds")
    threads: int = opt(1, "torch intra-op CPU threads per worker, fixed so that the numbers do not depend on the "
                          "machine's core count (0: torch's default)")
    jobs: int = opt(0, "worker processes, one stage at a time each (0: one per available CPU core); the numbers "
                       "do not depend on it")
    preset: str = opt("default", "smoke (seconds), default (a few minutes on a 2-core CPU) or gpu")
    seeds: str = opt("", "comma-separated seeds; each re-runs the whole pipeline (default: the preset's)")
    betas: str = opt("", "comma-separated DPO β sweep (default: the preset's)")
    kl_coefs: str = opt("", "comma-separated PPO KL-coefficient sweep (default: the preset's)")
    dpo_data: str = opt("offline,onpolicy,iterative", "comma-separated DPO rows: offline (the setting's labelled "
                        "pairs), onpolicy (pairs sampled from the SFT policy, labelled by the setting's reward "
                        "model), iterative (re-sampled from the current DPO policy every K steps)")
    grpo: bool = opt(True, "also run GRPO (group-normalised advantages, no critic) beside PPO")
    ood: bool = opt(True, "also run the out-of-distribution preference setting")

    def __post_init__(self):
        super().__post_init__()
        from .compare import DPO_DATA, PRESETS

        if self.preset not in PRESETS:
            raise ValueError(f"--preset must be one of {sorted(PRESETS)}, got {self.preset!r}")
        if self.jobs < 0:
            raise ValueError(f"--jobs must be >= 0, got {self.jobs}")
        if self.seed != 0:
            raise ValueError("fusealign compare takes --seeds (a comma-separated list), not --seed")
        try:
            seeds = [int(x) for x in self.seeds.split(",")] if self.seeds else []
        except ValueError:
            raise ValueError(f"--seeds must be comma-separated integers, got {self.seeds!r}") from None
        if len(set(seeds)) != len(seeds) or any(s < 0 for s in seeds):
            raise ValueError(f"--seeds must be distinct non-negative integers, got {self.seeds!r}")
        kinds = [x for x in self.dpo_data.split(",") if x]
        if not kinds or any(k not in DPO_DATA for k in kinds):
            raise ValueError(f"--dpo-data must be a comma-separated subset of {', '.join(DPO_DATA)}, "
                             f"got {self.dpo_data!r}")


CONFIGS = {"sft": SFTConfig, "rm": RMConfig, "dpo": DPOConfig, "ppo": PPOConfig, "compare": CompareConfig}


def field_help(cls) -> dict:
    return {f.name: f.metadata.get("help", "") for f in fields(cls)}
