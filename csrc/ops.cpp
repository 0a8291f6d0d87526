// Python binding of the scvi_fast CPU kernels: input validation, output
// allocation, dtype / index-type dispatch and the run-time choice of the
// instruction set. The arithmetic lives in kernels_impl.h.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <cstdint>
#include <optional>
#include <string>

#include "kernels.h"

namespace scvi_fast {
namespace {

// ---------------------------------------------------------------------------
// Instruction-set selection
// ---------------------------------------------------------------------------

bool cpu_has_avx2() {
#if defined(__x86_64__) && defined(__GNUC__)
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
#else
  return false;
#endif
}

// -1: automatic (AVX2 when the CPU has it), 0: baseline, 1: AVX2.
int g_isa_override = -1;

bool use_avx2() { return g_isa_override < 0 ? cpu_has_avx2() : g_isa_override == 1; }

std::string isa() { return use_avx2() ? "avx2" : "generic"; }

void set_isa(const std::string& name) {
  if (name == "auto") {
    g_isa_override = -1;
  } else if (name == "generic") {
    g_isa_override = 0;
  } else if (name == "avx2") {
    TORCH_CHECK(cpu_has_avx2(), "set_isa('avx2'): this CPU lacks AVX2/FMA");
    g_isa_override = 1;
  } else {
    TORCH_CHECK(false, "set_isa: expected 'auto', 'generic' or 'avx2'; got '", name, "'");
  }
}

int n_threads() { return at::get_num_threads(); }

// ---------------------------------------------------------------------------
// Validation helpers
// ---------------------------------------------------------------------------

void check_tensor(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor; got device ",
              t.device(), " (the native back-end is CPU-only)");
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous");
  TORCH_CHECK(t.layout() == at::kStrided, op, ": ", name, " must be a dense (strided) tensor");
}

void check_float(const at::Tensor& t, at::ScalarType dtype, const char* op, const char* name) {
  check_tensor(t, op, name);
  TORCH_CHECK(t.scalar_type() == dtype, op, ": ", name, " must have dtype ", dtype, "; got ",
              t.scalar_type());
}

// Validates a CSR batch of n_rows rows; returns nnz (= indptr[n_rows]).
int64_t check_csr(const at::Tensor& indptr, const at::Tensor& indices, const at::Tensor& values,
                  int64_t n_rows, at::ScalarType dtype, const char* op) {
  check_tensor(indptr, op, "indptr");
  check_tensor(indices, op, "indices");
  check_float(values, dtype, op, "values");
  TORCH_CHECK(indptr.scalar_type() == at::kLong, op, ": indptr must be int64; got ",
              indptr.scalar_type());
  TORCH_CHECK(indices.scalar_type() == at::kLong || indices.scalar_type() == at::kInt, op,
              ": indices must be int32 or int64; got ", indices.scalar_type());
  TORCH_CHECK(indptr.dim() == 1 && indptr.numel() == n_rows + 1, op,
              ": indptr must have shape (", n_rows + 1, ",); got ", indptr.sizes());
  TORCH_CHECK(indices.dim() == 1 && values.dim() == 1 && indices.numel() == values.numel(), op,
              ": indices and values must be 1-D of equal length; got ", indices.sizes(), " and ",
              values.sizes());
  const int64_t* p = indptr.data_ptr<int64_t>();
  TORCH_CHECK(p[0] == 0, op, ": indptr[0] must be 0; got ", p[0]);
  for (int64_t r = 0; r < n_rows; ++r) {
    TORCH_CHECK(p[r + 1] >= p[r], op, ": indptr must be non-decreasing (row ", r, ")");
  }
  // indices / values may be a padded capacity: entries past indptr[-1] are never read
  TORCH_CHECK(p[n_rows] <= indices.numel(), op, ": indptr[-1] = ", p[n_rows],
              " exceeds the length of indices and values ", indices.numel());
  return p[n_rows];
}

void check_bad(int64_t bad, const char* op, const char* what) {
  TORCH_CHECK(bad == 0, op, ": ", bad, " ", what, " out of range");
}

// Calls fn(indices pointer) with the pointer of the CSR indices' type (int32 or int64).
template <typename F>
void with_indices(const at::Tensor& indices, F&& fn) {
  if (indices.scalar_type() == at::kInt) fn(indices.data_ptr<int32_t>());
  else fn(indices.data_ptr<int64_t>());
}

// Validates the (B, G) float32 / float64 logits and the (B,) log library (or another per-cell
// input, named lib_name) of a likelihood op.
void check_logits_library(const at::Tensor& logits, const at::Tensor& log_library,
                          const char* op, const char* lib_name = "log_library") {
  check_tensor(logits, op, "logits");
  const auto dtype = logits.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble, op,
              ": logits must be float32 or float64; got ", dtype);
  TORCH_CHECK(logits.dim() == 2, op, ": logits must be (B, G); got ", logits.sizes());
  check_float(log_library, dtype, op, lib_name);
  TORCH_CHECK(log_library.numel() == logits.size(0), op, ": ", lib_name, " must have ",
              logits.size(0), " elements; got shape ", log_library.sizes());
}

