"""The fused network path computes the reference's function from the same parameters: outputs (all tasks and
deep supervision), gradients of every parameter and of the input, and BatchNorm running statistics after two
optimizer steps, in train and eval mode."""
import copy
import sys

import pytest
import torch

import fused_mtl_attn
from model import TASK_SETS, build_model

SMALL = (12, 24, 48, 96)
CONFIGS = TASK_SETS
PARITY_CONFIGS = ("nyud2", "nyud4", "pascal5")  # the parity set
RTOL = {torch.float32: 1e-4, torch.float64: 1e-9}


def _loss(out, tasks):
    loss = sum(out[t].square().mean() for t in tasks)
    return loss + sum(p.square().mean() for preds in out["deep_supervision"].values() for p in preds.values())


def _flat_outputs(out):
    flat = {t: v for t, v in out.items() if t != "deep_supervision"}
    flat.update({f"ds{k}.{t}": p for k, preds in out["deep_supervision"].items() for t, p in preds.items()})
    return flat


def _assert_close(name, got, want, scale, rtol, slack=0.0):
    """|got - want| <= RTOL * (|want| + scale) + slack: relative, with a floor at the magnitude of the tensor family
    (a gradient that is zero in exact arithmetic, e.g. a conv bias before BatchNorm, is pure rounding noise)."""
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    err = (got - want).abs()
    bound = rtol * (want.abs() + scale) + slack
    if not bool((err <= bound).all()):
        i = int((err - bound).argmax())
        pytest.fail(f"{name}: worst |diff| {err.flatten()[i].item():.3e} at value {want.flatten()[i].item():.3e} "
                    f"(bound {bound.flatten()[i].item():.3e}, max |diff| {err.max().item():.3e})")


# float64 shows that both paths are the same function (to rounding) through two optimizer steps; the production
# dtype, float32, is checked against a float64 oracle in test_float32_accuracy (a float32-vs-float32 comparison at
# these tiny sizes measures how this CPU's float32 rounding is amplified, not whether the paths agree).
# eval mode: one step (running statistics stay put there; fresh ones make a second step blow up)
CASES = [(c, True, torch.float64, 2) for c in PARITY_CONFIGS] + [(c, False, torch.float64, 1) for c in PARITY_CONFIGS]


def _run_step(nets, x, tasks, step, train):
    """One forward/backward of each net on the same input and drop-path draws: (flat outputs, input grads)."""
    outs, grads_x = [], []
    for net in nets:
        net.train(train)
        xi = x.to(next(net.parameters()).dtype, copy=True).requires_grad_(True)
        torch.manual_seed(10 + step)  # drop path draws the same masks on both paths
        out = net(xi)
        net.zero_grad()
        _loss(out, tasks).backward()
        outs.append(_flat_outputs(out))
        grads_x.append(xi.grad)
    return outs, grads_x


@pytest.mark.parametrize(
    "config, train, dtype, steps", CASES,
    ids=[f"{c}-{'train' if tr else 'eval'}-{str(dt)[6:]}-{n}step" for c, tr, dt, n in CASES],
)
def test_fused_matches_reference(config, train, dtype, steps):
    """float64 in the fused path's default layout (channels-last convolutions on CPU): the same function."""
    _parity(config, train, dtype, steps)


def _parity(config, train, dtype, steps, recompute=True, device="cpu", backend="auto", size=(64, 64)):
    tasks = CONFIGS[config]
    rtol = RTOL[dtype]
    torch.manual_seed(0)
    ref = build_model(tasks, widths=SMALL).to(device, dtype)
    fused = copy.deepcopy(ref).set_fused(True, recompute=recompute, backend=backend)
    assert fused.fused and not ref.fused
    opts = [torch.optim.SGD(m.parameters(), lr=0.01) for m in (ref, fused)]
    x = torch.randn(2, 3, *size, dtype=dtype).to(device)
    for step in range(steps):  # optimizer steps, so running statistics and weights evolve identically
        outs = _assert_same_step((ref, fused), x, tasks, step, train, rtol)
        for t in tasks:
            assert outs[0][t].shape[-2:] == outs[1][t].shape[-2:] == size, t
        for opt in opts:
            opt.step()
    _assert_same_buffers(ref, fused, rtol)


