"""Evaluation metrics as MTI-Net's meters define them (the SCA-MTL code base uses those meters; they
define the papers' tables). Accumulate with update(), then compute(); values in percent except depth/angles.

Each metric keeps its state as tensors of sums/counts/histograms, so `merge` (same process) and `sync`
(torch.distributed all_reduce) simply add them. `update(pred, batch)` takes the raw network output of
the task (logits for semseg/human_parts/sal/edge, values for depth/normals; or the whole output dict)
and the batch holding the label; predictions are upsampled to the label size when they differ.

- mIoU: TP/FP/FN per class pooled over the split (label != 255), IoU = TP / max(TP+FP+FN, 1e-8) for
  every class (0 for a class absent from labels and predictions), mean over all classes. Human parts
  skip an image whose label is all 255 or all 0 (no person).
- depth: RMSE (prediction clamped >= 0) and log-RMSE (prediction clamped >= 1e-9, as MTI-Net), pooled
  over the valid pixels of the split.
- normals: mean/median/RMSE angular error in degrees (both vectors normalised), pooled over the valid
  pixels, and the fractions within 11.25/22.5/30 degrees; the median comes from a 0.01-degree histogram.
- saliency: MTI-Net's maxF / mIoU (per-image Jaccard, precision and recall averaged over images at the
  thresholds linspace(0.2, 0.9, 15), F with beta^2 = 1 from the mean P and R, maxima over thresholds),
  plus the ATRC pooled beta^2 = 0.3 maxF as "maxF_atrc".
- edges: an APPROXIMATE boundary ODS F ("odsF_approx"): tolerance matching with a distance
  transform, not the SEISM MATLAB benchmark (no thinning of the prediction, no one-to-one matching);
  never compare it with published numbers.
- multi-task gain Dm against a JSON file of single-task baseline results.
"""
import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from scipy import ndimage

IGNORE = 255


def _pred_of(pred, task):
    return pred[task] if isinstance(pred, dict) else pred


def _resize(pred, label):
    if pred.shape[-2:] != label.shape[-2:]:
        pred = F.interpolate(pred.float(), size=label.shape[-2:], mode="bilinear", align_corners=False)
    return pred


class PooledMetric:
    """State tensors (float64 sums/counts) that merge by addition; subclasses define `_init_state`,
    `update` and `compute`."""

    task = ""

    def __init__(self):
        self.reset()

    def reset(self):
        self.state = self._init_state()

    def merge(self, other):
        for k, v in other.state.items():
            self.state[k] += v
        return self

    def sync(self, device=None):
        """Sum the state over all processes of the default group (no-op when not distributed)."""
        if not (dist.is_available() and dist.is_initialized()):
            return self
        for k, v in self.state.items():
            buf = v.to(device) if device is not None else v
            dist.all_reduce(buf)
            self.state[k] = buf.to(v.device)
        return self

    def _label_pred(self, pred, batch):
        label = batch[self.task]
        return _resize(_pred_of(pred, self.task).detach(), label), label


class MeanIoU(PooledMetric):
    """mIoU of `task` ("semseg" or "human_parts") with `n_classes` classes from a pooled confusion matrix.
    Human parts skip images whose label is a single value, 255 or 0: MTI-Net's evaluation drops images
    without a person (|unique(label)| == 1), so their background pixels do not count."""

    def __init__(self, n_classes, task="semseg"):
        self.n_classes, self.task = n_classes, task
        self.skip_empty = task == "human_parts"
        super().__init__()

    def _init_state(self):
        return {"confusion": torch.zeros(self.n_classes, self.n_classes, dtype=torch.float64)}

    def update(self, pred, batch):
        pred, label = self._label_pred(pred, batch)
        if pred.dim() == 4:
            pred = pred.argmax(1)
        valid = label != IGNORE
        if self.skip_empty:
            flat = label.flatten(1)
            empty = (flat == IGNORE).all(1) | (flat == 0).all(1)
            valid = valid & ~empty.view(-1, *[1] * (label.dim() - 1))
        idx = label[valid].long().cpu() * self.n_classes + pred[valid].long().cpu()
        self.state["confusion"] += torch.bincount(idx, minlength=self.n_classes ** 2).view(
            self.n_classes, self.n_classes).double()

    def compute(self):
        cm = self.state["confusion"]      # rows: label, columns: prediction
        tp = cm.diag()
        union = cm.sum(0) + cm.sum(1) - tp             # TP + FP + FN
        iou = tp / union.clamp(min=1e-8)               # MTI-Net: an absent class counts as 0
        return {"mIoU": 100 * iou.mean().item(), "IoU": [100 * x for x in iou.tolist()],
                "pixel_acc": 100 * (tp.sum() / cm.sum().clamp(min=1)).item()}


