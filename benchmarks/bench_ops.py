"""Time and memory of both attention ops at the paper's per-scale shapes, for every available backend and eager.

Shapes (d = m = C at every scale; scale s = stride 4 * 2**s, i.e. 1/4 ... 1/32 of the input):
  NYUD 480x640:   positions 120x160, 60x80, 30x40, 15x20 with C = 36, 72, 144, 288
  PASCAL 512x512: positions 128x128, 64x64, 32x32, 16x16 with C = 36, 72, 144, 288
CTAM: P = M(M-1) stacked (query, source) pairs for M = 2..5 tasks (P = 2, 6, 12, 20), q, k, v [B, P, C, N].
CSAM: target scale k = 0, 1, 2 queries the J = 3, 2, 1 coarser sources gathered along positions,
      q [B, C_k, N_k], k, v [B, C_k, sum_j N_j] (the sources already projected to C_k), out [B, J, C_k, N_k].

Per case and backend: median forward (no grad), backward (of a retained graph) and forward+backward times (on a CPU
the backends' calls interleaved, with all of the process's threads); the
activation bytes autograd saves for backward, and on a GPU the peak allocated memory of forward+backward above the
inputs; the minimum bytes the op must move and the achieved bandwidth:
  fwd_bytes = (|q| + |k| + |v| + |out|) * itemsize           (read q, k, v; write out)
  bwd_bytes = (2 * (|q| + |k| + |v|) + |out|) * itemsize     (read q, k, v, grad_out; write dq, dk, dv)
  gb_per_s  = (fwd_bytes + bwd_bytes) / fwd_bwd_time / 1e9   (fwd_gb_per_s, bwd_gb_per_s likewise per phase)
  device_gb_per_s = 2 * copy_bytes / copy_time / 1e9, measured once per run by copying a 1 GiB device tensor
                    into another (read + write; 256 MiB on CPU)
  bw_fraction = gb_per_s / device_gb_per_s
  flops = 2 d m B (3 Nk + 4 G Nq): the contractions (tensor-core work) of forward (S over the sources, S q over the
          queries) and backward (S q, S^T a, dS over the queries; dS^T v, dS k over the sources), for G groups
          (pairs or sources), Nk the source positions of all groups; tflops = flops / fwd_bwd_time / 1e12
eager_over_this = eager fwd_bwd time / this backend's (the speed-up over eager); mem_over_eager likewise for memory.

    python -m benchmarks.bench_ops [--quick] [--device cpu|cuda] [--batch 1 8] [--datasets nyud,pascal]
                                   [--pairs 2,6,12,20] [--cpu-isa avx2,baseline|all] [--compile] [--json PATH]

--cpu-isa times the cpu backend once per instruction set named (rows "cpu[avx2]", ...; "all": every set this CPU
supports, so an AVX-512 machine also times the AVX2 kernels); without it, the set in effect (row "cpu"). Every cpu
row records its set in `cpu_isa`.

--quick: NYUD only, P = 2 and CSAM, short timing (under 2 minutes on a 2-core CPU). --json writes a JSON list of
rows (rewritten after every case, so an interrupted run keeps what it measured).
"""
from __future__ import annotations

import argparse
import contextlib
import math
import statistics
import time

import torch

from benchmarks.common import environment, error_text, median_ms, saved_bytes, write_json
from benchmarks.labels import cpu_note
from fused_mtl_attn import available_backends, cross_scale_attention, cross_task_attention, reference
from fused_mtl_attn.backends import AUTO_ORDER

CHANNELS = (36, 72, 144, 288)
DATASETS = {"nyud": (480, 640), "pascal": (512, 512)}  # input size; scale s has (H, W) / (4 * 2**s) positions
PAIRS = (2, 6, 12, 20)  # P = M(M-1) for M = 2..5 tasks
BACKEND_ORDER = {"cpu": ("cpu", "eager"), "cuda": ("cuda", "triton", "eager")}


