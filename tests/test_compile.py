"""The fused network under torch.compile: one graph (fullgraph=True: any graph break fails the test), and the same
outputs, input and parameter gradients and BatchNorm running statistics as the eager fused path, in train mode
(recomputation on and off, two optimizer steps) and in eval mode.

The compiler here is AOTAutograd with eager kernels ("aot_eager"): it traces forward and backward through
functionalization and the partitioner, which is where the fused path's custom ops, its running-statistics updates
and its recomputation (activation checkpointing) meet the compiler. Inductor's code generation on top takes 15
minutes for this tiny network on a 2-core machine, so it is checked by benchmarks/bench_train.py --compile and
the measurement in benchmarks/RESULTS.md, not here.
"""
import copy

import pytest
import torch

from model import TASK_SETS, build_model

from .test_fused_network import SMALL, _assert_close, _run_step

RTOL = 1e-9  # float64


def _compiled_matches_eager(train: bool, recompute: bool, steps: int):
    tasks = TASK_SETS["nyud2"]
    torch.manual_seed(0)
    eager = build_model(tasks, widths=SMALL).double().set_fused(True, recompute=recompute)
    compiled_net = copy.deepcopy(eager)
    compiled = torch.compile(compiled_net, backend="aot_eager", fullgraph=True, dynamic=False)
    opts = [torch.optim.SGD(m.parameters(), lr=0.01) for m in (eager, compiled_net)]
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    for step in range(steps):
        outs, grads_x = _run_step((eager, compiled), x, tasks, step, train)
        for name, want in outs[0].items():
            _assert_close(f"step {step} output {name}", outs[1][name].detach(), want.detach(), want.abs().max(), RTOL)
        _assert_close(f"step {step} input grad", grads_x[1], grads_x[0], grads_x[0].abs().max(), RTOL)
        scale = max(p.grad.abs().max() for p in eager.parameters())
        for (name, p_eager), p_compiled in zip(eager.named_parameters(), compiled_net.parameters()):
            _assert_close(f"step {step} grad {name}", p_compiled.grad, p_eager.grad,
                          torch.maximum(p_eager.grad.abs().max(), 1e-3 * scale), RTOL)
        for opt in opts:
            opt.step()
    for (name, b_eager), b_compiled in zip(eager.named_buffers(), compiled_net.buffers()):
        if b_eager.is_floating_point():
            _assert_close(f"buffer {name}", b_compiled, b_eager, torch.clamp(b_eager.abs().max(), min=1e-3), RTOL)
        else:  # the batch counters: a recomputation must not count as a second call
            assert torch.equal(b_compiled, b_eager), f"buffer {name}: {b_compiled} != {b_eager}"


@pytest.mark.parametrize("recompute", [True, False], ids=["recompute", "no-recompute"])
def test_compiled_fused_train_matches_eager(recompute):
    _compiled_matches_eager(train=True, recompute=recompute, steps=2)


def test_compiled_fused_eval_matches_eager():
    _compiled_matches_eager(train=False, recompute=True, steps=1)
