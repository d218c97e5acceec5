"""Fused Triton kernels, their chunked PyTorch twins, autograd functions and naive references.

Installed as `fusealign.kernels`; imports inside this package are relative so the same files work
from a source checkout mapped by setup.py and from an installed wheel. The public entry points —
what `fusealign.losses` and the engine may import — are re-exported here, plus `checks` (argument
validation) and `reference` (the naive specs).
"""

from . import checks, reference
from .common import DEFAULT_CHUNK_BYTES, HeadOptions
from .linear_kl import LinearKLFunction, linear_kl
from .linear_logps import LinearLogpsFunction, linear_logps
from .segments import segment_sum

__all__ = ["checks", "reference", "linear_logps", "linear_kl", "segment_sum", "LinearLogpsFunction",
           "LinearKLFunction", "HeadOptions", "DEFAULT_CHUNK_BYTES"]
