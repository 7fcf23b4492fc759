"""Sample transforms in the MTI-Net manner, on samples of torch tensors.

A sample is a dict: "image" float [3,H,W] in [0,1] until `Normalize`; "semseg"/"human_parts" long [H,W]
(255 = ignore); "depth" [1,H,W] (0 = invalid); "normals" [3,H,W] (all-zero = invalid); "edge"/"sal"
[1,H,W] in {0,1}; "meta" passes through untouched. Normals are in the camera frame x right, y up,
z towards the camera, so a horizontal flip negates x and an in-plane rotation turns (x, y).
"""
import math
import random

import torch
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# How each key is resampled and what fills pixels that come from outside the frame.
# Labels (and depth/normals, whose zeros mark invalid pixels) are resampled nearest-neighbour so that
# no invalid value is blended into a valid one.
RESAMPLE = {
    "image": ("bilinear", 0.0),
    "semseg": ("nearest", 255),
    "human_parts": ("nearest", 255),
    "depth": ("nearest", 0.0),
    "normals": ("nearest", 0.0),
    "edge": ("nearest", 0.0),
    "sal": ("nearest", 0.0),
}


def _tensor_keys(sample):
    return [k for k in sample if k in RESAMPLE]


def _as_chw_float(x):
    # semseg/human_parts are [H,W] long; the resampling ops want [1,C,H,W] float
    return (x[None] if x.dim() == 2 else x)[None].float()


def _restore(y, like):
    y = y[0]
    if like.dim() == 2:
        y = y[0]
    return y.round().to(like.dtype) if not like.is_floating_point() else y.to(like.dtype)


class Compose:
    def __init__(self, transforms):
        self.transforms = list(transforms)

    def __call__(self, sample):
        for t in self.transforms:
            sample = t(sample)
        return sample

    def __repr__(self):
        return "Compose(" + ", ".join(repr(t) for t in self.transforms) + ")"


class Resize:
    """Resize every map to `size` (H, W): image bilinear, labels/depth/normals nearest."""

    def __init__(self, size):
        self.size = (size, size) if isinstance(size, int) else tuple(size)

    def __call__(self, sample):
        for k in _tensor_keys(sample):
            x = sample[k]
            if tuple(x.shape[-2:]) == self.size:
                continue
            mode = RESAMPLE[k][0]
            kw = {"align_corners": False} if mode == "bilinear" else {}
            sample[k] = _restore(F.interpolate(_as_chw_float(x), size=self.size, mode=mode, **kw), x)
        return sample

    def __repr__(self):
        return f"Resize({self.size})"


class RandomHorizontalFlip:
    """Flip left-right with probability p; the normals' x component changes sign."""

    def __init__(self, p=0.5):
        self.p = p

    def __call__(self, sample):
        if random.random() >= self.p:
            return sample
        for k in _tensor_keys(sample):
            sample[k] = torch.flip(sample[k], dims=[-1])
        if "normals" in sample:
            sample["normals"][0] = -sample["normals"][0]
        return sample

    def __repr__(self):
        return f"RandomHorizontalFlip(p={self.p})"


class ScaleRotate:
    """Random zoom about the centre and in-plane rotation, output the same size (MTI-Net ScaleNRotate).

    `scales`: (lo, hi) draws uniformly, a list of more values draws one of them; `rotate`: max degrees,
    drawn uniformly in [-rotate, rotate], positive = counter-clockwise as displayed. Depth is divided by
    the zoom (a zoomed-in scene looks nearer); normals turn with the image; pixels from outside the
    frame are ignore/invalid.
    """

    def __init__(self, scales=(1.0, 1.0), rotate=0.0):
        self.scales = tuple(scales)
        self.rotate = float(rotate)

    def draw(self):
        if len(self.scales) == 2:
            s = random.uniform(*self.scales)
        else:
            s = random.choice(self.scales)
        r = random.uniform(-self.rotate, self.rotate) if self.rotate else 0.0
        return s, r

    def __call__(self, sample, scale=None, degrees=None):
        s, r = self.draw()
        s = s if scale is None else scale
        r = r if degrees is None else degrees
        if s == 1.0 and r == 0.0:
            return sample
        return scale_rotate(sample, s, r)

    def __repr__(self):
        return f"ScaleRotate(scales={self.scales}, rotate={self.rotate})"


def scale_rotate(sample, scale, degrees):
    """Zoom by `scale` and rotate by `degrees` (counter-clockwise as displayed) about the image centre."""
    keys = _tensor_keys(sample)
    if not keys:
        return sample
    h, w = sample[keys[0]].shape[-2:]
    th = math.radians(degrees)
    c, s_ = math.cos(th), math.sin(th)
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32),
                            indexing="ij")
    cx, cy = (w - 1) / 2, (h - 1) / 2
    dx, dy = xs - cx, ys - cy
    # inverse map, output pixel -> source pixel; image rows grow downwards, hence the signs
    src_x = cx + (c * dx - s_ * dy) / scale
    src_y = cy + (s_ * dx + c * dy) / scale
    inside = (src_x > -0.5) & (src_x < w - 0.5) & (src_y > -0.5) & (src_y < h - 0.5)
    grid = torch.stack([2 * src_x / max(w - 1, 1) - 1, 2 * src_y / max(h - 1, 1) - 1], dim=-1)[None]
    for k in keys:
        x = sample[k]
        mode, fill = RESAMPLE[k]
        y = F.grid_sample(_as_chw_float(x), grid, mode=mode, padding_mode="zeros", align_corners=True)
        y = _restore(y, x)
        y[..., ~inside] = fill
        sample[k] = y
    if "depth" in sample:
        sample["depth"] = sample["depth"] / scale
    if "normals" in sample:
        n = sample["normals"]
        nx, ny = n[0].clone(), n[1].clone()
        n[0] = c * nx - s_ * ny
        n[1] = s_ * nx + c * ny
    return sample


class Normalize:
    """ImageNet mean/std normalisation of the image."""

    def __init__(self, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        self.mean = torch.tensor(mean).view(3, 1, 1)
        self.std = torch.tensor(std).view(3, 1, 1)

    def __call__(self, sample):
        sample["image"] = (sample["image"] - self.mean) / self.std
        return sample

    def __repr__(self):
        return "Normalize(ImageNet)"


# Augmentations of the MTI-Net configs: NYUD zooms in by one of 1, 1.2, 1.5 without rotation; PASCAL
# zooms in [0.75, 1.25] and rotates up to 20 degrees.
AUGMENT = {
    "nyud": {"scales": [1.0, 1.2, 1.5], "rotate": 0.0},
    "pascal": {"scales": (0.75, 1.25), "rotate": 20.0},
    "synthetic": {"scales": (0.75, 1.25), "rotate": 20.0},
}


def build_transforms(size=None, augment=False, scales=(1.0, 1.0), rotate=0.0, flip=True):
    """Resize to `size` (None keeps the size), then, when `augment`, random flip and scale/rotation;
    always ImageNet normalisation last."""
    ts = []
    if size is not None:
        ts.append(Resize(size))
    if augment:
        if flip:
            ts.append(RandomHorizontalFlip())
        if tuple(scales) != (1.0, 1.0) or rotate:
            ts.append(ScaleRotate(scales, rotate))
    ts.append(Normalize())
    return Compose(ts)
