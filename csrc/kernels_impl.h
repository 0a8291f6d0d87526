// Kernel bodies, included once per instruction set by kernels_<isa>.cpp inside
// `namespace scvi_fast { namespace <isa> {`. Everything here must be
// self-contained (no includes, no torch); the includer provides <cmath>,
// <cstdint>, <cstring> and <omp.h> before any target pragma.
//
// Precision: the dense passes run in the input precision T with per-block
// partial sums in T and block totals in double; per-cell sums, the
// per-gene px_r gradient and every non-zero term (lgamma / digamma of counts up
// to 2^24 and beyond) are accumulated and evaluated in double. sparse_linear
// accumulates in T (as torch's matmul does); reparam_kl sums its Z terms in T.

// ---------------------------------------------------------------------------
// Small helpers
// ---------------------------------------------------------------------------

template <typename T>
static inline T min_(T a, T b) { return b < a ? b : a; }
template <typename T>
static inline T max_(T a, T b) { return a < b ? b : a; }

// Below this many inner-loop elements a parallel region costs more than it saves.
static constexpr int64_t kMinParallel = 1 << 16;

// Contiguous [begin, end) share of n items for thread `tid` of `nt`.
static inline void thread_range(int64_t n, int tid, int nt, int64_t& begin, int64_t& end) {
  begin = n * tid / nt;
  end = n * (tid + 1) / nt;
}

// exp and log for the dense float passes: branch-free Cephes polynomials that
// the compiler vectorises (libm calls would not be; the selects below only
// if-convert with -fno-trapping-math, which the build sets). exp: relative error below
// 2 ulp on [-87.3, 88], exactly 0 below -87.3 and clamped above 88 (the softmax
// only evaluates arguments <= 0). log: below 2 ulp for positive normal finite
// inputs, which is all it is called on (theta + mu + eps >= 1e-8, 1 + count,
// exp(raw) + 1e-4).
static inline float vexp(float x) {
  const float lo = -87.33654475f, hi = 88.0f;
  float xc = x > hi ? hi : x;
  xc = xc < lo ? lo : xc;
  // n = round(x / ln 2) by adding and removing 1.5 * 2^23 (|x / ln 2| < 2^22
  // here): plain arithmetic, so the loop stays branch-free and vectorises.
  float nf = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  float r = xc - nf * 0.693359375f;
  r = r - nf * -2.12194440e-4f;
  float y = 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * (r * r) + r + 1.0f;
  int32_t bits = (static_cast<int32_t>(nf) + 127) << 23;
  float res = y * __builtin_bit_cast(float, bits);
  return x < lo ? 0.0f : res;
}

static inline float vlog(float x) {
  int32_t bits = __builtin_bit_cast(int32_t, x);
  int32_t e = (bits >> 23) - 126;  // x = m * 2^e, m in [0.5, 1)
  float m = __builtin_bit_cast(float, (bits & 0x007fffff) | 0x3f000000);
  bool small = m < 0.707106781186547524f;
  float ef = static_cast<float>(small ? e - 1 : e);
  m = small ? m + m - 1.0f : m - 1.0f;
  float z = m * m;
  float y = 7.0376836292e-2f;
  y = y * m - 1.1514610310e-1f;
  y = y * m + 1.1676998740e-1f;
  y = y * m - 1.2420140846e-1f;
  y = y * m + 1.4249322787e-1f;
  y = y * m - 1.6668057665e-1f;
  y = y * m + 2.0000714765e-1f;
  y = y * m - 2.4999993993e-1f;
  y = y * m + 3.3333331174e-1f;
  y = y * m * z;
  y += ef * -2.12194440e-4f;
  y += -0.5f * z;
  float res = m + y;
  return res + ef * 0.693359375f;
}

// log1p(v) = log(u) - ((u - 1) - v) / u with u = 1 + v: the correction term
// restores the bits lost in forming u, so small v keeps full relative accuracy.
static inline float vlog1p(float v) {
  float u = 1.0f + v;
  return vlog(u) - ((u - 1.0f) - v) / u;
}

// float64 is the validation precision: plain libm.
static inline double vexp(double x) { return std::exp(x); }
static inline double vlog(double x) { return std::log(x); }
static inline double vlog1p(double x) { return std::log1p(x); }

// ---------------------------------------------------------------------------
// lgamma and digamma in double for z > 0.
//
// Shift z up to >= 8 with the recurrences lgamma(z) = lgamma(z + n) - log prod
// and psi(z) = psi(z + n) - sum 1/(z + k), keeping the product p and its
// derivative dp so that the sum is dp / p (one log and one division in all),
// then use the Stirling series (truncation error < 1e-14 at z = 8).
// ---------------------------------------------------------------------------

static constexpr double kHalfLog2Pi = 0.91893853320467274178;

static inline double stirling_lgamma(double z, double lz, double iz) {
  double iz2 = iz * iz;
  double s = 1.0 / 12 + iz2 * (-1.0 / 360 + iz2 * (1.0 / 1260 + iz2 * (-1.0 / 1680 +
             iz2 * (1.0 / 1188 + iz2 * (-691.0 / 360360)))));
  return (z - 0.5) * lz - z + kHalfLog2Pi + iz * s;
}

static inline double stirling_digamma(double lz, double iz) {
  double iz2 = iz * iz;
  double s = 1.0 / 12 - iz2 * (1.0 / 120 - iz2 * (1.0 / 252 - iz2 * (1.0 / 240 -
             iz2 * (1.0 / 132 - iz2 * (691.0 / 32760)))));
  return lz - 0.5 * iz - iz2 * s;
}

static inline double lgamma_pos(double z) {
  double p = 1.0;
  while (z < 8.0) {
    p *= z;
    z += 1.0;
  }
  double lg = stirling_lgamma(z, std::log(z), 1.0 / z);
  return p != 1.0 ? lg - std::log(p) : lg;
}

