"""torch.compile of SCA-MTL, either path: the whole network as one graph ("full") or one compiled module per
repeated block ("regional").

Both compile with static shapes (`dynamic=False`): a training run has one input size, and a new size (the last
partial batch of an evaluation) compiles once more instead of turning every size into a symbol. Regional
compilation compiles blocks of the classes in `REGION_TYPES`, outermost first: all of them on a GPU, and on a CPU
those chosen for the path being compiled (`CPU_REGION_TYPES`, less `CPU_EAGER_REGIONS`: faster compiled, and worth
the compile time).
Blocks of the same class and shapes (the HRNet modules of a stage, the initial heads of tasks with equal outputs)
share one compiled frame, the glue between blocks runs eagerly, and a failure stays inside one block. Compile
after `set_fused`: a compiled block keeps the path it was traced with.
"""
from __future__ import annotations

import time

import torch
import torch.nn as nn
from timm.models.hrnet import Bottleneck, HighResolutionModule

from .modules import SwinLayer
from .network import SCAMTL, CrossTaskAttention, FeaturePropagation, InitialPrediction, TaskHead

COMPILE_MODES = ("off", "full", "regional")
DEFAULT_BACKEND = "inductor"
# the repeated blocks of the network, each compiled as one region (a block inside a chosen one is not chosen)
REGION_TYPES = (Bottleneck, HighResolutionModule, SwinLayer, InitialPrediction, CrossTaskAttention,
                FeaturePropagation, TaskHead)
# on a CPU, per path, the blocks worth compiling (python -m benchmarks.bench_train --regions, NYUD,
# benchmarks/RESULTS.md). Reference: every class whose compiled forward + backward ran faster (the compiled baseline
# at its strongest). Fused: CTAM only, the class that saves the most per second of compiling (31 ms a step for 84 s
# on 2 cores); Swin layers (13 ms for 60 s) and FPMA (9 ms for 49 s) would take an empty-cache compile past 2
# minutes, and the rest ran slower or no faster compiled (the stem's Bottlenecks 1.8x slower on both paths, the
# fused task heads 1.1x). compile_regions(net, types=...) compiles others.
CPU_REGION_TYPES = {"reference": (HighResolutionModule, InitialPrediction, CrossTaskAttention, TaskHead),
                    "fused": (CrossTaskAttention,)}
# blocks of those classes left eager on a CPU. Fused: CTAM but at 1/8, the scale that saves the most per second of
# compiling (compiled forward + backward: PASCAL 32 ms for 46 s, NYUD 10 ms for 21 s; at 1/4 31 and 6 ms for 72 and
# 36 s, Inductor's one-off costs included, at 1/16 and 1/32 1-10 %; RESULTS.md). The compiled fused step is within the
# noise of the eager one on a CPU, so the compile time is held down: PASCAL's 20-pair CTAM compiles in about 75 s
# with an empty cache on 2 cores, instead of about 2 minutes (both fine scales) or 4 (all)
CPU_EAGER_REGIONS = {"reference": (), "fused": ("cross_task.0", "cross_task.2", "cross_task.3")}
# each block class compiles once per distinct shape and mode: 4 scales x train/eval x tasks' output widths
REGION_RECOMPILE_LIMIT = 64


def _cpu_path(net: nn.Module) -> str | None:
    """The key of `net`'s path in the CPU tables ("fused" or "reference"), None off a CPU (by its parameters)."""
    if next(net.parameters()).device.type != "cpu":
        return None
    return "fused" if net.fused else "reference"


def region_types(net: nn.Module) -> tuple:
    """The block classes regional compilation compiles in `net` (an SCAMTL, on its parameters' device)."""
    path = _cpu_path(net)
    return REGION_TYPES if path is None else CPU_REGION_TYPES[path]


def default_regions(net: nn.Module) -> list:
    """The blocks regional compilation compiles in `net` by default: those of `region_types(net)`, less
    CPU_EAGER_REGIONS on a CPU."""
    path = _cpu_path(net)
    eager = () if path is None else CPU_EAGER_REGIONS[path]
    return [name for name in regions(net, region_types(net)) if name not in eager]


def regions(net: nn.Module, types: tuple = REGION_TYPES) -> list:
    """Names of the blocks of `net` whose class is in `types` and that lie in no other such block, in order."""
    if not (isinstance(types, tuple) and types and all(isinstance(t, type) for t in types)):
        raise TypeError(f"types must be a non-empty tuple of module classes, got {types!r}")
    chosen = []
    for name, module in net.named_modules():
        if isinstance(module, types) and not any(name.startswith(c + ".") for c in chosen):
            chosen.append(name)
    return chosen


