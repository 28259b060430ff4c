// Vector maths shared by the fused CPU kernels: whether to run the AVX2 + FMA loops, and e^x of
// 8 floats. The kernels are built without -mavx2 (one build runs on any x86-64 CPU), so the AVX2
// code is compiled per function (target attribute) and chosen at run time with has_avx2().
// WORKBENCH_CPU_SIMD=0 in the environment, or set_simd(false) from Python, turns the AVX2 loops
// off (the tests run both ways).
#pragma once

#include <atomic>
#include <initializer_list>
#include <cstdlib>
#include <cstring>

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#define WORKBENCH_X86_SIMD 1
#endif

namespace workbench_simd {

inline bool simd_switched_off() {
  const char* value = std::getenv("WORKBENCH_CPU_SIMD");
  if (value == nullptr) return false;
  for (const char* off : {"0", "false", "off", "no"}) {  // WORKBENCH_FUSED_CPU's words, lower case
    if (!std::strcmp(value, off)) return true;
  }
  return false;
}

// Whether the AVX2 loops may run where the CPU has them (one flag for every kernel file).
inline std::atomic<bool>& simd_allowed() {
  static std::atomic<bool> allowed{!simd_switched_off()};
  return allowed;
}

#ifdef WORKBENCH_X86_SIMD
inline bool has_avx2() {
  static const bool cpu = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return cpu && simd_allowed().load(std::memory_order_relaxed);
}

// e^x of 8 floats, the Cephes expf scheme: x = n ln2 + r with |r| <= ln2 / 2 (ln2 split in two
// for an exact r), e^r = 1 + r + r^2 P(r) with P of degree 5, and 2^n put in the exponent bits.
// About 1 ulp; below -87.3 (where e^x leaves the normal floats) it returns 0.
__attribute__((target("avx2,fma"))) inline __m256 exp8(__m256 x) {
  const __m256 lowest = _mm256_set1_ps(-87.3f);
  const __m256 in_range = _mm256_cmp_ps(x, lowest, _CMP_GE_OQ);
  x = _mm256_min_ps(_mm256_max_ps(x, lowest), _mm256_set1_ps(88.3f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 poly = _mm256_set1_ps(1.9875691500e-4f);
  for (const float c : {1.3981999507e-3f, 8.3334519073e-3f, 4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f}) {
    poly = _mm256_fmadd_ps(poly, r, _mm256_set1_ps(c));
  }
  const __m256 e_r = _mm256_fmadd_ps(poly, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i two_n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_and_ps(_mm256_mul_ps(e_r, _mm256_castsi256_ps(two_n)), in_range);
}
#else
inline bool has_avx2() { return false; }
#endif

}  // namespace workbench_simd
