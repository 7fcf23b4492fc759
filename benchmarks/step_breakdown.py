"""Where a training step's time goes, per part of the network, forward and backward (`bench_train --breakdown`).

Forward hooks time every call of the decoder's modules and the Swin layers; an identity autograd node at each call's
inputs and one at its outputs time its backward, from the first gradient that reaches its outputs to the last that
leaves its inputs (autograd runs a graph in reverse creation order, so the calls' backward spans do not overlap). The
HRNet backbone is what runs before the first Swin layer in forward and after the last one in backward (the fused
path calls its stages directly, not the backbone module); the loss's backward is what runs before the first gradient
reaches the network; "other" is what is left of the step (concatenations, resizes, crops between the parts).
"""
from __future__ import annotations

import statistics
import time

import torch
from torch.utils._pytree import tree_map

# parts of the step in the order they run forward
PARTS = ("backbone", "self_attention", "initial", "cross_task", "propagation", "heads", "loss", "optimizer", "other")
HOOKED = ("self_attention", "initial", "cross_task", "propagation", "heads")


class _Mark(torch.autograd.Function):
    """Identity whose backward records the time the gradient passes (`side`: "in" or "out" of a module call)."""

    @staticmethod
    def forward(ctx, timeline, call, side, x):
        ctx.timeline, ctx.call, ctx.side = timeline, call, side
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        ctx.timeline.passed(ctx.call, ctx.side)
        return None, None, None, grad


class StepTimeline:
    """Times the parts of `net`'s training steps: `with timeline: timeline.step(...)` (hooks only while active)."""

    def __init__(self, net, device):
        self.net, self.device = net, device
        self.modules = {part: self._modules(part) for part in HOOKED}
        self.handles = []
        self.calls, self.open, self.in_backward = [], [], False

    def _modules(self, part):
        container = getattr(self.net, part)
        if part == "initial":
            return [m for per_task in container for m in per_task.values()]
        if part == "propagation":  # index 0 is an unused placeholder
            return list(container)[1:]
        return list(container.values()) if isinstance(container, torch.nn.ModuleDict) else list(container)

    def clock(self) -> float:
        if self.device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()

    def __enter__(self):
        for part, modules in self.modules.items():
            for module in modules:
                self.handles += [module.register_forward_pre_hook(self._before(part), with_kwargs=True),
                                 module.register_forward_hook(self._after(part), with_kwargs=True)]
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def _mark(self, call, side, tree):
        return tree_map(lambda t: _Mark.apply(self, call, side, t) if torch.is_tensor(t) and t.requires_grad else t,
                        tree)

    def _before(self, part):
        def hook(module, args, kwargs):
            if self.in_backward:  # a forward recomputed in backward counts to the backward it serves
                return None
            call = len(self.calls)
            self.calls.append({"part": part, "start": self.clock()})
            self.open.append(call)
            return self._mark(call, "in", (args, kwargs))
        return hook

    def _after(self, part):
        def hook(module, args, kwargs, output):
            if self.in_backward:
                return None
            call = self.open.pop()
            self.calls[call]["end"] = self.clock()
            return self._mark(call, "out", output)
        return hook

    def passed(self, call, side):
        t, record = self.clock(), self.calls[call]
        if side == "out":  # a gradient reached the call's outputs: its backward has begun
            record["backward_start"] = min(record.get("backward_start", t), t)
        else:  # a gradient left through its inputs
            record["backward_end"] = max(record.get("backward_end", t), t)

    def step(self, forward, loss, optimizer) -> dict:
        """One step: out = forward(), loss(out).backward(), optimizer(); returns {part: (forward ms, backward ms,
        total ms)} for PARTS and "step" (the whole), forward and backward None where a part has no such phase
        (optimizer, other); the parts' totals add up to the step's."""
        self.calls, self.open, self.in_backward = [], [], False
        start = self.clock()
        out = forward()
        forward_end = self.clock()
        value = loss(out)
        loss_end = self.clock()
        self.in_backward = True
        value.backward()
        backward_end = self.clock()
        self.in_backward = False
        optimizer()
        end = self.clock()
        calls = self.calls
        parts = {part: [0.0, 0.0] for part in ("backbone",) + HOOKED}
        for c in calls:
            parts[c["part"]][0] += c["end"] - c["start"]
            if "backward_start" in c:  # (a call whose outputs got no gradient had no backward)
                # a call whose inputs need no gradient ends its backward with the step's
                parts[c["part"]][1] += c.get("backward_end", backward_end) - c["backward_start"]
        parts["backbone"][0] = min(c["start"] for c in calls) - start
        parts["backbone"][1] = backward_end - max((c["backward_end"] for c in calls if "backward_end" in c),
                                                  default=backward_end)
        reached = min((c["backward_start"] for c in calls if "backward_start" in c), default=backward_end)
        parts["loss"] = [loss_end - forward_end, reached - loss_end]
        times = {part: (f * 1e3, b * 1e3, (f + b) * 1e3) for part, (f, b) in parts.items()}
        times["optimizer"] = (None, None, (end - backward_end) * 1e3)
        times["other"] = (None, None, (end - start) * 1e3 - sum(v[2] for v in times.values()))
        times["step"] = (None, None, (end - start) * 1e3)
        return times


def median_parts(steps: list) -> dict:
    """{part: (forward ms, backward ms, total ms)}: per part and field, the median over `steps` (StepTimeline.step
    results; None stays None)."""
    median = lambda values: None if values[0] is None else statistics.median(values)  # noqa: E731
    return {part: tuple(median([s[part][i] for s in steps]) for i in range(3)) for part in PARTS + ("step",)}
