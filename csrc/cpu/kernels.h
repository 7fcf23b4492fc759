// CPU kernels of the gathered core (see ../attention.h), compiled once per instruction set: a kernels_<isa>.cpp file
// includes kernels_includes.h, switches the compiler to its set, defines the set's parameters below and includes
// this file, which puts everything in the namespace FMA_CPU_ISA (distinct per set, so no two sets share a symbol).
//
// Design: tiles of positions in L2-sized fp32/fp64 buffers, fused softplus/clamp/division, register-blocked
// micro-kernels vectorized along the contiguous axis, and partial sums per fixed-size chunk of positions reduced in
// chunk order, so results never depend on the thread count.
//
// Parameters of the instruction set:
//   FMA_CPU_ISA           namespace of this set's kernels (cpu_baseline, cpu_avx2, cpu_avx512)
//   FMA_CPU_VECTOR_BYTES  width of one vector register
//   FMA_CPU_ACCUMULATORS  vector registers a micro-kernel block keeps as accumulators (the rest hold operands)
//   FMA_CPU_MAX_VECTORS   vectors along the contiguous axis in the widest block
#if !defined(FMA_CPU_ISA) || !defined(FMA_CPU_VECTOR_BYTES) || !defined(FMA_CPU_ACCUMULATORS) || \
    !defined(FMA_CPU_MAX_VECTORS)
#error "kernels.h is included by a kernels_<isa>.cpp file that defines the instruction set's parameters"
#endif

