// torch.ops.fastbert.*: schemas (TORCH_LIBRARY), CPU implementations (TORCH_LIBRARY_IMPL), input checks and
// threading. The arithmetic lives in the raw-pointer kernels (kernels.h); GEMMs go to oneDNN through
// torch's mkldnn::_linear_pointwise operator (oneDNN's own symbols are not exported by libtorch, so its C++ API
// cannot be linked against from an extension), with the activation fused as a oneDNN post-op.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "kernels.h"

namespace fastbert {

// ---------------------------------------------------------------------------------------------------------
// ISA selection
// ---------------------------------------------------------------------------------------------------------

static bool cpu_has_avx512() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("fma");
#else
  return false;
#endif
}

static bool cpu_has_avx2() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  return false;
#endif
}

const Kernels& kernels_named(const char* name) {
  if (std::strcmp(name, "avx512") == 0) {
    TORCH_CHECK(cpu_has_avx512(), "fastbert: ISA 'avx512' requested but this CPU lacks AVX-512 (F/BW/VL/DQ)");
    return avx512::kKernels;
  }
  if (std::strcmp(name, "avx2") == 0) {
    TORCH_CHECK(cpu_has_avx2(), "fastbert: ISA 'avx2' requested but this CPU lacks AVX2 + FMA");
    return avx2::kKernels;
  }
  TORCH_CHECK(std::strcmp(name, "base") == 0, "fastbert: unknown ISA '", name,
              "'; use 'avx512', 'avx2' or 'base'");
  return base::kKernels;
}

static std::atomic<const Kernels*>& current_kernels() {
  static std::atomic<const Kernels*> current{[] {
    const char* forced = std::getenv("FASTBERT_CPU_ISA");
    if (forced != nullptr && forced[0] != '\0') return &kernels_named(forced);
    if (cpu_has_avx512()) return &avx512::kKernels;
    return cpu_has_avx2() ? &avx2::kKernels : &base::kKernels;
  }()};
  return current;
}

const Kernels& kernels() { return *current_kernels().load(std::memory_order_relaxed); }

// Selects the kernel table ("avx512", "avx2", "base"; "" keeps the current one); returns the active table's name.
static std::string set_isa(c10::string_view name) {
  if (!name.empty()) current_kernels().store(&kernels_named(std::string(name).c_str()));
  return kernels().name;
}

// ---------------------------------------------------------------------------------------------------------
// Checks and small helpers
// ---------------------------------------------------------------------------------------------------------

static bool check_act_tensor(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "fastbert: ", name, " must be a CPU tensor, got device ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16, "fastbert: ", name,
              " must be float32 or bfloat16, got ", t.scalar_type());
  return t.scalar_type() == at::kBFloat16;
}

static void check_2d(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 2, "fastbert: ", name, " must be 2-D (tokens, features), got shape ", t.sizes());
}

// A (rows, n) tensor whose rows are contiguous (stride(1) == 1); row stride may be anything.
static at::Tensor rows_view(const at::Tensor& t) { return t.stride(1) == 1 ? t : t.contiguous(); }

// A per-feature parameter (bias, LayerNorm weight) as contiguous float32 of length n.
static at::Tensor param_f32(const at::Tensor& p, int64_t n, const char* name) {
  TORCH_CHECK(p.device().is_cpu(), "fastbert: ", name, " must be a CPU tensor, got device ", p.device());
  TORCH_CHECK(p.dim() == 1 && p.size(0) == n, "fastbert: ", name, " must have shape (", n, ",), got ", p.sizes());
  TORCH_CHECK(p.is_floating_point(), "fastbert: ", name, " must be floating point, got ", p.scalar_type());
  return p.to(at::kFloat).contiguous();
}

static int parse_act(const std::optional<c10::string_view>& act) {
  if (!act.has_value()) return kActNone;
  const c10::string_view a = *act;
  if (a == "gelu") return kActGelu;
  if (a == "gelu_tanh") return kActGeluTanh;
  if (a == "relu") return kActRelu;
  if (a == "silu") return kActSilu;
  if (a == "tanh") return kActTanh;
  TORCH_CHECK(false, "fastbert: unknown activation '", std::string(a),
              "'; supported: gelu, gelu_tanh, relu, silu, tanh or None");
}

// Rows per parallel chunk so that one chunk is at least ~32K elements (smaller jobs are not worth a thread).
static int64_t row_grain(int64_t n) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(n, 1)); }

static void run_add_layernorm(const at::Tensor& x, const at::Tensor* res, const at::Tensor* bias_f32,
                              const at::Tensor& gamma, const at::Tensor& beta, double eps, at::Tensor& out) {
  const int64_t rows = x.size(0), n = x.size(1);
  const int bf16 = (x.scalar_type() == at::kBFloat16 ? kBf16X : 0) |
                   (res != nullptr && res->scalar_type() == at::kBFloat16 ? kBf16Res : 0) |
                   (out.scalar_type() == at::kBFloat16 ? kBf16Out : 0);
  const void* xp = x.data_ptr();
  const void* rp = res != nullptr ? res->data_ptr() : nullptr;
  const int64_t sx = x.stride(0), sr = res != nullptr ? res->stride(0) : 0, so = out.stride(0);
  const float* bp = bias_f32 != nullptr ? bias_f32->data_ptr<float>() : nullptr;
  const float* gp = gamma.data_ptr<float>();
  const float* bt = beta.data_ptr<float>();
  void* op = out.data_ptr();
  const Kernels& k = kernels();
  at::parallel_for(0, rows, row_grain(n), [&](int64_t r0, int64_t r1) {
    k.add_layernorm(r0, r1, n, xp, sx, rp, sr, bp, gp, bt, static_cast<float>(eps), op, so, bf16);
  });
}

// ---------------------------------------------------------------------------------------------------------
// Elementwise / normalisation ops
// ---------------------------------------------------------------------------------------------------------

static at::Tensor add_layernorm(const at::Tensor& x_in, const std::optional<at::Tensor>& residual,
                                const at::Tensor& ln_weight, const at::Tensor& ln_bias, double eps) {
  check_2d(x_in, "x");
  check_act_tensor(x_in, "x");
  const at::Tensor x = rows_view(x_in);
  at::Tensor res;
  if (residual.has_value()) {
    check_2d(*residual, "residual");
    check_act_tensor(*residual, "residual");
    TORCH_CHECK(residual->sizes() == x.sizes(), "fastbert: residual shape ", residual->sizes(),
                " does not match x shape ", x.sizes());
    TORCH_CHECK(residual->scalar_type() == x.scalar_type(), "fastbert: residual dtype ", residual->scalar_type(),
                " does not match x dtype ", x.scalar_type());
    res = rows_view(*residual);
  }
  const at::Tensor g = param_f32(ln_weight, x.size(1), "ln_weight");
  const at::Tensor b = param_f32(ln_bias, x.size(1), "ln_bias");
  at::Tensor out = at::empty(x.sizes(), x.options());
  run_add_layernorm(x, res.defined() ? &res : nullptr, nullptr, g, b, eps, out);
  return out;
}

static at::Tensor bias_residual_layernorm(const at::Tensor& x_in, const std::optional<at::Tensor>& bias,
                                          const at::Tensor& residual, const at::Tensor& ln_weight,
                                          const at::Tensor& ln_bias, double eps) {
  check_2d(x_in, "x");
  check_act_tensor(x_in, "x");
  check_2d(residual, "residual");
  check_act_tensor(residual, "residual");
  TORCH_CHECK(residual.sizes() == x_in.sizes(), "fastbert: residual shape ", residual.sizes(),
              " does not match x shape ", x_in.sizes());
  TORCH_CHECK(residual.scalar_type() == x_in.scalar_type(), "fastbert: residual dtype ", residual.scalar_type(),
              " does not match x dtype ", x_in.scalar_type());
  const at::Tensor x = rows_view(x_in), res = rows_view(residual);
  const int64_t n = x.size(1);
  at::Tensor bf;
  if (bias.has_value()) bf = param_f32(*bias, n, "bias");
  const at::Tensor g = param_f32(ln_weight, n, "ln_weight");
  const at::Tensor b = param_f32(ln_bias, n, "ln_bias");
  at::Tensor out = at::empty(x.sizes(), x.options());
  run_add_layernorm(x, &res, bf.defined() ? &bf : nullptr, g, b, eps, out);
  return out;
}

static void run_bias_activation(const at::Tensor& x, const float* bias, int act, at::Tensor& out) {
  const int64_t rows = x.size(0), n = x.size(1);
  const bool bf16 = x.scalar_type() == at::kBFloat16;
  const void* xp = x.data_ptr();
  void* op = out.data_ptr();
  const int64_t sx = x.stride(0), so = out.stride(0);
  const Kernels& k = kernels();
  at::parallel_for(0, rows, row_grain(n),
                   [&](int64_t r0, int64_t r1) { k.bias_activation(r0, r1, n, xp, sx, bias, act, op, so, bf16); });
}

static at::Tensor bias_activation(const at::Tensor& x_in, const std::optional<at::Tensor>& bias,
                                  std::optional<c10::string_view> act) {
  check_2d(x_in, "x");
  check_act_tensor(x_in, "x");
  const int a = parse_act(act);
  const at::Tensor x = rows_view(x_in);
  at::Tensor bf;
  if (bias.has_value()) bf = param_f32(*bias, x.size(1), "bias");
  at::Tensor out = at::empty(x.sizes(), x.options());
  run_bias_activation(x, bf.defined() ? bf.data_ptr<float>() : nullptr, a, out);
  return out;
}