def _assert_same_step(nets, x, tasks, step, train, rtol):
    """One _run_step of the two nets (the second may be a torch.compile wrapper): outputs, input gradient and every
    parameter's gradient agree. Returns the flat outputs."""
    outs, grads_x = _run_step(nets, x, tasks, step, train)
    for name, want in outs[0].items():
        _assert_close(f"step {step} output {name}", outs[1][name].detach(), want.detach(), want.abs().max(), rtol)
    _assert_close(f"step {step} input grad", grads_x[1], grads_x[0], grads_x[0].abs().max(), rtol)
    want_params = list(nets[0].named_parameters())
    scale = max(p.grad.abs().max() for _, p in want_params)
    for (name, p_want), p_got in zip(want_params, nets[1].parameters()):
        # gradient floor: the largest gradient of that tensor's module family, or 1e-3 of the global one
        _assert_close(f"step {step} grad {name}", p_got.grad, p_want.grad,
                      torch.maximum(p_want.grad.abs().max(), 1e-3 * scale), rtol)
    return outs


def _assert_same_buffers(want_net, got_net, rtol):
    for (name, b_want), b_got in zip(want_net.named_buffers(), got_net.buffers()):
        if b_want.is_floating_point():
            # running means of BN inputs that are zero-mean by construction sit at rounding level: floor at 1e-3
            _assert_close(f"buffer {name}", b_got, b_want, torch.clamp(b_want.abs().max(), min=1e-3), rtol)
        else:  # the batch counters: a recomputation must not count as a second call
            assert torch.equal(b_got, b_want), f"buffer {name}: {b_got} != {b_want}"


@pytest.mark.parametrize("config, channels_last", [("nyud2", True), ("pascal5", True), ("nyud2", False),
                                                   ("pascal5", False)])
def test_float32_accuracy(config, channels_last):
    """The fused path in float32 (in either layout of its convolutions) against the float64 reference: outputs
    within 1e-4 relative; gradients (input and every parameter) no further from it than 1e-4 relative plus twice
    the float32 reference's own error on this machine: its largest error over its run in either layout and on
    inputs that differ by 1e-7 relative. The bound is derived, not tuned: float32 rounding differs between CPUs
    (AVX-512 and AVX2 kernels of oneDNN and of this package sum in other orders), and at these sizes BatchNorm over
    a dozen values per channel amplifies it, and a rounding-level change flips ReLUs whose input sits at zero, so
    gradients jump there; whatever this CPU's float32 does to the reference, the fused path may do twice over."""
    _float32_accuracy(config, channels_last)


def _float32_accuracy(config, channels_last, device="cpu", backend="auto", expect_channels_last=None):
    """channels_last: the fused path's setting (None: its default choice, which must then be
    expect_channels_last)."""
    tasks = CONFIGS[config]
    torch.manual_seed(0)
    ref = build_model(tasks, widths=SMALL).to(device)
    fused = copy.deepcopy(ref).set_fused(True, channels_last=channels_last, backend=backend)
    oracle = copy.deepcopy(ref).double()
    x = torch.randn(2, 3, 64, 64).to(device)
    layouts = []  # the layout the decoder's convolutions see
    fused.heads[next(iter(tasks))].projection["0_from_1"][0].register_forward_pre_hook(
        lambda mod, inp: layouts.append(inp[0].is_contiguous(memory_format=torch.channels_last)))
    outs, grads_x = _run_step((fused, oracle), x, tasks, 0, True)
    grads = [[p.grad for p in net.parameters()] for net in (fused, oracle)]
    expected = channels_last if channels_last is not None else expect_channels_last
    assert layouts == [expected], f"the decoder's convolutions did not run with channels_last={expected}"
    assert all(o.is_contiguous() for o in outs[0].values()), "outputs must come back NCHW-contiguous"
    for name, want in outs[1].items():
        _assert_close(f"output {name}", outs[0][name].detach().double(), want.detach(), want.abs().max(), 1e-4)
    spread = [torch.zeros((), device=device) for _ in range(len(grads[0]) + 1)]
    for seed in range(4):
        noise = 1e-7 * torch.randn(x.shape, generator=torch.Generator().manual_seed(seed)).to(device) if seed > 1 else 0.0
        xi = x.contiguous(memory_format=torch.channels_last) if seed == 1 else x * (1 + noise)
        net = copy.deepcopy(ref)
        _, (gx,) = _run_step((net,), xi, tasks, 0, True)
        for i, g in enumerate([gx] + [p.grad for p in net.parameters()]):
            want = grads_x[1] if i == 0 else grads[1][i - 1]
            spread[i] = torch.maximum(spread[i], (g.double() - want).abs().max())
    _assert_close("input grad", grads_x[0].double(), grads_x[1], grads_x[1].abs().max(), 1e-4, slack=2 * spread[0])
    scale = max(g.abs().max() for g in grads[1])
    for i, (name, _) in enumerate(ref.named_parameters()):
        want = grads[1][i]
        _assert_close(f"grad {name}", grads[0][i].double(), want, torch.maximum(want.abs().max(), 1e-3 * scale), 1e-4,
                      slack=2 * spread[i + 1])


