// Host emulation of the CUDA execution model that attention_cuda.cu uses, so that its kernels run on a CPU in the
// test suite (attention_cuda_emulated.cpp compiles that file again with FUSED_MTL_ATTN_EMULATE_CUDA): no GPU is
// needed to find a wrong index, a missing bound check or a race across __syncthreads.
//
// A launch runs its blocks one after another; a block runs as blockDim OS threads, so __syncthreads is a real
// barrier and a thread that returns early leaves it (as on a GPU, where exited threads no longer count).
// __shared__ variables become function statics: one copy, shared by the threads of the one block that runs at a
// time; dynamic shared memory is one buffer per launch. Streams, guards and launch checks are no-ops.
//
// The tensor cores' warp-level API (nvcuda::wmma) is emulated too: a fragment holds its whole tile, row-major, and
// lane 0 of each warp does the loads, products and stores for the warp while the other lanes skip them. The
// kernels read a product only back through memory after a barrier, so what each lane's registers would hold on a
// GPU does not matter here; operands keep their rounding (fp16/bf16 values, TF32 by __float_to_tf32), products
// accumulate in the accumulator's type, the K axis in order.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <functional>
#include <mutex>
#include <thread>
#include <type_traits>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

namespace fused_mtl_attn {
namespace emulation {

struct dim3 {
  unsigned x, y, z;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

inline thread_local dim3 threadIdx{0, 0, 0};
inline thread_local dim3 blockIdx{0, 0, 0};
inline dim3 blockDim{1, 1, 1};
inline dim3 gridDim{1, 1, 1};

// the block's barrier: `live` threads take part; one that finishes leaves, releasing the others if they all wait.
// The count is under a mutex; waiters wait for the generation to move on: on an atomic (C++20 wait/notify, so that a
// release wakes them without making them queue for the mutex again) or, in C++17 builds (torch before 2.12 compiles
// extensions as C++17), on a condition variable.
class Barrier {
 public:
  explicit Barrier(int live) : live_(live) {}
  void arrive_and_wait() {
    std::unique_lock<std::mutex> lock(mutex_);
    const int64_t generation = generation_.load();
    if (++arrived_ == live_) {
      release();
      return;
    }
#if defined(__cpp_lib_atomic_wait)
    lock.unlock();
    generation_.wait(generation);  // until a release moves the generation on
#else
    released_.wait(lock, [&] { return generation_.load() != generation; });
#endif
  }
  void reset(int live) {
    std::lock_guard<std::mutex> lock(mutex_);
    live_ = live;
    arrived_ = 0;
  }
  void leave() {
    std::lock_guard<std::mutex> lock(mutex_);
    if (--live_ > 0 && arrived_ == live_) release();
  }