def compile_regions(net: nn.Module, types: tuple | None = None, **options) -> list:
    """Compile, in place, the blocks `regions(net, types)` names (by default `default_regions(net)`); `options`
    go to torch.compile. Returns the compiled blocks' names."""
    chosen = default_regions(net) if types is None else regions(net, types)
    for name in chosen:
        compile_block(net.get_submodule(name), **options)
    return chosen


def compile_block(block: nn.Module, **options) -> None:
    """Compile one block in place, with room for a compiled frame per shape of its class (Dynamo's default of 8
    would run PASCAL's 16 initial heads past the eighth eagerly)."""
    block.compile(**options)
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, REGION_RECOMPILE_LIMIT)


def compile_model(net: nn.Module, mode: str = "full", backend: str | None = None) -> nn.Module:
    """What to call: `net` itself for "off", torch.compile(net) for "full" (parameters, buffers and state-dict
    keys stay on `net`), `net` with its blocks compiled in place for "regional". `net`: an SCAMTL, or a wrapper of
    one (DistributedDataParallel)."""
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile mode must be one of {COMPILE_MODES}, got {mode!r}")
    scamtl = next((m for m in net.modules() if isinstance(m, SCAMTL)), None)
    if scamtl is None:
        raise TypeError(f"compile_model expects an SCAMTL network (or a wrapper of one), got {type(net).__name__}")
    options = {"backend": backend or DEFAULT_BACKEND, "dynamic": False}
    if mode != "off" and options["backend"] == "eager" and scamtl.fused and scamtl.recompute:
        # that backend runs the traced checkpoints as plain ones, without the running-statistics freeze
        raise ValueError("the fused path's recomputation needs a backend that traces backward (inductor, "
                         "aot_eager); Dynamo's 'eager' backend would update BatchNorm statistics twice. Use another "
                         "backend, or set_fused(True, recompute=False)")
    if mode == "full":
        return torch.compile(net, **options)
    if mode == "regional":
        compile_regions(scamtl, **options)
    return net


def compile_seconds() -> float:
    """Seconds this process has spent in torch.compile so far (Dynamo's tracing and the backend's compilation,
    backward graphs included)."""
    metrics = torch._dynamo.utils.compilation_time_metrics
    return sum(metrics.get("_compile.compile_inner", [])) + sum(metrics.get("compile_fx.<locals>.bw_compiler", []))


def graph_breaks(net: nn.Module, x: torch.Tensor) -> dict:
    """Dynamo's view of one forward of `net` on x: {"graphs", "breaks", "reasons": [(where, why), ...]}. Resets
    Dynamo's caches before and after (whatever this process had compiled compiles again)."""
    torch._dynamo.reset()
    report = torch._dynamo.explain(net)(x)
    reasons = [(f"{b.user_stack[-1].filename.rsplit('/', 1)[-1]}:{b.user_stack[-1].lineno}" if b.user_stack else "?",
                b.reason.splitlines()[0]) for b in report.break_reasons]
    torch._dynamo.reset()
    return {"graphs": report.graph_count, "breaks": report.graph_break_count, "reasons": reasons}


class Stopwatch:
    """Wall-clock seconds of a block, with the part of it spent compiling (`compile_s`)."""

    def __enter__(self):
        self.start, self.compile_start = time.perf_counter(), compile_seconds()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start
        self.compile_s = compile_seconds() - self.compile_start


def main(argv=None) -> int:
    """`python -m model.compile`: Dynamo's graphs and graph breaks of one forward, per path and mode."""
    import argparse

    from .network import TASK_SETS, build_model

    parser = argparse.ArgumentParser(prog="python -m model.compile", description=main.__doc__.split(": ", 1)[1])
    parser.add_argument("--tasks", default="nyud2", choices=sorted(TASK_SETS), help="task set (default nyud2)")
    parser.add_argument("--size", type=int, nargs=2, default=(64, 64), metavar=("H", "W"))
    parser.add_argument("--widths", type=int, nargs=4, default=(12, 24, 48, 96),
                        help="decoder widths (graph breaks do not depend on them; small ones trace faster)")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    net = build_model(TASK_SETS[args.tasks], widths=tuple(args.widths))
    x = torch.randn(2, 3, *args.size)
    print("| path | mode | graphs | graph breaks |\n|---|---|---|---|")
    for fused in (False, True):
        net.set_fused(fused)
        for train in (True, False):
            report = graph_breaks(net.train(train), x)
            print(f"| {'fused' if fused else 'reference'} | {'train' if train else 'eval'} | {report['graphs']} | "
                  f"{report['breaks']} |", flush=True)
            for where, why in report["reasons"]:
                print(f"|  | {where} | {why} | |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
