"""Atomic checkpoints: a crash mid-save never damages the last good one.

Layout of a run directory:
  checkpoint-000100/   model (safetensors, `from_pretrained`-loadable), tokenizer, trainer_state.pt
  latest               name of the newest complete checkpoint (replaced atomically)
  metrics.jsonl        one JSON object per logged step
A checkpoint is written to a hidden temporary directory, flushed, then renamed into place; only then
does `latest` move (write-temp-then-`os.replace`). Older checkpoints beyond the limit are pruned last.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Optional

import numpy as np
import torch


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def rng_state() -> dict:
    s = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        s["cuda"] = torch.cuda.get_rng_state_all()
    return s


def set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def save_checkpoint(run_dir: Path, step: int, model, tokenizer, trainer_state: dict, keep: int = 2,
                    extra=None) -> Path:
    """`extra(tmp_dir)` writes further parts (a PPO critic) inside the checkpoint before it becomes visible."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    final = run_dir / f"checkpoint-{step:06d}"
    tmp = run_dir / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    model.save_pretrained(tmp, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    if extra is not None:
        extra(tmp)
    torch.save(trainer_state, tmp / "trainer_state.pt")
    for f in tmp.rglob("*"):  # flush every file before the rename makes the checkpoint visible
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    if final.exists():  # re-saving a step after a resume: move the old one aside first
        old = run_dir / f".old-{final.name}-{os.getpid()}"
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, final)
    _fsync_dir(run_dir)
    write_text_atomic(run_dir / "latest", final.name)
    done = sorted(p for p in run_dir.glob("checkpoint-*") if (p / "trainer_state.pt").is_file())
    for p in done[:-keep]:
        if p != final:
            shutil.rmtree(p, ignore_errors=True)
    return final


def latest_checkpoint(run_dir: Path) -> Optional[Path]:
    """The newest complete checkpoint of a run (None if there is none)."""
    run_dir = Path(run_dir)
    marker = run_dir / "latest"
    if marker.is_file():
        p = run_dir / marker.read_text().strip()
        if (p / "trainer_state.pt").is_file():
            return p
    done = sorted(p for p in run_dir.glob("checkpoint-*") if (p / "trainer_state.pt").is_file())
    return done[-1] if done else None


def check_fresh_start(run_dir: Path) -> None:
    """A run without --resume must not mix with an earlier run's checkpoints (and must not delete them)."""
    old = latest_checkpoint(run_dir)
    if old is not None:
        raise FileExistsError(f"{run_dir} already holds checkpoints of an earlier run ({old.name}): pass --resume to "
                              f"continue it, or choose another --output-dir")


def load_trainer_state(ckpt: Path) -> dict:
    return torch.load(Path(ckpt) / "trainer_state.pt", weights_only=False)


def truncate_metrics(path: Path, last_step: int) -> None:
    """Drop metric lines logged after `last_step` (a crash after the last checkpoint), atomically."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= last_step:
                keep.append(line)
        except (json.JSONDecodeError, AttributeError):  # a line cut by the crash
            continue
    write_text_atomic(path, "".join(line + "\n" for line in keep))
