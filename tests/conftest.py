"""Test set-up: without CUDA, Triton kernels run under the interpreter (TRITON_INTERPRET=1).

The variable must be set before `triton.jit` decorates anything, i.e. before fusealign is imported.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
