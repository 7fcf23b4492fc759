// CUDA kernels of the gathered core (see ../attention.h). Two shared-memory tile shapes do all the work:
// reduce_kernel sums X(r,t) Y(c,t) over a chunk of positions into one partial per chunk (no atomics: the partials
// are then summed in chunk order, so results are bitwise reproducible), and apply_tile contracts a small matrix with
// a tile of positions. Softplus, sigmoid, the clamp and the division are applied while loading or storing tiles.
// Accumulation is fp32 (fp64 for fp64 inputs); every index is 64-bit.
//
// The same source also compiles as plain C++ with FUSED_MTL_ATTN_EMULATE_CUDA (attention_cuda_emulated.cpp): the
// kernels then run on the CPU through emulation.h, registered as the ops of `fused_mtl_attn_emulated`, and the test
// suite checks them against the eager reference without a GPU (tests/test_cuda_emulated.py).
#include "../attention.h"
#include "../attention_math.h"

#include <ATen/Dispatch.h>

#include <algorithm>
#include <utility>

#ifdef FUSED_MTL_ATTN_EMULATE_CUDA
#include "emulation.h"
#else
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace fused_mtl_attn {
namespace {

#ifdef FUSED_MTL_ATTN_EMULATE_CUDA
constexpr bool kEmulated = true;
using Stream = int;
struct DeviceGuard {
  explicit DeviceGuard(const at::Device&) {}
};
Stream current_stream() { return 0; }

// kernel<<<grid, block, 0, stream>>>(args...), emulated
template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), dim3 grid, dim3 block, Stream, Args&&... args) {
  emulation::launch(grid, block, [&] { kernel(args...); });
}
#else
constexpr bool kEmulated = false;
using Stream = cudaStream_t;
using DeviceGuard = c10::cuda::CUDAGuard;
Stream current_stream() { return c10::cuda::getCurrentCUDAStream(); }

