"""The Triton backend against the eager reference: both layouts, forward and backward, edge cases, determinism,
strides, custom-op registration. Without a GPU the kernels run under TRITON_INTERPRET=1 (set by conftest.py),
with small shapes; the `gpu` tests repeat the sweep at the network's sizes on a real GPU, bf16 included."""
import os
import subprocess
import sys

import pytest
import torch

import fused_mtl_attn

HAS_GPU = torch.cuda.is_available()
DEVICE = "cuda" if HAS_GPU else "cpu"

pytestmark = pytest.mark.skipif(not fused_mtl_attn.available_backends()["triton"][0],
                                reason=f"triton backend unavailable: {fused_mtl_attn.available_backends()['triton'][1]}")


# ------------------------------------------------------------------------------------------------ helpers


def _task(q, k, v, backend="triton"):
    return fused_mtl_attn.cross_task_attention(q, k, v, backend=backend)


def _scale(offsets):
    def run(q, k, v, backend="triton"):
        return fused_mtl_attn.cross_scale_attention(q, k, v, offsets, backend=backend)
    return run


def _task_inputs(B, P, d, m, N, dtype=torch.float32, scale=3.0, seed=0, device=DEVICE, shift=0.0):
    """Logits q, k ~ scale * N(0, 1) + shift, values v ~ U[0, 1)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, P, d, N, generator=g) * scale + shift
    k = torch.randn(B, P, d, N, generator=g) * scale + shift
    v = torch.rand(B, P, m, N, generator=g)
    return [t.to(device=device, dtype=dtype) for t in (q, k, v)]


def _scale_inputs(B, d, m, Nq, offsets, dtype=torch.float32, scale=3.0, seed=0, device=DEVICE, shift=0.0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, d, Nq, generator=g) * scale + shift
    k = torch.randn(B, d, offsets[-1], generator=g) * scale + shift
    v = torch.rand(B, m, offsets[-1], generator=g)
    return [t.to(device=device, dtype=dtype) for t in (q, k, v)]


def _run(fn, inputs, grad, **kw):
    """Output and gradients of fn at inputs (leaves made here) for upstream gradient `grad`."""
    leaves = [t.detach().requires_grad_() for t in inputs]
    out = fn(*leaves, **kw)
    grads = torch.autograd.grad(out, leaves, grad.to(out.dtype), allow_unused=True) if out.numel() else [None] * 3
    grads = [torch.zeros_like(t) if gr is None else gr for t, gr in zip(leaves, grads)]
    return [out.detach(), *grads]


NAMES = ("out", "dq", "dk", "dv")


def _rel_errors(got, want, floor=1e-3):
    """Max abs error over max abs value (in float64) of each of out, dq, dk, dv. The floor of the scale keeps
    gradients that vanish analytically (N = 1: out = v whatever q and k) from dividing rounding noise by ~0;
    the inputs here are O(1), so their gradients are too."""
    return [float((a.double() - b.double()).abs().max()) / max(float(b.double().abs().max()), floor)
            if b.numel() else 0.0 for a, b in zip(got, want)]


def _against_reference(fn, inputs, rtol_out, rtol_grad, seed=1):
    """Triton in the inputs' dtype against the reference in float64 on the same (rounded) inputs."""
    wide = [t.double() for t in inputs]
    want = _run(fn, wide, _grad_for(fn, wide, seed), backend="eager")
    got = _run(fn, inputs, _grad_for(fn, wide, seed))
    errs = _rel_errors(got, want)
    bad = [f"{n}: rel err {e:.3e} > {tol:.0e}" for n, e, tol in zip(NAMES, errs, (rtol_out,) + (rtol_grad,) * 3)
           if not e <= tol]
    assert not bad, f"{inputs[0].dtype} shapes {[tuple(t.shape) for t in inputs]}: " + "; ".join(bad)
    return got, want


def _grad_for(fn, wide, seed):
    with torch.no_grad():
        shape = fn(*wide, backend="eager").shape
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(wide[0].device)


TOL = {torch.float32: (1e-5, 1e-4), torch.float64: (1e-12, 1e-11)}

# small shapes, odd on purpose; N=300 cuts the reductions into several partial sums, d=70 into two channel blocks
TASK_SHAPES = [  # B, P, d, m, N
    (2, 3, 5, 6, 7),
    (1, 1, 4, 4, 1),
    (2, 2, 3, 9, 33),
    (1, 2, 20, 40, 300),
    (1, 1, 70, 36, 50),
]
SCALE_SHAPES = [  # B, d, m, Nq, offsets
    (2, 5, 3, 7, [0, 4, 4, 11]),
    (1, 4, 6, 1, [0, 1]),
    (2, 3, 4, 5, [0]),
    (1, 6, 5, 9, [0, 0, 0]),
    (1, 20, 17, 40, [0, 150, 150, 300]),
    (2, 7, 9, 13, [0, 5, 12, 30, 31]),
]


