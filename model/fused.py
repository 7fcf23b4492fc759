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
    """conv1x1(ReLU(BN(h))) that saves only h (and per-channel statistics) and recomputes the normalised
    activations in backward, instead of storing three full-resolution tensors as the module chain does."""

    @staticmethod
    def forward(ctx, h, gamma, beta, weight, bias, mean, invstd, batch_stats: bool):
        ctx.batch_stats = batch_stats
        ctx.save_for_backward(h, gamma, beta, weight, mean, invstd)
        return F.conv2d(torch.relu(_affine(h, mean, invstd, gamma, beta)), weight, bias)

    @staticmethod
    def backward(ctx, grad_out):
        h, gamma, beta, weight, mean, invstd = ctx.saved_tensors
        xhat = _affine(h, mean, invstd, torch.ones_like(gamma), torch.zeros_like(beta))
        pre = xhat * gamma[None, :, None, None] + beta[None, :, None, None]
        act = torch.relu(pre)
        grad_weight = torch.einsum("bohw,bchw->oc", grad_out, act)[..., None, None]
        grad_bias = grad_out.sum(dim=(0, 2, 3))
        grad_pre = F.conv_transpose2d(grad_out, weight) * (pre > 0)
        grad_gamma = (grad_pre * xhat).sum(dim=(0, 2, 3))
        grad_beta = grad_pre.sum(dim=(0, 2, 3))
        grad_h = grad_pre
        if ctx.batch_stats:  # the batch mean and variance depend on h too
            n = h.numel() // h.shape[1]
            grad_h = grad_pre - (grad_beta / n)[None, :, None, None] - xhat * (grad_gamma / n)[None, :, None, None]
        grad_h = grad_h * (gamma * invstd)[None, :, None, None]
        return grad_h, grad_gamma, grad_beta, grad_weight, grad_bias, None, None, None


def _affine(h, mean, invstd, gamma, beta):
    scale = invstd * gamma
    return h * scale[None, :, None, None] + (beta - mean * scale)[None, :, None, None]


def _norm_relu_conv(h: torch.Tensor, norm: nn.BatchNorm2d, conv: nn.Conv2d) -> torch.Tensor:
    """conv(ReLU(norm(h))) with the statistics and running-statistics update of one reference call."""
    batch_stats = _uses_batch_stats(norm)
    with torch.no_grad():
        if batch_stats:
            var, mean = torch.var_mean(h, dim=(0, 2, 3), correction=0)
            if norm.track_running_stats:
                n = h.numel() // h.shape[1]
                _update_running_stats(norm, mean, var * n / max(n - 1, 1))
        else:
            mean, var = norm.running_mean, norm.running_var
        invstd = torch.rsqrt(var + norm.eps)
    return _NormReluConv.apply(h, norm.weight, norm.bias, conv.weight, conv.bias, mean, invstd, batch_stats)


def head_fused(head, features: list, widths, backend: str = "auto") -> torch.Tensor:
    """Fused CSAM + aggregation of one task: same result as `head(features)`."""
    per_scale = [[features[k]] for k in range(4)]
    for k in range(3):
        attended = cross_scale_fused(head, features, k, backend)
        per_scale[k] += list(attended.unbind(1))
    size = features[0].shape[-2:]
    weights = _aggregation_weights(head, widths)
    h = None
    for k in range(4):
        part = F.conv2d(torch.cat(per_scale[k], dim=1) if len(per_scale[k]) > 1 else per_scale[k][0], weights[k])
        part = part if k == 0 else F.interpolate(part, size=size, mode="bilinear", align_corners=False)
        h = part if h is None else h + part
    h = h + head.aggregate[0].bias[None, :, None, None]
    return _norm_relu_conv(h, head.aggregate[1], head.aggregate[3])