template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), dim3 grid, dim3 block, Stream stream, Args&&... args) {
  kernel<<<grid, block, 0, stream>>>(std::forward<Args>(args)...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}
#endif

constexpr int TILE = 32;   // rows, columns and positions of a tile
constexpr int ROWS = 8;    // threadIdx.y; each thread owns TILE / ROWS rows
constexpr int PER = TILE / ROWS;
constexpr int64_t CHUNK = 1024;  // positions per partial sum

__host__ __device__ inline int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// ---------------------------------------------------------------- pieces of segments
// Up to WINDOW consecutive segments cut into pieces of at most `size` positions, passed to the kernels by value:
// each block finds its piece from blockIdx.x, so no table is copied to the device (a copy from pageable memory
// synchronises the stream, and a CUDA graph cannot capture it). More segments take one launch per window.
constexpr int WINDOW = 32;

struct Piece {
  int64_t seg, lo, hi;  // positions [lo, hi) of segment seg
};

struct Pieces {
  int64_t start[WINDOW + 1];  // segment j0 + i spans positions [start[i], start[i + 1])
  int64_t first[WINDOW + 1];  // its pieces are first[i] .. first[i + 1] - 1, counted from the window's first
  int64_t j0, size;
  int n;  // segments in the window

  __host__ __device__ int64_t count() const { return first[n]; }
  // piece b < count(); a linear search: a window is short and it runs once per block
  __host__ __device__ Piece piece(int64_t b) const {
    int i = 0;
    while (first[i + 1] <= b) ++i;  // passes over empty segments (first[i] == first[i + 1])
    const int64_t lo = start[i] + (b - first[i]) * size;
    return {j0 + i, lo, lo + size < start[i + 1] ? lo + size : start[i + 1]};
  }
};

// the windows of the J segments given by offsets (J + 1 values), in segment order; none for J = 0
std::vector<Pieces> windows(const std::vector<int64_t>& offsets, int64_t size) {
  std::vector<Pieces> out;
  const int64_t J = static_cast<int64_t>(offsets.size()) - 1;
  for (int64_t j0 = 0; j0 < J; j0 += WINDOW) {
    Pieces w{};
    w.j0 = j0;
    w.size = size;
    w.n = static_cast<int>(std::min<int64_t>(WINDOW, J - j0));
    for (int i = 0; i <= w.n; ++i) {
      w.start[i] = offsets[j0 + i];
      w.first[i] = i == 0 ? 0 : w.first[i - 1] + cdiv(w.start[i] - w.start[i - 1], size);
    }
    out.push_back(w);
  }
  return out;
}

// ---------------------------------------------------------------- tile primitives
// acc[s] += sum_k A(ty + ROWS*s, k) * Y(k, tx) over k < K (A and Y return 0 out of range)
template <typename T, typename ALoad, typename YLoad>
__device__ __forceinline__ void apply_tile(T (&acc)[PER], int64_t K, const ALoad& A, const YLoad& Y,
                                           T (&As)[TILE][TILE + 1], T (&Ys)[TILE][TILE + 1]) {
  const int tx = threadIdx.x, ty = threadIdx.y;
  for (int64_t k0 = 0; k0 < K; k0 += TILE) {
    for (int s = 0; s < PER; ++s) {
      const int rr = ty + ROWS * s;
      As[rr][tx] = A(rr, k0 + tx);
      Ys[rr][tx] = Y(k0 + rr, tx);
    }
    __syncthreads();
#pragma unroll 8
    for (int kk = 0; kk < TILE; ++kk) {
      const T y = Ys[kk][tx];
      for (int s = 0; s < PER; ++s) acc[s] += As[ty + ROWS * s][kk] * y;
    }
    __syncthreads();
  }
}

// partial[chunk, g][r][c] = sum_{t in chunk} X(g, seg, r, t) * Y(g, c, t), rows r < R, columns c < C
// grid: x = chunk of the window, y = row tile * column tiles, z = group
template <typename T, typename XLoad, typename YLoad>
__global__ void reduce_kernel(Pieces chunks, int64_t R, int64_t C, XLoad X, YLoad Y, T* partial) {
  __shared__ T Xs[TILE][TILE + 1], Ys[TILE][TILE + 1];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t g = blockIdx.z, col_tiles = cdiv(C, TILE);
  const int64_t r0 = (blockIdx.y / col_tiles) * TILE, c0 = (blockIdx.y % col_tiles) * TILE;
  const Piece pc = chunks.piece(blockIdx.x);
  const int64_t seg = pc.seg, lo = pc.lo, hi = pc.hi;
  T acc[PER] = {};
  for (int64_t t0 = lo; t0 < hi; t0 += TILE) {
    const int64_t t = t0 + tx;
    for (int s = 0; s < PER; ++s) {
      const int64_t rr = ty + ROWS * s;
      Xs[rr][tx] = (t < hi && r0 + rr < R) ? X(g, seg, r0 + rr, t) : T(0);
      Ys[rr][tx] = (t < hi && c0 + rr < C) ? Y(g, c0 + rr, t) : T(0);
    }
    __syncthreads();
#pragma unroll 8
    for (int tt = 0; tt < TILE; ++tt) {
      const T y = Ys[tx][tt];
      for (int s = 0; s < PER; ++s) acc[s] += Xs[ty + ROWS * s][tt] * y;
    }
    __syncthreads();
  }
  T* dst = partial + (static_cast<int64_t>(blockIdx.x) * gridDim.z + g) * R * C;
  for (int s = 0; s < PER; ++s) {
    const int64_t r = r0 + ty + ROWS * s, c = c0 + tx;
    if (r < R && c < C) dst[r * C + c] = acc[s];
  }
}

// dst[g, j][e] = sum over the chunks of segment j, in order, of partial[chunk, g][e]  (e < E), for the window's j
template <typename T>
__global__ void sum_chunks_kernel(const T* partial, Pieces chunks, int64_t G, int64_t J, int64_t E, T* dst) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x, n = chunks.n;
  if (idx >= G * n * E) return;
  const int64_t e = idx % E, gi = idx / E, i = gi % n, g = gi / n;
  T s = T(0);
  for (int64_t ch = chunks.first[i]; ch < chunks.first[i + 1]; ++ch) s += partial[(ch * G + g) * E + e];
  dst[(g * J + chunks.j0 + i) * E + e] = s;
}

