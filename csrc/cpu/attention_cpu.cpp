// CPU kernels of the gathered core (see ../attention.h): tiles of positions in L2-sized fp32/fp64 buffers, fused
// softplus/clamp/division, register-blocked micro-kernels vectorized along the contiguous axis, and partial sums
// per fixed-size chunk of positions reduced in chunk order, so results never depend on the thread count.
#include "../attention.h"
#include "../attention_math.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>

namespace fused_mtl_attn {
namespace {

// 64-byte vectors (GCC vector extensions): lowered to AVX-512/AVX2/SSE by the compiler flags
template <typename T> struct Vec;
template <> struct Vec<float> {
  typedef float type __attribute__((vector_size(64)));
  typedef int32_t itype __attribute__((vector_size(64)));
  static constexpr int W = 16;
};
template <> struct Vec<double> {
  typedef double type __attribute__((vector_size(64)));
  static constexpr int W = 8;
};
template <typename T> using V = typename Vec<T>::type;

template <typename T> inline V<T> vload(const T* p) { V<T> r; std::memcpy(&r, p, sizeof(r)); return r; }
template <typename T> inline void vstore(T* p, const V<T>& v) { std::memcpy(p, &v, sizeof(v)); }
template <typename T> inline V<T> vsplat(T x) { return V<T>{} + x; }

inline int64_t round_up(int64_t x, int64_t to) { return (x + to - 1) / to * to; }

// a zeroed, 64-byte aligned scratch array owned by one work item
template <typename T>
struct Scratch {
  T* ptr;
  explicit Scratch(int64_t n) {
    const size_t bytes = static_cast<size_t>(round_up(std::max<int64_t>(n, 1) * sizeof(T), 64));
    ptr = static_cast<T*>(std::aligned_alloc(64, bytes));
    TORCH_CHECK(ptr != nullptr, "fused_mtl_attn: out of memory for a ", bytes, "-byte scratch buffer");
    std::memset(ptr, 0, bytes);
  }
  ~Scratch() { std::free(ptr); }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  T* get() const { return ptr; }
};

// ---------------------------------------------------------------- softplus on vectors
// exp(x) for x <= 0 (Cody-Waite reduction, degree-7 polynomial; relative error ~1e-7)
inline V<float> exp_nonpositive(V<float> x) {
  using VF = V<float>;
  using VI = Vec<float>::itype;
  x = x < -87.0f ? vsplat(-87.0f) : x;
  const VF n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round to nearest
  VF r = x - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  VF p = vsplat(1.0f / 5040.0f);
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const VI bits = (__builtin_convertvector(n, VI) + 127) << 23;
  VF scale;
  std::memcpy(&scale, &bits, sizeof(scale));  // 2^n from the exponent bits
  return p * scale;
}

// log1p(e) for e in [0, 1]: 2 atanh(s) with s = e / (2 + e) <= 1/3, no cancellation for tiny e
inline V<float> log1p_unit(V<float> e) {
  const V<float> s = e / (e + 2.0f);
  const V<float> s2 = s * s;
  V<float> p = vsplat(1.0f / 15.0f);
  p = p * s2 + 1.0f / 13.0f;
  p = p * s2 + 1.0f / 11.0f;
  p = p * s2 + 1.0f / 9.0f;
  p = p * s2 + 1.0f / 7.0f;
  p = p * s2 + 1.0f / 5.0f;
  p = p * s2 + 1.0f / 3.0f;
  p = p * s2 + 1.0f;
  return 2.0f * s * p;
}

// x <- softplus(x) over n (a multiple of 16) floats; sig (if given) <- d softplus / dx, the threshold-20 rule
void softplus_inplace(float* x, float* sig, int64_t n) {
  using VF = V<float>;
  const float threshold = static_cast<float>(kSoftplusThreshold);
  for (int64_t i = 0; i < n; i += Vec<float>::W) {
    const VF a = vload(x + i);
    const VF neg_abs = a > 0.0f ? -a : a;
    const VF e = exp_nonpositive(neg_abs);
    const VF pos = a > 0.0f ? a : vsplat(0.0f);
    vstore(x + i, a > threshold ? a : pos + log1p_unit(e));
    if (sig) {
      const VF inv = 1.0f / (e + 1.0f);
      const VF s = a >= 0.0f ? inv : e * inv;
      vstore(sig + i, a > threshold ? vsplat(1.0f) : s);
    }
  }
}

// fp64 (gradcheck) uses the exact library functions of the shared header
void softplus_inplace(double* x, double* sig, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    if (sig) sig[i] = softplus_grad(x[i]);
    x[i] = softplus(x[i]);
  }
}

// ---------------------------------------------------------------- micro-kernels
// C[r][0:dp] += sum_{p < len} X[r*ldx + p] * Y[p*dp + 0:dp]   (a reduction over positions, outer-product form);
// one block holds RB rows x NV vectors of C in registers
template <typename T, int RB, int NV>
inline void outer_block(const T* X, int64_t ldx, const T* Y, int64_t dp, int64_t len, int64_t c0, T* C) {
  constexpr int W = Vec<T>::W;
  V<T> acc[RB][NV];
  for (int r = 0; r < RB; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = vload(C + r * dp + c0 + v * W);
  for (int64_t p = 0; p < len; ++p) {
    V<T> y[NV];
    for (int v = 0; v < NV; ++v) y[v] = vload(Y + p * dp + c0 + v * W);
    for (int r = 0; r < RB; ++r) {
      const T a = X[r * ldx + p];
      for (int v = 0; v < NV; ++v) acc[r][v] += a * y[v];
    }
  }
  for (int r = 0; r < RB; ++r)
    for (int v = 0; v < NV; ++v) vstore(C + r * dp + c0 + v * W, acc[r][v]);
}

template <typename T, int NV>
inline void outer_columns(const T* X, int64_t rows, int64_t ldx, const T* Y, int64_t dp, int64_t len, int64_t c0,
                          T* C) {
  constexpr int RB = 6;
  int64_t r = 0;
  for (; r + RB <= rows; r += RB) outer_block<T, RB, NV>(X + r * ldx, ldx, Y, dp, len, c0, C + r * dp);
  for (; r < rows; ++r) outer_block<T, 1, NV>(X + r * ldx, ldx, Y, dp, len, c0, C + r * dp);
}

template <typename T>
void outer_accumulate(const T* X, int64_t rows, int64_t ldx, const T* Y, int64_t dp, int64_t len, T* C) {
  constexpr int W = Vec<T>::W;
  int64_t c0 = 0;
  for (; c0 + 4 * W <= dp; c0 += 4 * W) outer_columns<T, 4>(X, rows, ldx, Y, dp, len, c0, C);
  for (; c0 < dp; c0 += 2 * W) outer_columns<T, 2>(X, rows, ldx, Y, dp, len, c0, C);
}

// O[r*ldo + t] = sum_{c < K} A[r*ar + c*ac] * Y[c*ldy + t] for t < tp   (an application to a tile of positions);
// one block holds RB rows x NV vectors of O in registers
template <typename T, int RB, int NV>
inline void apply_block(const T* A, int64_t ar, int64_t ac, int64_t K, const T* Y, int64_t ldy, int64_t t0, T* O,
                        int64_t ldo) {
  constexpr int W = Vec<T>::W;
  V<T> acc[RB][NV];
  for (int r = 0; r < RB; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = vsplat(T(0));
  for (int64_t c = 0; c < K; ++c) {
    V<T> y[NV];
    for (int v = 0; v < NV; ++v) y[v] = vload(Y + c * ldy + t0 + v * W);
    for (int r = 0; r < RB; ++r) {
      const T a = A[r * ar + c * ac];
      for (int v = 0; v < NV; ++v) acc[r][v] += a * y[v];
    }
  }
  for (int r = 0; r < RB; ++r)
    for (int v = 0; v < NV; ++v) vstore(O + r * ldo + t0 + v * W, acc[r][v]);
}

template <typename T, int NV>
inline void apply_positions(const T* A, int64_t rows, int64_t ar, int64_t ac, int64_t K, const T* Y, int64_t ldy,
                            int64_t t0, T* O, int64_t ldo) {
  constexpr int RB = 6;
  int64_t r = 0;
  for (; r + RB <= rows; r += RB) apply_block<T, RB, NV>(A + r * ar, ar, ac, K, Y, ldy, t0, O + r * ldo, ldo);
  for (; r < rows; ++r) apply_block<T, 1, NV>(A + r * ar, ar, ac, K, Y, ldy, t0, O + r * ldo, ldo);
}

template <typename T>
void apply(const T* A, int64_t rows, int64_t ar, int64_t ac, int64_t K, const T* Y, int64_t ldy, int64_t tp, T* O,
           int64_t ldo) {
  constexpr int W = Vec<T>::W;
  int64_t t0 = 0;
  for (; t0 + 4 * W <= tp; t0 += 4 * W) apply_positions<T, 4>(A, rows, ar, ac, K, Y, ldy, t0, O, ldo);
  for (; t0 < tp; t0 += 2 * W) apply_positions<T, 2>(A, rows, ar, ac, K, Y, ldy, t0, O, ldo);
}

// buf[r*ld + t] = src[r*n + lo + t] for r < rows, t < len (converted to the accumulation type)
template <typename scalar_t, typename T>
void load_rows(const scalar_t* src, int64_t rows, int64_t n, int64_t lo, int64_t len, T* buf, int64_t ld) {
  for (int64_t r = 0; r < rows; ++r) {
    const scalar_t* s = src + r * n + lo;
    T* b = buf + r * ld;
    for (int64_t t = 0; t < len; ++t) b[t] = static_cast<T>(s[t]);
  }
}

// ---------------------------------------------------------------- geometry shared by forward and backward
struct Geometry {
  int64_t groups, d, m, nq, nk, segments;
  int64_t dp;     // d padded to two vectors
  int64_t tile;   // positions per tile (a multiple of two vectors), sized so a work item's buffers fit in L2
  int64_t chunk;  // positions per partial sum (a multiple of tile; fixed by the shapes, not the thread count)
  int64_t partial() const { return (m + 1) * dp; }
};

template <typename T>
Geometry geometry(const Tensor& q, const Tensor& v, int64_t nk, int64_t segments) {
  Geometry g;
  g.groups = q.size(0);
  g.d = q.size(1);
  g.nq = q.size(2);
  g.m = v.size(1);
  g.nk = nk;
  g.segments = segments;
  const int64_t two_vec = 2 * Vec<T>::W;
  g.dp = round_up(std::max<int64_t>(g.d, 1), two_vec);
  const int64_t rows = 5 * g.d + 2 * g.m + 1 + g.dp;  // the backward query pass holds the most
  g.tile = std::clamp<int64_t>((196608 / static_cast<int64_t>(sizeof(T)) / rows) / two_vec * two_vec, 2 * two_vec, 512);
  g.chunk = g.tile * std::max<int64_t>(1, 2048 / g.tile);
  return g;
}

struct Span {
  int64_t segment, lo, hi;
};

// the positions of each segment cut into pieces of at most `size`, in segment order
std::vector<Span> cut(const std::vector<int64_t>& offsets, int64_t size, std::vector<int64_t>* first = nullptr) {
  std::vector<Span> spans;
  for (size_t j = 0; j + 1 < offsets.size(); ++j) {
    if (first) first->push_back(static_cast<int64_t>(spans.size()));
    for (int64_t lo = offsets[j]; lo < offsets[j + 1]; lo += size)
      spans.push_back({static_cast<int64_t>(j), lo, std::min(lo + size, offsets[j + 1])});
  }
  if (first) first->push_back(static_cast<int64_t>(spans.size()));
  return spans;
}

// dst[r][c] = sum over the partials, in order, of partial[r][c] (c < d of a row of dp)
template <typename T>
void sum_partials(const T* partials, int64_t count, int64_t stride, const Geometry& g, T* dst, int64_t ld_dst) {
  for (int64_t r = 0; r <= g.m; ++r)
    for (int64_t c = 0; c < g.d; ++c) dst[r * ld_dst + c] = T(0);
  for (int64_t i = 0; i < count; ++i) {
    const T* p = partials + i * stride;
    for (int64_t r = 0; r <= g.m; ++r)
      for (int64_t c = 0; c < g.d; ++c) dst[r * ld_dst + c] += p[r * g.dp + c];
  }
}

// ---------------------------------------------------------------- forward
template <typename scalar_t, typename T>
void forward_kernel(const Geometry& g, const std::vector<int64_t>& offsets, const scalar_t* q, const scalar_t* k,
                    const scalar_t* v, scalar_t* out, T* context) {
  const int64_t d = g.d, m = g.m, J = g.segments, tile = g.tile, dp = g.dp;
  // 1. reduction over source positions: S and z of each (group, segment) from partials per chunk
  std::vector<int64_t> first;
  const std::vector<Span> chunks = cut(offsets, g.chunk, &first);
  const int64_t n_chunks = static_cast<int64_t>(chunks.size());
  Scratch<T> partial(g.groups * n_chunks * g.partial());
  at::parallel_for(0, g.groups * n_chunks, 1, [&](int64_t begin, int64_t end) {
    Scratch<T> k_t(tile * dp), v_ext((m + 1) * tile);
    for (int64_t t = 0; t < tile; ++t) v_ext.get()[m * tile + t] = T(1);  // the ones row gives z
    for (int64_t item = begin; item < end; ++item) {
      const int64_t grp = item / n_chunks;
      const Span& ch = chunks[item % n_chunks];
      T* acc = partial.get() + item * g.partial();
      for (int64_t lo = ch.lo; lo < ch.hi; lo += tile) {
        const int64_t len = std::min(tile, ch.hi - lo);
        for (int64_t c = 0; c < d; ++c) {
          const scalar_t* src = k + (grp * d + c) * g.nk + lo;
          for (int64_t t = 0; t < len; ++t) k_t.get()[t * dp + c] = static_cast<T>(src[t]);
        }
        softplus_inplace(k_t.get(), static_cast<T*>(nullptr), round_up(len * dp, Vec<T>::W));
        load_rows(v + grp * m * g.nk, m, g.nk, lo, len, v_ext.get(), tile);
        outer_accumulate(v_ext.get(), m + 1, tile, k_t.get(), dp, len, acc);
      }
    }
  });
  const int64_t ctx_size = (m + 1) * d;
  at::parallel_for(0, g.groups * J, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t grp = item / J, j = item % J;
      sum_partials(partial.get() + (grp * n_chunks + first[j]) * g.partial(), first[j + 1] - first[j], g.partial(),
                   g, context + item * ctx_size, d);
    }
  });
  // 2. application over query positions: the query tile is read and activated once for all segments
  const int64_t n_tiles = (g.nq + tile - 1) / tile;
  at::parallel_for(0, g.groups * n_tiles, 1, [&](int64_t begin, int64_t end) {
    Scratch<T> q_s(d * tile), o((m + 1) * tile), den(tile);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t grp = item / n_tiles, lo = (item % n_tiles) * tile, len = std::min(tile, g.nq - lo);
      const int64_t tp = round_up(len, 2 * Vec<T>::W);
      load_rows(q + grp * d * g.nq, d, g.nq, lo, len, q_s.get(), tile);
      softplus_inplace(q_s.get(), static_cast<T*>(nullptr), d * tile);
      for (int64_t j = 0; j < J; ++j) {
        const T* ctx = context + (grp * J + j) * ctx_size;
        apply(ctx, m + 1, d, 1, d, q_s.get(), tile, tp, o.get(), tile);
        for (int64_t t = 0; t < len; ++t) den.get()[t] = clamp_den(o.get()[m * tile + t]);
        scalar_t* dst = out + ((grp * J + j) * m) * g.nq + lo;
        for (int64_t i = 0; i < m; ++i)
          for (int64_t t = 0; t < len; ++t) dst[i * g.nq + t] = static_cast<scalar_t>(o.get()[i * tile + t] / den.get()[t]);
      }
    }
  });
}

