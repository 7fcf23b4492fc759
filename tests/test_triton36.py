"""The Triton tests again under Triton 3.6, the GPU machine's release, so that what breaks there breaks in CI first.

`make setup` installs that Triton alone (requirements-triton36.txt) into <venv>/triton36; a subprocess puts it first
on the path, on the pinned torch, and runs the kernel tests of test_triton.py (interpreter) and
test_triton_compile.py (AOT compile for sm_90, the GPU machines' arch, with 3.6's compiler, the one they run). That
pairing reproduces what the real stack (torch 2.11 + Triton 3.6) hit: the fp64 tl.dot that did not compile and the
interpreter that failed every launch.
"""
import os
import re
import subprocess
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OVERLAY = os.path.join(sys.prefix, "triton36")
# `make setup`'s stamp in this venv: once it ran, the overlay belongs here, so its absence is a failure
SETUP_STAMP = os.path.join(sys.prefix, ".installed")
# the tests of torch's side (opcheck, torch.compile, the availability report, the eager float16 baseline): the
# pinned torch against Triton 3.6 is a pairing no machine runs, and they take a third of test_triton.py's time
TORCH_SIDE = "not (opcheck or torch_compile or unavailable or eager_float16)"


def _pinned_version() -> str:
    with open(os.path.join(REPO, "requirements-triton36.txt")) as f:
        return re.search(r"^triton==(\S+)$", f.read(), re.M).group(1)


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine the Triton tests run on its own stack")
def test_triton_tests_pass_under_the_gpu_machines_triton():
    if not os.path.isdir(OVERLAY):
        if os.path.exists(SETUP_STAMP):
            pytest.fail(f"{OVERLAY} is missing although `make setup` ran for this venv: rerun `make setup`")
        pytest.skip(f"{OVERLAY} is missing: `make setup` installs it")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [OVERLAY, REPO, env.get("PYTHONPATH")]))
    env["FUSED_MTL_ATTN_AOT_ARCHS"] = "90"  # the GPU machines' arch (H100, H200): 3.6 compiles for no other

    found = subprocess.run([sys.executable, "-c", "import triton; print(triton.__version__, triton.__file__)"],
                           env=env, capture_output=True, text=True, timeout=120)
    assert found.returncode == 0, found.stderr[-4000:]
    version, path = found.stdout.split()
    assert version == _pinned_version() and path.startswith(OVERLAY), f"the subprocess imports triton {version} " \
        f"from {path}, not {_pinned_version()} from {OVERLAY}"

    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", TORCH_SIDE,
                          "tests/test_triton.py", "tests/test_triton_compile.py"],
                         env=env, cwd=REPO, capture_output=True, text=True, timeout=1200)
    assert run.returncode == 0, f"Triton {version}:\n{run.stdout[-8000:]}\n{run.stderr[-2000:]}"
    # skipped tests check nothing: only the GPU-only ones may skip
    skips = [line for line in run.stdout.splitlines() if line.startswith("SKIPPED") and "needs a CUDA GPU" not in line]
    assert " passed" in run.stdout.splitlines()[-1] and not skips, run.stdout[-4000:]
