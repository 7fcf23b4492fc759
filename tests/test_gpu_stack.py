"""Tests again under the GPU machine's torch and Triton (torch 2.11 with CUDA 13.0, Triton 3.6: what
benchmarks/gpu_check.sh runs on), so that what breaks there breaks in CI first.

`make setup` installs that stack (requirements-gpu-stack.txt) into <venv>/gpu-stack/site and builds the extension's
CPU kernels against it into <venv>/gpu-stack/ext: the pinned build's binary does not load under another torch. A
subprocess runs the tests below in a copy of the repository that holds that build, with the stack first on the path.
Each file is there for what broke under this stack and passed on the pinned one:
- test_triton.py, test_triton_compile.py (interpreter; AOT compile for sm_90 with 3.6's compiler): the fp64 tl.dot
  that did not compile, the interpreter that failed every launch;
- test_compile.py (the fused network under torch.compile): 2.11's Dynamo could not sort the deep supervision's
  (scale, maps) pairs, and gave a zero gradient to an autograd.Function output that `.contiguous()` had handed back
  as itself (the aggregation of the depth head, one channel);
- test_fused_network.py's tests of the GPU's choices (the fused path against the reference, float64, the attention
  through each GPU backend's kernels on the CPU), test_cpp_ops.py (the C++ ops, opcheck among them: how torch
  registers and checks custom ops changes between releases).
"""
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STACK = os.path.join(sys.prefix, "gpu-stack")
SITE, EXT = os.path.join(STACK, "site"), os.path.join(STACK, "ext", "fused_mtl_attn")
# `make setup`'s stamp in this venv: once it ran, the stack belongs here, so its absence is a failure
SETUP_STAMP = os.path.join(sys.prefix, ".installed")
# in groups, each its own test, so that workers share them; of the network's tests, those of the GPU's choices (the
# CPU-tuned ones are for the pinned torch)
TESTS = {"triton": ["tests/test_triton.py", "tests/test_triton_compile.py"],
         "compile": ["tests/test_compile.py"],
         "network": ["tests/test_fused_network.py", "-k", "gpus_choices or rehearsed_on_cpu"],
         "ops": ["tests/test_cpp_ops.py"]}
# what the copy leaves out: this venv, git's store, builds and outputs (.gitignore's entries)
NOT_COPIED = (".venv", ".git", "build", "dist", "*.egg-info", "__pycache__", "*.so", ".pytest_cache", "runs", ".whl")


def _pinned() -> dict:
    with open(os.path.join(REPO, "requirements-gpu-stack.txt")) as f:
        return dict(re.findall(r"^(torch|torchvision|triton)==(\S+)$", f.read(), re.M))


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine the tests run on its own stack")
@pytest.mark.parametrize("group", TESTS)
def test_version_sensitive_tests_pass_under_the_gpu_machines_stack(group, tmp_path):
    if not os.path.exists(os.path.join(STACK, ".built")):
        if os.path.exists(SETUP_STAMP):
            pytest.fail(f"{STACK} is missing or unbuilt although `make setup` ran for this venv: rerun `make setup`")
        pytest.skip(f"{STACK} is missing: `make setup` installs it")
    copy = tmp_path / "repo"
    shutil.copytree(REPO, copy, ignore=shutil.ignore_patterns(*NOT_COPIED))
    built = [f for f in os.listdir(EXT) if f.startswith("_C.") and f.endswith(".so")]
    assert len(built) == 1, f"{EXT} holds {built}, not one build of the extension"
    shutil.copy2(os.path.join(EXT, built[0]), copy / "fused_mtl_attn")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [SITE, str(copy), env.get("PYTHONPATH")]))
    env["FUSED_MTL_ATTN_AOT_ARCHS"] = "90"  # the GPU machines' arch (H100, H200): 3.6 compiles for no other

    found = subprocess.run(
        [sys.executable, "-c", "import torch, torchvision, triton, fused_mtl_attn as f; print(torch.__version__, "
         "torchvision.__version__, triton.__version__, f.available_backends()['cpu'][0], torch.__file__)"],
        env=env, cwd=copy, capture_output=True, text=True, timeout=300)
    assert found.returncode == 0, found.stderr[-4000:]
    *versions, cpu_kernels, path = found.stdout.split()
    ran = dict(zip(("torch", "torchvision", "triton"), (v.split("+")[0] for v in versions)))
    assert ran == _pinned() and path.startswith(SITE), f"the subprocess runs {ran} with torch from {path}, not " \
        f"{_pinned()} from {SITE}"
    assert cpu_kernels == "True", "the extension built against the GPU machine's torch does not load"

    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *TESTS[group]],
                         env=env, cwd=copy, capture_output=True, text=True, timeout=2400)
    assert run.returncode == 0, f"{ran}:\n{run.stdout[-8000:]}\n{run.stderr[-2000:]}"
    # skipped tests check nothing: only the GPU-only ones may skip
    skips = [line for line in run.stdout.splitlines() if line.startswith("SKIPPED") and "needs a CUDA GPU" not in line]
    assert " passed" in run.stdout.splitlines()[-1] and not skips, run.stdout[-4000:]
