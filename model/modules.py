"""Building blocks of SCA-MTL (docs/architecture.md): BasicBlock, squeeze-and-excitation, the Swin
self-attention layer without MLP, and the global-context attention (GCA) block of CTAM and CSAM.

Each BatchNorm is applied through `norm(bn, x)` where the fused path needs other statistics than one call's; the
layers once held in nn.Sequential positions are named (model/keys.py maps the old keys)."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, trunc_normal_

from fused_mtl_attn import reference


def from_key(target, source) -> str:
    """Key of the module through which `target` reads `source`: a CTAM pair of tasks or a CSAM pair of scales."""
    return f"{target}_from_{source}"


def conv1x1(cin: int, cout: int, bias: bool = False) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=1, bias=bias)


def own_statistics(bn: nn.BatchNorm2d, x: torch.Tensor) -> torch.Tensor:
    """The default `norm(bn, x)` of the blocks below: the BatchNorm's own call. The fused path passes one that
    gives several reference calls' statistics in one pass (model/fused.py)."""
    return bn(x)


class Projection(nn.Module):
    """1x1 convolutions without bias, each followed by BatchNorm and, where `relu` says so, ReLU: GCA's query and
    key (conv1-bn1-ReLU-conv2-bn2), its value (conv1-bn1-ReLU) and BasicBlock's projection shortcut (conv1-bn1)."""

    def __init__(self, cin: int, cout: int, relu=(False,)):
        super().__init__()
        self.relu = tuple(relu)
        for i in range(1, len(self.relu) + 1):
            self.add_module(f"conv{i}", conv1x1(cin if i == 1 else cout, cout))
            self.add_module(f"bn{i}", nn.BatchNorm2d(cout))

    def stages(self) -> list:
        """(conv, BatchNorm, ReLU after it) in order; the fused CTAM stacks the same stage of many projections."""
        return [(getattr(self, f"conv{i}"), getattr(self, f"bn{i}"), relu) for i, relu in enumerate(self.relu, 1)]

    def forward(self, x: torch.Tensor, norm=own_statistics) -> torch.Tensor:
        for conv, bn, relu in self.stages():
            x = norm(bn, conv(x))
            x = F.relu(x) if relu else x
        return x


