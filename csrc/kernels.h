// Raw-pointer CPU kernels behind the torch.ops.fastbert.* operators (ops.cpp).
//
// The same source (kernels_impl.h) is compiled three times: for the portable x86-64 baseline (kernels_base.cpp),
// with AVX2 + FMA (kernels_avx2.cpp) and with AVX-512 (F/BW/VL/DQ) enabled (kernels_avx512.cpp, which adds
// intrinsics micro-kernels for attention).
// kernels() picks one table at first use with __builtin_cpu_supports. Nothing here includes torch headers,
// so no inline torch/std code is ever compiled with AVX-512 and shared with the baseline by the linker.
// Storage is float32 (`bf16 == false`) or bfloat16 held as uint16_t (`bf16 == true`); math is float32.
#pragma once

#include <cstdint>

namespace fastbert {

enum Act : int { kActNone = 0, kActGelu = 1, kActGeluTanh = 2, kActRelu = 3, kActSilu = 4, kActTanh = 5 };

// One attention work item: query rows [q0, q1) of head `head` of the sequence starting at token `start`.
struct AttnTask {
  int64_t start;
  int32_t len;
  int32_t head;
  int32_t q0;
  int32_t q1;
};

// Attention forward: qkv rows hold [q heads | k heads | v heads]; ld_* are row strides in elements; max_len
// bounds every task's len (sizes the scratch buffers). Dropout (threshold > 0): probability (head, packed query
// row i, key j) is kept iff dropout_bits(seed, head, i, j) >= threshold (kernels_dropout.h), kept ones scaled by
// keep_scale = 1 / (1 - p). lse (null: not saved): lse[head * ld_lse + row] = log sum_j exp(scores), fp32.
struct AttnArgs {
  const void* qkv;
  int64_t ld_qkv;
  void* out;
  int64_t ld_out;
  float* lse;
  int64_t ld_lse;
  int num_heads, head_dim, max_len;
  float scale;
  bool bf16;
  uint32_t seed, threshold;
  float keep_scale;
};

// Attention backward: recomputes the probabilities from q, k and the saved lse; writes d(qkv) in the [q|k|v]
// layout. One task per (sequence, head) holding the whole sequence (q0 = 0, q1 = len): every task writes its
// own columns of its own rows, so tasks never race and the result does not depend on how they are shared out.
struct AttnBwdArgs {
  const void* qkv;
  int64_t ld_qkv;
  const void* out;
  int64_t ld_out;
  const void* dout;
  int64_t ld_dout;
  const float* lse;
  int64_t ld_lse;
  void* dqkv;
  int64_t ld_dqkv;
  int num_heads, head_dim, max_len;
  float scale;
  bool bf16;
  uint32_t seed, threshold;
  float keep_scale;
};

// Query rows one attention micro-kernel call handles, with their dropout keys (kernels_dropout.h).
constexpr int kQRows = 8;
struct DropRows {
  uint32_t key[kQRows];  // dropout_row_key(seed, head, row) of each row
  uint32_t threshold;
  float keep_scale;
};

// add_layernorm's per-tensor dtype bits (set: bfloat16, clear: float32).
constexpr int kBf16X = 1, kBf16Res = 2, kBf16Out = 4, kBf16All = 7;

struct Kernels {
  const char* name;
  // out[r] = LayerNorm(x[r] + bias + res[r]) * gamma + beta for rows [r0, r1). res/bias may be null.
  // out may alias x (each row is read completely before it is written). x, res and out are each float32 or
  // bfloat16 on their own (``bf16``: kBf16X | kBf16Res | kBf16Out bits), so a bfloat16 GEMM output can join a
  // float32 residual stream.
  void (*add_layernorm)(int64_t r0, int64_t r1, int64_t n, const void* x, int64_t sx, const void* res, int64_t sr,
                        const float* bias, const float* gamma, const float* beta, float eps, void* out, int64_t so,
                        int bf16);
  // out[r] = act(x[r] + bias) for rows [r0, r1). bias may be null; out may alias x.
  void (*bias_activation)(int64_t r0, int64_t r1, int64_t n, const void* x, int64_t sx, const float* bias, int act,
                          void* out, int64_t so, bool bf16);
  // out[t] = LayerNorm(word[ids[t]] + pos[pos_ids[t]] + type[tt[t]]) for tokens [t0, t1); type/tt may be null.
  // Indices were bounds-checked by the caller.
  void (*embeddings)(int64_t t0, int64_t t1, int64_t e, const int64_t* ids, const int64_t* pos_ids,
                     const int64_t* tt_ids, const void* word, int64_t sw, const void* pos, int64_t sp,
                     const void* type, int64_t st, const float* gamma, const float* beta, float eps, void* out,
                     bool bf16);
  // Runs tasks[0..n) one after another (one thread's share).
  void (*attention)(const AttnArgs& a, const AttnTask* tasks, int64_t n);
  // Backward of attention for tasks[0..n) (whole (sequence, head) tasks, see AttnBwdArgs).
  void (*attention_backward)(const AttnBwdArgs& a, const AttnTask* tasks, int64_t n);
  // Backward of out = LayerNorm(h) * gamma + beta, h = x + bias + res recomputed (res/bias may be null), rows
  // [r0, r1): dx[r] = dL/dh[r] (stored, dx may be null); adds dy * xhat to dgamma, dy to dbeta and dx (fp32,
  // before rounding) to dsum (dsum may be null). dy and dx share x's storage dtype.
  void (*layernorm_backward)(int64_t r0, int64_t r1, int64_t n, const void* x, int64_t sx, const void* res,
                             int64_t sr, const float* bias, const float* gamma, float eps, const void* dy,
                             int64_t sdy, void* dx, int64_t sdx, float* dgamma, float* dbeta, float* dsum, bool bf16);
  // Backward of out = act(x + bias), rows [r0, r1): dx[r] = dy[r] * act'(x[r] + bias) (dx may be null: not
  // stored); adds dx (fp32) to dsum. bias may be null.
  void (*bias_activation_backward)(int64_t r0, int64_t r1, int64_t n, const void* x, int64_t sx, const float* bias,
                                   int act, const void* dy, int64_t sdy, void* dx, int64_t sdx, float* dsum,
                                   bool bf16);
  // Backward of the embeddings' LayerNorm for tokens [t0, t1): dh[t] (fp32, t * e) = dL/d(word + pos + type);
  // adds dy * xhat to dgamma and dy to dbeta. dy rows are sdy elements apart, in the tables' dtype.
  void (*embeddings_backward)(int64_t t0, int64_t t1, int64_t e, const int64_t* ids, const int64_t* pos_ids,
                              const int64_t* tt_ids, const void* word, int64_t sw, const void* pos, int64_t sp,
                              const void* type, int64_t st, const float* gamma, float eps, const void* dy,
                              int64_t sdy, float* dh, float* dgamma, float* dbeta, bool bf16);
  // dst[r] = sum of src[tokens[k]] for k in [offsets[r], offsets[r + 1]), in that order, rows [r0, r1); rows
  // of e floats, contiguous (the scatter-add of an embedding backward, one owner per table row).
  void (*gather_sum_rows)(int64_t r0, int64_t r1, int64_t e, const int64_t* offsets, const int64_t* tokens,
                          const float* src, float* dst);
  // out[i] = dropout_bits(seed, head[i], row[i], col[i]) for i < n (exposes the kernels' hash to the tests).
  void (*dropout_bits)(int64_t n, uint32_t seed, const int64_t* head, const int64_t* row, const int64_t* col,
                       int64_t* out);
  // int8 inference (reference.quantize_rows is the contract, bit for bit), rows [r0, r1) of n fp32 values:
  // v = x[r] * smooth_inv (smooth_inv may be null: v = x[r]); lo = min(0, min v), hi = max(0, max v);
  // scale[r] = (hi - lo) / 255 (1 when that is 0); zp[r] = clamp(rint(-lo / scale), 0, 255);
  // q[r] = clamp(rint(v * (1 / scale)) + zp, 0, 255). A row holding a NaN or an infinity gets scale NaN (the
  // caller raises) and unspecified q.
  void (*quantize_rows)(int64_t r0, int64_t r1, int64_t n, const float* x, int64_t sx, const float* smooth_inv,
                        uint8_t* q, int64_t sq, float* scale, int32_t* zp);
  // The int8 GEMM's dequantization, in place, rows [r0, r1): acc[r][j] = scale[r] * w_scale[j] * (acc[r][j] -
  // zp[r] * w_sum[j]) + bias[j], acc holding the integer sums sum_k q[r, k] * w[j, k] (exact in float32 below
  // 2^24, as is the difference, so the zero point's correction does not cancel digits). bias may be null.
  void (*dequantize_rows)(int64_t r0, int64_t r1, int64_t n, float* acc, int64_t sa, const float* scale,
                          const int32_t* zp, const float* w_scale, const float* w_sum, const float* bias);
};

namespace base {
extern const Kernels kKernels;
}
namespace avx2 {
extern const Kernels kKernels;
}
namespace avx512 {
extern const Kernels kKernels;
}

// The table for this CPU (AVX-512 F/BW/VL/DQ when present, else AVX2 + FMA, else the baseline);
// FASTBERT_CPU_ISA=avx2|base forces a narrower table (the tests cover every table the CPU can run).
const Kernels& kernels();
const Kernels& kernels_named(const char* name);

}  // namespace fastbert
