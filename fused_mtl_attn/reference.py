"""The eager reference of the global-context attention core (and of the fused loss and the Swin window attention):
the one oracle every backend is tested against.

Math (docs/attention-op.md): q = softplus(qp), k = softplus(kp), S = v k^T, z = sum_j k_j,
out_p = S q_p / max(z . q_p, eps). Autograd of these few torch calls gives the backward derived there
(including the zero gradient of the denominator where the clamp is active).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from .constants import EPS, FLOAT16_EPS, SOFTPLUS_THRESHOLD


def _softplus(x: torch.Tensor) -> torch.Tensor:
    return F.softplus(x, threshold=SOFTPLUS_THRESHOLD)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Linear attention on post-softplus features: q [..., d, Nq], k [..., d, Nk], v [..., m, Nk] -> [..., m, Nq]."""
    context = torch.matmul(v, k.transpose(-1, -2))  # S: [..., m, d]
    z = k.sum(dim=-1, keepdim=True)  # [..., d, 1]
    eps = FLOAT16_EPS if q.dtype == torch.float16 else EPS
    den = (z * q).sum(dim=-2, keepdim=True).clamp_min(eps)  # [..., 1, Nq]
    return torch.matmul(context, q) / den


def cross_task_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Stacked pairs: q, k [B, P, d, N] logits, v [B, P, m, N] -> [B, P, m, N]; pair p attends its own k, v."""
    return attend(_softplus(q), _softplus(k), v)


def cross_scale_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, offsets: Sequence[int]
) -> torch.Tensor:
    """One query [B, d, Nq] against J gathered sources k [B, d, Ntot], v [B, m, Ntot] -> [B, J, m, Nq].

    Source j occupies positions offsets[j]:offsets[j+1]; each source gets its own S and z.
    """
    offsets = [int(o) for o in offsets]
    batch, _, n_query = q.shape
    q = _softplus(q)
    pieces = [
        attend(q, _softplus(k[..., lo:hi]), v[..., lo:hi]) for lo, hi in zip(offsets[:-1], offsets[1:])
    ]
    if not pieces:
        return q.new_zeros(batch, 0, v.shape[1], n_query)
    return torch.stack(pieces, dim=1)


def upsampled_cross_entropy(logits: torch.Tensor, label: torch.Tensor, ignore_index: int = 255) -> torch.Tensor:
    """Mean cross-entropy over the pixels whose label is not `ignore_index` (0 with a gradient if there is none) of
    logits [B, C, h, w] resized bilinearly (align_corners=False) to the label's size [B, H, W]."""
    if logits.shape[-2:] != label.shape[-2:]:
        logits = F.interpolate(logits, size=label.shape[-2:], mode="bilinear", align_corners=False)
    n_labelled = (label != ignore_index).sum()
    return F.cross_entropy(logits, label, ignore_index=ignore_index, reduction="sum") / n_labelled.clamp(min=1)


def window_attention(qkv: torch.Tensor, bias: torch.Tensor, mask: torch.Tensor | None, heads: int,
                     scale: float) -> torch.Tensor:
    """Multi-head self-attention inside windows, Swin's core: qkv [BW, L, 3*dim] (a Linear's output, q, k, v along
    the last axis, each split into `heads` heads of dim/heads channels), bias [heads, L, L] added to every window's
    logits, mask [nW, L, L] (or None) added to window w's logits as mask[w % nW] -> [BW, L, dim], the heads'
    outputs side by side: softmax(scale q k^T + bias + mask) v per window and head."""
    bw, length, three_dim = qkv.shape
    dim = three_dim // 3
    qkv = qkv.reshape(bw, length, 3, heads, dim // heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0] * scale, qkv[1], qkv[2]
    attn = q @ k.transpose(-2, -1) + bias
    if mask is not None:
        n_windows = mask.shape[0]
        attn = attn.view(bw // n_windows, n_windows, heads, length, length) + mask[None, :, None]
        attn = attn.view(bw, heads, length, length)
    return (attn.softmax(dim=-1) @ v).transpose(1, 2).reshape(bw, length, dim)
