"""Triton kernels of the attention core and their launchers, shared by both layouts (stacked and gathered).

Every tensor is addressed as [B, G, C, N] through its strides: a stacked pair is group p; a gathered source is
group j, with q's group stride 0 (one query for all sources) and its positions o_j:o_{j+1} of the gathered axis.
The math is the spec's (docs/attention-op.md). The design aims at the memory floor: forward reads q, k, v once
and writes out once; backward reads q, k, v, g once and writes dq, dk, dv once; S, z, dS, dz (a few KB per
group) are the only intermediates.

Forward, 2 launches:
- `_reduce_kernel` (sources): each program sums one split of a group's source positions into a partial
  S = v softplus(k)^T and z = sum softplus(k). All sources of a gathered call are one launch (ragged: each
  group reads its bounds from the offsets, passed as scalars so that no table is copied to the GPU; beyond
  MAX_SOURCES sources, one launch per MAX_SOURCES).
- `_apply_kernel` (queries): out = S softplus(q) / max(z . softplus(q), eps). Its prologue sums the partials in a
  fixed order (deterministic, no atomics); the programs of the first position span also store the summed S and
  z, which autograd saves for backward. A program walks a span of position blocks, so the prologue is paid once
  per span.
Backward, 2 launches (half-precision stacked pairs with d, m within one channel block: the network's finest
scales under autocast) or 3:
- `_query_grad_kernel` (queries): per position 1/den and b = -(g . S q)/den^2 (= -(g . out)/den, without a saved
  out), then dq = softplus'(q) sum_j (S_j^T g_j / den_j + b_j z_j). With half-precision inputs (`fuses_ds`), one
  channel block and one source per group it also accumulates the partials of dS = sum (g/den) q^T and dz = sum b q in registers while it has q
  and g loaded (FUSE_DS); otherwise it stores 1/den and b per position and
- `_reduce_kernel` (BACKWARD) sums dS, dz over the query positions from them.
- `_source_grad_kernel` (sources): dv = dS softplus(k), dk = softplus'(k) (dS^T v + dz), reading k and v once,
  its prologue summing the dS partials; ragged like `_reduce_kernel`.

Tensor cores: every contraction is a tl.dot whose operands are in the input dtype: bf16/fp16 inputs give bf16/fp16
operands (softplus features and scaled gradients rounded once, as eager PyTorch rounds its intermediates) with
fp32 accumulation; fp32 inputs run tf32x3 (three TF32 products, ~fp32 accuracy: one TF32 product would miss the
1e-5 contract); fp64 runs IEEE fp64. Elementwise work and the reductions z, den, g . Sq are fp32 (fp64).
Channel blocks are powers of two >= 16 (tl.dot's minimum), masked to the real d and m; channels wider than one
block loop over blocks, re-reading tiles from cache (the coarse scales, where the op is not memory-bound).
Indexing is 64-bit (`_tile`): B*C*N may pass 2^31.
Grids put the group fastest in axis 0 where programs of several groups read the same query (`_apply_kernel`,
`_reduce_kernel` BACKWARD on gathered sources): they run side by side, so a query tile comes from HBM once and
from L2 for the other sources.
"""
from __future__ import annotations

import contextlib
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


@triton.jit
def _probe():
    pass


# the interpreter (TRITON_INTERPRET=1) makes @triton.jit return a non-JITFunction
INTERPRETED = not isinstance(_probe, triton.runtime.JITFunction)
# the interpreter's bf16 casts truncate and its bf16 tl.dot is wrong: there bf16 operands are fp32 values rounded to
# bf16 by `_round_bf16` (the same numbers a bf16 tensor-core product multiplies)
EMULATE_BF16 = tl.constexpr(INTERPRETED)
# sources per launch of the source-side kernels: their bounds are scalar arguments o0..o8
MAX_SOURCES = 8


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
def _round_bf16(x):
    # fp32 -> the nearest bf16 value (ties to even), kept in fp32
    bits = x.to(tl.uint32, bitcast=True)
    bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _operand(x, in_ty: tl.constexpr):
    # a tl.dot operand from an fp32/fp64 value: rounded to the input dtype when that is half precision
    if in_ty == tl.bfloat16:
        if EMULATE_BF16:
            return _round_bf16(x)
        else:
            return x.to(tl.bfloat16)
    elif in_ty == tl.float16:
        return x.to(tl.float16)
    else:
        return x


@triton.jit
def _dot(a, b, acc):
    # out_dtype spelled out for fp64: Triton 3.6 defaults it to fp32 whatever acc is and asserts they match
    if a.dtype == tl.float64:
        return tl.dot(a, b, acc, input_precision="ieee", out_dtype=tl.float64)
    elif a.dtype == tl.float32:
        return tl.dot(a, b, acc, input_precision="tf32x3")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def _tile(rows, cols, s_r, s_c):
    # 64-bit element offsets of a [rows x cols] tile: B*C*N may pass 2^31
    return rows.to(tl.int64)[:, None] * s_r + cols.to(tl.int64)[None, :] * s_c


