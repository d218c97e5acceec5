"""Atomic checkpoints: a crash (even SIGKILL) mid-save never damages the last good one; loading one never
executes code from it.

Layout of a run directory:
  checkpoint-000100/   model (safetensors, `from_pretrained`-loadable), tokenizer, trainer_state.pt
  latest               name of the newest complete checkpoint (replaced atomically)
  metrics.jsonl        one JSON object per logged step
A checkpoint is written to a hidden temporary directory, flushed, then renamed into place; only then
does `latest` move (write-temp-then-`os.replace`). Older checkpoints beyond the limit are pruned last,
each renamed to a hidden `.trash-*` name first so that a half-deleted one is never taken for complete.

With --save-only-model a checkpoint holds the model (weights, config, tokenizer) and a trainer state of three
entries (step, config, `model_only`), no dcp/ or RNG states: `from_pretrained`-loadable and counted by
`latest_checkpoint` and the pruning, refused by `check_resumable` when a run would resume from it.

Trainer state (optimizer, scheduler, step, data position, RNG states, config) is `torch.save`d from
plain containers, tensors and numbers only — the NumPy RNG state is stored as a tensor and a tuple, not
as NumPy objects — so it loads with `torch.load(weights_only=True)` and an empty allow-list of extra
globals: PyTorch's restricted unpickler refuses anything else (PyTorch's default since 2.6, and what
Hugging Face's Trainer does). A trainer state that needs more (written by fusealign before this format,
or crafted to run code) is refused with a message naming the fix; `--trust-checkpoint` loads it anyway.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import shutil
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from .errors import CheckpointError

TRAINER_STATE = "trainer_state.pt"
STATE_FORMAT = 2  # 1: pickled NumPy RNG state (needed weights_only=False); 2: tensors and plain containers only


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
    """Python, NumPy, torch CPU (and CUDA) generator states, as tensors, numbers, strings and tuples only."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    s = {"torch": torch.get_rng_state(), "python": random.getstate(),
         "numpy": (name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached))}
    if torch.cuda.is_available():
        s["cuda"] = torch.cuda.get_rng_state_all()
    return s