static at::Tensor check_ids(const at::Tensor& ids, const char* name, int64_t expected_len, int64_t rows,
                            const char* table) {
  TORCH_CHECK(ids.device().is_cpu(), "fastbert: ", name, " must be a CPU tensor, got device ", ids.device());
  TORCH_CHECK(ids.scalar_type() == at::kLong || ids.scalar_type() == at::kInt, "fastbert: ", name,
              " must be int64 or int32, got ", ids.scalar_type());
  TORCH_CHECK(ids.dim() == 1, "fastbert: ", name, " must be 1-D (total_tokens,), got shape ", ids.sizes());
  TORCH_CHECK(ids.size(0) == expected_len, "fastbert: ", name, " has ", ids.size(0), " entries but input_ids has ",
              expected_len);
  at::Tensor out = ids.to(at::kLong).contiguous();
  const int64_t* p = out.data_ptr<int64_t>();
  for (int64_t i = 0; i < out.size(0); ++i) {
    TORCH_CHECK(p[i] >= 0 && p[i] < rows, "fastbert: ", name, "[", i, "] = ", p[i], " is out of range for ", table,
                " with ", rows, " rows");
  }
  return out;
}

static at::Tensor embeddings(const at::Tensor& input_ids, const at::Tensor& position_ids,
                             const std::optional<at::Tensor>& token_type_ids, const at::Tensor& word_weight,
                             const at::Tensor& position_weight, const std::optional<at::Tensor>& token_type_weight,
                             const at::Tensor& ln_weight, const at::Tensor& ln_bias, double eps) {
  const bool bf16 = check_act_tensor(word_weight, "word_weight");
  TORCH_CHECK(word_weight.dim() == 2, "fastbert: word_weight must be 2-D, got shape ", word_weight.sizes());
  TORCH_CHECK(input_ids.dim() == 1, "fastbert: input_ids must be 1-D (total_tokens,), got shape ",
              input_ids.sizes());
  const int64_t T = input_ids.size(0), E = word_weight.size(1);
  auto check_table = [&](const at::Tensor& w, const char* name) {
    TORCH_CHECK(w.dim() == 2 && w.size(1) == E, "fastbert: ", name, " must have shape (rows, ", E, "), got ",
                w.sizes());
    TORCH_CHECK(w.scalar_type() == word_weight.scalar_type(), "fastbert: ", name, " dtype ", w.scalar_type(),
                " does not match word_weight dtype ", word_weight.scalar_type());
    TORCH_CHECK(w.device().is_cpu(), "fastbert: ", name, " must be a CPU tensor, got device ", w.device());
    return rows_view(w);
  };
  const at::Tensor ww = rows_view(word_weight);
  const at::Tensor pw = check_table(position_weight, "position_weight");
  at::Tensor tw;
  if (token_type_weight.has_value()) tw = check_table(*token_type_weight, "token_type_weight");
  const at::Tensor ids = check_ids(input_ids, "input_ids", T, ww.size(0), "word_weight");
  const at::Tensor pos = check_ids(position_ids, "position_ids", T, pw.size(0), "position_weight");
  at::Tensor tt;
  if (tw.defined() && token_type_ids.has_value())
    tt = check_ids(*token_type_ids, "token_type_ids", T, tw.size(0), "token_type_weight");
  const at::Tensor g = param_f32(ln_weight, E, "ln_weight");
  const at::Tensor b = param_f32(ln_bias, E, "ln_bias");
  at::Tensor out = at::empty({T, E}, ww.options());
  const int64_t* ip = ids.data_ptr<int64_t>();
  const int64_t* pp = pos.data_ptr<int64_t>();
  const int64_t* tp = tt.defined() ? tt.data_ptr<int64_t>() : nullptr;
  const void* wp = ww.data_ptr();
  const void* pwp = pw.data_ptr();
  const void* twp = tw.defined() ? tw.data_ptr() : nullptr;
  const int64_t sw = ww.stride(0), sp = pw.stride(0), st = tw.defined() ? tw.stride(0) : 0;
  const float* gp = g.data_ptr<float>();
  const float* bp = b.data_ptr<float>();
  void* op = out.data_ptr();
  const Kernels& k = kernels();
  at::parallel_for(0, T, row_grain(E), [&](int64_t t0, int64_t t1) {
    k.embeddings(t0, t1, E, ip, pp, tp, wp, sw, pwp, sp, twp, st, gp, bp, static_cast<float>(eps), op, bf16);
  });
  return out;
}

// ---------------------------------------------------------------------------------------------------------
// Linear layers (oneDNN through mkldnn::_linear_pointwise)
// ---------------------------------------------------------------------------------------------------------

using LinearPointwiseFn =
    at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, c10::string_view,
               c10::List<std::optional<c10::Scalar>>, std::optional<c10::string_view>);

static const std::optional<c10::TypedOperatorHandle<LinearPointwiseFn>>& onednn_linear_op() {
  static const std::optional<c10::TypedOperatorHandle<LinearPointwiseFn>> op =
      []() -> std::optional<c10::TypedOperatorHandle<LinearPointwiseFn>> {
    if (!at::hasMKLDNN()) return std::nullopt;
    auto handle = c10::Dispatcher::singleton().findSchema({"mkldnn::_linear_pointwise", ""});
    if (!handle.has_value()) return std::nullopt;
    return handle->typed<LinearPointwiseFn>();
  }();
  return op;
}

// Whether oneDNN runs bfloat16 GEMMs on this CPU (it needs AVX-512 BW/VL/DQ or AVX-NE-CONVERT; on an AVX2-only
// CPU it cannot even build the primitive). Asked once through torch's own probe.
static bool onednn_bf16_supported() {
  static const bool supported = []() {
    auto handle = c10::Dispatcher::singleton().findSchema({"mkldnn::_is_mkldnn_bf16_supported", ""});
    return handle.has_value() && handle->typed<bool()>().call();
  }();
  return supported;
}

// act(x @ w.T + bias): the GEMM in oneDNN (bias fused), at::linear where oneDNN cannot run it (no oneDNN in this
// torch, or bfloat16 on a CPU where oneDNN has no bfloat16 path). Only relu is a oneDNN post-op; GELU (erf and
// tanh), tanh and SiLU are fastbert's own vectorised pass over the output, which costs a fraction of oneDNN's
// post-ops for them. Measured on a 2-vCPU AMD EPYC (AVX2), (32,384) x (384,1536), 2 threads: GEMM 350 us; with
// oneDNN's erf-GELU post-op 479 us, tanh-GELU 587, tanh 551, swish 436; fastbert's pass 42 (GELU), 40 (tanh),
// 66 (SiLU) us; relu as a post-op adds nothing. BERT-base's FFN at (32,768) x (768,3072): 1440 us, 1998 with the
// GELU post-op, 93 for the pass.
static at::Tensor gemm(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias, int act,
                       const std::optional<at::Tensor>& packed) {
  const bool use_packed = packed.has_value() && packed->defined();
  const auto& op = onednn_linear_op();
  // in_features == 0: the product is all zeros (plus bias); oneDNN cannot build an empty reduction.
  const bool onednn_ok = x.size(1) > 0 && (x.scalar_type() != at::kBFloat16 || onednn_bf16_supported());
  if (op.has_value() && onednn_ok) {
    const char* attr = act == kActRelu ? "relu" : "none";
    at::Tensor y = op->call(x, use_packed ? *packed : weight, bias, attr, c10::List<std::optional<c10::Scalar>>(),
                            std::optional<c10::string_view>(""));
    if (act != kActNone && act != kActRelu) run_bias_activation(y, nullptr, act, y);
    return y;
  }
  TORCH_CHECK(!use_packed || packed->layout() == at::kStrided,
              "fastbert: a oneDNN-packed weight was given but oneDNN cannot run this GEMM here (",
              x.scalar_type(), " on this CPU)");
  at::Tensor y = at::linear(x, weight, bias);
  if (act != kActNone) run_bias_activation(y, nullptr, act, y);
  return y;
}

static void check_linear_args(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                              const std::optional<at::Tensor>& packed) {
  check_2d(x, "x");
  check_act_tensor(x, "x");
  check_act_tensor(weight, "weight");
  TORCH_CHECK(weight.dim() == 2, "fastbert: weight must be 2-D (out_features, in_features), got shape ",
              weight.sizes());
  TORCH_CHECK(weight.size(1) == x.size(1), "fastbert: x has ", x.size(1), " features but weight expects ",
              weight.size(1));
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), "fastbert: weight dtype ", weight.scalar_type(),
              " does not match x dtype ", x.scalar_type());
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0), "fastbert: bias must have shape (",
                weight.size(0), ",), got ", bias->sizes());
    TORCH_CHECK(bias->scalar_type() == weight.scalar_type(), "fastbert: bias dtype ", bias->scalar_type(),
                " does not match weight dtype ", weight.scalar_type());
    TORCH_CHECK(bias->device() == x.device(), "fastbert: bias is on ", bias->device(), " but x is on ", x.device());
  }
  if (packed.has_value() && packed->defined()) {
    TORCH_CHECK(packed->sizes() == weight.sizes(), "fastbert: packed weight shape ", packed->sizes(),
                " does not match weight shape ", weight.sizes());
    TORCH_CHECK(packed->scalar_type() == weight.scalar_type(), "fastbert: packed weight dtype ",
                packed->scalar_type(), " does not match weight dtype ", weight.scalar_type());
  }
}

static at::Tensor linear(const at::Tensor& x_in, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                         std::optional<c10::string_view> act, const std::optional<at::Tensor>& packed) {
  check_linear_args(x_in, weight, bias, packed);
  const int a = parse_act(act);
  if (x_in.size(0) == 0) return at::empty({0, weight.size(0)}, x_in.options());
  return gemm(x_in.contiguous(), weight, bias, a, packed);
}