// ---------------------------------------------------------------- loaders
template <typename scalar_t, typename T>
struct Rows {  // plain rows of a [G, R, N] tensor
  const scalar_t* p; int64_t R, N;
  __device__ T operator()(int64_t g, int64_t r, int64_t t) const { return static_cast<T>(p[(g * R + r) * N + t]); }
};
template <typename scalar_t, typename T>
struct SoftplusRows {  // softplus of the rows of a [G, C, N] tensor of logits
  const scalar_t* p; int64_t C, N;
  __device__ T operator()(int64_t g, int64_t c, int64_t t) const {
    return softplus(static_cast<T>(p[(g * C + c) * N + t]));
  }
};
template <typename scalar_t, typename T>
struct ValuesAndOnes {  // forward reduction rows: v (S = v k^T) then a row of ones (z = sum k)
  Rows<scalar_t, T> v;
  __device__ T operator()(int64_t g, int64_t, int64_t r, int64_t t) const { return r < v.R ? v(g, r, t) : T(1); }
};
template <typename scalar_t, typename T>
struct GradRows {  // backward reduction rows: a = g / den (dS), then b (dz)
  const scalar_t* grad; const T* rden; const T* b; int64_t J, m, nq;
  __device__ T operator()(int64_t g, int64_t j, int64_t r, int64_t t) const {
    const int64_t gj = g * J + j;
    return r < m ? static_cast<T>(grad[(gj * m + r) * nq + t]) * rden[gj * nq + t] : b[gj * nq + t];
  }
};
// backward reduction: segment j's chunks cover virtual positions [j nq, (j+1) nq) of the one shared query range
template <typename XLoad>
struct QueryRowsOfSegment {
  XLoad x; int64_t nq;
  __device__ auto operator()(int64_t g, int64_t j, int64_t r, int64_t t) const { return x(g, j, r, t - j * nq); }
};
template <typename YLoad>
struct QueryColumns {
  YLoad y; int64_t nq;
  __device__ auto operator()(int64_t g, int64_t c, int64_t t) const { return y(g, c, t % nq); }
};

// ---------------------------------------------------------------- forward
// den[g, j, p] = z_j . softplus(q[g, :, p]) (raw, before the clamp)
template <typename scalar_t, typename T>
__global__ void den_kernel(const scalar_t* q, const T* ctx, int64_t G, int64_t J, int64_t d, int64_t m, int64_t nq,
                           T* den) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= G * J * nq) return;
  const int64_t p = idx % nq, gj = idx / nq, g = gj / J;
  const T* z = ctx + (gj * (m + 1) + m) * d;
  T s = T(0);
  for (int64_t c = 0; c < d; ++c) s += z[c] * softplus(static_cast<T>(q[(g * d + c) * nq + p]));
  den[idx] = s;
}