@triton.jit
def _features(ptr, rc, rn, s_c, s_n, mask, acc_ty: tl.constexpr):
    # softplus of a logits tile, 0 outside the mask
    x = tl.load(ptr + _tile(rc, rn, s_c, s_n), mask=mask, other=0.0).to(acc_ty)
    return tl.where(mask, _softplus(x), 0.0)


@triton.jit
def _summed(ptr, n_parts, part_size, offs, mask):
    # fixed-order sum of n_parts partials laid out part_size apart: deterministic
    acc = tl.load(ptr + offs, mask=mask, other=0.0)
    for i in range(1, n_parts):
        acc += tl.load(ptr + i * part_size + offs, mask=mask, other=0.0)
    return acc


@triton.jit
def _bounds(g, n, o0, o1, o2, o3, o4, o5, o6, o7, o8, RAGGED: tl.constexpr):
    # positions [lo, hi) of group g: every group spans 0:n unless RAGGED (o_g:o_{g+1})
    if RAGGED:
        lo = tl.where(g == 0, o0, tl.where(g == 1, o1, tl.where(g == 2, o2, tl.where(g == 3, o3, tl.where(
            g == 4, o4, tl.where(g == 5, o5, tl.where(g == 6, o6, o7)))))))
        hi = tl.where(g == 0, o1, tl.where(g == 1, o2, tl.where(g == 2, o3, tl.where(g == 3, o4, tl.where(
            g == 4, o5, tl.where(g == 5, o6, tl.where(g == 6, o7, o8)))))))
    else:
        lo = n * 0
        hi = n
    return lo, hi


@triton.jit
def _span(lo, hi, split, n_split, BLOCK_N: tl.constexpr):
    # split `split` of n_split of [lo, hi), cut at multiples of BLOCK_N
    span = tl.cdiv(tl.cdiv(hi - lo, n_split), BLOCK_N) * BLOCK_N
    start = lo + split * span
    return start, tl.minimum(hi, start + span)


@triton.jit
def _reduce_kernel(
    x_ptr, xs_b, xs_p, xs_c, xs_n,  # logits [B, G, d, N] (softplus applied here)
    w_ptr, ws_b, ws_p, ws_c, ws_n,  # weights [B, G, m, N]: v (forward) or g (backward)
    rden_ptr, bvec_ptr,  # backward only: [B, G, N] contiguous, 1/den and b per position
    s_ptr, z_ptr,  # partials [B, G, n_split, m, d] and [B, G, n_split, d], contiguous, accumulation dtype
    d, m, n_pos, n_groups, p_base, n_launch, n_split, o0, o1, o2, o3, o4, o5, o6, o7, o8,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BACKWARD: tl.constexpr,
    RAGGED: tl.constexpr,
):
    acc_ty = s_ptr.dtype.element_ty
    in_ty = x_ptr.dtype.element_ty
    n_mb = tl.maximum(tl.cdiv(m, BLOCK_M), 1)  # one m block even for m = 0, which still owes z
    n_db = tl.cdiv(d, BLOCK_D)
    # axis 0 = (split, m block, d block, group of the launch), the group fastest: the backward's gathered sources
    # read the same query tile side by side (one trip from HBM, the others from L2)
    pid = tl.program_id(0)
    g = pid % n_launch
    pid = pid // n_launch
    split = pid // (n_mb * n_db)
    mb = (pid // n_db) % n_mb
    db = pid % n_db
    p = (p_base + g).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    rm = mb * BLOCK_M + tl.arange(0, BLOCK_M)
    rd = db * BLOCK_D + tl.arange(0, BLOCK_D)
    m_mask = rm < m
    d_mask = rd < d
    x_base = x_ptr + b * xs_b + p * xs_p
    w_base = w_ptr + b * ws_b + p * ws_p
    row_base = (b * n_groups + p) * n_pos
    lo, hi = _bounds(g, n_pos, o0, o1, o2, o3, o4, o5, o6, o7, o8, RAGGED)
    start, end = _span(lo, hi, split, n_split, BLOCK_N)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=acc_ty)
    zacc = tl.zeros([BLOCK_D], dtype=acc_ty)
    for n0 in range(start, end, BLOCK_N):
        rn = n0 + tl.arange(0, BLOCK_N)
        n_mask = rn < end
        x = _features(x_base, rd, rn, xs_c, xs_n, d_mask[:, None] & n_mask[None, :], acc_ty)
        w = tl.load(w_base + _tile(rm, rn, ws_c, ws_n), mask=m_mask[:, None] & n_mask[None, :], other=0.0)
        w = w.to(acc_ty)
        if BACKWARD:
            rden = tl.load(rden_ptr + row_base + rn, mask=n_mask, other=0.0)
            bvec = tl.load(bvec_ptr + row_base + rn, mask=n_mask, other=0.0)
            w = w * rden[None, :]
            zacc += tl.sum(x * bvec[None, :], axis=1)
        else:
            zacc += tl.sum(x, axis=1)
        acc = _dot(_operand(w, in_ty), tl.trans(_operand(x, in_ty)), acc)
    part = (b * n_groups + p) * n_split + split
    tl.store(s_ptr + part * m * d + _tile(rm, rd, d, 1), acc, mask=m_mask[:, None] & d_mask[None, :])
    if mb == 0:
        tl.store(z_ptr + part * d + rd, zacc, mask=d_mask)


