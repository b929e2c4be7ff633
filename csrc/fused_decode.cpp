// Ludus: one decode step of one sequence through a whole int4 Llama, in one call.
//
// At batch 1 a CPU step is not bound by the bytes of the weights but by libtorch's cost per
// operation: a few hundred small operations per token (norms, rotary, attention, cache
// writes, residual adds), each with its dispatch, allocation and iterator set-up
// (docs/benchmarks.md, "Where a batch-1 step goes"). Here the step is plain loops over the
// same memory: the weights as packed for libtorch's CPU int4 kernel (read in place, no copy),
// the int8 vocabulary table, the bf16 KV cache; attention is one call of libtorch's own
// flash-attention kernel per layer.
//
// The step gives the libtorch path it replaces (`inference::llama`) bit for bit. It rounds
// to bf16 where that path stores a bf16 tensor (the residual stream, every norm's output,
// each projection's output, the rotated queries and keys, the attention output, the
// activation, the logits), and inside each operation it adds in the order of libtorch's own
// CPU kernel: the int4 and int8 products (one fused multiply-add chain per output, k in
// order), the norms' sums (the sum kernel's cascade); SiLU and attention are libtorch's own
// ops. The products follow whichever of libtorch 2.x's kernels runs here, its AVX-512 or its
// AVX2 one (each packs int4 in its own layout, which says which one runs: 64-row blocks for
// AVX-512, 32-row blocks for AVX2), and the sum its AVX2 one (it has no AVX-512 build);
// tests/it/fused_decode.rs holds the step to libtorch's, bit for bit, with each kernel.
//
// Weight layout (see int4_dequant.cpp): rows in blocks of `block_n`; within a block, each
// input k holds block_n / 2 bytes; a full block with `halves` pairs row j (low nibble) with
// row j + block_n / 2 (high nibble), otherwise rows 2j and 2j + 1. w = (q - 8) * scale +
// zero, with scale and zero (bf16) per group of `group` inputs and row.

#include "bf16.h"
#include "cpu_features.h"

#include <ATen/Parallel.h>
#include <ATen/ATen.h>

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <exception>
#include <string>
#include <vector>

extern "C" {
struct LudusQ4 {
  const uint8_t* packed;
  const uint16_t* scales_zeros;  // [k / group][n][2]
  int64_t n;                     // rows as packed (a multiple of 16)
  int64_t k;
};

struct LudusFusedLayer {
  const uint16_t* attn_norm;
  const uint16_t* ffn_norm;
  LudusQ4 qkv, o, gate_up, down;
};

struct LudusFusedModel {
  int64_t hidden, intermediate, heads, kv_heads, head_dim, vocab, layers, group, block_n, max_len, slots;
  int32_t halves;
  float eps, attn_scale;
  const LudusFusedLayer* layer;
  const int8_t* embed_codes;
  const uint16_t* embed_scales;
  const int8_t* head_codes;
  const uint16_t* head_scales;
  const uint16_t* norm;
  const float* rope_cos;  // [max_len][rotary / 2], f32 (rounded to bf16 here, as the path does)
  const float* rope_sin;
};
}