static inline void lgamma_digamma_pos(double z, double& lg, double& dg) {
  double p = 1.0, dp = 0.0;
  while (z < 8.0) {
    dp = dp * z + p;
    p *= z;
    z += 1.0;
  }
  double lz = std::log(z), iz = 1.0 / z;
  lg = stirling_lgamma(z, lz, iz);
  dg = stirling_digamma(lz, iz);
  if (p != 1.0) {
    lg -= std::log(p);
    dg -= dp / p;
  }
}

// lgamma(x + 1) for counts: a table for small integers (the common case).
static constexpr int kLgammaTable = 1024;

static const double* lgamma1p_table() {
  static const double* table = [] {
    double* t = new double[kLgammaTable];
    t[0] = 0.0;
    for (int i = 1; i < kLgammaTable; ++i) t[i] = t[i - 1] + std::log(static_cast<double>(i));
    return t;
  }();
  return table;
}

static inline double lgamma1p_count(double x, const double* table) {
  if (x < kLgammaTable && x == static_cast<double>(static_cast<int64_t>(x))) {
    return table[static_cast<int64_t>(x)];
  }
  return lgamma_pos(x + 1.0);
}

// lgamma(x + t) - lgamma(t) and psi(x + t) - psi(t) for a count x > 0, given
// the per-gene lgamma(t) and psi(t). Small integer counts (the bulk of any
// count matrix) use lgamma(x + t) - lgamma(t) = log prod_{k<x} (t + k) and
// psi(x + t) - psi(t) = sum_{k<x} 1/(t + k) = dp / p: one log and one division,
// exact up to rounding and free of the cancellation between two lgammas.
static constexpr double kSmallCount = 16.0;

template <bool DIGAMMA>
static inline void count_gamma_diff(double x, double t, double lg_t, double dg_t, double& lg,
                                    double& dg) {
  if (x <= kSmallCount && x == static_cast<double>(static_cast<int64_t>(x)) && t < 1e15) {
    double p = t, dp = 1.0;
    for (double k = 1.0; k < x; k += 1.0) {
      const double tk = t + k;
      dp = dp * tk + p;
      p *= tk;
    }
    lg = std::log(p);
    if (DIGAMMA) dg = dp / p;
  } else if (DIGAMMA) {
    lgamma_digamma_pos(x + t, lg, dg);
    lg -= lg_t;
    dg -= dg_t;
  } else {
    lg = lgamma_pos(x + t) - lg_t;
  }
}

// ---------------------------------------------------------------------------
// sparse_linear
//
// Forward: y_r = b + W_cov[cov_r] + sum_{j in row r} f(v_j) W[g_j, :]
// (W gene-major, so each stored value adds a contiguous H-vector).
// Backward: dW[g, :] = sum_{(r, g) stored} f(v) dy[r, :].
//
// Both are memory-bound gathers of H-vectors (2 KB per stored value at H = 512
// in float32), so the loop orders are chosen for cache reuse:
// * forward, per block of rows whose indices are sorted (canonical CSR): W swept
//   in L2-sized tiles of genes, each row summing its entries of the tile into a
//   register chunk of the output, so the output row is touched once per tile,
//   not once per stored value (sl_fwd_block_sorted);
// * forward, any other block: entries transposed by gene, W read once per block
//   in gene order, the block's output rows kept in L2 (sl_fwd_block);
// * backward, over a transposed copy of the whole batch (a parallel counting
//   sort): tasks own a column chunk of kBwdVecs vectors of dW, keep it in
//   registers while summing a gene's entries, and sweep genes, so the chunk's
//   slice of dy stays in L2 and every dW element is written once, by one thread.
// ---------------------------------------------------------------------------

template <typename T>
static inline void transform_values(const T* v, int64_t n, int transform, T* out) {
  if (transform == kLog1p) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) out[i] = vlog1p(v[i]);
  } else {
    for (int64_t i = 0; i < n; ++i) out[i] = v[i];
  }
}

// 32-byte vectors through GCC/Clang vector extensions: AVX registers in the
// AVX2 build, pairs of SSE registers in the baseline build.
template <typename T>
struct Vec {
  typedef T type __attribute__((vector_size(32)));
  static constexpr int L = 32 / sizeof(T);
};

template <typename V, typename T>
static inline V vload(const T* p) {
  V v;
  __builtin_memcpy(&v, p, sizeof(V));
  return v;
}

template <typename V, typename T>
static inline void vstore(T* p, V v) {
  __builtin_memcpy(p, &v, sizeof(V));
}

#ifndef SCVI_FAST_BWD_VECS
#define SCVI_FAST_BWD_VECS 8
#endif
static constexpr int kBwdVecs = SCVI_FAST_BWD_VECS;  // backward chunk: 64 floats / 32 doubles
static constexpr int64_t kFwdRows = 256;             // forward row block: 512 KB of output at H = 512
static constexpr int64_t kFwdRowsSorted = 512;       // row block of the sorted-row forward

// out[0:n] = sum_k f[k] * src[k][0:n] (+ init), for the ragged right edge of H
// (a column chunk narrower than kBwdVecs vectors).
template <typename T>
static inline void gather_tail(T* out, int64_t n, const T* init0, const T* init1, int64_t cnt,
                               const T* f, const T* const* src) {
  T acc[kBwdVecs * 32 / sizeof(T)];
  for (int64_t h = 0; h < n; ++h) {
    acc[h] = (init0 != nullptr ? init0[h] : T(0)) + (init1 != nullptr ? init1[h] : T(0));
  }
  for (int64_t k = 0; k < cnt; ++k) {
    const T fk = f[k];
    const T* s = src[k];
    for (int64_t h = 0; h < n; ++h) acc[h] += fk * s[h];
  }
  for (int64_t h = 0; h < n; ++h) out[h] = acc[h];
}

