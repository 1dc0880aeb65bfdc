"""
Eager RoPE (model.rope_qk), torch.compile of it, and the fused Triton kernel (kernels.py), on a GPU, at long context:
B = 1, 32 query / 8 KV heads, d = 128 (LLaMA-3-8B's attention), T = 4K .. 64K, bf16 and fp16, plain RoPE and a DoPE
plan on a few heads.

RoPE is memory bound: the least it can do is read q and k and write them back once (plus the cos/sin tables if it
reads them), so the device's peak DRAM bandwidth is its physical limit. launch_bytes() models those bytes for each
fused launch, and the script first prints the time they imply at the published bandwidth of an H100 SXM (3.35 TB/s)
and an A100 80GB SXM (2.04 TB/s): the floor a perfect kernel would reach there. On a GPU each row then reports the
median time of several runs (CUDA events, L2 flushed before each), the speedup over eager, and the achieved
bandwidth: the modelled bytes divided by the time, against the peak (queried from the driver; --peak-gbps overrides).
Eager moves several times these bytes (see kernels.py); its "GB/s" column counts the table launch's bytes, so it
reads as an effective rate.

    python -m bench.bench_rope                                  # the bytes model; on a GPU, the measurements beside it
    python -m bench.bench_rope --plans none,parts,gaussian      # eager by-Gaussian draws on the CPU (dope.gaussian): slow
    TRITON_INTERPRET=1 python -m bench.bench_rope --interpret-smoke   # CPU: one tiny shape through the same code
"""

import argparse
import os
import statistics
import sys
import time

import torch

NO_GPU = ("no CUDA device: the fused kernel's speed can only be measured on a GPU; correctness is tested on CPU under "
          "TRITON_INTERPRET=1 (python -m pytest tests/test_kernels.py)")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-1}  # tests/test_kernels.py's
# published peak DRAM bandwidth, bytes per second (NVIDIA's datasheets: HBM3 on H100 SXM5, HBM2e on A100 80GB SXM4)
PUBLISHED_BW = {"H100 SXM": 3.35e12, "A100 80GB SXM": 2.04e12}
IN_KERNEL_PLANS = ("parts", "all", "gaussian")  # DoPE plans the kernel runs from a mode vector


