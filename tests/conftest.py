"""Shared test setup: Triton kernels run through the interpreter where there is no GPU, and `gpu` tests skip.

TRITON_INTERPRET must be set before any module defining @triton.jit kernels is imported (triton decides at
decoration time), so it is set here, at conftest import, and only without a CUDA GPU: on a GPU machine the
same tests run the compiled kernels for real.
"""
import os

import pytest
import torch

HAS_GPU = torch.cuda.is_available()
if not HAS_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")

# `make test` runs the suite on pytest-xdist workers, one per logical CPU: each worker gets its share of torch's
# intra-op threads (tests that need a thread count set their own), so the workers do not oversubscribe the cores
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    torch.set_num_threads(max(1, torch.get_num_threads() // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))


def pytest_sessionstart(session):
    """FUSED_MTL_ATTN_REQUIRE_GPU=1 (benchmarks/gpu_check.sh): no GPU, or a GPU backend that cannot run, is an
    error, not a run in which every GPU test quietly skips."""
    if os.environ.get("FUSED_MTL_ATTN_REQUIRE_GPU", "0") in ("", "0"):
        return
    import fused_mtl_attn

    missing = {name: reasons for name, (ok, reasons) in fused_mtl_attn.available_backends().items()
               if name in ("cuda", "triton") and not ok}
    if not HAS_GPU or missing:
        raise pytest.UsageError(f"FUSED_MTL_ATTN_REQUIRE_GPU is set but GPU={HAS_GPU}, unavailable: {missing}")


# the files of the longest tests (minutes each: subprocess suites, Dynamo traces) first: `make test` hands tests
# out one at a time (--maxschedchunk 1), so the workers share these and even out behind them, instead of one worker
# finishing them alone at the end
LONGEST_FIRST = ("tests/test_gpu_stack.py", "tests/test_compile.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(rank)))  # stable: the rest keep their order
    if HAS_GPU:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
