// CPU kernels of BatchNorm + ReLU (or BatchNorm alone: RELU false) over a block of channels (../batch_norm_relu.h),
// included by kernels.h inside its instruction set's namespace.
//
// One channel per task (threads split the channels), its B rows of N positions read through h's strides. Each row
// is summed in vector lanes of the input type and the lanes and rows in double, in a fixed order: results do not
// depend on the thread count. Forward: the batch mean, then the centred sum of squares (two passes, as accurate
// as BatchNorm's own), then one pass writing max(h * scale + shift, 0) (without ReLU, h * scale + shift).
// Backward: one pass for the sums of g and of g (h - mean) over the active positions (the ReLU mask recomputed from
// h; every position without ReLU), one writing dL/dh.
namespace {

// the sum of f(x) over n values: vector lanes of T (two accumulators), then the lanes and the tail in double; f
// takes a vector or a scalar of T
template <typename T, typename F>
inline double row_sum(const T* x, int64_t n, F f) {
  constexpr int W = Vec<T>::W;
  V<T> a0 = vsplat(T(0)), a1 = a0;
  int64_t i = 0;
  for (; i + 2 * W <= n; i += 2 * W) {
    a0 += f(vload(x + i));
    a1 += f(vload(x + i + W));
  }
  for (; i + W <= n; i += W) a0 += f(vload(x + i));
  a0 += a1;
  double s = 0;
  for (int l = 0; l < W; ++l) s += a0[l];
  for (; i < n; ++i) s += f(x[i]);
  return s;
}

// h's geometry: B rows of N positions per channel
struct Rows {
  int64_t batch, channels, n, sb, sc;
  explicit Rows(const Tensor& h)
      : batch(h.size(0)), channels(h.size(1)), n(h.size(2)), sb(h.stride(0)), sc(h.stride(1)) {}
  int64_t count() const { return batch * n; }
};

template <typename T, bool RELU>
std::tuple<Tensor, Tensor, Tensor> bn_relu_forward_typed(const Tensor& h, const Tensor& weight, const Tensor& bias,
                                                         const std::optional<Tensor>& running_mean,
                                                         const std::optional<Tensor>& running_var, double eps) {
  constexpr int W = Vec<T>::W;
  const Rows r(h);
  Tensor act = at::empty({r.batch, r.channels, r.n}, h.options());
  Tensor mean = running_mean ? running_mean->clone() : at::empty({r.channels}, h.options());
  Tensor var = running_var ? running_var->clone() : at::empty({r.channels}, h.options());
  const T* hp = h.const_data_ptr<T>();
  const T* wp = weight.const_data_ptr<T>();
  const T* bp = bias.const_data_ptr<T>();
  T* ap = act.mutable_data_ptr<T>();
  T* mp = mean.mutable_data_ptr<T>();
  T* vp = var.mutable_data_ptr<T>();
  const bool batch_stats = !running_mean.has_value();
  at::parallel_for(0, r.channels, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      const T* x = hp + c * r.sc;
      if (batch_stats) {
        double s = 0;
        for (int64_t b = 0; b < r.batch; ++b) s += row_sum(x + b * r.sb, r.n, [](auto v) { return v; });
        const T mu = mp[c] = static_cast<T>(s / r.count());
        double q = 0;
        for (int64_t b = 0; b < r.batch; ++b)
          q += row_sum(x + b * r.sb, r.n, [mu](auto v) { const auto d = v - mu; return d * d; });
        vp[c] = static_cast<T>(q / r.count());
      }
      const double scale_d = wp[c] / std::sqrt(static_cast<double>(vp[c]) + eps);
      const T scale = static_cast<T>(scale_d), shift = static_cast<T>(bp[c] - mp[c] * scale_d);
      const V<T> vs = vsplat(scale), vt = vsplat(shift), zero = vsplat(T(0));
      for (int64_t b = 0; b < r.batch; ++b) {
        const T* xr = x + b * r.sb;
        T* o = ap + (b * r.channels + c) * r.n;
        int64_t i = 0;
        for (; i + W <= r.n; i += W) {
          const V<T> pre = vload(xr + i) * vs + vt;
          vstore(o + i, RELU ? (pre > zero ? pre : zero) : pre);
        }
        for (; i < r.n; ++i) o[i] = RELU ? std::max(xr[i] * scale + shift, T(0)) : xr[i] * scale + shift;
      }
    }
  });
  return {act, mean, var};
}