// ---------------------------------------------------------------- backward
template <typename scalar_t, typename T>
void backward_kernel(const Geometry& g, const std::vector<int64_t>& offsets, const scalar_t* grad, const scalar_t* q,
                     const scalar_t* k, const scalar_t* v, const T* context, scalar_t* dq, scalar_t* dk,
                     scalar_t* dv) {
  const int64_t d = g.d, m = g.m, J = g.segments, tile = g.tile, dp = g.dp, ctx_size = (m + 1) * d;
  // 1. query pass: dq, and partial dS (rows 0..m-1) and dz (row m) per chunk of query positions
  const int64_t n_chunks = (g.nq + g.chunk - 1) / g.chunk;
  const int64_t part = g.partial();
  Scratch<T> partial(g.groups * n_chunks * J * part);
  at::parallel_for(0, g.groups * n_chunks, 1, [&](int64_t begin, int64_t end) {
    Scratch<T> q_s(d * tile), sig(d * tile), q_t(tile * dp), g_b(m * tile), u(d * tile), x_a((m + 1) * tile),
        dq_acc(d * tile), den(tile), w(tile), rden(tile);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t grp = item / n_chunks, chunk_lo = (item % n_chunks) * g.chunk;
      const int64_t chunk_hi = std::min(chunk_lo + g.chunk, g.nq);
      for (int64_t lo = chunk_lo; lo < chunk_hi; lo += tile) {
        const int64_t len = std::min(tile, chunk_hi - lo), tp = round_up(len, 2 * Vec<T>::W);
        load_rows(q + grp * d * g.nq, d, g.nq, lo, len, q_s.get(), tile);
        softplus_inplace(q_s.get(), sig.get(), d * tile);
        for (int64_t c = 0; c < d; ++c)
          for (int64_t t = 0; t < len; ++t) q_t.get()[t * dp + c] = q_s.get()[c * tile + t];
        std::fill(dq_acc.get(), dq_acc.get() + d * tile, T(0));
        for (int64_t j = 0; j < J; ++j) {
          const T* s = context + (grp * J + j) * ctx_size;
          const T* z = s + m * d;
          load_rows(grad + ((grp * J + j) * m) * g.nq, m, g.nq, lo, len, g_b.get(), tile);
          apply(s, d, 1, d, m, g_b.get(), tile, tp, u.get(), tile);  // u = S^T g
          T* dn = den.get();
          T* wt = w.get();
          std::fill(dn, dn + tp, T(0));
          std::fill(wt, wt + tp, T(0));
          for (int64_t c = 0; c < d; ++c) {
            const T* qc = q_s.get() + c * tile;
            const T* uc = u.get() + c * tile;
            for (int64_t t = 0; t < tp; ++t) {
              dn[t] += z[c] * qc[t];
              wt[t] += uc[t] * qc[t];
            }
          }
          // a = g / den, b = -(g . out) / den = -(u . q) / den^2, zero where the clamp is active
          T* b_row = x_a.get() + m * tile;
          for (int64_t t = 0; t < tp; ++t) {
            const T r = T(1) / clamp_den(dn[t]);
            rden.get()[t] = r;
            b_row[t] = den_passes_grad(dn[t]) ? -wt[t] * r * r : T(0);
          }
          for (int64_t c = 0; c < d; ++c) {
            T* acc = dq_acc.get() + c * tile;
            const T* uc = u.get() + c * tile;
            for (int64_t t = 0; t < tp; ++t) acc[t] += uc[t] * rden.get()[t] + b_row[t] * z[c];
          }
          for (int64_t i = 0; i < m; ++i)
            for (int64_t t = 0; t < tp; ++t) x_a.get()[i * tile + t] = g_b.get()[i * tile + t] * rden.get()[t];
          outer_accumulate(x_a.get(), m + 1, tile, q_t.get(), dp, len, partial.get() + (item * J + j) * part);
        }
        for (int64_t c = 0; c < d; ++c) {
          scalar_t* dst = dq + (grp * d + c) * g.nq + lo;
          for (int64_t t = 0; t < len; ++t) dst[t] = static_cast<scalar_t>(dq_acc.get()[c * tile + t] * sig.get()[c * tile + t]);
        }
      }
    }
  });
  Scratch<T> d_ctx(g.groups * J * part);  // dS and dz per (group, segment), rows of dp
  at::parallel_for(0, g.groups * J, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t grp = item / J, j = item % J;
      sum_partials(partial.get() + (grp * n_chunks * J + j) * part, n_chunks, J * part, g, d_ctx.get() + item * part,
                   dp);
    }
  });
  // 2. source pass: dk = (dS^T v + dz) * sigmoid(kp), dv = dS k, tile by tile within each segment
  const std::vector<Span> tiles = cut(offsets, tile);
  const int64_t n_tiles = static_cast<int64_t>(tiles.size());
  at::parallel_for(0, g.groups * n_tiles, 1, [&](int64_t begin, int64_t end) {
    Scratch<T> k_s(d * tile), sig(d * tile), v_b(m * tile), dk_t(d * tile), dv_t(m * tile);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t grp = item / n_tiles;
      const Span& sp = tiles[item % n_tiles];
      const int64_t lo = sp.lo, len = sp.hi - sp.lo, tp = round_up(len, 2 * Vec<T>::W);
      const T* ds = d_ctx.get() + (grp * J + sp.segment) * part;
      const T* dz = ds + m * dp;
      load_rows(k + grp * d * g.nk, d, g.nk, lo, len, k_s.get(), tile);
      softplus_inplace(k_s.get(), sig.get(), d * tile);
      load_rows(v + grp * m * g.nk, m, g.nk, lo, len, v_b.get(), tile);
      apply(ds, d, 1, dp, m, v_b.get(), tile, tp, dk_t.get(), tile);
      apply(ds, m, dp, 1, d, k_s.get(), tile, tp, dv_t.get(), tile);
      for (int64_t c = 0; c < d; ++c) {
        scalar_t* dst = dk + (grp * d + c) * g.nk + lo;
        for (int64_t t = 0; t < len; ++t)
          dst[t] = static_cast<scalar_t>((dk_t.get()[c * tile + t] + dz[c]) * sig.get()[c * tile + t]);
      }
      for (int64_t i = 0; i < m; ++i) {
        scalar_t* dst = dv + (grp * m + i) * g.nk + lo;
        for (int64_t t = 0; t < len; ++t) dst[t] = static_cast<scalar_t>(dv_t.get()[i * tile + t]);
      }
    }
  });
}

