"""The CUDA kernels as built into the extension, read back without a GPU (cuobjdump, shipped with Triton): every
kernel x dtype has machine code for sm_80 and sm_90 and PTX for compute_90 (TORCH_CUDA_ARCH_LIST "8.0;9.0+PTX"),
runs its contractions on tensor cores (HMMA for fp16/bf16/tf32, DMMA for fp64 in the SASS; the matching
wmma.mma.sync in the PTX), and uses no local memory (no spills, no stack). Skips when the extension was built
without its CUDA kernels (no nvcc at build time, FORCE_CPU); a build for a TORCH_CUDA_ARCH_LIST of one's own is
checked for the architectures it holds."""
import glob
import os
import re
import subprocess

import pytest
import torch

import fused_mtl_attn

KERNELS = ("reduce_kernel", "apply_kernel", "scalars_kernel", "query_kernel", "fused_query_kernel", "source_kernel")
# mangled template argument -> (dtype, the PTX mma's operand types, the SASS instruction)
DTYPES = {"IN3c104HalfE": ("fp16", "m16n16k16.f32.f32", "HMMA"),
          "IN3c108BFloat16E": ("bf16", "m16n16k16.f32.bf16.bf16.f32", "HMMA"),
          "If": ("fp32", "m16n16k8.f32.tf32.tf32.f32", "HMMA"),
          "Id": ("fp64", "m8n8k4.f64.f64.f64.f64", "DMMA")}
# apply_kernel and source_kernel also come with the sums of partials cached in shared memory (template argument
# CACHED), except for fp64
CACHED = ("apply_kernel", "source_kernel")
ARCHS = ("sm_80", "sm_90")
# setup.py's default when no GPU is visible; a TORCH_CUDA_ARCH_LIST of the user's (the GPU check builds 9.0 only)
# is checked for the architectures it holds
DEFAULT_BUILD = not os.environ.get("TORCH_CUDA_ARCH_LIST")


def _library():
    import fused_mtl_attn.cpp_backend  # noqa: F401  (loads the extension)

    libs = glob.glob(os.path.join(os.path.dirname(fused_mtl_attn.__file__), "_C*.so"))
    if not libs or not torch._C._dispatch_has_kernel_for_dispatch_key("fused_mtl_attn::cross_task", "CUDA"):
        pytest.skip("the extension was built without its CUDA kernels")
    return libs[0]


def _cuobjdump():
    try:
        import triton
    except ImportError:
        pytest.skip("needs cuobjdump (shipped with triton)")
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool):
        pytest.skip("needs cuobjdump (shipped with triton)")
    return tool


def _dump(*args):
    return subprocess.run([_cuobjdump(), *args, _library()], capture_output=True, text=True, check=True).stdout


def _kernel(mangled):
    """(kernel, dtype key, CACHED) of a mangled name of ours, else None"""
    for name in KERNELS:
        at = mangled.find(str(len(name)) + name)
        if at >= 0 and "fused_mtl_attn" in mangled:
            rest = mangled[at + len(str(len(name))) + len(name):]
            for key in DTYPES:
                if rest.startswith(key):
                    return name, key, rest[len(key):].startswith("Lb1")
    return None


def _variants():
    for kernel in KERNELS:
        for key in DTYPES:
            if kernel == "fused_query_kernel" and DTYPES[key][0] == "fp64":
                continue  # the one-pass query side is not built for fp64 (no room for its cache)
            for cached in (False, True) if kernel in CACHED and DTYPES[key][0] != "fp64" else (False,):
                yield kernel, key, cached


@pytest.fixture(scope="module")
def sass():
    """{(arch, kernel, dtype key, cached): SASS text}"""
    out, found, arch, name = _dump("-sass"), {}, None, None
    for line in out.splitlines():
        m = re.match(r"\s*arch = (sm_\d+)", line)
        if m:
            arch = m.group(1)
        m = re.match(r"\s*Function : (\S+)", line)
        if m:
            name = _kernel(m.group(1))
            if name:
                found[(arch, *name)] = []
            continue
        if name and (arch, *name) in found:
            found[(arch, *name)].append(line)
    return {key: "\n".join(lines) for key, lines in found.items()}


def test_every_kernel_is_built_for_sm80_and_sm90_on_tensor_cores(sass):
    built = {arch for arch, *_ in sass}
    archs = ARCHS if DEFAULT_BUILD else sorted(built & set(ARCHS))
    if not archs:
        pytest.skip(f"TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']} builds neither sm_80 nor sm_90")
    for arch in archs:
        for kernel, key, cached in _variants():
            dtype, _, instruction = DTYPES[key]
            code = sass.get((arch, kernel, key, cached))
            assert code is not None, f"{kernel} {dtype} cached={cached}: no {arch} code in the extension"
            assert re.search(rf"\b{instruction}\.", code), \
                f"{kernel} {dtype} cached={cached} on {arch}: no {instruction}"


def test_ptx_for_compute90_uses_wmma_of_the_dtype():
    ptx, entries = _dump("-ptx"), {}
    for m in re.finditer(r"\.entry (\S+)\(", ptx):
        name = _kernel(m.group(1))
        if name:
            end = ptx.find(".entry", m.end())
            entries[name] = ptx[m.end():end if end > 0 else None]
    if not entries and not DEFAULT_BUILD:
        pytest.skip(f"TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']} embeds no PTX")
    for variant in _variants():
        dtype, shape, _ = DTYPES[variant[1]]
        body = entries.get(variant)
        assert body is not None, f"{variant}: no compute_90 PTX in the extension"
        assert re.search(r"wmma\.mma\.sync\.aligned\.\w+\.\w+\." + re.escape(shape), body), \
            f"{variant}: no wmma.mma.sync ...{shape} in its PTX"
        assert not re.search(r"\b(ld|st)\.local", body), f"{variant}: local memory in its PTX"


def test_no_spills_no_stack():
    usage, rows = _dump("-res-usage"), 0
    lines = usage.splitlines()
    for i, line in enumerate(lines):
        f = re.match(r"\s*Function (\S+):", line)
        if f:
            name = _kernel(f.group(1))
            if not name:
                continue
            res = lines[i + 1]
            stack = re.search(r"STACK:(\d+)", res)
            local = re.search(r"LOCAL:(\d+)", res)
            regs = re.search(r"REG:(\d+)", res)
            assert stack and local and regs, f"unreadable resource usage for {name}: {res}"
            assert int(stack.group(1)) == 0 and int(local.group(1)) == 0, f"{name}: {res.strip()}"
            assert int(regs.group(1)) <= 255, f"{name}: {res.strip()}"
            rows += 1
    assert rows >= len(list(_variants())) * (len(ARCHS) if DEFAULT_BUILD else 1), \
        f"resource usage of only {rows} kernels:\n{usage[:2000]}"
