// The device-independent part of both ops: argument checks and the mapping of the two layouts onto one core.
//
// Core layout ("gathered"): q [G, d, Nq], k [G, d, Nk], v [G, m, Nk], J segments of the source positions given by
// offsets (J+1 ints) -> out [G, J, m, Nq] and context [G, J, m+1, d] (S = v k^T in rows 0..m-1, z = sum k in row
// m, in the accumulation dtype). CTAM is G = B*P groups with one segment spanning N; CSAM is G = B with J segments.
#pragma once

#include "attention_math.h"

#include <torch/library.h>
#include <ATen/ATen.h>

#include <tuple>
#include <vector>

namespace fused_mtl_attn {

using at::Tensor;

// forward core: (q, k, v, offsets) -> (out, context); inputs contiguous, checked
using ForwardCore = std::tuple<Tensor, Tensor> (*)(const Tensor&, const Tensor&, const Tensor&,
                                                   const std::vector<int64_t>&);
// backward core: (grad, q, k, v, context, offsets) -> (dq, dk, dv); inputs contiguous, checked
using BackwardCore = std::tuple<Tensor, Tensor, Tensor> (*)(const Tensor&, const Tensor&, const Tensor&,
                                                            const Tensor&, const Tensor&, const std::vector<int64_t>&);

inline void check_input(const Tensor& t, const char* name, int64_t rank, const char* layout, const Tensor& q) {
  TORCH_CHECK(t.dim() == rank, name, " must have rank ", rank, " (", layout, "), got shape ", t.sizes());
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), name, " must be a floating tensor, got ", t.scalar_type());
  TORCH_CHECK(t.scalar_type() == q.scalar_type(), name, " has dtype ", t.scalar_type(), " but q has ",
              q.scalar_type());
  TORCH_CHECK(t.device() == q.device(), name, " is on ", t.device(), " but q is on ", q.device());
}

inline std::vector<int64_t> checked_offsets(c10::IntArrayRef offsets, int64_t n_total) {
  TORCH_CHECK(!offsets.empty(), "offsets must hold J+1 >= 1 values, got an empty list");
  TORCH_CHECK(offsets[0] == 0, "offsets must start at 0, got offsets[0] = ", offsets[0]);
  for (size_t i = 1; i < offsets.size(); ++i) {
    TORCH_CHECK(offsets[i] >= offsets[i - 1], "offsets must be non-decreasing, got offsets[", i - 1,
                "] = ", offsets[i - 1], " > offsets[", i, "] = ", offsets[i]);
  }
  TORCH_CHECK(offsets.back() == n_total, "offsets must end at the gathered length Ntot = ", n_total,
              " of k and v, got ", offsets.back());
  return std::vector<int64_t>(offsets.begin(), offsets.end());
}

// grad [G, J, m, Nq], context [G, J, m+1, d]
inline void check_backward(const Tensor& grad, const Tensor& context, c10::IntArrayRef out_shape,
                           c10::IntArrayRef context_shape, const Tensor& q) {
  TORCH_CHECK(grad.sizes() == out_shape, "grad must have the output's shape ", out_shape, ", got ", grad.sizes());
  TORCH_CHECK(context.sizes() == context_shape, "context must have shape ", context_shape, ", got ",
              context.sizes());
  TORCH_CHECK(grad.scalar_type() == q.scalar_type(), "grad must have q's dtype ", q.scalar_type(), ", got ",
              grad.scalar_type());
  TORCH_CHECK(context.scalar_type() == accumulation_dtype(q.scalar_type()), "context must have dtype ",
              accumulation_dtype(q.scalar_type()), ", got ", context.scalar_type());
  TORCH_CHECK(grad.device() == q.device() && context.device() == q.device(),
              "grad and context must be on q's device ", q.device());
}

// ---- CTAM: q, k [B, P, d, N], v [B, P, m, N] ----
inline void check_cross_task(const Tensor& q, const Tensor& k, const Tensor& v) {
  check_input(q, "q", 4, "[B, P, d, N]", q);
  check_input(k, "k", 4, "[B, P, d, N]", q);
  check_input(v, "v", 4, "[B, P, m, N]", q);
  TORCH_CHECK(k.sizes() == q.sizes(), "k must have the shape of q ", q.sizes(), ", got ", k.sizes());
  TORCH_CHECK(v.size(0) == q.size(0) && v.size(1) == q.size(1) && v.size(3) == q.size(3), "v must be [B=",
              q.size(0), ", P=", q.size(1), ", m, N=", q.size(3), "] to match q, got ", v.sizes());
}

template <ForwardCore F>
std::tuple<Tensor, Tensor> cross_task_forward(const Tensor& q, const Tensor& k, const Tensor& v) {
  check_cross_task(q, k, v);
  const int64_t b = q.size(0), p = q.size(1), d = q.size(2), n = q.size(3), m = v.size(2);
  auto res = F(q.contiguous().view({b * p, d, n}), k.contiguous().view({b * p, d, n}),
               v.contiguous().view({b * p, m, n}), {0, n});
  return {std::get<0>(res).view({b, p, m, n}), std::get<1>(res).view({b, p, m + 1, d})};
}

