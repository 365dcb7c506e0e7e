// The kernels compiled with AVX-512 (F, BW, VL, DQ) + FMA enabled, plus intrinsics micro-kernels for attention.
// Selected at run time only when the CPU has these extensions (ops.cpp). AVX512-BF16 is not required: the one
// float -> bfloat16 conversion here is done with integer AVX-512F instructions, so Skylake-SP / Cascade Lake /
// Ice Lake Xeons (no AVX512-BF16) get this path too. Every header is
// included BEFORE the target pragma, and this file instantiates no std:: template, so no code compiled for
// AVX-512 can be picked by the linker for a function that the baseline also uses.
#include <immintrin.h>

#include <cstdint>
#include <cstdlib>

#include "kernels.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define FASTBERT_AVX512 1
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,bmi2"))), \
                             apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,bmi2")
#endif

namespace fastbert {
namespace avx512 {

#include "kernels_dropout.h"

// exp(x) for x <= 0 (softmax after max subtraction): x = n ln2 + r, |r| <= ln2/2, degree-7 Taylor polynomial
// (relative error < 1e-8 before rounding), scaled by 2^n with scalef (which also flushes large -n to 0).
static inline __m512 exp512(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-104.0f));  // below this expf is 0 in float32 anyway
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);  // ln2 split hi/lo for exact n*ln2
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187045e-06f), r);
  __m512 p = _mm512_set1_ps(1.0f / 5040.0f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 720.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

// 16 floats -> 16 bfloat16, round to nearest even, NaN kept quiet: the same rounding as f32_to_bf16 (and torch).
static inline __m256i cvt_ps_bf16(__m512 v) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff)));
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  r = _mm512_mask_or_epi32(r, nan, u, _mm512_set1_epi32(0x00400000));
  return _mm512_cvtepi32_epi16(_mm512_srli_epi32(r, 16));
}

// S[r, j] = sum_d q[r, d] * kt[d, j] for R (<= 8) query rows and all Lp (multiple of 16) keys: 2R accumulators,
// and each pair of kt loads feeds 2R FMAs.
template <int R>
static inline void qk_block(const float* qb, int D, const float* kt, int Lp, float* s) {
  const float* q[R];  // row pointers: the inner loop then needs no 32-bit index arithmetic per broadcast
  for (int r = 0; r < R; ++r) q[r] = qb + static_cast<int64_t>(r) * D;
  int j = 0;
  for (; j + 32 <= Lp; j += 32) {
    __m512 a0[R], a1[R];
    for (int r = 0; r < R; ++r) a0[r] = a1[r] = _mm512_setzero_ps();
    for (int d = 0; d < D; ++d) {
      const float* kr = kt + static_cast<int64_t>(d) * Lp + j;
      const __m512 k0 = _mm512_loadu_ps(kr);
      const __m512 k1 = _mm512_loadu_ps(kr + 16);
      for (int r = 0; r < R; ++r) {
        const __m512 qv = _mm512_set1_ps(q[r][d]);
        a0[r] = _mm512_fmadd_ps(qv, k0, a0[r]);
        a1[r] = _mm512_fmadd_ps(qv, k1, a1[r]);
      }
    }
    for (int r = 0; r < R; ++r) {
      _mm512_storeu_ps(s + static_cast<int64_t>(r) * Lp + j, a0[r]);
      _mm512_storeu_ps(s + static_cast<int64_t>(r) * Lp + j + 16, a1[r]);
    }
  }
  for (; j < Lp; j += 16) {
    __m512 a0[R];
    for (int r = 0; r < R; ++r) a0[r] = _mm512_setzero_ps();
    for (int d = 0; d < D; ++d) {
      const __m512 k0 = _mm512_loadu_ps(kt + static_cast<int64_t>(d) * Lp + j);
      for (int r = 0; r < R; ++r) a0[r] = _mm512_fmadd_ps(_mm512_set1_ps(q[r][d]), k0, a0[r]);
    }
    for (int r = 0; r < R; ++r) _mm512_storeu_ps(s + static_cast<int64_t>(r) * Lp + j, a0[r]);
  }
}

