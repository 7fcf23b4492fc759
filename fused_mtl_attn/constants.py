"""The numeric constants and the accumulation-dtype rule of the attention op (docs/attention-op.md), shared by every
Python backend; csrc/attention_math.h holds the same values for the C++/CUDA kernels."""
from __future__ import annotations

import torch

# den = max(z . q, EPS), applied in the accumulation dtype
EPS = 1e-12
# 1e-12 underflows to 0 in float16, which would turn an empty source's 0/eps into 0/0: the eager reference run in
# float16 clamps at float16's smallest positive value instead (no non-zero float16 denominator is smaller)
FLOAT16_EPS = 2.0**-24
# softplus (and its derivative) is the identity strictly above this, as torch.nn.functional.softplus's default
SOFTPLUS_THRESHOLD = 20.0


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype sums and the saved context are kept in: float64 for float64 inputs, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32