def scales(dataset: str, positions_scale: float = 1.0):
    """[(h, w, C)] per scale 0..3; positions_scale shrinks h and w (tests and dry runs), at least 1 each."""
    height, width = DATASETS[dataset]
    return [(max(1, round(height / (4 << s) * positions_scale)), max(1, round(width / (4 << s) * positions_scale)), c)
            for s, c in enumerate(CHANNELS)]


def cases(datasets, pairs, batch: int, positions_scale: float = 1.0):
    """Dicts with name, dataset, scale, op, hw, shapes (q, k, v) and offsets (None for CTAM): CSAM of every
    dataset first, then CTAM by pair count, so a run cut short still covers every dataset and the smaller P."""
    out = []
    for dataset in datasets:
        sc = scales(dataset, positions_scale)
        for s in range(3):
            h, w, c = sc[s]
            offsets = [0]
            for hj, wj, _ in sc[s + 1:]:
                offsets.append(offsets[-1] + hj * wj)
            out.append(dict(name=f"csam J={len(offsets) - 1}", dataset=dataset, scale=s, op="cross_scale", hw=[h, w],
                            shapes=((batch, c, h * w), (batch, c, offsets[-1]), (batch, c, offsets[-1])),
                            offsets=offsets))
    for p in pairs:
        for dataset in datasets:
            for s, (h, w, c) in enumerate(scales(dataset, positions_scale)):
                shape = (batch, p, c, h * w)
                out.append(dict(name=f"ctam P={p}", dataset=dataset, scale=s, op="cross_task", hw=[h, w],
                                shapes=(shape, shape, shape), offsets=None))
    return out


def min_bytes(case, itemsize):
    """(forward, backward) bytes the op must read and write at least (formulas in the module docstring)."""
    q, k, v = (math.prod(s) for s in case["shapes"])
    batch, channels, n_query = case["shapes"][0][0], case["shapes"][2][-2], case["shapes"][0][-1]
    out = v if case["op"] == "cross_task" else batch * (len(case["offsets"]) - 1) * channels * n_query
    return (q + k + v + out) * itemsize, (2 * (q + k + v) + out) * itemsize


def min_flops(case) -> int:
    """Multiply-adds x 2 of the op's contractions, forward + backward (formula in the module docstring)."""
    (batch, *_, n_query), k_shape, v_shape = case["shapes"]
    d, m, n_source = k_shape[-2], v_shape[-2], k_shape[-1]
    groups = len(case["offsets"]) - 1 if case["op"] == "cross_scale" else k_shape[1]
    sources = n_source if case["op"] == "cross_scale" else groups * n_source
    return 2 * d * m * batch * (3 * sources + 4 * groups * n_query)


def device_bandwidth(device: str) -> float:
    """GB/s of a large device-to-device copy: 2 * bytes / time (each byte is read once and written once)."""
    nbytes = 2**30 if device == "cuda" else 2**28
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), device, 0.2)
    del src, dst
    if device == "cuda":
        torch.cuda.empty_cache()
    return 2 * nbytes / (ms * 1e-3) / 1e9


def make_fn(case, backend, compiled):
    op, offsets = case["op"], case["offsets"]
    if backend == "eager" and compiled:
        ref = reference.cross_task_attention if op == "cross_task" else (
            lambda q, k, v: reference.cross_scale_attention(q, k, v, offsets))
        return torch.compile(ref)
    if op == "cross_task":
        return lambda q, k, v: cross_task_attention(q, k, v, backend=backend)
    return lambda q, k, v: cross_scale_attention(q, k, v, offsets, backend=backend)