// y_r = b + W_cov[cov_r] for rows [r0, r1); returns the number of covariate codes out of range.
template <typename T>
static int64_t sl_fwd_init_rows(int64_t r0, int64_t r1, int64_t H, const T* b, const int64_t* cov,
                                int64_t K, const T* W_cov, T* y) {
  int64_t bad = 0;
  for (int64_t r = r0; r < r1; ++r) {
    T* __restrict yr = y + r * H;
    const T* wc = nullptr;
    if (W_cov != nullptr) {
      const int64_t c = cov[r];
      if (c >= 0 && c < K) wc = W_cov + c * H; else ++bad;
    }
    for (int64_t h = 0; h < H; ++h) {
      yr[h] = (b != nullptr ? b[h] : T(0)) + (wc != nullptr ? wc[h] : T(0));
    }
  }
  return bad;
}

// Counting-sort placement: each entry of rows [r0, r1) whose gene g is in range goes to
// slot pos[g]++ (pos[g] starts at the gene's first free slot), as its row id and its
// transformed value; entries of a gene keep their row order.
template <typename T, typename I>
static void scatter_by_gene(int64_t r0, int64_t r1, int64_t G, const int64_t* indptr,
                            const I* indices, const T* values, int transform, int64_t* pos,
                            int32_t* rid, T* fv) {
  T fbuf[256];
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t p1 = indptr[r + 1];
    for (int64_t c0 = indptr[r]; c0 < p1; c0 += 256) {
      const int64_t n = min_<int64_t>(256, p1 - c0);
      transform_values(values + c0, n, transform, fbuf);
      for (int64_t j = 0; j < n; ++j) {
        const int64_t g = static_cast<int64_t>(indices[c0 + j]);
        if (g < 0 || g >= G) continue;
        const int64_t at = pos[g]++;
        rid[at] = static_cast<int32_t>(r);
        fv[at] = fbuf[j];
      }
    }
  }
}

// Forward, one block of rows: transpose the block's entries by gene (counting
// sort), then walk the genes in order, so W is read once per block, front to
// back, while the block's output rows (kFwdRows x H) stay in L2 and take the
// axpys. Row-major order would instead fetch a random 2 KB row of W from memory
// for every stored value.
template <typename T, typename I>
static int64_t sl_fwd_block(int64_t r0, int64_t r1, int64_t G, int64_t H, const int64_t* indptr,
                            const I* indices, const T* values, int transform, const T* W,
                            const T* b, const int64_t* cov, int64_t K, const T* W_cov, T* y,
                            int64_t* cnt, int32_t* rid, T* fv) {
  int64_t bad = sl_fwd_init_rows<T>(r0, r1, H, b, cov, K, W_cov, y);
  for (int64_t g = 0; g <= G; ++g) cnt[g] = 0;
  for (int64_t j = indptr[r0]; j < indptr[r1]; ++j) {
    const int64_t g = static_cast<int64_t>(indices[j]);
    if (g >= 0 && g < G) ++cnt[g + 1]; else ++bad;
  }
  for (int64_t g = 0; g < G; ++g) cnt[g + 1] += cnt[g];
  scatter_by_gene<T, I>(r0, r1, G, indptr, indices, values, transform, cnt, rid, fv);
  // cnt[g] is now the end of gene g's entries (and the start of gene g + 1's).
  int64_t k = 0;
  for (int64_t g = 0; g < G; ++g) {
    const int64_t k1 = cnt[g];
    const T* __restrict w = W + g * H;
    for (; k < k1; ++k) {
      T* __restrict yr = y + static_cast<int64_t>(rid[k]) * H;
      const T fk = fv[k];
#pragma omp simd
      for (int64_t h = 0; h < H; ++h) yr[h] += fk * w[h];
    }
  }
  return bad;
}

// Forward, one block of rows whose indices are sorted within each row (the
// canonical CSR that stores and AnnData hold): genes are swept in tiles of
// fwd_tile_genes(H) rows of W (a tile stays in L2); within a tile each row
// accumulates its entries into a 64-float / 32-double chunk held in registers,
// chunk by chunk across H, so the output row is read and written once per tile
// rather than once per stored value, and W comes from L2. A cursor per row
// remembers where the row's entries of the next tile begin.
template <typename T>
static inline int64_t fwd_tile_genes(int64_t H) {
  const int64_t bytes = 192 * 1024;  // with the block's output rows streaming beside it
  return max_<int64_t>(8, bytes / max_<int64_t>(1, H * static_cast<int64_t>(sizeof(T))));
}

template <typename I>
static bool sl_rows_sorted(int64_t r0, int64_t r1, int64_t G, const int64_t* indptr,
                           const I* indices) {
  for (int64_t r = r0; r < r1; ++r) {
    int64_t prev = 0;
    for (int64_t j = indptr[r]; j < indptr[r + 1]; ++j) {
      const int64_t g = static_cast<int64_t>(indices[j]);
      if (g < prev || g >= G) return false;
      prev = g;
    }
  }
  return true;
}

