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

import model.fused
from model import TASK_SETS, build_model
from model.compile import (CPU_EAGER_REGIONS, CPU_REGION_TYPES, REGION_TYPES, compile_model, compile_regions,
                           region_types, regions)

from .test_fused_network import SMALL, _assert_same_buffers, _assert_same_step, take_gpu_choices

RTOL = 1e-9  # float64


@pytest.mark.parametrize("recompute, gpu_choices", [(True, False), (False, False), (True, True)],
                         ids=["recompute", "no-recompute", "recompute-gpu-choices"])
def test_compiled_fused_matches_eager(recompute, gpu_choices, monkeypatch):
    """Two optimizer steps in train mode, then (one compiled network, recompiled for the mode) a step in eval mode.
    With recomputation, CTAM recomputes its projections at every scale (by default only on larger maps). With
    gpu_choices, the branches a GPU takes (see take_gpu_choices), so that a compiler defect there shows on a CPU."""
    monkeypatch.setattr(model.fused, "RECOMPUTE_PROJECTIONS_MIN_POSITIONS", 1)
    if gpu_choices:
        calls = take_gpu_choices(monkeypatch)
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
    if gpu_choices:
        assert calls["_Aggregation"] and calls["_AggregationChannelsLast"] == calls["_Upsample"] == 0, calls


def test_compile_model_rejects_bad_arguments():
    net = build_model(TASK_SETS["nyud2"], widths=SMALL)
    with pytest.raises(ValueError, match=r"compile mode must be one of \('off', 'full', 'regional'\), got 'fast'"):
        compile_model(net, "fast")
    with pytest.raises(TypeError, match="expects an SCAMTL network .* got Linear"):
        compile_model(torch.nn.Linear(2, 2), "full")
    net.set_fused(True)
    with pytest.raises(ValueError, match="BatchNorm statistics twice"):
        compile_model(net, "regional", backend="eager")
    assert compile_model(net, "off") is net


def test_regional_compilation_chooses_the_outermost_repeated_blocks():
    net = build_model(TASK_SETS["nyud2"], widths=SMALL)
    every = regions(net)
    assert "self_attention.0" in every and "cross_task.3" in every and "heads.semseg" in every
    assert "propagation.1" in every and not any(c.startswith("propagation.1.") for c in every)
    assert "backbone.stage3.0" in every and "backbone.layer1.0" in every
    assert len(every) == len(set(every)) == 2 + 6 + 4 + 8 + 4 + 3 + 2


@pytest.mark.parametrize("fused", [False, True], ids=["reference", "fused"])
def test_regional_compilation_on_cpu_compiles_the_chosen_blocks(fused):
    net = build_model(TASK_SETS["nyud2"], widths=SMALL).set_fused(fused)
    chosen = compile_regions(net, backend="aot_eager")  # compiles lazily: nothing is traced here
    path = "fused" if fused else "reference"
    assert chosen == [n for n in regions(net, CPU_REGION_TYPES[path]) if n not in CPU_EAGER_REGIONS[path]]
    # the fused CTAM compiled at 1/8 only; the reference's at all four scales
    assert [n for n in chosen if n.startswith("cross_task.")] == [f"cross_task.{k}" for k in ((1,) if fused
                                                                                            else range(4))]
    assert all(net.get_submodule(name)._compiled_call_impl is not None for name in chosen)
    assert not any(name.startswith("backbone.layer1") for name in chosen)  # slower compiled on both paths
    assert ("heads.semseg" in chosen) != fused and ("cross_task.1" in chosen)
    assert not any(name.startswith(("self_attention", "propagation")) for name in chosen)
    assert region_types(net.to("meta")) == REGION_TYPES  # every block class elsewhere (a GPU)
    with pytest.raises(TypeError, match="types must be a non-empty tuple of module classes, got 'TaskHead'"):
        compile_regions(net, types="TaskHead")
