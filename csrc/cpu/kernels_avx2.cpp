// The CPU kernels for x86-64 with AVX2 and FMA: 16 registers of 32 bytes. A block of 6 rows x 2 vectors keeps 12
// accumulators, 2 operand vectors and 1 broadcast in registers (blocks of 64-byte vectors would need 2 registers
// per vector and spill on every iteration).
#include "kernels_includes.h"

#ifdef FMA_CPU_X86
FMA_CPU_TARGET_BEGIN("avx2,fma")
#define FMA_CPU_ISA cpu_avx2
#define FMA_CPU_VECTOR_BYTES 32
#define FMA_CPU_ACCUMULATORS 12
#define FMA_CPU_MAX_VECTORS 2
#include "kernels.h"
FMA_CPU_TARGET_END
#endif
