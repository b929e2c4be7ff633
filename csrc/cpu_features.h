// Ludus: what this CPU can run, for the C++ shims' hand-written kernels.
#pragma once

namespace ludus {

// Whether the CPU has AVX-512F. Asked on first use: a static initializer could run before
// the CPU model is known.
inline bool has_avx512() {
  static const bool yes = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") != 0;
  }();
  return yes;
}

// Whether the CPU has AVX2 and FMA, what libtorch's AVX2 kernels need.
inline bool has_avx2_fma() {
  static const bool yes = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") != 0 && __builtin_cpu_supports("fma") != 0;
  }();
  return yes;
}

}  // namespace ludus
