"""The C++ ops behind the "cpu" and "cuda" backends: agreement with the eager reference over a shape sweep, fp64
gradcheck, low precision against eager's own error, opcheck, torch.compile, bitwise determinism, strided and
NaN-padded views, "auto" reaching the kernels, and every bad input of the contract. The kernel tests run once per
instruction set this CPU supports and, where a GPU is visible (benchmarks/gpu_check.sh), with the CUDA kernels."""
import dataclasses
import functools
from typing import NamedTuple

import pytest
import torch

import fused_mtl_attn
from fused_mtl_attn import backends, cross_scale_attention, cross_task_attention, reference

CPU_BUILT = fused_mtl_attn.available_backends()["cpu"][0]
cpp_backend = pytest.importorskip("fused_mtl_attn.cpp_backend") if CPU_BUILT else None
ops = cpp_backend.ops if CPU_BUILT else None
CPU_ISAS = cpp_backend.supported_cpu_isas() if CPU_BUILT else []
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available() or not fused_mtl_attn.available_backends()["cuda"][0],
                               reason="needs a CUDA GPU and the extension's CUDA kernels")

# (B, P, d, m, N, logit scale): P = 1, N = 1, odd N, d != m, several chunks of positions, logits beyond +-20
CROSS_TASK = [
    (1, 1, 3, 3, 1, 1.0),
    (2, 3, 4, 5, 7, 3.0),
    (1, 2, 17, 9, 33, 3.0),
    (2, 1, 8, 16, 130, 30.0),
    (1, 2, 36, 36, 300, 1.0),
    (1, 1, 12, 20, 2500, 2.0),
]
# (B, d, m, Nq, offsets): J = 0, J = 3 with an empty segment, a 1-position source, uneven segments
CROSS_SCALE = [
    (2, 4, 3, 6, [0, 5, 5, 11]),
    (1, 3, 2, 5, [0]),
    (2, 8, 5, 33, [0, 0, 17, 40]),
    (1, 6, 7, 1, [0, 1]),
    (1, 36, 36, 300, [0, 75, 95, 100]),
    (1, 10, 12, 2100, [0, 2300, 2900]),
]


def _cross_task_inputs(b, p, d, m, n, scale, dtype=torch.float32, device="cpu", seed=0, zero_values=False):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, p, d, n, generator=g, dtype=torch.float64) * scale
    k = torch.randn(b, p, d, n, generator=g, dtype=torch.float64) * scale
    v = torch.zeros(b, p, m, n, dtype=torch.float64) if zero_values else torch.rand(b, p, m, n, generator=g,
                                                                                      dtype=torch.float64)
    return [t.to(device=device, dtype=dtype) for t in (q, k, v)]


def _cross_scale_inputs(b, d, m, nq, offsets, dtype=torch.float32, device="cpu", seed=0, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, d, nq, generator=g, dtype=torch.float64) * scale
    k = torch.randn(b, d, offsets[-1], generator=g, dtype=torch.float64) * scale
    v = torch.rand(b, m, offsets[-1], generator=g, dtype=torch.float64)
    return [t.to(device=device, dtype=dtype) for t in (q, k, v)]


def _outputs_and_grads(fn, inputs, grad_seed=1):
    """fn(*inputs) and the gradients of <out, g> for a fixed random g, all as float64 on the CPU."""
    inputs = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = fn(*inputs)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_seed), dtype=torch.float64)
    if out.requires_grad:
        grads = torch.autograd.grad(out, inputs, g.to(out), allow_unused=True)
    else:  # the reference's J = 0 output is a constant
        grads = [None] * len(inputs)
    grads = [torch.zeros_like(t) if gr is None else gr for t, gr in zip(inputs, grads)]
    return [t.detach().double().cpu() for t in [out, *grads]]