@triton.jit
def _apply_kernel(
    sp_ptr, zp_ptr, n_split,  # partials of S [B, G, n_split, m, d] and z [B, G, n_split, d]
    s_ptr, z_ptr,  # the summed S [B, G, m, d] and z [B, G, d], stored for backward
    x_ptr, xs_b, xs_p, xs_c, xs_n,  # query logits [B, G, d, N]
    y_ptr, ys_b, ys_p, ys_r, ys_n,  # out [B, G, m, N]
    m, d, n_pos, n_groups, n_prog,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr, SINGLE: tl.constexpr,
):
    acc_ty = s_ptr.dtype.element_ty
    in_ty = x_ptr.dtype.element_ty
    n_rb = tl.maximum(tl.cdiv(m, BLOCK_R), 1)
    # axis 0 = (position span, row block, group), the group fastest: gathered sources read the same query tile side
    # by side (one trip from HBM, the others from L2)
    pid = tl.program_id(0)
    p = (pid % n_groups).to(tl.int64)
    pid = pid // n_groups
    rb = pid % n_rb
    pp = pid // n_rb
    b = tl.program_id(2).to(tl.int64)
    group = b * n_groups + p
    rr = rb * BLOCK_R + tl.arange(0, BLOCK_R)
    r_mask = rr < m
    x_base = x_ptr + b * xs_b + p * xs_p
    sp_base = sp_ptr + group * n_split * m * d
    zp_base = zp_ptr + group * n_split * d
    # the first position span's programs store the summed S (their rows) and z
    for c0 in range(0, tl.where(pp == 0, d, 0), BLOCK_C):
        rc = c0 + tl.arange(0, BLOCK_C)
        c_mask = rc < d
        mask = r_mask[:, None] & c_mask[None, :]
        tl.store(s_ptr + group * m * d + _tile(rr, rc, d, 1), _summed(sp_base, n_split, m * d, _tile(rr, rc, d, 1),
                                                                     mask), mask=mask)
        if rb == 0:
            tl.store(z_ptr + group * d + rc, _summed(zp_base, n_split, d, rc, c_mask), mask=c_mask)
    if SINGLE:  # one channel block: S and z summed once per program
        rc = tl.arange(0, BLOCK_C)
        c_mask = rc < d
        w_one = _operand(_summed(sp_base, n_split, m * d, _tile(rr, rc, d, 1), r_mask[:, None] & c_mask[None, :]),
                         in_ty)
        z_one = _summed(zp_base, n_split, d, rc, c_mask)
    start, end = _span(0, n_pos, pp, n_prog, BLOCK_N)
    for n0 in range(start, end, BLOCK_N):
        rn = n0 + tl.arange(0, BLOCK_N)
        n_mask = rn < end
        acc = tl.zeros([BLOCK_R, BLOCK_N], dtype=acc_ty)
        den = tl.zeros([BLOCK_N], dtype=acc_ty)
        if SINGLE:
            x = _features(x_base, rc, rn, xs_c, xs_n, c_mask[:, None] & n_mask[None, :], acc_ty)
            den += tl.sum(z_one[:, None] * x, axis=0)
            acc = _dot(w_one, _operand(x, in_ty), acc)
        else:
            for c0 in range(0, d, BLOCK_C):
                rc = c0 + tl.arange(0, BLOCK_C)
                c_mask = rc < d
                x = _features(x_base, rc, rn, xs_c, xs_n, c_mask[:, None] & n_mask[None, :], acc_ty)
                zz = _summed(zp_base, n_split, d, rc, c_mask)
                den += tl.sum(zz[:, None] * x, axis=0)
                w = _summed(sp_base, n_split, m * d, _tile(rr, rc, d, 1), r_mask[:, None] & c_mask[None, :])
                acc = _dot(_operand(w, in_ty), _operand(x, in_ty), acc)
        acc = acc / tl.maximum(den, EPS)[None, :]
        tl.store(y_ptr + b * ys_b + p * ys_p + _tile(rr, rn, ys_r, ys_n), acc.to(y_ptr.dtype.element_ty),
                 mask=r_mask[:, None] & n_mask[None, :])