static at::Tensor linear_residual_layernorm(const at::Tensor& x_in, const at::Tensor& weight,
                                            const std::optional<at::Tensor>& bias, const at::Tensor& residual,
                                            const at::Tensor& ln_weight, const at::Tensor& ln_bias, double eps,
                                            const std::optional<at::Tensor>& packed) {
  check_linear_args(x_in, weight, bias, packed);
  check_2d(residual, "residual");
  check_act_tensor(residual, "residual");
  TORCH_CHECK(residual.size(0) == x_in.size(0) && residual.size(1) == weight.size(0), "fastbert: residual shape ",
              residual.sizes(), " does not match the output shape (", x_in.size(0), ", ", weight.size(0), ")");
  // A bfloat16 GEMM may add into a float32 residual stream (bfloat16 inference keeps the stream in float32); the
  // output then is float32, like the residual.
  TORCH_CHECK(residual.scalar_type() == x_in.scalar_type() ||
                  (x_in.scalar_type() == at::kBFloat16 && residual.scalar_type() == at::kFloat),
              "fastbert: residual dtype ", residual.scalar_type(), " does not match x dtype ", x_in.scalar_type(),
              " (a float32 residual is allowed with bfloat16 x)");
  const int64_t n = weight.size(0);
  const at::Tensor g = param_f32(ln_weight, n, "ln_weight");
  const at::Tensor b = param_f32(ln_bias, n, "ln_bias");
  if (x_in.size(0) == 0) return at::empty({0, n}, residual.options());
  // GEMM with the bias fused, then one pass: LayerNorm(y + residual), written over y when the dtypes agree.
  at::Tensor y = gemm(x_in.contiguous(), weight, bias, kActNone, packed);
  const at::Tensor res = rows_view(residual);
  at::Tensor out = residual.scalar_type() == y.scalar_type() ? y : at::empty(y.sizes(), residual.options());
  run_add_layernorm(y, &res, nullptr, g, b, eps, out);
  return out;
}

// ---------------------------------------------------------------------------------------------------------
// Attention over packed sequences
// ---------------------------------------------------------------------------------------------------------

// The checked shape of one attention call.
struct AttnShape {
  int64_t T, hidden, head_dim, batch, longest;
  at::Tensor cu;  // contiguous int32 cu_seqlens
};

static AttnShape check_attention(const at::Tensor& qkv_in, const at::Tensor& cu_seqlens, int64_t max_seqlen,
                                 int64_t num_heads) {
  check_2d(qkv_in, "qkv");
  check_act_tensor(qkv_in, "qkv");
  TORCH_CHECK(num_heads > 0, "fastbert: num_heads must be positive, got ", num_heads);
  const int64_t T = qkv_in.size(0), width = qkv_in.size(1);
  TORCH_CHECK(width % (3 * num_heads) == 0 && width > 0, "fastbert: qkv has ", width,
              " features, which is not 3 * num_heads * head_dim for num_heads = ", num_heads);
  TORCH_CHECK(cu_seqlens.device().is_cpu(), "fastbert: cu_seqlens must be a CPU tensor, got device ",
              cu_seqlens.device());
  TORCH_CHECK(cu_seqlens.scalar_type() == at::kInt, "fastbert: cu_seqlens must be int32, got ",
              cu_seqlens.scalar_type());
  TORCH_CHECK(cu_seqlens.dim() == 1 && cu_seqlens.size(0) >= 1,
              "fastbert: cu_seqlens must be 1-D (batch + 1,), got shape ", cu_seqlens.sizes());
  AttnShape sh;
  sh.T = T;
  sh.hidden = width / 3;
  sh.head_dim = sh.hidden / num_heads;
  sh.cu = cu_seqlens.contiguous();
  const int32_t* c = sh.cu.data_ptr<int32_t>();
  sh.batch = sh.cu.size(0) - 1;
  TORCH_CHECK(c[0] == 0, "fastbert: cu_seqlens[0] must be 0, got ", c[0]);
  sh.longest = 0;
  for (int64_t i = 0; i < sh.batch; ++i) {
    TORCH_CHECK(c[i + 1] >= c[i], "fastbert: cu_seqlens must be non-decreasing, but cu_seqlens[", i + 1, "] = ",
                c[i + 1], " < cu_seqlens[", i, "] = ", c[i]);
    sh.longest = std::max<int64_t>(sh.longest, c[i + 1] - c[i]);
  }
  TORCH_CHECK(c[sh.batch] == T, "fastbert: cu_seqlens[-1] = ", c[sh.batch], " but qkv has ", T, " tokens");
  TORCH_CHECK(max_seqlen <= 0 || max_seqlen >= sh.longest, "fastbert: max_seqlen = ", max_seqlen,
              " is smaller than the longest sequence (", sh.longest, " tokens)");
  return sh;
}

// Dropout arguments (reference.check_dropout): p in [0, 1), a seed (int64 tensor of one element, in [0, 2^32))
// when p > 0. The threshold floor(p * 2^32) is computed here, on the host in double, as the reference does.
struct Dropout {
  uint32_t seed = 0, threshold = 0;
  float keep_scale = 1.0f;
};

static Dropout check_dropout(double p, const std::optional<at::Tensor>& seed) {
  TORCH_CHECK(p >= 0.0 && p < 1.0, "fastbert: attention dropout_p must be in [0, 1), got ", p);
  TORCH_CHECK(p == 0.0 || seed.has_value(), "fastbert: attention dropout_p = ", p,
              " needs a seed (an int64 tensor of one element)");
  Dropout d;
  if (seed.has_value()) {
    TORCH_CHECK(seed->numel() == 1 && seed->scalar_type() == at::kLong,
                "fastbert: attention seed must be an int64 tensor of one element, got ", seed->scalar_type(),
                " of shape ", seed->sizes());
    TORCH_CHECK(seed->device().is_cpu(), "fastbert: attention seed must be a CPU tensor, got device ",
                seed->device());
    const int64_t v = seed->contiguous().data_ptr<int64_t>()[0];
    TORCH_CHECK(v >= 0 && v <= 0xFFFFFFFFLL, "fastbert: attention seed must be in [0, 2**32), got ", v);
    d.seed = static_cast<uint32_t>(v);
  }
  d.threshold = static_cast<uint32_t>(p * 4294967296.0);
  d.keep_scale = static_cast<float>(1.0 / (1.0 - p));
  return d;
}

// Splits tasks[0..n) (costs in cost_prefix, n + 1 entries) into at most `threads` contiguous groups of about
// equal cost; returns the group bounds.
static std::vector<int64_t> split_by_cost(const std::vector<int64_t>& cost_prefix) {
  const int64_t n = static_cast<int64_t>(cost_prefix.size()) - 1;
  const int64_t total_cost = cost_prefix.back();
  const int64_t groups = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n));
  std::vector<int64_t> bounds(groups + 1, n);
  bounds[0] = 0;
  for (int64_t g = 1; g < groups; ++g) {
    const int64_t target = total_cost * g / groups;
    bounds[g] = std::lower_bound(cost_prefix.begin(), cost_prefix.end(), target) - cost_prefix.begin();
    bounds[g] = std::max(bounds[g], bounds[g - 1]);
  }
  return bounds;
}

static std::tuple<at::Tensor, at::Tensor> run_attention(const at::Tensor& qkv_in, const at::Tensor& cu_seqlens,
                                                        int64_t max_seqlen, int64_t num_heads, double scale,
                                                        double dropout_p, const std::optional<at::Tensor>& seed,
                                                        bool want_lse) {
  const AttnShape sh = check_attention(qkv_in, cu_seqlens, max_seqlen, num_heads);
  const Dropout drop = check_dropout(dropout_p, seed);
  const at::Tensor qkv = rows_view(qkv_in);
  at::Tensor out = at::empty({sh.T, sh.hidden}, qkv.options());
  at::Tensor lse = at::empty({want_lse ? num_heads : 0, sh.T}, qkv.options().dtype(at::kFloat));
  if (sh.T == 0) return {out, lse};
  const int32_t* c = sh.cu.data_ptr<int32_t>();

  // Work items: (sequence, head, block of up to kBlock query rows); cost ~ rows * keys. Empty sequences: none.
  constexpr int kBlock = 64;
  std::vector<AttnTask> tasks;
  std::vector<int64_t> cost_prefix{0};
  for (int64_t b = 0; b < sh.batch; ++b) {
    const int32_t len = c[b + 1] - c[b];
    for (int32_t h = 0; h < num_heads && len > 0; ++h) {
      for (int32_t q0 = 0; q0 < len; q0 += kBlock) {
        const int32_t q1 = std::min<int32_t>(len, q0 + kBlock);
        tasks.push_back(AttnTask{c[b], len, h, q0, q1});
        cost_prefix.push_back(cost_prefix.back() + static_cast<int64_t>(q1 - q0) * (len + 16) * sh.head_dim);
      }
    }
  }
  // One contiguous group of tasks per thread, split at equal cost (sequences may have very different lengths).
  const std::vector<int64_t> bounds = split_by_cost(cost_prefix);
  AttnArgs a;
  a.qkv = qkv.data_ptr();
  a.ld_qkv = qkv.stride(0);
  a.out = out.data_ptr();
  a.ld_out = out.stride(0);
  a.lse = want_lse ? lse.data_ptr<float>() : nullptr;
  a.ld_lse = sh.T;
  a.num_heads = static_cast<int>(num_heads);
  a.head_dim = static_cast<int>(sh.head_dim);
  a.max_len = static_cast<int>(sh.longest);
  a.scale = static_cast<float>(scale);
  a.bf16 = qkv.scalar_type() == at::kBFloat16;
  a.seed = drop.seed;
  a.threshold = drop.threshold;
  a.keep_scale = drop.keep_scale;
  const Kernels& k = kernels();
  const int64_t groups = static_cast<int64_t>(bounds.size()) - 1;
  at::parallel_for(0, groups, 1, [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g) k.attention(a, tasks.data() + bounds[g], bounds[g + 1] - bounds[g]);
  });
  return {out, lse};
}

static at::Tensor attention(const at::Tensor& qkv, const at::Tensor& cu_seqlens, int64_t max_seqlen,
                            int64_t num_heads, double scale, double dropout_p, const std::optional<at::Tensor>& seed) {
  return std::get<0>(run_attention(qkv, cu_seqlens, max_seqlen, num_heads, scale, dropout_p, seed, false));
}

// The training forward: also the per-row log-sum-exp of the scores, (num_heads, total_tokens) fp32.
static std::tuple<at::Tensor, at::Tensor> attention_with_lse(const at::Tensor& qkv, const at::Tensor& cu_seqlens,
                                                             int64_t max_seqlen, int64_t num_heads, double scale,
                                                             double dropout_p,
                                                             const std::optional<at::Tensor>& seed) {
  return run_attention(qkv, cu_seqlens, max_seqlen, num_heads, scale, dropout_p, seed, true);
}