def set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    random.setstate(s["python"])
    name, keys, pos, has_gauss, cached = s["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.int64).astype(np.uint32), pos, has_gauss, cached))
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
    torch.save({**trainer_state, "format": STATE_FORMAT}, tmp / TRAINER_STATE)
    return _publish(run_dir, tmp, final, keep)


def _publish(run_dir: Path, tmp: Path, final: Path, keep: int) -> Path:
    """Flush `tmp`, rename it to `final`, move `latest`, prune beyond `keep`: the atomic end of every save."""
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
    done = sorted(p for p in run_dir.glob("checkpoint-*") if (p / TRAINER_STATE).is_file())
    for p in done[:-keep]:
        if p != final:
            _remove(p)
    return final


# --- sharded (FSDP2) checkpoints ----------------------------------------------------------------------------
def _full_state(wrapper) -> tuple:
    """(inner model's full state dict, {extra name: its state dict}) on rank 0 ({} elsewhere): collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sd = get_model_state_dict(wrapper, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    inner = {k[len("inner."):]: v for k, v in sd.items() if k.startswith("inner.")}
    extras = {}
    for k, v in sd.items():
        if k.startswith("extras."):
            name, rest = k[len("extras."):].split(".", 1)
            extras.setdefault(name, {})[rest] = v
    return inner, extras


def _export(model, state: dict, path: Path) -> None:
    """A consolidated, `from_pretrained`-loadable copy of `model` with `state` (a reward model: + value head)."""
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    if hasattr(model, "value_head") and hasattr(model, "lm"):  # RewardModel
        model.lm.save_pretrained(path, state_dict={k[3:]: v for k, v in state.items() if k.startswith("lm.")},
                                 safe_serialization=True)
        save_file({k[len("value_head."):]: v.contiguous() for k, v in state.items() if k.startswith("value_head.")},
                  str(path / "value_head.safetensors"))
    else:
        model.save_pretrained(path, state_dict=state, safe_serialization=True)


def save_sharded_checkpoint(run_dir: Path, step: int, models: dict, optimizer, tokenizer, trainer_state: dict, *,
                            keep: int, info) -> Path:
    """Every rank calls this. `models`: {"": the trained model's FSDP root, "critic": …}; each is exported
    consolidated (rank 0: the checkpoint root, or a sub-directory named after it) so that `from_pretrained`
    loads it, and the optimizer is saved sharded through torch.distributed.checkpoint (`dcp/`), which
    reshards on load to any world size. The trainer state gains `modules` (the state of modules held beside a
    model, e.g. a value head) and per-rank RNG states. Same atomicity as `save_checkpoint`."""
    import torch.distributed as dist

    run_dir = Path(run_dir)
    final = run_dir / f"checkpoint-{step:06d}"
    tmp = run_dir / f".tmp-{final.name}-dist"
    if info.main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    extras = {}
    for name, wrapper in models.items():
        inner, ex = _full_state(wrapper)
        if info.main:
            _export(wrapper.inner, inner, tmp / name if name else tmp)
            extras.update({f"{name}.{k}" if name else k: v for k, v in ex.items()})
    if optimizer is not None:  # None: --save-only-model
        save_optimizer_and_rng(tmp, models, optimizer, info.rank)
    if info.main:
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        modules = {**trainer_state.get("modules", {}), **extras}
        torch.save({**trainer_state, "modules": modules, "world_size": info.world_size, "format": STATE_FORMAT},
                   tmp / TRAINER_STATE)
    dist.barrier()
    if info.main:
        _publish(run_dir, tmp, final, keep)
    dist.barrier()
    return final


def _distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def _optimizer_container(models: dict):
    """One module holding every optimised module under a name that does not depend on the world size: DCP keys
    optimizer state by parameter name, and a 2-rank checkpoint must resume in 1 process (and back). The FSDP root
    wrapper (`InForward`) is looked through: its model under the model's own key, its extras (e.g. PPO's value
    head) under theirs, as one process holds them."""
    from torch import nn

    from .distributed import InForward

    flat = {}
    for name, module in models.items():
        if isinstance(module, InForward):
            flat[name or "model"] = module.inner
            flat.update(module.extras.items())
        else:
            flat[name or "model"] = module
    return nn.ModuleDict(flat)


def save_optimizer_and_rng(ckpt_dir: Path, models: dict, optimizer, rank: int = 0) -> None:
    """The optimizer through torch.distributed.checkpoint (`dcp/`: sharded, keyed by parameter names, reshardable
    to any world size on load — one process included) and this rank's RNG states (`rng-rank{r}.pt`).
    Collective when a process group exists."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    container = _optimizer_container(models)
    dcp.save({"optim": get_optimizer_state_dict(container, optimizer)}, checkpoint_id=str(Path(ckpt_dir) / "dcp"),
             no_dist=not _distributed())
    torch.save(rng_state(), Path(ckpt_dir) / f"rng-rank{rank}.pt")


def load_optimizer_and_rng(ckpt: Path, models: dict, optimizer, rank: int = 0) -> None:
    """Restore what save_optimizer_and_rng wrote, whatever the world size then and now (DCP reshards); this
    rank's RNG state, or rank 0's when the checkpoint had fewer ranks."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    ckpt = Path(ckpt)
    if not (ckpt / "dcp").is_dir():
        raise CheckpointError(f"{ckpt} has no dcp/ optimizer state (written by an older fusealign); start again "
                              f"without --resume")
    container = _optimizer_container(models)
    state = {"optim": get_optimizer_state_dict(container, optimizer)}
    # Partial: a parameter that never had a gradient (e.g. an unused head) has no saved moments; it keeps the
    # fresh state, as in the uninterrupted run.
    dcp.load(state, checkpoint_id=str(ckpt / "dcp"), planner=dcp.DefaultLoadPlanner(allow_partial_load=True),
             no_dist=not _distributed())
    set_optimizer_state_dict(container, optimizer, state["optim"])
    rng = ckpt / f"rng-rank{rank}.pt"
    rng = rng if rng.is_file() else ckpt / "rng-rank0.pt"
    set_rng_state(torch.load(rng, weights_only=True))


def _remove(path: Path) -> None:
    """Rename to a hidden name (atomic), then delete: a kill mid-delete leaves no half checkpoint in view."""
    trash = path.parent / f".trash-{path.name}-{os.getpid()}"
    os.rename(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def clean_partial_writes(run_dir: Path) -> None:
    """Remove what an interrupted save or prune left behind (hidden .tmp-/.old-/.trash- directories)."""
    for p in Path(run_dir).glob(".*"):
        if p.is_dir() and p.name.startswith((".tmp-", ".old-", ".trash-")):
            shutil.rmtree(p, ignore_errors=True)


def latest_checkpoint(run_dir: Path) -> Optional[Path]:
    """The newest complete checkpoint of a run (None if there is none)."""
    run_dir = Path(run_dir)
    marker = run_dir / "latest"
    if marker.is_file():
        p = run_dir / marker.read_text().strip()
        if (p / TRAINER_STATE).is_file():
            return p
    done = sorted(p for p in run_dir.glob("checkpoint-*") if (p / TRAINER_STATE).is_file())
    return done[-1] if done else None


def check_resumable(ckpt: Optional[Path], *, trust: bool = False) -> None:
    """A checkpoint written with --save-only-model cannot be resumed: CheckpointError naming what to do instead."""
    if ckpt is None:
        return
    if load_trainer_state(ckpt, trust=trust).get("model_only"):
        raise CheckpointError(f"{ckpt} was saved with --save-only-model (weights, config and tokenizer; no optimizer, "
                              f"scheduler or data position), so it cannot be resumed: start a new run from it with "
                              f"--model {ckpt} (and a fresh --output-dir), or save resumable checkpoints by leaving "
                              f"out --save-only-model")


def checkpoint_sizes(ckpt: Path) -> tuple:
    """(bytes of the whole checkpoint, bytes of its dcp/ optimizer state)."""
    def du(p: Path) -> int:
        return sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.is_dir() else 0
    return du(Path(ckpt)), du(Path(ckpt) / "dcp")


def check_fresh_start(run_dir: Path) -> None:
    """A run without --resume must not mix with an earlier run's checkpoints (and must not delete them)."""
    old = latest_checkpoint(run_dir)
    if old is not None:
        raise CheckpointError(f"{run_dir} already holds checkpoints of an earlier run ({old.name}): pass --resume to "
                              f"continue it, or choose another --output-dir")


def load_trainer_state(ckpt: Path, *, trust: bool = False) -> dict:
    """The trainer state of a checkpoint, loaded without executing code from it (see the module docstring).

    `trust=True` (`--trust-checkpoint`) also loads states that need arbitrary unpickling: only for
    checkpoints whose origin you trust, since such a file can run any code on this machine.
    """
    path = Path(ckpt) / TRAINER_STATE
    try:
        state = torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as e:
        if trust:
            return torch.load(path, weights_only=False, map_location="cpu")
        reason = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"{path}: refusing to load this trainer state: it needs arbitrary unpickling, which can run code on "
            f"this machine (it was written before fusealign's safe format, or crafted; {reason[:200]}). Start the "
            f"run again without --resume, or pass --trust-checkpoint if you trust where the checkpoint came "
            f"from (it may execute code)") from None
    except (OSError, RuntimeError, EOFError) as e:
        raise CheckpointError(f"{path}: cannot read the trainer state ({type(e).__name__}: {e}); resume from "
                              f"another checkpoint or start again without --resume") from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise CheckpointError(f"{path}: not a fusealign trainer state of format {STATE_FORMAT}; start again "
                              f"without --resume")
    return state


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
