"""The fused loss: cross-entropy of logits resized to the label's size, the costliest part of a dense-prediction loss
with deep supervision (every coarse prediction is upsampled to full resolution, then log-softmaxed, in eager
PyTorch: two full-size tensors stored per prediction for backward)."""
from __future__ import annotations

import torch

from . import reference
from .backends import cpu_kernels_run
from .validation import check_cross_entropy


def upsampled_cross_entropy(logits: torch.Tensor, label: torch.Tensor, ignore_index: int = 255) -> torch.Tensor:
    """Mean cross-entropy over the pixels whose label is not `ignore_index` (0, with a zero gradient, if there is
    none) of `logits` [B, C, h, w] resized bilinearly (align_corners=False, as F.interpolate to a size) to the size
    of `label` [B, H, W] (int64 class indices): the same function as `reference.upsampled_cross_entropy`.

    On CPU in float32/float64 one fused kernel computes it without storing the resized logits or their log-softmax
    (autograd keeps logits, label and one log-sum-exp per pixel; backward recomputes the rest); elsewhere (GPU,
    other dtypes, autocast, extension not built) the eager reference runs. A label outside [0, C) other than
    `ignore_index` raises."""
    check_cross_entropy(logits, label, ignore_index)
    if not cpu_kernels_run(logits):
        return reference.upsampled_cross_entropy(logits, label, ignore_index)
    from .cpp_backend import upsampled_cross_entropy_sum

    n_labelled = (label != ignore_index).sum()
    return upsampled_cross_entropy_sum(logits, label, ignore_index) / n_labelled.clamp(min=1)