// ---------------------------------------------------------------------------
// sparse_linear
// ---------------------------------------------------------------------------

at::Tensor sparse_linear_forward(const at::Tensor& indptr, const at::Tensor& indices,
                                 const at::Tensor& values, const at::Tensor& W,
                                 const std::optional<at::Tensor>& b,
                                 const std::optional<at::Tensor>& cov,
                                 const std::optional<at::Tensor>& W_cov, int64_t transform) {
  const char* op = "sparse_linear";
  check_tensor(W, op, "W");
  TORCH_CHECK(W.scalar_type() == at::kFloat || W.scalar_type() == at::kDouble, op,
              ": W must be float32 or float64; got ", W.scalar_type());
  TORCH_CHECK(W.dim() == 2, op, ": W must be (G, H); got ", W.sizes());
  TORCH_CHECK(transform == kIdentity || transform == kLog1p, op, ": unknown transform code ",
              transform);
  const auto dtype = W.scalar_type();
  const int64_t G = W.size(0), H = W.size(1);
  const int64_t B = indptr.numel() - 1;
  TORCH_CHECK(B >= 0, op, ": indptr must have at least one element");
  check_csr(indptr, indices, values, B, dtype, op);
  if (b.has_value()) {
    check_float(*b, dtype, op, "b");
    TORCH_CHECK(b->dim() == 1 && b->numel() == H, op, ": b must have shape (", H, ",); got ",
                b->sizes());
  }
  TORCH_CHECK(cov.has_value() == W_cov.has_value(), op,
              ": cov and W_cov must be given together");
  int64_t K = 0;
  if (W_cov.has_value()) {
    check_float(*W_cov, dtype, op, "W_cov");
    TORCH_CHECK(W_cov->dim() == 2 && W_cov->size(1) == H, op, ": W_cov must be (K, ", H,
                "); got ", W_cov->sizes());
    check_tensor(*cov, op, "cov");
    TORCH_CHECK(cov->scalar_type() == at::kLong, op, ": cov must be int64; got ",
                cov->scalar_type());
    TORCH_CHECK(cov->numel() == B, op, ": cov must have ", B, " elements; got ", cov->numel());
    K = W_cov->size(0);
  }
  at::Tensor y = at::empty({B, H}, W.options());
  if (B == 0 || H == 0) return y;
  int64_t bad = 0;
  AT_DISPATCH_FLOATING_TYPES(dtype, "sparse_linear_forward", [&] {
    using T = scalar_t;
    const T* bp = b.has_value() ? b->data_ptr<T>() : nullptr;
    const int64_t* cp = cov.has_value() ? cov->data_ptr<int64_t>() : nullptr;
    const T* wcp = W_cov.has_value() ? W_cov->data_ptr<T>() : nullptr;
    auto run = [&](auto* idx) {
      using I = std::remove_const_t<std::remove_pointer_t<decltype(idx)>>;
      auto fn = use_avx2() ? &avx2::sparse_linear_fwd<T, I> : &generic::sparse_linear_fwd<T, I>;
      bad = fn(B, G, H, indptr.data_ptr<int64_t>(), idx, values.data_ptr<T>(),
               static_cast<int>(transform), W.data_ptr<T>(), bp, cp, K, wcp, y.data_ptr<T>(),
               n_threads());
    };
    if (indices.scalar_type() == at::kInt) run(indices.data_ptr<int32_t>());
    else run(indices.data_ptr<int64_t>());
  });
  check_bad(bad, op, "gene indices or covariate codes");
  return y;
}

