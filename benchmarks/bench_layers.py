"""The network's Swin layers, BatchNorm layers and one task head (CSAM + aggregation) alone, forward + backward,
eager PyTorch vs the fused path's ops (fused_mtl_attn.window_attention, the channels-last BatchNorm kernel, the
fused head, and that head again with dense row-interpolation products instead of its 2-tap row kernel), at the
shapes of one NYUD training step on CPU (256x320, batch 2: the backbone's maps at strides 4-32, channels-last as
the fused path runs them; the head's inputs NCHW). The variants of each case run interleaved, one call of each in
turn, and the medians are reported. Example:

    python -m benchmarks.bench_layers                      # CPU, every case, 15 rounds
    python -m benchmarks.bench_layers --json results/layers_cpu.json
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torch.nn as nn

from benchmarks.common import environment, write_json
from benchmarks.labels import cpu_note
from model import fused_ops
from model.fused import select_path
from model.modules import SwinLayer
from model.network import DEFAULT_WIDTHS, TaskHead

# (name, channels, heads, Swin blocks, map size): the encoder's self-attention at each scale (18-144 channels, 6
# heads, 2 blocks) and FPMA's (M x C_k channels, 4 heads, 1 block) for NYUD's 2 tasks at 256x320
SWIN = [("self_attention 1/4", 18, 6, 2, (64, 80)), ("self_attention 1/8", 36, 6, 2, (32, 40)),
        ("self_attention 1/16", 72, 6, 2, (16, 20)), ("self_attention 1/32", 144, 6, 2, (8, 10)),
        ("fpma 1/8", 144, 4, 1, (32, 40)), ("fpma 1/16", 288, 4, 1, (16, 20)), ("fpma 1/32", 576, 4, 1, (8, 10))]
# BatchNorm maps of the step: the stem, the backbone's branches and the decoder's blocks
BATCH_NORM = [(64, (128, 160)), (256, (64, 80)), (18, (64, 80)), (36, (64, 80)), (36, (32, 40)), (72, (16, 20)),
              (144, (8, 10))]


def _fused(module: nn.Module) -> nn.Module:
    """A copy of `module` whose layers are the fused path's classes (as `set_fused` gives them)."""
    fused = copy.deepcopy(module)
    select_path(fused, True, "auto", True)
    return fused


def interleaved_ms(fns: dict, rounds: int) -> dict:
    """{name: median ms} of `rounds` rounds of one call of each fn in turn (after one warm-up call each)."""
    times = {name: [] for name in fns}
    for fn in fns.values():
        fn()
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) * 1e3 for name, t in times.items()}


def forward_backward(module: nn.Module, x, row_taps: bool = True):
    """One forward and backward with a dense gradient of the output's layout (`.sum().backward()` would hand
    backward an expanded zero-stride gradient, a slow path of some kernels that the network never sees);
    `row_taps` False: the aggregation head's rows by dense products (fused_ops.ROW_TAPS)."""
    grad = torch.randn_like(module(x))

    def run():
        default, fused_ops.ROW_TAPS = fused_ops.ROW_TAPS, row_taps
        try:
            module(x).backward(grad)
        finally:
            fused_ops.ROW_TAPS = default
    return run


def cases():
    for name, channels, heads, depth, size in SWIN:
        yield "swin", name, SwinLayer(channels, depth, heads), torch.randn(2, channels, *size)
    for channels, size in BATCH_NORM:
        yield ("batch_norm", f"{channels} x {size[0]}x{size[1]}", nn.BatchNorm2d(channels),
               torch.randn(2, channels, *size))
    # NYUD semseg's head: Y_k of C_k channels at 64x80 >> k
    yield ("head", "semseg 64x80", TaskHead(DEFAULT_WIDTHS, 40),
           [torch.randn(2, c, 64 >> k, 80 >> k) for k, c in enumerate(DEFAULT_WIDTHS)])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=15, help="interleaved rounds per case (median reported)")
    parser.add_argument("--json", help="write the rows (a JSON list) to this file")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error(f"--rounds must be >= 1, got {args.rounds}")
    switched = fused_ops.CHANNELS_LAST_BATCH_NORM_MIN_ROWS
    fused_ops.CHANNELS_LAST_BATCH_NORM_MIN_ROWS = 2  # the kernel on every map, also those the network leaves to PyTorch
    try:
        return _measure(args)
    finally:
        fused_ops.CHANNELS_LAST_BATCH_NORM_MIN_ROWS = switched


def _measure(args) -> list:
    torch.manual_seed(0)
    env = environment("cpu")
    rows = []
    print(f"{env['cpu']} ({env['threads']} threads{cpu_note(env)}), torch {env['torch']}")
    for kind, name, module, x in cases():
        if kind == "head":
            x = [t.requires_grad_() for t in x]
        else:
            x = x.contiguous(memory_format=torch.channels_last).requires_grad_()
        module.train()
        fused = _fused(module)
        variants = {"eager": forward_backward(module, x), "fused": forward_backward(fused, x)}
        if kind == "head":
            variants["fused_dense_rows"] = forward_backward(fused, x, row_taps=False)
        medians = interleaved_ms(variants, args.rounds)
        ratio = medians["fused"] / medians["eager"]
        dense = f"  fused with dense rows {medians['fused_dense_rows']:8.2f} ms" if kind == "head" else ""
        print(f"{kind:10s} {name:22s} eager {medians['eager']:8.2f} ms  fused {medians['fused']:8.2f} ms  "
              f"x{ratio:.2f}{dense}", flush=True)
        rows.append({"kind": kind, "case": name, **{f"{v}_ms": ms for v, ms in medians.items()},
                     "time_ratio": ratio, "rounds": args.rounds, **env})
    if args.json:
        write_json(args.json, rows)
    return rows


if __name__ == "__main__":
    main()