// ---------------------------------------------------------------- cores
std::tuple<Tensor, Tensor> forward_cpu(const Tensor& q, const Tensor& k, const Tensor& v,
                                       const std::vector<int64_t>& offsets) {
  TORCH_CHECK(q.device().is_cpu(), "q must be a CPU tensor for the cpu kernels, got ", q.device());
  const int64_t J = static_cast<int64_t>(offsets.size()) - 1;
  const int64_t groups = q.size(0), d = q.size(1), nq = q.size(2), m = v.size(1);
  Tensor out = at::empty({groups, J, m, nq}, q.options());
  Tensor context = at::empty({groups, J, m + 1, d}, q.options().dtype(accumulation_dtype(q.scalar_type())));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "fused_mtl_attn_forward_cpu", [&] {
    using T = at::opmath_type<scalar_t>;
    const Geometry g = geometry<T>(q, v, k.size(2), J);
    forward_kernel<scalar_t, T>(g, offsets, q.const_data_ptr<scalar_t>(), k.const_data_ptr<scalar_t>(),
                                v.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(),
                                context.mutable_data_ptr<T>());
  });
  return {out, context};
}

std::tuple<Tensor, Tensor, Tensor> backward_cpu(const Tensor& grad, const Tensor& q, const Tensor& k, const Tensor& v,
                                                const OptionalTensor& /*out: unused, b comes from S^T g*/,
                                                const Tensor& context, const std::vector<int64_t>& offsets) {
  TORCH_CHECK(q.device().is_cpu(), "q must be a CPU tensor for the cpu kernels, got ", q.device());
  const int64_t J = static_cast<int64_t>(offsets.size()) - 1;
  Tensor dq = at::empty_like(q), dk = at::empty_like(k), dv = at::empty_like(v);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "fused_mtl_attn_backward_cpu", [&] {
    using T = at::opmath_type<scalar_t>;
    const Geometry g = geometry<T>(q, v, k.size(2), J);
    backward_kernel<scalar_t, T>(g, offsets, grad.const_data_ptr<scalar_t>(), q.const_data_ptr<scalar_t>(),
                                 k.const_data_ptr<scalar_t>(), v.const_data_ptr<scalar_t>(),
                                 context.const_data_ptr<T>(), dq.mutable_data_ptr<scalar_t>(),
                                 dk.mutable_data_ptr<scalar_t>(), dv.mutable_data_ptr<scalar_t>());
  });
  return {dq, dk, dv};
}

}  // namespace

FUSED_MTL_ATTN_REGISTER(CPU, forward_cpu, backward_cpu)

}  // namespace fused_mtl_attn
