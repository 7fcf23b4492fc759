// The op's constants, its accumulation-dtype rule and the per-element math shared by the CPU and CUDA kernels
// (docs/attention-op.md: softplus/sigmoid with threshold 20, the clamp). fused_mtl_attn/constants.py holds the same
// values for the Python backends.
#pragma once

#include <c10/core/ScalarType.h>

#include <cmath>
#include <type_traits>

#if defined(__CUDACC__)
#define FMA_HD __host__ __device__ __forceinline__
#else
#define FMA_HD inline
#endif

namespace fused_mtl_attn {

constexpr double kEps = 1e-12;  // den = max(z . q, eps), applied in the accumulation type
constexpr double kSoftplusThreshold = 20.0;

// sums and the saved context are fp64 for fp64 inputs, else fp32: as a C++ type and as a tensor dtype
template <typename scalar_t>
using accumulation_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

inline c10::ScalarType accumulation_dtype(c10::ScalarType t) {
  return t == c10::kDouble ? c10::kDouble : c10::kFloat;
}

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