template <typename T, bool RELU>
std::tuple<Tensor, Tensor, Tensor, Tensor> bn_relu_backward_typed(const Tensor& grad, const Tensor& h,
                                                                  const Tensor& mean, const Tensor& var,
                                                                  const Tensor& weight, const Tensor& bias,
                                                                  double eps, bool batch_stats) {
  constexpr int W = Vec<T>::W;
  const Rows r(h), rg(grad);
  Tensor dh = at::empty({r.batch, r.channels, r.n}, h.options());
  Tensor dweight = at::empty({r.channels}, h.options()), dbias = at::empty_like(dweight);
  Tensor dh_sum = at::empty_like(dweight);
  const T* hp = h.const_data_ptr<T>();
  const T* gp = grad.const_data_ptr<T>();
  const T *mp = mean.const_data_ptr<T>(), *vp = var.const_data_ptr<T>();
  const T *wp = weight.const_data_ptr<T>(), *bp = bias.const_data_ptr<T>();
  T* dp = dh.mutable_data_ptr<T>();
  T *dwp = dweight.mutable_data_ptr<T>(), *dbp = dbias.mutable_data_ptr<T>(), *dsp = dh_sum.mutable_data_ptr<T>();
  at::parallel_for(0, r.channels, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      const double invstd = 1.0 / std::sqrt(static_cast<double>(vp[c]) + eps);
      const double scale_d = wp[c] * invstd;
      const T scale = static_cast<T>(scale_d), shift = static_cast<T>(bp[c] - mp[c] * scale_d), mu = mp[c];
      const V<T> vs = vsplat(scale), vt = vsplat(shift), vmu = vsplat(mu), zero = vsplat(T(0));
      // the sums over active positions of g and of g (h - mean)
      double sum_g = 0, sum_gx = 0;
      for (int64_t b = 0; b < r.batch; ++b) {
        const T* x = hp + b * r.sb + c * r.sc;
        const T* g = gp + b * rg.sb + c * rg.sc;
        V<T> a = zero, ax = zero;
        int64_t i = 0;
        for (; i + W <= r.n; i += W) {
          const V<T> xv = vload(x + i);
          const V<T> gm = !RELU ? vload(g + i) : xv * vs + vt > zero ? vload(g + i) : zero;
          a += gm;
          ax += gm * (xv - vmu);
        }
        for (int l = 0; l < W; ++l) {
          sum_g += a[l];
          sum_gx += ax[l];
        }
        for (; i < r.n; ++i) {
          if (!RELU || x[i] * scale + shift > T(0)) {
            sum_g += g[i];
            sum_gx += g[i] * (x[i] - mu);
          }
        }
      }
      dbp[c] = static_cast<T>(sum_g);
      dwp[c] = static_cast<T>(sum_gx * invstd);
      // dL/dh = scale (g_active - mean of g_active - xhat * mean of g_active xhat) with batch statistics
      const double k1 = batch_stats ? sum_g / r.count() : 0.0;
      const double k2 = batch_stats ? sum_gx * invstd * invstd / r.count() : 0.0;
      const T c1 = static_cast<T>(k1), c2 = static_cast<T>(k2);
      const V<T> vc1 = vsplat(c1), vc2 = vsplat(c2);
      double total = 0;
      for (int64_t b = 0; b < r.batch; ++b) {
        const T* x = hp + b * r.sb + c * r.sc;
        const T* g = gp + b * rg.sb + c * rg.sc;
        T* o = dp + (b * r.channels + c) * r.n;
        V<T> a = zero;
        int64_t i = 0;
        for (; i + W <= r.n; i += W) {
          const V<T> xv = vload(x + i);
          const V<T> gm = !RELU ? vload(g + i) : xv * vs + vt > zero ? vload(g + i) : zero;
          const V<T> d = (gm - vc1 - (xv - vmu) * vc2) * vs;
          vstore(o + i, d);
          a += d;
        }
        for (int l = 0; l < W; ++l) total += a[l];
        for (; i < r.n; ++i) {
          const T gm = !RELU || x[i] * scale + shift > T(0) ? g[i] : T(0);
          o[i] = (gm - c1 - (x[i] - mu) * c2) * scale;
          total += o[i];
        }
      }
      dsp[c] = static_cast<T>(total);
    }
  });
  return {dh, dweight, dbias, dh_sum};
}

std::tuple<Tensor, Tensor, Tensor> bnr_forward(const Tensor& h, const Tensor& weight, const Tensor& bias,
                                               const std::optional<Tensor>& mean, const std::optional<Tensor>& var,
                                               double eps, bool relu) {
  if (h.scalar_type() == at::kDouble)
    return relu ? bn_relu_forward_typed<double, true>(h, weight, bias, mean, var, eps)
                : bn_relu_forward_typed<double, false>(h, weight, bias, mean, var, eps);
  return relu ? bn_relu_forward_typed<float, true>(h, weight, bias, mean, var, eps)
              : bn_relu_forward_typed<float, false>(h, weight, bias, mean, var, eps);
}

std::tuple<Tensor, Tensor, Tensor, Tensor> bnr_backward(const Tensor& grad, const Tensor& h, const Tensor& mean,
                                                        const Tensor& var, const Tensor& weight, const Tensor& bias,
                                                        double eps, bool batch_stats, bool relu) {
  if (h.scalar_type() == at::kDouble)
    return relu ? bn_relu_backward_typed<double, true>(grad, h, mean, var, weight, bias, eps, batch_stats)
                : bn_relu_backward_typed<double, false>(grad, h, mean, var, weight, bias, eps, batch_stats);
  return relu ? bn_relu_backward_typed<float, true>(grad, h, mean, var, weight, bias, eps, batch_stats)
              : bn_relu_backward_typed<float, false>(grad, h, mean, var, weight, bias, eps, batch_stats);
}

}  // namespace
