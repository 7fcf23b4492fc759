// CPU kernels of Swin's window attention (../window_attention.h), included by kernels.h inside its instruction set's
// namespace, after cross_entropy_kernels.h (whose exp and horizontal reductions they use).
//
// One (window, head) at a time in a tile that stays in L1: k and v transposed to [d, Lp] (the window's L positions
// padded to whole vectors), q scaled as the reference scales it. A row of logits is then d vector FMAs over the keys,
// its softmax a vector exp, and each output channel a dot product over the keys: no [L, L] map leaves the tile.
// Forward keeps each row's log-sum-exp; backward recomputes the probabilities from it (as flash attention does) and
// accumulates dk and dv transposed, in vectors over the keys. The bias gradient sums dL/dlogits over windows: each
// group of windows (their number fixed by the shape, not the thread count) sums its own, the groups are added in
// order afterwards, so the result does not depend on the threads.
namespace {

template <typename T>
struct WindowGeometry {
  int64_t windows, length, lp, dim, heads, d, mask_windows;  // mask_windows: 0 without a mask
  WindowGeometry(const Tensor& qkv, int64_t heads_, const std::optional<Tensor>& mask)
      : windows(qkv.size(0)), length(qkv.size(1)), lp(round_up(qkv.size(1), Vec<T>::W)), dim(qkv.size(2) / 3),
        heads(heads_), d(qkv.size(2) / 3 / heads_), mask_windows(mask ? mask->size(0) : 0) {}
};

// q (scaled), k and v of window w, head h, from qkv [BW, L, 3*dim]; kt, vt [d, Lp] with zero padding
template <typename T>
struct WindowTile {
  std::vector<T> q, kt, vt, s;
  explicit WindowTile(const WindowGeometry<T>& g)
      : q(g.length * g.d), kt(g.d * g.lp, T(0)), vt(g.d * g.lp, T(0)), s(g.lp) {}

  void load(const WindowGeometry<T>& g, const T* qkv, int64_t w, int64_t h, T scale) {
    const T* base = qkv + w * g.length * 3 * g.dim + h * g.d;
    for (int64_t i = 0; i < g.length; ++i) {
      const T* row = base + i * 3 * g.dim;
      for (int64_t c = 0; c < g.d; ++c) {
        q[i * g.d + c] = row[c] * scale;
        kt[c * g.lp + i] = row[g.dim + c];
        vt[c * g.lp + i] = row[2 * g.dim + c];
      }
    }
  }

