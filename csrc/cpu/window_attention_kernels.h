// CPU kernels of Swin's window attention (../window_attention.h), included by kernels.h inside its instruction set's
// namespace, after cross_entropy_kernels.h (whose exp they use).
//
// One (window, head) at a time in tiles that stay in L1, the window's L query positions in vector lanes (padded to
// Lp): the logits tile s[j][i] of key j is then d vector FMAs of q^T (scaled as the reference scales it) with
// broadcast k_j; the softmax over keys and every product that sums over keys (out = p v, dL/dp = g v^T,
// dq = dL/ds k) are vertical, with no horizontal reduction. The bias and mask are transposed to [.., j, i] once
// per call. Forward keeps each row's log-sum-exp; backward recomputes the probabilities from it (as flash attention
// does), and for dk = dL/ds^T q and dv = p^T g, which sum over queries, transposes the two tiles so that keys lie
// in the lanes. The bias gradient sums dL/ds over windows: each group of windows (their number fixed by the shape,
// not by the thread count) sums its own, and the groups are added in order afterwards, so the result does not
// depend on the threads.
namespace {

template <typename T>
struct WindowGeometry {
  int64_t windows, length, lp, dim, heads, d, mask_windows;  // mask_windows: 0 without a mask
  WindowGeometry(const Tensor& qkv, int64_t heads_, const std::optional<Tensor>& mask)
      : windows(qkv.size(0)), length(qkv.size(1)), lp(round_up(qkv.size(1), Vec<T>::W)), dim(qkv.size(2) / 3),
        heads(heads_), d(qkv.size(2) / 3 / heads_), mask_windows(mask ? mask->size(0) : 0) {}
  int64_t row(int64_t w, int64_t i) const { return (w * length + i) * 3 * dim; }  // qkv's row of window w, query i
};

// x [n, L, L] -> [n, L, Lp] transposed in its last two axes, lanes past L zero
template <typename T>
std::vector<T> transposed_padded(const T* x, int64_t n, const WindowGeometry<T>& g) {
  std::vector<T> t(n * g.length * g.lp, T(0));
  for (int64_t a = 0; a < n; ++a)
    for (int64_t i = 0; i < g.length; ++i)
      for (int64_t j = 0; j < g.length; ++j) t[(a * g.length + j) * g.lp + i] = x[(a * g.length + i) * g.length + j];
  return t;
}

// the bias [heads, L, L] and mask [nW, L, L] (or none), transposed to [.., j, i] and padded, once per call
template <typename T>
struct BiasMaskTransposed {
  std::vector<T> bias_t, mask_t;
  BiasMaskTransposed(const Tensor& bias, const std::optional<Tensor>& mask, const WindowGeometry<T>& g)
      : bias_t(transposed_padded(bias.const_data_ptr<T>(), g.heads, g)),
        mask_t(mask ? transposed_padded(mask->const_data_ptr<T>(), g.mask_windows, g) : std::vector<T>()) {}
  const T* bias() const { return bias_t.data(); }
  const T* mask() const { return mask_t.empty() ? nullptr : mask_t.data(); }
};

// the tiles of one (window, head), queries in the lanes
template <typename T>
struct WindowTile {
  const WindowGeometry<T>& g;
  std::vector<T> qt, s;  // qt [d, Lp]: scaled q transposed; s [L, Lp]: logits, then probabilities, of key j
  explicit WindowTile(const WindowGeometry<T>& geometry)
      : g(geometry), qt(geometry.d * geometry.lp, T(0)), s(geometry.length * geometry.lp) {}