namespace fused_mtl_attn {
namespace FMA_CPU_ISA {
namespace {

constexpr int kVectorBytes = FMA_CPU_VECTOR_BYTES;
constexpr int kAccumulators = FMA_CPU_ACCUMULATORS;
constexpr int kMaxVectors = FMA_CPU_MAX_VECTORS;

// vectors of one register (GCC/clang vector extensions, lowered to this file's instruction set)
template <typename T> struct Vec;
template <> struct Vec<float> {
  typedef float type __attribute__((vector_size(kVectorBytes)));
  typedef int32_t itype __attribute__((vector_size(kVectorBytes)));
  static constexpr int W = kVectorBytes / 4;
};
template <> struct Vec<double> {
  typedef double type __attribute__((vector_size(kVectorBytes)));
  static constexpr int W = kVectorBytes / 8;
};
template <typename T> using V = typename Vec<T>::type;

template <typename T> inline V<T> vload(const T* p) { V<T> r; std::memcpy(&r, p, sizeof(r)); return r; }
template <typename T> inline void vstore(T* p, const V<T>& v) { std::memcpy(p, &v, sizeof(v)); }
template <typename T> inline V<T> vsplat(T x) { return V<T>{} + x; }

inline int64_t round_up(int64_t x, int64_t to) { return (x + to - 1) / to * to; }

// a 64-byte aligned scratch array, zeroed if asked (most are written before they are read: zeroing them would be
// a pass over memory, on one thread where the array is shared)
template <typename T>
struct Scratch {
  T* ptr;
  explicit Scratch(int64_t n, bool zeroed = false) {
    const size_t bytes = static_cast<size_t>(round_up(std::max<int64_t>(n, 1) * sizeof(T), 64));
    ptr = static_cast<T*>(std::aligned_alloc(64, bytes));
    TORCH_CHECK(ptr != nullptr, "fused_mtl_attn: out of memory for a ", bytes, "-byte scratch buffer");
    if (zeroed) std::memset(ptr, 0, bytes);
  }
  ~Scratch() { std::free(ptr); }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  T* get() const { return ptr; }
};

// ---------------------------------------------------------------- softplus on vectors
// exp(x) for x <= 0 (Cody-Waite reduction, Cephes' degree-5 polynomial; relative error ~2e-7); exactly 0 below -87,
// where exp(x) leaves the normal floats: a subnormal result, or one multiplied down into the subnormals later, costs
// a microcode assist per instruction on x86 (~100 cycles; the loss's padding classes hit it at every pixel)
inline V<float> exp_nonpositive(V<float> x_in) {
  using VF = V<float>;
  using VI = Vec<float>::itype;
  const VF x = x_in < -87.0f ? vsplat(-87.0f) : x_in;
  const VF n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round to nearest
  VF r = x - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  VF p = vsplat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  const VI bits = (__builtin_convertvector(n, VI) + 127) << 23;
  VF scale;
  std::memcpy(&scale, &bits, sizeof(scale));  // 2^n from the exponent bits
  return x_in < -87.0f ? VF{} : p * scale;
}

// log1p(e) for e in [0, 1]: 2 atanh(s) with s = e / (2 + e) <= 1/3 (no cancellation for tiny e), atanh(s) / s as a
// least-squares polynomial in s^2 on [0, 1/9] (relative error 4e-9)
inline V<float> log1p_unit(V<float> e) {
  const V<float> s = e / (e + 2.0f);
  const V<float> s2 = s * s;
  V<float> p = vsplat(0.14087337058759930f);
  p = p * s2 + 0.13980716953724046f;
  p = p * s2 + 0.20012425430112160f;
  p = p * s2 + 0.33333158036528754f;
  p = p * s2 + 1.0000000039310584f;
  return (s + s) * p;
}

// W values from p converted to the accumulation type; `count` < W of them (the rest 0) at a row's end
template <typename T, typename scalar_t>
inline V<T> load_converted(const scalar_t* p, int64_t count) {
  constexpr int W = Vec<T>::W;
  if constexpr (std::is_same_v<scalar_t, T>) {
    if (count == W) return vload(p);
  }
  T tmp[W] = {};
  for (int64_t i = 0; i < count; ++i) tmp[i] = static_cast<T>(p[i]);
  return vload(tmp);
}

// U vectors at once: the polynomials are chains of dependent operations, so independent vectors side by side
// keep the FMA units busy
template <int U, typename scalar_t>
inline void softplus_vectors(const scalar_t* src, int64_t count, float* dst, float* sig) {
  using VF = V<float>;
  using VI = Vec<float>::itype;
  constexpr int W = Vec<float>::W;
  const float threshold = static_cast<float>(kSoftplusThreshold);
  const VI sign = VI{} + static_cast<int32_t>(0x80000000u);
  VF a[U], e[U];
  for (int u = 0; u < U; ++u) {
    a[u] = load_converted<float>(src + u * W, std::min<int64_t>(W, count - u * W));
    VI bits;
    std::memcpy(&bits, &a[u], sizeof(bits));
    bits |= sign;  // -|a|
    VF neg_abs;
    std::memcpy(&neg_abs, &bits, sizeof(bits));
    e[u] = exp_nonpositive(neg_abs);
  }
  for (int u = 0; u < U; ++u) {
    const VF pos = a[u] > 0.0f ? a[u] : VF{};
    vstore(dst + u * W, a[u] > threshold ? a[u] : pos + log1p_unit(e[u]));
  }
  if (sig) {
    for (int u = 0; u < U; ++u) {
      const VF inv = 1.0f / (e[u] + 1.0f);
      const VF s = a[u] >= 0.0f ? inv : e[u] * inv;
      vstore(sig + u * W, a[u] > threshold ? vsplat(1.0f) : s);
    }
  }
}

// Loads of a tile read `rows` short runs of positions a whole row apart: more concurrent streams than the hardware
// prefetchers follow, so each load waited on memory (on an AVX-512 Xeon, 40 % of the forward sat on the first
// load of each run). A tile's loader asks for the same rows' next `len` positions (the next tile in a thread's
// position order) while it works on this one; prefetches past the row's end stop at n. The stores of a tile's
// results likewise ask for the next run's output lines (kWrite: the write hint, which is prefetcht0 in these builds,
// as PRFCHW is not among the flags; it measured 15-25 % off the CTAM forward and backward at 120x160 all the same).
template <bool kWrite = false, typename scalar_t>
inline void prefetch_next_run(const scalar_t* row, int64_t n, int64_t lo, int64_t len) {
  constexpr int64_t kLine = 64 / sizeof(scalar_t);
  for (int64_t t = lo + len; t < std::min(n, lo + 2 * len); t += kLine) __builtin_prefetch(row + t, kWrite ? 1 : 0);
}

// dst[r*ld + t] = softplus(src[r*n + lo + t]) and sig[r*ld + t] = its derivative (if sig is given), the
// threshold-20 rule, for r < rows and t < len; up to the next multiple of W, softplus(0)
template <typename scalar_t>
void load_softplus(const scalar_t* src, int64_t rows, int64_t n, int64_t lo, int64_t len, float* dst, float* sig,
                   int64_t ld) {
  constexpr int W = Vec<float>::W, U = 4;
  for (int64_t r = 0; r < rows; ++r) {
    prefetch_next_run(src + r * n, n, lo, len);
    const scalar_t* s = src + r * n + lo;
    float* o = dst + r * ld;
    float* g = sig ? sig + r * ld : nullptr;
    int64_t t = 0;
    for (; t + U * W <= len; t += U * W) softplus_vectors<U>(s + t, U * W, o + t, g ? g + t : nullptr);
    for (; t < len; t += W) softplus_vectors<1>(s + t, std::min<int64_t>(W, len - t), o + t, g ? g + t : nullptr);
  }
}

// fp64 (gradcheck) uses the exact library functions of the shared header
template <typename scalar_t>
void load_softplus(const scalar_t* src, int64_t rows, int64_t n, int64_t lo, int64_t len, double* dst, double* sig,
                   int64_t ld) {
  const int64_t tp = round_up(len, Vec<double>::W);
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t t = 0; t < tp; ++t) {
      const double x = t < len ? static_cast<double>(src[r * n + lo + t]) : 0.0;
      if (sig) sig[r * ld + t] = softplus_grad(x);
      dst[r * ld + t] = softplus(x);
    }
  }
}

// ---------------------------------------------------------------- blocking
// f(std::integral_constant<int, r>) for a run-time r in [1, R]
template <int R, typename F>
inline void with_constant(int64_t r, F&& f) {
  if constexpr (R > 1) {
    if (r < R) return with_constant<R - 1>(r, f);
  }
  f(std::integral_constant<int, R>{});
}

// rows of one block for blocks NV vectors wide: as many as the accumulator registers allow
template <int NV> constexpr int block_rows() { return std::max(1, kAccumulators / NV); }

// f(R, r0) over blocks of rows r0 .. r0+R-1 that split `rows` evenly into blocks of at most RB rows (37 rows in
// blocks of 6 are 6,6,6,5,5,5,4: no 1-row block whose accumulators wait on each other)
template <int RB, typename F>
inline void row_blocks(int64_t rows, F&& f) {
  if (rows <= 0) return;
  const int64_t n = (rows + RB - 1) / RB, base = rows / n, extra = rows % n;
  int64_t r0 = 0;
  for (int64_t b = 0; b < n; ++b) {
    const int64_t r = base + (b < extra ? 1 : 0);
    with_constant<RB>(r, [&](auto R) { f(R, r0); });
    r0 += r;
  }
}

// f(NV, c0) over blocks of NV vectors that cover n (a multiple of the vector width): widest blocks, then the tail
template <typename T, typename F>
inline void vector_blocks(int64_t n, F&& f) {
  constexpr int W = Vec<T>::W;
  int64_t c0 = 0;
  for (; c0 + kMaxVectors * W <= n; c0 += kMaxVectors * W) f(std::integral_constant<int, kMaxVectors>{}, c0);
  if (c0 < n) with_constant<kMaxVectors>((n - c0) / W, [&](auto NV) { f(NV, c0); });
}

// ---------------------------------------------------------------- the matrix product
// O[r*ldo + 0:NV*W] (+)= sum_{k < K} A[r*ar + k*ac] * Y[k*ldy + 0:NV*W] for r < R: R x NV vectors of O in registers,
// per k one broadcast of A per row and NV vector loads of Y
template <typename T, int R, int NV, bool kAccumulate>
inline void gemm_block(const T* A, int64_t ar, int64_t ac, int64_t K, const T* Y, int64_t ldy, T* O, int64_t ldo) {
  constexpr int W = Vec<T>::W;
  V<T> acc[R][NV];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = kAccumulate ? vload(O + r * ldo + v * W) : vsplat(T(0));
  for (int64_t k = 0; k < K; ++k) {
    V<T> y[NV];
    for (int v = 0; v < NV; ++v) y[v] = vload(Y + k * ldy + v * W);
    for (int r = 0; r < R; ++r) {
      const T a = A[r * ar + k * ac];
      for (int v = 0; v < NV; ++v) acc[r][v] += a * y[v];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) vstore(O + r * ldo + v * W, acc[r][v]);
}

// The left operand of a product, read in place: element (r, k) at A[r*ar + k*ac]. Used where A is a tile of data
// read once (the reductions over positions); blocks as many rows as the registers allow.
template <typename T>
struct Strided {
  const T* A;
  int64_t ar, ac;
  template <int NV> static constexpr int rows() { return block_rows<NV>(); }
  const T* block(int64_t r0, int /*R*/, int64_t* row_stride, int64_t* k_stride) const {
    *row_stride = ar;
    *k_stride = ac;
    return A + r0 * ar;
  }
};

// The left operand packed by pack(): each block of R rows stored k-major, so that the kernel reads it as one
// sequential stream. Used for the small matrices (S, S^T, dS, dS^T) that every tile of positions reads again.
template <typename T>
struct Packed {
  const T* P;
  int64_t K;
  template <int NV> static constexpr int rows() { return block_rows<kMaxVectors>(); }  // fixed: the packing's blocks
  const T* block(int64_t r0, int R, int64_t* row_stride, int64_t* k_stride) const {
    *row_stride = 1;
    *k_stride = R;
    return P + r0 * K;
  }
};

// P <- A (element (r, k) at A[r*ar + k*ac], rows x K) in the layout Packed reads
template <typename T>
void pack(const T* A, int64_t rows, int64_t ar, int64_t ac, int64_t K, T* P) {
  row_blocks<block_rows<kMaxVectors>()>(rows, [&](auto r, int64_t r0) {
    constexpr int R = decltype(r)::value;
    for (int64_t k = 0; k < K; ++k)
      for (int i = 0; i < R; ++i) P[r0 * K + k * R + i] = A[(r0 + i) * ar + k * ac];
  });
}

// O[r*ldo + 0:width] (+)= sum_{k < K} a(r, k) * Y[k*ldy + 0:width] for r < rows (width a multiple of W): blocks of
// vectors along O's contiguous axis (positions for an application, channels for a reduction) times blocks of rows
template <bool kAccumulate, typename T, typename Operand>
void gemm(const Operand& a, int64_t rows, int64_t K, const T* Y, int64_t ldy, int64_t width, T* O, int64_t ldo) {
  vector_blocks<T>(width, [&](auto nv, int64_t c0) {
    constexpr int NV = decltype(nv)::value;
    row_blocks<Operand::template rows<NV>()>(rows, [&](auto r, int64_t r0) {
      constexpr int R = decltype(r)::value;
      int64_t ar, ac;
      const T* A = a.block(r0, R, &ar, &ac);
      gemm_block<T, R, NV, kAccumulate>(A, ar, ac, K, Y + c0, ldy, O + r0 * ldo + c0, ldo);
    });
  });
}

// buf[r*ld + t] = src[r*n + lo + t] for r < rows, t < len (converted to the accumulation type); 0 up to the next
// multiple of W, where the products read whole vectors
template <typename scalar_t, typename T>
void load_rows(const scalar_t* src, int64_t rows, int64_t n, int64_t lo, int64_t len, T* buf, int64_t ld) {
  const int64_t tp = round_up(len, Vec<T>::W);
  for (int64_t r = 0; r < rows; ++r) {
    prefetch_next_run(src + r * n, n, lo, len);
    const scalar_t* s = src + r * n + lo;
    T* b = buf + r * ld;
    for (int64_t t = 0; t < len; ++t) b[t] = static_cast<T>(s[t]);
    for (int64_t t = len; t < tp; ++t) b[t] = T(0);
  }
}

// dst[t*ldd + r] = src[r*lds + t] for r < rows, t < len
template <typename T>
void transpose(const T* src, int64_t rows, int64_t lds, int64_t len, T* dst, int64_t ldd) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t t = 0; t < len; ++t) dst[t * ldd + r] = src[r * lds + t];
}

