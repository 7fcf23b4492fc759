"""Swin's window attention op (`fused_mtl_attn.window_attention`, C++ CPU kernels) against its eager reference
(`fused_mtl_attn.reference.window_attention`, the code the reference network runs) with autograd: values and the
gradients of qkv and of the bias, with and without the shifted windows' mask, window lengths below, at and past whole
vectors, head dims from 1 to 36, float64 to rounding and float32 against float64, every instruction set this CPU
supports; bitwise determinism over thread counts; opcheck; the fallbacks; bad arguments. The fused network's parity
tests cover its use in the Swin layers."""
import pytest
import torch

import fused_mtl_attn
from fused_mtl_attn import reference, window_attention

from .helpers import assert_same_for_any_thread_count, relative_error

CPU_BUILT = fused_mtl_attn.available_backends()["cpu"][0]
cpp_backend = pytest.importorskip("fused_mtl_attn.cpp_backend") if CPU_BUILT else None
CPU_ISAS = cpp_backend.supported_cpu_isas() if CPU_BUILT else []
pytestmark = pytest.mark.skipif(not CPU_BUILT, reason="the C++ extension is not built")

# (windows BW, length L, heads, head dim d, mask windows nW or None): Swin's 7x7 windows (L = 49) at the network's
# head dims (3 at the 1/4 scale, 18 in FPMA), lengths below and past 16 lanes, one head, one window per mask
SHAPES = [(8, 49, 6, 3, 4), (6, 49, 4, 18, None), (4, 5, 2, 4, 2), (3, 17, 1, 7, None), (2, 70, 3, 2, 1),
          (2, 16, 2, 36, 2), (1, 1, 1, 1, None)]


def _inputs(shape, dtype, seed=0):
    bw, length, heads, d, n_mask = shape
    gen = torch.Generator().manual_seed(seed)
    qkv = torch.randn(bw, length, 3 * heads * d, generator=gen, dtype=torch.float64) * 2
    bias = torch.randn(heads, length, length, generator=gen, dtype=torch.float64)
    mask = None
    if n_mask is not None:  # Swin's mask: 0 inside a region, -100 across regions
        mask = torch.where(torch.rand(n_mask, length, length, generator=gen) < 0.3, -100.0, 0.0).double()
    grad = torch.randn(bw, length, heads * d, generator=gen, dtype=torch.float64)
    cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    return cast(qkv), cast(bias), cast(mask), cast(grad), heads, d ** -0.5


def _with_grads(fn, qkv, bias, mask, grad, heads, scale):
    qkv, bias = (t.detach().clone().requires_grad_() for t in (qkv, bias))
    out = fn(qkv, bias, mask, heads, scale)
    out.backward(grad)
    return out.detach(), qkv.grad, bias.grad


def _fused(qkv, bias, mask, heads, scale):
    return window_attention(qkv, bias, mask, heads=heads, scale=scale)


# float64: the reference to rounding; float32: rounding of sums over at most 70 keys and 70 windows, well below 1e-5
# of the largest value (the eager reference in float32 is 1e-7 to 1e-6 off on these shapes)
TOLERANCE = {torch.float64: 1e-13, torch.float32: 1e-5}


