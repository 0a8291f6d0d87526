// Zero-inflated negative-binomial and Poisson likelihoods of CSR counts under
// mu = exp(l) softmax(logits). Included at the end of kernels_impl.h (inside the ISA
// namespace), so it shares its helpers: vexp / vlog / vlog1p, lgamma / digamma, the
// count tables and thread-row sums.
//
// ZINB (scvi-tools' log_zinb_positive) per entry, pi the dropout logit,
// nb0 = theta (log(theta+eps) - log(theta+mu+eps)) (the NB log-probability of 0):
//
//   x = 0:  Z = softplus(nb0 - pi) - softplus(-pi)
//   x > 0:  N = -softplus(pi) + nb0 + x (log(mu+eps) - log(theta+mu+eps))
//               + lgamma(x+theta) - lgamma(theta) - lgamma(x+1)
//
// (-softplus(-pi) - pi = -softplus(pi)). L_b = sum_g Z_g + sum_{x_g>0} (N_g - Z_g): one dense
// pass for Z and its gradient over every entry, then the difference at the non-zeros in
// double, where lgamma / digamma run. With s_z = sigmoid(nb0 - pi), s_u = sigmoid(-pi),
// D = theta+mu+eps and the gradient to mu taken as a = mu dL/dmu:
//
//   x = 0:  a = -s_z theta mu / D                dL/dpi = s_u - s_z
//           dL/dpx_r = s_z theta [log(theta+eps) + theta/(theta+eps) - log D - theta/D]
//   x > 0:  a = -theta mu / D + x mu theta / ((mu+eps) D)          dL/dpi = -sigmoid(pi)
//                                              (= softplus'(-pi) - 1, 0 for -pi > 20)
//           dL/dpx_r = theta [log(theta+eps) + theta/(theta+eps) - log D - (theta+x)/D
//                             + psi(x+theta) - psi(theta)]
//
// and, as for the NB op, dL/dlogit_k = a_k - rho_k A, dL/dl = A = sum_g a_g. Without a
// dropout input (zi = false) the same kernel is the NB likelihood (pi -> -inf: Z = nb0,
// s_z = 1), which is how NB with a (B, G) dispersion runs.
//
// The dense pass costs one log per entry for NB; ZINB adds two exps and two log1ps
// (the softplus pair, whose exps also give both sigmoids). Softplus is evaluated as
// max(y, 0) + log1p(exp(-|y|)), finite for any finite y, and as y above torch's threshold.
//
// Poisson (torch's Poisson.log_prob): log(rate_g) = l + z_g - lse and sum_g rate_g = exp(l),
// so L_b = sum_{x>0} [x (l + z - lse) - lgamma(x+1)] - exp(l) needs only the row's
// log-sum-exp densely; dL/dz_k = x_k - rho_k X (X = sum x), dL/dl = X - exp(l).

// softplus and its derivative as torch computes them (F.softplus, threshold 20): y itself
// and slope 1 above 20 (the reference's own approximation, 2e-9 off, visible in float64).
static constexpr double kSoftplusThreshold = 20.0;

template <typename T>
static inline T softplus_t(T y, T e) {  // e = exp(-|y|)
  const T sp = (y > T(0) ? y : T(0)) + vlog1p(e);
  return y > T(kSoftplusThreshold) ? y : sp;
}

template <typename T>
static inline T sigmoid_t(T y, T e) {  // e = exp(-|y|); d softplus(y) / dy
  const T r = T(1) / (T(1) + e);
  const T s = y >= T(0) ? r : e * r;
  return y > T(kSoftplusThreshold) ? T(1) : s;
}

static inline double softplus_d(double y) {
  if (y > kSoftplusThreshold) return y;
  return (y > 0.0 ? y : 0.0) + std::log1p(std::exp(-std::fabs(y)));
}

static inline double sigmoid_d(double y) {
  if (y > kSoftplusThreshold) return 1.0;
  const double e = std::exp(-std::fabs(y)), r = 1.0 / (1.0 + e);
  return y >= 0.0 ? r : e * r;
}