// out[g, j, i, p] = (S_j q_p)_i / max(den, eps); grid x = position tile, y = row tile, z = g * J + j
template <typename scalar_t, typename T>
__global__ void forward_apply_kernel(const scalar_t* q, const T* ctx, const T* den, int64_t J, int64_t d, int64_t m,
                                     int64_t nq, scalar_t* out) {
  __shared__ T As[TILE][TILE + 1], Ys[TILE][TILE + 1];
  const int64_t gj = blockIdx.z, g = gj / J, p0 = static_cast<int64_t>(blockIdx.x) * TILE, r0 = blockIdx.y * TILE;
  const T* s = ctx + gj * (m + 1) * d;
  auto A = [&](int rr, int64_t c) { return (r0 + rr < m && c < d) ? s[(r0 + rr) * d + c] : T(0); };
  auto Y = [&](int64_t c, int tt) {
    return (c < d && p0 + tt < nq) ? softplus(static_cast<T>(q[(g * d + c) * nq + p0 + tt])) : T(0);
  };
  T acc[PER] = {};
  apply_tile(acc, d, A, Y, As, Ys);
  const int64_t p = p0 + threadIdx.x;
  if (p >= nq) return;
  const T dn = clamp_den(den[gj * nq + p]);
  for (int k = 0; k < PER; ++k) {
    const int64_t i = r0 + threadIdx.y + ROWS * k;
    if (i < m) out[(gj * m + i) * nq + p] = static_cast<scalar_t>(acc[k] / dn);
  }
}

// ---------------------------------------------------------------- backward
// rden = 1 / max(den, eps) and b = -(g . S q) / max(den, eps)^2 (= -(g . out) / max(den, eps), so `out` is not
// needed), zero where the clamp is active. [S; z] q gives S q (rows < m) and den (row m) in one pass over q; each
// thread sums g . S q over its rows, then row 0 of the block adds the other rows' sums in order.
// grid x = position tile, z = g * J + j
template <typename scalar_t, typename T>
__global__ void backward_scalars_kernel(const scalar_t* grad, const scalar_t* q, const T* ctx, int64_t J, int64_t d,
                                        int64_t m, int64_t nq, T* rden, T* b) {
  __shared__ T As[TILE][TILE + 1], Ys[TILE][TILE + 1];
  __shared__ T dots[ROWS][TILE], den[TILE];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t gj = blockIdx.z, g = gj / J, p0 = static_cast<int64_t>(blockIdx.x) * TILE, p = p0 + tx;
  const T* s = ctx + gj * (m + 1) * d;
  auto Y = [&](int64_t c, int tt) {
    return (c < d && p0 + tt < nq) ? softplus(static_cast<T>(q[(g * d + c) * nq + p0 + tt])) : T(0);
  };
  T dot = T(0);
  for (int64_t r0 = 0; r0 <= m; r0 += TILE) {
    auto A = [&](int rr, int64_t c) { return (r0 + rr <= m && c < d) ? s[(r0 + rr) * d + c] : T(0); };
    T acc[PER] = {};
    apply_tile(acc, d, A, Y, As, Ys);
    for (int k = 0; k < PER; ++k) {
      const int64_t i = r0 + ty + ROWS * k;
      if (i == m) {
        den[tx] = acc[k];
      } else if (i < m && p < nq) {
        dot += static_cast<T>(grad[(gj * m + i) * nq + p]) * acc[k];
      }
    }
  }
  dots[ty][tx] = dot;
  __syncthreads();
  if (ty != 0 || p >= nq) return;
  for (int y = 1; y < ROWS; ++y) dot += dots[y][tx];
  const T dn = den[tx], r = T(1) / clamp_den(dn);
  rden[gj * nq + p] = r;
  b[gj * nq + p] = den_passes_grad(dn) ? -dot * r * r : T(0);
}

