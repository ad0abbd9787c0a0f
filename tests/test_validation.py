"""Bad input gets a clear ValueError/TypeError that names the argument and the rule."""

import pytest
import torch

from dinat import kernels
from dinat.kernels import backends


def qkv(shape=(1, 8, 8, 2, 4), dtype=torch.float32):
    return [torch.randn(shape, dtype=dtype) for _ in range(3)]


@pytest.mark.parametrize(
    "kwargs,exc,pattern",
    [
        (dict(kernel_size=1), ValueError, r"kernel_size must be >= 2.*axis 0"),
        (dict(kernel_size=9), ValueError, r"axis 0 \(height, size 8\).*kernel_size 9 with dilation 1.*9 <= 8"),
        (dict(kernel_size=3, dilation=(1, 3)), ValueError, r"axis 1 \(width, size 8\).*kernel_size 3 with dilation 3"),
        (dict(kernel_size=3, dilation=0), ValueError, r"dilation must be >= 1"),
        (dict(kernel_size=(3, 3, 3)), ValueError, r"kernel_size must be an int or a sequence of 2"),
        (dict(kernel_size=3.0), TypeError, r"kernel_size must be an int"),
        (dict(kernel_size=True), TypeError, r"kernel_size must be an int"),
        (dict(kernel_size=3, is_causal=1), TypeError, r"is_causal must be a bool"),
        (dict(kernel_size=3, is_causal=(True,)), ValueError, r"is_causal must be a bool or a sequence of 2"),
        (dict(kernel_size=3, scale="x"), TypeError, r"scale must be a real number"),
        (dict(kernel_size=3, backend="cuda"), ValueError, r"backend must be 'auto' or one of"),
        (dict(kernel_size=3, backend=3), TypeError, r"backend must be a string"),
    ],
)
def test_bad_parameters(kwargs, exc, pattern):
    with pytest.raises(exc, match=pattern):
        kernels.na2d(*qkv(), **kwargs)


def test_rank_mismatch_names_layout():
    q, k, v = qkv((1, 8, 2, 4))
    with pytest.raises(ValueError, match=r"na2d: query must have rank 5 \[batch, height, width, heads, head_dim\]"):
        kernels.na2d(q, k, v, 3)
    with pytest.raises(ValueError, match=r"na3d_qk: query must have rank 6"):
        kernels.na3d_qk(q, k, 3)


def test_tensor_mismatches():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="key shape .* must equal query shape"):
        kernels.na2d(q, k[..., :3], v, 3)
    with pytest.raises(TypeError, match="value dtype torch.float16 must equal query dtype torch.float32"):
        kernels.na2d(q, k, v.half(), 3)
    with pytest.raises(TypeError, match="query must be a floating tensor"):
        kernels.na2d(q.long(), k.long(), v.long(), 3)
    with pytest.raises(TypeError, match="key must be a torch.Tensor"):
        kernels.na2d(q, k.numpy(), v, 3)
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="value is on cuda"):
            kernels.na2d(q, k, v.cuda(), 3)


def test_rpb_rules():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"rpb must have shape \[heads, 2\*k-1 per axis\] = \[2, 5, 5\]; got \[2, 5, 3\]"):
        kernels.na2d(q, k, v, 3, rpb=torch.zeros(2, 5, 3))
    with pytest.raises(ValueError, match=r"rpb needs an odd kernel_size on every axis"):
        kernels.na2d(q, k, v, (3, 4), rpb=torch.zeros(2, 5, 7))
    with pytest.raises(ValueError, match=r"rpb is not defined for causal attention"):
        kernels.na2d(q, k, v, 3, is_causal=(True, False), rpb=torch.zeros(2, 5, 5))
    with pytest.raises(TypeError, match="rpb must be a floating tensor"):
        kernels.na2d_qk(q, k, 3, rpb=torch.zeros(2, 5, 5, dtype=torch.int32))
    # A float32 bias with half inputs is fine (a model's parameter under autocast).
    out = kernels.na2d(q.half(), k.half(), v.half(), 3, rpb=torch.zeros(2, 5, 5))
    assert out.dtype == torch.float16


def test_av_attn_shape():
    q, k, v = qkv()
    attn = torch.softmax(kernels.na2d_qk(q, k, 3), -1)
    with pytest.raises(ValueError, match=r"attn must have shape \[batch, \*spatial, heads, prod\(kernel_size\)\] = \[1, 8, 8, 2, 9\]"):
        kernels.na2d_av(attn[..., :4], v, 3)


def test_unavailable_backend_is_an_error(monkeypatch):
    monkeypatch.setitem(backends.BACKENDS, "missing", "dinat.kernels._no_such_backend")
    with pytest.raises(ValueError, match=r"backend='missing' is unavailable for tensors on cpu: it cannot be imported"):
        kernels.na2d(*qkv(), 3, backend="missing")
    assert "missing" not in kernels.available_backends("cpu")
    assert "reference" in kernels.available_backends("cpu")


def test_auto_uses_tiled_on_cpu():
    # Changed by issue 13: "auto" on CPU was the reference; now the tiled PyTorch backend runs naXd
    # there, and the reference only the qk/av ops that "tiled" does not provide.
    assert backends.resolve("auto", torch.device("cpu")).__name__ == "dinat.kernels.tiled"
    assert backends.resolve("auto", torch.device("cpu"), "qk").__name__ == "dinat.kernels.reference"


def test_auto_passes_over_backends_that_cannot_take_the_problem(monkeypatch):
    """"auto" skips a backend whose limits (here float64) exclude the problem, for the next one."""
    monkeypatch.setitem(backends.AUTO_ORDER, "cpu", ("fused", "unfused", "reference"))
    cpu = torch.device("cpu")
    available = kernels.available_backends(cpu)
    q64 = torch.randn(1, 8, 8, 2, 4, dtype=torch.float64)
    assert backends.resolve("auto", cpu, "na", q64).__name__ == "dinat.kernels.reference"
    assert backends.resolve("auto", cpu, "av", q64).__name__ == "dinat.kernels.reference"
    if "fused" in available:  # Triton importable and the interpreter on (tests/conftest.py)
        assert backends.resolve("auto", cpu, "na", q64.float()).__name__ == "dinat.kernels.fused"
        assert backends.resolve("auto", cpu, "qk", q64.float()).__name__ == "dinat.kernels.unfused"
        out = kernels.na2d(q64, q64, q64, 3)  # float64 through "auto": the reference, no error
        assert out.dtype == torch.float64
