"""The fused execution path of SCA-MTL: a subclass per reference module that computes the same function from the
same parameters in fewer, larger operations, with the fused attention ops of `fused_mtl_attn`. A fused class only
overrides methods, so `SCAMTL.set_fused` swaps it in and out in place (`select_path`) and every parameter, buffer
and state-dict key stays as it is. Each override reads its module's named layers and, where the order matters
(CTAM's block input, the aggregation's input pieces), the reference class's own definition of it.

- Encoder: optionally recomputed in backward (activation checkpointing: the stem, and the Swin layers where their
  window attention runs eagerly); on CPU the network runs channels-last, but for its coarsest maps.
- CTAM: the projections of all ordered pairs run as a few grouped products (fused_ops.conv1x1_stacked), one
  `cross_task_attention` call attends every pair, and the shared BasicBlock runs for all targets at once, reading
  each target's feature once (the weight columns of its repeated copies summed).
- FPMA: the reference computation, kept in the input's memory layout.
- Swin blocks (the encoder's self-attention and FPMA's): each block's window attention in one fused op that reads
  q, k, v from the qkv Linear's output and stores no per-head [L, L] map (fused_mtl_attn.window_attention); on CPUs
  where oneDNN outpaces MKL, the large Linear products as 1x1 convolutions (fused_ops.linear).
- CSAM: the query projection runs once per target scale, the sources are gathered along positions and attended by
  one `cross_scale_attention` call.
- Aggregation: the 1x1 conv commutes with bilinear upsampling, so it runs per scale at the scale's own resolution
  with the weights of the repeated Y_k copies summed; BN-ReLU-conv runs by blocks of channels, so no 1080-channel
  full-resolution concatenation exists (fused_ops._Aggregation; on CPUs other than Intel's channels-last blocks and
  1x1 convolutions, fused_ops._AggregationChannelsLast).
BatchNorm sees the same statistics as each reference call and updates running statistics call by call; in training
on CPU, large channels-last maps go to the extension's channels-last kernel
(fused_ops.CHANNELS_LAST_BATCH_NORM_MIN_ROWS) and the CTAM projections' BatchNorm (+ ReLU) to its [B, C, N] kernel.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from fused_mtl_attn import cross_scale_attention, cross_task_attention, window_attention
from fused_mtl_attn.backends import cpu_kernels_run

from . import fused_ops
from .fused_ops import (batch_norm_per_sample_group, batch_norm_repeated, batch_norm_segments, batch_norm_stacked,
                        blocked_aggregation, channels_last_kernel_runs, conv1x1_stacked, is_channels_last, linear,
                        recompute_in_backward, upsample)
from .modules import GlobalContextAttention, WindowAttention, from_key
from .network import AGGREGATION_INPUTS, SCAMTL, CrossTaskAttention, FeaturePropagation, TaskHead


def hrnet_features(net, x: torch.Tensor, run_stem) -> list:
    """timm's HRNet feature forward, with the stem and first stage run through `run_stem(fn, x)`."""
    def stem(x):
        x = net.act1(net.bn1(net.conv1(x)))
        return net.layer1(net.act2(net.bn2(net.conv2(x))))

    x = run_stem(stem, x)
    branches = [t(x) for t in net.transition1]
    branches = net.stage2(branches)
    for transition, stage in ((net.transition2, net.stage3), (net.transition3, net.stage4)):
        branches = stage([branches[i] if isinstance(t, nn.Identity) else t(branches[-1])
                          for i, t in enumerate(transition)])
    return branches


# On CPU, oneDNN's channels-last 3x3 convolutions are 1.2-2.5x faster (forward + backward) than NCHW ones on the
# network's maps from 64x80 down to 32x40, on a par at 16x20, and slower on the coarsest ones: at 8x10 a 288-channel
# conv takes 1.3-2x as long, the 1/32 scale's decoder (InitialPrediction, CTAM, FPMA) 1.2-1.3x (Xeon, AVX-512; with
# AVX2 code paths 1.1-1.2x). So by default a scale's maps run channels-last from this many positions on, NCHW below.
CHANNELS_LAST_MIN_POSITIONS = 256