// ---------------------------------------------------------------- geometry shared by forward and backward
struct Geometry {
  int64_t groups, d, m, nq, nk, segments;
  int64_t dp;     // d padded to the vector width: the columns of [tile, dp] buffers and of the partial sums
  int64_t ldp;    // their row stride
  int64_t tile;   // positions per tile (a multiple of the widest block), sized so a work item's buffers fit in L2
  int64_t ld;     // the row stride of [rows, tile] buffers
  int64_t chunk;  // positions per partial sum (a multiple of tile; fixed by the shapes, not the thread count)
  int64_t partial() const { return (m + 1) * ldp; }
};

// A row stride for rows of n values: whole cache lines, an odd number of them, so that walking down a column
// visits every set of the L1 cache (a stride of a power of two lines maps a column onto a few sets and evicts it).
template <typename T>
int64_t row_stride(int64_t n) {
  int64_t lines = std::max<int64_t>(1, round_up(n * static_cast<int64_t>(sizeof(T)), 64) / 64);
  if (lines % 2 == 0) ++lines;
  return lines * 64 / static_cast<int64_t>(sizeof(T));
}

template <typename T>
Geometry geometry(const Tensor& q, const Tensor& v, int64_t nk, int64_t segments) {
  Geometry g;
  g.groups = q.size(0);
  g.d = q.size(1);
  g.nq = q.size(2);
  g.m = v.size(1);
  g.nk = nk;
  g.segments = segments;
  const int64_t widest = kMaxVectors * Vec<T>::W;
  g.dp = round_up(std::max<int64_t>(g.d, 1), Vec<T>::W);
  g.ldp = row_stride<T>(g.dp);
  const int64_t rows = 5 * g.d + 2 * g.m + 1 + g.ldp;  // the backward query pass holds the most
  g.tile = std::clamp<int64_t>((196608 / static_cast<int64_t>(sizeof(T)) / rows) / widest * widest,
                               std::max<int64_t>(128, widest), std::max<int64_t>(512, widest));
  g.tile = std::min(g.tile, round_up(std::max<int64_t>({g.nq, g.nk, 1}), widest));  // no larger than the data
  g.ld = row_stride<T>(g.tile);
  g.chunk = g.tile * std::max<int64_t>(1, 2048 / g.tile);
  return g;
}

