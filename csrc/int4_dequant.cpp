// Ludus: turns a weight packed for libtorch's CPU int4 kernel (`_weight_int4pack_mm_for_cpu`)
// back into numbers, for many-row products (prefill) that a bf16 matrix product does several
// times faster than the int4 kernel (docs/benchmarks.md, "Why int4 prefill was slow").
//
// Each weight w = (q - 8) * scale + zero (f32, as the kernel computes it) is unpacked in one
// of two forms, whichever multiplies faster on this CPU (timed once, from Rust):
// - split: two bf16 numbers, hi = bf16(w) and lo = bf16(w - hi), so that x·hi + x·lo
//   reproduces the kernel's product to within f32 rounding: one bf16 product of [x, x]
//   with [hi; lo]. Fastest where bf16 products run on AMX.
// - f32: w itself, for one f32 product x · w, which is the kernel's own arithmetic (bf16
//   inputs, f32 weights and sums) in another order. Fastest without AMX, where bf16
//   products are slower than f32 ones.
// Either way the product runs in tiles of 512 output columns: all threads unpack a tile
// into a buffer that stays in cache, then all threads multiply it.
//
// Layout of libtorch's packing (aten int4mm_kernel.cpp, `weight_to_int4pack_kernel`): the
// rows n come in blocks of `block_n` (64 with AVX-512, 32 otherwise), block b starting at
// byte b * K * block_n / 2; within a block each k holds nb / 2 bytes. A full block on a
// vectorized CPU pairs row j (low nibble) with row j + block_n / 2 (high nibble); a partial
// block, or any block without vectorization, pairs rows 2j and 2j + 1. Which of these this
// libtorch uses is probed at run time from Rust (`inference::int4_prefill`), never assumed.

#include "bf16.h"
#include "cpu_features.h"

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <exception>
#include <memory>
#include <string>
#include <vector>

namespace {
thread_local std::string int4_error;

using ludus::bf16_to_f32;
using ludus::f32_to_bf16;

inline void emit(int64_t n, int q, const float* scale, const float* zero, uint16_t* hi, uint16_t* lo) {
  const float w = static_cast<float>(q - 8) * scale[n] + zero[n];
  const uint16_t h = f32_to_bf16(w);
  hi[n] = h;
  lo[n] = f32_to_bf16(w - bf16_to_f32(h));
}

// 16 weights of codes `q` (int32 lanes): the same arithmetic as `emit`, 16 at a time.
__attribute__((target("avx512f"))) inline void emit16(__m512i q, const float* scale, const float* zero,
                                                      uint16_t* hi, uint16_t* lo) {
  const __m512 w = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(q, _mm512_set1_epi32(8))),
                                   _mm512_loadu_ps(scale), _mm512_loadu_ps(zero));
  const __m512i bias = _mm512_set1_epi32(0x7fff), one = _mm512_set1_epi32(1);
  const __m512i u = _mm512_castps_si512(w);
  const __m512i h = _mm512_srli_epi32(
      _mm512_add_epi32(u, _mm512_add_epi32(bias, _mm512_and_si512(_mm512_srli_epi32(u, 16), one))), 16);
  const __m512i d = _mm512_castps_si512(_mm512_sub_ps(w, _mm512_castsi512_ps(_mm512_slli_epi32(h, 16))));
  const __m512i l = _mm512_srli_epi32(
      _mm512_add_epi32(d, _mm512_add_epi32(bias, _mm512_and_si512(_mm512_srli_epi32(d, 16), one))), 16);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(hi), _mm512_cvtepi32_epi16(h));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(lo), _mm512_cvtepi32_epi16(l));
}

// 16 weights of codes `q` as the f32 weights themselves.
__attribute__((target("avx512f"))) inline void emit16_f32(__m512i q, const float* scale, const float* zero,
                                                          float* w) {
  _mm512_storeu_ps(w, _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(q, _mm512_set1_epi32(8))),
                                      _mm512_loadu_ps(scale), _mm512_loadu_ps(zero)));
}

// Where unpacked weights go: the split pair (bf16 bits of hi and lo, for [x, x] · [hi; lo]
// in bf16) ...
struct SplitOut {
  uint16_t* hi;
  uint16_t* lo;
  SplitOut row(int64_t offset) const { return {hi + offset, lo + offset}; }
  void one(int64_t n, int q, const float* scale, const float* zero) const { emit(n, q, scale, zero, hi, lo); }
  __attribute__((target("avx512f"))) void sixteen(int64_t n, __m512i q, const float* scale,
                                                  const float* zero) const {
    emit16(q, scale + n, zero + n, hi + n, lo + n);
  }
};