@triton.jit
def _query_grad_kernel(
    s_ptr, z_ptr,  # S [B, G, m, d] and z [B, G, d], contiguous, accumulation dtype
    x_ptr, xs_b, xs_p, xs_c, xs_n,  # query logits [B, G, d, N] (group stride 0 when gathered)
    w_ptr, ws_b, ws_p, ws_c, ws_n,  # g = dL/dout [B, G, m, N]
    y_ptr, ys_b, ys_p, ys_c, ys_n,  # dq, like the logits
    rden_ptr, bvec_ptr,  # not FUSE_DS: [B, G, N] contiguous, 1/den and b per position (for _reduce_kernel)
    dsp_ptr, dzp_ptr,  # FUSE_DS: partials of dS [B, G, n_prog, m, d] and dz [B, G, n_prog, d]
    d, m, n_pos, n_groups, n_inner, n_prog,
    BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr, FUSE_DS: tl.constexpr,
):
    acc_ty = s_ptr.dtype.element_ty
    in_ty = x_ptr.dtype.element_ty
    pp = tl.program_id(0)
    p_out = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    x_base = x_ptr + b * xs_b + p_out * xs_p
    y_base = y_ptr + b * ys_b + p_out * ys_p
    start, end = _span(0, n_pos, pp, n_prog, BLOCK_N)
    if FUSE_DS:  # one channel block and one source (p = p_out): S, z in registers, dS, dz accumulated here
        group = b * n_groups + p_out
        rc = tl.arange(0, BLOCK_C)
        c_mask = rc < d
        r_mask = rc < m
        s_one = tl.load(s_ptr + group * m * d + _tile(rc, rc, d, 1), mask=r_mask[:, None] & c_mask[None, :],
                        other=0.0)
        s_op = _operand(s_one, in_ty)
        z_one = tl.load(z_ptr + group * d + rc, mask=c_mask, other=0.0)
        ds_acc = tl.zeros([BLOCK_C, BLOCK_C], dtype=acc_ty)
        dz_acc = tl.zeros([BLOCK_C], dtype=acc_ty)
        w_base = w_ptr + b * ws_b + p_out * ws_p
        for n0 in range(start, end, BLOCK_N):
            rn = n0 + tl.arange(0, BLOCK_N)
            n_mask = rn < end
            x_mask = c_mask[:, None] & n_mask[None, :]
            logit = tl.load(x_base + _tile(rc, rn, xs_c, xs_n), mask=x_mask, other=0.0).to(acc_ty)
            x = tl.where(x_mask, _softplus(logit), 0.0)
            x_op = _operand(x, in_ty)
            gr = tl.load(w_base + _tile(rc, rn, ws_c, ws_n), mask=r_mask[:, None] & n_mask[None, :],
                         other=0.0).to(acc_ty)
            sq = _dot(s_op, x_op, tl.zeros([BLOCK_C, BLOCK_N], dtype=acc_ty))
            den = tl.sum(z_one[:, None] * x, axis=0)
            rden = 1.0 / tl.maximum(den, EPS)
            # the clamp max(z.q, eps) passes no gradient to z.q where it is active
            bvec = tl.where(den >= EPS, -tl.sum(gr * sq, axis=0) * rden * rden, 0.0)
            a_op = _operand(gr * rden[None, :], in_ty)
            dq = _dot(tl.trans(s_op), a_op, tl.zeros([BLOCK_C, BLOCK_N], dtype=acc_ty))
            dq = (dq + z_one[:, None] * bvec[None, :]) * _softplus_grad(logit)
            tl.store(y_base + _tile(rc, rn, ys_c, ys_n), dq.to(y_ptr.dtype.element_ty), mask=x_mask)
            ds_acc = _dot(a_op, tl.trans(x_op), ds_acc)
            dz_acc += tl.sum(x * bvec[None, :], axis=1)
        part = group * n_prog + pp
        tl.store(dsp_ptr + part * m * d + _tile(rc, rc, d, 1), ds_acc, mask=r_mask[:, None] & c_mask[None, :])
        tl.store(dzp_ptr + part * d + rc, dz_acc, mask=c_mask)
    else:
        for n0 in range(start, end, BLOCK_N):
            rn = n0 + tl.arange(0, BLOCK_N)
            n_mask = rn < end
            # 1/den and b of every source at these positions, stored for the dq pass and _reduce_kernel
            for i in range(n_inner):
                p = p_out + i
                group = b * n_groups + p
                w_base = w_ptr + b * ws_b + p * ws_p
                den = tl.zeros([BLOCK_N], dtype=acc_ty)
                gsq = tl.zeros([BLOCK_N], dtype=acc_ty)
                for r0 in range(0, tl.maximum(m, 1), BLOCK_C):  # at least once: m = 0 still gets den
                    rr = r0 + tl.arange(0, BLOCK_C)
                    r_mask = rr < m
                    sq = tl.zeros([BLOCK_C, BLOCK_N], dtype=acc_ty)
                    for c0 in range(0, d, BLOCK_C):
                        rc = c0 + tl.arange(0, BLOCK_C)
                        c_mask = rc < d
                        x = _features(x_base, rc, rn, xs_c, xs_n, c_mask[:, None] & n_mask[None, :], acc_ty)
                        if r0 == 0:
                            zz = tl.load(z_ptr + group * d + rc, mask=c_mask, other=0.0)
                            den += tl.sum(zz[:, None] * x, axis=0)
                        s = tl.load(s_ptr + group * m * d + _tile(rr, rc, d, 1),
                                    mask=r_mask[:, None] & c_mask[None, :], other=0.0)
                        sq = _dot(_operand(s, in_ty), _operand(x, in_ty), sq)
                    gr = tl.load(w_base + _tile(rr, rn, ws_c, ws_n), mask=r_mask[:, None] & n_mask[None, :],
                                 other=0.0).to(acc_ty)
                    gsq += tl.sum(gr * sq, axis=0)
                rden = 1.0 / tl.maximum(den, EPS)
                bvec = tl.where(den >= EPS, -gsq * rden * rden, 0.0)
                tl.store(rden_ptr + group * n_pos + rn, rden, mask=n_mask)
                tl.store(bvec_ptr + group * n_pos + rn, bvec, mask=n_mask)
            tl.debug_barrier()  # the rows just stored are read back by other threads of this program
            for c0 in range(0, d, BLOCK_C):
                rc = c0 + tl.arange(0, BLOCK_C)
                c_mask = rc < d
                x_mask = c_mask[:, None] & n_mask[None, :]
                dq = tl.zeros([BLOCK_C, BLOCK_N], dtype=acc_ty)
                for i in range(n_inner):  # a gathered query sums its sources' terms in source order
                    p = p_out + i
                    group = b * n_groups + p
                    w_base = w_ptr + b * ws_b + p * ws_p
                    rden = tl.load(rden_ptr + group * n_pos + rn, mask=n_mask, other=0.0)
                    bvec = tl.load(bvec_ptr + group * n_pos + rn, mask=n_mask, other=0.0)
                    for r0 in range(0, m, BLOCK_C):
                        rr = r0 + tl.arange(0, BLOCK_C)
                        r_mask = rr < m
                        s = tl.load(s_ptr + group * m * d + _tile(rr, rc, d, 1),
                                    mask=r_mask[:, None] & c_mask[None, :], other=0.0)
                        gr = tl.load(w_base + _tile(rr, rn, ws_c, ws_n), mask=r_mask[:, None] & n_mask[None, :],
                                     other=0.0).to(acc_ty)
                        dq = _dot(tl.trans(_operand(s, in_ty)), _operand(gr * rden[None, :], in_ty), dq)
                    zz = tl.load(z_ptr + group * d + rc, mask=c_mask, other=0.0)
                    dq += zz[:, None] * bvec[None, :]
                logit = tl.load(x_base + _tile(rc, rn, xs_c, xs_n), mask=x_mask, other=0.0).to(acc_ty)
                dq = dq * _softplus_grad(logit)
                tl.store(y_base + _tile(rc, rn, ys_c, ys_n), dq.to(y_ptr.dtype.element_ty), mask=x_mask)