at::Tensor sparse_linear_backward_weight(const at::Tensor& indptr, const at::Tensor& indices,
                                         const at::Tensor& values, const at::Tensor& dy,
                                         int64_t n_genes, int64_t transform) {
  const char* op = "sparse_linear backward";
  check_tensor(dy, op, "grad_output");
  TORCH_CHECK(dy.scalar_type() == at::kFloat || dy.scalar_type() == at::kDouble, op,
              ": grad_output must be float32 or float64; got ", dy.scalar_type());
  TORCH_CHECK(dy.dim() == 2, op, ": grad_output must be (B, H); got ", dy.sizes());
  TORCH_CHECK(transform == kIdentity || transform == kLog1p, op, ": unknown transform code ",
              transform);
  const int64_t B = dy.size(0), H = dy.size(1), G = n_genes;
  TORCH_CHECK(B < (int64_t(1) << 31), op, ": at most 2^31 - 1 rows per batch");
  check_csr(indptr, indices, values, B, dy.scalar_type(), op);
  at::Tensor dW = at::empty({G, H}, dy.options());
  if (G == 0 || H == 0) return dW;
  int64_t bad = 0;
  AT_DISPATCH_FLOATING_TYPES(dy.scalar_type(), "sparse_linear_backward_weight", [&] {
    using T = scalar_t;
    auto run = [&](auto* idx) {
      using I = std::remove_const_t<std::remove_pointer_t<decltype(idx)>>;
      auto fn = use_avx2() ? &avx2::sparse_linear_bwd_w<T, I> : &generic::sparse_linear_bwd_w<T, I>;
      bad = fn(B, G, H, indptr.data_ptr<int64_t>(), idx, values.data_ptr<T>(),
               static_cast<int>(transform), dy.data_ptr<T>(), dW.data_ptr<T>(), n_threads());
    };
    if (indices.scalar_type() == at::kInt) run(indices.data_ptr<int32_t>());
    else run(indices.data_ptr<int64_t>());
  });
  check_bad(bad, op, "gene indices");
  return dW;
}

// ---------------------------------------------------------------------------
// nb_softmax_loglik
// ---------------------------------------------------------------------------

