"""Oracles for the reference path's building blocks (model/modules.py) and decoder modules (model/network.py).

The fused path is tested against these modules, so a mistake shared by both paths would go unseen there. Here every
module is held, in float64 on small non-square maps, against an independent statement of its math
(docs/architecture.md, docs/attention-op.md):

- the Swin parts against timm's implementation with the same weights (relative position index, window attention
  with and without a mask, the shifted-window mask, a whole unpadded block with timm's MLP bypassed), and against a
  hand-written composition with explicit loops over windows (padding after the norm, roll, masks by region label,
  the relative position bias indexed from coordinates);
- everything else against hand-written formulas: convolutions as einsums, BatchNorm (running statistics in eval
  mode, batch statistics in train mode), the linear attention with explicit einsums, softplus (identity above 20)
  and the denominator's eps, bilinear resizing as interpolation matrices built from the align_corners=False rule,
  and the CTAM, FPMA and CSAM/aggregation compositions with their input orders written out literally.

Only the modules' parameters are read; no oracle calls a module's forward (timm aside). The tolerances are tight
(float64, 1e-10), so a mask with its windows or sides swapped, an input order changed or another eps fails.

timm's block rolls before it pads; the implementation (like the Swin detection code) pads after the norm and then
rolls, so the two differ on padded shifted maps: timm is the oracle at unpadded sizes, the composition at padded ones.
"""
import functools
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models import swin_transformer as timm_swin

from model.modules import (BasicBlock, GlobalContextAttention, SqueezeExcitation, SwinBlock, SwinLayer,
                           WindowAttention, _shift_mask)
from model.network import AGGREGATION_INPUTS, CSAM_PAIRS, CrossTaskAttention, FeaturePropagation, TaskHead

DT = torch.float64
TOL = dict(rtol=1e-10, atol=1e-10)


def close(got, want, **tol):
    assert got.shape == want.shape, (got.shape, want.shape)
    torch.testing.assert_close(got, want, **(tol or TOL))