namespace {
thread_local std::string fused_error;

using ludus::bf16_to_f32;
using ludus::f32_to_bf16;
using ludus::round_bf16;

using ludus::has_avx2_fma;
using ludus::has_avx512;

// ---- int4 products: one input row, rows [b0, b1) of blocks -------------------------------

// Which of libtorch's int4 kernels the products follow: they dequantize alike, in another
// order (see below).
enum class Kernel { Avx512, Avx2 };

// libtorch's AVX2 kernel runs where it packs 32-row blocks pairing row j with row j + 16;
// its AVX-512 kernel packs 64-row blocks. (The plain build packs 32-row blocks of row pairs
// and computes without fused multiply-adds; the fused step is not taken there.)
Kernel kernel_of(int64_t block_n, bool halves) { return block_n == 32 && halves ? Kernel::Avx2 : Kernel::Avx512; }

struct Q4Call {
  const LudusQ4* w;
  int64_t group, block_n;
  bool halves;
  Kernel kernel;
  const float* x;  // [k], bf16 values
  float* out;      // [n], f32 sums (rounded by the caller)
};

// The products follow libtorch's int4 kernel (`_weight_int4pack_mm_for_cpu`) operation for
// operation, so that they give its results bit for bit: each row sums x[k] * w in one f32
// accumulator, k in order (a fused multiply-add), with each weight dequantized in f32 by
// another fused multiply-add:
//   AVX-512 kernel: w = fma(q - 8, scale, zero);
//   AVX2 kernel:    w = fma(q, scale, zero'), zero' = fma(scale, -8, zero) once per group.
// The two differ in the last bit now and then. A cheaper order (the codes summed per group,
// scaled once) differs from the kernel in about 2 outputs in 10,000, each a bf16 step that
// then spreads through the rest of the step.

// Dequantizes code q (0..15) as `kernel` does, with zero' already folded in for AVX2.
inline float dequant(Kernel kernel, uint8_t q, float scale, float zero) {
  return kernel == Kernel::Avx2 ? std::fma(static_cast<float>(q), scale, zero)
                                : std::fma(static_cast<float>(q) - 8.0f, scale, zero);
}

// Any block: the layout read byte by byte, the same arithmetic one row at a time.
void q4_block_generic(const Q4Call& c, int64_t base) {
  const LudusQ4& w = *c.w;
  const int64_t nb = std::min(c.block_n, w.n - base);
  const bool halves = c.halves && nb == c.block_n;
  const uint8_t* block = w.packed + base * w.k / 2;
  float acc[64] = {0};
  float scale[64], zero[64];
  for (int64_t k = 0; k < w.k; ++k) {
    if (k % c.group == 0) {
      const uint16_t* sz = w.scales_zeros + ((k / c.group) * w.n + base) * 2;
      for (int64_t j = 0; j < nb; ++j) {
        scale[j] = bf16_to_f32(sz[2 * j]);
        zero[j] = bf16_to_f32(sz[2 * j + 1]);
        if (c.kernel == Kernel::Avx2) zero[j] = std::fma(scale[j], -8.0f, zero[j]);
      }
    }
    const float xk = c.x[k];
    const uint8_t* b = block + k * nb / 2;
    for (int64_t j = 0; j < nb / 2; ++j) {
      const int64_t lo = halves ? j : 2 * j, hi = halves ? j + nb / 2 : 2 * j + 1;
      const float wlo = dequant(c.kernel, b[j] & 15, scale[lo], zero[lo]);
      const float whi = dequant(c.kernel, b[j] >> 4, scale[hi], zero[hi]);
      acc[lo] = std::fma(xk, wlo, acc[lo]);
      acc[hi] = std::fma(xk, whi, acc[hi]);
    }
  }
  std::copy(acc, acc + nb, c.out + base);
}

// A full 64-row AVX-512 block from row `base` on: 32 bytes per input, row j in the low
// nibble of byte j % 32 for j < 32, in the high nibble for j >= 32. Each row's sum is its
// own chain of fused multiply-adds in k order, as in libtorch's kernel. (Two blocks side by
// side, to overlap more chains, measured slower: docs/benchmarks.md.)
__attribute__((target("avx512f"))) void q4_block64(const Q4Call& c, int64_t base) {
  const LudusQ4& w = *c.w;
  const uint8_t* block = w.packed + base * w.k / 2;
  // Code q as the f32 value q - 8, by table.
  const __m512 centred = _mm512_setr_ps(-8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7);
  const __m512i high_half = _mm512_set1_epi32(static_cast<int>(0xffff0000u));
  __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
  __m512 scale[4], zero[4];
  for (int64_t k = 0; k < w.k; ++k) {
    if (k % c.group == 0) {
      const uint16_t* sz = w.scales_zeros + ((k / c.group) * w.n + base) * 2;
      for (int r = 0; r < 4; ++r) {
        // 16 rows' (scale, zero) pairs: the scale in the low 16 bits of each 32-bit lane.
        const __m512i pairs = _mm512_loadu_si512(sz + 32 * r);
        scale[r] = _mm512_castsi512_ps(_mm512_slli_epi32(pairs, 16));
        zero[r] = _mm512_castsi512_ps(_mm512_and_si512(pairs, high_half));
      }
    }
    const __m512 xk = _mm512_set1_ps(c.x[k]);
    const uint8_t* b = block + k * 32;
    const __m512i v0 = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b)));
    const __m512i v1 = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 16)));
    // The table looks at the low 4 bits of each lane: rows 0-15, 16-31 (low nibbles),
    // 32-47, 48-63 (high nibbles).
    const __m512i codes[4] = {v0, v1, _mm512_srli_epi32(v0, 4), _mm512_srli_epi32(v1, 4)};
    for (int r = 0; r < 4; ++r) {
      const __m512 wr = _mm512_fmadd_ps(_mm512_permutexvar_ps(codes[r], centred), scale[r], zero[r]);
      acc[r] = _mm512_fmadd_ps(xk, wr, acc[r]);
    }
  }
  for (int r = 0; r < 4; ++r) _mm512_storeu_ps(c.out + base + 16 * r, acc[r]);
}

