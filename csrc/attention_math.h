// Per-element math shared by the CPU and CUDA kernels (docs/attention-op.md: softplus/sigmoid with threshold 20, the clamp).
#pragma once

#include <cmath>

#if defined(__CUDACC__)
#define FMA_HD __host__ __device__ __forceinline__
#else
#define FMA_HD inline
#endif

namespace fused_mtl_attn {

constexpr double kEps = 1e-12;        // den = max(z . q, eps)
constexpr double kSoftplusThreshold = 20.0;

// softplus with beta 1, threshold 20: x above 20, log1p(exp(x)) otherwise (as torch.nn.functional.softplus)
template <typename T>
FMA_HD T softplus(T x) {
  return x > T(kSoftplusThreshold) ? x : T(log1p(exp(x)));
}

// d softplus / dx: 1 above the threshold, sigmoid(x) below
template <typename T>
FMA_HD T softplus_grad(T x) {
  if (x > T(kSoftplusThreshold)) return T(1);
  T e = exp(-fabs(x));
  return x >= T(0) ? T(1) / (T(1) + e) : e / (T(1) + e);
}

// the clamped denominator of one query position
template <typename T>
FMA_HD T clamp_den(T den) {
  return den > T(kEps) ? den : T(kEps);
}

// gradient weight of the denominator: zero where the clamp is active (z . q < eps)
template <typename T>
FMA_HD bool den_passes_grad(T den) {
  return den >= T(kEps);
}

}  // namespace fused_mtl_attn