@pytest.mark.parametrize("isa", CPU_ISAS)
@pytest.mark.parametrize("dtype", list(TOLERANCE), ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_the_float64_reference(shape, dtype, isa):
    with cpp_backend.use_cpu_isa(isa):
        got = _with_grads(_fused, *_inputs(shape, dtype))
    exact = _with_grads(reference.window_attention, *_inputs(shape, torch.float64))
    for name, a, x in zip(("out", "dqkv", "dbias"), got, exact):
        assert relative_error(a, x) < TOLERANCE[dtype], name


def test_masked_logits_leave_no_subnormal_probabilities():
    # a -100 mask and a logit range near float32's exp limit: the probabilities underflow to exactly 0 (no NaN, no
    # subnormals), as the reference's do to within rounding
    qkv, bias, mask, grad, heads, scale = _inputs((4, 49, 2, 8, 2), torch.float32)
    bias = bias * 40
    got = _with_grads(_fused, qkv, bias, mask, grad, heads, scale)
    want = _with_grads(reference.window_attention, qkv.double(), bias.double(), mask.double(), grad.double(), heads,
                       scale)
    for a, b in zip(got, want):
        assert torch.isfinite(a).all()
        assert relative_error(a, b) < 1e-4  # logits up to ~100: float32 rounds them to 1e-5 relative


def test_bias_gradient_does_not_depend_on_the_thread_count():
    # 70 windows: more than the 32 groups whose partial bias gradients are summed in order
    args = _inputs((70, 49, 3, 4, 7), torch.float32)
    assert_same_for_any_thread_count(lambda: _with_grads(_fused, *args))


def test_opcheck():
    qkv, bias, mask, grad, heads, scale = _inputs((4, 9, 2, 3, 2), torch.float32)
    ops = torch.ops.fused_mtl_attn
    qkv.requires_grad_()
    bias.requires_grad_()
    torch.library.opcheck(ops.window_attention.default, (qkv, bias, mask, heads, scale))
    torch.library.opcheck(ops.window_attention.default, (qkv, bias, None, heads, scale))
    _, lse = ops.window_attention(qkv, bias, mask, heads, scale)
    torch.library.opcheck(ops.window_attention_backward.default,
                          (grad, qkv.detach(), bias.detach(), mask, lse, heads, scale))


def test_strided_inputs_give_the_contiguous_result():
    qkv, bias, mask, grad, heads, scale = _inputs((4, 9, 2, 3, 2), torch.float64)
    strided = torch.empty(qkv.shape[0], qkv.shape[1], qkv.shape[2] * 2, dtype=qkv.dtype)[..., ::2]
    strided.copy_(qkv)
    assert not strided.is_contiguous()
    got = _with_grads(_fused, strided, bias.transpose(1, 2).contiguous().transpose(1, 2), mask, grad, heads, scale)
    want = _with_grads(reference.window_attention, qkv, bias, mask, grad, heads, scale)
    for a, b in zip(got, want):
        assert relative_error(a, b) < 1e-13


def test_falls_back_to_the_reference_where_the_kernel_does_not_run():
    qkv, bias, mask, grad, heads, scale = _inputs((4, 9, 2, 3, 2), torch.float32)
    # bfloat16 (no kernel)
    q, b, m = qkv.bfloat16(), bias.bfloat16(), mask.bfloat16()
    torch.testing.assert_close(_fused(q, b, m, heads, scale), reference.window_attention(q, b, m, heads, scale))
    # autocast: the Linear gives a bfloat16 qkv, the bias table stays float32; the reference's casts
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = _fused(qkv.bfloat16(), bias, mask, heads, scale)
        want = reference.window_attention(qkv.bfloat16(), bias, mask, heads, scale)
    assert got.dtype == want.dtype
    torch.testing.assert_close(got, want)
    # a mask that asks for a gradient gets the reference's
    m = mask.clone().requires_grad_()
    _fused(qkv, bias, m, heads, scale).backward(grad)
    m_ref = mask.clone().requires_grad_()
    reference.window_attention(qkv, bias, m_ref, heads, scale).backward(grad)
    torch.testing.assert_close(m.grad, m_ref.grad)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(qkv=torch.zeros(2, 9, 12)[0]), ValueError, "qkv must have rank 3"),
    (dict(qkv=torch.zeros(2, 9, 10)), ValueError, "multiple of heads"),
    (dict(heads=0), ValueError, "heads must be an int >= 1"),
    (dict(heads=2.0), ValueError, "heads must be an int >= 1"),
    (dict(scale="1"), TypeError, "scale must be a real number"),
    (dict(bias=torch.zeros(2, 9, 8)), ValueError, "bias must be"),
    (dict(bias=[0.0]), TypeError, "bias must be a torch.Tensor"),
    (dict(mask=torch.zeros(3, 9, 9)), ValueError, "nW dividing"),
    (dict(mask=torch.zeros(2, 9, 8)), ValueError, "mask must be"),
    (dict(qkv=torch.zeros(2, 9, 12, dtype=torch.int64)), TypeError, "qkv must be a floating tensor"),
])
def test_bad_arguments_name_the_argument(kwargs, error, match):
    args = dict(qkv=torch.zeros(2, 9, 12), bias=torch.zeros(2, 9, 9), mask=torch.zeros(2, 9, 9), heads=2, scale=0.5)
    args.update(kwargs)
    with pytest.raises(error, match=match):
        window_attention(args["qkv"], args["bias"], args["mask"], heads=args["heads"], scale=args["scale"])


def test_the_ops_check_their_own_arguments():
    ops = torch.ops.fused_mtl_attn
    qkv, bias = torch.zeros(2, 9, 12), torch.zeros(2, 9, 9)
    with pytest.raises(RuntimeError, match="bias must be"):
        ops.window_attention(qkv, torch.zeros(3, 9, 9), None, 2, 0.5)
    with pytest.raises(RuntimeError, match="lse must be"):
        ops.window_attention_backward(torch.zeros(2, 9, 4), qkv, bias, None, torch.zeros(2, 9), 2, 0.5)
    with pytest.raises(RuntimeError, match="grad must be"):
        ops.window_attention_backward(torch.zeros(2, 9, 12), qkv, bias, None, torch.zeros(2, 2, 9), 2, 0.5)