// A full 32-row AVX2 block from row `base` on: 16 bytes per input, row j in the low nibble
// of byte j for j < 16, in the high nibble of byte j - 16 for j >= 16; dequantized and summed
// as libtorch's AVX2 kernel does, 8 rows to a vector.
__attribute__((target("avx2,fma"))) void q4_block32_avx2(const Q4Call& c, int64_t base) {
  const LudusQ4& w = *c.w;
  const uint8_t* block = w.packed + base * w.k / 2;
  const __m256i low_nibble = _mm256_set1_epi32(15);
  const __m256i high_half = _mm256_set1_epi32(static_cast<int>(0xffff0000u));
  const __m256 minus_eight = _mm256_set1_ps(-8.0f);
  __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
  __m256 scale[4], zero[4];
  for (int64_t k = 0; k < w.k; ++k) {
    if (k % c.group == 0) {
      const uint16_t* sz = w.scales_zeros + ((k / c.group) * w.n + base) * 2;
      for (int r = 0; r < 4; ++r) {
        // 8 rows' (scale, zero) pairs: the scale in the low 16 bits of each 32-bit lane.
        const __m256i pairs = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(sz + 16 * r));
        scale[r] = _mm256_castsi256_ps(_mm256_slli_epi32(pairs, 16));
        const __m256 z = _mm256_castsi256_ps(_mm256_and_si256(pairs, high_half));
        zero[r] = _mm256_fmadd_ps(scale[r], minus_eight, z);
      }
    }
    const __m256 xk = _mm256_set1_ps(c.x[k]);
    const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(block + k * 16));
    const __m256i v0 = _mm256_cvtepu8_epi32(bytes);                     // bytes 0-7
    const __m256i v1 = _mm256_cvtepu8_epi32(_mm_srli_si128(bytes, 8));  // bytes 8-15
    // Rows 0-7, 8-15 (low nibbles), 16-23, 24-31 (high nibbles).
    const __m256i codes[4] = {_mm256_and_si256(v0, low_nibble), _mm256_and_si256(v1, low_nibble),
                              _mm256_srli_epi32(v0, 4), _mm256_srli_epi32(v1, 4)};
    for (int r = 0; r < 4; ++r) {
      const __m256 wr = _mm256_fmadd_ps(_mm256_cvtepi32_ps(codes[r]), scale[r], zero[r]);
      acc[r] = _mm256_fmadd_ps(xk, wr, acc[r]);
    }
  }
  for (int r = 0; r < 4; ++r) _mm256_storeu_ps(c.out + base + 8 * r, acc[r]);
}

