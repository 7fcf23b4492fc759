"""The BatchNorm + ReLU op of the aggregation head and the CTAM projections (`torch.ops.fused_mtl_attn.batch_norm_relu`
and its backward, C++ CPU kernels) against PyTorch's own batch_norm and relu with autograd: with and without the
ReLU, batch and given statistics, float64 to rounding and float32 against float64, tails shorter than a vector,
strided blocks, every instruction set this CPU supports, bitwise determinism over thread counts, its autograd
formula, opcheck and bad arguments. The fused network's parity tests cover its use."""
import pytest
import torch
import torch.nn.functional as F

import fused_mtl_attn

from .helpers import assert_same_for_any_thread_count

CPU_BUILT = fused_mtl_attn.available_backends()["cpu"][0]
cpp_backend = pytest.importorskip("fused_mtl_attn.cpp_backend") if CPU_BUILT else None
CPU_ISAS = cpp_backend.supported_cpu_isas() if CPU_BUILT else []
pytestmark = pytest.mark.skipif(not CPU_BUILT, reason="the C++ extension is not built")
EPS = 1e-5

# (B, C, N): N below, at and past whole vectors (AVX-512 float: 16 lanes), one position, one channel
SHAPES = [(2, 5, 37), (2, 3, 1), (3, 1, 64), (2, 4, 16), (1, 6, 7), (2, 3, 160)]


def _inputs(shape, dtype, strided=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    b, c, n = shape
    if strided:  # a block of channels of a wider map, as the aggregation head passes it
        h = (torch.randn(b, c + 5, n, generator=gen, dtype=torch.float64) * 2 + 0.5)[:, 2:2 + c]
    else:
        h = torch.randn(b, c, n, generator=gen, dtype=torch.float64) * 2 + 0.5
    weight = torch.randn(c, generator=gen, dtype=torch.float64)
    bias = torch.randn(c, generator=gen, dtype=torch.float64)
    running = (torch.randn(c, generator=gen, dtype=torch.float64), torch.rand(c, generator=gen, dtype=torch.float64) + 0.5)
    grad = torch.randn(b, c, n, generator=gen, dtype=torch.float64)
    return [t.to(dtype) for t in (h, weight, bias, *running, grad)]


def _reference(h, weight, bias, mean, var, grad, relu=True):
    """PyTorch's batch_norm (batch statistics when mean is None) and relu, with autograd; the gradient of a bias
    added before BN is that of h summed over batch and positions."""
    h, weight, bias = (t.detach().clone().requires_grad_() for t in (h, weight, bias))
    batch_stats = mean is None
    out = F.batch_norm(h, None if batch_stats else mean, None if batch_stats else var, weight, bias,
                       training=batch_stats, eps=EPS)
    out = F.relu(out) if relu else out
    out.backward(grad)
    if batch_stats:
        mean, var = h.detach().mean((0, 2)), h.detach().var((0, 2), unbiased=False)
    return out.detach(), mean, var, h.grad, weight.grad, bias.grad, h.grad.sum((0, 2))


def _op(h, weight, bias, mean, var, grad, relu=True):
    ops = torch.ops.fused_mtl_attn
    out, m, v = ops.batch_norm_relu(h, weight, bias, mean, var, EPS, relu)
    return (out, m, v) + ops.batch_norm_relu_backward(grad, h, m, v, weight, bias, EPS, mean is None, relu)


@pytest.mark.parametrize("isa", CPU_ISAS)
@pytest.mark.parametrize("relu", [True, False], ids=["relu", "no-relu"])
@pytest.mark.parametrize("batch_stats", [True, False], ids=["batch-stats", "running-stats"])
@pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "strided"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_pytorch_float64(shape, strided, batch_stats, relu, isa):
    h, w, b, rm, rv, g = _inputs(shape, torch.float64, strided)
    stats = (None, None) if batch_stats else (rm, rv)
    want = _reference(h, w, b, *stats, g, relu)
    with cpp_backend.use_cpu_isa(isa):
        got = _op(h, w, b, *stats, g, relu)
    for name, x, y in zip(("out", "mean", "var", "dh", "dweight", "dbias", "dh_sum"), got, want):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-12, msg=name)


@pytest.mark.parametrize("isa", CPU_ISAS)
@pytest.mark.parametrize("relu", [True, False], ids=["relu", "no-relu"])
@pytest.mark.parametrize("batch_stats", [True, False], ids=["batch-stats", "running-stats"])
def test_float32_against_float64(batch_stats, relu, isa):
    inputs64 = _inputs((2, 6, 301), torch.float64, strided=True)
    stats = slice(3, 5) if not batch_stats else slice(0, 0)
    want = _reference(*inputs64[:3], *(inputs64[stats] or (None, None)), inputs64[5], relu)
    inputs32 = [t.float() for t in inputs64]
    with cpp_backend.use_cpu_isa(isa):
        got = _op(*inputs32[:3], *(inputs32[stats] or (None, None)), inputs32[5], relu)
    for name, x, y in zip(("out", "mean", "var", "dh", "dweight", "dbias", "dh_sum"), got, want):
        assert x.dtype == torch.float32
        torch.testing.assert_close(x.double(), y, rtol=1e-5, atol=2e-5, msg=name)


