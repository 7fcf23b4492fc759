// CUDA kernels of the gathered core (see ../attention.h), on tensor cores.
//
// Every contraction is a block GEMM (block_gemm): 128 threads, 4 warps in 2 x 2, compute a 64 x 64 output tile,
// the K axis streamed through shared memory 32 at a time, each warp owning 2 x 2 tiles of 16 x 16 on the tensor
// cores (Mma16). All threads load the operand tiles with the contiguous index fastest (coalesced), transform them
// on the way (softplus, the 1/den weight, the row of ones) and round them to the operand type: fp16/bf16 operands
// with fp32 accumulation; fp32 inputs as tf32x3 (hi/lo split, three TF32 products: fp32 accuracy, where one TF32
// product would miss the float32 tolerance); fp64 on the fp64 tensor cores (DMMA). A finished tile goes through
// shared memory to the kernel's per-element epilogue, which stores it coalesced along positions.
// Why wmma and not inline mma.sync: wmma's fragments are opaque, so emulation.h gives them a host implementation
// and the test suite runs this very source on a CPU (tests/test_cuda_emulated.py); what it costs is that epilogues
// read the tile back from shared memory instead of from registers.
//
// Forward, 2 launches: reduce_kernel sums [v; 1] softplus(k)^T over one piece of a segment's positions into a
// partial [m+1, d] (a segment has at most max_splits pieces, 16 by default); apply_kernel sums the segment's
// partials in piece order while loading them as its operand and computes [S; z] softplus(q) for a tile of 64
// positions: tile rows 0..62 are 63 rows of S q, row 63 is z . softplus(q), the denominator. It stores
// S q / max(den, eps); the blocks of the first position tile also store the sums as the context. Where [m+1, d] fits
// one tile (the finest scales), a block sums the partials once into shared memory and walks a span of position
// tiles (source_kernel likewise).
// Backward, 2 launches where [m+1, d] fits one tile (fp64 aside) and the shared memory holds the J [dS; dz] tiles
// (J <= 4 on every sm_80+ GPU): fused_query_kernel does all of the query side in one pass, then source_kernel.
// Else 3: scalars_kernel recomputes [S; z] softplus(q) the same way and stores 1/den and b = -(g . S q)/den^2, the
// only per-position intermediates (2 values per position and segment); query_kernel runs two kinds of blocks in one
// launch: partials of [dS; dz] = [g/den; b] softplus(q)^T over pieces of the query positions, and
// dq = softplus'(q) sum_j [S_j; z_j]^T [g_j/den_j; b_j] in one accumulator; source_kernel sums dS's partials in
// piece order and computes dv = dS softplus(k) and dk = softplus'(k) [dS; dz]^T [v; 1] for a tile of source
// positions (both in one block where [m+1, d] fits a tile).
// HBM passes at the finest scales: forward q, k, v, out once each; backward (one pass) q, g, k, v, dq, dk, dv once.
// No atomics: results are bitwise reproducible. Every index is 64-bit. No table is copied to the device (so no host
// synchronisation, and CUDA graphs can capture the calls): segments travel by value, WINDOW per launch.
//
// The same source also compiles as plain C++ with FUSED_MTL_ATTN_EMULATE_CUDA (attention_cuda_emulated.cpp): the
// kernels then run on the CPU through emulation.h, registered as the ops of `fused_mtl_attn_emulated`.
#include "../attention.h"
#include "../attention_math.h"

#include <ATen/Dispatch.h>

#include <algorithm>
#include <mutex>
#include <set>
#include <type_traits>
#include <utility>
#include <vector>

#ifdef FUSED_MTL_ATTN_EMULATE_CUDA
#include "emulation.h"
#else
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#error "fused_mtl_attn's CUDA kernels need sm_80 or newer (bf16, tf32 and fp64 tensor cores); set TORCH_CUDA_ARCH_LIST"
#endif
#endif

namespace fused_mtl_attn {
namespace {

namespace wmma = nvcuda::wmma;

#ifdef FUSED_MTL_ATTN_EMULATE_CUDA
constexpr bool kEmulated = true;
using Stream = int;
struct DeviceGuard {
  explicit DeviceGuard(const at::Device&) {}
};
Stream current_stream() { return 0; }

// kernel<<<grid, block, smem, stream>>>(args...), emulated
template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, Stream, Args&&... args) {
  emulation::launch(grid, block, smem, [&] { kernel(args...); });
}

// the most dynamic shared memory a block may have: emulated, the smallest opt-in limit of sm_80+ (sm_86, sm_89 and
// sm_120 have 99 KiB), so that the tests take the paths that every supported GPU takes
size_t shared_memory_limit() { return 99 * 1024; }
#define FUSED_MTL_ATTN_DYNAMIC_SMEM(name) unsigned char* name = ::fused_mtl_attn::emulation::dynamic_shared()
#else
constexpr bool kEmulated = false;
using Stream = cudaStream_t;
using DeviceGuard = c10::cuda::CUDAGuard;
Stream current_stream() { return c10::cuda::getCurrentCUDAStream(); }

size_t shared_memory_limit() { return at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin; }

// Beyond 48 KiB of dynamic shared memory a kernel must opt in: once per kernel and device, to all the device allows,
// so that later calls (and CUDA graph captures after a first call) make no runtime calls besides the launch
void opt_in_shared_memory(const void* kernel) {
  static std::mutex mutex;
  static std::set<std::pair<const void*, int>> done;
  const std::lock_guard<std::mutex> lock(mutex);
  if (done.insert({kernel, c10::cuda::current_device()}).second) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(shared_memory_limit())));
  }
}

// kernel<<<grid, block, smem, stream>>>(args...); smem: dynamic shared memory
template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, Stream stream, Args&&... args) {
  if (smem > 48 * 1024) opt_in_shared_memory(reinterpret_cast<const void*>(kernel));
  kernel<<<grid, block, smem, stream>>>(std::forward<Args>(args)...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}
#define FUSED_MTL_ATTN_DYNAMIC_SMEM(name) extern __shared__ __align__(128) unsigned char name[]
#endif

constexpr int THREADS = 128;     // 4 warps
constexpr int BR = 64, BC = 64;  // a block's output tile
constexpr int KT = 32;           // K per shared-memory stage
constexpr int S_ROWS = BR - 1;   // rows of S in an apply/scalars tile; its last row is z (the denominator)
constexpr int64_t MIN_PIECE = 256;  // positions

// Launch shapes that only a GPU's timings can settle, settable per process (launch_tuning, for
// benchmarks/tune_kernels.py): pieces are cut until a launch has about target_blocks blocks, at most max_splits per
// segment (every consumer block sums them again); one_pass_query takes fused_query_kernel where it applies.
struct Tuning {
  int64_t target_blocks = 512, max_splits = 16;
  bool one_pass_query = true;
};
Tuning tuning;

// sets the values given (negative: unchanged), returns the previous ones [target_blocks, max_splits, one_pass_query]
std::vector<int64_t> launch_tuning(int64_t target_blocks, int64_t max_splits, int64_t one_pass_query) {
  TORCH_CHECK(target_blocks < 0 || target_blocks >= 1, "target_blocks must be >= 1, got ", target_blocks);
  TORCH_CHECK(max_splits < 0 || max_splits >= 1, "max_splits must be >= 1, got ", max_splits);
  TORCH_CHECK(one_pass_query <= 1, "one_pass_query must be 0 or 1, got ", one_pass_query);
  std::vector<int64_t> before{tuning.target_blocks, tuning.max_splits, tuning.one_pass_query};
  if (target_blocks >= 0) tuning.target_blocks = target_blocks;
  if (max_splits >= 0) tuning.max_splits = max_splits;
  if (one_pass_query >= 0) tuning.one_pass_query = one_pass_query == 1;
  return before;
}
constexpr const char* kTuningSchema =
    "launch_tuning(int target_blocks=-1, int max_splits=-1, int one_pass_query=-1) -> int[]";

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
  int64_t base;  // pieces of earlier windows: this window's piece b is the call's piece base + b
  int n;         // segments in the window

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
    w.base = out.empty() ? 0 : out.back().base + out.back().count();
    for (int i = 0; i <= w.n; ++i) {
      w.start[i] = offsets[j0 + i];
      w.first[i] = i == 0 ? 0 : w.first[i - 1] + cdiv(w.start[i] - w.start[i - 1], size);
    }
    out.push_back(w);
  }
  return out;
}