void q4_blocks(const Q4Call& c, int64_t b0, int64_t b1) {
  const bool fast512 = c.kernel == Kernel::Avx512 && c.halves && c.block_n == 64 && has_avx512();
  const bool fast256 = c.kernel == Kernel::Avx2 && c.halves && c.block_n == 32 && has_avx2_fma();
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t base = b * c.block_n;
    if (fast512 && base + 64 <= c.w->n) {
      q4_block64(c, base);
    } else if (fast256 && base + 32 <= c.w->n) {
      q4_block32_avx2(c, base);
    } else {
      q4_block_generic(c, base);
    }
  }
}

// out[0..n) = bf16(x W^T), x given as bf16 values in f32.
void q4_product(const LudusQ4& w, int64_t group, int64_t block_n, bool halves, const float* x, float* out) {
  const Q4Call c{&w, group, block_n, halves, kernel_of(block_n, halves), x, out};
  const int64_t blocks = (w.n + block_n - 1) / block_n;
  at::parallel_for(0, blocks, 4, [&](int64_t b0, int64_t b1) { q4_blocks(c, b0, b1); });
  for (int64_t j = 0; j < w.n; ++j) out[j] = round_bf16(out[j]);
}

// ---- the int8 vocabulary table ------------------------------------------------------------

// Inputs `from..k` past the kernel's last whole vector, one at a time.
float dot_i8_tail(const int8_t* codes, float scale, const float* x, int64_t from, int64_t k, float total) {
  for (int64_t i = from; i < k; ++i) total += x[i] * (static_cast<float>(codes[i]) * scale);
  return total;
}

// One logit as libtorch's AVX-512 int8 kernel (`_weight_int8pack_mm`) computes it: each
// weight dequantized in f32 (code * scale), 16 lanes of fused multiply-adds, the lanes summed
// by the compiler's reduction.
__attribute__((target("avx512f"))) float dot_i8_avx512(const int8_t* codes, float scale, const float* x, int64_t k) {
  const __m512 s = _mm512_set1_ps(scale);
  __m512 acc = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= k; i += 16) {
    const __m512 w = _mm512_mul_ps(
        _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(codes + i)))), s);
    acc = _mm512_fmadd_ps(_mm512_loadu_ps(x + i), w, acc);
  }
  return dot_i8_tail(codes, scale, x, i, k, _mm512_reduce_add_ps(acc));
}

// The same logit as libtorch's AVX2 int8 kernel computes it: 8 lanes of fused multiply-adds
// over k in steps of 8, then the lanes summed as its own reduction does: lane i with lane
// i + 4, then i with i + 2, then the two left.
float reduce8(const float lane[8]) {
  const float a0 = lane[0] + lane[4], a1 = lane[1] + lane[5], a2 = lane[2] + lane[6], a3 = lane[3] + lane[7];
  return (a0 + a2) + (a1 + a3);
}

__attribute__((target("avx2,fma"))) float dot_i8_avx2(const int8_t* codes, float scale, const float* x, int64_t k) {
  const __m256 s = _mm256_set1_ps(scale);
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= k; i += 8) {
    const __m256 w = _mm256_mul_ps(
        _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(codes + i)))), s);
    acc = _mm256_fmadd_ps(_mm256_loadu_ps(x + i), w, acc);
  }
  alignas(32) float lane[8];
  _mm256_store_ps(lane, acc);
  return dot_i8_tail(codes, scale, x, i, k, reduce8(lane));
}

