"""`fusealign compare`'s configuration: a dataclass like the trainers' (engine/config.py), checked against the
study's presets."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import RunConfig, opt
from .presets import DPO_DATA, PRESETS


@dataclass
class CompareConfig(RunConfig):
    """Reward-based PPO and GRPO versus reward-free DPO (offline and on-policy pairs) on the built-in task, over
    several seeds (table with 95 % intervals, compare.json, frontier plot, report.md)."""

    output_dir: str = opt("runs/compare", "where every stage and the report go")
    seed: int = opt(0, "unused by compare: --seeds lists the seeds")
    threads: int = opt(1, "torch intra-op CPU threads per worker, fixed so that the numbers do not depend on the "
                          "machine's core count (0: torch's default)")
    jobs: int = opt(0, "worker processes, one stage at a time each (0: one per available CPU core); the numbers "
                       "do not depend on it")
    preset: str = opt("default", "smoke (seconds), default (a few minutes on a 2-core CPU) or gpu")
    seeds: str = opt("", "comma-separated seeds; each re-runs the whole pipeline (default: the preset's)")
    betas: str = opt("", "comma-separated DPO β sweep (default: the preset's)")
    kl_coefs: str = opt("", "comma-separated PPO KL-coefficient sweep (default: the preset's)")
    dpo_data: str = opt("offline,onpolicy,iterative", "comma-separated DPO rows: offline (the setting's labelled "
                        "pairs), onpolicy (pairs sampled from the SFT policy, labelled by the setting's reward "
                        "model), iterative (re-sampled from the current DPO policy every K steps)")
    grpo: bool = opt(True, "also run GRPO (group-normalised advantages, no critic) beside PPO")
    ood: bool = opt(True, "also run the out-of-distribution preference setting")

    def __post_init__(self):
        super().__post_init__()
        if self.preset not in PRESETS:
            raise ValueError(f"--preset must be one of {sorted(PRESETS)}, got {self.preset!r}")
        if self.jobs < 0:
            raise ValueError(f"--jobs must be >= 0, got {self.jobs}")
        if self.seed != 0:
            raise ValueError("fusealign compare takes --seeds (a comma-separated list), not --seed")
        try:
            seeds = [int(x) for x in self.seeds.split(",")] if self.seeds else []
        except ValueError:
            raise ValueError(f"--seeds must be comma-separated integers, got {self.seeds!r}") from None
        if len(set(seeds)) != len(seeds) or any(s < 0 for s in seeds):
            raise ValueError(f"--seeds must be distinct non-negative integers, got {self.seeds!r}")
        kinds = [x for x in self.dpo_data.split(",") if x]
        if not kinds or any(k not in DPO_DATA for k in kinds):
            raise ValueError(f"--dpo-data must be a comma-separated subset of {', '.join(DPO_DATA)}, "
                             f"got {self.dpo_data!r}")