class Timed:
    """One (case, backend): its inputs and the three timed callables (forward without grad, backward of a retained
    graph, forward + backward), run with the cpu kernels of `isa` where given."""

    def __init__(self, fn, shapes, device, dtype, isa=None):
        g = torch.Generator(device="cpu").manual_seed(0)
        inputs = [torch.randn(shapes[0], generator=g), torch.randn(shapes[1], generator=g),
                  torch.rand(shapes[2], generator=g)]
        self.inputs = [t.to(device=device, dtype=dtype).requires_grad_(True) for t in inputs]
        self.fn, self.device, self.isa = fn, device, isa
        with use_isa(isa):
            self.out = fn(*self.inputs)
        self.grad = torch.randn_like(self.out)

    def forward(self):
        with torch.no_grad():
            self.fn(*self.inputs)

    def backward(self):
        torch.autograd.grad(self.out, self.inputs, self.grad, retain_graph=True)

    def both(self):
        torch.autograd.grad(self.fn(*self.inputs), self.inputs, self.grad)

    def phases(self):
        return {"fwd_ms": self.forward, "bwd_ms": self.backward, "fwd_bwd_ms": self.both}

    def memory(self) -> dict:
        self.out = None
        with use_isa(self.isa):
            row = {"saved_mb": saved_bytes(lambda: self.fn(*self.inputs)) / 2**20}
            if self.device == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                self.both()
                torch.cuda.synchronize()
                row["peak_mb"] = (torch.cuda.max_memory_allocated() - base) / 2**20
        return row


def time_backends(timed: dict, device, min_run_time) -> dict:
    """{label: {fwd_ms, bwd_ms, fwd_bwd_ms}} medians. On a GPU each backend in turn (CUDA timing is steady). On a
    CPU interleaved: rounds of one call of every phase of every backend, so that the drifts of a shared machine hit
    all backends alike, until each phase has at least 5 calls and about min_run_time seconds."""
    if device == "cuda":
        out = {}
        for label, t in timed.items():
            with use_isa(t.isa):
                out[label] = {k: median_ms(f, device, min_run_time) for k, f in t.phases().items()}
        return out
    calls = {label: {k: [] for k in t.phases()} for label, t in timed.items()}
    for t in timed.values():  # warm-up
        with use_isa(t.isa):
            for f in t.phases().values():
                f()
    start, rounds = time.perf_counter(), 0
    while rounds < 5 or (time.perf_counter() - start < min_run_time * 3 * len(timed) and rounds < 200):
        for label, t in timed.items():
            with use_isa(t.isa):
                for k, f in t.phases().items():
                    t0 = time.perf_counter()
                    f()
                    calls[label][k].append(time.perf_counter() - t0)
        rounds += 1
    return {label: {k: statistics.median(v) * 1e3 for k, v in phases.items()} for label, phases in calls.items()}


def memory_mb(row):
    """The memory figure the table and plots compare: GPU peak where measured, else saved-for-backward."""
    return row.get("peak_mb", row.get("saved_mb"))


def cpu_isas(arg, parser):
    """The cpu instruction sets to time: --cpu-isa's list ('all': every supported one), else the one in effect."""
    from fused_mtl_attn import cpp_backend

    supported = cpp_backend.supported_cpu_isas()
    if not arg:
        return [cpp_backend.cpu_isa()]
    isas = supported if arg == "all" else [a for a in arg.split(",") if a]
    for isa in isas:
        if isa not in supported:
            parser.error(f"--cpu-isa: {isa!r} is not an instruction set this CPU runs "
                         f"(it runs: {', '.join(supported)})")
    return isas


def use_isa(isa):
    """A context that runs the cpu kernels of `isa` (None: nothing to switch)."""
    if isa is None:
        return contextlib.nullcontext()
    from fused_mtl_attn import cpp_backend

    return cpp_backend.use_cpu_isa(isa)


def fastest_by_op(rows) -> dict:
    """{op: [(backend, geometric mean of eager_over_this over its cases)], fastest first}: what backends.AUTO_ORDER
    should say for this device."""
    speedups = {}
    for r in rows:
        if r.get("eager_over_this"):
            speedups.setdefault(r["op"], {}).setdefault(r["backend"], []).append(math.log(r["eager_over_this"]))
    return {op: sorted(((b, math.exp(statistics.fmean(v))) for b, v in per.items()), key=lambda bv: -bv[1])
            for op, per in speedups.items()}


