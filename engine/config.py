"""Run configurations: dataclasses with a help string per field and validation in __post_init__.

The CLI builds its flags from these fields (`--max-steps`, `--output-dir`, …, and one flag per field of an
embedded loss-options bundle), so `--help` shows the same text as this file (and as the bundles'). Layers, each field declared once, each only where it applies:
    RunConfig         every command: where, seed, device, kernel backend
    TrainConfig       every trainer (SFT, RM, DPO, PPO): model, data, optimiser, schedule, checkpoints
    SupervisedConfig  the trainers that step through a data set (SFT, RM, DPO): accumulation, evaluation
    FromSFT           the stages that start from an SFT policy (RM, DPO, PPO): `--sft-model`

Defaults that depend on the model (`MODEL_DEFAULTS`): a field declared None takes, in `__post_init__`, the value of
its command for the run's model kind — `--model builtin` keeps the built-in task's (tuned on its 0.1 M-parameter
model), a model directory gets TRL 1.16's (SFTConfig, RewardConfig, DPOConfig, GRPOConfig/RLOOConfig for PPO).
A value given explicitly always wins; `resolved_hparams` is the block a run prints at start.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from typing import ClassVar, Optional

from fusealign.losses import DPOOptions, GRPOOptions, PPOOptions

REPORT_TO = ("none", "tensorboard", "wandb", "trackio")  # TRL's names (engine/reporting.py)
from .rollout import VLLM_IS_FIELDS, RolloutConfig


def opt(default, help: str, **kw):
    return field(default=default, metadata={"help": help, **kw})


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


# name -> (built-in task, a pretrained model) per command; "loss.beta" is a field of the DPO loss bundle. The
# pretrained column is TRL 1.16's: SFTConfig / RewardConfig / DPOConfig learning rates 2e-5 / 1e-4 / 1e-6 and
# max_length 1024, DPO β 0.1, transformers' linear schedule without warm-up (warmup_steps 0; a value in (0, 1) is
# a ratio of --max-steps, as there); PPO takes GRPOConfig's / RLOOConfig's lr 1e-6 and its max_completion_length
# 512 for --max-new-tokens; on-policy DPO OnlineDPOConfig's max_new_tokens 64. With these and --warmup-steps 0
# the schedule is TRL's default one step for step.
_TRAIN = {"warmup_steps": (10, 0), "schedule": ("cosine", "linear"), "max_length": (48, 1024)}
MODEL_DEFAULTS = {
    "sft": {"lr": (1e-3, 2e-5), **_TRAIN},
    "rm": {"lr": (1e-3, 1e-4), **_TRAIN},
    "dpo": {"lr": (1e-3, 1e-6), "loss.beta": (0.5, 0.1), **_TRAIN, "max_new_tokens": (16, 64)},
    "ppo": {"lr": (3e-4, 1e-6), "warmup_steps": (0, 0), "schedule": ("constant", "linear"), "max_length": (48, 1024),
            "max_new_tokens": (16, 512)},
}


def by_model(kind: str, name: str) -> str:
    """A model-dependent default as help text shows it."""
    builtin, pretrained = MODEL_DEFAULTS[kind][name]
    return f"{builtin:g} with --model builtin, {pretrained:g} with a model directory" if not isinstance(builtin, str) \
        else f"{builtin} with --model builtin, {pretrained} with a model directory"


def model_default(cfg, name: str):
    """The default of field `name` for this config's command and model kind."""
    return MODEL_DEFAULTS[cfg.KIND][name][0 if cfg.model == "builtin" else 1]


def _resolve_model_defaults(cfg) -> None:
    """Fill every None field of MODEL_DEFAULTS[cfg.KIND] (an explicit value wins; a bundle left None is built with
    its entries, e.g. DPOOptions(beta=0.1))."""
    bundles = {}
    for name in MODEL_DEFAULTS.get(cfg.KIND, {}):
        if "." in name:
            bundle, sub = name.split(".")
            if getattr(cfg, bundle) is None:
                bundles.setdefault(bundle, {})[sub] = model_default(cfg, name)
        elif getattr(cfg, name) is None:
            setattr(cfg, name, model_default(cfg, name))
    for bundle, values in bundles.items():
        setattr(cfg, bundle, bundle_class(type(cfg), bundle)(**values))


def bundle_class(cls, name: str):
    return next(f for f in fields(cls) if f.name == name).metadata["cls"]


def by_model_bundle(cls, name: str, model: str):
    """The bundle field `name` of config class `cls` for `model` when no option of it is set (the CLI's base)."""
    probe = {k: v for k, v in MODEL_DEFAULTS.get(cls.KIND, {}).items() if k.startswith(name + ".")}
    values = {k.split(".")[1]: v[0 if model == "builtin" else 1] for k, v in probe.items()}
    return bundle_class(cls, name)(**values)


