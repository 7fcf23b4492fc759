// CPU kernels of training-mode BatchNorm over x with channels innermost, read as rows [N, C]
// (../batch_norm_channels_last.h), included by kernels.h inside its instruction set's namespace.
//
// Rows are taken in chunks of a fixed number (not one per thread): each chunk sums its rows column by column in the
// input type, a row at a time in vectors along the channels, and the chunks' sums are added in double in chunk
// order, so results do not depend on the thread count. Forward: the mean, then the centred sum of squares (two
// passes, as accurate as BatchNorm's own), then y = (x - mean) * scale + bias (x * scale + shift, one operation
// fewer, cancels where the mean is large against the spread: it made the fused network's float32 gradients fail
// their accuracy test). Backward: one pass for the column sums of g and g (x - mean), one writing dL/dx.
namespace {

constexpr int64_t kBnChunkRows = 256;

// sums[j] over rows of what add(row, acc) accumulates into acc[0:width] for each row, in double
template <typename T, typename Add>
std::vector<double> chunked_column_sums(int64_t rows, int64_t width, Add add) {
  const int64_t chunks = (rows + kBnChunkRows - 1) / kBnChunkRows;
  std::vector<T> partial(chunks * width, T(0));
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k)
      for (int64_t r = k * kBnChunkRows; r < std::min(rows, (k + 1) * kBnChunkRows); ++r)
        add(r, partial.data() + k * width);
  });
  std::vector<double> sums(width, 0.0);
  for (int64_t k = 0; k < chunks; ++k)
    for (int64_t j = 0; j < width; ++j) sums[j] += partial[k * width + j];
  return sums;
}

// out[r, j] = f(r, j) for every row, in parallel over chunks of rows
template <typename F>
void for_rows(int64_t rows, F f) {
  at::parallel_for(0, (rows + kBnChunkRows - 1) / kBnChunkRows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin * kBnChunkRows; r < std::min(rows, end * kBnChunkRows); ++r) f(r);
  });
}

template <typename T>
std::tuple<Tensor, Tensor, Tensor> bn_rows_forward_typed(const Tensor& x, const Tensor& weight, const Tensor& bias,
                                                         double eps) {
  const int64_t c = x.size(1), n = x.numel() / c;
  Tensor y = at::empty_strided(x.sizes(), x.strides(), x.options());
  Tensor mean = at::empty({c}, x.options()), var = at::empty({c}, x.options());
  const T* __restrict xp = x.const_data_ptr<T>();
  T* __restrict yp = y.mutable_data_ptr<T>();
  T* __restrict mp = mean.mutable_data_ptr<T>();
  T* __restrict vp = var.mutable_data_ptr<T>();
  const std::vector<double> sums = chunked_column_sums<T>(n, c, [&](int64_t r, T* __restrict acc) {
    const T* __restrict row = xp + r * c;
    for (int64_t j = 0; j < c; ++j) acc[j] += row[j];
  });
  for (int64_t j = 0; j < c; ++j) mp[j] = static_cast<T>(sums[j] / n);
  const std::vector<double> squares = chunked_column_sums<T>(n, c, [&](int64_t r, T* __restrict acc) {
    const T* __restrict row = xp + r * c;
    for (int64_t j = 0; j < c; ++j) acc[j] += (row[j] - mp[j]) * (row[j] - mp[j]);
  });
  std::vector<T> scale(c);
  for (int64_t j = 0; j < c; ++j) {
    vp[j] = static_cast<T>(squares[j] / n);
    scale[j] = static_cast<T>(weight.const_data_ptr<T>()[j] / std::sqrt(squares[j] / n + eps));
  }
  const T* __restrict sp = scale.data();
  const T* __restrict bp = bias.const_data_ptr<T>();
  for_rows(n, [&](int64_t r) {  // centred first, as BatchNorm does: x * scale + (bias - mean * scale) cancels
    const T* __restrict row = xp + r * c;
    T* __restrict out = yp + r * c;
    for (int64_t j = 0; j < c; ++j) out[j] = (row[j] - mp[j]) * sp[j] + bp[j];
  });
  return {y, mean, var};
}

template <typename T>
std::tuple<Tensor, Tensor, Tensor> bn_rows_backward_typed(const Tensor& grad, const Tensor& x, const Tensor& mean,
                                                          const Tensor& var, const Tensor& weight, double eps) {
  const int64_t c = x.size(1), n = x.numel() / c;
  Tensor dx = at::empty_strided(x.sizes(), x.strides(), x.options());
  Tensor dweight = at::empty({c}, x.options()), dbias = at::empty({c}, x.options());
  const T* __restrict xp = x.const_data_ptr<T>();
  const T* __restrict gp = grad.const_data_ptr<T>();
  const T* __restrict mp = mean.const_data_ptr<T>();
  // columns 0..C-1: sum of g; C..2C-1: sum of g (x - mean)
  const std::vector<double> sums = chunked_column_sums<T>(n, 2 * c, [&](int64_t r, T* __restrict acc) {
    const T* __restrict row = xp + r * c;
    const T* __restrict g = gp + r * c;
    for (int64_t j = 0; j < c; ++j) {
      acc[j] += g[j];
      acc[c + j] += g[j] * (row[j] - mp[j]);
    }
  });
  // dL/dx = w invstd (g - mean of g - xhat * mean of g xhat) = a g - b (x - mean) - k
  std::vector<T> a(c), b(c), k(c);
  for (int64_t j = 0; j < c; ++j) {
    const double invstd = 1.0 / std::sqrt(static_cast<double>(var.const_data_ptr<T>()[j]) + eps);
    const double scale = weight.const_data_ptr<T>()[j] * invstd;
    dbias.mutable_data_ptr<T>()[j] = static_cast<T>(sums[j]);
    dweight.mutable_data_ptr<T>()[j] = static_cast<T>(sums[c + j] * invstd);
    a[j] = static_cast<T>(scale);
    b[j] = static_cast<T>(scale * invstd * invstd * sums[c + j] / n);
    k[j] = static_cast<T>(scale * sums[j] / n);
  }
  const T* __restrict ap = a.data();
  const T* __restrict bp = b.data();
  const T* __restrict kp = k.data();
  T* __restrict dp = dx.mutable_data_ptr<T>();
  for_rows(n, [&](int64_t r) {
    const T* __restrict row = xp + r * c;
    const T* __restrict g = gp + r * c;
    T* __restrict out = dp + r * c;
    for (int64_t j = 0; j < c; ++j) out[j] = ap[j] * g[j] - bp[j] * (row[j] - mp[j]) - kp[j];
  });
  return {dx, dweight, dbias};
}

std::tuple<Tensor, Tensor, Tensor> bnl_forward(const Tensor& x, const Tensor& weight, const Tensor& bias, double eps) {
  if (x.scalar_type() == at::kDouble) return bn_rows_forward_typed<double>(x, weight, bias, eps);
  return bn_rows_forward_typed<float>(x, weight, bias, eps);
}

std::tuple<Tensor, Tensor, Tensor> bnl_backward(const Tensor& grad, const Tensor& x, const Tensor& mean,
                                                const Tensor& var, const Tensor& weight, double eps) {
  if (x.scalar_type() == at::kDouble) return bn_rows_backward_typed<double>(grad, x, mean, var, weight, eps);
  return bn_rows_backward_typed<float>(grad, x, mean, var, weight, eps);
}

}  // namespace
