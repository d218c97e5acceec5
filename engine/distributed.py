"""More than one process, on PyTorch's own engine: torchrun, FSDP2 (`fully_shard`) and distributed checkpoints.

    torchrun --nproc-per-node N -m fusealign dpo …      # same flags as one process

Data parallelism with sharded parameters: every rank reads the same global batch stream and takes its own
slice (rank r gets examples r, r + N, …), each decoder layer and the root of every model are
`fully_shard`ed (bf16 parameters with fp32 gradient reduction on GPU), and a rank's loss is weighted by
its share of the global batch's units (completion tokens for SFT, pairs for RM/DPO), so that FSDP's
gradient average equals the single-process gradient of the whole global batch.

Where the fused head meets FSDP2: outside a module's forward, FSDP2 holds its parameters sharded (each rank
has some rows); inside the root's forward they are gathered. `InForward` is that root: a module whose
forward runs a function of the wrapped model — the backbone, the completion positions, the fused op on the
gathered head weight (tied or not), the value head. Its backward reduce-scatters the head's gradient like any
other. `run(model, fn, …)` is how the engine calls every model, wrapped or not.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the job (world_size 1: a plain single-process run)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    fsdp_one_rank: bool = False  # --fsdp in one process: a 1-rank group, every distributed path taken

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1 or self.fsdp_one_rank


def init_distributed(device: str = "auto", fsdp: Optional[bool] = None) -> DistInfo:
    """From torchrun's environment (WORLD_SIZE, RANK, LOCAL_RANK): join the process group (NCCL on CUDA,
    gloo on CPU) once; one process without it.

    fsdp: None = FSDP2 exactly when WORLD_SIZE > 1; True also in one process (a 1-rank group: checks the
    sharded path, e.g. bf16 mixed precision on one GPU); False is refused under torchrun (data parallelism
    here is FSDP2)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and fsdp is False:
        from .errors import UserError

        raise UserError(f"--no-fsdp with WORLD_SIZE={world}: more than one process trains through FSDP2 here; "
                        f"drop --no-fsdp or launch one process")
    if world <= 1 and not fsdp:
        return DistInfo()
    if world <= 1:  # --fsdp without torchrun: a 1-rank group on a free local port
        if "MASTER_PORT" not in os.environ:
            import socket

            with socket.socket() as sock:
                sock.bind(("127.0.0.1", 0))
                os.environ["MASTER_PORT"] = str(sock.getsockname()[1])
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if _foreign_world():
        from .errors import UserError

        raise UserError("torch.distributed's default group here belongs to a vLLM engine of an earlier run in this "
                        "process (world 1), not to this run; close that engine first (VLLMGenerate.close())")
    cuda = torch.cuda.is_available() and device != "cpu"
    if cuda:
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        # CUDA: NCCL for the model's tensors, gloo for the small CPU tensors of metrics and stop signals
        dist.init_process_group("cpu:gloo,cuda:nccl" if cuda else "gloo")
    return DistInfo(rank, world, local, fsdp_one_rank=world <= 1)


_FOREIGN = []  # the default group a one-process vLLM engine created for itself (rollout_vllm), if any


def mark_foreign_world() -> None:
    """Record that the current default group is not this job's (a one-process vLLM engine creates a world-1 group
    of its own, and destroys it when it shuts down): `init_distributed` refuses to take it, `shutdown` leaves it."""
    _FOREIGN[:] = [dist.group.WORLD]


def _foreign_world() -> bool:
    return bool(_FOREIGN) and dist.is_available() and dist.is_initialized() and dist.group.WORLD is _FOREIGN[0]


def shutdown(clean: bool = True) -> None:
    """Leave the process group, if this process joined one. After a finished run, behind a barrier: a rank that
    exits while its peer still holds the gloo connection can make the peer abort (SIGABRT) as it tears down.
    After an error, at once (the other ranks may be gone). A vLLM engine's own group is left to the engine."""
    if not (dist.is_available() and dist.is_initialized()) or _foreign_world():
        return
    if clean:
        dist.barrier()
    dist.destroy_process_group()


class InForward(nn.Module):
    """The FSDP2 root of one model: `wrapper(fn, *args)` runs `fn(model, *args)` inside this forward, where
    FSDP has gathered the root's parameters (embedding, final norm, LM head, and any `extras`)."""

    def __init__(self, model: nn.Module, **extras: nn.Module):
        super().__init__()
        self.inner = model
        self.extras = nn.ModuleDict(extras)

    def forward(self, fn, *args, **kwargs):
        return fn(self.inner, *args, **kwargs)


def run(model, fn, *args, **kwargs):
    """fn(model, …) — inside the FSDP root's forward when `model` is an `InForward` wrapper.

    The root keeps its gathered parameters after forward (FSDP2 frees them in backward); a forward without
    grad has no backward, so they are resharded here — else the next step's optimizer would see (and update)
    the gathered copies instead of the shards."""
    if not isinstance(model, InForward):
        return fn(model, *args, **kwargs)
    out = model(fn, *args, **kwargs)
    if not torch.is_grad_enabled() and hasattr(model, "reshard"):
        model.reshard()
    return out


def unwrap(model):
    return model.inner if isinstance(model, InForward) else model


def decoder_layers(model: nn.Module):
    """The repeated blocks of a causal LM's backbone (or of a reward model's)."""
    lm = getattr(model, "lm", model)
    dec = lm.get_decoder()
    for name in ("layers", "h", "blocks"):
        blocks = getattr(dec, name, None)
        if isinstance(blocks, nn.ModuleList):
            return list(blocks)
    raise ValueError(f"cannot find the decoder layers of {type(lm).__name__} to shard (looked for layers, h, blocks)")


def shard(model: nn.Module, info: DistInfo, *, bf16: bool, **extras: nn.Module):
    """FSDP2 over `info`'s ranks: each decoder layer, then the `InForward` root (the rest, `extras` included).
    Returns the model unchanged in a single process."""
    if not info.active:
        return model
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else None
    kw = {} if mp is None else {"mp_policy": mp}
    for layer in decoder_layers(model):
        fully_shard(layer, **kw)
    root = InForward(model, **extras)
    fully_shard(root, **kw)
    return root


def all_reduce_mean(values: dict, info: DistInfo, weight: float = 1.0) -> dict:
    """Weighted mean over ranks of float metrics (weights: this rank's share, e.g. its pairs); others untouched."""
    if not info.active:
        return values
    keys = [k for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    t = torch.tensor([float(values[k]) * weight for k in keys] + [weight], dtype=torch.float64)
    dist.all_reduce(t)
    out = dict(values)
    for i, k in enumerate(keys):
        out[k] = (t[i] / t[-1]).item()
    return out


def all_reduce_sum(x: float, info: DistInfo) -> float:
    if not info.active:
        return x
    t = torch.tensor([float(x)], dtype=torch.float64)
    dist.all_reduce(t)
    return t.item()


def all_reduce_max(x: float, info: DistInfo) -> float:
    if not info.active:
        return x
    t = torch.tensor([float(x)], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def barrier(info: DistInfo) -> None:
    if info.active:
        dist.barrier()


def rank_slice(items: list, info: DistInfo) -> list:
    """This rank's examples of a global batch: r, r + N, r + 2N, … (all ranks together: the whole batch)."""
    return items[info.rank::info.world_size] if info.active else items


def check_world_size(command: str, info: DistInfo, supported: bool = True, why: Optional[str] = None) -> None:
    if info.active and not supported:
        from .errors import UserError

        raise UserError(f"fusealign {command} runs in one process ({why}); launch it without torchrun")
