"""The CUDA kernels (csrc/cuda/attention_cuda.cu) run on the CPU through csrc/cuda/emulation.h: every block's
threads as OS threads with a real barrier for __syncthreads, shared memory shared by the block, wmma fragments as
whole tiles computed by lane 0 of each warp. So their indexing, bounds, tile layouts, pieces, windows of segments,
barriers and launch counts are checked against the eager reference here, without a GPU;
tests/test_cpp_ops.py checks the same kernels on a GPU where one is visible. The ops are those of
`torch.ops.fused_mtl_attn_emulated` (the schemas of fused_mtl_attn's), called directly: forward, then backward with
the forward's context, as the autograd formula of the cuda backend does."""
import pytest
import torch

import fused_mtl_attn
from fused_mtl_attn import reference

from .test_cpp_ops import CROSS_SCALE, CROSS_TASK, _check_against, _cross_scale_inputs, _cross_task_inputs, \
    _error, _outputs_and_grads
from .test_cuda_sync import check_window_independence

pytestmark = pytest.mark.skipif(not fused_mtl_attn.available_backends()["cpu"][0], reason="extension not built")


def _ops():
    import fused_mtl_attn.cpp_backend  # noqa: F401  (loads the extension, which registers the ops)

    return torch.ops.fused_mtl_attn_emulated


class _Attention(torch.autograd.Function):
    """The emulated CUDA op with the cuda backend's autograd: save q, k, v and the context, backward from them."""

    @staticmethod
    def forward(ctx, q, k, v, offsets):
        out, context = (_ops().cross_task(q, k, v) if offsets is None else _ops().cross_scale(q, k, v, offsets))
        ctx.save_for_backward(q, k, v, context)
        ctx.offsets = offsets
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, context = ctx.saved_tensors
        if ctx.offsets is None:
            return (*_ops().cross_task_backward(grad, q, k, v, context), None)
        return (*_ops().cross_scale_backward(grad, q, k, v, context, ctx.offsets), None)


def _task(q, k, v):
    return _Attention.apply(q, k, v, None)


def _scale(offsets):
    return lambda q, k, v: _Attention.apply(q, k, v, list(offsets))


# the sweep of test_cpp_ops (N = 1, odd N, d != m, several 1024-position chunks, logits beyond +-20, an empty
# segment, J = 0) with the tolerances of the contract
@pytest.mark.parametrize("case", range(len(CROSS_TASK)))
def test_cross_task_matches_reference(case):
    b, p, d, m, n, scale = CROSS_TASK[case]
    inputs = _cross_task_inputs(b, p, d, m, n, scale, seed=case)
    want = _outputs_and_grads(reference.cross_task_attention, [t.double() for t in inputs])
    _check_against(_outputs_and_grads(_task, inputs), want, (1e-5, 1e-4, 1e-4, 1e-4), f"cross_task {CROSS_TASK[case]}")


@pytest.mark.parametrize("case", range(len(CROSS_SCALE)))
def test_cross_scale_matches_reference(case):
    b, d, m, nq, offsets = CROSS_SCALE[case]
    inputs = _cross_scale_inputs(b, d, m, nq, offsets, seed=case)
    want = _outputs_and_grads(lambda q, k, v: reference.cross_scale_attention(q, k, v, offsets),
                              [t.double() for t in inputs])
    _check_against(_outputs_and_grads(_scale(offsets), inputs), want, (1e-5, 1e-4, 1e-4, 1e-4),
                   f"cross_scale {CROSS_SCALE[case]}")


def test_float64_to_rounding_and_segments_beyond_one_window():
    # 40 segments: more than one launch's window of 32 (attention_cuda.cu passes the segments by value, WINDOW at a
    # time), some empty; float64, so only the order of the sums differs from eager
    sizes = [(i * 7) % 5 for i in range(40)]
    offsets = [0]
    for s in sizes:
        offsets.append(offsets[-1] + s)
    inputs = _cross_scale_inputs(2, 5, 3, 9, offsets, dtype=torch.float64)
    want = _outputs_and_grads(lambda q, k, v: reference.cross_scale_attention(q, k, v, offsets), inputs)
    _check_against(_outputs_and_grads(_scale(offsets), inputs), want, (1e-12,) * 4, "float64, 40 segments")


def test_channels_past_one_tile():
    # d = 70 and m = 130 take two and three 64-row tiles: the reduction's row and column tiles, apply's and
    # scalars_kernel's 63-row blocks of S (m = 130: 3 blocks, the denominator in each), dq's channel blocks, and
    # source_kernel's dv and dk row blocks
    inputs = _cross_task_inputs(2, 1, 70, 130, 90, 3.0, dtype=torch.float64)
    want = _outputs_and_grads(reference.cross_task_attention, inputs)
    _check_against(_outputs_and_grads(_task, inputs), want, (1e-12,) * 4, "float64 cross_task, several tiles")
    # float32 takes the same path (the partials summed per tile, no cache: d and m + 1 exceed one tile)
    inputs = [t.float() for t in inputs]
    _check_against(_outputs_and_grads(_task, inputs), want, (1e-5, 1e-4, 1e-4, 1e-4),
                   "float32 cross_task, several tiles")