float dot_i8(Kernel kernel, const int8_t* codes, float scale, const float* x, int64_t k) {
  if (kernel == Kernel::Avx2) return dot_i8_avx2(codes, scale, x, k);  // check_model: the CPU has AVX2
  if (has_avx512()) return dot_i8_avx512(codes, scale, x, k);
  return dot_i8_tail(codes, scale, x, 0, k, 0.0f);
}

// ---- the small operations ---------------------------------------------------------------

// The sum of n f32 values (n >= 8) in the order libtorch's sum kernel adds a contiguous row
// (`at::sum`, which the norm's mean is; libtorch has no AVX-512 build of that kernel, so its
// AVX2 one runs, 8 lanes wide): lane-wise partial sums over groups of 4 vectors, those groups
// added in a cascade of 16 at a time, the vectors past the last group, then the values past
// the last vector, then the 8 lanes one by one. The same values in another order differ in
// the last bit now and then, and a norm's output then in its last bf16 bit. Checked against
// `at::sum` for every width from 8 to 5,000 (tests/it/fused_decode.rs).
float row_sum(const float* v, int64_t n) {
  constexpr int64_t lanes = 8, ilp = 4, levels = 4, step = 16;  // 16 = 2^max(4, log2(rows) / 4)
  const int64_t vectors = n / lanes, rows = vectors / ilp;
  float acc[levels][ilp][lanes] = {};
  auto add_row = [&](int64_t r) {
    for (int64_t t = 0; t < ilp; ++t)
      for (int64_t l = 0; l < lanes; ++l) acc[0][t][l] += v[(r * ilp + t) * lanes + l];
  };
  int64_t r = 0;
  while (r + step <= rows) {
    for (int64_t j = 0; j < step; ++j, ++r) add_row(r);
    for (int64_t lv = 1; lv < levels; ++lv) {
      for (int64_t t = 0; t < ilp; ++t)
        for (int64_t l = 0; l < lanes; ++l) {
          acc[lv][t][l] += acc[lv - 1][t][l];
          acc[lv - 1][t][l] = 0.0f;
        }
      if ((r & ((step - 1) << (lv * 4))) != 0) break;
    }
  }
  for (; r < rows; ++r) add_row(r);
  for (int64_t lv = 1; lv < levels; ++lv)
    for (int64_t t = 0; t < ilp; ++t)
      for (int64_t l = 0; l < lanes; ++l) acc[0][t][l] += acc[lv][t][l];
  for (int64_t i = rows * ilp; i < vectors; ++i)
    for (int64_t l = 0; l < lanes; ++l) acc[0][0][l] += v[i * lanes + l];
  for (int64_t t = 1; t < ilp; ++t)
    for (int64_t l = 0; l < lanes; ++l) acc[0][0][l] += acc[0][t][l];
  float total = 0.0f;
  for (int64_t i = vectors * lanes; i < n; ++i) total += v[i];
  for (int64_t l = 0; l < lanes; ++l) total += acc[0][0][l];
  return total;
}

// bf16(x * rsqrt(mean(x²) + eps) * weight) as libtorch's rms_norm computes it for bf16: in
// f32, the mean as a sum divided by the width, one rounding at the end.
void rms_norm(const float* x, const uint16_t* weight, int64_t d, float eps, float* out) {
  for (int64_t i = 0; i < d; ++i) out[i] = x[i] * x[i];  // exact: x holds bf16 values
  const float rstd = 1.0f / std::sqrt(row_sum(out, d) / static_cast<float>(d) + eps);
  for (int64_t i = 0; i < d; ++i) out[i] = round_bf16(x[i] * rstd * bf16_to_f32(weight[i]));
}

// Half-split rotary embedding of one head in place, with bf16 cos and sin (the path's
// rotation matrix is in the model's dtype): each output sums two exact f32 products.
void rotate(float* v, const float* cos, const float* sin, int64_t half) {
  for (int64_t i = 0; i < half; ++i) {
    const float c = round_bf16(cos[i]), s = round_bf16(sin[i]);
    const float a = v[i], b = v[i + half];
    v[i] = round_bf16(a * c - b * s);
    v[i + half] = round_bf16(a * s + b * c);
  }
}