int64_t total_pieces(const std::vector<Pieces>& ws) { return ws.empty() ? 0 : ws.back().base + ws.back().count(); }

int64_t longest(const std::vector<int64_t>& offsets) {
  int64_t most = 0;
  for (size_t i = 1; i < offsets.size(); ++i) most = std::max(most, offsets[i] - offsets[i - 1]);
  return most;
}

// positions per piece of a reduction whose pieces each take `blocks` blocks: pieces are cut until the launch has
// about target_blocks blocks, at most max_splits per segment and at least MIN_PIECE positions each
int64_t piece_size(int64_t longest_segment, int64_t blocks) {
  const int64_t splits =
      std::clamp<int64_t>(cdiv(tuning.target_blocks, std::max<int64_t>(blocks, 1)), 1, tuning.max_splits);
  return std::max(MIN_PIECE, cdiv(cdiv(longest_segment, splits), KT) * KT);
}


// ---------------------------------------------------------------- tensor-core tiles
// the tensor cores' operand type of each input dtype
template <typename scalar_t>
struct OperandOf {
  using type = scalar_t;
};
#ifndef FUSED_MTL_ATTN_EMULATE_CUDA
template <>
struct OperandOf<c10::Half> {
  using type = __half;
};
template <>
struct OperandOf<c10::BFloat16> {
  using type = __nv_bfloat16;
};
#endif
template <typename scalar_t>
using operand_t = typename OperandOf<scalar_t>::type;

// x rounded to the operand type, to nearest even (torch builds without the implicit half conversions)
template <typename Op, typename T>
__device__ __forceinline__ Op to_operand(T x) {
#ifndef FUSED_MTL_ATTN_EMULATE_CUDA
  if constexpr (std::is_same_v<Op, __half>) return __float2half_rn(x);
  else if constexpr (std::is_same_v<Op, __nv_bfloat16>) return __float2bfloat16_rn(x);
  else
#endif
    return static_cast<Op>(x);
}

// element (r, c) of a matrix stored in the layout, with leading dimension ld
template <typename Layout>
__device__ __forceinline__ int offset_of(int ld, int r, int c) {
  return std::is_same_v<Layout, wmma::row_major> ? r * ld + c : c * ld + r;
}

// a 16 x 16 accumulator tile of one warp: acc += A[16 x 16] B[16 x 16] per step, A and B in shared memory
template <typename scalar_t, typename AL, typename BL>
struct Mma16 {  // fp16, bf16: one m16n16k16 product
  using Op = operand_t<scalar_t>;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
  __device__ void zero() { wmma::fill_fragment(acc, 0.0f); }
  __device__ void step(const Op* a, int lda, const Op* b, int ldb) {
    wmma::fragment<wmma::matrix_a, 16, 16, 16, Op, AL> fa;
    wmma::fragment<wmma::matrix_b, 16, 16, 16, Op, BL> fb;
    wmma::load_matrix_sync(fa, a, lda);
    wmma::load_matrix_sync(fb, b, ldb);
    wmma::mma_sync(acc, fa, fb, acc);
  }
  __device__ void store(float* c, int ldc) const { wmma::store_matrix_sync(c, acc, ldc, wmma::mem_row_major); }
  __device__ void load(const float* c, int ldc) { wmma::load_matrix_sync(acc, c, ldc, wmma::mem_row_major); }
};

template <typename AL, typename BL>
struct Mma16<float, AL, BL> {  // fp32: tf32x3, x = hi + lo with both in TF32, hi*hi + hi*lo + lo*hi
  wmma::fragment<wmma::accumulator, 16, 16, 8, float> acc;
  __device__ void zero() { wmma::fill_fragment(acc, 0.0f); }
  template <typename F>
  __device__ static void split(F& hi, F& lo) {
#pragma unroll
    for (int e = 0; e < hi.num_elements; ++e) {
      const float x = hi.x[e];
      hi.x[e] = wmma::__float_to_tf32(x);
      lo.x[e] = wmma::__float_to_tf32(x - hi.x[e]);
    }
  }
  __device__ void step(const float* a, int lda, const float* b, int ldb) {
#pragma unroll
    for (int kk = 0; kk < 16; kk += 8) {
      wmma::fragment<wmma::matrix_a, 16, 16, 8, wmma::precision::tf32, AL> a_hi, a_lo;
      wmma::fragment<wmma::matrix_b, 16, 16, 8, wmma::precision::tf32, BL> b_hi, b_lo;
      wmma::load_matrix_sync(a_hi, a + offset_of<AL>(lda, 0, kk), lda);
      wmma::load_matrix_sync(b_hi, b + offset_of<BL>(ldb, kk, 0), ldb);
      split(a_hi, a_lo);
      split(b_hi, b_lo);
      wmma::mma_sync(acc, a_lo, b_hi, acc);  // the small terms first
      wmma::mma_sync(acc, a_hi, b_lo, acc);
      wmma::mma_sync(acc, a_hi, b_hi, acc);
    }
  }
  __device__ void store(float* c, int ldc) const { wmma::store_matrix_sync(c, acc, ldc, wmma::mem_row_major); }
  __device__ void load(const float* c, int ldc) { wmma::load_matrix_sync(acc, c, ldc, wmma::mem_row_major); }
};

