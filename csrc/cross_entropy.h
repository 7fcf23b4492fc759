// The fused loss op, device-independent part: the mean cross-entropy of logits resized (bilinear, align_corners=False,
// as F.interpolate with a target size) to the label's size, without the resized logits or their log-softmax ever
// stored. Forward returns (sum over labelled pixels of lse - z_label, lse per pixel); the caller divides by the
// number of labelled pixels. Backward recomputes the resized logits from logits and lse.
#pragma once

#include <torch/library.h>
#include <ATen/ATen.h>

#include <tuple>

namespace fused_mtl_attn {

using at::Tensor;

// (logits [B, C, h, w] any strides, label [B, H, W] int64 contiguous, ignore_index) -> (loss sum [], lse [B, H, W])
using CrossEntropyForwardCore = std::tuple<Tensor, Tensor> (*)(const Tensor&, const Tensor&, int64_t);
// (grad [] of the loss sum, logits, label, lse, ignore_index) -> d logits [B, C, h, w] contiguous
using CrossEntropyBackwardCore = Tensor (*)(const Tensor&, const Tensor&, const Tensor&, const Tensor&, int64_t);

inline void check_cross_entropy(const Tensor& logits, const Tensor& label) {
  TORCH_CHECK(logits.dim() == 4, "logits must have rank 4 [B, C, h, w], got shape ", logits.sizes());
  TORCH_CHECK(logits.scalar_type() == at::kFloat || logits.scalar_type() == at::kDouble,
              "logits must be float32 or float64, got ", logits.scalar_type());
  TORCH_CHECK(logits.size(1) >= 1 && logits.size(2) >= 1 && logits.size(3) >= 1,
              "logits must have at least one class and one pixel, got shape ", logits.sizes());
  TORCH_CHECK(label.dim() == 3, "label must have rank 3 [B, H, W], got shape ", label.sizes());
  TORCH_CHECK(label.scalar_type() == at::kLong, "label must be int64 (class indices), got ", label.scalar_type());
  TORCH_CHECK(label.size(0) == logits.size(0), "label has batch size ", label.size(0), " but logits have ",
              logits.size(0));
  TORCH_CHECK(label.device() == logits.device(), "label is on ", label.device(), " but logits are on ",
              logits.device());
}

template <CrossEntropyForwardCore F>
std::tuple<Tensor, Tensor> cross_entropy_forward(const Tensor& logits, const Tensor& label, int64_t ignore_index) {
  check_cross_entropy(logits, label);
  return F(logits, label.contiguous(), ignore_index);  // the kernels read the logits through their strides
}

template <CrossEntropyBackwardCore F>
Tensor cross_entropy_backward(const Tensor& grad, const Tensor& logits, const Tensor& label, const Tensor& lse,
                              int64_t ignore_index) {
  check_cross_entropy(logits, label);
  TORCH_CHECK(grad.numel() == 1, "grad must be the loss sum's gradient (one value), got shape ", grad.sizes());
  TORCH_CHECK(lse.sizes() == label.sizes() && lse.scalar_type() == logits.scalar_type(),
              "lse must be the forward's [B, H, W] of the logits' dtype ", logits.scalar_type(), ", got ",
              lse.sizes(), " ", lse.scalar_type());
  return F(grad, logits, label.contiguous(), lse.contiguous(), ignore_index);
}

}  // namespace fused_mtl_attn