@triton.jit
def _source_grad_kernel(
    sp_ptr, zp_ptr, n_split,  # partials of dS [B, G, n_split, m, d] and dz [B, G, n_split, d]
    x_ptr, xs_b, xs_p, xs_c, xs_n,  # key logits [B, G, d, N]
    w_ptr, ws_b, ws_p, ws_c, ws_n,  # values [B, G, m, N]
    y_ptr, ys_b, ys_p, ys_c, ys_n,  # dk, like the keys
    u_ptr, us_b, us_p, us_c, us_n,  # dv, like the values
    d, m, n_pos, n_groups, p_base, n_prog, o0, o1, o2, o3, o4, o5, o6, o7, o8,
    BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr, SINGLE: tl.constexpr, RAGGED: tl.constexpr,
):
    acc_ty = sp_ptr.dtype.element_ty
    in_ty = x_ptr.dtype.element_ty
    pp = tl.program_id(0)
    g = tl.program_id(1)
    p = (p_base + g).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    group = b * n_groups + p
    x_base = x_ptr + b * xs_b + p * xs_p
    w_base = w_ptr + b * ws_b + p * ws_p
    y_base = y_ptr + b * ys_b + p * ys_p
    u_base = u_ptr + b * us_b + p * us_p
    sp_base = sp_ptr + group * n_split * m * d
    zp_base = zp_ptr + group * n_split * d
    lo, hi = _bounds(g, n_pos, o0, o1, o2, o3, o4, o5, o6, o7, o8, RAGGED)
    start, end = _span(lo, hi, pp, n_prog, BLOCK_N)
    if SINGLE:  # one channel block: dS and dz summed once per program
        rc = tl.arange(0, BLOCK_C)
        c_mask = rc < d
        r_mask = rc < m
        ds_op = _operand(_summed(sp_base, n_split, m * d, _tile(rc, rc, d, 1), r_mask[:, None] & c_mask[None, :]),
                         in_ty)
        dz_one = _summed(zp_base, n_split, d, rc, c_mask)
        for n0 in range(start, end, BLOCK_N):
            rn = n0 + tl.arange(0, BLOCK_N)
            n_mask = rn < end
            x_mask = c_mask[:, None] & n_mask[None, :]
            v_mask = r_mask[:, None] & n_mask[None, :]
            logit = tl.load(x_base + _tile(rc, rn, xs_c, xs_n), mask=x_mask, other=0.0).to(acc_ty)
            x_op = _operand(tl.where(x_mask, _softplus(logit), 0.0), in_ty)
            v_op = _operand(tl.load(w_base + _tile(rc, rn, ws_c, ws_n), mask=v_mask, other=0.0).to(acc_ty), in_ty)
            dv = _dot(ds_op, x_op, tl.zeros([BLOCK_C, BLOCK_N], dtype=acc_ty))
            tl.store(u_base + _tile(rc, rn, us_c, us_n), dv.to(u_ptr.dtype.element_ty), mask=v_mask)
            dk = _dot(tl.trans(ds_op), v_op, tl.zeros([BLOCK_C, BLOCK_N], dtype=acc_ty))
            dk = (dk + dz_one[:, None]) * _softplus_grad(logit)
            tl.store(y_base + _tile(rc, rn, ys_c, ys_n), dk.to(y_ptr.dtype.element_ty), mask=x_mask)
    else:
        for n0 in range(start, end, BLOCK_N):
            rn = n0 + tl.arange(0, BLOCK_N)
            n_mask = rn < end
            for r0 in range(0, m, BLOCK_C):  # dv, one block of m rows at a time
                rr = r0 + tl.arange(0, BLOCK_C)
                r_mask = rr < m
                dv = tl.zeros([BLOCK_C, BLOCK_N], dtype=acc_ty)
                for c0 in range(0, d, BLOCK_C):
                    rc = c0 + tl.arange(0, BLOCK_C)
                    c_mask = rc < d
                    x = _features(x_base, rc, rn, xs_c, xs_n, c_mask[:, None] & n_mask[None, :], acc_ty)
                    ds = _summed(sp_base, n_split, m * d, _tile(rr, rc, d, 1), r_mask[:, None] & c_mask[None, :])
                    dv = _dot(_operand(ds, in_ty), _operand(x, in_ty), dv)
                tl.store(u_base + _tile(rr, rn, us_c, us_n), dv.to(u_ptr.dtype.element_ty),
                         mask=r_mask[:, None] & n_mask[None, :])
            for c0 in range(0, d, BLOCK_C):  # dk, one block of d rows at a time
                rc = c0 + tl.arange(0, BLOCK_C)
                c_mask = rc < d
                x_mask = c_mask[:, None] & n_mask[None, :]
                dk = tl.zeros([BLOCK_C, BLOCK_N], dtype=acc_ty)
                for r0 in range(0, m, BLOCK_C):
                    rr = r0 + tl.arange(0, BLOCK_C)
                    r_mask = rr < m
                    ds = _summed(sp_base, n_split, m * d, _tile(rr, rc, d, 1), r_mask[:, None] & c_mask[None, :])
                    v = tl.load(w_base + _tile(rr, rn, ws_c, ws_n), mask=r_mask[:, None] & n_mask[None, :],
                                other=0.0).to(acc_ty)
                    dk = _dot(tl.trans(_operand(ds, in_ty)), _operand(v, in_ty), dk)
                dz = _summed(zp_base, n_split, d, rc, c_mask)
                logit = tl.load(x_base + _tile(rc, rn, xs_c, xs_n), mask=x_mask, other=0.0).to(acc_ty)
                dk = (dk + dz[:, None]) * _softplus_grad(logit)
                tl.store(y_base + _tile(rc, rn, ys_c, ys_n), dk.to(y_ptr.dtype.element_ty), mask=x_mask)


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
    "reduce": (_reduce_kernel, ("rden_ptr", "bvec_ptr", "s_ptr", "z_ptr"),
               {"BACKWARD": (False, True), "RAGGED": (False, True)}),
    "apply": (_apply_kernel, ("sp_ptr", "zp_ptr", "s_ptr", "z_ptr"), {"SINGLE": (True, False)}),
    "query_grad": (_query_grad_kernel, ("s_ptr", "z_ptr", "rden_ptr", "bvec_ptr", "dsp_ptr", "dzp_ptr"),
                   {"FUSE_DS": (True, False)}),
    "source_grad": (_source_grad_kernel, ("sp_ptr", "zp_ptr"), {"SINGLE": (True, False), "RAGGED": (False, True)}),
}


