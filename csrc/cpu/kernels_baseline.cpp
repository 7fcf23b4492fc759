// The CPU kernels for any CPU of the architecture: on x86-64 the SSE2 baseline, 16 registers of 16 bytes, no FMA
// (an accumulator block of 4 rows x 2 vectors leaves registers for the operands and the product of mul + add).
#include "kernels_includes.h"

#define FMA_CPU_ISA cpu_baseline
#define FMA_CPU_VECTOR_BYTES 16
#define FMA_CPU_ACCUMULATORS 8
#define FMA_CPU_MAX_VECTORS 2
#include "kernels.h"
