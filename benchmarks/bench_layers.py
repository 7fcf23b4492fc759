"""The network's Swin layers, BatchNorm layers, one task head (CSAM + aggregation) and CTAM alone, forward +
backward, eager PyTorch vs the fused path's ops (fused_mtl_attn.window_attention, the channels-last BatchNorm
kernel, the fused head, the fused CTAM), at the shapes of one NYUD training step on CPU (256x320, batch 2: the
backbone's maps at strides 4-32, channels-last as the fused path runs them; the head's inputs NCHW) and for CTAM of
a PASCAL one (5 tasks, 256x256, batch 2). Next to the fused path as this machine runs it, each of its per-machine
choices both ways (ALTERNATIVES, model.fused_ops switches): the Swin layers' Linear products by MKL or as oneDNN
convolutions (LINEAR_CONVOLUTION_MIN_MACS), the head channels-last or by [c, N] blocks (CHANNELS_LAST_AGGREGATION)
and its rows by dense products instead of 2-tap filters (ROW_TAPS), CTAM's projections all as batched products or
all as grouped convolutions (CONV_PROJECTIONS_MAX_POSITIONS). The variants of each case run interleaved, one call
of each in turn, and the medians are reported. Example:

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

from benchmarks.common import environment, switched, write_json
from benchmarks.labels import cpu_note
from model import TASK_SETS, fused_ops
from model.fused import CHANNELS_LAST_MIN_POSITIONS, select_path
from model.modules import SwinLayer
from model.network import DEFAULT_WIDTHS, CrossTaskAttention, TaskHead

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


def forward_backward(module: nn.Module, x, **settings):
    """One forward and backward with a dense gradient of the output's layout (`.sum().backward()` would hand
    backward an expanded zero-stride gradient, a slow path of some kernels that the network never sees); x and the
    output a tensor or a dict of them (CTAM). `settings`: model.fused_ops switches set during the call (e.g.
    ROW_TAPS=False: the aggregation head's rows by dense products), put back after it."""
    out = module(x)
    grad = {k: torch.randn_like(v) for k, v in out.items()} if isinstance(out, dict) else torch.randn_like(out)

    def run():
        with switched(fused_ops, **settings):
            out = module(x)
            if isinstance(out, dict):
                torch.autograd.backward([out[k] for k in grad], [grad[k] for k in grad])
            else:
                out.backward(grad)
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
    # PASCAL's CTAM (5 tasks, 20 ordered pairs) at 256x256: the task features at 64x64 >> k
    tasks = list(TASK_SETS["pascal5"])
    for k, c in enumerate(DEFAULT_WIDTHS):
        size = (64 >> k, 64 >> k)
        yield ("ctam", f"pascal5 {size[0]}x{size[1]}", CrossTaskAttention(tasks, c),
               {t: torch.randn(2, c, *size) for t in tasks})


# the fused path's own alternatives, timed next to it: {kind: {variant: model.fused_ops switches}}
ALTERNATIVES = {"swin": {"fused_linear_products": {"LINEAR_CONVOLUTION_MIN_MACS": None},
                         "fused_linear_convolutions": {"LINEAR_CONVOLUTION_MIN_MACS": 1 << 24}},
                "head": {"fused_channels_last": {"CHANNELS_LAST_AGGREGATION": True},
                         "fused_blocks": {"CHANNELS_LAST_AGGREGATION": False},
                         "fused_dense_rows": {"ROW_TAPS": False}},
                "ctam": {"fused_batched_products": {"CONV_PROJECTIONS_MAX_POSITIONS": 0},
                         "fused_convolutions": {"CONV_PROJECTIONS_MAX_POSITIONS": 1 << 30}}}


def _layout(x, fused: bool):
    """x as the network hands it over: the head's inputs NCHW; CTAM's in the path's layout (the reference NCHW, the
    fused path channels-last from model.fused.CHANNELS_LAST_MIN_POSITIONS positions on); other maps channels-last."""
    if isinstance(x, list):
        return [t.requires_grad_() for t in x]
    if isinstance(x, dict):
        return {t: _layout(f, fused) if fused and f.shape[-2] * f.shape[-1] >= CHANNELS_LAST_MIN_POSITIONS
                else f.clone().requires_grad_() for t, f in x.items()}
    return x.contiguous(memory_format=torch.channels_last).requires_grad_()


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
        module.train()
        fused = _fused(module)
        x_eager, x_fused = _layout(x, False), _layout(x, True)
        variants = {"eager": forward_backward(module, x_eager), "fused": forward_backward(fused, x_fused)}
        for variant, settings in ALTERNATIVES.get(kind, {}).items():
            variants[variant] = forward_backward(fused, x_fused, **settings)
        medians = interleaved_ms(variants, args.rounds)
        ratio = medians["fused"] / medians["eager"]
        others = "".join(f"  {v} {ms:8.2f} ms" for v, ms in medians.items() if v not in ("eager", "fused"))
        print(f"{kind:10s} {name:22s} eager {medians['eager']:8.2f} ms  fused {medians['fused']:8.2f} ms  "
              f"x{ratio:.2f}{others}", flush=True)
        rows.append({"kind": kind, "case": name, **{f"{v}_ms": ms for v, ms in medians.items()},
                     "time_ratio": ratio, "rounds": args.rounds, **env})
    if args.json:
        write_json(args.json, rows)
    return rows


if __name__ == "__main__":
    main()
