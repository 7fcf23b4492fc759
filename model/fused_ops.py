"""The machinery of the fused path (model/fused.py), independent of the SCA-MTL modules: BatchNorm that gives
several reference calls' outputs and running statistics in one pass, recomputation in backward, grouped 1x1
convolutions as matrix products (or oneDNN convolutions) and Linear layers as oneDNN convolutions where those are
faster, the aggregation head computed by blocks of channels, and bilinear resizing as matrix products. Every
function accepts both memory layouts (NCHW and channels-last).
"""
from __future__ import annotations

import contextlib
from typing import List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from fused_mtl_attn.backends import cpu_kernels_run
from fused_mtl_attn.cpuinfo import first_processor

# ------------------------------------------------------------------------------ bookkeeping under torch.compile
# The stacked projections of CTAM read 20-120 modules' parameters and update as many BatchNorms' running statistics
# per call (PASCAL). Inductor generates a loop per concatenated piece and per updated buffer, and its code
# generation then dominates the compile time (about 1000 nodes per CTAM scale forward, 50 ms each on 2 cores).
# These two ops are opaque to it: one node each. Eager code calls torch.cat directly (the op's dispatch costs more).


@torch.library.custom_op("sca_mtl::cat_parameters", mutates_args=())
def cat_parameters(tensors: List[torch.Tensor]) -> torch.Tensor:
    """torch.cat(tensors) along the first axis, as one node under torch.compile."""
    return torch.cat(tensors)


@cat_parameters.register_fake
def _(tensors):
    return tensors[0].new_empty((sum(t.shape[0] for t in tensors), *tensors[0].shape[1:]))


def _cat_parameters_context(ctx, inputs, output):
    ctx.sizes = [t.shape[0] for t in inputs[0]]


cat_parameters.register_autograd(lambda ctx, grad: (list(grad.split(ctx.sizes)),),
                                 setup_context=_cat_parameters_context)


