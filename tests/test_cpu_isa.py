"""The CPU kernels' instruction sets: which are compiled, which this CPU supports (checked against the kernel's own
list of CPU flags), the choice at load time and by FUSED_MTL_ATTN_CPU_ISA, clear errors for a set that cannot run,
and a portable build: the disassembly of the library shows every function outside the AVX2/AVX-512 kernels free
of VEX/EVEX instructions, and the AVX2 kernels free of AVX-512 ones. (Agreement of every supported set with the
eager oracle is in test_cpp_ops.py.)"""
import os
import platform
import re
import shutil
import subprocess
import sys

import pytest

import fused_mtl_attn

if not fused_mtl_attn.available_backends()["cpu"][0] and not os.environ.get("FUSED_MTL_ATTN_CPU_ISA"):
    pytest.skip("the C++ extension is not built", allow_module_level=True)

from fused_mtl_attn import cpp_backend  # noqa: E402
from fused_mtl_attn.cpuinfo import first_processor  # noqa: E402

X86 = platform.machine().lower() in ("x86_64", "amd64")
ISA_VARIABLE = "FUSED_MTL_ATTN_CPU_ISA"


def _cpu_flags() -> set:
    return set(first_processor().get("flags", "").split())


def test_compiled_sets():
    assert cpp_backend.compiled_cpu_isas() == (["avx512", "avx2", "baseline"] if X86 else ["baseline"])


def test_default_is_the_best_supported_set():
    supported = cpp_backend.supported_cpu_isas()
    assert supported[-1] == "baseline"
    assert supported == [s for s in cpp_backend.compiled_cpu_isas() if s in supported]  # best first
    assert fused_mtl_attn.cpu_isa() == (os.environ.get(ISA_VARIABLE) or supported[0])


@pytest.mark.skipif(not (X86 and os.path.exists("/proc/cpuinfo")), reason="reads the x86 flags of /proc/cpuinfo")
def test_supported_sets_follow_the_cpu_flags():
    flags = _cpu_flags()
    want = ["baseline"]
    if {"avx2", "fma"} <= flags:
        want.insert(0, "avx2")
        if {"avx512f", "avx512bw", "avx512dq", "avx512vl"} <= flags:
            want.insert(0, "avx512")
    assert cpp_backend.supported_cpu_isas() == want


def test_use_cpu_isa_switches_and_restores():
    before = fused_mtl_attn.cpu_isa()
    for isa in cpp_backend.supported_cpu_isas():
        with cpp_backend.use_cpu_isa(isa):
            assert fused_mtl_attn.cpu_isa() == isa
        assert fused_mtl_attn.cpu_isa() == before


def test_unusable_sets_are_refused_by_name():
    with pytest.raises(ValueError, match="must be one of avx512, avx2, baseline, got 'sse9'" if X86 else "got 'sse9'"):
        with cpp_backend.use_cpu_isa("sse9"):
            pass
    with pytest.raises(TypeError, match="must be a str"):
        with cpp_backend.use_cpu_isa(2):
            pass
    for isa in set(cpp_backend.compiled_cpu_isas()) - set(cpp_backend.supported_cpu_isas()):
        with pytest.raises(ValueError, match=f"asks for the {isa} kernels, which this CPU cannot run"):
            with cpp_backend.use_cpu_isa(isa):
                pass


def _in_fresh_process(value: str, code: str) -> str:
    env = dict(os.environ, **{ISA_VARIABLE: value})
    result = subprocess.run([sys.executable, "-W", "ignore", "-c", code], env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


REPORT = """
import torch, fused_mtl_attn
ok, reasons = fused_mtl_attn.available_backends()["cpu"]
if ok:
    print(fused_mtl_attn.cpu_isa())
else:
    try:
        fused_mtl_attn.cross_task_attention(*[torch.rand(1, 1, 2, 3)] * 3, backend="cpu")
    except RuntimeError as exc:
        print("refused:", exc)
"""


def test_environment_variable_forces_a_set():
    forced = cpp_backend.supported_cpu_isas()[-1]  # baseline: never the default on a machine with AVX2
    assert _in_fresh_process(forced, REPORT) == forced


def test_environment_variable_naming_an_unusable_set_makes_the_backend_refuse():
    out = _in_fresh_process("sse9", REPORT)
    assert out.startswith("refused:") and f"{ISA_VARIABLE}=sse9" in out and "must be one of" in out, out
    unsupported = set(cpp_backend.compiled_cpu_isas()) - set(cpp_backend.supported_cpu_isas())
    if unsupported:
        isa = sorted(unsupported)[0]
        out = _in_fresh_process(isa, REPORT)
        assert out.startswith("refused:") and "which this CPU cannot run" in out, out


def _functions(disassembly: str):
    """(demangled name, instruction lines) of each function of `objdump -d -C` output."""
    name, lines = None, []
    for line in disassembly.splitlines():
        header = re.match(r"^[0-9a-f]+ <(.*)>:$", line)
        if header:
            if name is not None:
                yield name, lines
            name, lines = header.group(1), []
        elif name is not None and "\t" in line:
            lines.append(line.split("\t")[-1])
    if name is not None:
        yield name, lines


@pytest.mark.skipif(not X86, reason="x86-64 instruction sets")
@pytest.mark.skipif(shutil.which("objdump") is None, reason="needs objdump (binutils)")
def test_build_is_portable():
    """Code the linker may share between the kernels (inline functions of torch or the standard library) must not
    be compiled for AVX2 or AVX-512, or a library built on one machine crashes on an older one: only the functions
    of the AVX2 and AVX-512 kernels may use VEX/EVEX instructions, and the AVX2 kernels no AVX-512 register."""
    from fused_mtl_attn import _C

    if _C.built_with_march:
        pytest.skip("built with FUSED_MTL_ATTN_CPU_ARCH (-march): a deliberately non-portable build")
    out = subprocess.run(["objdump", "-d", "-C", "--no-show-raw-insn", _C.__file__], capture_output=True, text=True,
                         check=True).stdout
    wide = re.compile(r"%[xyz]mm1[6-9]|%[xyz]mm[23][0-9]|%zmm|%k[1-7]\b|\{%k")  # EVEX: AVX-512 registers
    seen = {"cpu_baseline": 0, "cpu_avx2": 0, "cpu_avx512": 0}
    for name, instructions in _functions(out):
        kernels = next((k for k in seen if f"fused_mtl_attn::{k}::" in name), None)
        if kernels:
            seen[kernels] += 1
        if kernels in ("cpu_avx2", "cpu_avx512"):
            if kernels == "cpu_avx2":
                bad = [i for i in instructions if wide.search(i)]
                assert not bad, f"{name} (AVX2 kernels) uses AVX-512: {bad[:3]}"
            continue
        bad = [i for i in instructions if i.split()[0].startswith("v") or "%ymm" in i or "%zmm" in i]
        assert not bad, f"{name} is outside the AVX2/AVX-512 kernels but uses VEX/EVEX instructions: {bad[:3]}"
    assert all(seen.values()), f"kernel functions not found in the disassembly: {seen}"
