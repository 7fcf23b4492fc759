"""The first processor's block of /proc/cpuinfo, the one place that reads it: the fused path's per-vendor choices
(model.fused_ops), the benchmarks' processor names and the tests of the kernels' instruction sets."""
from __future__ import annotations


def first_processor(path: str = "/proc/cpuinfo") -> dict:
    """{field: value} of the first processor's block ("vendor_id", "model name", "cpu family", "model", "flags",
    ...); {} where the file cannot be read (not Linux)."""
    fields = {}
    try:
        with open(path) as f:
            for line in f:
                key, _, value = line.partition(":")
                if not key.strip():  # the first block ends
                    break
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return fields