def _error(actual, expected):
    """Max abs error over the scale of the expected tensor (at least 1), and a line describing the worst entry."""
    if expected.numel() == 0:
        return 0.0, "empty"
    diff = (actual - expected).abs()
    diff = torch.where(torch.isnan(diff), torch.full_like(diff, float("inf")), diff)
    worst = int(diff.argmax())
    index = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), diff.shape))
    scale = max(float(expected.abs().max()), 1.0)
    err = float(diff.flatten()[worst]) / scale
    return err, (f"worst at {index}: got {float(actual.flatten()[worst]):.9g}, want {float(expected.flatten()[worst]):.9g}"
                 f" (abs err {float(diff.flatten()[worst]):.3g}, scale {scale:.3g})")


NAMES = ("out", "dq", "dk", "dv")


def _check_against(results, expected, tols, label):
    failures = []
    for name, a, e, tol in zip(NAMES, results, expected, tols):
        assert a.shape == e.shape, f"{label} {name}: shape {tuple(a.shape)} != {tuple(e.shape)}"
        err, where = _error(a, e)
        if not err <= tol:
            failures.append(f"{name}: relative error {err:.3g} > {tol:g}; {where}")
    assert not failures, f"{label}:\n  " + "\n  ".join(failures)


def _task(backend):
    return lambda q, k, v: cross_task_attention(q, k, v, backend=backend)


def _scale(backend, offsets):
    return lambda q, k, v: cross_scale_attention(q, k, v, offsets, backend=backend)


def _agreement(backend, device):
    for i, (b, p, d, m, n, scale) in enumerate(CROSS_TASK):
        for zero_values in (False, True):
            inputs = _cross_task_inputs(b, p, d, m, n, scale, device=device, seed=i, zero_values=zero_values)
            want = _outputs_and_grads(reference.cross_task_attention, [t.double() for t in inputs])
            got = _outputs_and_grads(_task(backend), inputs)
            _check_against(got, want, (1e-5, 1e-4, 1e-4, 1e-4), f"cross_task {(b, p, d, m, n, scale, zero_values)}")
    for i, (b, d, m, nq, offsets) in enumerate(CROSS_SCALE):
        inputs = _cross_scale_inputs(b, d, m, nq, offsets, device=device, seed=i)
        want = _outputs_and_grads(lambda q, k, v: reference.cross_scale_attention(q, k, v, offsets),
                                  [t.double() for t in inputs])
        got = _outputs_and_grads(_scale(backend, offsets), inputs)
        _check_against(got, want, (1e-5, 1e-4, 1e-4, 1e-4), f"cross_scale {(b, d, m, nq, offsets)}")


class Kernel(NamedTuple):
    backend: str  # "cpu" or "cuda"
    device: str
    isa: str = ""  # the CPU instruction set; "" on the GPU


KERNELS = [pytest.param(Kernel("cpu", "cpu", isa), id=f"cpu-{isa}") for isa in CPU_ISAS] + [
    pytest.param(Kernel("cuda", "cuda"), id="cuda", marks=[pytest.mark.gpu, needs_gpu])]


@pytest.fixture(params=KERNELS)
def kernel(request):
    """Runs the test with each compiled kernel set: the CPU kernels of every instruction set this CPU supports
    (test_cpu_isa.py checks the sets themselves) and, where a GPU is visible, the CUDA kernels."""
    if request.param.backend == "cuda":
        yield request.param
        return
    with cpp_backend.use_cpu_isa(request.param.isa):
        yield request.param


def test_cpu_backend_is_available():
    available, reasons = fused_mtl_attn.available_backends()["cpu"]
    assert available, reasons


def _spy_on_auto(monkeypatch, device, op):
    """Calls "auto" makes to the backends' `op`, by name: a fallback to eager cannot pass for the kernels."""
    calls = []
    for name in backends.AUTO_ORDER[(device, op)]:
        real = backends._get(name)
        if real is not None:
            spy = functools.partial(lambda name, fn, *args: calls.append(name) or fn(*args), name, getattr(real, op))
            monkeypatch.setitem(backends._loaded, name, dataclasses.replace(real, **{op: spy}))
    if op == "cross_task":
        cross_task_attention(*_cross_task_inputs(1, 2, 3, 4, 5, 2.0, device=device))
    else:
        cross_scale_attention(*_cross_scale_inputs(2, 3, 4, 6, [0, 4, 9], device=device), [0, 4, 9])
    return calls


