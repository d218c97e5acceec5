"""The one run loop every trainer uses: resume-or-fresh, metrics, progress, save cadence, non-finite stop,
and safe interruption.

    last = run_loop(cfg, state, step_fn, device=..., desc=..., postfix=...)    # state: a state.TrainState

The loop restores `state` (resume-or-fresh: `state.restore()` gives the step to continue from), then
`step_fn(step)` runs optimizer step `step + 1` and returns its metrics; `check_finite` is what a step
calls on its loss (and gradient norm) to stop cleanly, naming the last good checkpoint. The loop adds
`step`, `peak_mem_bytes` and `peak_mem_kind` (see `PeakMemory`), writes one JSON line per step to `metrics.jsonl`,
sends the same metrics to `--report-to` (reporting.py), checkpoints every `cfg.save_every` steps and at the end
through `state.save(step)`, and draws `metrics.png` from `metrics.jsonl` at the end (plot.py).

Interruption: on SIGINT / SIGTERM the current step finishes, a checkpoint is written (atomically, like
every checkpoint) and `Interrupted` is raised — the CLI prints the `--resume` command and exits 130 / 143.
A second signal exits at once: checkpoint writes are atomic, so the last complete one stays loadable.

Progress: a live bar on a terminal; otherwise (a log file, a batch job) one plain line every
`cfg.log_every` steps (default: about 20 per run) and at the end, with the same fields.
"""

from __future__ import annotations

import json
import math
import os
import re
import resource
import signal
import sys
import threading
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed as dist

from .checkpoint import check_fresh_start, check_resumable, clean_partial_writes, latest_checkpoint, \
    load_trainer_state, truncate_metrics
from .distributed import DistInfo, barrier
from .errors import Interrupted, NonFiniteLoss
from .reporting import Reporters

SIGNALS = (signal.SIGINT, signal.SIGTERM)
SHOW_PROGRESS = True  # False in `compare`'s worker processes: the parent prints one line per finished stage
PLOT = True  # metrics.png at the end of a run; False in `compare`'s workers (the study draws its own plots)


def note(text: str) -> None:
    """A line (or block) for the user on stderr, `fusealign <text>`: rank 0 only, and not from `compare`'s worker
    processes (SHOW_PROGRESS)."""
    if SHOW_PROGRESS and int(os.environ.get("RANK", "0")) == 0:
        print(f"fusealign {text}", file=sys.stderr, flush=True)


def check_finite(value, what: str, step: int, run_dir: Path) -> None:
    """Raise NonFiniteLoss if `value` (a float or 0-d tensor) is NaN/inf at optimizer step `step` (1-based)."""
    v = float(value.detach()) if isinstance(value, torch.Tensor) else float(value)
    if not math.isfinite(v):
        good = latest_checkpoint(run_dir)
        raise NonFiniteLoss(f"non-finite {what} ({v}) at step {step}: stopping. The last good checkpoint is "
                            f"{good if good else 'none (no checkpoint was written yet)'}; lower --lr or check the data")


def resume_or_fresh(run_dir: Path, cfg, info: DistInfo = DistInfo()) -> Optional[dict]:
    """The trainer state to continue from (metrics after it dropped) when cfg.resume finds a checkpoint, or None
    for a fresh run (which must not mix with an earlier run's checkpoints; its metrics file starts empty).
    With several ranks every rank reads the state; rank 0 alone edits the run directory."""
    run_dir.mkdir(parents=True, exist_ok=True)
    if info.main:
        clean_partial_writes(run_dir)
    barrier(info)
    metrics_path = run_dir / "metrics.jsonl"
    ckpt = latest_checkpoint(run_dir) if cfg.resume else None
    if ckpt is not None:
        check_resumable(ckpt, trust=getattr(cfg, "trust_checkpoint", False))
        state = load_trainer_state(ckpt, trust=getattr(cfg, "trust_checkpoint", False))
        barrier(info)
        if info.main:
            truncate_metrics(metrics_path, state["step"])
        return state
    check_fresh_start(run_dir)
    barrier(info)
    if info.main:
        metrics_path.unlink(missing_ok=True)
    return None


class _StopOnSignal:
    """First SIGINT/SIGTERM: remember it (the loop stops after the current step). Second: exit at once."""

    def __init__(self):
        self.signum = None
        self._previous = {}

    def _handle(self, signum, frame):
        if self.signum is not None:
            os._exit(128 + signum)  # at once; the last complete checkpoint is intact (atomic writes)
        self.signum = signum
        print(f"\nfusealign: {signal.Signals(signum).name} received: finishing this step, then writing a checkpoint "
              f"(send it again to stop at once)", file=sys.stderr, flush=True)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, h in self._previous.items():
            signal.signal(s, h)
        return False


