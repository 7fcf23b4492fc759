"""The CUDA kernels never synchronise the host: forward and backward of both ops run under
torch.cuda.set_sync_debug_mode("error"), are captured in a CUDA graph and replayed with new values, and handle more
segments than one launch's window (csrc/cuda/attention_cuda.cu passes the segments by value, WINDOW at a time).
GPU only; every test skips without a GPU and the extension's CUDA kernels."""
import pytest
import torch

import fused_mtl_attn
from fused_mtl_attn import cross_scale_attention, cross_task_attention, reference

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available() or not fused_mtl_attn.available_backends()["cuda"][0],
                       reason="needs a CUDA GPU and the extension's CUDA kernels"),
]

WINDOW = 32  # segments per launch in attention_cuda.cu


def _segments(n, seed=0):
    """offsets of n segments: empty ones, lengths at and around the tile (64) and least piece (256) sizes, several
    pieces."""
    lengths = [0, 1, 63, 64, 65, 255, 256, 257, 2048, 2500, 7]
    g = torch.Generator().manual_seed(seed)
    offsets = [0]
    for i in torch.randint(len(lengths), (n,), generator=g).tolist():
        offsets.append(offsets[-1] + lengths[i])
    return offsets


# (name, fn(q, k, v), input shapes)
def _cases():
    many = _segments(2 * WINDOW + 6)
    return [
        ("cross_task", lambda q, k, v: cross_task_attention(q, k, v, backend="cuda"),
         [(2, 3, 8, 2500), (2, 3, 8, 2500), (2, 3, 6, 2500)]),
        ("cross_scale", lambda q, k, v: cross_scale_attention(q, k, v, [0, 1100, 1100, 2200], backend="cuda"),
         [(2, 8, 300), (2, 8, 2200), (2, 6, 2200)]),
        ("cross_scale_many", lambda q, k, v: cross_scale_attention(q, k, v, many, backend="cuda"),
         [(2, 8, 40), (2, 8, many[-1]), (2, 6, many[-1])]),
    ]


CASES = _cases()
IDS = [name for name, _, _ in CASES]


def _inputs(shapes, seed, dtype=torch.float32, requires_grad=True):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(shapes[0], generator=g, dtype=torch.float64) * 2
    k = torch.randn(shapes[1], generator=g, dtype=torch.float64) * 2
    v = torch.rand(shapes[2], generator=g, dtype=torch.float64)
    return [t.to(device="cuda", dtype=dtype).requires_grad_(requires_grad) for t in (q, k, v)]


def _forward_backward(fn, inputs, grad_out):
    out = fn(*inputs)
    return (out, *torch.autograd.grad(out, inputs, grad_out))


@pytest.mark.parametrize("name,fn,shapes", CASES, ids=IDS)
def test_forward_and_backward_do_not_synchronise(name, fn, shapes):
    inputs = _inputs(shapes, seed=0)
    grad_out = torch.randn_like(fn(*inputs))  # also loads the extension and initialises CUDA before the check
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = _forward_backward(fn, inputs, grad_out)
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    want = _forward_backward(fn, inputs, grad_out)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