def launch_bytes(B, H, Hkv, T, d, elem, source="tables", plan="none", per_head_tables=False):
    """Bytes one fused launch moves between DRAM and the chip, each byte once (the tables that all KV groups read
    are assumed to come from DRAM once, the rest from L2): q read and written; k read once and written once per KV
    head, or once per query head when keys are expanded (any DoPE plan); the float32 cos/sin tables (T, d) each,
    or (H, T, d) in table mode, or the float32 inverse frequencies (d/2,); the int64 positions (T,); under an
    in-kernel DoPE plan the int32 mode vector (H,) and int8 band mask (d/2,). elem: bytes per q/k element.
    Returns dict(qk, tables, small, total)."""
    expand = plan != "none"
    row = B * T * d * elem  # one head's q or k
    qk = 2 * H * row + Hkv * row + (H if expand else Hkv) * row
    if source == "tables":
        tables = 2 * (H if per_head_tables else 1) * T * d * 4
    else:
        assert not per_head_tables, "per-head tables are read, not computed"
        tables = d // 2 * 4
    small = T * 8 + ((H * 4 + d // 2) if plan in IN_KERNEL_PLANS else 0)
    return dict(qk=qk, tables=tables, small=small, total=qk + tables + small)


def model_rows(a):
    """(dtype, T, plan, source, bytes, {gpu: implied ms}) for every row of the benchmark."""
    for dn in a.dtypes.split(","):
        for T in (int(t) for t in a.seq_lens.split(",")):
            for plan in a.plans.split(","):
                for source in ("tables", "freqs"):
                    n = launch_bytes(a.batch, a.heads, a.kv_heads, T, a.head_dim, DTYPES[dn].itemsize, source,
                                     plan)["total"]
                    yield dn, T, plan, source, n, {g: n / bw * 1e3 for g, bw in PUBLISHED_BW.items()}


def print_model(a):
    print(f"bytes model of the fused launches: B={a.batch}, {a.heads} query / {a.kv_heads} KV heads, d={a.head_dim}; "
          "q, k read once, written once (keys per query head under DoPE), tables or inverse frequencies, positions")
    gpus = list(PUBLISHED_BW)
    cols = (f"{'dtype':>5} {'T':>6} {'plan':>8} {'source':>6} | {'MB moved':>9} | "
            + " | ".join(f"{g + ' ms':>16}" for g in gpus))
    print(cols + "   (time at the published bandwidth: " + ", ".join(f"{g} {PUBLISHED_BW[g] / 1e12:.2f} TB/s"
                                                             for g in gpus) + ")")
    print("-" * len(cols))
    for dn, T, plan, source, n, ms in model_rows(a):
        implied = " | ".join(f"{ms[g]:>16.4f}" for g in gpus)
        print(f"{dn:>5} {T:>6} {plan:>8} {source:>6} | {n / 1e6:>9.1f} | {implied}")


def timer(fn, reps, warmup, cuda, flush):
    """Median milliseconds of fn() over reps runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if cuda:
            flush.zero_()  # evict q, k and the tables from L2: each run reads them from DRAM
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def head_rope_for(plan_name, heads, n_head, inv_freq, native_len):
    import dope

    if plan_name == "none":
        return None
    plan = dope.DopePlan([(0, h) for h in heads], plan_name)
    plan.bands = dope.low_freq_bands(inv_freq.cpu(), native_len)
    return dope.HeadRope(plan, 0, list(heads), n_head)


def compiled(fn, reps, warmup, cuda, flush, ref):
    """torch.compile of the eager path (Inductor fuses the elementwise ops, the fair baseline for a hand-written
    kernel): its time in ms and max error, or (nan, nan) where it does not compile (the reason on stderr)."""
    try:
        c = torch.compile(fn, dynamic=False)
        err = max((x.float() - y.float()).abs().max().item() for x, y in zip(c(), ref))
        return timer(c, reps, warmup, cuda, flush), err
    except Exception as e:  # noqa: BLE001 (no compiler toolchain, a graph break Inductor cannot take, ...)
        print(f"(torch.compile of the eager path failed: {type(e).__name__}: {str(e).splitlines()[0][:120]})",
              file=sys.stderr)
        return float("nan"), float("nan")


def run_case(a, dtype, T, plan_name, device, flush):
    """One row: times (ms) of eager, fused with tables, fused from frequencies, torch.compile of eager; bytes; max
    errors."""
    import kernels
    import model

    B, H, Hkv, d = a.batch, a.heads, a.kv_heads, a.head_dim
    q = torch.randn(B, T, H, d, device=device, dtype=dtype).transpose(1, 2)  # (B, H, T, d), model.py's layout
    k = torch.randn(B, T, Hkv, d, device=device, dtype=dtype).transpose(1, 2)  # (B, Hkv, T, d)
    pos = torch.arange(a.start, a.start + T, device=device)
    inv_freq = model.inv_freq_default(a.base, d).to(device)
    cos, sin = model.rope_cos_sin(inv_freq, pos)  # (T, d) float32, built once per forward for all layers
    hr = head_rope_for(plan_name, a.dope_heads, H, inv_freq, a.native_len)
    cuda = device == "cuda"
    with torch.inference_mode():
        eager = lambda: model.rope_qk(q, k, cos, sin, pos, hr)  # noqa: E731
        tab = lambda: kernels.rope_qk(q, k, cos, sin, pos, hr)  # noqa: E731
        frq = lambda: kernels.rope_qk_from_freqs(q, k, inv_freq, pos, 1.0, hr)  # noqa: E731
        ref, got_t, got_f = eager(), tab(), frq()
        err = max((x.float() - y.float()).abs().max().item() for g in (got_t, got_f) for x, y in zip(g, ref))
        k_out = got_t[1].numel()
        del got_t, got_f
        ms = [timer(fn, a.reps, a.warmup, cuda, flush) for fn in (eager, tab, frq)]
        ms.append(compiled(eager, a.reps, a.warmup, cuda, flush, ref)[0] if a.compile else float("nan"))
        del ref
    tab_bytes, freq_bytes = (launch_bytes(B, H, Hkv, T, d, q.element_size(), s, plan_name)["total"]
                             for s in ("tables", "freqs"))
    assert k_out == B * (H if plan_name != "none" else Hkv) * T * d, "the bytes model's key count"
    return ms, tab_bytes, freq_bytes, err


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--seq-lens", default="4096,8192,16384,32768,65536")
    p.add_argument("--dtypes", default="bf16,fp16", help="comma list of bf16, fp16, fp32")
    p.add_argument("--plans", default="none,parts",
                   help="comma list of none, parts, all, gaussian (DoPE on --dope-heads of one layer)")
    p.add_argument("--dope-heads", default="0,5,17", help="query heads the DoPE plan denoises")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--base", type=float, default=500000.0, help="RoPE base (LLaMA-3: 500000)")
    p.add_argument("--native-len", type=int, default=8192, help="L_native for the by-parts bands")
    p.add_argument("--start", type=int, default=0, help="first position (a cached chunk starts later)")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--peak-gbps", type=float, default=None, help="peak DRAM bandwidth (default: asked of the driver)")
    p.add_argument("--no-compile", dest="compile", action="store_false",
                   help="skip the torch.compile column (compiling each shape takes seconds)")
    p.add_argument("--interpret-smoke", action="store_true",
                   help="run one tiny shape on CPU under TRITON_INTERPRET=1 (checks the script, not the speed)")
    a = p.parse_args(argv)

    if a.interpret_smoke:
        # triton reads the variable when kernels.py's @triton.jit runs: set it before the import below
        os.environ.setdefault("TRITON_INTERPRET", "1")
        a.seq_lens, a.batch, a.heads, a.kv_heads, a.head_dim, a.reps, a.warmup = "37", 1, 4, 2, 64, 1, 0
        a.dope_heads, a.dtypes, a.plans, a.native_len = "1", "fp32,bf16", "none,parts,all,gaussian", 32
        a.compile = False
        device = "cpu"
    elif not torch.cuda.is_available():
        print_model(a)
        print(f"\nno GPU measurement: {NO_GPU}")
        return 0
    else:
        device = "cuda"
        print_model(a)
        print()

    import kernels

    if not kernels.available():
        print("kernels.py cannot run here: " + ("triton is not installed (pip install triton)" if kernels.triton is None
              else "TRITON_INTERPRET=1 must be set before kernels.py is imported"), file=sys.stderr)
        return 1
    a.dope_heads = [int(h) for h in a.dope_heads.split(",")]
    peak = a.peak_gbps
    if peak is None and device == "cuda":
        try:
            import triton.testing

            peak = triton.testing.get_dram_gbps()
        except Exception as e:  # noqa: BLE001 (any driver query failure: just omit the column)
            print(f"(could not query the peak bandwidth: {e}; pass --peak-gbps)", file=sys.stderr)
    flush = torch.empty(256 * 2**20, dtype=torch.int8, device=device) if device == "cuda" else None

    name = torch.cuda.get_device_name() if device == "cuda" else "CPU, Triton interpreter (timings meaningless)"
    print(f"{name}; B={a.batch}, {a.heads} query / {a.kv_heads} KV heads, d={a.head_dim}, DoPE heads {a.dope_heads}; "
          f"median of {a.reps} runs" + (f"; peak DRAM bandwidth {peak:.0f} GB/s" if peak else ""))
    print("the physical limit: RoPE must read and write q and k once, so time >= those bytes / peak bandwidth")
    print("bytes: launch_bytes() above; eager's GB/s counts the table launch's bytes; model ms: tab at the published "
          "bandwidth; compile: torch.compile of the eager path; x: eager time / that time")
    gpus = list(PUBLISHED_BW)
    cols = (f"{'dtype':>5} {'T':>6} {'plan':>8} | {'eager ms':>9} {'tab ms':>8} {'freq ms':>8} {'compile ms':>10} | "
            + " ".join(f"{g.split()[0] + ' model':>11}" for g in gpus) + f" | {'x tab':>6} "
            f"{'x freq':>6} {'x compile':>9} | {'eager GB/s':>10} {'tab GB/s':>9} {'freq GB/s':>9} | "
            f"{'tab %pk':>7} {'freq %pk':>8} | {'max err':>8}")
    print(cols)
    print("-" * len(cols))
    ok = True
    for dn in a.dtypes.split(","):
        dtype = DTYPES[dn]
        for T in (int(t) for t in a.seq_lens.split(",")):
            for plan_name in a.plans.split(","):
                try:
                    (me, mt, mf, mc), tab_bytes, freq_bytes, err = run_case(a, dtype, T, plan_name, device, flush)
                except torch.cuda.OutOfMemoryError:
                    print(f"{dn:>5} {T:>6} {plan_name:>8} | out of memory")
                    torch.cuda.empty_cache()
                    continue
                gbps = [n / ms / 1e6 for n, ms in ((tab_bytes, me), (tab_bytes, mt), (freq_bytes, mf))]  # GB/s
                model = " ".join(f"{tab_bytes / PUBLISHED_BW[g] * 1e3:>11.4f}" for g in gpus)
                pct = [f"{100 * g / peak:>6.0f}%" if peak else f"{'-':>7}" for g in gbps[1:]]
                ok &= err <= TOL[dtype]
                bw = [f"{g:.0f}" if g >= 100 else f"{g:.3g}" for g in gbps]
                print(f"{dn:>5} {T:>6} {plan_name:>8} | {me:>9.3f} {mt:>8.3f} {mf:>8.3f} {mc:>10.3f} | {model} | "
                      f"{me / mt:>6.2f} {me / mf:>6.2f} {me / mc:>9.2f} | {bw[0]:>10} {bw[1]:>9} {bw[2]:>9} | "
                      f"{pct[0]:>7} {pct[1]:>8} | {err:>8.1e}")
    if not ok:
        print("fused and eager results differ beyond the tests' tolerances", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