@pytest.mark.parametrize("op", backends.OPS)
def test_auto_runs_the_cpu_kernels(op, monkeypatch):
    assert backends.AUTO_ORDER[("cpu", op)][0] == "cpu"
    assert _spy_on_auto(monkeypatch, "cpu", op) == ["cpu"]


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("op", backends.OPS)
def test_auto_runs_a_gpu_kernel(op, monkeypatch):
    """On a GPU, "auto" runs the first compiled backend of its measured order, never eager."""
    first = next(n for n in backends.AUTO_ORDER[("cuda", op)] if fused_mtl_attn.available_backends()[n][0])
    assert first != "eager" and _spy_on_auto(monkeypatch, "cuda", op) == [first]


def test_agrees_with_reference_over_shape_sweep(kernel):
    _agreement(kernel.backend, kernel.device)


def test_float64_matches_reference_to_rounding(kernel):
    """float64 runs the same kernels with exact softplus: only the order of the sums differs from eager."""
    for i, (b, p, d, m, n, scale) in enumerate(CROSS_TASK):
        inputs = _cross_task_inputs(b, p, d, m, n, scale, dtype=torch.float64, device=kernel.device, seed=i)
        want = _outputs_and_grads(reference.cross_task_attention, inputs)
        _check_against(_outputs_and_grads(_task(kernel.backend), inputs), want, (1e-12,) * 4,
                       f"float64 cross_task {i}")
    for i, (b, d, m, nq, offsets) in enumerate(CROSS_SCALE):
        inputs = _cross_scale_inputs(b, d, m, nq, offsets, dtype=torch.float64, device=kernel.device, seed=i)
        want = _outputs_and_grads(lambda q, k, v: reference.cross_scale_attention(q, k, v, offsets), inputs)
        _check_against(_outputs_and_grads(_scale(kernel.backend, offsets), inputs), want, (1e-12,) * 4,
                       f"float64 cross_scale {i}")


def test_empty_segment_gives_zero_output(kernel):
    q, k, v = _cross_scale_inputs(2, 4, 3, 5, [0, 4, 4, 9], device=kernel.device)
    out = cross_scale_attention(q, k, v, [0, 4, 4, 9], backend=kernel.backend)
    assert torch.all(out[:, 1] == 0)
    assert cross_scale_attention(q, k[..., :0], v[..., :0], [0], backend=kernel.backend).shape == (2, 0, 3, 5)


def test_gradcheck_float64_both_ops(kernel):
    inputs = _cross_task_inputs(1, 2, 3, 4, 5, 3.0, dtype=torch.float64, device=kernel.device)
    assert torch.autograd.gradcheck(_task(kernel.backend), [t.requires_grad_() for t in inputs])
    offsets = [0, 4, 4, 9]
    inputs = _cross_scale_inputs(2, 3, 2, 4, offsets, dtype=torch.float64, device=kernel.device)
    assert torch.autograd.gradcheck(_scale(kernel.backend, offsets), [t.requires_grad_() for t in inputs])


