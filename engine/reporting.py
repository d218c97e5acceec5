"""`--report-to none|tensorboard|wandb|trackio`: the run's metrics, as transformers' callbacks send TRL's.

Each step's metrics (the line `metrics.jsonl` gets, TRL's names) go to every chosen tracker under the names
transformers' `rewrite_logs` gives them — `train/loss`, `train/rewards/margins`, …; an `eval/…` metric keeps its
name — with the step: TensorBoard `add_scalar(name, value, step)` in `<output_dir>/runs/` (TensorBoardCallback),
wandb and trackio `log({…, "train/global_step": step})` (WandbCallback, TrackioCallback), the config at init.
Strings (`peak_mem_kind`) are not scalars and stay in metrics.jsonl.

Each library is imported only when chosen; a missing one is a one-line error naming the install, raised by
`check_report_to` before any model loads. wandb runs offline when WANDB_MODE is unset and api.wandb.ai cannot
be reached (the run says so; `wandb sync` uploads later). trackio logs to its local database (a Space only when
TRACKIO_SPACE_ID is set, as trackio itself decides). Project: WANDB_PROJECT / TRACKIO_PROJECT, else "fusealign";
run name: the output directory.
"""

from __future__ import annotations

import importlib
import os
import socket
from dataclasses import asdict
from pathlib import Path

from .config import REPORT_TO  # noqa: F401  (the names, validated by the configs)
from .errors import UserError
_INSTALL = {"tensorboard": "tensorboard", "wandb": "wandb", "trackio": "trackio"}


class ReportError(UserError, ImportError):
    """A --report-to library that is not installed."""


def _import(name: str):
    """The library behind a --report-to name (ReportError naming the install when it is missing)."""
    try:
        if name == "tensorboard":
            return importlib.import_module("torch.utils.tensorboard")  # needs the tensorboard package
        return importlib.import_module(name)
    except ImportError as e:
        raise ReportError(f"--report-to {name}: the {_INSTALL[name]} package is not installed (pip install "
                          f"{_INSTALL[name]}; {str(e).splitlines()[0][:120]})") from None


def check_report_to(names) -> None:
    """Before any model loads: every chosen tracker imports."""
    for name in names:
        if name != "none":
            _import(name)


def rewrite_logs(metrics: dict) -> dict:
    """transformers' `rewrite_logs` for our names: scalars only, `train/` prefixed unless already `eval/…`."""
    out = {}
    for k, v in metrics.items():
        if k == "step" or isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        out[k if k.startswith(("eval/", "test/")) else "train/" + k] = v
    return out


def network_reachable(host: str = "api.wandb.ai", port: int = 443, timeout: float = 2.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


class _TensorBoard:
    def __init__(self, cfg, run_dir: Path, config: dict):
        tb = _import("tensorboard")
        self.writer = tb.SummaryWriter(log_dir=str(run_dir / "runs"))
        self.writer.add_text("args", repr(config))

    def log(self, metrics: dict, step: int) -> None:
        for k, v in rewrite_logs(metrics).items():
            self.writer.add_scalar(k, v, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class _WandB:
    def __init__(self, cfg, run_dir: Path, config: dict, note=print):
        self.wandb = _import("wandb")
        mode = os.environ.get("WANDB_MODE")
        if mode is None and not network_reachable():
            mode = "offline"
            note("wandb: api.wandb.ai cannot be reached: logging offline (upload later with `wandb sync "
                 f"{run_dir / 'wandb'}`)")
        self.run = self.wandb.init(project=os.environ.get("WANDB_PROJECT", "fusealign"), name=str(cfg.output_dir),
                                   dir=str(run_dir), config=config, mode=mode)
        if getattr(self.wandb, "define_metric", None):
            self.wandb.define_metric("train/global_step")
            self.wandb.define_metric("*", step_metric="train/global_step", step_sync=True)

    def log(self, metrics: dict, step: int) -> None:
        self.wandb.log({**rewrite_logs(metrics), "train/global_step": step})

    def close(self) -> None:
        self.wandb.finish()


class _Trackio:
    def __init__(self, cfg, run_dir: Path, config: dict):
        self.trackio = _import("trackio")
        self.trackio.init(project=os.environ.get("TRACKIO_PROJECT", "fusealign"), name=str(cfg.output_dir),
                          config=config, resume="allow")

    def log(self, metrics: dict, step: int) -> None:
        self.trackio.log({**rewrite_logs(metrics), "train/global_step": step})

    def close(self) -> None:
        self.trackio.finish()


class Reporters:
    """The chosen trackers of a run (none: nothing imported, nothing done)."""

    def __init__(self, cfg, run_dir: Path, note=print):
        names = [n for n in getattr(cfg, "report_to", ["none"]) if n != "none"]
        config = asdict(cfg)
        self.trackers = []
        for name in names:
            if name == "tensorboard":
                self.trackers.append(_TensorBoard(cfg, run_dir, config))
            elif name == "wandb":
                self.trackers.append(_WandB(cfg, run_dir, config, note=note))
            else:
                self.trackers.append(_Trackio(cfg, run_dir, config))

    def log(self, metrics: dict) -> None:
        for t in self.trackers:
            t.log(metrics, metrics["step"])

    def close(self) -> None:
        for t in self.trackers:
            t.close()
