"""The eager oracle: agreement with a float64 re-derivation, gradcheck, edge cases and input errors."""
import math

import pytest
import torch

import fused_mtl_attn
from fused_mtl_attn import reference


def _softplus64(x):
    # the softplus rule of docs/attention-op.md written out: x above 20, log1p(exp(x)) otherwise
    return torch.where(x > 20, x, torch.log1p(torch.exp(torch.clamp(x, max=20))))


def _pair_by_loops(qp, kp, v):
    """One (query, source) pair by explicit sums in float64: qp [d, Nq], kp [d, Nk], v [m, Nk] -> [m, Nq]."""
    q, k, v = _softplus64(qp.double()), _softplus64(kp.double()), v.double()
    d, nq = q.shape
    m = v.shape[0]
    out = torch.zeros(m, nq, dtype=torch.float64)
    for p in range(nq):
        den = sum(float(k[c].sum()) * float(q[c, p]) for c in range(d))
        den = max(den, 1e-12)
        for i in range(m):
            num = sum(float((v[i] * k[c]).sum()) * float(q[c, p]) for c in range(d))
            out[i, p] = num / den
    return out


def test_cross_task_matches_float64_loops():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 3, 4, 7, generator=g) * 3
    k = torch.randn(2, 3, 4, 7, generator=g) * 3
    v = torch.rand(2, 3, 5, 7, generator=g)
    out = reference.cross_task_attention(q, k, v)
    assert out.shape == (2, 3, 5, 7)
    for b in range(2):
        for p in range(3):
            want = _pair_by_loops(q[b, p], k[b, p], v[b, p])
            torch.testing.assert_close(out[b, p].double(), want, rtol=1e-5, atol=1e-6)


def test_cross_scale_matches_float64_loops_with_empty_segment():
    g = torch.Generator().manual_seed(1)
    offsets = [0, 5, 5, 11]  # the middle source is empty
    q = torch.randn(2, 4, 6, generator=g)
    k = torch.randn(2, 4, 11, generator=g)
    v = torch.rand(2, 3, 11, generator=g)
    out = reference.cross_scale_attention(q, k, v, offsets)
    assert out.shape == (2, 3, 3, 6)
    for b in range(2):
        for j in range(3):
            lo, hi = offsets[j], offsets[j + 1]
            want = _pair_by_loops(q[b], k[b, :, lo:hi], v[b, :, lo:hi])
            torch.testing.assert_close(out[b, j].double(), want, rtol=1e-5, atol=1e-6)
    assert torch.all(out[:, 1] == 0), "an empty source gives z = 0, den = eps and out = 0"


def test_large_and_small_logits_follow_softplus_threshold():
    q = torch.tensor([[[[25.0, -25.0, 0.0]]]])
    k = torch.tensor([[[[30.0, -30.0, 1.0]]]])
    v = torch.tensor([[[[1.0, 2.0, 3.0]]]])
    out = reference.cross_task_attention(q.double(), k.double(), v.double())
    want = _pair_by_loops(q[0, 0], k[0, 0], v[0, 0])
    torch.testing.assert_close(out[0, 0], want, rtol=1e-12, atol=1e-12)


