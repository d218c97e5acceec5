"""`fusealign compare`'s configuration: a dataclass like the trainers' (engine/config.py), checked against the
study's presets."""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..config import RunConfig, opt
from ..rollout import RolloutConfig
from .presets import DPO_DATA, PRESETS

MAX_SEEDS = 1000
_SEED_ITEM = re.compile(r"(\d+)(?:-(\d+))?", re.ASCII)  # ASCII: int() would take other scripts' digits


def parse_seeds(text: str) -> tuple:
    """`--seeds`: comma-separated non-negative integers and inclusive ranges -> the seeds in the order written.

    "0-9" -> (0, 1, …, 9); "0,2,5-7" -> (0, 2, 5, 6, 7); "" -> () (the preset's seeds). Spaces around items are
    ignored. Refused, with the item named: a negative seed ("-1"), a reversed range ("9-0"), a seed listed
    twice, directly or through overlapping ranges ("0-3,2"), more than MAX_SEEDS seeds, and anything else
    ("a", "1-2-3", "1,,2", "1.5").
    """
    seeds, where = [], {}
    for item in (text.split(",") if text.strip() else []):
        item = item.strip()
        m = _SEED_ITEM.fullmatch(item)
        if m is None:
            if re.fullmatch(r"-\d+(-\d+)?", item, re.ASCII):
                raise ValueError(f"--seeds: {item!r} is negative; seeds are non-negative integers "
                                 f"(a range is low-high, e.g. 0-9)")
            raise ValueError(f"--seeds: {item!r} is not a seed or a range; write comma-separated non-negative "
                             f"integers and low-high ranges, e.g. 0-9 or 0,2,5-7 (got {text!r})")
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.group(2) is not None else lo
        if hi < lo:
            raise ValueError(f"--seeds: range {item!r} is reversed; write it low-high: {hi}-{lo}")
        if hi - lo >= MAX_SEEDS:  # each seed re-runs the whole pipeline (minutes on a CPU): a typo, not a study
            raise ValueError(f"--seeds: range {item!r} holds {hi - lo + 1} seeds; at most {MAX_SEEDS} in a run")
        for s in range(lo, hi + 1):
            if s in where:
                raise ValueError(f"--seeds: seed {s} is listed twice ({where[s]!r} and {item!r}); "
                                 f"each seed runs once")
            where[s] = item
            seeds.append(s)
    if len(seeds) > MAX_SEEDS:
        raise ValueError(f"--seeds lists {len(seeds)} seeds; at most {MAX_SEEDS} in a run")
    return tuple(seeds)


@dataclass
class CompareConfig(RolloutConfig, RunConfig):
    """Reward-based PPO and GRPO versus reward-free DPO (offline and on-policy pairs) on the built-in task, over
    several seeds (table with 95 % intervals, compare.json, frontier plot, report.md)."""

    output_dir: str = opt("runs/compare", "where every stage and the report go")
    seed: int = opt(0, "unused by compare: --seeds lists the seeds")
    threads: int = opt(1, "torch intra-op CPU threads per worker, fixed so that the numbers do not depend on the "
                          "machine's core count (0: torch's default)")
    jobs: int = opt(0, "worker processes, one stage at a time each (0: one per available CPU core); the numbers "
                       "do not depend on it")
    preset: str = opt("default", "smoke (seconds), default (a few minutes on a 2-core CPU) or gpu")
    seeds: str = opt("", "seeds, each re-running the whole pipeline: a comma-separated list of non-negative "
                         "integers and inclusive ranges, e.g. 0-9 (ten seeds) or 0,2,5-7 (0 2 5 6 7); each seed "
                         "once, ranges low-high (default: the preset's)")
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
            raise ValueError("fusealign compare takes --seeds (a list or range, e.g. 0-9), not --seed")
        parse_seeds(self.seeds)  # a bad list fails here, before any stage runs
        kinds = [x for x in self.dpo_data.split(",") if x]
        if not kinds or any(k not in DPO_DATA for k in kinds):
            raise ValueError(f"--dpo-data must be a comma-separated subset of {', '.join(DPO_DATA)}, "
                             f"got {self.dpo_data!r}")
