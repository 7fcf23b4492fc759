"""Input checks shared by every backend: one place that turns bad input into an error naming the argument."""
from __future__ import annotations

from typing import Sequence

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_tensor(name: str, t, rank: int, layout: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {layout}, got {type(t).__name__}")
    if t.dim() != rank:
        raise ValueError(f"{name} must have rank {rank} ({layout}), got shape {tuple(t.shape)}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor (float16/bfloat16/float32/float64), got {t.dtype}")


def _check_same(q: torch.Tensor, **others: torch.Tensor) -> None:
    for name, t in others.items():
        if t.dtype != q.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but q has {q.dtype}; all inputs must share one dtype")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}; all inputs must share one device")


def check_cross_task(q, k, v) -> None:
    """q, k: [B, P, d, N]; v: [B, P, m, N]."""
    _check_tensor("q", q, 4, "[B, P, d, N]")
    _check_tensor("k", k, 4, "[B, P, d, N]")
    _check_tensor("v", v, 4, "[B, P, m, N]")
    _check_same(q, k=k, v=v)
    if k.shape != q.shape:
        raise ValueError(f"k must have the shape of q {tuple(q.shape)} ([B, P, d, N]), got {tuple(k.shape)}")
    b, p, _, n = q.shape
    if (v.shape[0], v.shape[1], v.shape[3]) != (b, p, n):
        raise ValueError(
            f"v must be [B={b}, P={p}, m, N={n}] to match q, got {tuple(v.shape)}"
        )


def normalize_offsets(offsets) -> list[int]:
    """Accept a list/tuple of ints or a 1-D integer CPU tensor; return a list of Python ints. The offsets set the
    output's shape, so they live on the host: reading a GPU tensor would synchronise with the device."""
    if isinstance(offsets, torch.Tensor):
        if offsets.dim() != 1 or offsets.is_floating_point() or offsets.is_complex():
            raise TypeError(f"offsets must be a 1-D integer tensor or a sequence of ints, got {offsets.dtype} "
                            f"tensor of shape {tuple(offsets.shape)}")
        if offsets.device.type != "cpu":
            raise ValueError(f"offsets must be a CPU tensor or a sequence of ints (they set the output's shape), got "
                             f"a tensor on {offsets.device}")
        return [int(o) for o in offsets.tolist()]
    if not isinstance(offsets, Sequence) or isinstance(offsets, (str, bytes)):
        raise TypeError(f"offsets must be a sequence of ints, got {type(offsets).__name__}")
    out = []
    for i, o in enumerate(offsets):
        if isinstance(o, bool) or not isinstance(o, (int, torch.SymInt)) and not hasattr(o, "__index__"):
            raise TypeError(f"offsets[{i}] must be an int, got {type(o).__name__}")
        out.append(o if isinstance(o, torch.SymInt) else int(o))
    return out


def check_cross_scale(q, k, v, offsets: Sequence[int]) -> None:
    """q: [B, d, Nq]; k: [B, d, Ntot]; v: [B, m, Ntot]; offsets: J+1 non-decreasing ints from 0 to Ntot."""
    _check_tensor("q", q, 3, "[B, d, Nq]")
    _check_tensor("k", k, 3, "[B, d, Ntot]")
    _check_tensor("v", v, 3, "[B, m, Ntot]")
    _check_same(q, k=k, v=v)
    b, d, _ = q.shape
    if (k.shape[0], k.shape[1]) != (b, d):
        raise ValueError(f"k must be [B={b}, d={d}, Ntot] to match q, got {tuple(k.shape)}")
    n_total = k.shape[2]
    if (v.shape[0], v.shape[2]) != (b, n_total):
        raise ValueError(f"v must be [B={b}, m, Ntot={n_total}] to match k, got {tuple(v.shape)}")
    if len(offsets) < 1:
        raise ValueError("offsets must hold J+1 >= 1 values (0, end of source 1, ..., Ntot), got an empty list")
    if offsets[0] != 0:
        raise ValueError(f"offsets must start at 0, got offsets[0] = {offsets[0]}")
    for i in range(1, len(offsets)):
        if offsets[i] < offsets[i - 1]:
            raise ValueError(
                f"offsets must be non-decreasing, got offsets[{i - 1}] = {offsets[i - 1]} > offsets[{i}] = {offsets[i]}"
            )
    if offsets[-1] != n_total:
        raise ValueError(f"offsets must end at the gathered length Ntot = {n_total} of k and v, got {offsets[-1]}")


def check_cross_entropy(logits, label, ignore_index) -> None:
    """logits: [B, C, h, w] floating; label: [B, H, W] int64 class indices on logits' device; ignore_index: int."""
    _check_tensor("logits", logits, 4, "[B, C, h, w]")
    if not isinstance(label, torch.Tensor):
        raise TypeError(f"label must be a torch.Tensor of class indices [B, H, W], got {type(label).__name__}")
    if label.dim() != 3 or label.dtype != torch.int64:
        raise ValueError(f"label must be an int64 tensor of class indices [B, H, W], got {label.dtype} of shape "
                         f"{tuple(label.shape)}")
    if label.shape[0] != logits.shape[0]:
        raise ValueError(f"label has batch size {label.shape[0]} but logits have {logits.shape[0]}")
    if label.device != logits.device:
        raise ValueError(f"label is on {label.device} but logits are on {logits.device}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if min(logits.shape[1:]) < 1 or min(label.shape[1:]) < 1:
        raise ValueError(f"logits and label must hold at least one class and one pixel, got logits "
                         f"{tuple(logits.shape)} and label {tuple(label.shape)}")


def check_window_attention(qkv, bias, mask, heads, scale) -> None:
    """qkv: [BW, L, 3*dim]; bias: [heads, L, L]; mask: [nW, L, L] with nW dividing BW, or None; heads: an int >= 1
    dividing dim; scale: a real number. Dtypes may differ (autocast gives a bfloat16 qkv and a float32 bias)."""
    if isinstance(heads, bool) or not isinstance(heads, int) or heads < 1:
        raise ValueError(f"heads must be an int >= 1, got {heads!r}")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a real number, got {type(scale).__name__}")
    _check_tensor("qkv", qkv, 3, "[BW, L, 3*dim]")
    _check_tensor("bias", bias, 3, "[heads, L, L]")
    bw, length, three_dim = qkv.shape
    if three_dim == 0 or three_dim % (3 * heads):
        raise ValueError(f"qkv's last axis must be 3 x dim with dim a positive multiple of heads = {heads}, got "
                         f"{three_dim}")
    if tuple(bias.shape) != (heads, length, length):
        raise ValueError(f"bias must be [heads, L, L] = [{heads}, {length}, {length}], got {tuple(bias.shape)}")
    if bias.device != qkv.device:
        raise ValueError(f"bias is on {bias.device} but qkv is on {qkv.device}")
    if mask is not None:
        _check_tensor("mask", mask, 3, "[nW, L, L]")
        if mask.shape[1:] != (length, length) or mask.shape[0] < 1 or bw % mask.shape[0]:
            raise ValueError(f"mask must be [nW, {length}, {length}] with nW dividing qkv's {bw} windows, got "
                             f"{tuple(mask.shape)}")
        if mask.device != qkv.device:
            raise ValueError(f"mask is on {mask.device} but qkv is on {qkv.device}")