template <typename T, typename I>
static void sl_fwd_block_sorted(int64_t r0, int64_t r1, int64_t G, int64_t H,
                                const int64_t* indptr, const I* indices, const T* values,
                                int transform, const T* W, T* y, int64_t* cur, T* fv) {
  typedef typename Vec<T>::type V;
  constexpr int L = Vec<T>::L;
  constexpr int NV = kBwdVecs;
  constexpr int64_t CW = NV * L;
  const int64_t base = indptr[r0];
  const int64_t nnz = indptr[r1] - base;
  for (int64_t c0 = 0; c0 < nnz; c0 += 4096) {
    transform_values(values + base + c0, min_<int64_t>(4096, nnz - c0), transform, fv + c0);
  }
  for (int64_t r = r0; r < r1; ++r) cur[r - r0] = indptr[r];
  const int64_t tile = fwd_tile_genes<T>(H);
  for (int64_t t0 = 0; t0 < G; t0 += tile) {
    const int64_t t1 = min_(G, t0 + tile);
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t j0 = cur[r - r0], p1 = indptr[r + 1];
      int64_t j1 = j0;
      while (j1 < p1 && static_cast<int64_t>(indices[j1]) < t1) ++j1;
      cur[r - r0] = j1;
      if (j1 == j0) continue;
      T* __restrict yr = y + r * H;
      const I* idx = indices + j0;
      const T* f = fv + (j0 - base);
      const int64_t n = j1 - j0;
      int64_t h0 = 0;
      for (; h0 + CW <= H; h0 += CW) {
        V acc[NV];
        for (int v = 0; v < NV; ++v) acc[v] = vload<V>(yr + h0 + v * L);
        const T* w0 = W + h0;
        for (int64_t k = 0; k < n; ++k) {
          const T* w = w0 + static_cast<int64_t>(idx[k]) * H;
          const V fk = V{} + f[k];
          for (int v = 0; v < NV; ++v) acc[v] += fk * vload<V>(w + v * L);
        }
        for (int v = 0; v < NV; ++v) vstore(yr + h0 + v * L, acc[v]);
      }
      if (h0 < H) {  // ragged right edge, narrower than one register chunk
        const int64_t tw = H - h0;
        T acc[CW];
        for (int64_t h = 0; h < tw; ++h) acc[h] = yr[h0 + h];
        for (int64_t k = 0; k < n; ++k) {
          const T* w = W + static_cast<int64_t>(idx[k]) * H + h0;
          const T fk = f[k];
          for (int64_t h = 0; h < tw; ++h) acc[h] += fk * w[h];
        }
        for (int64_t h = 0; h < tw; ++h) yr[h0 + h] = acc[h];
      }
    }
  }
}

template <typename T, typename I>
int64_t sparse_linear_fwd(int64_t B, int64_t G, int64_t H, const int64_t* indptr,
                          const I* indices, const T* values, int transform, const T* W,
                          const T* b, const int64_t* cov, int64_t K, const T* W_cov, T* y,
                          int n_threads) {
  const int nt = n_threads > 0 ? n_threads : 1;
  // Blocks of at most kFwdRowsSorted rows, at least one per thread. A block whose rows
  // are not all sorted (or hold an index out of range) goes through the transposing
  // kernel in sub-blocks of kFwdRows rows, whose outputs fit in L2.
  const int64_t rows = max_<int64_t>(1, min_<int64_t>(kFwdRowsSorted, (B + nt - 1) / nt));
  const int64_t n_blocks = (B + rows - 1) / rows;
  int64_t max_nnz = 0;
  for (int64_t i = 0; i < n_blocks; ++i) {
    max_nnz = max_(max_nnz, indptr[min_(B, (i + 1) * rows)] - indptr[i * rows]);
  }
  int64_t bad = 0;
#pragma omp parallel num_threads(nt) reduction(+ : bad) if (n_blocks > 1)
  {
    int64_t* cnt = new int64_t[max_(G, rows) + 1];
    int32_t* rid = new int32_t[max_nnz > 0 ? max_nnz : 1];
    T* fv = new T[max_nnz > 0 ? max_nnz : 1];
#pragma omp for schedule(dynamic, 1)
    for (int64_t i = 0; i < n_blocks; ++i) {
      const int64_t r0 = i * rows, r1 = min_(B, (i + 1) * rows);
      if (sl_rows_sorted<I>(r0, r1, G, indptr, indices)) {
        bad += sl_fwd_init_rows<T>(r0, r1, H, b, cov, K, W_cov, y);
        sl_fwd_block_sorted<T, I>(r0, r1, G, H, indptr, indices, values, transform, W, y, cnt,
                                  fv);
        continue;
      }
      for (int64_t s0 = r0; s0 < r1; s0 += kFwdRows) {
        bad += sl_fwd_block<T, I>(s0, min_(r1, s0 + kFwdRows), G, H, indptr, indices, values,
                                  transform, W, b, cov, K, W_cov, y, cnt, rid, fv);
      }
    }
    delete[] fv;
    delete[] rid;
    delete[] cnt;
  }
  return bad;
}

// One column chunk [h0, h0 + width) of dW for genes [g0, g1): dW[g, chunk] is summed in
// registers over the gene's entries, reading row r's chunk of dy at src + r * ld.
template <typename T>
static void sl_bwd_tile(int64_t g0, int64_t g1, int64_t width, int64_t H, const int64_t* colptr,
                        const int32_t* rowid, const T* fval, const T* src, int64_t ld, T* dW,
                        const T** scratch) {
  typedef typename Vec<T>::type V;
  constexpr int L = Vec<T>::L;
  constexpr int NV = kBwdVecs;
  for (int64_t g = g0; g < g1; ++g) {
    const int64_t k0 = colptr[g], k1 = colptr[g + 1];
    if (width < NV * L) {
      for (int64_t k = k0; k < k1; ++k) scratch[k - k0] = src + static_cast<int64_t>(rowid[k]) * ld;
      gather_tail(dW + g * H, width, static_cast<const T*>(nullptr),
                  static_cast<const T*>(nullptr), k1 - k0, fval + k0, scratch);
      continue;
    }
    V acc[NV];
    for (int v = 0; v < NV; ++v) acc[v] = V{} + T(0);
    for (int64_t k = k0; k < k1; ++k) {
      const T* d = src + static_cast<int64_t>(rowid[k]) * ld;
      const V fk = V{} + fval[k];
      for (int v = 0; v < NV; ++v) acc[v] += fk * vload<V>(d + v * L);
    }
    for (int v = 0; v < NV; ++v) vstore(dW + g * H + v * L, acc[v]);
  }
}