def _capture(step):
    """A CUDA graph of step(), after a warm-up on a side stream (as torch.cuda.graphs' documentation describes)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = step()
    return graph, outputs


@pytest.mark.parametrize("backward", [False, True], ids=["forward", "forward_backward"])
@pytest.mark.parametrize("name,fn,shapes", CASES, ids=IDS)
def test_cuda_graph_replay_with_new_values_matches_eager(name, fn, shapes, backward):
    """The offsets are part of the graph (kernel arguments); q, k, v and the output gradient are refilled in place."""
    static = _inputs(shapes, seed=0, requires_grad=backward)
    static_grad = torch.randn_like(fn(*static))
    if backward:
        graph, outputs = _capture(lambda: _forward_backward(fn, static, static_grad))
    else:
        graph, outputs = _capture(lambda: (fn(*static),))
    for seed in (1, 2):
        fresh = _inputs(shapes, seed=seed, requires_grad=backward)
        fresh_grad = torch.randn(static_grad.shape, generator=torch.Generator().manual_seed(seed)).cuda()
        with torch.no_grad():
            for s, f in zip(static + [static_grad], fresh + [fresh_grad]):
                s.copy_(f)
        graph.replay()
        want = _forward_backward(fn, fresh, fresh_grad) if backward else (fn(*fresh),)
        for label, a, b in zip(("out", "dq", "dk", "dv"), outputs, want):
            assert torch.equal(a, b), f"{label} (seed {seed}): max diff {float((a - b).abs().max()):.3g}"


@pytest.mark.parametrize("n_segments", [WINDOW - 1, WINDOW, WINDOW + 1, 2 * WINDOW + 6])
def test_many_segments_match_eager(n_segments):
    """More segments than one launch's window, in float64: out and the gradients of q, k, v against eager."""
    offsets = _segments(n_segments, seed=n_segments)
    shapes = [(2, 5, 70), (2, 5, offsets[-1]), (2, 4, offsets[-1])]
    inputs = _inputs(shapes, seed=3, dtype=torch.float64)
    grad_out = torch.randn(2, n_segments, 4, 70, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    grad_out = grad_out.cuda()
    got = _forward_backward(lambda q, k, v: cross_scale_attention(q, k, v, offsets, backend="cuda"), inputs, grad_out)
    want = _forward_backward(lambda q, k, v: reference.cross_scale_attention(q, k, v, offsets), inputs, grad_out)
    for label, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=lambda m: f"{label}: {m}")


def test_segment_result_does_not_depend_on_its_window():
    """Each segment's output and source gradients are bitwise equal when the segments come in reverse order, so that
    most fall into another launch window: a segment's pieces start at its own first position whichever window it
    falls in. (Against a call with the segment alone they may differ: pieces are sized from the whole call's shapes.)"""
    check_window_independence(lambda offsets: lambda *t: cross_scale_attention(*t, offsets, backend="cuda"), "cuda")


def check_window_independence(op, device, n_segments=2 * WINDOW + 6):
    """op(offsets)(q, k, v) -> out; shared with tests/test_cuda_emulated.py (the same kernels, emulated on a CPU)."""
    offsets = _segments(n_segments, seed=7)
    lengths = [hi - lo for lo, hi in zip(offsets[:-1], offsets[1:])]
    reverse = [0]
    for n in reversed(lengths):
        reverse.append(reverse[-1] + n)
    J = len(lengths)
    g = torch.Generator().manual_seed(5)
    q = (torch.randn(1, 6, 50, generator=g) * 2).to(device).requires_grad_()
    k, v = [(torch.randn(1, c, offsets[-1], generator=g) * 2).to(device).requires_grad_() for c in (6, 5)]
    grad_out = torch.randn(1, J, 5, 50, generator=g).to(device)
    out, _, dk, dv = _forward_backward(op(offsets), [q, k, v], grad_out)
    # the same segments in reverse order: segment j becomes segment J - 1 - j
    kr, vr = [torch.cat([t.detach()[..., lo:hi] for lo, hi in reversed(list(zip(offsets[:-1], offsets[1:])))], -1)
              .requires_grad_() for t in (k, v)]
    out_r, _, dk_r, dv_r = _forward_backward(op(reverse), [q, kr, vr], grad_out.flip(1))
    for j, (lo, hi) in enumerate(zip(offsets[:-1], offsets[1:])):
        r = J - 1 - j
        assert torch.equal(out[:, j], out_r[:, r]), f"segment {j} (length {hi - lo}): out differs"
        lo_r, hi_r = reverse[r], reverse[r + 1]
        assert torch.equal(dk[..., lo:hi], dk_r[..., lo_r:hi_r]), f"segment {j}: dk differs"
        assert torch.equal(dv[..., lo:hi], dv_r[..., lo_r:hi_r]), f"segment {j}: dv differs"