  // s[j] = scale q . k_j + bias[h, :, j] (+ mask[w % nW, :, j]) over the queries; returns the window's qkv
  const T* logits(const T* qkv, const T* bias_t, const T* mask_t, int64_t w, int64_t h, T scale) {
    constexpr int W = Vec<T>::W;
    const T* base = qkv + g.row(w, 0) + h * g.d;
    for (int64_t i = 0; i < g.length; ++i)
      for (int64_t c = 0; c < g.d; ++c) qt[c * g.lp + i] = base[i * 3 * g.dim + c] * scale;
    const T* bt = bias_t + h * g.length * g.lp;
    const T* mt = mask_t ? mask_t + (w % g.mask_windows) * g.length * g.lp : nullptr;
    for (int64_t j = 0; j < g.length; ++j) {
      const T* kj = base + j * 3 * g.dim + g.dim;
      for (int64_t i = 0; i < g.lp; i += W) {
        V<T> acc = vsplat(T(0));
        for (int64_t c = 0; c < g.d; ++c) acc += kj[c] * vload(qt.data() + c * g.lp + i);
        acc += vload(bt + j * g.lp + i);
        if (mt) acc += vload(mt + j * g.lp + i);
        vstore(s.data() + j * g.lp + i, acc);
      }
    }
    return base;
  }
};

// acc[c][lanes] = sum_j x[j][lanes] * y[j * ys + c] for c < d: a product summed over keys, queries in the lanes
template <typename T>
inline void keys_product(const T* x, const T* y, int64_t ys, const WindowGeometry<T>& g, T* acc) {
  constexpr int W = Vec<T>::W;
  for (int64_t c = 0; c < g.d; ++c)
    vector_blocks<T>(g.lp, [&](auto NV, int64_t i0) {  // NV independent sums in flight
      constexpr int nv = decltype(NV)::value;
      V<T> a[nv];
      for (int u = 0; u < nv; ++u) a[u] = vsplat(T(0));
      for (int64_t j = 0; j < g.length; ++j) {
        const V<T> yj = vsplat(y[j * ys + c]);
        for (int u = 0; u < nv; ++u) a[u] += yj * vload(x + j * g.lp + i0 + u * W);
      }
      for (int u = 0; u < nv; ++u) vstore(acc + c * g.lp + i0 + u * W, a[u]);
    });
}

template <typename T>
std::tuple<Tensor, Tensor> window_forward_typed(const Tensor& qkv, const Tensor& bias,
                                                const std::optional<Tensor>& mask, int64_t heads, double scale) {
  constexpr int W = Vec<T>::W;
  const WindowGeometry<T> g(qkv, heads, mask);
  Tensor out = at::empty({g.windows, g.length, g.dim}, qkv.options());
  Tensor lse = at::empty({g.windows, heads, g.length}, qkv.options());
  const BiasMaskTransposed<T> bm(bias, mask, g);
  const T* qp = qkv.const_data_ptr<T>();
  T* op = out.mutable_data_ptr<T>();
  T* lp = lse.mutable_data_ptr<T>();
  const T sc = static_cast<T>(scale);
  at::parallel_for(0, g.windows * heads, 1, [&](int64_t begin, int64_t end) {
    WindowTile<T> tile(g);
    std::vector<T> mx(g.lp), sum(g.lp), acc(g.d * g.lp);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t w = task / heads, h = task % heads;
      const T* base = tile.logits(qp, bm.bias(), bm.mask(), w, h, sc);
      T* s = tile.s.data();
      for (int64_t i = 0; i < g.lp; i += W) {
        V<T> m = vload(s + i);
        for (int64_t j = 1; j < g.length; ++j) {
          const V<T> x = vload(s + j * g.lp + i);
          m = x > m ? x : m;
        }
        V<T> total = vsplat(T(0));
        for (int64_t j = 0; j < g.length; ++j) {
          const V<T> p = exp_shifted(vload(s + j * g.lp + i) - m);
          vstore(s + j * g.lp + i, p);
          total += p;
        }
        vstore(mx.data() + i, m);
        vstore(sum.data() + i, total);
      }
      keys_product(s, base + 2 * g.dim, 3 * g.dim, g, acc.data());  // sum_j p_j v_j, unnormalised
      for (int64_t i = 0; i < g.length; ++i) {
        lp[(w * heads + h) * g.length + i] = mx[i] + std::log(sum[i]);
        T* o = op + (w * g.length + i) * g.dim + h * g.d;
        for (int64_t c = 0; c < g.d; ++c) o[c] = acc[c * g.lp + i] / sum[i];
      }
    }
  });
  return {out, lse};
}

