// Host emulation of the CUDA execution model that attention_cuda.cu uses, so that its kernels run on a CPU in the
// test suite (attention_cuda_emulated.cpp compiles that file again with FUSED_MTL_ATTN_EMULATE_CUDA): no GPU is
// needed to find a wrong index, a missing bound check or a race across __syncthreads.
//
// A launch runs its blocks one after another; a block runs as blockDim OS threads, so __syncthreads is a real
// barrier and a thread that returns early leaves it (as on a GPU, where exited threads no longer count).
// __shared__ variables become function statics: one copy, shared by the threads of the one block that runs at a
// time. Streams, guards and launch checks are no-ops.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
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
// The count is under a mutex; the waiting is on an atomic generation (C++20 wait/notify), so that a release wakes
// the waiters without making them queue for the mutex again.
class Barrier {
 public:
  explicit Barrier(int live) : live_(live) {}
  void arrive_and_wait() {
    int64_t generation;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      generation = generation_.load();
      if (++arrived_ == live_) {
        release();
        return;
      }
    }
    generation_.wait(generation);  // until a release moves the generation on
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
    generation_.notify_all();
  }
  std::mutex mutex_;
  int live_, arrived_ = 0;
  std::atomic<int64_t> generation_{0};
};

inline thread_local Barrier* block_barrier = nullptr;

inline void syncthreads() { block_barrier->arrive_and_wait(); }

// runs body() for every thread of every block of the grid, block after block, on one team of blockDim threads
// (started once per launch: a thread per block and thread would cost more than the kernels)
inline void launch(dim3 grid, dim3 block, const std::function<void()>& body) {
  gridDim = grid;
  blockDim = block;
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
