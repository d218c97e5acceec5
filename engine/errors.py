"""The errors a user can cause and fix. The CLI prints them as one line — `fusealign <command>: error: …` —
and exits with status 2, without a traceback (`--debug` or FUSEALIGN_DEBUG=1 shows it). Anything else is
a bug and keeps its traceback. Each message says what, where, and the fix."""

from __future__ import annotations


class UserError(Exception):
    """Base of every expected error."""


class DataError(UserError, ValueError):
    """A data file or record the engine cannot use (names file, line and field)."""


class ModelPathError(UserError, FileNotFoundError):
    """A model directory that is missing or is not a model (no config.json)."""


class OutputDirError(UserError, OSError):
    """An output directory that cannot be created or written."""


class CheckpointError(UserError, FileExistsError):
    """A checkpoint that cannot be used: an earlier run's without --resume, an unsafe or unreadable one."""


class NonFiniteLoss(UserError, FloatingPointError):
    """Training produced NaN/inf; the message names the last good checkpoint."""


class Interrupted(Exception):
    """SIGINT/SIGTERM stopped a run after its current step; a checkpoint was written first (exit 128 + signum)."""

    def __init__(self, signum: int, step: int, checkpoint):
        super().__init__(f"interrupted by signal {signum} after step {step}; checkpoint {checkpoint}")
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
