// The CPU ops: registration, and the choice of the instruction set whose kernels run them (isa.h).
#include "isa.h"

#include <atomic>
#include <cstdlib>

namespace fused_mtl_attn {
namespace {

constexpr const char* kIsaVariable = "FUSED_MTL_ATTN_CPU_ISA";

struct Isa {
  const char* name;
  const CpuKernels* kernels;
  bool (*supported)();
};

bool any_cpu() { return true; }
#ifdef FMA_CPU_X86
// __builtin_cpu_supports also checks that the OS saves the wide registers (XCR0), not only the CPUID bits
bool has_avx2() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}
bool has_avx512() {
  __builtin_cpu_init();
  return has_avx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
}
#endif

// the compiled sets, best first
const std::vector<Isa>& compiled() {
  static const std::vector<Isa> sets = {
#ifdef FMA_CPU_X86
      {"avx512", &cpu_avx512::kernels, has_avx512},
      {"avx2", &cpu_avx2::kernels, has_avx2},
#endif
      {"baseline", &cpu_baseline::kernels, any_cpu},
  };
  return sets;
}

std::string join(const std::vector<std::string>& names) {
  std::string out;
  for (const auto& n : names) out += (out.empty() ? "" : ", ") + n;
  return out;
}

// the set called `name`, or an error message naming `source` (the variable or the argument it came from)
const Isa* find(const std::string& name, const std::string& source, std::string* error) {
  for (const Isa& isa : compiled()) {
    if (name != isa.name) continue;
    if (isa.supported()) return &isa;
    *error = source + " asks for the " + name + " kernels, which this CPU cannot run (it supports: " +
             join(cpu::supported_isas()) + ")";
    return nullptr;
  }
  *error = source + " must be one of " + join(cpu::compiled_isas()) + ", got '" + name + "'";
  return nullptr;
}

// The choice, made once when the library loads: FUSED_MTL_ATTN_CPU_ISA if set, else the best supported set. An
// unusable setting leaves no choice and its message, which every use of the kernels then raises.
struct Choice {
  std::atomic<const Isa*> isa{nullptr};
  std::string error;
  Choice() {
    const char* wanted = std::getenv(kIsaVariable);
    if (wanted != nullptr && *wanted != '\0') {
      isa = find(wanted, std::string(kIsaVariable) + "=" + wanted, &error);
      return;
    }
    for (const Isa& set : compiled()) {
      if (set.supported()) {
        isa = &set;
        return;
      }
    }
  }
};

Choice& choice() {
  static Choice c;
  return c;
}
const bool chosen_at_load = (choice(), true);

const Isa& current() {
  const Isa* isa = choice().isa.load();
  TORCH_CHECK(isa != nullptr, choice().error);
  return *isa;
}

std::tuple<Tensor, Tensor> forward_cpu(const Tensor& q, const Tensor& k, const Tensor& v,
                                       const std::vector<int64_t>& offsets) {
  TORCH_CHECK(q.device().is_cpu(), "q must be a CPU tensor for the cpu kernels, got ", q.device());
  return current().kernels->forward(q, k, v, offsets);
}

std::tuple<Tensor, Tensor, Tensor> backward_cpu(const Tensor& grad, const Tensor& q, const Tensor& k, const Tensor& v,
                                                const Tensor& context, const std::vector<int64_t>& offsets) {
  TORCH_CHECK(q.device().is_cpu(), "q must be a CPU tensor for the cpu kernels, got ", q.device());
  return current().kernels->backward(grad, q, k, v, context, offsets);
}

std::tuple<Tensor, Tensor> cross_entropy_forward_cpu(const Tensor& logits, const Tensor& label, int64_t ignore) {
  TORCH_CHECK(logits.device().is_cpu(), "logits must be a CPU tensor for the cpu kernels, got ", logits.device());
  return current().kernels->cross_entropy_forward(logits, label, ignore);
}

Tensor cross_entropy_backward_cpu(const Tensor& grad, const Tensor& logits, const Tensor& label, const Tensor& lse,
                                  int64_t ignore) {
  TORCH_CHECK(logits.device().is_cpu(), "logits must be a CPU tensor for the cpu kernels, got ", logits.device());
  return current().kernels->cross_entropy_backward(grad, logits, label, lse, ignore);
}

std::tuple<Tensor, Tensor, Tensor> bn_relu_forward_cpu(const Tensor& h, const Tensor& weight, const Tensor& bias,
                                                       const std::optional<Tensor>& mean,
                                                       const std::optional<Tensor>& var, double eps, bool relu) {
  TORCH_CHECK(h.device().is_cpu(), "h must be a CPU tensor for the cpu kernels, got ", h.device());
  return current().kernels->bn_relu_forward(h, weight, bias, mean, var, eps, relu);
}

std::tuple<Tensor, Tensor, Tensor, Tensor> bn_relu_backward_cpu(const Tensor& grad, const Tensor& h,
                                                                const Tensor& mean, const Tensor& var,
                                                                const Tensor& weight, const Tensor& bias, double eps,
                                                                bool batch_stats, bool relu) {
  TORCH_CHECK(h.device().is_cpu(), "h must be a CPU tensor for the cpu kernels, got ", h.device());
  return current().kernels->bn_relu_backward(grad, h, mean, var, weight, bias, eps, batch_stats, relu);
}

std::tuple<Tensor, Tensor> window_forward_cpu(const Tensor& qkv, const Tensor& bias,
                                              const std::optional<Tensor>& mask, int64_t heads, double scale) {
  TORCH_CHECK(qkv.device().is_cpu(), "qkv must be a CPU tensor for the cpu kernels, got ", qkv.device());
  return current().kernels->window_forward(qkv, bias, mask, heads, scale);
}

std::tuple<Tensor, Tensor> window_backward_cpu(const Tensor& grad, const Tensor& qkv, const Tensor& bias,
                                               const std::optional<Tensor>& mask, const Tensor& lse, int64_t heads,
                                               double scale) {
  TORCH_CHECK(qkv.device().is_cpu(), "qkv must be a CPU tensor for the cpu kernels, got ", qkv.device());
  return current().kernels->window_backward(grad, qkv, bias, mask, lse, heads, scale);
}

std::tuple<Tensor, Tensor, Tensor> bn_rows_forward_cpu(const Tensor& x, const Tensor& weight, const Tensor& bias,
                                                       double eps) {
  TORCH_CHECK(x.device().is_cpu(), "x must be a CPU tensor for the cpu kernels, got ", x.device());
  return current().kernels->bn_rows_forward(x, weight, bias, eps);
}

std::tuple<Tensor, Tensor, Tensor> bn_rows_backward_cpu(const Tensor& grad, const Tensor& x, const Tensor& mean,
                                                        const Tensor& var, const Tensor& weight, double eps) {
  TORCH_CHECK(x.device().is_cpu(), "x must be a CPU tensor for the cpu kernels, got ", x.device());
  return current().kernels->bn_rows_backward(grad, x, mean, var, weight, eps);
}

void upsample_rows_forward_cpu(const Tensor& out, const std::vector<Tensor>& sources,
                               const std::vector<Tensor>& index, const std::vector<Tensor>& weight) {
  TORCH_CHECK(out.device().is_cpu(), "out must be a CPU tensor for the cpu kernels, got ", out.device());
  current().kernels->upsample_rows_forward(out, sources, index, weight);
}

std::vector<Tensor> upsample_rows_backward_cpu(const Tensor& grad, const std::vector<Tensor>& index,
                                               const std::vector<Tensor>& weight,
                                               const std::vector<int64_t>& heights) {
  TORCH_CHECK(grad.device().is_cpu(), "grad must be a CPU tensor for the cpu kernels, got ", grad.device());
  return current().kernels->upsample_rows_backward(grad, index, weight, heights);
}

}  // namespace

