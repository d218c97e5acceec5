"""Run configurations: dataclasses with a help string per field and validation in __post_init__.

The CLI builds its flags from these fields (`--max-steps`, `--output-dir`, …, and one flag per field of an
embedded loss-options bundle), so `--help` shows the same text as this file (and as the bundles'). Layers, each field declared once, each only where it applies:
    RunConfig         every command: where, seed, device, kernel backend
    TrainConfig       every trainer (SFT, RM, DPO, PPO): model, data, optimiser, schedule, checkpoints
    SupervisedConfig  the trainers that step through a data set (SFT, RM, DPO): accumulation, evaluation
    FromSFT           the stages that start from an SFT policy (RM, DPO, PPO): `--sft-model`
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Optional

from fusealign.losses import DPOOptions, GRPOOptions, PPOOptions

from .rollout import VLLM_IS_FIELDS, RolloutConfig


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


def bundle(factory, help: str, derived: tuple = ()):
    """A config field holding a loss's options bundle (`fa.DPOOptions`, `fa.PPOOptions`, `fa.GRPOOptions`): the CLI
    gives each of the bundle's fields its own flag (`--beta`, `--loss-type`, …: the bundle's help texts), except
    those the config defines itself and the `derived` ones the run sets from its own layout; a name two bundles of
    one config share is one flag that sets both. The run passes the bundle (unchanged, or with the derived fields
    filled) to the loss."""
    return field(default_factory=factory, metadata={"help": help, "bundle": True, "derived": derived})


# GRPOOptions fields a PPO run sets itself: dr_grpo's constant from --max-new-tokens, TRL's batch layout from
# --num-minibatches and the world size (PPOConfig.grpo_options).
GRPO_DERIVED = ("max_completion_length", "gradient_accumulation_steps", "steps_per_generation", "num_processes")


@dataclass
class DPOConfig(RolloutConfig, SupervisedConfig, FromSFT):
    """Direct preference optimisation and its family: every TRL 1.16 DPO loss type, f-divergences, WPO, SimPO.

    Defaults suit the built-in task (sequence log-ratios of ~10 tokens): β 0.5; TRL's usual β is 0.1.
    """

    loss: DPOOptions = bundle(lambda: DPOOptions(beta=0.5), "the DPO loss's options (fa.DPOOptions)")
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
        if not isinstance(self.loss, DPOOptions):
            raise TypeError(f"DPOConfig.loss must be a fusealign.DPOOptions, got {type(self.loss).__name__}")
        if self.onpolicy_prompts <= 0 or self.resample_every < 0:
            raise ValueError("--onpolicy-prompts must be > 0 and --resample-every >= 0")
        if self.max_new_tokens <= 0 or self.max_new_tokens >= self.max_length:
            raise ValueError(f"--max-new-tokens must lie in [1, --max-length={self.max_length}), "
                             f"got {self.max_new_tokens}")
        if self.data == "onpolicy" and not self.reward_model and self.model != "builtin":
            raise ValueError("--data onpolicy needs --reward-model (the model that labels the sampled pairs)")
        if self.ref_mode not in ("precompute", "online"):
            raise ValueError(f"--ref-mode must be precompute or online, got {self.ref_mode!r}")
        if self.rollout != "hf" and self.data != "onpolicy":
            raise ValueError(f"--rollout {self.rollout} samples on-policy pairs: it applies with --data onpolicy")

    @property
    def needs_reference(self) -> bool:
        return self.loss.needs_reference



@dataclass
class PPOConfig(RolloutConfig, TrainConfig, FromSFT):
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
    top_p: float = opt(1.0, "nucleus sampling threshold (< 1 samples from the truncated distribution: off-policy "
                            "by sampling/sampling_logp_difference)")
    top_k: int = opt(0, "top-k sampling: keep the k most likely tokens (0: off; > 0 is off-policy, as --top-p < 1)")
    missing_eos_penalty: float = opt(1.0, "subtracted from a reward model's score of a completion without EOS (0: off)")
    gamma: float = opt(1.0, "discount γ")
    lam: float = opt(0.95, "GAE λ")
    kl_coef: float = opt(0.05, "β of the KL penalty (initial β with --target-kl)")
    kl_mode: str = opt("reward", "reward (per-token k1 in the reward) or loss (the --kl-estimator term in the loss, "
                                 "weight β)")
    target_kl: float = opt(0.0, "adaptive KL control: target per-sequence KL (0: fixed β)")
    kl_horizon: int = opt(10000, "adaptive KL horizon (Ziegler et al. 2019)")
    loss: PPOOptions = bundle(PPOOptions, "the clipped policy loss's options (fa.PPOOptions; its kl_coef is β under "
                                          "--kl-mode loss, else 0)")
    vf_coef: float = opt(0.1, "value-loss weight")
    cliprange_value: float = opt(0.2, "value clip")
    early_stop_kl: float = opt(0.0, "stop an iteration's epochs once the epoch's mean approx-KL exceeds this "
                                    "(0: off)")
    grpo: GRPOOptions = bundle(GRPOOptions, "with --advantage grpo/rloo: TRL 1.16's GRPO loss (fa.GRPOOptions; "
                                            "--entropy-coef is shared with the PPO loss)",
                               derived=GRPO_DERIVED)
    mask_truncated_completions: bool = opt(False, "with --advantage grpo/rloo: leave completions that did not "
                                                  "end in EOS out of the loss (DAPO; TRL's default off)")

    def grpo_options(self, num_processes: int = 1) -> GRPOOptions:
        """The GRPO loss options of this run: one rollout is TRL's generation batch, split into --num-minibatches
        optimizer steps (steps_per_generation; no accumulation), over `num_processes` ranks; dr_grpo's constant is
        --max-new-tokens (the longest completion, EOS included)."""
        return replace(self.grpo, max_completion_length=self.max_new_tokens, gradient_accumulation_steps=1,
                       steps_per_generation=self.num_minibatches, num_processes=num_processes)

    def _check_loss_options(self):
        """PPO's loss options go with --advantage gae, TRL's GRPO options with grpo/rloo: a flag of the other family
        is a mistake, named with the flags to use instead."""
        def changed(bundle, default, skip):
            return [_flag(f.name) for f in fields(bundle)
                    if f.name not in skip and getattr(bundle, f.name) != getattr(default, f.name)]

        shared = {"entropy_coef"} | set(GRPO_DERIVED) | set(VLLM_IS_FIELDS)  # one flag each, set in both bundles
        if self.advantage == "gae":
            wrong = changed(self.grpo, GRPOOptions(), shared)
            if wrong:
                raise ValueError(f"{', '.join(wrong)}: TRL's GRPO loss options apply to --advantage grpo or rloo; "
                                 f"PPO with a critic (gae) uses --clip-eps, --clip-eps-high, --dual-clip, --kl-mode")
            return
        wrong = changed(self.loss, PPOOptions(), shared | {"kl_coef"})
        if wrong:
            raise ValueError(f"{', '.join(wrong)}: with --advantage {self.advantage} the loss is TRL's GRPO loss; "
                             f"its clipping is --epsilon, --epsilon-high and --delta")
        if self.kl_mode == "loss":
            raise ValueError(f"--kl-mode loss is PPO's k3 term; with --advantage {self.advantage} the loss's KL is "
                             f"TRL's --beta (--kl-coef stays the reward-side penalty)")
        self.grpo_options()  # the derived fields validated too

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
        if not isinstance(self.loss, PPOOptions):
            raise TypeError(f"PPOConfig.loss must be a fusealign.PPOOptions, got {type(self.loss).__name__}")
        if not 0 <= self.lam <= 1 or not 0 <= self.gamma <= 1 or self.kl_coef < 0:
            raise ValueError("--lam and --gamma must lie in [0, 1] and --kl-coef must be >= 0")
        if self.max_new_tokens <= 0 or self.max_new_tokens >= self.max_length:
            raise ValueError(f"--max-new-tokens must lie in [1, --max-length={self.max_length}), "
                             f"got {self.max_new_tokens}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"--top-p must lie in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"--top-k must be >= 0 (0: off), got {self.top_k}")
        if not isinstance(self.grpo, GRPOOptions):
            raise TypeError(f"PPOConfig.grpo must be a fusealign.GRPOOptions, got {type(self.grpo).__name__}")
        self._check_loss_options()


# The trainers' configs, by command; `fusealign compare`'s is the study's own (engine/study/config.py).
CONFIGS = {"sft": SFTConfig, "rm": RMConfig, "dpo": DPOConfig, "ppo": PPOConfig}



def field_help(cls) -> dict:
    return {f.name: f.metadata.get("help", "") for f in fields(cls)}
