"""Swin's window attention as one fused op: the backbone's self-attention layers and FPMA's spend most of their time
in it (per window and head a [L, L] logits map, its bias and mask added, softmaxed and multiplied in eager PyTorch,
with head dims as small as 3 channels)."""
from __future__ import annotations

import torch

from . import reference
from .backends import cpu_kernels_run
from .validation import check_window_attention


def window_attention(qkv: torch.Tensor, bias: torch.Tensor, mask: torch.Tensor | None = None, *, heads: int,
                     scale: float) -> torch.Tensor:
    """Multi-head self-attention inside windows: qkv [BW, L, 3*dim] (q, k, v side by side on the last axis, as the
    qkv Linear of a Swin block gives them; each split into `heads` heads), bias [heads, L, L] added to every window's
    logits (the relative position bias), mask [nW, L, L] or None added to window w's logits as mask[w % nW] (the
    shifted windows' mask) -> [BW, L, dim] with the heads side by side: softmax(scale q k^T + bias + mask) v. The same
    function as `reference.window_attention`.

    On CPU in float32/float64 one fused kernel computes it without storing any [L, L] map (autograd keeps qkv, bias,
    mask and one log-sum-exp per row; backward recomputes the softmax); elsewhere (GPU, other or mixed dtypes,
    autocast, a mask that needs a gradient, extension not built) the eager reference runs."""
    check_window_attention(qkv, bias, mask, heads, scale)
    same_dtype = bias.dtype == qkv.dtype and (mask is None or mask.dtype == qkv.dtype)
    if not (cpu_kernels_run(qkv) and same_dtype and (mask is None or not mask.requires_grad)):
        return reference.window_attention(qkv, bias, mask, heads, scale)
    from .cpp_backend import window_attention as fused

    return fused(qkv, bias, mask, heads, scale)
