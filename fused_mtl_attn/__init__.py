"""fused_mtl_attn: fused kernels for the cross-task (CTAM) and cross-scale (CSAM) attention of SCA-MTL.

Public surface: `cross_task_attention`, `cross_scale_attention`, `available_backends`, `cpu_isa`, the fused loss
`upsampled_cross_entropy`, Swin's `window_attention`, and the eager oracle in `fused_mtl_attn.reference`.
"""
from . import reference
from .backends import available_backends, cross_scale_attention, cross_task_attention
from .losses import upsampled_cross_entropy
from .swin import window_attention


def cpu_isa() -> str:
    """The instruction set of the cpu backend's kernels on this machine: "avx512", "avx2" or "baseline" (the best
    the CPU supports, or FUSED_MTL_ATTN_CPU_ISA). Loads the compiled extension; RuntimeError if it is not built or
    FUSED_MTL_ATTN_CPU_ISA names a set this CPU cannot run."""
    from . import cpp_backend

    return cpp_backend.cpu_isa()


__all__ = ["available_backends", "cpu_isa", "cross_task_attention", "cross_scale_attention", "reference",
           "upsampled_cross_entropy", "window_attention"]
__version__ = "0.1.0"