// ... or the f32 weight itself (w = (q - 8) * scale + zero, as the kernel computes it), for
// an f32 product: faster than two bf16 products on CPUs without AMX.
struct F32Out {
  float* w;
  F32Out row(int64_t offset) const { return {w + offset}; }
  void one(int64_t n, int q, const float* scale, const float* zero) const {
    w[n] = static_cast<float>(q - 8) * scale[n] + zero[n];
  }
  __attribute__((target("avx512f"))) void sixteen(int64_t n, __m512i q, const float* scale,
                                                  const float* zero) const {
    emit16_f32(q, scale + n, zero + n, w + n);
  }
};

// One k of a full 64-row AVX-512 block starting at row `o`: 32 bytes, row j in the low
// nibble of byte j % 32 for j < 32, in the high nibble for j >= 32.
template <typename Out>
__attribute__((target("avx512f"))) void block64(const uint8_t* bytes, const float* scale, const float* zero,
                                                int64_t o, const Out& out) {
  const __m512i low = _mm512_set1_epi32(15);
  for (int part = 0; part < 2; ++part) {
    const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes + 16 * part)));
    const int64_t j = o + 16 * part;
    out.sixteen(j, _mm512_and_si512(v, low), scale, zero);
    out.sixteen(j + 32, _mm512_srli_epi32(v, 4), scale, zero);
  }
}

using ludus::has_avx512;

// What one call unpacks: rows [n0, n1) (block-aligned n0) of the weight, every k.
struct Packed {
  const uint8_t* bytes;
  const uint16_t* scales_zeros;  // [K / group][N][2]
  int64_t N, K, group, block_n;
  bool halves;
};

// Writes w[n][k] (in `Out`'s form) at k * ld + n - n0 of `out`, for the k of groups
// [g0, g1).
template <typename Out>
void unpack(const Packed& p, int64_t n0, int64_t n1, int64_t g0, int64_t g1, const Out& out, int64_t ld) {
  std::vector<float> scale(n1 - n0), zero(n1 - n0);
  for (int64_t g = g0; g < g1; ++g) {
    const uint16_t* sz = p.scales_zeros + (g * p.N + n0) * 2;
    for (int64_t n = 0; n < n1 - n0; ++n) {
      scale[n] = bf16_to_f32(sz[2 * n]);
      zero[n] = bf16_to_f32(sz[2 * n + 1]);
    }
    for (int64_t k = g * p.group; k < (g + 1) * p.group; ++k) {
      const Out row = out.row(k * ld);
      const float* s = scale.data();
      const float* z = zero.data();
      for (int64_t base = n0; base < n1; base += p.block_n) {
        const int64_t nb = std::min(p.block_n, p.N - base);
        const int64_t o = base - n0;  // the block's first row, counted from n0
        const uint8_t* bytes = p.bytes + base * p.K / 2 + k * nb / 2;
        if (p.halves && nb == p.block_n && nb == 64 && has_avx512()) {
          block64(bytes, s, z, o, row);
        } else if (p.halves && nb == p.block_n) {
          const int64_t half = nb / 2;
          for (int64_t j = 0; j < half; ++j) {
            row.one(o + j, bytes[j] & 15, s, z);
            row.one(o + half + j, bytes[j] >> 4, s, z);
          }
        } else {
          for (int64_t j = 0; j < nb / 2; ++j) {
            row.one(o + 2 * j, bytes[j] & 15, s, z);
            row.one(o + 2 * j + 1, bytes[j] >> 4, s, z);
          }
        }
      }
    }
  }
}

// Columns per tile: a multiple of every block size. A tile of a SmolLM2 projection (576 or
// 1536 inputs, 4 bytes a weight in either form) is 1.2 to 3 MiB at 512, mostly in cache; an
// 8B model's widest (14336 inputs) is 28 MiB, a scratch buffer the memory plan does not count.
constexpr int64_t TILE = 512;

bool bad_shape(int64_t N, int64_t K, int64_t group, int64_t block_n) {
  if (N > 0 && K > 0 && group > 0 && K % group == 0 && N % 2 == 0 && block_n > 0 && block_n % 32 == 0 &&
      TILE % block_n == 0) {
    return false;
  }
  int4_error = "bad int4 shape: N=" + std::to_string(N) + " K=" + std::to_string(K) + " group=" +
               std::to_string(group) + " block=" + std::to_string(block_n);
  return true;
}

template <typename F>
int guarded(F&& body) {
  try {
    body();
    return 0;
  } catch (const std::exception& e) {
    int4_error = e.what();
  } catch (...) {
    int4_error = "unknown C++ exception";
  }
  return -1;
}

}  // namespace

