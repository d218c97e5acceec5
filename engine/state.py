"""The one trainer state: the trained models, their optimizer and schedule, and what else a run must resume.

    state = TrainState(cfg, {"": model}, info=info, tokenizer=tok, extras={"data": stream})
    start = state.restore()          # the latest checkpoint's step with cfg.resume (models loaded by the caller), else 0
    ... state.optimizer.step(); state.scheduler.step() ...
    state.save(step)                 # atomic checkpoint, one process or FSDP2 alike

`models`: "" is the model a checkpoint exports at its root (`from_pretrained`-loadable, with the tokenizer);
another name is exported beside it in a sub-directory if it has `save_pretrained` (PPO's separate critic), else
kept in the trainer state under "modules" (PPO's value head on the policy). Model weights are loaded by whoever
builds the models, before FSDP2 shards them (`load_modules` for the small ones); the optimizer (through DCP: any
world size), the schedule, the RNG states and every `extras` entry (anything with state_dict / load_state_dict:
the data stream, PPO's KL controller) by `restore`.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from .checkpoint import checkpoint_sizes, latest_checkpoint, load_optimizer_and_rng, load_trainer_state, \
    save_checkpoint, save_optimizer_and_rng, save_sharded_checkpoint
from .distributed import DistInfo
from .errors import CheckpointError
from .loop import note, resume_or_fresh
from .runtime import lr_lambda


class TrainState:
    """Models, AdamW over their trainable parameters (each once: a tied or shared parameter is one), the
    learning-rate schedule (runtime.lr_lambda), `extras`; `save(at)` and `restore()`."""

    def __init__(self, cfg, models: dict, *, info: DistInfo = DistInfo(), tokenizer=None,
                 extras: Optional[dict] = None):
        self.cfg, self.info, self.tokenizer = cfg, info, tokenizer
        self.run_dir = Path(cfg.output_dir)
        self.models = models
        self.extras = extras or {}
        params = [p for m in models.values() for p in m.parameters()]
        self.params = [p for p in dict.fromkeys(params) if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(cfg))
        self._sized = False  # the first save of this process prints the checkpoint's size

    def restore(self) -> int:
        """Continue from the latest checkpoint when cfg.resume finds one (its metrics after it dropped), else start
        fresh (refusing to mix with an earlier run's checkpoints). Returns the step to continue from."""
        state = resume_or_fresh(self.run_dir, self.cfg, self.info)
        if state is None:
            return 0
        self.scheduler.load_state_dict(state["scheduler"])
        for name, obj in self.extras.items():
            obj.load_state_dict(state[name])
        # The optimizer through DCP: a run may resume on another number of ranks than it was saved from.
        load_optimizer_and_rng(latest_checkpoint(self.run_dir), self.models, self.optimizer, self.info.rank)
        return state["step"]

    def save(self, at: int) -> Path:
        """Checkpoint after optimizer step `at` (every rank calls it under FSDP2). With cfg.save_only_model: the
        models' weights, config and tokenizer only (not resumable; see checkpoint.check_resumable)."""
        path = self._save_model_only(at) if getattr(self.cfg, "save_only_model", False) else self._save(at)
        if not self._sized and self.info.main:
            self._sized = True
            note(self._size_line(path))
        return path

    def _save(self, at: int) -> Path:
        state = {"step": at, "scheduler": self.scheduler.state_dict(), "config": asdict(self.cfg),
                 **{name: obj.state_dict() for name, obj in self.extras.items()}}
        keep = self.cfg.save_total_limit
        if self.info.active:  # small modules live in the FSDP roots' extras: save_sharded_checkpoint keeps them
            return save_sharded_checkpoint(self.run_dir, at, self.models, self.optimizer, self.tokenizer, state,
                                           keep=keep, info=self.info)
        beside = {n: m for n, m in self.models.items() if n}
        state["modules"] = {n: m.state_dict() for n, m in beside.items() if not hasattr(m, "save_pretrained")}

        def parts(d: Path) -> None:
            for name, m in beside.items():
                if hasattr(m, "save_pretrained"):
                    m.save_pretrained(d / name)
            save_optimizer_and_rng(d, self.models, self.optimizer)

        return save_checkpoint(self.run_dir, at, self.models[""], self.tokenizer, state, keep=keep, extra=parts)

    def _save_model_only(self, at: int) -> Path:
        """The exported model alone ("" of `models`), as TRL's save_only_model: no optimizer, RNG or extras."""
        state = {"step": at, "config": asdict(self.cfg), "model_only": True}
        keep = self.cfg.save_total_limit
        if self.info.active:
            return save_sharded_checkpoint(self.run_dir, at, {"": self.models[""]}, None, self.tokenizer, state,
                                           keep=keep, info=self.info)
        return save_checkpoint(self.run_dir, at, self.models[""], self.tokenizer, state, keep=keep)

    def _size_line(self, path: Path) -> str:
        total, optim = checkpoint_sizes(path)
        keep = self.cfg.save_total_limit
        gb = lambda b: f"{b / 1e9:.2f} GB" if b >= 1e8 else f"{b / 1e6:.1f} MB"  # noqa: E731
        what = f"weights and tokenizer {gb(total - optim)}, optimizer state (dcp/) {gb(optim)}" if optim else \
            "the model only: --save-only-model, not resumable"
        return (f"{getattr(self.cfg, 'KIND', 'run')}: {path.name} takes {gb(total)} ({what}); --save-total-limit {keep} "
                f"keeps at most "
                f"{gb(keep * total)}, {gb((keep + 1) * total)} while the next is written")


def load_modules(cfg, modules: dict[str, nn.Module]) -> None:
    """With cfg.resume and a checkpoint in cfg.output_dir: load each small module's weights saved by
    `TrainState.save` (before FSDP2 shards it). A module the checkpoint lacks is an error naming the fix."""
    ckpt = latest_checkpoint(Path(cfg.output_dir)) if cfg.resume else None
    if ckpt is None:
        return
    saved = load_trainer_state(ckpt, trust=getattr(cfg, "trust_checkpoint", False)).get("modules", {})
    for name, module in modules.items():
        if name not in saved:
            raise CheckpointError(f"{ckpt} holds no {name!r} to resume from (it was written by a run with other "
                                  f"options, e.g. another --critic); resume with the same options or start afresh")
        module.load_state_dict(saved[name])
