"""Training-mode BatchNorm of channels-last maps (`torch.ops.fused_mtl_attn.batch_norm_channels_last` and its
backward, C++ CPU kernels; used by the fused path's BatchNorm layers through model.fused_ops) against PyTorch's
batch_norm with autograd: outputs, batch statistics and gradients, float64 to rounding and float32 against float64,
channel counts below and past whole vectors, every instruction set this CPU supports; the output keeps the input's
strides and is no view; bitwise determinism over thread counts; opcheck; bad arguments; FusedBatchNorm2d with the
kernel taking every map (model.fused_ops.CHANNELS_LAST_BATCH_NORM_MIN_ROWS lowered) against nn.BatchNorm2d (outputs
and running statistics, train and eval, both layouts); and which maps the network gives the kernel by default."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fused_mtl_attn

from .helpers import assert_same_for_any_thread_count, relative_error

CPU_BUILT = fused_mtl_attn.available_backends()["cpu"][0]
cpp_backend = pytest.importorskip("fused_mtl_attn.cpp_backend") if CPU_BUILT else None
CPU_ISAS = cpp_backend.supported_cpu_isas() if CPU_BUILT else []
pytestmark = pytest.mark.skipif(not CPU_BUILT, reason="the C++ extension is not built")
EPS = 1e-5

# channels-last maps [B, C, H, W] (18 and 36 channels as in the network; 1, 5, 40 around vector widths) and a
# [B, C, N] view with channels innermost, as the fused CTAM stacks positions
SHAPES = [(2, 18, 9, 7), (2, 36, 4, 5), (1, 5, 3, 1), (2, 1, 4, 4), (3, 40, 2, 3), (2, 7, 11)]


def _channels_last(t: torch.Tensor) -> torch.Tensor:
    """t with its channels innermost in memory: channels-last for 4-D, [B, N, C] transposed for 3-D."""
    return t.movedim(1, -1).contiguous().movedim(-1, 1)


def _inputs(shape, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    c = shape[1]
    x = torch.randn(shape, generator=gen, dtype=torch.float64) * 3 + 1
    grad = torch.randn(shape, generator=gen, dtype=torch.float64)
    weight = torch.randn(c, generator=gen, dtype=torch.float64)
    bias = torch.randn(c, generator=gen, dtype=torch.float64)
    return [_channels_last(t.to(dtype)) if t.dim() > 1 else t.to(dtype) for t in (x, grad, weight, bias)]


def _op(x, grad, weight, bias):
    x, weight, bias = (t.detach().clone().requires_grad_() for t in (x, weight, bias))
    out, mean, var = torch.ops.fused_mtl_attn.batch_norm_channels_last(x, weight, bias, EPS)
    out.backward(grad)
    return out.detach(), mean, var, x.grad, weight.grad, bias.grad


def _reference(x, grad, weight, bias):
    x, weight, bias = (t.detach().clone().double().requires_grad_() for t in (x, weight, bias))
    out = F.batch_norm(x, None, None, weight, bias, training=True, eps=EPS)
    out.backward(grad.double())
    dims = [d for d in range(x.dim()) if d != 1]
    return (out.detach(), x.detach().mean(dims), x.detach().var(dims, unbiased=False), x.grad, weight.grad,
            bias.grad)


NAMES = ("out", "mean", "var", "dx", "dweight", "dbias")


@pytest.mark.parametrize("isa", CPU_ISAS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_float64_matches_pytorch_to_rounding(shape, isa):
    args = _inputs(shape, torch.float64)
    with cpp_backend.use_cpu_isa(isa):
        got = _op(*args)
    for name, a, b in zip(NAMES, got, _reference(*args)):
        assert relative_error(a, b) < 1e-12, name


@pytest.mark.parametrize("isa", CPU_ISAS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_float32_matches_float64_to_float32_rounding(shape, isa):
    with cpp_backend.use_cpu_isa(isa):
        got = _op(*_inputs(shape, torch.float32))
    for name, a, b in zip(NAMES, got, _reference(*_inputs(shape, torch.float64))):
        assert relative_error(a, b) < 1e-5, name


def test_outputs_keep_the_input_strides_and_are_not_views():
    # a view of another shape would make an in-place op after BatchNorm (a residual add, an in-place ReLU) copy the
    # whole map in backward (autograd's CopySlices)
    x, grad, weight, bias = _inputs((2, 6, 5, 3), torch.float32)
    x.requires_grad_()
    out = torch.ops.fused_mtl_attn.batch_norm_channels_last(x, weight, bias, EPS)[0]
    assert out.stride() == x.stride() and out._base is None
    (dx,) = torch.autograd.grad(out, x, grad.contiguous())  # an NCHW gradient is accepted
    assert dx.stride() == x.stride()


def test_an_nchw_gradient_gives_the_same_result():
    x, grad, weight, bias = _inputs((2, 6, 5, 3), torch.float64)
    x.requires_grad_()
    out = torch.ops.fused_mtl_attn.batch_norm_channels_last(x, weight, bias, EPS)[0]
    (dx_cl,) = torch.autograd.grad(out, x, grad, retain_graph=True)
    (dx_nchw,) = torch.autograd.grad(out, x, grad.contiguous())
    assert torch.equal(dx_cl, dx_nchw)


def test_results_do_not_depend_on_the_thread_count():
    args = _inputs((4, 18, 16, 20), torch.float32)  # 1280 rows: five chunks of 256
    assert_same_for_any_thread_count(lambda: _op(*args))


def test_opcheck():
    x, grad, weight, bias = _inputs((2, 5, 3, 4), torch.float32)
    ops = torch.ops.fused_mtl_attn
    torch.library.opcheck(ops.batch_norm_channels_last.default,
                          (x.requires_grad_(), weight.requires_grad_(), bias.requires_grad_(), EPS))
    _, mean, var = ops.batch_norm_channels_last(x, weight, bias, EPS)
    torch.library.opcheck(ops.batch_norm_channels_last_backward.default,
                          (grad, x.detach(), mean, var, weight.detach(), EPS))


@pytest.mark.parametrize("x, weight, match", [
    (torch.zeros(2, 3, 4, 5), torch.zeros(3), "channels innermost"),
    (_channels_last(torch.zeros(1, 3, 1, 1)), torch.zeros(3), "more than one value per channel"),
    (_channels_last(torch.zeros(2, 3, 4, 5)), torch.zeros(4), r"weight must be \[C\]"),
    (_channels_last(torch.zeros(2, 3, 4, 5)).long(), torch.zeros(3), "float32 or float64"),
])
def test_bad_arguments_are_named(x, weight, match):
    with pytest.raises(RuntimeError, match=match):
        torch.ops.fused_mtl_attn.batch_norm_channels_last(x, weight, torch.zeros(x.shape[1]), EPS)


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("layout", ["channels_last", "nchw"])
def test_fused_batch_norm_module_is_batch_norm_2d(layout, momentum, monkeypatch):
    import model.fused_ops
    from model.fused import FusedBatchNorm2d

    monkeypatch.setattr(model.fused_ops, "CHANNELS_LAST_BATCH_NORM_MIN_ROWS", 2)

    ref = nn.BatchNorm2d(6, momentum=momentum).double()
    with torch.no_grad():
        ref.weight.normal_()
        ref.bias.normal_()
    fused = copy.deepcopy(ref)
    fused.__class__ = FusedBatchNorm2d
    gen = torch.Generator().manual_seed(0)
    for step in range(3):  # train, train, eval: the running statistics are used once they are updated twice
        x = torch.randn(2, 6, 5, 4, generator=gen, dtype=torch.float64) * 2 + 1
        x = x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x
        for m in (ref, fused):
            m.train(step < 2)
        xr, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
        out_r, out_f = ref(xr), fused(xf)
        torch.testing.assert_close(out_f, out_r, rtol=1e-12, atol=1e-12)
        grad = torch.randn_like(x)
        out_r.backward(grad)
        out_f.backward(grad)
        torch.testing.assert_close(xf.grad, xr.grad, rtol=1e-12, atol=1e-12)
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            torch.testing.assert_close(getattr(fused, name), getattr(ref, name), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="expected 4D input"):
        fused(torch.zeros(2, 6, 5))


@pytest.mark.skipif(not CPU_BUILT, reason="the C++ extension is not built")
def test_the_kernel_takes_large_channels_last_maps_only(monkeypatch):
    """By default the network's large channels-last maps go to the kernel (where PyTorch's channels-last BatchNorm
    is 2-3x slower), small ones and NCHW maps to PyTorch; None switches the kernel off."""
    import model.fused_ops
    from model.fused_ops import CHANNELS_LAST_BATCH_NORM_MIN_ROWS, channels_last_kernel_runs

    weight, bias = torch.ones(18), torch.zeros(18)
    large = _channels_last(torch.zeros(2, 18, 64, 80))
    assert 2 * 64 * 80 >= CHANNELS_LAST_BATCH_NORM_MIN_ROWS  # the 1/4 scale at 256x320, batch 2
    assert channels_last_kernel_runs(large, weight, bias)
    assert channels_last_kernel_runs(large.double(), weight.double(), bias.double())
    assert not channels_last_kernel_runs(large.contiguous(), weight, bias)  # NCHW
    assert not channels_last_kernel_runs(large, weight.double(), bias.double())  # parameters of another dtype
    assert not channels_last_kernel_runs(large, None, None)  # affine=False
    assert not channels_last_kernel_runs(_channels_last(torch.zeros(2, 18, 8, 10)), weight, bias)  # 160 rows
    monkeypatch.setattr(model.fused_ops, "CHANNELS_LAST_BATCH_NORM_MIN_ROWS", None)
    assert not channels_last_kernel_runs(large, weight, bias)
    monkeypatch.setattr(model.fused_ops, "CHANNELS_LAST_BATCH_NORM_MIN_ROWS", 0)  # one value per channel: never
    assert not channels_last_kernel_runs(_channels_last(torch.zeros(1, 18, 1, 1)), weight, bias)
