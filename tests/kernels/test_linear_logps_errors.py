"""Bad input gets a clear error naming the argument, never a silent wrong answer."""

import pytest
import torch

import fusealign as fa


def ok_inputs(N=4, H=8, V=10):
    return torch.randn(N, H), torch.randn(V, H), torch.randint(0, V, (N,))


@pytest.mark.parametrize("backend", ("torch", "triton"))
def test_error_cases(backend):
    h, W, y = ok_inputs()
    call = lambda *a, **k: fa.linear_logps(*a, backend=backend, **k)  # noqa: E731
    with pytest.raises(ValueError, match="hidden size mismatch.*H=8.*H=5"):
        call(h, torch.randn(10, 5), y)
    with pytest.raises(ValueError, match="targets shape"):
        call(h, W, torch.randint(0, 10, (5,)))
    with pytest.raises(TypeError, match="targets must be int64 or int32"):
        call(h, W, y.float())
    with pytest.raises(ValueError, match=r"targets must lie in \[0, V=10\).*e\.g\. 10"):
        call(h, W, torch.tensor([0, 1, 10, -100]))
    with pytest.raises(ValueError, match="e.g. -3"):
        call(h, W, torch.tensor([0, -3, 1, 2]))
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        call(h, W, y, temperature=0.0)
    with pytest.raises(ValueError, match="temperature"):
        call(h, W, y, temperature=-1.0)
    with pytest.raises(TypeError, match="temperature must be a Python float"):
        call(h, W, y, temperature=torch.tensor(1.0))
    with pytest.raises(ValueError, match="softcap must be a finite number > 0"):
        call(h, W, y, softcap=0.0)
    with pytest.raises(TypeError, match="hidden has unsupported dtype torch.float64"):
        call(h.double(), W.double(), y)
    with pytest.raises(TypeError, match="weight dtype torch.bfloat16 differs from hidden dtype torch.float32"):
        call(h, W.bfloat16(), y)
    with pytest.raises(ValueError, match="bias must have shape"):
        call(h, W, y, bias=torch.randn(9))
    with pytest.raises(ValueError, match="weight must have shape \\(V, H\\)"):
        call(h, W[None], y)
    with pytest.raises(ValueError, match="hidden is on cpu but weight is on meta"):
        call(h, W.to("meta"), y)
    with pytest.raises(ValueError, match="chunk_bytes"):
        call(h, W, y, chunk_bytes=0)


def test_unknown_backend_lists_valid_ones():
    h, W, y = ok_inputs()
    with pytest.raises(ValueError, match=r"backend must be one of \('auto', 'triton', 'torch'\)"):
        fa.linear_logps(h, W, y, backend="cuda")


def test_triton_on_cpu_without_interpreter_is_refused(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    h, W, y = ok_inputs()
    with pytest.raises(ValueError, match="backend='triton' needs CUDA tensors"):
        fa.linear_logps(h, W, y, backend="triton")


def test_ignore_index_may_be_any_value():
    h, W, _ = ok_inputs()
    out = fa.linear_logps(h, W, torch.tensor([1, 7, 7, 2]), ignore_index=7, backend="torch")
    assert out[1] == 0 and out[2] == 0 and out[0] < 0