// Returns (loglik (B,), grad_logits (B, G) or empty, sum_a (B,) or empty,
// grad_px_r (G,) or empty, grad_colsum (G,) or empty). grad_logits is
// d loglik_b / d logits_b (written into grad_logits_out when given, a reusable
// buffer), grad_colsum its sum over cells, sum_a is d loglik_b / d l_b and
// grad_px_r is sum_b w_b d loglik_b / d px_r with w = row_weight (ones when None).
std::vector<at::Tensor> nb_softmax_loglik_forward(
    const at::Tensor& logits, const at::Tensor& log_library, const at::Tensor& px_r,
    const at::Tensor& indptr, const at::Tensor& indices, const at::Tensor& values, double eps,
    const std::optional<at::Tensor>& row_weight, bool want_grad_logits, bool want_sum_a,
    bool want_grad_px_r, const std::optional<at::Tensor>& grad_logits_out,
    bool want_grad_colsum) {
  const char* op = "nb_softmax_loglik";
  check_logits_library(logits, log_library, op);
  const auto dtype = logits.scalar_type();
  const int64_t B = logits.size(0), G = logits.size(1);
  check_float(px_r, dtype, op, "px_r");
  TORCH_CHECK(px_r.dim() == 1 && px_r.numel() == G, op, ": px_r must have shape (", G,
              ",); got ", px_r.sizes());
  TORCH_CHECK(eps > 0.0, op, ": eps must be positive; got ", eps);
  check_csr(indptr, indices, values, B, dtype, op);
  if (row_weight.has_value()) {
    check_float(*row_weight, dtype, op, "row_weight");
    TORCH_CHECK(row_weight->numel() == B, op, ": row_weight must have ", B, " elements");
  }
  at::Tensor loglik = at::empty({B}, logits.options());
  at::Tensor grad_logits;
  if (want_grad_logits && grad_logits_out.has_value()) {
    grad_logits = *grad_logits_out;
    check_tensor(grad_logits, op, "grad_logits_out");
    TORCH_CHECK(grad_logits.scalar_type() == dtype && grad_logits.dim() == 2 &&
                    grad_logits.size(0) == B && grad_logits.size(1) == G,
                op, ": grad_logits_out must be a (", B, ", ", G, ") ", dtype, " tensor; got ",
                grad_logits.scalar_type(), " ", grad_logits.sizes());
    TORCH_CHECK(!grad_logits.is_same(logits), op, ": grad_logits_out must not be logits");
  } else if (want_grad_logits) {
    grad_logits = at::empty({B, G}, logits.options());
  }
  TORCH_CHECK(!want_grad_colsum || want_grad_logits, op,
              ": the column sum of the logit gradient needs want_grad_logits");
  at::Tensor grad_colsum = want_grad_colsum ? at::empty({G}, logits.options()) : at::Tensor();
  at::Tensor sum_a = want_sum_a ? at::empty({B}, logits.options()) : at::Tensor();
  at::Tensor grad_px_r = want_grad_px_r ? at::empty({G}, logits.options()) : at::Tensor();
  int64_t bad = 0;
  AT_DISPATCH_FLOATING_TYPES(dtype, "nb_softmax_loglik_forward", [&] {
    using T = scalar_t;
    with_indices(indices, [&](auto* idx) {
      using I = std::remove_const_t<std::remove_pointer_t<decltype(idx)>>;
      NbArgs<T, I> a;
      a.B = B;
      a.G = G;
      a.logits = logits.data_ptr<T>();
      a.log_library = log_library.data_ptr<T>();
      a.px_r = px_r.data_ptr<T>();
      a.indptr = indptr.data_ptr<int64_t>();
      a.indices = idx;
      a.values = values.data_ptr<T>();
      a.eps = eps;
      a.row_weight = row_weight.has_value() ? row_weight->data_ptr<T>() : nullptr;
      a.loglik = loglik.data_ptr<T>();
      a.grad_logits = want_grad_logits ? grad_logits.data_ptr<T>() : nullptr;
      a.sum_a = want_sum_a ? sum_a.data_ptr<T>() : nullptr;
      a.grad_px_r = want_grad_px_r ? grad_px_r.data_ptr<T>() : nullptr;
      a.grad_colsum = want_grad_colsum ? grad_colsum.data_ptr<T>() : nullptr;
      a.n_threads = n_threads();
      auto fn = use_avx2() ? &avx2::nb_softmax_loglik_fwd<T, I>
                           : &generic::nb_softmax_loglik_fwd<T, I>;
      bad = fn(a);
    });
  });
  check_bad(bad, op, "gene indices");
  return {loglik, grad_logits, sum_a, grad_px_r, grad_colsum};
}

// ---------------------------------------------------------------------------
// zinb_softmax_loglik (NB without dropout) and poisson_softmax_loglik
// ---------------------------------------------------------------------------

