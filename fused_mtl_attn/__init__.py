"""fused_mtl_attn: fused kernels for the cross-task (CTAM) and cross-scale (CSAM) attention of SCA-MTL.

Public surface: `cross_task_attention`, `cross_scale_attention`, `available_backends`, and the eager oracle
in `fused_mtl_attn.reference`.
"""
from . import reference
from .backends import available_backends, cross_scale_attention, cross_task_attention

__all__ = ["available_backends", "cross_task_attention", "cross_scale_attention", "reference"]
__version__ = "0.1.0"
