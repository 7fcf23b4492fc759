"""The SCA-MTL network (docs/architecture.md): HRNet-W18-small-v2 + per-scale Swin self-attention,
coarse-to-fine decoder with initial task predictions, CTAM and FPMA, and per-task CSAM + aggregation heads.

This file builds the reference path: one module call per pair, per source and per piece, exactly like the
authors' implementation. The fused path (model/fused.py: a subclass per module, same parameters) is selected with
`fused=True` / `set_fused`, which swaps those classes in; this file does not load it.
"""
from __future__ import annotations

import copy
import os
from collections import OrderedDict
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.hrnet import HighResolutionNetFeatures, cfg_cls

from fused_mtl_attn.backends import BACKENDS

from .keys import upgrade_state_dict
from .modules import BasicBlock, GlobalContextAttention, SqueezeExcitation, SwinLayer, conv1x1, from_key

# The order of every per-task module and of every concatenation over tasks, whatever order the caller lists the
# tasks in: the authors' config parser fixes it, and their weights (model/authors.py) depend on it.
TASK_ORDER = ("semseg", "human_parts", "sal", "normals", "edge", "depth")
NYUD_TASKS = {"semseg": 40, "normals": 3, "edge": 1, "depth": 1}
PASCAL_TASKS = {"semseg": 21, "human_parts": 7, "sal": 1, "normals": 3, "edge": 1}
KNOWN_TASKS = sorted(TASK_ORDER)
# the task sets the paper and the MTL literature use, by short name
TASK_SETS = {
    "nyud2": {t: NYUD_TASKS[t] for t in ("semseg", "depth")},
    "nyud4": dict(NYUD_TASKS),
    "pascal3": {t: PASCAL_TASKS[t] for t in ("semseg", "human_parts", "sal")},
    "pascal5": dict(PASCAL_TASKS),
}
DEFAULT_WIDTHS = (36, 72, 144, 288)
STRIDES = (4, 8, 16, 32)
BACKBONE_BN_MOMENTUM = 0.01
WEIGHTS_ENV = "FUSED_MTL_ATTN_HRNET_WEIGHTS"