// Returns (loglik (B,), grad_logits (B, G), sum_a (B,), grad_px_r (px_r's shape),
// grad_dropout (B, G)), each empty unless asked for. A (G,) px_r gradient is summed over
// cells with weights row_weight (ones when None); every other gradient is per cell.
std::vector<at::Tensor> zinb_softmax_loglik_forward(
    const at::Tensor& logits, const at::Tensor& log_library, const at::Tensor& px_r,
    const std::optional<at::Tensor>& dropout, const at::Tensor& indptr,
    const at::Tensor& indices, const at::Tensor& values, double eps,
    const std::optional<at::Tensor>& row_weight, bool want_grad_logits, bool want_sum_a,
    bool want_grad_px_r, bool want_grad_dropout) {
  const char* op = dropout.has_value() ? "zinb_softmax_loglik" : "nb_softmax_loglik";
  check_logits_library(logits, log_library, op);
  const auto dtype = logits.scalar_type();
  const int64_t B = logits.size(0), G = logits.size(1);
  check_float(px_r, dtype, op, "px_r");
  const bool rows = px_r.dim() == 2;
  TORCH_CHECK((px_r.dim() == 1 && px_r.numel() == G) ||
                  (rows && px_r.size(0) == B && px_r.size(1) == G),
              op, ": px_r must have shape (", G, ",) or (", B, ", ", G, "); got ", px_r.sizes());
  if (dropout.has_value()) {
    check_float(*dropout, dtype, op, "dropout_logits");
    TORCH_CHECK(dropout->dim() == 2 && dropout->size(0) == B && dropout->size(1) == G, op,
                ": dropout_logits must have shape (", B, ", ", G, "); got ", dropout->sizes());
  }
  TORCH_CHECK(!want_grad_dropout || dropout.has_value(), op,
              ": a dropout gradient needs dropout logits");
  TORCH_CHECK(eps > 0.0, op, ": eps must be positive; got ", eps);
  check_csr(indptr, indices, values, B, dtype, op);
  if (row_weight.has_value()) {
    check_float(*row_weight, dtype, op, "row_weight");
    TORCH_CHECK(row_weight->numel() == B, op, ": row_weight must have ", B, " elements");
  }
  auto opts = logits.options();
  at::Tensor loglik = at::empty({B}, opts);
  at::Tensor grad_logits = want_grad_logits ? at::empty({B, G}, opts) : at::Tensor();
  at::Tensor sum_a = want_sum_a ? at::empty({B}, opts) : at::Tensor();
  at::Tensor grad_px_r = want_grad_px_r ? at::empty(px_r.sizes(), opts) : at::Tensor();
  at::Tensor grad_dropout = want_grad_dropout ? at::empty({B, G}, opts) : at::Tensor();
  if (want_grad_px_r && !rows && B == 0) grad_px_r.zero_();
  int64_t bad = 0;
  AT_DISPATCH_FLOATING_TYPES(dtype, "zinb_softmax_loglik_forward", [&] {
    using T = scalar_t;
    with_indices(indices, [&](auto* idx) {
      using I = std::remove_const_t<std::remove_pointer_t<decltype(idx)>>;
      ZinbArgs<T, I> a;
      a.B = B;
      a.G = G;
      a.logits = logits.data_ptr<T>();
      a.log_library = log_library.data_ptr<T>();
      a.px_r = px_r.data_ptr<T>();
      a.px_r_rows = rows;
      a.dropout = dropout.has_value() ? dropout->data_ptr<T>() : nullptr;
      a.indptr = indptr.data_ptr<int64_t>();
      a.indices = idx;
      a.values = values.data_ptr<T>();
      a.eps = eps;
      a.row_weight = row_weight.has_value() ? row_weight->data_ptr<T>() : nullptr;
      a.loglik = loglik.data_ptr<T>();
      a.grad_logits = want_grad_logits ? grad_logits.data_ptr<T>() : nullptr;
      a.sum_a = want_sum_a ? sum_a.data_ptr<T>() : nullptr;
      a.grad_px_r = want_grad_px_r ? grad_px_r.data_ptr<T>() : nullptr;
      a.grad_dropout = want_grad_dropout ? grad_dropout.data_ptr<T>() : nullptr;
      a.n_threads = n_threads();
      auto fn = use_avx2() ? &avx2::zinb_softmax_loglik_fwd<T, I>
                           : &generic::zinb_softmax_loglik_fwd<T, I>;
      bad = fn(a);
    });
  });
  check_bad(bad, op, "gene indices");
  return {loglik, grad_logits, sum_a, grad_px_r, grad_dropout};
}

// Returns (loglik (B,), lse (B,), X = sum of the counts (B,)).
std::vector<at::Tensor> poisson_softmax_loglik_forward(
    const at::Tensor& logits, const at::Tensor& log_library, const at::Tensor& indptr,
    const at::Tensor& indices, const at::Tensor& values) {
  const char* op = "poisson_softmax_loglik";
  check_logits_library(logits, log_library, op);
  const auto dtype = logits.scalar_type();
  const int64_t B = logits.size(0), G = logits.size(1);
  check_csr(indptr, indices, values, B, dtype, op);
  at::Tensor loglik = at::empty({B}, logits.options());
  at::Tensor lse = at::empty({B}, logits.options());
  at::Tensor sum_x = at::empty({B}, logits.options());
  int64_t bad = 0;
  AT_DISPATCH_FLOATING_TYPES(dtype, "poisson_softmax_loglik_forward", [&] {
    using T = scalar_t;
    with_indices(indices, [&](auto* idx) {
      using I = std::remove_const_t<std::remove_pointer_t<decltype(idx)>>;
      auto fn = use_avx2() ? &avx2::poisson_softmax_loglik_fwd<T, I>
                           : &generic::poisson_softmax_loglik_fwd<T, I>;
      bad = fn(B, G, logits.data_ptr<T>(), log_library.data_ptr<T>(),
               indptr.data_ptr<int64_t>(), idx, values.data_ptr<T>(), loglik.data_ptr<T>(),
               lse.data_ptr<T>(), sum_x.data_ptr<T>(), n_threads());
    });
  });
  check_bad(bad, op, "gene indices");
  return {loglik, lse, sum_x};
}

