// The CUDA kernels of attention_cuda.cu compiled as C++ for the host (emulation.h): the ops of
// fused_mtl_attn_emulated, which run them on CPU tensors so that the test suite checks them without a GPU.
#define FUSED_MTL_ATTN_EMULATE_CUDA
#include "attention_cuda.cu"
