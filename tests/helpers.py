"""Shared test helpers: where each backend runs, dtype-aware tolerances, error metrics."""

import torch

HAS_CUDA = torch.cuda.is_available()
BACKENDS = ("torch", "triton")
# Triton runs on the GPU when there is one, else on the CPU under the interpreter (conftest.py).
TRITON_DEVICE = "cuda" if HAS_CUDA else "cpu"

# Forward: max abs error of log-probs / entropy (fp32 logits in every case).
FWD_ATOL = {torch.float32: 1e-4, torch.bfloat16: 1e-3, torch.float16: 1e-3}
# Backward: relative norm error; low-precision inputs round ∂r and the returned grads once.
GRAD_RTOL = {torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float16: 5e-3}


def device_for(backend: str) -> str:
    return TRITON_DEVICE if backend == "triton" else ("cuda" if HAS_CUDA else "cpu")


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """‖a − e‖ / ‖e‖ in float64 (0 when both are zero)."""
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    denom = e.norm().item()
    diff = (a - e).norm().item()
    return diff if denom == 0 else diff / denom


def max_abs(actual: torch.Tensor, expected: torch.Tensor) -> float:
    if actual.numel() == 0:
        return 0.0
    return (actual.detach().double().cpu() - expected.detach().double().cpu()).abs().max().item()


def leaf64(t):
    """A float64 leaf copy holding exactly the same values (bf16 → float64 is exact)."""
    return None if t is None else t.detach().double().requires_grad_(True)