template <typename AL, typename BL>
struct Mma16<double, AL, BL> {  // fp64: 2 x 2 m8n8k4 tiles, four K steps
  wmma::fragment<wmma::accumulator, 8, 8, 4, double> acc[2][2];
  __device__ void zero() {
    for (auto& row : acc)
      for (auto& a : row) wmma::fill_fragment(a, 0.0);
  }
  __device__ void step(const double* a, int lda, const double* b, int ldb) {
#pragma unroll
    for (int kk = 0; kk < 16; kk += 4) {
      wmma::fragment<wmma::matrix_a, 8, 8, 4, double, AL> fa[2];
      wmma::fragment<wmma::matrix_b, 8, 8, 4, double, BL> fb[2];
      for (int i = 0; i < 2; ++i) wmma::load_matrix_sync(fa[i], a + offset_of<AL>(lda, 8 * i, kk), lda);
      for (int j = 0; j < 2; ++j) wmma::load_matrix_sync(fb[j], b + offset_of<BL>(ldb, kk, 8 * j), ldb);
      for (int i = 0; i < 2; ++i)
        for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
    }
  }
  __device__ void store(double* c, int ldc) const {
    for (int i = 0; i < 2; ++i)
      for (int j = 0; j < 2; ++j) wmma::store_matrix_sync(c + 8 * i * ldc + 8 * j, acc[i][j], ldc, wmma::mem_row_major);
  }
};

// shared memory of one block: two operand tiles while the K axis streams, then the finished tile (the stage)
template <typename scalar_t>
struct Smem {
  using Op = operand_t<scalar_t>;
  using T = accumulation_t<scalar_t>;
  // leading dimensions, padded by 16 bytes: a 64 x KT tile with K contiguous, a KT x 64 tile with the 64 contiguous
  static constexpr int LD_K = KT + 16 / sizeof(Op), LD_64 = 64 + 16 / sizeof(Op), LD_STAGE = BC + 16 / sizeof(T);
  static constexpr int TILE = 64 * LD_K > KT * LD_64 ? 64 * LD_K : KT * LD_64;  // operand elements per tile
  static constexpr size_t OPERANDS = 2 * TILE * sizeof(Op), STAGE = BR * LD_STAGE * sizeof(T);
  static constexpr size_t BYTES = OPERANDS > STAGE ? OPERANDS : STAGE;
};
static_assert(Smem<double>::BYTES <= 48 * 1024, "static shared memory is limited to 48 KiB");

// Warp w's tiles: rows (w / 2) * 32 + 16 i, columns (w % 2) * 32 + 16 j
template <typename scalar_t, typename AL, typename BL>
using Acc = Mma16<scalar_t, AL, BL>[2][2];
__device__ __forceinline__ int warp_row() { return static_cast<int>(threadIdx.x) / 32 / 2 * 32; }
__device__ __forceinline__ int warp_col() { return static_cast<int>(threadIdx.x) / 32 % 2 * 32; }

// acc = sum over k < K of A(r, k) B(k, c) for the block's 64 x 64 tile (acc += with `accumulate`). A(r, k) and
// B(k, c) return operand values in the accumulation type, 0 outside the matrices; AL = row_major means A is read
// with K contiguous (else r), BL = col_major means B is read with K contiguous (else c): each tile is loaded in
// the order its source is contiguous. Every warp runs all its tiles, also those beyond the matrices' edges: wmma
// under a branch costs a reconvergence call, around which ptxas (sm_80) parks registers in local memory. Ends with a
// barrier.
template <typename scalar_t, typename AL, typename BL, typename ALoad, typename BLoad>
__device__ void block_gemm(Acc<scalar_t, AL, BL>& acc, int64_t K, const ALoad& A, const BLoad& B, unsigned char* smem,
                           bool accumulate = false) {
  using S = Smem<scalar_t>;
  using Op = typename S::Op;
  constexpr bool A_K = std::is_same_v<AL, wmma::row_major>, B_K = std::is_same_v<BL, wmma::col_major>;
  constexpr int LDA = A_K ? S::LD_K : S::LD_64, LDB = B_K ? S::LD_K : S::LD_64;
  Op* As = reinterpret_cast<Op*>(smem);
  Op* Bs = As + S::TILE;
  const int tid = threadIdx.x, wr = warp_row(), wc = warp_col();
  if (!accumulate) {
    for (auto& row : acc)
      for (auto& a : row) a.zero();
  }
  for (int64_t k0 = 0; k0 < K; k0 += KT) {
    for (int e = tid; e < 64 * KT; e += THREADS) {
      const int x = A_K ? e / KT : e % 64, k = A_K ? e % KT : e / 64;  // x: row of A
      As[offset_of<AL>(LDA, x, k)] = to_operand<Op>(A(x, k0 + k));
      const int y = B_K ? e / KT : e % 64, kb = B_K ? e % KT : e / 64;  // y: column of B
      Bs[offset_of<BL>(LDB, kb, y)] = to_operand<Op>(B(k0 + kb, y));
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < KT; kk += 16) {
#pragma unroll
      for (int i = 0; i < 2; ++i) {
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          acc[i][j].step(As + offset_of<AL>(LDA, wr + 16 * i, kk), LDA, Bs + offset_of<BL>(LDB, kk, wc + 16 * j), LDB);
        }
      }
    }
    __syncthreads();
  }
}

// the block's accumulators to and from a 64 x 64 tile in shared memory, row-major with leading dimension
// Smem::LD_STAGE: each warp its own 16 x 16 tiles, so a warp reads back what it wrote without a barrier
template <typename scalar_t, typename AL, typename BL>
__device__ void keep_tiles(const Acc<scalar_t, AL, BL>& acc, accumulation_t<scalar_t>* tile) {
  constexpr int LD = Smem<scalar_t>::LD_STAGE;
  for (int i = 0; i < 2; ++i) {
    for (int j = 0; j < 2; ++j) acc[i][j].store(tile + (warp_row() + 16 * i) * LD + warp_col() + 16 * j, LD);
  }
}
template <typename scalar_t, typename AL, typename BL>
__device__ void restore_tiles(Acc<scalar_t, AL, BL>& acc, const accumulation_t<scalar_t>* tile) {
  constexpr int LD = Smem<scalar_t>::LD_STAGE;
  for (int i = 0; i < 2; ++i) {
    for (int j = 0; j < 2; ++j) acc[i][j].load(tile + (warp_row() + 16 * i) * LD + warp_col() + 16 * j, LD);
  }
}

// the finished tile in shared memory, row-major with leading dimension Smem::LD_STAGE; ends with a barrier, and the
// caller must barrier before the next block_gemm
template <typename scalar_t, typename AL, typename BL>
__device__ accumulation_t<scalar_t>* stage(const Acc<scalar_t, AL, BL>& acc, unsigned char* smem) {
  using T = accumulation_t<scalar_t>;
  T* st = reinterpret_cast<T*>(smem);
  keep_tiles(acc, st);
  __syncthreads();
  return st;
}

// fn(r, c, x) for the staged tile's elements r < rows, c < cols, c fastest (coalesced stores along positions)
template <typename T, typename Fn>
__device__ void each_staged(const T* st, int ld, int rows, int cols, const Fn& fn) {
  for (int e = threadIdx.x; e < BR * BC; e += THREADS) {
    const int r = e / BC, c = e % BC;
    if (r < rows && c < cols) fn(r, c, st[r * ld + c]);
  }
}

