// Every header kernels.h needs. A kernels_<isa>.cpp file includes this *before* it switches the compiler to its
// instruction set, so that no inline function of a shared header is compiled for that set (the linker keeps one
// copy of such a function for the whole library, which must run on every CPU).
#pragma once

#include "../attention.h"
#include "../attention_math.h"
#include "isa.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <type_traits>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <vector>

// compile what follows for the instruction set `features` (a GCC/clang target string), until FMA_CPU_TARGET_END
#define FMA_CPU_PRAGMA(...) _Pragma(#__VA_ARGS__)
#if defined(__clang__)
#define FMA_CPU_TARGET_BEGIN(features) \
  FMA_CPU_PRAGMA(clang attribute push(__attribute__((target(features))), apply_to = function))
#define FMA_CPU_TARGET_END FMA_CPU_PRAGMA(clang attribute pop)
#else
#define FMA_CPU_TARGET_BEGIN(features) FMA_CPU_PRAGMA(GCC push_options) FMA_CPU_PRAGMA(GCC target(features))
#define FMA_CPU_TARGET_END FMA_CPU_PRAGMA(GCC pop_options)
#endif
