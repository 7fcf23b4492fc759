"""Shared benchmark helpers: timing (torch.utils.benchmark on CPU, triton.testing.do_bench or CUDA events on GPU),
memory saved for backward, and the environment fields every result row carries."""
from __future__ import annotations

import contextlib
import json
import os
import platform
import subprocess

import torch

from fused_mtl_attn.cpuinfo import first_processor


# environment variables that cap the instruction set of PyTorch's, oneDNN's, MKL's and this extension's CPU kernels:
# all four set to AVX2 run an AVX2 machine's code paths on an AVX-512 one (its caches and memory stay this machine's)
ISA_LIMITS = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS", "FUSED_MTL_ATTN_CPU_ISA")


def environment(device: str) -> dict:
    """Device name, library versions, git commit and the CPU kernels' instruction sets, for each JSON row."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                check=False).stdout.strip() or None
    except OSError:
        commit = None
    name = torch.cuda.get_device_name() if device == "cuda" else cpu_name()
    return {"device": device, "device_name": name, "threads": torch.get_num_threads(), "torch": torch.__version__,
            "triton": triton_version, "commit": commit, "cpu": cpu_name(), "cpu_isa": cpu_isa(),
            "aten_cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "isa_limits": {k: os.environ[k] for k in ISA_LIMITS if k in os.environ}}


def cpu_name() -> str:
    """The processor's model name with its family and model numbers (/proc/cpuinfo on Linux: a cloud VM's name,
    e.g. "Intel(R) Xeon(R) Processor", can hide which generation it is), else what platform knows."""
    fields = first_processor()
    if "model name" not in fields:
        return platform.processor() or platform.machine()
    ids = [f"{key} {fields[key]}" for key in ("cpu family", "model") if key in fields]
    return fields["model name"] + (f" ({', '.join(ids)})" if ids else "")


def cpu_isa():
    """The instruction set the cpu backend's kernels use by default here, or None without the extension."""
    try:
        from fused_mtl_attn import cpu_isa as isa

        return isa()
    except Exception:  # not built, or FUSED_MTL_ATTN_CPU_ISA unusable: the rows say so by their absence
        return None


def median_ms(fn, device: str, min_run_time: float) -> float:
    """Median wall time of fn() in milliseconds after warm-up."""
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
        try:
            from triton.testing import do_bench

            return float(do_bench(fn, warmup=25, rep=max(int(min_run_time * 1000), 50), return_mode="median"))
        except ImportError:
            times = []
            for _ in range(20):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end))
            return sorted(times)[len(times) // 2]
    from torch.utils import benchmark

    # Timer runs on one thread unless told otherwise: time with the threads the process uses
    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=min_run_time).median * 1e3


@contextlib.contextmanager
def switched(module, **values):
    """Inside the block, `module`'s attributes (e.g. model.fused_ops' switches) set to `values`; put back after it."""
    defaults = {name: getattr(module, name) for name in values}
    for name, value in values.items():
        setattr(module, name, value)
    try:
        yield
    finally:
        for name, value in defaults.items():
            setattr(module, name, value)


def saved_bytes(forward, exclude=()) -> int:
    """Bytes of the unique storages autograd saves for backward while forward() runs, leaving out the storages
    of the tensors in `exclude` (e.g. parameters, to count activations only)."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    storages = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in skip:
            storages[(s.data_ptr(), s.device)] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        forward()
    return sum(storages.values())


def error_text(exc: BaseException) -> str:
    """One line for a result row whose measurement failed (an OOM, a backend's refusal, a bug)."""
    first = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {first}"[:300]


def write_json(path: str, rows: list) -> None:
    """Write the result rows atomically (a run cut short never leaves half a file)."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(rows, f, indent=1)
    os.replace(tmp, path)