@dataclass
class RunConfig:
    """Common to every command."""

    output_dir: str = opt("", "run directory (checkpoints, metrics.jsonl; default: runs/<command>)")
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
    KIND: ClassVar[str] = "sft"  # the command whose MODEL_DEFAULTS apply

    max_steps: int = opt(200, "optimizer steps")
    batch_size: int = opt(16, "examples (SFT) or preference pairs (RM/DPO) per micro-batch")
    lr: Optional[float] = opt(None, "peak learning rate (AdamW)", by_model=True)
    weight_decay: float = opt(0.0, "AdamW weight decay")
    warmup_steps: Optional[float] = opt(None, "linear warm-up: steps, or a ratio of --max-steps when in (0, 1) "
                                              "(transformers' rule: ceil(ratio × max_steps))", by_model=True)
    schedule: Optional[str] = opt(None, "decay after warm-up: cosine, linear or constant", by_model=True)
    max_grad_norm: float = opt(1.0, "gradient clipping threshold (0 disables)")
    max_length: Optional[int] = opt(None, "max tokens of prompt + completion (completions are cut on the right; "
                                          "the run says how many before training, and refuses a length that cuts "
                                          "more than half)", by_model=True)
    bf16: Optional[bool] = opt(None, "bf16 autocast (the fused head keeps fp32 logits). --bf16 on CPU runs CPU "
                                     "autocast: faster than fp32 where the CPU has AVX-512 BF16 or AMX, slower where "
                                     "it emulates bf16 (the run says which)", shown="on with CUDA, off on CPU")
    gradient_checkpointing: bool = opt(False, "recompute backbone activations in backward")
    pack: bool = opt(True, "padding-free packing (position_ids); --no-pack uses padded batches")
    resume: bool = opt(False, "continue from the latest checkpoint in --output-dir")
    trust_checkpoint: bool = opt(False, "with --resume: also load a trainer state that needs arbitrary unpickling "
                                        "(older fusealign checkpoints). It can run code: only for checkpoints you "
                                        "trust")
    log_every: int = opt(0, "without a terminal: a progress line every N steps (0: about 20 lines per run)")
    report_to: list = field(default_factory=lambda: ["none"], metadata={
        "help": "where metrics also go, TRL's names: none, tensorboard (<output-dir>/runs), wandb (offline without "
                "network), trackio; several allowed. Each library is imported only when chosen. metrics.jsonl and "
                "metrics.png (fusealign plot) are always written", "nargs": "+"})
    save_every: int = opt(100, "checkpoint every N steps (and at the end)")
    save_total_limit: int = opt(2, "checkpoints kept on disk: each resumable one holds the weights and the AdamW "
                                   "state (two fp32 moments per parameter, in dcp/): about 3× the fp32 weights; with "
                                   "--save-only-model, the weights alone. While the next one is written, one more "
                                   "exists; the run prints the size of its first checkpoint")
    save_only_model: bool = opt(False, "checkpoints hold what from_pretrained needs — weights, config, tokenizer (and "
                                       "a reward model's value head) — without optimizer, scheduler, RNG and data "
                                       "position: about a third of the size, but they cannot be resumed (TRL's "
                                       "save_only_model); start a new run from one with --model")
    temperature: float = opt(1.0, "softmax temperature of the policy's log-probs")
    attn_implementation: Optional[str] = opt(None, "attention implementation (sdpa, eager, flash_attention_2)")
    fsdp: Optional[bool] = opt(None, "FSDP2 sharding (default: on exactly when torchrun starts more than one "
                                     "process); --fsdp also in one process (1-rank FSDP2, e.g. to check bf16 mixed "
                                     "precision on one GPU)")

    def __post_init__(self):
        super().__post_init__()
        _resolve_model_defaults(self)
        for name in ("max_steps", "batch_size", "max_length", "save_every", "save_total_limit"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{_flag(name)} must be > 0, got {getattr(self, name)}")
        for name in ("lr", "temperature"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{_flag(name)} must be > 0, got {getattr(self, name)}")
        for name in ("warmup_steps", "max_grad_norm", "weight_decay", "log_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"{_flag(name)} must be >= 0, got {getattr(self, name)}")
        if self.warmup_steps >= 1 and self.warmup_steps != int(self.warmup_steps):
            raise ValueError(f"--warmup-steps must be a whole number of steps, or a ratio in (0, 1), "
                             f"got {self.warmup_steps}")
        if self.schedule not in ("cosine", "linear", "constant"):
            raise ValueError(f"--schedule must be cosine, linear or constant, got {self.schedule!r}")
        self.report_to = [self.report_to] if isinstance(self.report_to, str) else list(self.report_to)
        bad = [n for n in self.report_to if n not in REPORT_TO]
        if bad or not self.report_to or ("none" in self.report_to and len(self.report_to) > 1):
            raise ValueError(f"--report-to must be none, or one or more of tensorboard, wandb, trackio; got "
                             f"{' '.join(self.report_to)}")
        if getattr(self, "sft_model", "") and self.model != "builtin":
            raise ValueError(f"--sft-model applies to --model builtin only; with --model {self.model} the run "
                             f"starts from that model itself (drop --sft-model, or pass the SFT checkpoint as "
                             f"--model)")

    @property
    def num_warmup_steps(self) -> int:
        """--warmup-steps as steps: a whole number as it is, a ratio in (0, 1) as ceil(ratio × --max-steps)."""
        w = self.warmup_steps
        return int(w) if w >= 1 or w == 0 else math.ceil(self.max_steps * w)


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

    sft_model: str = opt("", "optional, with --model builtin only: an SFT checkpoint to start from; empty: train "
                             "the built-in SFT policy first (into <output-dir>/sft). With --model DIR the run starts "
                             "from DIR")


@dataclass
class SFTConfig(SupervisedConfig):
    """Supervised fine-tuning: token-mean NLL of completion tokens."""

    KIND: ClassVar[str] = "sft"


@dataclass
class RMConfig(SupervisedConfig, FromSFT):
    """Reward model: Bradley-Terry on a scalar value head."""

    KIND: ClassVar[str] = "rm"

    margin: float = opt(0.0, "Bradley-Terry margin subtracted from r_chosen − r_rejected")
    center_coef: float = opt(0.0, "reward-centring coefficient: adds c·mean((r_c + r_r)²)")

    def __post_init__(self):
        super().__post_init__()
        if self.center_coef < 0:
            raise ValueError(f"--center-coef must be >= 0, got {self.center_coef}")


def bundle(cls, help: str, derived: tuple = (), *, by_model: bool = False):
    """A config field holding a loss's options bundle (`fa.DPOOptions`, `fa.PPOOptions`, `fa.GRPOOptions`): the CLI
    gives each of the bundle's fields its own flag (`--beta`, `--loss-type`, …: the bundle's help texts), except
    those the config defines itself and the `derived` ones the run sets from its own layout; a name two bundles of
    one config share is one flag that sets both. The run passes the bundle (unchanged, or with the derived fields
    filled) to the loss. `by_model`: the field defaults to None, the bundle with its command's MODEL_DEFAULTS
    entries for the run's model kind (e.g. DPO's β)."""
    meta = {"help": help, "bundle": True, "derived": derived, "cls": cls}
    return field(default=None, metadata=meta) if by_model else field(default_factory=cls, metadata=meta)


# GRPOOptions fields a PPO run sets itself: dr_grpo's constant from --max-new-tokens, TRL's batch layout from
# --num-minibatches and the world size (PPOConfig.grpo_options).
GRPO_DERIVED = ("max_completion_length", "gradient_accumulation_steps", "steps_per_generation", "num_processes")


@dataclass
class DPOConfig(RolloutConfig, SupervisedConfig, FromSFT):
    """Direct preference optimisation and its family: every TRL 1.16 DPO loss type, f-divergences, WPO, SimPO.

    β: 0.5 with --model builtin (sequence log-ratios of ~10 tokens), TRL's 0.1 with a model directory.
    """

    KIND: ClassVar[str] = "dpo"

    loss: Optional[DPOOptions] = bundle(DPOOptions, "the DPO loss's options (fa.DPOOptions; default: β by model)",
                                        by_model=True)
    ref_mode: str = opt("precompute", "precompute (one pass, cached on disk) or online (frozen reference model)")
    eval_samples: int = opt(128, "held-out prompts sampled at the end to score the ground-truth reward")
    reward_model: str = opt("", "with --data onpolicy: the reward model that labels the sampled pairs (fusealign rm); "
                                "with --model builtin and none given, one is trained from the SFT policy")
    onpolicy_prompts: int = opt(512, "with --data onpolicy: prompts (one pair each) sampled per round")
    resample_every: int = opt(0, "with --data onpolicy: re-sample the pairs from the current policy every K steps "
                                 "(iterative DPO); 0 samples them once, from the initial policy")
    prompts: str = opt("builtin", "with --data onpolicy: where prompts come from (builtin, or JSONL with 'prompt')")
    max_new_tokens: Optional[int] = opt(None, "with --data onpolicy: tokens sampled per completion", by_model=True)
    missing_eos_penalty: float = opt(1.0, "with --data onpolicy: subtracted from the reward model's score of a "
                                          "sampled completion without EOS (as PPO does)")

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.loss, DPOOptions):
            raise TypeError(f"DPOConfig.loss must be a fusealign.DPOOptions, got {type(self.loss).__name__}")
        if self.onpolicy_prompts <= 0 or self.resample_every < 0:
            raise ValueError("--onpolicy-prompts must be > 0 and --resample-every >= 0")
        if self.data == "onpolicy" and not 0 < self.max_new_tokens < self.max_length:
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

    Your own model: --model DIR (a causal LM directory, with its tokenizer), --data prompts.jsonl (one
    {"prompt": str or chat messages} per line; other fields are ignored), and --reward-model RM_DIR (a reward
    model written by `fusealign rm`, e.g. trained on your preference pairs from DIR), or --reward-fn builtin.
    """

    KIND: ClassVar[str] = "ppo"

    max_steps: int = opt(60, "PPO iterations (rollout + update)")
    batch_size: int = opt(32, "prompts per rollout")
    lr: Optional[float] = opt(None, "peak learning rate (AdamW) of policy and critic", by_model=True)
    warmup_steps: Optional[float] = opt(None, "linear warm-up iterations, or a ratio of --max-steps when in (0, 1)",
                                        by_model=True)
    schedule: Optional[str] = opt(None, "decay after warm-up: cosine, linear or constant", by_model=True)
    save_every: int = opt(20, "checkpoint every N iterations (and at the end)")
    data: str = opt("builtin", "the prompts: a JSONL file with one {\"prompt\": str or chat messages} per line "
                               "(other fields ignored), or builtin (the built-in task's)")
    reward_model: str = opt("", "reward model directory written by `fusealign rm` (a causal LM + value_head."
                                "safetensors); empty with --model builtin: train one on the built-in pairs first")
    reward_fn: str = opt("", "use a Python reward instead of a model: 'builtin' = the task's ground truth")
    advantage: str = opt("gae", "gae (critic), grpo (group-normalised) or rloo (leave-one-out)")
    num_generations: int = opt(1, "samples per prompt (≥ 2 for grpo / rloo)")
    critic: str = opt("separate", "separate (backbone + value head, from the RM) or policy_head (shared backbone)")
    num_ppo_epochs: int = opt(2, "optimisation epochs per rollout")
    num_minibatches: int = opt(2, "minibatches per epoch")
    max_new_tokens: Optional[int] = opt(None, "tokens sampled per completion", by_model=True)
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
        if self.model != "builtin" and not self.reward_model and not self.reward_fn:
            raise ValueError(f"--model {self.model} needs --reward-model RM_DIR (a reward model written by `fusealign "
                             f"rm --model {self.model} --data pairs.jsonl`) or --reward-fn builtin")
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


def resolved_hparams(cfg, device_type: str, bf16: bool) -> str:
    """The block a run prints at start: every model-dependent hyper-parameter with its value and where it came
    from ("built-in task" / "TRL 1.16" default, or "set" by a flag), then the batch shape and precision."""
    builtin = cfg.model == "builtin"
    source = "the built-in task's defaults" if builtin else "TRL 1.16's defaults for a pretrained model"
    rows = []
    for name in MODEL_DEFAULTS.get(cfg.KIND, {}):
        if name == "max_new_tokens" and cfg.KIND == "dpo" and cfg.data != "onpolicy":
            continue
        value = getattr(cfg.loss, "beta") if name == "loss.beta" else getattr(cfg, name)
        note = "(default)" if value == model_default(cfg, name) else "(set)"
        if name == "warmup_steps":
            value = f"{value:g}" + ("" if value >= 1 or value == 0 else f" (= {cfg.num_warmup_steps} steps)")
        rows.append((name.split(".")[-1], f"{value:g}" if isinstance(value, float) else str(value), note))
    rows += [("max_steps", str(cfg.max_steps), ""), ("batch_size", str(cfg.batch_size), "")]
    if hasattr(cfg, "grad_accum"):
        rows.append(("grad_accum", str(cfg.grad_accum), ""))
    if cfg.KIND == "dpo":
        rows.append(("loss_type", " ".join(cfg.loss.loss_type), ""))
    if cfg.KIND == "ppo":
        rows += [("advantage", cfg.advantage, ""), ("kl_coef", f"{cfg.kl_coef:g}", "")]
    rows.append(("bf16", "on" if bf16 else "off", f"{device_type}" + (", --bf16" if cfg.bf16 else "")))
    rows[-1] = (*rows[-1][:2], f"({rows[-1][2]})")
    width, vwidth = max(len(r[0]) for r in rows), max(len(r[1]) for r in rows)
    lines = [f"resolved hyper-parameters (--model {cfg.model}: {source} where no flag is given):"]
    lines += [f"  {n:<{width}}  {v:<{vwidth}}  {note}".rstrip() for n, v, note in rows]
    return "\n".join(lines)
