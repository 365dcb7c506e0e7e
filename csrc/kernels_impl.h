// Portable kernel bodies, included inside `namespace fastbert::<isa>` by kernels_base.cpp, kernels_avx2.cpp and
// kernels_avx512.cpp
// (see kernels.h). Rules for this file: no #include, no std:: templates (they would be instantiated under the
// AVX-512 target and could be shared with the baseline by the linker); compiler builtins only.
// Loops are written so that GCC/Clang vectorize them at -O3 for whichever ISA the including file targets.
// When FASTBERT_AVX512 is defined, the including file has already defined the intrinsics helpers used below
// (exp512, attn_rows_avx512). Every including file includes kernels_dropout.h first (the dropout hash).

static inline float bf16_to_f32(uint16_t v) {
  uint32_t u = static_cast<uint32_t>(v) << 16;
  float f;
  __builtin_memcpy(&f, &u, 4);
  return f;
}

// Round to nearest even, NaN kept quiet: the same rounding as torch's float -> bfloat16 conversion.
static inline uint16_t f32_to_bf16(float f) {
  uint32_t u;
  __builtin_memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

static inline void load_row(const void* src, int64_t n, bool bf16, float* dst) {
  if (bf16) {
    const uint16_t* s = static_cast<const uint16_t*>(src);
    for (int64_t i = 0; i < n; ++i) dst[i] = bf16_to_f32(s[i]);
  } else {
    const float* s = static_cast<const float*>(src);
    for (int64_t i = 0; i < n; ++i) dst[i] = s[i];
  }
}

static inline void add_row(const void* src, int64_t n, bool bf16, float* dst) {
  if (bf16) {
    const uint16_t* s = static_cast<const uint16_t*>(src);
    for (int64_t i = 0; i < n; ++i) dst[i] += bf16_to_f32(s[i]);
  } else {
    const float* s = static_cast<const float*>(src);
    for (int64_t i = 0; i < n; ++i) dst[i] += s[i];
  }
}

static inline void store_row(const float* src, int64_t n, bool bf16, void* dst) {
  if (bf16) {
    uint16_t* d = static_cast<uint16_t*>(dst);
    for (int64_t i = 0; i < n; ++i) d[i] = f32_to_bf16(src[i]);
  } else {
    float* d = static_cast<float*>(dst);
    for (int64_t i = 0; i < n; ++i) d[i] = src[i];
  }
}

static inline const void* elem(const void* base, int64_t offset, bool bf16) {
  return static_cast<const char*>(base) + offset * (bf16 ? 2 : 4);
}

static inline void* elem(void* base, int64_t offset, bool bf16) {
  return static_cast<char*>(base) + offset * (bf16 ? 2 : 4);
}

// Sum with 16 independent partial sums: vectorizable without -ffast-math, and more accurate than one chain.
static inline float sum16(const float* v, int64_t n) {
  float acc[16] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    for (int k = 0; k < 16; ++k) acc[k] += v[i + k];
  for (; i < n; ++i) acc[i & 15] += v[i];
  float s = 0.f;
  for (int k = 0; k < 16; ++k) s += acc[k];
  return s;
}

// max of v[0, n) (n >= 1) with 16 independent partial maxima, so the loop vectorizes.
static inline float max16(const float* v, int64_t n) {
  float acc[16];
  for (int k = 0; k < 16; ++k) acc[k] = v[0];
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    for (int k = 0; k < 16; ++k) acc[k] = v[i + k] > acc[k] ? v[i + k] : acc[k];
  for (; i < n; ++i) acc[0] = v[i] > acc[0] ? v[i] : acc[0];
  float m = acc[0];
  for (int k = 1; k < 16; ++k) m = acc[k] > m ? acc[k] : m;
  return m;
}

static inline float sumsq_centered16(const float* v, int64_t n, float mean) {
  float acc[16] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    for (int k = 0; k < 16; ++k) {
      float d = v[i + k] - mean;
      acc[k] += d * d;
    }
  for (; i < n; ++i) {
    float d = v[i] - mean;
    acc[i & 15] += d * d;
  }
  float s = 0.f;
  for (int k = 0; k < 16; ++k) s += acc[k];
  return s;
}

// In place on buf: two-pass moments in float32, then the affine transform; writes the row to dst.
static inline void layernorm_store(float* buf, int64_t n, const float* gamma, const float* beta, float eps,
                                   bool bf16, void* dst) {
  const float mean = sum16(buf, n) / static_cast<float>(n);
  const float var = sumsq_centered16(buf, n, mean) / static_cast<float>(n);
  const float rstd = 1.0f / __builtin_sqrtf(var + eps);
  for (int64_t i = 0; i < n; ++i) buf[i] = (buf[i] - mean) * rstd * gamma[i] + beta[i];
  store_row(buf, n, bf16, dst);
}

static float* alloc_floats(int64_t n) {
  // 64-byte aligned scratch, rounded up to whole cache lines (aligned_alloc needs a multiple of the alignment).
  size_t bytes = static_cast<size_t>((n * 4 + 63) / 64 * 64);
  if (bytes == 0) bytes = 64;
  return static_cast<float*>(aligned_alloc(64, bytes));
}

static void add_layernorm(int64_t r0, int64_t r1, int64_t n, const void* x, int64_t sx, const void* res,
                          int64_t sr, const float* bias, const float* gamma, const float* beta, float eps, void* out,
                          int64_t so, int bf16) {
  const bool bx = bf16 & kBf16X, br = bf16 & kBf16Res, bo = bf16 & kBf16Out;
  float* buf = alloc_floats(n);
  for (int64_t r = r0; r < r1; ++r) {
    load_row(elem(x, r * sx, bx), n, bx, buf);
    if (bias != nullptr)
      for (int64_t i = 0; i < n; ++i) buf[i] += bias[i];
    if (res != nullptr) add_row(elem(res, r * sr, br), n, br, buf);
    layernorm_store(buf, n, gamma, beta, eps, bo, elem(out, r * so, bo));
  }
  free(buf);
}

// Activations written without libm calls, so that the loops in bias_activation vectorize for the including
// file's ISA (a scalar erff call per element made bias+GELU 11x slower than torch's vectorized GELU).

// exp(x), float32, relative error ~1e-7: x = n ln2 + r with |r| <= ln2/2, degree-7 Taylor polynomial, times 2^n
// built in the exponent bits. x is clamped to [-87, 88] (2^n stays a normal float; exp(88) is still finite).
static inline float exp_f32(float x) {
  x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
  // 1.5 * 2^23: t = y + shifter rounds y to an integer k held in t's low mantissa bits (so 2^k is built from t's
  // bits below, with no float -> int conversion, which would be undefined for NaN); n = t - shifter = k as a float.
  const float shifter = 12582912.0f;
  const float t = x * 1.44269504088896341f + shifter;
  const float n = t - shifter;
  float r = x - n * 0.693145751953125f;  // ln2 split hi/lo for an exact n * ln2
  r = r - n * 1.428606765330187045e-06f;
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  uint32_t tb;
  __builtin_memcpy(&tb, &t, 4);
  const uint32_t bits = (tb - 0x4B400000u + 127u) << 23;  // 0x4B400000: the bits of the shifter; k + 127 >= 1
  float scale;
  __builtin_memcpy(&scale, &bits, 4);
  return p * scale;
}

// erf(x) with absolute error < 2e-7 (Abramowitz & Stegun 7.1.26). Its relative error near 0 is larger, which is
// harmless inside GELU: 0.5 x (1 + erf(x / sqrt 2)) only needs erf to absolute precision.
static inline float erf_abs_f32(float x) {
  const float a = x < 0.f ? -x : x;
  const float t = 1.0f / (1.0f + 0.3275911f * a);
  float p = 1.061405429f;
  p = p * t - 1.453152027f;
  p = p * t + 1.421413741f;
  p = p * t - 0.284496736f;
  p = p * t + 0.254829592f;
  const float y = 1.0f - p * t * exp_f32(-a * a);
  return x < 0.f ? -y : y;
}

// tanh(x) = 1 - 2 / (exp(2x) + 1): absolute error ~1e-7, exact limits +-1 for large |x|.
static inline float tanh_f32(float x) { return 1.0f - 2.0f / (exp_f32(2.0f * x) + 1.0f); }

static inline float activate(float v, int act) {
  switch (act) {
    case kActGelu:
      return 0.5f * v * (1.0f + erf_abs_f32(v * 0.70710678118654752f));
    case kActGeluTanh: {
      const float inner = 0.79788456080286536f * (v + 0.044715f * v * v * v);  // sqrt(2/pi) (x + 0.044715 x^3)
      return 0.5f * v * (1.0f + tanh_f32(inner));
    }
    case kActRelu:
      return v < 0.f ? 0.f : v;  // NaN stays NaN, as in torch.relu
    case kActSilu:
      return v / (1.0f + exp_f32(-v));
    case kActTanh:
      return tanh_f32(v);
    default:
      return v;
  }
}

// In place over one row. The activation is a template constant, so activate()'s switch folds away and the loop
// vectorizes (one loop per activation, not a switch per element).
template <int A>
static inline void activate_row(float* buf, int64_t n) {
  for (int64_t i = 0; i < n; ++i) buf[i] = activate(buf[i], A);
}

static void bias_activation(int64_t r0, int64_t r1, int64_t n, const void* x, int64_t sx, const float* bias,
                            int act, void* out, int64_t so, bool bf16) {
  float* buf = alloc_floats(n);
  for (int64_t r = r0; r < r1; ++r) {
    load_row(elem(x, r * sx, bf16), n, bf16, buf);
    if (bias != nullptr)
      for (int64_t i = 0; i < n; ++i) buf[i] += bias[i];
    switch (act) {
      case kActNone: break;
      case kActGelu: activate_row<kActGelu>(buf, n); break;
      case kActGeluTanh: activate_row<kActGeluTanh>(buf, n); break;
      case kActRelu: activate_row<kActRelu>(buf, n); break;
      case kActSilu: activate_row<kActSilu>(buf, n); break;
      default: activate_row<kActTanh>(buf, n); break;
    }
    store_row(buf, n, bf16, elem(out, r * so, bf16));
  }
  free(buf);
}

static void embeddings(int64_t t0, int64_t t1, int64_t e, const int64_t* ids, const int64_t* pos_ids,
                       const int64_t* tt_ids, const void* word, int64_t sw, const void* pos, int64_t sp,
                       const void* type, int64_t st, const float* gamma, const float* beta, float eps, void* out,
                       bool bf16) {
  float* buf = alloc_floats(e);
  for (int64_t t = t0; t < t1; ++t) {
    load_row(elem(word, ids[t] * sw, bf16), e, bf16, buf);
    add_row(elem(pos, pos_ids[t] * sp, bf16), e, bf16, buf);
    if (type != nullptr) add_row(elem(type, (tt_ids != nullptr ? tt_ids[t] : 0) * st, bf16), e, bf16, buf);
    layernorm_store(buf, e, gamma, beta, eps, bf16, elem(out, t * e, bf16));
  }
  free(buf);
}

// ---------------------------------------------------------------------------------------------------------
// Small fp32 GEMMs on register tiles (attention forward and backward)
// ---------------------------------------------------------------------------------------------------------

// A GCC vector of floats, as wide as the including file's ISA asks (FASTBERT_VEC_BYTES: 32 = one ymm register
// for AVX2 / AVX-512; 16 = one xmm, the SSE2 baseline, by default). The GEMM tile below is written with these
// because the auto-vectorizer picked its reduction loop instead and shuffled.
#ifndef FASTBERT_VEC_BYTES
#define FASTBERT_VEC_BYTES 16
#endif
typedef float vfw __attribute__((vector_size(FASTBERT_VEC_BYTES)));
static constexpr int kLanes = FASTBERT_VEC_BYTES / 4;
static constexpr int kTileVecs = 16 / kLanes;              // vectors per 16-float tile row
static constexpr int kTileRows = kTileVecs <= 2 ? 4 : 2;  // accumulators + B vectors within 16 registers

static inline vfw loadv(const float* p) {
  vfw v;
  __builtin_memcpy(&v, p, sizeof v);
  return v;
}

static inline void storev(float* p, vfw v) { __builtin_memcpy(p, &v, sizeof v); }

// C[i][0, 16) (+)= sum_t A(i, t) * B[t][0, 16) for NR rows i: A(i, t) = a[i * ai + t * at], B rows ldb apart.
// The NR x 16 accumulators stay in registers over the whole reduction; each B vector feeds NR FMAs.
template <int NR>
static inline void gemm_tile(const float* a, int64_t ai, int64_t at, const float* b, int64_t ldb, int n, float* c,
                             int64_t ldc, bool accumulate) {
  vfw acc[NR][kTileVecs];
  for (int i = 0; i < NR; ++i)
    for (int v = 0; v < kTileVecs; ++v) acc[i][v] = accumulate ? loadv(c + i * ldc + v * kLanes) : vfw{};
  for (int t = 0; t < n; ++t) {
    vfw bv[kTileVecs];
    for (int v = 0; v < kTileVecs; ++v) bv[v] = loadv(b + t * ldb + v * kLanes);
    for (int i = 0; i < NR; ++i) {
      const float av = a[i * ai + t * at];
      for (int v = 0; v < kTileVecs; ++v) acc[i][v] += av * bv[v];
    }
  }
  for (int i = 0; i < NR; ++i)
    for (int v = 0; v < kTileVecs; ++v) storev(c + i * ldc + v * kLanes, acc[i][v]);
}

// C (m x ncols, ncols a multiple of 16) (+)= A (m x n, A(i, t) = a[i * ai + t * at]) B (n x ncols, rows ldb apart).
static void gemm_tiles(int m, int ncols, int n, const float* a, int64_t ai, int64_t at, const float* b, int64_t ldb,
                       float* c, int64_t ldc, bool accumulate) {
  for (int j0 = 0; j0 < ncols; j0 += 16) {
    int i = 0;
    for (; i + kTileRows <= m; i += kTileRows)
      gemm_tile<kTileRows>(a + i * ai, ai, at, b + j0, ldb, n, c + i * ldc + j0, ldc, accumulate);
    for (; i < m; ++i) gemm_tile<1>(a + i * ai, ai, at, b + j0, ldb, n, c + i * ldc + j0, ldc, accumulate);
  }
}

// ---------------------------------------------------------------------------------------------------------
// Attention. Per task: K of the (sequence, head) is transposed once into kt (D x Lp, Lp = len rounded up to 16,
// zero-padded) so that a score row is a sum of D axpys over contiguous keys, and V is copied once into a compact
// fp32 (len x Dp, Dp = D rounded up to 16, zero columns) block (a V row sits 3 * hidden elements from the next one
// in qkv: the copy keeps the PV loop in L1/L2 instead of striding across megabytes). Queries go in blocks of up to
// 8 rows (pre-scaled): each kt and V load then feeds several rows' FMAs (the AVX-512 micro-kernels, or the
// register-tiled gemm_tiles elsewhere), so the loops are FMA-bound rather than load-bound. Scores in fp32, softmax
// in fp32 over exactly `len` keys, output normalised by 1/sum at the end. Tokens of other sequences are never read.
// ---------------------------------------------------------------------------------------------------------

// Rows 0..R (<= kQRows) of one (sequence, head): S = q K^T and O = P V as register-tiled GEMMs (gemm_tiles), the
// softmax in between over exactly L keys. qb: R x D (pre-scaled); v: L rows ldv apart with zero columns up to
// Dp = D rounded up to 16; s: R x Lp scratch; ob: R x Dp scratch. drop (null: no dropout) zeroes the dropped
// probabilities and scales the kept ones by 1 / (1 - p); the normaliser counts every key. lse (null: not saved)
// gets each row's log-sum-exp of the scores.
static void attn_rows_generic(int R, const float* qb, int D, const float* kt, int Lp, int L, const float* v,
                              int64_t ldv, float* s, float* ob, bool bf16, void* out, int64_t ldo,
                              const DropRows* drop, float* lse) {
  const int Dp = (D + 15) / 16 * 16;
  gemm_tiles(R, Lp, D, qb, D, 1, kt, Lp, s, Lp, false);
  float inv[kQRows];
  for (int r = 0; r < R; ++r) {
    float* sr = s + static_cast<int64_t>(r) * Lp;
    const float m = max16(sr, L);
    for (int j = 0; j < L; ++j) sr[j] = exp_f32(sr[j] - m);
    const float sum = sum16(sr, L);
    inv[r] = 1.0f / sum;
    if (lse != nullptr) lse[r] = m + __builtin_logf(sum);
    if (drop != nullptr) {
      dropout_row(sr, L, drop->key[r], drop->threshold);
      inv[r] *= drop->keep_scale;
    }
  }
  gemm_tiles(R, Dp, L, s, Lp, 1, v, ldv, ob, Dp, false);
  for (int r = 0; r < R; ++r) {
    float* o = ob + static_cast<int64_t>(r) * Dp;
    for (int d = 0; d < D; ++d) o[d] *= inv[r];
    store_row(o, D, bf16, elem(out, r * ldo, bf16));
  }
}

// Generic staging of one (sequence, head): kt = K^T (D x Lp, columns L..Lp zero), vb = V (L x Dp) in fp32.
static void stage_kv_generic(const void* qkv, int64_t ld, int64_t start, int L, int Lp, int64_t kcol, int64_t vcol,
                             int D, bool bf16, float* kt, float* vb) {
  // K transposed in slabs of 16 features: while j runs over the sequence, a slab writes 16 kt rows whose
  // current cache lines stay in L1 (writing all D rows per key touched D lines 4 * Lp bytes apart each time).
  for (int d0 = 0; d0 < D; d0 += 16) {
    const int d1 = d0 + 16 < D ? d0 + 16 : D;
    for (int j = 0; j < L; ++j) {
      const int64_t row = (start + j) * ld + kcol;
      if (bf16) {
        const uint16_t* kr = static_cast<const uint16_t*>(qkv) + row;
        for (int d = d0; d < d1; ++d) kt[static_cast<int64_t>(d) * Lp + j] = bf16_to_f32(kr[d]);
      } else {
        const float* kr = static_cast<const float*>(qkv) + row;
        for (int d = d0; d < d1; ++d) kt[static_cast<int64_t>(d) * Lp + j] = kr[d];
      }
    }
  }
  const int Dp = (D + 15) / 16 * 16;  // V rows Dp apart, zero past D: P V then runs on whole 16-wide tiles
  for (int j = 0; j < L; ++j) {
    const int64_t row = (start + j) * ld + vcol;
    float* vj = vb + static_cast<int64_t>(j) * Dp;
    if (bf16) {
      const uint16_t* vr = static_cast<const uint16_t*>(qkv) + row;
      for (int d = 0; d < D; ++d) vj[d] = bf16_to_f32(vr[d]);
    } else {
      const float* vr = static_cast<const float*>(qkv) + row;
      for (int d = 0; d < D; ++d) vj[d] = vr[d];
    }
    for (int d = D; d < Dp; ++d) vj[d] = 0.f;
  }
  for (int d = 0; d < D; ++d)
    for (int j = L; j < Lp; ++j) kt[static_cast<int64_t>(d) * Lp + j] = 0.f;
}

// Software prefetch of the rows the next task will read, spread over the current task's query blocks. Consecutive
// heads of a sequence read neighbouring D-wide slices of the same qkv rows, 3 * hidden elements apart: a stride no
// hardware prefetcher follows, so without this every row is an L3 (or DRAM) round trip on the critical path, which
// dominated short sequences. Issued in slices rather than in one burst: a burst of a long sequence's K and V rows
// fills the line-fill buffers and stalls the computation it is meant to overlap.
struct Prefetcher {
  const char* base;
  int64_t ld, hidden, es, bytes;
  int64_t start = 0, col = 0;  // next task's first token and Q column
  int q = 0, q_end = 0;        // its query rows still to fetch
  int kv = 0, kv_end = 0;      // its key/value rows still to fetch (none when it reuses the current K/V)

  void reset(const AttnTask& next, bool new_kv, int64_t head_dim) {
    start = next.start;
    col = static_cast<int64_t>(next.head) * head_dim;
    q = next.q0;
    q_end = next.q1;
    kv = 0;
    kv_end = new_kv ? next.len : 0;
  }
  // Fetches `rows` more rows (query rows first, then key/value rows) into L2.
  __attribute__((always_inline)) inline void step(int rows) {
    for (; rows > 0 && q < q_end; --rows, ++q) {
      const char* r = base + ((start + q) * ld + col) * es;
      for (int64_t b = 0; b < bytes; b += 64) __builtin_prefetch(r + b, 0, 2);
    }
    for (; rows > 0 && kv < kv_end; --rows, ++kv) {
      const char* k = base + ((start + kv) * ld + hidden + col) * es;
      const char* v = k + hidden * es;
      for (int64_t b = 0; b < bytes; b += 64) {
        __builtin_prefetch(k + b, 0, 2);
        __builtin_prefetch(v + b, 0, 2);
      }
    }
  }
  void clear() { q = q_end = kv = kv_end = 0; }  // the last task of this thread's share: nothing comes next
  int remaining() const { return (q_end - q) + (kv_end - kv); }
};
// (always_inline: GCC's IPA pass treats an out-of-line function holding only prefetches as pure and deletes the
// calls.)

static void attention(const AttnArgs& a, const AttnTask* tasks, int64_t n) {
  const void* qkv = a.qkv;
  const int64_t ld = a.ld_qkv, ldo = a.ld_out;
  const int D = a.head_dim, max_len = a.max_len;
  const float scale = a.scale;
  const bool bf16 = a.bf16;
  const int lp_max = (max_len + 15) / 16 * 16;
  const int64_t hidden = static_cast<int64_t>(a.num_heads) * D;
  float* kt = alloc_floats(static_cast<int64_t>(D) * lp_max);
  const int Dp = (D + 15) / 16 * 16;
  float* vb = alloc_floats(static_cast<int64_t>(max_len) * Dp);
  float* qb = alloc_floats(static_cast<int64_t>(kQRows) * D);
  float* s = alloc_floats(static_cast<int64_t>(kQRows) * lp_max);
  float* ob = alloc_floats(static_cast<int64_t>(kQRows) * Dp);
  float lse_rows[kQRows];
  DropRows drop;
  drop.threshold = a.threshold;
  drop.keep_scale = a.keep_scale;
  const DropRows* dropp = a.threshold > 0 ? &drop : nullptr;
  float* lsep = a.lse != nullptr ? lse_rows : nullptr;
  int64_t cur_start = -1;
  int cur_head = -1, cur_len = -1;
  Prefetcher pf{static_cast<const char*>(qkv), ld, hidden, bf16 ? 2 : 4, static_cast<int64_t>(D) * (bf16 ? 2 : 4)};
  for (int64_t t = 0; t < n; ++t) {
    const AttnTask& task = tasks[t];
    const int L = task.len;
    const int Lp = (L + 15) / 16 * 16;
    const int64_t kcol = hidden + static_cast<int64_t>(task.head) * D;
    const int64_t vcol = 2 * hidden + static_cast<int64_t>(task.head) * D;
    if (task.start != cur_start || task.head != cur_head || L != cur_len) {
      cur_start = task.start;
      cur_head = task.head;
      cur_len = L;
#ifdef FASTBERT_AVX512
      if (!stage_kv_avx512(qkv, ld, task.start, L, Lp, kcol, vcol, D, bf16, kt, vb))
#endif
        stage_kv_generic(qkv, ld, task.start, L, Lp, kcol, vcol, D, bf16, kt, vb);
    }
    if (t + 1 < n) {
      const AttnTask& next = tasks[t + 1];
      pf.reset(next, next.start != task.start || next.head != task.head, D);
    } else {
      pf.clear();
    }
    const float* v = vb;
    const int64_t ldv = Dp;  // == D on the AVX-512 path (head_dim a multiple of 16)
    for (int q = task.q0; q < task.q1; q += kQRows) {
      const int R = task.q1 - q < kQRows ? task.q1 - q : kQRows;
      const int blocks_left = (task.q1 - q + kQRows - 1) / kQRows;
      pf.step((pf.remaining() + blocks_left - 1) / blocks_left);
      for (int r = 0; r < R; ++r) {
        if (dropp != nullptr)
          drop.key[r] = dropout_row_key(a.seed, static_cast<uint32_t>(task.head),
                                        static_cast<uint32_t>(task.start + q + r));
        const int64_t row = (task.start + q + r) * ld + static_cast<int64_t>(task.head) * D;
#ifdef FASTBERT_AVX512
        if (load_q_avx512(elem(qkv, row, bf16), D, scale, bf16, qb + r * D)) continue;
#endif
        float* qr = qb + r * D;
        load_row(elem(qkv, row, bf16), D, bf16, qr);
        for (int d = 0; d < D; ++d) qr[d] *= scale;
      }
      void* orow = elem(a.out, (task.start + q) * ldo + static_cast<int64_t>(task.head) * D, bf16);
      bool done = false;
#ifdef FASTBERT_AVX512
      done = attn_rows_avx512(R, qb, D, kt, Lp, L, v, ldv, s, bf16, orow, ldo, dropp, lsep);
#endif
      if (!done) attn_rows_generic(R, qb, D, kt, Lp, L, v, ldv, s, ob, bf16, orow, ldo, dropp, lsep);
      if (lsep != nullptr)
        for (int r = 0; r < R; ++r) a.lse[task.head * a.ld_lse + task.start + q + r] = lse_rows[r];
    }
  }
  free(kt);
  free(vb);
  free(qb);
  free(s);
  free(ob);
}

// ---------------------------------------------------------------------------------------------------------
// Backward kernels (training). Recompute what the forward computed from the saved inputs (the LayerNorm
// moments, the pre-activation, the attention probabilities from q, k and the saved log-sum-exp) rather than
// saving it: the forward (inference included) writes nothing extra, and backward reads the inputs once more.
// Reductions over rows (dgamma, dbeta, dbias) go into per-chunk partial sums the caller adds up in a fixed
// order, so the results do not depend on the number of threads.
// ---------------------------------------------------------------------------------------------------------

static inline float dot16(const float* a, const float* b, int64_t n) {
  float acc[16] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    for (int k = 0; k < 16; ++k) acc[k] += a[i + k] * b[i + k];
  for (; i < n; ++i) acc[i & 15] += a[i] * b[i];
  float s = 0.f;
  for (int k = 0; k < 16; ++k) s += acc[k];
  return s;
}

// One row of LayerNorm backward: dx = dL/dh = rstd * (g' - mean(g') - xhat * mean(g' * xhat)), g' = g * gamma,
// from h = the pre-norm row and g = dL/dy (fp32, n); adds g * xhat to dgamma and g to dbeta. The moments are
// computed exactly as layernorm_store does, so xhat is the forward's. Two passes over the row; no copies.
static inline void layernorm_backward_row(const float* __restrict h, const float* __restrict g, int64_t n,
                                          const float* __restrict gamma, float eps, float* __restrict dgamma,
                                          float* __restrict dbeta, float* __restrict dx) {
  const float mean = sum16(h, n) / static_cast<float>(n);
  const float var = sumsq_centered16(h, n, mean) / static_cast<float>(n);
  const float rstd = 1.0f / __builtin_sqrtf(var + eps);
  float sg[16] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  float sgx[16] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    for (int k = 0; k < 16; ++k) {
      const float xhat = (h[i + k] - mean) * rstd, gi = g[i + k], gg = gi * gamma[i + k];
      dgamma[i + k] += gi * xhat;
      dbeta[i + k] += gi;
      sg[k] += gg;
      sgx[k] += gg * xhat;
    }
  for (; i < n; ++i) {
    const float xhat = (h[i] - mean) * rstd, gi = g[i], gg = gi * gamma[i];
    dgamma[i] += gi * xhat;
    dbeta[i] += gi;
    sg[i & 15] += gg;
    sgx[i & 15] += gg * xhat;
  }
  float tg = 0.f, tgx = 0.f;
  for (int k = 0; k < 16; ++k) {
    tg += sg[k];
    tgx += sgx[k];
  }
  const float mg = tg / static_cast<float>(n), mgx = tgx / static_cast<float>(n);
  for (i = 0; i < n; ++i) dx[i] = rstd * (g[i] * gamma[i] - mg - (h[i] - mean) * rstd * mgx);
}

// float32 rows are read and written where they live (no copies through buffers); bfloat16 rows go through fp32
// buffers.
static void layernorm_backward(int64_t r0, int64_t r1, int64_t n, const void* x, int64_t sx, const void* res,
                               int64_t sr, const float* bias, const float* gamma, float eps, const void* dy,
                               int64_t sdy, void* dx, int64_t sdx, float* dgamma, float* dbeta, float* dsum,
                               bool bf16) {
  float* hb = alloc_floats(n);
  float* gb = alloc_floats(n);
  float* db = alloc_floats(n);
  for (int64_t r = r0; r < r1; ++r) {
    const float* h = hb;
    if (bf16) {
      load_row(elem(x, r * sx, true), n, true, hb);
      if (bias != nullptr)
        for (int64_t i = 0; i < n; ++i) hb[i] += bias[i];
      if (res != nullptr) add_row(elem(res, r * sr, true), n, true, hb);
    } else {
      const float* xs = static_cast<const float*>(x) + r * sx;
      const float* rs = res != nullptr ? static_cast<const float*>(res) + r * sr : nullptr;
      if (rs != nullptr && bias != nullptr) {
        for (int64_t i = 0; i < n; ++i) hb[i] = (xs[i] + bias[i]) + rs[i];  // the forward's order
      } else if (rs != nullptr) {
        for (int64_t i = 0; i < n; ++i) hb[i] = xs[i] + rs[i];
      } else if (bias != nullptr) {
        for (int64_t i = 0; i < n; ++i) hb[i] = xs[i] + bias[i];
      } else {
        h = xs;
      }
    }
    const float* g = gb;
    if (bf16)
      load_row(elem(dy, r * sdy, true), n, true, gb);
    else
      g = static_cast<const float*>(dy) + r * sdy;
    float* d = !bf16 && dx != nullptr ? static_cast<float*>(dx) + r * sdx : db;
    layernorm_backward_row(h, g, n, gamma, eps, dgamma, dbeta, d);
    if (dsum != nullptr)
      for (int64_t i = 0; i < n; ++i) dsum[i] += d[i];
    if (bf16 && dx != nullptr) store_row(db, n, true, elem(dx, r * sdx, true));
  }
  free(hb);
  free(gb);
  free(db);
}

// d act(v) / dv, the derivative of activate() (same polynomial exp / erf / tanh, so it vectorizes too).
static inline float activate_grad(float v, int act) {
  switch (act) {
    case kActGelu: {  // Phi(v) + v phi(v)
      const float cdf = 0.5f * (1.0f + erf_abs_f32(v * 0.70710678118654752f));
      return cdf + v * 0.39894228040143268f * exp_f32(-0.5f * v * v);  // 1 / sqrt(2 pi)
    }
    case kActGeluTanh: {
      const float k = 0.79788456080286536f;  // sqrt(2 / pi)
      const float v2 = v * v;
      const float t = tanh_f32(k * (v + 0.044715f * v2 * v));
      return 0.5f * (1.0f + t) + 0.5f * v * (1.0f - t * t) * k * (1.0f + 3.0f * 0.044715f * v2);
    }
    case kActRelu:
      return v <= 0.f ? 0.f : 1.f;  // torch: gradient 0 at 0, passed through for NaN
    case kActSilu: {
      const float sg = 1.0f / (1.0f + exp_f32(-v));
      return sg * (1.0f + v * (1.0f - sg));
    }
    case kActTanh: {
      const float t = tanh_f32(v);
      return 1.0f - t * t;
    }
    default:
      return 1.0f;
  }
}

// In place over one row: g[i] *= act'(z[i]) (one loop per activation, as activate_row).
template <int A>
static inline void activate_grad_row(const float* z, float* g, int64_t n) {
  for (int64_t i = 0; i < n; ++i) g[i] *= activate_grad(z[i], A);
}

static void bias_activation_backward(int64_t r0, int64_t r1, int64_t n, const void* x, int64_t sx,
                                     const float* bias, int act, const void* dy, int64_t sdy, void* dx, int64_t sdx,
                                     float* dsum, bool bf16) {
  float* z = alloc_floats(n);
  float* g = alloc_floats(n);
  for (int64_t r = r0; r < r1; ++r) {
    load_row(elem(dy, r * sdy, bf16), n, bf16, g);
    if (act != kActNone) {
      load_row(elem(x, r * sx, bf16), n, bf16, z);
      if (bias != nullptr)
        for (int64_t i = 0; i < n; ++i) z[i] += bias[i];
      switch (act) {
        case kActGelu: activate_grad_row<kActGelu>(z, g, n); break;
        case kActGeluTanh: activate_grad_row<kActGeluTanh>(z, g, n); break;
        case kActRelu: activate_grad_row<kActRelu>(z, g, n); break;
        case kActSilu: activate_grad_row<kActSilu>(z, g, n); break;
        default: activate_grad_row<kActTanh>(z, g, n); break;
      }
    }
    if (dsum != nullptr)
      for (int64_t i = 0; i < n; ++i) dsum[i] += g[i];
    if (dx != nullptr) store_row(g, n, bf16, elem(dx, r * sdx, bf16));
  }
  free(z);
  free(g);
}

static void embeddings_backward(int64_t t0, int64_t t1, int64_t e, const int64_t* ids, const int64_t* pos_ids,
                                const int64_t* tt_ids, const void* word, int64_t sw, const void* pos, int64_t sp,
                                const void* type, int64_t st, const float* gamma, float eps, const void* dy,
                                int64_t sdy, float* dh, float* dgamma, float* dbeta, bool bf16) {
  float* hb = alloc_floats(e);
  float* gb = alloc_floats(e);
  for (int64_t t = t0; t < t1; ++t) {
    const void* tr = type != nullptr ? elem(type, (tt_ids != nullptr ? tt_ids[t] : 0) * st, bf16) : nullptr;
    if (bf16) {
      load_row(elem(word, ids[t] * sw, true), e, true, hb);
      add_row(elem(pos, pos_ids[t] * sp, true), e, true, hb);
      if (tr != nullptr) add_row(tr, e, true, hb);
    } else {  // (word + pos) + type, the forward's order, with no row copy
      const float* w = static_cast<const float*>(word) + ids[t] * sw;
      const float* p = static_cast<const float*>(pos) + pos_ids[t] * sp;
      if (tr != nullptr) {
        const float* y = static_cast<const float*>(tr);
        for (int64_t i = 0; i < e; ++i) hb[i] = (w[i] + p[i]) + y[i];
      } else {
        for (int64_t i = 0; i < e; ++i) hb[i] = w[i] + p[i];
      }
    }
    const float* g = gb;
    if (bf16)
      load_row(elem(dy, t * sdy, true), e, true, gb);
    else
      g = static_cast<const float*>(dy) + t * sdy;
    layernorm_backward_row(hb, g, e, gamma, eps, dgamma, dbeta, dh + t * e);
  }
  free(hb);
  free(gb);
}

static void gather_sum_rows(int64_t r0, int64_t r1, int64_t e, const int64_t* offsets, const int64_t* tokens,
                            const float* src, float* dst) {
  for (int64_t r = r0; r < r1; ++r) {
    float* d = dst + r * e;
    for (int64_t i = 0; i < e; ++i) d[i] = 0.f;
    for (int64_t k = offsets[r]; k < offsets[r + 1]; ++k) {
      const float* s = src + tokens[k] * e;
      for (int64_t i = 0; i < e; ++i) d[i] += s[i];
    }
  }
}

static void dropout_bits(int64_t n, uint32_t seed, const int64_t* head, const int64_t* row, const int64_t* col,
                         int64_t* out) {
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t key = dropout_row_key(seed, static_cast<uint32_t>(head[i]), static_cast<uint32_t>(row[i]));
    out[i] = static_cast<int64_t>(dropout_bits_of(key, static_cast<uint32_t>(col[i])));
  }
}