static void check_same_shape(const at::Tensor& t, const char* name, const at::Tensor& like, const char* like_name) {
  TORCH_CHECK(t.sizes() == like.sizes(), "fastbert: ", name, " shape ", t.sizes(), " does not match ", like_name,
              " shape ", like.sizes());
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), "fastbert: ", name, " dtype ", t.scalar_type(),
              " does not match ", like_name, " dtype ", like.scalar_type());
  TORCH_CHECK(t.device() == like.device(), "fastbert: ", name, " is on ", t.device(), " but ", like_name, " is on ",
              like.device());
}

// d(qkv) (total, 3 * hidden) in the [q | k | v] layout, from dL/d(out), the forward's inputs, output and lse.
static at::Tensor attention_backward(const at::Tensor& grad_out, const at::Tensor& qkv_in, const at::Tensor& out_in,
                                     const at::Tensor& lse_in, const at::Tensor& cu_seqlens, int64_t max_seqlen,
                                     int64_t num_heads, double scale, double dropout_p,
                                     const std::optional<at::Tensor>& seed) {
  const AttnShape sh = check_attention(qkv_in, cu_seqlens, max_seqlen, num_heads);
  const Dropout drop = check_dropout(dropout_p, seed);
  check_2d(out_in, "out");
  TORCH_CHECK(out_in.size(0) == sh.T && out_in.size(1) == sh.hidden, "fastbert: out shape ", out_in.sizes(),
              " does not match the attention output shape (", sh.T, ", ", sh.hidden, ")");
  TORCH_CHECK(out_in.scalar_type() == qkv_in.scalar_type(), "fastbert: out dtype ", out_in.scalar_type(),
              " does not match qkv dtype ", qkv_in.scalar_type());
  TORCH_CHECK(out_in.device().is_cpu(), "fastbert: out must be a CPU tensor, got device ", out_in.device());
  check_same_shape(grad_out, "grad_out", out_in, "out");
  TORCH_CHECK(lse_in.device().is_cpu() && lse_in.scalar_type() == at::kFloat && lse_in.dim() == 2 &&
                  lse_in.size(0) == num_heads && lse_in.size(1) == sh.T,
              "fastbert: lse must be a float32 CPU tensor of shape (", num_heads, ", ", sh.T, "), got ",
              lse_in.scalar_type(), " of shape ", lse_in.sizes(), " on ", lse_in.device());
  const at::Tensor qkv = rows_view(qkv_in), out = rows_view(out_in), dout = rows_view(grad_out);
  const at::Tensor lse = lse_in.contiguous();
  // Every (row, column) of d(qkv) belongs to one (sequence, head) task, which writes all of them.
  at::Tensor dqkv = at::empty({sh.T, 3 * sh.hidden}, qkv.options());
  if (sh.T == 0) return dqkv;
  const int32_t* c = sh.cu.data_ptr<int32_t>();
  std::vector<AttnTask> tasks;
  std::vector<int64_t> cost_prefix{0};
  for (int64_t b = 0; b < sh.batch; ++b) {
    const int32_t len = c[b + 1] - c[b];
    for (int32_t h = 0; h < num_heads && len > 0; ++h) {
      tasks.push_back(AttnTask{c[b], len, h, 0, len});
      cost_prefix.push_back(cost_prefix.back() + static_cast<int64_t>(len) * (len + 16) * sh.head_dim);
    }
  }
  const std::vector<int64_t> bounds = split_by_cost(cost_prefix);
  AttnBwdArgs a;
  a.qkv = qkv.data_ptr();
  a.ld_qkv = qkv.stride(0);
  a.out = out.data_ptr();
  a.ld_out = out.stride(0);
  a.dout = dout.data_ptr();
  a.ld_dout = dout.stride(0);
  a.lse = lse.data_ptr<float>();
  a.ld_lse = sh.T;
  a.dqkv = dqkv.data_ptr();
  a.ld_dqkv = dqkv.stride(0);
  a.num_heads = static_cast<int>(num_heads);
  a.head_dim = static_cast<int>(sh.head_dim);
  a.max_len = static_cast<int>(sh.longest);
  a.scale = static_cast<float>(scale);
  a.bf16 = qkv.scalar_type() == at::kBFloat16;
  a.seed = drop.seed;
  a.threshold = drop.threshold;
  a.keep_scale = drop.keep_scale;
  const Kernels& k = kernels();
  const int64_t groups = static_cast<int64_t>(bounds.size()) - 1;
  at::parallel_for(0, groups, 1, [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g)
      k.attention_backward(a, tasks.data() + bounds[g], bounds[g + 1] - bounds[g]);
  });
  return dqkv;
}

// The kernels' dropout hash on int64 (head, row, col) triples of one shape (a test hook: the bits must equal
// fastbert.reference.dropout_bits).
static at::Tensor dropout_bits(const at::Tensor& seed, const at::Tensor& head, const at::Tensor& row,
                               const at::Tensor& col) {
  const Dropout d = check_dropout(0.0, seed);
  for (const auto& [t, name] : {std::pair<const at::Tensor&, const char*>{head, "head"}, {row, "row"}, {col, "col"}}) {
    TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kLong, "fastbert: ", name,
                " must be an int64 CPU tensor, got ", t.scalar_type(), " on ", t.device());
    TORCH_CHECK(t.sizes() == head.sizes(), "fastbert: ", name, " shape ", t.sizes(), " does not match head shape ",
                head.sizes());
  }
  const at::Tensor h = head.contiguous(), r = row.contiguous(), c = col.contiguous();
  at::Tensor out = at::empty(head.sizes(), head.options());
  kernels().dropout_bits(h.numel(), d.seed, h.data_ptr<int64_t>(), r.data_ptr<int64_t>(), c.data_ptr<int64_t>(),
                         out.data_ptr<int64_t>());
  return out;
}

// ---------------------------------------------------------------------------------------------------------
// Backward of the row-wise ops. Column reductions (dgamma, dbeta, dbias) are summed per fixed chunk of
// kReduceRows rows into a (chunks, n) partial buffer, then over chunks in chunk order: the same bits for any
// number of threads.
// ---------------------------------------------------------------------------------------------------------

constexpr int64_t kReduceRows = 64;

static int64_t num_chunks(int64_t rows) { return (rows + kReduceRows - 1) / kReduceRows; }

// t as a tensor of its own in `dtype` (a copy when t is a view: an op's outputs must not alias each other).
static at::Tensor owned(const at::Tensor& t, at::ScalarType dtype) {
  return t.scalar_type() == dtype ? t.clone() : t.to(dtype);
}

// sum over chunks of part (k, chunks, n) -> (k, n) fp32, each column in chunk order.
static at::Tensor sum_chunks(const at::Tensor& part) {
  const int64_t k = part.size(0), chunks = part.size(1), n = part.size(2);
  at::Tensor out = at::zeros({k, n}, part.options());
  const float* p = part.data_ptr<float>();
  float* o = out.data_ptr<float>();
  at::parallel_for(0, k * n, 4096, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t which = i / n, col = i % n;
      float acc = 0.f;
      for (int64_t c = 0; c < chunks; ++c) acc += p[(which * chunks + c) * n + col];
      o[i] = acc;
    }
  });
  return out;
}

static void check_grad(const at::Tensor& grad, const at::Tensor& like, const char* like_name) {
  check_same_shape(grad, "grad_out", like, like_name);
}

// (dx, dgamma, dbeta, dbias) of out = LayerNorm(x + bias + residual): dx = dL/d(x + bias + residual) (also the
// residual's gradient); dbias = the column sum of dx; dgamma, dbeta in ln_weight's dtype, dbias in bias's
// (x's without a bias).
static std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> run_layernorm_backward(
    const at::Tensor& grad_in, const at::Tensor& x, const at::Tensor* res, const at::Tensor* bias_f32,
    const at::Tensor& ln_weight, double eps, at::ScalarType dbias_dtype) {
  const int64_t rows = x.size(0), n = x.size(1);
  const bool bf16 = x.scalar_type() == at::kBFloat16;
  const at::Tensor g = param_f32(ln_weight, n, "ln_weight");
  const at::Tensor dy = rows_view(grad_in);
  at::Tensor dx = at::empty({rows, n}, x.options());
  const int64_t chunks = num_chunks(rows);
  at::Tensor part = at::zeros({3, chunks, n}, x.options().dtype(at::kFloat));
  float* pp = part.data_ptr<float>();
  const void* xp = x.data_ptr();
  const void* rp = res != nullptr ? res->data_ptr() : nullptr;
  const int64_t sx = x.stride(0), sr = res != nullptr ? res->stride(0) : 0;
  const float* bp = bias_f32 != nullptr ? bias_f32->data_ptr<float>() : nullptr;
  const float* gp = g.data_ptr<float>();
  const void* dyp = dy.data_ptr();
  void* dxp = dx.data_ptr();
  const int64_t sdy = dy.stride(0), sdx = dx.stride(0);
  const Kernels& k = kernels();
  at::parallel_for(0, chunks, std::max<int64_t>(1, row_grain(n) / kReduceRows), [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t r0 = c * kReduceRows, r1 = std::min(rows, r0 + kReduceRows);
      k.layernorm_backward(r0, r1, n, xp, sx, rp, sr, bp, gp, static_cast<float>(eps), dyp, sdy, dxp, sdx,
                           pp + c * n, pp + (chunks + c) * n, pp + (2 * chunks + c) * n, bf16);
    }
  });
  const at::Tensor sums = sum_chunks(part);
  return {dx, owned(sums[0], ln_weight.scalar_type()), owned(sums[1], ln_weight.scalar_type()),
          owned(sums[2], dbias_dtype)};
}

