// The CPU kernels are compiled once per instruction set (kernels_<isa>.cpp, each the same kernels.h with its own
// vector width and register blocking); one set is chosen once, when the library loads, from the running CPU's
// features (as ATen's CPU capability dispatch does), or forced with FUSED_MTL_ATTN_CPU_ISA=baseline|avx2|avx512.
#pragma once

#include "../attention.h"
#include "../batch_norm_channels_last.h"
#include "../batch_norm_relu.h"
#include "../cross_entropy.h"
#include "../upsample_rows.h"
#include "../window_attention.h"

#include <string>
#include <vector>

namespace fused_mtl_attn {

struct CpuKernels {
  ForwardCore forward;
  BackwardCore backward;
  CrossEntropyForwardCore cross_entropy_forward;
  CrossEntropyBackwardCore cross_entropy_backward;
  BnReluForwardCore bn_relu_forward;
  BnReluBackwardCore bn_relu_backward;
  WindowForwardCore window_forward;
  WindowBackwardCore window_backward;
  BnRowsForwardCore bn_rows_forward;
  BnRowsBackwardCore bn_rows_backward;
  UpsampleRowsForwardCore upsample_rows_forward;
  UpsampleRowsBackwardCore upsample_rows_backward;
};

#if defined(__x86_64__) || defined(_M_X64)
#define FMA_CPU_X86 1
#endif

// one definition per instruction set, in kernels_<isa>.cpp
// x86-64: SSE2 (16 registers of 16 bytes); elsewhere the compiler's default for the architecture
namespace cpu_baseline { extern const CpuKernels kernels; }
#ifdef FMA_CPU_X86
namespace cpu_avx2 { extern const CpuKernels kernels; }      // AVX2 + FMA: 16 registers of 32 bytes
namespace cpu_avx512 { extern const CpuKernels kernels; }    // AVX-512 F/BW/DQ/VL: 32 registers of 64 bytes
#endif

namespace cpu {

// the instruction sets this build holds, in the order of preference (best first)
std::vector<std::string> compiled_isas();
// those of them the running CPU supports, best first
std::vector<std::string> supported_isas();
// the set in effect; throws (naming FUSED_MTL_ATTN_CPU_ISA) if that variable asks for one this CPU cannot run
std::string isa();
// switch to another set (tests and benchmarks compare them in one process); throws if the CPU cannot run it
void set_isa(const std::string& name);

}  // namespace cpu
}  // namespace fused_mtl_attn
