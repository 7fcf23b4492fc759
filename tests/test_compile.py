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

from .test_fused_network import SMALL, _assert_same_buffers, _assert_same_step

RTOL = 1e-9  # float64


@pytest.mark.parametrize("recompute", [True, False], ids=["recompute", "no-recompute"])
def test_compiled_fused_matches_eager(recompute):
    """Two optimizer steps in train mode, then (one compiled network, recompiled for the mode) a step in eval mode."""
    tasks = TASK_SETS["nyud2"]
    torch.manual_seed(0)
    eager = build_model(tasks, widths=SMALL).double().set_fused(True, recompute=recompute)
    compiled_net = copy.deepcopy(eager)
    compiled = torch.compile(compiled_net, backend="aot_eager", fullgraph=True, dynamic=False)
    opts = [torch.optim.SGD(m.parameters(), lr=0.01) for m in (eager, compiled_net)]
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    for step, train in enumerate((True, True, False) if recompute else (True, True)):
        _assert_same_step((eager, compiled), x, tasks, step, train, RTOL)
        for opt in opts:
            opt.step()
        _assert_same_buffers(eager, compiled_net, RTOL)