// dy (B x H, row-major) copied chunk-major: chunk c (columns [c * cw, c * cw + w_c)) is a
// contiguous B x w_c block at out + c * B * cw. Reading one chunk of every row of dy in
// place strides by H floats, a power of two at the usual widths, so the rows' chunks all
// land in a few cache sets and evict each other; the copy makes each chunk's slice one
// contiguous array that stays in L2 while the gene loop reads it.
template <typename T>
static void chunk_major(int64_t B, int64_t H, int64_t cw, const T* dy, T* out, int nt) {
  const int64_t n_chunks = (H + cw - 1) / cw;
#pragma omp parallel for num_threads(nt) schedule(static) collapse(2) if (B * H > kMinParallel)
  for (int64_t c = 0; c < n_chunks; ++c) {
    for (int64_t r = 0; r < B; ++r) {
      const int64_t h0 = c * cw, w = min_(cw, H - h0);
      std::memcpy(out + c * B * cw + r * w, dy + r * H + h0, static_cast<size_t>(w) * sizeof(T));
    }
  }
}

// First index k in [lo, hi] with off[k] >= target (off non-decreasing): splits rows or
// genes into ranges of about equal numbers of entries.
static inline int64_t lower_bound_off(const int64_t* off, int64_t lo, int64_t hi, int64_t target) {
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (off[mid] < target) lo = mid + 1; else hi = mid;
  }
  return lo;
}

template <typename T, typename I>
int64_t sparse_linear_bwd_w(int64_t B, int64_t G, int64_t H, const int64_t* indptr,
                            const I* indices, const T* values, int transform, const T* dy,
                            T* dW, int n_threads) {
  const int64_t nnz = indptr[B];
  const int nt = n_threads > 0 ? n_threads : 1;
  int64_t bad = 0;
  const int64_t chunk = kBwdVecs * Vec<T>::L;
  T* dyc = H > chunk && nnz > 0 ? new T[static_cast<size_t>(B) * H] : nullptr;
  if (dyc != nullptr) chunk_major(B, H, chunk, dy, dyc, n_threads);
  // The batch's entries transposed by gene (a parallel counting sort: each thread counts
  // and then places the entries of its own rows, so every entry is read once), then each
  // thread sums a range of genes, so every dW row is written once, by one thread, without
  // races. Entries of a gene stay in row order, so the sums do not depend on the threads.
  int64_t* colptr = new int64_t[G + 1];
  int64_t* cnt = new int64_t[static_cast<size_t>(nt) * (G > 0 ? G : 1)];
  int32_t* rowid = new int32_t[nnz > 0 ? nnz : 1];
  T* fval = new T[nnz > 0 ? nnz : 1];
#pragma omp parallel num_threads(nt) reduction(+ : bad) if (nnz * H > kMinParallel)
  {
    const int tid = omp_get_thread_num();
    const int nth = omp_get_num_threads();
    const int64_t r0 = lower_bound_off(indptr, 0, B, nnz * tid / nth);
    const int64_t r1 = tid + 1 == nth ? B : lower_bound_off(indptr, 0, B, nnz * (tid + 1) / nth);
    int64_t* mine = cnt + static_cast<size_t>(tid) * G;
    for (int64_t g = 0; g < G; ++g) mine[g] = 0;
    for (int64_t j = indptr[r0]; j < indptr[r1]; ++j) {
      const int64_t g = static_cast<int64_t>(indices[j]);
      if (g >= 0 && g < G) ++mine[g]; else ++bad;
    }
#pragma omp barrier
#pragma omp single
    {
      int64_t run = 0;
      for (int64_t g = 0; g < G; ++g) {
        colptr[g] = run;
        for (int t = 0; t < nth; ++t) {
          const int64_t c = cnt[static_cast<size_t>(t) * G + g];
          cnt[static_cast<size_t>(t) * G + g] = run;
          run += c;
        }
      }
      colptr[G] = run;
    }  // implicit barrier: mine[g] is now where this thread's entries of gene g go
    scatter_by_gene<T, I>(r0, r1, G, indptr, indices, values, transform, mine, rowid, fval);
#pragma omp barrier
    const int64_t placed = colptr[G];
    const int64_t g0 = lower_bound_off(colptr, 0, G, placed * tid / nth);
    const int64_t g1 = tid + 1 == nth ? G : lower_bound_off(colptr, 0, G, placed * (tid + 1) / nth);
    int64_t max_col = 0;
    for (int64_t g = g0; g < g1; ++g) max_col = max_(max_col, colptr[g + 1] - colptr[g]);
    const T** scratch = new const T*[max_col > 0 ? max_col : 1];
    for (int64_t h0 = 0; h0 < H; h0 += chunk) {
      const int64_t w = min_(chunk, H - h0);
      const T* src = dyc != nullptr ? dyc + (h0 / chunk) * B * chunk : dy + h0;
      sl_bwd_tile<T>(g0, g1, w, H, colptr, rowid, fval, src, dyc != nullptr ? w : H, dW + h0,
                     scratch);
    }
    delete[] scratch;
  }
  delete[] fval;
  delete[] rowid;
  delete[] cnt;
  delete[] colptr;
  delete[] dyc;
  return bad;
}

