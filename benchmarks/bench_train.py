"""One SCA-MTL training step (forward, loss with deep supervision, backward, Adam step): the reference path vs
the fused path (and with --compile, torch.compile of each), measured side by side in one run.

Reports the median step time (the variants' steps interleaved: one step of each in turn, `--repeats` rounds), the
activation bytes autograd saves for backward (parameters excluded), on a GPU the peak allocated memory, and for a
compiled variant the seconds its first step spent compiling; ratios are variant / reference. Example:

    python -m benchmarks.bench_train --quick            # CPU: NYUD 2-task 256x320 and PASCAL 5-task 256x256, batch 2
    python -m benchmarks.bench_train --device cuda      # GPU: NYUD 480x640 and PASCAL 512x512, batch 8, fp32 + bf16
    python -m benchmarks.bench_train --compile regional # + compiled reference and compiled fused (minutes to compile)
    python -m benchmarks.bench_train --compile regional --compile-paths fused  # the fused path's compile alone
    python -m benchmarks.bench_train --loss             # the loss alone (forward + backward): reference vs fused
    python -m benchmarks.bench_train --head             # one task's head alone: reference vs fused
    python -m benchmarks.bench_train --regions          # every block regional compilation can compile: eager vs
                                                        # compiled, per path (what model.compile's choice rests on)
    python -m benchmarks.bench_train --breakdown        # the step's time per part of the network, forward and
                                                        # backward: reference vs fused
    python -m benchmarks.bench_train --malloc keep      # glibc keeps freed memory, as model.train does on CPU
    python -m benchmarks.bench_train --variants fused   # one variant alone in this process (no other's allocations)

On CPU the rows also count the minor page faults of a step (memory the step touched fresh from the OS): with
glibc's default allocator most of an eager step's activations fault in again every step.
"""
from __future__ import annotations

import argparse
import copy
import functools
import resource
import statistics
import time
from typing import NamedTuple

import torch
from torch.utils._pytree import tree_flatten, tree_map

from benchmarks.common import environment, error_text, saved_bytes, switched, write_json
from benchmarks.labels import cpu_note
from benchmarks.step_breakdown import PARTS, StepTimeline, median_parts
from model import TASK_SETS, build_model
from model.compile import (COMPILE_MODES, DEFAULT_BACKEND, REGION_TYPES, Stopwatch, compile_block, compile_model,
                           regions)
from model.losses import MultiTaskLoss
from model.train import adam, keep_freed_memory

# task set and the paper's loss weights (None: equal weights)
CONFIGS = {
    "nyud2": (TASK_SETS["nyud2"], {"semseg": 1.44, "depth": 1.15}),
    "pascal3": (TASK_SETS["pascal3"], {"semseg": 1, "human_parts": 2, "sal": 5}),
    "pascal5": (TASK_SETS["pascal5"], None),
}
SIZES = {"cpu": {"nyud2": (256, 320), "pascal3": (256, 256), "pascal5": (256, 256)},
         "cuda": {"nyud2": (480, 640), "pascal3": (512, 512), "pascal5": (512, 512)}}


def random_batch(tasks: dict, batch: int, size, device) -> dict:
    """Labels of the right kind for every task (class maps with ignored pixels, valid depth, unit normals...)."""
    g = torch.Generator().manual_seed(0)
    h, w = size
    out = {"image": torch.randn(batch, 3, h, w, generator=g)}
    for t, n in tasks.items():
        if t in ("semseg", "human_parts"):
            lab = torch.randint(0, n, (batch, h, w), generator=g)
            lab[:, :4] = 255
            out[t] = lab
        elif t == "depth":
            out[t] = torch.rand(batch, 1, h, w, generator=g) * 5
        elif t == "normals":
            out[t] = torch.nn.functional.normalize(torch.randn(batch, 3, h, w, generator=g), dim=1)
        else:  # edge, sal: binary maps
            out[t] = (torch.rand(batch, 1, h, w, generator=g) > 0.8).float()
    return {k: v.to(device) for k, v in out.items()}