def _low_precision(backend, device, dtype):
    """The kernel's error against fp64 is at most 2x eager's error in the same dtype, plus a rounding floor.
    The shapes keep float16 finite: softplus(2 randn) averages about 1.1, so z.q is about 24 x 1.1 x 550 = 1.5e4
    at N = 500, below float16's 65504 (the eager baseline itself would overflow to inf/inf = nan beyond it)."""
    floor = 1e-2
    cases = [(_task(backend), reference.cross_task_attention, _cross_task_inputs(2, 2, 24, 20, 500, 2.0, dtype, device)),
             (_scale(backend, [0, 300, 380]), lambda q, k, v: reference.cross_scale_attention(q, k, v, [0, 300, 380]),
              _cross_scale_inputs(2, 24, 20, 400, [0, 300, 380], dtype, device))]
    for fn, ref, inputs in cases:
        truth = _outputs_and_grads(ref, [t.double() for t in inputs])
        eager = _outputs_and_grads(ref, inputs)
        got = _outputs_and_grads(fn, inputs)
        for name, a, e, t in zip(NAMES, got, eager, truth):
            err, where = _error(a, t)
            eager_err, _ = _error(e, t)
            assert err <= 2 * eager_err + floor, (
                f"{dtype} {name}: error {err:.3g} > 2 x eager's {eager_err:.3g} + {floor}; {where}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_low_precision_error_within_twice_eager(kernel, dtype):
    _low_precision(kernel.backend, kernel.device, dtype)


def _strided(t: torch.Tensor) -> torch.Tensor:
    """The same values in a non-contiguous layout (positions outermost)."""
    return t.transpose(-1, -2).contiguous().transpose(-1, -2)


@pytest.mark.parametrize("layout", ["contiguous", "strided"])
@pytest.mark.parametrize("op", ["cross_task", "cross_scale", "cross_task_backward", "cross_scale_backward"])
def test_opcheck(kernel, op, layout):
    """Schema, fake (meta) functions and autograd registration agree with the kernels, also for strided inputs
    (the fakes must give the kernels' output layout, or a compiled graph assumes another one)."""
    q, k, v = _cross_task_inputs(2, 2, 3, 4, 5, 2.0, device=kernel.device)
    offsets = [0, 4, 4, 9]
    qs, ks, vs = _cross_scale_inputs(2, 3, 4, 6, offsets, device=kernel.device)
    if op == "cross_task":
        args = (q.requires_grad_(), k.requires_grad_(), v.requires_grad_())
    elif op == "cross_scale":
        args = (qs.requires_grad_(), ks.requires_grad_(), vs.requires_grad_(), offsets)
    elif op == "cross_task_backward":
        out, ctx = ops.cross_task(q, k, v)
        args = (torch.randn_like(out), q, k, v, ctx)
    else:
        out, ctx = ops.cross_scale(qs, ks, vs, offsets)
        args = (torch.randn_like(out), qs, ks, vs, ctx, offsets)
    if layout == "strided":
        args = tuple(_strided(a).detach().requires_grad_(a.requires_grad) if torch.is_tensor(a) else a
                     for a in args)
    torch.library.opcheck(getattr(ops, op).default, args)


def test_torch_compile_fullgraph_matches_eager(kernel):
    offsets = [0, 7, 7, 12]

    def both(q, k, v, qs, ks, vs):
        return (cross_task_attention(q, k, v, backend=kernel.backend).square().sum()
                + cross_scale_attention(qs, ks, vs, offsets, backend=kernel.backend).square().sum())

    inputs = (_cross_task_inputs(2, 2, 4, 3, 9, 2.0, device=kernel.device)
              + _cross_scale_inputs(2, 5, 3, 6, offsets, device=kernel.device))
    want = _outputs_and_grads(both, inputs)
    torch._dynamo.reset()
    got = _outputs_and_grads(torch.compile(both, backend="aot_eager", fullgraph=True), inputs)
    for name, a, e in zip(("loss", "dq", "dk", "dv", "dqs", "dks", "dvs"), got, want):
        torch.testing.assert_close(a, e, rtol=1e-6, atol=1e-6, msg=lambda m: f"{name}: {m}")


def test_bitwise_deterministic_across_runs_and_thread_counts(kernel):
    """Two runs, and on the CPU a run on one thread between them, give the same bits (fixed summation order, no
    atomics). On a GPU the blocks run concurrently in whatever order, so the check is meaningful there too."""
    runs = []
    threads = torch.get_num_threads()
    for n_threads in (threads, 1, threads):
        torch.set_num_threads(n_threads)
        try:
            runs.append(_outputs_and_grads(_task(kernel.backend),
                                           _cross_task_inputs(2, 2, 12, 10, 5000, 2.0, device=kernel.device))
                        + _outputs_and_grads(_scale(kernel.backend, [0, 4100, 4500]),
                                             _cross_scale_inputs(2, 12, 10, 4300, [0, 4100, 4500],
                                                                 device=kernel.device)))
        finally:
            torch.set_num_threads(threads)
    for run in runs[1:]:
        for name, a, b in zip(NAMES + NAMES, runs[0], run):
            assert torch.equal(a, b), f"{name} differs between runs: max diff {float((a - b).abs().max()):.3g}"


def test_strided_and_nan_padded_views_read_only_their_elements(kernel):
    backend, device = kernel.backend, kernel.device
    b, p, d, m, n = 2, 3, 5, 4, 37
    q, k, v = _cross_task_inputs(b, p, d, m, n, 2.0, device=device)
    want = cross_task_attention(q, k, v, backend=backend)
    # transposed storage: positions outer, channels inner
    q_t = q.transpose(-1, -2).contiguous().transpose(-1, -2)
    assert not q_t.is_contiguous()
    torch.testing.assert_close(cross_task_attention(q_t, k, v, backend=backend), want, rtol=0, atol=0)

    def padded(t):  # a slice of a larger NaN-filled buffer
        big = torch.full((t.shape[0] + 1, t.shape[1] + 2, t.shape[2] + 3, t.shape[3] + 5), float("nan"),
                         device=device)
        view = big[1:, 1:-1, 2:-1, 3:-2]
        view.copy_(t)
        return view
    got = _outputs_and_grads(_task(backend), [padded(q), padded(k), padded(v)])
    ref = _outputs_and_grads(reference.cross_task_attention, [q.double(), k.double(), v.double()])
    _check_against(got, ref, (1e-5, 1e-4, 1e-4, 1e-4), "NaN-padded cross_task")
    offsets = [0, 6, 6, 15]
    qs, ks, vs = _cross_scale_inputs(2, d, m, 11, offsets, device=device)
    big = torch.full((2, d + 2, 40), float("nan"), device=device)
    ks_view = big[:, 1:-1, 10:25]
    ks_view.copy_(ks)
    got = _outputs_and_grads(_scale(backend, offsets),
                             [qs.transpose(-1, -2).contiguous().transpose(-1, -2), ks_view, vs])
    ref = _outputs_and_grads(lambda q, k, v: reference.cross_scale_attention(q, k, v, offsets),
                             [qs.double(), ks.double(), vs.double()])
    _check_against(got, ref, (1e-5, 1e-4, 1e-4, 1e-4), "NaN-padded cross_scale")


Z = torch.zeros


@pytest.mark.parametrize(
    "args, error, match",
    [
        ((Z(2, 3, 4), Z(2, 3, 4), Z(2, 3, 4)), ValueError, "q must have rank 4"),
        ((Z(2, 3, 4, 5), Z(2, 3, 4), Z(2, 3, 4, 5)), ValueError, "k must have rank 4"),
        ((Z(2, 3, 4, 5), Z(2, 3, 4, 6), Z(2, 3, 4, 5)), ValueError, "k must have the shape of q"),
        ((Z(2, 3, 4, 5), Z(2, 3, 4, 5), Z(1, 3, 4, 5)), ValueError, "v must be"),
        ((Z(2, 3, 4, 5), Z(2, 3, 4, 5), Z(2, 3, 4, 6)), ValueError, "v must be"),
        ((Z(2, 3, 4, 5), Z(2, 3, 4, 5, dtype=torch.float64), Z(2, 3, 4, 5)), TypeError, "k has dtype"),
        ((Z(2, 3, 4, 5, dtype=torch.long), Z(2, 3, 4, 5), Z(2, 3, 4, 5)), TypeError, "q must be a floating"),
        ((Z(2, 3, 4, 5), Z(2, 3, 4, 5), Z(2, 3, 4, 5, device="meta")), ValueError, "v is on meta"),
        ((Z(2, 3, 4, 5, device="meta"),) * 3, RuntimeError, "backend 'cpu' cannot run"),
    ],
)
def test_cross_task_bad_input_names_the_argument(args, error, match):
    with pytest.raises(error, match=match):
        cross_task_attention(*args, backend="cpu")


@pytest.mark.parametrize(
    "shapes, offsets, error, match",
    [
        (((2, 3, 4), (2, 3, 9), (2, 5, 9)), [0, 5, 3, 9], ValueError, "non-decreasing"),
        (((2, 3, 4), (2, 3, 9), (2, 5, 9)), [1, 9], ValueError, "start at 0"),
        (((2, 3, 4), (2, 3, 9), (2, 5, 9)), [0, 4, 8], ValueError, "end at the gathered length"),
        (((2, 3, 4), (2, 3, 9), (2, 5, 9)), [], ValueError, "J\\+1 >= 1"),
        (((2, 3, 4), (2, 3, 9), (2, 5, 9)), [0, -1, 9], ValueError, "non-decreasing"),
        (((2, 3, 4), (2, 3, 9), (2, 5, 9)), [0, 4.5, 9], TypeError, "offsets\\[1\\] must be an int"),
        (((2, 3), (2, 3, 9), (2, 5, 9)), [0, 9], ValueError, "q must have rank 3"),
        (((2, 3, 4), (2, 4, 9), (2, 5, 9)), [0, 9], ValueError, "k must be"),
        (((2, 3, 4), (3, 3, 9), (2, 5, 9)), [0, 9], ValueError, "k must be"),
        (((2, 3, 4), (2, 3, 9), (2, 5, 8)), [0, 9], ValueError, "v must be"),
    ],
)
def test_cross_scale_bad_input_names_the_argument(shapes, offsets, error, match):
    q, k, v = (torch.zeros(s) for s in shapes)
    with pytest.raises(error, match=match):
        cross_scale_attention(q, k, v, offsets, backend="cpu")


def test_cross_scale_offsets_on_a_device_are_refused():
    q, k, v = torch.zeros(2, 3, 4), torch.zeros(2, 3, 9), torch.zeros(2, 5, 9)
    with pytest.raises(ValueError, match="offsets must be a CPU tensor .* got a tensor on meta"):
        cross_scale_attention(q, k, v, torch.tensor([0, 9], device="meta"), backend="cpu")
    assert cross_scale_attention(q, k, v, torch.tensor([0, 9]), backend="cpu").shape == (2, 1, 5, 4)


def test_cross_scale_mixed_dtypes_and_devices_are_refused():
    q, k, v = torch.zeros(2, 3, 4), torch.zeros(2, 3, 9), torch.zeros(2, 5, 9)
    with pytest.raises(TypeError, match="v has dtype"):
        cross_scale_attention(q, k, v.double(), [0, 9], backend="cpu")
    with pytest.raises(ValueError, match="k is on meta"):
        cross_scale_attention(q, k.to("meta"), v, [0, 9], backend="cpu")


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: ops.cross_task(Z(2, 3, 4), Z(2, 3, 4), Z(2, 3, 4)), "q must have rank 4"),
        (lambda: ops.cross_task(Z(2, 3, 4, 5), Z(2, 3, 4, 6), Z(2, 3, 4, 5)), "k must have the shape of q"),
        (lambda: ops.cross_task(Z(2, 3, 4, 5), Z(2, 3, 4, 5), Z(2, 3, 4, 7)), "v must be"),
        (lambda: ops.cross_task(Z(2, 3, 4, 5), Z(2, 3, 4, 5).double(), Z(2, 3, 4, 5)), "k has dtype"),
        (lambda: ops.cross_scale(Z(2, 3, 4), Z(2, 3, 9), Z(2, 5, 9), [0, 5, 3, 9]), "non-decreasing"),
        (lambda: ops.cross_scale(Z(2, 3, 4), Z(2, 3, 9), Z(2, 5, 9), [0, 8]), "end at the gathered length"),
        (lambda: ops.cross_scale(Z(2, 3, 4), Z(2, 4, 9), Z(2, 5, 9), [0, 9]), "k must be"),
        (lambda: ops.cross_scale(Z(2, 3, 4), Z(2, 3, 9), Z(2, 5, 9), []), "offsets must hold"),
        (lambda: ops.cross_task_backward(Z(2, 3, 4, 4), Z(2, 3, 4, 5), Z(2, 3, 4, 5), Z(2, 3, 4, 5), Z(2, 3, 5, 4)),
         "grad must have"),
        (lambda: ops.cross_task_backward(Z(2, 3, 4, 5), Z(2, 3, 4, 5), Z(2, 3, 4, 5), Z(2, 3, 4, 5), Z(2, 3, 4, 4)),
         "context must have shape"),
    ],
)
def test_raw_op_bad_input_raises_runtime_error(call, match):
    with pytest.raises(RuntimeError, match=match):
        call()
