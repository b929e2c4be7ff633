// Ludus: one decode step of one sequence through a whole int4 Llama, in one call.
//
// At batch 1 a CPU step is not bound by the bytes of the weights but by libtorch's cost per
// operation: a few hundred small operations per token (norms, rotary, attention, cache
// writes, residual adds), each with its dispatch, allocation and iterator set-up
// (docs/benchmarks.md, "Where a batch-1 step goes"). Here the step is plain loops over the
// same memory: the weights as packed for libtorch's CPU int4 kernel (read in place, no copy),
// the int8 vocabulary table, the bf16 KV cache.
//
// The arithmetic follows the libtorch path it replaces (`inference::llama`), rounding to
// bf16 where that path stores a bf16 tensor: the residual stream, every norm's output, each
// projection's output, the rotated queries and keys, the attention output, the activation,
// and the logits (the int8 head returns bf16). Inside each operation sums run in f32, as
// libtorch's kernels do, in another order: outputs agree to within a bf16 step, which the
// tests in `inference::fused_decode` check against the libtorch step.
//
// Weight layout (see int4_dequant.cpp): rows in blocks of `block_n`; within a block, each
// input k holds block_n / 2 bytes; a full block with `halves` pairs row j (low nibble) with
// row j + block_n / 2 (high nibble), otherwise rows 2j and 2j + 1. w = (q - 8) * scale +
// zero, with scale and zero (bf16) per group of `group` inputs and row.

#include <ATen/Parallel.h>

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

inline float bf16_to_f32(uint16_t h) {
  uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// Round to nearest even, as libtorch converts f32 to bf16.
inline uint16_t f32_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;  // NaN stays NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

// f rounded to the nearest bf16, as an f32.
inline float round_bf16(float f) { return bf16_to_f32(f32_to_bf16(f)); }

bool has_avx512() {
  static const bool yes = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") != 0;
  }();
  return yes;
}

// ---- int4 products: one input row, rows [b0, b1) of blocks -------------------------------

struct Q4Call {
  const LudusQ4* w;
  int64_t group, block_n;
  bool halves;
  const float* x;     // [k], bf16 values
  const float* xsum;  // [k / group]: sum of x over each group
  float* out;         // [n], f32 sums (rounded by the caller)
};

// Any block, any CPU: the layout read byte by byte.
void q4_block_generic(const Q4Call& c, int64_t base) {
  const LudusQ4& w = *c.w;
  const int64_t nb = std::min(c.block_n, w.n - base);
  const bool halves = c.halves && nb == c.block_n;
  const uint8_t* block = w.packed + base * w.k / 2;
  float acc[64] = {0};
  float q[64];
  for (int64_t g = 0; g < w.k / c.group; ++g) {
    std::fill(q, q + nb, 0.0f);
    for (int64_t k = g * c.group; k < (g + 1) * c.group; ++k) {
      const float xk = c.x[k];
      const uint8_t* b = block + k * nb / 2;
      for (int64_t j = 0; j < nb / 2; ++j) {
        const int64_t lo = halves ? j : 2 * j, hi = halves ? j + nb / 2 : 2 * j + 1;
        q[lo] += static_cast<float>(b[j] & 15) * xk;
        q[hi] += static_cast<float>(b[j] >> 4) * xk;
      }
    }
    const uint16_t* sz = w.scales_zeros + (g * w.n + base) * 2;
    for (int64_t j = 0; j < nb; ++j) {
      const float s = bf16_to_f32(sz[2 * j]), z = bf16_to_f32(sz[2 * j + 1]);
      acc[j] += s * q[j] + (z - 8.0f * s) * c.xsum[g];
    }
  }
  std::copy(acc, acc + nb, c.out + base);
}

