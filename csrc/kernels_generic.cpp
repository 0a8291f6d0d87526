// Baseline build of the kernels: what the compiler targets by default (SSE2 on
// x86-64); used when the CPU lacks AVX2/FMA and on other architectures.
//
// Standard headers come before any target pragma so that no inline library
// code is compiled for the wider ISA; everything defined after it lives in
// namespace scvi_fast::generic.
#include <cmath>
#include <cstdint>
#include <cstring>

#include "kernels.h"

#ifdef _OPENMP
#include <omp.h>
#else  // serial build: the pragmas are ignored, one thread
static inline int omp_get_thread_num() { return 0; }
static inline int omp_get_num_threads() { return 1; }
#endif



// The 32-byte vector helpers are static inline, so the psABI note on passing
// them without AVX does not concern any exported interface.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace scvi_fast {
namespace generic {

#include "kernels_impl.h"

#define SCVI_FAST_INSTANTIATE(T, I)                                                       \
  template int64_t sparse_linear_fwd<T, I>(int64_t, int64_t, int64_t, const int64_t*,    \
                                           const I*, const T*, int, const T*, const T*,  \
                                           const int64_t*, int64_t, const T*, T*, int);  \
  template int64_t sparse_linear_bwd_w<T, I>(int64_t, int64_t, int64_t, const int64_t*,  \
                                             const I*, const T*, int, const T*, T*, int); \
  template int64_t nb_softmax_loglik_fwd<T, I>(const NbArgs<T, I>&);

SCVI_FAST_INSTANTIATE(float, int32_t)
SCVI_FAST_INSTANTIATE(float, int64_t)
SCVI_FAST_INSTANTIATE(double, int32_t)
SCVI_FAST_INSTANTIATE(double, int64_t)

template void reparam_kl_fwd<float>(int64_t, int64_t, const float*, const float*, const float*,
                                    double, float*, float*, int);
template void reparam_kl_fwd<double>(int64_t, int64_t, const double*, const double*,
                                     const double*, double, double*, double*, int);
template void reparam_kl_bwd<float>(int64_t, int64_t, const float*, const float*, const float*,
                                    double, const float*, const float*, float*, float*, int);
template void reparam_kl_bwd<double>(int64_t, int64_t, const double*, const double*,
                                     const double*, double, const double*, const double*,
                                     double*, double*, int);

}  // namespace generic
}  // namespace scvi_fast