class _Progress:
    """A tqdm bar on a terminal; plain lines every `every` steps (and at the end) otherwise."""

    def __init__(self, cfg, start: int, desc: str, postfix: tuple):
        self.total, self.desc, self.postfix = cfg.max_steps, desc, postfix
        self.every = cfg.log_every or max(1, cfg.max_steps // 20)
        self.bar = None
        if sys.stderr.isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=cfg.max_steps, initial=start, desc=desc, dynamic_ncols=True, mininterval=0.5)

    def _fields(self, metrics: dict) -> dict:
        return {k: f"{metrics[k]:.4g}" for k in self.postfix if isinstance(metrics.get(k), float)}

    def update(self, metrics: dict) -> None:
        step = metrics["step"]
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(self._fields(metrics))
        elif step % self.every == 0 or step == self.total:
            fields = " ".join(f"{k}={v}" for k, v in self._fields(metrics).items())
            print(f"{self.desc} step {step}/{self.total} {fields}".rstrip(), file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class PeakMemory:
    """The peak memory of each step, and which memory it is (`peak_mem_kind`):

    cuda_allocated  torch.cuda.max_memory_allocated on the run's GPU: tensors only, reset every step
    cpu_rss         the process's peak resident set size (Linux VmHWM: everything the process touched — model,
                    optimizer state, activations, the Python heap), reset every step through
                    /proc/self/clear_refs where the kernel allows it; else the peak since the process started
                    (getrusage), which only grows
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.kind = "cuda_allocated" if device.type == "cuda" else "cpu_rss"

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS (Linux ≥ 4.0)
        except OSError:
            pass

    def peak(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device)
        try:
            with open("/proc/self/status") as f:
                return int(re.search(r"VmHWM:\s+(\d+) kB", f.read()).group(1)) * 1024
        except (OSError, AttributeError):
            scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, kB on Linux
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def _stop_signal(stop: _StopOnSignal, info: DistInfo):
    """The signal to stop on, agreed by every rank (a rank may see it a step later than another)."""
    if not info.active:
        return stop.signum
    t = torch.tensor([stop.signum or 0], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item()) or None


def run_loop(cfg, state, step_fn: Callable[[int], dict], *, device: torch.device, desc: str,
             postfix: tuple = ("loss",), info: DistInfo = DistInfo()) -> dict:
    """Restore `state`, then steps start … cfg.max_steps − 1; returns the last step's metrics (with "step" and
    "world_size"). Metrics, progress and files are rank 0's; saving and stopping are collective."""
    run_dir = Path(cfg.output_dir)
    start = state.restore()
    last = {}
    memory = PeakMemory(device)
    reporters = Reporters(cfg, run_dir, note=note) if info.main else None  # first: its failure leaves nothing open
    progress = _Progress(cfg, start, desc, postfix) if (info.main and SHOW_PROGRESS) else None
    log = open(run_dir / "metrics.jsonl", "a") if info.main else None
    try:
        with _StopOnSignal() as stop:
            for step in range(start, cfg.max_steps):
                memory.reset()
                out = step_fn(step)
                last = {"step": step + 1, **out, "peak_mem_bytes": memory.peak(), "peak_mem_kind": memory.kind,
                        "world_size": info.world_size}
                if log is not None:
                    log.write(json.dumps(last) + "\n")
                    log.flush()
                    reporters.log(last)
                if progress is not None:
                    progress.update(last)
                saved = None
                if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.max_steps:
                    saved = state.save(step + 1)
                signum = _stop_signal(stop, info)
                if signum is not None:
                    raise Interrupted(signum, step + 1, saved or state.save(step + 1))
    finally:
        if progress is not None:
            progress.close()
        if log is not None:
            log.close()
            reporters.close()
            _plot(run_dir)
    return last


def _plot(run_dir: Path) -> None:
    """metrics.png beside metrics.jsonl (also after an interruption); a failure to draw never fails the run."""
    if not PLOT or not (run_dir / "metrics.jsonl").stat().st_size:
        return
    try:
        from .plot import plot_run

        plot_run(run_dir)
    except Exception as e:  # noqa: BLE001 — the curves are a convenience; the run's results are already written
        note(f"plot: could not draw {run_dir / 'metrics.png'} ({type(e).__name__}: {e})")
