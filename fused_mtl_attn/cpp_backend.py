"""The C++/CUDA backend: loads the compiled extension `fused_mtl_attn._C`, registers the fake (meta) functions and
the autograd formulas of its ops, and exposes the `CPU` and `CUDA` Backend objects used by backends.py.

The CPU kernels are compiled for several instruction sets in one build (x86-64: "avx512", "avx2", "baseline"; other
architectures: "baseline"); the extension picks the best one the CPU supports when it loads, or the one named by
FUSED_MTL_ATTN_CPU_ISA. `cpu_isa()` says which runs; `use_cpu_isa(name)` switches for a block of code (tests and
benchmarks compare the sets in one process).

Ops (schema in csrc/attention.cpp): `cross_task(q, k, v) -> (out, context)` and
`cross_scale(q, k, v, offsets) -> (out, context)`, where context [..., m+1, d] holds S = v k^T and z = sum k in the
accumulation dtype; autograd saves q, k, v and context (not out: backward gets g . out from S and z), and the
backward ops recompute softplus and the denominators from them.
"""
from __future__ import annotations

import contextlib
import warnings
from typing import Iterator, List, Sequence

import torch

from .backends import Backend
from .constants import accumulation_dtype

try:
    from . import _C  # noqa: F401  (loading it registers the ops)

    _LOAD_ERROR = None
except ImportError as exc:  # not built: the backend reports it, the package still imports
    _C = None
    _LOAD_ERROR = f"the C++ extension fused_mtl_attn._C is not built ({exc}); run `pip install --no-build-isolation -e .`"

_CPU_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
_CUDA_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


