"""The network's Swin layers and BatchNorm layers alone, forward + backward, eager PyTorch vs the fused path's ops
(fused_mtl_attn.window_attention, the channels-last BatchNorm kernel), at the shapes of one NYUD training step on
CPU (256x320, batch 2: the backbone's maps at strides 4-32, channels-last as the fused path runs them). The two
variants of each case run interleaved, one call of each in turn, and the medians are reported. Example:

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
from model.fused import FusedBatchNorm2d, FusedWindowAttention
from model.modules import SwinLayer, WindowAttention

# (name, channels, heads, Swin blocks, map size): the encoder's self-attention at each scale (18-144 channels, 6
# heads, 2 blocks) and FPMA's (M x C_k channels, 4 heads, 1 block) for NYUD's 2 tasks at 256x320
SWIN = [("self_attention 1/4", 18, 6, 2, (64, 80)), ("self_attention 1/8", 36, 6, 2, (32, 40)),
        ("self_attention 1/16", 72, 6, 2, (16, 20)), ("self_attention 1/32", 144, 6, 2, (8, 10)),
        ("fpma 1/8", 144, 4, 1, (32, 40)), ("fpma 1/16", 288, 4, 1, (16, 20)), ("fpma 1/32", 576, 4, 1, (8, 10))]
# BatchNorm maps of the step: the stem, the backbone's branches and the decoder's blocks
BATCH_NORM = [(64, (128, 160)), (256, (64, 80)), (18, (64, 80)), (36, (64, 80)), (36, (32, 40)), (72, (16, 20)),
              (144, (8, 10))]


def _fused(module: nn.Module) -> nn.Module:
    """A copy of `module` whose window attention and BatchNorm layers are the fused path's classes."""
    fused = copy.deepcopy(module)
    for m in fused.modules():
        if type(m) is WindowAttention:
            m.__class__ = FusedWindowAttention
        elif type(m) is nn.BatchNorm2d:
            m.__class__ = FusedBatchNorm2d
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


def forward_backward(module: nn.Module, x: torch.Tensor):
    """One forward and backward with a dense gradient of the output's layout (`.sum().backward()` would hand
    backward an expanded zero-stride gradient, a slow path of some kernels that the network never sees)."""
    grad = torch.randn_like(module(x))

    def run():
        module(x).backward(grad)
    return run


def cases():
    for name, channels, heads, depth, size in SWIN:
        yield "swin", name, SwinLayer(channels, depth, heads), torch.randn(2, channels, *size)
    for channels, size in BATCH_NORM:
        yield ("batch_norm", f"{channels} x {size[0]}x{size[1]}", nn.BatchNorm2d(channels),
               torch.randn(2, channels, *size))


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
        x = x.contiguous(memory_format=torch.channels_last).requires_grad_()
        module.train()
        medians = interleaved_ms({"eager": forward_backward(module, x),
                                  "fused": forward_backward(_fused(module), x)}, args.rounds)
        ratio = medians["fused"] / medians["eager"]
        print(f"{kind:10s} {name:22s} eager {medians['eager']:8.2f} ms  fused {medians['fused']:8.2f} ms  "
              f"x{ratio:.2f}", flush=True)
        rows.append({"kind": kind, "case": name, "eager_ms": medians["eager"], "fused_ms": medians["fused"],
                     "time_ratio": ratio, "rounds": args.rounds, **env})
    if args.json:
        write_json(args.json, rows)
    return rows


if __name__ == "__main__":
    main()