#define FUSED_MTL_ATTN_SMEM(scalar_t) alignas(128) __shared__ unsigned char smem[Smem<scalar_t>::BYTES]

// ---------------------------------------------------------------- kernels
// sum of a segment's partials in piece order: rows of [m+1, d] matrices (S; z or dS; dz) of group g
template <typename T>
struct Summed {
  const T* partial;  // [pieces, G, rows, d]
  int64_t begin, end, G, g, rows, d;  // the segment's pieces [begin, end) of the call

  __device__ Summed(const T* partial_, const Pieces& w, int i, int64_t G_, int64_t g_, int64_t rows_, int64_t d_)
      : partial(partial_), begin(w.base + w.first[i]), end(w.base + w.first[i + 1]), G(G_), g(g_), rows(rows_), d(d_) {}
  __device__ T operator()(int64_t r, int64_t c) const {
    T s = T(0);
    for (int64_t ch = begin; ch < end; ++ch) s += partial[((ch * G + g) * rows + r) * d + c];
    return s;
  }
};

// When [m+1, d] fits one 64 x 64 tile (the finest scales), apply_kernel and source_kernel sum a segment's partials
// once per block into shared memory and walk a span of position tiles with them, instead of summing them again for
// every tile. Not for fp64, whose tiles leave no room for the cache in 48 KiB.
template <typename scalar_t>
constexpr bool kCachesSums = !std::is_same_v<scalar_t, double>;
bool caches_sums(at::ScalarType dtype, int64_t d, int64_t m) { return dtype != at::kDouble && m + 1 <= BR && d <= BC; }

// cache[r * BC + c] = summed(r, c) for r < rows, c < d, calling keep(r, c, sum) on each; ends with a barrier
template <typename T, typename Keep>
__device__ void sum_into(T* cache, const Summed<T>& summed, int64_t rows, int64_t d, const Keep& keep) {
  for (int64_t e = threadIdx.x; e < rows * d; e += THREADS) {
    const int64_t r = e / d, c = e % d;
    const T s = summed(r, c);
    keep(r, c, s);
    cache[r * BC + c] = s;
  }
  __syncthreads();
}

// partial[w.base + piece, g][r][c] = sum over the piece's positions t of X(g, seg, r, t) Y(g, seg, c, t), r < R, c < C
template <typename scalar_t, typename XLoad, typename YLoad>
__device__ void reduce_block(int64_t piece, int64_t tile, int64_t g, int64_t G, const Pieces& w, int64_t R, int64_t C,
                             const XLoad& X, const YLoad& Y, accumulation_t<scalar_t>* partial, unsigned char* smem) {
  using T = accumulation_t<scalar_t>;
  const int64_t col_tiles = cdiv(C, BC), r0 = tile / col_tiles * BR, c0 = tile % col_tiles * BC;
  const Piece pc = w.piece(piece);
  const int rows = static_cast<int>(std::min<int64_t>(R - r0, BR));
  const int cols = static_cast<int>(std::min<int64_t>(C - c0, BC));
  Acc<scalar_t, wmma::row_major, wmma::col_major> acc;
  block_gemm<scalar_t>(
      acc, pc.hi - pc.lo,
      [&](int r, int64_t k) { return pc.lo + k < pc.hi && r < rows ? X(g, pc.seg, r0 + r, pc.lo + k) : T(0); },
      [&](int64_t k, int c) { return pc.lo + k < pc.hi && c < cols ? Y(g, pc.seg, c0 + c, pc.lo + k) : T(0); }, smem);
  T* dst = partial + ((w.base + piece) * G + g) * R * C + r0 * C + c0;
  each_staged(stage(acc, smem), Smem<scalar_t>::LD_STAGE, rows, cols,
              [&](int r, int c, T x) { dst[r * C + c] = x; });
}

// forward partials of [S; z] = [v; 1] softplus(k)^T; grid x = piece of the window, y = output tile, z = group
template <typename scalar_t>
__global__ void __launch_bounds__(THREADS) reduce_kernel(Pieces w, const scalar_t* k, const scalar_t* v, int64_t G,
                                                         int64_t d, int64_t m, int64_t nk,
                                                         accumulation_t<scalar_t>* partial) {
  using T = accumulation_t<scalar_t>;
  FUSED_MTL_ATTN_SMEM(scalar_t);
  reduce_block<scalar_t>(
      blockIdx.x, blockIdx.y, blockIdx.z, G, w, m + 1, d,
      [&](int64_t g, int64_t, int64_t r, int64_t t) { return r < m ? static_cast<T>(v[(g * m + r) * nk + t]) : T(1); },
      [&](int64_t g, int64_t, int64_t c, int64_t t) { return softplus(static_cast<T>(k[(g * d + c) * nk + t])); },
      partial,
      smem);
}

// [S; z] softplus(q) for 64 positions from p0: tile rows 0..62 are rows r0.. of S q, row 63 is z . softplus(q).
// ctx(row, c) gives [S; z] (row m is z).
template <typename scalar_t, typename Ctx>
__device__ accumulation_t<scalar_t>* context_times_queries(const Ctx& ctx, const scalar_t* q, int64_t d,
                                                                 int64_t m, int64_t nq, int64_t r0, int64_t p0,
                                                                 unsigned char* smem) {
  using T = accumulation_t<scalar_t>;
  Acc<scalar_t, wmma::row_major, wmma::row_major> acc;
  block_gemm<scalar_t>(
      acc, d,
      [&](int r, int64_t c) {
        const int64_t row = r == S_ROWS ? m : r0 + r;
        return c < d && (r == S_ROWS || row < m) ? ctx(row, c) : T(0);
      },
      [&](int64_t c, int p) { return c < d && p0 + p < nq ? softplus(static_cast<T>(q[c * nq + p0 + p])) : T(0); },
      smem);
  return stage(acc, smem);
}