def test_inactive_channel_has_zero_gradients():
    h, w, b, rm, rv, g = _inputs((2, 3, 20), torch.float64)
    b[1] = -1e3  # every position of channel 1 below zero after BN
    got = _op(h, w, b, None, None, g)
    assert torch.all(got[0][:, 1] == 0) and torch.all(got[3][:, 1] == 0)
    assert got[4][1] == 0 and got[5][1] == 0


def test_bitwise_identical_for_any_thread_count():
    h, w, b, _, _, g = _inputs((2, 40, 999), torch.float32)
    assert_same_for_any_thread_count(lambda: _op(h, w, b, None, None, g))


@pytest.mark.parametrize("relu", [True, False], ids=["relu", "no-relu"])
@pytest.mark.parametrize("batch_stats", [True, False], ids=["batch-stats", "running-stats"])
def test_autograd_formula(batch_stats, relu):
    """Autograd through the op (as the CTAM projections use it) gives PyTorch's gradients of h, weight and bias;
    the statistics it returns are not differentiable."""
    h, w, b, rm, rv, g = _inputs((2, 5, 37), torch.float64, strided=True)
    stats = (None, None) if batch_stats else (rm, rv)
    want = _reference(h, w, b, *stats, g, relu)
    h, w, b = (t.detach().clone().requires_grad_() for t in (h, w, b))
    out, mean, var = torch.ops.fused_mtl_attn.batch_norm_relu(h, w, b, *stats, EPS, relu)
    assert not mean.requires_grad and not var.requires_grad
    out.backward(g)
    for name, x, y in zip(("out", "mean", "var", "dh", "dweight", "dbias"), (out.detach(), mean, var, h.grad, w.grad,
                                                                            b.grad), want):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-12, msg=name)
    torch.autograd.gradcheck(lambda *a: torch.ops.fused_mtl_attn.batch_norm_relu(*a, *stats, EPS, relu)[0],
                             (h.detach()[:, :, :9].requires_grad_(), w.detach().requires_grad_(),
                              b.detach().requires_grad_()))


@pytest.mark.parametrize("relu", [True, False], ids=["relu", "no-relu"])
@pytest.mark.parametrize("batch_stats", [True, False], ids=["batch-stats", "running-stats"])
def test_opcheck(batch_stats, relu):
    h, w, b, rm, rv, g = _inputs((2, 3, 9), torch.float32, strided=True)
    stats = (None, None) if batch_stats else (rm, rv)
    torch.library.opcheck(torch.ops.fused_mtl_attn.batch_norm_relu.default, (h, w, b, *stats, EPS, relu))
    _, m, v = torch.ops.fused_mtl_attn.batch_norm_relu(h, w, b, *stats, EPS, relu)
    torch.library.opcheck(torch.ops.fused_mtl_attn.batch_norm_relu_backward.default,
                          (g, h, m, v, w, b, EPS, batch_stats, relu))


def _bad_forward(**change):
    h, w, b, rm, rv, _ = _inputs((2, 3, 8), torch.float32)
    args = {"h": h, "weight": w, "bias": b, "mean": None, "var": None, "eps": EPS, **change}
    return torch.ops.fused_mtl_attn.batch_norm_relu(*args.values())


@pytest.mark.parametrize("change, message", [
    ({"h": torch.zeros(2, 3)}, r"h must have rank 3 \[B, C, N\]"),
    ({"h": torch.zeros(2, 3, 8, dtype=torch.float16)}, "h must be float32 or float64"),
    ({"h": torch.zeros(0, 3, 8)}, "at least one value per channel"),
    ({"weight": torch.ones(4)}, r"weight must be \[C\] = \[3\]"),
    ({"bias": torch.ones(3, dtype=torch.float64)}, "bias must be Float"),
    ({"mean": torch.zeros(3)}, "mean and var must be given together"),
    ({"mean": torch.zeros(2), "var": torch.ones(2)}, r"mean must be \[C\] = \[3\]"),
    ({"eps": 0.0}, "eps must be positive"),
])
def test_forward_bad_arguments(change, message):
    with pytest.raises(RuntimeError, match=message):
        _bad_forward(**change)


def test_backward_bad_grad():
    h, w, b, rm, rv, _ = _inputs((2, 3, 8), torch.float32)
    with pytest.raises(RuntimeError, match="grad must match h"):
        torch.ops.fused_mtl_attn.batch_norm_relu_backward(torch.zeros(2, 3, 7), h, rm, rv, w, b, EPS, True)
