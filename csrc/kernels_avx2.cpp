// The portable kernel bodies (kernels_impl.h) compiled with AVX2 + FMA enabled: 8-wide float vectors for the
// LayerNorm, activation, embedding and attention loops on x86-64 CPUs without AVX-512 (AMD Zen 1-3, Intel
// Haswell to Comet Lake), which otherwise ran the SSE2 baseline. Selected at run time only when the CPU has AVX2
// and FMA (ops.cpp). As in kernels_avx512.cpp, every header is included BEFORE the target pragma and
// kernels_impl.h instantiates no std:: template, so no AVX2 code can be picked by the linker for a function that
// the baseline also uses.
#include <cstdint>
#include <cstdlib>

#include "kernels.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c,bmi2"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,bmi2")
#endif

namespace fastbert {
namespace avx2 {
#define FASTBERT_ISA_NAME "avx2"
#define FASTBERT_VEC_BYTES 32
#include "kernels_dropout.h"
#include "kernels_impl.h"
#undef FASTBERT_ISA_NAME
#undef FASTBERT_VEC_BYTES
}  // namespace avx2
}  // namespace fastbert

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

#else  // not x86-64 GCC/Clang: the baseline bodies under this name; the dispatcher never selects it.
namespace fastbert {
namespace avx2 {
#define FASTBERT_ISA_NAME "avx2"
#include "kernels_dropout.h"
#include "kernels_impl.h"
#undef FASTBERT_ISA_NAME
}  // namespace avx2
}  // namespace fastbert
#endif