class ChannelsLastInput(torch.nn.Module):
    """`net` fed a channels-last copy of its input: eager PyTorch's own layout switch, for comparison."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x.contiguous(memory_format=torch.channels_last))


class Variant(NamedTuple):
    """A network to time, its optimizer (PyTorch's default Adam, the reference's training step as the authors run it,
    or the fused Adam of model.train) and its loss (the reference or the fused one, as model.train --fused runs)."""
    net: torch.nn.Module
    fused_adam: bool = False
    fused_loss: bool = False


def seconds(work, device) -> float:
    """Wall-clock seconds of work(), on a GPU until the work queued on it has finished."""
    start = time.perf_counter()
    work()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


class Runner:
    """Training steps of one variant: Adam, bf16 autocast if asked, the loss with deep supervision (`loss_fn`, made
    fused if the variant asks)."""

    def __init__(self, variant: Variant, loss_fn: MultiTaskLoss, batch, device, amp):
        self.net, self.batch, self.device = variant.net, batch, device
        self.loss_fn = copy.deepcopy(loss_fn).set_fused(variant.fused_loss)
        options = {"lr": 1e-4, "weight_decay": 1e-4}
        self.opt = adam(self.net.parameters(), **options) if variant.fused_adam else \
            torch.optim.Adam(self.net.parameters(), **options)
        self.amp = amp
        self.faults = []  # minor page faults of each step

    def forward_loss(self):
        with torch.autocast(device_type=self.device, dtype=torch.bfloat16, enabled=self.amp):
            out = self.net(self.batch["image"])
        return self.loss_fn({k: (v.float() if torch.is_tensor(v) else {s: {t: p.float() for t, p in d.items()}
                                                                     for s, d in v.items()})
                             for k, v in out.items()}, self.batch)[0]

    def step(self) -> float:
        """Seconds of one step (forward, backward, optimizer)."""
        if self.device == "cuda":
            torch.cuda.synchronize()  # nothing earlier counted in
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        elapsed = seconds(self._step, self.device)
        self.faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
        return elapsed

    def _step(self):
        self.opt.zero_grad(set_to_none=True)
        self.forward_loss().backward()
        self.opt.step()

    def memory(self) -> dict:
        self.opt.zero_grad(set_to_none=True)
        row = {"saved_bytes": saved_bytes(self.forward_loss, exclude=list(self.net.parameters()))}
        if self.device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            self.step()
            row["peak_bytes"] = torch.cuda.max_memory_allocated()
        return row


def interleaved_times(steps: dict, repeats: int) -> dict:
    """{name: what each round measured} of `repeats` rounds of one call of every step(), in turn (interleaved, so
    the machine's drifts hit all alike); each step returns what it measured (its own seconds, or a step's parts).
    The order rotates from round to round: a step is slowed or sped up by the one before it (on CPU, by the memory
    the allocator kept or gave back, which decides how many fresh pages fault), so no variant always follows the
    same one."""
    names = list(steps)
    times = {name: [] for name in names}
    for r in range(repeats):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            times[name].append(steps[name]())
    return times


def interleaved_medians(steps: dict, repeats: int) -> dict:
    """{name: median seconds} of interleaved_times."""
    return {name: statistics.median(t) for name, t in interleaved_times(steps, repeats).items()}


def measure(variants: dict, loss_fn, batch, device, amp, repeats: int) -> dict:
    """{variant: row}: a warm-up step each (compilation, when compiled), then `repeats` rounds of one step of every
    variant in turn (interleaved, so the machine's drifts hit all variants alike), medians; a variant that fails
    gets {"error": ...} and costs one row."""
    runners, results, compile_s = {}, {}, {}
    for variant, spec in variants.items():
        try:
            runner = Runner(spec, loss_fn, batch, device, amp)
            with Stopwatch() as watch:
                runner.step()
            compile_s[variant] = watch.compile_s
            runners[variant] = runner
        except Exception as exc:  # OOM, a bug under autocast
            results[variant] = {"error": error_text(exc)}
            if device == "cuda":
                torch.cuda.empty_cache()
    times = interleaved_times({variant: runner.step for variant, runner in runners.items()}, repeats)
    for variant, runner in runners.items():
        median = statistics.median(times[variant])
        results[variant] = {"step_ms": median * 1e3, "steps_timed": repeats,
                            "step_ms_rounds": [t * 1e3 for t in times[variant]],
                            "fused_adam": variants[variant].fused_adam, "fused_loss": variants[variant].fused_loss,
                            "images_per_s": batch["image"].shape[0] / median,
                            "faulted_bytes": statistics.median(runner.faults[-repeats:]) * resource.getpagesize(),
                            **runner.memory()}
        if compile_s[variant]:
            results[variant]["compile_s"] = compile_s[variant]
    return {variant: results[variant] for variant in variants}


def measure_loss(net, loss_fn: MultiTaskLoss, batch, device, repeats: int) -> dict:
    """{"reference": row, "fused": row}: the loss with deep supervision alone, forward and backward, on random
    predictions of the network's output shapes, the two losses' calls interleaved, medians; the bytes autograd saves
    (the predictions themselves excluded)."""
    with torch.no_grad():
        shapes = net.eval()(batch["image"])
    net.train()
    g = torch.Generator(device=device).manual_seed(1)
    leaf = lambda p: torch.randn(p.shape, generator=g, device=device).requires_grad_()  # noqa: E731
    preds = {t: (leaf(p) if torch.is_tensor(p) else {s: {u: leaf(q) for u, q in d.items()} for s, d in p.items()})
             for t, p in shapes.items()}
    leaves = [p for p in preds.values() if torch.is_tensor(p)] + \
        [q for d in preds.get("deep_supervision", {}).values() for q in d.values()]
    fns = {"reference": copy.deepcopy(loss_fn).set_fused(False), "fused": copy.deepcopy(loss_fn).set_fused(True)}

    def step(fn):
        return seconds(lambda: torch.autograd.grad(fn(preds, batch)[0], leaves), device)

    steps = {name: functools.partial(step, fn) for name, fn in fns.items()}
    for warm_up in steps.values():
        warm_up()
    medians = interleaved_medians(steps, repeats)
    return {name: {"loss_ms": medians[name] * 1e3, "steps_timed": repeats,
                   "saved_bytes": saved_bytes(lambda: fn(preds, batch)[0], exclude=leaves)} for name, fn in fns.items()}


def measure_head(net, batch, device, repeats: int) -> dict:
    """{"reference": row, "fused_eager_bn_relu": row, "fused_blocks": row, "fused_channels_last": row, "fused": row}:
    the first task's head (CSAM and the aggregation) alone, forward and backward, on random decoder features of the
    network's shapes (NCHW for the reference, the fused path's layout for the fused heads), interleaved medians; the
    bytes autograd saves (the features and parameters excluded). "fused_eager_bn_relu" runs the aggregation by
    [c, N] blocks with eager PyTorch's BatchNorm + ReLU and dense interpolation products (as where the C++ kernels
    cannot run), "fused_blocks" by [c, N] blocks with the C++ kernels (CHANNELS_LAST_AGGREGATION off: BLAS
    products), "fused_channels_last" channels-last by 1x1 convolutions (CHANNELS_LAST_AGGREGATION on), "fused" as the
    fused path runs it on this device (on CPU one of the two, by the vendor: model.fused_ops)."""
    from model import fused_ops

    task = next(iter(net.tasks))
    heads = {"reference": copy.deepcopy(net.heads[task]).train()}
    fused_net = copy.deepcopy(net).set_fused(True)
    for name in ("fused_eager_bn_relu", "fused_blocks", "fused_channels_last", "fused"):
        heads[name] = fused_net.heads[task].train()
    g = torch.Generator(device=device).manual_seed(1)
    height, width = batch["image"].shape[-2:]
    features = [torch.randn(batch["image"].shape[0], c, height // (4 << k), width // (4 << k), generator=g,
                            device=device) for k, c in enumerate(heads["reference"].widths)]
    inputs = {"reference": [f.requires_grad_() for f in features]}
    fused_inputs = [f.detach().contiguous(memory_format=fused_net.layout(f)).requires_grad_() for f in features]
    inputs.update({name: fused_inputs for name in heads if name != "reference"})
    settings = {"fused_eager_bn_relu": {"cpu_kernels_run": lambda x: False},
                "fused_blocks": {"CHANNELS_LAST_AGGREGATION": False},
                "fused_channels_last": {"CHANNELS_LAST_AGGREGATION": True}}

    def step(name):
        with switched(fused_ops, **settings.get(name, {})):
            return seconds(lambda: torch.autograd.grad(heads[name](inputs[name]).square().mean(),
                                                       [*inputs[name], *heads[name].parameters()]), device)

    steps = {name: functools.partial(step, name) for name in heads}
    for warm_up in steps.values():
        warm_up()
    medians = interleaved_medians(steps, repeats)
    return {name: {"head_ms": medians[name] * 1e3, "steps_timed": repeats,
                   "saved_bytes": saved_bytes(lambda: heads[name](inputs[name]),
                                              exclude=[*inputs[name], *heads[name].parameters()])}
            for name in heads}


def measure_regions(reference, loss_fn: MultiTaskLoss, batch, device, repeats: int, types=REGION_TYPES,
                    backend: str = DEFAULT_BACKEND) -> list:
    """[row per block and path]: every block that regional compilation can compile (of `types`, outermost first),
    fed the inputs it receives in a training step of that path, run forward + backward eagerly and compiled as
    compile_model compiles it (a copy), interleaved, medians; with the seconds its first compiled call spent
    compiling (0 where a block of the same class and shapes was compiled before)."""
    rows = []
    for path in ("reference", "fused"):
        net = copy.deepcopy(reference).set_fused(path == "fused")
        names, inputs = regions(net, types), {}

        def keep(name):
            def hook(module, args, kwargs):
                inputs.setdefault(name, tree_map(lambda t: t.detach().clone() if torch.is_tensor(t) else t,
                                                 (args, kwargs)))
            return hook

        hooks = [net.get_submodule(name).register_forward_pre_hook(keep(name), with_kwargs=True) for name in names]
        Runner(Variant(net, path == "fused", path == "fused"), loss_fn, batch, device, False).step()
        for h in hooks:
            h.remove()
        for name in names:
            args, kwargs = tree_map(lambda t: t.requires_grad_() if torch.is_tensor(t) and t.is_floating_point()
                                    else t, inputs[name])
            eager = net.get_submodule(name)
            compiled = copy.deepcopy(eager)
            compile_block(compiled, backend=backend, dynamic=False)

            def forward_backward(module):
                # fresh containers each call: an HRNet module writes its branches' outputs into its input list
                call_args, call_kwargs = tree_map(lambda t: t, (args, kwargs))
                out = module(*call_args, **call_kwargs)
                sum(o.sum() for o in tree_flatten(out)[0] if torch.is_tensor(o) and o.requires_grad).backward()

            step = lambda module: seconds(lambda: forward_backward(module), device)  # noqa: E731

            with Stopwatch() as watch:
                step(compiled)
            medians = interleaved_medians({"eager": functools.partial(step, eager),
                                           "compiled": functools.partial(step, compiled)}, repeats)
            row = {"path": path, "block": name, "block_class": type(eager).__name__, "eager_ms": medians["eager"] * 1e3,
                   "compiled_ms": medians["compiled"] * 1e3, "compile_s": watch.compile_s, "steps_timed": repeats}
            row["time_ratio"] = row["compiled_ms"] / row["eager_ms"]
            rows.append(row)
            print(f"{path:<9} {name:<20} {row['block_class']:<24} eager {row['eager_ms']:7.1f} ms  compiled "
                  f"{row['compiled_ms']:7.1f} ms  x{row['time_ratio']:.2f}  compile {watch.compile_s:6.1f} s",
                  flush=True)
    return rows


def print_region_table(rows) -> None:
    """Per path and block class: summed eager and compiled milliseconds, their ratio and the compile seconds."""
    print(f"\n{'path':<9} {'block class':<24} {'blocks':>6} {'eager ms':>9} {'compiled ms':>11} {'x eager':>7} "
          f"{'compile s':>9}")
    groups = {}
    for r in rows:
        groups.setdefault((r["config"], r["path"], r["block_class"]), []).append(r)
    for (config, path, cls), rs in groups.items():
        eager, compiled = sum(r["eager_ms"] for r in rs), sum(r["compiled_ms"] for r in rs)
        print(f"{path:<9} {cls:<24} {len(rs):6d} {eager:9.1f} {compiled:11.1f} {compiled / eager:7.2f} "
              f"{sum(r['compile_s'] for r in rs):9.1f}  ({config})")


def part_rows(name: str, results: dict, key: str, env: dict, **case) -> list:
    """Rows of a part of the step timed alone (--loss, --head), `key` its time field, with ratios to the reference."""
    rows, base = [], results["reference"]
    for variant, res in results.items():
        ratios = {"time_ratio": res[key] / base[key], "saved_ratio": res["saved_bytes"] / base["saved_bytes"]}
        rows.append(dict(env, **case, dtype="fp32", variant=f"{name}_{variant}", **res, **ratios))
        print(f"{case['config']} fp32 {name} {variant:<20} {res[key]:8.1f} ms  x{ratios['time_ratio']:.2f}  saved "
              f"{res['saved_bytes'] / 2**20:7.1f} MiB  x{ratios['saved_ratio']:.2f}", flush=True)
    return rows


def breakdown_rows(reference, loss_fn: MultiTaskLoss, data, device, repeats: int, env: dict, **case) -> list:
    """One row per path and part of the step (StepTimeline): forward, backward and total ms, the fused part's
    total / the reference's, and each part's share of its path's step; printed as a table."""
    variants = variants_of(reference, device, False, None)
    runners = {name: Runner(variants[name], loss_fn, data, device, False) for name in ("reference", "fused")}
    timelines = {name: StepTimeline(r.net, device) for name, r in runners.items()}

    def timed_step(name):
        runner, timeline = runners[name], timelines[name]
        runner.opt.zero_grad(set_to_none=True)
        with timeline:
            return timeline.step(lambda: runner.net(runner.batch["image"]),
                                 lambda out: runner.loss_fn(out, runner.batch)[0], runner.opt.step)

    steps = {name: functools.partial(timed_step, name) for name in runners}
    for warm_up in steps.values():
        warm_up()
    parts = {name: median_parts(rounds) for name, rounds in interleaved_times(steps, repeats).items()}
    steps = {name: parts[name]["step"][2] for name in parts}
    print(f"\n{case['config']} (ms; share: of the fused step) {'reference':>17} {'fused':>24}\n"
          f"{case['config']}: {'part':<15}" + " {:>7} {:>7} {:>7}".format("fwd", "bwd", "total") * 2
          + f" {'x ref':>6} {'share':>6}")
    ms = lambda v: f"{v:7.1f}" if v is not None else f"{'-':>7}"  # noqa: E731
    rows = []
    for part in PARTS + ("step",):
        ref, fused = (parts[n][part] for n in ("reference", "fused"))
        ratio = fused[2] / ref[2] if ref[2] > 0 else float("nan")  # ("other" can be about 0)
        print(f"{case['config']}: {part:<15} {ms(ref[0])} {ms(ref[1])} {ms(ref[2])} {ms(fused[0])} {ms(fused[1])} "
              f"{ms(fused[2])} {ratio:6.2f} {fused[2] / steps['fused']:6.2f}", flush=True)
        for name, (f, b, total), part_ratio in (("reference", ref, 1.0), ("fused", fused, ratio)):
            rows.append(dict(env, **case, dtype="fp32", variant=f"breakdown_{name}", part=part, forward_ms=f,
                             backward_ms=b, total_ms=total, share=total / steps[name], time_ratio=part_ratio,
                             steps_timed=repeats))
    return rows