@pytest.mark.parametrize("offsets", [[0, 40, 41, 90, 150], [0, 7, 30, 30, 51, 70, 71]], ids=["J=4", "J=6"])
def test_gathered_sources_one_pass_or_three_launches(offsets):
    # 4 segments: fused_query_kernel keeps four [dS; dz] tiles in shared memory over pieces of several position tiles
    # (nq = 2100); 6 do not fit 99 KiB and take scalars + query + source
    inputs = _cross_scale_inputs(2, 30, 33, 2100, offsets, seed=len(offsets))
    want = _outputs_and_grads(lambda q, k, v: reference.cross_scale_attention(q, k, v, offsets),
                              [t.double() for t in inputs])
    _check_against(_outputs_and_grads(_scale(offsets), inputs), want, (1e-5, 1e-4, 1e-4, 1e-4),
                   f"cross_scale J={len(offsets) - 1}")


def test_segment_result_does_not_depend_on_its_window():
    # the check of tests/test_cuda_sync.py (there 70 segments; here 38, two launch windows), on the emulated kernels
    check_window_independence(_scale, "cpu", n_segments=38)


def _check_low_precision(fn, ref, inputs, what):
    truth = _outputs_and_grads(ref, [t.double() for t in inputs])
    eager = _outputs_and_grads(ref, inputs)
    got = _outputs_and_grads(fn, inputs)
    for name, a, e, t in zip(("out", "dq", "dk", "dv"), got, eager, truth):
        (err, where), (eager_err, _) = _error(a, t), _error(e, t)
        assert err <= 2 * eager_err + 1e-2, f"{what} {name}: {err:.3g} vs eager {eager_err:.3g}; {where}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("op", ["cross_task", "cross_scale", "cross_scale_6"])
def test_low_precision_within_twice_eager(dtype, op):
    # cross_task and cross_scale (3 segments): the one-pass query side (fused_query_kernel); 6 segments: the three
    # launches (their [dS; dz] tiles exceed the shared memory)
    if op == "cross_task":
        _check_low_precision(_task, reference.cross_task_attention, _cross_task_inputs(2, 2, 24, 20, 100, 2.0, dtype),
                             f"{op} {dtype}")
    else:
        offsets = [0, 60, 61, 130] if op == "cross_scale" else [0, 60, 61, 70, 90, 90, 130]
        _check_low_precision(_scale(offsets), lambda q, k, v: reference.cross_scale_attention(q, k, v, offsets),
                             _cross_scale_inputs(2, 24, 20, 100, offsets, dtype), f"{op} {dtype}")


def test_emulated_ops_check_their_inputs():
    q, k, v = _cross_scale_inputs(1, 3, 2, 4, [0, 5])
    with pytest.raises(RuntimeError, match="offsets must end at the gathered length"):
        _ops().cross_scale(q, k, v, [0, 4])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_bitwise_equal_across_runs(dtype):
    # the emulated threads interleave differently on every run: a result that depended on it (a race across a
    # barrier, an unordered sum) would differ. 3 segments and stacked pairs: the one-pass query side; 6 segments: the
    # three launches
    offsets, six = [0, 700, 700, 1500], [0, 100, 300, 300, 301, 500, 620]
    for fn, inputs in ((_scale(offsets), _cross_scale_inputs(2, 20, 17, 300, offsets, dtype, seed=3)),
                       (_scale(six), _cross_scale_inputs(1, 20, 17, 200, six, dtype, seed=3)),
                       (_task, _cross_task_inputs(1, 2, 20, 17, 700, 2.0, dtype, seed=3))):
        first, second = (_outputs_and_grads(fn, inputs) for _ in range(2))
        for name, a, b in zip(("out", "dq", "dk", "dv"), first, second):
            assert torch.equal(a, b), f"{dtype} {name} differs between two runs"


@pytest.mark.parametrize("op", ["cross_task", "cross_scale", "cross_task_bf16"])
def test_spans_of_tiles_per_block(op):
    # long position axes with few groups: apply_kernel and source_kernel blocks walk spans of several 64-position
    # tiles with the cached sums of the partials (a segment of 1 position among them), and segments have many pieces;
    # cross_task: fused_query_kernel's pieces of several tiles, its dS accumulators kept across them
    if op == "cross_task":
        inputs = _cross_task_inputs(1, 1, 5, 6, 20000, 2.0, seed=5)
        fn, ref = _task, reference.cross_task_attention
    else:
        offsets = [0, 9000, 9001, 20000]
        inputs = _cross_scale_inputs(1, 5, 6, 17000, offsets, seed=5)
        fn, ref = _scale(offsets), lambda q, k, v: reference.cross_scale_attention(q, k, v, offsets)
    if op == "cross_task_bf16":  # as fp32 "cross_task": fused_query_kernel's pieces of several tiles
        inputs = [t.bfloat16() for t in inputs]
        _check_low_precision(fn, ref, inputs, op)
        return
    want = _outputs_and_grads(ref, [t.double() for t in inputs])
    _check_against(_outputs_and_grads(fn, inputs), want, (1e-5, 1e-4, 1e-4, 1e-4), f"{op}, long positions")