# ---------------------------------------------------------------------------------------------- launchers


class Config(NamedTuple):
    block_c: int  # block of every channel axis (d and m): a power of two >= 16 for tl.dot
    block_n: int  # block of positions
    num_warps: int
    num_stages: int = 1


# the configs a GPU launch can use; the compile check builds each, spill-free on sm_80 and sm_90
# (spill-free for fp32/fp16/bf16 on sm_80 and sm_90: wider position blocks spill the tf32x3 variants)
GPU_CONFIGS = (Config(32, 32, 8), Config(64, 16, 8))
# programs per group along the positions: enough to fill a GPU, few enough that summing the partials stays cheap
MAX_SPLITS = 16


def fuses_ds(dtype: torch.dtype) -> bool:
    """Whether _query_grad_kernel may accumulate dS itself (FUSE_DS): for half-precision inputs only. With fp32's
    tf32x3 (operands split in three) or fp64 its three products and the dS accumulator spill on sm_90."""
    return dtype in (torch.float16, torch.bfloat16)


_FORCED: list = []  # the config of an enclosing `forced_config`, if any


@contextlib.contextmanager
def forced_config(cfg: Config):
    """Launch every kernel with `cfg` inside this block (benchmarks/tune_kernels.py times candidates so)."""
    _FORCED.append(Config(*cfg))
    try:
        yield
    finally:
        _FORCED.pop()