def print_auto_order(rows, device):
    for op, ranked in fastest_by_op(rows).items():
        measured = ", ".join(f"{b} {x:.2f}x" for b, x in ranked)
        print(f"# fastest for {op} on {device} (geometric mean of eager/this over the cases): {measured}; "
              f"auto tries {AUTO_ORDER.get((device, op))}")


def csv_ints(text):
    return [int(x) for x in text.split(",") if x]


def _parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="NYUD, CTAM P=2 and CSAM only, short timing")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--batch", type=int, nargs="+", default=None, help="batch sizes (default 2 on CPU, 1 8 on GPU)")
    parser.add_argument("--datasets", default=None, help="comma-separated: nyud,pascal (default both; --quick: nyud)")
    parser.add_argument("--pairs", type=csv_ints, default=None, help="CTAM pair counts (default 2,6,12,20; --quick: 2)")
    parser.add_argument("--cpu-isa", default=None,
                        help="comma-separated instruction sets of the cpu kernels to time, or 'all' (default: the one "
                             "in effect)")
    parser.add_argument("--compile", action="store_true", help="add torch.compile of the eager reference")
    parser.add_argument("--min-run-time", type=float, default=None, help="seconds of timing per measurement")
    parser.add_argument("--json", help="write one row per case and backend (a JSON list) to this file")
    # tests and dry runs: multiply every scale's height and width by this factor
    parser.add_argument("--positions-scale", type=float, default=1.0, help=argparse.SUPPRESS)
    return parser


def backends_to_time(device, cpu_isa_arg, compile_eager, parser) -> list:
    """(label, backend, compiled, cpu instruction set) of every backend available here, eager last."""
    avail = available_backends()
    order = BACKEND_ORDER[device]
    for b in order:
        if not avail[b][0]:
            print(f"# skipping backend {b}: {'; '.join(avail[b][1])}")
    backends = []
    for b in order:
        if not avail[b][0]:
            continue
        if b == "cpu":
            isas = cpu_isas(cpu_isa_arg, parser)
            backends += [("cpu" if len(isas) == 1 else f"cpu[{isa}]", "cpu", False, isa) for isa in isas]
        else:
            backends.append((b, b, False, None))
    backends += [("eager+compile", "eager", True, None)] if compile_eager else []
    return backends