// dq[g, c, p] = sigmoid(qp) * sum_j (S_j^T g_j,p)_c / den_j,p + b_j,p z_j,c; grid x = position tile, y = row tile, z = g
template <typename scalar_t, typename T>
__global__ void dq_kernel(const scalar_t* grad, const scalar_t* q, const T* ctx, const T* rden, const T* b, int64_t J,
                          int64_t d, int64_t m, int64_t nq, scalar_t* dq) {
  __shared__ T As[TILE][TILE + 1], Ys[TILE][TILE + 1];
  const int64_t g = blockIdx.z, p0 = static_cast<int64_t>(blockIdx.x) * TILE, c0 = blockIdx.y * TILE;
  const int64_t p = p0 + threadIdx.x;
  T total[PER] = {};
  for (int64_t j = 0; j < J; ++j) {
    const int64_t gj = g * J + j;
    const T* s = ctx + gj * (m + 1) * d;
    auto A = [&](int rr, int64_t i) { return (c0 + rr < d && i < m) ? s[i * d + c0 + rr] : T(0); };
    auto Y = [&](int64_t i, int tt) {
      return (i < m && p0 + tt < nq) ? static_cast<T>(grad[(gj * m + i) * nq + p0 + tt]) : T(0);
    };
    T acc[PER] = {};
    apply_tile(acc, m, A, Y, As, Ys);
    if (p < nq) {
      const T r = rden[gj * nq + p], bb = b[gj * nq + p];
      for (int k = 0; k < PER; ++k) {
        const int64_t c = c0 + threadIdx.y + ROWS * k;
        if (c < d) total[k] += acc[k] * r + bb * s[m * d + c];
      }
    }
  }
  if (p >= nq) return;
  for (int k = 0; k < PER; ++k) {
    const int64_t c = c0 + threadIdx.y + ROWS * k;
    if (c < d) {
      const int64_t at = (g * d + c) * nq + p;
      dq[at] = static_cast<scalar_t>(total[k] * softplus_grad(static_cast<T>(q[at])));
    }
  }
}

// dk = (dS^T v + dz) * sigmoid(kp) (rows c) or dv = dS softplus(k) (rows i), over one tile of a segment;
// grid x = tile of the window, y = row tile, z = g
template <typename scalar_t, typename T, bool KEYS>
__global__ void source_kernel(Pieces tiles, const scalar_t* k, const scalar_t* v, const T* dctx, int64_t J,
                              int64_t d, int64_t m, int64_t nk, scalar_t* dst) {
  __shared__ T As[TILE][TILE + 1], Ys[TILE][TILE + 1];
  const int64_t g = blockIdx.z, r0 = blockIdx.y * TILE;
  const Piece pc = tiles.piece(blockIdx.x);
  const int64_t seg = pc.seg, lo = pc.lo, hi = pc.hi;
  const T* ds = dctx + (g * J + seg) * (m + 1) * d;
  const int64_t rows = KEYS ? d : m, inner = KEYS ? m : d;
  auto A = [&](int rr, int64_t x) {
    if (r0 + rr >= rows || x >= inner) return T(0);
    return KEYS ? ds[x * d + r0 + rr] : ds[(r0 + rr) * d + x];
  };
  auto Y = [&](int64_t x, int tt) {
    if (x >= inner || lo + tt >= hi) return T(0);
    return KEYS ? static_cast<T>(v[(g * m + x) * nk + lo + tt]) : softplus(static_cast<T>(k[(g * d + x) * nk + lo + tt]));
  };
  T acc[PER] = {};
  apply_tile(acc, inner, A, Y, As, Ys);
  const int64_t t = lo + threadIdx.x;
  if (t >= hi) return;
  for (int s = 0; s < PER; ++s) {
    const int64_t r = r0 + threadIdx.y + ROWS * s;
    if (r >= rows) continue;
    const int64_t at = (g * rows + r) * nk + t;
    if (KEYS) {
      dst[at] = static_cast<scalar_t>((acc[s] + ds[m * d + r]) * softplus_grad(static_cast<T>(k[at])));
    } else {
      dst[at] = static_cast<scalar_t>(acc[s]);
    }
  }
}