class DepthErrors(PooledMetric):
    task = "depth"

    def _init_state(self):
        return {"sq": torch.zeros((), dtype=torch.float64), "log_sq": torch.zeros((), dtype=torch.float64),
                "abs": torch.zeros((), dtype=torch.float64), "n": torch.zeros((), dtype=torch.float64)}

    def update(self, pred, batch):
        pred, label = self._label_pred(pred, batch)
        valid = label > 0
        p, g = pred[valid].double().clamp(min=0), label[valid].double()
        self.state["sq"] += ((p - g) ** 2).sum().cpu()
        self.state["abs"] += (p - g).abs().sum().cpu()
        self.state["log_sq"] += ((p.clamp(min=1e-9).log() - g.log()) ** 2).sum().cpu()
        self.state["n"] += valid.sum().cpu()

    def compute(self):
        n = self.state["n"].clamp(min=1)
        return {"rmse": math.sqrt(self.state["sq"] / n), "log_rmse": math.sqrt(self.state["log_sq"] / n),
                "abs_err": (self.state["abs"] / n).item()}


class NormalsErrors(PooledMetric):
    task = "normals"
    bins = 18000  # 0.01 degree

    def _init_state(self):
        return {"sum": torch.zeros((), dtype=torch.float64), "sq": torch.zeros((), dtype=torch.float64),
                "hist": torch.zeros(self.bins, dtype=torch.float64)}

    def update(self, pred, batch):
        pred, label = self._label_pred(pred, batch)
        valid = (label != 0).any(1)
        p = F.normalize(pred.double(), dim=1).permute(0, 2, 3, 1)[valid]
        g = F.normalize(label.double(), dim=1).permute(0, 2, 3, 1)[valid]
        deg = torch.rad2deg(torch.acos((p * g).sum(-1).clamp(-1, 1))).cpu()
        self.state["sum"] += deg.sum()
        self.state["sq"] += (deg ** 2).sum()
        self.state["hist"] += torch.bincount((deg * 100).long().clamp(max=self.bins - 1),
                                             minlength=self.bins).double()

    def compute(self):
        hist = self.state["hist"]
        n = hist.sum().clamp(min=1)
        cum = hist.cumsum(0)
        median_bin = int(torch.searchsorted(cum, n / 2).item())
        out = {"mean": (self.state["sum"] / n).item(), "median": (median_bin + 0.5) / 100,
               "rmse": math.sqrt(self.state["sq"] / n)}
        for a in (11.25, 22.5, 30):
            out[f"within_{a}"] = 100 * (hist[:int(a * 100)].sum() / n).item()
        return out


def _threshold_counts(prob, label, thresholds, strict=False):
    """TP, FP, FN, TN for `prob >= t` (`prob > t` if strict) at each threshold, over the given pixels."""
    pos = label.bool()
    # bin the probabilities once instead of comparing per threshold
    bins = torch.bucketize(prob, thresholds, right=not strict)    # number of thresholds <= (<) prob
    k = len(thresholds) + 1
    pos_hist = torch.bincount(bins[pos], minlength=k).double()
    neg_hist = torch.bincount(bins[~pos], minlength=k).double()
    # prob >= (>) thresholds[i]  <=>  bins >= i + 1
    tp = pos_hist.flip(0).cumsum(0).flip(0)[1:]
    fp = neg_hist.flip(0).cumsum(0).flip(0)[1:]
    return torch.stack([tp, fp, pos_hist.sum() - tp, neg_hist.sum() - fp])


class SaliencyATRC(PooledMetric):
    """Saliency "maxF_atrc", the ATRC convention (a second column; the primary number is SaliencyMTI's):
    TP/FP/FN pooled over the whole set per threshold `prob >= t`, F_beta with beta^2 = 0.3, max over
    thresholds 0.05..0.95; plus "mIoU_atrc", the max over the same thresholds of the mean of foreground
    and background IoU. Predictions are logits (sigmoid applied here)."""

    task = "sal"
    beta2 = 0.3
    thresholds = torch.arange(1, 20, dtype=torch.float64) * 0.05

    def _init_state(self):
        return {"counts": torch.zeros(4, len(self.thresholds), dtype=torch.float64)}

    def update(self, pred, batch):
        pred, label = self._label_pred(pred, batch)
        valid = label != IGNORE
        prob = torch.sigmoid(pred.double())[valid].cpu()
        self.state["counts"] += _threshold_counts(prob, (label[valid] > 0.5).cpu(), self.thresholds)

    def compute(self):
        tp, fp, fn, tn = self.state["counts"]
        prec = tp / (tp + fp).clamp(min=1e-12)
        rec = tp / (tp + fn).clamp(min=1e-12)
        f = (1 + self.beta2) * prec * rec / (self.beta2 * prec + rec).clamp(min=1e-12)
        miou = (tp / (tp + fp + fn).clamp(min=1e-12) + tn / (tn + fn + fp).clamp(min=1e-12)) / 2
        return {"maxF_atrc": 100 * f.max().item(), "mIoU_atrc": 100 * miou.max().item()}