class FusedSCAMTL(SCAMTL):
    """The network's own steps: the memory layout of each scale's maps, the encoder's recomputation, the faster
    resize."""

    resize = staticmethod(upsample)  # the same bilinear map as F.interpolate, faster on CPU

    def layout(self, x: torch.Tensor) -> torch.memory_format:
        """The memory layout the convolutions on maps like x run in (they follow their input's): `channels_last`
        if set, else channels-last on CPU for maps of at least CHANNELS_LAST_MIN_POSITIONS positions."""
        if self.channels_last is not None:
            channels_last = self.channels_last
        else:
            positions = x.shape[-2] * x.shape[-1]
            channels_last = fused_ops.cpu_tuned(x.device) and positions >= CHANNELS_LAST_MIN_POSITIONS
        return torch.channels_last if channels_last else torch.contiguous_format

    def encode(self, x: torch.Tensor) -> list:
        feats = self._encode(x.contiguous(memory_format=self.layout(x)))
        return [f.contiguous(memory_format=self.layout(f)) for f in feats]

    def scale_input(self, feature: torch.Tensor, propagated: torch.Tensor) -> torch.Tensor:
        up = self.resize(propagated, feature.shape[-2:])
        return torch.cat([feature, up.contiguous(memory_format=self.layout(feature))], dim=1)

    def _encode(self, x: torch.Tensor) -> list:
        if not (self.recompute and torch.is_grad_enabled()):
            return super().encode(x)
        # the stem and first stage hold the backbone's largest activations (64-256 channels at strides 2-4)
        # for a small share of its compute: recompute those, keep the rest
        feats = hrnet_features(self.backbone, x,
                               lambda stem, x: recompute_in_backward(stem, x, modules=(self.backbone,)))
        if cpu_kernels_run(x):  # the fused window attention stores no [L, L] maps: little left to save
            return self.attend_scales(feats, lambda att, f: att(f))
        # the eager window attention stores every head's [L, L] logits and probabilities: recompute the Swin layers
        return self.attend_scales(feats, lambda att, f: recompute_in_backward(att, f, modules=()))


def _projections_stacked(x: torch.Tensor, projections: list, groups: int) -> torch.Tensor:
    """Many Projections at once on x [B, groups*C, H, W]: stage by stage, every projection's conv as one grouped
    1x1 convolution (group g of x feeds its share of `projections`, listed group by group; later stages are grouped
    by projection) and its BatchNorm over the stacked channels, each with its own parameters and statistics."""
    for stage in zip(*(p.stages() for p in projections)):
        convs, norms, relus = zip(*stage)
        y = conv1x1_stacked(x, convs, groups)
        x = batch_norm_stacked(y.flatten(2), norms, relu=relus[0]).view(y.shape)  # as [B, C, N]: the kernels' layout
        groups = len(projections)
    return x


# CTAM's pair projections store about ten activations of every pair's size for backward: with `recompute`, maps of
# at least this many positions recompute them in backward instead. Below it they are kept: at 256x256 with PASCAL's
# 5 tasks (20 pairs), batch 2, the 1/16 and 1/32 scales' 102 MiB (the step's saved activations 0.49 -> 0.55 of the
# reference's) against 19 ms each of recomputation per step (Zen 5, AVX-512); keeping the 1/8 scale's too would
# take 0.59 for 26 ms more.
RECOMPUTE_PROJECTIONS_MIN_POSITIONS = 1024


