"""What every fused-head op shares: its options, the backend dispatch, the output names, the statistics layout.

    opts = HeadOptions.of(temperature=0.7, softcap=None, ignore_index=-100, backend="auto", chunk_bytes=…,
                          device=hidden.device)      # validated once; backend resolved to "triton" or "torch"
    impl = backend_impl("logps", opts.backend)      # the launcher module: logps_fwd, logps_bwd_dz, partial_stats

The per-split statistics rows (`STAT_ROWS`, `KL_ROWS`) are the layout every backend writes and every merge
reads — the Triton kernels (as `tl.constexpr` copies), the chunked PyTorch backend, the vocabulary-parallel
merge — so the numbers live here, once.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
from dataclasses import dataclass
from typing import Optional

import torch

from .checks import check_chunk_bytes, check_positive

DEFAULT_CHUNK_BYTES = 256 * 2**20
BACKENDS = ("auto", "triton", "torch")

# Per-token outputs `linear_logps(outputs=...)` can return; the last three are forward-only statistics.
OUTPUTS = ("logps", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
STAT_OUTPUTS = OUTPUTS[2:]

# --- the per-split statistics layout: (SPLITS, ROWS, N) fp32 ---------------------------------------------------
# log-probs: m = max z, s = Σ e^{z−m}, a = Σ e^{z−m}(z − m), zy = z_y (0 if the target is not in this split);
# with the extra statistics also q = Σ e^{2(z−m)}, zs = Σ z, mb = max_{v<y} z_v (linear_logps_triton.py).
ROW_M, ROW_S, ROW_A, ROW_ZY, ROW_Q, ROW_ZS, ROW_MB = range(7)
STAT_ROWS = 4  # m, s, a, zy
EXTRA_STAT_ROWS = 7  # + q, zs, mb
# two-head KL: m_a, s_a, m_b, s_b, c = Σ e^{a−m_a}(a − b) (linear_kl_triton.py)
KL_ROW_MA, KL_ROW_SA, KL_ROW_MB, KL_ROW_SB, KL_ROW_C = range(5)
KL_ROWS = 5


def stat_rows(extra: bool) -> int:
    """Rows of the log-prob statistics: 4, or 7 with the extra (TRL) statistics."""
    return EXTRA_STAT_ROWS if extra else STAT_ROWS


def interpreting() -> bool:
    """True under TRITON_INTERPRET=1 (the CPU test suite)."""
    import os

    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve_backend(backend: str, device: torch.device) -> str:
    """"auto" -> "triton" for CUDA tensors, "torch" otherwise; "triton" on CPU only under the interpreter."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if device.type == "cuda" else "torch"
    if backend == "triton" and device.type != "cuda" and not interpreting():
        raise ValueError("backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 for the CPU interpreter); "
                         "use backend='torch' or 'auto' for CPU tensors")
    return backend


@dataclass(frozen=True)
class HeadOptions:
    """Everything about a fused-head call that is not a tensor: the logit transform, which targets to ignore, the
    resolved backend and the memory budget of the chunked passes."""

    temperature: float = 1.0
    softcap: Optional[float] = None
    ignore_index: int = -100
    backend: str = "torch"  # resolved: "triton" or "torch"
    chunk_bytes: int = DEFAULT_CHUNK_BYTES

    @classmethod
    def of(cls, *, temperature, softcap, ignore_index, backend, chunk_bytes, device) -> "HeadOptions":
        """Validated options with `backend` resolved for `device` (the one place a call's options are checked)."""
        check_positive("temperature", temperature)
        if softcap is not None:
            check_positive("softcap", softcap)
        check_chunk_bytes(chunk_bytes)
        return cls(float(temperature), None if softcap is None else float(softcap), int(ignore_index),
                   resolve_backend(backend, device), chunk_bytes)


# op -> backend -> the module (relative to this package) with that op's launchers
_BACKEND_MODULES = {
    "logps": {"triton": "linear_logps_triton", "torch": "linear_logps_torch"},
    "kl": {"triton": "linear_kl_triton", "torch": "linear_kl_torch"},
}


def backend_impl(op: str, backend: str, hidden: Optional[torch.Tensor] = None, weight: Optional[torch.Tensor] = None):
    """The one dispatcher: the launcher module of `op` ("logps" or "kl") for a resolved backend. Both backends of
    an op have the same launcher signatures (`logps_fwd`, `logps_bwd_dz`, `partial_stats`; `kl_fwd`, `kl_bwd_dz`,
    `kl_partial_stats`) and `BWD_BYTES_PER_LOGIT` (their own (chunk, V) temporaries in the backward).
    With the call's `hidden` (N, H) and `weight` (V, H), "triton" is the candidate measured fastest for its
    (device, dtype, H, V class) (candidates.select_candidate; the default kernels without a tuned.json entry)."""
    if backend == "triton" and hidden is not None:
        from .candidates import triton_module

        return triton_module(op, hidden, weight)
    return importlib.import_module(f"{__package__}.{_BACKEND_MODULES[op][backend]}")


def check_outputs(outputs, return_entropy: bool) -> tuple:
    """The requested outputs as a tuple of names from OUTPUTS (no duplicates)."""
    if outputs is None:
        return ("logps", "entropy") if return_entropy else ("logps",)
    if return_entropy:
        raise ValueError("give either return_entropy=True or outputs=(…, 'entropy'), not both")
    if isinstance(outputs, str):
        raise TypeError(f"outputs must be a tuple of names from {OUTPUTS}, got the string {outputs!r}")
    outputs = tuple(outputs)
    unknown = [o for o in outputs if o not in OUTPUTS]
    if unknown or not outputs or len(set(outputs)) != len(outputs):
        raise ValueError(f"outputs must be distinct names from {OUTPUTS}, got {outputs!r}")
    return outputs


def on_device(t: torch.Tensor):
    """The launch context of an op over `t`: CUDA's current device — and with it the current stream — set to
    t's device for the op's kernels and GEMMs; a no-op off CUDA.

    Triton launches on `torch.cuda.current_device()` and its current stream, not the tensors' device: a head on
    cuda:1 (`device_map="auto"` puts lm_head on the last GPU) called while cuda:0 is current would run on
    device 0's stream — an illegal address, or with peer access wrong values with no ordering (issue 30).
    Every public op enters it once, around its whole forward or backward, through `launched_on_device`;
    tests/kernels/test_gpu_hazards.py checks that every launch runs inside it."""
    # (not a tensor: the op's own argument checks, inside, name it)
    on_cuda = isinstance(t, torch.Tensor) and t.device.type == "cuda"
    return torch.cuda.device(t.device) if on_cuda else contextlib.nullcontext()


def launched_on_device(fn):
    """Decorator: run `fn(hidden, …)` inside `on_device(hidden)` (looked up at call time, so tests can record it).
    On an op's forward and backward entry points (linear_logps.py, linear_kl.py, vocab_parallel.shard_stats)."""

    @functools.wraps(fn)
    def wrapped(hidden, *args, **kwargs):
        with on_device(hidden):
            return fn(hidden, *args, **kwargs)

    return wrapped


def needs_grad(*tensors) -> bool:
    """Grad mode is on and some of `tensors` (None skipped) requires grad: the autograd Function must run."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
