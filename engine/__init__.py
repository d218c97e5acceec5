"""Trainers, rollout, data, checkpoints and CLI plumbing on top of fusealign's kernels and losses.

Installed as `fusealign.engine`. Depends on `fusealign.kernels`, `fusealign.losses` and `fusealign.head` (the
model's LM head as fused-op arguments), never the other way round; the CLI (`fusealign.cli`) sits on top.
`study/` holds the PPO-or-DPO study (`fusealign compare`) and the built-in task the trainers default to.
"""
