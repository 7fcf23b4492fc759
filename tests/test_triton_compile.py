"""Ahead-of-time GPU compilation of every Triton kernel, no GPU needed: each kernel x flag value x launch config
x dtype, for sm_80 and sm_90. Fails on a compile error (e.g. a tl.dot dimension < 16, which the interpreter
forgives), on shared memory above the target's limit, on more registers than REG_BOUND, on a spill (stack/local
memory, read from the cubin by cuobjdump; fp64 may spill up to SPILL_BOUND), and on a contraction that does not
run on tensor cores (no mma/wgmma in the PTX). Prints a table of registers / shared memory / spills / MMA.

The compiles run in two worker processes (this file run as a script, each taking half of the jobs) without
TRITON_INTERPRET: with the interpreter on when triton is imported, triton's own jit helpers (tl.cdiv, tl.sum) are
interpreted functions and nothing compiles. ASTSource's signature/constexprs API is the same in Triton 3.6 and
3.8: this runs on the pinned 3.8 and, through test_gpu_stack.py, on the GPU machine's 3.6.
"""
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile

import pytest

SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}  # bytes per block
REG_BOUND = 255  # the hardware limit per thread; beyond what fits ptxas spills, which SPILL_BOUND forbids
# bytes of stack + local memory per thread. fp32: none. fp16/bf16: one 8-byte slot, in one variant (the multi-block
# query kernel on sm_90, where ptxas settles on 80 registers and parks one value outside the position loop). fp64,
# the verification dtype: 8-64 B in a few compiles (ptxas caps them at 128 fp64-hungry registers)
SPILL_BOUND = {"fp32": 0, "fp16": 8, "bf16": 8, "fp64": 64}
# a runtime position stride (non-contiguous input, copied or strided: the slow path) costs more registers: under
# Triton 3.6, three fp32 variants on sm_90 spill 8-16 B
STRIDED_SPILL_BOUND = 16
DTYPES = ("fp32", "fp16", "bf16", "fp64")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# the compiles split evenly over this many worker processes (each compile is one thread's work)
WORKERS = 2
# the archs to compile for, comma-separated (default sm_80 and sm_90; test_gpu_stack.py: the GPU machine's sm_90)
ARCHS_VARIABLE = "FUSED_MTL_ATTN_AOT_ARCHS"


# ------------------------------------------------------------------------------ worker (no interpreter)


def _variants(kernels):
    for name, (_, _, flags) in kernels.items():
        for values in itertools.product(*flags.values()):
            yield name, dict(zip(flags, values))