def _parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--configs", default="nyud2,pascal5", help="comma-separated: " + ",".join(CONFIGS))
    parser.add_argument("--batch", type=int, default=None, help="default 2 on CPU, 8 on GPU")
    parser.add_argument("--repeats", type=int, default=None, help="timed steps per case (median is reported)")
    parser.add_argument("--amp", choices=["off", "bf16", "both"], default=None,
                        help="bf16 autocast (default: off on CPU, both on GPU)")
    parser.add_argument("--compile", choices=COMPILE_MODES[1:], nargs="?", const="full",
                        help="also time torch.compile (full: one graph, the default; regional: per block) of the "
                             "reference and of the fused path; compilation takes minutes (its own column)")
    parser.add_argument("--compile-paths", choices=["both", "reference", "fused"], default="both",
                        help="with --compile: which paths to compile (e.g. fused: the fused path's compile time "
                             "from an empty cache, without the reference's before it)")
    parser.add_argument("--layouts", action="store_true",
                        help="also time the reference fed a channels-last image (its convolutions follow it) and the "
                             "fused path in one layout at every scale other than its default (NCHW on CPU, "
                             "channels-last on GPU)")
    parser.add_argument("--loss", action="store_true",
                        help="time the loss with deep supervision alone (forward + backward), reference vs fused, "
                             "instead of the training step")
    parser.add_argument("--head", action="store_true",
                        help="time one task's head (CSAM and the aggregation) alone (forward + backward): reference, "
                             "fused with eager BatchNorm + ReLU, fused; instead of the training step")
    parser.add_argument("--regions", action="store_true",
                        help="time every block regional compilation can compile, eager vs compiled (forward + "
                             "backward), per path, with its compile seconds, instead of the training step")
    parser.add_argument("--breakdown", action="store_true",
                        help="time the step per part of the network (backbone, Swin layers, initial predictions, "
                             "CTAM, FPMA, heads, loss, optimizer), forward and backward, reference vs fused, "
                             "instead of the step alone")
    parser.add_argument("--variants", help="comma-separated: time only these variants (of reference, fused, "
                        "reference_fused_adam, fused_reference_loss and those --layouts and --compile add); ratios "
                        "need the reference among them")
    parser.add_argument("--malloc", choices=["system", "keep"], default="system",
                        help="system: glibc's allocator as it comes (freed memory goes back to the OS); keep: it keeps "
                             "freed memory for the next step, as model.train sets it on CPU")
    parser.add_argument("--quick", action="store_true", help="3 timed steps per case")
    parser.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), help="override the input size of every config")
    parser.add_argument("--widths", type=int, nargs=4, help="decoder widths C_k (default 36 72 144 288)")
    parser.add_argument("--json", help="write the rows (a JSON list) to this file")
    return parser