def randomize_(module: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial normalisation parameters and running statistics, and a relative position bias table of order one
    (its std 0.02 initialisation would make an index error small, though still above the tolerance)."""
    g = torch.Generator().manual_seed(seed)

    def rand(t, lo, hi):
        return (lo + (hi - lo) * torch.rand(t.shape, generator=g, dtype=torch.float64)).to(t.dtype)

    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(rand(m.running_mean, -0.5, 0.5))
                m.running_var.copy_(rand(m.running_var, 0.5, 2.0))
                m.weight.copy_(rand(m.weight, 0.5, 1.5))
                m.bias.copy_(rand(m.bias, -0.3, 0.3))
            elif isinstance(m, nn.LayerNorm):
                m.weight.copy_(rand(m.weight, 0.5, 1.5))
                m.bias.copy_(rand(m.bias, -0.3, 0.3))
            elif isinstance(m, WindowAttention):
                m.relative_position_bias_table.copy_(rand(m.relative_position_bias_table, -1.0, 1.0))
    return module


def make(module: nn.Module, seed: int = 0, train: bool = False) -> nn.Module:
    return randomize_(module.to(DT), seed).train(train)


# ------------------------------------------------------------------------------------------ hand-written primitives


def conv1x1(x, conv):
    out = torch.einsum("oc,bchw->bohw", conv.weight[:, :, 0, 0], x)
    return out if conv.bias is None else out + conv.bias[None, :, None, None]


def conv3x3(x, conv):
    """Padding 1, stride 1: the sum over the 9 taps of shifted 1x1 products."""
    assert conv.bias is None and conv.kernel_size == (3, 3)
    _, _, h, w = x.shape
    xp = torch.zeros(x.shape[0], x.shape[1], h + 2, w + 2, dtype=x.dtype)
    xp[:, :, 1:-1, 1:-1] = x
    return sum(torch.einsum("oc,bchw->bohw", conv.weight[:, :, dy, dx], xp[:, :, dy:dy + h, dx:dx + w])
               for dy in range(3) for dx in range(3))


def batch_norm(x, bn, train):
    if train:  # batch statistics: mean and biased variance over batch and positions
        mean = x.mean(dim=(0, 2, 3))
        var = ((x - mean[None, :, None, None]) ** 2).mean(dim=(0, 2, 3))
    else:
        mean, var = bn.running_mean, bn.running_var
    def per_channel(t):
        return t[None, :, None, None]

    return (x - per_channel(mean)) / torch.sqrt(per_channel(var) + 1e-5) * per_channel(bn.weight) + per_channel(bn.bias)


def layer_norm(x, ln):
    mean = x.mean(dim=-1, keepdim=True)
    var = ((x - mean) ** 2).mean(dim=-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + 1e-5) * ln.weight + ln.bias


def relu(x):
    return torch.where(x > 0, x, torch.zeros_like(x))


def softplus(x):
    """log(1 + e^x), the identity strictly above 20 (attention-op.md)."""
    return torch.where(x > 20, x, torch.log1p(torch.exp(x.clamp(max=20))))


def bilinear_matrix(n_in, n_out):
    """[n_out, n_in]: PyTorch's bilinear rule with align_corners=False (source = (i + 0.5) n_in / n_out - 0.5,
    floored at 0; the upper neighbour clamped to the last row)."""
    m = torch.zeros(n_out, n_in, dtype=DT)
    for i in range(n_out):
        src = max((i + 0.5) * n_in / n_out - 0.5, 0.0)
        i0 = min(int(math.floor(src)), n_in - 1)
        i1 = min(i0 + 1, n_in - 1)
        frac = src - i0
        m[i, i0] += 1 - frac
        m[i, i1] += frac
    return m


def resize(x, size):
    rows, cols = bilinear_matrix(x.shape[-2], size[0]), bilinear_matrix(x.shape[-1], size[1])
    return torch.einsum("Hh,bchw,Ww->bcHW", rows, x, cols)


# ------------------------------------------------------------------------------------------ oracles of the modules


def basic_block(blk, x, train):
    out = relu(batch_norm(conv3x3(x, blk.conv1), blk.bn1, train))
    out = batch_norm(conv3x3(out, blk.conv2), blk.bn2, train)
    if x.shape[1] == blk.conv1.out_channels:
        assert blk.shortcut is None
        short = x
    else:
        short = batch_norm(conv1x1(x, blk.shortcut.conv1), blk.shortcut.bn1, train)
    return relu(out + short)


def squeeze_excitation(se, x):
    pooled = x.mean(dim=(2, 3))
    hidden = relu(pooled @ se.fc1.weight.T + se.fc1.bias)
    return x * torch.sigmoid(hidden @ se.fc2.weight.T + se.fc2.bias)[:, :, None, None]


def linear_attention(qp, kp, v):
    """attention-op.md: q = softplus(qp), k = softplus(kp), S = v k^T, z = sum_j k_j, out_p = S q_p / max(z.q_p, 1e-12).
    qp [B, d, Nq], kp [B, d, Nk], v [B, m, Nk] -> [B, m, Nq]."""
    q, k = softplus(qp), softplus(kp)
    s = torch.einsum("bmn,bdn->bmd", v, k)
    z = torch.einsum("bdn->bd", k)
    den = torch.einsum("bd,bdp->bp", z, q).clamp_min(1e-12)
    return torch.einsum("bmd,bdp->bmp", s, q) / den[:, None, :]


def gca(mod, query, source, train):
    """Q = BN(conv(ReLU(BN(conv(query))))), K likewise on the source, V = ReLU(BN(conv(source))), then the core."""
    b, c, h, w = query.shape
    qp = batch_norm(conv1x1(relu(batch_norm(conv1x1(query, mod.query.conv1), mod.query.bn1, train)),
                            mod.query.conv2), mod.query.bn2, train)
    kp = batch_norm(conv1x1(relu(batch_norm(conv1x1(source, mod.key.conv1), mod.key.bn1, train)),
                            mod.key.conv2), mod.key.bn2, train)
    v = relu(batch_norm(conv1x1(source, mod.value.conv1), mod.value.bn1, train))
    out = linear_attention(qp.reshape(b, c, h * w), kp.reshape(b, c, -1), v.reshape(b, c, -1))
    return out.reshape(b, c, h, w)


@functools.lru_cache(maxsize=None)
def relative_index(window):
    """Token i = (y_i, x_i) row-major in the window; index of (y_i - y_j, x_i - x_j) in the (2w-1)^2 table."""
    idx = torch.zeros(window * window, window * window, dtype=torch.long)
    for i in range(window * window):
        for j in range(window * window):
            dy, dx = i // window - j // window, i % window - j % window
            idx[i, j] = (dy + window - 1) * (2 * window - 1) + (dx + window - 1)
    return idx


def window_attention(attn, tokens, mask):
    """One window: tokens [L, C]; mask [L, L] (added to every head's logits) or None."""
    length, dim = tokens.shape
    heads = attn.heads
    hd = dim // heads
    wq, wk, wv = attn.qkv.weight.view(3, heads, hd, dim)
    bq, bk, bv = attn.qkv.bias.view(3, heads, hd)
    q = torch.einsum("lc,hec->hle", tokens, wq) + bq[:, None]
    k = torch.einsum("lc,hec->hle", tokens, wk) + bk[:, None]
    v = torch.einsum("lc,hec->hle", tokens, wv) + bv[:, None]
    window = int(round(math.sqrt(length)))
    bias = attn.relative_position_bias_table[relative_index(window)].permute(2, 0, 1)  # [heads, L, L]
    logits = torch.einsum("hie,hje->hij", q, k) / math.sqrt(hd) + bias
    if mask is not None:
        logits = logits + mask
    p = torch.exp(logits - logits.amax(dim=-1, keepdim=True))
    p = p / p.sum(dim=-1, keepdim=True)
    out = torch.einsum("hij,hje->ihe", p, v).reshape(length, dim)  # channels head-major
    return out @ attn.proj.weight.T + attn.proj.bias


def region(pos, size, window, shift):
    """Region of a coordinate of the rolled, padded map: the standard Swin cuts (0, -w), (-w, -s), (-s, end)."""
    return 0 if pos < size - window else (1 if pos < size - shift else 2)


def shift_mask(hp, wp, window, shift):
    """[n_windows, L, L], windows row-major: -100 between two tokens of a window whose regions differ, else 0."""
    masks = []
    for wy in range(hp // window):
        for wx in range(wp // window):
            labels = torch.tensor([3 * region(wy * window + i // window, hp, window, shift)
                                   + region(wx * window + i % window, wp, window, shift)
                                   for i in range(window * window)])
            masks.append(torch.where(labels[:, None] != labels[None, :], -100.0, 0.0).to(DT))
    return torch.stack(masks)


def swin_block(blk, x, height, width):
    """Eval mode: x + proj(attention(windows(roll(pad(LayerNorm(x)))))) rolled back and cropped; no MLP."""
    b, _, c = x.shape
    w, s = blk.window, blk.shift
    hp, wp = math.ceil(height / w) * w, math.ceil(width / w) * w
    padded = torch.zeros(b, hp, wp, c, dtype=x.dtype)
    padded[:, :height, :width] = layer_norm(x, blk.norm1).reshape(b, height, width, c)  # zeros after the norm
    rows, cols = (torch.arange(hp) + s) % hp, (torch.arange(wp) + s) % wp  # roll by -s: out[i] = in[i + s]
    rolled = padded[:, rows][:, :, cols]
    masks = shift_mask(hp, wp, w, s) if s else None
    attended = torch.zeros_like(rolled)
    for bi in range(b):
        for wy in range(hp // w):
            for wx in range(wp // w):
                tokens = rolled[bi, wy * w:(wy + 1) * w, wx * w:(wx + 1) * w].reshape(w * w, c)
                mask = None if masks is None else masks[wy * (wp // w) + wx]
                attended[bi, wy * w:(wy + 1) * w, wx * w:(wx + 1) * w] = (
                    window_attention(blk.attn, tokens, mask).reshape(w, w, c))
    back = attended[:, (torch.arange(hp) - s) % hp][:, :, (torch.arange(wp) - s) % wp]  # roll by +s
    return x + back[:, :height, :width].reshape(b, height * width, c)


def swin_layer(layer, x):
    """1x1 conv with bias, LayerNorm, the blocks (oracle above), LayerNorm; NCHW in and out."""
    b, c, h, w = x.shape
    tokens = layer_norm(conv1x1(x, layer.embed).reshape(b, c, h * w).transpose(1, 2), layer.embed_norm)
    for blk in layer.blocks:
        tokens = swin_block(blk, tokens, h, w)
    return layer_norm(tokens, layer.norm).transpose(1, 2).reshape(b, c, h, w)


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=DT)


# ------------------------------------------------------------------------------------------ Swin


@pytest.mark.parametrize("window", [7, 4, 3])
def test_relative_position_index_is_timms(window):
    ours = WindowAttention(12, 3, window).relative_position_index
    assert torch.equal(ours, timm_swin.get_relative_position_index(window, window))
    assert torch.equal(ours, relative_index(window))


def _timm_window_attention(ours):
    dim = ours.qkv.in_features
    theirs = timm_swin.WindowAttention(dim, ours.heads, window_size=ours.window).to(DT)
    theirs.load_state_dict(ours.state_dict())
    return theirs.eval()


@pytest.mark.parametrize("fused_attn", [False, True], ids=["timm-explicit", "timm-sdpa"])
@pytest.mark.parametrize("masked", [False, True], ids=["no-mask", "shift-mask"])
def test_window_attention_matches_timm(masked, fused_attn):
    ours = make(WindowAttention(12, 4, 7))
    theirs = _timm_window_attention(ours)
    theirs.fused_attn = fused_attn
    hp, wp = 14, 21  # 6 windows, batch 2
    x = rand(2 * (hp // 7) * (wp // 7), 49, 12)
    mask = shift_mask(hp, wp, 7, 3) if masked else None
    want = theirs(x, mask)
    close(ours(x, mask), want)
    # the hand-written single-window oracle agrees too (windows b-major: window index = row % n_windows)
    hand = torch.stack([window_attention(ours, x[i], None if mask is None else mask[i % mask.shape[0]])
                        for i in range(x.shape[0])])
    close(hand, want)
    if masked:  # the mask is not a no-op here
        assert (ours(x, None) - want).abs().max() > 1e-3


@pytest.mark.parametrize("hp, wp, window, shift", [(14, 14, 7, 3), (14, 21, 7, 3), (21, 14, 7, 3), (7, 14, 7, 3),
                                                   (8, 12, 4, 2), (12, 8, 4, 1)])
def test_shift_mask_is_timms(hp, wp, window, shift):
    # timm's block builds its mask for the (padded) input resolution; always_partition keeps the shift even where
    # a side equals the window (timm would otherwise turn the shift off; the implementation does not)
    blk = timm_swin.SwinTransformerBlock(8, (hp, wp), num_heads=2, window_size=window, shift_size=shift,
                                         always_partition=True, mlp_ratio=1.0)
    want = blk.get_attn_mask(torch.zeros(1, hp, wp, 1, dtype=DT))
    got = _shift_mask(hp, wp, window, shift, "cpu")
    assert got.shape == want.shape == (hp // window * (wp // window), window * window, window * window)
    close(got.to(DT), want, rtol=0, atol=0)
    close(got.to(DT), shift_mask(hp, wp, window, shift), rtol=0, atol=0)
    assert (want != 0).any()


class _NoMlp(nn.Module):
    def forward(self, x):
        return torch.zeros_like(x)


@pytest.mark.parametrize("shift", [0, 3])
def test_swin_block_matches_timm_block_without_mlp(shift):
    """At a size that needs no padding, our block is timm's block with the MLP branch removed."""
    height, width = 14, 21
    ours = make(SwinBlock(12, 6, 7, shift=shift, drop_path=0.2))
    theirs = timm_swin.SwinTransformerBlock(12, (height, width), num_heads=6, window_size=7, shift_size=shift,
                                            mlp_ratio=1.0).to(DT)
    missing, unexpected = theirs.load_state_dict(ours.state_dict(), strict=False)
    assert not unexpected and all(k.startswith(("norm2.", "mlp.")) for k in missing)
    theirs.mlp = _NoMlp()
    theirs.eval()
    x = rand(2, height * width, 12)
    want = theirs(x.view(2, height, width, 12)).reshape(2, height * width, 12)
    close(ours(x, height, width), want)
    close(swin_block(ours, x, height, width), want)


@pytest.mark.parametrize("shift", [0, 3])
@pytest.mark.parametrize("height, width", [(9, 11), (16, 10)])
def test_swin_block_matches_composition(height, width, shift):
    """Padded sizes: LayerNorm, zero pad after the norm, roll, windows, attention + bias + mask, reverse, roll back,
    crop, residual. Drop path (rate 0.5 here) is the identity in eval mode."""
    blk = make(SwinBlock(12, 6, 7, shift=shift, drop_path=0.5))
    x = rand(2, height * width, 12)
    close(blk(x, height, width), swin_block(blk, x, height, width))


def test_swin_block_drop_path_in_train_mode():
    """Train mode: each sample's attention branch is dropped or scaled by 1 / keep probability."""
    height, width, batch = 9, 11, 8
    blk = make(SwinBlock(12, 6, 7, shift=3, drop_path=0.5), train=True)
    x = rand(batch, height * width, 12)
    torch.manual_seed(3)
    got = blk(x, height, width)
    branch = swin_block(blk, x, height, width) - x
    kept = []
    for i in range(batch):
        if torch.allclose(got[i], x[i], rtol=0, atol=0):
            kept.append(False)
        else:
            close(got[i], x[i] + branch[i] / 0.5)
            kept.append(True)
    assert any(kept) and not all(kept), kept


@pytest.mark.parametrize("height, width", [(9, 11), (5, 16)])
def test_swin_layer_matches_composition(height, width):
    """The encoder's self-attention layer: depth 2 (block 1 shifted by 3), 6 heads, window 7, eval mode."""
    layer = make(SwinLayer(12, depth=2, heads=6))
    assert [blk.shift for blk in layer.blocks] == [0, 3]
    assert [blk.attn.heads for blk in layer.blocks] == [6, 6]
    assert isinstance(layer.blocks[0].drop_path, nn.Identity)
    assert layer.blocks[1].drop_path.drop_prob == pytest.approx(0.2)
    x = rand(2, 12, height, width)
    close(layer(x), swin_layer(layer, x))


# ------------------------------------------------------------------------------------------ SE, BasicBlock, GCA


def test_squeeze_excitation_matches_formula():
    se = make(SqueezeExcitation(48))
    assert (se.fc1.in_features, se.fc1.out_features, se.fc2.out_features) == (48, 3, 48)
    x = rand(3, 48, 5, 7)
    close(se(x), squeeze_excitation(se, x))
    # the reduction floors at one unit
    assert SqueezeExcitation(12).fc1.out_features == 1


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("cin, cout", [(10, 6), (6, 6)])
def test_basic_block_matches_formula(cin, cout, train):
    blk = make(BasicBlock(cin, cout), train=train)
    x = rand(2, cin, 5, 7)
    close(blk(x), basic_block(blk, x, train))


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_gca_matches_formula(train):
    """Non-square query, a source of another (non-square) size; BatchNorm eval (random running statistics) or train
    (batch statistics, and the running statistics updated once per call)."""
    mod = make(GlobalContextAttention(6), train=train)
    query, source = rand(2, 6, 4, 7, seed=1), rand(2, 6, 3, 5, seed=2)
    before = {n: b.clone() for n, b in mod.named_buffers() if b.is_floating_point()}
    got = mod(query, source)
    close(got, gca(mod, query, source, train))
    assert got.shape == (2, 6, 4, 7)
    if train:  # one update: running = 0.9 running + 0.1 batch (unbiased variance)
        h = conv1x1(query, mod.query.conv1)
        mean, var = h.mean(dim=(0, 2, 3)), h.var(dim=(0, 2, 3), unbiased=True)
        close(mod.query.bn1.running_mean, 0.9 * before["query.bn1.running_mean"] + 0.1 * mean)
        close(mod.query.bn1.running_var, 0.9 * before["query.bn1.running_var"] + 0.1 * var)
    assert got.abs().max() > 1e-3  # not a trivially small output


def test_gca_denominator_eps():
    """Query logits near -40 (softplus ~ 4e-18) make z . q ~ 1e-16: the denominator is clamped at exactly 1e-12. The
    check is relative (atol 0): another eps, or no clamp, changes the output by orders of magnitude."""
    mod = make(GlobalContextAttention(6))
    with torch.no_grad():
        mod.query.bn2.bias.fill_(-40.0)
        mod.query.bn2.weight.fill_(0.1)
    query, source = rand(2, 6, 4, 7, seed=1), rand(2, 6, 3, 5, seed=2)
    got = mod(query, source)
    want = gca(mod, query, source, False)
    assert want.abs().max() > 0
    close(got, want, rtol=1e-10, atol=0)
    # the clamp is active: dividing by z . q instead would give values of order one
    b, c = 2, 6
    qp = batch_norm(conv1x1(relu(batch_norm(conv1x1(query, mod.query.conv1), mod.query.bn1, False)),
                            mod.query.conv2), mod.query.bn2, False).reshape(b, c, -1)
    kp = batch_norm(conv1x1(relu(batch_norm(conv1x1(source, mod.key.conv1), mod.key.bn1, False)),
                            mod.key.conv2), mod.key.bn2, False).reshape(b, c, -1)
    den = torch.einsum("bd,bdp->bp", softplus(kp).sum(-1), softplus(qp))
    assert den.max() < 1e-13


def test_gca_large_logits():
    """Query logits around 25, in softplus's linear regime (above its threshold 20): still the formula."""
    mod = make(GlobalContextAttention(6))
    with torch.no_grad():
        mod.query.bn2.bias.fill_(25.0)
        mod.query.bn2.weight.fill_(0.5)
    query, source = rand(2, 6, 4, 7, seed=1), rand(2, 6, 3, 5, seed=2)
    close(mod(query, source), gca(mod, query, source, False))


# ------------------------------------------------------------------------------------------ CTAM, FPMA, heads

TASKS3 = ("semseg", "depth", "normals")


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_ctam_matches_composition(train):
    """For target t: [Y_t, GCA(t <- a)] per source a, the LAST source in task order first, into the one shared
    BasicBlock, plus Y_t."""
    c = 6
    mod = make(CrossTaskAttention(TASKS3, c), train=train)
    assert sorted(mod.attention) == sorted(["semseg_from_depth", "semseg_from_normals", "depth_from_semseg",
                                            "depth_from_normals", "normals_from_semseg", "normals_from_depth"])
    assert mod.block.conv1.in_channels == 2 * 2 * c and mod.block.conv1.out_channels == c
    features = {t: rand(2, c, 4, 7, seed=i) for i, t in enumerate(TASKS3)}
    block_sources = {"semseg": ["normals", "depth"], "depth": ["normals", "semseg"], "normals": ["depth", "semseg"]}
    want = {}
    for t in TASKS3:
        y = features[t]
        pieces = []
        for a in block_sources[t]:
            pieces += [y, gca(mod.attention[f"{t}_from_{a}"], y, features[a], train)]
        want[t] = y + basic_block(mod.block, torch.cat(pieces, dim=1), train)
    got = mod(features)
    assert list(got) == list(TASKS3)
    for t in TASKS3:
        close(got[t], want[t])


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_fpma_matches_composition(train):
    """Z = cat_t Y_t; Swin over Z (1 unshifted block, 4 heads); weights = softmax over the M copies of channel i, at
    Z's channels i*M + t; the shared BasicBlock on weights * Z; per task SE + Y_t."""
    c, m = 12, len(TASKS3)
    mod = make(FeaturePropagation(TASKS3, c), train=train)
    layer = mod.attention
    assert len(layer.blocks) == 1 and layer.blocks[0].shift == 0 and layer.blocks[0].attn.heads == 4
    assert layer.blocks[0].window == 7 and isinstance(layer.blocks[0].drop_path, nn.Identity)
    height, width = 6, 10
    features = {t: rand(2, c, height, width, seed=i) for i, t in enumerate(TASKS3)}
    z = torch.cat([features[t] for t in TASKS3], dim=1)
    logits = swin_layer(layer, z)
    weighted = torch.zeros_like(z)
    for i in range(c):
        copies = [i * m + t for t in range(m)]  # the M interleaved copies of channel i
        e = torch.exp(logits[:, copies] - logits[:, copies].amax(dim=1, keepdim=True))
        weighted[:, copies] = e / e.sum(dim=1, keepdim=True) * z[:, copies]
    shared = basic_block(mod.block, weighted, train)
    got = mod(features)
    assert list(got) == list(TASKS3)
    for t in TASKS3:
        close(got[t], squeeze_excitation(mod.excite[t], shared) + features[t])


def test_csam_pairs_and_aggregation_order():
    assert CSAM_PAIRS == ((0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3))
    assert AGGREGATION_INPUTS == ((0, None), (0, 1), (0, None), (0, 2), (0, None), (0, 3), (1, None), (1, 2),
                                  (1, None), (1, 3), (2, None), (2, 3), (3, None))


def test_bilinear_matrices_are_interpolate():
    """The oracle's own resize against F.interpolate (align_corners=False), non-square and both directions."""
    x = rand(2, 3, 3, 5)
    for size in [(12, 20), (7, 4), (2, 3), (3, 5)]:
        close(resize(x, size), F.interpolate(x, size=size, mode="bilinear", align_corners=False), rtol=0, atol=1e-14)


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_task_head_matches_composition(train):
    """CSAM: per pair (k <- j), S = GCA_k(Y_k, BN(conv1x1(Y_j))) at scale k's size; pieces [Y_k, S_k<-j] in pair
    order then Y_3, each resized (bilinear, align_corners=False) to scale 0's NON-SQUARE size; then 1x1 conv with
    bias, BN, ReLU, 1x1 conv with bias."""
    widths, n_out = (6, 8, 10, 12), 3
    sizes = [(12, 20), (6, 10), (3, 5), (2, 3)]
    head = make(TaskHead(widths, n_out), train=train)
    features = [rand(2, widths[k], *sizes[k], seed=k) for k in range(4)]
    attended = {}
    for k, j in [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]:
        proj = head.projection[f"{k}_from_{j}"]
        source = batch_norm(conv1x1(features[j], proj[0]), proj[1], train)
        assert source.shape[-2:] == sizes[j]  # projected at the source's own resolution
        attended[k, j] = gca(head.attention[k], features[k], source, train)
        assert attended[k, j].shape[-2:] == sizes[k]
    y0, y1, y2, y3 = features
    pieces = [y0, attended[0, 1], y0, attended[0, 2], y0, attended[0, 3],
              y1, attended[1, 2], y1, attended[1, 3], y2, attended[2, 3], y3]
    cat = torch.cat([p if p.shape[-2:] == sizes[0] else resize(p, sizes[0]) for p in pieces], dim=1)
    assert cat.shape[1] == 2 * (3 * 6 + 2 * 8 + 10) + 12 == head.aggregate.conv.in_channels
    hidden = relu(batch_norm(conv1x1(cat, head.aggregate.conv), head.aggregate.bn, train))
    want = conv1x1(hidden, head.aggregate.predict)
    got = head(features)
    assert got.shape == (2, n_out, *sizes[0])
    close(got, want)