// In place: s[j] = exp(s[j] - max) for j < L; returns the sum and writes the max to *row_max.
static inline float softmax_row(float* s, int L, float* row_max) {
  __m512 mx = _mm512_set1_ps(-__builtin_inff());
  int j = 0;
  for (; j + 16 <= L; j += 16) mx = _mm512_max_ps(mx, _mm512_loadu_ps(s + j));
  const __mmask16 tail = static_cast<__mmask16>((1u << (L - j)) - 1u);
  if (L > j) mx = _mm512_max_ps(mx, _mm512_mask_loadu_ps(_mm512_set1_ps(-__builtin_inff()), tail, s + j));
  *row_max = _mm512_reduce_max_ps(mx);
  const __m512 m = _mm512_set1_ps(*row_max);
  __m512 sum = _mm512_setzero_ps();
  for (j = 0; j + 16 <= L; j += 16) {
    const __m512 e = exp512(_mm512_sub_ps(_mm512_loadu_ps(s + j), m));
    _mm512_storeu_ps(s + j, e);
    sum = _mm512_add_ps(sum, e);
  }
  if (L > j) {
    const __m512 e = exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(tail, s + j), m));
    _mm512_mask_storeu_ps(s + j, tail, e);
    sum = _mm512_mask_add_ps(sum, tail, sum, e);
  }
  return _mm512_reduce_add_ps(sum);
}

// out[r, :] = inv[r] * sum_j p[r, j] v[j, :] for R rows, D = 16 * NV.
template <int NV, int R>
static inline void pv_block(const float* s, int Lp, int L, const float* v, int64_t ldv, const float* inv,
                            bool bf16, void* out, int64_t ldo) {
  __m512 acc[R][NV];
  for (int r = 0; r < R; ++r)
    for (int k = 0; k < NV; ++k) acc[r][k] = _mm512_setzero_ps();
  for (int j = 0; j < L; ++j) {
    const float* vr = v + j * ldv;
    __m512 vv[NV];
    for (int k = 0; k < NV; ++k) vv[k] = _mm512_loadu_ps(vr + 16 * k);
    for (int r = 0; r < R; ++r) {
      const __m512 p = _mm512_set1_ps(s[static_cast<int64_t>(r) * Lp + j]);
      for (int k = 0; k < NV; ++k) acc[r][k] = _mm512_fmadd_ps(p, vv[k], acc[r][k]);
    }
  }
  for (int r = 0; r < R; ++r) {
    const __m512 sc = _mm512_set1_ps(inv[r]);
    if (bf16) {
      uint16_t* o = static_cast<uint16_t*>(out) + r * ldo;
      for (int k = 0; k < NV; ++k) {
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + 16 * k), cvt_ps_bf16(_mm512_mul_ps(acc[r][k], sc)));
      }
    } else {
      float* o = static_cast<float*>(out) + r * ldo;
      for (int k = 0; k < NV; ++k) _mm512_storeu_ps(o + 16 * k, _mm512_mul_ps(acc[r][k], sc));
    }
  }
}

// Rows 0..R of the PV product in sub-blocks that keep R*NV accumulators + NV values within 32 zmm registers.
template <int NV>
static inline void pv_rows(int R, const float* s, int Lp, int L, const float* v, int64_t ldv, const float* inv,
                           bool bf16, void* out, int64_t ldo) {
  constexpr int kMaxRows = NV <= 2 ? 8 : NV <= 3 ? 6 : NV <= 5 ? 4 : NV <= 7 ? 3 : 2;
  int r = 0;
  for (; r + kMaxRows <= R; r += kMaxRows)
    pv_block<NV, kMaxRows>(s + static_cast<int64_t>(r) * Lp, Lp, L, v, ldv, inv + r, bf16,
                           static_cast<char*>(out) + r * ldo * (bf16 ? 2 : 4), ldo);
  // A sequence's last rows: still several rows per pass over V.
  if constexpr (kMaxRows > 4)
    for (; r + 4 <= R; r += 4)
      pv_block<NV, 4>(s + static_cast<int64_t>(r) * Lp, Lp, L, v, ldv, inv + r, bf16,
                      static_cast<char*>(out) + r * ldo * (bf16 ? 2 : 4), ldo);
  if constexpr (kMaxRows > 2)
    for (; r + 2 <= R; r += 2)
      pv_block<NV, 2>(s + static_cast<int64_t>(r) * Lp, Lp, L, v, ldv, inv + r, bf16,
                      static_cast<char*>(out) + r * ldo * (bf16 ? 2 : 4), ldo);
  for (; r < R; ++r)
    pv_block<NV, 1>(s + static_cast<int64_t>(r) * Lp, Lp, L, v, ldv, inv + r, bf16,
                    static_cast<char*>(out) + r * ldo * (bf16 ? 2 : 4), ldo);
}