# ------------------------------------------------------------------------------------------- correctness


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("shape", TASK_SHAPES, ids=str)
def test_cross_task_matches_reference(shape, dtype):
    _against_reference(_task, _task_inputs(*shape, dtype=dtype), *TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("shape", SCALE_SHAPES, ids=str)
def test_cross_scale_matches_reference(shape, dtype):
    *dims, offsets = shape
    _against_reference(_scale(offsets), _scale_inputs(*dims, offsets, dtype=dtype), *TOL[dtype])


def _low_precision_check(fn, inputs, dtype):
    """Error against float64 at most 2x eager PyTorch's in the same dtype, plus a floor of a few ulps."""
    low = [t.to(dtype) for t in inputs]
    wide = [t.double() for t in low]
    grad = _grad_for(fn, wide, 3)
    want = _run(fn, wide, grad, backend="eager")
    eager = _rel_errors(_run(fn, low, grad, backend="eager"), want)
    got = _rel_errors(_run(fn, low, grad), want)
    floor = 4 * torch.finfo(dtype).eps
    bad = [f"{n}: triton {g:.2e} vs eager {e:.2e}" for n, g, e in zip(NAMES, got, eager) if not g <= 2 * e + floor]
    assert not bad, f"{dtype}: " + "; ".join(bad)


# bf16 is checked too: the kernels only run tl.dot in fp32, never the interpreter's inexact bf16 dot
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_low_precision_within_twice_eager_error(dtype):
    _low_precision_check(_task, _task_inputs(2, 2, 12, 10, 40), dtype)
    # no empty source here: eager float16's forward gives 0 there (reference.FLOAT16_EPS), but its backward divides
    # by den^2 = FLOAT16_EPS^2, which underflows to 0, and gives nan for dq
    _low_precision_check(_scale([0, 20, 33, 45]), _scale_inputs(2, 12, 10, 30, [0, 20, 33, 45]), dtype)


def test_gradcheck_float64_both_layouts():
    # fast mode (random projections of the Jacobian): the interpreter costs ~0.1 s per call
    inputs = [t.requires_grad_() for t in _task_inputs(1, 2, 3, 4, 5, dtype=torch.float64, scale=1.0)]
    assert torch.autograd.gradcheck(_task, inputs, fast_mode=True)
    inputs = [t.requires_grad_() for t in _scale_inputs(2, 3, 2, 4, [0, 4, 4, 9], dtype=torch.float64, scale=1.0)]
    assert torch.autograd.gradcheck(_scale([0, 4, 4, 9]), inputs, fast_mode=True)


# ------------------------------------------------------------------------------------------------ edge cases


def test_logits_beyond_softplus_threshold():
    q, k, v = _task_inputs(2, 2, 6, 5, 17, dtype=torch.float32, scale=1.0)
    sign = torch.where(torch.rand(q.shape, generator=torch.Generator().manual_seed(5)) > 0.5, 1.0, -1.0).to(q)
    q = q + 25 * sign  # every logit beyond +-20
    k = k * 12  # mixed: some beyond +-20, some not
    _against_reference(_task, [q, k, v], *TOL[torch.float32])
    qs, ks, vs = _scale_inputs(1, 6, 5, 8, [0, 7, 19], scale=30.0)
    _against_reference(_scale([0, 7, 19]), [qs, ks, vs], *TOL[torch.float32])


def test_all_zero_values_give_zero_output():
    q, k, v = _task_inputs(1, 2, 5, 4, 9)
    v = torch.zeros_like(v)
    got, _ = _against_reference(_task, [q, k, v], *TOL[torch.float32])
    assert torch.all(got[0] == 0)


def test_empty_source_gives_zero_output_and_no_source_gives_empty():
    offsets = [0, 6, 6, 10]
    q, k, v = _scale_inputs(2, 4, 3, 5, offsets)
    out = _scale(offsets)(q, k, v)
    assert out.shape == (2, 3, 3, 5) and torch.all(out[:, 1] == 0), "an empty source has z = 0, den = eps, out = 0"
    q, k, v = _scale_inputs(2, 4, 3, 5, [0])
    assert _scale([0])(q, k, v).shape == (2, 0, 3, 5)


def test_more_sources_than_one_launch_takes():
    # MAX_SOURCES gathered sources per launch of the source-side kernels: 10 sources take two, some empty
    offsets = [0, 3, 3, 9, 10, 16, 17, 17, 25, 26, 31]
    _against_reference(_scale(offsets), _scale_inputs(1, 3, 4, 6, offsets), *TOL[torch.float32])


# (shape, offsets, dtype, forward launches, backward launches): the bounds of the kernels' design
LAUNCH_CASES = [
    ((2, 3, 12, 10, 40), None, torch.bfloat16, 2, 2),  # half precision, one channel block: dS fused in the query pass
    ((2, 3, 12, 10, 40), None, torch.float32, 2, 3),
    ((1, 1, 70, 36, 50), None, torch.float32, 2, 3),  # two channel blocks
    ((2, 7, 9, 13), [0, 5, 12, 30, 31], torch.float32, 2, 3),  # ragged sources, one launch
    ((2, 7, 9, 13), [0, 5, 12, 30, 31], torch.bfloat16, 2, 3),
]


@pytest.mark.parametrize("shape, offsets, dtype, n_forward, n_backward", LAUNCH_CASES, ids=str)
def test_launch_counts_and_no_other_device_work(monkeypatch, shape, offsets, dtype, n_forward, n_backward):
    """Forward in <= 2 kernel launches and backward in <= 3 for all pairs or sources of a call, and no other tensor
    work than allocation (no partial sums, zero fills or copies by torch: each would be a device launch)."""
    import math

    from torch.utils._python_dispatch import TorchDispatchMode

    from fused_mtl_attn import triton_kernels as tk

    launches, ops, inside = [], [], [False]
    real = tk._launch

    def counting(kernel, grid, *args, **meta):
        launches.append(math.prod(grid) > 0)
        inside[0] = True  # the interpreter's own tensor work is not the launcher's
        try:
            real(kernel, grid, *args, **meta)
        finally:
            inside[0] = False

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if not inside[0]:
                ops.append(str(func))
            return func(*args, **(kwargs or {}))

    monkeypatch.setattr(tk, "_launch", counting)
    inputs = _task_inputs(*shape, dtype=dtype) if offsets is None else _scale_inputs(*shape, offsets, dtype=dtype)
    with Record():
        out, S, z = tk.forward(*inputs, offsets)
    assert sum(launches) == n_forward, f"forward: {sum(launches)} launches"
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(2)).to(out)
    launches.clear()
    with Record():
        grads = tk.backward(grad, *inputs, S, z, offsets)
    assert sum(launches) == n_backward, f"backward: {sum(launches)} launches"
    assert set(ops) <= {"aten.empty.memory_format", "aten.empty_like.default"}, sorted(set(ops))
    # and the results are the op's (the launch plan computes the same function)
    fn = _task if offsets is None else _scale(offsets)
    want = _run(fn, [t.double() for t in inputs], grad.double(), backend="eager")
    floor = 4 * torch.finfo(dtype).eps if dtype != torch.float32 else 0.0
    eager = _rel_errors(_run(fn, inputs, grad, backend="eager"), want)
    for name, got, w, e in zip(NAMES, [out, *grads], want, eager):
        assert _rel_errors([got], [w])[0] <= max(2 * e + floor, 1e-4), name


