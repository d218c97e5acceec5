"""Per-sequence sums of per-token values in a fixed order: deterministic on CUDA, no host sync.

`index_add` / `scatter_add` on CUDA add floats with atomics, so a packed batch's per-sequence log-prob
sums (DPO, KL-to-reference) could differ in the last bits between two identical runs. Here the
tokens are ordered by sequence (a stable sort: already-sorted packed batches keep their order) and
each sequence is reduced by `torch.segment_reduce`, one segment at a time, in token order.
"""

from __future__ import annotations

import torch


def segment_sum(values: torch.Tensor, segment_ids: torch.Tensor, num_segments: int) -> torch.Tensor:
    """values: (N,) float, segment_ids: (N,) int in [0, num_segments)  ->  (num_segments,) sums.

    Equivalent to `values.new_zeros(S).index_add(0, segment_ids, values)` (empty segments sum to 0),
    differentiable in `values`, and bitwise reproducible on every device. Ids are not range-checked
    here (callers check them once); an id ≥ num_segments raises, as index_add would.
    """
    ids = segment_ids.long()
    lengths = torch.zeros(num_segments, dtype=torch.long, device=ids.device)
    lengths.scatter_add_(0, ids, torch.ones_like(ids))  # integer adds: order-independent, exact
    order = torch.argsort(ids, stable=True)
    return torch.segment_reduce(values[order], "sum", lengths=lengths, unsafe=True)
