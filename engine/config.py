"""Run configurations: dataclasses with a help string per field and validation in __post_init__.

The CLI builds its flags from these fields (`--max-steps`, `--output-dir`, …), so `--help` shows the
same text as this file.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Optional


def opt(default, help: str, **kw):
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainConfig:
    """Common to every trainer."""

    model: str = opt("builtin", "local model directory (config + safetensors) or a preset: builtin, llama-1b")
    data: str = opt("builtin", "JSONL path or built-in data: builtin, builtin:sft, builtin:pairs, builtin:pairs-ood")
    output_dir: str = opt("", "run directory (checkpoints, metrics.jsonl); default runs/<trainer>")
    max_steps: int = opt(200, "optimizer steps")
    batch_size: int = opt(16, "examples (SFT) or preference pairs (RM/DPO) per micro-batch")
    grad_accum: int = opt(1, "micro-batches per optimizer step")
    lr: float = opt(1e-3, "peak learning rate (AdamW)")
    weight_decay: float = opt(0.0, "AdamW weight decay")
    warmup_steps: int = opt(10, "linear warm-up steps")
    schedule: str = opt("cosine", "decay after warm-up: cosine, linear or constant")
    max_grad_norm: float = opt(1.0, "gradient clipping threshold (0 disables)")
    max_length: int = opt(48, "max tokens of prompt + completion (completions are cut on the right)")
    seed: int = opt(0, "seed for initialisation, data order and sampling")
    device: str = opt("auto", "cpu, cuda, or auto (cuda when available)")
    bf16: bool = opt(True, "bf16 autocast on CUDA (ignored on CPU)")
    gradient_checkpointing: bool = opt(False, "recompute backbone activations in backward")
    pack: bool = opt(True, "padding-free packing (position_ids); --no-pack uses padded batches")
    resume: bool = opt(False, "continue from the latest checkpoint in --output-dir")
    save_every: int = opt(100, "checkpoint every N steps (and at the end)")
    save_total_limit: int = opt(2, "checkpoints kept")
    eval_every: int = opt(0, "held-out evaluation every N steps (0: only at the end)")
    skip_bad_lines: bool = opt(False, "skip and count malformed data lines instead of failing")
    temperature: float = opt(1.0, "softmax temperature of the policy's log-probs")
    backend: str = opt("auto", "fused-kernel backend: auto, triton or torch")
    attn_implementation: Optional[str] = opt(None, "attention implementation (sdpa, eager, flash_attention_2)")

    def __post_init__(self):
        positive = ("max_steps", "batch_size", "grad_accum", "max_length", "save_every", "save_total_limit")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be > 0, got {getattr(self, name)}")
        for name in ("lr", "temperature"):
            if not getattr(self, name) > 0:
                raise ValueError(f"--{name} must be > 0, got {getattr(self, name)}")
        if self.warmup_steps < 0 or self.max_grad_norm < 0 or self.weight_decay < 0 or self.eval_every < 0:
            raise ValueError("--warmup-steps, --max-grad-norm, --weight-decay and --eval-every must be >= 0")
        if self.schedule not in ("cosine", "linear", "constant"):
            raise ValueError(f"--schedule must be cosine, linear or constant, got {self.schedule!r}")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"--device must be auto, cpu or cuda[:i], got {self.device!r}")
        if self.backend not in ("auto", "triton", "torch"):
            raise ValueError(f"--backend must be auto, triton or torch, got {self.backend!r}")


@dataclass
class SFTConfig(TrainConfig):
    """Supervised fine-tuning: token-mean NLL of completion tokens."""


@dataclass
class RMConfig(TrainConfig):
    """Reward model: Bradley-Terry on a scalar value head."""

    margin: float = opt(0.0, "Bradley-Terry margin subtracted from r_chosen − r_rejected")
    center_coef: float = opt(0.0, "reward-centring coefficient: adds c·mean((r_c + r_r)²)")
    sft_model: str = opt("", "with --model builtin: the SFT run to start from (default: train one)")

    def __post_init__(self):
        super().__post_init__()
        if self.center_coef < 0:
            raise ValueError(f"--center-coef must be >= 0, got {self.center_coef}")


@dataclass
class DPOConfig(TrainConfig):
    """Direct preference optimisation (and IPO, hinge, robust, SimPO).

    Defaults suit the built-in task (sequence log-ratios of ~10 tokens); TRL's usual β is 0.1.
    """

    lr: float = opt(1e-3, "peak learning rate (AdamW)")
    beta: float = opt(0.5, "β: strength of the implicit KL to the reference")
    loss_type: str = opt("sigmoid", "sigmoid, robust, hinge, ipo or simpo")
    label_smoothing: float = opt(0.0, "ε for conservative/robust DPO, in [0, 0.5)")
    gamma: float = opt(0.0, "SimPO target margin γ")
    average_logps: Optional[bool] = opt(None, "length-normalise log-probs (default: on for ipo and simpo)")
    nll_coef: float = opt(0.0, "RPO: weight of the chosen-completion NLL")
    ref_mode: str = opt("precompute", "precompute (one pass, cached on disk) or online (frozen reference model)")
    sft_model: str = opt("", "with --model builtin: the SFT run to start from (default: train one)")
    eval_samples: int = opt(128, "held-out prompts sampled at the end to score the ground-truth reward")

    def __post_init__(self):
        super().__post_init__()
        from fusealign.kernels.preference import PAIR_LOSSES

        if self.loss_type not in PAIR_LOSSES:
            raise ValueError(f"--loss-type must be one of {sorted(PAIR_LOSSES)}, got {self.loss_type!r}")
        if not self.beta > 0:
            raise ValueError(f"--beta must be > 0, got {self.beta}")
        if not 0 <= self.label_smoothing < 0.5:
            raise ValueError(f"--label-smoothing must lie in [0, 0.5), got {self.label_smoothing}")
        if self.ref_mode not in ("precompute", "online"):
            raise ValueError(f"--ref-mode must be precompute or online, got {self.ref_mode!r}")
        if self.average_logps is None:
            self.average_logps = self.loss_type in ("ipo", "simpo")


CONFIGS = {"sft": SFTConfig, "rm": RMConfig, "dpo": DPOConfig}


def field_help(cls) -> dict:
    return {f.name: f.metadata.get("help", "") for f in fields(cls)}