// ---------------------------------------------------------------- host side
// sum of reduce_kernel partials per (group, segment) into dst [G, J, R, C]; `options` give the partials' dtype
template <typename T, typename XLoad, typename YLoad>
void reduce(const std::vector<int64_t>& offsets, int64_t G, int64_t R, int64_t C, XLoad X, YLoad Y, T* dst,
            const at::TensorOptions& options, Stream stream) {
  const int64_t J = static_cast<int64_t>(offsets.size()) - 1;
  if (J == 0 || G * R * C == 0) return;
  const std::vector<Pieces> ws = windows(offsets, CHUNK);
  int64_t most = 1;
  for (const Pieces& w : ws) most = std::max(most, w.count());
  // one scratch for all windows: the stream runs a window's sums before the next window's partials overwrite it
  Tensor partial = at::empty({most, G, R, C}, options);
  for (const Pieces& w : ws) {
    if (w.count() > 0) {
      const dim3 grid(w.count(), cdiv(R, TILE) * cdiv(C, TILE), G);
      launch(reduce_kernel<T, XLoad, YLoad>, grid, dim3(TILE, ROWS), stream, w, R, C, X, Y,
             partial.mutable_data_ptr<T>());
    }
    // also for a window without chunks: its segments are empty and sum to zero
    launch(sum_chunks_kernel<T>, dim3(cdiv(G * w.n * R * C, 256)), dim3(256), stream, partial.const_data_ptr<T>(), w,
           G, J, R * C, dst);
  }
}

std::tuple<Tensor, Tensor> forward_cuda(const Tensor& q, const Tensor& k, const Tensor& v,
                                        const std::vector<int64_t>& offsets) {
  TORCH_CHECK(kEmulated || q.is_cuda(), "q must be a CUDA tensor for the cuda kernels, got ", q.device());
  const DeviceGuard guard(q.device());
  const Stream stream = current_stream();
  const int64_t J = static_cast<int64_t>(offsets.size()) - 1;
  const int64_t G = q.size(0), d = q.size(1), nq = q.size(2), m = v.size(1), nk = k.size(2);
  Tensor out = at::empty({G, J, m, nq}, q.options());
  Tensor ctx = at::empty({G, J, m + 1, d}, q.options().dtype(accumulation_dtype(q.scalar_type())));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "fused_mtl_attn_forward_cuda", [&] {
    using T = accumulation_t<scalar_t>;
    ValuesAndOnes<scalar_t, T> x{{v.const_data_ptr<scalar_t>(), m, nk}};
    SoftplusRows<scalar_t, T> y{k.const_data_ptr<scalar_t>(), d, nk};
    reduce<T>(offsets, G, m + 1, d, x, y, ctx.mutable_data_ptr<T>(), ctx.options(), stream);
    if (out.numel() == 0) return;
    Tensor den = at::empty({G, J, nq}, ctx.options());
    launch(den_kernel<scalar_t, T>, dim3(cdiv(G * J * nq, 256)), dim3(256), stream, q.const_data_ptr<scalar_t>(),
           ctx.const_data_ptr<T>(), G, J, d, m, nq, den.mutable_data_ptr<T>());
    launch(forward_apply_kernel<scalar_t, T>, dim3(cdiv(nq, TILE), cdiv(m, TILE), G * J), dim3(TILE, ROWS), stream,
           q.const_data_ptr<scalar_t>(), ctx.const_data_ptr<T>(), den.const_data_ptr<T>(), J, d, m, nq,
           out.mutable_data_ptr<scalar_t>());
  });
  return {out, ctx};
}

