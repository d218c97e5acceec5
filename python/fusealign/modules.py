"""Thin `nn.Module` wrappers over the functional ops: they hold options, never weights."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from fusealign.kernels.linear_logps import DEFAULT_CHUNK_BYTES, linear_logps


class LinearLogps(nn.Module):
    """`fa.linear_logps` as a module: `LinearLogps(temperature=0.7)(hidden, weight, targets)`.

    The head weight is an argument of `forward`, not a parameter: the model owns it (often tied to
    the input embedding), the loss only reads it.
    """

    def __init__(self, *, temperature: float = 1.0, softcap: Optional[float] = None, ignore_index: int = -100,
                 return_entropy: bool = False, backend: str = "auto", chunk_bytes: int = DEFAULT_CHUNK_BYTES):
        super().__init__()
        self.temperature = temperature
        self.softcap = softcap
        self.ignore_index = ignore_index
        self.return_entropy = return_entropy
        self.backend = backend
        self.chunk_bytes = chunk_bytes

    def forward(self, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                bias: Optional[torch.Tensor] = None):
        return linear_logps(hidden, weight, targets, bias=bias, temperature=self.temperature, softcap=self.softcap,
                            ignore_index=self.ignore_index, return_entropy=self.return_entropy,
                            backend=self.backend, chunk_bytes=self.chunk_bytes)

    def extra_repr(self) -> str:
        return (f"temperature={self.temperature}, softcap={self.softcap}, ignore_index={self.ignore_index}, "
                f"return_entropy={self.return_entropy}, backend={self.backend!r}")