def test_gradcheck_both_layouts():
    g = torch.Generator().manual_seed(2)
    args = [torch.randn(1, 2, 3, 5, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    args.append(torch.rand(1, 2, 4, 5, generator=g, dtype=torch.float64, requires_grad=True))
    assert torch.autograd.gradcheck(reference.cross_task_attention, args)
    q = torch.randn(2, 3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 3, 9, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.rand(2, 2, 9, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda q, k, v: reference.cross_scale_attention(q, k, v, [0, 4, 4, 9]), (q, k, v))


def test_no_sources_gives_empty_output():
    q = torch.randn(2, 3, 4)
    out = reference.cross_scale_attention(q, torch.zeros(2, 3, 0), torch.zeros(2, 5, 0), [0])
    assert out.shape == (2, 0, 5, 4)


@pytest.mark.parametrize(
    "args, match",
    [
        ((torch.zeros(2, 3, 4), torch.zeros(2, 3, 4), torch.zeros(2, 3, 4)), "q must have rank 4"),
        ((torch.zeros(2, 3, 4, 5), torch.zeros(2, 3, 4, 6), torch.zeros(2, 3, 4, 5)), "k must have the shape of q"),
        ((torch.zeros(2, 3, 4, 5), torch.zeros(2, 3, 4, 5), torch.zeros(2, 2, 4, 5)), "v must be"),
        ((torch.zeros(2, 3, 4, 5), torch.zeros(2, 3, 4, 5, dtype=torch.float64), torch.zeros(2, 3, 4, 5)), "k has dtype"),
        ((torch.zeros(2, 3, 4, 5, dtype=torch.long), torch.zeros(2, 3, 4, 5), torch.zeros(2, 3, 4, 5)), "q must be a floating"),
        (("x", torch.zeros(2, 3, 4, 5), torch.zeros(2, 3, 4, 5)), "q must be a torch.Tensor"),
    ],
)
def test_cross_task_bad_input_names_the_argument(args, match):
    with pytest.raises((ValueError, TypeError), match=match):
        fused_mtl_attn.cross_task_attention(*args, backend="eager")


@pytest.mark.parametrize(
    "offsets, match",
    [
        ([0, 5, 3, 9], "non-decreasing"),
        ([1, 9], "start at 0"),
        ([0, 4, 8], "end at the gathered length"),
        ([], "J\\+1 >= 1"),
        ([0, -1, 9], "non-decreasing"),
        ([0, 4.5, 9], "offsets\\[1\\] must be an int"),
        (torch.tensor([0.0, 9.0]), "integer tensor"),
    ],
)
def test_cross_scale_bad_offsets(offsets, match):
    q, k, v = torch.zeros(1, 3, 4), torch.zeros(1, 3, 9), torch.zeros(1, 2, 9)
    with pytest.raises((ValueError, TypeError), match=match):
        fused_mtl_attn.cross_scale_attention(q, k, v, offsets, backend="eager")


def test_cross_scale_mismatched_shapes():
    with pytest.raises(ValueError, match="k must be"):
        fused_mtl_attn.cross_scale_attention(torch.zeros(1, 3, 4), torch.zeros(1, 2, 9), torch.zeros(1, 2, 9), [0, 9])
    with pytest.raises(ValueError, match="v must be"):
        fused_mtl_attn.cross_scale_attention(torch.zeros(1, 3, 4), torch.zeros(1, 3, 9), torch.zeros(1, 2, 8), [0, 9])


def test_offsets_accept_tensor_and_tuple():
    q, k, v = torch.randn(1, 3, 4), torch.randn(1, 3, 9), torch.rand(1, 2, 9)
    a = fused_mtl_attn.cross_scale_attention(q, k, v, torch.tensor([0, 4, 9]), backend="eager")
    b = fused_mtl_attn.cross_scale_attention(q, k, v, (0, 4, 9), backend="eager")
    assert torch.equal(a, b)


def test_unknown_backend_and_available_backends():
    with pytest.raises(ValueError, match="backend must be one of"):
        fused_mtl_attn.cross_task_attention(*[torch.zeros(1, 1, 1, 1)] * 3, backend="fast")
    table = fused_mtl_attn.available_backends()
    assert set(table) == {"eager", "cpu", "cuda", "triton"}
    assert table["eager"] == (True, [])
    for name, (ok, reasons) in table.items():
        assert ok == (not reasons), f"{name}: available={ok} but reasons={reasons}"
    if not torch.cuda.is_available():
        assert not table["cuda"][0] and table["cuda"][1], "without a GPU the cuda backend must say why"


def test_empty_source_gives_zero_in_float16():
    q, k, v = torch.randn(1, 3, 4, dtype=torch.float16), torch.randn(1, 3, 5, dtype=torch.float16), torch.rand(1, 2, 5, dtype=torch.float16)
    out = reference.cross_scale_attention(q, k, v, [0, 0, 5])
    assert torch.all(out[:, 0] == 0), f"empty source must give 0 in float16, got {out[:, 0]}"
    assert torch.isfinite(out).all()