def measure_case(case, backends, batch, env, device, dtype, itemsize, device_gbs, min_run_time) -> list:
    """One row per backend for one case: times (interleaved on a CPU), memory, bandwidth, ratios to eager."""
    fwd_bytes, bwd_bytes = min_bytes(case, itemsize)
    case_rows, timed = [], {}
    for label, backend, compiled, isa in backends:
        row = dict(env, dataset=case["dataset"], case=case["name"], scale=case["scale"], op=case["op"],
                   hw=case["hw"], channels=case["shapes"][0][-2], backend=label, cpu_isa=isa,
                   dtype=str(dtype).removeprefix("torch."), batch=batch, shapes=[list(s) for s in case["shapes"]],
                   offsets=case["offsets"], fwd_bytes=fwd_bytes, bwd_bytes=bwd_bytes,
                   min_bytes=fwd_bytes + bwd_bytes, device_gb_per_s=device_gbs)
        case_rows.append(row)
        try:
            timed[label] = Timed(make_fn(case, backend, compiled), case["shapes"], device, dtype, isa)
            for f in timed[label].phases().values():  # a backend that fails, fails here, not mid-timing
                with use_isa(isa):
                    f()
        except Exception as exc:  # an OOM or a backend's refusal costs one row, not the run
            timed.pop(label, None)
            row["error"] = error_text(exc)
            if device == "cuda":
                torch.cuda.empty_cache()
            print(f"{case['dataset']:<6} {case['name']:<9} {case['scale']:>5} {label:<14} "
                  f"FAILED {row['error']}", flush=True)
    times = time_backends(timed, device, min_run_time)
    for row in case_rows:
        if row["backend"] not in timed:
            continue
        row.update(times[row["backend"]])
        row.update(timed[row["backend"]].memory())
        row.update(fwd_gb_per_s=fwd_bytes / (row["fwd_ms"] * 1e-3) / 1e9,
                   bwd_gb_per_s=bwd_bytes / (row["bwd_ms"] * 1e-3) / 1e9,
                   gb_per_s=(fwd_bytes + bwd_bytes) / (row["fwd_bwd_ms"] * 1e-3) / 1e9)
        row["bw_fraction"] = row["gb_per_s"] / device_gbs
        row["tflops"] = min_flops(case) / (row["fwd_bwd_ms"] * 1e-3) / 1e12
    del timed
    eager = next((r for r in case_rows if r["backend"] == "eager" and "error" not in r), None)
    for row in case_rows:
        if "error" in row:
            continue
        row["eager_over_this"] = eager["fwd_bwd_ms"] / row["fwd_bwd_ms"] if eager else None
        row["mem_over_eager"] = memory_mb(row) / memory_mb(eager) if eager and memory_mb(eager) else None
        ratio = f"{row['eager_over_this']:.2f}x" if eager else "-"
        hw = "x".join(map(str, case["hw"]))
        print(f"{case['dataset']:<6} {case['name']:<9} {case['scale']:>5} {hw:>7} {batch:>2} "
              f"{row['backend']:<14} {row['fwd_ms']:>9.2f} {row['bwd_ms']:>9.2f} {row['fwd_bwd_ms']:>9.2f} "
              f"{memory_mb(row):>8.1f} {row['gb_per_s']:>7.1f} {100 * row['bw_fraction']:>4.0f}% "
              f"{row['tflops']:>7.3f} {ratio:>10}", flush=True)
    return case_rows


def main(argv=None):
    parser = _parser()
    args = parser.parse_args(argv)
    device, dtype = args.device, getattr(torch, args.dtype)
    batches = args.batch or ([2] if device == "cpu" else [1, 8])
    datasets = (args.datasets or ("nyud" if args.quick else "nyud,pascal")).split(",")
    for d in datasets:
        if d not in DATASETS:
            parser.error(f"--datasets: unknown dataset {d!r}; choose from {list(DATASETS)}")
    pairs = args.pairs or ([2] if args.quick else list(PAIRS))
    min_run_time = args.min_run_time or (0.1 if args.quick or device == "cuda" else 0.5)
    backends = backends_to_time(device, args.cpu_isa, args.compile, parser)
    env = environment(device)
    device_gbs = device_bandwidth(device)
    itemsize = torch.tensor([], dtype=dtype).element_size()
    print(f"# {env['device_name']} ({env['threads']} threads{cpu_note(env)}), torch {env['torch']}, "
          f"triton {env['triton']}, commit {env['commit']}, {args.dtype}, batch {batches}, "
          f"copy bandwidth {device_gbs:.1f} GB/s")
    print(f"{'data':<6} {'case':<9} {'scale':>5} {'HxW':>7} {'B':>2} {'backend':<14} {'fwd ms':>9} {'bwd ms':>9} "
          f"{'f+b ms':>9} {'mem MB':>8} {'GB/s':>7} {'%bw':>5} {'TFLOP/s':>7} {'eager/this':>10}")
    rows = []
    for batch in batches:
        for case in cases(datasets, pairs, batch, args.positions_scale):
            rows.extend(measure_case(case, backends, batch, env, device, dtype, itemsize, device_gbs, min_run_time))
            if args.json:
                write_json(args.json, rows)
    print_auto_order(rows, device)
    if args.json:
        print(f"# wrote {len(rows)} rows to {args.json}")
    return rows


if __name__ == "__main__":
    main()