// ---------------------------------------------------------------------------
// nb_softmax_loglik
//
// Per cell b (row), with rho = softmax(logits_b), mu_g = exp(l_b) rho_g,
// theta_g = exp(px_r_g), x_g the counts and eps the floor:
//
//   L_b = sum_g theta (log(theta+eps) - log(theta+mu+eps))               (dense)
//       + sum_{x_g>0} x (log(mu+eps) - log(theta+mu+eps))
//                     + lgamma(x+theta) - lgamma(theta) - lgamma(x+1)    (non-zeros)
//
// The lgamma terms cancel exactly at x = 0, so they only run over the non-zeros.
// Gradients (eps kept exactly): dL/dmu = x/(mu+eps) - (theta+x)/(theta+mu+eps);
// with a_g = mu_g dL/dmu_g = x mu/(mu+eps) - (theta+x) mu/(theta+mu+eps) and
// dmu_g/dlogit_k = mu_g (delta_gk - rho_k):
//
//   dL/dlogit_k = a_k - rho_k A,   A = sum_g a_g = dL/dl
//   dL/dpx_r_g  = theta dL/dtheta = theta [log(theta+eps) - log(theta+mu+eps)
//                 + theta/(theta+eps) - (theta+x)/(theta+mu+eps)
//                 + psi(x+theta) - psi(theta)]
//
// Row passes: (1) max of the logits; (2) e_g = exp(logit_g - max) into the
// row buffer, s = sum e; (3) one dense pass with one log and one division per
// entry for the x = 0 parts of the loss, A and the px_r gradient; (4) the
// non-zero corrections in double; (5) the logit gradient a_g - rho_g A written
// over the buffer, plus the non-zero corrections of a_g.
// ---------------------------------------------------------------------------

static constexpr int64_t kBlock = 512;

// The softmax denominator of one row of G >= 1 logits: mx = max_g lg[g] and
// s = sum_g exp(lg[g] - mx), the exps summed in T per block of kBlock and the blocks in
// double; with STORE the exps are written to e.
template <typename T, bool STORE>
static inline double row_exp_sum(const T* __restrict lg, int64_t G, T* __restrict e, T& mx) {
  T m = lg[0];
#pragma omp simd reduction(max : m)
  for (int64_t g = 0; g < G; ++g) m = lg[g] > m ? lg[g] : m;
  double s = 0.0;
  for (int64_t g0 = 0; g0 < G; g0 += kBlock) {
    const int64_t g1 = min_(G, g0 + kBlock);
    T sb = T(0);
#pragma omp simd reduction(+ : sb)
    for (int64_t g = g0; g < g1; ++g) {
      const T v = vexp(lg[g] - m);
      if (STORE) e[g] = v;
      sb += v;
    }
    s += static_cast<double>(sb);
  }
  mx = m;
  return s;
}
// Counts 1..kCountTable (most of the non-zeros of a count matrix) take their lgamma and
// digamma differences from a per-gene table.
static constexpr int kCountTable = 4;

template <typename T, typename I, bool GRAD, bool THETA>
static int64_t nb_rows(const NbArgs<T, I>& a, const T* theta, const T* log_te, const T* c_theta,
                       const double* theta_d, const double* lgamma_t, const double* digamma_t,
                       const double* small_lg, const double* small_dg,
                       double* theta_acc_all, double* col_acc_all, int64_t max_row) {
  const int64_t B = a.B, G = a.G;
  const T eps = static_cast<T>(a.eps);
  const double eps_d = a.eps;
  const double* table = lgamma1p_table();
  int64_t bad = 0;
#pragma omp parallel num_threads(a.n_threads) reduction(+ : bad) if (B * G > kMinParallel)
  {
    const int tid = omp_get_thread_num();
    double* theta_acc = THETA ? theta_acc_all + static_cast<size_t>(tid) * G : nullptr;
    double* col_acc = col_acc_all != nullptr ? col_acc_all + static_cast<size_t>(tid) * G : nullptr;
    T* scratch = a.grad_logits == nullptr ? new T[G > 0 ? G : 1] : nullptr;
    double* da = new double[max_row > 0 ? max_row : 1];
#pragma omp for schedule(dynamic, 4)
    for (int64_t r = 0; r < B; ++r) {
      const T* __restrict lg = a.logits + r * G;
      T* __restrict buf = a.grad_logits != nullptr ? a.grad_logits + r * G : scratch;
      const T w = a.row_weight != nullptr ? a.row_weight[r] : T(1);

      T mx;
      const double s = row_exp_sum<T, true>(lg, G, buf, mx);
      const double l = static_cast<double>(a.log_library[r]);
      const double scale_d = std::exp(l - std::log(s));  // mu_g = scale e_g
      const T scale = static_cast<T>(scale_d);

      double loss = 0.0, A = 0.0;
      for (int64_t g0 = 0; g0 < G; g0 += kBlock) {
        const int64_t g1 = min_(G, g0 + kBlock);
        T lb = T(0), ab = T(0);
#pragma omp simd reduction(+ : lb, ab)
        for (int64_t g = g0; g < g1; ++g) {
          const T t = theta[g];
          const T m = scale * buf[g];
          const T tme = t + m + eps;
          const T lt = vlog(tme);
          lb += t * (log_te[g] - lt);
          if (GRAD || THETA) {
            const T rinv = T(1) / tme;
            if (GRAD) ab -= t * m * rinv;
            if (THETA) theta_acc[g] += static_cast<double>(w * (c_theta[g] - t * (lt + t * rinv)));
          }
        }
        loss += static_cast<double>(lb);
        A += static_cast<double>(ab);
      }

      const int64_t p0 = a.indptr[r], n = a.indptr[r + 1] - p0;
      for (int64_t j = 0; j < n; ++j) {
        da[j] = 0.0;
        const int64_t g = static_cast<int64_t>(a.indices[p0 + j]);
        if (g < 0 || g >= G) { ++bad; continue; }
        const double x = static_cast<double>(a.values[p0 + j]);
        if (x == 0.0) continue;
        const double t = theta_d[g];
        const double m = scale_d * static_cast<double>(buf[g]);
        const double u = m + eps_d, tme = t + u, rinv = 1.0 / tme;
        double lgd, dgd = 0.0;
        const int64_t xi = static_cast<int64_t>(x);
        if (x >= 1.0 && x <= kCountTable && x == static_cast<double>(xi)) {
          lgd = small_lg[g * kCountTable + xi - 1];
          if (THETA) dgd = small_dg[g * kCountTable + xi - 1];
        } else {
          count_gamma_diff<THETA>(x, t, lgamma_t[g], THETA ? digamma_t[g] : 0.0, lgd, dgd);
        }
        // x (log(mu+eps) - log(theta+mu+eps)) with one log of the ratio.
        loss += x * std::log(u * rinv) + lgd - lgamma1p_count(x, table);
        if (GRAD) {
          // x mu/(mu+eps) - x mu/(theta+mu+eps) = x mu theta / ((mu+eps)(theta+mu+eps))
          const double d = x * m * t * rinv / u;
          da[j] = d;
          A += d;
        }
        if (THETA) theta_acc[g] += static_cast<double>(w) * t * (dgd - x * rinv);
      }

      a.loglik[r] = static_cast<T>(loss);
      if (a.sum_a != nullptr) a.sum_a[r] = static_cast<T>(A);
      if (GRAD && a.grad_logits != nullptr) {
        const T At = static_cast<T>(A);
        const T inv_s = static_cast<T>(1.0 / s);
#pragma omp simd
        for (int64_t g = 0; g < G; ++g) {
          const T e = buf[g];
          const T t = theta[g];
          const T m = scale * e;
          buf[g] = -t * m / (t + m + eps) - (e * inv_s) * At;
        }
        for (int64_t j = 0; j < n; ++j) {
          const int64_t g = static_cast<int64_t>(a.indices[p0 + j]);
          if (g >= 0 && g < G) buf[g] += static_cast<T>(da[j]);
        }
        if (col_acc != nullptr) {
#pragma omp simd
          for (int64_t g = 0; g < G; ++g) col_acc[g] += static_cast<double>(buf[g]);
        }
      }
    }
    delete[] da;
    delete[] scratch;
  }
  return bad;
}

