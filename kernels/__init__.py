"""Fused Triton kernels, their chunked PyTorch twins, autograd functions and naive references.

Installed as `fusealign.kernels`; imports inside this package are relative so the same files work
from a source checkout mapped by setup.py and from an installed wheel.
"""

from . import reference
from .linear_logps import DEFAULT_CHUNK_BYTES, LinearLogpsFunction, linear_logps

__all__ = ["reference", "linear_logps", "LinearLogpsFunction", "DEFAULT_CHUNK_BYTES"]