def cat_stacked(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Many modules' parameters concatenated along the first axis (one of them: itself)."""
    if len(tensors) == 1:
        return tensors[0]
    return cat_parameters(list(tensors)) if torch.compiler.is_compiling() else torch.cat(list(tensors))


def _running_stats_updates(running_means: List[torch.Tensor], running_vars: List[torch.Tensor],
                           counts: List[torch.Tensor], mean: torch.Tensor, var: torch.Tensor,
                           momentum: Optional[float], calls: int) -> None:
    """`calls` BatchNorm running-statistics updates of each module of a stack (its buffers listed) from its block of
    the stacked batch mean and unbiased variance, as the module's own forward does (momentum None: a cumulative
    average). Eager code calls this directly; torch.compile sees it as the opaque op update_running_stats."""
    sizes = [t.shape[0] for t in running_means]
    means, variances = mean.split(sizes), var.split(sizes)
    for _ in range(calls):
        torch._foreach_add_(counts, 1)
        if momentum is not None:
            torch._foreach_mul_(running_means, 1 - momentum)
            torch._foreach_add_(running_means, means, alpha=momentum)
            torch._foreach_mul_(running_vars, 1 - momentum)
            torch._foreach_add_(running_vars, variances, alpha=momentum)
            continue
        for rm, rv, m, v, count in zip(running_means, running_vars, means, variances, counts):
            factor = 1.0 / float(count)
            rm.mul_(1 - factor).add_(m, alpha=factor)
            rv.mul_(1 - factor).add_(v, alpha=factor)


# (a custom op's eager call costs about 0.1 ms of Python dispatch, paid by every stacked BatchNorm of a step)
update_running_stats = torch.library.custom_op("sca_mtl::update_running_stats",
                                               mutates_args=("running_means", "running_vars", "counts"))(
    _running_stats_updates)


@update_running_stats.register_fake
def _(running_means, running_vars, counts, mean, var, momentum, calls):
    return None


# ---------------------------------------------------------------------------------------------- BatchNorm


def _update_running_stats(norms: Sequence[nn.BatchNorm2d], mean: torch.Tensor, var_unbiased: torch.Tensor,
                          calls: int = 1) -> None:
    """`calls` running-statistics updates of each of `norms` (distinct modules) from its channel block of mean and
    var_unbiased [sum C_i], as each module's own forward in training mode would do."""
    if len({id(n) for n in norms}) < len(norms):  # (one list update would apply a module's updates out of order)
        raise ValueError("the stacked BatchNorm modules must be distinct modules")
    sizes = [n.num_features for n in norms]
    keep = [n.track_running_stats and n.running_mean is not None for n in norms]
    if not all(keep) or len({n.momentum for n in norms}) > 1:  # (not in the network: module by module)
        for n, m, v, k in zip(norms, mean.split(sizes), var_unbiased.split(sizes), keep):
            if k:
                _update_running_stats([n], m, v, calls)
        return
    update = update_running_stats if torch.compiler.is_compiling() else _running_stats_updates
    update([n.running_mean for n in norms], [n.running_var for n in norms], [n.num_batches_tracked for n in norms],
           mean, var_unbiased, norms[0].momentum, calls)


def _uses_batch_stats(norm: nn.BatchNorm2d) -> bool:
    return norm.training or norm.running_mean is None


def _channels_innermost(x: torch.Tensor) -> bool:
    """x [B, C, ...] stores its channels innermost (channels-last, or a [B, C, N] view of such a map): x is then rows
    [N, C] in memory."""
    return x.dim() >= 2 and x.movedim(1, -1).is_contiguous()


# Training-mode BatchNorm of a channels-last CPU map goes to the extension's kernel when the map has at least this
# many values per channel (B*H*W), else to PyTorch's (None: never). PyTorch 2.14's channels-last BatchNorm is 2-3x
# slower than the kernel on the decoder's 1/4-scale maps of 18-36 channels (10240 rows at 256x320, batch 2), and
# faster on the coarse ones, where the kernel path's fixed cost per call (Python: its autograd formula, the
# running-statistics update) outweighs the work (benchmarks/RESULTS.md, thirteenth-session CPU section). The 1/8
# scale's maps (2048-2560 rows) would gain 7-20 % of their BatchNorm time (nineteenth session), a step's 1 %; left
# with PyTorch, whose float32 rounding the float32 accuracy test's bound is derived from at the tests' sizes.
# The BatchNorm + ReLU kernel of [B, C, N] maps (the CTAM projections' first stage) has no such bound: with
# hundreds to thousands of stacked channels it is at least as fast as PyTorch's BatchNorm and ReLU at every scale.
# Without ReLU (their second stage) it takes maps of at least BATCH_NORM_KERNEL_MIN_ROWS values per channel: f+b
# 11.8 vs 24.0 ms on [2, 720, 4096], 6.0 vs 10.5 on [2, 1440, 1024], even at [2, 288, 320], slower below
# ([2, 576, 80] 0.83 vs 0.67 ms; Xeon with AVX-512, 2 threads).
CHANNELS_LAST_BATCH_NORM_MIN_ROWS: int | None = 8192
BATCH_NORM_KERNEL_MIN_ROWS = 512
# Where the CPU kernels run, the aggregation head resamples rows by 2-tap filters (upsample_rows_accumulate); False:
# by dense interpolation products as elsewhere (benchmarks/bench_layers.py compares the two)
ROW_TAPS = True


# MKL (PyTorch's BLAS on x86) runs its best code only on Intel's CPUs: elsewhere it takes its AVX2 code, slower than
# oneDNN's convolutions of the same products (benchmarks/RESULTS.md, twenty-third and twenty-fourth sessions). The
# product rules below follow the vendor (read once; None where unknown, e.g. not Linux: MKL's products and the
# channels-last head, the defaults of before).
CPU_VENDOR = first_processor().get("vendor_id")


def _onednn_outpaces_mkl(vendor: str | None, capability: str) -> bool:
    """oneDNN runs AVX-512 code on this CPU and MKL does not. On a Zen 5 MKL's float32 products run at 140-160
    GFLOP/s with AVX-512 allowed or not, oneDNN's 1x1 convolutions at 220-355; with AVX2 code oneDNN's lose to MKL's.
    On an Intel Xeon with AVX-512 MKL's products win in both places below (FPMA's Swin layers 1.08-1.18x, CTAM's
    projections 1.02-1.20x of the products' time as convolutions)."""
    return capability.startswith("AVX512") and vendor not in (None, "GenuineIntel")


def _channels_last_aggregation_wins(vendor: str | None) -> bool:
    """The aggregation head by channels-last 1x1 convolutions beats its [c, N] blocks of MKL products on CPUs other
    than Intel's, with AVX-512 or AVX2 code alike (Zen 5: one head 0.70-0.73x of the blocks' time with AVX-512, the
    aggregation 0.83x with AVX2 code); on an Intel Xeon the blocks win (one head as channels-last convolutions:
    NYUD 390 vs 308 ms, PASCAL 341 vs 282 with AVX-512; 1.17-1.21x with AVX2 code)."""
    return vendor != "GenuineIntel"


# Where the CPU kernels run and the finest map is channels-last, the aggregation head runs channels-last
# (_AggregationChannelsLast) if True; else by [c, N] blocks and BLAS products (_Aggregation), as on a GPU
CHANNELS_LAST_AGGREGATION = _channels_last_aggregation_wins(CPU_VENDOR)


# Where oneDNN outpaces MKL (read once), matrix products of the fused path run as oneDNN 1x1 convolutions:
ONEDNN_PRODUCTS = _onednn_outpaces_mkl(CPU_VENDOR, torch.backends.cpu.get_cpu_capability())
# - CTAM's grouped projections on maps of fewer positions than this (as NCHW grouped convolutions; else batched
#   products). [2, 5*C, H, W] -> 4 pairs' C channels per task, forward + backward, convolution vs product, Zen 5
#   with AVX-512: 8x8 (C 288) 5.1 vs 9.3 ms, 16x16 (C 144) 4.9 vs 7.9, 32x32 (C 72) 9.0 vs 8.0, 64x64 (C 36) 18 vs 11
#   (on larger maps channels-last convolutions would be faster, but their outputs need copying for the attention op).
CONV_PROJECTIONS_MAX_POSITIONS = 1024 if ONEDNN_PRODUCTS else 0
# - Linear layers (the Swin blocks' qkv and proj) of at least this many multiply-adds per call (None: never): their
#   rows as a channels-last map. Forward + backward on the Zen 5, 0.51-0.66x of F.linear from 2^24 multiply-adds on
#   (FPMA's [2450, 360] -> 1080: 18.4 vs 34.9 ms; [392, 1440] -> 4320: 50 vs 88), 0.9-1.6x below.
LINEAR_CONVOLUTION_MIN_MACS = 1 << 24 if ONEDNN_PRODUCTS else None


def cpu_tuned(device: torch.device) -> bool:
    """The fused network makes the choices tuned for CPUs on `device` (oneDNN convolutions, channels-last maps, kept
    pre-BN blocks, small channel blocks, the matrix upsample): on the CPU. The one test of the device behind those
    choices, so that the tests can run a GPU's choices on a CPU."""
    return device.type == "cpu"


def _kernels_take(x: torch.Tensor, weight, bias, min_rows: int) -> bool:
    """A training-mode BatchNorm call the extension's kernels can take: a CPU map in float32/float64 with at least
    `min_rows` values per channel (more than one in any case), affine parameters of its dtype, no autocast."""
    if weight is None or bias is None or weight.dtype != x.dtype or x.dim() < 2:
        return False
    return x.numel() // max(x.shape[1], 1) >= max(min_rows, 2) and cpu_kernels_run(x)


def channels_last_kernel_runs(x: torch.Tensor, weight, bias) -> bool:
    """The channels-last BatchNorm kernel takes this call: x with its channels innermost and at least
    CHANNELS_LAST_BATCH_NORM_MIN_ROWS values per channel."""
    return (CHANNELS_LAST_BATCH_NORM_MIN_ROWS is not None and _channels_innermost(x)
            and _kernels_take(x, weight, bias, CHANNELS_LAST_BATCH_NORM_MIN_ROWS))


def batch_norm_relu_kernel_runs(x: torch.Tensor, weight, bias, relu: bool = True) -> bool:
    """The BatchNorm (+ ReLU) kernel of [B, C, N] maps takes this call: x [B, C, N] with its positions
    contiguous (and without ReLU, at least BATCH_NORM_KERNEL_MIN_ROWS values per channel)."""
    min_rows = 2 if relu else BATCH_NORM_KERNEL_MIN_ROWS
    return x.dim() == 3 and x.stride(2) == 1 and _kernels_take(x, weight, bias, min_rows)


def _batch_norm_train(x: torch.Tensor, weight, bias, eps: float, relu: bool = False):
    """Training-mode BatchNorm of x (followed by ReLU with `relu`) that also returns the batch mean and unbiased
    variance. CPU maps go to the extension's kernels where they take them (above); else the statistics are
    taken from PyTorch's own running-statistics update (momentum 1 into zeroed buffers gives exactly the batch
    statistics that the reference's call folds into its buffers) instead of a second pass."""
    rows = x.numel() // x.shape[1]
    if batch_norm_relu_kernel_runs(x, weight, bias, relu):
        out, mean, var = torch.ops.fused_mtl_attn.batch_norm_relu(x, weight, bias, None, None, eps, relu)
        return out, mean, var * (rows / (rows - 1))
    if relu:
        out, mean, var = _batch_norm_train(x, weight, bias, eps)
        return F.relu(out), mean, var
    if channels_last_kernel_runs(x, weight, bias):
        out, mean, var = torch.ops.fused_mtl_attn.batch_norm_channels_last(x, weight, bias, eps)
        return out, mean, var * (rows / (rows - 1))
    mean = torch.zeros(x.shape[1], dtype=weight.dtype, device=x.device)  # the buffers' dtype (mixed under autocast)
    var = torch.zeros_like(mean)
    return F.batch_norm(x, mean, var, weight, bias, True, 1.0, eps), mean, var


def batch_norm_stacked(x: torch.Tensor, norms: Sequence[nn.BatchNorm2d], calls: int = 1,
                       relu: bool = False) -> torch.Tensor:
    """BatchNorm of x [B, sum C_i, ...] whose channel blocks are what each of `norms` (distinct modules) would see in
    its own call, in order, each call repeated `calls` times on the same input (followed by ReLU with `relu`).
    Same output and running statistics as those calls."""
    weight = cat_stacked([n.weight for n in norms])
    bias = cat_stacked([n.bias for n in norms])
    eps = norms[0].eps
    if _uses_batch_stats(norms[0]) and norms[0].track_running_stats:
        out, mean, var = _batch_norm_train(x, weight, bias, eps, relu)
        with torch.no_grad():
            _update_running_stats(norms, mean, var, calls)
        return out
    if _uses_batch_stats(norms[0]):  # no running statistics
        out = F.batch_norm(x, None, None, weight, bias, True, 0.0, eps)
    else:
        mean = cat_stacked([n.running_mean for n in norms])
        var = cat_stacked([n.running_var for n in norms])
        out = F.batch_norm(x, mean, var, weight, bias, False, 0.0, eps)
    return F.relu(out) if relu else out


def batch_norm_repeated(x: torch.Tensor, norm: nn.BatchNorm2d, calls: int) -> torch.Tensor:
    """`norm` applied to x, counted as `calls` identical reference calls (the same input each time)."""
    return batch_norm_stacked(x, [norm], calls)


def batch_norm_segments(x: torch.Tensor, norm: nn.BatchNorm2d, offsets: Sequence[int]) -> torch.Tensor:
    """`norm` called once per position segment of x [B, C, 1, Ntot] (sources of different sizes), in order."""
    # split, not slices: its backward is one concatenation, not a zero tensor of x's size filled and added per piece
    sizes = [hi - lo for lo, hi in zip(offsets[:-1], offsets[1:])]
    return torch.cat([norm(piece) for piece in x.split(sizes, dim=-1)], dim=-1)


@contextlib.contextmanager
def _running_stats_frozen(modules):
    """BatchNorm layers of `modules` leave their running statistics untouched (a recomputation must not count
    as a second call): momentum 0 keeps them exactly, and the batch counters are put back afterwards."""
    norms = [m for mod in modules for m in mod.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [(n.momentum, n.num_batches_tracked.clone() if n.num_batches_tracked is not None else None)
             for n in norms]
    for n in norms:
        n.momentum = 0.0
    try:
        yield
    finally:
        for n, (momentum, count) in zip(norms, saved):
            n.momentum = momentum
            if count is not None:
                n.num_batches_tracked.copy_(count)


def recompute_in_backward(fn, *args, modules):
    """fn(*args), keeping only its inputs for backward and running it again there (activation checkpointing),
    with the same random state (drop path) and without a second running-statistics update. Under torch.compile
    the checkpoint is traced once and AOTAutograd's partitioner decides what backward recomputes: the running
    statistics are updated in the forward graph only, so no freezing context is needed (nor traceable)."""
    from torch.utils.checkpoint import checkpoint

    frozen = {} if torch.compiler.is_compiling() else \
        {"context_fn": lambda: (contextlib.nullcontext(), _running_stats_frozen(modules))}
    return checkpoint(fn, *args, use_reentrant=False, preserve_rng_state=True, **frozen)


# ---------------------------------------------------------------------------------------------- convolutions


def is_channels_last(x: torch.Tensor) -> bool:
    return x.dim() == 4 and x.shape[1] > 1 and x.is_contiguous(memory_format=torch.channels_last)


def _conv1x1(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x [B, C_in, H, W] through a 1x1 convolution of weight [C_out, C_in], in x's memory layout."""
    return F.conv2d(x, weight[:, :, None, None], bias)


def _conv1x1_backward(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor):
    """(dL/dx, dL/dweight [C_out, C_in]) of _conv1x1(x, weight) given dL/dout."""
    grad_x, grad_w, _ = torch.ops.aten.convolution_backward(grad, x, weight[:, :, None, None], None, [1, 1], [0, 0],
                                                            [1, 1], False, [0, 0], 1, [True, True, False])
    return grad_x, grad_w.flatten(1)


def _linear_convolution_runs(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """`linear` takes x as a oneDNN convolution (else as F.linear)."""
    return (LINEAR_CONVOLUTION_MIN_MACS is not None and cpu_tuned(x.device) and x.dtype == torch.float32
            and x.numel() * weight.shape[0] >= LINEAR_CONVOLUTION_MIN_MACS)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """F.linear(x, weight, bias); where oneDNN outpaces MKL, a large product as a 1x1 convolution of x's rows viewed
    as a channels-last [1, C_in, rows, 1] map (no copy of a contiguous x; the output comes back as rows)."""
    if not _linear_convolution_runs(x, weight):
        return F.linear(x, weight, bias)
    rows = x.reshape(1, -1, 1, weight.shape[1]).permute(0, 3, 1, 2)
    return _conv1x1(rows, weight, bias).permute(0, 2, 3, 1).reshape(*x.shape[:-1], weight.shape[0])


def _convolution_runs(x: torch.Tensor) -> bool:
    """conv1x1_stacked takes x as a oneDNN convolution (else as a batched product)."""
    return cpu_tuned(x.device) and x.shape[-2] * x.shape[-1] < CONV_PROJECTIONS_MAX_POSITIONS


def conv1x1_stacked(x: torch.Tensor, convs: Sequence[nn.Conv2d], groups: int) -> torch.Tensor:
    """Grouped 1x1 convolution of x [B, G*Cin, H, W] (either layout) into an NCHW map: group g goes through its
    share of `convs`, listed group by group. One batched matrix product (BLAS), or on CPU for maps of fewer than
    CONV_PROJECTIONS_MAX_POSITIONS positions one oneDNN grouped convolution."""
    weight = cat_stacked([c.weight for c in convs])
    b, _, h, w = x.shape
    if _convolution_runs(x):
        return F.conv2d(x.contiguous(), weight, groups=groups)
    out = torch.matmul(weight.view(groups, -1, x.shape[1] // groups), x.view(b, groups, -1, h * w))
    return out.view(b, -1, h, w)


def batch_norm_per_sample_group(x: torch.Tensor, norm: nn.BatchNorm2d, groups: int) -> torch.Tensor:
    """`norm` called once per group of samples, in order: x [G*B, C, ...] holds G batches stacked along the batch
    axis (each group is a view of x in either memory layout, so nothing is reordered)."""
    return torch.cat([norm(part) for part in x.chunk(groups)])


# ---------------------------------------------------------------------------------------------- aggregation


class _Aggregation(torch.autograd.Function):
    """The aggregation head after CSAM, conv_out(ReLU(BN(h))) with h = sum_k up(W_k x_k) + bias, computed block
    of channels by block of channels: BatchNorm is per channel, so each block of h is built, normalised and
    folded into the output before the next. Backward takes each block of h from the copy kept in forward
    (`keep_h`, CPU) or rebuilds it from the small per-scale inputs (GPU: then no 1080-channel full-resolution
    tensor is ever stored) and sends its gradient straight back to them. Each coarser scale is interpolated to
    scale 0 by a small dense product along the columns and, where the C++ kernels run, 2-tap filters along the rows
    (one pass over the block for all scales; else dense products). Loops run in a fixed order, so results are
    deterministic."""

    @staticmethod
    def forward(ctx, eps, sizes, keep_h, running_mean, running_var, x0, x1, x2, x3, w0, w1, w2, w3, bias, gamma,
                beta, w_out, b_out):
        ctx.sizes, ctx.input_shapes = sizes, [x.shape for x in (x0, x1, x2, x3)]
        running = None if running_mean is None else (running_mean, running_var)
        xs = [x.flatten(2) for x in (x0, x1, x2, x3)]
        ws = [w0, w1, w2, w3]
        batch, channels, n0 = xs[0].shape[0], ws[0].shape[0], xs[0].shape[2]
        # BatchNorm + ReLU of a kept block in one C++ pass and the interpolation by 2-tap C++ kernels (where the
        # extension's CPU kernels run), else eager and dense interpolation products
        ctx.kernel = keep_h and cpu_kernels_run(xs[0])
        geometry = ctx.geometry = _geometry(ctx.sizes, xs, ctx.kernel and ROW_TAPS)
        block = ctx.block = _channel_block(batch, channels, n0, xs[0].device)
        # the blocks of h are built without the conv's bias (no pass that writes it over every position): BatchNorm
        # subtracts it again, so each block is centred on `centre`, its own batch mean or the running mean - bias
        centre, var = _block_statistics(channels, running, bias)
        out = b_out[None, :, None].expand(batch, -1, n0).contiguous()
        # the kept blocks are separate tensors, not views of one [B, 1080, N0] map: each stays under the size
        # from which the C allocator maps fresh pages on every call (32 MB in glibc), whose first touch costs more
        # than building the block on a VM
        kept = [] if keep_h else None
        for c0 in range(0, channels, block):
            sl = slice(c0, min(c0 + block, channels))
            h = _build_block(xs, ws, sl, geometry)
            if kept is not None:
                kept.append(h)
            if ctx.kernel:
                stats = (None, None) if running is None else (centre[sl], var[sl])  # None: the block's own statistics
                act, m, v = torch.ops.fused_mtl_attn.batch_norm_relu(h, gamma[sl], beta[sl], *stats, eps)
                if running is None:
                    centre[sl], var[sl] = m, v
            else:
                if running is None:
                    centre[sl], var[sl] = _channel_stats(h)
                act = _normalized(h, centre[sl], var[sl], gamma[sl], beta[sl], eps, in_place=kept is None)
                act.clamp_(min=0)
            for b in range(batch):
                out[b].addmm_(w_out[:, sl], act[b])
        ctx.eps, ctx.batch_stats = eps, running is None
        ctx.save_for_backward(*xs, *ws, gamma, beta, w_out, centre, var, *(kept or []))
        return out.view(batch, -1, *geometry[0]), centre + bias, var

    @staticmethod
    def backward(ctx, grad_out, _grad_mean, _grad_var):
        saved = ctx.saved_tensors
        xs, ws = list(saved[:4]), list(saved[4:8])
        gamma, beta, w_out, centre, var = saved[8:13]
        kept = saved[13:] or None
        batch = xs[0].shape[0]
        channels, geometry = ws[0].shape[0], ctx.geometry
        g = grad_out.flatten(2)
        grad_xs = [torch.zeros_like(x) for x in xs]
        grad_ws = [torch.zeros_like(w) for w in ws]
        grad_bias, grad_gamma, grad_beta = (torch.zeros_like(gamma) for _ in range(3))
        grad_w_out = torch.zeros_like(w_out)
        for i, c0 in enumerate(range(0, channels, ctx.block)):
            sl = slice(c0, min(c0 + ctx.block, channels))
            if ctx.kernel:
                h = kept[i]
                act = torch.ops.fused_mtl_attn.batch_norm_relu(h, gamma[sl], beta[sl], centre[sl], var[sl], ctx.eps)[0]
            else:
                invstd = torch.rsqrt(var[sl] + ctx.eps)
                h = _build_block(xs, ws, sl, geometry) if kept is None else kept[i]
                xhat = (h.sub_(centre[sl, None]) if kept is None else h - centre[sl, None]).mul_(invstd[:, None])
                pre = torch.addcmul(beta[sl, None], xhat, gamma[sl, None])
                inactive = pre <= 0
                act = pre.clamp_(min=0)
            for b in range(batch):
                grad_w_out[:, sl].addmm_(g[b], act[b].t())
            grad = act  # reuse the buffer: dL/d(BN output)
            for b in range(batch):
                torch.mm(w_out[:, sl].t(), g[b], out=grad[b])
            if ctx.kernel:  # dL/dh of this block, with the ReLU mask recomputed from h
                grad, grad_gamma[sl], grad_beta[sl], grad_bias[sl] = torch.ops.fused_mtl_attn.batch_norm_relu_backward(
                    grad, h, centre[sl], var[sl], gamma[sl], beta[sl], ctx.eps, ctx.batch_stats)
            else:
                grad.masked_fill_(inactive, 0)
                grad, grad_gamma[sl], grad_beta[sl] = _batch_norm_backward(grad, xhat, gamma[sl], invstd,
                                                                           ctx.batch_stats)
                grad_bias[sl] = grad.sum(2).sum(0)
            _block_backward(grad, xs, ws, sl, geometry, grad_xs, grad_ws)
        grad_b_out = g.sum(2).sum(0)
        grad_xs = [gx.view(shape) for gx, shape in zip(grad_xs, ctx.input_shapes)]
        return (None, None, None, None, None, *grad_xs, *grad_ws, grad_bias, grad_gamma, grad_beta,
                grad_w_out, grad_b_out)


class _AggregationChannelsLast(torch.autograd.Function):
    """_Aggregation's function on CPU for a channels-last finest map, each block of h channels-last ([B, H, W, c] in
    memory): every product is a 1x1 convolution of channels-last maps (oneDNN), which on CPU runs at up to twice the
    speed of the BLAS products of [c, N] blocks (AMD Zen 5: 340 vs 150 GFLOP/s; benchmarks/RESULTS.md); the rows'
    2-tap resampling reads a block's rows of W*c values; BatchNorm by the channels-last kernels. Keeps each block of
    h for backward, like _Aggregation on CPU. Same arguments and outputs as _Aggregation (no keep_h)."""

    @staticmethod
    def forward(ctx, eps, sizes, running_mean, running_var, x0, x1, x2, x3, w0, w1, w2, w3, bias, gamma, beta,
                w_out, b_out):
        xs, ws = [x0, x1, x2, x3], [w0, w1, w2, w3]
        batch, channels = x0.shape[0], w0.shape[0]
        (height, width), scales, taps = geometry = _geometry(sizes, xs, True)
        block = _channel_block(batch, channels, height * width, x0.device)
        centre, var = _block_statistics(channels, None if running_mean is None else (running_mean, running_var), bias)
        out, kept = None, []
        for c0 in range(0, channels, block):
            sl = slice(c0, min(c0 + block, channels))
            h = _conv1x1(x0, ws[0][sl]).contiguous(memory_format=torch.channels_last)  # (float64: no oneDNN)
            c = h.shape[1]
            ts = []
            for x, w, ((hk, wk), _, cols) in zip(xs[1:], ws[1:], scales):  # columns by a product, per scale
                z = _conv1x1(x, w[sl]).permute(0, 2, 3, 1).reshape(batch * hk, wk, c)
                ts.append(torch.matmul(cols, z).view(batch, hk, width * c))
            torch.ops.fused_mtl_attn.upsample_rows_accumulate(_rows(h), ts, *taps[:2])
            kept.append(h)
            if running_mean is None:
                act, centre[sl], var[sl] = torch.ops.fused_mtl_attn.batch_norm_channels_last(h, gamma[sl], beta[sl],
                                                                                             eps)
                act.relu_()
            else:
                act = _normalized(h, centre[sl], var[sl], gamma[sl], beta[sl], eps).clamp_(min=0)
            part = _conv1x1(act, w_out[:, sl])
            out = part if out is None else out.add_(part)
        ctx.eps, ctx.batch_stats, ctx.geometry, ctx.block = eps, running_mean is None, geometry, block
        ctx.save_for_backward(*xs, *ws, gamma, beta, w_out, centre, var, *kept)
        # NCHW, as _Aggregation returns it (a few output channels: a small copy). A copy always, not .contiguous():
        # under torch 2.11's compiler an output that .contiguous() handed back as itself (one output channel, as
        # depth's) gets a zero gradient
        return out.add_(b_out[:, None, None]).clone(memory_format=torch.contiguous_format), centre + bias, var

    @staticmethod
    def backward(ctx, grad_out, _grad_mean, _grad_var):
        saved = ctx.saved_tensors
        xs, ws = list(saved[:4]), list(saved[4:8])
        gamma, beta, w_out, centre, var = saved[8:13]
        kept = saved[13:]
        (height, width), scales, taps = ctx.geometry
        batch, channels = xs[0].shape[0], ws[0].shape[0]
        g = grad_out.contiguous(memory_format=torch.channels_last)
        grad_xs, grad_ws = [None] * 4, [torch.empty_like(w) for w in ws]
        grad_bias, grad_gamma, grad_beta = (torch.empty_like(gamma) for _ in range(3))
        grad_w_out = torch.empty_like(w_out)
        for i, c0 in enumerate(range(0, channels, ctx.block)):
            sl = slice(c0, min(c0 + ctx.block, channels))
            h = kept[i]
            c = h.shape[1]
            pre = _normalized(h, centre[sl], var[sl], gamma[sl], beta[sl], ctx.eps)
            act = pre.clamp_(min=0)
            grad_act, grad_w_out[:, sl] = _conv1x1_backward(g, act, w_out[:, sl])
            grad_act = torch.ops.aten.threshold_backward(grad_act, act, 0)  # ReLU: act > 0 where pre > 0
            if ctx.batch_stats:
                grad_h, grad_gamma[sl], grad_beta[sl] = torch.ops.fused_mtl_attn.batch_norm_channels_last_backward(
                    grad_act, h, centre[sl], var[sl], gamma[sl], ctx.eps)
                grad_bias[sl] = 0  # the batch mean takes out any shift of h: dL/dbias = sum dL/dh = 0
            else:  # running statistics (the kernel takes batch statistics only)
                invstd = torch.rsqrt(var[sl] + ctx.eps)
                xhat = (h - centre[sl, None, None]).mul_(invstd[:, None, None])
                grad_h, grad_gamma[sl], grad_beta[sl] = _batch_norm_backward(grad_act, xhat, gamma[sl], invstd, False)
                grad_bias[sl] = grad_beta[sl] * gamma[sl] * invstd
            grad_h = grad_h.contiguous(memory_format=torch.channels_last)
            grad_ts = torch.ops.fused_mtl_attn.upsample_rows_accumulate_backward(_rows(grad_h), *taps)
            grad_x, grad_ws[0][sl] = _conv1x1_backward(grad_h, xs[0], ws[0][sl])
            grad_xs[0] = grad_x if grad_xs[0] is None else grad_xs[0].add_(grad_x)
            for k, ((hk, wk), _, cols) in enumerate(scales, start=1):  # the adjoint of the columns' product
                grad_z = torch.matmul(cols.t(), grad_ts[k - 1].view(batch * hk, width, c))
                grad_x, grad_ws[k][sl] = _conv1x1_backward(grad_z.view(batch, hk, wk, c).permute(0, 3, 1, 2), xs[k],
                                                           ws[k][sl])
                grad_xs[k] = grad_x if grad_xs[k] is None else grad_xs[k].add_(grad_x)
        grad_b_out = g.sum((0, 2, 3))
        return (None, None, None, None, *grad_xs, *grad_ws, grad_bias, grad_gamma, grad_beta, grad_w_out,
                grad_b_out)


def _batch_norm_backward(grad: torch.Tensor, xhat: torch.Tensor, gamma, invstd, batch_stats: bool):
    """(dL/dh, dL/dgamma, dL/dbeta) of BatchNorm over h [B, c, ...] from dL/d(its output) `grad` (overwritten by
    dL/dh) and the normalised h, xhat; with `batch_stats` the batch mean and variance depend on h too."""
    spatial, per_channel = tuple(range(2, grad.dim())), (-1,) + (1,) * (grad.dim() - 2)
    # (per sample first: one reduction over (0, 2) of [B, c, N] is several times slower on CPU)
    grad_beta = grad.sum(spatial).sum(0)
    grad_gamma = (torch.linalg.vecdot(grad, xhat, dim=2) if grad.dim() == 3 else (grad * xhat).sum(spatial)).sum(0)
    if batch_stats:
        n = grad.numel() // grad.shape[1]
        grad.sub_((grad_beta / n).view(per_channel)).addcmul_(xhat, -(grad_gamma / n).view(per_channel))
    return grad.mul_((gamma * invstd).view(per_channel)), grad_gamma, grad_beta


def _rows(h: torch.Tensor) -> torch.Tensor:
    """A channels-last map [B, c, H, W] as [B, H, W*c]: rows of W*c values, as upsample_rows_accumulate takes them."""
    b, c, height, width = h.shape
    return h.permute(0, 2, 3, 1).view(b, height, width * c)


def _normalized(h: torch.Tensor, centre, var, gamma, beta, eps: float, in_place: bool = False) -> torch.Tensor:
    """BatchNorm of h [B, c, ...] with the given statistics, in h's memory layout (into h with `in_place`)."""
    scale = gamma * torch.rsqrt(var + eps)
    per_channel = (-1,) + (1,) * (h.dim() - 2)
    return torch.addcmul((beta - centre * scale).view(per_channel), h, scale.view(per_channel),
                         out=h if in_place else None)


def _block_statistics(channels: int, running, bias):
    """(centre, var) [channels] for the aggregation's blocks of the bias-less h: with running statistics (mean,
    var), the running mean less the conv's bias and the running variance; else empty, for each block's batch
    statistics."""
    centre, var = (torch.empty(channels, dtype=bias.dtype, device=bias.device) for _ in range(2))
    if running is not None:
        torch.sub(running[0], bias, out=centre)
        var.copy_(running[1])
    return centre, var


def _geometry(sizes, xs, taps: bool):
    """Size of scale 0; per coarser scale, its size and its dense interpolation matrices to scale 0 along the rows
    (None with `taps`) and the columns; with `taps` (the C++ kernels), the rows' 2-tap filters of every scale as
    upsample_rows_accumulate takes them (index list, weight list, heights), else None."""
    (height, width), scales = sizes[0], []
    for x, size in zip(xs[1:], sizes[1:]):
        rows = None if taps else _interpolation_matrix(size[0], height, x)
        scales.append((size, rows, _interpolation_matrix(size[1], width, x)))
    row_taps = None
    if taps:
        filters = [_interpolation_taps(size[0], height) for size in sizes[1:]]
        row_taps = ([f[0] for f in filters], [f[1] for f in filters], [size[0] for size in sizes[1:]])
    return (height, width), scales, row_taps


def _channel_block(batch: int, channels: int, positions: int, device) -> int:
    """Channels per block: about 16 MB of activations on a CPU (large enough for efficient matrix products, small
    enough to stay out of fresh page-faulting allocations), a few hundred MB on a GPU."""
    budget = (1 << 22) if cpu_tuned(device) else (1 << 27)
    return int(max(8, min(channels, budget // max(batch * positions, 1))))


def _keep_blocks(device) -> bool:
    """Keep the pre-BN blocks of h for backward (one [B, 1080, N0] map per task) instead of rebuilding them: on
    CPU, where memory is plentiful and the rebuild costs about 90 ms per task at 256x320; not on a GPU, where
    peak memory is the scarce resource."""
    return cpu_tuned(device)


def _build_block(xs, ws, sl, geometry):
    """Channels `sl` of h = W_0 x_0 + sum_k up(W_k x_k) (the conv's bias left out), as [B, c, N0]."""
    (height, width), scales, taps = geometry
    batch, n0 = xs[0].shape[0], xs[0].shape[2]
    c = sl.stop - sl.start
    h = torch.empty(batch, c, n0, dtype=xs[0].dtype, device=xs[0].device)
    for b in range(batch):
        torch.mm(ws[0][sl], xs[0][b], out=h[b])
    if taps:  # along the columns by products, then the rows of every scale and sample in one pass over h
        ts = []
        for x, w, ((hk, wk), _, cols) in zip(xs[1:], ws[1:], scales):
            z = torch.empty(batch, c, hk * wk, dtype=h.dtype, device=h.device)
            for b in range(batch):  # (torch.matmul of [c, C_k] and [B, C_k, n_k] would copy both transposed)
                torch.mm(w[sl], x[b], out=z[b])
            ts.append(torch.mm(z.view(-1, wk), cols.t()).view(batch * c, hk, width))
        torch.ops.fused_mtl_attn.upsample_rows_accumulate(h.view(batch * c, height, width), ts, *taps[:2])
        return h
    for b in range(batch):
        plane = h[b].view(c, height, width)
        for x, w, ((hk, wk), rows, cols) in zip(xs[1:], ws[1:], scales):
            z = torch.mm(w[sl], x[b]).view(c * hk, wk)
            plane.baddbmm_(rows.expand(c, -1, -1), torch.mm(z, cols.t()).view(c, hk, width))
    return h


def _block_backward(grad_h, xs, ws, sl, geometry, grad_xs, grad_ws):
    """Accumulate into grad_xs / grad_ws the gradients from dL/dh of channels `sl` ([B, c, N0])."""
    (height, width), scales, taps = geometry
    batch, c = grad_h.shape[:2]
    if taps:  # the adjoint of the rows' taps for every scale and sample in one pass over dL/dh
        grad_ts = torch.ops.fused_mtl_attn.upsample_rows_accumulate_backward(grad_h.view(batch * c, height, width),
                                                                             *taps)
    for b in range(batch):
        grad_xs[0][b].addmm_(ws[0][sl].t(), grad_h[b])
        grad_ws[0][sl].addmm_(grad_h[b], xs[0][b].t())
        for k, ((hk, wk), rows, cols) in enumerate(scales, start=1):
            # the adjoints of the row and the column interpolation
            t = grad_ts[k - 1][b * c:(b + 1) * c] if taps else torch.matmul(rows.t(), grad_h[b].view(c, height, width))
            grad_z = torch.mm(t.reshape(c * hk, width), cols).view(c, hk * wk)
            grad_xs[k][b].addmm_(ws[k][sl].t(), grad_z)
            grad_ws[k][sl].addmm_(grad_z, xs[k][b].t())


def _channel_stats(h: torch.Tensor):
    """Per-channel mean and biased variance of h [B, C, N], two passes (as accurate as BatchNorm's own and
    several times faster than torch.var_mean over dims (0, 2) on CPU)."""
    n = h.shape[0] * h.shape[2]
    mean = h.sum(2).sum(0) / n
    centred = h - mean[:, None]
    return mean, torch.linalg.vecdot(centred, centred, dim=2).sum(0) / n

def blocked_aggregation(xs: list, weights: list, bias: torch.Tensor, norm: nn.BatchNorm2d,
                        conv_out: nn.Conv2d) -> torch.Tensor:
    """conv_out(ReLU(norm(conv(cat(up(x_k)))))) for a 1x1 conv whose weight, split by input piece and summed over
    repeated pieces, is W_k [C, C_k] per scale, with `bias`: scale 0 (x_0 [B, C_0, H, W]) is the finest and sets
    the output's size. Computed by _Aggregation; running statistics as one call."""
    if torch.is_autocast_enabled(xs[0].device.type) or xs[0].dtype != norm.weight.dtype:
        # the blocked kernel accumulates in place, which autocast cannot follow: run it in the parameters' dtype
        with torch.autocast(xs[0].device.type, enabled=False):
            return blocked_aggregation([x.to(norm.weight.dtype) for x in xs], weights, bias, norm, conv_out)
    batch_stats = _uses_batch_stats(norm)
    running = (None, None) if batch_stats else (norm.running_mean, norm.running_var)
    sizes = tuple(tuple(x.shape[-2:]) for x in xs)
    params = (bias, norm.weight, norm.bias, conv_out.weight.flatten(1), conv_out.bias)
    if CHANNELS_LAST_AGGREGATION and ROW_TAPS and _keep_blocks(xs[0].device) and cpu_kernels_run(xs[0]):
        xs = [x.contiguous(memory_format=torch.channels_last) for x in xs]  # (the head's pieces come NCHW)
        out, mean, var = _AggregationChannelsLast.apply(norm.eps, sizes, *running, *xs, *weights, *params)
    else:
        out, mean, var = _Aggregation.apply(norm.eps, sizes, _keep_blocks(xs[0].device), *running, *xs, *weights,
                                            *params)
    if batch_stats and norm.track_running_stats:
        n = out.shape[0] * out.shape[2] * out.shape[3]
        with torch.no_grad():
            _update_running_stats([norm], mean, var * n / max(n - 1, 1))
    return out


# ---------------------------------------------------------------------------------------------- losses


def normalize_channels(x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Same function as F.normalize(x, p=2, dim=1, eps=eps), from a sum of squares: torch.linalg.vector_norm over
    the channels of an NCHW tensor is about 100x slower on CPU (21 ms for [2, 3, 256, 256] with torch 2.14, on AVX2
    and AVX-512 alike, against 0.2 ms). The clamp before the square root keeps the gradient finite at x = 0."""
    return x / x.square().sum(dim=1, keepdim=True).clamp_min(eps * eps).sqrt()


# ---------------------------------------------------------------------------------------------- resize


class _Upsample(torch.autograd.Function):
    """Bilinear resize (align_corners=False) as two small matrix products, one per axis; the backward is the
    transposed products. On CPU this is several times faster than F.interpolate and saves nothing. A
    channels-last input is resized in its own layout (channels innermost) and stays channels-last."""

    @staticmethod
    def forward(ctx, x, rows, cols):
        b, c, h, w = x.shape
        ctx.save_for_backward(rows, cols)
        ctx.channels_last = is_channels_last(x)
        if ctx.channels_last:  # memory [b, h, w, c]: rows over h, then cols over w, c carried along
            t = torch.matmul(rows, x.permute(0, 2, 3, 1).reshape(b, h, w * c))
            out = torch.matmul(cols, t.view(-1, w, c))
            return out.view(b, rows.shape[0], cols.shape[0], c).permute(0, 3, 1, 2)
        t = torch.matmul(x.reshape(b * c * h, w), cols.t()).view(b * c, h, -1)
        return torch.matmul(rows, t).view(b, c, rows.shape[0], cols.shape[0])

    @staticmethod
    def backward(ctx, grad):
        rows, cols = ctx.saved_tensors
        b, c, hh, ww = grad.shape
        h, w = rows.shape[1], cols.shape[1]
        if ctx.channels_last:
            t = torch.matmul(cols.t(), grad.permute(0, 2, 3, 1).reshape(b * hh, ww, c))
            out = torch.matmul(rows.t(), t.view(b, hh, w * c))
            return out.view(b, h, w, c).permute(0, 3, 1, 2), None, None
        t = torch.matmul(rows.t(), grad.reshape(b * c, hh, ww))
        return torch.matmul(t.view(-1, ww), cols).view(b, c, h, w), None, None


def _interpolation_taps(n_in: int, n_out: int):
    """PyTorch's bilinear (align_corners=False) resize along one axis as 2-tap filters: per output index, the two
    input indices and their weights (index [n_out, 2] int64, weight [n_out, 2] float64; equal indices at the
    border)."""
    src = ((torch.arange(n_out, dtype=torch.float64) + 0.5) * (n_in / n_out) - 0.5).clamp(min=0)
    lo = src.floor().long().clamp(max=n_in - 1)
    hi = torch.where(lo < n_in - 1, lo + 1, lo)
    frac = src - lo
    return torch.stack([lo, hi], 1), torch.stack([1 - frac, frac], 1)


def _interpolation_matrix(n_in: int, n_out: int, like: torch.Tensor) -> torch.Tensor:
    """[n_out, n_in] weights of PyTorch's bilinear (align_corners=False) resize along one axis."""
    index, weight = _interpolation_taps(n_in, n_out)
    m = torch.zeros(n_out, n_in, dtype=torch.float64)
    m.index_put_((torch.arange(n_out)[:, None].expand(-1, 2), index), weight, accumulate=True)
    return m.to(dtype=like.dtype, device=like.device)


def upsample(x: torch.Tensor, size) -> torch.Tensor:
    """Same function as F.interpolate(x, size, mode="bilinear", align_corners=False), faster on CPU."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    if not cpu_tuned(x.device) or torch.is_autocast_enabled(x.device.type):
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    rows = _interpolation_matrix(x.shape[-2], size[0], x)
    cols = _interpolation_matrix(x.shape[-1], size[1], x)
    return _Upsample.apply(x, rows, cols)