// A full 64-row AVX-512 block: 32 bytes per input, row j in the low nibble of byte j % 32
// for j < 32, in the high nibble for j >= 32.
__attribute__((target("avx512f"))) void q4_block64(const Q4Call& c, int64_t base) {
  const LudusQ4& w = *c.w;
  const uint8_t* block = w.packed + base * w.k / 2;
  const __m512i low = _mm512_set1_epi32(15);
  const __m512i high_half = _mm512_set1_epi32(static_cast<int>(0xffff0000u));
  __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
  for (int64_t g = 0; g < w.k / c.group; ++g) {
    __m512 q0 = _mm512_setzero_ps(), q1 = _mm512_setzero_ps(), q2 = _mm512_setzero_ps(),
           q3 = _mm512_setzero_ps();
    for (int64_t k = g * c.group; k < (g + 1) * c.group; ++k) {
      const __m512 xk = _mm512_set1_ps(c.x[k]);
      const uint8_t* b = block + k * 32;
      const __m512i v0 = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b)));
      const __m512i v1 = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 16)));
      q0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_and_si512(v0, low)), xk, q0);
      q1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_and_si512(v1, low)), xk, q1);
      q2 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(v0, 4)), xk, q2);
      q3 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(v1, 4)), xk, q3);
    }
    const __m512 sx = _mm512_set1_ps(c.xsum[g]);
    const __m512 qs[4] = {q0, q1, q2, q3};
    const uint16_t* sz = w.scales_zeros + (g * w.n + base) * 2;
    for (int r = 0; r < 4; ++r) {
      // 16 rows' (scale, zero) pairs: the scale in the low 16 bits of each 32-bit lane.
      const __m512i pairs = _mm512_loadu_si512(sz + 32 * r);
      const __m512 s = _mm512_castsi512_ps(_mm512_slli_epi32(pairs, 16));
      const __m512 z = _mm512_castsi512_ps(_mm512_and_si512(pairs, high_half));
      const __m512 offset = _mm512_fnmadd_ps(_mm512_set1_ps(8.0f), s, z);  // z - 8 s
      acc[r] = _mm512_fmadd_ps(offset, sx, _mm512_fmadd_ps(s, qs[r], acc[r]));
    }
  }
  for (int r = 0; r < 4; ++r) _mm512_storeu_ps(c.out + base + 16 * r, acc[r]);
}

void q4_blocks(const Q4Call& c, int64_t b0, int64_t b1) {
  const bool fast = c.halves && c.block_n == 64 && has_avx512();
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t base = b * c.block_n;
    if (fast && base + 64 <= c.w->n) {
      q4_block64(c, base);
    } else {
      q4_block_generic(c, base);
    }
  }
}

// out[0..n) = bf16(x W^T), x given as bf16 values in f32.
void q4_product(const LudusQ4& w, int64_t group, int64_t block_n, bool halves, const float* x, float* out) {
  std::vector<float> xsum(w.k / group);
  for (int64_t g = 0; g < w.k / group; ++g) {
    float s = 0.0f;
    for (int64_t k = g * group; k < (g + 1) * group; ++k) s += x[k];
    xsum[g] = s;
  }
  const Q4Call c{&w, group, block_n, halves, x, xsum.data(), out};
  const int64_t blocks = (w.n + block_n - 1) / block_n;
  at::parallel_for(0, blocks, 4, [&](int64_t b0, int64_t b1) { q4_blocks(c, b0, b1); });
  for (int64_t j = 0; j < w.n; ++j) out[j] = round_bf16(out[j]);
}

// ---- the int8 vocabulary table ------------------------------------------------------------

__attribute__((target("avx512f"))) float dot_i8_avx512(const int8_t* codes, const float* x, int64_t k) {
  __m512 acc = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= k; i += 16) {
    const __m512 w = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(codes + i))));
    acc = _mm512_fmadd_ps(w, _mm512_loadu_ps(x + i), acc);
  }
  float s = _mm512_reduce_add_ps(acc);
  for (; i < k; ++i) s += static_cast<float>(codes[i]) * x[i];
  return s;
}

float dot_i8(const int8_t* codes, const float* x, int64_t k) {
  if (has_avx512()) return dot_i8_avx512(codes, x, k);
  float s = 0.0f;
  for (int64_t i = 0; i < k; ++i) s += static_cast<float>(codes[i]) * x[i];
  return s;
}

// ---- the small operations ---------------------------------------------------------------

// bf16(x * rsqrt(mean(x²) + eps) * weight), the sums in f32, rounded once (libtorch's
// fused CPU kernel; rounding after the normalization too measured twice as far from the
// verifier on a tiny model).
void rms_norm(const float* x, const uint16_t* weight, int64_t d, float eps, float* out) {
  float ss = 0.0f;
  for (int64_t i = 0; i < d; ++i) ss += x[i] * x[i];
  const float rstd = 1.0f / std::sqrt(ss / static_cast<float>(d) + eps);
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

__attribute__((target("avx512f"))) float dot_bf16_avx512(const float* q, const uint16_t* k, int64_t n) {
  __m512 acc = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512i bits = _mm512_slli_epi32(
        _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(k + i))), 16);
    acc = _mm512_fmadd_ps(_mm512_loadu_ps(q + i), _mm512_castsi512_ps(bits), acc);
  }
  float s = _mm512_reduce_add_ps(acc);
  for (; i < n; ++i) s += q[i] * bf16_to_f32(k[i]);
  return s;
}

// q · k for bf16 k, summed in f32.
float dot_bf16(const float* q, const uint16_t* k, int64_t n) {
  if (has_avx512()) return dot_bf16_avx512(q, k, n);
  float s = 0.0f;
  for (int64_t i = 0; i < n; ++i) s += q[i] * bf16_to_f32(k[i]);
  return s;
}