# the padded input (a multiple of 32) is non-square, so every interior resize (FPMA to the next scale, CSAM pieces to
# scale 0, the head to the input) has other factors along height and width: a swapped pair of interpolation matrices
# fails here, which the square 64x64 cases cannot show; both orientations, and the crop back to the input size
NON_SQUARE = [("nyud2", True, (40, 72), 2), ("nyud2", False, (72, 40), 1)]


@pytest.mark.parametrize("config, train, size, steps", NON_SQUARE,
                         ids=[f"{c}-{'train' if tr else 'eval'}-{h}x{w}" for c, tr, (h, w), _ in NON_SQUARE])
def test_fused_matches_reference_non_square(config, train, size, steps):
    """float64 parity at sizes that are neither square nor multiples of 32 (padded to 64x96 / 96x64, cropped back)."""
    _parity(config, train, torch.float64, steps, size=size)


def test_fused_without_recomputation_matches_reference():
    _parity("nyud4", True, torch.float64, 2, recompute=False)


def test_linear_as_convolution_matches_reference(monkeypatch):
    """The fused path's Linear layers (the Swin blocks' qkv and proj) as 1x1 convolutions of their rows (the default
    for large products where oneDNN outpaces MKL), forced here on every call: float64 parity, the calls counted."""
    import model.fused_ops

    calls = []
    monkeypatch.setattr(model.fused_ops, "_linear_convolution_runs", lambda x, w: calls.append(x.shape) or True)
    _parity("nyud2", True, torch.float64, 2)
    assert len(calls) >= 2 * (4 * 2 + 3) * 2  # qkv and proj of every Swin block (2 per encoder scale, 1 per FPMA)
    assert any(len(shape) == 3 for shape in calls)


