"""fusealign: alignment losses computed straight from hidden states and the LM-head weight.

    import fusealign as fa
    logps = fa.linear_logps(hidden, weight, targets)                        # (…,) float32
    logps, entropy = fa.linear_logps(hidden, weight, targets, return_entropy=True)
"""

from fusealign import kernels
from fusealign.kernels import reference
from fusealign.kernels.linear_logps import linear_logps
from fusealign.modules import LinearLogps

__version__ = "0.1.0"

__all__ = ["linear_logps", "LinearLogps", "kernels", "reference", "__version__"]