static std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> layernorm_backward(
    const at::Tensor& grad_out, const at::Tensor& x_in, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& residual, const at::Tensor& ln_weight, double eps) {
  check_2d(x_in, "x");
  check_act_tensor(x_in, "x");
  check_grad(grad_out, x_in, "x");
  const at::Tensor x = rows_view(x_in);
  at::Tensor res;
  if (residual.has_value()) {
    check_same_shape(*residual, "residual", x_in, "x");
    res = rows_view(*residual);
  }
  at::Tensor bf;
  if (bias.has_value()) bf = param_f32(*bias, x.size(1), "bias");
  return run_layernorm_backward(grad_out, x, res.defined() ? &res : nullptr, bf.defined() ? &bf : nullptr,
                                ln_weight, eps, bias.has_value() ? bias->scalar_type() : x.scalar_type());
}

// dz = dy * act'(x + bias) (written to dx unless dx_out is false) and its column sum (dbias).
static std::tuple<at::Tensor, at::Tensor> run_bias_activation_backward(const at::Tensor& grad_in,
                                                                       const at::Tensor& x, const float* bias,
                                                                       int act, bool dx_out,
                                                                       at::ScalarType dbias_dtype) {
  const int64_t rows = x.size(0), n = x.size(1);
  const bool bf16 = x.scalar_type() == at::kBFloat16;
  const at::Tensor dy = rows_view(grad_in);
  at::Tensor dx = at::empty({dx_out ? rows : 0, n}, x.options());
  const int64_t chunks = num_chunks(rows);
  at::Tensor part = at::zeros({1, chunks, n}, x.options().dtype(at::kFloat));
  float* pp = part.data_ptr<float>();
  const void* xp = x.data_ptr();
  const void* dyp = dy.data_ptr();
  void* dxp = dx_out ? dx.data_ptr() : nullptr;
  const int64_t sx = x.stride(0), sdy = dy.stride(0), sdx = dx_out ? dx.stride(0) : 0;
  const Kernels& k = kernels();
  at::parallel_for(0, chunks, std::max<int64_t>(1, row_grain(n) / kReduceRows), [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t r0 = c * kReduceRows, r1 = std::min(rows, r0 + kReduceRows);
      k.bias_activation_backward(r0, r1, n, xp, sx, bias, act, dyp, sdy, dxp, sdx, pp + c * n, bf16);
    }
  });
  return {dx, owned(sum_chunks(part)[0], dbias_dtype)};
}

// (dx, dbias) of out = act(x + bias); dbias in bias's dtype (x's without a bias).
static std::tuple<at::Tensor, at::Tensor> bias_activation_backward(const at::Tensor& grad_out, const at::Tensor& x_in,
                                                                   const std::optional<at::Tensor>& bias,
                                                                   std::optional<c10::string_view> act) {
  check_2d(x_in, "x");
  check_act_tensor(x_in, "x");
  check_grad(grad_out, x_in, "x");
  const int a = parse_act(act);
  const at::Tensor x = rows_view(x_in);
  at::Tensor bf;
  if (bias.has_value()) bf = param_f32(*bias, x.size(1), "bias");
  return run_bias_activation_backward(grad_out, x, bf.defined() ? bf.data_ptr<float>() : nullptr, a, true,
                                      bias.has_value() ? bias->scalar_type() : x.scalar_type());
}

// Deterministic scatter-add of dh (T, E) fp32 into a (rows, E) table gradient: tokens grouped by their row
// (a counting sort, tokens kept in increasing order), then each table row sums its own tokens; rows are shared
// out among threads, so no two threads write one row. Returns the gradient in `dtype`.
static at::Tensor scatter_rows(const float* dh, int64_t T, int64_t E, const int64_t* ids, int64_t rows,
                               at::ScalarType dtype) {
  std::vector<int64_t> offsets(rows + 1, 0), tokens(T);
  for (int64_t t = 0; t < T; ++t) ++offsets[(ids != nullptr ? ids[t] : 0) + 1];
  for (int64_t r = 0; r < rows; ++r) offsets[r + 1] += offsets[r];
  std::vector<int64_t> fill(offsets.begin(), offsets.end() - 1);
  for (int64_t t = 0; t < T; ++t) tokens[fill[ids != nullptr ? ids[t] : 0]++] = t;
  at::Tensor out = at::empty({rows, E}, at::TensorOptions().dtype(at::kFloat));
  float* op = out.data_ptr<float>();
  const Kernels& k = kernels();
  at::parallel_for(0, rows, row_grain(E), [&](int64_t r0, int64_t r1) {
    k.gather_sum_rows(r0, r1, E, offsets.data(), tokens.data(), dh, op);
  });
  return out.to(dtype);
}

// (dword, dposition, dtoken_type, dgamma, dbeta) of embeddings(); dtoken_type is (0, E) without a type table.
static std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> embeddings_backward(
    const at::Tensor& grad_out, const at::Tensor& input_ids, const at::Tensor& position_ids,
    const std::optional<at::Tensor>& token_type_ids, const at::Tensor& word_weight,
    const at::Tensor& position_weight, const std::optional<at::Tensor>& token_type_weight,
    const at::Tensor& ln_weight, double eps) {
  const bool bf16 = check_act_tensor(word_weight, "word_weight");
  TORCH_CHECK(word_weight.dim() == 2, "fastbert: word_weight must be 2-D, got shape ", word_weight.sizes());
  TORCH_CHECK(input_ids.dim() == 1, "fastbert: input_ids must be 1-D (total_tokens,), got shape ",
              input_ids.sizes());
  const int64_t T = input_ids.size(0), E = word_weight.size(1);
  auto check_table = [&](const at::Tensor& w, const char* name) {
    TORCH_CHECK(w.dim() == 2 && w.size(1) == E, "fastbert: ", name, " must have shape (rows, ", E, "), got ",
                w.sizes());
    TORCH_CHECK(w.scalar_type() == word_weight.scalar_type(), "fastbert: ", name, " dtype ", w.scalar_type(),
                " does not match word_weight dtype ", word_weight.scalar_type());
    TORCH_CHECK(w.device().is_cpu(), "fastbert: ", name, " must be a CPU tensor, got device ", w.device());
    return rows_view(w);
  };
  const at::Tensor ww = rows_view(word_weight);
  const at::Tensor pw = check_table(position_weight, "position_weight");
  at::Tensor tw;
  if (token_type_weight.has_value()) tw = check_table(*token_type_weight, "token_type_weight");
  TORCH_CHECK(grad_out.dim() == 2 && grad_out.size(0) == T && grad_out.size(1) == E, "fastbert: grad_out shape ",
              grad_out.sizes(), " does not match the embeddings output shape (", T, ", ", E, ")");
  TORCH_CHECK(grad_out.scalar_type() == word_weight.scalar_type(), "fastbert: grad_out dtype ",
              grad_out.scalar_type(), " does not match word_weight dtype ", word_weight.scalar_type());
  TORCH_CHECK(grad_out.device().is_cpu(), "fastbert: grad_out must be a CPU tensor, got device ", grad_out.device());
  const at::Tensor ids = check_ids(input_ids, "input_ids", T, ww.size(0), "word_weight");
  const at::Tensor pos = check_ids(position_ids, "position_ids", T, pw.size(0), "position_weight");
  at::Tensor tt;
  if (tw.defined() && token_type_ids.has_value())
    tt = check_ids(*token_type_ids, "token_type_ids", T, tw.size(0), "token_type_weight");
  const at::Tensor g = param_f32(ln_weight, E, "ln_weight");
  const at::Tensor dy = rows_view(grad_out);
  at::Tensor dh = at::empty({T, E}, at::TensorOptions().dtype(at::kFloat));
  const int64_t chunks = num_chunks(T);
  at::Tensor part = at::zeros({2, chunks, E}, at::TensorOptions().dtype(at::kFloat));
  const int64_t* ip = ids.data_ptr<int64_t>();
  const int64_t* pp = pos.data_ptr<int64_t>();
  const int64_t* tp = tt.defined() ? tt.data_ptr<int64_t>() : nullptr;
  const void* wp = ww.data_ptr();
  const void* pwp = pw.data_ptr();
  const void* twp = tw.defined() ? tw.data_ptr() : nullptr;
  const int64_t sw = ww.stride(0), sp = pw.stride(0), st = tw.defined() ? tw.stride(0) : 0;
  const float* gp = g.data_ptr<float>();
  const void* dyp = dy.data_ptr();
  const int64_t sdy = dy.stride(0);
  float* dhp = dh.data_ptr<float>();
  float* partp = part.data_ptr<float>();
  const Kernels& k = kernels();
  at::parallel_for(0, chunks, std::max<int64_t>(1, row_grain(E) / kReduceRows), [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t t0 = c * kReduceRows, t1 = std::min(T, t0 + kReduceRows);
      k.embeddings_backward(t0, t1, E, ip, pp, tp, wp, sw, pwp, sp, twp, st, gp, static_cast<float>(eps), dyp, sdy,
                            dhp, partp + c * E, partp + (chunks + c) * E, bf16);
    }
  });
  const at::Tensor sums = sum_chunks(part);
  const at::ScalarType wt = word_weight.scalar_type();
  at::Tensor dword = scatter_rows(dhp, T, E, ip, ww.size(0), wt);
  at::Tensor dpos = scatter_rows(dhp, T, E, pp, pw.size(0), wt);
  at::Tensor dtype = tw.defined() ? scatter_rows(dhp, T, E, tp, tw.size(0), wt)
                                  : at::empty({0, E}, word_weight.options());
  return {dword, dpos, dtype, owned(sums[0], ln_weight.scalar_type()), owned(sums[1], ln_weight.scalar_type())};
}