struct Span {
  int64_t segment, lo, hi;
};

// the positions of each segment cut into pieces of at most `size`, in segment order
std::vector<Span> cut(const std::vector<int64_t>& offsets, int64_t size, std::vector<int64_t>* first = nullptr) {
  std::vector<Span> spans;
  for (size_t j = 0; j + 1 < offsets.size(); ++j) {
    if (first) first->push_back(static_cast<int64_t>(spans.size()));
    for (int64_t lo = offsets[j]; lo < offsets[j + 1]; lo += size)
      spans.push_back({static_cast<int64_t>(j), lo, std::min(lo + size, offsets[j + 1])});
  }
  if (first) first->push_back(static_cast<int64_t>(spans.size()));
  return spans;
}

// dst[r][c] = sum over the partials, in order, of partial[r][c] (c < d of a row of ldp)
template <typename T>
void sum_partials(const T* partials, int64_t count, int64_t stride, const Geometry& g, T* dst, int64_t ld_dst) {
  for (int64_t r = 0; r <= g.m; ++r)
    for (int64_t c = 0; c < g.d; ++c) dst[r * ld_dst + c] = T(0);
  for (int64_t i = 0; i < count; ++i) {
    const T* p = partials + i * stride;
    for (int64_t r = 0; r <= g.m; ++r)
      for (int64_t c = 0; c < g.d; ++c) dst[r * ld_dst + c] += p[r * g.ldp + c];
  }
}