if _C is not None:
    ops = torch.ops.fused_mtl_attn

    @torch.library.register_fake("fused_mtl_attn::cross_task")
    def _cross_task_fake(q, k, v):
        b, p, d, n = q.shape
        m = v.shape[2]
        return q.new_empty((b, p, m, n)), q.new_empty((b, p, m + 1, d), dtype=accumulation_dtype(q.dtype))

    @torch.library.register_fake("fused_mtl_attn::cross_scale")
    def _cross_scale_fake(q, k, v, offsets):
        b, d, nq = q.shape
        m = v.shape[1]
        j = len(offsets) - 1
        return q.new_empty((b, j, m, nq)), q.new_empty((b, j, m + 1, d), dtype=accumulation_dtype(q.dtype))

    # the kernels read contiguous copies of strided inputs and return contiguous gradients: so do the fakes
    # (empty_like would copy a strided input's layout, and the compiled graph would assume it)
    @torch.library.register_fake("fused_mtl_attn::cross_task_backward")
    def _cross_task_backward_fake(grad, q, k, v, context):
        return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)

    @torch.library.register_fake("fused_mtl_attn::cross_scale_backward")
    def _cross_scale_backward_fake(grad, q, k, v, context, offsets):
        return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)

    def _setup_context(ctx, inputs, output):
        q, k, v = inputs[:3]
        _, context = output
        ctx.offsets = list(inputs[3]) if len(inputs) > 3 else None
        ctx.save_for_backward(q, k, v, context)  # not `out`: backward gets g . out from S and z
        ctx.mark_non_differentiable(context)  # an internal by-product; the public functions return `out` only

    def _cross_task_backward(ctx, grad_out, grad_context):
        return ops.cross_task_backward(grad_out, *ctx.saved_tensors)

    def _cross_scale_backward(ctx, grad_out, grad_context):
        dq, dk, dv = ops.cross_scale_backward(grad_out, *ctx.saved_tensors, ctx.offsets)
        return dq, dk, dv, None

    torch.library.register_autograd("fused_mtl_attn::cross_task", _cross_task_backward, setup_context=_setup_context)
    torch.library.register_autograd("fused_mtl_attn::cross_scale", _cross_scale_backward,
                                    setup_context=_setup_context)

    @torch.library.register_fake("fused_mtl_attn::upsampled_cross_entropy")
    def _upsampled_cross_entropy_fake(logits, label, ignore_index):
        return logits.new_empty(()), logits.new_empty(label.shape)

    @torch.library.register_fake("fused_mtl_attn::upsampled_cross_entropy_backward")
    def _upsampled_cross_entropy_backward_fake(grad, logits, label, lse, ignore_index):
        return logits.new_empty(logits.shape)

    def _loss_setup_context(ctx, inputs, output):
        logits, label, ctx.ignore_index = inputs
        ctx.save_for_backward(logits, label, output[1])  # lse [B, H, W]: backward recomputes the softmax from it
        ctx.mark_non_differentiable(output[1])

    def _upsampled_cross_entropy_backward(ctx, grad_sum, grad_lse):
        logits, label, lse = ctx.saved_tensors
        return ops.upsampled_cross_entropy_backward(grad_sum, logits, label, lse, ctx.ignore_index), None, None

    torch.library.register_autograd("fused_mtl_attn::upsampled_cross_entropy", _upsampled_cross_entropy_backward,
                                    setup_context=_loss_setup_context)

    # BatchNorm + ReLU (or BatchNorm alone) of h [B, C, N] (the aggregation head calls both directions inside its
    # own autograd.Function; the CTAM projections through this autograd formula): autograd keeps h and the
    # statistics used, which are outputs for the running-statistics update, not differentiated; given statistics
    # (eval mode) get no gradient
    @torch.library.register_fake("fused_mtl_attn::batch_norm_relu")
    def _batch_norm_relu_fake(h, weight, bias, mean, var, eps, relu=True):  # (tracing may omit a default)
        return h.new_empty(h.shape), weight.new_empty(weight.shape), weight.new_empty(weight.shape)

    @torch.library.register_fake("fused_mtl_attn::batch_norm_relu_backward")
    def _batch_norm_relu_backward_fake(grad, h, mean, var, weight, bias, eps, batch_stats, relu=True):
        return (h.new_empty(h.shape),) + tuple(weight.new_empty(weight.shape) for _ in range(3))

    def _bn_relu_setup_context(ctx, inputs, output):
        h, weight, bias, mean, _, ctx.eps, ctx.relu = inputs  # (the schema's defaults filled in)
        ctx.batch_stats = mean is None
        ctx.save_for_backward(h, weight, bias, output[1], output[2])
        ctx.mark_non_differentiable(output[1], output[2])

    def _batch_norm_relu_backward(ctx, grad, grad_mean, grad_var):
        h, weight, bias, mean, var = ctx.saved_tensors
        dh, dweight, dbias, _ = ops.batch_norm_relu_backward(grad, h, mean, var, weight, bias, ctx.eps,
                                                             ctx.batch_stats, ctx.relu)
        return dh, dweight, dbias, None, None, None, None

    torch.library.register_autograd("fused_mtl_attn::batch_norm_relu", _batch_norm_relu_backward,
                                    setup_context=_bn_relu_setup_context)


    # Swin's window attention (fused_mtl_attn.swin): autograd keeps qkv, bias, mask and each row's log-sum-exp
    @torch.library.register_fake("fused_mtl_attn::window_attention")
    def _window_attention_fake(qkv, bias, mask, heads, scale):
        bw, length, three_dim = qkv.shape
        return qkv.new_empty((bw, length, three_dim // 3)), qkv.new_empty((bw, heads, length))

    @torch.library.register_fake("fused_mtl_attn::window_attention_backward")
    def _window_attention_backward_fake(grad, qkv, bias, mask, lse, heads, scale):
        return qkv.new_empty(qkv.shape), bias.new_empty(bias.shape)

    def _window_setup_context(ctx, inputs, output):
        qkv, bias, mask, ctx.heads, ctx.scale = inputs
        ctx.save_for_backward(qkv, bias, mask, output[1])
        ctx.mark_non_differentiable(output[1])

    def _window_attention_backward(ctx, grad_out, grad_lse):
        qkv, bias, mask, lse = ctx.saved_tensors
        dqkv, dbias = ops.window_attention_backward(grad_out, qkv, bias, mask, lse, ctx.heads, ctx.scale)
        return dqkv, dbias, None, None, None

    torch.library.register_autograd("fused_mtl_attn::window_attention", _window_attention_backward,
                                    setup_context=_window_setup_context)


    # training-mode BatchNorm of x [B, C, ...] with channels innermost (model.fused_ops): outputs keep x's strides;
    # autograd keeps x and the batch statistics, which are outputs for the running-statistics update, not
    # differentiated
    @torch.library.register_fake("fused_mtl_attn::batch_norm_channels_last")
    def _batch_norm_channels_last_fake(x, weight, bias, eps):
        return x.new_empty_strided(x.shape, x.stride()), weight.new_empty(weight.shape), weight.new_empty(weight.shape)

    @torch.library.register_fake("fused_mtl_attn::batch_norm_channels_last_backward")
    def _batch_norm_channels_last_backward_fake(grad, x, mean, var, weight, eps):
        return (x.new_empty_strided(x.shape, x.stride()), weight.new_empty(weight.shape),
                weight.new_empty(weight.shape))

    def _bn_rows_setup_context(ctx, inputs, output):
        x, weight, _, ctx.eps = inputs
        ctx.save_for_backward(x, weight, output[1], output[2])
        ctx.mark_non_differentiable(output[1], output[2])

    def _batch_norm_channels_last_backward(ctx, grad, grad_mean, grad_var):
        x, weight, mean, var = ctx.saved_tensors
        dx, dweight, dbias = ops.batch_norm_channels_last_backward(grad, x, mean, var, weight, ctx.eps)
        return dx, dweight, dbias, None

    torch.library.register_autograd("fused_mtl_attn::batch_norm_channels_last", _batch_norm_channels_last_backward,
                                    setup_context=_bn_rows_setup_context)

    # the row pass of the aggregation head's bilinear upsampling (model.fused_ops): called inside the head's own
    # autograd.Function, so no autograd formula here; forward accumulates into out
    @torch.library.register_fake("fused_mtl_attn::upsample_rows_accumulate")
    def _upsample_rows_accumulate_fake(out, sources, tap_index, tap_weight):
        return None

    @torch.library.register_fake("fused_mtl_attn::upsample_rows_accumulate_backward")
    def _upsample_rows_accumulate_backward_fake(grad, tap_index, tap_weight, source_heights):
        return [grad.new_empty((grad.shape[0], h, grad.shape[2])) for h in source_heights]


def cross_task_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """q, k [B, P, d, N] logits, v [B, P, m, N] -> [B, P, m, N] (inputs checked by backends.py)."""
    return torch.ops.fused_mtl_attn.cross_task(q, k, v)[0]


def cross_scale_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, offsets: Sequence[int]) -> torch.Tensor:
    """q [B, d, Nq], k [B, d, Ntot], v [B, m, Ntot], offsets J+1 -> [B, J, m, Nq] (inputs checked by backends.py)."""
    return torch.ops.fused_mtl_attn.cross_scale(q, k, v, list(offsets))[0]


def upsampled_cross_entropy_sum(logits: torch.Tensor, label: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Sum over labelled pixels of the cross-entropy of logits [B, C, h, w] resized to label [B, H, W] (CPU, float32
    or float64; inputs checked by fused_mtl_attn.losses)."""
    return torch.ops.fused_mtl_attn.upsampled_cross_entropy(logits, label, ignore_index)[0]


def window_attention(qkv: torch.Tensor, bias: torch.Tensor, mask, heads: int, scale: float) -> torch.Tensor:
    """Swin's window attention, qkv [BW, L, 3*dim] -> [BW, L, dim] (CPU, float32 or float64; inputs checked by
    fused_mtl_attn.swin)."""
    return torch.ops.fused_mtl_attn.window_attention(qkv, bias, mask, heads, float(scale))[0]


def _require_extension() -> None:
    if _LOAD_ERROR:
        raise RuntimeError(_LOAD_ERROR)


def cpu_isa() -> str:
    """The instruction set whose CPU kernels run: "avx512", "avx2" or "baseline". Raises RuntimeError if the
    extension is not built or FUSED_MTL_ATTN_CPU_ISA names a set this build or this CPU cannot run."""
    _require_extension()
    return _C.cpu_isa()


def compiled_cpu_isas() -> List[str]:
    """The instruction sets this build holds kernels for, best first."""
    _require_extension()
    return _C.compiled_cpu_isas()


def supported_cpu_isas() -> List[str]:
    """The compiled instruction sets the running CPU supports, best first (the first is the default)."""
    _require_extension()
    return _C.supported_cpu_isas()


def _isa_error():
    """Why the CPU kernels cannot run (FUSED_MTL_ATTN_CPU_ISA names a set this CPU cannot run), or None."""
    try:
        _C.cpu_isa()
    except RuntimeError as exc:
        return str(exc)
    return None


# read once (the variable is read when the extension loads), so that torch.compile traces no call into the extension
_ISA_ERROR = _isa_error() if _C is not None else None


@contextlib.contextmanager
def use_cpu_isa(name: str) -> Iterator[None]:
    """Run the CPU kernels of instruction set `name` inside the block (ValueError if this CPU cannot run it)."""
    global _ISA_ERROR
    _require_extension()
    previous = None if _ISA_ERROR else _C.cpu_isa()
    _C.set_cpu_isa(name)
    _ISA_ERROR = None  # after the block the kernels keep a set that runs, this one if there was none before
    try:
        yield
    finally:
        if previous is not None:
            _C.set_cpu_isa(previous)


@contextlib.contextmanager
def cuda_launch_tuning(target_blocks: int | None = None, max_splits: int | None = None,
                       one_pass_query: bool | None = None, emulated: bool = False) -> Iterator[None]:
    """Launch the CUDA kernels with these shapes inside the block (benchmarks/tune_kernels.py times candidates so):
    pieces of a reduction are cut until a launch has about `target_blocks` blocks, at most `max_splits` per segment;
    `one_pass_query=False` keeps the backward's query side in two launches where one would do. None leaves a value
    as it is. `emulated=True` tunes the host-emulated kernels of `torch.ops.fused_mtl_attn_emulated` (tests)."""
    _require_extension()
    namespace = torch.ops.fused_mtl_attn_emulated if emulated else torch.ops.fused_mtl_attn
    if not hasattr(namespace, "launch_tuning"):
        raise RuntimeError("the CUDA kernels are not built into fused_mtl_attn._C (a CPU-only build)")
    for name, value in (("target_blocks", target_blocks), ("max_splits", max_splits)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be an int >= 1 or None, got {value!r}")
    if one_pass_query is not None and not isinstance(one_pass_query, bool):
        raise ValueError(f"one_pass_query must be a bool or None, got {one_pass_query!r}")
    previous = namespace.launch_tuning(-1 if target_blocks is None else target_blocks,
                                       -1 if max_splits is None else max_splits,
                                       -1 if one_pass_query is None else int(one_pass_query))
    try:
        yield
    finally:
        namespace.launch_tuning(*previous)


def _cpu_availability() -> list:
    if _LOAD_ERROR:
        return [_LOAD_ERROR]
    if _ISA_ERROR:
        warnings.warn(f"the cpu backend is unavailable: {_ISA_ERROR}", RuntimeWarning, stacklevel=2)
        return [_ISA_ERROR]
    return []


def _cuda_availability() -> list:
    if _LOAD_ERROR:
        return [_LOAD_ERROR]
    reasons = []
    if not getattr(_C, "built_with_cuda", 0):
        reasons.append("the C++ extension was built without its CUDA kernels (torch without CUDA, or nvcc not found; "
                       "rebuild with CUDA_HOME set or FORCE_CUDA=1)")
    if not torch.cuda.is_available():
        reasons.append("no CUDA GPU is visible")
    return reasons


def _unsupported(device_type: str, dtypes: tuple):
    def reasons(q: torch.Tensor) -> list:
        out = []
        if q.device.type != device_type:
            out.append(f"input is on {q.device}, the {device_type} kernels need {device_type} tensors")
        if q.dtype not in dtypes:
            out.append(f"dtype {q.dtype} is not supported (supported: {', '.join(str(t) for t in dtypes)})")
        return out

    return reasons


CPU = Backend("cpu", _cpu_availability, _unsupported("cpu", _CPU_DTYPES), cross_task_attention, cross_scale_attention)
CUDA = Backend("cuda", _cuda_availability, _unsupported("cuda", _CUDA_DTYPES), cross_task_attention,
               cross_scale_attention)