// (dx, dweight, dbias) of out = act(x @ weight.T + bias): with an activation the pre-activation is recomputed
// (one GEMM, on the plain weight). dX = dZ W, dW = dZ^T X (at::mm), dbias = the column sum of dZ (fixed chunks).
// dbias is in bias's dtype (weight's without a bias).
static std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_backward(const at::Tensor& grad_out,
                                                                      const at::Tensor& x_in,
                                                                      const at::Tensor& weight,
                                                                      const std::optional<at::Tensor>& bias,
                                                                      std::optional<c10::string_view> act) {
  check_linear_args(x_in, weight, bias, std::nullopt);
  const int a = parse_act(act);
  const int64_t T = x_in.size(0), N = weight.size(0);
  TORCH_CHECK(grad_out.dim() == 2 && grad_out.size(0) == T && grad_out.size(1) == N, "fastbert: grad_out shape ",
              grad_out.sizes(), " does not match the linear output shape (", T, ", ", N, ")");
  TORCH_CHECK(grad_out.scalar_type() == x_in.scalar_type(), "fastbert: grad_out dtype ", grad_out.scalar_type(),
              " does not match x dtype ", x_in.scalar_type());
  TORCH_CHECK(grad_out.device().is_cpu(), "fastbert: grad_out must be a CPU tensor, got device ", grad_out.device());
  const at::ScalarType db_dtype = bias.has_value() ? bias->scalar_type() : weight.scalar_type();
  const at::Tensor x = x_in.contiguous();
  at::Tensor dz, db;
  if (a == kActNone) {
    dz = rows_view(grad_out);
    db = std::get<1>(run_bias_activation_backward(dz, dz, nullptr, kActNone, false, db_dtype));
  } else if (T == 0) {
    dz = at::empty({0, N}, x.options());
    db = at::zeros({N}, x.options().dtype(db_dtype));
  } else {
    const at::Tensor y = gemm(x, weight, bias, kActNone, std::nullopt);  // the pre-activation
    std::tie(dz, db) = run_bias_activation_backward(grad_out, y, nullptr, a, true, db_dtype);
  }
  at::Tensor dx = at::mm(dz, weight);
  at::Tensor dw = at::mm(dz.t(), x);
  return {dx, dw, db};
}

// (dx, dweight, dbias, dresidual, dgamma, dbeta) of out = LayerNorm(x @ weight.T + bias + residual): the
// pre-norm sum is recomputed (one GEMM on the plain weight); dresidual = dL/d(pre-norm sum).
static std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
linear_residual_layernorm_backward(const at::Tensor& grad_out, const at::Tensor& x_in, const at::Tensor& weight,
                                   const std::optional<at::Tensor>& bias, const at::Tensor& residual,
                                   const at::Tensor& ln_weight, double eps) {
  check_linear_args(x_in, weight, bias, std::nullopt);
  check_2d(residual, "residual");
  check_act_tensor(residual, "residual");
  const int64_t T = x_in.size(0), N = weight.size(0);
  TORCH_CHECK(residual.size(0) == T && residual.size(1) == N, "fastbert: residual shape ", residual.sizes(),
              " does not match the output shape (", T, ", ", N, ")");
  TORCH_CHECK(residual.scalar_type() == x_in.scalar_type(), "fastbert: residual dtype ", residual.scalar_type(),
              " does not match x dtype ", x_in.scalar_type());
  check_grad(grad_out, residual, "residual");
  const at::ScalarType db_dtype = bias.has_value() ? bias->scalar_type() : weight.scalar_type();
  const at::Tensor x = x_in.contiguous();
  const at::Tensor y = T > 0 ? gemm(x, weight, bias, kActNone, std::nullopt) : at::empty({0, N}, x.options());
  const at::Tensor res = rows_view(residual);
  auto [dh, dgamma, dbeta, db] = run_layernorm_backward(grad_out, y, &res, nullptr, ln_weight, eps, db_dtype);
  at::Tensor dx = at::mm(dh, weight);
  at::Tensor dw = at::mm(dh.t(), x);
  return {dx, dw, db, dh, dgamma, dbeta};
}


// ---------------------------------------------------------------------------------------------------------
// int8 inference: per-row (per-token) asymmetric uint8 activations x per-output-channel symmetric int8 weights,
// GEMM in oneDNN (torch's onednn::qlinear_pointwise: VNNI / AMX where the CPU has them), dequantization, bias,
// activation, residual + LayerNorm and the next GEMM's quantization fused into one pass over each block of rows.
// The arithmetic is reference.quantize_rows / reference.int8_linear (fastbert/reference.py).
// ---------------------------------------------------------------------------------------------------------

// Looked up by name and called boxed (one IValue stack), so no C++ signature has to match the registration's
// across torch releases.
static const std::optional<c10::OperatorHandle>& onednn_op(const char* name) {
  static std::optional<c10::OperatorHandle> qlinear, prepack;
  static const bool found = [] {
    if (at::hasMKLDNN()) {
      qlinear = c10::Dispatcher::singleton().findSchema({"onednn::qlinear_pointwise", ""});
      prepack = c10::Dispatcher::singleton().findSchema({"onednn::qlinear_prepack", ""});
    }
    return true;
  }();
  (void)found;
  return std::strcmp(name, "qlinear") == 0 ? qlinear : prepack;
}

static at::Tensor call_boxed(const c10::OperatorHandle& op, std::vector<c10::IValue> stack) {
  op.callBoxed(&stack);
  return stack.at(0).toTensor();
}

static at::Tensor onednn_prepack(const at::Tensor& wq) {
  return call_boxed(*onednn_op("prepack"), {c10::IValue(wq), c10::IValue()});
}

// sum_k q[r, k] * w[j, k] * w_scale[j] in fp32 through oneDNN (called with w_scale = 1) (packed: its prepacked weight; undefined: packed
// here, per call); nullopt when oneDNN cannot run it.
static std::optional<at::Tensor> onednn_int8_gemm(const at::Tensor& q, const at::Tensor& wq, const at::Tensor& ws,
                                                  const at::Tensor* packed) {
  const auto& op = onednn_op("qlinear");
  if (!op.has_value() || !onednn_op("prepack").has_value() || q.size(1) == 0) return std::nullopt;
  const at::Tensor w = packed != nullptr ? *packed : onednn_prepack(wq);
  const at::Tensor w_zp = at::zeros({wq.size(0)}, at::TensorOptions().dtype(at::kLong));
  return call_boxed(*op, {c10::IValue(q), c10::IValue(1.0), c10::IValue(int64_t{0}), c10::IValue(w), c10::IValue(ws),
                          c10::IValue(w_zp), c10::IValue(), c10::IValue(1.0), c10::IValue(int64_t{0}),
                          c10::IValue(at::kFloat), c10::IValue(std::string("none")),
                          c10::IValue(c10::List<std::optional<c10::Scalar>>()), c10::IValue(std::string(""))});
}

// The exact product in float64 (|sum| < 2^53), for a torch without oneDNN's int8 GEMM: correct, slow.
static at::Tensor reference_int8_gemm(const at::Tensor& q, const at::Tensor& wq, const at::Tensor& ws) {
  return at::mm(q.to(at::kDouble), wq.to(at::kDouble).t()).mul_(ws.to(at::kDouble)).to(at::kFloat);
}

// How int8 GEMMs run here, probed once: "onednn" (exact u8 x s8 products), "onednn-7bit" (this CPU's oneDNN
// kernel adds u8 x s8 pairs in saturating int16 (AVX2 / AVX-512 without VNNI): exact only with weights in
// [-63, 63], so weights are quantized to 7 bits), or "reference" (no oneDNN int8 GEMM: float64 matmul).
static std::string int8_gemm_kind() {
  static const std::string kind = []() -> std::string {
    const int64_t k = 256, n = 16;
    const at::Tensor q = at::full({2, k}, 255, at::TensorOptions().dtype(at::kByte));
    const at::Tensor w = at::full({n, k}, 127, at::TensorOptions().dtype(at::kChar));
    const at::Tensor ws = at::ones({n}, at::TensorOptions().dtype(at::kFloat));
    std::optional<at::Tensor> out;
    try {
      out = onednn_int8_gemm(q, w, ws, nullptr);
    } catch (const c10::Error& e) {
      TORCH_WARN("fastbert: oneDNN's int8 GEMM failed its probe, int8 GEMMs fall back to float64: ", e.what_without_backtrace());
      out = std::nullopt;
    }
    if (!out.has_value()) return "reference";
    const double exact = 255.0 * 127.0 * static_cast<double>(k);  // 8,290,560 < 2^24: exact in fp32
    return out->eq(exact).all().item<bool>() ? "onednn" : "onednn-7bit";
  }();
  return kind;
}

static at::Tensor int8_gemm(const at::Tensor& q, const at::Tensor& wq, const at::Tensor& ws,
                            const std::optional<at::Tensor>& packed) {
  const bool use_packed = packed.has_value() && packed->defined() && packed->is_mkldnn();
  if (int8_gemm_kind() != "reference") {
    auto out = onednn_int8_gemm(q, wq, ws, use_packed ? &*packed : nullptr);
    if (out.has_value()) return *out;
  }
  return reference_int8_gemm(q, wq, ws);
}

static std::string int8_info() { return int8_gemm_kind(); }

static at::Tensor int8_prepack(const at::Tensor& weight_q) {
  TORCH_CHECK(weight_q.device().is_cpu() && weight_q.scalar_type() == at::kChar && weight_q.dim() == 2,
              "fastbert: int8_prepack takes a 2-D int8 CPU weight (out_features, in_features), got ",
              weight_q.scalar_type(), " of shape ", weight_q.sizes(), " on ", weight_q.device());
  if (int8_gemm_kind() == "reference" || weight_q.size(1) == 0) return weight_q.contiguous();
  return onednn_prepack(weight_q.contiguous());
}

// The quantized activation (q, scale, zp) of one GEMM input, checked.
static void check_quantized(const at::Tensor& q, const at::Tensor& scale, const at::Tensor& zp) {
  check_2d(q, "q");
  TORCH_CHECK(q.device().is_cpu() && q.scalar_type() == at::kByte, "fastbert: q must be a uint8 CPU tensor, got ",
              q.scalar_type(), " on ", q.device());
  TORCH_CHECK(scale.device().is_cpu() && scale.scalar_type() == at::kFloat && scale.dim() == 1 &&
                  scale.size(0) == q.size(0),
              "fastbert: scale must be float32 of shape (", q.size(0), ",), got ", scale.scalar_type(), " ",
              scale.sizes());
  TORCH_CHECK(zp.device().is_cpu() && zp.scalar_type() == at::kInt && zp.dim() == 1 && zp.size(0) == q.size(0),
              "fastbert: zp must be int32 of shape (", q.size(0), ",), got ", zp.scalar_type(), " ", zp.sizes());
}