def _compile_one(triton, tk, name, flags, cfg, dtype, arch, layout):
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn, acc_pointers, _ = tk.KERNELS[name]
    acc = "fp64" if dtype == "fp64" else "fp32"
    constexprs = dict(flags)
    for arg in fn.arg_names:
        if arg.startswith("BLOCK_"):
            constexprs[arg] = cfg.block_n if arg == "BLOCK_N" else cfg.block_c
        elif layout in ("contiguous", "aligned") and re.fullmatch(r"[a-z]s_n", arg):
            constexprs[arg] = 1  # a launch with a contiguous position axis specializes its stride to 1
        elif layout == "ones" and not arg.endswith("_ptr") and arg not in flags:
            constexprs[arg] = 1  # Triton specializes every integer argument equal to 1 (B, P, N, offsets, ...)
    signature = {
        arg: "constexpr" if arg in constexprs else
        "*" + (acc if arg in acc_pointers else dtype) if arg.endswith("_ptr") else "i32"
        for arg in fn.arg_names
    }
    attrs = {}
    if layout == "aligned":  # what a launch at the network's sizes specializes: 16-byte aligned pointers and
        # sizes, strides and offsets divisible by 16 (N = 19200, C * N, ...; not the channel counts 36, 72, ...)
        attrs = {(i,): [["tt.divisibility", 16]] for i, arg in enumerate(fn.arg_names) if arg not in constexprs and (
            arg.endswith("_ptr") or re.fullmatch(r"[a-z]s_[bpc]", arg) or re.fullmatch(r"n_pos|o\d", arg))}
    compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs),
                              target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
    # registers and spills from the cubin (compiled.n_regs needs a driver)
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        text = subprocess.run([cuobjdump, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    regs, stack, local = re.search(r"REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)", text).groups()
    # the contractions' instruction: wgmma (sm_90 warpgroup MMA), mma (warp MMA) or none (FMA)
    mma = re.search(r"\bwgmma\.mma_async[\w.]*|\bmma\.sync[\w.]*", compiled.asm["ptx"])
    return {"regs": int(regs), "spill": int(stack) + int(local), "shared": compiled.metadata.shared,
            "mma": mma.group(0) if mma else "",
            "vector_loads": len(re.findall(r"\bld\.global(?:\.\w+)*\.v[24]\.", compiled.asm["ptx"]))}


def _ships(tk, name, flags, dtype):
    """Whether the launchers ever run this variant in this dtype (the fused-dS query kernel: half precision only)."""
    import torch

    torch_dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "fp64": torch.float64}[dtype]
    return not (name == "query_grad" and flags["FUSE_DS"] and not tk.fuses_ds(torch_dtype))


def _jobs(tk, arch: int) -> list:
    """Every kernel variant x GPU config x dtype (contiguous positions), and on sm_90 also fp32 with a runtime
    position stride (the variant a non-contiguous input compiles) and fp32 with every integer argument 1 (sizes,
    strides and offsets specialized to constants, as a launch with them equal to 1 compiles)."""
    jobs = [(v, cfg, dtype, "contiguous") for v in _variants(tk.KERNELS) for cfg in tk.GPU_CONFIGS for dtype in DTYPES
            if _ships(tk, *v, dtype)]
    if arch == 90:
        jobs += [(v, cfg, "fp32", layout) for v in _variants(tk.KERNELS) for cfg in tk.GPU_CONFIGS
                 for layout in ("strided", "ones") if _ships(tk, *v, "fp32")]
        jobs += [(v, cfg, "bf16", "aligned") for v in _variants(tk.KERNELS) for cfg in tk.GPU_CONFIGS]
    return [(arch, *job) for job in jobs]


def compile_all(archs, shard: int, shards: int) -> list:
    """One row per compile, of every arch's jobs the shard-th of every `shards` (the workers split them evenly)."""
    import triton

    from fused_mtl_attn import triton_kernels as tk

    assert not tk.INTERPRETED, "kernels are interpreted: unset TRITON_INTERPRET to compile them"
    jobs = [job for arch in archs for job in _jobs(tk, arch)][shard::shards]
    rows = []
    for arch, (name, flags), cfg, dtype, layout in jobs:
        row = {"kernel": name, "flags": flags, "config": list(cfg), "dtype": dtype, "arch": arch, "layout": layout}
        try:
            row.update(_compile_one(triton, tk, name, flags, cfg, dtype, arch, layout))
        except Exception as exc:  # reported by the test that owns this kernel
            row["error"] = f"{type(exc).__name__}: {exc}"[-2000:]
        rows.append(row)
    return rows


if __name__ == "__main__":
    print(json.dumps(compile_all([int(a) for a in sys.argv[1].split(",")], int(sys.argv[2]), int(sys.argv[3]))))
    sys.exit(0)


# ------------------------------------------------------------------------------------------------- tests

pytest.importorskip("triton")


@pytest.fixture(scope="module")
def rows():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO, env.get("PYTHONPATH")]))
    archs = os.environ.get(ARCHS_VARIABLE) or ",".join(map(str, SHARED_LIMIT))
    workers = [subprocess.Popen([sys.executable, os.path.abspath(__file__), archs, str(shard), str(WORKERS)], env=env,
                                cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for shard in range(WORKERS)]
    out = []
    for shard, proc in enumerate(workers):
        stdout, stderr = proc.communicate(timeout=600)
        if proc.returncode != 0:
            pytest.fail(f"compile worker {shard} ({archs}) failed:\n{stderr[-4000:]}")
        out += json.loads(stdout.strip().splitlines()[-1])
    assert {r["arch"] for r in out} == {int(a) for a in archs.split(",")}
    return out


def _flag_id(flags):
    return ",".join(f"{k}={int(v)}" for k, v in flags.items()) or "-"


KERNEL_VARIANTS = [("reduce", {"BACKWARD": b, "RAGGED": r}) for b in (False, True) for r in (False, True)] + [
    ("apply", {"SINGLE": True}), ("apply", {"SINGLE": False}),
    ("query_grad", {"FUSE_DS": True}), ("query_grad", {"FUSE_DS": False})] + [
    ("source_grad", {"SINGLE": s, "RAGGED": r}) for s in (True, False) for r in (False, True)]


def test_every_kernel_variant_is_checked(rows):
    # the list above parametrizes the next test; it must cover triton_kernels.KERNELS
    assert {(r["kernel"], _flag_id(r["flags"])) for r in rows} == {(n, _flag_id(f)) for n, f in KERNEL_VARIANTS}


@pytest.mark.parametrize("name, flags", KERNEL_VARIANTS, ids=lambda x: x if isinstance(x, str) else _flag_id(x))
def test_kernel_compiles_within_limits(rows, name, flags):
    mine = [r for r in rows if r["kernel"] == name and r["flags"] == {k: v for k, v in flags.items()}]
    assert mine, f"no compile of {name} {flags}"
    bad = []
    for r in mine:
        where = f"{r['config']} {r['layout']} {r['dtype']} sm_{r['arch']}"
        if "error" in r:
            bad.append(f"{where}: {r['error']}")
        elif r["shared"] > SHARED_LIMIT[r["arch"]]:
            bad.append(f"{where}: {r['shared']} B shared memory > {SHARED_LIMIT[r['arch']]}")
        elif r["regs"] > REG_BOUND or r["spill"] > (STRIDED_SPILL_BOUND if r["layout"] == "strided"
                                                     else SPILL_BOUND[r["dtype"]]):
            bad.append(f"{where}: {r['regs']} registers, {r['spill']} B spilled")
    assert not bad, f"{name} {flags}:\n" + "\n".join(bad)


def test_contractions_run_on_tensor_cores(rows):
    # the documented rule (triton_kernels' docstring): bf16/fp16 operands in their own dtype, fp32 as tf32x3, so
    # every variant of those dtypes multiplies on tensor cores; fp64 is IEEE and reported only
    # (not the all-ones layout: offsets all 1 make every ragged source empty, and the compiler drops its loop)
    fma = [f"{r['kernel']} {_flag_id(r['flags'])} {r['config']} {r['dtype']} sm_{r['arch']}" for r in rows
           if "error" not in r and r["dtype"] != "fp64" and r["layout"] != "ones" and not r["mma"]]
    assert not fma, "compiled without an mma/wgmma instruction:\n" + "\n".join(fma)
    # sm_90 with half-precision operands and a 64-wide block: the warpgroup MMA (Hopper's fastest path)
    assert any(r["mma"].startswith("wgmma") for r in rows if r["arch"] == 90 and r["dtype"] == "bf16"), \
        "no bf16 variant uses wgmma on sm_90"


def test_aligned_launches_load_positions_in_vectors(rows):
    # at the network's sizes the position axis is contiguous and 16-divisible: the tiles of q, k, v and g must load as
    # vectors (ld.global.v2/.v4), not element by element (a masked tail would otherwise cost every load its width)
    aligned = [r for r in rows if r["layout"] == "aligned"]
    assert aligned, "no aligned compile"
    scalar = [f"{r['kernel']} {_flag_id(r['flags'])} {r['config']}" for r in aligned
              if "error" not in r and not r["vector_loads"]]
    assert not scalar, "no vector loads in:\n" + "\n".join(scalar)


def test_print_resource_table(rows, capsys):
    lines = [f"{'kernel':<10} {'flags':<11} {'config c,n,warps,stages':<24} {'layout':<10} {'dtype':<5} "
             f"{'arch':<5} {'regs':>4} {'shared':>7} {'spill':>5} mma"]
    ok = [r for r in rows if "error" not in r]
    for r in ok:
        lines.append(f"{r['kernel']:<10} {_flag_id(r['flags']):<11} {str(tuple(r['config'])):<24} {r['layout']:<10} "
                     f"{r['dtype']:<5} sm_{r['arch']:<2} {r['regs']:>4} {r['shared']:>7} {r['spill']:>5} {r['mma']}")
    if ok:
        lines.append(f"{len(rows)} compiles: max {max(r['regs'] for r in ok)} registers, max "
                     f"{max(r['shared'] for r in ok)} B shared, max {max(r['spill'] for r in ok)} B spilled")
    with capsys.disabled():
        print("\n" + "\n".join(lines))