// lgamma(x+t) - lgamma(t) and psi(x+t) - psi(t) for a count x > 0; lgamma(t) and psi(t)
// from the per-gene tables when given, else computed here (only where count_gamma_diff
// needs them: counts that are not small integers).
template <bool DIGAMMA>
static inline void gamma_diff_at(double x, double t, const double* lg_t, const double* dg_t,
                                 int64_t g, double& lg, double& dg) {
  if (lg_t != nullptr) {
    count_gamma_diff<DIGAMMA>(x, t, lg_t[g], DIGAMMA ? dg_t[g] : 0.0, lg, dg);
    return;
  }
  const bool small = x <= kSmallCount && x == static_cast<double>(static_cast<int64_t>(x)) &&
                     t < 1e15;
  double l0 = 0.0, d0 = 0.0;
  if (!small) {
    if (DIGAMMA) lgamma_digamma_pos(t, l0, d0);
    else l0 = lgamma_pos(t);
  }
  count_gamma_diff<DIGAMMA>(x, t, l0, d0, lg, dg);
}

template <typename T, typename I, bool ZI, bool GRAD>
static int64_t zinb_rows(const ZinbArgs<T, I>& a, const T* theta_g, const T* lte_g,
                         const T* cth_g, const double* lgamma_g, const double* digamma_g,
                         double* acc_all) {
  const int64_t B = a.B, G = a.G;
  const T eps = static_cast<T>(a.eps);
  const double eps_d = a.eps;
  const double* table = lgamma1p_table();
  const bool rows_r = a.px_r_rows;
  int64_t bad = 0;
#pragma omp parallel num_threads(a.n_threads) reduction(+ : bad) if (B * G > kMinParallel)
  {
    const int tid = omp_get_thread_num();
    double* acc = acc_all != nullptr ? acc_all + static_cast<size_t>(tid) * G : nullptr;
    // per-thread rows: e = exp(z - max); theta, log(theta+eps) and the px_r constant of a
    // (B, G) dispersion; the gradients nobody asked for (written, never read)
    const size_t Gs = static_cast<size_t>(G > 0 ? G : 1);
    T* e = new T[Gs];
    T* th_row = rows_r ? new T[3 * Gs] : nullptr;
    T* sink = GRAD ? new T[3 * Gs] : nullptr;
#pragma omp for schedule(dynamic, 4)
    for (int64_t r = 0; r < B; ++r) {
      const T* __restrict lg = a.logits + r * G;
      const T* th = theta_g;
      const T* lte = lte_g;
      const T* cth = cth_g;
      if (rows_r) {
        T* th_w = th_row;
        T* lte_w = th_row + Gs;
        T* cth_w = th_row + 2 * Gs;
        const T* pr = a.px_r + r * G;
#pragma omp simd
        for (int64_t g = 0; g < G; ++g) {
          const T t = vexp(pr[g]);
          const T l = vlog(t + eps);
          th_w[g] = t;
          lte_w[g] = l;
          cth_w[g] = t * (l + t / (t + eps));
        }
        th = th_w;
        lte = lte_w;
        cth = cth_w;
      }
      const T* __restrict pi = ZI ? a.dropout + r * G : nullptr;
      T* __restrict ga = GRAD ? (a.grad_logits != nullptr ? a.grad_logits + r * G : sink) : nullptr;
      T* __restrict gpi = GRAD ? (a.grad_dropout != nullptr ? a.grad_dropout + r * G : sink + Gs) : nullptr;
      // a (B, G) px_r gradient is written per entry; a (G,) one is summed into acc
      T* __restrict gr = GRAD ? (rows_r && a.grad_px_r != nullptr ? a.grad_px_r + r * G : sink + 2 * Gs) : nullptr;
      const bool sum_r = GRAD && !rows_r && acc != nullptr;
      const T w = a.row_weight != nullptr ? a.row_weight[r] : T(1);

      T mx;
      const double s = row_exp_sum<T, true>(lg, G, e, mx);
      const double scale_d = std::exp(static_cast<double>(a.log_library[r]) - std::log(s));
      const T scale = static_cast<T>(scale_d);

      double loss = 0.0, A = 0.0;
      for (int64_t g0 = 0; g0 < G; g0 += kBlock) {
        const int64_t g1 = min_(G, g0 + kBlock);
        T lb = T(0), ab = T(0);
#pragma omp simd reduction(+ : lb, ab)
        for (int64_t g = g0; g < g1; ++g) {
          const T t = th[g];
          const T m = scale * e[g];
          const T tme = t + m + eps;
          const T lt = vlog(tme);
          const T nb0 = t * (lte[g] - lt);
          T val, sz = T(1);
          if (ZI) {
            const T p = pi[g];
            const T z = nb0 - p;
            const T ez = vexp(-(z < T(0) ? -z : z));
            const T eu = vexp(-(p < T(0) ? -p : p));  // |u| = |pi|
            val = softplus_t(z, ez) - softplus_t(-p, eu);
            if (GRAD) {
              sz = sigmoid_t(z, ez);
              gpi[g] = sigmoid_t(-p, eu) - sz;
            }
          } else {
            val = nb0;
          }
          lb += val;
          if (GRAD) {
            const T rinv = T(1) / tme;
            const T av = -sz * t * m * rinv;
            ga[g] = av;
            ab += av;
            const T dr = sz * (cth[g] - t * (lt + t * rinv));
            gr[g] = dr;
            if (sum_r) acc[g] += static_cast<double>(w * dr);
          }
        }
        loss += static_cast<double>(lb);
        A += static_cast<double>(ab);
      }

      // the non-zeros: N - Z and the gradients of N, in double
      const int64_t p0 = a.indptr[r], n = a.indptr[r + 1] - p0;
      for (int64_t j = 0; j < n; ++j) {
        const int64_t g = static_cast<int64_t>(a.indices[p0 + j]);
        if (g < 0 || g >= G) { ++bad; continue; }
        const T xt = a.values[p0 + j];
        if (xt < eps) continue;  // the reference's zero test
        const double x = static_cast<double>(xt);
        const double t = static_cast<double>(th[g]);
        const double lted = std::log(t + eps_d);
        const double m = scale_d * static_cast<double>(e[g]);
        const double u = m + eps_d, tme = t + u, rinv = 1.0 / tme;
        const double ltme = std::log(tme);
        const double nb0 = t * (lted - ltme);
        double lgd, dgd = 0.0;
        gamma_diff_at<GRAD>(x, t, lgamma_g, digamma_g, g, lgd, dgd);
        const double nbx = nb0 + x * std::log(u * rinv) + lgd - lgamma1p_count(x, table);
        double val0 = nb0, val1 = nbx, sz = 1.0, pid = 0.0;
        if (ZI) {
          pid = static_cast<double>(pi[g]);
          val0 = softplus_d(nb0 - pid) - softplus_d(-pid);
          val1 = nbx - softplus_d(-pid) - pid;  // the reference's form of -softplus(pi)
          sz = sigmoid_d(nb0 - pid);
        }
        loss += val1 - val0;
        if (GRAD) {
          const double tmr = t * m * rinv;
          const double a1 = -tmr + x * tmr / u;
          A += a1 + sz * tmr;
          ga[g] = static_cast<T>(a1);
          if (ZI) gpi[g] = static_cast<T>(sigmoid_d(-pid) - 1.0);  // softplus'(-pi) - 1
          const double base = t * (lted + t / (t + eps_d) - ltme);
          const double dr1 = base - t * (t + x) * rinv + t * dgd;
          const double dr0 = sz * (base - t * t * rinv);
          gr[g] = static_cast<T>(dr1);
          if (sum_r) acc[g] += static_cast<double>(w) * (dr1 - dr0);
        }
      }

      a.loglik[r] = static_cast<T>(loss);
      if (GRAD && a.sum_a != nullptr) a.sum_a[r] = static_cast<T>(A);
      if (GRAD && a.grad_logits != nullptr) {
        const T At = static_cast<T>(A);
        const T inv_s = static_cast<T>(1.0 / s);
#pragma omp simd
        for (int64_t g = 0; g < G; ++g) ga[g] -= (e[g] * inv_s) * At;
      }
    }
    delete[] sink;
    delete[] th_row;
    delete[] e;
  }
  return bad;
}

