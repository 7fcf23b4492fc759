"""The fused execution path of SCA-MTL: the same function and parameters as the reference modules, with
stacked/gathered computation and the fused attention ops of `fused_mtl_attn`.

- CTAM: the projections of all ordered pairs run as a few grouped 1x1 convolutions, one
  `cross_task_attention` call attends every pair, and the shared BasicBlock runs for all targets at once.
- CSAM: the query projection runs once per target scale, the sources are gathered along positions and
  attended by one `cross_scale_attention` call.
- Aggregation: the 1x1 conv commutes with bilinear upsampling, so it runs per scale at the scale's own
  resolution with the weights of the repeated Y_k copies summed; BN-ReLU-conv saves only its input and
  recomputes the rest in backward.
BatchNorm sees the same statistics as each reference call and updates running statistics call by call.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from fused_mtl_attn import cross_scale_attention, cross_task_attention

# ---------------------------------------------------------------------------------------------- BatchNorm


def _update_running_stats(norm: nn.BatchNorm2d, mean: torch.Tensor, var_unbiased: torch.Tensor) -> None:
    """One running-statistics update of `norm`, as its own forward in training mode would do."""
    if not norm.track_running_stats or norm.running_mean is None:
        return
    norm.num_batches_tracked.add_(1)
    factor = 1.0 / float(norm.num_batches_tracked) if norm.momentum is None else norm.momentum
    norm.running_mean.mul_(1 - factor).add_(mean, alpha=factor)
    norm.running_var.mul_(1 - factor).add_(var_unbiased, alpha=factor)


def _uses_batch_stats(norm: nn.BatchNorm2d) -> bool:
    return norm.training or norm.running_mean is None


def batch_norm_stacked(x: torch.Tensor, norms: Sequence[nn.BatchNorm2d]) -> torch.Tensor:
    """BatchNorm of x [B, sum C_i, ...] whose channel blocks are what each of `norms` would see in its own
    call, in order (a module listed twice is two calls). Same output and running statistics as those calls."""
    weight = torch.cat([n.weight for n in norms])
    bias = torch.cat([n.bias for n in norms])
    eps = norms[0].eps
    if not _uses_batch_stats(norms[0]):
        mean = torch.cat([n.running_mean for n in norms])
        var = torch.cat([n.running_var for n in norms])
        return F.batch_norm(x, mean, var, weight, bias, False, 0.0, eps)
    out = F.batch_norm(x, None, None, weight, bias, True, 0.0, eps)
    if norms[0].track_running_stats:
        dims = [0] + list(range(2, x.dim()))
        with torch.no_grad():
            var, mean = torch.var_mean(x.detach(), dim=dims, correction=1)
            start = 0
            for n in norms:
                stop = start + n.num_features
                _update_running_stats(n, mean[start:stop], var[start:stop])
                start = stop
    return out


def batch_norm_repeated(x: torch.Tensor, norm: nn.BatchNorm2d, calls: int) -> torch.Tensor:
    """`norm` applied to x, counted as `calls` identical reference calls (the same input each time)."""
    return batch_norm_stacked(x, [norm]) if calls == 1 else _batch_norm_same_input(x, norm, calls)


def _batch_norm_same_input(x, norm, calls):
    out = batch_norm_stacked(x, [norm])
    if _uses_batch_stats(norm) and norm.track_running_stats:
        dims = [0] + list(range(2, x.dim()))
        with torch.no_grad():
            var, mean = torch.var_mean(x.detach(), dim=dims, correction=1)
            for _ in range(calls - 1):
                _update_running_stats(norm, mean, var)
    return out


def batch_norm_segments(x: torch.Tensor, norm: nn.BatchNorm2d, offsets: Sequence[int]) -> torch.Tensor:
    """`norm` called once per position segment of x [B, C, Ntot] (sources of different sizes), in order."""
    pieces = [norm(x[..., lo:hi].unsqueeze(-1)).squeeze(-1) for lo, hi in zip(offsets[:-1], offsets[1:])]
    return torch.cat(pieces, dim=-1)


# ---------------------------------------------------------------------------------------------- convolutions


def conv_stacked(x: torch.Tensor, convs: Sequence[nn.Conv2d], groups: int, padding: int = 0) -> torch.Tensor:
    """Grouped convolution: group g of x goes through its share of `convs` (listed group by group)."""
    return F.conv2d(x, torch.cat([c.weight for c in convs]), None, padding=padding, groups=groups)


def basic_block_stacked(block, x: torch.Tensor, groups: int) -> torch.Tensor:
    """One BasicBlock applied to `groups` inputs stacked on channels: one call per group in the reference."""
    out = F.relu(batch_norm_stacked(conv_stacked(x, [block.conv1] * groups, groups, 1), [block.bn1] * groups))
    out = batch_norm_stacked(conv_stacked(out, [block.conv2] * groups, groups, 1), [block.bn2] * groups)
    if isinstance(block.shortcut, nn.Identity):
        short = x
    else:
        conv, norm = block.shortcut
        short = batch_norm_stacked(conv_stacked(x, [conv] * groups, groups), [norm] * groups)
    return F.relu(out + short)


# ---------------------------------------------------------------------------------------------- CTAM


def cross_task_fused(ctam, features: dict, backend: str = "auto") -> dict:
    """Fused CTAM at one scale; same result as `ctam(features)`."""
    tasks = ctam.tasks
    m = len(tasks)
    x = torch.cat([features[t] for t in tasks], dim=1)  # task-stacked [B, M*C, H, W]
    b, mc, h, w = x.shape
    c = mc // m
    # pairs in "by source" order: the source-side projections then come out of grouped convs in that order
    by_source = [(t, a) for a in tasks for t in tasks if t != a]
    by_target = [(t, a) for t in tasks for a in tasks if a != t]
    gca = [ctam.attention[f"{t}_from_{a}"] for t, a in by_target]
    q = F.relu(batch_norm_stacked(conv_stacked(x, [g.query[0] for g in gca], m), [g.query[1] for g in gca]))
    q = batch_norm_stacked(conv_stacked(q, [g.query[3] for g in gca], len(gca)), [g.query[4] for g in gca])
    order = torch.tensor([by_target.index(p) for p in by_source], device=x.device)
    q = q.view(b, len(gca), c, h * w).index_select(1, order)
    gca = [ctam.attention[f"{t}_from_{a}"] for t, a in by_source]
    k = F.relu(batch_norm_stacked(conv_stacked(x, [g.key[0] for g in gca], m), [g.key[1] for g in gca]))
    k = batch_norm_stacked(conv_stacked(k, [g.key[3] for g in gca], len(gca)), [g.key[4] for g in gca])
    v = F.relu(batch_norm_stacked(conv_stacked(x, [g.value[0] for g in gca], m), [g.value[1] for g in gca]))
    attended = cross_task_attention(q, k.view(q.shape), v.view(q.shape), backend=backend).view(b, -1, c, h, w)
    pieces = []
    for t in tasks:
        for a in reversed([a for a in tasks if a != t]):  # the reference prepends each new pair
            pieces += [features[t], attended[:, by_source.index((t, a))]]
    y = x + basic_block_stacked(ctam.block, torch.cat(pieces, dim=1), m)
    return {t: y[:, i * c:(i + 1) * c] for i, t in enumerate(tasks)}


# ---------------------------------------------------------------------------------------------- heads


def _projection(seq: nn.Sequential, x: torch.Tensor, norm_call, relu_after: Sequence[int] = ()):
    """Run a conv/BN/ReLU Sequential of the GCA block with BN through `norm_call(x, bn)`."""
    for layer in seq:
        if isinstance(layer, nn.BatchNorm2d):
            x = norm_call(x, layer)
        elif isinstance(layer, nn.Conv2d):
            x = F.conv2d(x, layer.weight) if x.dim() == 4 else F.conv1d(x, layer.weight[..., 0])
        else:
            x = layer(x)
    return x


def cross_scale_fused(head, features: list, target: int, backend: str = "auto") -> torch.Tensor:
    """Fused CSAM for one target scale of one task head: [B, J, C_k, H_k, W_k], sources k+1..3 in order."""
    gca = head.attention[target]
    y = features[target]
    b, c, h, w = y.shape
    sources = list(range(target + 1, 4))
    calls = len(sources)  # the reference recomputes the query once per source
    q = _projection(gca.query, y, lambda x, n: batch_norm_repeated(x, n, calls)).flatten(2)
    gathered = [head.projection[f"{target}_from_{j}"](features[j]).flatten(2) for j in sources]
    offsets = [0]
    for s in gathered:
        offsets.append(offsets[-1] + s.shape[-1])
    src = torch.cat(gathered, dim=-1)
    per_segment = lambda x, n: batch_norm_segments(x, n, offsets)  # noqa: E731 - one BN call per source
    k = _projection(gca.key, src, per_segment)
    v = _projection(gca.value, src, per_segment)
    return cross_scale_attention(q, k, v, offsets, backend=backend).view(b, calls, c, h, w)


def _aggregation_weights(head, widths):
    """Split the aggregation conv's weight by input piece: per scale, [summed Y_k copies, S_k<-j ...]."""
    weight = head.aggregate[0].weight[..., 0, 0]
    per_scale = [[None] for _ in range(4)]
    start = 0
    for k, j in [(k, j) for k in range(3) for j in range(k + 1, 4)]:
        wy, ws = weight[:, start:start + widths[k]], weight[:, start + widths[k]:start + 2 * widths[k]]
        per_scale[k][0] = wy if per_scale[k][0] is None else per_scale[k][0] + wy
        per_scale[k].append(ws)
        start += 2 * widths[k]
    wy = weight[:, start:start + widths[3]]
    per_scale[3][0] = wy if per_scale[3][0] is None else per_scale[3][0] + wy
    return [torch.cat(ws, dim=1)[..., None, None] for ws in per_scale]


