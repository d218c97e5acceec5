"""Alignment losses on the fused core: each is `fusealign.kernels`' per-token op plus a small epilogue.

Every fused loss has a tensor-level twin that reads the math on per-token / per-sequence log-probs:
    linear_dpo_loss  = linear_logps + per-sequence sums + dpo_loss          (preference.py)
    linear_ppo_loss  = linear_logps + ppo_policy_loss                       (policy.py)
    linear_grpo_loss = linear_logps (+ entropy) + grpo_loss                 (grpo.py: TRL 1.16's GRPO family)
Options travel as one typed bundle per family (`DPOOptions`, `PPOOptions`, `GRPOOptions`; options.py), keywords as
sugar. Only public kernel entry points are imported here (`fusealign.kernels`, `fusealign.kernels.checks`).
"""

from .grpo import LOSS_TYPES as GRPO_LOSS_TYPES
from .grpo import GRPOOptions, grpo_loss, linear_grpo_loss
from .options import resolve_options
from .policy import KL_ESTIMATORS, LOSS_AGGS, PPOOptions, kl_estimate, linear_ppo_loss, ppo_policy_loss, value_loss
from .preference import (BATCH_LOSSES, F_DIVERGENCES, LOSS_TYPES, PAIR_LOSSES, REFERENCE_FREE, DPOOptions,
                         check_dpo_options, dpo_loss, linear_dpo_loss)
from .reward import bradley_terry_loss, sequence_rewards

__all__ = ["dpo_loss", "linear_dpo_loss", "DPOOptions", "bradley_terry_loss", "sequence_rewards", "LOSS_TYPES",
           "PAIR_LOSSES", "BATCH_LOSSES", "F_DIVERGENCES", "REFERENCE_FREE", "check_dpo_options", "kl_estimate",
           "ppo_policy_loss", "linear_ppo_loss", "PPOOptions", "value_loss", "KL_ESTIMATORS", "LOSS_AGGS",
           "grpo_loss", "linear_grpo_loss", "GRPOOptions", "GRPO_LOSS_TYPES", "resolve_options"]
