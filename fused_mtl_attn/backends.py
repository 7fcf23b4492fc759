"""Backend registry and dispatch for the two public attention ops.

A backend is a small object (`Backend`) that says whether it can run on this machine, whether it can run a
given input, and computes both ops. Backends load lazily, so importing the package never loads the compiled
extension, never touches a GPU and never compiles a kernel.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from . import reference
from .validation import check_cross_scale, check_cross_task, normalize_offsets

BACKENDS = ("eager", "cpu", "cuda", "triton")


@dataclass(frozen=True)
class Backend:
    name: str
    # reasons this backend cannot run on this machine at all (empty list: it can)
    availability: Callable[[], list]
    # reasons it cannot run these particular tensors (device, dtype, ...); called after availability is clear
    unsupported: Callable[[torch.Tensor], list]
    cross_task: Callable[..., torch.Tensor]
    cross_scale: Callable[..., torch.Tensor]


def _eager_unsupported(q: torch.Tensor) -> list:
    return []


EAGER = Backend("eager", lambda: [], _eager_unsupported, reference.cross_task_attention,
                reference.cross_scale_attention)


def _import(name: str) -> Backend:
    """The Backend object `name` from its module, imported on first use (import statements, not importlib, so that
    torch.compile can trace a first call that loads it)."""
    if name in ("cpu", "cuda"):
        from . import cpp_backend as module
    else:
        from . import triton_backend as module
    return getattr(module, name.upper())


_loaded: dict = {"eager": EAGER}
_load_errors: dict = {}

OPS = ("cross_task", "cross_scale")

# What "auto" tries, in order, per (device type, op): the backends by measured speed on that device, eager last.
# CPU: the cpu kernels beat eager at every paper shape of both ops (benchmarks/RESULTS.md, AVX2 and baseline).
# CUDA: not measured yet (no GPU has run the kernels); the CUDA kernels come first until benchmarks/gpu_check.sh's
# op benchmark, which prints the fastest backend per op, says otherwise.
AUTO_ORDER = {
    ("cpu", "cross_task"): ("cpu", "eager"),
    ("cpu", "cross_scale"): ("cpu", "eager"),
    ("cuda", "cross_task"): ("cuda", "triton", "eager"),
    ("cuda", "cross_scale"): ("cuda", "triton", "eager"),
}


def _get(name: str):
    """The Backend object, or None with the import error recorded in _load_errors."""
    if name in _loaded:
        return _loaded[name]
    try:
        backend = _import(name)
    except Exception as exc:  # a missing or broken optional piece must not break the package
        _load_errors[name] = f"{type(exc).__name__}: {exc}"
        backend = None
    if not torch.compiler.is_compiling():  # torch.compile would guard on the cache and recompile the next call
        _loaded[name] = backend
    return backend


def _machine_reasons(name: str) -> list:
    backend = _get(name)
    if backend is None:
        return [f"the {name} backend could not be loaded ({_load_errors.get(name, 'unknown error')})"]
    return list(backend.availability())


def cpu_kernels_run(x: torch.Tensor) -> bool:
    """The extension's CPU kernels outside the attention ops (the fused loss, the BatchNorm kernels of the fused
    network) can take `x`: on the CPU, float32/float64, no autocast, and the cpu backend available (extension built,
    its instruction set runnable). Their callers fall back to eager PyTorch otherwise."""
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64) or torch.is_autocast_enabled("cpu"):
        return False
    return not _machine_reasons("cpu")


def available_backends() -> dict:
    """Map each backend name to (available: bool, reasons: list[str]) on this machine."""
    out = {}
    for name in BACKENDS:
        reasons = _machine_reasons(name)
        out[name] = (not reasons, reasons)
    return out


def select(backend: str, q: torch.Tensor, op: str = "cross_task") -> Backend:
    """The backend that runs op `op` on input `q`: the requested one (raising with its reasons) or, for "auto", the
    first of AUTO_ORDER[(device type, op)] that can run it."""
    if not isinstance(backend, str) or (backend != "auto" and backend not in BACKENDS):
        raise ValueError(f"backend must be one of {('auto',) + BACKENDS}, got {backend!r}")
    if op not in OPS:
        raise ValueError(f"op must be one of {OPS}, got {op!r}")
    if backend != "auto":
        reasons = _machine_reasons(backend) or list(_get(backend).unsupported(q))
        if reasons:
            raise RuntimeError(f"backend {backend!r} cannot run this input: " + "; ".join(reasons))
        return _get(backend)
    for name in AUTO_ORDER.get((q.device.type, op), ("eager",)):
        if not _machine_reasons(name) and not _get(name).unsupported(q):
            return _get(name)
    return EAGER


def cross_task_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """Global-context attention of P stacked (query, source) pairs.

    q, k: [B, P, d, N] pre-softplus logits; v: [B, P, m, N] values. Returns [B, P, m, N] where pair p is
    softplus(q_p)-queries against its own softplus(k_p), v_p (see docs/attention-op.md).
    """
    check_cross_task(q, k, v)
    return select(backend, q, "cross_task").cross_task(q, k, v)


def cross_scale_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, offsets: Sequence[int], backend: str = "auto"
) -> torch.Tensor:
    """One query [B, d, Nq] against J sources gathered along positions: k [B, d, Ntot], v [B, m, Ntot].

    `offsets` holds J+1 non-decreasing ints from 0 to Ntot (a list, tuple or 1-D integer CPU tensor); source j
    occupies positions offsets[j]:offsets[j+1]. Returns [B, J, m, Nq].
    """
    offsets = normalize_offsets(offsets)
    check_cross_scale(q, k, v, offsets)
    return select(backend, q, "cross_scale").cross_scale(q, k, v, offsets)