def variants_of(reference, device, layouts: bool, compile_mode: str | None, compile_paths: str = "both") -> dict:
    """{name: Variant} timed side by side, all from the same parameters: the fused path with model.train's fused
    Adam and fused loss, the reference with the default Adam, the reference with fused Adam (what the optimizer alone
    gives) and the fused path with the reference loss (what the fused loss gives)."""
    fused = lambda **options: copy.deepcopy(reference).set_fused(True, **options)  # noqa: E731
    variants = {"reference": Variant(reference), "fused": Variant(fused(), True, True),
                "reference_fused_adam": Variant(copy.deepcopy(reference), True),
                "fused_reference_loss": Variant(fused(), True)}
    if layouts:
        variants["reference_channels_last"] = Variant(ChannelsLastInput(copy.deepcopy(reference)))
        other = device != "cpu"  # the fused path's default: channels-last on CPU (but its coarsest maps)
        variants["fused_channels_last" if other else "fused_nchw"] = Variant(fused(channels_last=other), True, True)
    if compile_mode and compile_paths in ("both", "reference"):
        variants["compiled_reference"] = Variant(compile_model(copy.deepcopy(reference), compile_mode))
    if compile_mode and compile_paths in ("both", "fused"):
        variants["compiled_fused"] = Variant(compile_model(fused(), compile_mode), True, True)
    return variants


