"""The training loop shared by SFT, reward modelling and DPO.

step: micro-batches → loss (fused head) → backward → clip → AdamW → schedule → log → checkpoint.
A loss function maps a list of examples to (loss, metrics, tokens); everything else lives here.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Optional

import torch
from tqdm.auto import tqdm

from .checkpoint import (check_fresh_start, latest_checkpoint, load_trainer_state, rng_state, save_checkpoint,
                         set_rng_state, truncate_metrics)
from .config import TrainConfig
from .data import DataStream


class NonFiniteLoss(FloatingPointError):
    pass


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def lr_lambda(cfg: TrainConfig) -> Callable[[int], float]:
    """Linear warm-up to the peak, then cosine / linear decay to 0 at max_steps, or constant."""
    def f(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / (cfg.warmup_steps + 1)
        if cfg.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
        return 0.5 * (1 + math.cos(math.pi * progress)) if cfg.schedule == "cosine" else 1.0 - progress
    return f


def autocast(cfg: TrainConfig, device: torch.device):
    if device.type == "cuda" and cfg.bf16:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def train(
    cfg: TrainConfig,
    model: torch.nn.Module,
    loss_fn: Callable[[list], tuple],
    stream: DataStream,
    *,
    tokenizer=None,
    eval_fn: Optional[Callable[[], dict]] = None,
    desc: str = "train",
) -> dict:
    """Run to cfg.max_steps (continuing from the latest checkpoint with cfg.resume). Returns the last metrics."""
    run_dir = Path(cfg.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    device = next(model.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    metrics_path = run_dir / "metrics.jsonl"
    step = 0
    ckpt = latest_checkpoint(run_dir) if cfg.resume else None
    if ckpt is not None:  # the model itself was loaded from `ckpt` by the caller
        state = load_trainer_state(ckpt)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        stream.load_state_dict(state["data"])
        set_rng_state(state["rng"])
        step = state["step"]
        truncate_metrics(metrics_path, step)
    else:
        check_fresh_start(run_dir)
        if metrics_path.exists():
            metrics_path.unlink()
    if cfg.gradient_checkpointing:
        target = getattr(model, "lm", model)  # a RewardModel checkpoints its backbone
        enable = getattr(target, "activation_checkpointing_enable", None) or target.gradient_checkpointing_enable
        enable()
    model.train()

    def save(at: int) -> Path:
        state = {"step": at, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                 "data": stream.state_dict(), "rng": rng_state(), "config": asdict(cfg)}
        return save_checkpoint(run_dir, at, model, tokenizer, state, keep=cfg.save_total_limit)

    last = {}
    bar = tqdm(total=cfg.max_steps, initial=step, desc=desc, dynamic_ncols=True, mininterval=0.5)
    with open(metrics_path, "a") as log:
        while step < cfg.max_steps:
            t0 = time.perf_counter()
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            optimizer.zero_grad(set_to_none=True)
            totals, tokens = {}, 0
            for _ in range(cfg.grad_accum):
                with autocast(cfg, device):
                    loss, metrics, n_tok = loss_fn(stream.next_batch())
                if not torch.isfinite(loss):
                    good = latest_checkpoint(run_dir)
                    raise NonFiniteLoss(
                        f"non-finite loss ({loss.item()}) at step {step + 1}: stopping. The last good checkpoint is "
                        f"{good if good else 'none (no checkpoint was written yet)'}; lower --lr or check the data")
                (loss / cfg.grad_accum).backward()
                tokens += n_tok
                for k, v in {"loss": loss, **metrics}.items():
                    totals[k] = totals.get(k, 0.0) + float(torch.as_tensor(v).detach()) / cfg.grad_accum
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm if cfg.max_grad_norm > 0 else
                                                       float("inf"))
            if not torch.isfinite(grad_norm):
                raise NonFiniteLoss(f"non-finite gradient norm at step {step + 1}: stopping; the last good "
                                    f"checkpoint is {latest_checkpoint(run_dir)}")
            optimizer.step()
            lr = scheduler.get_last_lr()[0]
            scheduler.step()
            step += 1
            dt = time.perf_counter() - t0
            last = {"step": step, **totals, "lr": lr, "grad_norm": float(grad_norm), "tokens_per_s": tokens / dt,
                    "peak_mem_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None}
            if eval_fn is not None and cfg.eval_every and step % cfg.eval_every == 0:
                last.update(eval_fn())
                model.train()
            log.write(json.dumps(last) + "\n")
            log.flush()
            bar.update(1)
            bar.set_postfix(loss=f"{totals['loss']:.4f}", lr=f"{lr:.2e}")
            if step % cfg.save_every == 0 or step == cfg.max_steps:
                save(step)
    bar.close()
    return last