// d (sum_b w_b loglik_b) / d logits, from the saved lse and X.
at::Tensor poisson_softmax_loglik_backward(const at::Tensor& logits, const at::Tensor& lse,
                                           const at::Tensor& sum_x, const at::Tensor& w,
                                           const at::Tensor& indptr, const at::Tensor& indices,
                                           const at::Tensor& values) {
  const char* op = "poisson_softmax_loglik backward";
  check_logits_library(logits, lse, op, "lse");
  const auto dtype = logits.scalar_type();
  const int64_t B = logits.size(0), G = logits.size(1);
  for (auto* t : {&sum_x, &w}) {
    check_float(*t, dtype, op, "per-cell input");
    TORCH_CHECK(t->numel() == B, op, ": per-cell inputs must have ", B, " elements");
  }
  check_csr(indptr, indices, values, B, dtype, op);
  at::Tensor grad = at::empty({B, G}, logits.options());
  int64_t bad = 0;
  AT_DISPATCH_FLOATING_TYPES(dtype, "poisson_softmax_loglik_backward", [&] {
    using T = scalar_t;
    with_indices(indices, [&](auto* idx) {
      using I = std::remove_const_t<std::remove_pointer_t<decltype(idx)>>;
      auto fn = use_avx2() ? &avx2::poisson_softmax_loglik_bwd<T, I>
                           : &generic::poisson_softmax_loglik_bwd<T, I>;
      bad = fn(B, G, logits.data_ptr<T>(), lse.data_ptr<T>(), sum_x.data_ptr<T>(),
               w.data_ptr<T>(), indptr.data_ptr<int64_t>(), idx, values.data_ptr<T>(),
               grad.data_ptr<T>(), n_threads());
    });
  });
  check_bad(bad, op, "gene indices");
  return grad;
}

// ---------------------------------------------------------------------------
// reparam_kl
// ---------------------------------------------------------------------------

void check_reparam(const at::Tensor& q_m, const at::Tensor& q_v_raw, const at::Tensor& noise,
                   const char* op) {
  check_tensor(q_m, op, "q_m");
  TORCH_CHECK(q_m.scalar_type() == at::kFloat || q_m.scalar_type() == at::kDouble, op,
              ": q_m must be float32 or float64; got ", q_m.scalar_type());
  TORCH_CHECK(q_m.dim() == 2, op, ": q_m must be (B, Z); got ", q_m.sizes());
  check_float(q_v_raw, q_m.scalar_type(), op, "q_v_raw");
  check_float(noise, q_m.scalar_type(), op, "eps_noise");
  TORCH_CHECK(q_v_raw.sizes() == q_m.sizes() && noise.sizes() == q_m.sizes(), op,
              ": q_m, q_v_raw and eps_noise must have the same shape; got ", q_m.sizes(), ", ",
              q_v_raw.sizes(), " and ", noise.sizes());
}

std::vector<at::Tensor> reparam_kl_forward(const at::Tensor& q_m, const at::Tensor& q_v_raw,
                                           const at::Tensor& noise, double var_eps) {
  const char* op = "reparam_kl";
  check_reparam(q_m, q_v_raw, noise, op);
  const int64_t B = q_m.size(0), Z = q_m.size(1);
  at::Tensor z = at::empty_like(q_m);
  at::Tensor kl = at::empty({B}, q_m.options());
  AT_DISPATCH_FLOATING_TYPES(q_m.scalar_type(), "reparam_kl_forward", [&] {
    using T = scalar_t;
    auto fn = use_avx2() ? &avx2::reparam_kl_fwd<T> : &generic::reparam_kl_fwd<T>;
    fn(B, Z, q_m.data_ptr<T>(), q_v_raw.data_ptr<T>(), noise.data_ptr<T>(), var_eps,
       z.data_ptr<T>(), kl.data_ptr<T>(), n_threads());
  });
  return {z, kl};
}

