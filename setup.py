"""Build of fused_mtl_attn. Install with `pip install --no-build-isolation -e .` after requirements.txt.

The C++ extension `fused_mtl_attn._C` is always built with the CPU kernels; the CUDA kernels are added when torch
is a CUDA build and nvcc is found (CUDA_HOME, else /usr/local/cuda). FORCE_CUDA=1 / FORCE_CPU=1 override the choice.
Without a visible GPU the CUDA architectures default to TORCH_CUDA_ARCH_LIST="8.0;9.0+PTX".
The CPU kernels are compiled for several instruction sets in one portable build (csrc/cpu/kernels_<isa>.cpp: the
x86-64 baseline, AVX2+FMA, AVX-512) and pick one when the library loads. FUSED_MTL_ATTN_CPU_ARCH (default empty)
adds -march=<value> to the whole build, e.g. "native" for a build that runs only on machines like this one.
"""
import glob
import os
import platform
import re

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _version():
    """The one version source: fused_mtl_attn.__version__ (read, not imported: the build may run without torch)."""
    with open(os.path.join(HERE, "fused_mtl_attn", "__init__.py")) as f:
        return re.search(r'^__version__ = "([^"]+)"', f.read(), re.M).group(1)


def _flag(name):
    return os.environ.get(name, "0") not in ("", "0", "false", "False")


def _cuda_home():
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if not home and os.path.exists("/usr/local/cuda/bin/nvcc"):
        home = "/usr/local/cuda"  # the nvcc on PATH may be a wrapper script; prefer the toolkit itself
    return home if home and os.path.exists(os.path.join(home, "bin", "nvcc")) else None


def _extensions():
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:  # metadata-only runs (no torch yet): the package still installs, without kernels
        return [], {}
    cuda_home = _cuda_home()
    with_cuda = not _flag("FORCE_CPU") and (_flag("FORCE_CUDA") or (torch.version.cuda is not None and cuda_home))
    # attention_cuda_emulated.cpp: the CUDA kernels compiled for the host, run by the tests on any machine
    sources = [os.path.join("csrc", "attention.cpp")] + sorted(glob.glob(os.path.join("csrc", "cpu", "*.cpp"))) + [
        os.path.join("csrc", "cuda", "attention_cuda_emulated.cpp")]
    cxx = ["-O3"]  # the C++ standard comes from torch (C++17 or C++20 by version)
    link = []
    if platform.system() == "Linux":
        # at::parallel_for is OpenMP written inline in ATen's headers: without -fopenmp it runs on one thread. The
        # library then needs libgomp.so.1, which the process already has from torch.
        cxx.append("-fopenmp")
        link.append("-fopenmp")
    arch = os.environ.get("FUSED_MTL_ATTN_CPU_ARCH", "")
    macros = []
    if arch and platform.machine() in ("x86_64", "AMD64"):
        cxx.append(f"-march={arch}")
        macros.append(("FMA_CPU_MARCH", "1"))  # reported by the module: the portable-build tests skip such a build
    include_dirs = [os.path.join(HERE, "csrc")]
    if not with_cuda:
        ext = cpp_extension.CppExtension("fused_mtl_attn._C", sources, include_dirs=include_dirs, define_macros=macros,
                                         extra_compile_args={"cxx": cxx}, extra_link_args=link)
        return [ext], {"build_ext": cpp_extension.BuildExtension}
    if cuda_home:
        os.environ["CUDA_HOME"] = cuda_home
        cpp_extension.CUDA_HOME = cuda_home
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0+PTX"
    # ATen/cuda/CUDAContext.h needs the cuBLAS/cuSPARSE headers that torch's nvidia wheels ship
    for sub in ("cu13", "cu12"):
        for base in glob.glob(os.path.join(os.path.dirname(torch.__file__), "..", "nvidia", sub, "include")):
            include_dirs.append(os.path.abspath(base))
    sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    ext = cpp_extension.CUDAExtension(
        "fused_mtl_attn._C", sources, include_dirs=include_dirs, define_macros=macros + [("WITH_CUDA", None)],
        extra_compile_args={"cxx": cxx, "nvcc": ["-O3"]}, extra_link_args=link,
    )
    return [ext], {"build_ext": cpp_extension.BuildExtension}


ext_modules, cmdclass = _extensions()

setup(
    name="fused_mtl_attn",
    version=_version(),
    description="Fused Triton and C++/CUDA kernels for the cross-task and cross-scale attention of SCA-MTL",
    # only the kernels are installed: the network (model/) and the benchmarks run from the repository, as in the
    # MTI-Net family of code bases, so no generic top-level name such as `model` lands in site-packages
    packages=find_packages(include=["fused_mtl_attn", "fused_mtl_attn.*"]),
    python_requires=">=3.10",
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
