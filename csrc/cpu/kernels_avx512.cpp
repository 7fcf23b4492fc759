// The CPU kernels for x86-64 with AVX-512 (F, BW, DQ, VL: the set ATen's AVX512 capability asks for): 32 registers
// of 64 bytes. A block of 6 rows x 4 vectors keeps 24 accumulators, 4 operand vectors and 1 broadcast in registers.
#include "kernels_includes.h"

#ifdef FMA_CPU_X86
FMA_CPU_TARGET_BEGIN("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")
#define FMA_CPU_ISA cpu_avx512
#define FMA_CPU_VECTOR_BYTES 64
#define FMA_CPU_ACCUMULATORS 24
#define FMA_CPU_MAX_VECTORS 4
#include "kernels.h"
FMA_CPU_TARGET_END
#endif