std::vector<at::Tensor> reparam_kl_backward(const at::Tensor& q_m, const at::Tensor& q_v_raw,
                                            const at::Tensor& noise, double var_eps,
                                            const std::optional<at::Tensor>& dz,
                                            const std::optional<at::Tensor>& dkl,
                                            bool want_q_m, bool want_q_v_raw) {
  const char* op = "reparam_kl backward";
  check_reparam(q_m, q_v_raw, noise, op);
  const int64_t B = q_m.size(0), Z = q_m.size(1);
  if (dz.has_value()) {
    check_float(*dz, q_m.scalar_type(), op, "grad_z");
    TORCH_CHECK(dz->sizes() == q_m.sizes(), op, ": grad_z must have shape ", q_m.sizes());
  }
  if (dkl.has_value()) {
    check_float(*dkl, q_m.scalar_type(), op, "grad_kl");
    TORCH_CHECK(dkl->numel() == B, op, ": grad_kl must have ", B, " elements");
  }
  at::Tensor dq_m = want_q_m ? at::empty_like(q_m) : at::Tensor();
  at::Tensor dq_v_raw = want_q_v_raw ? at::empty_like(q_m) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(q_m.scalar_type(), "reparam_kl_backward", [&] {
    using T = scalar_t;
    auto fn = use_avx2() ? &avx2::reparam_kl_bwd<T> : &generic::reparam_kl_bwd<T>;
    fn(B, Z, q_m.data_ptr<T>(), q_v_raw.data_ptr<T>(), noise.data_ptr<T>(), var_eps,
       dz.has_value() ? dz->data_ptr<T>() : nullptr,
       dkl.has_value() ? dkl->data_ptr<T>() : nullptr,
       want_q_m ? dq_m.data_ptr<T>() : nullptr, want_q_v_raw ? dq_v_raw.data_ptr<T>() : nullptr,
       n_threads());
  });
  return {dq_m, dq_v_raw};
}

// ---------------------------------------------------------------------------
// dropout
// ---------------------------------------------------------------------------

// x * mask / (1 - p) with the mask a function of (seed, element index) (see
// kernels_impl.h); the same call on the upstream gradient is the backward.
at::Tensor dropout_apply_op(const at::Tensor& x, double p, int64_t seed) {
  const char* op = "dropout";
  check_tensor(x, op, "x");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, op,
              ": x must be float32 or float64; got ", x.scalar_type());
  TORCH_CHECK(p >= 0.0 && p < 1.0, op, ": p must be in [0, 1); got ", p);
  const uint32_t threshold = static_cast<uint32_t>(p * 4294967296.0);
  at::Tensor y = at::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "dropout_apply", [&] {
    using T = scalar_t;
    auto fn = use_avx2() ? &avx2::dropout_apply<T> : &generic::dropout_apply<T>;
    fn(x.numel(), x.data_ptr<T>(), static_cast<uint64_t>(seed), threshold, 1.0 / (1.0 - p),
       y.data_ptr<T>(), n_threads());
  });
  return y;
}

}  // namespace
}  // namespace scvi_fast

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using namespace scvi_fast;
  m.doc() = "scvi_fast CPU kernels (OpenMP; AVX2 selected at run time when available)";
  m.def("isa", &isa, "Instruction set the kernels run with: 'avx2' or 'generic'.");
  m.def("set_isa", &set_isa, "Force 'generic' or 'avx2' kernels, or 'auto' (testing aid).");
  m.def("sparse_linear_forward", &sparse_linear_forward);
  m.def("sparse_linear_backward_weight", &sparse_linear_backward_weight);
  m.def("nb_softmax_loglik_forward", &nb_softmax_loglik_forward);
  m.def("zinb_softmax_loglik_forward", &zinb_softmax_loglik_forward);
  m.def("poisson_softmax_loglik_forward", &poisson_softmax_loglik_forward);
  m.def("poisson_softmax_loglik_backward", &poisson_softmax_loglik_backward);
  m.def("reparam_kl_forward", &reparam_kl_forward);
  m.def("reparam_kl_backward", &reparam_kl_backward);
  m.def("dropout_apply", &dropout_apply_op);
#ifdef SCVI_FAST_SOURCE_HASH
  m.attr("SOURCE_HASH") = SCVI_FAST_SOURCE_HASH;
#endif
  m.attr("TRANSFORM_IDENTITY") = static_cast<int>(kIdentity);
  m.attr("TRANSFORM_LOG1P") = static_cast<int>(kLog1p);
}
