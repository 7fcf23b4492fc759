// CPU kernels of the fused loss (../cross_entropy.h), included by kernels.h inside its instruction set's namespace.
//
// One output row (image b, label row Y) at a time, in a tile z [W, C] with the classes innermost (padded to whole
// vectors): the two logits rows it reads are blended into r [w, C], resized along the row into z, and the
// log-sum-exp over classes is taken pixel by pixel in vectors. Forward keeps lse [B, H, W] and one loss sum per row,
// summed in row order afterwards (no dependence on the thread count). Backward recomputes z, forms
// dz = g (softmax - onehot), applies the transpose of the resize along the width into t [w, C] and stores it as
// d [B, C, H, w]; a second pass applies the transpose along the height (each logits row sums the label rows that
// read it, in row order), skipped when the heights are equal.
// The logits are read through their strides (NCHW or channels-last: no copy); the gradient is NCHW-contiguous.
namespace {

// one axis of PyTorch's bilinear resize (align_corners=False, output size given): output index o reads input lo[o]
// with weight 1 - frac[o] and hi[o] with frac[o], computed in the accumulation type as ATen does; for the
// transpose, the outputs reading input i as lo are [lo_begin[i], lo_begin[i+1]) and as hi [hi_begin[i], ...)
template <typename T>
struct ResizeAxis {
  std::vector<int64_t> lo, hi, lo_begin, hi_begin;
  std::vector<T> frac;
  ResizeAxis(int64_t n_in, int64_t n_out) : lo(n_out), hi(n_out), lo_begin(n_in + 1), hi_begin(n_in + 1), frac(n_out) {
    const T scale = static_cast<T>(n_in) / static_cast<T>(n_out);
    for (int64_t o = 0; o < n_out; ++o) {
      const T src = std::max(scale * (static_cast<T>(o) + T(0.5)) - T(0.5), T(0));
      lo[o] = std::min<int64_t>(static_cast<int64_t>(src), n_in - 1);
      hi[o] = lo[o] + (lo[o] < n_in - 1 ? 1 : 0);
      frac[o] = std::min(std::max(src - static_cast<T>(lo[o]), T(0)), T(1));
    }
    // lo and hi are non-decreasing in o: the first output reading each input
    for (int64_t i = 0, o = 0, p = 0; i <= n_in; ++i) {
      while (o < n_out && lo[o] < i) ++o;
      while (p < n_out && hi[p] < i) ++p;
      lo_begin[i] = o;
      hi_begin[i] = p;
    }
  }
};

template <typename T>
struct ResizeGeometry {
  int64_t batch, classes, cp, h, w, H, W;  // cp: classes padded to whole vectors
  int64_t sb, sc, sy, sx;                  // the logits' strides
  ResizeAxis<T> rows, cols;
  ResizeGeometry(const Tensor& logits, const Tensor& label)
      : batch(logits.size(0)), classes(logits.size(1)), cp(round_up(logits.size(1), Vec<T>::W)), h(logits.size(2)),
        w(logits.size(3)), H(label.size(1)), W(label.size(2)), sb(logits.stride(0)), sc(logits.stride(1)),
        sy(logits.stride(2)), sx(logits.stride(3)), rows(h, H), cols(w, W) {}
  // no resize, and each row's pixels contiguous in memory
  bool same_size() const { return h == H && w == W && sx == 1; }
};

// padding classes: exp(pad - max) underflows, so they add nothing to a sum over classes
template <typename T>
constexpr T kPadLogit = -std::numeric_limits<T>::max() / 4;

// z[X*cp + c] = logits of image x resized to output row Y, column X; r: w*cp scratch
template <typename T>
inline void resized_row(const ResizeGeometry<T>& g, const T* x, int64_t Y, T* r, T* z) {
  constexpr int W = Vec<T>::W;
  const T fy = g.rows.frac[Y], gy = T(1) - fy;
  const T* a = x + g.rows.lo[Y] * g.sy;
  const T* b = x + g.rows.hi[Y] * g.sy;
  const int64_t C = g.classes, cp = g.cp;
  if (g.sc <= g.sx) {  // channels-last: classes innermost in memory too
    for (int64_t i = 0; i < g.w; ++i)
      for (int64_t c = 0; c < C; ++c) r[i * cp + c] = gy * a[i * g.sx + c * g.sc] + fy * b[i * g.sx + c * g.sc];
  } else {
    for (int64_t c = 0; c < C; ++c)
      for (int64_t i = 0; i < g.w; ++i) r[i * cp + c] = gy * a[c * g.sc + i * g.sx] + fy * b[c * g.sc + i * g.sx];
  }
  for (int64_t i = 0; i < g.w; ++i)
    for (int64_t c = C; c < cp; ++c) r[i * cp + c] = kPadLogit<T>;
  const int64_t* lo = g.cols.lo.data();
  const int64_t* hi = g.cols.hi.data();
  const T* f = g.cols.frac.data();
  for (int64_t X = 0; X < g.W; ++X) {
    const T* r0 = r + lo[X] * cp;
    const T* r1 = r + hi[X] * cp;
    const T f1 = f[X], f0 = T(1) - f1;
    for (int64_t c = 0; c < cp; c += W) vstore(z + X * cp + c, f0 * vload(r0 + c) + f1 * vload(r1 + c));
  }
}

// exp(x) for x <= 0 (up to rounding) in the vectors of T
inline V<float> exp_shifted(V<float> x) { return exp_nonpositive(x); }
inline V<double> exp_shifted(V<double> x) {
  constexpr int W = Vec<double>::W;
  double t[W];
  vstore(t, x);
  for (int i = 0; i < W; ++i) t[i] = std::exp(t[i]);
  return vload(t);
}

template <typename T>
inline T horizontal_max(V<T> v) {
  T t[Vec<T>::W];
  vstore(t, v);
  T m = t[0];
  for (int i = 1; i < Vec<T>::W; ++i) m = std::max(m, t[i]);
  return m;
}

template <typename T>
inline T horizontal_sum(V<T> v) {
  T t[Vec<T>::W];
  vstore(t, v);
  T s = T(0);
  for (int i = 0; i < Vec<T>::W; ++i) s += t[i];
  return s;
}

// log sum_c exp(z[c]) over cp (padded) classes
template <typename T>
inline T log_sum_exp(const T* z, int64_t cp) {
  constexpr int W = Vec<T>::W;
  V<T> m = vload(z);
  for (int64_t c = W; c < cp; c += W) {
    const V<T> v = vload(z + c);
    m = v > m ? v : m;
  }
  const T mx = horizontal_max<T>(m);
  V<T> s = vsplat(T(0));
  for (int64_t c = 0; c < cp; c += W) s += exp_shifted(vload(z + c) - mx);
  return mx + std::log(horizontal_sum<T>(s));
}

// labels checked inside the parallel loops: a class outside [0, C) that is not ignore_index is remembered (one of
// them) and raised after the loop; backward checks too (its op can be called directly), before writing through it
struct LabelCheck {
  int64_t classes, ignore;
  std::atomic<bool> bad{false};
  std::atomic<int64_t> value{0};
  LabelCheck(int64_t classes_, int64_t ignore_) : classes(classes_), ignore(ignore_) {}
  // true for a class index to use; false for ignore_index or an invalid one (remembered)
  bool use(int64_t t) {
    if (t == ignore) return false;
    if (t >= 0 && t < classes) return true;
    value = t;
    bad = true;
    return false;
  }
  void raise_if_bad() const {
    TORCH_CHECK(!bad.load(), "label holds class ", value.load(), ", outside [0, ", classes, ") of the logits' ",
                classes, " classes, and not ignore_index (", ignore, ")");
  }
};

// The forward's frame, one label row (image b, row Y: item b * H + Y) at a time: row(item, scratch, l, t, labels)
// writes the row's lse into l (every pixel's, labelled or not: backward's exp(z - lse) then never overflows) and
// returns its loss sum over the labels t; `scratch` holds scratch_size values per thread. The row sums are added in
// row order afterwards, so the result does not depend on the thread count.
template <typename T, typename Row>
std::tuple<Tensor, Tensor> ce_forward_by_rows(const ResizeGeometry<T>& g, const Tensor& logits, const Tensor& label,
                                              int64_t ignore, int64_t scratch_size, Row row) {
  Tensor lse = at::empty({g.batch, g.H, g.W}, logits.options().memory_format(at::MemoryFormat::Contiguous));
  std::vector<double> row_sums(g.batch * g.H, 0.0);
  LabelCheck labels(g.classes, ignore);
  const int64_t* lab = label.const_data_ptr<int64_t>();
  T* out = lse.mutable_data_ptr<T>();
  at::parallel_for(0, g.batch * g.H, 1, [&](int64_t begin, int64_t end) {
    Scratch<T> scratch(scratch_size);
    for (int64_t item = begin; item < end; ++item)
      row_sums[item] = row(item, scratch.get(), out + item * g.W, lab + item * g.W, labels);
  });
  labels.raise_if_bad();
  double total = 0.0;
  for (double s : row_sums) total += s;
  return {at::scalar_tensor(total, logits.options()), lse};
}

// Logits already at the label's size with their columns contiguous (the network's full-resolution outputs): no
// resize, so the pixels of a row go in the vector lanes and the classes are read plane by plane, straight from the
// logits (no transposed tile, no class padding). A row's last partial block is copied into a zero-padded tile first.
template <typename T>
struct PixelBlocks {
  const T* x;         // logits of image b, row Y
  int64_t sc, width;  // class stride, pixels in the row
  T* tail;            // [C, W] scratch for the last partial block
  PixelBlocks(const ResizeGeometry<T>& g, const T* logits, int64_t b, int64_t Y, T* tail_)
      : x(logits + b * g.sb + Y * g.sy), sc(g.sc), width(g.W), tail(tail_) {}
  // the block of pixels from X0: class c's W values at p[c * stride]
  std::pair<const T*, int64_t> block(int64_t X0, int64_t classes) {
    constexpr int W = Vec<T>::W;
    if (X0 + W <= width) return {x + X0, sc};
    std::fill(tail, tail + classes * W, T(0));
    for (int64_t c = 0; c < classes; ++c)
      for (int64_t l = 0; X0 + l < width; ++l) tail[c * W + l] = x[c * sc + X0 + l];
    return {tail, W};
  }
};

// lse of the W pixels of a block (class c's values at z[c * stride])
template <typename T>
inline V<T> block_lse(const T* z, int64_t stride, int64_t classes) {
  constexpr int W = Vec<T>::W;
  V<T> m = vload(z);
  for (int64_t c = 1; c < classes; ++c) {
    const V<T> v = vload(z + c * stride);
    m = v > m ? v : m;
  }
  V<T> s = vsplat(T(0));
  for (int64_t c = 0; c < classes; ++c) s += exp_shifted(vload(z + c * stride) - m);
  T sl[W], ml[W];
  vstore(sl, s);
  vstore(ml, m);
  for (int l = 0; l < W; ++l) sl[l] = ml[l] + std::log(sl[l]);
  return vload(sl);
}

template <typename T>
std::tuple<Tensor, Tensor> same_size_ce_forward(const ResizeGeometry<T>& g, const Tensor& logits, const Tensor& label,
                                                int64_t ignore) {
  constexpr int W = Vec<T>::W;
  const T* x = logits.const_data_ptr<T>();
  return ce_forward_by_rows(g, logits, label, ignore, g.classes * W,
                            [&](int64_t item, T* tail, T* l, const int64_t* t, LabelCheck& labels) {
    PixelBlocks<T> row(g, x, item / g.H, item % g.H, tail);
    double sum = 0.0;
    for (int64_t X0 = 0; X0 < g.W; X0 += W) {
      const auto [z, stride] = row.block(X0, g.classes);
      T lanes[W];
      vstore(lanes, block_lse(z, stride, g.classes));
      for (int64_t k = 0; k < W && X0 + k < g.W; ++k) {
        l[X0 + k] = lanes[k];
        if (labels.use(t[X0 + k])) sum += static_cast<double>(lanes[k] - z[t[X0 + k] * stride + k]);
      }
    }
    return sum;
  });
}

template <typename T>
Tensor same_size_ce_backward(const ResizeGeometry<T>& g, T gsum, const Tensor& logits, const Tensor& label,
                             const Tensor& lse, int64_t ignore) {
  constexpr int W = Vec<T>::W;
  const int64_t C = g.classes, plane = g.H * g.W;
  Tensor dx = at::empty({g.batch, C, g.H, g.W}, logits.options().memory_format(at::MemoryFormat::Contiguous));
  const T* x = logits.const_data_ptr<T>();
  const int64_t* lab = label.const_data_ptr<int64_t>();
  const T* lse_p = lse.const_data_ptr<T>();
  T* dp = dx.mutable_data_ptr<T>();
  LabelCheck labels(C, ignore);
  at::parallel_for(0, g.batch * g.H, 1, [&](int64_t begin, int64_t end) {
    Scratch<T> tail(C * W), tail_out(C * W);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / g.H, Y = item % g.H;
      PixelBlocks<T> row(g, x, b, Y, tail.get());
      const int64_t* t = lab + item * g.W;
      T* d = dp + b * C * plane + Y * g.W;  // dx of image b, row Y, class 0
      for (int64_t X0 = 0; X0 < g.W; X0 += W) {
        const int64_t n = std::min<int64_t>(W, g.W - X0);
        const auto [z, stride] = row.block(X0, C);
        T l[W] = {}, scale[W] = {};  // dz = scale (softmax - onehot); 0 where unlabelled
        bool used[W] = {};
        for (int64_t k = 0; k < n; ++k) {
          l[k] = lse_p[item * g.W + X0 + k];
          used[k] = labels.use(t[X0 + k]);
          scale[k] = used[k] ? gsum : T(0);
        }
        const V<T> lv = vload(l), sv = vload(scale);
        T* o = n == W ? d + X0 : tail_out.get();
        const int64_t os = n == W ? plane : W;
        for (int64_t c = 0; c < C; ++c) vstore(o + c * os, exp_shifted(vload(z + c * stride) - lv) * sv);
        for (int64_t k = 0; k < n; ++k)
          if (used[k]) o[t[X0 + k] * os + k] -= gsum;
        if (n < W)
          for (int64_t c = 0; c < C; ++c)
            for (int64_t k = 0; k < n; ++k) d[c * plane + X0 + k] = o[c * W + k];
      }
    }
  });
  labels.raise_if_bad();
  return dx;
}