class _NormReluConv(torch.autograd.Function):
    """conv1x1(ReLU(BN(h))) that saves only h (and per-channel statistics) and recomputes the activations in
    backward, instead of storing three full-resolution tensors as the module chain does. Works on [B, C, N]
    views with in-place updates and per-sample matrix products, so each full-resolution pass is one sweep."""

    @staticmethod
    def forward(ctx, h, gamma, beta, weight, bias, mean, invstd, batch_stats: bool):
        ctx.batch_stats = batch_stats
        ctx.save_for_backward(h, gamma, beta, weight, mean, invstd)
        act = _pre_activation(h, gamma, beta, mean, invstd).clamp_(min=0)
        w = weight.flatten(1)
        out = torch.stack([torch.addmm(bias[:, None], w, a) for a in act])
        return out.view(h.shape[0], -1, *h.shape[2:])

    @staticmethod
    def backward(ctx, grad_out):
        h, gamma, beta, weight, mean, invstd = ctx.saved_tensors
        h3, g3 = h.flatten(2), grad_out.flatten(2)
        w = weight.flatten(1)
        act = _pre_activation(h, gamma, beta, mean, invstd)
        active = act > 0
        act.clamp_(min=0)
        grad_weight = sum(torch.mm(g, a.t()) for g, a in zip(g3, act)).view_as(weight)
        grad_bias = g3.sum(2).sum(0)
        del act
        grad = torch.stack([torch.mm(w.t(), g) for g in g3]).mul_(active)  # dL/d(BN output)
        grad_beta = grad.sum(2).sum(0)
        # sum(grad * xhat) with xhat = (h - mean) * invstd, without materialising xhat
        grad_gamma = (torch.linalg.vecdot(grad, h3, dim=2).sum(0) - mean * grad_beta) * invstd
        scale = gamma * invstd
        grad.mul_(scale[:, None])
        if ctx.batch_stats:  # the batch mean and variance depend on h too
            n = h3.shape[0] * h3.shape[2]
            coef = scale * invstd * grad_gamma / n
            grad.addcmul_(h3, -coef[:, None]).add_((coef * mean - scale * grad_beta / n)[:, None])
        return grad.view_as(h), grad_gamma, grad_beta, grad_weight, grad_bias, None, None, None