// ---------------------------------------------------------------------------------------------------------
// Attention backward, one (sequence, head) per task (FlashAttention-2's recomputation). With s = scale q.k,
// P = exp(s - lse), Z = dropout mask / (1 - p), O = (P * Z) V:
//   dV = (P * Z)^T dO,  dP = (dO V^T) * Z,  dS = P * (dP - D), D_i = dO_i . O_i,  dQ = scale dS K,  dK = scale dS^T Q.
// Staged per task in fp32: kt = K^T and vt = V^T (D x Lp, zero-padded keys), kb = K rows, dk / dv accumulators
// (L x Dp, Dp = head_dim rounded up to 16 with zero columns, so every product has whole 16-wide column tiles).
// Queries go in blocks of kBwdRows rows; per block the five products are small GEMMs (gemm_tiles) whose
// 4 x 16 output tiles stay in registers over the reduction, so every loaded vector feeds 4 FMAs.
// ---------------------------------------------------------------------------------------------------------

static constexpr int kBwdRows = 32;

struct AttnBwdScratch {
  float *kt, *vt, *kb, *dk, *dv, *qb, *gb, *dq, *p, *ds;
};

static void attention_backward_task(const AttnBwdArgs& a, const AttnTask& task, const AttnBwdScratch& w) {
  const int D = a.head_dim, L = task.len, Lp = (L + 15) / 16 * 16, Dp = (D + 15) / 16 * 16;
  const bool bf16 = a.bf16;
  const int64_t hidden = static_cast<int64_t>(a.num_heads) * D;
  const int64_t qcol = static_cast<int64_t>(task.head) * D, kcol = hidden + qcol, vcol = 2 * hidden + qcol;
  const float scale = a.scale;
  const bool dropout = a.threshold > 0;
  // Stage K and V (fp32): rows into kb (and, transposed, kt) and, through dv as a row buffer, vt.
  for (int j = 0; j < L; ++j) {
    float* kr = w.kb + static_cast<int64_t>(j) * Dp;
    load_row(elem(a.qkv, (task.start + j) * a.ld_qkv + kcol, bf16), D, bf16, kr);
    for (int d = D; d < Dp; ++d) kr[d] = 0.f;
    float* vr = w.dv;
    load_row(elem(a.qkv, (task.start + j) * a.ld_qkv + vcol, bf16), D, bf16, vr);
    for (int d = 0; d < D; ++d) {
      w.kt[static_cast<int64_t>(d) * Lp + j] = kr[d];
      w.vt[static_cast<int64_t>(d) * Lp + j] = vr[d];
    }
  }
  for (int d = 0; d < D; ++d)
    for (int j = L; j < Lp; ++j) w.kt[static_cast<int64_t>(d) * Lp + j] = w.vt[static_cast<int64_t>(d) * Lp + j] = 0.f;
  for (int64_t i = 0; i < static_cast<int64_t>(L) * Dp; ++i) w.dk[i] = w.dv[i] = 0.f;

  float di[kBwdRows], lse[kBwdRows];
  for (int q0 = 0; q0 < L; q0 += kBwdRows) {
    const int R = L - q0 < kBwdRows ? L - q0 : kBwdRows;
    // The block's q (scaled), dO and D_i = dO . O, its lse.
    for (int r = 0; r < R; ++r) {
      const int64_t row = task.start + q0 + r;
      float* qr = w.qb + r * Dp;
      float* gr = w.gb + r * Dp;
      float* orow = w.dq + r * Dp;  // O, only to form D_i (dq is written below)
      load_row(elem(a.qkv, row * a.ld_qkv + qcol, bf16), D, bf16, qr);
      load_row(elem(a.dout, row * a.ld_dout + qcol, bf16), D, bf16, gr);
      load_row(elem(a.out, row * a.ld_out + qcol, bf16), D, bf16, orow);
      di[r] = dot16(gr, orow, D);
      for (int d = 0; d < D; ++d) qr[d] *= scale;
      for (int d = D; d < Dp; ++d) qr[d] = gr[d] = 0.f;
      lse[r] = a.lse[task.head * a.ld_lse + row];
    }
    // Scores s = q K^T and dO V^T (R x Lp).
    gemm_tiles(R, Lp, D, w.qb, Dp, 1, w.kt, Lp, w.p, Lp, false);
    gemm_tiles(R, Lp, D, w.gb, Dp, 1, w.vt, Lp, w.ds, Lp, false);
    // p <- P * Z (what multiplied V), ds <- dS = P * (dP * Z - D_i); padded keys set to 0 (no contribution).
    for (int r = 0; r < R; ++r) {
      float* pr = w.p + static_cast<int64_t>(r) * Lp;
      float* sr = w.ds + static_cast<int64_t>(r) * Lp;
      const float m = lse[r], dr = di[r];
      if (dropout) {
        const uint32_t thr = a.threshold;
        const uint32_t key =
            dropout_row_key(a.seed, static_cast<uint32_t>(task.head), static_cast<uint32_t>(task.start + q0 + r));
        const float ks = a.keep_scale;
        for (int j = 0; j < L; ++j) {
          const float pj = exp_f32(pr[j] - m);
          const float z = dropout_bits_of(key, static_cast<uint32_t>(j)) >= thr ? ks : 0.f;
          pr[j] = pj * z;
          sr[j] = pj * (sr[j] * z - dr);
        }
      } else {
        for (int j = 0; j < L; ++j) {
          const float pj = exp_f32(pr[j] - m);
          pr[j] = pj;
          sr[j] = pj * (sr[j] - dr);
        }
      }
      for (int j = L; j < Lp; ++j) pr[j] = sr[j] = 0.f;
    }
    // dV += (P Z)^T dO, dK += dS^T q (q pre-scaled): L x Dp, reduction over the block's R rows.
    gemm_tiles(L, Dp, R, w.p, 1, Lp, w.gb, Dp, w.dv, Dp, true);
    gemm_tiles(L, Dp, R, w.ds, 1, Lp, w.qb, Dp, w.dk, Dp, true);
    // dQ = scale dS K: R x Dp, reduction over the L keys.
    gemm_tiles(R, Dp, L, w.ds, Lp, 1, w.kb, Dp, w.dq, Dp, false);
    for (int r = 0; r < R; ++r) {
      float* dq = w.dq + r * Dp;
      for (int d = 0; d < D; ++d) dq[d] *= scale;
      store_row(dq, D, bf16, elem(a.dqkv, (task.start + q0 + r) * a.ld_dqkv + qcol, bf16));
    }
  }
  for (int j = 0; j < L; ++j) {
    const int64_t row = (task.start + j) * a.ld_dqkv;
    store_row(w.dk + static_cast<int64_t>(j) * Dp, D, bf16, elem(a.dqkv, row + kcol, bf16));
    store_row(w.dv + static_cast<int64_t>(j) * Dp, D, bf16, elem(a.dqkv, row + vcol, bf16));
  }
}

