"""Per-task losses (MTI-Net conventions) and the multi-task loss with deep supervision.

semseg / human_parts: cross-entropy, ignore 255; depth: L1 over valid (> 0) pixels; normals: L1 between
the L2-normalised prediction and the label over valid (non-zero) pixels; sal: balanced BCE (HED-style
weight from the label balance); edge: BCE with a fixed positive weight. Every loss is 0 (with a
gradient) when a batch has no valid pixel, e.g. human parts on images without people.

A prediction smaller than its label is resized to the label's size (bilinear, align_corners=False). With
`fused=True` the same losses run on the fused path's pieces: cross-entropy resizes inside one kernel
(fused_mtl_attn.upsampled_cross_entropy), the other losses resize with the fused path's resize (matrix products),
and the normals' normalisation is a sum of squares (fused_ops.normalize_channels).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from fused_mtl_attn import reference, upsampled_cross_entropy

from .fused_ops import normalize_channels, upsample

IGNORE = 255


def cross_entropy(pred, label):
    """Mean cross-entropy over pixels whose label != 255; pred [B,C,h,w] logits (resized to the label's size if
    smaller), label [B,H,W] long."""
    return reference.upsampled_cross_entropy(pred, label, IGNORE)


def depth_l1(pred, label):
    """Mean |pred - label| over pixels with label > 0; pred and label [B,1,H,W]."""
    valid = label > 0
    return (pred - label).abs().mul(valid).sum() / valid.sum().clamp(min=1)


def normals_l1(pred, label, normalize=F.normalize):
    """Mean |normalise(pred) - label| over the components of pixels whose label is not all-zero (`normalize`: L2 over
    the channels, F.normalize's defaults)."""
    valid = (label != 0).any(dim=1, keepdim=True).expand_as(label)
    pred = normalize(pred)
    return (pred - label).abs().mul(valid).sum() / valid.sum().clamp(min=1)


def balanced_bce(pred, label, pos_weight=None):
    """MTI-Net BalancedCrossEntropyLoss: w * BCE over positives + (1 - w) * BCE over negatives, summed
    and divided by the number of pixels; w = fraction of negatives when `pos_weight` is None."""
    label = (label >= 0.5).float()
    if pos_weight is None:
        w = 1.0 - label.mean()
    else:
        w = pos_weight
    # per-pixel BCE with logits, stable: max(x,0) - x*y + log(1 + exp(-|x|))
    bce = F.binary_cross_entropy_with_logits(pred, label, reduction="none")
    loss_pos = (bce * label).sum()
    loss_neg = (bce * (1.0 - label)).sum()
    return (w * loss_pos + (1 - w) * loss_neg) / label.numel()


class TaskLoss(nn.Module):
    """The loss of one task by name, of a prediction at the label's size or smaller; `edge_pos_weight` is the edge
    BCE's positive weight; `fused` computes it on the fused path (same function)."""

    def __init__(self, task, edge_pos_weight=0.95, fused=False):
        super().__init__()
        self.task = task
        self.edge_pos_weight = edge_pos_weight
        self.fused = fused
        if task not in LOSSES:
            raise ValueError(f"no loss for task '{task}'; known: {', '.join(LOSSES)}")

    def forward(self, pred, label):
        if LOSSES[self.task] is cross_entropy:  # resized inside the loss
            return upsampled_cross_entropy(pred, label, IGNORE) if self.fused else cross_entropy(pred, label)
        pred = upsample(pred, label.shape[-2:]) if self.fused else _to_label_size(pred, label)
        if self.task == "edge":
            return balanced_bce(pred, label, self.edge_pos_weight)
        if self.task == "normals" and self.fused:
            return normals_l1(pred, label, normalize_channels)
        return LOSSES[self.task](pred, label)


LOSSES = {
    "semseg": cross_entropy,
    "human_parts": cross_entropy,
    "depth": depth_l1,
    "normals": normals_l1,
    "sal": balanced_bce,
    "edge": balanced_bce,
}


def _to_label_size(pred, label):
    size = label.shape[-2:]
    if pred.shape[-2:] == size:
        return pred
    return F.interpolate(pred, size=size, mode="bilinear", align_corners=False)


class MultiTaskLoss(nn.Module):
    """total = sum_k sum_t w_t L_t(up(P_k[t])) + sum_t w_t L_t(final[t]).

    forward(output, batch) takes the network output `{task: [B,n,H,W], "deep_supervision": {scale:
    {task: [B,n,h,w]}}}` and the batch of labels; deep-supervision predictions are upsampled
    (bilinear) to the label size. Returns (total, parts): parts holds the detached unweighted losses,
    `parts[task]` for the final prediction and `parts[f"{task}/ds_{scale}"]` per scale. `fused=True` computes the
    same losses with the fused path's kernels (see the module's docstring).
    """

    def __init__(self, tasks, weights=None, edge_pos_weight=0.95, fused=False):
        super().__init__()
        self.tasks = tuple(tasks)
        weights = {} if weights is None else dict(weights)
        unknown = sorted(set(weights) - set(self.tasks))
        if unknown:
            raise ValueError(f"loss weights given for tasks {unknown} that are not in {self.tasks}")
        self.weights = {t: float(weights.get(t, 1.0)) for t in self.tasks}
        self.losses = nn.ModuleDict({t: TaskLoss(t, edge_pos_weight) for t in self.tasks})
        self.set_fused(fused)

    def set_fused(self, flag: bool = True) -> "MultiTaskLoss":
        """Compute the losses on the fused path (flag True) or the reference one; the same function either way."""
        if not isinstance(flag, bool):
            raise TypeError(f"set_fused: flag must be bool, got {flag!r}")
        self.fused = flag
        for loss in self.losses.values():
            loss.fused = flag
        return self

    def forward(self, output, batch):
        parts = {}
        total = 0.0
        preds = [("", output)] + [(f"/ds_{k}", p) for k, p in output.get("deep_supervision", {}).items()]
        for suffix, pred in preds:
            for t in self.tasks:
                if t not in pred:
                    continue
                loss = self.losses[t](pred[t], batch[t])
                total = total + self.weights[t] * loss
                parts[t + suffix] = loss.detach()
        missing = [t for t in self.tasks if t not in output]
        if missing:
            raise KeyError(f"network output has no final prediction for task(s) {missing}")
        return total, parts