// out[g] = sum over the nt per-thread rows of part (nt x G, double), rounded to T once.
template <typename T>
static void sum_thread_rows(const double* part, int nt, int64_t G, T* out) {
#pragma omp parallel for num_threads(nt) schedule(static) if (G * nt > kMinParallel)
  for (int64_t g = 0; g < G; ++g) {
    double s = 0.0;
    for (int t = 0; t < nt; ++t) s += part[static_cast<size_t>(t) * G + g];
    out[g] = static_cast<T>(s);
  }
}

template <typename T, typename I>
int64_t nb_softmax_loglik_fwd(const NbArgs<T, I>& a) {
  const int64_t B = a.B, G = a.G;
  if (G == 0) {
    for (int64_t r = 0; r < B; ++r) {
      a.loglik[r] = T(0);
      if (a.sum_a != nullptr) a.sum_a[r] = T(0);
    }
    return 0;
  }
  const bool grad = a.grad_logits != nullptr || a.sum_a != nullptr;
  const bool want_theta = a.grad_px_r != nullptr;
  const int nt = a.n_threads > 0 ? a.n_threads : 1;

  // Per-gene terms, once: theta in T (as the reference rounds it) and in double.
  T* theta = new T[G];
  T* log_te = new T[G];
  T* c_theta = new T[G];
  double* theta_d = new double[G];
  double* lgamma_t = new double[G];
  double* digamma_t = want_theta ? new double[G] : nullptr;
  // The count terms of the commonest counts, x = 1..kCountTable, per gene (the same
  // count_gamma_diff calls the row loop would make, once per gene instead of once per entry).
  double* small_lg = new double[static_cast<size_t>(G) * kCountTable];
  double* small_dg = want_theta ? new double[static_cast<size_t>(G) * kCountTable] : nullptr;
#pragma omp parallel for num_threads(nt) schedule(static) if (G > 2048)
  for (int64_t g = 0; g < G; ++g) {
    const T t = static_cast<T>(std::exp(static_cast<double>(a.px_r[g])));
    const double td = static_cast<double>(t);
    const double lte = std::log(td + a.eps);
    theta[g] = t;
    theta_d[g] = td;
    log_te[g] = static_cast<T>(lte);
    // dL/dpx_r at x = 0 is c_theta - theta (log(theta+mu+eps) + theta/(theta+mu+eps)).
    c_theta[g] = static_cast<T>(td * (lte + td / (td + a.eps)));
    if (want_theta) lgamma_digamma_pos(td, lgamma_t[g], digamma_t[g]);
    else lgamma_t[g] = lgamma_pos(td);
    for (int k = 0; k < kCountTable; ++k) {
      double lg, dg = 0.0;
      if (want_theta) count_gamma_diff<true>(k + 1.0, td, lgamma_t[g], digamma_t[g], lg, dg);
      else count_gamma_diff<false>(k + 1.0, td, lgamma_t[g], 0.0, lg, dg);
      small_lg[g * kCountTable + k] = lg;
      if (want_theta) small_dg[g * kCountTable + k] = dg;
    }
  }
  int64_t max_row = 0;
  for (int64_t r = 0; r < B; ++r) max_row = max_(max_row, a.indptr[r + 1] - a.indptr[r]);
  double* acc = want_theta ? new double[static_cast<size_t>(nt) * G]() : nullptr;
  const bool want_colsum = a.grad_colsum != nullptr && a.grad_logits != nullptr;
  double* col = want_colsum ? new double[static_cast<size_t>(nt) * G]() : nullptr;
  lgamma1p_table();  // build outside the parallel region

  int64_t bad;
  if (grad && want_theta) bad = nb_rows<T, I, true, true>(a, theta, log_te, c_theta, theta_d, lgamma_t, digamma_t, small_lg, small_dg, acc, col, max_row);
  else if (grad) bad = nb_rows<T, I, true, false>(a, theta, log_te, c_theta, theta_d, lgamma_t, digamma_t, small_lg, small_dg, acc, col, max_row);
  else if (want_theta) bad = nb_rows<T, I, false, true>(a, theta, log_te, c_theta, theta_d, lgamma_t, digamma_t, small_lg, small_dg, acc, col, max_row);
  else bad = nb_rows<T, I, false, false>(a, theta, log_te, c_theta, theta_d, lgamma_t, digamma_t, small_lg, small_dg, acc, col, max_row);

  if (want_theta) sum_thread_rows<T>(acc, nt, G, a.grad_px_r);
  if (want_colsum) sum_thread_rows<T>(col, nt, G, a.grad_colsum);
  delete[] col;
  delete[] acc;
  delete[] small_dg;
  delete[] small_lg;
  delete[] digamma_t;
  delete[] lgamma_t;
  delete[] theta_d;
  delete[] c_theta;
  delete[] log_te;
  delete[] theta;
  return bad;
}

