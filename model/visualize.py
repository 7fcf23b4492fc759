"""PNG grids of predictions next to labels: one row per image, columns image | label, prediction per task.

Colours: semseg and human parts from a fixed palette (255 = ignore in black), depth and normals' angular
error range through a blue-to-yellow ramp (0 = invalid in black), normals as RGB of (n + 1) / 2, edges,
saliency as grey probabilities.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

MEAN = np.array([0.485, 0.456, 0.406])
STD = np.array([0.229, 0.224, 0.225])
# a ramp for scalar maps (dark blue -> teal -> yellow)
RAMP = np.array([[48, 18, 59], [40, 120, 180], [50, 190, 130], [250, 230, 40]], dtype=np.float64)
# colours per class, PASCAL VOC's bit-interleaved palette
PALETTE = np.array([[sum(((c >> (3 * k + j)) & 1) << (7 - k) for k in range(3)) for j in range(3)]
                    for c in range(256)], dtype=np.uint8)


def _ramp(x, valid):
    x = np.clip(x, 0, 1) * (len(RAMP) - 1)
    lo = np.floor(x).astype(int).clip(0, len(RAMP) - 2)
    frac = (x - lo)[..., None]
    rgb = RAMP[lo] * (1 - frac) + RAMP[lo + 1] * frac
    return (rgb * valid[..., None]).astype(np.uint8)


def _image(t):
    x = t.detach().float().cpu().numpy().transpose(1, 2, 0) * STD + MEAN
    return (np.clip(x, 0, 1) * 255).astype(np.uint8)


def _labels(a):
    a = np.asarray(a, dtype=np.int64)
    rgb = PALETTE[np.clip(a, 0, 255)]
    rgb[a == 255] = 0
    return rgb


def render(task, value, is_label, depth_range=None):
    """One map as HxWx3 uint8: `value` is a label [H,W]/[C,H,W] or the network's raw output [C,H,W]."""
    v = value.detach().float().cpu()
    if task in ("semseg", "human_parts"):
        return _labels(v.numpy() if is_label else v.argmax(0).numpy())
    if task == "depth":
        d = v[0].numpy()
        lo, hi = depth_range
        valid = d > 0 if is_label else np.ones_like(d, dtype=bool)
        return _ramp((d - lo) / max(hi - lo, 1e-6), valid)
    if task == "normals":
        n = v.numpy()
        valid = np.any(n != 0, axis=0) if is_label else np.ones(n.shape[1:], dtype=bool)
        n = n / np.maximum(np.linalg.norm(n, axis=0, keepdims=True), 1e-6)
        return (((n.transpose(1, 2, 0) + 1) / 2 * 255) * valid[..., None]).astype(np.uint8)
    p = v[0].numpy() if is_label else torch.sigmoid(v[0]).numpy()     # edge, sal
    grey = (np.clip(p, 0, 1) * 255).astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=-1)


def prediction_grid(batch, output, tasks, n=4):
    """HxWx3 uint8 grid of the first `n` images of a batch: image, then label | prediction per task."""
    rows = []
    n = min(n, batch["image"].shape[0])
    for i in range(n):
        cells = [_image(batch["image"][i])]
        for t in tasks:
            label, pred = batch[t][i], output[t][i]
            rng = None
            if t == "depth":
                valid = label[label > 0]
                rng = (0.0, float(valid.max()) if valid.numel() else 1.0)
            cells += [render(t, label, True, rng), render(t, pred, False, rng)]
        rows.append(np.concatenate([np.pad(c, ((1, 1), (1, 1), (0, 0)), constant_values=255) for c in cells], 1))
    return np.concatenate(rows, 0)


def save_grid(path, batch, output, tasks, n=4) -> np.ndarray:
    """Write the grid as PNG; the columns are named in columns.txt next to it."""
    grid = prediction_grid(batch, output, tasks, n)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).save(path)
    (path.parent / "columns.txt").write_text("columns: image | " + " | ".join(f"{t} label, {t} prediction"
                                                                          for t in tasks) + "\n")
    return grid