// Attention of the step's query heads over keys and values 0..pos of the cache ([kv heads]
// [max_len][hd] each, bf16), through libtorch's own CPU flash-attention kernel with the
// shapes libtorch's step gives it (query [1, kv, groups, hd], the cache narrowed in place):
// the scores, the softmax (its fast exp, its bf16 weights) and the product with the values
// then come out bit for bit as libtorch's step computes them. A written-out loop in
// another order, with another exp, put the step measurably farther from the verifier's
// prefill than libtorch's own step (docs/benchmarks.md, "Fused batch-1 decode").
void attend(const float* q, uint16_t* keys, uint16_t* values, int64_t kv, int64_t groups, int64_t max_len,
            int64_t len, int64_t hd, float scale, const at::Tensor& query, float* out) {
  const int64_t n = kv * groups * hd;
  auto* q_bits = reinterpret_cast<uint16_t*>(query.data_ptr());
  for (int64_t i = 0; i < n; ++i) q_bits[i] = f32_to_bf16(q[i]);
  const std::vector<int64_t> strides{kv * max_len * hd, max_len * hd, hd, 1};
  const at::Tensor k = at::from_blob(keys, {1, kv, len, hd}, strides, at::kBFloat16);
  const at::Tensor v = at::from_blob(values, {1, kv, len, hd}, strides, at::kBFloat16);
  const at::Tensor o =
      std::get<0>(at::_scaled_dot_product_flash_attention_for_cpu(query, k, v, 0.0, false, std::nullopt, scale))
          .contiguous();
  const auto* bits = reinterpret_cast<const uint16_t*>(o.const_data_ptr());
  for (int64_t i = 0; i < n; ++i) out[i] = bf16_to_f32(bits[i]);
}

// act = bf16(bf16(silu(gate)) * up) for bf16 gate and up values, with libtorch's own SiLU
// (its vectorized exp differs from the C library's in the last bit now and then) on a
// buffer of the gate's width, as libtorch's step runs it; the product of two bf16 values is
// exact in f32, so its one rounding is libtorch's.
void silu_times_up(const float* gate, const float* up, int64_t f, at::Tensor buffer, float* act) {
  auto* g = reinterpret_cast<uint16_t*>(buffer.data_ptr());
  for (int64_t i = 0; i < f; ++i) g[i] = f32_to_bf16(gate[i]);
  at::silu_(buffer);
  for (int64_t i = 0; i < f; ++i) act[i] = round_bf16(bf16_to_f32(g[i]) * up[i]);
}

std::string check_model(const LudusFusedModel& m) {
  if (m.hidden <= 0 || m.heads <= 0 || m.kv_heads <= 0 || m.heads % m.kv_heads != 0 || m.head_dim <= 0 ||
      m.head_dim % 2 != 0 || m.head_dim > 1024 || m.group <= 0 || m.block_n <= 0 || m.block_n > 64 ||
      m.block_n % 2 != 0 || m.layers <= 0 || m.vocab <= 0 || m.max_len <= 0 || m.slots <= 0) {
    return "bad model dimensions";
  }
  if (m.halves == 0 || (m.block_n != 32 && m.block_n != 64)) {
    return "int4 not packed for libtorch's AVX-512 or AVX2 kernel";
  }
  if (kernel_of(m.block_n, m.halves != 0) == Kernel::Avx2 && !has_avx2_fma()) {
    return "int4 packed for libtorch's AVX2 kernel on a CPU without AVX2";
  }
  const int64_t qkv_rows = (m.heads + 2 * m.kv_heads) * m.head_dim;
  for (int64_t l = 0; l < m.layers; ++l) {
    const LudusFusedLayer& L = m.layer[l];
    const bool fits = L.qkv.k == m.hidden && L.qkv.n >= qkv_rows && L.o.k == m.heads * m.head_dim &&
                      L.o.n >= m.hidden && L.gate_up.k == m.hidden && L.gate_up.n >= 2 * m.intermediate &&
                      L.down.k == m.intermediate && L.down.n >= m.hidden &&
                      L.o.n <= std::max(m.hidden, 2 * m.intermediate) &&
                      L.down.n <= std::max(m.hidden, 2 * m.intermediate);
    const LudusQ4* all[] = {&L.qkv, &L.o, &L.gate_up, &L.down};
    for (const LudusQ4* w : all) {
      if (w->k % m.group != 0 || w->n % 2 != 0) return "layer " + std::to_string(l) + ": bad int4 shape";
    }
    if (!fits) return "layer " + std::to_string(l) + ": projection shapes do not fit the model";
  }
  return "";
}

