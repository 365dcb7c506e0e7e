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
  const bool bf16 = x.scalar_type() == at::kBFloat16;
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

// act(x @ w.T + bias) with the activation as a oneDNN post-op where oneDNN has it; at::linear otherwise (no
// oneDNN in this torch, or bfloat16 on a CPU where oneDNN has no bfloat16 path).
static at::Tensor gemm(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias, int act,
                       const std::optional<at::Tensor>& packed) {
  const bool use_packed = packed.has_value() && packed->defined();
  const auto& op = onednn_linear_op();
  // in_features == 0: the product is all zeros (plus bias); oneDNN cannot build an empty reduction.
  const bool onednn_ok = x.size(1) > 0 && (x.scalar_type() != at::kBFloat16 || onednn_bf16_supported());
  if (op.has_value() && onednn_ok) {
    const char* attr = "none";
    const char* alg = "";
    switch (act) {
      case kActGelu: attr = "gelu"; alg = "none"; break;
      case kActGeluTanh: attr = "gelu"; alg = "tanh"; break;
      case kActRelu: attr = "relu"; break;
      case kActSilu: attr = "swish"; break;
      case kActTanh: attr = "tanh"; break;
      default: break;
    }
    return op->call(x, use_packed ? *packed : weight, bias, attr, c10::List<std::optional<c10::Scalar>>(),
                    std::optional<c10::string_view>(alg));
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
  TORCH_CHECK(residual.scalar_type() == x_in.scalar_type(), "fastbert: residual dtype ", residual.scalar_type(),
              " does not match x dtype ", x_in.scalar_type());
  const int64_t n = weight.size(0);
  const at::Tensor g = param_f32(ln_weight, n, "ln_weight");
  const at::Tensor b = param_f32(ln_bias, n, "ln_bias");
  if (x_in.size(0) == 0) return at::empty({0, n}, x_in.options());
  // GEMM with the bias fused, then one pass: LayerNorm(y + residual) written over y.
  at::Tensor y = gemm(x_in.contiguous(), weight, bias, kActNone, packed);
  const at::Tensor res = rows_view(residual);
  run_add_layernorm(y, &res, nullptr, g, b, eps, y);
  return y;
}

// ---------------------------------------------------------------------------------------------------------
// Attention over packed sequences
// ---------------------------------------------------------------------------------------------------------

static at::Tensor attention(const at::Tensor& qkv_in, const at::Tensor& cu_seqlens, int64_t max_seqlen,
                            int64_t num_heads, double scale) {
  check_2d(qkv_in, "qkv");
  const bool bf16 = check_act_tensor(qkv_in, "qkv");
  TORCH_CHECK(num_heads > 0, "fastbert: num_heads must be positive, got ", num_heads);
  const int64_t T = qkv_in.size(0), width = qkv_in.size(1);
  TORCH_CHECK(width % (3 * num_heads) == 0 && width > 0, "fastbert: qkv has ", width,
              " features, which is not 3 * num_heads * head_dim for num_heads = ", num_heads);
  const int64_t hidden = width / 3, head_dim = hidden / num_heads;
  TORCH_CHECK(cu_seqlens.device().is_cpu(), "fastbert: cu_seqlens must be a CPU tensor, got device ",
              cu_seqlens.device());
  TORCH_CHECK(cu_seqlens.scalar_type() == at::kInt, "fastbert: cu_seqlens must be int32, got ",
              cu_seqlens.scalar_type());
  TORCH_CHECK(cu_seqlens.dim() == 1 && cu_seqlens.size(0) >= 1,
              "fastbert: cu_seqlens must be 1-D (batch + 1,), got shape ", cu_seqlens.sizes());
  const at::Tensor cu = cu_seqlens.contiguous();
  const int32_t* c = cu.data_ptr<int32_t>();
  const int64_t batch = cu.size(0) - 1;
  TORCH_CHECK(c[0] == 0, "fastbert: cu_seqlens[0] must be 0, got ", c[0]);
  int64_t longest = 0;
  for (int64_t i = 0; i < batch; ++i) {
    TORCH_CHECK(c[i + 1] >= c[i], "fastbert: cu_seqlens must be non-decreasing, but cu_seqlens[", i + 1, "] = ",
                c[i + 1], " < cu_seqlens[", i, "] = ", c[i]);
    longest = std::max<int64_t>(longest, c[i + 1] - c[i]);
  }
  TORCH_CHECK(c[batch] == T, "fastbert: cu_seqlens[-1] = ", c[batch], " but qkv has ", T, " tokens");
  TORCH_CHECK(max_seqlen <= 0 || max_seqlen >= longest, "fastbert: max_seqlen = ", max_seqlen,
              " is smaller than the longest sequence (", longest, " tokens)");
  const at::Tensor qkv = rows_view(qkv_in);
  at::Tensor out = at::empty({T, hidden}, qkv.options());
  if (T == 0) return out;

  // Work items: (sequence, head, block of up to kBlock query rows); cost ~ rows * keys.
  constexpr int kBlock = 64;
  std::vector<AttnTask> tasks;
  std::vector<int64_t> cost_prefix{0};
  for (int64_t b = 0; b < batch; ++b) {
    const int32_t len = c[b + 1] - c[b];
    for (int32_t h = 0; h < num_heads && len > 0; ++h) {
      for (int32_t q0 = 0; q0 < len; q0 += kBlock) {
        const int32_t q1 = std::min<int32_t>(len, q0 + kBlock);
        tasks.push_back(AttnTask{c[b], len, h, q0, q1});
        cost_prefix.push_back(cost_prefix.back() + static_cast<int64_t>(q1 - q0) * (len + 16) * head_dim);
      }
    }
  }
  // One contiguous group of tasks per thread, split at equal cost (sequences may have very different lengths).
  const int64_t total_cost = cost_prefix.back();
  const int64_t groups = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), tasks.size()));
  std::vector<int64_t> bounds(groups + 1, static_cast<int64_t>(tasks.size()));
  bounds[0] = 0;
  for (int64_t g = 1; g < groups; ++g) {
    const int64_t target = total_cost * g / groups;
    bounds[g] = std::lower_bound(cost_prefix.begin(), cost_prefix.end(), target) - cost_prefix.begin();
    bounds[g] = std::max(bounds[g], bounds[g - 1]);
  }
  const void* qp = qkv.data_ptr();
  void* op = out.data_ptr();
  const int64_t ld = qkv.stride(0), ldo = out.stride(0);
  const Kernels& k = kernels();
  at::parallel_for(0, groups, 1, [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g) {
      k.attention(tasks.data() + bounds[g], bounds[g + 1] - bounds[g], qp, ld, static_cast<int>(num_heads),
                  static_cast<int>(head_dim), static_cast<float>(scale), op, ldo, static_cast<int>(longest), bf16);
    }
  });
  return out;
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
  m.def("attention(Tensor qkv, Tensor cu_seqlens, int max_seqlen, int num_heads, float scale) -> Tensor");
  m.def("_set_isa(str name) -> str", &fastbert::set_isa);
}

TORCH_LIBRARY_IMPL(fastbert, CPU, m) {
  m.impl("embeddings", &fastbert::embeddings);
  m.impl("add_layernorm", &fastbert::add_layernorm);
  m.impl("bias_activation", &fastbert::bias_activation);
  m.impl("bias_residual_layernorm", &fastbert::bias_residual_layernorm);
  m.impl("linear", &fastbert::linear);
  m.impl("linear_residual_layernorm", &fastbert::linear_residual_layernorm);
  m.impl("attention", &fastbert::attention);
}

// A oneDNN-prepacked weight (torch.ops.mkldnn._reorder_linear_weight) is an MkldnnCPU tensor: the linears must
// also be found under that key.
TORCH_LIBRARY_IMPL(fastbert, MkldnnCPU, m) {
  m.impl("linear", &fastbert::linear);
  m.impl("linear_residual_layernorm", &fastbert::linear_residual_layernorm);
}
