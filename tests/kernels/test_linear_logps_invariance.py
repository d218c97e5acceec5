"""Batch invariance of the Triton path: a token's outputs do not depend on its neighbours.

PPO divides train-time by rollout-time probabilities of the same tokens, scored in differently
composed batches; any batch-dependent rounding shows up as ratio noise at step 0.
"""

import pytest
import torch
from helpers import TRITON_DEVICE

import fusealign as fa


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
def test_token_alone_equals_token_in_batch_of_1000(dtype):
    g = torch.Generator().manual_seed(0)
    N, H, V = 1000, 32, 100
    hidden = torch.randn(N, H, generator=g).to(dtype).to(TRITON_DEVICE)
    weight = torch.randn(V, H, generator=g).to(dtype).to(TRITON_DEVICE)
    targets = torch.randint(0, V, (N,), generator=g).to(TRITON_DEVICE)
    logps, entropy = fa.linear_logps(hidden, weight, targets, return_entropy=True, backend="triton")
    # Positions at the start, middle, a tile edge and the ragged tail of the batch.
    for i in (0, 15, 16, 511, 998, 999):
        one_l, one_e = fa.linear_logps(hidden[i:i + 1], weight, targets[i:i + 1], return_entropy=True,
                                       backend="triton")
        assert torch.equal(one_l[0], logps[i]), f"token {i}: logps differ alone vs in batch"
        assert torch.equal(one_e[0], entropy[i]), f"token {i}: entropy differs alone vs in batch"
    # And inside a differently composed batch: the same tokens shuffled among others.
    perm = torch.randperm(N, generator=g).to(TRITON_DEVICE)[:300]
    sub_l, sub_e = fa.linear_logps(hidden[perm], weight, targets[perm], return_entropy=True, backend="triton")
    assert torch.equal(sub_l, logps[perm]) and torch.equal(sub_e, entropy[perm])


@pytest.mark.gpu
def test_batch_invariance_large_vocab_gpu():
    g = torch.Generator().manual_seed(0)
    N, H, V = 4096, 1024, 128_256
    hidden = torch.randn(N, H, generator=g).bfloat16().cuda()
    weight = (torch.randn(V, H, generator=g) / 32).bfloat16().cuda()
    targets = torch.randint(0, V, (N,), generator=g).cuda()
    logps = fa.linear_logps(hidden, weight, targets, backend="triton")
    for i in (0, 1, 127, 128, 4095):
        assert torch.equal(fa.linear_logps(hidden[i:i + 1], weight, targets[i:i + 1], backend="triton")[0], logps[i])
    half = fa.linear_logps(hidden[N // 2:], weight, targets[N // 2:], backend="triton")
    assert torch.equal(half, logps[N // 2:])