def rows_of(results: dict, env: dict, **case) -> list:
    """One row per variant with the case's fields and its ratios to the reference."""
    rows, base = [], results.get("reference", {"error": "not timed"})
    for variant, res in results.items():
        row = dict(env, **case, variant=variant, **res)
        if "error" not in res and "error" not in base:
            row.update(time_ratio=res["step_ms"] / base["step_ms"], saved_ratio=res["saved_bytes"] / base["saved_bytes"],
                       # the ratio round by round (the steps of a round ran back to back): how far one run can stray
                       time_ratio_rounds=[a / b for a, b in zip(res["step_ms_rounds"], base["step_ms_rounds"])])
            if "peak_bytes" in res:
                row["peak_ratio"] = res["peak_bytes"] / base["peak_bytes"]
        rows.append(row)
    return rows


def print_table(rows, env, device):
    print(f"\n{env['device_name']} ({device}, {env['threads']} threads{cpu_note(env)}), torch {env['torch']}, "
          f"commit {env['commit']}, malloc {env['malloc']}")
    header = f"{'config':<8} {'dtype':<13} {'variant':<23} {'step ms':>9} {'x ref':>6} {'saved MiB':>10} {'x ref':>6}"
    if device == "cuda":
        header += f" {'peak MiB':>9} {'x ref':>6}"
    print(header + f" {'faults MiB':>10} {'compile s':>9}  x ref per round (min-max)")
    for r in rows:
        if "error" in r:
            print(f"{r['config']:<8} {r['dtype']:<13} {r['variant']:<23} {r['error']}")
            continue
        ratio = lambda key: f"{r[key]:6.2f}" if key in r else f"{'-':>6}"  # noqa: E731 (none without a reference)
        line = (f"{r['config']:<8} {r['dtype']:<13} {r['variant']:<23} {r['step_ms']:9.1f} {ratio('time_ratio')} "
                f"{r['saved_bytes'] / 2**20:10.1f} {ratio('saved_ratio')}")
        if "peak_bytes" in r:
            line += f" {r['peak_bytes'] / 2**20:9.1f} {ratio('peak_ratio')}"
        line += f" {r['faulted_bytes'] / 2**20:10.1f}"
        line += f" {r['compile_s']:9.1f}" if "compile_s" in r else " " * 10
        rounds = r.get("time_ratio_rounds")
        print(line + (f"  {min(rounds):.2f}-{max(rounds):.2f}" if rounds and r["variant"] != "reference" else ""))


