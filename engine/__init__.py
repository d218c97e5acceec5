"""Trainers, rollout, data, checkpoints and CLI plumbing on top of `fusealign.kernels`.

Installed as `fusealign.engine`. Depends on `fusealign.kernels` only, never the other way round.
"""
