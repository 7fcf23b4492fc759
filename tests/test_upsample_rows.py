"""The row pass of the aggregation head's bilinear upsampling (`torch.ops.fused_mtl_attn.upsample_rows_accumulate`
and its backward, C++ CPU kernels) against F.interpolate (bilinear, align_corners=False, the width unchanged) with
autograd: several sources added at once, ratios of 2, 4 and 8 and uneven ones, rows shorter than a vector and with
a tail, a source as tall as the output, float64 to rounding and float32 against float64, every instruction set
this CPU supports, bitwise determinism over thread counts, opcheck and bad arguments. The fused network's parity
tests cover its use."""
import pytest
import torch
import torch.nn.functional as F

import fused_mtl_attn
from model.fused_ops import _interpolation_matrix, _interpolation_taps

from .helpers import assert_same_for_any_thread_count, relative_error

CPU_BUILT = fused_mtl_attn.available_backends()["cpu"][0]
cpp_backend = pytest.importorskip("fused_mtl_attn.cpp_backend") if CPU_BUILT else None
CPU_ISAS = cpp_backend.supported_cpu_isas() if CPU_BUILT else []
pytestmark = pytest.mark.skipif(not CPU_BUILT, reason="the C++ extension is not built")

# (P, output size, source heights): the head's x2/x4/x8 at small size, a width of 37 (a vector tail on every set),
# uneven ratios, one row or column, a source as tall as the output
CASES = [
    (3, (16, 20), [8, 4, 2]),
    (2, (9, 37), [5, 1, 9]),
    (4, (1, 7), [1]),
    (1, (7, 1), [3, 2]),
]


def _taps(size, sources):
    """The op's tap tensors per source, built by the same function as the head's."""
    taps = [_interpolation_taps(h, size[0]) for h in sources]
    return [t[0] for t in taps], [t[1] for t in taps]


