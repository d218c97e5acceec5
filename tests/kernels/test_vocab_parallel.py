"""Per-shard statistics of a vocabulary-split head combine to the single-device result."""

import pytest
import torch
from helpers import BACKENDS, device_for, max_abs

import fusealign as fa
from fusealign.kernels.vocab_parallel import combine_stats, shard_stats


@pytest.mark.parametrize("backend", BACKENDS)
def test_shards_combine_to_full_head(backend):
    dev = device_for(backend)
    g = torch.Generator().manual_seed(0)
    N, H, V = 20, 32, 301
    hidden = torch.randn(N, H, generator=g).to(dev)
    weight = (torch.randn(V, H, generator=g) / 4).to(dev)
    targets = torch.randint(0, V, (N,), generator=g).to(dev)
    targets[3] = -100
    full_l, full_e = fa.linear_logps(hidden, weight, targets, return_entropy=True, temperature=0.8, backend=backend)
    bounds = [0, 90, 91, 250, V]  # uneven shards, one of a single row
    stats = torch.cat([shard_stats(hidden, weight[a:b], targets, vocab_start=a, temperature=0.8, backend=backend)
                       for a, b in zip(bounds, bounds[1:])])
    logps, entropy, lse, _ = combine_stats(stats, targets, ignore_index=-100)
    assert max_abs(logps, full_l) < 1e-5 and max_abs(entropy, full_e) < 1e-5
    assert logps[3] == 0
    ref_lse = torch.logsumexp(hidden.double() @ weight.double().T / 0.8, -1)
    assert max_abs(lse, ref_lse) < 1e-5
