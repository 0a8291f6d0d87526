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

#include "kernels_instantiate.inc"

}  // namespace generic
}  // namespace scvi_fast