// out[g, j, i, p] = (S_j softplus(q_p))_i / max(z_j . softplus(q_p), eps), with S_j, z_j the sums of segment j's
// partials; the blocks of the first position span also store them as the context. grid x = (span of `span`
// position tiles (more than one only when CACHED)) * w.n + (j - w.j0): the segments of one span run side by side,
// so gathered sources share each query tile's trip from HBM; y = block of 63 rows of S, z = group. CACHED is a template
// argument: one kernel holding both ways of reading the sums spills on sm_80. The explicit "1 block per SM" lets
// ptxas take 158 registers for the uncached fp32 variant on sm_80, which it otherwise caps at 128 with 24 B spilled.
template <typename scalar_t, bool CACHED>
__global__ void __launch_bounds__(THREADS, 1) apply_kernel(Pieces w, const accumulation_t<scalar_t>* partial,
                                                        const scalar_t* q, int64_t G, int64_t J, int64_t d, int64_t m,
                                                        int64_t nq, int64_t span, accumulation_t<scalar_t>* ctx,
                                                        scalar_t* out) {
  using T = accumulation_t<scalar_t>;
  FUSED_MTL_ATTN_SMEM(scalar_t);
  __shared__ T cache[CACHED ? BR * BC : 1];
  constexpr int LD = Smem<scalar_t>::LD_STAGE;
  const int i = static_cast<int>(blockIdx.x % w.n);
  const int64_t span_index = blockIdx.x / w.n;
  const int64_t g = blockIdx.z, gj = g * J + w.j0 + i, r0 = static_cast<int64_t>(blockIdx.y) * S_ROWS;
  const Summed<T> summed(partial, w, i, G, g, m + 1, d);
  T* c_out = ctx + gj * (m + 1) * d;
  const bool stores = span_index == 0;  // one block stores each row of the context: z by row block 0
  auto keep = [&](int64_t row, int64_t c, T s) {
    if (stores && (row < m || blockIdx.y == 0)) c_out[row * d + c] = s;
  };
  if constexpr (CACHED) sum_into(cache, summed, m + 1, d, keep);
  auto context = [&](int64_t row, int64_t c) {
    if constexpr (CACHED) {
      return cache[row * BC + c];
    } else {
      const T s = summed(row, c);
      keep(row, c, s);
      return s;
    }
  };
  const int rows = static_cast<int>(std::min<int64_t>(m - r0, S_ROWS));
  const int64_t first = span_index * span, last = std::min(first + span, cdiv(nq, BC));
  // at least one tile: without positions, the first span still stores the context; uncached, exactly one
  for (int64_t tile = first; tile == first || (CACHED && tile < last); ++tile) {
    const int64_t p0 = tile * BC;
    T* st = context_times_queries(context, q + g * d * nq, d, m, nq, r0, p0, smem);
    const int cols = static_cast<int>(std::min<int64_t>(nq - p0, BC));
    T* den = st + S_ROWS * LD;  // the stage's last row, replaced by 1 / max(den, eps)
    if (threadIdx.x < BC) den[threadIdx.x] = T(1) / clamp_den(den[threadIdx.x]);
    __syncthreads();
    scalar_t* dst = out + (gj * m + r0) * nq + p0;
    each_staged(st, LD, rows, cols, [&](int r, int p, T x) { dst[r * nq + p] = static_cast<scalar_t>(x * den[p]); });
    __syncthreads();  // before the next tile overwrites the stage
  }
}

// of one position: rden = 1 / max(den, eps) and b = -dot rden^2 with dot = g . S q, zero where the clamp is active
template <typename T>
__device__ __forceinline__ void position_scalars(T den, T dot, T& rden, T& b) {
  const T r = T(1) / clamp_den(den);
  rden = r;
  b = den_passes_grad(den) ? -dot * r * r : T(0);
}

// rden[g, j, p] = 1 / max(den, eps) and b[g, j, p] = -(g . S q) / max(den, eps)^2 (zero where the clamp is active),
// [S; z] softplus(q) recomputed as in apply_kernel, 63 rows of S per pass. Thread t sums g . S q for position t % 64
// over rows t / 64 + 2 i; the two halves are added in order at the end. grid x = position tile * J + j (the
// segments of a tile side by side, sharing its trip from HBM), z = group
template <typename scalar_t>
__global__ void __launch_bounds__(THREADS) scalars_kernel(const scalar_t* grad, const scalar_t* q,
                                                          const accumulation_t<scalar_t>* ctx, int64_t J, int64_t d,
                                                          int64_t m, int64_t nq, accumulation_t<scalar_t>* rden,
                                                          accumulation_t<scalar_t>* b) {
  using T = accumulation_t<scalar_t>;
  FUSED_MTL_ATTN_SMEM(scalar_t);
  __shared__ T dots[THREADS];
  constexpr int LD = Smem<scalar_t>::LD_STAGE;
  const int tid = threadIdx.x, p = tid % BC;
  const int64_t g = blockIdx.z, gj = g * J + blockIdx.x % J, p0 = static_cast<int64_t>(blockIdx.x / J) * BC;
  const T* s = ctx + gj * (m + 1) * d;
  const bool live = p0 + p < nq;
  T dot = T(0), den = T(0);
  for (int64_t r0 = 0; r0 == 0 || r0 < m; r0 += S_ROWS) {
    const T* st = context_times_queries([&](int64_t row, int64_t c) { return s[row * d + c]; }, q + g * d * nq, d, m,
                                        nq, r0, p0, smem);
    if (live) {
      for (int r = tid / BC; r < S_ROWS && r0 + r < m; r += THREADS / BC) {
        dot += static_cast<T>(grad[(gj * m + r0 + r) * nq + p0 + p]) * st[r * LD + p];
      }
      den = st[S_ROWS * LD + p];
    }
    __syncthreads();  // before the next pass overwrites the stage
  }
  dots[tid] = dot;
  __syncthreads();
  if (tid >= BC || !live) return;
  position_scalars(den, dots[tid] + dots[tid + BC], rden[gj * nq + p0 + p], b[gj * nq + p0 + p]);
}

// Two kinds of blocks: the first n_reduce sum [dS; dz] = [g / den; b] softplus(q)^T over pieces of the query
// positions (w: segment j's pieces cover the virtual positions [j nq, (j + 1) nq)); the rest (launched with the
// first window only) compute dq[g, c, p] = softplus'(q) sum_j sum_{i <= m} [S_j; z_j][i, c] [g_j / den_j; b_j][i, p],
// one accumulator over all j. Reduce blocks: x = (g, tile, piece), piece fastest; dq blocks: (g, channel
// tile, position tile), position tile fastest.
template <typename scalar_t>
__global__ void __launch_bounds__(THREADS) query_kernel(Pieces w, int64_t n_reduce, const scalar_t* grad,
                                                        const scalar_t* q, const accumulation_t<scalar_t>* ctx,
                                                        const accumulation_t<scalar_t>* rden,
                                                        const accumulation_t<scalar_t>* bv, int64_t G, int64_t J,
                                                        int64_t d, int64_t m, int64_t nq,
                                                        accumulation_t<scalar_t>* partial, scalar_t* dq) {
  using T = accumulation_t<scalar_t>;
  FUSED_MTL_ATTN_SMEM(scalar_t);
  // row i of [g_j / den_j; b_j] at query position t of group g
  auto weights = [&](int64_t g, int64_t j, int64_t i, int64_t t) {
    const int64_t gj = g * J + j;
    return i < m ? static_cast<T>(grad[(gj * m + i) * nq + t]) * rden[gj * nq + t] : bv[gj * nq + t];
  };
  int64_t block = blockIdx.x;
  if (block < n_reduce) {
    const int64_t pieces = w.count(), tiles = cdiv(m + 1, BR) * cdiv(d, BC);
    reduce_block<scalar_t>(
        block % pieces, block / pieces % tiles, block / (pieces * tiles), G, w, m + 1, d,
        [&](int64_t g, int64_t j, int64_t i, int64_t t) { return weights(g, j, i, t - j * nq); },
        [&](int64_t g, int64_t j, int64_t c, int64_t t) {
          return softplus(static_cast<T>(q[(g * d + c) * nq + t - j * nq]));
        },
        partial, smem);
    return;
  }
  block -= n_reduce;
  const int64_t p_tiles = cdiv(nq, BC), c_tiles = cdiv(d, BR);
  const int64_t p0 = block % p_tiles * BC, c0 = block / p_tiles % c_tiles * BR, g = block / (p_tiles * c_tiles);
  const int rows = static_cast<int>(std::min<int64_t>(d - c0, BR));
  const int cols = static_cast<int>(std::min<int64_t>(nq - p0, BC));
  Acc<scalar_t, wmma::col_major, wmma::row_major> acc;
  for (int64_t j = 0; j < J; ++j) {
    const T* s = ctx + (g * J + j) * (m + 1) * d + c0;
    block_gemm<scalar_t>(
        acc, m + 1, [&](int c, int64_t i) { return i <= m && c < rows ? s[i * d + c] : T(0); },
        [&](int64_t i, int p) { return i <= m && p < cols ? weights(g, j, i, p0 + p) : T(0); }, smem, j > 0);
  }
  const scalar_t* qg = q + (g * d + c0) * nq + p0;
  scalar_t* dst = dq + (g * d + c0) * nq + p0;
  each_staged(stage(acc, smem), Smem<scalar_t>::LD_STAGE, rows, cols, [&](int c, int p, T x) {
    dst[c * nq + p] = static_cast<scalar_t>(x * softplus_grad(static_cast<T>(qg[c * nq + p])));
  });
}