class BasicBlock(nn.Module):
    """ResNet basic block: 3x3 conv-BN-ReLU-3x3 conv-BN plus a (1x1 conv + BN when in != out) shortcut, then ReLU."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = Projection(cin, cout) if cin != cout else None

    def forward(self, x: torch.Tensor, norm=own_statistics) -> torch.Tensor:
        out = F.relu(norm(self.bn1, self.conv1(x)))
        out = norm(self.bn2, self.conv2(out))
        return F.relu(out + (x if self.shortcut is None else self.shortcut(x, norm)))


class SqueezeExcitation(nn.Module):
    """Global mean -> Linear C->C/16 -> ReLU -> Linear -> sigmoid -> channel scale."""

    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        hidden = max(channels // reduction, 1)
        self.fc1 = nn.Linear(channels, hidden)
        self.fc2 = nn.Linear(hidden, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = torch.sigmoid(self.fc2(F.relu(self.fc1(x.mean(dim=(2, 3))))))
        return x * w[:, :, None, None]


class WindowAttention(nn.Module):
    """Multi-head self-attention inside non-overlapping windows, with a learned relative position bias."""

    def __init__(self, dim: int, heads: int, window: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"window attention: {dim} channels do not split into {heads} heads")
        self.heads, self.window = heads, window
        self.scale = (dim // heads) ** -0.5
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, heads))
        trunc_normal_(self.relative_position_bias_table, std=0.02)
        coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
        rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window - 1)
        self.register_buffer("relative_position_index", rel[..., 0] * (2 * window - 1) + rel[..., 1],
                             persistent=False)
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, dim)

    def position_bias(self) -> torch.Tensor:
        """[heads, L, L]: the learned bias of each head for each pair of positions in a window."""
        length = self.relative_position_index.shape[0]
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        return bias.view(length, length, self.heads).permute(2, 0, 1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """x: [num_windows * B, L, C]; mask: [num_windows, L, L] of 0 / -100, or None."""
        out = reference.window_attention(self.qkv(x), self.position_bias(), mask, self.heads, self.scale)
        return self.proj(out)


def _shift_mask(hp: int, wp: int, window: int, shift: int, device) -> torch.Tensor:
    """The standard shifted-window mask: -100 between tokens that came from different regions of the roll. The
    regions (0, 1, 2 along each axis: before the last window, inside it before the shift, in the shift) are computed
    from positions rather than assigned by slices, which torch.compile would turn into one huge generated kernel."""
    def region(n: int) -> torch.Tensor:
        i = torch.arange(n, device=device)
        return (i >= n - window).long() + (i >= n - shift).long()

    regions = 3 * region(hp)[:, None] + region(wp)[None, :]
    windows = regions.view(hp // window, window, wp // window, window).transpose(1, 2).reshape(-1, window * window)
    differs = windows[:, None, :] != windows[:, :, None]
    return torch.zeros(differs.shape, device=device).masked_fill(differs, -100.0)


class SwinBlock(nn.Module):
    """x + DropPath(proj(WindowAttention(LayerNorm(x)))), with no MLP; windows optionally shifted."""

    def __init__(self, dim: int, heads: int, window: int, shift: int, drop_path: float):
        super().__init__()
        self.window, self.shift = window, shift
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, heads, window)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        b, _, c = x.shape
        w = self.window
        h = self.norm1(x).view(b, height, width, c)
        pad_b, pad_r = (-height) % w, (-width) % w
        h = F.pad(h, (0, 0, 0, pad_r, 0, pad_b))  # zeros after the norm, as the Swin detection code does
        hp, wp = height + pad_b, width + pad_r
        mask = None
        if self.shift:
            h = torch.roll(h, shifts=(-self.shift, -self.shift), dims=(1, 2))
            mask = _shift_mask(hp, wp, w, self.shift, x.device).to(h.dtype)
        windows = h.view(b, hp // w, w, wp // w, w, c).transpose(2, 3).reshape(-1, w * w, c)
        h = self.attn(windows, mask)
        h = h.view(b, hp // w, wp // w, w, w, c).transpose(2, 3).reshape(b, hp, wp, c)
        if self.shift:
            h = torch.roll(h, shifts=(self.shift, self.shift), dims=(1, 2))
        h = h[:, :height, :width].reshape(b, height * width, c)
        return x + self.drop_path(h)


class SwinLayer(nn.Module):
    """Patch embedding (1x1 conv + LayerNorm), `depth` Swin blocks (odd ones shifted), final LayerNorm; NCHW in/out."""

    def __init__(self, dim: int, depth: int, heads: int, window: int = 7, drop_path: float = 0.2):
        super().__init__()
        self.embed = nn.Conv2d(dim, dim, 1)
        self.embed_norm = nn.LayerNorm(dim)
        rates = torch.linspace(0, drop_path, depth).tolist()
        self.blocks = nn.ModuleList(
            SwinBlock(dim, heads, window, shift=window // 2 if i % 2 else 0, drop_path=rates[i]) for i in range(depth)
        )
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, height, width = x.shape
        h = self.embed_norm(self.embed(x).flatten(2).transpose(1, 2))
        for block in self.blocks:
            h = block(h, height, width)
        return self.norm(h).transpose(1, 2).reshape(b, c, height, width)


class GlobalContextAttention(nn.Module):
    """GCA: Q = BN(conv(ReLU(BN(conv(query))))), K likewise on the source, V = ReLU(BN(conv(source)));
    the core softplus(Q), softplus(K) linear attention over all source positions (fused_mtl_attn)."""

    def __init__(self, channels: int):
        super().__init__()
        c = channels
        self.query = Projection(c, c, relu=(True, False))
        self.key = Projection(c, c, relu=(True, False))
        self.value = Projection(c, c, relu=(True,))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.xavier_uniform_(m.weight)

    def forward(self, query: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
        b, c, h, w = query.shape
        q = self.query(query).flatten(2)
        k = self.key(source).flatten(2)
        v = self.value(source).flatten(2)
        out = reference.cross_scale_attention(q, k, v, [0, k.shape[-1]])[:, 0]
        return out.view(b, c, h, w)
