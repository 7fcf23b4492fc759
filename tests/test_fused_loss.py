"""The fused loss `fused_mtl_attn.upsampled_cross_entropy` (cross-entropy of logits resized to the label's size, one
CPU kernel) against its eager reference: a sweep of resize ratios and layouts in float64 (to rounding) and float32,
every instruction set this CPU supports, ignored and out-of-range labels, bitwise determinism over thread counts,
opcheck, torch.compile, the fallbacks, bad arguments, and MultiTaskLoss(fused=True) against the reference loss."""
import pytest
import torch

import fused_mtl_attn
from fused_mtl_attn import reference, upsampled_cross_entropy
from model.losses import MultiTaskLoss

from .helpers import assert_same_for_any_thread_count

CPU_BUILT = fused_mtl_attn.available_backends()["cpu"][0]
cpp_backend = pytest.importorskip("fused_mtl_attn.cpp_backend") if CPU_BUILT else None
CPU_ISAS = cpp_backend.supported_cpu_isas() if CPU_BUILT else []
needs_kernels = pytest.mark.skipif(not CPU_BUILT, reason="the C++ extension is not built")

# (B, C, h, w, H, W): the network's deep-supervision ratios (x4 .. x32), non-integer ratios, the same size (rows of
# whole vectors, rows with a partial last vector, rows narrower than one vector: the kernels' no-resize path),
# shrinking, one class, a 1x1 map
SHAPES = [
    (2, 5, 8, 10, 32, 40),
    (1, 7, 2, 3, 64, 96),
    (2, 9, 7, 5, 23, 31),
    (1, 21, 16, 16, 16, 16),
    (2, 7, 5, 19, 5, 19),
    (1, 3, 2, 3, 2, 3),
    (2, 3, 20, 30, 9, 11),
    (1, 1, 4, 4, 8, 8),
    (1, 4, 1, 1, 5, 4),
]
LAYOUTS = ["nchw", "channels_last", "sliced"]