def up(x: torch.Tensor, size) -> torch.Tensor:
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def build_backbone(widths, pretrained) -> HighResolutionNetFeatures:
    """HRNet-W18-small-v2 (timm) whose branch channels are half the decoder widths (the decoder concatenates
    [ATT(F_k), F_k]); the default widths give timm's exact model. `pretrained`: False, or a local weights file."""
    cfg = copy.deepcopy(cfg_cls["hrnet_w18_small_v2"])
    branch = tuple(w // 2 for w in widths)
    for i, stage in enumerate(("stage2", "stage3", "stage4")):
        cfg[stage]["num_channels"] = branch[: i + 2]
    net = HighResolutionNetFeatures(cfg, feature_location="", out_indices=(1, 2, 3, 4))
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = BACKBONE_BN_MOMENTUM
    if pretrained:
        load_backbone_weights(net, pretrained, widths)
    return net


def load_backbone_weights(net: nn.Module, pretrained, widths) -> None:
    """Load ImageNet HRNet weights from a local file (never from the internet)."""
    if tuple(widths) != DEFAULT_WIDTHS:
        raise ValueError(f"pretrained backbone weights exist only for widths {DEFAULT_WIDTHS}, got {tuple(widths)}")
    path = pretrained if isinstance(pretrained, (str, Path)) else os.environ.get(WEIGHTS_ENV)
    if not path:
        raise ValueError(
            "pretrained=True needs a local weights file: pass pretrained='/path/hrnet_w18_small_v2.pth' or set "
            f"{WEIGHTS_ENV} (timm's hrnet_w18_small_v2 state dict; nothing is downloaded)"
        )
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pretrained backbone weights: no file at {path}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = state.get("state_dict", state)
    own = net.state_dict()
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if not usable:
        raise ValueError(f"{path} holds no tensor of the hrnet_w18_small_v2 backbone (is it another model?)")
    missing = [k for k in own if k not in usable and not k.endswith("num_batches_tracked")]
    if missing:
        raise ValueError(f"{path} lacks {len(missing)} backbone tensors, e.g. {missing[:3]}")
    net.load_state_dict(usable, strict=False)


class InitialPrediction(nn.Module):
    """Two BasicBlocks give the task feature X_k[t]; a 1x1 conv gives the deep-supervision prediction P_k[t]."""

    def __init__(self, cin: int, channels: int, n_out: int):
        super().__init__()
        self.blocks = nn.Sequential(BasicBlock(cin, channels), BasicBlock(channels, channels))
        self.predict = conv1x1(channels, n_out, bias=True)

    def forward(self, x):
        feature = self.blocks(x)
        return feature, self.predict(feature)


class CrossTaskAttention(nn.Module):
    """CTAM at one scale: a GCA block per ordered task pair, one BasicBlock shared by all targets, residual."""

    def __init__(self, tasks, channels: int):
        super().__init__()
        self.tasks = list(tasks)
        self.attention = nn.ModuleDict(
            {from_key(t, a): GlobalContextAttention(channels) for t in self.tasks for a in self.tasks if a != t}
        )
        self.block = BasicBlock(2 * (len(self.tasks) - 1) * channels, channels)

    def sources(self, target: str) -> list:
        return [a for a in self.tasks if a != target]

    @staticmethod
    def block_input(feature: torch.Tensor, attended: dict) -> torch.Tensor:
        """The shared block's input for one target: [Y_t, GCA(t <- a)] for each source a in `attended`, the last
        source first (each new pair is prepended, as the implementation does)."""
        return torch.cat([piece for a in reversed(attended) for piece in (feature, attended[a])], dim=1)

    def forward(self, features: dict) -> dict:
        out = {}
        for t in self.tasks:
            attended = {a: self.attention[from_key(t, a)](features[t], features[a]) for a in self.sources(t)}
            out[t] = features[t] + self.block(self.block_input(features[t], attended))
        return out


class FeaturePropagation(nn.Module):
    """FPMA: one Swin block (4 heads) over all tasks' features, softmax over tasks per (interleaved) channel,
    a shared BasicBlock M*C -> C, then per-task squeeze-and-excitation and a residual."""

    def __init__(self, tasks, channels: int):
        super().__init__()
        self.tasks = list(tasks)
        m = len(self.tasks)
        self.attention = SwinLayer(m * channels, depth=1, heads=4)
        self.block = BasicBlock(m * channels, channels)
        self.excite = nn.ModuleDict({t: SqueezeExcitation(channels) for t in self.tasks})

    def task_weights(self, z: torch.Tensor) -> torch.Tensor:
        """Softmax over the M interleaved copies of each channel of the attended task stack z: [B, C, M, H, W]."""
        b, mc, h, w = z.shape
        m = len(self.tasks)
        return self.attention(z).view(b, mc // m, m, h, w).softmax(dim=2)

    def forward(self, features: dict) -> dict:
        z = torch.cat([features[t] for t in self.tasks], dim=1)
        b, mc, h, w = z.shape
        m = len(self.tasks)
        shared = self.block((self.task_weights(z) * z.view(b, mc // m, m, h, w)).view(b, mc, h, w))
        return {t: self.excite[t](shared) + features[t] for t in self.tasks}


CSAM_PAIRS = tuple((k, j) for k in range(3) for j in range(k + 1, 4))  # 0<-1, 0<-2, 0<-3, 1<-2, 1<-3, 2<-3
# the aggregation conv's input pieces in order, (scale k, source j): Y_k (j None) and S_k<-j per pair, then Y_3
AGGREGATION_INPUTS = tuple(piece for k, j in CSAM_PAIRS for piece in ((k, None), (k, j))) + ((3, None),)


class TaskHead(nn.Module):
    """CSAM (finer scales query all coarser ones) and the aggregation head of one task."""

    def __init__(self, widths, n_out: int):
        super().__init__()
        self.widths = tuple(widths)
        self.projection = nn.ModuleDict(
            {from_key(k, j): nn.Sequential(conv1x1(widths[j], widths[k]), nn.BatchNorm2d(widths[k]))
             for k, j in CSAM_PAIRS}
        )
        # one GCA per target scale, shared by all of that target's sources
        self.attention = nn.ModuleList(GlobalContextAttention(widths[k]) for k in range(3))
        channels = sum(widths[k] for k, _ in AGGREGATION_INPUTS)
        self.aggregate = nn.Sequential(OrderedDict(
            conv=conv1x1(channels, channels, bias=True), bn=nn.BatchNorm2d(channels), relu=nn.ReLU(),
            predict=conv1x1(channels, n_out, bias=True),
        ))

    @staticmethod
    def sources(target: int) -> list:
        """The coarser scales that scale `target` queries, in the aggregation's order."""
        return [j for k, j in CSAM_PAIRS if k == target]

    def forward(self, features: list) -> torch.Tensor:
        attended = {(k, j): self.attention[k](features[k], self.projection[from_key(k, j)](features[j]))
                    for k, j in CSAM_PAIRS}
        pieces = [features[k] if j is None else attended[k, j] for k, j in AGGREGATION_INPUTS]
        size = features[0].shape[-2:]
        pieces = [p if p.shape[-2:] == size else up(p, size) for p in pieces]
        return self.aggregate(torch.cat(pieces, dim=1))


def check_tasks(tasks) -> dict:
    if not isinstance(tasks, dict):
        raise TypeError(f"tasks must be a dict from task name to number of outputs, got {type(tasks).__name__}")
    unknown = [t for t in tasks if t not in KNOWN_TASKS]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; known tasks are {KNOWN_TASKS} "
                         f"(NYUD: {list(NYUD_TASKS)}, PASCAL: {list(PASCAL_TASKS)})")
    if len(tasks) < 2:
        raise ValueError(f"SCA-MTL needs at least 2 tasks for cross-task attention, got {list(tasks)}")
    for t, n in tasks.items():
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"tasks[{t!r}] must be a positive number of output channels, got {n!r}")
    return {t: tasks[t] for t in TASK_ORDER if t in tasks}


def check_widths(widths, n_tasks: int) -> tuple:
    widths = tuple(widths)
    if len(widths) != 4 or any(not isinstance(w, int) or w < 2 or w % 2 for w in widths):
        raise ValueError(f"widths must be 4 positive even ints (C_k = 2 x backbone channels), got {widths}")
    for w in widths:
        if (w // 2) % 6:
            raise ValueError(f"widths must be multiples of 12 (Swin's 6 heads split C_k/2 channels), got {widths}")
        if (n_tasks * w) % 4:
            raise ValueError(f"FPMA's 4 heads must split {n_tasks} x {w} channels; choose other widths")
    return widths


class SCAMTL(nn.Module):
    """Sequential cross attention multi-task network. forward(image [B,3,H,W]) returns
    {task: [B, n_out, H, W], "deep_supervision": {scale k: {task: [B, n_out, ceil(H/4/2^k), ceil(W/4/2^k)]}}}."""

    resize = staticmethod(up)

    def __init__(self, tasks: dict, widths=DEFAULT_WIDTHS, pretrained=False, fused: bool = False):
        super().__init__()
        self.tasks = check_tasks(tasks)
        self.widths = check_widths(widths, len(self.tasks))
        names = list(self.tasks)
        self.backbone = build_backbone(self.widths, pretrained)
        self.self_attention = nn.ModuleList(SwinLayer(w // 2, depth=2, heads=6) for w in self.widths)
        self.initial = nn.ModuleList(
            nn.ModuleDict({t: InitialPrediction(w if k == 3 else w + self.widths[k + 1], w, n)
                           for t, n in self.tasks.items()})
            for k, w in enumerate(self.widths)
        )
        self.cross_task = nn.ModuleList(CrossTaskAttention(names, w) for w in self.widths)
        # FPMA at scales 1..3 feeds scale k-1; index 0 stays unused (None) so that fpma[k] reads naturally
        self.propagation = nn.ModuleList(
            [nn.Identity()] + [FeaturePropagation(names, w) for w in self.widths[1:]]
        )
        self.heads = nn.ModuleDict({t: TaskHead(self.widths, n) for t, n in self.tasks.items()})
        # state dicts saved while some layers were nn.Sequential positions still load
        self.register_load_state_dict_pre_hook(upgrade_state_dict)
        self.fused = False
        self.set_fused(fused)

    def set_fused(self, flag: bool = True, backend: str = "auto", recompute: bool = True,
                  channels_last: bool | None = None) -> "SCAMTL":
        """Select the execution path; both paths share every parameter and buffer. `backend` picks the
        attention kernels of the fused path (see fused_mtl_attn.available_backends()). `recompute` lets the
        fused path recompute in backward what is large to store and cheap to compute (the backbone's stem and
        first stage, the Swin layers where their window attention runs eagerly, the CTAM projections of the larger
        maps) instead of saving it: same results and running statistics, much less memory, a little more compute.
        `channels_last` runs the fused path's convolutions in the channels-last layout (None: on CPU, on maps of at
        least model.fused.CHANNELS_LAST_MIN_POSITIONS positions, where oneDNN's 3x3 convolutions are faster in it;
        the coarsest maps and the GPU default stay NCHW)."""
        if backend != "auto" and backend not in BACKENDS:
            raise ValueError(f"backend must be one of {('auto',) + BACKENDS}, got {backend!r}")
        for name, value, allowed in (("flag", flag, (bool,)), ("recompute", recompute, (bool,)),
                                     ("channels_last", channels_last, (bool, type(None)))):
            if not isinstance(value, allowed):
                raise TypeError(f"set_fused: {name} must be {' or '.join(a.__name__ for a in allowed)}, "
                                f"got {value!r}")
        if flag or self.fused:  # the reference path never loads the fused one
            from .fused import select_path

            select_path(self, flag, backend, recompute)
        self.fused = flag
        self.backend = backend
        self.recompute = recompute
        self.channels_last = channels_last
        return self

    def _check_input(self, x):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"input must be an image tensor [B, 3, H, W], got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"input must have rank 4 [B, 3, H, W], got shape {tuple(x.shape)}")
        if x.shape[1] != 3:
            raise ValueError(f"input must have 3 channels (RGB) [B, 3, H, W], got {x.shape[1]} channels")
        if min(x.shape[-2:]) < 32:
            raise ValueError(f"input height and width must be at least 32 px, got {tuple(x.shape[-2:])}")
        if not x.is_floating_point():
            raise TypeError(f"input must be a floating tensor, got {x.dtype}")

    def encode(self, x: torch.Tensor) -> list:
        """Backbone maps fused with their self-attention: [ATT(F_k), F_k] per scale."""
        return self.attend_scales(self.backbone(x))

    def attend_scales(self, feats: list, run=lambda layer, f: layer(f)) -> list:
        """[ATT(F_k), F_k] per scale, each Swin layer called as run(layer, F_k)."""
        return [torch.cat([run(att, f), f], dim=1) for att, f in zip(self.self_attention, feats)]

    def scale_input(self, feature: torch.Tensor, propagated: torch.Tensor) -> torch.Tensor:
        """A finer scale's InitialPrediction input: [F_k, the coarser scale's propagated features resized to F_k]."""
        return torch.cat([feature, self.resize(propagated, feature.shape[-2:])], dim=1)

    def forward(self, x: torch.Tensor) -> dict:
        self._check_input(x)
        height, width = x.shape[-2:]
        # HRNet's branch fusion needs sizes divisible by 32: pad bottom/right, crop every output back
        pad_h, pad_w = (-height) % 32, (-width) % 32
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h))
        feats = self.encode(x)
        names = list(self.tasks)
        per_scale = [None] * 4
        supervision = {}
        propagated = None
        for k in range(3, -1, -1):
            task_features, supervision[k] = {}, {}
            for t in names:
                inp = feats[k]
                if k < 3:  # with the coarser scale's propagated features
                    inp = self.scale_input(inp, propagated[t])
                task_features[t], supervision[k][t] = self.initial[k][t](inp)
            per_scale[k] = self.cross_task[k](task_features)
            if k > 0:
                propagated = self.propagation[k](per_scale[k])
        out = {}
        for t in names:
            pred = self.heads[t]([per_scale[k][t] for k in range(4)])
            out[t] = self.resize(pred, x.shape[-2:])[..., :height, :width]
        # NCHW maps, as the reference hands back (a loss's log_softmax would copy channels-last ones)
        out["deep_supervision"] = {
            k: {t: p.contiguous()[..., : -(-height // STRIDES[k]), : -(-width // STRIDES[k])]
                for t, p in supervision[k].items()}
            for k in sorted(supervision)  # by key alone: torch 2.11's dynamo cannot sort (key, dict) pairs
        }
        return out


def build_model(tasks: dict, pretrained=False, fused: bool = False, widths=DEFAULT_WIDTHS) -> SCAMTL:
    """SCA-MTL for `tasks` ({name: n_outputs}, e.g. {"semseg": 40, "depth": 1}).

    The network orders the tasks as TASK_ORDER whatever the dict's order (the authors' order; model/authors.py).
    pretrained: False, or the path of a local HRNet-W18-small-v2 ImageNet file, the HRNet release's
    hrnet_w18_small_model_v2.pth or timm's hrnet_w18_small_v2 (True reads $FUSED_MTL_ATTN_HRNET_WEIGHTS).
    fused: run the fused kernels path (same parameters). widths: C_k per scale, default 36/72/144/288.
    """
    return SCAMTL(tasks, widths=widths, pretrained=pretrained, fused=fused)


PARAMETER_GROUPS = ("backbone", "self_attention", "initial", "cross_task", "propagation", "csam", "aggregation")


def parameter_counts(net: SCAMTL) -> dict:
    """Parameters per part of the network: backbone, Swin, initial heads, CTAM, FPMA, CSAM, aggregation."""
    counts = dict.fromkeys(PARAMETER_GROUPS, 0)
    for name, p in net.named_parameters():
        top = name.split(".")[0]
        if top == "heads":
            top = "aggregation" if ".aggregate." in name else "csam"
        counts[top] += p.numel()
    counts["total"] = sum(counts.values())
    return counts