// ---------------------------------------------------------------- forward
template <typename scalar_t, typename T>
void forward_kernel(const Geometry& g, const std::vector<int64_t>& offsets, const scalar_t* q, const scalar_t* k,
                    const scalar_t* v, scalar_t* out, T* context) {
  constexpr int W = Vec<T>::W;
  const int64_t d = g.d, m = g.m, J = g.segments, tile = g.tile, ld = g.ld, dp = g.dp, ldp = g.ldp;
  // 1. reduction over source positions: S and z of each (group, segment) from partials per chunk
  std::vector<int64_t> first;
  const std::vector<Span> chunks = cut(offsets, g.chunk, &first);
  const int64_t n_chunks = static_cast<int64_t>(chunks.size());
  Scratch<T> partial(g.groups * n_chunks * g.partial());
  at::parallel_for(0, g.groups * n_chunks, 1, [&](int64_t begin, int64_t end) {
    Scratch<T> k_s(d * ld), k_t(tile * ldp, /*zeroed: columns d..dp stay 0*/ true), v_ext((m + 1) * ld);
    for (int64_t t = 0; t < tile; ++t) v_ext.get()[m * ld + t] = T(1);  // the ones row gives z
    for (int64_t item = begin; item < end; ++item) {
      const int64_t grp = item / n_chunks;
      const Span& ch = chunks[item % n_chunks];
      T* acc = partial.get() + item * g.partial();
      std::fill(acc, acc + g.partial(), T(0));
      for (int64_t lo = ch.lo; lo < ch.hi; lo += tile) {
        const int64_t len = std::min(tile, ch.hi - lo);
        load_softplus(k + grp * d * g.nk, d, g.nk, lo, len, k_s.get(), static_cast<T*>(nullptr), ld);
        transpose(k_s.get(), d, ld, len, k_t.get(), ldp);
        load_rows(v + grp * m * g.nk, m, g.nk, lo, len, v_ext.get(), ld);
        gemm<true>(Strided<T>{v_ext.get(), ld, 1}, m + 1, len, k_t.get(), ldp, dp, acc, ldp);
      }
    }
  });
  const int64_t ctx_size = (m + 1) * d;
  Scratch<T> ctx_p(g.groups * J * ctx_size);  // [S; z] of each (group, segment), packed for the application
  at::parallel_for(0, g.groups * J, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t grp = item / J, j = item % J;
      sum_partials(partial.get() + (grp * n_chunks + first[j]) * g.partial(), first[j + 1] - first[j], g.partial(),
                   g, context + item * ctx_size, d);
      pack(context + item * ctx_size, m + 1, d, 1, d, ctx_p.get() + item * ctx_size);
    }
  });
  // 2. application over query positions: the query tile is read and activated once for all segments
  const int64_t n_tiles = (g.nq + tile - 1) / tile;
  at::parallel_for(0, g.groups * n_tiles, 1, [&](int64_t begin, int64_t end) {
    Scratch<T> q_s(d * ld), o((m + 1) * ld), rden(tile);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t grp = item / n_tiles, lo = (item % n_tiles) * tile, len = std::min(tile, g.nq - lo);
      const int64_t tp = round_up(len, W);
      load_softplus(q + grp * d * g.nq, d, g.nq, lo, len, q_s.get(), static_cast<T*>(nullptr), ld);
      for (int64_t j = 0; j < J; ++j) {
        gemm<false>(Packed<T>{ctx_p.get() + (grp * J + j) * ctx_size, d}, m + 1, d, q_s.get(), ld, tp, o.get(), ld);
        for (int64_t t = 0; t < len; ++t) rden.get()[t] = T(1) / clamp_den(o.get()[m * ld + t]);
        scalar_t* dst = out + ((grp * J + j) * m) * g.nq + lo;
        for (int64_t i = 0; i < m; ++i) {
          prefetch_next_run<true>(dst + i * g.nq - lo, g.nq, lo, len);
          for (int64_t t = 0; t < len; ++t)
            dst[i * g.nq + t] = static_cast<scalar_t>(o.get()[i * ld + t] * rden.get()[t]);
        }
      }
    }
  });
}