// In place: r[c][i] <- r[i][c] for a 16 x 16 block (64 shuffles: unpack ps, unpack pd, two 128-bit lane shuffles).
static inline void transpose16x16(__m512 r[16]) {
  __m512 t[16];
  for (int i = 0; i < 8; ++i) {  // per 128-bit lane L: rows 2i, 2i+1 interleaved at columns 4L, 4L+1 / 4L+2, 4L+3
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  __m512 u[4][4];  // u[g][k], lane L: rows 4g..4g+3 at column 4L + k
  for (int g = 0; g < 4; ++g) {
    const __m512d a = _mm512_castps_pd(t[4 * g]), b = _mm512_castps_pd(t[4 * g + 2]);
    const __m512d c = _mm512_castps_pd(t[4 * g + 1]), d = _mm512_castps_pd(t[4 * g + 3]);
    u[g][0] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, b));
    u[g][1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, b));
    u[g][2] = _mm512_castpd_ps(_mm512_unpacklo_pd(c, d));
    u[g][3] = _mm512_castpd_ps(_mm512_unpackhi_pd(c, d));
  }
  for (int k = 0; k < 4; ++k) {  // column 4L + k gathers lane L of u[0..3][k]
    const __m512 lo01 = _mm512_shuffle_f32x4(u[0][k], u[1][k], 0x44), hi01 = _mm512_shuffle_f32x4(u[0][k], u[1][k], 0xEE);
    const __m512 lo23 = _mm512_shuffle_f32x4(u[2][k], u[3][k], 0x44), hi23 = _mm512_shuffle_f32x4(u[2][k], u[3][k], 0xEE);
    r[k] = _mm512_shuffle_f32x4(lo01, lo23, 0x88);
    r[4 + k] = _mm512_shuffle_f32x4(lo01, lo23, 0xDD);
    r[8 + k] = _mm512_shuffle_f32x4(hi01, hi23, 0x88);
    r[12 + k] = _mm512_shuffle_f32x4(hi01, hi23, 0xDD);
  }
}

