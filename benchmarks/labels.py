"""Labels of benchmark tables and plots built from a result row's environment fields (no heavy imports: the
plotting script uses them without torch)."""
from __future__ import annotations


def cpu_note(env: dict) -> str:
    """The CPU kernels' instruction sets for a table's header: ", cpu kernels avx2, PyTorch AVX2[, capped by ...]"."""
    note = f", cpu kernels {env['cpu_isa']}" if env.get("cpu_isa") else ""
    if env.get("aten_cpu_capability"):
        note += f", PyTorch {env['aten_cpu_capability']}"
    if env.get("isa_limits"):
        note += ", capped by " + " ".join(f"{k}={v}" for k, v in env["isa_limits"].items())
    return note