// ---------------------------------------------------------------- backward
// For the tp positions of a tile: den = z . q, rden = 1 / max(den, eps) and b = -(u . q) / max(den, eps)^2 with
// u = S^T g, zero where the clamp is active. (u . q / den = g . out: the S^T g form, which needs no saved `out`.)
template <typename T>
void backward_scalars(const T* q_s, const T* u, const T* z, int64_t d, int64_t ld, int64_t tp, T* den, T* uq, T* rden,
                      T* b) {
  std::fill(den, den + tp, T(0));
  std::fill(uq, uq + tp, T(0));
  for (int64_t c = 0; c < d; ++c) {
    const T* qc = q_s + c * ld;
    const T* uc = u + c * ld;
    for (int64_t t = 0; t < tp; ++t) {
      den[t] += z[c] * qc[t];
      uq[t] += uc[t] * qc[t];
    }
  }
  for (int64_t t = 0; t < tp; ++t) {
    const T r = T(1) / clamp_den(den[t]);
    rden[t] = r;
    b[t] = den_passes_grad(den[t]) ? -uq[t] * r * r : T(0);
  }
}

// the buffers of one thread of the query pass, for one tile of positions
template <typename T>
struct QueryScratch {
  Scratch<T> q_s, sig, q_t, g_b, u, x_a, dq_acc, den, uq, rden;
  explicit QueryScratch(const Geometry& g)
      : q_s(g.d * g.ld), sig(g.d * g.ld), q_t(g.tile * g.ldp, /*zeroed: columns d..dp stay 0*/ true),
        g_b(g.m * g.ld), u(g.d * g.ld), x_a((g.m + 1) * g.ld), dq_acc(g.d * g.ld), den(g.tile), uq(g.tile),
        rden(g.tile) {}
};

// One segment's terms of the query tile lo..lo+len (q_s, q_t loaded): dq_acc += u / den + b z (before the softplus
// factor), and acc += the tile's share of dS = sum_p a_p q_p^T with a = g / den (rows 0..m-1) and dz = sum_p b_p q_p
// (row m). grad, s_t and z are the segment's.
template <typename scalar_t, typename T>
void query_tile_segment(const Geometry& g, const scalar_t* grad, const T* s_t, const T* z, int64_t lo, int64_t len,
                        QueryScratch<T>& s, T* acc) {
  const int64_t d = g.d, m = g.m, ld = g.ld, tp = round_up(len, Vec<T>::W);
  load_rows(grad, m, g.nq, lo, len, s.g_b.get(), ld);
  gemm<false>(Packed<T>{s_t, m}, d, m, s.g_b.get(), ld, tp, s.u.get(), ld);  // u = S^T g
  T* b = s.x_a.get() + m * ld;  // b is the last row of the reduction's left operand [a; b]
  const T* rden = s.rden.get();
  backward_scalars(s.q_s.get(), s.u.get(), z, d, ld, tp, s.den.get(), s.uq.get(), s.rden.get(), b);
  for (int64_t c = 0; c < d; ++c) {
    T* dq = s.dq_acc.get() + c * ld;
    const T* uc = s.u.get() + c * ld;
    for (int64_t t = 0; t < tp; ++t) dq[t] += uc[t] * rden[t] + b[t] * z[c];
  }
  for (int64_t i = 0; i < m; ++i)
    for (int64_t t = 0; t < tp; ++t) s.x_a.get()[i * ld + t] = s.g_b.get()[i * ld + t] * rden[t];
  gemm<true>(Strided<T>{s.x_a.get(), ld, 1}, m + 1, len, s.q_t.get(), g.ldp, g.dp, acc, g.ldp);
}