// 16 elements (fp32 or bf16 storage) at p as fp32.
static inline __m512 load16(const void* p, bool bf16) {
  if (bf16) {
    const __m256i h = _mm256_loadu_si256(static_cast<const __m256i*>(p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
  return _mm512_loadu_ps(static_cast<const float*>(p));
}

// Stages one (sequence, head) for head_dim D = 16 * n: kt = K^T (D x Lp, columns L..Lp zero) by 16 x 16 register
// transposes, vb = V (L x D) as compact fp32. Rows are `ld` elements apart in qkv; K starts at column kcol, V at
// vcol. Returns false (caller stages with the generic loops) for other head_dims.
static bool stage_kv_avx512(const void* qkv, int64_t ld, int64_t start, int L, int Lp, int64_t kcol, int64_t vcol,
                            int D, bool bf16, float* kt, float* vb) {
  if (D % 16 != 0 || D == 0) return false;
  const int64_t es = bf16 ? 2 : 4;
  const char* base = static_cast<const char*>(qkv);
  for (int j0 = 0; j0 < Lp; j0 += 16) {
    const int nj = L - j0 < 16 ? L - j0 : 16;  // real keys in this block; the rest are the zero padding
    for (int d0 = 0; d0 < D; d0 += 16) {
      __m512 r[16];
      for (int i = 0; i < 16; ++i)
        r[i] = i < nj ? load16(base + ((start + j0 + i) * ld + kcol + d0) * es, bf16) : _mm512_setzero_ps();
      transpose16x16(r);
      for (int c = 0; c < 16; ++c) _mm512_storeu_ps(kt + static_cast<int64_t>(d0 + c) * Lp + j0, r[c]);
    }
  }
  for (int j = 0; j < L; ++j) {
    const char* src = base + ((start + j) * ld + vcol) * es;
    float* dst = vb + static_cast<int64_t>(j) * D;
    for (int d = 0; d < D; d += 16) _mm512_storeu_ps(dst + d, load16(src + d * es, bf16));
  }
  return true;
}

// dst[0, D) = scale * q (fp32), D = 16 * n; false for other head_dims.
static inline bool load_q_avx512(const void* src, int D, float scale, bool bf16, float* dst) {
  if (D % 16 != 0) return false;
  const __m512 sc = _mm512_set1_ps(scale);
  const char* p = static_cast<const char*>(src);
  for (int d = 0; d < D; d += 16) _mm512_storeu_ps(dst + d, _mm512_mul_ps(load16(p + d * (bf16 ? 2 : 4), bf16), sc));
  return true;
}

// The AVX-512 path for head_dim in {16, 32, ..., 128}; returns false (caller runs the generic code) otherwise.
// drop (null: no dropout) zeroes the dropped probabilities and scales the kept ones; lse (null: not saved) gets
// each row's log-sum-exp of the scores.
static bool attn_rows_avx512(int R, const float* qb, int D, const float* kt, int Lp, int L, const float* v,
                             int64_t ldv, float* s, bool bf16, void* out, int64_t ldo, const DropRows* drop,
                             float* lse) {
  if (D % 16 != 0 || D > 128 || D == 0) return false;
  switch (R) {
    case 1: qk_block<1>(qb, D, kt, Lp, s); break;
    case 2: qk_block<2>(qb, D, kt, Lp, s); break;
    case 3: qk_block<3>(qb, D, kt, Lp, s); break;
    case 4: qk_block<4>(qb, D, kt, Lp, s); break;
    case 5: qk_block<5>(qb, D, kt, Lp, s); break;
    case 6: qk_block<6>(qb, D, kt, Lp, s); break;
    case 7: qk_block<7>(qb, D, kt, Lp, s); break;
    default: qk_block<8>(qb, D, kt, Lp, s); break;
  }
  float inv[8];
  for (int r = 0; r < R; ++r) {
    float* sr = s + static_cast<int64_t>(r) * Lp;
    float m;
    const float sum = softmax_row(sr, L, &m);
    inv[r] = 1.0f / sum;
    if (lse != nullptr) lse[r] = m + __builtin_logf(sum);
    if (drop != nullptr) {
      dropout_row(sr, L, drop->key[r], drop->threshold);
      inv[r] *= drop->keep_scale;
    }
  }
  switch (D / 16) {
    case 1: pv_rows<1>(R, s, Lp, L, v, ldv, inv, bf16, out, ldo); break;
    case 2: pv_rows<2>(R, s, Lp, L, v, ldv, inv, bf16, out, ldo); break;
    case 3: pv_rows<3>(R, s, Lp, L, v, ldv, inv, bf16, out, ldo); break;
    case 4: pv_rows<4>(R, s, Lp, L, v, ldv, inv, bf16, out, ldo); break;
    case 5: pv_rows<5>(R, s, Lp, L, v, ldv, inv, bf16, out, ldo); break;
    case 6: pv_rows<6>(R, s, Lp, L, v, ldv, inv, bf16, out, ldo); break;
    case 7: pv_rows<7>(R, s, Lp, L, v, ldv, inv, bf16, out, ldo); break;
    default: pv_rows<8>(R, s, Lp, L, v, ldv, inv, bf16, out, ldo); break;
  }
  return true;
}

#define FASTBERT_VEC_BYTES 32  // the GEMM tiles of the backward kernels (kernels_impl.h): ymm
#include "kernels_impl.h"
#undef FASTBERT_VEC_BYTES

}  // namespace avx512
}  // namespace fastbert

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

#else  // not x86-64 GCC/Clang: no AVX-512 table; the dispatcher never selects it.
namespace fastbert {
namespace avx512 {
#include "kernels_dropout.h"
#include "kernels_impl.h"
}  // namespace avx512
}  // namespace fastbert
#endif
