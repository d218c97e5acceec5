"""Which Triton implementation `backend="triton"` / `"auto"` runs: the measured-fastest candidate per shape class.

Candidates (each a module with the launcher interface of linear_logps_triton.py / linear_kl_triton.py):
    "fused"       linear_logps_triton / linear_kl_triton: one program per (token block, vocabulary split),
                  128 × 128 (two heads: 128 × 64) tiles, cp.async — the default
    "persistent"  linear_logps_persistent / linear_kl_persistent: persistent grid in L2-grouped order,
                  TMA tensor descriptors, 128 × 256 tiles on sm_90 (two heads: 128 × 128)
    "hybrid"      linear_logps_hybrid: cuBLAS fp32 logit chunks + one Triton reduce pass (log-probs only;
                  its KL falls back to "fused")
`select_candidate(device, dtype, H, V, op)` looks the shape class up in kernels/tuned.json, written by the GPU
suite from its measurements (benchmarks/gpu_suite.sh, stage (c): benchmarks/select_candidates.py):
    {"version": 1, "entries": {"sm_90/bfloat16/H4096/V128k": {"logps": "persistent", "kl": "fused"}, ...},
     "measured": {...}}
keyed by compute capability, dtype, H (exact) and V class (vclass(): "V32k" ≤ 65,536 < "V128k" ≤ 196,608 <
"V256k"); a class with no entry, an unknown candidate name or a CPU tensor gets "fused". The choice never
depends on N, so batch invariance holds whatever is selected (each candidate is batch-invariant itself).
Override for benchmarks and tests: `force_candidate(name)` (context manager) or FUSEALIGN_CANDIDATE=name.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib
import json
import os
from pathlib import Path
from typing import Optional

import torch

DEFAULT = "fused"
# candidate -> op -> module (relative to this package); a candidate without an op uses DEFAULT's module.
MODULES = {
    "fused": {"logps": "linear_logps_triton", "kl": "linear_kl_triton"},
    "persistent": {"logps": "linear_logps_persistent", "kl": "linear_kl_persistent"},
    "hybrid": {"logps": "linear_logps_hybrid"},
}
OPS = ("logps", "kl")
TABLE = Path(__file__).resolve().parent / "tuned.json"
V_CLASSES = ((65536, "V32k"), (196608, "V128k"))  # upper bounds; larger: "V256k"

_forced: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar("fusealign_candidate", default=None)


def vclass(V: int) -> str:
    for bound, name in V_CLASSES:
        if V <= bound:
            return name
    return "V256k"


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def table_key(arch: int, dtype: torch.dtype, H: int, V: int) -> str:
    """"sm_90/bfloat16/H4096/V128k": the shape class a tuned.json entry applies to."""
    return f"sm_{arch}/{dtype_name(dtype)}/H{H}/{vclass(V)}"


def check_name(name: str, what: str = "candidate") -> str:
    if name not in MODULES:
        raise ValueError(f"unknown {what} {name!r}: choose one of {sorted(MODULES)}")
    return name


@functools.lru_cache(maxsize=4)
def _load(path: str, mtime: float) -> dict:
    data = json.loads(Path(path).read_text())
    if data.get("version") != 1 or not isinstance(data.get("entries"), dict):
        raise ValueError(f"{path}: expected {{'version': 1, 'entries': {{...}}}} (see kernels/candidates.py)")
    return data["entries"]


def load_table(path: Path = TABLE) -> dict:
    """The table's entries ({} when the file does not exist); re-read when the file changes."""
    if not path.exists():
        return {}
    return _load(str(path), path.stat().st_mtime)


@contextlib.contextmanager
def force_candidate(name: Optional[str]):
    """Run every Triton call inside with candidate `name` (None: back to the table)."""
    token = _forced.set(None if name is None else check_name(name))
    try:
        yield
    finally:
        _forced.reset(token)


def select_candidate(device: torch.device, dtype: torch.dtype, H: int, V: int, op: str = "logps",
                     table: Optional[dict] = None) -> str:
    """The candidate for this call: forced (force_candidate / FUSEALIGN_CANDIDATE), else tuned.json's entry for
    (capability, dtype, H, V class) and `op`, else DEFAULT. CPU tensors (the interpreter) use the table too
    only when forced."""
    if op not in OPS:
        raise ValueError(f"op must be one of {OPS}, got {op!r}")
    forced = _forced.get() or os.environ.get("FUSEALIGN_CANDIDATE") or None
    if forced:
        return check_name(forced, "FUSEALIGN_CANDIDATE / force_candidate")
    if device.type != "cuda":
        return DEFAULT
    major, minor = torch.cuda.get_device_capability(device)
    entry = (load_table() if table is None else table).get(table_key(10 * major + minor, dtype, H, V), {})
    name = entry.get(op, DEFAULT) if isinstance(entry, dict) else DEFAULT
    return name if name in MODULES else DEFAULT


def module(name: str, op: str):
    """The implementation module of candidate `name` for `op` (DEFAULT's when the candidate has none)."""
    mods = MODULES[check_name(name)]
    return importlib.import_module(f"{__package__}.{mods.get(op, MODULES[DEFAULT][op])}")


def triton_module(op: str, hidden: torch.Tensor, weight: torch.Tensor):
    """The dispatcher's hook: the Triton implementation module for this call's (device, dtype, H, V)."""
    return module(select_candidate(hidden.device, hidden.dtype, hidden.shape[-1], weight.shape[0], op), op)