// 1. query pass: dq, and partial dS (rows 0..m-1) and dz (row m) of each segment per chunk of query positions, in
// partial [groups, n_chunks, J] of g.partial() each. The query tile is read and activated once for all segments.
template <typename scalar_t, typename T>
void query_pass(const Geometry& g, const scalar_t* grad, const scalar_t* q, const T* context, const T* s_t,
                int64_t n_chunks, T* partial, scalar_t* dq) {
  const int64_t d = g.d, m = g.m, J = g.segments, ld = g.ld, part = g.partial(), ctx_size = (m + 1) * d;
  at::parallel_for(0, g.groups * n_chunks, 1, [&](int64_t begin, int64_t end) {
    QueryScratch<T> s(g);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t grp = item / n_chunks, chunk_lo = (item % n_chunks) * g.chunk;
      const int64_t chunk_hi = std::min(chunk_lo + g.chunk, g.nq);
      std::fill(partial + item * J * part, partial + (item + 1) * J * part, T(0));
      for (int64_t lo = chunk_lo; lo < chunk_hi; lo += g.tile) {
        const int64_t len = std::min(g.tile, chunk_hi - lo);
        load_softplus(q + grp * d * g.nq, d, g.nq, lo, len, s.q_s.get(), s.sig.get(), ld);
        transpose(s.q_s.get(), d, ld, len, s.q_t.get(), g.ldp);
        std::fill(s.dq_acc.get(), s.dq_acc.get() + d * ld, T(0));
        for (int64_t j = 0; j < J; ++j) {
          const int64_t gj = grp * J + j;
          query_tile_segment(g, grad + gj * m * g.nq, s_t + gj * d * m, context + gj * ctx_size + m * d, lo, len, s,
                             partial + (item * J + j) * part);
        }
        for (int64_t c = 0; c < d; ++c) {
          scalar_t* dst = dq + (grp * d + c) * g.nq + lo;
          prefetch_next_run<true>(dst - lo, g.nq, lo, len);
          for (int64_t t = 0; t < len; ++t)
            dst[t] = static_cast<scalar_t>(s.dq_acc.get()[c * ld + t] * s.sig.get()[c * ld + t]);
        }
      }
    }
  });
}

// dS and dz of each (group, segment) summed from the query pass's partials into d_ctx, and dS^T and dS packed
template <typename T>
void sum_backward_context(const Geometry& g, const T* partial, int64_t n_chunks, T* d_ctx, T* ds_t, T* ds_p) {
  const int64_t d = g.d, m = g.m, J = g.segments, part = g.partial();
  at::parallel_for(0, g.groups * J, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t grp = item / J, j = item % J;
      sum_partials(partial + (grp * n_chunks * J + j) * part, n_chunks, J * part, g, d_ctx + item * part, g.ldp);
      pack(d_ctx + item * part, d, 1, g.ldp, m, ds_t + item * d * m);
      pack(d_ctx + item * part, m, g.ldp, 1, d, ds_p + item * m * d);
    }
  });
}

// 2. source pass: dk = (dS^T v + dz) * sigmoid(kp), dv = dS k, tile by tile within each segment
template <typename scalar_t, typename T>
void source_pass(const Geometry& g, const std::vector<int64_t>& offsets, const scalar_t* k, const scalar_t* v,
                 const T* d_ctx, const T* ds_t, const T* ds_p, scalar_t* dk, scalar_t* dv) {
  constexpr int W = Vec<T>::W;
  const int64_t d = g.d, m = g.m, J = g.segments, ld = g.ld, part = g.partial();
  const std::vector<Span> tiles = cut(offsets, g.tile);
  const int64_t n_tiles = static_cast<int64_t>(tiles.size());
  at::parallel_for(0, g.groups * n_tiles, 1, [&](int64_t begin, int64_t end) {
    Scratch<T> k_s(d * ld), sig(d * ld), v_b(m * ld), dk_t(d * ld), dv_t(m * ld);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t grp = item / n_tiles;
      const Span& sp = tiles[item % n_tiles];
      const int64_t lo = sp.lo, len = sp.hi - sp.lo, tp = round_up(len, W);
      const int64_t packed = (grp * J + sp.segment) * d * m;
      const T* dz = d_ctx + (grp * J + sp.segment) * part + m * g.ldp;
      load_softplus(k + grp * d * g.nk, d, g.nk, lo, len, k_s.get(), sig.get(), ld);
      load_rows(v + grp * m * g.nk, m, g.nk, lo, len, v_b.get(), ld);
      gemm<false>(Packed<T>{ds_t + packed, m}, d, m, v_b.get(), ld, tp, dk_t.get(), ld);  // dS^T v
      gemm<false>(Packed<T>{ds_p + packed, d}, m, d, k_s.get(), ld, tp, dv_t.get(), ld);  // dS k
      for (int64_t c = 0; c < d; ++c) {
        scalar_t* dst = dk + (grp * d + c) * g.nk + lo;
        prefetch_next_run<true>(dst - lo, g.nk, lo, len);
        for (int64_t t = 0; t < len; ++t)
          dst[t] = static_cast<scalar_t>((dk_t.get()[c * ld + t] + dz[c]) * sig.get()[c * ld + t]);
      }
      for (int64_t i = 0; i < m; ++i) {
        scalar_t* dst = dv + (grp * m + i) * g.nk + lo;
        prefetch_next_run<true>(dst - lo, g.nk, lo, len);
        for (int64_t t = 0; t < len; ++t) dst[t] = static_cast<scalar_t>(dv_t.get()[i * ld + t]);
      }
    }
  });
}

