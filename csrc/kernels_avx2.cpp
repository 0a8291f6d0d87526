// AVX2 + FMA build of the kernels, selected at run time by ops.cpp when the CPU
// supports both (the rest of the extension targets the baseline ISA, so the same
// binary runs on any x86-64 machine).
//
// Standard headers come before any target pragma so that no inline library
// code is compiled for the wider ISA; everything defined after it lives in
// namespace scvi_fast::avx2.
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

#if defined(__x86_64__) && defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma"))), apply_to = function)
#elif defined(__x86_64__) && defined(__GNUC__)
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#endif  // elsewhere this is a second baseline build that is never selected

namespace scvi_fast {
namespace avx2 {

#include "kernels_impl.h"

#include "kernels_instantiate.inc"

}  // namespace avx2
}  // namespace scvi_fast

#if defined(__x86_64__) && defined(__clang__)
#pragma clang attribute pop
#elif defined(__x86_64__) && defined(__GNUC__)
#pragma GCC pop_options
#endif
