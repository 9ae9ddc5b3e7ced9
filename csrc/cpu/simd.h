#pragma once

// Portable SIMD for the CPU kernels: fixed-width vectors through the GCC/Clang
// vector extension, and per-instruction-set compilation of a kernel.
//
// A kernel is a template on the vector width in bytes. PYCONVEXT_DISPATCH_ISA
// instantiates it inside functions compiled for AVX-512, AVX2 and the
// baseline ISA, and picks one at run time from what the CPU supports, so one
// binary runs everywhere and uses the widest vectors available.

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>

namespace pyconvext::simd {

template <typename T, int Bytes>
struct VecOf {
  typedef T type __attribute__((vector_size(Bytes)));
};
// Bytes / sizeof(T) lanes of T; arithmetic with a scalar broadcasts it.
template <typename T, int Bytes>
using Vec = typename VecOf<T, Bytes>::type;

template <typename V, typename T>
[[gnu::always_inline]] inline V load(const T* p) {
  V v;
  std::memcpy(&v, p, sizeof(V));
  return v;
}

template <typename V, typename T>
[[gnu::always_inline]] inline void store(T* p, const V& v) {
  std::memcpy(p, &v, sizeof(V));
}

// Transposes a square block of vectors in place: rounds D = lanes / 2, ...,
// 1, each swapping the off-diagonal D x D quarters of every 2D x 2D block.
template <int D, typename V>
[[gnu::always_inline]] inline void transpose_block(V* rows) {
  using T = std::remove_reference_t<decltype(rows[0][0])>;
  using Index = Vec<std::conditional_t<sizeof(T) == 4, int32_t, int64_t>, sizeof(V)>;
  constexpr int lanes = sizeof(V) / sizeof(T);
  Index first, second;  // lanes of (row i, row i + D), numbered 0.. and lanes..
#pragma GCC unroll 16
  for (int c = 0; c < lanes; ++c) {
    first[c] = c & D ? lanes + c - D : c;
    second[c] = c & D ? lanes + c : c + D;
  }
#pragma GCC unroll 16
  for (int i = 0; i < lanes; ++i) {
    if (i & D) continue;
    const V a = rows[i], b = rows[i + D];
    rows[i] = __builtin_shuffle(a, b, first);
    rows[i + D] = __builtin_shuffle(a, b, second);
  }
  if constexpr (D > 1) transpose_block<D / 2>(rows);
}

enum class Isa { Baseline, Avx2, Avx512 };

// The widest ISA this CPU supports, lowered by the environment variable
// PYCONVEXT_CPU_CAPABILITY=avx2|default (as ATEN_CPU_CAPABILITY does for
// PyTorch), which the tests use to run every variant. Read once.
inline Isa cpu_isa() {
  static const Isa isa = [] {
    Isa best = Isa::Baseline;
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
        __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512bw")) {
      best = Isa::Avx512;
    } else if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
      best = Isa::Avx2;
    }
#endif
    const char* requested = std::getenv("PYCONVEXT_CPU_CAPABILITY");
    if (requested && std::strcmp(requested, "default") == 0) return Isa::Baseline;
    if (requested && std::strcmp(requested, "avx2") == 0 && best == Isa::Avx512) return Isa::Avx2;
    return best;
  }();
  return isa;
}

inline const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::Avx512: return "avx512";
    case Isa::Avx2: return "avx2";
    default: return "default";
  }
}

}  // namespace pyconvext::simd

// PYCONVEXT_DISPATCH_ISA(name, kernel): defines `name(args...)`, which calls
// kernel.template operator()<Bytes>(args...) compiled for the best ISA here.
// `kernel` is a type with a templated call operator that must be always_inline
// (so that its body is compiled with the caller's target).
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define PYCONVEXT_DISPATCH_ISA(name, Kernel)                                          \
  template <typename... Args>                                                          \
  __attribute__((target("avx512f,avx512vl,avx512dq,avx512bw,avx2,fma"))) void         \
      name##_avx512(Args... args) {                                                    \
    Kernel{}.template operator()<64>(args...);                                         \
  }                                                                                    \
  template <typename... Args>                                                          \
  __attribute__((target("avx2,fma"))) void name##_avx2(Args... args) {                 \
    Kernel{}.template operator()<32>(args...);                                         \
  }                                                                                    \
  template <typename... Args>                                                          \
  void name##_baseline(Args... args) {                                                 \
    Kernel{}.template operator()<16>(args...);                                         \
  }                                                                                    \
  template <typename... Args>                                                          \
  void name(Args... args) {                                                            \
    switch (::pyconvext::simd::cpu_isa()) {                                           \
      case ::pyconvext::simd::Isa::Avx512: return name##_avx512(args...);             \
      case ::pyconvext::simd::Isa::Avx2: return name##_avx2(args...);                 \
      default: return name##_baseline(args...);                                        \
    }                                                                                  \
  }
#else
#define PYCONVEXT_DISPATCH_ISA(name, Kernel)  \
  template <typename... Args>                 \
  void name(Args... args) {                   \
    Kernel{}.template operator()<16>(args...); \
  }
#endif
