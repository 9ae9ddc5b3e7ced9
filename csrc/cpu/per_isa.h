// Compiles a header of vector loops once per instruction set. Define
// PYCONVEXT_ISA_KERNELS as the header's name, then include this file where
// the loops belong (it may be included again for another header):
//
//   #define PYCONVEXT_ISA_KERNELS "cpu/max_pool2d_kernels.h"
//   #include "cpu/per_isa.h"
//
// The loops land in namespaces avx512, avx2 (x86 with GCC) and baseline, each
// defining kVectorBytes, under `#pragma GCC target` for that set; call one of
// them with PYCONVEXT_ISA_CALL(name, args...), which picks the CPU's set.
// (Compiled instead as always-inline helpers of a target function, as
// cpu/simd.h does for conv2d, GCC splits their vector comparisons into
// scalar ones.) The header must include nothing itself.

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define PYCONVEXT_X86_ISAS 1
#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512dq,avx512bw,avx2,fma")
namespace avx512 {
constexpr int kVectorBytes = 64;
#include PYCONVEXT_ISA_KERNELS
}  // namespace avx512
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace avx2 {
constexpr int kVectorBytes = 32;
#include PYCONVEXT_ISA_KERNELS
}  // namespace avx2
#pragma GCC pop_options
#endif
namespace baseline {
constexpr int kVectorBytes = 16;
#include PYCONVEXT_ISA_KERNELS
}  // namespace baseline
#undef PYCONVEXT_ISA_KERNELS

#ifndef PYCONVEXT_ISA_CALL
#ifdef PYCONVEXT_X86_ISAS
#define PYCONVEXT_ISA_CALL(name, ...)                                     \
  switch (::pyconvext::simd::cpu_isa()) {                                 \
    case ::pyconvext::simd::Isa::Avx512: return avx512::name(__VA_ARGS__); \
    case ::pyconvext::simd::Isa::Avx2: return avx2::name(__VA_ARGS__);     \
    default: return baseline::name(__VA_ARGS__);                          \
  }
#else
#define PYCONVEXT_ISA_CALL(name, ...) return baseline::name(__VA_ARGS__);
#endif
#endif
