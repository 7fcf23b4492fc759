"""The Triton backend: custom-op registration (forward, backward, autograd) of the kernels in triton_kernels.py
and the `TRITON` Backend object that backends.py loads lazily.

Importing this module imports neither triton nor the kernels: the ops are registered on first use, so
`available_backends()` can report a missing triton instead of failing. On a GPU the ops are
`torch.library.triton_op`s (torch.compile traces into the kernels); under TRITON_INTERPRET=1 the kernels are
interpreted Python functions that torch cannot trace, so the same bodies are registered as opaque
`custom_op`s with the body itself as fake implementation (its kernel launches skip fake tensors).
"""
import os
from types import SimpleNamespace
from typing import List, Tuple

import torch

from .backends import Backend

NAMESPACE = "fused_mtl_attn_triton"
Tensors3 = Tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def _interpret_requested() -> bool:
    # the same spellings triton's own knob accepts
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on", "y")


def _availability() -> list:
    try:
        import triton  # noqa: F401
    except Exception as exc:
        return [f"triton is not importable ({type(exc).__name__}: {exc})"]
    if not torch.cuda.is_available() and not _interpret_requested():
        return ["no CUDA GPU is visible and TRITON_INTERPRET is not set "
                "(TRITON_INTERPRET=1 runs the kernels on CPU through the Triton interpreter)"]
    return []


def _unsupported(q: torch.Tensor) -> list:
    from . import triton_kernels

    # the kernels run tl.dot in fp32/fp64 only, so the interpreter's wrong bf16 tl.dot never applies
    if triton_kernels.INTERPRETED:
        return []
    if q.device.type != "cuda":
        return [f"the triton backend runs CUDA tensors, got a {q.device.type} tensor "
                "(outside TRITON_INTERPRET=1 the kernels need a GPU)"]
    return []


_OPS = []  # the registered ops, filled on first use (a plain global: torch.compile traces through a read)


def _ops() -> SimpleNamespace:
    if not _OPS:
        _OPS.append(_register())
    return _OPS[0]


def _register() -> SimpleNamespace:
    """Register the four ops (forward and backward of both layouts)."""
    from . import triton_kernels as tk

    def define(name, fn):
        qualname = f"{NAMESPACE}::{name}"
        if tk.INTERPRETED:
            op = torch.library.custom_op(qualname, fn, mutates_args=())
            op.register_fake(fn)
            return op
        return torch.library.triton_op(qualname, fn, mutates_args=())

    def cross_task_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Tensors3:
        return tk.forward(q, k, v)

    def cross_task_backward(grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                            S: torch.Tensor, z: torch.Tensor) -> Tensors3:
        return tk.backward(grad, q, k, v, S, z)

    def cross_scale_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, offsets: List[int]) -> Tensors3:
        return tk.forward(q, k, v, offsets)

    def cross_scale_backward(grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                             S: torch.Tensor, z: torch.Tensor, offsets: List[int]) -> Tensors3:
        return tk.backward(grad, q, k, v, S, z, offsets)

    ops = SimpleNamespace(
        cross_task=define("cross_task_forward", cross_task_forward),
        cross_task_backward=define("cross_task_backward", cross_task_backward),
        cross_scale=define("cross_scale_forward", cross_scale_forward),
        cross_scale_backward=define("cross_scale_backward", cross_scale_backward),
    )

    # forward returns (out, S, z); S and z are saved so backward skips a second pass over k and v, and `out` is
    # not: backward gets g . out from S and z
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs[:3], *output[1:])
        ctx.offsets = inputs[3] if len(inputs) > 3 else None

    def cross_task_grad(ctx, grad, _grad_S, _grad_z):
        return ops.cross_task_backward(grad, *ctx.saved_tensors)

    def cross_scale_grad(ctx, grad, _grad_S, _grad_z):
        return (*ops.cross_scale_backward(grad, *ctx.saved_tensors, ctx.offsets), None)

    ops.cross_task.register_autograd(cross_task_grad, setup_context=setup_context)
    ops.cross_scale.register_autograd(cross_scale_grad, setup_context=setup_context)
    return ops


def cross_task_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return _ops().cross_task(q, k, v)[0]


def cross_scale_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, offsets) -> torch.Tensor:
    return _ops().cross_scale(q, k, v, list(offsets))[0]


TRITON = Backend("triton", _availability, _unsupported, cross_task_attention, cross_scale_attention)