template <typename T, typename I>
int64_t zinb_softmax_loglik_fwd(const ZinbArgs<T, I>& a) {
  const int64_t B = a.B, G = a.G;
  if (G == 0) {
    for (int64_t r = 0; r < B; ++r) {
      a.loglik[r] = T(0);
      if (a.sum_a != nullptr) a.sum_a[r] = T(0);
    }
    return 0;
  }
  const bool grad = a.grad_logits != nullptr || a.sum_a != nullptr || a.grad_px_r != nullptr ||
                    a.grad_dropout != nullptr;
  const int nt = a.n_threads > 0 ? a.n_threads : 1;
  // A (G,) dispersion: theta, log(theta+eps), the px_r gradient's constant and lgamma /
  // digamma of theta once per gene (theta rounded to T, as the reference rounds it).
  T *theta = nullptr, *lte = nullptr, *cth = nullptr;
  double *lgamma_t = nullptr, *digamma_t = nullptr;
  if (!a.px_r_rows) {
    theta = new T[G];
    lte = new T[G];
    cth = new T[G];
    lgamma_t = new double[G];
    digamma_t = grad ? new double[G] : nullptr;
    const T eps = static_cast<T>(a.eps);
#pragma omp parallel for num_threads(nt) schedule(static) if (G > 2048)
    for (int64_t g = 0; g < G; ++g) {
      const T t = static_cast<T>(std::exp(static_cast<double>(a.px_r[g])));
      const T l = static_cast<T>(std::log(static_cast<double>(t) + a.eps));
      theta[g] = t;
      lte[g] = l;
      cth[g] = t * (l + t / (t + eps));
      if (grad) lgamma_digamma_pos(static_cast<double>(t), lgamma_t[g], digamma_t[g]);
      else lgamma_t[g] = lgamma_pos(static_cast<double>(t));
    }
  }
  const bool want_acc = a.grad_px_r != nullptr && !a.px_r_rows;
  double* acc = want_acc ? new double[static_cast<size_t>(nt) * G]() : nullptr;
  lgamma1p_table();  // build outside the parallel region

  int64_t bad;
  const bool zi = a.dropout != nullptr;
  if (zi && grad) bad = zinb_rows<T, I, true, true>(a, theta, lte, cth, lgamma_t, digamma_t, acc);
  else if (zi) bad = zinb_rows<T, I, true, false>(a, theta, lte, cth, lgamma_t, digamma_t, acc);
  else if (grad) bad = zinb_rows<T, I, false, true>(a, theta, lte, cth, lgamma_t, digamma_t, acc);
  else bad = zinb_rows<T, I, false, false>(a, theta, lte, cth, lgamma_t, digamma_t, acc);

  if (want_acc) sum_thread_rows<T>(acc, nt, G, a.grad_px_r);
  delete[] acc;
  delete[] digamma_t;
  delete[] lgamma_t;
  delete[] cth;
  delete[] lte;
  delete[] theta;
  return bad;
}