def _pre_activation(h, gamma, beta, mean, invstd):
    """BN output (h - mean) * invstd * gamma + beta in one pass, as [B, C, N]."""
    scale = invstd * gamma
    return torch.addcmul((beta - mean * scale)[:, None], h.flatten(2), scale[:, None])


def _channel_stats(h: torch.Tensor):
    """Per-channel mean and biased variance of h [B, C, ...], two-pass (as accurate as BatchNorm's own)."""
    h3 = h.flatten(2)
    n = h3.shape[0] * h3.shape[2]
    mean = h3.sum(2).sum(0) / n
    centred = h3 - mean[:, None]
    return mean, torch.linalg.vecdot(centred, centred, dim=2).sum(0) / n


def _norm_relu_conv(h: torch.Tensor, norm: nn.BatchNorm2d, conv: nn.Conv2d) -> torch.Tensor:
    """conv(ReLU(norm(h))) with the statistics and running-statistics update of one reference call."""
    batch_stats = _uses_batch_stats(norm)
    with torch.no_grad():
        if batch_stats:
            mean, var = _channel_stats(h)
            if norm.track_running_stats:
                n = h.numel() // h.shape[1]
                _update_running_stats(norm, mean, var * n / max(n - 1, 1))
        else:
            mean, var = norm.running_mean, norm.running_var
        invstd = torch.rsqrt(var + norm.eps)
    return _NormReluConv.apply(h, norm.weight, norm.bias, conv.weight, conv.bias, mean, invstd, batch_stats)


