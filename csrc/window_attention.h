// Swin's window attention (multi-head self-attention inside each window, with a bias per head and an optional mask
// per window), device-independent part: op signatures and input checks. The kernels (cpu/window_attention_kernels.h)
// read q, k, v straight from the qkv Linear's output and write the heads side by side, as the projection after it
// reads them, so none of the reference's reshapes, head splits and per-head [L, L] maps exist in memory.
#pragma once

#include <torch/library.h>
#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace fused_mtl_attn {

using at::Tensor;

// (qkv [BW, L, 3*dim] contiguous, bias [heads, L, L] contiguous, mask [nW, L, L] contiguous or none, heads, scale)
//   -> (out [BW, L, dim], lse [BW, heads, L]: each softmax row's log-sum-exp, for backward)
using WindowForwardCore = std::tuple<Tensor, Tensor> (*)(const Tensor&, const Tensor&, const std::optional<Tensor>&,
                                                         int64_t, double);
// (grad [BW, L, dim] contiguous, qkv, bias, mask, lse, heads, scale) -> (dL/dqkv [BW, L, 3*dim], dL/dbias)
using WindowBackwardCore = std::tuple<Tensor, Tensor> (*)(const Tensor&, const Tensor&, const Tensor&,
                                                          const std::optional<Tensor>&, const Tensor&, int64_t,
                                                          double);

inline void check_window_input(const Tensor& qkv, const Tensor& bias, const std::optional<Tensor>& mask,
                               int64_t heads) {
  TORCH_CHECK(qkv.dim() == 3, "qkv must have rank 3 [BW, L, 3*dim], got shape ", qkv.sizes());
  TORCH_CHECK(qkv.scalar_type() == at::kFloat || qkv.scalar_type() == at::kDouble,
              "qkv must be float32 or float64, got ", qkv.scalar_type());
  TORCH_CHECK(heads >= 1, "heads must be >= 1, got ", heads);
  const int64_t bw = qkv.size(0), length = qkv.size(1);
  TORCH_CHECK(qkv.size(2) % (3 * heads) == 0 && qkv.size(2) > 0, "qkv's last axis (", qkv.size(2),
              ") must be 3 x dim with dim a positive multiple of heads = ", heads);
  TORCH_CHECK(bias.dim() == 3 && bias.size(0) == heads && bias.size(1) == length && bias.size(2) == length,
              "bias must be [heads, L, L] = [", heads, ", ", length, ", ", length, "], got shape ", bias.sizes());
  TORCH_CHECK(bias.scalar_type() == qkv.scalar_type() && bias.device() == qkv.device(), "bias must be ",
              qkv.scalar_type(), " on ", qkv.device(), " like qkv, got ", bias.scalar_type(), " on ", bias.device());
  if (mask.has_value()) {
    const Tensor& m = *mask;
    TORCH_CHECK(m.dim() == 3 && m.size(0) >= 1 && m.size(1) == length && m.size(2) == length,
                "mask must be [nW, L, L] with L = ", length, ", got shape ", m.sizes());
    TORCH_CHECK(bw % m.size(0) == 0, "mask's window count ", m.size(0), " must divide qkv's ", bw, " windows");
    TORCH_CHECK(m.scalar_type() == qkv.scalar_type() && m.device() == qkv.device(), "mask must be ",
                qkv.scalar_type(), " on ", qkv.device(), " like qkv, got ", m.scalar_type(), " on ", m.device());
  }
}

inline std::optional<Tensor> contiguous_mask(const std::optional<Tensor>& mask) {
  return mask.has_value() ? std::optional<Tensor>(mask->contiguous()) : std::nullopt;
}

template <WindowForwardCore F>
std::tuple<Tensor, Tensor> window_forward(const Tensor& qkv, const Tensor& bias, const std::optional<Tensor>& mask,
                                          int64_t heads, double scale) {
  check_window_input(qkv, bias, mask, heads);
  return F(qkv.contiguous(), bias.contiguous(), contiguous_mask(mask), heads, scale);
}

template <WindowBackwardCore F>
std::tuple<Tensor, Tensor> window_backward(const Tensor& grad, const Tensor& qkv, const Tensor& bias,
                                           const std::optional<Tensor>& mask, const Tensor& lse, int64_t heads,
                                           double scale) {
  check_window_input(qkv, bias, mask, heads);
  const int64_t bw = qkv.size(0), length = qkv.size(1), dim = qkv.size(2) / 3;
  TORCH_CHECK(grad.dim() == 3 && grad.size(0) == bw && grad.size(1) == length && grad.size(2) == dim &&
                  grad.scalar_type() == qkv.scalar_type(),
              "grad must be [BW, L, dim] = [", bw, ", ", length, ", ", dim, "] ", qkv.scalar_type(), ", got ",
              grad.sizes(), " ", grad.scalar_type());
  TORCH_CHECK(lse.dim() == 3 && lse.size(0) == bw && lse.size(1) == heads && lse.size(2) == length &&
                  lse.scalar_type() == qkv.scalar_type(),
              "lse must be [BW, heads, L] = [", bw, ", ", heads, ", ", length, "] ", qkv.scalar_type(), ", got ",
              lse.sizes(), " ", lse.scalar_type());
  return F(grad.contiguous(), qkv.contiguous(), bias.contiguous(), contiguous_mask(mask), lse.contiguous(), heads,
           scale);
}

}  // namespace fused_mtl_attn