// Poisson forward: loglik, lse and X = sum x per cell.
template <typename T, typename I>
int64_t poisson_softmax_loglik_fwd(int64_t B, int64_t G, const T* logits, const T* log_library,
                                   const int64_t* indptr, const I* indices, const T* values,
                                   T* loglik, T* lse_out, T* sum_x, int n_threads) {
  const double* table = lgamma1p_table();
  int64_t bad = 0;
#pragma omp parallel for num_threads(n_threads) schedule(dynamic, 4) reduction(+ : bad) if (B * G > kMinParallel)
  for (int64_t r = 0; r < B; ++r) {
    const T* __restrict lg = logits + r * G;
    double lse = 0.0;
    if (G > 0) {
      T mx;
      const double s = row_exp_sum<T, false>(lg, G, nullptr, mx);
      lse = static_cast<double>(mx) + std::log(s);
    }
    const double l = static_cast<double>(log_library[r]);
    double loss = 0.0, X = 0.0;
    for (int64_t p = indptr[r]; p < indptr[r + 1]; ++p) {
      const int64_t g = static_cast<int64_t>(indices[p]);
      if (g < 0 || g >= G) { ++bad; continue; }
      const double x = static_cast<double>(values[p]);
      if (x == 0.0) continue;  // 0 log 0 = 0
      loss += x * (l + static_cast<double>(lg[g]) - lse) - lgamma1p_count(x, table);
      X += x;
    }
    loglik[r] = static_cast<T>(loss - (G > 0 ? std::exp(l) : 0.0));
    lse_out[r] = static_cast<T>(lse);
    sum_x[r] = static_cast<T>(X);
  }
  return bad;
}

// Poisson backward: grad[r, k] = w_r (x_k - exp(z_k - lse_r) X_r).
template <typename T, typename I>
int64_t poisson_softmax_loglik_bwd(int64_t B, int64_t G, const T* logits, const T* lse,
                                   const T* sum_x, const T* w, const int64_t* indptr,
                                   const I* indices, const T* values, T* grad, int n_threads) {
  int64_t bad = 0;
#pragma omp parallel for num_threads(n_threads) schedule(static) reduction(+ : bad) if (B * G > kMinParallel)
  for (int64_t r = 0; r < B; ++r) {
    const T* __restrict lg = logits + r * G;
    T* __restrict out = grad + r * G;
    const T c = -w[r] * sum_x[r], m = lse[r];
#pragma omp simd
    for (int64_t g = 0; g < G; ++g) out[g] = c * vexp(lg[g] - m);
    for (int64_t p = indptr[r]; p < indptr[r + 1]; ++p) {
      const int64_t g = static_cast<int64_t>(indices[p]);
      if (g < 0 || g >= G) { ++bad; continue; }
      out[g] += w[r] * values[p];
    }
  }
  return bad;
}