// Attention of one query head over keys/values 0..=pos of its KV head ([max_len][hd], bf16),
// as libtorch's CPU flash kernel computes it for bf16: scores and softmax in f32, the
// weights rounded to bf16 for the product with the values.
void attend(const float* q, const uint16_t* keys, const uint16_t* values, int64_t len, int64_t hd, float scale,
            float* scores, float* out) {
  float max = -INFINITY;
  for (int64_t p = 0; p < len; ++p) {
    scores[p] = dot_bf16(q, keys + p * hd, hd) * scale;
    max = std::max(max, scores[p]);
  }
  float sum = 0.0f;
  for (int64_t p = 0; p < len; ++p) {
    scores[p] = std::exp(scores[p] - max);
    sum += scores[p];
  }
  std::fill(out, out + hd, 0.0f);
  for (int64_t p = 0; p < len; ++p) {
    const uint16_t* vp = values + p * hd;
    // libtorch's CPU flash kernel multiplies the values by the weights in bf16 (they are
    // rounded before its bf16 product), and divides by the f32 sum of unrounded ones.
    const float weight = round_bf16(scores[p]);
    for (int64_t i = 0; i < hd; ++i) out[i] += weight * bf16_to_f32(vp[i]);
  }
  for (int64_t i = 0; i < hd; ++i) out[i] = round_bf16(out[i] / sum);
}

std::string check_model(const LudusFusedModel& m) {
  if (m.hidden <= 0 || m.heads <= 0 || m.kv_heads <= 0 || m.heads % m.kv_heads != 0 || m.head_dim <= 0 ||
      m.head_dim % 2 != 0 || m.head_dim > 1024 || m.group <= 0 || m.block_n <= 0 || m.block_n > 64 ||
      m.block_n % 2 != 0 || m.layers <= 0 || m.vocab <= 0 || m.max_len <= 0 || m.slots <= 0) {
    return "bad model dimensions";
  }
  const int64_t qkv_rows = (m.heads + 2 * m.kv_heads) * m.head_dim;
  for (int64_t l = 0; l < m.layers; ++l) {
    const LudusFusedLayer& L = m.layer[l];
    const bool fits = L.qkv.k == m.hidden && L.qkv.n >= qkv_rows && L.o.k == m.heads * m.head_dim &&
                      L.o.n >= m.hidden && L.gate_up.k == m.hidden && L.gate_up.n >= 2 * m.intermediate &&
                      L.down.k == m.intermediate && L.down.n >= m.hidden;
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
      scores(pos + 1), gu(m.layer[0].gate_up.n), act(f);
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
    for (int64_t head = 0; head < h; ++head) {
      const int64_t j = head / groups;
      attend(qkv.data() + head * hd, keys + j * m.max_len * hd, values + j * m.max_len * hd, pos + 1, hd,
             m.attn_scale, scores.data(), attn.data() + head * hd);
    }
    q4_product(L.o, m.group, m.block_n, halves, attn.data(), proj.data());
    for (int64_t i = 0; i < d; ++i) x[i] = round_bf16(x[i] + proj[i]);
    rms_norm(x.data(), L.ffn_norm, d, m.eps, normed.data());
    if (static_cast<int64_t>(gu.size()) < L.gate_up.n) gu.resize(L.gate_up.n);
    q4_product(L.gate_up, m.group, m.block_n, halves, normed.data(), gu.data());
    for (int64_t i = 0; i < f; ++i) {
      const float g = gu[i];
      const float silu = round_bf16(g / (1.0f + std::exp(-g)));
      act[i] = round_bf16(silu * gu[f + i]);
    }
    q4_product(L.down, m.group, m.block_n, halves, act.data(), proj.data());
    for (int64_t i = 0; i < d; ++i) x[i] = round_bf16(x[i] + proj[i]);
  }
  rms_norm(x.data(), m.norm, d, m.eps, normed.data());
  for (int64_t i = 0; i < d; ++i) hidden_out[i] = f32_to_bf16(normed[i]);
  const float* hrow = normed.data();
  at::parallel_for(0, m.vocab, 256, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float s = dot_i8(m.head_codes + r * d, hrow, d) * bf16_to_f32(m.head_scales[r]);
      logits_out[r] = round_bf16(s);
    }
  });
}
}  // namespace

extern "C" {
const char* ludus_fused_last_error() { return fused_error.c_str(); }

// One decode step of the sequence in cache `slot` at position `pos` (tokens 0..pos-1 are
// cached): writes its key and value at `pos` in every layer, its final hidden state
// (`hidden` bf16 values) and its logits (`vocab` f32 values, bf16-rounded). 0 on success.
int ludus_fused_decode(const LudusFusedModel* model, uint16_t* const* k_cache, uint16_t* const* v_cache,
                       int64_t slot, int64_t token, int64_t pos, uint16_t* hidden_out, float* logits_out) {
  try {
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
  } catch (const std::exception& e) {
    fused_error = e.what();
    return 1;
  } catch (...) {
    fused_error = "unknown error";
    return 1;
  }
}
}