// ---------------------------------------------------------------------------
// reparam_kl
//
// q_v = exp(raw) + var_eps, z = q_m + sqrt(q_v) eps, KL_b = 0.5 sum (q_v + q_m^2 - 1 - log q_v)
// dq_m = dz + dKL q_m;  dq_v_raw = exp(raw) [dz eps / (2 sqrt(q_v)) + dKL (1 - 1/q_v) / 2]
// ---------------------------------------------------------------------------

// Elementwise and small (B x Z), so parallel only for large batches; the float
// loops use the vectorised exp/log above.
static constexpr int64_t kReparamParallel = 1 << 20;

template <typename T>
void reparam_kl_fwd(int64_t B, int64_t Z, const T* q_m, const T* q_v_raw, const T* noise,
                    double var_eps, T* z, T* kl, int n_threads) {
  const T ve = static_cast<T>(var_eps);
#pragma omp parallel for num_threads(n_threads) schedule(static) if (B * Z > kReparamParallel)
  for (int64_t r = 0; r < B; ++r) {
    const int64_t k0 = r * Z;
    T s = T(0);
#pragma omp simd reduction(+ : s)
    for (int64_t k = k0; k < k0 + Z; ++k) {
      const T qv = vexp(q_v_raw[k]) + ve;
      z[k] = q_m[k] + std::sqrt(qv) * noise[k];
      s += qv + q_m[k] * q_m[k] - T(1) - vlog(qv);
    }
    kl[r] = T(0.5) * s;
  }
}

template <typename T>
void reparam_kl_bwd(int64_t B, int64_t Z, const T* q_m, const T* q_v_raw, const T* noise,
                    double var_eps, const T* dz, const T* dkl, T* dq_m, T* dq_v_raw,
                    int n_threads) {
  const T ve = static_cast<T>(var_eps);
#pragma omp parallel for num_threads(n_threads) schedule(static) if (B * Z > kReparamParallel)
  for (int64_t r = 0; r < B; ++r) {
    const T gk = dkl != nullptr ? dkl[r] : T(0);
    const int64_t k0 = r * Z;
    if (dq_m != nullptr) {
#pragma omp simd
      for (int64_t k = k0; k < k0 + Z; ++k) dq_m[k] = (dz != nullptr ? dz[k] : T(0)) + gk * q_m[k];
    }
    if (dq_v_raw != nullptr) {
#pragma omp simd
      for (int64_t k = k0; k < k0 + Z; ++k) {
        const T gz = dz != nullptr ? dz[k] : T(0);
        const T ev = vexp(q_v_raw[k]);
        const T qv = ev + ve;
        dq_v_raw[k] = ev * (gz * noise[k] * (T(0.5) / std::sqrt(qv)) + T(0.5) * gk * (T(1) - T(1) / qv));
      }
    }
  }
}

// ---------------------------------------------------------------------------
// dropout
//
// y_i = x_i * scale where the keep-hash of (seed, i) is >= threshold, else 0. The hash is
// a counter-based 32-bit mixer (two rounds of a lowbias32-style finaliser keyed by the
// two halves of the seed), so the mask is a pure function of (seed, i): the backward
// regenerates it instead of storing it, threads need no shared RNG state, and the loop
// vectorises. P(keep) = 1 - threshold / 2^32.
// ---------------------------------------------------------------------------

static inline uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7feb352dU;
  x ^= x >> 15;
  x *= 0x846ca68bU;
  x ^= x >> 16;
  return x;
}

template <typename T>
void dropout_apply(int64_t n, const T* x, uint64_t seed, uint32_t threshold, double scale,
                   T* y, int n_threads) {
  const uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  const T sc = static_cast<T>(scale);
  constexpr int64_t kChunk = 1 << 14;
  const int64_t n_chunks = (n + kChunk - 1) / kChunk;
#pragma omp parallel for num_threads(n_threads) schedule(static) if (n > kMinParallel)
  for (int64_t c = 0; c < n_chunks; ++c) {
    const int64_t i0 = c * kChunk, i1 = min_(n, i0 + kChunk);
    const uint32_t hi = mix32(static_cast<uint32_t>(static_cast<uint64_t>(i0) >> 32) ^ k1);
#pragma omp simd
    for (int64_t i = i0; i < i1; ++i) {
      const uint32_t h = mix32(mix32(static_cast<uint32_t>(i) ^ k0) + hi);
      y[i] = h >= threshold ? x[i] * sc : T(0);
    }
  }
}

#include "likelihood_impl.h"
