// The row pass of the fused aggregation head's bilinear upsampling (model/fused_ops.py: h += sum_k up(W_k x_k)),
// device-independent part: several maps, already resampled along their columns to the output's width (a small
// dense product there: rows of w_k <= 40 values are too short for anything but BLAS to run at speed), are resampled
// along their rows by 2-tap filters and added into one output map. The taps (an index and a weight each, PyTorch's
// align_corners=False bilinear weights) are built in Python, so the kernels hold no resize formula of their own:
// out[p] += rows_k t_k[p] where rows_k [H, h_k] has the taps as its only nonzeros. Backward is the adjoint,
// dL/dt_k[p] = rows_k^T g[p].
#pragma once

#include <torch/library.h>
#include <ATen/ATen.h>

#include <vector>

namespace fused_mtl_attn {

using at::Tensor;

// (out [P, H, W] rows contiguous, accumulated in place; sources [P, h_k, W] contiguous; tap_index [H, 2] int64 and
// tap_weight [H, 2] float64 per source)
using UpsampleRowsForwardCore = void (*)(const Tensor&, const std::vector<Tensor>&, const std::vector<Tensor>&,
                                         const std::vector<Tensor>&);
// (grad [P, H, W] contiguous, tap_index, tap_weight, h_k per source) -> dL/dsource_k [P, h_k, W]
using UpsampleRowsBackwardCore = std::vector<Tensor> (*)(const Tensor&, const std::vector<Tensor>&,
                                                         const std::vector<Tensor>&, const std::vector<int64_t>&);

inline void check_row_map(const Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 3, name, " must have rank 3 [P, H, W], got shape ", t.sizes());
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, name,
              " must be float32 or float64, got ", t.scalar_type());
}

// the taps of source k, of h rows, for an output of H rows
inline void check_row_taps(const std::vector<Tensor>& index, const std::vector<Tensor>& weight, size_t k,
                           int64_t H, int64_t h) {
  TORCH_CHECK(k < index.size() && k < weight.size(), "tap_index and tap_weight must hold one tensor per source, got ",
              index.size(), " and ", weight.size());
  const Tensor& i = index[k];
  const Tensor& v = weight[k];
  TORCH_CHECK(i.dim() == 2 && i.size(0) == H && i.size(1) == 2 && i.scalar_type() == at::kLong,
              "tap_index[", k, "] must be int64 [H, 2] = [", H, ", 2], got ", i.scalar_type(), " ", i.sizes());
  TORCH_CHECK(v.dim() == 2 && v.sizes() == i.sizes() && v.scalar_type() == at::kDouble,
              "tap_weight[", k, "] must be float64 [H, 2] = [", H, ", 2], got ", v.scalar_type(), " ", v.sizes());
  TORCH_CHECK(i.device().is_cpu() && v.device().is_cpu(), "the taps of source ", k, " must be CPU tensors");
  TORCH_CHECK(h >= 1, "source ", k, " must have at least one row, got ", h);
  // a loop over the 2H indices: cheaper on every call than two reductions and their reads back
  const Tensor ic = i.contiguous();
  const int64_t* ip = ic.const_data_ptr<int64_t>();
  for (int64_t j = 0; j < ic.numel(); ++j)
    TORCH_CHECK(ip[j] >= 0 && ip[j] < h, "tap_index[", k, "] must lie in [0, ", h, ") (the source's rows), got ",
                ip[j]);
}

template <UpsampleRowsForwardCore F>
void upsample_rows_accumulate(const Tensor& out, at::TensorList sources, at::TensorList tap_index,
                              at::TensorList tap_weight) {
  check_row_map(out, "out");
  TORCH_CHECK(out.stride(2) == 1 && out.stride(1) == out.size(2), "out must have contiguous rows [H, W] per map "
              "(it is accumulated in place), got strides ", out.strides());
  TORCH_CHECK(sources.size() == tap_index.size() && sources.size() == tap_weight.size(),
              "sources, tap_index and tap_weight must have one entry per source, got ", sources.size(), ", ",
              tap_index.size(), " and ", tap_weight.size());
  std::vector<Tensor> z, index(tap_index.begin(), tap_index.end()), weight(tap_weight.begin(), tap_weight.end());
  for (size_t k = 0; k < sources.size(); ++k) {
    const Tensor& s = sources[k];
    check_row_map(s, "each source");
    TORCH_CHECK(s.size(0) == out.size(0) && s.size(2) == out.size(2) && s.scalar_type() == out.scalar_type() &&
                    s.device() == out.device(),
                "source ", k, " must be [P, h, W] = [", out.size(0), ", h, ", out.size(2), "] ", out.scalar_type(),
                " on ", out.device(), " like out, got ", s.sizes(), " ", s.scalar_type(), " on ", s.device());
    check_row_taps(index, weight, k, out.size(1), s.size(1));
    z.push_back(s.contiguous());
    index[k] = index[k].contiguous();
    weight[k] = weight[k].contiguous();
  }
  if (out.numel() == 0 || z.empty()) return;
  F(out, z, index, weight);
}

template <UpsampleRowsBackwardCore F>
std::vector<Tensor> upsample_rows_accumulate_backward(const Tensor& grad, at::TensorList tap_index,
                                                      at::TensorList tap_weight, at::IntArrayRef source_heights) {
  check_row_map(grad, "grad");
  TORCH_CHECK(tap_index.size() == tap_weight.size() && source_heights.size() == tap_index.size(),
              "tap_index, tap_weight and source_heights must describe the same sources, got ", tap_index.size(),
              ", ", tap_weight.size(), " and ", source_heights.size());
  std::vector<Tensor> index(tap_index.begin(), tap_index.end()), weight(tap_weight.begin(), tap_weight.end());
  std::vector<int64_t> heights(source_heights.begin(), source_heights.end());
  for (size_t k = 0; k < index.size(); ++k) {
    check_row_taps(index, weight, k, grad.size(1), heights[k]);
    index[k] = index[k].contiguous();
    weight[k] = weight[k].contiguous();
  }
  return F(grad.contiguous(), index, weight, heights);
}

}  // namespace fused_mtl_attn
