"""Time a GPU backend's forward + backward with each candidate launch config at the network's finest scale, where
the op is memory-bound and the launch shapes matter most: NYUD 480x640 at 1/4 (C = 36, N = 19200), CTAM with
P = 2 and 20 pairs and CSAM with its J = 3 sources, per dtype. Both backends' shapes were chosen for spill-free
compiles, not measured speed: these rows say which to ship, per case and dtype.

    python -m benchmarks.tune_kernels [--backend triton|cuda] [--device cuda] [--dtypes bfloat16,float32]
                                      [--batch 8] [--configs ...] [--json PATH]

A triton config is BLOCK_C/BLOCK_N/num_warps[/num_stages] (triton_kernels.forced_config); a cuda config is
TARGET_BLOCKS/MAX_SPLITS/ONE_PASS (cpp_backend.cuda_launch_tuning: blocks a reduction's pieces aim at, pieces per
segment at most, 1 for the one-pass query side of the backward where it applies, 0 for three launches). Per row:
fwd_bwd_ms (median), gb_per_s and bw_fraction (the op's minimum bytes over the time, as bench_ops; fraction of the
device's copy bandwidth), tflops, and `chosen` (whether it is what the backend does by default). A config that
fails to compile or run costs its row (`error`), not the run. The JSON is rewritten after every row. On a CPU the
Triton kernels run under TRITON_INTERPRET=1 (a smoke test: shrink the positions with --positions-scale); the cuda
backend needs a GPU.
"""
from __future__ import annotations

import argparse

import torch

from benchmarks import bench_ops
from benchmarks.common import environment, error_text, median_ms, write_json

CANDIDATES = {
    "triton": "32/32/8,64/16/8,64/32/8,64/64/8,64/16/4,64/32/8/2,32/64/8",
    "cuda": "512/16/1,1024/16/1,2048/32/1,4096/64/1,512/16/0,2048/32/0",
}


def parse_config(text: str, backend: str = "triton"):
    parts = text.split("/")
    if backend == "cuda":
        if len(parts) != 3 or not all(p.isdigit() for p in parts) or int(parts[0]) < 1 or int(parts[1]) < 1 \
                or parts[2] not in ("0", "1"):
            raise ValueError(f"config {text!r}: expected TARGET_BLOCKS/MAX_SPLITS/ONE_PASS, positive integers and "
                             f"0 or 1")
        return tuple(map(int, parts))
    from fused_mtl_attn.triton_kernels import Config

    if len(parts) not in (3, 4) or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise ValueError(f"config {text!r}: expected BLOCK_C/BLOCK_N/num_warps[/num_stages], positive integers")
    block_c, block_n = int(parts[0]), int(parts[1])
    if block_c < 16 or block_n < 16 or block_c & (block_c - 1) or block_n & (block_n - 1):
        raise ValueError(f"config {text!r}: blocks must be powers of two >= 16 (tl.dot's minimum)")
    return Config(*map(int, parts))


def _forced(backend: str, cfg):
    """The context that launches every kernel of `backend` with `cfg`."""
    if backend == "cuda":
        from fused_mtl_attn.cpp_backend import cuda_launch_tuning

        return cuda_launch_tuning(target_blocks=cfg[0], max_splits=cfg[1], one_pass_query=bool(cfg[2]))
    from fused_mtl_attn import triton_kernels as tk

    return tk.forced_config(cfg)


def _chosen(backend: str, channels: int):
    """What the backend launches by default: the CUDA kernels' current tuning (asked of the extension, the one place
    that holds it), or Triton's block choice for these channels."""
    if backend == "cuda":
        return tuple(torch.ops.fused_mtl_attn.launch_tuning(-1, -1, -1))
    from fused_mtl_attn import triton_kernels as tk

    return tk.pick_config(channels, channels)


def _parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", default="triton", choices=sorted(CANDIDATES))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtypes", default="bfloat16,float32", help="comma-separated torch dtypes")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--pairs", default="2,20", help="CTAM pair counts (CSAM J=3 is always timed)")
    parser.add_argument("--configs", help="comma-separated (default: " + "; ".join(
        f"{b}: {c}" for b, c in CANDIDATES.items()) + ")")
    parser.add_argument("--positions-scale", type=float, default=1.0, help="shrink the positions (CPU smoke test)")
    parser.add_argument("--min-run-time", type=float, default=0.1, help="seconds per timing")
    parser.add_argument("--json", help="write the rows here")
    return parser