def main(argv=None):
    parser = _parser()
    args = parser.parse_args(argv)
    parts = args.loss or args.head or args.regions or args.breakdown
    if parts and (args.compile or args.layouts or args.variants or args.amp not in (None, "off")):
        parser.error("--loss, --head, --regions and --breakdown time parts of the step, in fp32; --compile, "
                     "--layouts, --variants and --amp apply to the whole step")
    if args.compile_paths != "both" and not args.compile:
        parser.error("--compile-paths chooses the paths that --compile compiles: give --compile too")
    device = args.device
    batch_size = args.batch or (8 if device == "cuda" else 2)
    repeats = args.repeats or (3 if args.quick else (10 if device == "cuda" else 5))
    amp_modes = {"off": [False], "bf16": [True], "both": [False, True]}[args.amp or ("both" if device == "cuda" else "off")]
    if args.malloc == "keep" and not keep_freed_memory():
        parser.error("--malloc keep needs glibc's allocator")
    env = dict(environment(device), malloc=args.malloc)
    wanted = args.variants.split(",") if args.variants else None
    rows = []
    for name in args.configs.split(","):
        if name not in CONFIGS:
            parser.error(f"--configs: unknown config {name!r}; choose from {list(CONFIGS)}")
        tasks, weights = CONFIGS[name]
        size = tuple(args.size) if args.size else SIZES[device][name]
        batch = random_batch(tasks, batch_size, size, device)
        loss_fn = MultiTaskLoss(list(tasks), weights)
        case = {"config": name, "tasks": list(tasks), "batch": batch_size, "size": list(size)}
        if parts:
            torch.manual_seed(0)
            net = build_model(tasks, **({"widths": tuple(args.widths)} if args.widths else {})).to(device)
            if args.regions:
                rows += [dict(env, **case, dtype="fp32", **row)
                         for row in measure_regions(net.train(), loss_fn, batch, device, repeats)]
            if args.loss:
                rows += part_rows("loss", measure_loss(net, loss_fn, batch, device, repeats), "loss_ms", env, **case)
            if args.head:
                rows += part_rows("head", measure_head(net, batch, device, repeats), "head_ms", env, **case)
            if args.breakdown:
                rows += breakdown_rows(net.train(), loss_fn, batch, device, repeats, env, **case)
            continue
        for amp in amp_modes:
            torch.manual_seed(0)
            reference = build_model(tasks, **({"widths": tuple(args.widths)} if args.widths else {})).to(device).train()
            variants = variants_of(reference, device, args.layouts, args.compile, args.compile_paths)
            if wanted:
                unknown = set(wanted) - set(variants)
                if unknown:
                    parser.error(f"--variants: unknown {sorted(unknown)}; with these options choose from "
                                 f"{list(variants)}")
                variants = {k: v for k, v in variants.items() if k in wanted}
            results = measure(variants, loss_fn, batch, device, amp, repeats)
            dtype = "bf16-autocast" if amp else "fp32"
            for variant, res in results.items():
                done = f"FAILED {res['error']}" if "error" in res else \
                    f"{res['step_ms']:9.1f} ms  saved {res['saved_bytes'] / 2**20:8.1f} MiB"
                print(f"{name} {dtype} {variant:<23} {done}", flush=True)
            rows += rows_of(results, env, **case, dtype=dtype)
            if args.json:  # after every case, so that a run cut short by a time limit keeps what it measured
                write_json(args.json, rows)
    if args.regions:
        print_region_table([r for r in rows if "block" in r])
    elif not parts:
        print_table(rows, env, device)
    if args.json:
        write_json(args.json, rows)
        print(f"# wrote {len(rows)} rows to {args.json}")
    return rows


if __name__ == "__main__":
    main()