// The query side of the backward in one pass, for all segments of a call where [m+1, d] fits one tile (the finest
// scales) and the dynamic shared memory holds J [dS; dz] tiles, fp16/bf16/fp32. Per 64-position tile of the block's
// piece and per segment j: [S_j; z_j] softplus(q) with the denominator in the last row, 1/den_j and b_j,
// dq += [S_j; z_j]^T [g_j/den_j; b_j] (one accumulator over the segments, softplus'(q) in its epilogue) and
// [dS_j; dz_j] += [g_j/den_j; b_j] softplus(q)^T, kept in shared memory over the piece and stored as segment j's
// partial. q and g come from HBM once; a tile's later reads of them hit the cache. fp64 takes the three launches
// (its tiles would need twice the shared memory, and nothing in the network runs in fp64 on a GPU).
// grid x = piece of segment 0's query positions (every segment has the same pieces), z = group
template <typename scalar_t>
struct FusedQuerySmem {  // dynamic shared memory: operand tiles / stage, J [dS; dz] tiles, 1/den and b, dot halves
  using T = accumulation_t<scalar_t>;
  static constexpr size_t TILE = BR * Smem<scalar_t>::LD_STAGE;  // elements of one [dS; dz] tile
  static size_t bytes(int64_t J) { return Smem<scalar_t>::BYTES + (J * (TILE + 2 * BC) + THREADS) * sizeof(T); }
};
static_assert(Smem<float>::BYTES % 128 == 0 && Smem<c10::Half>::BYTES % 128 == 0, "the [dS; dz] tiles start aligned");

template <typename scalar_t>
__global__ void __launch_bounds__(THREADS) fused_query_kernel(Pieces w, const scalar_t* grad, const scalar_t* q,
                                                              const accumulation_t<scalar_t>* ctx, int64_t G,
                                                              int64_t J, int64_t d, int64_t m, int64_t nq,
                                                              accumulation_t<scalar_t>* partial, scalar_t* dq) {
  using T = accumulation_t<scalar_t>;
  using FS = FusedQuerySmem<scalar_t>;
  FUSED_MTL_ATTN_DYNAMIC_SMEM(smem);
  T* ds_tiles = reinterpret_cast<T*>(smem + Smem<scalar_t>::BYTES);  // segment j's at j * FS::TILE
  T* rden = ds_tiles + J * FS::TILE;                                   // [J][BC]
  T* bv = rden + J * BC;                                               // [J][BC]
  T* dots = bv + J * BC;                                               // [THREADS]
  constexpr int LD = Smem<scalar_t>::LD_STAGE;
  const int tid = threadIdx.x, p = tid % BC;
  const int64_t g = blockIdx.z;
  const Piece pc = w.piece(blockIdx.x);
  const scalar_t* qg = q + g * d * nq;
  for (int64_t p0 = pc.lo; p0 < pc.hi; p0 += BC) {
    const int cols = static_cast<int>(std::min<int64_t>(pc.hi - p0, BC));
    Acc<scalar_t, wmma::col_major, wmma::row_major> acc;  // dq, summed over the segments
    for (int64_t j = 0; j < J; ++j) {
      const T* s = ctx + (g * J + j) * (m + 1) * d;
      const scalar_t* gg = grad + (g * J + j) * m * nq;
      T* rd = rden + j * BC;
      T* bj = bv + j * BC;
      const T* st = context_times_queries([&](int64_t row, int64_t c) { return s[row * d + c]; }, qg, d, m, nq, 0,
                                          p0, smem);
      T dot = T(0);  // g . S q as in scalars_kernel (m < 64: one pass)
      if (p < cols) {
        for (int r = tid / BC; r < m; r += THREADS / BC) dot += static_cast<T>(gg[r * nq + p0 + p]) * st[r * LD + p];
      }
      dots[tid] = dot;
      __syncthreads();
      if (tid < BC) position_scalars(st[S_ROWS * LD + tid], dots[tid] + dots[tid + BC], rd[tid], bj[tid]);
      __syncthreads();
      auto weights = [&](int64_t i, int64_t t) {  // row i of [g_j / den_j; b_j] at position t of the tile
        if (t >= cols || i > m) return T(0);
        return i < m ? static_cast<T>(gg[i * nq + p0 + t]) * rd[t] : bj[t];
      };
      block_gemm<scalar_t>(
          acc, m + 1, [&](int c, int64_t i) { return i <= m && c < d ? s[i * d + c] : T(0); },
          [&](int64_t i, int t) { return weights(i, t); }, smem, j > 0);
      Acc<scalar_t, wmma::row_major, wmma::col_major> ds;
      if (p0 > pc.lo) restore_tiles(ds, ds_tiles + j * FS::TILE);
      block_gemm<scalar_t>(
          ds, cols, [&](int i, int64_t t) { return weights(i, t); },
          [&](int64_t t, int c) { return t < cols && c < d ? softplus(static_cast<T>(qg[c * nq + p0 + t])) : T(0); },
          smem, p0 > pc.lo);
      keep_tiles(ds, ds_tiles + j * FS::TILE);
    }
    each_staged(stage(acc, smem), LD, static_cast<int>(d), cols, [&](int c, int t, T x) {
      dq[(g * d + c) * nq + p0 + t] = static_cast<scalar_t>(x * softplus_grad(static_cast<T>(qg[c * nq + p0 + t])));
    });
    __syncthreads();
  }
  // the partials of the segments' pieces (the last tile's stage() barrier follows every keep_tiles)
  for (int64_t j = 0; j < J; ++j) {
    T* dst = partial + ((w.base + w.first[j] + blockIdx.x) * G + g) * (m + 1) * d;
    each_staged(ds_tiles + j * FS::TILE, LD, static_cast<int>(m + 1), static_cast<int>(d),
                [&](int r, int c, T x) { dst[r * d + c] = x; });
  }
}

