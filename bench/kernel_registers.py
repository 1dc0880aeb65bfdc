"""
Registers and spills of every launch of the fused RoPE kernel (kernels.py), compiled ahead of time for NVIDIA GPUs
(sm_80: A100, sm_90: H100) on a machine without one:

    python -m bench.kernel_registers            # a markdown table, and how many launches spill
    python -m bench.kernel_registers --json     # the rows, for tests/test_kernels.py

A thread that needs more registers than the compiler gives it spills to local memory (the cubin's "stack"): DRAM
traffic in a kernel whose whole cost is DRAM traffic, which the interpreter tests cannot see. Every launch the code
can pick (LAUNCHES x fp32/fp16/bf16 x d = 64, 128) is built through the launch's own code (kernels._prepare with
cuda=True), compiled with the ptxas that ships with triton, and read back with its cuobjdump. These are compiler
facts; how fast a tile runs is bench/bench_rope.py's question, on a GPU. docs/PERFORMANCE.md has the tables.
"""

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

import torch

import kernels

# What the launch can pick: a kind of launch x dtype x head width; the group size is a runtime argument of the kernel
# (one compiled kernel for all). Group sizes checked by default: 9 / 3 heads (SmolLM2-135M), 14 / 2 (Qwen2.5-0.5B),
# 32 / 8 (LLaMA-3-8B).
LAUNCHES = {  # name: (tables or freqs, DoPE spec: None, "parts", "gaussian" | "per_head" tables, keys per query head)
    "plain, tables": ("tables", None, False),
    "plain, freqs": ("freqs", None, False),
    "plain, expanded keys, tables": ("tables", None, True),
    "plain, expanded keys, freqs": ("freqs", None, True),
    "DoPE parts/all, tables": ("tables", "parts", True),
    "DoPE parts/all, freqs": ("freqs", "parts", True),
    "DoPE gaussian, tables": ("tables", "gaussian", True),
    "DoPE gaussian, freqs": ("freqs", "gaussian", True),
    "per-head tables": ("tables", "per_head", True),
}
AOT_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
AOT_GROUPS = ((9, 3), (14, 2), (32, 8))


def example_launch(name, dtype, d, n_head, n_kv, T=16, device="cpu"):
    """(args, meta) of the CUDA launch of LAUNCHES[name] for q (1, n_head, T, d) in model.py's layout, built from
    tensors on device (CPU, or meta for shapes too big to allocate) through the launch's own code (_prepare with
    cuda=True): the tile, the arguments and the constexprs that kernels.launch() would pass on a GPU."""
    source, dope_kind, expand_k = LAUNCHES[name]
    q = torch.zeros(1, T, n_head, d, dtype=dtype, device=device).transpose(1, 2)
    k = torch.zeros(1, T, n_kv, d, dtype=dtype, device=device).transpose(1, 2)
    pos = torch.arange(T, device=device)
    inv_freq = torch.ones(d // 2, device=device)
    cos = sin = None
    if source == "tables":
        shape = (n_head, T, d) if dope_kind == "per_head" else (T, d)
        cos = sin = torch.zeros(shape, device=device)
    spec = None
    if dope_kind in ("parts", "gaussian"):
        spec = dict(modes=torch.zeros(n_head, dtype=torch.int32, device=device),
                    bands=torch.zeros(d // 2, dtype=torch.int8, device=device), gaussian=dope_kind == "gaussian",
                    seed=0, sigma=1.0, layer=0)
    *_, args, meta = kernels._prepare(q, k, pos, cos, sin, inv_freq, 1.0, spec, expand_k, None, cuda=True)
    return args, meta


_TY = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.int64: "i64", torch.int32: "i32",
       torch.int8: "i8"}


def jit_specialization(args, meta):
    """(signature, constexprs, attrs, options) that Triton's JIT compiles for these launch arguments on CUDA, written
    out for this kernel: a tensor is a typed pointer, 16-byte aligned ones get tt.divisibility 16; an int gets its
    annotated type and, unless do_not_specialize, tt.divisibility 16 when a multiple of 16; a float is fp32."""
    fn = kernels._rope_kernel
    params = [p for p in fn.params if not p.is_constexpr]
    assert len(params) == len(args), (len(params), len(args))
    sig, attrs = {}, {}
    for i, (p, v) in enumerate(zip(params, args)):
        if isinstance(v, torch.Tensor):
            sig[p.name], div = "*" + _TY[v.dtype], v.data_ptr() % 16 == 0 and not p.do_not_specialize_on_alignment
        elif isinstance(v, int):
            assert p.annotation_type in ("i32", "i64"), f"{p.name}: annotate the int's type in the kernel"
            sig[p.name], div = p.annotation_type, not p.do_not_specialize and v % 16 == 0
        else:
            sig[p.name], div = "fp32", False
        if div:
            attrs[(fn.arg_names.index(p.name),)] = [["tt.divisibility", 16]]
    consts = {k: v for k, v in meta.items() if k in fn.arg_names}
    sig.update({k: "constexpr" for k in consts})
    options = {k: v for k, v in meta.items() if k not in fn.arg_names}
    return sig, consts, attrs, options


def compile_cubin(specialization, arch: int) -> bytes:
    """The cubin of the kernel for sm_<arch> (80: A100, 90: H100), compiled with triton's bundled ptxas."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig, consts, attrs, options = specialization
    src = ASTSource(kernels._rope_kernel, signature=sig, constexprs=consts, attrs=attrs)
    return kernels.triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options).asm["cubin"]


def nvidia_tools() -> dict:
    """Paths of the ptxas and cuobjdump that ship with triton's NVIDIA backend ($TRITON_PTXAS_PATH and
    $TRITON_CUOBJDUMP_PATH override them). FileNotFoundError, saying what is missing, when there are none."""
    from triton import backends

    if "nvidia" not in backends.backends:
        raise FileNotFoundError("this triton has no NVIDIA backend")
    paths = {}
    for tool in ("ptxas", "cuobjdump"):
        try:
            paths[tool] = getattr(kernels.triton.knobs.nvidia, tool).path
        except (AttributeError, RuntimeError):
            raise FileNotFoundError(f"no {tool} in triton's NVIDIA backend (set TRITON_{tool.upper()}_PATH)") from None
    return paths


def resource_usage(cubin: bytes, cuobjdump: str) -> dict:
    """Registers per thread and stack bytes (local memory for spills; 0 when nothing spills) of a cubin's kernel,
    read by `cuobjdump --dump-resource-usage`."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "rope.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        out = subprocess.run([cuobjdump, "--dump-resource-usage", path], capture_output=True, text=True,
                             check=True).stdout
    found = re.search(r"REG:(\d+)\s+STACK:(\d+)", out)
    assert found, f"no REG/STACK in cuobjdump's output:\n{out}"
    return dict(registers=int(found[1]), stack=int(found[2]))