def _launches(fn):
    before = _ops().launches()
    fn()
    return _ops().launches() - before


@pytest.mark.parametrize("op", ["cross_task", "cross_task_bf16", "cross_task_fp64", "cross_task_wide", "cross_scale",
                                "cross_scale_5", "cross_scale_40"])
def test_two_launches_forward_three_backward(op):
    # all pairs, all sources of a call (ragged) in one launch each: forward = reduce + apply; backward =
    # fused_query + source where [m+1, d] fits one tile (fp16/bf16/fp32) and the J [dS; dz] tiles fit 99 KiB of
    # shared memory (J <= 4), else scalars + query (dS partials and dq) + source (fp64, wider channels, 5 or more
    # sources); beyond WINDOW (32) segments, two launches more per window
    if op.startswith("cross_task"):
        dtype = {"cross_task_bf16": torch.bfloat16, "cross_task_fp64": torch.float64}.get(op, torch.float32)
        d = 65 if op == "cross_task_wide" else 5
        q, k, v = _cross_task_inputs(2, 3, d, 4, 300, 1.0, dtype)
        forward = lambda: _ops().cross_task(q, k, v)  # noqa: E731
        out, context = forward()
        backward = lambda: _ops().cross_task_backward(torch.ones_like(out), q, k, v, context)  # noqa: E731
        windows, one_pass = 1, op in ("cross_task", "cross_task_bf16")
    else:
        offsets = {"cross_scale": [0, 300, 301, 700], "cross_scale_5": [0, 9, 20, 20, 31, 50],
                   "cross_scale_40": [i * 3 for i in range(41)]}[op]
        q, k, v = _cross_scale_inputs(2, 5, 4, 50, offsets)
        forward = lambda: _ops().cross_scale(q, k, v, offsets)  # noqa: E731
        out, context = forward()
        backward = lambda: _ops().cross_scale_backward(torch.ones_like(out), q, k, v, context, offsets)  # noqa: E731
        windows, one_pass = (2 if op == "cross_scale_40" else 1), op == "cross_scale"
    assert _launches(forward) == 2 * windows
    assert _launches(backward) == (2 if one_pass else 1 + 2 * windows)


def test_launch_tuning_changes_the_grid_not_the_result():
    # benchmarks/tune_kernels.py times the kernels under other grid shapes: more blocks and pieces per segment, and
    # the query side in three launches where one pass applies; each must compute the same function
    from fused_mtl_attn.cpp_backend import cuda_launch_tuning

    offsets = [0, 3000, 3001, 5000]
    inputs = _cross_scale_inputs(1, 6, 5, 4000, offsets, seed=11)
    fn = _scale(offsets)
    want = _outputs_and_grads(lambda q, k, v: reference.cross_scale_attention(q, k, v, offsets),
                              [t.double() for t in inputs])
    default = _outputs_and_grads(fn, inputs)
    q, k, v = inputs
    out, context = _ops().cross_scale(q, k, v, offsets)
    backward = lambda: _ops().cross_scale_backward(torch.ones_like(out), q, k, v, context, offsets)  # noqa: E731
    assert _launches(backward) == 2
    for tuning, launches in (({"target_blocks": 4096, "max_splits": 64}, 2), ({"one_pass_query": False}, 3),
                             ({"target_blocks": 1, "max_splits": 1, "one_pass_query": False}, 3)):
        with cuda_launch_tuning(emulated=True, **tuning):
            got = _outputs_and_grads(fn, inputs)
            assert _launches(backward) == launches, tuning
        _check_against(got, want, (1e-5, 1e-4, 1e-4, 1e-4), f"tuned {tuning}")
        if "max_splits" in tuning:  # other pieces, another order of the sums (the three launches cut the same
            # pieces here as the one pass, and sum in the same order: equal results, told apart by the launches)
            assert any(not torch.equal(a, b) for a, b in zip(got[1:], default[1:])), f"{tuning} changed nothing"
    assert _ops().launch_tuning(-1, -1, -1) == [512, 16, 1]  # restored after each block


@pytest.mark.parametrize("bad", [{"target_blocks": 0}, {"max_splits": -3}, {"target_blocks": True},
                                 {"max_splits": 2.5}, {"one_pass_query": 1}])
def test_launch_tuning_rejects_bad_values(bad):
    from fused_mtl_attn.cpp_backend import cuda_launch_tuning

    with pytest.raises(ValueError, match=next(iter(bad))):
        with cuda_launch_tuning(emulated=True, **bad):
            pass
    with pytest.raises(RuntimeError, match="one_pass_query must be 0 or 1"):
        _ops().launch_tuning(-1, -1, 2)
    assert _ops().launch_tuning(-1, -1, -1) == [512, 16, 1]