def _inputs(b, c, h, w, H, W, dtype=torch.float64, layout="nchw", seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, c, h + 2, w + 3, generator=g, dtype=torch.float64) * scale
    x = x[..., 1:h + 1, 2:w + 2] if layout == "sliced" else x[..., :h, :w].contiguous()
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    label = torch.randint(0, c, (b, H, W), generator=g)
    label[0, : max(1, H // 4)] = 255  # ignored pixels
    return x.to(dtype).requires_grad_(), label


def _loss_and_grad(fn, x, label, **kw):
    loss = fn(x, label, **kw)
    (grad,) = torch.autograd.grad(loss, x)
    return loss.detach(), grad


@needs_kernels
@pytest.mark.parametrize("isa", CPU_ISAS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_reference_float64(shape, layout, isa):
    x, label = _inputs(*shape, layout=layout)
    with cpp_backend.use_cpu_isa(isa):
        got = _loss_and_grad(upsampled_cross_entropy, x, label)
    want = _loss_and_grad(reference.upsampled_cross_entropy, x, label)
    torch.testing.assert_close(got[0], want[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got[1], want[1], rtol=1e-10, atol=1e-14)
    assert got[1].is_contiguous()


@needs_kernels
@pytest.mark.parametrize("isa", CPU_ISAS)
@pytest.mark.parametrize("shape", SHAPES)
def test_float32_against_float64_reference(shape, isa):
    x, label = _inputs(*shape, dtype=torch.float32, layout="channels_last")
    with cpp_backend.use_cpu_isa(isa):
        loss, grad = _loss_and_grad(upsampled_cross_entropy, x, label)
    want = _loss_and_grad(reference.upsampled_cross_entropy, x.detach().double().requires_grad_(), label)
    assert loss.dtype == torch.float32 and grad.dtype == torch.float32
    torch.testing.assert_close(loss.double(), want[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.double(), want[1], rtol=1e-4, atol=1e-4 * want[1].abs().max().item())


@needs_kernels
def test_gradcheck():
    x, label = _inputs(1, 3, 3, 4, 7, 9)
    assert torch.autograd.gradcheck(lambda t: upsampled_cross_entropy(t, label), (x,))


@needs_kernels
def test_all_pixels_ignored_give_zero_loss_and_gradient():
    x, label = _inputs(2, 4, 3, 3, 12, 12, dtype=torch.float32)
    label.fill_(7)
    loss, grad = _loss_and_grad(upsampled_cross_entropy, x, label, ignore_index=7)
    assert loss.item() == 0.0 and torch.count_nonzero(grad) == 0


@needs_kernels
def test_large_logits_of_ignored_pixels_stay_finite():
    """Backward's exp(z - lse) never sees an overflowing argument, labelled pixel or not."""
    x, label = _inputs(1, 3, 4, 4, 8, 8, dtype=torch.float32, scale=1e4)
    loss, grad = _loss_and_grad(upsampled_cross_entropy, x, label)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()


@needs_kernels
@pytest.mark.parametrize("isa", CPU_ISAS)
@pytest.mark.parametrize("label_size", [4, 2])  # resized, and the same size (the no-resize path)
def test_probabilities_below_the_normal_floats_flush_to_zero(isa, label_size):
    """float32: a class whose softmax probability lies below exp(-87) (the smallest normal float is exp(-87.3)) gets
    a gradient of exactly 0, never a subnormal (on x86 every subnormal costs a microcode assist: the padding classes
    of the vector tiles made the backward 6x slower); the other classes match the float64 reference."""
    x = torch.zeros(1, 3, 2, 2)
    x[:, 1] = -95.0  # probability ~ exp(-95): subnormal in float32
    x[:, 2] = 4.0
    label = torch.full((1, label_size, label_size), 2)
    x.requires_grad_()
    with cpp_backend.use_cpu_isa(isa):
        _, grad = _loss_and_grad(upsampled_cross_entropy, x, label)
    want = _loss_and_grad(reference.upsampled_cross_entropy, x.detach().double().requires_grad_(), label)[1]
    assert torch.count_nonzero(grad[:, 1]) == 0
    torch.testing.assert_close(grad.double(), want, rtol=1e-5, atol=1e-9)


def test_normalize_channels_is_f_normalize():
    """The fused loss's normals normalisation (a sum of squares) against F.normalize: values and gradients, both
    layouts, zero and tiny vectors (the gradient stays finite where the norm is clamped)."""
    from model.fused_ops import normalize_channels

    for dtype, tol in ((torch.float64, 1e-14), (torch.float32, 1e-6)):
        x = torch.randn(2, 3, 5, 7, dtype=dtype)
        x[0, :, 0, 0] = 0
        x[1, :, 2, 3] = 1e-20
        for layout in (torch.contiguous_format, torch.channels_last):
            xi = x.contiguous(memory_format=layout).requires_grad_()
            got, want = normalize_channels(xi), torch.nn.functional.normalize(xi, dim=1)
            g = torch.randn_like(want)
            torch.testing.assert_close(got, want, rtol=tol, atol=tol)
            grads = [torch.autograd.grad(y, xi, g)[0] for y in (got, want)]
            assert torch.isfinite(grads[0]).all()
            torch.testing.assert_close(grads[0], grads[1], rtol=tol, atol=tol * grads[1].abs().max().item())


@needs_kernels
@pytest.mark.parametrize("label_size", [8, 4])  # resized, and the same size
@pytest.mark.parametrize("bad", [5, -1, 256])
def test_label_out_of_range_raises(bad, label_size):
    """Forward raises; so does the backward op called directly (it never writes through a bad class index)."""
    x, label = _inputs(1, 5, 4, 4, label_size, label_size, dtype=torch.float32)
    label[0, 3, 3] = bad
    message = f"label holds class {bad}, outside \\[0, 5\\)"
    with pytest.raises(RuntimeError, match=message):
        upsampled_cross_entropy(x, label)
    lse = torch.zeros(label.shape)
    with pytest.raises(RuntimeError, match=message):
        torch.ops.fused_mtl_attn.upsampled_cross_entropy_backward(torch.ones(()), x.detach(), label, lse, 255)


@needs_kernels
@pytest.mark.parametrize("shape", [(2, 6, 8, 10, 64, 80), (2, 6, 64, 83, 64, 83)])
def test_bitwise_identical_for_any_thread_count(shape):
    x, label = _inputs(*shape, dtype=torch.float32)
    assert_same_for_any_thread_count(lambda: _loss_and_grad(upsampled_cross_entropy, x, label))


@needs_kernels
@pytest.mark.parametrize("layout", ["nchw", "sliced"])
def test_opcheck(layout):
    x, label = _inputs(2, 4, 3, 5, 9, 11, dtype=torch.float32, layout=layout)
    torch.library.opcheck(torch.ops.fused_mtl_attn.upsampled_cross_entropy.default, (x, label, 255))
    loss, lse = torch.ops.fused_mtl_attn.upsampled_cross_entropy(x, label, 255)
    torch.library.opcheck(torch.ops.fused_mtl_attn.upsampled_cross_entropy_backward.default,
                          (torch.ones((), dtype=x.dtype), x.detach(), label, lse, 255))


@needs_kernels
def test_compiles_fullgraph():
    x, label = _inputs(2, 4, 5, 6, 20, 24, dtype=torch.float32)
    compiled = torch.compile(upsampled_cross_entropy, backend="aot_eager", fullgraph=True)
    got = _loss_and_grad(compiled, x, label)
    want = _loss_and_grad(upsampled_cross_entropy, x, label)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_other_dtypes_run_the_reference(dtype):
    x, label = _inputs(1, 3, 4, 4, 8, 8, dtype=dtype)
    torch.testing.assert_close(upsampled_cross_entropy(x, label), reference.upsampled_cross_entropy(x, label))


@needs_kernels
def test_autocast_runs_the_reference():
    x, label = _inputs(1, 3, 4, 4, 8, 8, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = upsampled_cross_entropy(x, label)
        want = reference.upsampled_cross_entropy(x, label)
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("args, error, message", [
    (("logits", "label"), TypeError, "logits must be a torch.Tensor"),
    ((torch.zeros(2, 3, 4), "label"), ValueError, r"logits must have rank 4 \(\[B, C, h, w\]\)"),
    ((torch.zeros(2, 3, 4, 4, dtype=torch.int64), "label"), TypeError, "logits must be a floating tensor"),
    ((torch.zeros(2, 3, 4, 4), None), TypeError, "label must be a torch.Tensor"),
    ((torch.zeros(2, 3, 4, 4), torch.zeros(2, 8, 8)), ValueError, "label must be an int64 tensor"),
    ((torch.zeros(2, 3, 4, 4), torch.zeros(2, 1, 8, 8, dtype=torch.int64)), ValueError, "label must be an int64"),
    ((torch.zeros(2, 3, 4, 4), torch.zeros(3, 8, 8, dtype=torch.int64)), ValueError, "label has batch size 3"),
    ((torch.zeros(2, 3, 4, 4), torch.zeros(2, 8, 8, dtype=torch.int64), 2.5), TypeError, "ignore_index must be"),
    ((torch.zeros(2, 0, 4, 4), torch.zeros(2, 8, 8, dtype=torch.int64)), ValueError, "at least one class"),
])
def test_bad_arguments(args, error, message):
    with pytest.raises(error, match=message):
        upsampled_cross_entropy(*args)


@needs_kernels
def test_multi_task_loss_fused_is_the_reference_loss():
    """Every task's loss with deep supervision, fused (kernel for cross-entropy, matrix resize for the rest) against
    the reference, float64: total, parts and the gradients of every prediction."""
    torch.manual_seed(0)
    tasks = {"semseg": 6, "depth": 1, "normals": 3, "edge": 1, "sal": 1, "human_parts": 4}
    size = (24, 32)
    batch = {"semseg": torch.randint(0, 6, (2, *size)), "human_parts": torch.randint(0, 4, (2, *size)),
             "depth": torch.rand(2, 1, *size) * 3, "normals": torch.nn.functional.normalize(torch.randn(2, 3, *size)),
             "edge": (torch.rand(2, 1, *size) > 0.8).double(), "sal": (torch.rand(2, 1, *size) > 0.5).double()}
    batch["semseg"][:, :3] = 255
    preds = {t: torch.randn(2, n, *size, dtype=torch.float64, requires_grad=True) for t, n in tasks.items()}
    preds["deep_supervision"] = {f"scale_{k}": {t: torch.randn(2, n, size[0] >> (k + 1), size[1] >> (k + 1),
                                                               dtype=torch.float64, requires_grad=True)
                                                for t, n in tasks.items()} for k in range(3)}
    leaves = [p for t, p in preds.items() if t != "deep_supervision"] + \
        [p for d in preds["deep_supervision"].values() for p in d.values()]
    results = []
    for fused in (False, True):
        loss_fn = MultiTaskLoss(list(tasks), {"semseg": 1.5, "sal": 2.0}, edge_pos_weight=0.9, fused=fused)
        total, parts = loss_fn(preds, batch)
        results.append((total.detach(), parts, torch.autograd.grad(total, leaves)))
    (t0, p0, g0), (t1, p1, g1) = results
    torch.testing.assert_close(t1, t0, rtol=1e-12, atol=0)
    assert p1.keys() == p0.keys()
    for k in p0:
        torch.testing.assert_close(p1[k], p0[k], rtol=1e-12, atol=1e-15)
    for a, b in zip(g1, g0):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-15)
    with pytest.raises(TypeError, match="flag must be bool"):
        MultiTaskLoss(list(tasks)).set_fused("yes")
