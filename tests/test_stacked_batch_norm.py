"""model.fused_ops.batch_norm_stacked, the BatchNorm of many modules' stacked channels (the CTAM projections):
the same outputs and running statistics as each module's own calls (momentum or cumulative average, repeated
calls, modules without running statistics, eval mode), distinct modules required; and under torch.compile its
bookkeeping (the modules' parameters concatenated, their running statistics updated) takes the same number of
graph nodes for 4 modules as for 20, so that PASCAL's 120 stacked modules per CTAM scale do not each become
generated kernels."""
import copy
import functools

import pytest
import torch
import torch.nn as nn
from functorch.compile import make_boxed_func
from torch._dynamo.backends.common import aot_autograd

from model.fused_ops import batch_norm_stacked


def _norms(n, momentum=0.1, seed=0):
    torch.manual_seed(seed)
    norms = [nn.BatchNorm2d(3 + i % 3, momentum=momentum).double() for i in range(n)]
    for m in norms:
        nn.init.normal_(m.weight)
        nn.init.normal_(m.bias)
    return norms


def _stacked_input(norms, seed=1):
    torch.manual_seed(seed)
    return torch.randn(2, sum(m.num_features for m in norms), 5, dtype=torch.float64) * 2 + 0.5


def _one_by_one(x, norms, calls, relu):
    pieces = x.split([m.num_features for m in norms], dim=1)
    out = []
    for m, piece in zip(norms, pieces):
        for _ in range(calls):
            y = m(piece.unsqueeze(-1)).squeeze(-1)
        out.append(y.relu() if relu else y)
    return torch.cat(out, dim=1)


def _buffers(norms):
    return [b for m in norms for b in m.buffers()]


@pytest.mark.parametrize("momentum, calls, relu, train", [
    (0.1, 1, False, True), (0.1, 2, True, True), (None, 3, False, True), (0.3, 1, True, False)])
def test_matches_each_module_call(momentum, calls, relu, train):
    norms = _norms(5, momentum)
    for m in norms:  # statistics away from their initial values, so that eval mode reads real ones
        m.train()(torch.randn(4, m.num_features, 3, 1, dtype=torch.float64) + 1)
    ref = copy.deepcopy(norms)
    for m in norms + ref:
        m.train(train)
    x = _stacked_input(norms)
    got = batch_norm_stacked(x, norms, calls, relu=relu)
    want = _one_by_one(x, ref, calls, relu)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for b, r in zip(_buffers(norms), _buffers(ref)):
        torch.testing.assert_close(b, r, rtol=1e-12, atol=0)


def test_modules_without_running_statistics_and_mixed_momenta():
    norms = _norms(4)
    norms[1] = nn.BatchNorm2d(norms[1].num_features, track_running_stats=False).double()
    norms[2].momentum = 0.5
    ref = copy.deepcopy(norms)
    x = _stacked_input(norms)
    torch.testing.assert_close(batch_norm_stacked(x, norms), _one_by_one(x, ref, 1, False), rtol=1e-12, atol=1e-12)
    for b, r in zip(_buffers(norms), _buffers(ref)):
        torch.testing.assert_close(b, r, rtol=1e-12, atol=0)


def test_a_module_listed_twice_is_rejected():
    norms = _norms(2)
    with pytest.raises(ValueError, match="distinct modules"):
        batch_norm_stacked(_stacked_input(norms + norms[:1]), norms + norms[:1])


def _graph_nodes(n):
    """Kernel-making nodes (neither views nor tuple items) of the forward graph of batch_norm_stacked over n
    modules, as AOTAutograd hands it to the compiler."""
    counts = []

    def count(gm, example_inputs):
        free = {"getitem", "view", "_unsafe_view", "detach", "split", "split_with_sizes", "alias"}
        counts.append(sum(1 for node in gm.graph.nodes if node.op == "call_function"
                          and getattr(node.target, "__name__", str(node.target)).split(".")[0] not in free))
        return make_boxed_func(gm.forward)

    norms = _norms(n)
    params = [p for m in norms for p in m.parameters()]
    fn = torch.compile(functools.partial(batch_norm_stacked, norms=norms, relu=True), fullgraph=True,
                       backend=aot_autograd(fw_compiler=count, bw_compiler=lambda gm, _: make_boxed_func(gm.forward)))
    x = _stacked_input(norms).requires_grad_()
    fn(x).sum().backward()
    assert all(p.grad is not None for p in params)
    return counts[0]


def test_compiled_bookkeeping_does_not_grow_with_the_number_of_modules():
    torch._dynamo.reset()
    few, many = _graph_nodes(4), _graph_nodes(20)
    assert few == many, f"forward graph nodes: {few} for 4 stacked BatchNorms, {many} for 20"