// dv = dS softplus(k) and dk = softplus'(k) [dS; dz]^T [v; 1] for the 64-position tiles of one piece of a segment's
// positions, with dS and dz summed from the query side's partials (pieces qw) in piece order. CACHED ([m+1, d] in one
// tile): a block computes both for each tile of its span, so k and v come from HBM once (the dk epilogue's read of
// k hits the cache); else one tile per piece and row block y, the first cdiv(m, 64) blocks dv, the rest dk.
// grid x = piece of the window, y = row block (one when CACHED), z = group
template <typename scalar_t, bool CACHED>
__global__ void __launch_bounds__(THREADS) source_kernel(Pieces tiles, Pieces qw,
                                                         const accumulation_t<scalar_t>* partial, const scalar_t* k,
                                                         const scalar_t* v, int64_t G, int64_t d, int64_t m, int64_t nk,
                                                         scalar_t* dk, scalar_t* dv) {
  using T = accumulation_t<scalar_t>;
  FUSED_MTL_ATTN_SMEM(scalar_t);
  __shared__ T cache[CACHED ? BR * BC : 1];
  constexpr int LD = Smem<scalar_t>::LD_STAGE;
  const int64_t g = blockIdx.z;
  const Piece pc = tiles.piece(blockIdx.x);
  const Summed<T> summed(partial, qw, static_cast<int>(pc.seg - tiles.j0), G, g, m + 1, d);
  if constexpr (CACHED) sum_into(cache, summed, m + 1, d, [](int64_t, int64_t, T) {});
  auto ds = [&](int64_t r, int64_t c) {
    if constexpr (CACHED) {
      return cache[r * BC + c];
    } else {
      return summed(r, c);
    }
  };
  const scalar_t* kg = k + g * d * nk;
  const scalar_t* vg = v + g * m * nk;
  auto dv_tile = [&](int64_t r0, int64_t lo) {  // rows r0.. of dv at positions lo..
    const int rows = static_cast<int>(std::min<int64_t>(m - r0, BR));
    const int cols = static_cast<int>(std::min<int64_t>(pc.hi - lo, BC));
    Acc<scalar_t, wmma::row_major, wmma::row_major> acc;
    block_gemm<scalar_t>(
        acc, d, [&](int r, int64_t c) { return c < d && r < rows ? ds(r0 + r, c) : T(0); },
        [&](int64_t c, int t) { return c < d && t < cols ? softplus(static_cast<T>(kg[c * nk + lo + t])) : T(0); },
        smem);
    scalar_t* dst = dv + (g * m + r0) * nk + lo;
    each_staged(stage(acc, smem), LD, rows, cols,
                [&](int r, int t, T x) { dst[r * nk + t] = static_cast<scalar_t>(x); });
    __syncthreads();  // before the next product overwrites the stage
  };
  auto dk_tile = [&](int64_t c0, int64_t lo) {  // channels c0.. of dk at positions lo..
    const int rows = static_cast<int>(std::min<int64_t>(d - c0, BR));
    const int cols = static_cast<int>(std::min<int64_t>(pc.hi - lo, BC));
    Acc<scalar_t, wmma::col_major, wmma::row_major> acc;
    block_gemm<scalar_t>(
        acc, m + 1, [&](int c, int64_t i) { return i <= m && c < rows ? ds(i, c0 + c) : T(0); },
        [&](int64_t i, int t) {
          return t < cols && i <= m ? (i < m ? static_cast<T>(vg[i * nk + lo + t]) : T(1)) : T(0);
        },
        smem);
    const scalar_t* kc = kg + c0 * nk + lo;
    scalar_t* dst = dk + (g * d + c0) * nk + lo;
    each_staged(stage(acc, smem), LD, rows, cols, [&](int c, int t, T x) {
      dst[c * nk + t] = static_cast<scalar_t>(x * softplus_grad(static_cast<T>(kc[c * nk + t])));
    });
    __syncthreads();
  };
  if constexpr (CACHED) {
    for (int64_t lo = pc.lo; lo < pc.hi; lo += BC) {
      if (m > 0) dv_tile(0, lo);
      if (d > 0) dk_tile(0, lo);
    }
  } else {
    const int64_t v_blocks = cdiv(m, BR), y = blockIdx.y;
    if (y < v_blocks) dv_tile(y * BR, pc.lo);
    else dk_tile((y - v_blocks) * BR, pc.lo);
  }
}

// The variants a dtype has: fp64 has no cached and no one-pass ones (kCachesSums). The choice is made inside templates
// so that those names are never instantiated for fp64: named in a non-template's discarded branch, they make nvcc warn
// (20280) of kernels without device code.
template <typename scalar_t>
auto apply_variant(bool cached) {
  if constexpr (kCachesSums<scalar_t>) {
    if (cached) return apply_kernel<scalar_t, true>;
  }
  return apply_kernel<scalar_t, false>;
}

template <typename scalar_t>
auto source_variant(bool cached) {
  if constexpr (kCachesSums<scalar_t>) {
    if (cached) return source_kernel<scalar_t, true>;
  }
  return source_kernel<scalar_t, false>;
}

template <typename scalar_t>
auto fused_query_variant() {  // nullptr for fp64, which never takes the one-pass query side
  using T = accumulation_t<scalar_t>;
  using Kernel = void (*)(Pieces, const scalar_t*, const scalar_t*, const T*, int64_t, int64_t, int64_t, int64_t,
                          int64_t, T*, scalar_t*);
  if constexpr (kCachesSums<scalar_t>) {
    return Kernel(fused_query_kernel<scalar_t>);
  } else {
    return Kernel(nullptr);
  }
}

