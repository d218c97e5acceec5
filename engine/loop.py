"""The one run loop every trainer uses: resume-or-fresh, metrics, progress, save cadence, non-finite stop.

    state = resume_or_fresh(run_dir, cfg.resume)     # trainer state of the latest checkpoint, or None
    last = run_loop(cfg, run_dir, start, step_fn, save_fn, desc=..., postfix=...)

`step_fn(step)` runs optimizer step `step + 1` and returns its metrics; `check_finite` is what a step
calls on its loss (and gradient norm) to stop cleanly, naming the last good checkpoint. The loop adds
`step`, `peak_mem_bytes` (CUDA) and writes one JSON line per step to `metrics.jsonl`, then checkpoints
every `cfg.save_every` steps and at the end through `save_fn(step)`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable, Optional

import torch
from tqdm.auto import tqdm

from .checkpoint import check_fresh_start, latest_checkpoint, load_trainer_state, truncate_metrics


SHOW_PROGRESS = True  # False in `compare`'s worker processes: the parent prints one line per finished stage


class NonFiniteLoss(FloatingPointError):
    pass


def check_finite(value, what: str, step: int, run_dir: Path) -> None:
    """Raise NonFiniteLoss if `value` (a float or 0-d tensor) is NaN/inf at optimizer step `step` (1-based)."""
    v = float(value.detach()) if isinstance(value, torch.Tensor) else float(value)
    if not math.isfinite(v):
        good = latest_checkpoint(run_dir)
        raise NonFiniteLoss(f"non-finite {what} ({v}) at step {step}: stopping. The last good checkpoint is "
                            f"{good if good else 'none (no checkpoint was written yet)'}; lower --lr or check the data")


def resume_or_fresh(run_dir: Path, resume: bool) -> Optional[dict]:
    """The trainer state to continue from (metrics after it dropped), or None for a fresh run (which must
    not mix with an earlier run's checkpoints; its metrics file starts empty)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    metrics_path = run_dir / "metrics.jsonl"
    ckpt = latest_checkpoint(run_dir) if resume else None
    if ckpt is not None:
        state = load_trainer_state(ckpt)
        truncate_metrics(metrics_path, state["step"])
        return state
    check_fresh_start(run_dir)
    metrics_path.unlink(missing_ok=True)
    return None


def run_loop(cfg, run_dir: Path, start: int, step_fn: Callable[[int], dict], save_fn: Callable[[int], Path], *,
             device: torch.device, desc: str, postfix: tuple = ("loss",)) -> dict:
    """Steps `start` … cfg.max_steps − 1; returns the last step's metrics (with "step")."""
    last = {}
    bar = tqdm(total=cfg.max_steps, initial=start, desc=desc, dynamic_ncols=True, mininterval=0.5,
               disable=not SHOW_PROGRESS)
    with open(run_dir / "metrics.jsonl", "a") as log:
        for step in range(start, cfg.max_steps):
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            out = step_fn(step)
            peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
            last = {"step": step + 1, **out, "peak_mem_bytes": peak}
            log.write(json.dumps(last) + "\n")
            log.flush()
            bar.update(1)
            bar.set_postfix({k: f"{last[k]:.4g}" for k in postfix if isinstance(last.get(k), float)})
            if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.max_steps:
                save_fn(step + 1)
    bar.close()
    return last