namespace cpu {

std::vector<std::string> compiled_isas() {
  std::vector<std::string> names;
  for (const Isa& isa : compiled()) names.emplace_back(isa.name);
  return names;
}

std::vector<std::string> supported_isas() {
  std::vector<std::string> names;
  for (const Isa& isa : compiled())
    if (isa.supported()) names.emplace_back(isa.name);
  return names;
}

std::string isa() { return current().name; }

void set_isa(const std::string& name) {
  std::string error;
  const Isa* isa = find(name, "the instruction set", &error);
  TORCH_CHECK(isa != nullptr, error);
  choice().isa = isa;
}

}  // namespace cpu

FUSED_MTL_ATTN_REGISTER(CPU, forward_cpu, backward_cpu)

TORCH_LIBRARY_IMPL(fused_mtl_attn, CPU, m) {
  m.impl("upsampled_cross_entropy", &cross_entropy_forward<cross_entropy_forward_cpu>);
  m.impl("upsampled_cross_entropy_backward", &cross_entropy_backward<cross_entropy_backward_cpu>);
  m.impl("batch_norm_relu", &bn_relu_forward<bn_relu_forward_cpu>);
  m.impl("batch_norm_relu_backward", &bn_relu_backward<bn_relu_backward_cpu>);
  m.impl("window_attention", &window_forward<window_forward_cpu>);
  m.impl("window_attention_backward", &window_backward<window_backward_cpu>);
  m.impl("batch_norm_channels_last", &bn_rows_forward<bn_rows_forward_cpu>);
  m.impl("batch_norm_channels_last_backward", &bn_rows_backward<bn_rows_backward_cpu>);
  m.impl("upsample_rows_accumulate", &upsample_rows_accumulate<upsample_rows_forward_cpu>);
  m.impl("upsample_rows_accumulate_backward", &upsample_rows_accumulate_backward<upsample_rows_backward_cpu>);
}

}  // namespace fused_mtl_attn