class SaliencyMTI(PooledMetric):
    """Saliency as MTI-Net's SaliencyMeter: per image and threshold t in linspace(0.2, 0.9, 15), the
    prediction `sigmoid(logit) > t` over valid pixels (label != 255) gives the Jaccard index, precision
    and recall; each is averaged over images, F = 2PR/(P+R) from the means, and maxF / mIoU are the
    maxima over thresholds. An image with no positive label and no positive prediction has Jaccard 1
    (MTI-Net's jaccard()), precision 0 and recall 0 (0/0 -> 0). Images without a valid pixel are
    skipped."""

    task = "sal"
    thresholds = torch.linspace(0.2, 0.9, 15, dtype=torch.float64)

    def _init_state(self):
        # per threshold: sums over images of Jaccard, precision, recall; and the number of images
        return {"sums": torch.zeros(3, len(self.thresholds), dtype=torch.float64),
                "images": torch.zeros((), dtype=torch.float64)}

    def update(self, pred, batch):
        pred, label = self._label_pred(pred, batch)
        for prob, gt in zip(torch.sigmoid(pred.double()).cpu(), label.cpu()):
            valid = gt != IGNORE
            if not valid.any():
                continue
            tp, fp, fn, _ = _threshold_counts(prob[valid], gt[valid] > 0.5, self.thresholds, strict=True)
            union = tp + fp + fn
            jaccard = torch.where(union > 0, tp / union.clamp(min=1), 1.0)   # both empty -> 1
            # integer counts: clamp(min=1) only changes 0/0, which becomes 0
            prec, rec = tp / (tp + fp).clamp(min=1), tp / (tp + fn).clamp(min=1)
            self.state["sums"] += torch.stack([jaccard, prec, rec])
            self.state["images"] += 1

    def compute(self):
        jaccard, prec, rec = self.state["sums"] / self.state["images"].clamp(min=1)
        f = torch.where(prec + rec > 0, 2 * prec * rec / (prec + rec), 0.0)
        return {"maxF": 100 * f.max().item(), "mIoU": 100 * jaccard.max().item()}


class MetricGroup:
    """Metrics kept side by side, {name: metric}: update() feeds each the same prediction and compute() joins
    their dicts (saliency: MTI-Net's and ATRC's conventions); reset(), merge() and sync() act on each."""

    def __init__(self, metrics: dict):
        self.metrics = metrics

    def update(self, pred, batch):
        for m in self.metrics.values():
            m.update(pred, batch)

    def compute(self):
        return {k: v for m in self.metrics.values() for k, v in m.compute().items()}

    def reset(self):
        for m in self.metrics.values():
            m.reset()

    def merge(self, other):
        for name, m in self.metrics.items():
            m.merge(other.metrics[name])
        return self

    def sync(self, device=None):
        for m in self.metrics.values():
            m.sync(device)
        return self


class BoundaryFApprox(PooledMetric):
    """APPROXIMATE boundary ODS F ("odsF_approx"), not SEISM's: per image, a predicted edge pixel counts
    as matched when a label edge lies within `tolerance` x image diagonal (distance transform of the
    label), and a label edge pixel counts as recalled when some prediction >= threshold lies within the
    same radius (max filter of the probabilities over a disc); counts are pooled over the set per
    threshold (0.01..0.99) and the best F is reported. The MATLAB benchmark thins predictions and matches
    one-to-one: this is not that number (docs/data-and-metrics.md says how to get it). Tolerance 0.011
    on NYUD, 0.0075 on PASCAL."""

    task = "edge"
    thresholds = torch.arange(1, 100, dtype=torch.float64) * 0.01

    def __init__(self, tolerance=0.0075):
        self.tolerance = tolerance
        super().__init__()

    def _init_state(self):
        # matched predictions, predictions, recalled labels, labels per threshold
        return {"counts": torch.zeros(4, len(self.thresholds), dtype=torch.float64)}

    def update(self, pred, batch):
        pred, label = self._label_pred(pred, batch)
        probs = torch.sigmoid(pred.double())[:, 0].cpu().numpy()
        labels = (label[:, 0] > 0.5).cpu().numpy()
        for prob, gt in zip(probs, labels):
            self.state["counts"] += self._image_counts(prob, gt)

    def _image_counts(self, prob, gt):
        radius = self.tolerance * math.hypot(*gt.shape)
        thr = self.thresholds.numpy()
        if gt.any():
            near_gt = ndimage.distance_transform_edt(~gt) <= radius
        else:
            near_gt = np.zeros_like(gt)
        r = int(math.floor(radius))
        yy, xx = np.mgrid[-r:r + 1, -r:r + 1]
        disc = yy ** 2 + xx ** 2 <= radius ** 2
        best_near = ndimage.maximum_filter(prob, footprint=disc, mode="constant", cval=0.0)
        above = prob[None] >= thr[:, None, None]
        matched = (above & near_gt[None]).sum((1, 2))
        n_pred = above.sum((1, 2))
        recalled = (best_near[gt][None] >= thr[:, None]).sum(1)
        return torch.from_numpy(np.stack([matched, n_pred, recalled, np.full_like(recalled, gt.sum())])
                                .astype(np.float64))

    def compute(self):
        matched, n_pred, recalled, n_gt = self.state["counts"]
        prec = matched / n_pred.clamp(min=1e-12)
        rec = recalled / n_gt.clamp(min=1e-12)
        f = 2 * prec * rec / (prec + rec).clamp(min=1e-12)
        best = int(f.argmax())
        return {"odsF_approx": 100 * f[best].item(), "threshold": self.thresholds[best].item()}