static void attention_backward(const AttnBwdArgs& a, const AttnTask* tasks, int64_t n) {
  const int64_t Lp = (a.max_len + 15) / 16 * 16, Dp = (a.head_dim + 15) / 16 * 16;
  AttnBwdScratch w;
  w.kt = alloc_floats(Dp * Lp);
  w.vt = alloc_floats(Dp * Lp);
  w.kb = alloc_floats(Lp * Dp);
  w.dk = alloc_floats(Lp * Dp);
  w.dv = alloc_floats(Lp * Dp);
  w.qb = alloc_floats(kBwdRows * Dp);
  w.gb = alloc_floats(kBwdRows * Dp);
  w.dq = alloc_floats(kBwdRows * Dp);
  w.p = alloc_floats(kBwdRows * Lp);
  w.ds = alloc_floats(kBwdRows * Lp);
  for (int64_t t = 0; t < n; ++t) attention_backward_task(a, tasks[t], w);
  free(w.kt);
  free(w.vt);
  free(w.kb);
  free(w.dk);
  free(w.dv);
  free(w.qb);
  free(w.gb);
  free(w.dq);
  free(w.p);
  free(w.ds);
}

// ---------------------------------------------------------------------------------------------------------
// int8 inference: per-row asymmetric uint8 quantization and the int8 GEMM's dequantization (kernels.h)
// ---------------------------------------------------------------------------------------------------------