 private:
  void release() {  // under the mutex
    arrived_ = 0;
    generation_.fetch_add(1);
#if defined(__cpp_lib_atomic_wait)
    generation_.notify_all();
#else
    released_.notify_all();
#endif
  }
  std::mutex mutex_;
  std::condition_variable released_;
  int live_, arrived_ = 0;
  std::atomic<int64_t> generation_{0};
};

inline thread_local Barrier* block_barrier = nullptr;

inline void syncthreads() { block_barrier->arrive_and_wait(); }

// the launch's dynamic shared memory (extern __shared__): one buffer, since one block runs at a time; filled with
// 0xff bytes (NaN in every floating type) at each launch, so that a kernel reading what it never wrote fails a test
inline std::vector<double> dynamic_shared_buffer;
inline unsigned char* dynamic_shared() { return reinterpret_cast<unsigned char*>(dynamic_shared_buffer.data()); }

// runs body() for every thread of every block of the grid, block after block, on one team of blockDim threads
// (started once per launch: a thread per block and thread would cost more than the kernels)
inline std::atomic<int64_t> launches{0};  // kernel launches so far, for the tests' count of launches per op call

inline void launch(dim3 grid, dim3 block, size_t dynamic_bytes, const std::function<void()>& body) {
  ++launches;
  gridDim = grid;
  blockDim = block;
  dynamic_shared_buffer.assign((dynamic_bytes + sizeof(double) - 1) / sizeof(double), 0.0);
  std::memset(dynamic_shared_buffer.data(), 0xff, dynamic_shared_buffer.size() * sizeof(double));
  const int threads = static_cast<int>(block.x * block.y * block.z);
  const int64_t blocks = int64_t(grid.x) * grid.y * grid.z;
  Barrier barrier(threads), end_of_block(threads);
  std::vector<std::thread> team;
  team.reserve(threads);
  for (int t = 0; t < threads; ++t) {
    team.emplace_back([&, t] {
      threadIdx = dim3(t % block.x, (t / block.x) % block.y, t / (block.x * block.y));
      block_barrier = &barrier;
      for (int64_t i = 0; i < blocks; ++i) {
        blockIdx = dim3(i % grid.x, (i / grid.x) % grid.y, i / (int64_t(grid.x) * grid.y));
        body();
        barrier.leave();
        end_of_block.arrive_and_wait();  // every thread is done with block i (its shared memory too)
        if (t == 0) barrier.reset(threads);
        end_of_block.arrive_and_wait();  // and the barrier counts all threads again
      }
    });
  }
  for (std::thread& th : team) th.join();
}

}  // namespace emulation

using emulation::blockDim;
using emulation::blockIdx;
using emulation::dim3;
using emulation::gridDim;
using emulation::threadIdx;

}  // namespace fused_mtl_attn

#define __syncthreads() ::fused_mtl_attn::emulation::syncthreads()

// ---------------------------------------------------------------- nvcuda::wmma on the host
namespace nvcuda {
namespace wmma {

struct row_major {};
struct col_major {};
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
namespace precision {
struct tf32 {};
}
enum layout_t { mem_row_major, mem_col_major };

template <typename T>
struct storage {
  using type = T;
};
template <>
struct storage<precision::tf32> {
  using type = float;
};

template <typename Use, int M, int N, int K>
struct shape;
template <int M, int N, int K>
struct shape<matrix_a, M, N, K> {
  static constexpr int rows = M, cols = K;
};
template <int M, int N, int K>
struct shape<matrix_b, M, N, K> {
  static constexpr int rows = K, cols = N;
};
template <int M, int N, int K>
struct shape<accumulator, M, N, K> {
  static constexpr int rows = M, cols = N;
};

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  using element_type = typename storage<T>::type;
  static constexpr int rows = shape<Use, M, N, K>::rows, cols = shape<Use, M, N, K>::cols;
  static constexpr int num_elements = rows * cols;
  element_type x[num_elements];
};

// lane of the calling thread in its warp (threads numbered x fastest, as on a GPU)
inline int lane() {
  using ::fused_mtl_attn::emulation::blockDim;
  using ::fused_mtl_attn::emulation::threadIdx;
  return static_cast<int>((threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z)) % 32);
}

template <typename Use, int M, int N, int K, typename T, typename L, typename P>
void load_matrix_sync(fragment<Use, M, N, K, T, L>& f, const P* p, unsigned ld) {
  using F = fragment<Use, M, N, K, T, L>;
  if (lane() != 0) return;
  for (int r = 0; r < F::rows; ++r) {
    for (int c = 0; c < F::cols; ++c) {
      f.x[r * F::cols + c] = std::is_same<L, col_major>::value ? p[c * ld + r] : p[r * ld + c];
    }
  }
}

template <int M, int N, int K, typename T>
void load_matrix_sync(fragment<accumulator, M, N, K, T>& f, const T* p, unsigned ld, layout_t layout) {
  if (lane() != 0) return;
  for (int r = 0; r < M; ++r) {
    for (int c = 0; c < N; ++c) f.x[r * N + c] = p[layout == mem_row_major ? r * ld + c : c * ld + r];
  }
}

template <int M, int N, int K, typename T>
void store_matrix_sync(T* p, const fragment<accumulator, M, N, K, T>& f, unsigned ld, layout_t layout) {
  if (lane() != 0) return;
  for (int r = 0; r < M; ++r) {
    for (int c = 0; c < N; ++c) p[layout == mem_row_major ? r * ld + c : c * ld + r] = f.x[r * N + c];
  }
}

template <typename Use, int M, int N, int K, typename T, typename L, typename V>
void fill_fragment(fragment<Use, M, N, K, T, L>& f, const V& v) {
  for (auto& e : f.x) e = v;
}

// d = c + a b; d may be c (each element reads only its own c)
template <int M, int N, int K, typename TA, typename LA, typename LB, typename TC>
void mma_sync(fragment<accumulator, M, N, K, TC>& d, const fragment<matrix_a, M, N, K, TA, LA>& a,
              const fragment<matrix_b, M, N, K, TA, LB>& b, const fragment<accumulator, M, N, K, TC>& c) {
  if (lane() != 0) return;
  for (int i = 0; i < M; ++i) {
    for (int j = 0; j < N; ++j) {
      TC s = c.x[i * N + j];
      for (int k = 0; k < K; ++k) s += static_cast<TC>(a.x[i * K + k]) * static_cast<TC>(b.x[k * N + j]);
      d.x[i * N + j] = s;
    }
  }
}

// cvt.rna.tf32.f32: 10 mantissa bits, to nearest with ties away from zero
inline float __float_to_tf32(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  if ((bits & 0x7f800000u) != 0x7f800000u) bits = (bits + 0x1000u) & 0xffffe000u;
  std::memcpy(&x, &bits, sizeof bits);
  return x;
}

}  // namespace wmma
}  // namespace nvcuda