template <typename T>
std::tuple<Tensor, Tensor> upsampled_ce_forward_typed(const Tensor& logits, const Tensor& label, int64_t ignore) {
  const ResizeGeometry<T> g(logits, label);
  if (g.same_size()) return same_size_ce_forward(g, logits, label, ignore);
  const T* x = logits.const_data_ptr<T>();
  return ce_forward_by_rows(g, logits, label, ignore, (g.w + g.W) * g.cp,
                            [&](int64_t item, T* scratch, T* l, const int64_t* t, LabelCheck& labels) {
    T* r = scratch;
    T* z = scratch + g.w * g.cp;
    resized_row(g, x + item / g.H * g.sb, item % g.H, r, z);
    double sum = 0.0;
    for (int64_t X = 0; X < g.W; ++X) {
      const T* zx = z + X * g.cp;
      l[X] = log_sum_exp(zx, g.cp);
      if (labels.use(t[X])) sum += static_cast<double>(l[X] - zx[t[X]]);
    }
    return sum;
  });
}

template <typename T>
Tensor upsampled_ce_backward_typed(const Tensor& grad, const Tensor& logits, const Tensor& label, const Tensor& lse,
                                   int64_t ignore) {
  constexpr int W = Vec<T>::W;
  const ResizeGeometry<T> g(logits, label);
  const int64_t C = g.classes, cp = g.cp;
  const T gsum = grad.item<T>();
  if (g.same_size()) return same_size_ce_backward(g, gsum, logits, label, lse, ignore);
  Tensor dx = at::empty({g.batch, C, g.h, g.w}, logits.options().memory_format(at::MemoryFormat::Contiguous));
  const bool same_rows = g.h == g.H;  // the resize's rows are the identity: the row pass writes dx itself
  Tensor d = same_rows ? dx : at::empty({g.batch, C, g.H, g.w}, dx.options());
  const T* x = logits.const_data_ptr<T>();
  const int64_t* lab = label.const_data_ptr<int64_t>();
  const T* lse_p = lse.const_data_ptr<T>();
  T* dp = d.mutable_data_ptr<T>();
  LabelCheck labels(C, ignore);
  at::parallel_for(0, g.batch * g.H, 1, [&](int64_t begin, int64_t end) {
    Scratch<T> r(g.w * cp), z(g.W * cp), t(g.w * cp);
    const int64_t* lo = g.cols.lo.data();
    const int64_t* hi = g.cols.hi.data();
    const T* f = g.cols.frac.data();
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / g.H, Y = item % g.H;
      const int64_t* tl = lab + item * g.W;
      const T* l = lse_p + item * g.W;
      resized_row(g, x + b * g.sb, Y, r.get(), z.get());
      std::fill(t.get(), t.get() + g.w * cp, T(0));
      for (int64_t X = 0; X < g.W; ++X) {
        if (!labels.use(tl[X])) continue;  // dz = 0 where unlabelled
        T* zx = z.get() + X * cp;
        const V<T> lx = vsplat(l[X]);
        for (int64_t c = 0; c < cp; c += W) vstore(zx + c, exp_shifted(vload(zx + c) - lx) * gsum);
        zx[tl[X]] -= gsum;  // dz = g (softmax - onehot)
        T* t0 = t.get() + lo[X] * cp;
        T* t1 = t.get() + hi[X] * cp;
        const T f1 = f[X], f0 = T(1) - f1;
        for (int64_t c = 0; c < cp; c += W) {
          const V<T> v = vload(zx + c);
          vstore(t0 + c, vload(t0 + c) + f0 * v);
          vstore(t1 + c, vload(t1 + c) + f1 * v);
        }
      }
      T* out = dp + b * C * g.H * g.w + Y * g.w;
      for (int64_t c = 0; c < C; ++c)
        for (int64_t i = 0; i < g.w; ++i) out[c * g.H * g.w + i] = t.get()[i * cp + c];
    }
  });
  labels.raise_if_bad();
  if (same_rows) return dx;
  // the height pass: logits row i sums the label rows reading it (as lo, then as hi), in row order
  T* dxp = dx.mutable_data_ptr<T>();
  at::parallel_for(0, g.batch * C * g.h, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t bc = item / g.h, i = item % g.h;
      T* o = dxp + item * g.w;
      std::fill(o, o + g.w, T(0));
      const T* src = dp + bc * g.H * g.w;
      for (int64_t Y = g.rows.lo_begin[i]; Y < g.rows.lo_begin[i + 1]; ++Y) {
        const T wgt = T(1) - g.rows.frac[Y];
        for (int64_t k = 0; k < g.w; ++k) o[k] += wgt * src[Y * g.w + k];
      }
      for (int64_t Y = g.rows.hi_begin[i]; Y < g.rows.hi_begin[i + 1]; ++Y) {
        const T wgt = g.rows.frac[Y];
        for (int64_t k = 0; k < g.w; ++k) o[k] += wgt * src[Y * g.w + k];
      }
    }
  });
  return dx;
}

std::tuple<Tensor, Tensor> upsampled_ce_forward(const Tensor& logits, const Tensor& label, int64_t ignore) {
  if (logits.scalar_type() == at::kDouble) return upsampled_ce_forward_typed<double>(logits, label, ignore);
  return upsampled_ce_forward_typed<float>(logits, label, ignore);
}

Tensor upsampled_ce_backward(const Tensor& grad, const Tensor& logits, const Tensor& label, const Tensor& lse,
                             int64_t ignore) {
  if (logits.scalar_type() == at::kDouble) return upsampled_ce_backward_typed<double>(grad, logits, label, lse, ignore);
  return upsampled_ce_backward_typed<float>(grad, logits, label, lse, ignore);
}

}  // namespace
