"""Time and memory of both attention ops at the paper's per-scale shapes, for every available backend and eager.

NYUD 480x640 input: scales at stride 4, 8, 16, 32 (120x160 ... 15x20 positions) with C = 36/72/144/288 (d = m = C).
CTAM: P = 2 (2 tasks) and P = 20 (5 tasks) stacked pairs per scale. CSAM: target scale k queries the coarser
sources j > k gathered along positions (J = 3, 2, 1). Forward, backward and forward+backward medians; memory saved for
backward (CPU) or peak allocated (GPU); the minimum bytes each op must move and the achieved GB/s.

    python benchmarks/bench_ops.py [--quick] [--device cpu|cuda] [--compile] [--json PATH]
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import environment, median_ms, saved_bytes  # noqa: E402
from fused_mtl_attn import available_backends, cross_scale_attention, cross_task_attention, reference  # noqa: E402

SCALES = [(120 * 160, 36), (60 * 80, 72), (30 * 40, 144), (15 * 20, 288)]  # (positions, channels) per stride 4..32


def cases(quick: bool, batch: int):
    """(name, scale, op, shapes) per case; shapes: q, k, v shapes and offsets (None for CTAM)."""
    out = []
    for pairs in ((2,) if quick else (2, 20)):
        for s, (n, c) in enumerate(SCALES):
            out.append((f"ctam P={pairs}", s, "cross_task",
                        ((batch, pairs, c, n), (batch, pairs, c, n), (batch, pairs, c, n), None)))
    for s in range(3):
        n, c = SCALES[s]
        sizes = [SCALES[j][0] for j in range(s + 1, 4)]
        offsets = [0]
        for size in sizes:
            offsets.append(offsets[-1] + size)
        out.append((f"csam J={len(sizes)}", s, "cross_scale",
                    ((batch, c, n), (batch, c, offsets[-1]), (batch, c, offsets[-1]), offsets)))
    return out


def min_bytes(op, shapes, itemsize):
    """Bytes an op must read and write at least: forward q, k, v -> out; backward q, k, v, grad -> dq, dk, dv."""
    q, k, v, offsets = shapes
    numel = lambda s: int(torch.tensor(s).prod())  # noqa: E731
    out = numel(v) if op == "cross_task" else numel(q[:1]) * (len(offsets) - 1) * v[1] * q[2]
    fwd = numel(q) + numel(k) + numel(v) + out
    bwd = 2 * (numel(q) + numel(k) + numel(v)) + out
    return fwd * itemsize, bwd * itemsize


def make_fn(op, backend, offsets, compiled):
    if backend == "eager" and compiled:
        ref = reference.cross_task_attention if op == "cross_task" else (
            lambda q, k, v: reference.cross_scale_attention(q, k, v, offsets))
        return torch.compile(ref)
    if op == "cross_task":
        return lambda q, k, v: cross_task_attention(q, k, v, backend=backend)
    return lambda q, k, v: cross_scale_attention(q, k, v, offsets, backend=backend)


def run_case(fn, shapes, device, dtype, min_run_time):
    q_shape, k_shape, v_shape, _ = shapes
    g = torch.Generator(device="cpu").manual_seed(0)
    inputs = [torch.randn(q_shape, generator=g), torch.randn(k_shape, generator=g), torch.rand(v_shape, generator=g)]
    inputs = [t.to(device=device, dtype=dtype).requires_grad_(True) for t in inputs]
    out = fn(*inputs)
    grad = torch.randn_like(out)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def forward():
        with torch.no_grad():
            fn(*inputs)
        sync()

    def backward():
        torch.autograd.grad(out, inputs, grad, retain_graph=True)
        sync()

    def both():
        torch.autograd.grad(fn(*inputs), inputs, grad)
        sync()

    row = {"fwd_ms": median_ms(forward, device, min_run_time), "bwd_ms": median_ms(backward, device, min_run_time),
           "fwd_bwd_ms": median_ms(both, device, min_run_time)}
    if device == "cuda":
        del out
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        both()
        row["peak_mb"] = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        row["saved_mb"] = saved_bytes(lambda: fn(*inputs)) / 2**20
    return row


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="CTAM P=2 and CSAM only, short timing (< 2 min on CPU)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--batch", type=int, default=None, help="batch size (default 2 on CPU, 8 on GPU)")
    parser.add_argument("--compile", action="store_true", help="add torch.compile of the eager reference")
    parser.add_argument("--json", help="write one row per case to this file")
    args = parser.parse_args(argv)
    device, dtype = args.device, getattr(torch, args.dtype)
    batch = args.batch or (2 if device == "cpu" else 8)
    order = {"cpu": ("cpu", "eager"), "cuda": ("cuda", "triton", "eager")}[device]
    avail = available_backends()
    backends = [(b, False) for b in order if avail[b][0]] + ([("eager", True)] if args.compile else [])
    for b in order:
        if not avail[b][0]:
            print(f"# skipping backend {b}: {'; '.join(avail[b][1])}")
    env = environment(device)
    min_run_time = 0.1 if args.quick else 0.5
    rows = []
    header = (f"{'case':<12} {'scale':>5} {'backend':<14} {'fwd ms':>9} {'bwd ms':>9} {'f+b ms':>9} "
              f"{'mem MB':>8} {'GB/s':>7} {'eager/this':>10}")
    print(f"# {env['device_name']} ({env['threads']} threads), torch {env['torch']}, {args.dtype}, batch {batch}")
    print(header)
    for name, scale, op, shapes in cases(args.quick, batch):
        fwd_bytes, bwd_bytes = min_bytes(op, shapes, torch.tensor([], dtype=dtype).element_size())
        case_rows = []
        for backend, compiled in backends:
            label = backend + ("+compile" if compiled else "")
            row = run_case(make_fn(op, backend, shapes[3], compiled), shapes, device, dtype, min_run_time)
            row.update(env, case=name, scale=scale, op=op, backend=label, dtype=args.dtype, batch=batch,
                       shapes=[list(s) if s else s for s in shapes[:3]], offsets=shapes[3],
                       min_bytes=fwd_bytes + bwd_bytes,
                       gb_per_s=(fwd_bytes + bwd_bytes) / (row["fwd_bwd_ms"] * 1e-3) / 1e9)
            case_rows.append(row)
        eager = next((r for r in case_rows if r["backend"] == "eager"), None)
        for row in case_rows:
            row["eager_over_this"] = eager["fwd_bwd_ms"] / row["fwd_bwd_ms"] if eager else None
            mem = row.get("saved_mb", row.get("peak_mb"))
            ratio = f"{row['eager_over_this']:.2f}x" if eager else "-"
            print(f"{name:<12} {scale:>5} {row['backend']:<14} {row['fwd_ms']:>9.2f} {row['bwd_ms']:>9.2f} "
                  f"{row['fwd_bwd_ms']:>9.2f} {mem:>8.1f} {row['gb_per_s']:>7.1f} {ratio:>10}", flush=True)
        rows.extend(case_rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
        print(f"# wrote {len(rows)} rows to {args.json}")


if __name__ == "__main__":
    main()