def _inputs(p, size, sources, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    out = torch.randn(p, *size, generator=gen, dtype=torch.float64)
    zs = [torch.randn(p, h, size[1], generator=gen, dtype=torch.float64) for h in sources]
    grad = torch.randn(p, *size, generator=gen, dtype=torch.float64)
    return out.to(dtype), [z.to(dtype) for z in zs], grad.to(dtype)


def _reference(out, zs, grad):
    """out + sum_k F.interpolate(z_k) and the gradients of the sources, by autograd."""
    zs = [z.detach().clone().requires_grad_() for z in zs]
    total = out.clone()
    for z in zs:
        total = total + F.interpolate(z[:, None], size=out.shape[1:], mode="bilinear", align_corners=False)[:, 0]
    total.backward(grad)
    return total.detach(), [z.grad for z in zs]


def _op(out, zs, grad, size, sources):
    ops = torch.ops.fused_mtl_attn
    index, weight = _taps(size, sources)
    acc = out.clone()
    ops.upsample_rows_accumulate(acc, zs, index, weight)
    grads = ops.upsample_rows_accumulate_backward(grad, index, weight, sources)
    return acc, grads


def test_taps_are_the_interpolation_matrix():
    """The 2-tap filters the kernels get and the dense matrices of the eager path are one resize."""
    for n_in, n_out in [(8, 16), (5, 13), (1, 4), (7, 7), (10, 3)]:
        index, weight = _interpolation_taps(n_in, n_out)
        dense = torch.zeros(n_out, n_in, dtype=torch.float64)
        for i in range(n_out):
            for j in range(2):
                dense[i, index[i, j]] += weight[i, j]
        assert torch.equal(dense, _interpolation_matrix(n_in, n_out, dense))
        x = torch.randn(1, 1, 1, n_in, dtype=torch.float64)
        want = F.interpolate(x, size=(1, n_out), mode="bilinear", align_corners=False)[0, 0, 0]
        torch.testing.assert_close(dense @ x[0, 0, 0], want, rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("isa", CPU_ISAS)
@pytest.mark.parametrize("p, size, sources", CASES, ids=str)
def test_matches_interpolate_float64(p, size, sources, isa):
    out, zs, grad = _inputs(p, size, sources, torch.float64)
    want, want_grads = _reference(out, zs, grad)
    with cpp_backend.use_cpu_isa(isa):
        got, grads = _op(out, zs, grad, size, sources)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert len(grads) == len(sources)
    for g, w, h in zip(grads, want_grads, sources):
        assert g.shape == (p, h, size[1]) and g.is_contiguous()
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("isa", CPU_ISAS)
def test_float32_against_float64(isa):
    size, sources = (32, 40), [16, 8, 4]
    out, zs, grad = _inputs(5, size, sources, torch.float64)
    want, want_grads = _reference(out, zs, grad)
    with cpp_backend.use_cpu_isa(isa):
        got, grads = _op(out.float(), [z.float() for z in zs], grad.float(), size, sources)
    assert got.dtype == torch.float32 and all(g.dtype == torch.float32 for g in grads)
    assert relative_error(got, want) < 1e-6
    for g, w in zip(grads, want_grads):
        assert relative_error(g, w) < 1e-6


def test_accumulates_into_a_strided_map():
    """out may be a view whose maps are apart in memory (a block of channels of a wider tensor); what lies
    between them is left alone."""
    size, sources = (6, 10), [3]
    base, _, _ = _inputs(6, size, sources, torch.float64)
    _, zs, _ = _inputs(3, size, sources, torch.float64, seed=1)
    out = base[::2]
    before = base.clone()
    want, _ = _reference(out, zs, torch.zeros_like(out))
    index, weight = _taps(size, sources)
    torch.ops.fused_mtl_attn.upsample_rows_accumulate(out, zs, index, weight)
    torch.testing.assert_close(base[::2], want, rtol=1e-12, atol=1e-12)
    assert torch.equal(base[1::2], before[1::2])


def test_bitwise_identical_for_any_thread_count():
    size, sources = (16, 20), [8, 4, 2]
    out, zs, grad = _inputs(33, size, sources, torch.float32)
    assert_same_for_any_thread_count(lambda: (lambda a, g: (a, *g))(*_op(out, zs, grad, size, sources)))


def test_opcheck():
    size, sources = (8, 10), [4, 2]
    out, zs, grad = _inputs(3, size, sources, torch.float32)
    index, weight = _taps(size, sources)
    ops = torch.ops.fused_mtl_attn
    torch.library.opcheck(ops.upsample_rows_accumulate.default, (out, zs, index, weight))
    torch.library.opcheck(ops.upsample_rows_accumulate_backward.default, (grad, index, weight, [4, 2]))


def _bad_forward(**change):
    size, sources = (8, 10), [4]
    out, zs, _ = _inputs(3, size, sources, torch.float32)
    index, weight = _taps(size, sources)
    args = {"out": out, "sources": zs, "tap_index": index, "tap_weight": weight, **change}
    torch.ops.fused_mtl_attn.upsample_rows_accumulate(*args.values())


@pytest.mark.parametrize("change, message", [
    ({"out": torch.zeros(3, 80)}, r"out must have rank 3 \[P, H, W\]"),
    ({"out": torch.zeros(3, 8, 10, dtype=torch.float16)}, "out must be float32 or float64"),
    ({"out": torch.zeros(3, 10, 8).transpose(1, 2)}, "out must have contiguous rows"),
    ({"sources": [torch.zeros(2, 4, 10)]}, r"source 0 must be \[P, h, W\] = \[3, h, 10\]"),
    ({"sources": [torch.zeros(3, 4, 5)]}, r"source 0 must be \[P, h, W\] = \[3, h, 10\]"),
    ({"sources": [torch.zeros(3, 4, 10, dtype=torch.float64)]}, "source 0 must be .* Float"),
    ({"sources": []}, "one entry per source"),
    ({"tap_index": [torch.zeros(8, 2, dtype=torch.int32)]}, r"tap_index\[0\] must be int64 \[H, 2\] = \[8, 2\]"),
    ({"tap_weight": [torch.zeros(7, 2, dtype=torch.float64)]}, r"tap_weight\[0\] must be float64 \[H, 2\]"),
    ({"tap_index": [torch.full((8, 2), 4, dtype=torch.int64)]}, r"tap_index\[0\] must lie in \[0, 4\)"),
    ({"tap_index": [torch.full((8, 2), -1, dtype=torch.int64)]}, r"tap_index\[0\] must lie in \[0, 4\)"),
])
def test_forward_bad_arguments(change, message):
    with pytest.raises(RuntimeError, match=message):
        _bad_forward(**change)


def test_backward_bad_arguments():
    index, weight = _taps((8, 10), [4])
    ops = torch.ops.fused_mtl_attn
    with pytest.raises(RuntimeError, match="must describe the same sources"):
        ops.upsample_rows_accumulate_backward(torch.zeros(3, 8, 10), index, weight, [4, 2])
    with pytest.raises(RuntimeError, match=r"tap_index\[0\] must lie in \[0, 3\)"):
        ops.upsample_rows_accumulate_backward(torch.zeros(3, 8, 10), index, weight, [3])
    with pytest.raises(RuntimeError, match=r"grad must have rank 3"):
        ops.upsample_rows_accumulate_backward(torch.zeros(8, 10), index, weight, [4])