std::tuple<Tensor, Tensor, Tensor> backward_cuda(const Tensor& grad, const Tensor& q, const Tensor& k,
                                                 const Tensor& v, const Tensor& ctx,
                                                 const std::vector<int64_t>& offsets) {
  TORCH_CHECK(kEmulated || q.is_cuda(), "q must be a CUDA tensor for the cuda kernels, got ", q.device());
  const DeviceGuard guard(q.device());
  const Stream stream = current_stream();
  const int64_t J = static_cast<int64_t>(offsets.size()) - 1;
  const int64_t G = q.size(0), d = q.size(1), nq = q.size(2), m = v.size(1), nk = k.size(2);
  Tensor dq = at::zeros_like(q), dk = at::empty_like(k), dv = at::empty_like(v);
  if (J == 0 || G == 0) return {dq, dk, dv};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "fused_mtl_attn_backward_cuda", [&] {
    using T = accumulation_t<scalar_t>;
    Tensor rden = at::empty({G, J, nq}, ctx.options()), b = at::empty({G, J, nq}, ctx.options());
    Tensor dctx = at::empty({G, J, m + 1, d}, ctx.options());
    if (nq > 0) {
      launch(backward_scalars_kernel<scalar_t, T>, dim3(cdiv(nq, TILE), 1, G * J), dim3(TILE, ROWS), stream,
             grad.const_data_ptr<scalar_t>(), q.const_data_ptr<scalar_t>(), ctx.const_data_ptr<T>(), J, d, m, nq,
             rden.mutable_data_ptr<T>(), b.mutable_data_ptr<T>());
      if (d > 0) {
        launch(dq_kernel<scalar_t, T>, dim3(cdiv(nq, TILE), cdiv(d, TILE), G), dim3(TILE, ROWS), stream,
               grad.const_data_ptr<scalar_t>(), q.const_data_ptr<scalar_t>(), ctx.const_data_ptr<T>(),
               rden.const_data_ptr<T>(), b.const_data_ptr<T>(), J, d, m, nq, dq.mutable_data_ptr<scalar_t>());
      }
    }
    // dS, dz of every segment reduce over all query positions: the query range is "segment" 0 of each j
    std::vector<int64_t> query_offsets(J + 1);
    for (int64_t j = 0; j <= J; ++j) query_offsets[j] = j * nq;  // chunk table indexes segment j at [j nq, (j+1) nq)
    GradRows<scalar_t, T> x{grad.const_data_ptr<scalar_t>(), rden.const_data_ptr<T>(), b.const_data_ptr<T>(), J, m, nq};
    SoftplusRows<scalar_t, T> y{q.const_data_ptr<scalar_t>(), d, nq};
    reduce<T>(query_offsets, G, m + 1, d, QueryRowsOfSegment<decltype(x)>{x, nq}, QueryColumns<decltype(y)>{y, nq},
              dctx.mutable_data_ptr<T>(), ctx.options(), stream);
    for (const Pieces& tiles : windows(offsets, TILE)) {
      const int64_t n_tiles = tiles.count();
      if (n_tiles == 0) continue;
      if (d > 0) {
        launch(source_kernel<scalar_t, T, true>, dim3(n_tiles, cdiv(d, TILE), G), dim3(TILE, ROWS), stream, tiles,
               k.const_data_ptr<scalar_t>(), v.const_data_ptr<scalar_t>(), dctx.const_data_ptr<T>(), J, d, m, nk,
               dk.mutable_data_ptr<scalar_t>());
      }
      if (m > 0) {
        launch(source_kernel<scalar_t, T, false>, dim3(n_tiles, cdiv(m, TILE), G), dim3(TILE, ROWS), stream, tiles,
               k.const_data_ptr<scalar_t>(), v.const_data_ptr<scalar_t>(), dctx.const_data_ptr<T>(), J, d, m, nk,
               dv.mutable_data_ptr<scalar_t>());
      }
    }
  });
  return {dq, dk, dv};
}

}  // namespace

#ifdef FUSED_MTL_ATTN_EMULATE_CUDA
// the CUDA kernels on CPU tensors, for tests: the four ops of fused_mtl_attn (same schemas) in their own namespace
TORCH_LIBRARY(fused_mtl_attn_emulated, m) { define_attention_ops(m); }
FUSED_MTL_ATTN_REGISTER_IN(fused_mtl_attn_emulated, CPU, forward_cuda, backward_cuda)
#else
FUSED_MTL_ATTN_REGISTER(CUDA, forward_cuda, backward_cuda)
#endif

}  // namespace fused_mtl_attn