template <BackwardCore F>
std::tuple<Tensor, Tensor, Tensor> cross_task_backward(const Tensor& grad, const Tensor& q, const Tensor& k,
                                                       const Tensor& v, const Tensor& context) {
  check_cross_task(q, k, v);
  const int64_t b = q.size(0), p = q.size(1), d = q.size(2), n = q.size(3), m = v.size(2);
  check_backward(grad, context, {b, p, m, n}, {b, p, m + 1, d}, q);
  auto res = F(grad.contiguous().view({b * p, 1, m, n}), q.contiguous().view({b * p, d, n}),
               k.contiguous().view({b * p, d, n}), v.contiguous().view({b * p, m, n}),
               context.contiguous().view({b * p, 1, m + 1, d}), {0, n});
  return {std::get<0>(res).view(q.sizes()), std::get<1>(res).view(k.sizes()), std::get<2>(res).view(v.sizes())};
}

// ---- CSAM: q [B, d, Nq], k [B, d, Ntot], v [B, m, Ntot], offsets J+1 ----
inline std::vector<int64_t> check_cross_scale(const Tensor& q, const Tensor& k, const Tensor& v,
                                              c10::IntArrayRef offsets) {
  check_input(q, "q", 3, "[B, d, Nq]", q);
  check_input(k, "k", 3, "[B, d, Ntot]", q);
  check_input(v, "v", 3, "[B, m, Ntot]", q);
  TORCH_CHECK(k.size(0) == q.size(0) && k.size(1) == q.size(1), "k must be [B=", q.size(0), ", d=", q.size(1),
              ", Ntot] to match q, got ", k.sizes());
  TORCH_CHECK(v.size(0) == q.size(0) && v.size(2) == k.size(2), "v must be [B=", q.size(0), ", m, Ntot=",
              k.size(2), "] to match k, got ", v.sizes());
  return checked_offsets(offsets, k.size(2));
}

template <ForwardCore F>
std::tuple<Tensor, Tensor> cross_scale_forward(const Tensor& q, const Tensor& k, const Tensor& v,
                                               c10::IntArrayRef offsets) {
  auto offs = check_cross_scale(q, k, v, offsets);
  return F(q.contiguous(), k.contiguous(), v.contiguous(), offs);
}

template <BackwardCore F>
std::tuple<Tensor, Tensor, Tensor> cross_scale_backward(const Tensor& grad, const Tensor& q, const Tensor& k,
                                                        const Tensor& v, const Tensor& context,
                                                        c10::IntArrayRef offsets) {
  auto offs = check_cross_scale(q, k, v, offsets);
  const int64_t b = q.size(0), d = q.size(1), nq = q.size(2), m = v.size(1);
  const int64_t j = static_cast<int64_t>(offs.size()) - 1;
  check_backward(grad, context, {b, j, m, nq}, {b, j, m + 1, d}, q);
  return F(grad.contiguous(), q.contiguous(), k.contiguous(), v.contiguous(), context.contiguous(), offs);
}

// the schemas of the four attention ops: those of fused_mtl_attn (attention.cpp) and, for tests, of
// fused_mtl_attn_emulated (the CUDA kernels run on the CPU, cuda/attention_cuda_emulated.cpp)
inline void define_attention_ops(torch::Library& m) {
  m.def("cross_task(Tensor q, Tensor k, Tensor v) -> (Tensor, Tensor)");
  m.def("cross_task_backward(Tensor grad, Tensor q, Tensor k, Tensor v, Tensor context) "
        "-> (Tensor, Tensor, Tensor)");
  m.def("cross_scale(Tensor q, Tensor k, Tensor v, SymInt[] offsets) -> (Tensor, Tensor)");
  m.def("cross_scale_backward(Tensor grad, Tensor q, Tensor k, Tensor v, Tensor context, SymInt[] offsets) "
        "-> (Tensor, Tensor, Tensor)");
}

// registers the four ops of one device with its two cores
#define FUSED_MTL_ATTN_REGISTER(KEY, FWD, BWD) FUSED_MTL_ATTN_REGISTER_IN(fused_mtl_attn, KEY, FWD, BWD)
#define FUSED_MTL_ATTN_REGISTER_IN(NS, KEY, FWD, BWD)                                               \
  TORCH_LIBRARY_IMPL(NS, KEY, m) {                                                                  \
    m.impl("cross_task", &::fused_mtl_attn::cross_task_forward<FWD>);                               \
    m.impl("cross_task_backward", &::fused_mtl_attn::cross_task_backward<BWD>);                     \
    m.impl("cross_scale", &::fused_mtl_attn::cross_scale_forward<FWD>);                             \
    m.impl("cross_scale_backward", &::fused_mtl_attn::cross_scale_backward<BWD>);                   \
  }

}  // namespace fused_mtl_attn