def main(argv=None) -> list:
    parser = _parser()
    args = parser.parse_args(argv)
    from fused_mtl_attn import available_backends

    if args.backend == "cuda" and args.device != "cuda":
        parser.error("--backend cuda times the CUDA kernels: it needs --device cuda")
    ok, why = available_backends()[args.backend]
    if not ok:
        parser.error(f"the {args.backend} backend is unavailable: {why}")
    try:
        configs = [parse_config(c, args.backend) for c in (args.configs or CANDIDATES[args.backend]).split(",")]
        pairs = [int(p) for p in args.pairs.split(",")]
    except ValueError as exc:
        parser.error(f"--configs/--pairs: {exc}")
    dtypes = []
    for name in args.dtypes.split(","):
        if not isinstance(getattr(torch, name, None), torch.dtype) or not getattr(torch, name).is_floating_point:
            parser.error(f"--dtypes: {name!r} is not a torch floating-point dtype")
        dtypes.append(getattr(torch, name))
    if args.batch < 1:
        parser.error("--batch must be >= 1")

    env = environment(args.device)
    device_gbs = bench_ops.device_bandwidth(args.device)
    finest = [c for c in bench_ops.cases(["nyud"], pairs, args.batch, args.positions_scale)
              if c["scale"] == 0 and (c["op"] == "cross_task" or c["name"] == "csam J=3")]
    print(f"# {args.backend} on {env['device_name']}, triton {env['triton']}, commit {env['commit']}, "
          f"batch {args.batch}, "
          f"copy bandwidth {device_gbs:.1f} GB/s")
    print(f"{'case':<9} {'dtype':<9} {'config':<16} {'f+b ms':>9} {'GB/s':>8} {'%bw':>5} {'TFLOP/s':>8} chosen")
    rows = []
    for case in finest:
        channels = case["shapes"][0][-2]
        chosen = tuple(_chosen(args.backend, channels))
        for dtype in dtypes:
            itemsize = torch.empty((), dtype=dtype).element_size()
            total = sum(bench_ops.min_bytes(case, itemsize))
            for cfg in configs:
                row = dict(env, case=case["name"], dataset=case["dataset"], scale=0, hw=case["hw"],
                           shapes=[list(s) for s in case["shapes"]], dtype=str(dtype).removeprefix("torch."),
                           backend=args.backend, batch=args.batch, config=list(cfg), chosen=tuple(cfg) == chosen,
                           min_bytes=total,
                           device_gb_per_s=device_gbs)
                try:
                    with _forced(args.backend, cfg):
                        timed = bench_ops.Timed(bench_ops.make_fn(case, args.backend, False), case["shapes"],
                                                args.device, dtype)
                        ms = median_ms(timed.both, args.device, args.min_run_time)
                    row.update(fwd_bwd_ms=ms, gb_per_s=total / (ms * 1e-3) / 1e9,
                               tflops=bench_ops.min_flops(case) / (ms * 1e-3) / 1e12)
                    row["bw_fraction"] = row["gb_per_s"] / device_gbs
                    print(f"{case['name']:<9} {row['dtype']:<9} {'/'.join(map(str, cfg)):<16} {ms:>9.3f} "
                          f"{row['gb_per_s']:>8.1f} {100 * row['bw_fraction']:>4.0f}% {row['tflops']:>8.3f} "
                          f"{'*' if row['chosen'] else ''}", flush=True)
                except Exception as exc:  # a config that does not compile or run costs its row
                    row["error"] = error_text(exc)
                    print(f"{case['name']:<9} {row['dtype']:<9} {'/'.join(map(str, cfg)):<16} FAILED {row['error']}",
                          flush=True)
                finally:
                    timed = None
                    if args.device == "cuda":
                        torch.cuda.empty_cache()
                rows.append(row)
                if args.json:
                    write_json(args.json, rows)
    best = {}
    for r in rows:
        key = (r["case"], r["dtype"])
        if "error" not in r and (key not in best or r["fwd_bwd_ms"] < best[key]["fwd_bwd_ms"]):
            best[key] = r
    for (case, dtype), r in best.items():
        print(f"# fastest {case} {dtype}: {'/'.join(map(str, r['config']))} ({100 * r['bw_fraction']:.0f}% of copy "
              f"bandwidth){'' if r['chosen'] else ' (not the chosen config)'}")
    return rows


if __name__ == "__main__":
    main()