def pick_config(d: int, m: int) -> Config:
    """Blocks for channel sizes d, m: one 64-wide block where both fit (the network's finest scale, C = 36, runs
    as one block), else 32-wide blocks unless 64-wide ones pad no more; one big block in the interpreter."""
    if _FORCED:
        return _FORCED[-1]
    c = max(d, m)
    if INTERPRETED:  # each interpreted program costs milliseconds: as few programs as possible
        return Config(min(64, max(16, triton.next_power_of_2(c))), 64, 4)
    return GPU_CONFIGS[1] if c > 32 and triton.cdiv(c, 64) * 64 == triton.cdiv(c, 32) * 32 else GPU_CONFIGS[0]


def _strides(t: torch.Tensor) -> tuple:
    """(s_b, s_p, s_c, s_n) of a [B, G, C, N] tensor; a [B, C, N] tensor (gathered layout) is shared by every
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
    """How many spans to cut n positions into: enough programs to fill a GPU, at most MAX_SPLITS."""
    blocks = max(1, triton.cdiv(n, block_n))
    if INTERPRETED:  # keep a few splits so the partial-sum path is exercised on CPU too
        return min(4, blocks)
    target = 4 * 132  # ~4 programs per SM of an H100/H200
    return max(1, min(blocks, MAX_SPLITS, triton.cdiv(target, max(1, programs_per_split))))


_UNUSED_BOUNDS = (0,) * (MAX_SOURCES + 1)  # o0..o8 of a launch whose groups all span 0:n (RAGGED off)


def _longest(n: int, offsets: Optional[Sequence[int]]) -> int:
    """Positions of the longest group: n for stacked pairs, the longest gathered source otherwise."""
    return n if offsets is None else max((hi - lo for lo, hi in zip(offsets, offsets[1:])), default=0)


def _source_launches(n_groups: int, n: int, offsets: Optional[Sequence[int]]):
    """(p_base, groups, o0..o8, ragged) per launch of a source-side kernel: one launch for stacked pairs (every
    group spans 0:n) and one per MAX_SOURCES gathered sources."""
    if offsets is None:
        return [(0, n_groups, _UNUSED_BOUNDS, False)]
    launches = []
    for j in range(0, n_groups, MAX_SOURCES):
        chunk = list(offsets[j:j + MAX_SOURCES + 1])
        launches.append((j, len(chunk) - 1, tuple(chunk + [chunk[-1]] * (MAX_SOURCES + 1 - len(chunk))), True))
    return launches


def _blocks(c: int, cfg: Config) -> int:
    return triton.cdiv(c, cfg.block_c)


def forward(q, k, v, offsets: Optional[Sequence[int]] = None):
    """out, S, z of the stacked (offsets None: q, k [B, P, d, N], v [B, P, m, N]) or gathered layout
    (q [B, d, Nq], k [B, d, Ntot], v [B, m, Ntot], J+1 offsets); out is [B, P or J, m, Nq]."""
    B, d, n_q, n_k = q.shape[0], q.shape[-2], q.shape[-1], k.shape[-1]
    m = v.shape[-2]
    G = len(offsets) - 1 if offsets is not None else q.shape[1]
    cfg = pick_config(d, m)
    acc = accumulation_dtype(q.dtype)
    launches = _source_launches(G, n_k, offsets)
    tiles = max(1, _blocks(m, cfg)) * _blocks(d, cfg)
    n_split = _num_splits(_longest(n_k, offsets), tiles * B * G, cfg.block_n)
    s_part = torch.empty(B, G, n_split, m, d, device=q.device, dtype=acc)
    z_part = torch.empty(B, G, n_split, d, device=q.device, dtype=acc)
    for p_base, n_groups, bounds, ragged in launches:
        _launch(_reduce_kernel, (n_split * tiles * n_groups, 1, B), k, *_strides(k), v, *_strides(v),
                s_part, s_part, s_part, z_part, d, m, n_k, G, p_base, n_groups, n_split, *bounds,
                BLOCK_M=cfg.block_c, BLOCK_D=cfg.block_c, BLOCK_N=cfg.block_n, BACKWARD=False, RAGGED=ragged,
                num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    S = torch.empty(B, G, m, d, device=q.device, dtype=acc)
    z = torch.empty(B, G, d, device=q.device, dtype=acc)
    out = torch.empty(B, G, m, n_q, device=q.device, dtype=q.dtype)
    row_blocks = max(1, _blocks(m, cfg))
    n_prog = _num_splits(n_q, row_blocks * B * G, cfg.block_n)
    _launch(_apply_kernel, (row_blocks * n_prog * G, 1, B), s_part, z_part, n_split, S, z, q, *_strides(q),
            out, *_strides(out), m, d, n_q, G, n_prog,
            BLOCK_R=cfg.block_c, BLOCK_C=cfg.block_c, BLOCK_N=cfg.block_n, SINGLE=max(d, m) <= cfg.block_c,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out, S, z


def backward(grad, q, k, v, S, z, offsets: Optional[Sequence[int]] = None):
    """dq, dk, dv (shapes of q, k, v, contiguous) from grad = dL/dout and the saved S, z."""
    gathered = offsets is not None
    B, G, m, n_q = grad.shape
    d, n_k = q.shape[-2], k.shape[-1]
    cfg = pick_config(d, m)
    single = max(d, m) <= cfg.block_c
    fuse = single and not gathered and fuses_ds(q.dtype)
    acc = accumulation_dtype(q.dtype)
    meta = dict(BLOCK_C=cfg.block_c, BLOCK_N=cfg.block_n, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    n_out = 1 if gathered else G
    n_prog = _num_splits(n_q, B * n_out, cfg.block_n)
    dq = torch.empty(q.shape, device=q.device, dtype=q.dtype)
    if fuse:
        n_split = n_prog
        ds_part = torch.empty(B, G, n_split, m, d, device=q.device, dtype=acc)
        dz_part = torch.empty(B, G, n_split, d, device=q.device, dtype=acc)
        rden = bvec = dz_part  # unused
    else:
        rden = torch.empty(B, G, n_q, device=q.device, dtype=acc)
        bvec = torch.empty_like(rden)
        ds_part = dz_part = rden  # unused by _query_grad_kernel
    _launch(_query_grad_kernel, (n_prog, n_out, B), S, z, q, *_strides(q), grad, *_strides(grad),
            dq, *_strides(dq), rden, bvec, ds_part, dz_part, d, m, n_q, G, G if gathered else 1, n_prog,
            FUSE_DS=fuse, **meta)
    if not fuse:
        tiles = max(1, _blocks(m, cfg)) * _blocks(d, cfg)
        n_split = _num_splits(n_q, tiles * B * G, cfg.block_n)
        ds_part = torch.empty(B, G, n_split, m, d, device=q.device, dtype=acc)
        dz_part = torch.empty(B, G, n_split, d, device=q.device, dtype=acc)
        _launch(_reduce_kernel, (n_split * tiles * G, 1, B), q, *_strides(q), grad, *_strides(grad),
                rden, bvec, ds_part, dz_part, d, m, n_q, G, 0, G, n_split, *_UNUSED_BOUNDS,
                BLOCK_M=cfg.block_c, BLOCK_D=cfg.block_c, BLOCK_N=cfg.block_n, BACKWARD=True, RAGGED=False,
                num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    dk = torch.empty(k.shape, device=k.device, dtype=k.dtype)
    dv = torch.empty(v.shape, device=v.device, dtype=v.dtype)
    n_prog_k = _num_splits(_longest(n_k, offsets), B * G, cfg.block_n)
    for p_base, n_groups, bounds, ragged in _source_launches(G, n_k, offsets):
        _launch(_source_grad_kernel, (n_prog_k, n_groups, B), ds_part, dz_part, n_split, k, *_strides(k),
                v, *_strides(v), dk, *_strides(dk), dv, *_strides(dv), d, m, n_k, G, p_base, n_prog_k, *bounds,
                SINGLE=single, RAGGED=ragged, **meta)
    return dq, dk, dv