static inline float clamp_0_255(float v) { return v < 0.f ? 0.f : (v > 255.f ? 255.f : v); }

// Values per block of quantize_rows' scratch (a stack buffer: rows of any length go through in blocks).
constexpr int64_t kQuantBlock = 1024;

static void quantize_rows(int64_t r0, int64_t r1, int64_t n, const float* x, int64_t sx, const float* smooth_inv,
                          uint8_t* q, int64_t sq, float* scale, int32_t* zp) {
  float buf[kQuantBlock];
  for (int64_t r = r0; r < r1; ++r) {
    const float* xr = x + r * sx;
    uint8_t* qr = q + r * sq;
    // Min, max and "v - v" (0 when finite, NaN for NaN or +-inf) in 8-float vector lanes (GCC/Clang vector
    // extensions: vminps-like blends, no reassociation needed); a NaN fails every compare, hence the finiteness
    // lane.
    typedef float f8 __attribute__((vector_size(32)));
    f8 lo8 = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f}, hi8 = lo8, bad8 = lo8;
    float lo1 = 0.f, hi1 = 0.f, bad1 = 0.f;
    for (int64_t c0 = 0; c0 < n; c0 += kQuantBlock) {
      const int64_t m = n - c0 < kQuantBlock ? n - c0 : kQuantBlock;
      if (smooth_inv != nullptr) {
        for (int64_t i = 0; i < m; ++i) buf[i] = xr[c0 + i] * smooth_inv[c0 + i];
      } else {
        for (int64_t i = 0; i < m; ++i) buf[i] = xr[c0 + i];
      }
      int64_t i = 0;
      for (; i + 8 <= m; i += 8) {
        f8 v;
        __builtin_memcpy(&v, buf + i, sizeof v);
        lo8 = v < lo8 ? v : lo8;
        hi8 = v > hi8 ? v : hi8;
        bad8 += v - v;
      }
      for (; i < m; ++i) {
        const float v = buf[i];
        lo1 = v < lo1 ? v : lo1;
        hi1 = v > hi1 ? v : hi1;
        bad1 += v - v;
      }
    }
    float lo = lo1, hi = hi1, bad = bad1;
    for (int k = 0; k < 8; ++k) {
      lo = lo8[k] < lo ? lo8[k] : lo;
      hi = hi8[k] > hi ? hi8[k] : hi;
      bad += bad8[k];
    }
    float s = (hi - lo) / 255.f;
    if (!(bad == 0.f) || !(s < __builtin_inff())) {
      scale[r] = __builtin_nanf("");
      zp[r] = 0;
      continue;
    }
    if (s == 0.f) s = 1.f;
    const float inv = 1.f / s;
    const float z = clamp_0_255(__builtin_rintf(-lo * inv));
    scale[r] = s;
    zp[r] = static_cast<int32_t>(z);
    for (int64_t c0 = 0; c0 < n; c0 += kQuantBlock) {
      const int64_t m = n - c0 < kQuantBlock ? n - c0 : kQuantBlock;
      if (smooth_inv != nullptr) {
        for (int64_t i = 0; i < m; ++i) buf[i] = xr[c0 + i] * smooth_inv[c0 + i];
      } else {
        for (int64_t i = 0; i < m; ++i) buf[i] = xr[c0 + i];
      }
      for (int64_t i = 0; i < m; ++i)
        qr[c0 + i] = static_cast<uint8_t>(static_cast<int32_t>(clamp_0_255(__builtin_rintf(buf[i] * inv) + z)));
    }
  }
}

static void dequantize_rows(int64_t r0, int64_t r1, int64_t n, float* acc, int64_t sa, const float* scale,
                            const int32_t* zp, const float* w_scale, const float* w_sum, const float* bias) {
  for (int64_t r = r0; r < r1; ++r) {
    float* a = acc + r * sa;
    const float s = scale[r];
    const float z = static_cast<float>(zp[r]);
    if (bias != nullptr) {
      for (int64_t j = 0; j < n; ++j) a[j] = (s * w_scale[j]) * (a[j] - z * w_sum[j]) + bias[j];
    } else {
      for (int64_t j = 0; j < n; ++j) a[j] = (s * w_scale[j]) * (a[j] - z * w_sum[j]);
    }
  }
}

const Kernels kKernels = {
#if defined(FASTBERT_ISA_NAME)
    FASTBERT_ISA_NAME,
#elif defined(FASTBERT_AVX512)
    "avx512",
#else
    "base",
#endif
    add_layernorm,
    bias_activation,
    embeddings,
    attention,
    attention_backward,
    layernorm_backward,
    bias_activation_backward,
    embeddings_backward,
    gather_sum_rows,
    dropout_bits,
    quantize_rows,
    dequantize_rows};
