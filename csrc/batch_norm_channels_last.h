// Training-mode BatchNorm of a map whose channels are innermost in memory (channels-last, the fused path's layout on
// CPU), read as N = batch x positions rows of C channels; the output keeps the input's strides (a view of another
// shape would make every in-place op after it, a residual add or an in-place ReLU, copy the whole map in backward).
// Device-independent part: op signatures and input checks (kernels: cpu/batch_norm_channels_last_kernels.h).
// PyTorch's own channels-last BatchNorm is 3-13x slower than its NCHW one on CPU for the network's 18-72 channel
// maps, backward most (benchmarks/RESULTS.md).
#pragma once

#include <torch/library.h>
#include <ATen/ATen.h>

#include <tuple>

namespace fused_mtl_attn {

using at::Tensor;

// x [B, C, ...] with its channels innermost in memory (x.movedim(1, -1) contiguous): N = x.numel() / C rows of C.
// (x, weight [C], bias [C], eps) -> (y like x, same strides; batch mean [C]; biased batch variance [C])
using BnRowsForwardCore = std::tuple<Tensor, Tensor, Tensor> (*)(const Tensor&, const Tensor&, const Tensor&, double);
// (grad with channels innermost, x, mean, var, weight, eps) -> (dL/dx like x, dL/dweight [C], dL/dbias [C])
using BnRowsBackwardCore = std::tuple<Tensor, Tensor, Tensor> (*)(const Tensor&, const Tensor&, const Tensor&,
                                                                  const Tensor&, const Tensor&, double);

inline void check_rows_vector(const Tensor& t, const Tensor& x, const char* name) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == x.size(1), name, " must be [C] = [", x.size(1), "], got shape ",
              t.sizes());
  TORCH_CHECK(t.scalar_type() == x.scalar_type() && t.device() == x.device(), name, " must be ", x.scalar_type(),
              " on ", x.device(), " like x, got ", t.scalar_type(), " on ", t.device());
}

inline void check_bn_rows_input(const Tensor& x, const Tensor& weight, double eps) {
  TORCH_CHECK(x.dim() >= 2, "x must have rank 2 or more [B, C, ...], got shape ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, "x must be float32 or float64, got ",
              x.scalar_type());
  TORCH_CHECK(x.movedim(1, -1).is_contiguous(), "x must store its channels innermost (channels-last), got strides ",
              x.strides(), " for shape ", x.sizes());
  TORCH_CHECK(x.size(1) >= 1 && x.numel() / x.size(1) >= 2,
              "x must hold more than one value per channel in training, got shape ", x.sizes());
  TORCH_CHECK(eps > 0, "eps must be positive, got ", eps);
  check_rows_vector(weight, x, "weight");
}

// the gradient in x's layout (channels innermost), copied only if it comes in another
inline Tensor channels_innermost(const Tensor& t) {
  return t.movedim(1, -1).is_contiguous() ? t : t.movedim(1, -1).contiguous().movedim(-1, 1);
}

template <BnRowsForwardCore F>
std::tuple<Tensor, Tensor, Tensor> bn_rows_forward(const Tensor& x, const Tensor& weight, const Tensor& bias,
                                                   double eps) {
  check_bn_rows_input(x, weight, eps);
  check_rows_vector(bias, x, "bias");
  return F(x, weight.contiguous(), bias.contiguous(), eps);
}

template <BnRowsBackwardCore F>
std::tuple<Tensor, Tensor, Tensor> bn_rows_backward(const Tensor& grad, const Tensor& x, const Tensor& mean,
                                                    const Tensor& var, const Tensor& weight, double eps) {
  check_bn_rows_input(x, weight, eps);
  TORCH_CHECK(grad.sizes() == x.sizes() && grad.scalar_type() == x.scalar_type() && grad.device() == x.device(),
              "grad must match x (", x.sizes(), " ", x.scalar_type(), "), got ", grad.sizes(), " ",
              grad.scalar_type());
  check_rows_vector(mean, x, "mean");
  check_rows_vector(var, x, "var");
  return F(channels_innermost(grad), x, mean.contiguous(), var.contiguous(), weight.contiguous(), eps);
}

}  // namespace fused_mtl_attn
