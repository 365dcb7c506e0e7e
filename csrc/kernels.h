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

struct Kernels {
  const char* name;
  // out[r] = LayerNorm(x[r] + bias + res[r]) * gamma + beta for rows [r0, r1). res/bias may be null.
  // out may alias x (each row is read completely before it is written).
  void (*add_layernorm)(int64_t r0, int64_t r1, int64_t n, const void* x, int64_t sx, const void* res, int64_t sr,
                        const float* bias, const float* gamma, const float* beta, float eps, void* out, int64_t so,
                        bool bf16);
  // out[r] = act(x[r] + bias) for rows [r0, r1). bias may be null; out may alias x.
  void (*bias_activation)(int64_t r0, int64_t r1, int64_t n, const void* x, int64_t sx, const float* bias, int act,
                          void* out, int64_t so, bool bf16);
  // out[t] = LayerNorm(word[ids[t]] + pos[pos_ids[t]] + type[tt[t]]) for tokens [t0, t1); type/tt may be null.
  // Indices were bounds-checked by the caller.
  void (*embeddings)(int64_t t0, int64_t t1, int64_t e, const int64_t* ids, const int64_t* pos_ids,
                     const int64_t* tt_ids, const void* word, int64_t sw, const void* pos, int64_t sp,
                     const void* type, int64_t st, const float* gamma, const float* beta, float eps, void* out,
                     bool bf16);
  // Runs tasks[0..n) one after another (one thread's share). qkv rows hold [q heads | k heads | v heads];
  // ld_* are row strides in elements; max_len bounds every task's len (sizes the scratch buffers).
  void (*attention)(const AttnTask* tasks, int64_t n, const void* qkv, int64_t ld_qkv, int num_heads,
                    int head_dim, float scale, void* out, int64_t ld_out, int max_len, bool bf16);
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