# each task's headline metric (the papers' table column) and whether lower is better
PRIMARY = {
    "semseg": ("mIoU", False),
    "human_parts": ("mIoU", False),
    "depth": ("rmse", True),
    "normals": ("mean", True),
    "sal": ("maxF", False),
    "edge": ("odsF_approx", False),
}
# the metric Dm (and model selection) uses per task: MTI-Net's calculate_multi_task_performance, which the
# SCA-MTL code keeps, takes saliency's mIoU, not its maxF; edge's odsF (SEISM) is only approximated here
DM_METRIC = PRIMARY | {"sal": ("mIoU", False)}
EDGE_TOLERANCE = {"nyud": 0.011, "pascal": 0.0075, "synthetic": 0.0075}


def build_metric(task, num_outputs=None, dataset="synthetic"):
    if task in ("semseg", "human_parts"):
        if num_outputs is None:
            raise ValueError(f"metric for '{task}' needs its number of classes")
        return MeanIoU(num_outputs, task)
    if task == "edge":
        return BoundaryFApprox(EDGE_TOLERANCE.get(dataset, 0.0075))
    if task == "sal":
        return MetricGroup({"mti": SaliencyMTI(), "atrc": SaliencyATRC()})
    classes = {"depth": DepthErrors, "normals": NormalsErrors}
    if task not in classes:
        raise ValueError(f"no metric for task '{task}'; known: {', '.join(PRIMARY)}")
    return classes[task]()


class MultiTaskMetrics(MetricGroup):
    """One metric per task: update(output, batch), compute() -> {task: {...}}, reset(), merge(), sync()."""

    def __init__(self, num_outputs, dataset="synthetic"):
        super().__init__({t: build_metric(t, n, dataset) for t, n in num_outputs.items()})

    def update(self, output, batch):
        for t, m in self.metrics.items():
            m.update(output[t], batch)

    def compute(self):
        return {t: m.compute() for t, m in self.metrics.items()}


def load_baselines(path):
    """Single-task baseline results, JSON {task: {metric: value}} as MultiTaskMetrics.compute() gives
    (an `evaluate --json` file, which holds that under "metrics", is read too)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"single-task baseline file {path} does not exist; expected JSON "
                                f"{{task: {{metric: value}}}} from single-task runs of the same pipeline")
    data = json.loads(path.read_text())
    return data.get("metrics", data)


def multi_task_gain(results, baselines, tasks=None):
    """Dm in percent = mean_t (-1)^{l_t} (M_mt,t - M_st,t) / M_st,t * 100 over the tasks' DM_METRIC
    (l_t = 1 where lower is better; Maninis et al. 2019, Vandenhende et al. 2020). `baselines` is a dict
    or a path to the JSON file; both must come from this pipeline (same units: percent)."""
    if not isinstance(baselines, dict):
        baselines = load_baselines(baselines)
    tasks = list(results) if tasks is None else list(tasks)
    gains = []
    for t in tasks:
        key, lower = DM_METRIC[t]
        if t not in baselines or key not in baselines[t]:
            raise KeyError(f"baseline results have no '{t}' / '{key}' (have: {sorted(baselines)})")
        mt, st = float(results[t][key]), float(baselines[t][key])
        gains.append((-1 if lower else 1) * (mt - st) / st)
    return 100 * sum(gains) / len(gains)
