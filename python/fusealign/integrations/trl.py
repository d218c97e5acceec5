"""TRL's fused LM head on fusealign's kernels: two lines in a training script.

    from fusealign.integrations import trl as fa_trl
    fa_trl.enable()          # before building the trainer; fa_trl.disable() restores TRL's own kernel

TRL 1.16's trainers that score completions (DPO, GRPO, RLOO, KTO, SFT, the async GRPO) patch the model with
`trl.trainer.utils.add_fused_lm_head`, whose forward calls the module-level
`trl.trainer.utils._ChunkedLogProbFunction.apply(hidden, weight, bias, labels, temperature, chunk_size,
final_logit_softcapping, logit_scale, outputs)` at every call. `enable()` rebinds that name to
`ChunkedLogProb` below, so every trainer (and a model patched before `enable()`) runs `fa.linear_logps`
instead: same five per-token outputs (log_probs, entropy, log_sum_sq_probs, mean_logits, is_top1; those not
in `outputs` are None), same semantics —
    z = softcap·tanh(s·r/softcap)/T (scale s, then softcap, then temperature; r = h Wᵀ + b),
    computed in the autocast dtype under autocast, else in the hidden states' dtype (what
    `cast_lm_head_to_fp32` relies on: fp32 states, autocast off), logits reduced in fp32 in both;
    gradients through log_probs and entropy only (TRL marks the other three non-differentiable);
    is_top1 = the label is the first argmax.
The scale is folded into softcap and temperature (fusealign.head.fold_scale); a non-positive
scale, which no released model uses, falls back to TRL's own function. TRL's `chunk_size` (vocabulary width
of its cuBLAS tiles) has no meaning for fused tiles and is ignored; memory follows fusealign's
`chunk_bytes` bound instead. DeepSpeed ZeRO-3 gathering of a sharded head (`maybe_gather_lm_head_ctx`)
happens in TRL's caller for the forward; our backward does not re-gather, so ZeRO-3 is not supported.
"""

from __future__ import annotations

import torch

from fusealign.head import fold_scale
from fusealign.kernels import linear_logps

SUPPORTED = ("1.16", "1.17")  # [min, max): the TRL releases whose fused-head call this replaces, tested with 1.16.0
TRL_OUTPUTS = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
_OURS = dict(zip(TRL_OUTPUTS, ("logps", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")))
_saved = {}  # the original `_ChunkedLogProbFunction` while enabled


class ChunkedLogProb:
    """Drop-in for TRL's `ChunkedLogProbFunction`: `.apply` has its signature and returns its five outputs."""

    @staticmethod
    def apply(hidden, weight, bias, targets, temperature, chunk_size=None, final_logit_softcapping=None,
              logit_scale=1.0, outputs=TRL_OUTPUTS[1:]):
        """hidden: (N, H), weight: (V, H), bias: (V,)|None, targets: (N,) in [0, V) -> five (N,) tensors or None."""
        if not logit_scale > 0:
            return _saved.get("fn", _trl_function()).apply(hidden, weight, bias, targets, temperature, chunk_size,
                                                           final_logit_softcapping, logit_scale, outputs)
        device = hidden.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
        cast = lambda t: t if t is None or t.dtype == dtype else t.to(dtype)  # noqa: E731
        softcap, T = fold_scale(temperature, final_logit_softcapping, float(logit_scale))
        wanted = ("log_probs",) + tuple(n for n in TRL_OUTPUTS[1:] if n in outputs)
        per_token = linear_logps(cast(hidden), cast(weight), targets, bias=cast(bias), temperature=T, softcap=softcap,
                                 outputs=tuple(_OURS[n] for n in wanted))
        got = dict(zip(wanted, per_token))
        return tuple(got.get(n) for n in TRL_OUTPUTS)


def _trl_function():
    from trl.trainer import utils

    return utils._ChunkedLogProbFunction


def check_version() -> str:
    """The installed TRL version, or an error naming the supported range."""
    try:
        import trl
    except ImportError as e:
        raise ImportError(f"fusealign.integrations.trl needs TRL (pip install 'trl>={SUPPORTED[0]},<{SUPPORTED[1]}')"
                          ) from e
    from packaging.version import Version

    v = Version(trl.__version__)
    if not Version(SUPPORTED[0]) <= Version(v.base_version) < Version(SUPPORTED[1]):
        raise RuntimeError(f"fusealign.integrations.trl supports trl>={SUPPORTED[0]},<{SUPPORTED[1]} (the releases "
                           f"whose add_fused_lm_head it replaces); found trl {trl.__version__}")
    from trl.trainer import utils

    if not hasattr(utils, "_ChunkedLogProbFunction"):
        raise RuntimeError(f"trl {trl.__version__} has no trl.trainer.utils._ChunkedLogProbFunction to replace")
    return trl.__version__


def enable() -> None:
    """Route TRL's fused LM head (every trainer using `add_fused_lm_head`) through fusealign. Idempotent."""
    check_version()
    from trl.trainer import utils

    if "fn" not in _saved:
        _saved["fn"] = utils._ChunkedLogProbFunction
    utils._ChunkedLogProbFunction = ChunkedLogProb


def disable() -> None:
    """Give TRL its own fused-head kernel back."""
    if "fn" in _saved:
        from trl.trainer import utils

        utils._ChunkedLogProbFunction = _saved.pop("fn")


def enabled() -> bool:
    return "fn" in _saved