@pytest.mark.parametrize("shape, bias", [((7, 12), True), ((2, 5, 3, 12), False)], ids=["rows", "strided-4d"])
def test_linear_as_convolution_float32(shape, bias, monkeypatch):
    """fused_ops.linear's convolution path in float32 against F.linear: any leading shape, a strided input, no
    bias; output and gradients within float32 rounding."""
    import model.fused_ops
    from model.fused_ops import linear

    monkeypatch.setattr(model.fused_ops, "LINEAR_CONVOLUTION_MIN_MACS", 0)
    torch.manual_seed(0)
    x = torch.randn(shape).transpose(0, -2) if len(shape) > 2 else torch.randn(shape)
    weight = torch.randn(20, 12)
    b = torch.randn(20) if bias else None
    assert model.fused_ops._linear_convolution_runs(x, weight)
    got = [t.clone().requires_grad_() for t in (x, weight)] + ([b.clone().requires_grad_()] if bias else [])
    want = [t.clone().requires_grad_() for t in (x, weight)] + ([b.clone().requires_grad_()] if bias else [])
    out_got = linear(got[0], got[1], got[2] if bias else None)
    out_want = torch.nn.functional.linear(want[0], want[1], want[2] if bias else None)
    assert out_got.shape == out_want.shape
    torch.testing.assert_close(out_got, out_want, rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(out_want)
    for g, w in zip(torch.autograd.grad(out_got, got, grad), torch.autograd.grad(out_want, want, grad)):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("capability, vendor, onednn_products, channels_last_aggregation",
                         [("AVX2", "AuthenticAMD", False, True), ("AVX512", "AuthenticAMD", True, True),
                          ("AVX512", "GenuineIntel", False, False), ("AVX2", "GenuineIntel", False, False),
                          ("AVX512", None, False, True)])
def test_product_rules_follow_the_cpu_vendor(capability, vendor, onednn_products, channels_last_aggregation):
    """Products go to oneDNN convolutions only where MKL runs no AVX-512 code (AVX-512 on a CPU not Intel's), the
    aggregation head runs channels-last except on Intel's CPUs (where MKL's blocks win); an unknown vendor (None)
    keeps MKL and the channels-last head."""
    import model.fused_ops

    assert model.fused_ops._onednn_outpaces_mkl(vendor, capability) is onednn_products
    assert model.fused_ops._channels_last_aggregation_wins(vendor) is channels_last_aggregation


@pytest.mark.parametrize("products, recompute_from", [("batched", 1), ("convolution", 10 ** 9)],
                         ids=["batched-recomputed", "convolution-kept"])
def test_ctam_projection_paths_match_reference(products, recompute_from, monkeypatch):
    """CTAM's pair projections as batched matrix products or as grouped convolutions (the CPU default below
    CONV_PROJECTIONS_MAX_POSITIONS positions: every scale here), recomputed in backward at every scale or kept at
    every one (the default from RECOMPUTE_PROJECTIONS_MIN_POSITIONS on): float64 parity, with the path counted."""
    import model.fused
    import model.fused_ops
    from model.fused import FusedCrossTaskAttention

    monkeypatch.setattr(model.fused_ops, "CONV_PROJECTIONS_MAX_POSITIONS", 10 ** 9 if products == "convolution" else 0)
    monkeypatch.setattr(model.fused, "RECOMPUTE_PROJECTIONS_MIN_POSITIONS", recompute_from)
    taken, calls = [], []
    decide = model.fused_ops._convolution_runs
    monkeypatch.setattr(model.fused_ops, "_convolution_runs", lambda x: taken.append(decide(x)) or taken[-1])
    project = FusedCrossTaskAttention.pair_projections
    monkeypatch.setattr(FusedCrossTaskAttention, "pair_projections",
                        lambda self, *a: calls.append(torch.is_grad_enabled()) or project(self, *a))
    _parity("pascal3", True, torch.float64, 2)
    assert set(taken) == {products == "convolution"}
    # per step one call per scale in forward, and one more in backward where recomputed
    assert len(calls) == 2 * 4 * (2 if recompute_from == 1 else 1), calls


def test_checkpoint_moves_between_paths():
    tasks = CONFIGS["nyud2"]
    torch.manual_seed(0)
    fused = build_model(tasks, widths=SMALL, fused=True).eval()
    ref = build_model(tasks, widths=SMALL).eval()
    ref.load_state_dict(fused.state_dict())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        a, b = fused(x), ref(x)
    for t in tasks:
        _assert_close(f"output {t}", a[t], b[t], b[t].abs().max(), RTOL[torch.float32])
    assert ref.set_fused(True) is ref and ref.fused


def test_backward_does_not_zero_fill_per_piece():
    """Taking pieces of a stacked tensor by slicing (pairs of CTAM, targets, CSAM sources, weight columns) gives
    every slice's backward a zero tensor of the whole stack, filled, then added up: 89 MiB per backward at these
    sizes (PASCAL, 20 pairs), several hundred MB of passes per step at the paper's. The fused path splits and
    unbinds instead. What slice/select backwards remain (6 MiB) are the Swin layers' q, k, v and crops, shared
    with the reference; bytes, not time, so the bound holds on every machine."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class PieceGradients(TorchDispatchMode):
        bytes = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func.overloadpacket in (torch.ops.aten.slice_backward, torch.ops.aten.select_backward):
                self.bytes += out.numel() * out.element_size()
            return out

    torch.manual_seed(0)
    net = build_model(CONFIGS["pascal5"], widths=SMALL).set_fused(True).train()
    loss = _loss(net(torch.randn(2, 3, 64, 64)), CONFIGS["pascal5"])
    with PieceGradients() as counted:
        loss.backward()
    assert counted.bytes < 12 * 2**20, f"{counted.bytes / 2**20:.1f} MiB of slice/select gradients"


@pytest.mark.parametrize("config", ["nyud2", "pascal3", "pascal5"])
def test_ctam_block_reads_each_target_feature_once(config):
    """The reference's shared CTAM block reads [Y_t, GCA(t <- a)] for each of the M-1 sources, Y_t M-1 times; the
    fused block reads Y_t once with the repeated copies' weight columns summed: M*C input channels, not 2(M-1)*C
    (the parity tests check that it is the same function)."""
    torch.manual_seed(0)
    tasks = CONFIGS[config]
    net = build_model(tasks, widths=SMALL).set_fused(True).train()
    ctam = net.cross_task[0]
    m, c = len(tasks), SMALL[0]
    assert ctam.block.conv1.in_channels == 2 * (m - 1) * c
    seen = []
    ctam.block.conv1.register_forward_pre_hook(lambda mod, inp: seen.append(inp[0].shape[1]))
    net(torch.randn(2, 3, 64, 64))
    assert seen == [m * c]
    for t in tasks:  # Y_t then the pairs in the reference's order: the last source first
        assert ctam.block_pieces[t] == [None if i % 2 == 0 else a for a in reversed(ctam.sources(t)) for i in (0, 1)]


@pytest.mark.parametrize("src, dst", [((4, 5), (32, 40)), ((7, 9), (13, 30)), ((16, 20), (16, 20)), ((3, 3), (2, 5)),
                                      ((9, 4), (30, 13)), ((10, 3), (5, 7)), ((2, 3), (16, 24))])
def test_matmul_upsample_is_pytorch_bilinear(src, dst):
    from model.fused import upsample

    x = torch.randn(2, 3, *src, dtype=torch.float64, requires_grad=True)
    want = torch.nn.functional.interpolate(x, size=dst, mode="bilinear", align_corners=False)
    got = upsample(x, dst)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(want)
    torch.testing.assert_close(torch.autograd.grad(got, x, g)[0], torch.autograd.grad(want, x, g)[0],
                               rtol=1e-12, atol=1e-12)


def test_fused_path_under_bfloat16_autocast():
    """Mixed precision (the GPU recipe, here with CPU autocast): the fused path runs and stays at bf16 distance."""
    _bfloat16_autocast("cpu", "auto")


def _bfloat16_autocast(device, backend):
    tasks = CONFIGS["nyud2"]
    torch.manual_seed(0)
    ref = build_model(tasks, widths=SMALL).to(device).train()
    fused = copy.deepcopy(ref).set_fused(True, backend=backend)
    x = torch.randn(2, 3, 64, 64).to(device)
    losses = []
    for net in (ref, fused):
        torch.manual_seed(1)
        with torch.autocast(device, dtype=torch.bfloat16):
            out = net(x)
        loss = _loss({k: v if k == "deep_supervision" else v.float() for k, v in out.items()}, tasks)
        loss.backward()
        losses.append(loss.item())
        assert all(torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None)
    assert abs(losses[1] - losses[0]) <= 2e-2 * abs(losses[0]), f"bf16 losses {losses}"


# ----------------------------------------------------------------------------- on a GPU, per GPU attention backend


@pytest.fixture
def full_fp32():
    """TF32 convolutions and matmuls off: both paths' own float32 rounding, as on the CPU."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


GPU_BACKENDS = ("cuda", "triton")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize(
    "config, train, dtype, steps", CASES,
    ids=[f"{c}-{'train' if tr else 'eval'}-{str(dt)[6:]}-{n}step" for c, tr, dt, n in CASES],
)
def test_fused_matches_reference_on_gpu(config, train, dtype, steps, backend):
    """The CPU parity cases on the GPU, in float64 (both GPU backends compute in it): the same function to 1e-9."""
    _parity(config, train, dtype, steps, device="cuda", backend=backend)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("config, channels_last", [("nyud2", False), ("pascal5", False), ("pascal5", True)])
def test_float32_accuracy_on_gpu(config, channels_last, backend, full_fp32):
    """float32 against the float64 oracle on the GPU, the bound derived from the reference's own error there (see
    test_float32_accuracy); NCHW is the GPU path's default layout."""
    _float32_accuracy(config, channels_last, device="cuda", backend=backend)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_fused_path_under_bfloat16_autocast_on_gpu(backend):
    _bfloat16_autocast("cuda", backend)


def test_aggregation_by_channel_blocks_matches_reference(monkeypatch):
    """Paper-size inputs split the aggregation head into blocks of channels; force small, uneven blocks here."""
    import model.fused_ops

    monkeypatch.setattr(model.fused_ops, "_channel_block", lambda batch, channels, positions, device: 7)
    _parity("nyud2", True, torch.float64, 2)


def count_applies(monkeypatch, *names):
    """Count the calls of model.fused_ops' autograd Functions `names` (each .apply wrapped): {name: calls so far}."""
    import model.fused_ops

    calls = dict.fromkeys(names, 0)
    for name in names:
        def counted(*args, name=name, apply=getattr(model.fused_ops, name).apply):
            calls[name] += 1
            return apply(*args)
        monkeypatch.setattr(getattr(model.fused_ops, name), "apply", counted)
    return calls


def take_gpu_choices(monkeypatch):
    """Make the fused network choose on this CPU what it chooses on a GPU (fused_ops.cpu_tuned false: NCHW maps,
    batched products, the aggregation by [c, N] blocks rebuilt in backward, F.interpolate), with the extension's
    CPU kernels outside the attention ops unused (every module's cpu_kernels_run false, as for CUDA tensors). Returns
    the count of calls of each aggregation, to show which one ran."""
    import model.fused_ops

    monkeypatch.setattr(model.fused_ops, "cpu_tuned", lambda device: False)
    original = fused_mtl_attn.backends.cpu_kernels_run
    for module in list(sys.modules.values()):
        if getattr(module, "cpu_kernels_run", None) is original:
            monkeypatch.setattr(module, "cpu_kernels_run", lambda x: False)
    return count_applies(monkeypatch, "_Aggregation", "_AggregationChannelsLast", "_Upsample")


def test_fused_matches_reference_with_a_gpus_choices(monkeypatch):
    """The branches only a GPU takes, here on a CPU: float64 parity (two training steps, eval mode) and float32
    accuracy in NCHW (_float32_accuracy checks the layout)."""
    calls = take_gpu_choices(monkeypatch)
    _parity("nyud2", True, torch.float64, 2)
    _parity("pascal5", False, torch.float64, 1)
    _float32_accuracy("pascal5", None, expect_channels_last=False)
    assert calls["_Aggregation"] >= 2 * 2 + 5 + 5, calls
    assert calls["_AggregationChannelsLast"] == calls["_Upsample"] == 0, calls


@pytest.mark.skipif(not fused_mtl_attn.available_backends()["cpu"][0], reason="the C++ extension is not built")
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_parity_rehearsed_on_cpu(backend, monkeypatch):
    """test_fused_matches_reference_on_gpu as far as a CPU goes: a GPU's choices, and the attention of every CTAM
    and CSAM call through the GPU backend's own kernels, the Triton kernels under the interpreter or the CUDA
    kernels host-emulated (csrc/cuda/emulation.h, with the cuda backend's autograd): float64 parity over two
    training steps and in eval mode, so that what the network hands the kernels (pair stacks, ragged CSAM sources,
    strides) is checked before a GPU runs it."""
    from fused_mtl_attn import backends

    from .test_cuda_emulated import _scale, _task

    if backend == "triton" and torch.cuda.is_available():
        pytest.skip("with a GPU the Triton kernels run compiled, not interpreted: the GPU parity tests run them")
    if backend == "triton" and not backends.available_backends()["triton"][0]:
        pytest.skip("triton is not installed")
    take_gpu_choices(monkeypatch)
    if backend == "cuda":
        kernels = backends.Backend("cuda", lambda: [], lambda q: [], _task,
                                   lambda q, k, v, offsets: _scale(offsets)(q, k, v))
    else:
        kernels = backends._get("triton")
    calls = {"cross_task": 0, "cross_scale": 0}

    def counted(op):
        def run(*args):
            calls[op] += 1
            return getattr(kernels, op)(*args)
        return run

    monkeypatch.setitem(backends._loaded, backend, backends.Backend(
        backend, lambda: [], lambda q: [], counted("cross_task"), counted("cross_scale")))
    _parity("nyud2", True, torch.float64, 2, backend=backend)
    _parity("pascal5", False, torch.float64, 1, backend=backend)
    # nyud2: 4 CTAM scales and 2 tasks' CSAM per forward, over 2 steps; pascal5 likewise, 1 step
    assert calls["cross_task"] >= 4 * 2 + 4 and calls["cross_scale"] >= 2 * 2 + 5, calls


@pytest.mark.skipif(not fused_mtl_attn.available_backends()["cpu"][0], reason="the C++ extension is not built")
@pytest.mark.parametrize("config", ["nyud2", "pascal5"])
def test_batch_norm_kernels_in_the_network_match_reference(config, monkeypatch):
    """The BatchNorm kernels (channels-last; BatchNorm + ReLU and BatchNorm alone of the CTAM projections), which by
    default take only the paper sizes' large maps, here on every map of the tiny network they can take (float64, two
    training steps, as the parity tests)."""
    import model.fused
    import model.fused_ops

    monkeypatch.setattr(model.fused_ops, "CHANNELS_LAST_BATCH_NORM_MIN_ROWS", 2)
    monkeypatch.setattr(model.fused_ops, "BATCH_NORM_KERNEL_MIN_ROWS", 2)
    monkeypatch.setattr(model.fused, "CHANNELS_LAST_MIN_POSITIONS", 1)  # every scale channels-last
    calls = {"batch_norm_channels_last": 0, "batch_norm_relu": 0, "batch_norm_relu(relu=False)": 0}
    for name in ("batch_norm_channels_last", "batch_norm_relu"):
        def counted(*args, name=name, kernel=getattr(torch.ops.fused_mtl_attn, name)):
            relu = args[6] if name == "batch_norm_relu" and len(args) > 6 else True
            # (not the aggregation head's calls inside its own backward)
            calls[name if relu else name + "(relu=False)"] += torch.is_grad_enabled()
            return kernel(*args)
        monkeypatch.setattr(torch.ops.fused_mtl_attn, name, counted)
    _parity(config, True, torch.float64, 2)
    assert calls["batch_norm_channels_last"] > 50, calls
    # the CTAM projections (all pairs stacked): q, k and v one BatchNorm + ReLU each, q and k one BatchNorm alone
    # each, per scale and step in forward (and again where recomputed in backward)
    assert calls["batch_norm_relu"] >= 3 * 4 * 2, calls
    assert calls["batch_norm_relu(relu=False)"] >= 2 * 4 * 2, calls


def _decoder_layouts(net, x) -> list:
    """Per scale k, whether the convolutions of InitialPrediction, CTAM's block and (k > 0) FPMA's block saw a
    channels-last input, in one forward of net on x."""
    seen = {}

    def record(key):
        def hook(mod, inp):
            seen.setdefault(key, inp[0].is_contiguous(memory_format=torch.channels_last))
        return hook

    for k in range(4):
        layers = [next(iter(net.initial[k].values())).blocks[0].conv1, net.cross_task[k].block.conv1]
        layers += [net.propagation[k].block.conv1] if k else []
        for i, layer in enumerate(layers):
            layer.register_forward_pre_hook(record((k, i)))
    with torch.no_grad():
        net(x)
    return [[seen[k, i] for i in range(3 if k else 2)] for k in range(4)]


@pytest.mark.parametrize("min_positions", [256, 64, None])
def test_default_layout_by_map_size(min_positions, monkeypatch):
    """On CPU the default runs a scale's convolutions channels-last from CHANNELS_LAST_MIN_POSITIONS positions on,
    NCHW below (the propagated features joining a finer scale take its layout); channels_last=True/False holds at
    every scale; the outputs come back NCHW and the same either way."""
    import model.fused

    if min_positions is not None:
        monkeypatch.setattr(model.fused, "CHANNELS_LAST_MIN_POSITIONS", min_positions)
    tasks = CONFIGS["nyud2"]
    torch.manual_seed(0)
    ref = build_model(tasks, widths=SMALL).eval()
    x = torch.randn(2, 3, 64, 64)  # scales of 16x16, 8x8, 4x4, 2x2 positions
    outs = {}
    for name, layout in (("default", None), ("channels_last", True), ("nchw", False)):
        net = copy.deepcopy(ref).set_fused(True, channels_last=layout)
        want = {None: [256 >= model.fused.CHANNELS_LAST_MIN_POSITIONS, 64 >= model.fused.CHANNELS_LAST_MIN_POSITIONS,
                       False, False], True: [True] * 4, False: [False] * 4}[layout]
        got = _decoder_layouts(net, x)
        assert got == [[w] * len(g) for w, g in zip(want, got)], (name, got)
        with torch.no_grad():
            outs[name] = net(x)
        assert all(o.is_contiguous() for t, o in outs[name].items() if t in tasks), name
    with torch.no_grad():
        want = ref(x)
    for name, out in outs.items():
        for t in tasks:
            torch.testing.assert_close(out[t], want[t], rtol=1e-4, atol=1e-4 * want[t].abs().max().item(),
                                       msg=f"{name} {t}")


@pytest.mark.skipif(not fused_mtl_attn.available_backends()["cpu"][0], reason="the C++ extension is not built")
def test_aggregation_interpolates_rows_by_the_kernel(monkeypatch):
    """Where the CPU kernels run, the aggregation heads resample rows by upsample_rows_accumulate (forward and
    backward, once per block of channels and task): the parity tests above then check that path."""
    calls = {"upsample_rows_accumulate": 0, "upsample_rows_accumulate_backward": 0}
    for name in calls:
        def counted(*args, name=name, kernel=getattr(torch.ops.fused_mtl_attn, name)):
            calls[name] += 1
            return kernel(*args)
        monkeypatch.setattr(torch.ops.fused_mtl_attn, name, counted)
    _parity("nyud2", True, torch.float64, 1)
    assert calls["upsample_rows_accumulate"] >= 2 and calls["upsample_rows_accumulate_backward"] >= 2, calls


@pytest.mark.skipif(not fused_mtl_attn.available_backends()["cpu"][0], reason="the C++ extension is not built")
@pytest.mark.parametrize("channels_last", [True, False])
def test_aggregation_in_either_layout_matches_reference(channels_last, monkeypatch):
    """Where the CPU kernels run, the aggregation heads run channels-last (1x1 convolutions, _AggregationChannelsLast)
    with CHANNELS_LAST_AGGREGATION on (CPUs other than Intel's), by [c, N] blocks and BLAS products (_Aggregation,
    the GPU's way) with it off:
    the same function either way, in training (two steps) and in eval mode, with uneven blocks of channels."""
    import model.fused_ops

    monkeypatch.setattr(model.fused_ops, "CHANNELS_LAST_AGGREGATION", channels_last)
    monkeypatch.setattr(model.fused_ops, "_channel_block", lambda batch, channels, positions, device: 11)
    calls = count_applies(monkeypatch, "_Aggregation", "_AggregationChannelsLast")
    _parity("nyud2", True, torch.float64, 2)
    _parity("pascal3", False, torch.float64, 1)
    used, unused = ("_AggregationChannelsLast", "_Aggregation")[::1 if channels_last else -1]
    assert calls[used] >= 2 * 2 + 3 and calls[unused] == 0, calls


def test_aggregation_without_the_batch_norm_relu_kernel_matches_reference(monkeypatch):
    """Kept blocks normalised by eager PyTorch and interpolated by dense products, as where the extension's CPU
    kernels cannot run."""
    import model.fused_ops

    monkeypatch.setattr(model.fused_ops, "cpu_kernels_run", lambda x: False)
    _parity("nyud2", True, torch.float64, 2)


@pytest.mark.parametrize("kwargs, match", [({"flag": "yes"}, "flag must be bool"),
                                           ({"channels_last": 1}, "channels_last must be bool or NoneType"),
                                           ({"recompute": None}, "recompute must be bool"),
                                           ({"backend": "gpu"}, "backend must be one of")])
def test_set_fused_rejects_bad_arguments(kwargs, match):
    net = build_model(CONFIGS["nyud2"], widths=SMALL)
    with pytest.raises((TypeError, ValueError), match=match):
        net.set_fused(**kwargs)