// ---------------------------------------------------------------- host side
std::tuple<Tensor, Tensor> forward_cuda(const Tensor& q, const Tensor& k, const Tensor& v,
                                        const std::vector<int64_t>& offsets) {
  TORCH_CHECK(kEmulated || q.is_cuda(), "q must be a CUDA tensor for the cuda kernels, got ", q.device());
  const DeviceGuard guard(q.device());
  const Stream stream = current_stream();
  const int64_t J = static_cast<int64_t>(offsets.size()) - 1;
  const int64_t G = q.size(0), d = q.size(1), nq = q.size(2), m = v.size(1), nk = k.size(2);
  Tensor out = at::empty({G, J, m, nq}, q.options());
  Tensor ctx = at::empty({G, J, m + 1, d}, q.options().dtype(accumulation_dtype(q.scalar_type())));
  if (G == 0 || J == 0) return {out, ctx};
  const int64_t tiles = cdiv(m + 1, BR) * cdiv(d, BC);
  const std::vector<Pieces> ws = windows(offsets, piece_size(longest(offsets), G * J * tiles));
  Tensor partial = at::empty({total_pieces(ws), G, m + 1, d}, ctx.options());
  // position tiles per apply block: with the sums cached, enough for about target_blocks blocks; else one
  const bool cached = caches_sums(q.scalar_type(), d, m);
  const int64_t row_blocks = std::max<int64_t>(cdiv(m, S_ROWS), 1);
  const int64_t span =
      cached ? std::max<int64_t>(cdiv(cdiv(nq, BC), cdiv(tuning.target_blocks, G * J * row_blocks)), 1) : 1;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "fused_mtl_attn_forward_cuda", [&] {
    using T = accumulation_t<scalar_t>;
    for (const Pieces& w : ws) {
      if (w.count() > 0 && tiles > 0) {
        launch(reduce_kernel<scalar_t>, dim3(w.count(), tiles, G), dim3(THREADS), 0, stream, w,
               k.const_data_ptr<scalar_t>(), v.const_data_ptr<scalar_t>(), G, d, m, nk,
               partial.mutable_data_ptr<T>());
      }
      // also without positions: its first span stores the context
      launch(apply_variant<scalar_t>(cached), dim3(cdiv(std::max<int64_t>(cdiv(nq, BC), 1), span) * w.n, row_blocks, G),
             dim3(THREADS), 0, stream, w, partial.const_data_ptr<T>(), q.const_data_ptr<scalar_t>(), G, J, d, m, nq,
             span, ctx.mutable_data_ptr<T>(), out.mutable_data_ptr<scalar_t>());
    }
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
  if (J == 0 || G == 0) return {at::zeros_like(q), at::zeros_like(k), at::zeros_like(v)};
  Tensor dq = at::empty_like(q), dk = at::empty_like(k), dv = at::empty_like(v);
  // [dS; dz] of segment j reduce over all query positions: segment j's pieces cover [j nq, (j + 1) nq)
  std::vector<int64_t> query_offsets(J + 1);
  for (int64_t j = 0; j <= J; ++j) query_offsets[j] = j * nq;
  const int64_t tiles = cdiv(m + 1, BR) * cdiv(d, BC);
  const bool cached = caches_sums(q.scalar_type(), d, m);
  // source positions per source_kernel block: with the sums cached, one block per span of tiles does dv and dk,
  // enough tiles per block for about target_blocks blocks; else a block per tile and row block
  const int64_t row_blocks = cached ? (m + d > 0 ? 1 : 0) : cdiv(m, BR) + cdiv(d, BR);
  const int64_t span = cached ? std::max<int64_t>(cdiv(cdiv(nk, BC) * G, tuning.target_blocks), 1) : 1;
  const std::vector<Pieces> sws = windows(offsets, BC * span);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "fused_mtl_attn_backward_cuda", [&] {
    using T = accumulation_t<scalar_t>;
    // the query side in one launch (fused_query_kernel) where the J [dS; dz] tiles fit the shared memory; its
    // pieces hold whole 64-position tiles, enough of them for about target_blocks blocks, at most max_splits
    const size_t smem = FusedQuerySmem<scalar_t>::bytes(J);
    const bool one_pass =
        kCachesSums<scalar_t> && tuning.one_pass_query && cached && J <= WINDOW && smem <= shared_memory_limit();
    const int64_t pieces = std::min(cdiv(tuning.target_blocks, G), tuning.max_splits);
    const int64_t size =
        one_pass ? BC * std::max<int64_t>(cdiv(cdiv(nq, BC), pieces), 1) : piece_size(nq, G * J * tiles);
    const std::vector<Pieces> qws = windows(query_offsets, size);
    Tensor partial = at::empty({total_pieces(qws), G, m + 1, d}, ctx.options());
    if (one_pass) {
      if (qws[0].first[1] > 0) {
        launch(fused_query_variant<scalar_t>(), dim3(qws[0].first[1], 1, G), dim3(THREADS), smem, stream, qws[0],
               grad.const_data_ptr<scalar_t>(), q.const_data_ptr<scalar_t>(), ctx.const_data_ptr<T>(), G, J, d, m, nq,
               partial.mutable_data_ptr<T>(), dq.mutable_data_ptr<scalar_t>());
      }
    } else {
      Tensor rden = at::empty({G, J, nq}, ctx.options()), b = at::empty({G, J, nq}, ctx.options());
      if (nq > 0) {
        launch(scalars_kernel<scalar_t>, dim3(cdiv(nq, BC) * J, 1, G), dim3(THREADS), 0, stream,
               grad.const_data_ptr<scalar_t>(), q.const_data_ptr<scalar_t>(), ctx.const_data_ptr<T>(), J, d, m, nq,
               rden.mutable_data_ptr<T>(), b.mutable_data_ptr<T>());
      }
      for (size_t wi = 0; wi < qws.size(); ++wi) {
        const int64_t n_reduce = qws[wi].count() * tiles * G;
        const int64_t n_dq = wi == 0 ? cdiv(nq, BC) * cdiv(d, BR) * G : 0;
        if (n_reduce + n_dq > 0) {
          launch(query_kernel<scalar_t>, dim3(n_reduce + n_dq), dim3(THREADS), 0, stream, qws[wi], n_reduce,
                 grad.const_data_ptr<scalar_t>(), q.const_data_ptr<scalar_t>(), ctx.const_data_ptr<T>(),
                 rden.const_data_ptr<T>(), b.const_data_ptr<T>(), G, J, d, m, nq, partial.mutable_data_ptr<T>(),
                 dq.mutable_data_ptr<scalar_t>());
        }
      }
    }
    const auto kernel = source_variant<scalar_t>(cached);
    for (size_t wi = 0; wi < sws.size(); ++wi) {
      if (sws[wi].count() > 0 && row_blocks > 0) {
        launch(kernel, dim3(sws[wi].count(), row_blocks, G), dim3(THREADS), 0, stream, sws[wi], qws[wi],
               partial.const_data_ptr<T>(), k.const_data_ptr<scalar_t>(), v.const_data_ptr<scalar_t>(), G, d, m, nk,
               dk.mutable_data_ptr<scalar_t>(), dv.mutable_data_ptr<scalar_t>());
      }
    }
  });
  return {dq, dk, dv};
}

}  // namespace

#ifdef FUSED_MTL_ATTN_EMULATE_CUDA
// the CUDA kernels on CPU tensors, for tests: the four ops of fused_mtl_attn (same schemas) in their own namespace
TORCH_LIBRARY(fused_mtl_attn_emulated, m) {
  define_attention_ops(m);
  m.def("launches() -> int", +[]() -> int64_t { return emulation::launches.load(); });  // kernel launches so far
  m.def(kTuningSchema, &launch_tuning);
}
FUSED_MTL_ATTN_REGISTER_IN(fused_mtl_attn_emulated, CPU, forward_cuda, backward_cuda)
#else
FUSED_MTL_ATTN_REGISTER(CUDA, forward_cuda, backward_cuda)
TORCH_LIBRARY_FRAGMENT(fused_mtl_attn, m) { m.def(kTuningSchema, &launch_tuning); }
#endif

}  // namespace fused_mtl_attn
