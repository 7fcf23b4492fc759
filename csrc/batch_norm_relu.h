// BatchNorm followed by ReLU (or, with relu false, BatchNorm alone) over a block of channels of a [B, C, N] map, the
// elementwise part of the fused aggregation head and of the CTAM projections (model/fused_ops.py),
// device-independent part. Forward normalises with the batch's statistics (computed here, two passes) or with given
// ones and applies ReLU in one pass; backward takes dL/d(output) and the pre-BN input and returns dL/d input and the
// gradients of BN's weight and bias (and the sum of dL/d input over positions, the gradient of a bias added before
// BN) in two passes, recomputing the ReLU mask from the input.
#pragma once

#include <torch/library.h>
#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace fused_mtl_attn {

using at::Tensor;

// (h [B, C, N] with stride(2) == 1, weight [C], bias [C], mean, var [C] or none: batch statistics, eps, relu)
//   -> (ReLU(BN(h)) (BN(h) without relu) [B, C, N] contiguous, mean [C], biased var [C])
using BnReluForwardCore = std::tuple<Tensor, Tensor, Tensor> (*)(const Tensor&, const Tensor&, const Tensor&,
                                                                 const std::optional<Tensor>&,
                                                                 const std::optional<Tensor>&, double, bool);
// (grad [B, C, N] of the output, h, mean, var, weight, bias, eps, batch_stats: mean and var are h's own, relu)
//   -> (dL/dh [B, C, N] contiguous, dL/dweight [C], dL/dbias [C], dL/dh summed over B and N [C])
using BnReluBackwardCore = std::tuple<Tensor, Tensor, Tensor, Tensor> (*)(const Tensor&, const Tensor&,
                                                                          const Tensor&, const Tensor&,
                                                                          const Tensor&, const Tensor&, double, bool,
                                                                          bool);

inline void check_channel_vector(const Tensor& t, const Tensor& h, const char* name) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == h.size(1), name, " must be [C] = [", h.size(1), "], got shape ",
              t.sizes());
  TORCH_CHECK(t.scalar_type() == h.scalar_type() && t.device() == h.device(), name, " must be ", h.scalar_type(),
              " on ", h.device(), " like h, got ", t.scalar_type(), " on ", t.device());
}

inline void check_bn_relu_input(const Tensor& h, const Tensor& weight, const Tensor& bias, double eps) {
  TORCH_CHECK(h.dim() == 3, "h must have rank 3 [B, C, N], got shape ", h.sizes());
  TORCH_CHECK(h.scalar_type() == at::kFloat || h.scalar_type() == at::kDouble, "h must be float32 or float64, got ",
              h.scalar_type());
  TORCH_CHECK(h.size(0) * h.size(2) >= 1, "h must hold at least one value per channel, got shape ", h.sizes());
  TORCH_CHECK(eps > 0, "eps must be positive, got ", eps);
  check_channel_vector(weight, h, "weight");
  check_channel_vector(bias, h, "bias");
}

// the kernels read h [B, C, N] through its batch and channel strides; positions must be contiguous
inline Tensor rows_contiguous(const Tensor& t) { return t.stride(2) == 1 ? t : t.contiguous(); }

template <BnReluForwardCore F>
std::tuple<Tensor, Tensor, Tensor> bn_relu_forward(const Tensor& h, const Tensor& weight, const Tensor& bias,
                                                   const std::optional<Tensor>& mean,
                                                   const std::optional<Tensor>& var, double eps, bool relu) {
  check_bn_relu_input(h, weight, bias, eps);
  TORCH_CHECK(mean.has_value() == var.has_value(), "mean and var must be given together (or neither: batch "
              "statistics)");
  if (mean.has_value()) {
    check_channel_vector(*mean, h, "mean");
    check_channel_vector(*var, h, "var");
    return F(rows_contiguous(h), weight.contiguous(), bias.contiguous(), mean->contiguous(), var->contiguous(), eps,
             relu);
  }
  return F(rows_contiguous(h), weight.contiguous(), bias.contiguous(), std::nullopt, std::nullopt, eps, relu);
}

template <BnReluBackwardCore F>
std::tuple<Tensor, Tensor, Tensor, Tensor> bn_relu_backward(const Tensor& grad, const Tensor& h, const Tensor& mean,
                                                            const Tensor& var, const Tensor& weight,
                                                            const Tensor& bias, double eps, bool batch_stats,
                                                            bool relu) {
  check_bn_relu_input(h, weight, bias, eps);
  TORCH_CHECK(grad.sizes() == h.sizes() && grad.scalar_type() == h.scalar_type() && grad.device() == h.device(),
              "grad must match h (", h.sizes(), " ", h.scalar_type(), "), got ", grad.sizes(), " ",
              grad.scalar_type());
  check_channel_vector(mean, h, "mean");
  check_channel_vector(var, h, "var");
  return F(rows_contiguous(grad), rows_contiguous(h), mean.contiguous(), var.contiguous(), weight.contiguous(),
           bias.contiguous(), eps, batch_stats, relu);
}

}  // namespace fused_mtl_attn
