"""Test set-up: without CUDA, Triton kernels run under the interpreter (TRITON_INTERPRET=1).

The variable must be set before `triton.jit` decorates anything, i.e. before fusealign is imported.
"""

import os

import torch

# One intra-op thread in the test process: its models and CPU kernels are small, and on a 2-core machine shared
# with other work torch's 2-thread pool stalls — tests/engine/test_ppo.py took 62 s with 2 threads and 12.5 s
# with 1 (load average 2.5). The processes the tests start (CLI runs, torchrun ranks, the memory tests' children)
# inherit the rule through OMP_NUM_THREADS, which sets torch's default: with the other xdist worker busy, a child's
# 2-thread pool spun in OpenMP's barrier — the peak-memory child at (8192, 65536) took 35 s in the suite and 13.5 s
# on one thread (its peaks are the same at 1 and 2 threads, within 3 MB). An OMP_NUM_THREADS already set is kept.
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _one_intra_op_thread():
    """Keep the one-thread rule after every test: an in-process run sets torch's threads to its `--threads`
    (engine/runtime.set_threads) and a later test that forks ranks (torch.multiprocessing, start_method="fork")
    would copy an OpenMP pool whose threads do not exist in the child — which then waits in libgomp's barrier
    forever (found as a hung xdist worker)."""
    yield
    if torch.get_num_threads() != 1:
        torch.set_num_threads(1)


# The files that take a minute or more of one worker (`--durations`, 2-core machine) start first: scripts/test.sh
# has pytest-xdist hand out whole files (`--dist loadfile`) in collection order (`--no-loadscope-reorder`; by
# default xdist sorts files by test count, which started the compile check and the property tests, 3 and 6 tests,
# near the end). The rest keep their order behind them.
HEAVY_FIRST = ("engine/test_compare.py", "engine/test_distributed.py", "kernels/test_cuda_compile.py",
               "kernels/test_properties.py", "test_cli.py")


def _start_rank(item) -> int:
    path = item.nodeid.split("::")[0]
    return next((i for i, name in enumerate(HEAVY_FIRST) if path == f"tests/{name}"), len(HEAVY_FIRST))


def pytest_collection_modifyitems(config, items):
    from fusealign.engine.rollout import vllm_installed

    items.sort(key=_start_rank)  # stable: each file's tests stay together and in order

    if not vllm_installed():  # tests/vllm_rollout: the CI's own step, in .venv-vllm
        skip_vllm = pytest.mark.skip(reason="needs vLLM: bash scripts/venv-vllm.sh, then "
                                            ".venv-vllm/bin/python -m pytest tests/vllm_rollout")
        for item in items:
            if "vllm" in item.keywords:
                item.add_marker(skip_vllm)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