class _Upsample(torch.autograd.Function):
    """Bilinear resize (align_corners=False) as two small matrix products, rows then columns; the backward is
    the transposed products. On CPU this is several times faster than F.interpolate and saves nothing."""

    @staticmethod
    def forward(ctx, x, rows, cols):
        b, c, h, w = x.shape
        ctx.save_for_backward(rows, cols)
        t = torch.matmul(x.reshape(b * c * h, w), cols.t()).view(b * c, h, -1)
        return torch.matmul(rows, t).view(b, c, rows.shape[0], cols.shape[0])

    @staticmethod
    def backward(ctx, grad):
        rows, cols = ctx.saved_tensors
        b, c, hh, ww = grad.shape
        t = torch.matmul(rows.t(), grad.reshape(b * c, hh, ww))
        return torch.matmul(t.view(-1, ww), cols).view(b, c, rows.shape[1], cols.shape[1]), None, None


def _interpolation_matrix(n_in: int, n_out: int, like: torch.Tensor) -> torch.Tensor:
    """[n_out, n_in] weights of PyTorch's bilinear (align_corners=False) resize along one axis."""
    src = ((torch.arange(n_out, dtype=torch.float64) + 0.5) * (n_in / n_out) - 0.5).clamp(min=0)
    lo = src.floor().long().clamp(max=n_in - 1)
    hi = torch.where(lo < n_in - 1, lo + 1, lo)
    frac = src - lo
    m = torch.zeros(n_out, n_in, dtype=torch.float64)
    rows = torch.arange(n_out)
    m.index_put_((rows, lo), 1 - frac, accumulate=True)
    m.index_put_((rows, hi), frac, accumulate=True)
    return m.to(dtype=like.dtype, device=like.device)


def upsample(x: torch.Tensor, size) -> torch.Tensor:
    """Same function as F.interpolate(x, size, mode="bilinear", align_corners=False), faster on CPU."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    if x.device.type != "cpu":
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    rows = _interpolation_matrix(x.shape[-2], size[0], x)
    cols = _interpolation_matrix(x.shape[-1], size[1], x)
    return _Upsample.apply(x, rows, cols)


def head_fused(head, features: list, widths, backend: str = "auto") -> torch.Tensor:
    """Fused CSAM + aggregation of one task: same result as `head(features)`."""
    per_scale = [[features[k]] for k in range(4)]
    for k in range(3):
        attended = cross_scale_fused(head, features, k, backend)
        per_scale[k] += list(attended.unbind(1))
    size = features[0].shape[-2:]
    weights = _aggregation_weights(head, widths)
    # accumulate in place into the scale-0 conv output (autograd needs none of the summands)
    h = F.conv2d(torch.cat(per_scale[0], dim=1), weights[0], head.aggregate[0].bias)
    for k in range(1, 4):
        part = F.conv2d(torch.cat(per_scale[k], dim=1) if len(per_scale[k]) > 1 else per_scale[k][0], weights[k])
        h = h.add_(upsample(part, size))
    return _norm_relu_conv(h, head.aggregate[1], head.aggregate[3])