def test_bf16_operand_rounding_matches_torch():
    # under the interpreter bf16 tl.dot operands are fp32 values rounded by _round_bf16: it must round as torch does
    import triton
    import triton.language as tl

    from fused_mtl_attn.triton_kernels import _round_bf16

    @triton.jit
    def rounding(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
        r = tl.arange(0, BLOCK)
        tl.store(y_ptr + r, round_bf16(tl.load(x_ptr + r, mask=r < n)), mask=r < n)

    # the kernel finds the helper among this module's globals
    globals()["round_bf16"] = _round_bf16

    g = torch.Generator().manual_seed(4)
    # random magnitudes, exact ties (even and odd mantissa tails), subnormals, zeros, large values
    x = torch.cat([torch.randn(4000, generator=g) * 10.0 ** torch.randint(-30, 30, (4000,), generator=g),
                   torch.tensor([1 + 2**-8, 1 + 3 * 2**-8, -(1 + 2**-8), 2**-130, -2**-133, 0.0, -0.0, 3e38])])
    y = torch.empty_like(x, device=DEVICE)
    rounding[(1,)](x.to(DEVICE), y, x.numel(), BLOCK=triton.next_power_of_2(x.numel()))
    assert torch.equal(y.cpu(), x.to(torch.bfloat16).float())


# --------------------------------------------------------------------------------- determinism, strides, ops


def test_deterministic_bitwise():
    inputs = _task_inputs(1, 2, 20, 24, 300)
    grad = torch.randn(1, 2, 24, 300, generator=torch.Generator().manual_seed(7)).to(DEVICE)
    first, second = _run(_task, inputs, grad), _run(_task, inputs, grad)
    for n, a, b in zip(NAMES, first, second):
        assert torch.equal(a, b), f"{n} differs between two runs (max diff {(a - b).abs().max():.3e})"
    fn, dims = _scale([0, 150, 150, 300]), (1, 20, 17, 40, [0, 150, 150, 300])
    inputs = _scale_inputs(*dims)
    grad = _grad_for(fn, [t.double() for t in inputs], 8).float()
    for n, a, b in zip(NAMES, _run(fn, inputs, grad), _run(fn, inputs, grad)):
        assert torch.equal(a, b), f"cross_scale {n} differs between two runs"


def test_non_contiguous_inputs():
    g = torch.Generator().manual_seed(9)
    # q: every other channel of a bigger buffer; k: channels-last ([B, P, N, d] transposed); v: a slice in N
    q = (torch.randn(2, 3, 10, 11, generator=g) * 3).to(DEVICE)[:, :, ::2]
    k = (torch.randn(2, 3, 11, 5, generator=g) * 3).to(DEVICE).transpose(-1, -2)
    v = torch.rand(2, 3, 4, 20, generator=g).to(DEVICE)[..., 3:14]
    assert not any(t.is_contiguous() for t in (q, k, v))
    _against_reference(_task, [q, k, v], *TOL[torch.float32])
    offsets = [0, 6, 6, 15]
    q = (torch.randn(2, 9, 5, generator=g) * 3).to(DEVICE).transpose(-1, -2)  # [B, d=5, Nq=9] with stride_n = 5
    k = (torch.randn(2, 5, 30, generator=g) * 3).to(DEVICE)[..., ::2]
    v = torch.rand(2, 15, 3, generator=g).to(DEVICE).transpose(-1, -2)
    _against_reference(_scale(offsets), [q, k, v], *TOL[torch.float32])


def test_custom_ops_pass_opcheck():
    from fused_mtl_attn.triton_backend import _ops

    ops = _ops()
    torch.library.opcheck(ops.cross_task, [t.requires_grad_() for t in _task_inputs(1, 2, 3, 4, 5)])
    torch.library.opcheck(ops.cross_scale, (*[t.requires_grad_() for t in _scale_inputs(2, 3, 4, 6, [0, 4, 4, 9])],
                                            [0, 4, 4, 9]))


def test_torch_compile_fullgraph_traces_both_ops():
    # under the interpreter the ops are opaque to inductor, so aot_eager; on a GPU inductor compiles the kernels
    backend = "inductor" if HAS_GPU else "aot_eager"
    offsets = [0, 4, 4, 9]

    def both(q, k, v, qs, ks, vs):
        return _task(q, k, v).sum() + _scale(offsets)(qs, ks, vs).square().sum()

    inputs = [t.requires_grad_() for t in _task_inputs(1, 2, 3, 4, 5) + _scale_inputs(2, 3, 4, 6, offsets)]
    compiled = torch.compile(both, fullgraph=True, backend=backend)
    want = torch.autograd.grad(both(*inputs), inputs)
    got = torch.autograd.grad(compiled(*inputs), inputs)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(HAS_GPU, reason="checks the CPU-only report")
def test_unavailable_without_gpu_or_interpreter_says_why():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = "import fused_mtl_attn as f; print(f.available_backends()['triton'])"
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "(False, ['no CUDA GPU is visible and TRITON_INTERPRET is not set" in result.stdout, result.stdout


# -------------------------------------------------------------------------------------- GPU (real kernels)


NETWORK_CHANNELS = (36, 72, 144, 288)
NETWORK_N = 48 * 64  # positions of the finest scale
NETWORK_OFFSETS = [0, 24 * 32, 24 * 32 + 12 * 16, 24 * 32 + 12 * 16 + 6 * 8]
# den = z.q sums N*d products of softplus features. At logits 3 N(0, 1) the features average 1.4, so den reaches
# ~2e6 at d = 288 (~4e5 at d = 36), past float16's 65504: the eager float16 baseline of _low_precision_check is then
# inf/NaN (or 0 where den alone overflows). Logits shifted by -6 make the features average 0.06 and keep den below
# ~1e4 at every network size (test_eager_float16_baseline_meaningful_at_network_sizes pins both).
FP16_LOGIT_SHIFT = -6.0


def _network_cases(channels, shift, B=2, P=6):
    """(op, inputs) of both layouts at the network's sizes."""
    return [(_task, _task_inputs(B, P, channels, channels, NETWORK_N, shift=shift)),
            (_scale(NETWORK_OFFSETS), _scale_inputs(B, channels, channels, NETWORK_N, NETWORK_OFFSETS, shift=shift))]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("channels", NETWORK_CHANNELS)
def test_gpu_network_sizes(channels, dtype):
    for fn, inputs in _network_cases(channels, FP16_LOGIT_SHIFT if dtype == torch.float16 else 0.0):
        if dtype == torch.float32:
            _against_reference(fn, inputs, *TOL[dtype])
        else:
            _low_precision_check(fn, inputs, dtype)


def test_eager_float16_baseline_meaningful_at_network_sizes():
    # the widest channels give the largest den; B = P = 1 suffices, den is per position
    channels = NETWORK_CHANNELS[-1]
    for fn, inputs in _network_cases(channels, 0.0, B=1, P=1):
        out = fn(*[t.to(torch.float16) for t in inputs], backend="eager")
        assert not torch.isfinite(out).all(), "unshifted logits no longer overflow eager float16"
    for fn, inputs in _network_cases(channels, FP16_LOGIT_SHIFT, B=1, P=1):
        low = [t.to(torch.float16) for t in inputs]
        wide = [t.double() for t in low]
        grad = _grad_for(fn, wide, 3)
        errs = _rel_errors(_run(fn, low, grad, backend="eager"), _run(fn, wide, grad, backend="eager"))
        # an overflow shows as NaN, or as an error of order 1 (den = inf gives out = 0); without one, eager float16
        # is within 5e-2 of float64 here (dq, a difference of two terms, the worst; out ~1.5e-3)
        assert max(errs) < 0.1, f"eager float16 against float64: {dict(zip(NAMES, errs))}"


def _check_sampled_positions(n, device, chunk, width):
    """Cross-task attention of one pair, d = m = 32, n positions, float16, checked at `width` positions at the head,
    the middle and the tail against float64 (S and z summed over all positions in chunks of `chunk`)."""
    g = torch.Generator(device=device).manual_seed(11)
    q, k = [torch.randn(1, 1, 32, n, generator=g, device=device, dtype=torch.float16) for _ in range(2)]
    # non-negative values, channel c uniform on [0, (c + 1) / 16): each output is about its channel's mean
    # (c + 1) / 32, so a zero, an unwritten or another channel's output is off by >= 3%
    means = torch.arange(1, 33, device=device, dtype=torch.float16)[:, None] / 16
    v = torch.rand(1, 1, 32, n, generator=g, device=device, dtype=torch.float16) * means
    out = _task(q, k, v)[0, 0]
    S = torch.zeros(32, 32, device=device, dtype=torch.float64)
    z = torch.zeros(32, device=device, dtype=torch.float64)
    for lo in range(0, n, chunk):
        features = torch.nn.functional.softplus(k[0, 0, :, lo:lo + chunk].double())
        S += v[0, 0, :, lo:lo + chunk].double() @ features.T
        z += features.sum(dim=1)
    idx = torch.cat([torch.arange(0, width), torch.arange(n // 2, n // 2 + width), torch.arange(n - width, n)])
    qf = torch.nn.functional.softplus(q[0, 0][:, idx.to(device)].double())
    want = (S @ qf) / (z @ qf)  # z.q > 0 here, far above eps
    # every term is non-negative, so the kernel's float32 sums (tl.dot at ~fp32 accuracy, <= ~4000 sequential
    # block additions per partial at n = 2^27) err by <= ~2.4e-4 relative, and the float16 store by <= 4.9e-4:
    # 2e-3 covers both and is 15x below the 3% between neighbouring channels
    torch.testing.assert_close(out[:, idx.to(device)].double(), want, rtol=2e-3, atol=0)


def test_sampled_positions_check_on_small_input():
    # the GPU test's check itself, at a size the interpreter runs (several chunks, head/middle/tail overlapping)
    _check_sampled_positions(1003, DEVICE, chunk=256, width=300)


@pytest.mark.gpu
@pytest.mark.slow
def test_gpu_indexing_past_2_to_the_31():
    # 32 x (2^27 + 3) elements per tensor (8 GiB in float16; ~50 GiB at most with the float64 check): channels
    # 16-31 lie wholly past element 2^31, the tail of channel 31 past 2^32
    _check_sampled_positions((1 << 27) + 3, "cuda", chunk=1 << 24, width=1000)