void decode(const LudusFusedModel& m, uint16_t* const* k_cache, uint16_t* const* v_cache, int64_t slot,
            int64_t token, int64_t pos, uint16_t* hidden_out, float* logits_out) {
  const int64_t d = m.hidden, f = m.intermediate, hd = m.head_dim, h = m.heads, kv = m.kv_heads;
  const int64_t groups = h / kv, half = hd / 2;
  const bool halves = m.halves != 0;
  std::vector<float> x(d), normed(std::max(d, f)), qkv(m.layer[0].qkv.n), attn(h * hd), proj(std::max(d, 2 * f)),
      gu(m.layer[0].gate_up.n), act(f);
  // Buffers libtorch's ops read and write, allocated as libtorch allocates its own tensors
  // (the same alignment, which some of MKL's code paths are sensitive to).
  const at::Tensor query = at::empty({1, kv, groups, hd}, at::kBFloat16);
  const at::Tensor gate = at::empty({1, f}, at::kBFloat16);
  // The embedding row: bf16(code * scale).
  const float escale = bf16_to_f32(m.embed_scales[token]);
  for (int64_t i = 0; i < d; ++i) x[i] = round_bf16(static_cast<float>(m.embed_codes[token * d + i]) * escale);
  const float* cos = m.rope_cos + pos * half;
  const float* sin = m.rope_sin + pos * half;
  const int64_t slot_stride = kv * m.max_len * hd;
  for (int64_t l = 0; l < m.layers; ++l) {
    const LudusFusedLayer& L = m.layer[l];
    rms_norm(x.data(), L.attn_norm, d, m.eps, normed.data());
    if (static_cast<int64_t>(qkv.size()) < L.qkv.n) qkv.resize(L.qkv.n);
    q4_product(L.qkv, m.group, m.block_n, halves, normed.data(), qkv.data());
    for (int64_t head = 0; head < h + kv; ++head) rotate(qkv.data() + head * hd, cos, sin, half);
    uint16_t* keys = k_cache[l] + slot * slot_stride;
    uint16_t* values = v_cache[l] + slot * slot_stride;
    for (int64_t j = 0; j < kv; ++j) {
      const float* kj = qkv.data() + (h + j) * hd;
      const float* vj = qkv.data() + (h + kv + j) * hd;
      uint16_t* kdst = keys + (j * m.max_len + pos) * hd;
      uint16_t* vdst = values + (j * m.max_len + pos) * hd;
      for (int64_t i = 0; i < hd; ++i) {
        kdst[i] = f32_to_bf16(kj[i]);
        vdst[i] = f32_to_bf16(vj[i]);
      }
    }
    attend(qkv.data(), keys, values, kv, groups, m.max_len, pos + 1, hd, m.attn_scale, query, attn.data());
    q4_product(L.o, m.group, m.block_n, halves, attn.data(), proj.data());
    for (int64_t i = 0; i < d; ++i) x[i] = round_bf16(x[i] + proj[i]);
    rms_norm(x.data(), L.ffn_norm, d, m.eps, normed.data());
    if (static_cast<int64_t>(gu.size()) < L.gate_up.n) gu.resize(L.gate_up.n);
    q4_product(L.gate_up, m.group, m.block_n, halves, normed.data(), gu.data());
    silu_times_up(gu.data(), gu.data() + f, f, gate, act.data());
    q4_product(L.down, m.group, m.block_n, halves, act.data(), proj.data());
    for (int64_t i = 0; i < d; ++i) x[i] = round_bf16(x[i] + proj[i]);
  }
  rms_norm(x.data(), m.norm, d, m.eps, normed.data());
  for (int64_t i = 0; i < d; ++i) hidden_out[i] = f32_to_bf16(normed[i]);
  const float* hrow = normed.data();
  const Kernel kernel = kernel_of(m.block_n, halves);
  at::parallel_for(0, m.vocab, 256, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      logits_out[r] = round_bf16(dot_i8(kernel, m.head_codes + r * d, bf16_to_f32(m.head_scales[r]), hrow, d));
    }
  });
}
}  // namespace