template <typename scalar_t, typename T>
void backward_kernel(const Geometry& g, const std::vector<int64_t>& offsets, const scalar_t* grad, const scalar_t* q,
                     const scalar_t* k, const scalar_t* v, const T* context, scalar_t* dq, scalar_t* dk,
                     scalar_t* dv) {
  const int64_t d = g.d, m = g.m, J = g.segments, ctx_size = (m + 1) * d, part = g.partial();
  Scratch<T> s_t(g.groups * J * d * m);  // S^T of each (group, segment), packed for u = S^T g
  at::parallel_for(0, g.groups * J, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item)
      pack(context + item * ctx_size, d, 1, d, m, s_t.get() + item * d * m);
  });
  const int64_t n_chunks = (g.nq + g.chunk - 1) / g.chunk;
  Scratch<T> partial(g.groups * n_chunks * J * part);
  query_pass(g, grad, q, context, s_t.get(), n_chunks, partial.get(), dq);
  Scratch<T> d_ctx(g.groups * J * part), ds_t(g.groups * J * d * m), ds_p(g.groups * J * m * d);
  sum_backward_context(g, partial.get(), n_chunks, d_ctx.get(), ds_t.get(), ds_p.get());
  source_pass(g, offsets, k, v, d_ctx.get(), ds_t.get(), ds_p.get(), dk, dv);
}

// ---------------------------------------------------------------- cores
std::tuple<Tensor, Tensor> forward(const Tensor& q, const Tensor& k, const Tensor& v,
                                   const std::vector<int64_t>& offsets) {
  const int64_t J = static_cast<int64_t>(offsets.size()) - 1;
  const int64_t groups = q.size(0), d = q.size(1), nq = q.size(2), m = v.size(1);
  Tensor out = at::empty({groups, J, m, nq}, q.options());
  Tensor context = at::empty({groups, J, m + 1, d}, q.options().dtype(accumulation_dtype(q.scalar_type())));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "fused_mtl_attn_forward_cpu", [&] {
    using T = accumulation_t<scalar_t>;
    const Geometry g = geometry<T>(q, v, k.size(2), J);
    forward_kernel<scalar_t, T>(g, offsets, q.const_data_ptr<scalar_t>(), k.const_data_ptr<scalar_t>(),
                                v.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(),
                                context.mutable_data_ptr<T>());
  });
  return {out, context};
}

std::tuple<Tensor, Tensor, Tensor> backward(const Tensor& grad, const Tensor& q, const Tensor& k, const Tensor& v,
                                            const Tensor& context, const std::vector<int64_t>& offsets) {
  const int64_t J = static_cast<int64_t>(offsets.size()) - 1;
  Tensor dq = at::empty_like(q), dk = at::empty_like(k), dv = at::empty_like(v);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "fused_mtl_attn_backward_cpu", [&] {
    using T = accumulation_t<scalar_t>;
    const Geometry g = geometry<T>(q, v, k.size(2), J);
    backward_kernel<scalar_t, T>(g, offsets, grad.const_data_ptr<scalar_t>(), q.const_data_ptr<scalar_t>(),
                                 k.const_data_ptr<scalar_t>(), v.const_data_ptr<scalar_t>(),
                                 context.const_data_ptr<T>(), dq.mutable_data_ptr<scalar_t>(),
                                 dk.mutable_data_ptr<scalar_t>(), dv.mutable_data_ptr<scalar_t>());
  });
  return {dq, dk, dv};
}

}  // namespace

#include "cross_entropy_kernels.h"
#include "batch_norm_relu_kernels.h"
#include "window_attention_kernels.h"
#include "batch_norm_channels_last_kernels.h"
#include "upsample_rows_kernels.h"

extern const CpuKernels kernels = {&forward,     &backward,     &upsampled_ce_forward, &upsampled_ce_backward,
                                   &bnr_forward, &bnr_backward, &wa_forward,          &wa_backward,
                                   &bnl_forward, &bnl_backward, &upsample_rows_forward, &upsample_rows_backward};

}  // namespace FMA_CPU_ISA
}  // namespace fused_mtl_attn