static void check_int8_weight(const at::Tensor& q, const at::Tensor& wq, const at::Tensor& ws,
                              const at::Tensor& wsum, const std::optional<at::Tensor>& bias,
                              const std::optional<at::Tensor>& packed) {
  TORCH_CHECK(wq.device().is_cpu() && wq.scalar_type() == at::kChar && wq.dim() == 2,
              "fastbert: weight_q must be a 2-D int8 CPU tensor (out_features, in_features), got ", wq.scalar_type(),
              " of shape ", wq.sizes());
  TORCH_CHECK(wq.size(1) == q.size(1), "fastbert: q has ", q.size(1), " features but weight_q expects ", wq.size(1));
  const int64_t n = wq.size(0);
  for (const auto& [t, name] : {std::pair<const at::Tensor*, const char*>{&ws, "weight_scale"}, {&wsum, "weight_sum"}})
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kFloat && t->dim() == 1 && t->size(0) == n,
                "fastbert: ", name, " must be float32 of shape (", n, ",), got ", t->scalar_type(), " ", t->sizes());
  if (bias.has_value())
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == n, "fastbert: bias must have shape (", n, ",), got ",
                bias->sizes());
  if (packed.has_value() && packed->defined()) {
    // int8_prepack's result: oneDNN's packed form, shaped (in_features, out_features), or weight_q itself.
    const bool matches = packed->is_mkldnn() ? packed->dim() == 2 && packed->size(0) == wq.size(1) &&
                                                   packed->size(1) == wq.size(0)
                                             : packed->sizes() == wq.sizes();
    TORCH_CHECK(matches, "fastbert: packed weight shape ", packed->sizes(), " is not int8_prepack's for weight_q of shape ",
                wq.sizes());
  }
}

static const float* optional_vector(const std::optional<at::Tensor>& t, int64_t n, const char* name,
                                    at::Tensor& holder) {
  if (!t.has_value()) return nullptr;
  holder = param_f32(*t, n, name);
  return holder.data_ptr<float>();
}

// Quantizes rows [r0, r1) of y (fp32) into q / scale / zp (reference.quantize_rows).
static void quantize_block(const Kernels& k, int64_t r0, int64_t r1, const at::Tensor& y, const float* smooth_inv,
                           at::Tensor& q, at::Tensor& scale, at::Tensor& zp) {
  k.quantize_rows(r0, r1, y.size(1), y.data_ptr<float>(), y.stride(0), smooth_inv, q.data_ptr<uint8_t>(),
                  q.stride(0), scale.data_ptr<float>(), zp.data_ptr<int32_t>());
}

// Raises when a row could not be quantized (NaN or infinity in the values, or a range past float32).
static void check_quantized_rows(const at::Tensor& scale, const char* what) {
  const float* s = scale.data_ptr<float>();  // contiguous, written by quantize_rows
  for (int64_t row = 0; row < scale.numel(); ++row)
    TORCH_CHECK(s[row] == s[row], "fastbert: int8 quantization of ", what, ": row ", row,
                " holds a NaN or an infinity (or a range past float32), which int8 cannot represent");
}

static std::tuple<at::Tensor, at::Tensor, at::Tensor> new_quantized(int64_t rows, int64_t n) {
  return {at::empty({rows, n}, at::TensorOptions().dtype(at::kByte)),
          at::empty({rows}, at::TensorOptions().dtype(at::kFloat)),
          at::empty({rows}, at::TensorOptions().dtype(at::kInt))};
}

static std::tuple<at::Tensor, at::Tensor, at::Tensor> int8_quantize(const at::Tensor& x_in,
                                                                   const std::optional<at::Tensor>& smooth_inv) {
  check_2d(x_in, "x");
  TORCH_CHECK(x_in.device().is_cpu() && x_in.scalar_type() == at::kFloat, "fastbert: x must be a float32 CPU tensor, got ",
              x_in.scalar_type(), " on ", x_in.device());
  const at::Tensor x = rows_view(x_in);
  const int64_t rows = x.size(0), n = x.size(1);
  at::Tensor holder;
  const float* sm = optional_vector(smooth_inv, n, "smooth_inv", holder);
  auto [q, scale, zp] = new_quantized(rows, n);
  const Kernels& k = kernels();
  at::parallel_for(0, rows, row_grain(n), [&](int64_t r0, int64_t r1) { quantize_block(k, r0, r1, x, sm, q, scale, zp); });
  check_quantized_rows(scale, "x");
  return {q, scale, zp};
}

// The GEMM and its dequantization (+ bias) for every int8 linear; `after` runs on each dequantized block of rows.
template <typename After>
static at::Tensor int8_linear_core(const at::Tensor& q_in, const at::Tensor& scale, const at::Tensor& zp,
                                   const at::Tensor& wq, const at::Tensor& ws, const at::Tensor& wsum,
                                   const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& packed,
                                   After&& after) {
  check_quantized(q_in, scale, zp);
  check_int8_weight(q_in, wq, ws, wsum, bias, packed);
  const at::Tensor zp_rows = zp.contiguous();
  const int32_t* zpv = zp_rows.data_ptr<int32_t>();
  for (int64_t r = 0; r < zp_rows.numel(); ++r)
    TORCH_CHECK(zpv[r] >= 0 && zpv[r] <= 255, "fastbert: zp values must lie in [0, 255], got ", zpv[r], " in row ", r);
  const int64_t rows = q_in.size(0), n = wq.size(0);
  if (rows == 0) return at::empty({0, n}, at::TensorOptions().dtype(at::kFloat));
  // The GEMM gives the integer sums (weight scale 1): the scales are applied after the zero-point correction.
  at::Tensor acc = int8_gemm(q_in.contiguous(), wq, at::ones({n}, at::TensorOptions().dtype(at::kFloat)), packed)
                       .contiguous();
  const at::Tensor wsc = ws.contiguous(), wsumc = wsum.contiguous();
  at::Tensor bias_holder;
  const float* bp = optional_vector(bias, n, "bias", bias_holder);
  const float* wsp = wsc.data_ptr<float>();
  const float* wsump = wsumc.data_ptr<float>();
  const Kernels& k = kernels();
  float* ap = acc.data_ptr<float>();
  const float* sp = scale.contiguous().data_ptr<float>();
  const at::Tensor zpc = zp.contiguous();
  const int32_t* zpp = zpc.data_ptr<int32_t>();
  at::parallel_for(0, rows, row_grain(n), [&](int64_t r0, int64_t r1) {
    k.dequantize_rows(r0, r1, n, ap, acc.stride(0), sp, zpp, wsp, wsump, bp);
    after(k, r0, r1, acc);
  });
  return acc;
}

static at::Tensor int8_linear(const at::Tensor& q, const at::Tensor& scale, const at::Tensor& zp,
                              const at::Tensor& wq, const at::Tensor& ws, const at::Tensor& wsum,
                              const std::optional<at::Tensor>& bias, std::optional<c10::string_view> act,
                              const std::optional<at::Tensor>& packed) {
  const int a = parse_act(act);
  return int8_linear_core(q, scale, zp, wq, ws, wsum, bias, packed,
                          [&](const Kernels& k, int64_t r0, int64_t r1, at::Tensor& y) {
                            if (a != kActNone)
                              k.bias_activation(r0, r1, y.size(1), y.data_ptr(), y.stride(0), nullptr, a, y.data_ptr(),
                                                y.stride(0), false);
                          });
}

static std::tuple<at::Tensor, at::Tensor, at::Tensor> int8_linear_quantize(
    const at::Tensor& q, const at::Tensor& scale, const at::Tensor& zp, const at::Tensor& wq, const at::Tensor& ws,
    const at::Tensor& wsum, const std::optional<at::Tensor>& bias, std::optional<c10::string_view> act,
    const std::optional<at::Tensor>& smooth_inv, const std::optional<at::Tensor>& packed) {
  const int a = parse_act(act);
  const int64_t n = wq.dim() == 2 ? wq.size(0) : 0;
  at::Tensor sm_holder;
  const float* sm = optional_vector(smooth_inv, n, "smooth_inv", sm_holder);
  auto [oq, os, oz] = new_quantized(q.dim() == 2 ? q.size(0) : 0, n);
  int8_linear_core(q, scale, zp, wq, ws, wsum, bias, packed,
                   [&](const Kernels& k, int64_t r0, int64_t r1, at::Tensor& y) {
                     if (a != kActNone)
                       k.bias_activation(r0, r1, y.size(1), y.data_ptr(), y.stride(0), nullptr, a, y.data_ptr(),
                                         y.stride(0), false);
                     quantize_block(k, r0, r1, y, sm, oq, os, oz);
                   });
  check_quantized_rows(os, "the activation output");
  return {oq, os, oz};
}

// LayerNorm(dequantized GEMM + bias + residual): the checks shared by both residual forms; returns the params.
static std::tuple<at::Tensor, at::Tensor, at::Tensor> check_int8_residual(const at::Tensor& q, const at::Tensor& wq,
                                                                         const at::Tensor& residual,
                                                                         const at::Tensor& ln_weight,
                                                                         const at::Tensor& ln_bias) {
  check_2d(residual, "residual");
  TORCH_CHECK(residual.device().is_cpu() && residual.scalar_type() == at::kFloat,
              "fastbert: residual must be a float32 CPU tensor, got ", residual.scalar_type(), " on ",
              residual.device());
  TORCH_CHECK(wq.dim() == 2 && q.dim() == 2 && residual.size(0) == q.size(0) && residual.size(1) == wq.size(0),
              "fastbert: residual shape ", residual.sizes(), " does not match the output shape (",
              q.dim() == 2 ? q.size(0) : -1, ", ", wq.dim() == 2 ? wq.size(0) : -1, ")");
  const int64_t n = wq.size(0);
  return {rows_view(residual), param_f32(ln_weight, n, "ln_weight"), param_f32(ln_bias, n, "ln_bias")};
}

