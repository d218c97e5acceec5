"""fusealign: alignment losses computed straight from hidden states and the LM-head weight.

    import fusealign as fa
    logps = fa.linear_logps(hidden, weight, targets)                        # (…,) float32
    logps, entropy = fa.linear_logps(hidden, weight, targets, return_entropy=True)
    kl = fa.linear_kl(hidden, weight, ref_hidden, ref_weight)               # exact, whole vocabulary
    loss, metrics = fa.linear_dpo_loss(hidden, weight, targets, ref_chosen_logps=rc, ref_rejected_logps=rr)
    loss, metrics = fa.linear_dpo_loss(hidden, weight, targets, ..., options=fa.DPOOptions(beta=0.1, loss_type="ipo"))
    loss, metrics = fa.linear_ppo_loss(hidden, weight, targets, old_logps, advantages)
    loss, metrics = fa.ppo_policy_loss(logps, entropy, old_logps, advantages, mask)  # the tensor-level twin
    loss, metrics = fa.grpo_loss(logps, old_logps, advantages, mask, loss_type="dapo")  # TRL 1.16's GRPO family
    loss, metrics = fa.linear_grpo_loss(hidden, weight, targets, old_logps, advantages, options=fa.GRPOOptions())
    fa.patch_model(hf_model); out = hf_model(input_ids, labels=labels, fused_head=True)  # out.logps, out.loss
"""

from fusealign import head, kernels, losses
from fusealign.kernels import linear_kl, linear_logps, reference
from fusealign.losses import (DPOOptions, GRPOOptions, PPOOptions, bradley_terry_loss, dpo_loss, grpo_loss,
                              kl_estimate, linear_dpo_loss, linear_grpo_loss, linear_ppo_loss, ppo_policy_loss,
                              sequence_rewards, value_loss)
from fusealign.integrations.hf import patch_model
from fusealign.modules import BradleyTerryLoss, LinearDPOLoss, LinearGRPOLoss, LinearKL, LinearLogps, LinearPPOLoss

__version__ = "0.1.0"

__all__ = [
    "linear_logps", "linear_kl", "kl_estimate", "dpo_loss", "linear_dpo_loss", "bradley_terry_loss",
    "sequence_rewards", "linear_ppo_loss", "ppo_policy_loss", "value_loss", "grpo_loss", "linear_grpo_loss",
    "DPOOptions", "PPOOptions", "GRPOOptions",
    "patch_model", "LinearLogps", "LinearKL", "LinearDPOLoss", "LinearPPOLoss", "LinearGRPOLoss",
    "BradleyTerryLoss",
    "kernels", "losses", "reference", "__version__",
]