  // s = logits of query row i: scale q_i . k_j + bias[h, i, j] (+ mask[w % nW, i, j]); padding lanes far below
  // every logit, so that exp gives them 0
  void logits(const WindowGeometry<T>& g, const T* bias, const T* mask, int64_t w, int64_t h, int64_t i) {
    constexpr int W = Vec<T>::W;
    const T* qi = q.data() + i * g.d;
    for (int64_t j = 0; j < g.lp; j += W) {
      V<T> acc = vsplat(T(0));
      for (int64_t c = 0; c < g.d; ++c) acc += qi[c] * vload(kt.data() + c * g.lp + j);
      vstore(s.data() + j, acc);
    }
    const T* b = bias + (h * g.length + i) * g.length;
    for (int64_t j = 0; j < g.length; ++j) s[j] += b[j];
    if (mask) {
      const T* m = mask + ((w % g.mask_windows) * g.length + i) * g.length;
      for (int64_t j = 0; j < g.length; ++j) s[j] += m[j];
    }
    for (int64_t j = g.length; j < g.lp; ++j) s[j] = kPadLogit<T>;
  }
};

template <typename T>
inline T dot_lanes(const T* a, const T* b, int64_t lp) {
  constexpr int W = Vec<T>::W;
  V<T> acc = vsplat(T(0));
  for (int64_t j = 0; j < lp; j += W) acc += vload(a + j) * vload(b + j);
  return horizontal_sum<T>(acc);
}

template <typename T>
std::tuple<Tensor, Tensor> window_forward_typed(const Tensor& qkv, const Tensor& bias,
                                                const std::optional<Tensor>& mask, int64_t heads, double scale) {
  constexpr int W = Vec<T>::W;
  const WindowGeometry<T> g(qkv, heads, mask);
  Tensor out = at::empty({g.windows, g.length, g.dim}, qkv.options());
  Tensor lse = at::empty({g.windows, heads, g.length}, qkv.options());
  const T* qp = qkv.const_data_ptr<T>();
  const T* bp = bias.const_data_ptr<T>();
  const T* mp = mask ? mask->const_data_ptr<T>() : nullptr;
  T* op = out.mutable_data_ptr<T>();
  T* lp = lse.mutable_data_ptr<T>();
  const T sc = static_cast<T>(scale);
  at::parallel_for(0, g.windows * heads, 1, [&](int64_t begin, int64_t end) {
    WindowTile<T> tile(g);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t w = task / heads, h = task % heads;
      tile.load(g, qp, w, h, sc);
      for (int64_t i = 0; i < g.length; ++i) {
        tile.logits(g, bp, mp, w, h, i);
        T* s = tile.s.data();
        V<T> m = vload(s);
        for (int64_t j = W; j < g.lp; j += W) {
          const V<T> x = vload(s + j);
          m = x > m ? x : m;
        }
        const T mx = horizontal_max<T>(m);
        V<T> sum = vsplat(T(0));
        for (int64_t j = 0; j < g.lp; j += W) {
          const V<T> p = exp_shifted(vload(s + j) - mx);
          vstore(s + j, p);
          sum += p;
        }
        const T total = horizontal_sum<T>(sum);
        lp[(w * heads + h) * g.length + i] = mx + std::log(total);
        T* o = op + (w * g.length + i) * g.dim + h * g.d;
        for (int64_t c = 0; c < g.d; ++c) o[c] = dot_lanes(s, tile.vt.data() + c * g.lp, g.lp) / total;
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
  const int64_t groups = std::min<int64_t>(g.windows, 32), per_group = (g.windows + groups - 1) / groups;
  std::vector<T> partial(groups * heads * g.length * g.lp, T(0));  // dL/dbias of each group of windows
  const T* gp = grad.const_data_ptr<T>();
  const T* qp = qkv.const_data_ptr<T>();
  const T* bp = bias.const_data_ptr<T>();
  const T* mp = mask ? mask->const_data_ptr<T>() : nullptr;
  const T* lp = lse.const_data_ptr<T>();
  T* dp = dqkv.mutable_data_ptr<T>();
  const T sc = static_cast<T>(scale);
  at::parallel_for(0, groups * heads, 1, [&](int64_t begin, int64_t end) {
    WindowTile<T> tile(g);
    std::vector<T> go(g.length * g.d), dkt(g.d * g.lp), dvt(g.d * g.lp), dpr(g.lp);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t group = task / heads, h = task % heads;
      T* db = partial.data() + task * g.length * g.lp;
      for (int64_t w = group * per_group; w < std::min(g.windows, (group + 1) * per_group); ++w) {
        tile.load(g, qp, w, h, sc);
        for (int64_t i = 0; i < g.length; ++i)
          for (int64_t c = 0; c < g.d; ++c) go[i * g.d + c] = gp[(w * g.length + i) * g.dim + h * g.d + c];
        std::fill(dkt.begin(), dkt.end(), T(0));
        std::fill(dvt.begin(), dvt.end(), T(0));
        T* dq_base = dp + w * g.length * 3 * g.dim + h * g.d;
        for (int64_t i = 0; i < g.length; ++i) {
          tile.logits(g, bp, mp, w, h, i);
          T* p = tile.s.data();
          const V<T> row_lse = vsplat(lp[(w * heads + h) * g.length + i]);
          const T* gi = go.data() + i * g.d;
          V<T> total = vsplat(T(0));
          for (int64_t j = 0; j < g.lp; j += W) {  // p = softmax row; dpr = dL/dp = g_i . v_j
            const V<T> pj = exp_shifted(vload(p + j) - row_lse);
            vstore(p + j, pj);
            V<T> acc = vsplat(T(0));
            for (int64_t c = 0; c < g.d; ++c) acc += gi[c] * vload(tile.vt.data() + c * g.lp + j);
            vstore(dpr.data() + j, acc);
            total += pj * acc;
          }
          const V<T> dot = vsplat(horizontal_sum<T>(total));  // sum_j p_j dL/dp_j = g_i . out_i
          const T* qi = tile.q.data() + i * g.d;
          for (int64_t j = 0; j < g.lp; j += W) {  // dpr = dL/dlogits = p (dL/dp - g_i . out_i)
            const V<T> pj = vload(p + j);
            const V<T> ds = pj * (vload(dpr.data() + j) - dot);
            vstore(dpr.data() + j, ds);
            vstore(db + i * g.lp + j, vload(db + i * g.lp + j) + ds);
            for (int64_t c = 0; c < g.d; ++c) {
              vstore(dkt.data() + c * g.lp + j, vload(dkt.data() + c * g.lp + j) + qi[c] * ds);
              vstore(dvt.data() + c * g.lp + j, vload(dvt.data() + c * g.lp + j) + gi[c] * pj);
            }
          }
          T* dq = dq_base + i * 3 * g.dim;
          for (int64_t c = 0; c < g.d; ++c) dq[c] = sc * dot_lanes(dpr.data(), tile.kt.data() + c * g.lp, g.lp);
        }
        for (int64_t j = 0; j < g.length; ++j) {
          T* row = dq_base + j * 3 * g.dim;
          for (int64_t c = 0; c < g.d; ++c) {
            row[g.dim + c] = dkt[c * g.lp + j];
            row[2 * g.dim + c] = dvt[c * g.lp + j];
          }
        }
      }
    }
  });
  T* dbp = dbias.mutable_data_ptr<T>();
  at::parallel_for(0, heads * g.length, 1, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {  // (head, query position): the groups summed in order
      T* o = dbp + row * g.length;
      std::fill(o, o + g.length, T(0));
      for (int64_t group = 0; group < groups; ++group) {
        const T* part = partial.data() + (group * heads * g.length + row) * g.lp;
        for (int64_t j = 0; j < g.length; ++j) o[j] += part[j];
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