static at::Tensor int8_linear_residual_layernorm(const at::Tensor& q, const at::Tensor& scale, const at::Tensor& zp,
                                                 const at::Tensor& wq, const at::Tensor& ws, const at::Tensor& wsum,
                                                 const std::optional<at::Tensor>& bias, const at::Tensor& residual,
                                                 const at::Tensor& ln_weight, const at::Tensor& ln_bias, double eps,
                                                 const std::optional<at::Tensor>& packed) {
  auto [res, g, b] = check_int8_residual(q, wq, residual, ln_weight, ln_bias);
  return int8_linear_core(q, scale, zp, wq, ws, wsum, bias, packed,
                          [&](const Kernels& k, int64_t r0, int64_t r1, at::Tensor& y) {
                            k.add_layernorm(r0, r1, y.size(1), y.data_ptr(), y.stride(0), res.data_ptr(),
                                            res.stride(0), nullptr, g.data_ptr<float>(), b.data_ptr<float>(),
                                            static_cast<float>(eps), y.data_ptr(), y.stride(0), 0);
                          });
}

static std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> int8_linear_residual_layernorm_quantize(
    const at::Tensor& q, const at::Tensor& scale, const at::Tensor& zp, const at::Tensor& wq, const at::Tensor& ws,
    const at::Tensor& wsum, const std::optional<at::Tensor>& bias, const at::Tensor& residual,
    const at::Tensor& ln_weight, const at::Tensor& ln_bias, double eps, const std::optional<at::Tensor>& smooth_inv,
    const std::optional<at::Tensor>& packed) {
  auto [res, g, b] = check_int8_residual(q, wq, residual, ln_weight, ln_bias);
  const int64_t n = wq.size(0);
  at::Tensor sm_holder;
  const float* sm = optional_vector(smooth_inv, n, "smooth_inv", sm_holder);
  auto [oq, os, oz] = new_quantized(q.size(0), n);
  at::Tensor y = int8_linear_core(q, scale, zp, wq, ws, wsum, bias, packed,
                                  [&](const Kernels& k, int64_t r0, int64_t r1, at::Tensor& y) {
                                    k.add_layernorm(r0, r1, y.size(1), y.data_ptr(), y.stride(0), res.data_ptr(),
                                                    res.stride(0), nullptr, g.data_ptr<float>(),
                                                    b.data_ptr<float>(), static_cast<float>(eps), y.data_ptr(),
                                                    y.stride(0), 0);
                                    quantize_block(k, r0, r1, y, sm, oq, os, oz);
                                  });
  check_quantized_rows(os, "the LayerNorm output");
  return {y, oq, os, oz};
}

}  // namespace fastbert

TORCH_LIBRARY(fastbert, m) {
  m.def(
      "embeddings(Tensor input_ids, Tensor position_ids, Tensor? token_type_ids, Tensor word_weight, "
      "Tensor position_weight, Tensor? token_type_weight, Tensor ln_weight, Tensor ln_bias, float eps) -> Tensor");
  m.def("add_layernorm(Tensor x, Tensor? residual, Tensor ln_weight, Tensor ln_bias, float eps) -> Tensor");
  m.def("bias_activation(Tensor x, Tensor? bias, str? act) -> Tensor");
  m.def(
      "bias_residual_layernorm(Tensor x, Tensor? bias, Tensor residual, Tensor ln_weight, Tensor ln_bias, "
      "float eps) -> Tensor");
  m.def("linear(Tensor x, Tensor weight, Tensor? bias, str? act=None, Tensor? packed=None) -> Tensor");
  m.def(
      "linear_residual_layernorm(Tensor x, Tensor weight, Tensor? bias, Tensor residual, Tensor ln_weight, "
      "Tensor ln_bias, float eps, Tensor? packed=None) -> Tensor");
  m.def(
      "attention(Tensor qkv, Tensor cu_seqlens, int max_seqlen, int num_heads, float scale, float dropout_p=0.0, "
      "Tensor? seed=None) -> Tensor");
  // Training: the forward that also returns the per-row log-sum-exp (num_heads, total_tokens) fp32, and the
  // backward ops (each op's gradient, registered in fastbert/_cpp.py with torch.library.register_autograd).
  m.def(
      "attention_with_lse(Tensor qkv, Tensor cu_seqlens, int max_seqlen, int num_heads, float scale, "
      "float dropout_p=0.0, Tensor? seed=None) -> (Tensor, Tensor)");
  m.def(
      "attention_backward(Tensor grad_out, Tensor qkv, Tensor out, Tensor lse, Tensor cu_seqlens, int max_seqlen, "
      "int num_heads, float scale, float dropout_p=0.0, Tensor? seed=None) -> Tensor");
  m.def(
      "layernorm_backward(Tensor grad_out, Tensor x, Tensor? bias, Tensor? residual, Tensor ln_weight, float eps) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
  m.def("bias_activation_backward(Tensor grad_out, Tensor x, Tensor? bias, str? act) -> (Tensor, Tensor)");
  m.def(
      "embeddings_backward(Tensor grad_out, Tensor input_ids, Tensor position_ids, Tensor? token_type_ids, "
      "Tensor word_weight, Tensor position_weight, Tensor? token_type_weight, Tensor ln_weight, float eps) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "linear_backward(Tensor grad_out, Tensor x, Tensor weight, Tensor? bias, str? act=None) "
      "-> (Tensor, Tensor, Tensor)");
  m.def(
      "linear_residual_layernorm_backward(Tensor grad_out, Tensor x, Tensor weight, Tensor? bias, "
      "Tensor residual, Tensor ln_weight, float eps) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("_dropout_bits(Tensor seed, Tensor head, Tensor row, Tensor col) -> Tensor");
  m.def("_set_isa(str name) -> str", &fastbert::set_isa);
  // int8 inference (no gradients: int8 models refuse train()).
  m.def("int8_quantize(Tensor x, Tensor? smooth_inv=None) -> (Tensor, Tensor, Tensor)");
  m.def("int8_prepack(Tensor weight_q) -> Tensor");
  m.def(
      "int8_linear(Tensor q, Tensor scale, Tensor zp, Tensor weight_q, Tensor weight_scale, Tensor weight_sum, "
      "Tensor? bias, str? act=None, Tensor? packed=None) -> Tensor");
  m.def(
      "int8_linear_quantize(Tensor q, Tensor scale, Tensor zp, Tensor weight_q, Tensor weight_scale, "
      "Tensor weight_sum, Tensor? bias, str? act=None, Tensor? smooth_inv=None, Tensor? packed=None) "
      "-> (Tensor, Tensor, Tensor)");
  m.def(
      "int8_linear_residual_layernorm(Tensor q, Tensor scale, Tensor zp, Tensor weight_q, Tensor weight_scale, "
      "Tensor weight_sum, Tensor? bias, Tensor residual, Tensor ln_weight, Tensor ln_bias, float eps, "
      "Tensor? packed=None) -> Tensor");
  m.def(
      "int8_linear_residual_layernorm_quantize(Tensor q, Tensor scale, Tensor zp, Tensor weight_q, "
      "Tensor weight_scale, Tensor weight_sum, Tensor? bias, Tensor residual, Tensor ln_weight, Tensor ln_bias, "
      "float eps, Tensor? smooth_inv=None, Tensor? packed=None) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("int8_info() -> str", &fastbert::int8_info);
}

TORCH_LIBRARY_IMPL(fastbert, CPU, m) {
  m.impl("embeddings", &fastbert::embeddings);
  m.impl("add_layernorm", &fastbert::add_layernorm);
  m.impl("bias_activation", &fastbert::bias_activation);
  m.impl("bias_residual_layernorm", &fastbert::bias_residual_layernorm);
  m.impl("linear", &fastbert::linear);
  m.impl("linear_residual_layernorm", &fastbert::linear_residual_layernorm);
  m.impl("attention", &fastbert::attention);
  m.impl("attention_with_lse", &fastbert::attention_with_lse);
  m.impl("attention_backward", &fastbert::attention_backward);
  m.impl("layernorm_backward", &fastbert::layernorm_backward);
  m.impl("bias_activation_backward", &fastbert::bias_activation_backward);
  m.impl("embeddings_backward", &fastbert::embeddings_backward);
  m.impl("linear_backward", &fastbert::linear_backward);
  m.impl("linear_residual_layernorm_backward", &fastbert::linear_residual_layernorm_backward);
  m.impl("_dropout_bits", &fastbert::dropout_bits);
  m.impl("int8_quantize", &fastbert::int8_quantize);
  m.impl("int8_prepack", &fastbert::int8_prepack);
  m.impl("int8_linear", &fastbert::int8_linear);
  m.impl("int8_linear_quantize", &fastbert::int8_linear_quantize);
  m.impl("int8_linear_residual_layernorm", &fastbert::int8_linear_residual_layernorm);
  m.impl("int8_linear_residual_layernorm_quantize", &fastbert::int8_linear_residual_layernorm_quantize);
}

// A oneDNN-prepacked weight (torch.ops.mkldnn._reorder_linear_weight) is an MkldnnCPU tensor: the linears must
// also be found under that key.
TORCH_LIBRARY_IMPL(fastbert, MkldnnCPU, m) {
  m.impl("linear", &fastbert::linear);
  m.impl("linear_residual_layernorm", &fastbert::linear_residual_layernorm);
  m.impl("int8_linear", &fastbert::int8_linear);
  m.impl("int8_linear_quantize", &fastbert::int8_linear_quantize);
  m.impl("int8_linear_residual_layernorm", &fastbert::int8_linear_residual_layernorm);
  m.impl("int8_linear_residual_layernorm_quantize", &fastbert::int8_linear_residual_layernorm_quantize);
}
