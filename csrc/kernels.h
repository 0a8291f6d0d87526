// Declarations of the CPU kernels of scvi_fast, shared by the binding (ops.cpp)
// and the per-ISA kernel translation units (kernels_generic.cpp, kernels_avx2.cpp).
//
// This header must stay free of torch includes: the ISA translation units are
// compiled with extra target flags and must not instantiate torch's inline code.
// Kernels take raw contiguous pointers and return the number of out-of-range
// indices they met (0 when the input is valid); they skip such entries instead
// of reading out of bounds.
#pragma once

#include <cstdint>

namespace scvi_fast {

enum Transform : int { kIdentity = 0, kLog1p = 1 };

// Arguments of the fused softmax + negative-binomial log-likelihood.
template <typename T, typename I>
struct NbArgs {
  int64_t B = 0;                     // cells (rows)
  int64_t G = 0;                     // genes (columns)
  const T* logits = nullptr;         // (B, G) decoder output before the softmax
  const T* log_library = nullptr;    // (B,) log library size l
  const T* px_r = nullptr;           // (G,) log inverse dispersion, theta = exp(px_r)
  const int64_t* indptr = nullptr;   // (B + 1,) CSR row pointer of the counts
  const I* indices = nullptr;        // (nnz,) gene of each stored count
  const T* values = nullptr;         // (nnz,) stored counts
  double eps = 1e-8;                 // scvi-tools' floor inside the logarithms
  const T* row_weight = nullptr;     // (B,) weights of the px_r gradient; nullptr = 1
  T* loglik = nullptr;               // out (B,): per-cell log-likelihood
  T* grad_logits = nullptr;          // out (B, G) or nullptr: d loglik_b / d logits_b
  T* sum_a = nullptr;                // out (B,) or nullptr: d loglik_b / d l_b
  T* grad_px_r = nullptr;            // out (G,) or nullptr: sum_b w_b d loglik_b / d px_r
  T* grad_colsum = nullptr;          // out (G,) or nullptr: sum_b grad_logits[b, :] (needs
                                     // grad_logits): the bias gradient of a fused output layer
  int n_threads = 1;
};

// Arguments of the fused softmax + zero-inflated NB log-likelihood (NB when dropout is
// nullptr). The gradients are those of loglik_b, weighted by row_weight only where they are
// summed over cells (a (G,) px_r gradient).
template <typename T, typename I>
struct ZinbArgs {
  int64_t B = 0;                     // cells (rows)
  int64_t G = 0;                     // genes (columns)
  const T* logits = nullptr;         // (B, G) decoder output before the softmax
  const T* log_library = nullptr;    // (B,) log library size l
  const T* px_r = nullptr;           // (G,) or (B, G) log inverse dispersion
  bool px_r_rows = false;            // px_r is (B, G)
  const T* dropout = nullptr;        // (B, G) zero-inflation logits, or nullptr: NB
  const int64_t* indptr = nullptr;   // (B + 1,) CSR row pointer of the counts
  const I* indices = nullptr;        // (nnz,) gene of each stored count
  const T* values = nullptr;         // (nnz,) stored counts
  double eps = 1e-8;                 // scvi-tools' floor inside the logarithms
  const T* row_weight = nullptr;     // (B,) weights of a (G,) px_r gradient; nullptr = 1
  T* loglik = nullptr;               // out (B,): per-cell log-likelihood
  T* grad_logits = nullptr;          // out (B, G) or nullptr: d loglik_b / d logits_b
  T* sum_a = nullptr;                // out (B,) or nullptr: d loglik_b / d l_b
  T* grad_px_r = nullptr;            // out, px_r's shape, or nullptr: (B, G) d loglik_b /
                                     // d px_r_b, or (G,) sum_b w_b d loglik_b / d px_r
  T* grad_dropout = nullptr;         // out (B, G) or nullptr: d loglik_b / d dropout_b
  int n_threads = 1;
};

#define SCVI_FAST_DECLARE_KERNELS(NS)                                                     \
  namespace NS {                                                                         \
  template <typename T, typename I>                                                      \
  int64_t sparse_linear_fwd(int64_t B, int64_t G, int64_t H, const int64_t* indptr,       \
                            const I* indices, const T* values, int transform,            \
                            const T* W, const T* b, const int64_t* cov, int64_t K,       \
                            const T* W_cov, T* y, int n_threads);                        \
  template <typename T, typename I>                                                      \
  int64_t sparse_linear_bwd_w(int64_t B, int64_t G, int64_t H, const int64_t* indptr,     \
                              const I* indices, const T* values, int transform,          \
                              const T* dy, T* dW, int n_threads);                        \
  template <typename T, typename I>                                                      \
  int64_t nb_softmax_loglik_fwd(const NbArgs<T, I>& a);                                   \
  template <typename T, typename I>                                                      \
  int64_t zinb_softmax_loglik_fwd(const ZinbArgs<T, I>& a);                               \
  template <typename T, typename I>                                                      \
  int64_t poisson_softmax_loglik_fwd(int64_t B, int64_t G, const T* logits,              \
                                     const T* log_library, const int64_t* indptr,        \
                                     const I* indices, const T* values, T* loglik,       \
                                     T* lse, T* sum_x, int n_threads);                   \
  template <typename T, typename I>                                                      \
  int64_t poisson_softmax_loglik_bwd(int64_t B, int64_t G, const T* logits, const T* lse, \
                                     const T* sum_x, const T* w, const int64_t* indptr,  \
                                     const I* indices, const T* values, T* grad,         \
                                     int n_threads);                                     \
  template <typename T>                                                                  \
  void reparam_kl_fwd(int64_t B, int64_t Z, const T* q_m, const T* q_v_raw,              \
                      const T* noise, double var_eps, T* z, T* kl, int n_threads);        \
  template <typename T>                                                                  \
  void reparam_kl_bwd(int64_t B, int64_t Z, const T* q_m, const T* q_v_raw,              \
                      const T* noise, double var_eps, const T* dz, const T* dkl,         \
                      T* dq_m, T* dq_v_raw, int n_threads);                               \
  template <typename T>                                                                  \
  void dropout_apply(int64_t n, const T* x, uint64_t seed, uint32_t threshold,           \
                     double scale, T* y, int n_threads);                                 \
  }

SCVI_FAST_DECLARE_KERNELS(generic)
SCVI_FAST_DECLARE_KERNELS(avx2)

}  // namespace scvi_fast