template <typename T>
std::tuple<Tensor, Tensor> window_backward_typed(const Tensor& grad, const Tensor& qkv, const Tensor& bias,
                                                 const std::optional<Tensor>& mask, const Tensor& lse, int64_t heads,
                                                 double scale) {
  constexpr int W = Vec<T>::W;
  const WindowGeometry<T> g(qkv, heads, mask);
  Tensor dqkv = at::empty_like(qkv);
  Tensor dbias = at::empty_like(bias);
  const BiasMaskTransposed<T> bm(bias, mask, g);
  const int64_t groups = std::min<int64_t>(g.windows, 32), per_group = (g.windows + groups - 1) / groups;
  // dL/dbias of each group of windows, transposed: [group, head, key j, query lanes]
  std::vector<T> partial(groups * heads * g.length * g.lp, T(0));
  const T* gp = grad.const_data_ptr<T>();
  const T* qp = qkv.const_data_ptr<T>();
  const T* lsep = lse.const_data_ptr<T>();
  T* dp = dqkv.mutable_data_ptr<T>();
  const T sc = static_cast<T>(scale);
  at::parallel_for(0, groups * heads, 1, [&](int64_t begin, int64_t end) {
    WindowTile<T> tile(g);
    std::vector<T> gt(g.d * g.lp, T(0)), ds(g.length * g.lp), row_lse(g.lp, T(0)), acc(g.d * g.lp);
    std::vector<T> p_q(g.length * g.lp, T(0)), ds_q(g.length * g.lp, T(0));  // p, dL/ds with keys in the lanes
    for (int64_t task = begin; task < end; ++task) {
      const int64_t group = task / heads, h = task % heads;
      T* db = partial.data() + task * g.length * g.lp;
      for (int64_t w = group * per_group; w < std::min(g.windows, (group + 1) * per_group); ++w) {
        const T* base = tile.logits(qp, bm.bias(), bm.mask(), w, h, sc);
        T* p = tile.s.data();
        for (int64_t i = 0; i < g.length; ++i) {
          row_lse[i] = lsep[(w * heads + h) * g.length + i];
          for (int64_t c = 0; c < g.d; ++c) gt[c * g.lp + i] = gp[(w * g.length + i) * g.dim + h * g.d + c];
        }
        // padding lanes: q = g = 0 and lse = 0, so their p is finite and their dL/ds is 0
        for (int64_t i = 0; i < g.lp; i += W) {
          const V<T> l = vload(row_lse.data() + i);
          V<T> dot = vsplat(T(0));  // sum_j p_j dL/dp_j = g_i . out_i
          for (int64_t j = 0; j < g.length; ++j) {
            const T* vj = base + j * 3 * g.dim + 2 * g.dim;
            const V<T> pj = exp_shifted(vload(p + j * g.lp + i) - l);
            V<T> dpj = vsplat(T(0));  // dL/dp_j = g_i . v_j
            for (int64_t c = 0; c < g.d; ++c) dpj += vj[c] * vload(gt.data() + c * g.lp + i);
            vstore(p + j * g.lp + i, pj);
            vstore(ds.data() + j * g.lp + i, dpj);
            dot += pj * dpj;
          }
          for (int64_t j = 0; j < g.length; ++j) {
            const V<T> dsj = vload(p + j * g.lp + i) * (vload(ds.data() + j * g.lp + i) - dot);
            vstore(ds.data() + j * g.lp + i, dsj);
            vstore(db + j * g.lp + i, vload(db + j * g.lp + i) + dsj);
          }
        }
        keys_product(ds.data(), base + g.dim, 3 * g.dim, g, acc.data());  // dq = scale sum_j dL/ds_j k_j
        T* dqkv_w = dp + g.row(w, 0) + h * g.d;
        for (int64_t i = 0; i < g.length; ++i)
          for (int64_t c = 0; c < g.d; ++c) dqkv_w[i * 3 * g.dim + c] = sc * acc[c * g.lp + i];
        for (int64_t j = 0; j < g.length; ++j)
          for (int64_t i = 0; i < g.length; ++i) {
            p_q[i * g.lp + j] = p[j * g.lp + i];
            ds_q[i * g.lp + j] = ds[j * g.lp + i];
          }
        // dk_j = sum_i dL/ds_ij q_i (q scaled), dv_j = sum_i p_ij g_i: keys in the lanes, summed over queries
        for (int64_t c = 0; c < g.d; ++c)
          vector_blocks<T>(g.lp, [&](auto NV, int64_t j0) {
            constexpr int nv = decltype(NV)::value;
            V<T> dk[nv], dv[nv];
            for (int u = 0; u < nv; ++u) dk[u] = dv[u] = vsplat(T(0));
            for (int64_t i = 0; i < g.length; ++i) {
              const V<T> qi = vsplat(tile.qt[c * g.lp + i]), gi = vsplat(gt[c * g.lp + i]);
              for (int u = 0; u < nv; ++u) {
                dk[u] += qi * vload(ds_q.data() + i * g.lp + j0 + u * W);
                dv[u] += gi * vload(p_q.data() + i * g.lp + j0 + u * W);
              }
            }
            T dk_lanes[nv * W], dv_lanes[nv * W];
            for (int u = 0; u < nv; ++u) {
              vstore(dk_lanes + u * W, dk[u]);
              vstore(dv_lanes + u * W, dv[u]);
            }
            for (int64_t l = 0; l < nv * W && j0 + l < g.length; ++l) {
              dqkv_w[(j0 + l) * 3 * g.dim + g.dim + c] = dk_lanes[l];
              dqkv_w[(j0 + l) * 3 * g.dim + 2 * g.dim + c] = dv_lanes[l];
            }
          });
      }
    }
  });
  T* dbp = dbias.mutable_data_ptr<T>();
  at::parallel_for(0, heads * g.length, 1, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {  // (head, key j): the groups summed in order, transposed back
      const int64_t h = row / g.length, j = row % g.length;
      for (int64_t i = 0; i < g.length; ++i) {
        T total = T(0);
        for (int64_t group = 0; group < groups; ++group)
          total += partial[((group * heads + h) * g.length + j) * g.lp + i];
        dbp[(h * g.length + i) * g.length + j] = total;
      }
    }
  });
  return {dqkv, dbias};
}

std::tuple<Tensor, Tensor> wa_forward(const Tensor& qkv, const Tensor& bias, const std::optional<Tensor>& mask,
                                      int64_t heads, double scale) {
  if (qkv.scalar_type() == at::kDouble) return window_forward_typed<double>(qkv, bias, mask, heads, scale);
  return window_forward_typed<float>(qkv, bias, mask, heads, scale);
}

std::tuple<Tensor, Tensor> wa_backward(const Tensor& grad, const Tensor& qkv, const Tensor& bias,
                                       const std::optional<Tensor>& mask, const Tensor& lse, int64_t heads,
                                       double scale) {
  if (qkv.scalar_type() == at::kDouble)
    return window_backward_typed<double>(grad, qkv, bias, mask, lse, heads, scale);
  return window_backward_typed<float>(grad, qkv, bias, mask, lse, heads, scale);
}

}  // namespace