extern "C" {

// The message of the last failed call on this thread.
const char* ludus_int4_last_error() { return int4_error.c_str(); }

// Writes the split weight, transposed: out[k * N + n] = hi(w[n][k]) and
// out[(K + k) * N + n] = lo(w[n][k]), bf16 bits, for `packed` (N * K / 2 bytes) and
// `scales_zeros` ([K / group][N][2] bf16 bits). Returns 0, or -1 with a message.
int ludus_int4_dequantize_split(const uint8_t* packed, const uint16_t* scales_zeros, int64_t N, int64_t K,
                                int64_t group, int64_t block_n, int halves, uint16_t* out) {
  bool bad = false;
  const int rc = guarded([&] {
    if (bad_shape(N, K, group, block_n)) {
      bad = true;
      return;
    }
    const Packed p{packed, scales_zeros, N, K, group, block_n, halves != 0};
    at::parallel_for(0, (N + TILE - 1) / TILE, 1, [&](int64_t t0, int64_t t1) {
      const int64_t n0 = t0 * TILE;
      unpack(p, n0, std::min(N, t1 * TILE), 0, K / group, SplitOut{out + n0, out + K * N + n0}, N);
    });
  });
  return bad ? -1 : rc;
}

// `x W^T` for each of `count` bf16 inputs xs[i] [M_i, K] (contiguous) and the packed
// weight: new bf16 [M_i, N] tensors in outs[i], tile by tile of columns: all threads unpack
// a tile once, then each input is multiplied by it on its own. Each output is therefore the
// very product a call with that input alone gives (same shapes, same numbers): several
// prefill passes share one unpacking without changing a bit. With `f32` 0 the tile is the
// split pair and each product [x, x] · [hi; lo] runs in bf16; with 1 the tile is the f32
// weight and each product x · w runs in f32, rounded to bf16 at the end, as the kernel does.
int ludus_int4_linear_unpacked(const at::Tensor* const* xs, int64_t count, const uint8_t* packed,
                               const uint16_t* scales_zeros, int64_t N, int64_t group, int64_t block_n, int halves,
                               int f32, at::Tensor** outs) {
  bool bad = false;
  const int rc = guarded([&] {
    if (count < 1) {
      int4_error = "no input";
      bad = true;
      return;
    }
    if (xs[0]->dim() != 2) {
      int4_error = "an input that is not a matrix";
      bad = true;
      return;
    }
    const int64_t K = xs[0]->size(1);
    if (bad_shape(N, K, group, block_n)) {
      bad = true;
      return;
    }
    const Packed p{packed, scales_zeros, N, K, group, block_n, halves != 0};
    std::vector<at::Tensor> lhs;
    std::vector<std::unique_ptr<at::Tensor>> ys;
    for (int64_t i = 0; i < count; ++i) {
      if (xs[i]->dim() != 2 || xs[i]->size(1) != K) {
        int4_error = "inputs of different widths, or not matrices";
        bad = true;
        return;
      }
      lhs.push_back(f32 ? xs[i]->to(at::kFloat) : at::cat({*xs[i], *xs[i]}, 1));
      ys.push_back(std::make_unique<at::Tensor>(at::empty({xs[i]->size(0), N}, xs[i]->options())));
    }
    at::Tensor tile = f32 ? at::empty({K, TILE}, xs[0]->options().dtype(at::kFloat))
                          : at::empty({2 * K, TILE}, xs[0]->options());
    // Tiles one after another, each unpacked by all threads (split along k) and then
    // multiplied by all threads: libtorch's products are only fast outside a parallel
    // region.
    for (int64_t n0 = 0; n0 < N; n0 += TILE) {
      const int64_t width = std::min(TILE, N - n0);
      at::parallel_for(0, K / group, 1, [&](int64_t g0, int64_t g1) {
        if (f32) {
          unpack(p, n0, n0 + width, g0, g1, F32Out{tile.data_ptr<float>()}, TILE);
        } else {
          auto* bits = reinterpret_cast<uint16_t*>(tile.data_ptr());
          unpack(p, n0, n0 + width, g0, g1, SplitOut{bits, bits + K * TILE}, TILE);
        }
      });
      for (int64_t i = 0; i < count; ++i) {
        ys[i]->narrow(1, n0, width).copy_(at::mm(lhs[i], tile.narrow(1, 0, width)));
      }
    }
    for (int64_t i = 0; i < count; ++i) {
      outs[i] = ys[i].release();
    }
  });
  return bad ? -1 : rc;
}
}