// Runs `body` (which returns 0 on success), any C++ exception an error with its message.
template <class F>
int guarded(F&& body) {
  try {
    return body();
  } catch (const std::exception& e) {
    fused_error = e.what();
    return 1;
  } catch (...) {
    fused_error = "unknown error";
    return 1;
  }
}

extern "C" {
const char* ludus_fused_last_error() { return fused_error.c_str(); }

// The norms' sum of n values (libtorch's order for n >= 8), for the test that checks it.
float ludus_fused_row_sum(const float* values, int64_t n) { return n > 0 ? row_sum(values, n) : 0.0f; }

// `rows` int4 products as the step computes them (x: rows × k bf16 values in f32, out: rows
// × n bf16), for the test that holds them to libtorch's kernel. 0 on success.
int ludus_fused_q4_product(const uint8_t* packed, const uint16_t* scales_zeros, int64_t n, int64_t k, int64_t group,
                           int64_t block_n, int32_t halves, const float* x, int64_t rows, uint16_t* out) {
  return guarded([&] {
    if (n <= 0 || n % 2 != 0 || k <= 0 || group <= 0 || k % group != 0 || rows < 0 ||
        (block_n != 32 && block_n != 64) || halves == 0) {
      fused_error = "bad int4 product shape or layout";
      return 1;
    }
    const LudusQ4 w{packed, scales_zeros, n, k};
    std::vector<float> sums(n);
    for (int64_t r = 0; r < rows; ++r) {
      q4_product(w, group, block_n, halves != 0, x + r * k, sums.data());
      for (int64_t j = 0; j < n; ++j) out[r * n + j] = f32_to_bf16(sums[j]);
    }
    return 0;
  });
}

// One decode step of the sequence in cache `slot` at position `pos` (tokens 0..pos-1 are
// cached): writes its key and value at `pos` in every layer, its final hidden state
// (`hidden` bf16 values) and its logits (`vocab` f32 values, bf16-rounded). 0 on success.
int ludus_fused_decode(const LudusFusedModel* model, uint16_t* const* k_cache, uint16_t* const* v_cache,
                       int64_t slot, int64_t token, int64_t pos, uint16_t* hidden_out, float* logits_out) {
  return guarded([&] {
    const LudusFusedModel& m = *model;
    const std::string bad = check_model(m);
    if (!bad.empty()) {
      fused_error = bad;
      return 1;
    }
    if (token < 0 || token >= m.vocab || pos < 0 || pos >= m.max_len || slot < 0 || slot >= m.slots) {
      fused_error = "token " + std::to_string(token) + ", position " + std::to_string(pos) + " or slot " +
                    std::to_string(slot) + " out of range";
      return 1;
    }
    decode(m, k_cache, v_cache, slot, token, pos, hidden_out, logits_out);
    return 0;
  });
}
}
