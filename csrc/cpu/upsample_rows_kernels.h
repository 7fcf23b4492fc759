// CPU kernels of the aggregation head's row upsampling (../upsample_rows.h), included by kernels.h inside its
// instruction set's namespace.
//
// One map p per task (threads split the maps). Forward reads each output row once, adds the 2 tap rows of every
// source (vectors along W) and writes it once. Backward reads each row of g once and adds it, weighted, into the
// 2 tap rows of every source's gradient (zeroed first). Every map is computed by one thread in a fixed order, so
// results do not depend on the thread count. A dense interpolation product does h_k multiply-adds per output value
// and source; these do 2.
namespace {

// the taps of one source (H rows, a low and a high index each) with their weights in T
template <typename T>
struct RowTaps {
  std::vector<int64_t> index;  // [H, 2]
  std::vector<T> weight;       // [H, 2]
  RowTaps(const Tensor& i, const Tensor& v)
      : index(i.const_data_ptr<int64_t>(), i.const_data_ptr<int64_t>() + i.numel()) {
    const double* vp = v.const_data_ptr<double>();
    for (int64_t j = 0; j < v.numel(); ++j) weight.push_back(static_cast<T>(vp[j]));
  }
};

// dst[0, n) += a * x + b * y
template <typename T>
inline void add_two_taps(T* dst, const T* x, T a, const T* y, T b, int64_t n) {
  constexpr int L = Vec<T>::W;
  const V<T> va = vsplat(a), vb = vsplat(b);
  int64_t i = 0;
  for (; i + L <= n; i += L) vstore(dst + i, vload(dst + i) + vload(x + i) * va + vload(y + i) * vb);
  for (; i < n; ++i) dst[i] += x[i] * a + y[i] * b;
}

// dst[0, n) += a * x
template <typename T>
inline void add_scaled(T* dst, const T* x, T a, int64_t n) {
  constexpr int L = Vec<T>::W;
  const V<T> va = vsplat(a);
  int64_t i = 0;
  for (; i + L <= n; i += L) vstore(dst + i, vload(dst + i) + vload(x + i) * va);
  for (; i < n; ++i) dst[i] += x[i] * a;
}

template <typename T>
void upsample_rows_forward_typed(const Tensor& out, const std::vector<Tensor>& sources,
                                 const std::vector<Tensor>& index, const std::vector<Tensor>& weight) {
  const int64_t P = out.size(0), H = out.size(1), W = out.size(2), sp = out.stride(0);
  std::vector<RowTaps<T>> taps;
  std::vector<const T*> z;
  std::vector<int64_t> rows;
  for (size_t k = 0; k < sources.size(); ++k) {
    taps.emplace_back(index[k], weight[k]);
    z.push_back(sources[k].const_data_ptr<T>());
    rows.push_back(sources[k].size(1));
  }
  T* op = out.mutable_data_ptr<T>();
  at::parallel_for(0, P, 1, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      for (int64_t y = 0; y < H; ++y) {
        T* o = op + p * sp + y * W;  // stays in L1 while every source is added
        for (size_t k = 0; k < taps.size(); ++k) {
          const int64_t* i = taps[k].index.data() + 2 * y;
          const T* w = taps[k].weight.data() + 2 * y;
          const T* s = z[k] + p * rows[k] * W;
          add_two_taps(o, s + i[0] * W, w[0], s + i[1] * W, w[1], W);
        }
      }
    }
  });
}

template <typename T>
std::vector<Tensor> upsample_rows_backward_typed(const Tensor& grad, const std::vector<Tensor>& index,
                                                 const std::vector<Tensor>& weight,
                                                 const std::vector<int64_t>& heights) {
  const int64_t P = grad.size(0), H = grad.size(1), W = grad.size(2);
  std::vector<RowTaps<T>> taps;
  std::vector<Tensor> dz;
  std::vector<T*> dzp;
  for (size_t k = 0; k < heights.size(); ++k) {
    taps.emplace_back(index[k], weight[k]);
    dz.push_back(at::empty({P, heights[k], W}, grad.options()));
    dzp.push_back(dz.back().mutable_data_ptr<T>());
  }
  const T* gp = grad.const_data_ptr<T>();
  at::parallel_for(0, P, 1, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      for (size_t k = 0; k < taps.size(); ++k)
        std::fill(dzp[k] + p * heights[k] * W, dzp[k] + (p + 1) * heights[k] * W, T(0));
      for (int64_t y = 0; y < H; ++y) {
        const T* g = gp + (p * H + y) * W;
        for (size_t k = 0; k < taps.size(); ++k) {
          const int64_t* i = taps[k].index.data() + 2 * y;
          const T* w = taps[k].weight.data() + 2 * y;
          T* d = dzp[k] + p * heights[k] * W;
          add_scaled(d + i[0] * W, g, w[0], W);  // two updates in turn: the taps coincide at the border
          add_scaled(d + i[1] * W, g, w[1], W);
        }
      }
    }
  });
  return dz;
}

void upsample_rows_forward(const Tensor& out, const std::vector<Tensor>& sources, const std::vector<Tensor>& index,
                           const std::vector<Tensor>& weight) {
  if (out.scalar_type() == at::kDouble) return upsample_rows_forward_typed<double>(out, sources, index, weight);
  upsample_rows_forward_typed<float>(out, sources, index, weight);
}

std::vector<Tensor> upsample_rows_backward(const Tensor& grad, const std::vector<Tensor>& index,
                                           const std::vector<Tensor>& weight, const std::vector<int64_t>& heights) {
  if (grad.scalar_type() == at::kDouble) return upsample_rows_backward_typed<double>(grad, index, weight, heights);
  return upsample_rows_backward_typed<float>(grad, index, weight, heights);
}

}  // namespace