def _compile_one(job):
    key, specialization, arch, cuobjdump = job
    return key, arch, resource_usage(compile_cubin(specialization, arch), cuobjdump)


def resources(archs=(80, 90), dtypes=tuple(AOT_DTYPES), ds=(64, 128), groups=AOT_GROUPS, launches=tuple(LAUNCHES),
              workers=None):
    """Registers and stack of every launch in launches x dtypes x ds x groups, compiled for each arch. Launches that
    compile identically (same specialization: the group size is a runtime argument) are compiled once. Returns one
    row per launch: dict(launch, dtype, d, groups, BLOCK_T, num_warps, sm<arch>: {registers, stack})."""
    cuobjdump = nvidia_tools()["cuobjdump"]
    rows = {}
    for name in launches:
        for dt in dtypes:
            for d in ds:
                for H, Hkv in groups:
                    spec = jit_specialization(*example_launch(name, AOT_DTYPES[dt], d, H, Hkv))
                    key = json.dumps([spec[0], spec[1], sorted(spec[2]), spec[3]], sort_keys=True)
                    row = rows.setdefault(key, dict(launch=name, dtype=dt, d=d, groups=[], spec=spec,
                                                    BLOCK_T=spec[1]["BLOCK_T"], num_warps=spec[3]["num_warps"]))
                    row["groups"].append(H // Hkv)
    jobs = [(key, row["spec"], arch, cuobjdump) for key, row in rows.items() for arch in archs]
    workers = workers or min(len(jobs), os.cpu_count() or 1)
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:  # each job is a ptxas run and MLIR passes: CPU bound
            done = list(pool.map(_compile_one, jobs))
    else:
        done = [_compile_one(j) for j in jobs]
    for key, arch, usage in done:
        rows[key][f"sm{arch}"] = usage
    return [{k: v for k, v in row.items() if k != "spec"} for row in rows.values()]


def format_resources(rows, archs=(80, 90)) -> str:
    """A markdown table of resources() rows."""
    cols = " | ".join(f"sm_{a} regs | sm_{a} stack B" for a in archs)
    head = f"| launch | dtype | d | group sizes | BLOCK_T | {cols} |"
    lines = [head, "|" + "---|" * (5 + 2 * len(archs))]
    for r in rows:
        usage = " | ".join(f"{r[f'sm{a}']['registers']} | {r[f'sm{a}']['stack']}" for a in archs)
        lines.append(f"| {r['launch']} | {r['dtype']} | {r['d']} | {', '.join(map(str, r['groups']))} | "
                     f"{r['BLOCK_T']} | {usage} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    p.add_argument("--workers", type=int, default=None, help="parallel compiles (default: the CPU count)")
    a = p.parse_args(argv)
    if kernels.triton is None or kernels.interpreted():
        print("bench.kernel_registers needs triton, without TRITON_INTERPRET=1", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    try:
        rows = resources(workers=a.workers)
    except FileNotFoundError as e:
        print(e, file=sys.stderr)
        return 3
    if a.json:
        print(json.dumps(rows))
        return 0
    print(format_resources(rows))
    bad = [r for r in rows for s in ("sm80", "sm90") if r[s]["stack"] or r[s]["registers"] > 128]
    print(f"\n{len(rows)} distinct compiled launches x 2 targets in {time.perf_counter() - t0:.0f} s; "
          f"{len(bad)} spill or exceed 128 registers per thread")
    return 0


if __name__ == "__main__":
    sys.exit(main())
