"""`fusealign plot RUN_DIR`: loss, rewards/margins, KL and learning rate against step, from `metrics.jsonl`, as one
PNG (`RUN_DIR/metrics.png`; every run also writes it when it ends).

A panel per quantity the run logged: the loss — `loss` (SFT, RM, DPO), `loss/policy_avg` (PPO); the reward —
`rewards/margins` (DPO, RM), `objective/scores` (PPO: the reward model's), `reward` (GRPO / RLOO); the KL —
`objective/kl` (PPO's per-sequence KL to the reference), `kl` (GRPO / RLOO, TRL's per-token mean); `lr`. A quantity
the trainer does not log (SFT has no reward, DPO no KL) has no panel. matplotlib only, non-interactive (Agg), imported here alone.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from .errors import UserError

# (title, candidate metric names: the first one present is drawn)
PANELS = (("loss", ("loss", "loss/policy_avg")),
          ("reward", ("rewards/margins", "objective/scores", "reward")),
          ("KL", ("objective/kl", "kl")), ("learning rate", ("lr",)))


def read_metrics(run_dir: Path) -> list:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise UserError(f"{run_dir}: no metrics.jsonl there (expected a fusealign run directory, e.g. runs/dpo)")
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut by a crash
            continue
    if not rows:
        raise UserError(f"{path}: no steps logged yet")
    return rows


def plot_run(run_dir, out: Optional[Path] = None) -> Path:
    """Draw the run's curves into `out` (default RUN_DIR/metrics.png); returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    run_dir = Path(run_dir)
    rows = read_metrics(run_dir)
    panels = []
    for title, names in PANELS:
        name = next((n for n in names if any(isinstance(r.get(n), (int, float)) for r in rows)), None)
        if name is not None:
            pts = [(r["step"], r[name]) for r in rows if isinstance(r.get(name), (int, float)) and "step" in r]
            panels.append((title, name, pts))
    if not panels:
        raise UserError(f"{run_dir / 'metrics.jsonl'}: none of loss, rewards/margins, KL, lr logged")
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.0), squeeze=False)
    for ax, (title, name, pts) in zip(axes[0], panels):
        xs, ys = zip(*pts)
        ax.plot(xs, ys, lw=1.2, marker="." if len(xs) <= 50 else None)
        ax.set_title(title if title == name else f"{title} ({name})", fontsize=10)
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if name == "lr":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    fig.suptitle(str(run_dir), fontsize=9)
    # Fixed margins for the fixed 3.6 × 3.0 in panels, not tight_layout(): it measured every tick label twice and
    # took 0.1 s of a 0.24 s plot, which every run pays at its end.
    fig.subplots_adjust(left=0.85 / fig.get_figwidth(), right=1 - 0.15 / fig.get_figwidth(), bottom=0.16, top=0.8,
                        wspace=0.32)
    out = Path(out) if out is not None else run_dir / "metrics.png"
    tmp = out.with_name(f".{out.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(out)
    return out
