"""verl's fused-kernel path on fusealign: `linear_cross_entropy` with verl 0.9's signature, and `enable()`.

    from fusealign.integrations import verl as fa_verl
    fa_verl.enable()   # in every worker process, before the actor builds its model; then, as usual:
    # actor_rollout_ref.model.use_fused_kernels=True  actor_rollout_ref.model.fused_kernel_options.impl_backend=triton

With `impl_backend=triton`, verl's patched model forward (`verl/models/transformers/dense_common.py` and the
vision-language variants) imports `verl.utils.kernel.linear_cross_entropy.linear_cross_entropy` at call time;
`enable()` rebinds that name to ours. Semantics (verl's `LinearCrossEntropy`):
    hidden (…, H), weight (V, H), labels (…) in [0, V); z = hidden Wᵀ / temperature (no bias, no softcap);
    returns (log_probs, entropy), each (N,) fp32 with N = hidden.numel() / H — flattened, as verl's kernel;
    reduction "none" | "sum" | "mean" reduces log_probs only (sum, or sum / N), entropy stays per token;
    gradients to hidden and weight through both outputs.
`temperature` must be a float (verl asserts it). Labels outside [0, V) are an error here (verl's kernel would
silently score them as −lse). `dist_process_group` is verl's tensor-parallel head: `weight` is this rank's
(V_p, H) slice of a head of world·V_p rows starting at rank·V_p (verl's even split; labels are global ids); it
runs fusealign's vocabulary-parallel op (forward and backward: ∂h summed over the group, ∂W the shard's own).
"""

from __future__ import annotations

from typing import Optional

import torch

from fusealign.kernels import linear_logps

REDUCTIONS = ("none", "sum", "mean")
_saved = {}  # verl's original function while enabled


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         temperature: Optional[float] = 1.0, reduction: Optional[str] = "none",
                         dist_process_group=None) -> tuple:
    """verl's `linear_cross_entropy` on fusealign's fused op. hidden: (…, H), weight: (V, H), labels: (…)
    -> log_probs: (N,) fp32 (or () with reduction "sum" / "mean"), entropy: (N,) fp32."""
    if not isinstance(temperature, float):
        raise TypeError(f"temperature must be a float, got {type(temperature).__name__} (as verl requires)")
    if not isinstance(reduction, str) or reduction.lower() not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    shard = {}
    if dist_process_group is not None:  # verl's even vocabulary split: rank r holds rows [r·V_p, (r + 1)·V_p)
        import torch.distributed as dist

        V_p = weight.shape[0]
        shard = dict(vocab_start=dist.get_rank(dist_process_group) * V_p,
                     vocab_size=dist.get_world_size(dist_process_group) * V_p, group=dist_process_group)
    H = hidden.shape[-1]
    h2 = hidden.reshape(-1, H)  # (N, H)
    y = labels.reshape(-1)  # (N,)
    log_probs, entropy = linear_logps(h2, weight, y, temperature=temperature, return_entropy=True, **shard)
    reduction = reduction.lower()
    if reduction == "sum":
        log_probs = log_probs.sum()
    elif reduction == "mean":
        log_probs = log_probs.sum() / y.numel()
    return log_probs, entropy


def _verl_module():
    try:
        import verl.utils.kernel.linear_cross_entropy as module
    except ImportError as e:
        raise ImportError("fusealign.integrations.verl.enable() needs verl (pip install 'verl>=0.9,<0.10') with "
                          f"its dependencies; importing it failed: {e}") from e
    return module


def enable() -> None:
    """Make verl's `use_fused_kernels=True, impl_backend=triton` path call fusealign. Idempotent."""
    module = _verl_module()
    if "fn" not in _saved:
        _saved["fn"] = module.linear_cross_entropy
    module.linear_cross_entropy = linear_cross_entropy


def disable() -> None:
    if "fn" in _saved:
        _verl_module().linear_cross_entropy = _saved.pop("fn")


def enabled() -> bool:
    return "fn" in _saved