class FusedCrossTaskAttention(CrossTaskAttention):
    """CTAM at one scale with every ordered pair in one `cross_task_attention` call. With `recompute`, the pair
    projections (cheap grouped products, but ten activations of every pair's size) are recomputed in backward on
    maps of at least RECOMPUTE_PROJECTIONS_MIN_POSITIONS positions."""

    def pair_projections(self, x: torch.Tensor, by_source: list):
        """q, k, v [B, P, C, N] of every ordered pair (in `by_source` order) from the task-stacked x [B, M*C, H, W]:
        the first convs grouped by the task they read (target for q, source for k and v), the rest by pair."""
        m, n_pairs = len(self.tasks), len(by_source)
        b, mc, h, w = x.shape
        by_target = [(t, a) for t in self.tasks for a in self.sources(t)]
        gca = {pair: self.attention[from_key(*pair)] for pair in by_target}
        q = _projections_stacked(x, [gca[pair].query for pair in by_target], m)
        # reordered by unbind and stack, not index_select: no index tensor copied to the device on every call (a
        # host sync on a GPU), a backward without index_add's atomics; and not by slices, whose backward fills and
        # adds a zero tensor of q's full size per pair
        per_pair = q.view(b, n_pairs, mc // m, h * w).unbind(1)
        q = torch.stack([per_pair[by_target.index(pair)] for pair in by_source], dim=1)
        k = _projections_stacked(x, [gca[pair].key for pair in by_source], m)
        v = _projections_stacked(x, [gca[pair].value for pair in by_source], m)
        return q, k.view(q.shape), v.view(q.shape)

    def forward(self, features: dict) -> dict:
        tasks = self.tasks
        m = len(tasks)
        x = torch.cat([features[t] for t in tasks], dim=1)  # task-stacked [B, M*C, H, W]
        b, mc, h, w = x.shape
        c = mc // m
        # pairs in "by source" order: the source-side projections then come out of the grouped products in that order
        by_source = [(t, a) for a in tasks for t in self.sources(a)]
        project = lambda x: self.pair_projections(x, by_source)  # noqa: E731
        recompute = self.recompute and torch.is_grad_enabled() and h * w >= RECOMPUTE_PROJECTIONS_MIN_POSITIONS
        q, k, v = recompute_in_backward(project, x, modules=(self.attention,)) if recompute else project(x)
        attended = cross_task_attention(q, k, v, backend=self.backend)
        if is_channels_last(x):  # lay the pairs out [B, H, W, P, C] so that the block's input stays channels-last
            attended = attended.permute(0, 3, 1, 2).contiguous().view(b, h, w, -1, c).permute(0, 3, 4, 1, 2)
        else:
            attended = attended.view(b, -1, c, h, w)
        # the shared block's input, targets stacked along the batch axis: [M*B, M*C, H, W], Y_t once (its repeated
        # copies' weights summed) and the pairs in the reference's order
        per_pair = attended.unbind(1)  # (one backward for all pairs, as above)
        inputs = [torch.cat([features[t]] + [per_pair[by_source.index((t, a))] for a in self.block_pieces[t]
                                              if a is not None], dim=1)
                  for t in tasks]
        # one block call for all targets, each BatchNorm taking one reference call's statistics per target
        out = torch.func.functional_call(self.block, self.block_weights(), (torch.cat(inputs, dim=0),),
                                         {"norm": lambda bn, y: batch_norm_per_sample_group(y, bn, m)})
        return {t: features[t] + part for t, part in zip(tasks, out.chunk(m))}  # (chunk: one backward, as above)

    def prepare(self) -> None:
        """Read the order of the block input's C-channel pieces from the reference's own `block_input` (each piece
        marked by a number): per target, `block_pieces`, None for Y_t, else the source task, as the reference
        concatenates them."""
        self.block_pieces = {}
        for t in self.tasks:
            sources = self.sources(t)
            marks = self.block_input(torch.full((1, 1), -1.0), {a: torch.full((1, 1), float(i))
                                                                  for i, a in enumerate(sources)})
            self.block_pieces[t] = [None if i < 0 else sources[int(i)] for i in marks[0].tolist()]

    def block_weights(self) -> dict:
        """The shared block's input-side weights (conv1's, the shortcut's) for its input [Y_t, the pairs]: the columns
        of the repeated Y_t pieces summed, since Y_t convolved M-1 times with their columns is one convolution
        with their sum (3/8 fewer input channels with 5 tasks, none fewer with 2)."""
        pieces = self.block_pieces[self.tasks[0]]  # the same order for every target (one shared block)
        weights = {}
        for name in ("conv1.weight", "shortcut.conv1.weight"):
            columns = self.block.get_parameter(name).chunk(len(pieces), dim=1)
            own = [w for w, piece in zip(columns, pieces) if piece is None]
            pairs = [w for w, piece in zip(columns, pieces) if piece is not None]
            weights[name] = torch.cat([sum(own[1:], own[0])] + pairs, dim=1)
        return weights


class FusedFeaturePropagation(FeaturePropagation):
    """FPMA keeping a channels-last input channels-last throughout: the reference's softmax over a [B, C, M, H, W]
    view would return an NCHW tensor, and every later convolution would follow it."""

    def task_weights(self, z: torch.Tensor) -> torch.Tensor:
        if not is_channels_last(z):
            return super().task_weights(z)
        b, mc, h, w = z.shape
        m = len(self.tasks)
        # the same softmax in z's [B, H, W, C] memory order
        scores = self.attention(z).permute(0, 2, 3, 1).reshape(b, h, w, mc // m, m)
        # a softmax over a last axis of M (2-5) elements goes row by row (4-7x slower on CPU): take it over the
        # middle axis of a [B, H, W, M, C] copy, vectorised along C, and copy back
        weights = scores.transpose(-1, -2).contiguous().softmax(dim=-2).transpose(-1, -2).contiguous()
        return weights.permute(0, 3, 4, 1, 2)


class FusedLinear(nn.Linear):
    """nn.Linear whose large products run as oneDNN 1x1 convolutions on CPUs where oneDNN outpaces MKL
    (fused_ops.linear: the Swin blocks' qkv and proj)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


class FusedBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d that, in training on a large channels-last CPU map, runs the extension's channels-last kernel
    (through `batch_norm_stacked`: the same function and running statistics) instead of PyTorch's slower one."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        if self.training and self.track_running_stats and channels_last_kernel_runs(x, self.weight, self.bias):
            return batch_norm_stacked(x, [self])
        return super().forward(x)


class FusedWindowAttention(WindowAttention):
    """Window attention in one `window_attention` call (the reference's head split, logits, bias, mask, softmax and
    product fused)."""

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        out = window_attention(self.qkv(x), self.position_bias(), mask, heads=self.heads, scale=self.scale)
        return self.proj(out)


class FusedGlobalContextAttention(GlobalContextAttention):
    """GCA that attends several sources in one `cross_scale_attention` call (CSAM)."""

    def attend_sources(self, query: torch.Tensor, sources: list) -> torch.Tensor:
        """[B, J, C, H, W]: the reference's forward(query, s) for each of the J sources, in order. The query is
        projected once (its BatchNorm counted as the J reference calls); the sources are gathered along positions
        and projected once, every BatchNorm called once per source."""
        b, c, h, w = query.shape
        calls = len(sources)
        q = self.query(query, norm=lambda bn, x: batch_norm_repeated(x, bn, calls)).flatten(2)
        offsets = [0]
        for s in sources:
            offsets.append(offsets[-1] + s.shape[-2] * s.shape[-1])
        gathered = torch.cat([s.flatten(2) for s in sources], dim=-1).unsqueeze(2)  # [B, C, 1, N_total]
        per_source = lambda bn, x: batch_norm_segments(x, bn, offsets)  # noqa: E731
        k = self.key(gathered, norm=per_source).flatten(2)
        v = self.value(gathered, norm=per_source).flatten(2)
        return cross_scale_attention(q, k, v, offsets, backend=self.backend).view(b, calls, c, h, w)


class FusedTaskHead(TaskHead):
    """CSAM with one attention call per target scale, and the aggregation computed per scale by blocks of channels
    (no full-resolution concatenation of the pieces)."""

    def aggregation_weights(self) -> list:
        """The aggregation conv's weight split by input piece and regrouped per scale k as [W(Y_k), W(S_k<-j)...]
        (as `sources(k)`): the repeated Y_k pieces' weights summed, since up(x) repeated is the same map."""
        # split, not sliced: one backward for all pieces (each slice's would fill and add a zero weight-sized tensor)
        pieces = self.aggregate.conv.weight.flatten(1).split([self.widths[k] for k, _ in AGGREGATION_INPUTS], dim=1)
        per_scale = [{} for _ in range(4)]  # source j (None for Y_k) -> weight columns
        for (k, j), columns in zip(AGGREGATION_INPUTS, pieces):
            per_scale[k][j] = per_scale[k][j] + columns if j in per_scale[k] else columns
        return [torch.cat([ws[None]] + [ws[j] for j in self.sources(k)], dim=1) for k, ws in enumerate(per_scale)]

    def forward(self, features: list) -> torch.Tensor:
        xs = []
        for k, y in enumerate(features):
            if self.sources(k):
                projected = [self.projection[from_key(k, j)](features[j]) for j in self.sources(k)]
                y = torch.cat([y, self.attention[k].attend_sources(y, projected).flatten(1, 2)], dim=1)
            xs.append(y)
        return blocked_aggregation(xs, self.aggregation_weights(), self.aggregate.conv.bias, self.aggregate.bn,
                                   self.aggregate.predict)


FUSED = {SCAMTL: FusedSCAMTL, CrossTaskAttention: FusedCrossTaskAttention, FeaturePropagation: FusedFeaturePropagation,
         GlobalContextAttention: FusedGlobalContextAttention, TaskHead: FusedTaskHead,
         WindowAttention: FusedWindowAttention, nn.BatchNorm2d: FusedBatchNorm2d, nn.Linear: FusedLinear}
REFERENCE = {fused: reference for reference, fused in FUSED.items()}


def select_path(net: SCAMTL, fused: bool, backend: str, recompute: bool) -> None:
    """Give every module of `net` that has a fused class that class (or its reference class back), in place, with
    the options its fused methods read."""
    for module in net.modules():
        reference = REFERENCE.get(type(module), type(module))
        if reference in FUSED:
            module.__class__ = FUSED[reference] if fused else reference
            if fused:
                module.backend, module.recompute = backend, recompute
                if hasattr(module, "prepare"):
                    module.prepare()
