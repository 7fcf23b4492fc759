"""Triton kernels of the attention core and their launchers, shared by both layouts (stacked and gathered).

Every tensor is addressed as [B, P, C, N] through its strides: a stacked pair is group p; a gathered source
is group j with q's group stride 0 (one query for all sources) and its positions lo:hi of the gathered axis.
The math is the spec's (docs/attention-op.md):

- `_reduce_kernel`: S = w x^T (m x d), z = sum_n x_n with x = softplus(logits), over a group's positions;
  forward: w = v; backward: w = g / den, z-weights b, giving dS and dz. Each program reduces one
  (m-block, d-block, split of positions) into a partial; the partials are summed in a fixed order by
  torch.sum afterwards, so results are bitwise reproducible (no atomics).
- `_apply_kernel`: Y = W softplus(X) (/ max(z . softplus(X), eps)): `out` in forward, `dv` in backward.
- `_row_stats_kernel`: per query position 1/den and b = -(g . S q)/den^2 (= -(g . out)/den without reading a saved
  `out`; 0 where the clamp is active).
- `_apply_grad_kernel`: Y = sigmoid(L) * sum_i (W_i^T A_i * s_i + w_i b_i): `dq` (summed over the
  sources of a gathered query) and `dk`.

Accumulation is fp32 (fp64 for fp64 inputs, constants.accumulation_dtype); `tl.dot` runs on the accumulation
type, fp64 with IEEE precision and fp32 as tf32x3 (three TF32 products, ~fp32 accuracy: see `_dot`). Channel blocks
are powers of two >= 16 (tl.dot's minimum on NVIDIA), masked to the real d and m.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional, Sequence

import torch
import triton
import triton.language as tl

from . import constants
from .constants import accumulation_dtype

# module-level constexprs, so the kernels can read them
EPS = tl.constexpr(constants.EPS)
SOFTPLUS_THRESHOLD = tl.constexpr(constants.SOFTPLUS_THRESHOLD)

# the interpreter (TRITON_INTERPRET=1) makes @triton.jit return a non-JITFunction; read at import like triton does
INTERPRETED = False  # set below once a kernel exists


@triton.jit
def _softplus(x):
    # torch's rule (beta 1, threshold 20); log1p(u) as log(w) * u / (w - 1) (Goldberg) since tl has no log1p
    u = tl.exp(tl.minimum(x, SOFTPLUS_THRESHOLD))
    w = 1.0 + u
    log1p = tl.where(w == 1.0, u, tl.log(w) * (u / tl.where(w == 1.0, 1.0, w - 1.0)))
    return tl.where(x > SOFTPLUS_THRESHOLD, x, log1p)


@triton.jit
def _softplus_grad(x):
    # d softplus / dx = sigmoid(x), and 1 above the threshold
    u = tl.exp(tl.minimum(x, SOFTPLUS_THRESHOLD))
    return tl.where(x > SOFTPLUS_THRESHOLD, 1.0, u / (1.0 + u))


@triton.jit
def _dot(a, b, acc):
    # fp32 through tensor cores at ~fp32 accuracy (3 TF32 products); plain TF32 would miss the 1e-5 contract.
    # out_dtype spelled out: Triton 3.6 defaults it to fp32 whatever acc is and asserts they match
    if a.dtype == tl.float64:
        return tl.dot(a, b, acc, input_precision="ieee", out_dtype=tl.float64)
    else:
        return tl.dot(a, b, acc, input_precision="tf32x3")


@triton.jit
def _tile(rows, cols, s_r, s_c):
    # 64-bit element offsets of a [rows x cols] tile: B*C*N may pass 2^31
    return rows.to(tl.int64)[:, None] * s_r + cols.to(tl.int64)[None, :] * s_c


@triton.jit
def _reduce_kernel(
    x_ptr, xs_b, xs_p, xs_c, xs_n,  # logits [B, P, d, N] (softplus applied here)
    w_ptr, ws_b, ws_p, ws_c, ws_n,  # weights [B, P, m, N]: v (forward) or g (backward)
    rden_ptr, bvec_ptr,  # backward only: [B, P, N] contiguous, 1/den and b per position
    s_ptr, z_ptr,  # partials [B, P, n_split, m, d] and [B, P, n_split, d], contiguous, accumulation dtype
    d, m, n_pos, P, p_base, lo, hi, span, n_split,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BACKWARD: tl.constexpr,
):
    acc_ty = s_ptr.dtype.element_ty
    n_mb = tl.cdiv(m, BLOCK_M)
    n_db = tl.cdiv(d, BLOCK_D)
    pid = tl.program_id(0)
    split = pid // (n_mb * n_db)
    mb = (pid // n_db) % n_mb
    db = pid % n_db
    p = (p_base + tl.program_id(1)).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    rm = mb * BLOCK_M + tl.arange(0, BLOCK_M)
    rd = db * BLOCK_D + tl.arange(0, BLOCK_D)
    m_mask = rm < m
    d_mask = rd < d
    x_base = x_ptr + b * xs_b + p * xs_p
    w_base = w_ptr + b * ws_b + p * ws_p
    row_base = (b * P + p) * n_pos
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=acc_ty)
    zacc = tl.zeros([BLOCK_D], dtype=acc_ty)
    start = lo + split * span
    end = tl.minimum(hi, start + span)
    for n0 in range(start, end, BLOCK_N):
        rn = n0 + tl.arange(0, BLOCK_N)
        n_mask = rn < end
        xmask = d_mask[:, None] & n_mask[None, :]
        x = tl.load(x_base + _tile(rd, rn, xs_c, xs_n), mask=xmask, other=0.0).to(acc_ty)
        x = tl.where(xmask, _softplus(x), 0.0)
        w = tl.load(w_base + _tile(rm, rn, ws_c, ws_n), mask=m_mask[:, None] & n_mask[None, :], other=0.0)
        w = w.to(acc_ty)
        if BACKWARD:
            rden = tl.load(rden_ptr + row_base + rn, mask=n_mask, other=0.0)
            bvec = tl.load(bvec_ptr + row_base + rn, mask=n_mask, other=0.0)
            w = w * rden[None, :]
            zacc += tl.sum(x * bvec[None, :], axis=1)
        else:
            zacc += tl.sum(x, axis=1)
        acc = _dot(w, tl.trans(x), acc)
    part = (b * P + p) * n_split + split
    tl.store(s_ptr + part * m * d + _tile(rm, rd, d, 1), acc, mask=m_mask[:, None] & d_mask[None, :])
    if mb == 0:
        tl.store(z_ptr + part * d + rd, zacc, mask=d_mask)


@triton.jit
def _apply_kernel(
    w_ptr, z_ptr,  # W [B, P, R, C] and z [B, P, C], contiguous, accumulation dtype
    x_ptr, xs_b, xs_p, xs_c, xs_n,  # logits [B, P, C, N] (softplus applied here)
    y_ptr, ys_b, ys_p, ys_r, ys_n,  # result [B, P, R, N]
    R, C, P, p_base, lo, hi,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr, NORMALIZE: tl.constexpr,
):
    acc_ty = w_ptr.dtype.element_ty
    n_rb = tl.cdiv(R, BLOCK_R)
    pid = tl.program_id(0)
    rb = pid % n_rb
    nb = pid // n_rb
    p = (p_base + tl.program_id(1)).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    rr = rb * BLOCK_R + tl.arange(0, BLOCK_R)
    rn = lo + nb * BLOCK_N + tl.arange(0, BLOCK_N)
    r_mask = rr < R
    n_mask = rn < hi
    x_base = x_ptr + b * xs_b + p * xs_p
    w_base = w_ptr + (b * P + p) * R * C
    acc = tl.zeros([BLOCK_R, BLOCK_N], dtype=acc_ty)
    den = tl.zeros([BLOCK_N], dtype=acc_ty)
    for c0 in range(0, C, BLOCK_C):
        rc = c0 + tl.arange(0, BLOCK_C)
        c_mask = rc < C
        xmask = c_mask[:, None] & n_mask[None, :]
        x = tl.load(x_base + _tile(rc, rn, xs_c, xs_n), mask=xmask, other=0.0).to(acc_ty)
        x = tl.where(xmask, _softplus(x), 0.0)
        w = tl.load(w_base + _tile(rr, rc, C, 1), mask=r_mask[:, None] & c_mask[None, :], other=0.0)
        acc = _dot(w, x, acc)
        if NORMALIZE:
            z = tl.load(z_ptr + (b * P + p) * C + rc, mask=c_mask, other=0.0)
            den += tl.sum(z[:, None] * x, axis=0)
    if NORMALIZE:
        acc = acc / tl.maximum(den, EPS)[None, :]
    y_base = y_ptr + b * ys_b + p * ys_p
    tl.store(y_base + _tile(rr, rn, ys_r, ys_n), acc.to(y_ptr.dtype.element_ty),
             mask=r_mask[:, None] & n_mask[None, :])


@triton.jit
def _row_stats_kernel(
    s_ptr, z_ptr,  # S [B, P, m, d] and z [B, P, d], contiguous, accumulation dtype
    x_ptr, xs_b, xs_p, xs_c, xs_n,  # query logits [B, P, d, N]
    g_ptr, gs_b, gs_p, gs_c, gs_n,  # grad of out [B, P, m, N]
    rden_ptr, bvec_ptr,  # results [B, P, N], contiguous, accumulation dtype
    d, m, n_pos, P,
    BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr,
):
    acc_ty = z_ptr.dtype.element_ty
    nb = tl.program_id(0)
    p = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    rn = nb * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = rn < n_pos
    group = b * P + p
    # g . out = g . (S q) / den: S q one block of m rows at a time (the query tile is re-read from cache per block),
    # den = z . q with the first block; at least one block, so that m = 0 still gets den
    den = tl.zeros([BLOCK_N], dtype=acc_ty)
    gsq = tl.zeros([BLOCK_N], dtype=acc_ty)
    for r0 in range(0, tl.maximum(m, 1), BLOCK_C):
        rr = r0 + tl.arange(0, BLOCK_C)
        r_mask = rr < m
        sq = tl.zeros([BLOCK_C, BLOCK_N], dtype=acc_ty)
        for c0 in range(0, d, BLOCK_C):
            rc = c0 + tl.arange(0, BLOCK_C)
            c_mask = rc < d
            xmask = c_mask[:, None] & n_mask[None, :]
            x = tl.load(x_ptr + b * xs_b + p * xs_p + _tile(rc, rn, xs_c, xs_n), mask=xmask, other=0.0).to(acc_ty)
            x = tl.where(xmask, _softplus(x), 0.0)
            if r0 == 0:
                z = tl.load(z_ptr + group * d + rc, mask=c_mask, other=0.0)
                den += tl.sum(z[:, None] * x, axis=0)
            s = tl.load(s_ptr + group * m * d + _tile(rr, rc, d, 1), mask=r_mask[:, None] & c_mask[None, :],
                        other=0.0)
            sq = _dot(s, x, sq)
        g = tl.load(g_ptr + b * gs_b + p * gs_p + _tile(rr, rn, gs_c, gs_n), mask=r_mask[:, None] & n_mask[None, :],
                    other=0.0).to(acc_ty)
        gsq += tl.sum(g * sq, axis=0)
    rden = 1.0 / tl.maximum(den, EPS)
    # the clamp max(z.q, eps) passes no gradient to z.q where it is active
    bvec = tl.where(den >= EPS, -gsq * rden * rden, 0.0)
    row = group * n_pos + rn
    tl.store(rden_ptr + row, rden, mask=n_mask)
    tl.store(bvec_ptr + row, bvec, mask=n_mask)


@triton.jit
def _apply_grad_kernel(
    w_ptr, wz_ptr,  # W [B, P, R, C] and w [B, P, C], contiguous, accumulation dtype
    a_ptr, as_b, as_p, as_r, as_n,  # A [B, P, R, N]: g (for dq) or v (for dk)
    rden_ptr, bvec_ptr,  # HAS_COLS only: [B, P, N] contiguous; else s = b = 1
    l_ptr, ls_b, ls_p, ls_c, ls_n,  # logits whose softplus gradient gates the result [B, P, C, N]
    y_ptr, ys_b, ys_p, ys_c, ys_n,  # result [B, P, C, N]
    R, C, n_pos, P, p_base, n_inner, lo, hi,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr, HAS_COLS: tl.constexpr,
):
    acc_ty = w_ptr.dtype.element_ty
    n_cb = tl.cdiv(C, BLOCK_C)
    pid = tl.program_id(0)
    cb = pid % n_cb
    nb = pid // n_cb
    p_out = (p_base + tl.program_id(1)).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    rc = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    rn = lo + nb * BLOCK_N + tl.arange(0, BLOCK_N)
    c_mask = rc < C
    n_mask = rn < hi
    acc = tl.zeros([BLOCK_C, BLOCK_N], dtype=acc_ty)
    # a gathered query sums its sources' terms here, in source order (deterministic)
    for i in range(n_inner):
        p = p_out + i
        term = tl.zeros([BLOCK_C, BLOCK_N], dtype=acc_ty)
        for r0 in range(0, R, BLOCK_R):
            rr = r0 + tl.arange(0, BLOCK_R)
            r_mask = rr < R
            w = tl.load(w_ptr + (b * P + p) * R * C + _tile(rr, rc, C, 1),
                        mask=r_mask[:, None] & c_mask[None, :], other=0.0)
            a = tl.load(a_ptr + b * as_b + p * as_p + _tile(rr, rn, as_r, as_n),
                        mask=r_mask[:, None] & n_mask[None, :], other=0.0).to(acc_ty)
            term = _dot(tl.trans(w), a, term)
        wz = tl.load(wz_ptr + (b * P + p) * C + rc, mask=c_mask, other=0.0)
        if HAS_COLS:
            row = (b * P + p) * n_pos + rn
            rden = tl.load(rden_ptr + row, mask=n_mask, other=0.0)
            bvec = tl.load(bvec_ptr + row, mask=n_mask, other=0.0)
            acc += term * rden[None, :] + wz[:, None] * bvec[None, :]
        else:
            acc += term + wz[:, None]
    mask = c_mask[:, None] & n_mask[None, :]
    logit = tl.load(l_ptr + b * ls_b + p_out * ls_p + _tile(rc, rn, ls_c, ls_n), mask=mask, other=0.0)
    acc = acc * _softplus_grad(logit.to(acc_ty))
    tl.store(y_ptr + b * ys_b + p_out * ys_p + _tile(rc, rn, ys_c, ys_n), acc.to(y_ptr.dtype.element_ty), mask=mask)


INTERPRETED = not isinstance(_reduce_kernel, triton.runtime.JITFunction)


def _patch_interpreter_loop_bounds() -> None:
    """Triton 3.6's interpreter turns a runtime loop bound (`range(0, C, BLOCK_C)`) into an int with int() of
    its 1-element array, which NumPy >= 2.4 refuses (triton-lang/triton#9171): every kernel here loops so, so
    every launch failed. Later Tritons take the one element out first (#9172); this applies that same fix."""
    from triton.runtime import interpreter

    patch_tensor = interpreter._patch_lang_tensor

    def patched(tensor, scope):
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    interpreter._patch_lang_tensor = patched


if INTERPRETED and tuple(int(p) for p in triton.__version__.split(".")[:2]) < (3, 8):  # 3.8 has the fix
    _patch_interpreter_loop_bounds()

# for the ahead-of-time compile check: name -> (kernel, its pointers in the accumulation dtype (the others are
# in the input dtype), the flag values it is launched with)
KERNELS = {
    "reduce": (_reduce_kernel, ("rden_ptr", "bvec_ptr", "s_ptr", "z_ptr"), {"BACKWARD": (False, True)}),
    "apply": (_apply_kernel, ("w_ptr", "z_ptr"), {"NORMALIZE": (True, False)}),
    "row_stats": (_row_stats_kernel, ("s_ptr", "z_ptr", "rden_ptr", "bvec_ptr"), {}),
    "apply_grad": (_apply_grad_kernel, ("w_ptr", "wz_ptr", "rden_ptr", "bvec_ptr"), {"HAS_COLS": (True, False)}),
}


# ---------------------------------------------------------------------------------------------- launchers


class Config(NamedTuple):
    block_c: int  # block of every channel axis (d and m): a power of two >= 16 for tl.dot
    block_n: int  # block of positions
    num_warps: int
    # 1: the loaded tiles go through softplus in registers before tl.dot, and deeper software pipelining
    # keeps several of them live: with 2-3 stages 64-wide tiles spill (tests/test_triton_compile.py)
    num_stages: int = 1


# the configs a GPU launch can use; the compile check builds each, spill-free on sm_80 and sm_90
GPU_CONFIGS = (Config(32, 64, 8), Config(64, 32, 8))


def pick_config(d: int, m: int, n: int) -> Config:
    """Blocks for channel sizes d, m and n positions: GPU_CONFIGS on a GPU; one big block in the interpreter."""
    if INTERPRETED:  # each interpreted program costs milliseconds: as few programs as possible
        return Config(min(64, max(16, triton.next_power_of_2(max(d, m)))), min(128, max(16, triton.next_power_of_2(n))), 4)
    # 64-wide channel blocks only where they pad no more than 32-wide ones (C = 36..64, 100..128, ...)
    c = max(d, m)
    return GPU_CONFIGS[1] if c > 32 and triton.cdiv(c, 64) * 64 == triton.cdiv(c, 32) * 32 else GPU_CONFIGS[0]


def _strides(t: torch.Tensor) -> tuple:
    """(s_b, s_p, s_c, s_n) of a [B, P, C, N] tensor; a [B, C, N] tensor (gathered layout) is shared by every
    group (s_p = 0)."""
    if t.dim() == 3:
        return (t.stride(0), 0, t.stride(1), t.stride(2))
    return tuple(t.stride())


def _launch(kernel, grid, *args, **meta) -> None:
    if math.prod(grid) == 0:
        return
    if INTERPRETED:
        from torch._subclasses.fake_tensor import is_fake
        if any(isinstance(a, torch.Tensor) and is_fake(a) for a in args):
            return  # shape propagation of the opaque op: nothing to compute
        kernel[grid](*args, **meta)
    else:
        torch.library.wrap_triton(kernel)[grid](*args, **meta)


def _num_splits(n: int, programs_per_split: int, block_n: int) -> int:
    """How many pieces to cut the positions of a reduction into: enough programs to fill a GPU."""
    if INTERPRETED:  # keep a few splits so the partial-sum path is exercised on CPU too
        return max(1, min(4, triton.cdiv(n, block_n)))
    target = 4 * 132  # ~4 programs per SM of an H100
    return max(1, min(triton.cdiv(n, block_n), triton.cdiv(target, max(1, programs_per_split))))


class _Groups(NamedTuple):
    """How the groups of a call map onto launches: one launch per (p_base, n_groups, lo, hi)."""
    B: int
    P: int
    launches: tuple  # ((p_base, n_groups, lo, hi), ...)


def _groups(batch: int, n_groups: int, n: int, offsets: Optional[Sequence[int]]) -> _Groups:
    if offsets is None:  # stacked: every group spans all positions, one launch
        return _Groups(batch, n_groups, ((0, n_groups, 0, n),))
    return _Groups(batch, n_groups, tuple((j, 1, offsets[j], offsets[j + 1]) for j in range(n_groups)))


def _reduce(x, w, groups: _Groups, d: int, m: int, cfg: Config, rows=None):
    """Sum over each group's positions: S [B, P, m, d], z [B, P, d] (rows = (rden, bvec, n_pos) in backward)."""
    B, P = groups.B, groups.P
    longest = max((hi - lo for _, _, lo, hi in groups.launches), default=0)
    tiles = triton.cdiv(m, cfg.block_c) * triton.cdiv(d, cfg.block_c)
    n_split = _num_splits(longest, tiles * B * P, cfg.block_n)
    span = triton.cdiv(triton.cdiv(max(longest, 1), n_split), cfg.block_n) * cfg.block_n
    acc = accumulation_dtype(x.dtype)
    s_part = torch.empty(B, P, n_split, m, d, device=x.device, dtype=acc)
    z_part = torch.empty(B, P, n_split, d, device=x.device, dtype=acc)
    rden, bvec, n_pos = rows if rows is not None else (s_part, s_part, 0)  # unused pointers in forward
    for p_base, n_groups, lo, hi in groups.launches:
        _launch(_reduce_kernel, (n_split * tiles, n_groups, B),
                x, *_strides(x), w, *_strides(w), rden, bvec, s_part, z_part,
                d, m, n_pos, P, p_base, lo, hi, span, n_split,
                BLOCK_M=cfg.block_c, BLOCK_D=cfg.block_c, BLOCK_N=cfg.block_n, BACKWARD=rows is not None,
                num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    # fixed-order sum of the partials: deterministic
    return s_part.sum(dim=2), z_part.sum(dim=2)


def _apply(W, z, x, y, groups: _Groups, cfg: Config, normalize: bool) -> None:
    """y = W softplus(x) (/ max(z . softplus(x), eps)) for each group's positions."""
    B, P, R, C = W.shape
    for p_base, n_groups, lo, hi in groups.launches:
        grid = (triton.cdiv(R, cfg.block_c) * triton.cdiv(hi - lo, cfg.block_n), n_groups, B)
        _launch(_apply_kernel, grid, W, z, x, *_strides(x), y, *_strides(y),
                R, C, P, p_base, lo, hi,
                BLOCK_R=cfg.block_c, BLOCK_C=cfg.block_c, BLOCK_N=cfg.block_n, NORMALIZE=normalize,
                num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def _apply_grad(W, wz, a, cols, logits, y, groups: _Groups, n_inner: int, cfg: Config) -> None:
    """y = softplus'(logits) * sum_i (W_i^T a_i * rden_i + wz_i bvec_i); cols = (rden, bvec, n_pos) or None."""
    B, P, R, C = W.shape
    rden, bvec, n_pos = cols if cols is not None else (W, W, 0)
    for p_base, n_groups, lo, hi in groups.launches:
        grid = (triton.cdiv(C, cfg.block_c) * triton.cdiv(hi - lo, cfg.block_n), n_groups, B)
        _launch(_apply_grad_kernel, grid, W, wz, a, *_strides(a), rden, bvec,
                logits, *_strides(logits), y, *_strides(y),
                R, C, n_pos, P, p_base, n_inner, lo, hi,
                BLOCK_R=cfg.block_c, BLOCK_C=cfg.block_c, BLOCK_N=cfg.block_n, HAS_COLS=cols is not None,
                num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def forward(q, k, v, offsets: Optional[Sequence[int]] = None):
    """out, S, z of the stacked (offsets None: q, k [B, P, d, N], v [B, P, m, N]) or gathered layout
    (q [B, d, Nq], k [B, d, Ntot], v [B, m, Ntot], J+1 offsets); out is [B, P or J, m, Nq]."""
    gathered = offsets is not None
    B, d, n_q = q.shape[0], q.shape[-2], q.shape[-1]
    m = v.shape[-2]
    P = len(offsets) - 1 if gathered else q.shape[1]
    cfg = pick_config(d, m, max(n_q, k.shape[-1]))
    sources = _groups(B, P, k.shape[-1], offsets)
    S, z = _reduce(k, v, sources, d, m, cfg)
    out = torch.empty(B, P, m, n_q, device=q.device, dtype=q.dtype)
    _apply(S, z, q, out, _groups(B, P, n_q, None), cfg, normalize=True)
    return out, S, z


def backward(grad, q, k, v, S, z, offsets: Optional[Sequence[int]] = None):
    """dq, dk, dv (shapes and strides of q, k, v made contiguous) from grad = dL/dout and the saved S, z."""
    gathered = offsets is not None
    B, P, m, n_q = grad.shape
    d = q.shape[-2]
    cfg = pick_config(d, m, max(n_q, k.shape[-1]))
    queries = _groups(B, P, n_q, None)
    acc = accumulation_dtype(q.dtype)
    rden = torch.empty(B, P, n_q, device=q.device, dtype=acc)
    bvec = torch.empty_like(rden)
    _launch(_row_stats_kernel, (triton.cdiv(n_q, cfg.block_n), P, B), S, z, q, *_strides(q),
            grad, *_strides(grad), rden, bvec, d, m, n_q, P,
            BLOCK_C=cfg.block_c, BLOCK_N=cfg.block_n, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    rows = (rden, bvec, n_q)
    dS, dz = _reduce(q, grad, queries, d, m, cfg, rows=rows)
    dq = torch.empty(q.shape, device=q.device, dtype=q.dtype)
    if gathered:  # one program column per batch sums the J sources' terms
        _apply_grad(S, z, grad, rows, q, dq, _Groups(B, P, ((0, 1, 0, n_q),)), P, cfg)
    else:
        _apply_grad(S, z, grad, rows, q, dq, queries, 1, cfg)
    dk = torch.empty(k.shape, device=k.device, dtype=k.dtype)
    dv = torch.empty(v.shape, device=v.device, dtype=v.dtype)
    sources = _groups(B, P, k.shape[-1], offsets)
    _apply_grad(dS, dz, v, None, k, dk, sources, 1, cfg)
    _apply(dS, dz, k, dv, sources, cfg, normalize=False)
    return dq, dk, dv
